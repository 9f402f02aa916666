//! The i8042 keyboard controller: enough of it for a guest to probe the controller and an AT
//! keyboard, reset the machine (`reboot=k`) and receive Ctrl-Alt-Del from the host (which
//! Linux turns into an orderly reboot: the graceful-shutdown path of a microVM without ACPI).
//!
//! vm-superio's `I8042Device` only implements the reset command, so the controller state,
//! the keyboard's command replies and the scancode queue are modelled here.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use vm_superio::Trigger;

use crate::{BusDevice, Pausable, PauseError};

/// The controller decodes ports 0x60 (data) to 0x64 (command/status).
pub const I8042_PORT_BASE: u64 = 0x60;
/// Ports 0x60..=0x64.
pub const I8042_PORT_LEN: u64 = 5;
/// The keyboard's interrupt line.
pub const I8042_KBD_IRQ: u32 = 1;

const DATA: u64 = 0;
const COMMAND: u64 = 4;

// Status register bits.
const SR_OUTPUT_FULL: u8 = 0x01;
const SR_SYSTEM_FLAG: u8 = 0x04;
const SR_LAST_WAS_COMMAND: u8 = 0x08;
const SR_KBD_UNLOCKED: u8 = 0x10;

// Controller configuration byte bits.
const CTR_KBD_INT: u8 = 0x01;
const CTR_SYSTEM_FLAG: u8 = 0x04;
const CTR_KBD_DISABLE: u8 = 0x10;
const CTR_AUX_DISABLE: u8 = 0x20;
const CTR_XLATE: u8 = 0x40;

// Controller commands.
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_AUX_DISABLE: u8 = 0xa7;
const CMD_AUX_ENABLE: u8 = 0xa8;
const CMD_AUX_TEST: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_KBD_DISABLE: u8 = 0xad;
const CMD_KBD_ENABLE: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
const CMD_WRITE_AUX_BUFFER: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

// Keyboard commands and replies.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_GET_ID: u8 = 0xf2;
const KBD_SET_RATE: u8 = 0xf3;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_PASSED: u8 = 0xaa;
const SELF_TEST_PASSED: u8 = 0x55;
const PORT_TEST_PASSED: u8 = 0x00;
/// The aux (mouse) port has no device: its test reports a stuck clock line.
const AUX_TEST_NO_DEVICE: u8 = 0x01;

/// Scancode set 2 for Ctrl, Alt and Delete pressed, then released.
const CTRL_ALT_DEL_SET2: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, // make: Ctrl, Alt, Delete
    0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14, // break: Delete, Alt, Ctrl
];
/// The same keys as the controller delivers them when it translates to set 1 (CTR_XLATE, which
/// Linux turns on): break codes are the make codes with bit 7 set.
const CTRL_ALT_DEL_SET1: [u8; 8] = [
    0x1d, 0x38, 0xe0, 0x53, // make: Ctrl, Alt, Delete
    0xe0, 0xd3, 0xb8, 0x9d, // break: Delete, Alt, Ctrl
];

/// Bytes the guest has not read yet; a guest that never reads cannot grow it without bound.
const OUTPUT_CAPACITY: usize = 32;

/// What the next byte written to the data port means.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pending {
    None,
    ControllerConfig,
    OutputPort,
    KbdBuffer,
    AuxByte,
    KbdParameter,
}

/// The i8042 controller with an AT keyboard behind it.
#[derive(Debug)]
pub struct I8042<R: Trigger, K: Trigger> {
    reset: R,
    kbd_irq: K,
    control: u8,
    output_port: u8,
    last_was_command: bool,
    pending: Pending,
    output: VecDeque<u8>,
    paused: bool,
    /// Ctrl-Alt-Del asked for while paused: typed at the resume.
    deferred_ctrl_alt_del: bool,
}

/// The controller's state, format version 1.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042Snapshot {
    /// Controller configuration byte.
    pub control: u8,
    /// Output port.
    pub output_port: u8,
    /// The last write was to the command port.
    pub last_was_command: bool,
    /// What the next data byte means.
    pub pending: Pending,
    /// Bytes the guest has not read yet (at most 32 are restored).
    pub output: Vec<u8>,
    /// A Ctrl-Alt-Del asked for while paused and not yet typed.
    pub deferred_ctrl_alt_del: bool,
}

impl<R: Trigger, K: Trigger> I8042<R, K> {
    /// A controller that fires `reset` on a CPU reset pulse and `kbd_irq` when keyboard data
    /// is waiting.
    pub fn new(reset: R, kbd_irq: K) -> Self {
        Self {
            reset,
            kbd_irq,
            control: CTR_KBD_INT | CTR_SYSTEM_FLAG | CTR_AUX_DISABLE | CTR_XLATE,
            output_port: 0x03, // reset line released (bit 0), A20 enabled (bit 1)
            last_was_command: false,
            pending: Pending::None,
            output: VecDeque::new(),
            paused: false,
            deferred_ctrl_alt_del: false,
        }
    }

    /// The controller's state for a snapshot.
    pub fn snapshot(&self) -> I8042Snapshot {
        I8042Snapshot {
            control: self.control,
            output_port: self.output_port,
            last_was_command: self.last_was_command,
            pending: self.pending,
            output: self.output.iter().copied().collect(),
            deferred_ctrl_alt_del: self.deferred_ctrl_alt_del,
        }
    }

    /// A controller in the state of a snapshot, paused (as a restored VM starts).
    pub fn from_snapshot(state: &I8042Snapshot, reset: R, kbd_irq: K) -> Self {
        let mut output: VecDeque<u8> = state.output.iter().copied().collect();
        output.truncate(OUTPUT_CAPACITY);
        Self {
            control: state.control,
            output_port: state.output_port,
            last_was_command: state.last_was_command,
            pending: state.pending,
            output,
            paused: true,
            deferred_ctrl_alt_del: state.deferred_ctrl_alt_del,
            ..Self::new(reset, kbd_irq)
        }
    }

    /// Queues Ctrl-Alt-Del key presses and releases, as if typed on the keyboard. The keys go
    /// in whole or not at all: with the output buffer nearly full (a guest that stopped
    /// reading), a partial sequence would leave the guest with Ctrl or Alt held down.
    pub fn trigger_ctrl_alt_del(&mut self) {
        if self.paused {
            // A paused guest cannot take the interrupt; the keys go in at the resume.
            self.deferred_ctrl_alt_del = true;
            return;
        }
        let codes: &[u8] = if self.control & CTR_XLATE != 0 {
            &CTRL_ALT_DEL_SET1
        } else {
            &CTRL_ALT_DEL_SET2
        };
        if self.output.len() + codes.len() > OUTPUT_CAPACITY {
            crate::limited_log!(
                log::Level::Warn,
                "i8042: output buffer full, Ctrl-Alt-Del dropped"
            );
            return;
        }
        for &code in codes {
            self.push(code);
        }
    }

    fn status(&self) -> u8 {
        let mut status = SR_KBD_UNLOCKED;
        if !self.output.is_empty() {
            status |= SR_OUTPUT_FULL;
        }
        if self.control & CTR_SYSTEM_FLAG != 0 {
            status |= SR_SYSTEM_FLAG;
        }
        if self.last_was_command {
            status |= SR_LAST_WAS_COMMAND;
        }
        status
    }

    /// Queues a byte for the guest and raises the keyboard interrupt when enabled.
    fn push(&mut self, byte: u8) {
        if self.output.len() >= OUTPUT_CAPACITY {
            log::debug!("i8042: output buffer full, byte {byte:#x} dropped");
            return;
        }
        self.output.push_back(byte);
        self.interrupt();
    }

    fn interrupt(&self) {
        if self.control & CTR_KBD_INT != 0
            && !self.output.is_empty()
            && let Err(e) = self.kbd_irq.trigger()
        {
            log::warn!("i8042: keyboard interrupt failed: {e:?}");
        }
    }

    fn read_data(&mut self) -> u8 {
        let byte = self.output.pop_front().unwrap_or(0);
        // The next byte gets an interrupt of its own, as from a real controller.
        self.interrupt();
        byte
    }

    fn write_command(&mut self, command: u8) {
        self.last_was_command = true;
        self.pending = Pending::None;
        match command {
            CMD_READ_CTR => self.push(self.control),
            CMD_WRITE_CTR => self.pending = Pending::ControllerConfig,
            CMD_AUX_DISABLE => self.control |= CTR_AUX_DISABLE,
            CMD_AUX_ENABLE => self.control &= !CTR_AUX_DISABLE,
            CMD_AUX_TEST => self.push(AUX_TEST_NO_DEVICE),
            CMD_SELF_TEST => self.push(SELF_TEST_PASSED),
            CMD_KBD_TEST => self.push(PORT_TEST_PASSED),
            CMD_KBD_DISABLE => self.control |= CTR_KBD_DISABLE,
            CMD_KBD_ENABLE => self.control &= !CTR_KBD_DISABLE,
            CMD_READ_OUTPUT_PORT => self.push(self.output_port),
            CMD_WRITE_OUTPUT_PORT => self.pending = Pending::OutputPort,
            CMD_WRITE_KBD_BUFFER => self.pending = Pending::KbdBuffer,
            CMD_WRITE_AUX_BUFFER | CMD_WRITE_AUX => self.pending = Pending::AuxByte,
            CMD_RESET_CPU => self.pulse_reset(),
            other => log::debug!("i8042: command {other:#x} ignored"),
        }
    }

    fn pulse_reset(&self) {
        if let Err(e) = self.reset.trigger() {
            log::error!("i8042: reset event failed: {e:?}");
        }
    }

    fn write_data(&mut self, byte: u8) {
        self.last_was_command = false;
        match std::mem::replace(&mut self.pending, Pending::None) {
            Pending::ControllerConfig => {
                self.control = byte;
                self.interrupt();
            }
            Pending::OutputPort => {
                self.output_port = byte;
                // Bit 0 low holds the CPU in reset.
                if byte & 0x01 == 0 {
                    self.pulse_reset();
                }
            }
            Pending::KbdBuffer => self.push(byte),
            // No mouse: bytes for the aux port go nowhere.
            Pending::AuxByte => {}
            Pending::KbdParameter => self.push(KBD_ACK),
            Pending::None => self.keyboard_command(byte),
        }
    }

    fn keyboard_command(&mut self, byte: u8) {
        match byte {
            KBD_RESET => {
                self.output.clear();
                self.push(KBD_ACK);
                self.push(KBD_SELF_TEST_PASSED);
            }
            KBD_GET_ID => {
                self.push(KBD_ACK);
                self.push(0xab);
                self.push(0x83);
            }
            KBD_ECHO => self.push(KBD_ECHO),
            KBD_SET_LEDS | KBD_SET_RATE | KBD_SCANCODE_SET => {
                self.push(KBD_ACK);
                self.pending = Pending::KbdParameter;
            }
            _ => self.push(KBD_ACK),
        }
    }
}

/// The guest alone drives the controller, except for a Ctrl-Alt-Del from the host: while
/// paused that waits for the resume.
impl<R: Trigger, K: Trigger> Pausable for I8042<R, K> {
    fn pause(&mut self) -> Result<(), PauseError> {
        self.paused = true;
        Ok(())
    }

    fn resume(&mut self) {
        self.paused = false;
        if std::mem::take(&mut self.deferred_ctrl_alt_del) {
            self.trigger_ctrl_alt_del();
        }
    }
}

impl<R: Trigger + Send, K: Trigger + Send> BusDevice for I8042<R, K> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let [byte] = data {
            *byte = match offset {
                DATA => self.read_data(),
                COMMAND => self.status(),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let [byte] = data {
            match offset {
                DATA => self.write_data(*byte),
                COMMAND => self.write_command(*byte),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Clone, Default)]
    struct Counter(Arc<AtomicUsize>);

    impl Trigger for Counter {
        type E = std::io::Error;
        fn trigger(&self) -> std::io::Result<()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    impl Counter {
        fn get(&self) -> usize {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn controller() -> (I8042<Counter, Counter>, Counter, Counter) {
        let (reset, irq) = (Counter::default(), Counter::default());
        (I8042::new(reset.clone(), irq.clone()), reset, irq)
    }

    fn read(dev: &mut I8042<Counter, Counter>, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    /// Reads every waiting byte, as a driver does while the output-full bit is set.
    fn drain(dev: &mut I8042<Counter, Counter>) -> Vec<u8> {
        let mut bytes = Vec::new();
        while read(dev, COMMAND) & SR_OUTPUT_FULL != 0 {
            bytes.push(read(dev, DATA));
        }
        bytes
    }

    #[test]
    fn reset_command_fires_the_reset_trigger() {
        let (mut dev, reset, _) = controller();
        dev.write(COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(reset.get(), 1);
    }

    #[test]
    fn output_port_write_with_reset_line_low_resets() {
        let (mut dev, reset, _) = controller();
        dev.write(COMMAND, &[CMD_WRITE_OUTPUT_PORT]);
        dev.write(DATA, &[0xfe]);
        assert_eq!(reset.get(), 1);
    }

    #[test]
    fn other_commands_and_ports_do_not_reset() {
        let (mut dev, reset, _) = controller();
        dev.write(COMMAND, &[0xc0]);
        dev.write(DATA, &[CMD_RESET_CPU]);
        dev.write(COMMAND, &[CMD_RESET_CPU, 0x00]);
        dev.write(2, &[CMD_RESET_CPU]);
        assert_eq!(reset.get(), 0);
    }

    #[test]
    fn controller_config_reads_back_what_was_written() {
        let (mut dev, _, _) = controller();
        dev.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(drain(&mut dev), vec![0x65]);
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[0x47]);
        dev.write(COMMAND, &[CMD_READ_CTR]);
        assert_eq!(drain(&mut dev), vec![0x47]);
    }

    #[test]
    fn self_tests_pass_and_the_aux_port_reports_no_device() {
        let (mut dev, _, _) = controller();
        dev.write(COMMAND, &[CMD_SELF_TEST]);
        dev.write(COMMAND, &[CMD_KBD_TEST]);
        dev.write(COMMAND, &[CMD_AUX_TEST]);
        assert_eq!(drain(&mut dev), vec![0x55, 0x00, 0x01]);
    }

    #[test]
    fn keyboard_answers_reset_identify_and_parameter_commands() {
        let (mut dev, _, _) = controller();
        dev.write(DATA, &[KBD_RESET]);
        assert_eq!(drain(&mut dev), vec![KBD_ACK, KBD_SELF_TEST_PASSED]);
        dev.write(DATA, &[KBD_GET_ID]);
        assert_eq!(drain(&mut dev), vec![KBD_ACK, 0xab, 0x83]);
        dev.write(DATA, &[KBD_SET_LEDS]);
        dev.write(DATA, &[0x07]);
        assert_eq!(drain(&mut dev), vec![KBD_ACK, KBD_ACK]);
        dev.write(DATA, &[KBD_ECHO]);
        assert_eq!(drain(&mut dev), vec![KBD_ECHO]);
    }

    #[test]
    fn ctrl_alt_del_queues_translated_scancodes_and_interrupts() {
        let (mut dev, _, irq) = controller();
        dev.trigger_ctrl_alt_del();
        assert!(irq.get() >= 1);
        assert_eq!(drain(&mut dev), CTRL_ALT_DEL_SET1.to_vec());
    }

    #[test]
    fn ctrl_alt_del_is_set_2_when_the_guest_turns_translation_off() {
        let (mut dev, _, _) = controller();
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[CTR_KBD_INT]);
        dev.trigger_ctrl_alt_del();
        assert_eq!(drain(&mut dev), CTRL_ALT_DEL_SET2.to_vec());
    }

    #[test]
    fn ctrl_alt_del_while_paused_is_typed_at_the_resume_and_survives_a_snapshot() {
        let (mut dev, _, irq) = controller();
        dev.write(COMMAND, &[CMD_WRITE_KBD_BUFFER]);
        dev.write(DATA, &[0x42]);
        let before = irq.get();
        dev.pause().unwrap();
        dev.trigger_ctrl_alt_del();
        assert_eq!(irq.get(), before, "interrupt while paused");
        let saved = dev.snapshot();
        assert_eq!(saved.output, vec![0x42]);
        let irq2 = Counter::default();
        let mut restored = I8042::from_snapshot(&saved, Counter::default(), irq2.clone());
        restored.resume();
        assert!(irq2.get() >= 1);
        let mut expected = vec![0x42];
        expected.extend_from_slice(&CTRL_ALT_DEL_SET1);
        assert_eq!(drain(&mut restored), expected);
    }

    #[test]
    fn no_interrupt_while_the_guest_has_keyboard_interrupts_off() {
        let (mut dev, _, irq) = controller();
        dev.write(COMMAND, &[CMD_WRITE_CTR]);
        dev.write(DATA, &[0x00]);
        dev.trigger_ctrl_alt_del();
        assert_eq!(irq.get(), 0);
        assert_eq!(read(&mut dev, COMMAND) & SR_OUTPUT_FULL, SR_OUTPUT_FULL);
    }

    #[test]
    fn ctrl_alt_del_is_queued_whole_or_not_at_all_when_the_buffer_is_nearly_full() {
        // Found by the i8042 fuzz target: with 25 unread bytes only 7 of the 8 scancodes fitted,
        // and the lost Ctrl release left Ctrl held down in the guest.
        let (mut dev, _, _) = controller();
        let fill = OUTPUT_CAPACITY - CTRL_ALT_DEL_SET1.len() + 1;
        for _ in 0..fill {
            dev.write(COMMAND, &[CMD_WRITE_KBD_BUFFER]);
            dev.write(DATA, &[0x00]);
        }
        dev.trigger_ctrl_alt_del();
        assert_eq!(drain(&mut dev), vec![0x00; fill], "no partial sequence");

        // With exactly enough room the whole sequence goes in.
        for _ in 0..fill - 1 {
            dev.write(COMMAND, &[CMD_WRITE_KBD_BUFFER]);
            dev.write(DATA, &[0x00]);
        }
        dev.trigger_ctrl_alt_del();
        let mut expected = vec![0x00; fill - 1];
        expected.extend_from_slice(&CTRL_ALT_DEL_SET1);
        assert_eq!(drain(&mut dev), expected);
    }

    #[test]
    fn a_guest_that_never_reads_cannot_grow_the_buffer_without_bound() {
        let (mut dev, _, _) = controller();
        for _ in 0..10_000 {
            dev.write(DATA, &[KBD_GET_ID]);
        }
        assert_eq!(drain(&mut dev).len(), OUTPUT_CAPACITY);
    }

    #[test]
    fn wide_and_out_of_range_accesses_are_harmless() {
        let (mut dev, reset, _) = controller();
        dev.write(COMMAND, &[CMD_RESET_CPU, CMD_RESET_CPU]);
        dev.write(u64::MAX, &[CMD_RESET_CPU]);
        let mut wide = [0u8; 4];
        dev.read(DATA, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        assert_eq!(read(&mut dev, 3), 0xff);
        assert_eq!(reset.get(), 0);
        assert_eq!(read(&mut dev, DATA), 0, "empty buffer reads 0");
    }
}
