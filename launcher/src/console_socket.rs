//! A console on a unix socket, as KubeVirt's `virt-serial0` needs: one client at a time can
//! attach, detach and re-attach; output while nobody is attached (or while a slow client is
//! not reading) waits in a bounded backlog instead of blocking the guest.
//!
//! The client's connection stays blocking: its input thread reads it. Output is sent with
//! `MSG_DONTWAIT` instead of setting `O_NONBLOCK`, which the reader's handle would share (its
//! `read` then fails with `WouldBlock` at once and host input is lost).

use std::collections::VecDeque;
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, MutexGuard};

/// Bytes kept for the next client; older output is dropped first.
pub const BACKLOG_BYTES: usize = 64 * 1024;

#[derive(Debug, Default)]
struct Attachment {
    client: Option<UnixStream>,
    backlog: VecDeque<u8>,
    dropped: u64,
}

impl Attachment {
    fn keep(&mut self, bytes: &[u8]) {
        self.backlog.extend(bytes);
        let excess = self.backlog.len().saturating_sub(BACKLOG_BYTES);
        if excess > 0 {
            self.backlog.drain(..excess);
            self.dropped += excess as u64;
        }
    }

    /// Sends as much of the backlog as the client takes without blocking.
    fn drain_to_client(&mut self) {
        while let Some(stream) = self.client.as_ref() {
            let (front, _) = self.backlog.as_slices();
            if front.is_empty() {
                return;
            }
            match send_without_blocking(stream, front) {
                Ok(0) => self.client = None,
                Ok(n) => {
                    self.backlog.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Detached (closed or reset): later output waits for the next client.
                Err(_) => self.client = None,
            }
        }
    }
}

/// `send(MSG_DONTWAIT | MSG_NOSIGNAL)`: never waits for the client, leaves the socket's file
/// flags (shared with the input thread's handle) alone.
fn send_without_blocking(stream: &UnixStream, bytes: &[u8]) -> io::Result<usize> {
    // SAFETY: the descriptor is the stream's, open while it is borrowed; the kernel reads at
    // most `bytes.len()` bytes from the slice's start.
    let sent = unsafe {
        libc::send(
            stream.as_raw_fd(),
            bytes.as_ptr().cast(),
            bytes.len(),
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
    usize::try_from(sent).map_err(|_| io::Error::last_os_error())
}

/// The shared attachment state: the writer side for the UART, the attach side for the acceptor.
#[derive(Clone, Debug, Default)]
pub struct SocketConsole(Arc<Mutex<Attachment>>);

impl SocketConsole {
    fn lock(&self) -> MutexGuard<'_, Attachment> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Attaches `client` (replacing any previous one) and sends it the backlog. The client
    /// stays blocking for whoever reads its input.
    pub fn attach(&self, client: UnixStream) -> io::Result<()> {
        client.set_nonblocking(false)?;
        let mut state = self.lock();
        state.client = Some(client);
        state.drain_to_client();
        Ok(())
    }

    /// Whether a client is attached.
    #[cfg(test)]
    pub fn attached(&self) -> bool {
        self.lock().client.is_some()
    }

    /// Output bytes dropped because the backlog was full.
    pub fn dropped(&self) -> u64 {
        self.lock().dropped
    }
}

impl Write for SocketConsole {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut state = self.lock();
        state.keep(buf);
        state.drain_to_client();
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Guest output copied to a log file as well as to the console's own destination.
#[derive(Debug)]
pub struct Tee<W: Write> {
    /// The console destination.
    pub main: W,
    /// The log.
    pub log: std::fs::File,
}

impl<W: Write> Write for Tee<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Err(e) = self.log.write_all(buf) {
            log::debug!("Serial log write failed: {e}");
        }
        self.main.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        let _ = self.log.flush();
        self.main.flush()
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::time::Duration;

    use super::*;

    fn read_available(stream: &mut UnixStream) -> Vec<u8> {
        stream
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stream.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    }

    #[test]
    fn output_before_anyone_attaches_reaches_the_first_client() {
        let mut console = SocketConsole::default();
        console.write_all(b"boot messages\n").unwrap();
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        console.attach(ours).unwrap();
        console.write_all(b"login: ").unwrap();
        assert_eq!(read_available(&mut theirs), b"boot messages\nlogin: ");
    }

    #[test]
    fn a_client_can_detach_and_a_new_one_gets_what_it_missed() {
        let mut console = SocketConsole::default();
        let (ours, theirs) = UnixStream::pair().unwrap();
        console.attach(ours).unwrap();
        drop(theirs);
        console.write_all(b"while detached\n").unwrap();
        console.write_all(b"more\n").unwrap();
        assert!(!console.attached());
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        console.attach(ours).unwrap();
        let got = read_available(&mut theirs);
        assert!(got.ends_with(b"while detached\nmore\n"), "{got:?}");
    }

    #[test]
    fn backlog_is_bounded_and_keeps_the_newest_output() {
        let mut console = SocketConsole::default();
        let chunk = vec![b'x'; 1000];
        for _ in 0..100 {
            console.write_all(&chunk).unwrap();
        }
        console.write_all(b"newest").unwrap();
        assert_eq!(console.dropped(), 100 * 1000 + 6 - BACKLOG_BYTES as u64);
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        console.attach(ours).unwrap();
        let got = read_available(&mut theirs);
        assert!(got.len() <= BACKLOG_BYTES);
        assert!(got.ends_with(b"newest"));
    }

    #[test]
    fn a_client_that_never_reads_does_not_block_the_guest() {
        let mut console = SocketConsole::default();
        let (ours, _theirs) = UnixStream::pair().unwrap();
        console.attach(ours).unwrap();
        let start = std::time::Instant::now();
        let chunk = vec![b'y'; 64 * 1024];
        for _ in 0..64 {
            console.write_all(&chunk).unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(5));
        assert!(console.dropped() > 0);
    }

    #[test]
    fn an_attached_clients_input_stays_readable() {
        let mut console = SocketConsole::default();
        let (ours, mut theirs) = UnixStream::pair().unwrap();
        let mut input = ours.try_clone().unwrap();
        console.attach(ours).unwrap();
        console.write_all(b"prompt$ ").unwrap();
        let typist = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            theirs.write_all(b"ls\n").unwrap();
            read_available(&mut theirs)
        });
        // The input thread's read waits for the client rather than failing with WouldBlock.
        let mut buf = [0u8; 16];
        let n = input.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"ls\n");
        assert_eq!(typist.join().unwrap(), b"prompt$ ");
    }

    #[test]
    fn tee_writes_the_log_and_the_console() {
        let path = std::env::temp_dir().join(format!("rvmm-tee-{}.log", std::process::id()));
        let log = std::fs::File::create(&path).unwrap();
        let mut tee = Tee {
            main: Vec::new(),
            log,
        };
        tee.write_all(b"hello\n").unwrap();
        assert_eq!(tee.main, b"hello\n");
        assert_eq!(std::fs::read(&path).unwrap(), b"hello\n");
        std::fs::remove_file(path).unwrap();
    }
}
