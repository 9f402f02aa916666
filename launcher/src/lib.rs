//! The rvmm launcher as a library: command line and config file parsing, the serial console's
//! host side, shutdown signals, and (for tests and fuzzing) everything the `rvmm` binary runs.

pub mod cli;
pub mod config;
pub mod console;
pub mod console_socket;
pub mod keyvalue;
pub mod shutdown;
