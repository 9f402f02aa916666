//! The serial console's host side: where guest output goes and where input comes from.

use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Read};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use vmm_core::{Serial, SerialOutput};
use vmm_sys_util::terminal::Terminal;

use crate::cli::SerialMode;
use crate::console_socket::{SocketConsole, Tee};

/// The guest UART that host input goes to: replaced at every boot, empty between boots.
type InputTarget = Arc<Mutex<Option<Arc<Mutex<Serial>>>>>;

/// The console's host side once set up. It outlives a VM: a reboot builds a new UART, which
/// gets the same output and input.
pub struct Console {
    output: Arc<Mutex<SerialOutput>>,
    mode: SerialMode,
    socket: Option<(UnixListener, SocketConsole)>,
    socket_console: Option<SocketConsole>,
    input: InputTarget,
    input_started: bool,
    raw_tty: bool,
}

/// The terminal on file descriptor 0, without `Stdin`'s lock: the input thread holds that lock
/// while it blocks in `read`, so restoring the terminal through it would never return.
struct StdinTty;

// SAFETY: `tty_fd` returns descriptor 0, which the process keeps open for its whole life (the
// trait's only requirement is a valid descriptor).
unsafe impl Terminal for StdinTty {
    fn tty_fd(&self) -> std::os::fd::RawFd {
        libc::STDIN_FILENO
    }
}

/// Guest console output, shared by every UART the console has served.
#[derive(Clone)]
pub struct SharedOutput(Arc<Mutex<SerialOutput>>);

impl std::fmt::Debug for SharedOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedOutput")
    }
}

impl std::io::Write for SharedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// Opens the output for `mode` (creates the file or binds the socket), copying it to
    /// `log` when given.
    pub fn open(mode: &SerialMode, log: Option<&Path>) -> anyhow::Result<Self> {
        let mut socket = None;
        let mut socket_console = None;
        let output: SerialOutput = match mode {
            SerialMode::Stdio => Box::new(io::stdout()),
            SerialMode::Off => Box::new(io::sink()),
            SerialMode::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("--serial: cannot open {}", path.display()))?,
            ),
            SerialMode::Socket(path) => {
                let listener = bind_private_socket(path)
                    .with_context(|| format!("--serial: cannot listen on {}", path.display()))?;
                let console = SocketConsole::default();
                socket = Some((listener, console.clone()));
                socket_console = Some(console.clone());
                Box::new(console)
            }
        };
        let output: SerialOutput = match log {
            None => output,
            Some(path) => {
                let log = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("--serial-log: cannot open {}", path.display()))?;
                Box::new(Tee { main: output, log })
            }
        };
        Ok(Self {
            output: Arc::new(Mutex::new(output)),
            mode: mode.clone(),
            socket,
            socket_console,
            input: Arc::new(Mutex::new(None)),
            input_started: false,
            raw_tty: false,
        })
    }

    /// A writer for a new UART's output.
    pub fn output(&self) -> SerialOutput {
        Box::new(SharedOutput(self.output.clone()))
    }

    /// Sends host input to `serial` from now on (stdin or socket clients), starting the input
    /// threads on first use.
    pub fn attach(&mut self, serial: Arc<Mutex<Serial>>) {
        *self.input.lock().unwrap_or_else(|p| p.into_inner()) = Some(serial);
        if !self.input_started {
            self.input_started = true;
            self.start_input();
        }
    }

    /// Host input is dropped until the next [`Console::attach`].
    pub fn detach(&self) {
        *self.input.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn start_input(&mut self) {
        let serial = self.input.clone();
        match self.mode {
            SerialMode::Stdio => {
                let stdin = io::stdin();
                if stdin.is_terminal() {
                    // Keys (Ctrl-C included) go to the guest, as on a real console.
                    self.raw_tty = StdinTty.set_raw_mode().is_ok();
                }
                spawn_input("serial-stdin", io::stdin(), serial);
            }
            SerialMode::File(_) | SerialMode::Off => {}
            SerialMode::Socket(_) => {
                if let Some((listener, console)) = self.socket.take() {
                    spawn_acceptor(listener, console, serial);
                }
            }
        }
    }

    /// Restores the terminal and removes the socket.
    pub fn close(&self) {
        if self.raw_tty {
            let _ = StdinTty.set_canon_mode();
        }
        if let SerialMode::Socket(path) = &self.mode {
            let _ = std::fs::remove_file(path);
        }
        if let Some(console) = &self.socket_console
            && console.dropped() > 0
        {
            log::warn!(
                "{} bytes of console output were dropped while no client read them",
                console.dropped()
            );
        }
    }
}

fn bind_private_socket(path: &Path) -> io::Result<UnixListener> {
    if path.exists() {
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

fn spawn_input<R: Read + Send + 'static>(name: &str, mut input: R, serial: InputTarget) {
    let spawned = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok(n) = input.read(&mut buf) {
                if n == 0 {
                    break;
                }
                queue_all(&serial, &buf[..n]);
            }
        });
    if let Err(e) = spawned {
        log::warn!("Serial input disabled: cannot start its thread: {e}");
    }
}

/// Queues all of `bytes`, waiting for the guest to drain the 64-byte FIFO when it is full;
/// dropped when no VM runs.
fn queue_all(target: &InputTarget, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        let Some(serial) = target.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return;
        };
        let taken = serial
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .queue_input(bytes);
        bytes = &bytes[taken..];
        if taken == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn spawn_acceptor(listener: UnixListener, console: SocketConsole, serial: InputTarget) {
    let spawned = std::thread::Builder::new()
        .name("serial-socket".into())
        .spawn(move || {
            for stream in listener.incoming().flatten() {
                let Ok(reader) = stream.try_clone() else {
                    continue;
                };
                // A new client replaces the old one, as a console re-attach does.
                if let Err(e) = console.attach(stream) {
                    log::warn!("Serial socket client rejected: {e}");
                    continue;
                }
                spawn_input("serial-client", reader, serial.clone());
            }
        });
    if let Err(e) = spawned {
        log::warn!("Serial socket disabled: cannot start its thread: {e}");
    }
}
