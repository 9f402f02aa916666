//! The serial console's host side: where guest output goes and where input comes from.

use std::fs::OpenOptions;
use std::io::{self, IsTerminal, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use rvmm_core::seccomp::spawn_filtered;
use rvmm_core::{Serial, SerialOutput};
use rvmm_devices::limited_log;
use vmm_sys_util::terminal::Terminal;

use crate::config::SerialMode;
use crate::console_socket::{SocketConsole, Tee};
use crate::seccomp::serial_filter;

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
    /// Filter the input threads ([`crate::seccomp::serial_rules`]).
    seccomp: bool,
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
    /// `log` when given. Its input threads are filtered when `seccomp` is true.
    pub fn open(mode: &SerialMode, log: Option<&Path>, seccomp: bool) -> anyhow::Result<Self> {
        let mut socket = None;
        let mut socket_console = None;
        let output: SerialOutput = match mode {
            SerialMode::Stdio => Box::new(io::stdout()),
            SerialMode::Off => Box::new(io::sink()),
            SerialMode::File(path) => Box::new(
                private_append(path)
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
                let log = private_append(path)
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
            seccomp,
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
        let filter = match self.seccomp.then(serial_filter).transpose() {
            Ok(filter) => filter,
            Err(e) => {
                log::warn!("Serial input disabled: {e}");
                return;
            }
        };
        let started = match self.mode {
            SerialMode::Stdio => {
                let stdin = io::stdin();
                if stdin.is_terminal() {
                    // Keys (Ctrl-C included) go to the guest, as on a real console.
                    self.raw_tty = StdinTty.set_raw_mode().is_ok();
                }
                spawn_filtered("serial-stdin", filter, move || read_stdin(&serial))
            }
            SerialMode::File(_) | SerialMode::Off => return,
            SerialMode::Socket(_) => match self.socket.take() {
                Some((listener, console)) => spawn_filtered("serial-socket", filter, move || {
                    serve_socket_clients(&listener, &console, &serial)
                }),
                None => return,
            },
        };
        if let Err(e) = started {
            log::warn!("Serial input disabled: cannot start its thread: {e}");
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

/// Opens `path` for appending, created with mode 0600 (guest output can hold secrets); an
/// existing file keeps its mode.
fn private_append(path: &Path) -> io::Result<std::fs::File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

fn bind_private_socket(path: &Path) -> io::Result<UnixListener> {
    if path.exists() {
        log::warn!("--serial: replacing {}", path.display());
        std::fs::remove_file(path)?;
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// `serial-stdin`: the terminal's (or pipe's) bytes to the guest until end of input.
fn read_stdin(serial: &InputTarget) {
    let mut buf = [0u8; 64];
    while let Ok(n) = io::stdin().lock().read(&mut buf) {
        if n == 0 {
            break;
        }
        let mut bytes = &buf[..n];
        // Waits for the guest to drain its 64-byte FIFO; dropped when no VM runs.
        while let Some(taken) = offer(serial, bytes) {
            bytes = &bytes[taken..];
            if bytes.is_empty() {
                break;
            }
            if taken == 0 {
                std::thread::sleep(INPUT_RETRY);
            }
        }
    }
}

/// How long input waits before it is offered again to a guest whose FIFO was full.
const INPUT_RETRY: Duration = Duration::from_millis(5);

/// Queues what the guest's FIFO takes of `bytes`; `None` when no VM runs (the input is
/// dropped).
fn offer(target: &InputTarget, bytes: &[u8]) -> Option<usize> {
    let serial = target.lock().unwrap_or_else(|p| p.into_inner()).clone()?;
    let taken = serial
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .queue_input(bytes);
    Some(taken)
}

/// `serial-socket`: accepts console clients (a new one replaces the old one) and feeds the
/// current client's keys to the guest, all on this one thread (`poll`): it starts no thread,
/// and a client whose input the guest does not take holds up neither the next client nor
/// the output. Input the guest's FIFO cannot take yet waits here, and the client is not read
/// meanwhile.
fn serve_socket_clients(listener: &UnixListener, console: &SocketConsole, serial: &InputTarget) {
    let mut client: Option<std::os::unix::net::UnixStream> = None;
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        let mut fds = [
            libc::pollfd {
                fd: listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: client.as_ref().map_or(-1, |c| c.as_raw_fd()),
                events: if pending.is_empty() { libc::POLLIN } else { 0 },
                revents: 0,
            },
        ];
        let timeout = if pending.is_empty() {
            -1
        } else {
            INPUT_RETRY.as_millis() as libc::c_int
        };
        // SAFETY: `fds` is an array of two initialised pollfds that outlives the call.
        let ready = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout) };
        if ready < 0 {
            if io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            log::warn!("Serial socket: {}", io::Error::last_os_error());
            return;
        }
        if fds[0].revents & libc::POLLIN != 0
            && let Ok((stream, _)) = listener.accept()
        {
            match stream.try_clone().and_then(|reader| {
                console.attach(stream)?;
                Ok(reader)
            }) {
                Ok(reader) => {
                    client = Some(reader);
                    pending.clear();
                }
                Err(e) => limited_log!(log::Level::Warn, "Serial socket client rejected: {e}"),
            }
        }
        if fds[1].revents != 0
            && let Some(reader) = client.as_mut()
        {
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => client = None,
                Ok(n) => pending.extend_from_slice(&buf[..n]),
            }
        }
        if !pending.is_empty() {
            match offer(serial, &pending) {
                Some(taken) => drop(pending.drain(..taken)),
                None => pending.clear(),
            }
        }
    }
}
