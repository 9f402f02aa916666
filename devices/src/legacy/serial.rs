//! The 16550A UART the guest uses as its console (`console=ttyS0`).

use std::io::Write;

use serde::{Deserialize, Serialize};
use vm_superio::serial::{Error as SerialError, NoEvents, SerialState};
use vm_superio::{Serial, Trigger};

use crate::{BusDevice, Pausable, PauseError};

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
    paused: bool,
}

/// The UART's registers and receive FIFO, format version 1 (vm-superio's `SerialState`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// SCR.
    pub scratch: u8,
    /// Received bytes the guest has not read.
    pub in_buffer: Vec<u8>,
}

/// A serial snapshot vm-superio refuses.
#[derive(Debug, thiserror::Error)]
#[error("Invalid serial port state in the snapshot: {0}")]
pub struct SerialRestoreError(String);

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
            paused: false,
        }
    }

    /// A console in the state of a snapshot, paused (as a restored VM starts).
    pub fn from_snapshot(
        state: &SerialSnapshot,
        interrupt: T,
        out: W,
    ) -> Result<Self, SerialRestoreError> {
        let state = SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let uart = Serial::from_state(&state, interrupt, NoEvents, out)
            .map_err(|e| SerialRestoreError(format!("{e:?}")))?;
        Ok(Self { uart, paused: true })
    }

    /// The UART's state for a snapshot.
    pub fn snapshot(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    /// Queues host input for the guest and returns how many bytes fitted in the receive FIFO
    /// (0 when it is full, or the console is paused: the caller retries later).
    pub fn queue_input(&mut self, input: &[u8]) -> usize {
        if self.paused {
            return 0;
        }
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

/// Only the host's input reaches a UART on its own: a paused console holds it back (the
/// console threads retry), so the receive FIFO and the interrupt line stay as they were.
impl<T: Trigger, W: Write + Send> Pausable for SerialConsole<T, W> {
    fn pause(&mut self) -> Result<(), PauseError> {
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) {
        self.paused = false;
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
    fn paused_console_takes_no_input_and_a_restored_one_has_the_saved_fifo() {
        let mut serial = SerialConsole::new(CountingTrigger::default(), Vec::new());
        serial.write(IER, &[0x01]);
        assert_eq!(serial.queue_input(b"ab"), 2);
        serial.pause().unwrap();
        assert_eq!(serial.queue_input(b"cd"), 0);
        let saved = serial.snapshot();
        assert_eq!(saved.in_buffer, b"ab");
        let irq = CountingTrigger::default();
        let mut restored = SerialConsole::from_snapshot(&saved, irq.clone(), Vec::new()).unwrap();
        assert_eq!(restored.queue_input(b"x"), 0, "restored paused");
        restored.resume();
        let mut byte = [0u8];
        restored.read(THR, &mut byte);
        assert_eq!(byte[0], b'a');
        assert_eq!(restored.snapshot().interrupt_enable, 0x01);
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
