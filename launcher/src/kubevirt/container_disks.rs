//! The containerDisk containers' sockets. Each containerDisk (and the kernel-boot container) of
//! a launcher pod runs a small process that serves `<container-disk-dir>/disk_<n>.sock`
//! (`kernel-boot.sock`) and exits once its socket file is gone: that is how a launcher pod's
//! containers end with its VM. KubeVirt's virt-launcher-monitor removes every `*.sock` there
//! when virt-launcher exits; rvmm does the same on every way out.
//!
//! The directory is opened at start, before the main thread filters its system calls (it may
//! not open files afterwards); at exit the main thread reads the open directory and unlinks
//! the sockets in it (`getdents64`, `lseek`, `unlinkat`: [`crate::seccomp::main_rules`]).

use std::ffi::{CStr, CString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

/// The container-disk directory, opened for the cleanup at exit.
#[derive(Debug)]
pub struct ContainerDiskSockets {
    path: PathBuf,
    /// `None` when the directory cannot be opened (no container disks in this pod).
    dir: Option<Dir>,
}

#[derive(Debug)]
struct Dir(*mut libc::DIR);

impl Drop for Dir {
    fn drop(&mut self) {
        // SAFETY: the stream came from opendir and is closed once, here.
        unsafe { libc::closedir(self.0) };
    }
}

impl ContainerDiskSockets {
    /// Opens `dir` (`--container-disk-dir`); a missing directory is logged and cleans nothing.
    pub fn open(dir: &Path) -> Self {
        let stream = CString::new(dir.as_os_str().as_bytes())
            .ok()
            // SAFETY: a NUL-terminated path; opendir returns a stream or null.
            .map(|path| unsafe { libc::opendir(path.as_ptr()) })
            .filter(|stream| !stream.is_null())
            .map(Dir);
        if stream.is_none() {
            log::debug!(
                "No container-disk directory {}: no containerDisk sockets to remove at exit",
                dir.display()
            );
        }
        Self {
            path: dir.to_owned(),
            dir: stream,
        }
    }

    /// Removes every `*.sock` in the directory as it is now; logs what it did.
    pub fn remove_sockets(&self) {
        let Some(dir) = &self.dir else {
            return;
        };
        // SAFETY: the stream is open (owned by `self`) and used by this thread alone.
        let (removed, failed) = unsafe { remove_sockets_in(dir.0) };
        if removed > 0 {
            log::info!(
                "Removed {removed} containerDisk socket(s) in {}",
                self.path.display()
            );
        }
        if failed > 0 {
            log::warn!(
                "Cannot remove {failed} containerDisk socket(s) in {}: their containers keep \
                 running",
                self.path.display()
            );
        }
    }
}

/// Unlinks every `*.sock` entry of `dir`, from its start; returns (removed, failed). Makes no
/// allocation and logs nothing (it runs in a forked child in the tests).
///
/// # Safety
///
/// `dir` is an open directory stream no other thread uses meanwhile.
unsafe fn remove_sockets_in(dir: *mut libc::DIR) -> (usize, usize) {
    let (mut removed, mut failed) = (0, 0);
    // SAFETY: the caller's stream; rewinding and reading it has no other effect.
    unsafe {
        libc::rewinddir(dir);
        let fd = libc::dirfd(dir);
        loop {
            let entry = libc::readdir(dir);
            if entry.is_null() {
                break;
            }
            let name = CStr::from_ptr((*entry).d_name.as_ptr());
            if !name.to_bytes().ends_with(b".sock") {
                continue;
            }
            if libc::unlinkat(fd, name.as_ptr(), 0) == 0 {
                removed += 1;
            } else {
                failed += 1;
            }
        }
    }
    (removed, failed)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixListener;
    use std::sync::atomic::{AtomicPtr, Ordering};

    use super::*;
    use crate::kubevirt::grpc::tests::TempDir;
    use crate::seccomp::main_filter;
    use crate::seccomp::tests::{EXITED_CLEANLY, end_of_filtered_child};

    #[test]
    fn every_socket_goes_and_other_files_stay() {
        let dir = TempDir::new("cd-sockets");
        let _disk0 = UnixListener::bind(dir.0.join("disk_0.sock")).unwrap();
        let _kernel = UnixListener::bind(dir.0.join("kernel-boot.sock")).unwrap();
        std::fs::write(dir.0.join("disk_0.img"), b"image").unwrap();
        let sockets = ContainerDiskSockets::open(&dir.0);
        // Sockets that appear after the start are found too.
        let _disk1 = UnixListener::bind(dir.0.join("disk_1.sock")).unwrap();
        sockets.remove_sockets();
        let mut left: Vec<_> = std::fs::read_dir(&dir.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, ["disk_0.img"]);
        // A second cleanup finds nothing; a missing directory is no error.
        sockets.remove_sockets();
        ContainerDiskSockets::open(&dir.0.join("missing")).remove_sockets();
    }

    static STREAM: AtomicPtr<libc::DIR> = AtomicPtr::new(std::ptr::null_mut());

    fn remove_in_child() {
        // SAFETY: the test's open stream; the child is the only user of its copy.
        let (removed, failed) = unsafe { remove_sockets_in(STREAM.load(Ordering::SeqCst)) };
        if (removed, failed) != (1, 0) {
            // SAFETY: ends the child with a status the parent checks.
            unsafe { libc::_exit(1) };
        }
    }

    #[test]
    fn cleanup_runs_under_the_main_threads_filter() {
        let dir = TempDir::new("cd-filtered");
        let _disk = UnixListener::bind(dir.0.join("disk_0.sock")).unwrap();
        let sockets = ContainerDiskSockets::open(&dir.0);
        STREAM.store(sockets.dir.as_ref().unwrap().0, Ordering::SeqCst);
        assert_eq!(
            end_of_filtered_child(&main_filter().unwrap(), remove_in_child),
            EXITED_CLEANLY
        );
        assert!(!dir.0.join("disk_0.sock").exists());
    }
}
