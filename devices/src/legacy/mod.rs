//! The PC's legacy devices on port I/O: the 16550 serial port and the i8042 controller.

mod i8042;
mod serial;

pub use i8042::{I8042, I8042_KBD_IRQ, I8042_PORT_BASE, I8042_PORT_LEN, I8042Snapshot};
pub use serial::{
    COM1_IRQ, COM1_PORT_BASE, SERIAL_PORT_LEN, SerialConsole, SerialRestoreError, SerialSnapshot,
};
