//! The PC's legacy devices on port I/O: the 16550 serial port, the i8042 controller and the ACPI
//! power-management registers.

mod acpi_pm;
mod i8042;
mod serial;

pub use acpi_pm::{
    ACPI_PM_PORT_BASE, ACPI_PM_PORT_LEN, AcpiPm, AcpiPmRestoreError, AcpiPmSnapshot,
    PM1_CONTROL_LEN, PM1_CONTROL_PORT, PM1_EVENT_LEN, PM1_EVENT_PORT, PowerButton, PowerControl,
    RESET_PORT, RESET_VALUE, SCI_IRQ, SLP_TYP_S5,
};
pub use i8042::{I8042, I8042_KBD_IRQ, I8042_PORT_BASE, I8042_PORT_LEN, I8042Snapshot};
pub use serial::{
    COM1_IRQ, COM1_PORT_BASE, SERIAL_PORT_LEN, SerialConsole, SerialRestoreError, SerialSnapshot,
};
