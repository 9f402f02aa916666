//! The ACPI fixed hardware of a full (not hardware-reduced) ACPI platform, on port I/O (ACPI 6.5
//! §4.8): the PM1a event block with the power button's fixed event, the PM1a control block
//! through which the guest enters S5 (power off), and the FADT's reset register.
//!
//! The power button is pressed from the host; whether it reaches the guest depends on the guest's
//! OSPM having enabled the power button event (PWRBTN_EN), which is how the VMM tells a guest
//! that handles ACPI from one that does not (and falls back to Ctrl-Alt-Del for the latter).
//! Raising an enabled event raises the SCI, an edge-triggered interrupt (the MADT overrides the
//! ACPI default of level, active low, so an irqfd can raise it).
//!
//! | port | register |
//! | --- | --- |
//! | 0x600 | PM1a_STS (u16, write 1 to clear) |
//! | 0x602 | PM1a_EN (u16) |
//! | 0x604 | PM1a_CNT (u16): SCI_EN (always 1), SLP_TYP, SLP_EN |
//! | 0x606 | reset register (u8): [`RESET_VALUE`] resets the machine |

use serde::{Deserialize, Serialize};
use vm_superio::Trigger;

use crate::BusDevice;
use crate::cast::usize_from;

/// First port of the block.
pub const ACPI_PM_PORT_BASE: u64 = PM1_EVENT_PORT as u64;
/// Ports in the block.
pub const ACPI_PM_PORT_LEN: u64 = 8;
/// The PM1a event block (status, then enable).
pub const PM1_EVENT_PORT: u16 = 0x600;
/// Its length.
pub const PM1_EVENT_LEN: u8 = 4;
/// The PM1a control block.
pub const PM1_CONTROL_PORT: u16 = PM1_EVENT_PORT + 4;
/// Its length.
pub const PM1_CONTROL_LEN: u8 = 2;
/// The reset register.
pub const RESET_PORT: u16 = PM1_EVENT_PORT + 6;
/// What the guest writes to the reset register to reset the machine.
pub const RESET_VALUE: u8 = 1;
/// The SLP_TYP value of S5 (soft off), as the DSDT's `\_S5` package gives it.
pub const SLP_TYP_S5: u16 = 5;
/// The SCI's interrupt line (and GSI).
pub const SCI_IRQ: u32 = 9;

const STATUS: u64 = 0;
const ENABLE: u64 = 2;
const CONTROL: u64 = 4;
const RESET: u64 = 6;
/// PM1 status/enable: the power button.
const PWRBTN: u16 = 1 << 8;
/// PM1 status/enable: the global lock's release by firmware. There is no firmware to hold the
/// lock, so the event never fires, but ACPICA enables it (and reads it back) when the FACS has a
/// global lock.
const GBL: u16 = 1 << 5;
/// The fixed events rvmm has (the others read as zero).
const EVENTS: u16 = PWRBTN | GBL;
/// PM1 status: wake (set by hardware when the system wakes; never here).
const WAK_STS: u16 = 1 << 15;
/// PM1 control: the SCI, not the SMI, reports events (always: there is no legacy mode).
const SCI_EN: u16 = 1;
const SLP_TYP_SHIFT: u16 = 10;
const SLP_TYP_MASK: u16 = 0b111 << SLP_TYP_SHIFT;
const SLP_EN: u16 = 1 << 13;

/// What the guest's power management can do to the machine.
pub trait PowerControl: Send {
    /// The guest entered S5.
    fn power_off(&self);
    /// The guest wrote the reset register.
    fn reset(&self);
}

/// What happened when the host pressed the power button.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerButton {
    /// The guest's OSPM has the power button event enabled: it got the event.
    Delivered,
    /// The guest does not handle ACPI's power button (no ACPI, or not enabled yet).
    NotEnabled,
}

/// The registers a snapshot keeps (format version 2): what the guest's OSPM enabled (the power
/// button above all: without it a restored guest would miss the next shutdown request), the
/// events pending, the sleep type last written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AcpiPmSnapshot {
    /// PM1a_STS.
    pub status: u16,
    /// PM1a_EN.
    pub enable: u16,
    /// SLP_TYP as last written.
    pub sleep_type: u16,
}

/// A saved register with bits the device cannot have set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("The snapshot's ACPI {register} is {value:#06x}, which the PM1 registers cannot hold")]
pub struct AcpiPmRestoreError {
    /// The register's name.
    pub register: &'static str,
    /// Its saved value.
    pub value: u16,
}

/// The PM1a registers and the reset register, raising `sci` and calling `power`.
#[derive(Debug)]
pub struct AcpiPm<S: Trigger, P: PowerControl> {
    status: u16,
    enable: u16,
    /// SLP_TYP as last written (SCI_EN reads as set, SLP_EN as clear).
    sleep_type: u16,
    sci: S,
    power: P,
}

impl<S: Trigger, P: PowerControl> AcpiPm<S, P> {
    /// The registers after power-on: no event pending or enabled.
    pub fn new(sci: S, power: P) -> Self {
        Self {
            status: 0,
            enable: 0,
            sleep_type: 0,
            sci,
            power,
        }
    }

    /// The registers, for a snapshot.
    pub fn snapshot(&self) -> AcpiPmSnapshot {
        AcpiPmSnapshot {
            status: self.status,
            enable: self.enable,
            sleep_type: self.sleep_type,
        }
    }

    /// Puts saved registers back. No SCI is raised: an interrupt the guest had not taken yet
    /// is in the interrupt controllers' saved state. Values a guest could not have left are
    /// refused by name (a snapshot is untrusted input); nothing changes then.
    pub fn restore(&mut self, saved: &AcpiPmSnapshot) -> Result<(), AcpiPmRestoreError> {
        let check = |register, value: u16, allowed: u16| match value & !allowed {
            0 => Ok(()),
            _ => Err(AcpiPmRestoreError { register, value }),
        };
        check("PM1a_STS", saved.status, EVENTS | WAK_STS)?;
        check("PM1a_EN", saved.enable, EVENTS)?;
        check("SLP_TYP", saved.sleep_type, SLP_TYP_MASK >> SLP_TYP_SHIFT)?;
        self.status = saved.status;
        self.enable = saved.enable;
        self.sleep_type = saved.sleep_type;
        Ok(())
    }

    /// Presses the power button: the fixed event is set and the SCI raised if the guest enabled
    /// it.
    pub fn press_power_button(&mut self) -> PowerButton {
        if self.enable & PWRBTN == 0 {
            return PowerButton::NotEnabled;
        }
        let before = self.status;
        self.status |= PWRBTN;
        self.raise_sci_if_new(before, self.enable);
        PowerButton::Delivered
    }

    fn pending(status: u16, enable: u16) -> u16 {
        status & enable & EVENTS
    }

    /// The SCI is an edge: raise it when an enabled event becomes pending.
    fn raise_sci_if_new(&self, status_before: u16, enable_before: u16) {
        let before = Self::pending(status_before, enable_before);
        let now = Self::pending(self.status, self.enable);
        if now & !before != 0
            && let Err(e) = self.sci.trigger()
        {
            log::warn!("Cannot raise the SCI: {e:?}");
        }
    }

    fn register(&self, offset: u64) -> u16 {
        match offset {
            STATUS => self.status,
            ENABLE => self.enable,
            CONTROL => SCI_EN | self.sleep_type << SLP_TYP_SHIFT,
            _ => 0,
        }
    }

    fn write_register(&mut self, offset: u64, value: u16) {
        let (status, enable) = (self.status, self.enable);
        match offset {
            STATUS => self.status &= !(value & (EVENTS | WAK_STS)),
            ENABLE => self.enable = value & EVENTS,
            CONTROL => {
                self.sleep_type = (value & SLP_TYP_MASK) >> SLP_TYP_SHIFT;
                if value & SLP_EN != 0 {
                    self.sleep();
                }
            }
            // The reset register is one byte wide.
            RESET if value.to_le_bytes()[0] == RESET_VALUE => {
                log::info!("The guest wrote the ACPI reset register");
                self.power.reset();
            }
            _ => log::debug!("ACPI PM: write {value:#x} at {offset:#x} ignored"),
        }
        self.raise_sci_if_new(status, enable);
    }

    fn sleep(&mut self) {
        if self.sleep_type == SLP_TYP_S5 {
            self.power.power_off();
        } else {
            // Only S5 is in the DSDT; a guest asking for another state keeps running.
            log::warn!(
                "Guest asked for sleep type {}, which rvmm does not offer",
                self.sleep_type
            );
        }
    }
}

/// The register and the byte within it that `offset` falls on.
fn register_of(offset: u64) -> (u64, u64) {
    if offset >= RESET {
        (offset, 0)
    } else {
        (offset & !1, offset & 1)
    }
}

impl<S: Trigger + Send, P: PowerControl> BusDevice for AcpiPm<S, P> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (i, byte) in data.iter_mut().enumerate() {
            let (register, shift) = register_of(offset + i as u64);
            *byte = self.register(register).to_le_bytes()[usize_from(shift)];
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        // Whole registers at once where the access covers them (SLP_TYP and SLP_EN arrive
        // together), byte by byte otherwise.
        let mut i = 0;
        while i < data.len() {
            let at = offset + i as u64;
            let (register, shift) = register_of(at);
            let value = if shift == 0 && register < RESET && i + 1 < data.len() {
                i += 2;
                u16::from_le_bytes([data[i - 2], data[i - 1]])
            } else {
                i += 1;
                let keep = match register {
                    // Status bits are write-one-to-clear: other bytes write zero.
                    STATUS => 0,
                    _ => self.register(register) & !(0xff << (8 * shift)),
                };
                keep | u16::from(data[i - 1]) << (8 * shift)
            };
            self.write_register(register, value);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    #[derive(Debug, Default)]
    struct Counts {
        sci: AtomicUsize,
        off: AtomicUsize,
        reset: AtomicUsize,
    }

    #[derive(Debug, Clone, Default)]
    struct Recorder(Arc<Counts>);

    impl Trigger for Recorder {
        type E = std::convert::Infallible;
        fn trigger(&self) -> Result<(), Self::E> {
            self.0.sci.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    impl PowerControl for Recorder {
        fn power_off(&self) {
            self.0.off.fetch_add(1, Ordering::SeqCst);
        }
        fn reset(&self) {
            self.0.reset.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn pm() -> (AcpiPm<Recorder, Recorder>, Arc<Counts>) {
        let r = Recorder::default();
        (AcpiPm::new(r.clone(), r.clone()), r.0)
    }

    fn read16(pm: &mut AcpiPm<Recorder, Recorder>, offset: u64) -> u16 {
        let mut data = [0u8; 2];
        pm.read(offset, &mut data);
        u16::from_le_bytes(data)
    }

    #[test]
    fn the_power_button_reaches_only_a_guest_that_enabled_it() {
        let (mut pm, counts) = pm();
        assert_eq!(pm.press_power_button(), PowerButton::NotEnabled);
        assert_eq!(read16(&mut pm, STATUS), 0);
        pm.write(ENABLE, &PWRBTN.to_le_bytes());
        assert_eq!(pm.press_power_button(), PowerButton::Delivered);
        assert_eq!(read16(&mut pm, STATUS), PWRBTN);
        assert_eq!(counts.sci.load(Ordering::SeqCst), 1);
        // Pressed again before the guest cleared it: still one pending event, no new edge.
        pm.press_power_button();
        assert_eq!(counts.sci.load(Ordering::SeqCst), 1);
        pm.write(STATUS, &PWRBTN.to_le_bytes());
        assert_eq!(read16(&mut pm, STATUS), 0);
    }

    #[test]
    fn enabling_a_pending_event_raises_the_sci() {
        let (mut pm, counts) = pm();
        pm.write(ENABLE, &PWRBTN.to_le_bytes());
        pm.press_power_button();
        pm.write(ENABLE, &0u16.to_le_bytes());
        pm.write(ENABLE, &PWRBTN.to_le_bytes());
        assert_eq!(counts.sci.load(Ordering::SeqCst), 2);
        // Events rvmm does not have cannot be enabled; the global lock's can (ACPICA checks).
        pm.write(ENABLE, &0xffffu16.to_le_bytes());
        assert_eq!(read16(&mut pm, ENABLE), PWRBTN | GBL);
    }

    #[test]
    fn slp_en_with_the_s5_type_powers_off_and_other_types_do_not() {
        let (mut pm, counts) = pm();
        assert_eq!(read16(&mut pm, CONTROL), SCI_EN);
        let s5 = SLP_TYP_S5 << SLP_TYP_SHIFT;
        pm.write(CONTROL, &(s5 | SCI_EN).to_le_bytes());
        assert_eq!(counts.off.load(Ordering::SeqCst), 0, "SLP_TYP alone");
        pm.write(CONTROL, &(3 << SLP_TYP_SHIFT | SLP_EN).to_le_bytes());
        assert_eq!(counts.off.load(Ordering::SeqCst), 0, "S3 is not offered");
        pm.write(CONTROL, &(s5 | SLP_EN | SCI_EN).to_le_bytes());
        assert_eq!(counts.off.load(Ordering::SeqCst), 1);
        // Byte by byte too: the high byte carries SLP_TYP and SLP_EN.
        pm.write(CONTROL + 1, &[((s5 | SLP_EN) >> 8) as u8]);
        assert_eq!(counts.off.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_reset_register_resets_on_its_value_only() {
        let (mut pm, counts) = pm();
        pm.write(RESET, &[2]);
        assert_eq!(counts.reset.load(Ordering::SeqCst), 0);
        pm.write(RESET, &[RESET_VALUE]);
        assert_eq!(counts.reset.load(Ordering::SeqCst), 1);
        let mut data = [0xffu8; 8];
        pm.read(0, &mut data);
        assert_eq!(data, [0, 0, 0, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn restored_registers_keep_the_guests_power_button_enable_and_bad_ones_are_refused() {
        let (mut pm, _) = pm();
        pm.write(ENABLE, &(PWRBTN | GBL).to_le_bytes());
        pm.write(
            CONTROL,
            &(SLP_TYP_S5 << SLP_TYP_SHIFT | SCI_EN).to_le_bytes(),
        );
        pm.press_power_button();
        let saved = pm.snapshot();
        let (mut restored, counts) = self::pm();
        restored.restore(&saved).unwrap();
        assert_eq!(restored.snapshot(), saved);
        assert_eq!(counts.sci.load(Ordering::SeqCst), 0, "no SCI on restore");
        assert_eq!(read16(&mut restored, STATUS), PWRBTN);
        assert_eq!(
            read16(&mut restored, CONTROL),
            SLP_TYP_S5 << SLP_TYP_SHIFT | SCI_EN
        );
        restored.write(STATUS, &PWRBTN.to_le_bytes());
        assert_eq!(restored.press_power_button(), PowerButton::Delivered);
        assert_eq!(counts.sci.load(Ordering::SeqCst), 1);

        let (mut fresh, _) = self::pm();
        let bad = AcpiPmSnapshot { enable: 1, ..saved };
        let err = fresh.restore(&bad).unwrap_err();
        assert_eq!(
            err.to_string(),
            "The snapshot's ACPI PM1a_EN is 0x0001, which the PM1 registers cannot hold"
        );
        let bad = AcpiPmSnapshot {
            sleep_type: 8,
            ..saved
        };
        assert_eq!(fresh.restore(&bad).unwrap_err().register, "SLP_TYP");
        assert_eq!(fresh.snapshot(), AcpiPmSnapshot::default());
    }

    #[test]
    fn any_width_and_offset_is_harmless() {
        let (mut pm, counts) = pm();
        for offset in 0..ACPI_PM_PORT_LEN {
            for len in 1..=4 {
                pm.write(offset, &vec![0xfe; len]);
                let mut data = vec![0; len];
                pm.read(offset, &mut data);
            }
        }
        assert_eq!(counts.reset.load(Ordering::SeqCst), 0);
    }
}
