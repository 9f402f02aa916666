//! Disk image formats: raw and qcow2, told apart by their first bytes (never by file name),
//! with qcow2 backing chains. [`DiskImage`] reads and writes guest bytes synchronously (the
//! boot loader, copy-on-write, tests); virtio-blk moves its data through its own engines and
//! asks [`qcow2::Qcow2`] only where the data lives.

pub mod qcow2;
mod storage;

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::cast::usize_from;

pub use storage::{MemStorage, Storage};

/// Backing images deeper than this are refused (QEMU allows more, but no real chain is).
pub const MAX_CHAIN_DEPTH: usize = 16;

/// An image format.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageFormat {
    /// The guest's bytes, as they are.
    #[default]
    Raw,
    /// QEMU copy-on-write v2/v3.
    Qcow2,
}

impl ImageFormat {
    /// QEMU's name (`raw`, `qcow2`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Raw => "raw",
            Self::Qcow2 => "qcow2",
        }
    }

    /// The format QEMU calls `name`.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "raw" => Some(Self::Raw),
            "qcow2" => Some(Self::Qcow2),
            _ => None,
        }
    }
}

/// The format of the image in `storage`, by its magic.
pub fn detect(storage: &dyn Storage) -> io::Result<ImageFormat> {
    let mut magic = [0u8; 4];
    let n = storage.read_upto(&mut magic, 0)?;
    Ok(if n == 4 && magic == qcow2::header::MAGIC {
        ImageFormat::Qcow2
    } else {
        ImageFormat::Raw
    })
}

/// Why an image cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// The file cannot be opened or read.
    #[error("Cannot open disk image {}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A qcow2 image that is invalid, lies about itself, or needs what rvmm lacks.
    #[error("Disk image {} is not a usable qcow2 image", path.display())]
    Qcow2 {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        #[source]
        source: qcow2::OpenError,
    },
    /// The format given does not match the image's.
    #[error("Disk image {} is {found}, not {expected}", path.display())]
    FormatMismatch {
        /// The image.
        path: PathBuf,
        /// Its format by magic.
        found: &'static str,
        /// The format asked for.
        expected: &'static str,
    },
    /// A backing image cannot be used.
    #[error("Disk image {}: backing file {}", path.display(), backing.display())]
    Backing {
        /// The image.
        path: PathBuf,
        /// Its backing file.
        backing: PathBuf,
        /// Why.
        #[source]
        source: Box<ImageError>,
    },
    /// The backing format is neither raw nor qcow2.
    #[error("Disk image {}: backing format '{format}' is not supported (raw or qcow2)", path.display())]
    BackingFormat {
        /// The image.
        path: PathBuf,
        /// The format its header names.
        format: String,
    },
    /// The backing chain comes back to an image already in it.
    #[error("Disk image {}: the backing chain loops back to {}", path.display(), again.display())]
    Loop {
        /// The image.
        path: PathBuf,
        /// The image met twice.
        again: PathBuf,
    },
    /// The backing chain is too long.
    #[error("Disk image {}: the backing chain is deeper than {MAX_CHAIN_DEPTH}", path.display())]
    TooDeep {
        /// The image.
        path: PathBuf,
    },
    /// The image names a backing file where none may be opened (in-memory images).
    #[error("Disk image {}: a backing file is not allowed here", path.display())]
    NoBackingAllowed {
        /// The image.
        path: PathBuf,
    },
}

/// A raw image.
#[derive(Debug)]
pub struct RawImage {
    storage: Box<dyn Storage>,
    size: u64,
}

/// An open image of either format.
#[derive(Debug)]
pub enum DiskImage {
    /// Raw.
    Raw(RawImage),
    /// qcow2, with its backing chain.
    Qcow2(Box<qcow2::Qcow2>),
}

impl DiskImage {
    /// Opens the image at `path` (writable or read-only; backing images always read-only) in
    /// `format`, or the format its magic says when `None`.
    pub fn open(
        path: &Path,
        writable: bool,
        format: Option<ImageFormat>,
    ) -> Result<Self, ImageError> {
        Self::open_in_chain(path, writable, format, &mut Vec::new())
    }

    fn open_in_chain(
        path: &Path,
        writable: bool,
        format: Option<ImageFormat>,
        chain: &mut Vec<PathBuf>,
    ) -> Result<Self, ImageError> {
        let open_err = |source| ImageError::Open {
            path: path.to_owned(),
            source,
        };
        let canonical = std::fs::canonicalize(path).map_err(open_err)?;
        if chain.contains(&canonical) {
            return Err(ImageError::Loop {
                path: chain.last().cloned().unwrap_or_default(),
                again: path.to_owned(),
            });
        }
        if chain.len() >= MAX_CHAIN_DEPTH {
            return Err(ImageError::TooDeep {
                path: path.to_owned(),
            });
        }
        chain.push(canonical);
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(open_err)?;
        let backing_dir = path.parent().map(Path::to_owned);
        Self::from_storage(
            Box::new(file),
            writable,
            format,
            path,
            |image, name, fmt| {
                let Some(dir) = &backing_dir else {
                    return Err(ImageError::NoBackingAllowed {
                        path: image.to_owned(),
                    });
                };
                let backing = dir.join(name);
                Self::open_in_chain(&backing, false, fmt, chain).map_err(|source| match source {
                    // Reported once, at the top of the chain.
                    e @ (ImageError::Loop { .. } | ImageError::TooDeep { .. }) => e,
                    source => ImageError::Backing {
                        path: image.to_owned(),
                        backing,
                        source: Box::new(source),
                    },
                })
            },
        )
    }

    /// Opens the image in `storage` (named `path` in errors); `open_backing(path, name,
    /// format)` opens a backing file the image names.
    pub fn from_storage(
        storage: Box<dyn Storage>,
        writable: bool,
        format: Option<ImageFormat>,
        path: &Path,
        mut open_backing: impl FnMut(&Path, &Path, Option<ImageFormat>) -> Result<DiskImage, ImageError>,
    ) -> Result<Self, ImageError> {
        let open_err = |source| ImageError::Open {
            path: path.to_owned(),
            source,
        };
        let found = detect(storage.as_ref()).map_err(open_err)?;
        let format = match format {
            Some(f) if f != found && f == ImageFormat::Qcow2 => {
                return Err(ImageError::FormatMismatch {
                    path: path.to_owned(),
                    found: found.name(),
                    expected: f.name(),
                });
            }
            // A raw image may start with anything, even the qcow2 magic.
            Some(f) => f,
            None => found,
        };
        if format == ImageFormat::Raw {
            let size = storage.len().map_err(open_err)?;
            return Ok(Self::Raw(RawImage { storage, size }));
        }
        let qcow2_err = |source| ImageError::Qcow2 {
            path: path.to_owned(),
            source,
        };
        let mut image = qcow2::Qcow2::open(storage, writable).map_err(qcow2_err)?;
        if let Some(name) = image.header().backing_file.clone() {
            let fmt =
                match image.header().backing_format.as_deref() {
                    None => None,
                    Some(f) => Some(ImageFormat::from_name(f).ok_or_else(|| {
                        ImageError::BackingFormat {
                            path: path.to_owned(),
                            format: f.to_string(),
                        }
                    })?),
                };
            let name =
                Path::new(<std::ffi::OsStr as std::os::unix::ffi::OsStrExt>::from_bytes(&name));
            let backing = open_backing(path, name, fmt)?;
            image.set_backing(backing);
        }
        Ok(Self::Qcow2(Box::new(image)))
    }

    /// The image's format.
    pub fn format(&self) -> ImageFormat {
        match self {
            Self::Raw(_) => ImageFormat::Raw,
            Self::Qcow2(_) => ImageFormat::Qcow2,
        }
    }

    /// Guest-visible size in bytes.
    pub fn virtual_size(&self) -> u64 {
        match self {
            Self::Raw(r) => r.size,
            Self::Qcow2(q) => q.virtual_size(),
        }
    }

    /// Reads guest bytes at `offset`; bytes past the virtual size read as zeroes (a backing
    /// image may be shorter than its overlay).
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let size = self.virtual_size();
        let inside = usize_from(size.saturating_sub(offset).min(buf.len() as u64));
        buf[inside..].fill(0);
        if inside == 0 {
            return Ok(());
        }
        match self {
            Self::Raw(r) => {
                let n = r.storage.read_upto(&mut buf[..inside], offset)?;
                // A file that shrank since it was opened.
                buf[n..inside].fill(0);
                Ok(())
            }
            Self::Qcow2(q) => q.read_at(&mut buf[..inside], offset),
        }
    }

    /// Writes guest bytes at `offset` (inside the virtual size).
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        match self {
            Self::Raw(r) => r.storage.write_at(buf, offset),
            Self::Qcow2(q) => q.write_at(buf, offset),
        }
    }

    /// Writes cached metadata back and makes every write durable.
    pub fn flush(&mut self) -> io::Result<()> {
        match self {
            Self::Raw(r) => r.storage.sync(),
            Self::Qcow2(q) => q.flush(),
        }
    }

    /// The file of a raw image (virtio-blk does its I/O on it directly).
    pub fn into_raw_file(self) -> Result<File, Self> {
        match self {
            Self::Raw(r) => match r.storage.file() {
                Some(f) => f.try_clone().map_err(|_| Self::Raw(r)),
                None => Err(Self::Raw(r)),
            },
            other => Err(other),
        }
    }
}

#[cfg(test)]
mod tests;
