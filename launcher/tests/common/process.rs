//! A test's own directory and an rvmm child process, killed if the test fails half way.

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

use super::rvmm;

/// A temporary directory, removed at the end of the test.
pub struct TestDir(PathBuf);

impl TestDir {
    /// `rvmm-<tag>-<pid>` in the temporary directory, empty.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rvmm-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    /// A path inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TestDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// rvmm, killed if the test fails half way.
pub struct Rvmm(pub Child);

impl Rvmm {
    /// Spawns `rvmm ARGS` (stdout and stderr piped).
    pub fn start(args: &[&str]) -> Self {
        Self(rvmm().args(args).spawn().expect("spawn rvmm"))
    }

    /// Waits for the exit code, failing after `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let start = Instant::now();
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                start.elapsed() < timeout,
                "rvmm still runs after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` to rvmm.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on our own child's pid.
        assert_eq!(unsafe { libc::kill(self.0.id() as i32, signal) }, 0);
    }

    /// What rvmm wrote on stderr (read to its end: call once it has exited).
    pub fn stderr(&mut self) -> String {
        let mut text = String::new();
        if let Some(mut err) = self.0.stderr.take() {
            let _ = err.read_to_string(&mut text);
        }
        text
    }
}

impl Drop for Rvmm {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits until `file` contains `needle` `count` times.
pub fn wait_for_text(file: &Path, needle: &str, count: usize) -> String {
    let start = Instant::now();
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        if text.matches(needle).count() >= count {
            return text;
        }
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "{needle:?} x{count} not in {}: {text:?}",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a console socket until `needle` has been seen (or panics after 60 s); returns all
/// that was read.
pub fn read_until(stream: &mut UnixStream, needle: &str) -> String {
    stream
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let start = Instant::now();
    let mut text = String::new();
    let mut buf = [0u8; 4096];
    while !text.contains(needle) {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no '{needle}' in {text:?}"
        );
        if let Ok(n) = stream.read(&mut buf) {
            text.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    }
    text
}

/// Waits for `path` to exist (a socket rvmm binds).
pub fn wait_for_path(path: &Path) {
    let start = Instant::now();
    while !path.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}
