//! Guest memory in a snapshot: a sparse file written without its zero pages, mapped back
//! copy-on-write.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rvmm_devices::cast::usize_from;
use rvmm_devices::virtio::Bitmap;
use vm_memory::bitmap::NewBitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use super::MemoryRegionState;
use crate::memory::{GuestMemoryMmap, GuestRegionMmap};

const PAGE: usize = 4096;
/// Guest memory is scanned and written in chunks of this size.
const CHUNK: usize = 1 << 20;

/// Errors writing or mapping the memory file.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// The file cannot be created, written, read or mapped.
    #[error("Cannot access {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is shorter than the memory the state describes.
    #[error("{} holds {got} bytes, the snapshot's guest has {expected} bytes of memory", path.display())]
    Size {
        /// The file.
        path: PathBuf,
        /// Bytes the regions need.
        expected: u64,
        /// Bytes in the file.
        got: u64,
    },
    /// The regions in the state are not a valid layout.
    #[error("The snapshot's memory regions are invalid")]
    Layout,
    /// vm-memory refused the mapping.
    #[error("Cannot map {}", path.display())]
    Map {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
}

/// The regions of `mem`, in order.
pub fn memory_regions(mem: &GuestMemoryMmap) -> Vec<MemoryRegionState> {
    mem.iter()
        .map(|r| MemoryRegionState {
            guest_addr: r.start_addr().0,
            len: r.len(),
        })
        .collect()
}

/// Writes guest memory to `path`, regions back to back, leaving pages of zeros as holes.
/// Returns the bytes of data written (the file's apparent size is the memory size).
pub fn write_memory_file(mem: &GuestMemoryMmap, path: &Path) -> Result<u64, MemoryFileError> {
    let io = |source| MemoryFileError::Io {
        path: path.to_owned(),
        source,
    };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(path)
        .map_err(io)?;
    let mut offset = 0u64;
    let mut written = 0u64;
    let mut chunk = vec![0u8; CHUNK];
    for region in mem.iter() {
        let len = region.len();
        let mut at = 0u64;
        while at < len {
            let n = usize_from(len - at).min(CHUNK);
            let buf = &mut chunk[..n];
            region
                .get_slice(MemoryRegionAddress(at), n)
                .map_err(|e| io(std::io::Error::other(e.to_string())))?
                .copy_to(buf);
            written += write_nonzero_runs(&file, buf, offset + at).map_err(io)?;
            at += n as u64;
        }
        offset += len;
    }
    file.set_len(offset).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(written)
}

/// Writes the runs of non-zero pages of `buf` at `offset`; returns the bytes written.
fn write_nonzero_runs(file: &File, buf: &[u8], offset: u64) -> std::io::Result<u64> {
    let mut written = 0;
    let mut page = 0;
    let pages = buf.len().div_ceil(PAGE);
    while page < pages {
        if is_zero(page_of(buf, page)) {
            page += 1;
            continue;
        }
        let start = page;
        while page < pages && !is_zero(page_of(buf, page)) {
            page += 1;
        }
        let bytes = &buf[start * PAGE..(page * PAGE).min(buf.len())];
        file.write_all_at(bytes, offset + (start * PAGE) as u64)?;
        written += bytes.len() as u64;
    }
    Ok(written)
}

fn page_of(buf: &[u8], page: usize) -> &[u8] {
    &buf[page * PAGE..((page + 1) * PAGE).min(buf.len())]
}

fn is_zero(bytes: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: reinterpreting initialised bytes as u64 is valid for any bit pattern;
        // `align_to` only yields the correctly aligned middle part.
        unsafe { bytes.align_to::<u64>() }
    };
    head.iter().all(|b| *b == 0) && words.iter().all(|w| *w == 0) && tail.iter().all(|b| *b == 0)
}

/// Maps the memory file at `path` as guest memory with the layout `regions`, copy-on-write:
/// nothing is read now, pages are faulted in from the file (holes as zeros) when touched,
/// and the guest's writes never reach the file. With `prefault` every page is read in now
/// (`MAP_POPULATE`, Cloud Hypervisor's `prefault`).
pub fn map_memory_file(
    path: &Path,
    regions: &[MemoryRegionState],
    prefault: bool,
) -> Result<GuestMemoryMmap, MemoryFileError> {
    let populate = if prefault { libc::MAP_POPULATE } else { 0 };
    let io = |source| MemoryFileError::Io {
        path: path.to_owned(),
        source,
    };
    let file = Arc::new(File::open(path).map_err(io)?);
    let expected = regions
        .iter()
        .try_fold(0u64, |sum, r| sum.checked_add(r.len))
        .ok_or(MemoryFileError::Layout)?;
    let got = file.metadata().map_err(io)?.len();
    if got < expected {
        return Err(MemoryFileError::Size {
            path: path.to_owned(),
            expected,
            got,
        });
    }
    let mut offset = 0u64;
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        let len = usize::try_from(r.len).map_err(|_| MemoryFileError::Layout)?;
        if len == 0 || len % PAGE != 0 {
            return Err(MemoryFileError::Layout);
        }
        // With a dirty bitmap of the region's size, as booted memory has: the devices' writes
        // (used rings, disk reads) must be seen by a later live migration of this VM.
        let mmap = MmapRegionBuilder::new_with_bitmap(len, Bitmap::with_len(len))
            .with_file_offset(FileOffset::from_arc(file.clone(), offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE | populate)
            .build()
            .map_err(|source| MemoryFileError::Map {
                path: path.to_owned(),
                source,
            })?;
        let region = GuestRegionMmap::new(mmap, GuestAddress(r.guest_addr))
            .ok_or(MemoryFileError::Layout)?;
        mapped.push(region);
        offset += r.len;
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|_| MemoryFileError::Layout)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::MetadataExt;

    use vm_memory::Bytes;

    use super::*;

    fn temp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("rvmm-memfile-{name}-{}", std::process::id()))
    }

    #[test]
    fn memory_file_is_sparse_and_maps_back_the_same_bytes_copy_on_write() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 4 << 20),
            (GuestAddress(1 << 32), 2 << 20),
        ])
        .unwrap();
        mem.write_slice(b"low", GuestAddress(0x1234)).unwrap();
        mem.write_slice(&[7u8; 3 * PAGE], GuestAddress(0x20_0000))
            .unwrap();
        mem.write_slice(b"high", GuestAddress((1 << 32) + 0x10_0000))
            .unwrap();
        let path = temp("sparse");
        let written = write_memory_file(&mem, &path).unwrap();
        assert_eq!(written, 5 * PAGE as u64, "only the non-zero pages");
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 6 << 20);
        assert!(
            meta.blocks() * 512 <= 64 * 1024,
            "not sparse: {}",
            meta.blocks()
        );

        let restored = map_memory_file(&path, &memory_regions(&mem), false).unwrap();
        let mut buf = [0u8; 4];
        restored
            .read_slice(&mut buf, GuestAddress((1 << 32) + 0x10_0000))
            .unwrap();
        assert_eq!(&buf, b"high");
        restored
            .read_slice(&mut buf[..3], GuestAddress(0x1234))
            .unwrap();
        assert_eq!(&buf[..3], b"low");
        assert_eq!(restored.read_obj::<u8>(GuestAddress(0x20_2fff)).unwrap(), 7);
        assert_eq!(
            restored.read_obj::<u64>(GuestAddress(0x30_0000)).unwrap(),
            0
        );
        // The guest's writes stay private.
        restored.write_slice(b"new!", GuestAddress(0x1234)).unwrap();
        let again = map_memory_file(&path, &memory_regions(&mem), false).unwrap();
        again
            .read_slice(&mut buf[..3], GuestAddress(0x1234))
            .unwrap();
        assert_eq!(&buf[..3], b"low");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_mapped_memory_file_records_the_pages_written_through_it() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let path = temp("bitmap");
        write_memory_file(&mem, &path).unwrap();
        let restored = map_memory_file(&path, &memory_regions(&mem), false).unwrap();
        restored.write_obj(1u32, GuestAddress(0x5004)).unwrap();
        let region = restored.find_region(GuestAddress(0)).unwrap();
        let bitmap = std::ops::Deref::deref(region).bitmap();
        assert!(bitmap.is_addr_set(0x5000), "the written page");
        assert!(!bitmap.is_addr_set(0x6000), "another page");
        assert_eq!(bitmap.len(), 256, "a bit for every page");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_memory_file_shorter_than_the_layout_is_refused_by_name() {
        let path = temp("short");
        std::fs::write(&path, [0u8; PAGE]).unwrap();
        let regions = [MemoryRegionState {
            guest_addr: 0,
            len: 2 * PAGE as u64,
        }];
        let err = map_memory_file(&path, &regions, true).unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains(&path.display().to_string()) && msg.contains("8192"),
            "{msg}"
        );
        std::fs::remove_file(path).unwrap();
    }
}
