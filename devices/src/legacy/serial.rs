//! The 16550A UART the guest uses as its console (`console=ttyS0`).

use std::io::Write;

use vm_superio::serial::{Error as SerialError, NoEvents};
use vm_superio::{Serial, Trigger};

use crate::BusDevice;

/// First port of COM1.
pub const COM1_PORT_BASE: u64 = 0x3f8;
/// COM1's legacy interrupt line.
pub const COM1_IRQ: u32 = 4;
/// A 16550 decodes eight consecutive ports.
pub const SERIAL_PORT_LEN: u64 = 8;

/// A serial console: guest output goes to `W`, host input is queued with
/// [`SerialConsole::queue_input`].
pub struct SerialConsole<T: Trigger, W: Write + Send> {
    uart: Serial<T, NoEvents, W>,
}

impl<T: Trigger, W: Write + Send> std::fmt::Debug for SerialConsole<T, W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialConsole").finish_non_exhaustive()
    }
}

impl<T: Trigger, W: Write + Send> SerialConsole<T, W> {
    /// A console that raises `interrupt` and writes what the guest sends to `out`.
    pub fn new(interrupt: T, out: W) -> Self {
        Self {
            uart: Serial::new(interrupt, out),
        }
    }

    /// Queues host input for the guest and returns how many bytes fitted in the receive FIFO
    /// (0 when it is full: the caller retries once the guest has read some).
    pub fn queue_input(&mut self, input: &[u8]) -> usize {
        match self.uart.enqueue_raw_bytes(input) {
            Ok(n) => n,
            Err(SerialError::FullFifo) => 0,
            Err(e) => {
                log::warn!("Serial input interrupt failed: {e:?}");
                0
            }
        }
    }

    /// The output sink (tests read what the guest wrote from it).
    pub fn output(&self) -> &W {
        self.uart.writer()
    }
}

impl<T: Trigger + Send, W: Write + Send> BusDevice for SerialConsole<T, W>
where
    T::E: Send,
{
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // The UART has byte-wide registers only; wider or out-of-range reads float high.
        data.fill(0xff);
        if let ([byte], Ok(reg)) = (data, u8::try_from(offset))
            && u64::from(reg) < SERIAL_PORT_LEN
        {
            *byte = self.uart.read(reg);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let ([byte], Ok(reg)) = (data, u8::try_from(offset)) else {
            return;
        };
        if u64::from(reg) >= SERIAL_PORT_LEN {
            return;
        }
        if let Err(e) = self.uart.write(reg, *byte) {
            // A full host sink loses output but must never stop the guest.
            log::debug!("Serial output lost: {e:?}");
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

    const THR: u64 = 0;
    const IER: u64 = 1;
    const LSR: u64 = 5;

    #[test]
    fn guest_bytes_written_to_thr_reach_the_output() {
        let mut serial = SerialConsole::new(CountingTrigger::default(), Vec::new());
        for b in b"hi\n" {
            serial.write(THR, &[*b]);
        }
        assert_eq!(serial.output(), b"hi\n");
    }

    #[test]
    fn queued_input_is_readable_and_raises_an_interrupt_when_enabled() {
        let irq = CountingTrigger::default();
        let mut serial = SerialConsole::new(irq.clone(), Vec::new());
        serial.write(IER, &[0x01]); // received-data-available interrupt
        assert_eq!(serial.queue_input(b"ab"), 2);
        assert!(irq.0.load(Ordering::SeqCst) >= 1);
        let mut lsr = [0u8];
        serial.read(LSR, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data-ready bit set");
        let mut byte = [0u8];
        serial.read(THR, &mut byte);
        assert_eq!(byte[0], b'a');
        serial.read(THR, &mut byte);
        assert_eq!(byte[0], b'b');
    }

    #[test]
    fn full_receive_fifo_accepts_nothing_more() {
        let mut serial = SerialConsole::new(CountingTrigger::default(), Vec::new());
        let big = [b'x'; 1024];
        let first = serial.queue_input(&big);
        assert!(first > 0 && first < big.len());
        assert_eq!(serial.queue_input(&big), 0);
    }

    #[test]
    fn wide_or_out_of_range_accesses_are_ignored() {
        let mut serial = SerialConsole::new(CountingTrigger::default(), Vec::new());
        serial.write(THR, b"ab");
        serial.write(u64::MAX, b"c");
        serial.write(8, b"d");
        assert!(serial.output().is_empty());
        let mut wide = [0u8; 4];
        serial.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        let mut out_of_range = [0u8];
        serial.read(1 << 40, &mut out_of_range);
        assert_eq!(out_of_range, [0xff]);
    }
}
