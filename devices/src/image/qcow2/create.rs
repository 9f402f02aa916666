//! Creating a qcow2 overlay over a backing image, as `qemu-img create -f qcow2 -b BACKING
//! -F FORMAT` does (KubeVirt's launcher creates its containerDisk and ephemeral overlays so):
//! version 3, 64 KiB clusters, 16-bit refcounts, the backing format in a header extension.

use std::io::{self, Write};
use std::path::Path;

use super::header::{MAGIC, V3_HEADER_LEN};
use crate::cast::usize_from;

const CLUSTER_BITS: u32 = 16;
const CLUSTER: u64 = 1 << CLUSTER_BITS;
const BACKING_FORMAT_EXT: u32 = 0xe279_2aca;

/// Writes a new, empty qcow2 image of `size` bytes at `path` whose reads fall through to
/// `backing` (named as given: an absolute path, or one relative to `path`'s directory) in
/// `backing_format` (`raw` or `qcow2`). The image is written to a temporary file beside
/// `path`, synced and renamed, so `path` is either absent or complete.
pub fn create_overlay(
    path: &Path,
    backing: &Path,
    backing_format: &str,
    size: u64,
) -> io::Result<()> {
    let name = backing.as_os_str().as_encoded_bytes();
    let image = overlay_bytes(name, backing_format, size)?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&image)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The bytes of an empty overlay: header (with the backing format extension and the backing
/// name), refcount table, one refcount block, L1 table.
pub fn overlay_bytes(backing: &[u8], backing_format: &str, size: u64) -> io::Result<Vec<u8>> {
    let invalid = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, what.to_string());
    let backing_len = u32::try_from(backing.len())
        .ok()
        .filter(|n| (1..=super::header::MAX_BACKING_NAME).contains(n))
        .ok_or_else(|| invalid("the backing file name must be 1 to 1023 bytes"))?;
    // The format extension and the name share the header's cluster.
    let format = backing_format.as_bytes();
    let format_len = u32::try_from(format.len())
        .ok()
        .filter(|_| {
            V3_HEADER_LEN + 16 + format.len().div_ceil(8) * 8 + backing.len() <= 1 << CLUSTER_BITS
        })
        .ok_or_else(|| invalid("the backing format name is too long"))?;
    if size > super::header::MAX_VIRTUAL_SIZE {
        return Err(invalid("the virtual size is too large"));
    }
    let per_l1 = CLUSTER * (CLUSTER / 8);
    let l1_size = size.div_ceil(per_l1).max(1);
    let l1_clusters = (l1_size * 8).div_ceil(CLUSTER);
    // Header, refcount table, refcount block, L1.
    let (rt, rb, l1) = (CLUSTER, 2 * CLUSTER, 3 * CLUSTER);
    let clusters = 3 + l1_clusters;
    // Under MAX_VIRTUAL_SIZE the L1 table has at most 2^27 entries.
    let l1_entries =
        u32::try_from(l1_size).map_err(|_| invalid("the virtual size is too large"))?;
    let mut out = vec![0u8; usize_from(clusters * CLUSTER)];
    let mut put = |at: usize, bytes: &[u8]| out[at..at + bytes.len()].copy_from_slice(bytes);
    put(0, &MAGIC);
    put(4, &3u32.to_be_bytes());
    put(20, &CLUSTER_BITS.to_be_bytes());
    put(24, &size.to_be_bytes());
    put(36, &l1_entries.to_be_bytes());
    put(40, &l1.to_be_bytes());
    put(48, &rt.to_be_bytes());
    put(56, &1u32.to_be_bytes());
    put(96, &4u32.to_be_bytes());
    #[allow(clippy::cast_possible_truncation, reason = "a 104-byte constant")]
    let header_len = V3_HEADER_LEN as u32;
    put(100, &header_len.to_be_bytes());
    // Extensions: the backing format, then the end marker; the name follows.
    let mut at = V3_HEADER_LEN;
    put(at, &BACKING_FORMAT_EXT.to_be_bytes());
    put(at + 4, &format_len.to_be_bytes());
    put(at + 8, format);
    at += 8 + format.len().div_ceil(8) * 8;
    at += 8; // End marker (zeroes).
    put(8, &(at as u64).to_be_bytes());
    put(16, &backing_len.to_be_bytes());
    put(at, backing);
    // The refcount table's first entry is the block; each cluster has refcount 1.
    put(usize_from(rt), &rb.to_be_bytes());
    for c in 0..usize_from(clusters) {
        put(usize_from(rb) + 2 * c, &1u16.to_be_bytes());
    }
    Ok(out)
}
