//! Fixtures of the KVM tests: a console the test reads while the guest writes it, and a disk
//! image file removed when the test ends.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The guest's serial output, written by the VM and read by the test while the VM runs.
#[derive(Clone, Default)]
pub struct SharedConsole(Arc<Mutex<Vec<u8>>>);

impl Write for SharedConsole {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl SharedConsole {
    /// What the guest printed so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits up to a minute until `done` holds for the output; `what` names it in the panic.
    pub fn wait_until(&self, what: &str, done: impl Fn(&str) -> bool) {
        let start = Instant::now();
        while !done(&self.text()) {
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "guest never got there: {what}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to a minute for the guest to print `line`.
    pub fn wait_for(&self, line: &str) {
        self.wait_until(&format!("printed {line:?}"), |text| text.contains(line));
    }
}

/// A disk image in the temporary directory, removed on drop.
pub struct TempDisk(PathBuf);

impl TempDisk {
    /// A disk image called `name` (made unique to this process) holding `bytes`.
    pub fn new(name: &str, bytes: &[u8]) -> Self {
        let path = std::env::temp_dir().join(format!("rvmm-{}-{name}.img", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        Self(path)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// The 512-byte sector `n` as it is in the file now.
    pub fn sector(&self, n: usize) -> Vec<u8> {
        std::fs::read(&self.0).unwrap()[n * 512..(n + 1) * 512].to_vec()
    }
}

impl Drop for TempDisk {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
