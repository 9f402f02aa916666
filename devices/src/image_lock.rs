//! Disk image locks that QEMU understands: two VMMs (rvmm or QEMU, or two disks of one VM)
//! never write one image at once, and read-only users share it with each other.
//!
//! QEMU's file driver (`block/file-posix.c`) takes open file description (OFD) read locks
//! on single bytes of the image: byte `100 + i` while it holds permission bit `i`, byte
//! `200 + i` while it does not let others have permission `i`. Before it uses an image it
//! tests, with `F_OFD_GETLK`, that no one else refuses a permission it wants and no one else
//! holds one it refuses. rvmm takes the same bytes for the same permissions:
//!
//! | user | holds | refuses others |
//! | --- | --- | --- |
//! | writer (a disk without `readonly=on`) | consistent read, write | write, resize |
//! | reader (`readonly=on`, a qcow2 backing file) | consistent read | write, resize |
//!
//! So a second writer is refused, a reader is refused while someone writes (and a writer
//! while someone reads), and readers share. The locks live as long as the file's open file
//! description, i.e. until the last descriptor duplicated from it is closed; they do not
//! keep anyone from opening or reading the file, only users that take them.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// QEMU's `RAW_LOCK_PERM_BASE`: byte `100 + i` is locked while permission `i` is held.
const PERM_BASE: i64 = 100;
/// QEMU's `RAW_LOCK_SHARED_BASE`: byte `200 + i` is locked while permission `i` is refused to
/// others.
const SHARED_BASE: i64 = 200;

/// QEMU's `BLK_PERM_CONSISTENT_READ`.
const CONSISTENT_READ: u32 = 0;
/// QEMU's `BLK_PERM_WRITE`.
const WRITE: u32 = 1;
/// QEMU's `BLK_PERM_RESIZE`.
const RESIZE: u32 = 3;

/// How an image is used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageAccess {
    /// The guest may write it: nobody else may write or read it.
    Write,
    /// Read only: others may read it too, nobody may write it.
    Read,
}

impl ImageAccess {
    /// The permission bits held.
    fn held(self) -> &'static [u32] {
        match self {
            Self::Write => &[CONSISTENT_READ, WRITE],
            Self::Read => &[CONSISTENT_READ],
        }
    }

    /// The permission bits refused to others.
    fn refused(self) -> &'static [u32] {
        &[WRITE, RESIZE]
    }
}

/// Why an image cannot be locked.
#[derive(Debug, thiserror::Error)]
pub enum ImageLockError {
    /// Someone else (rvmm, QEMU, or this VM's other disk) writes the image, or reads it and
    /// refuses to let it be written.
    #[error(
        "{} is in use by another VM or another disk of this VM (images are shared only \
         read-only: readonly=on)",
        .0.display()
    )]
    InUse(PathBuf),
    /// The lock calls failed (a file system without OFD locks, say).
    #[error("Cannot lock {}", path.display())]
    Lock {
        /// The image.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Locks `file` (the image at `path`, named in errors) for `access`, or says who is in the
/// way. The locks go when the file's last duplicate is closed.
pub fn lock_image(file: &File, path: &Path, access: ImageAccess) -> Result<(), ImageLockError> {
    let lock_error = |source| ImageLockError::Lock {
        path: path.to_owned(),
        source,
    };
    for &bit in access.held() {
        set_lock(file, PERM_BASE + i64::from(bit)).map_err(lock_error)?;
    }
    for &bit in access.refused() {
        set_lock(file, SHARED_BASE + i64::from(bit)).map_err(lock_error)?;
    }
    // Nobody may refuse what is held, nor hold what is refused.
    let held = access
        .held()
        .iter()
        .map(|&bit| SHARED_BASE + i64::from(bit));
    let refused = access
        .refused()
        .iter()
        .map(|&bit| PERM_BASE + i64::from(bit));
    for byte in held.chain(refused) {
        if locked_by_others(file, byte).map_err(lock_error)? {
            // The file may stay open (a caller reporting the error): it must not keep
            // others out.
            unlock_image(file, access);
            return Err(ImageLockError::InUse(path.to_owned()));
        }
    }
    Ok(())
}

/// Drops the locks [`lock_image`] took for `access` on `file`'s open file description (so
/// through any duplicate of it), letting another user take the image.
pub fn unlock_image(file: &File, access: ImageAccess) {
    let held = access.held().iter().map(|&bit| PERM_BASE + i64::from(bit));
    let refused = access
        .refused()
        .iter()
        .map(|&bit| SHARED_BASE + i64::from(bit));
    for byte in held.chain(refused) {
        let lock = flock(libc::F_UNLCK, byte);
        // SAFETY: F_OFD_SETLK reads the flock, which lives on this frame.
        unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) };
    }
}

#[allow(
    clippy::cast_possible_truncation,
    reason = "F_*LCK and SEEK_SET are 0 to 2"
)]
fn flock(kind: libc::c_int, byte: i64) -> libc::flock {
    // SAFETY: flock is plain data; zero is a valid value for every field.
    let mut lock: libc::flock = unsafe { std::mem::zeroed() };
    lock.l_type = kind as libc::c_short;
    lock.l_whence = libc::SEEK_SET as libc::c_short;
    lock.l_start = byte;
    lock.l_len = 1;
    lock
}

/// A shared (read) OFD lock on one byte; never blocks.
fn set_lock(file: &File, byte: i64) -> io::Result<()> {
    let lock = flock(libc::F_RDLCK, byte);
    // SAFETY: F_OFD_SETLK reads the flock, which lives on this frame.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_SETLK, &lock) } < 0 {
        let err = io::Error::last_os_error();
        // Another description's write lock on the byte: that user refuses us.
        if matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EACCES)) {
            return Ok(());
        }
        return Err(err);
    }
    Ok(())
}

/// Whether another open file description holds a lock on `byte` (QEMU's test: would a
/// write lock there conflict?).
fn locked_by_others(file: &File, byte: i64) -> io::Result<bool> {
    let mut lock = flock(libc::F_WRLCK, byte);
    // SAFETY: F_OFD_GETLK reads and updates the flock, which lives on this frame.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_OFD_GETLK, &mut lock) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(i32::from(lock.l_type) != libc::F_UNLCK)
}

#[cfg(test)]
mod tests {
    use std::fs::OpenOptions;

    use super::*;

    fn image(name: &str) -> PathBuf {
        let path = std::env::temp_dir().join(format!("rvmm-lock-{}-{name}", std::process::id()));
        std::fs::write(&path, [0u8; 4096]).unwrap();
        path
    }

    fn open(path: &Path) -> File {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    #[test]
    fn a_second_writer_is_refused_until_the_first_closes() {
        let path = image("writers");
        let first = open(&path);
        lock_image(&first, &path, ImageAccess::Write).unwrap();
        let second = open(&path);
        let err = lock_image(&second, &path, ImageAccess::Write).unwrap_err();
        assert_eq!(
            err.to_string(),
            format!(
                "{} is in use by another VM or another disk of this VM (images are shared \
                 only read-only: readonly=on)",
                path.display()
            )
        );
        // A duplicate shares the description: the lock stays until both are closed.
        let duplicate = first.try_clone().unwrap();
        drop(first);
        assert!(lock_image(&open(&path), &path, ImageAccess::Write).is_err());
        drop(duplicate);
        lock_image(&open(&path), &path, ImageAccess::Write).unwrap();
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn readers_share_and_exclude_writers() {
        let path = image("readers");
        let (a, b) = (open(&path), open(&path));
        lock_image(&a, &path, ImageAccess::Read).unwrap();
        lock_image(&b, &path, ImageAccess::Read).unwrap();
        let writer = open(&path);
        assert!(lock_image(&writer, &path, ImageAccess::Write).is_err());
        drop((a, b));
        lock_image(&writer, &path, ImageAccess::Write).unwrap();
        let reader = open(&path);
        assert!(lock_image(&reader, &path, ImageAccess::Read).is_err());
        std::fs::remove_file(path).unwrap();
    }
}
