//! The i8042 keyboard controller, which microVM guests use to reset (`reboot=k`).

use vm_superio::{I8042Device, Trigger};

use crate::BusDevice;

/// The controller decodes ports 0x60 (data) to 0x64 (command/status).
pub const I8042_PORT_BASE: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_PORT_LEN: u64 = 5;

/// The i8042: a guest write of 0xFE to the command port fires the reset trigger.
#[derive(Debug)]
pub struct I8042<T: Trigger> {
    controller: I8042Device<T>,
}

impl<T: Trigger> I8042<T> {
    /// A controller that fires `reset` when the guest pulses the CPU reset line.
    pub fn new(reset: T) -> Self {
        Self {
            controller: I8042Device::new(reset),
        }
    }
}

impl<T: Trigger + Send> BusDevice for I8042<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let ([byte], Ok(reg)) = (data, u8::try_from(offset)) {
            *byte = self.controller.read(reg);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let ([byte], Ok(reg)) = (data, u8::try_from(offset))
            && let Err(e) = self.controller.write(reg, *byte)
        {
            log::error!("i8042 reset event failed: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Clone, Default)]
    struct CountingTrigger(Arc<AtomicUsize>);

    impl Trigger for CountingTrigger {
        type E = std::io::Error;
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    const COMMAND: u64 = 4;

    #[test]
    fn reset_command_fires_the_reset_trigger() {
        let reset = CountingTrigger::default();
        let mut i8042 = I8042::new(reset.clone());
        i8042.write(COMMAND, &[0xfe]);
        assert_eq!(reset.0.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn other_commands_and_ports_do_not_reset() {
        let reset = CountingTrigger::default();
        let mut i8042 = I8042::new(reset.clone());
        i8042.write(COMMAND, &[0xaa]);
        i8042.write(0, &[0xfe]);
        i8042.write(COMMAND, &[0xfe, 0x00]);
        assert_eq!(reset.0.load(Ordering::SeqCst), 0);
    }
}
