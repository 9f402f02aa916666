//! The qcow2 header and its extensions (QEMU's docs/interop/qcow2.txt), parsed from the first
//! cluster's bytes and checked against the file's length. Pure: no I/O, so it is fuzzed and
//! unit-tested on byte arrays.

use crate::cast::usize_from;

/// `QFI\xfb`.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";
/// Header length of version 2 (and the fixed part of version 3).
pub const V2_HEADER_LEN: usize = 72;
/// Minimum header length of version 3.
pub const V3_HEADER_LEN: usize = 104;
/// Smallest and largest cluster sizes QEMU creates or accepts (512 B and 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// The largest L1 table QEMU accepts (32 MiB).
pub const MAX_L1_BYTES: u64 = 32 << 20;
/// The largest refcount table QEMU accepts (8 MiB).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// The largest virtual size accepted: 64 PiB, the reach of an L2 entry's 56-bit offsets.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 56;
/// Longest backing file name (QEMU's limit).
pub const MAX_BACKING_NAME: u32 = 1023;
/// More internal snapshots than QEMU allows means a lying header.
pub const MAX_SNAPSHOTS: u32 = 65536;

/// Incompatible feature bits.
pub mod incompatible {
    /// Refcounts may be wrong (lazy refcounts were in use when the image was last open).
    pub const DIRTY: u64 = 1 << 0;
    /// QEMU found corruption; the image must not be written.
    pub const CORRUPT: u64 = 1 << 1;
    /// Data clusters live in an external file.
    pub const EXTERNAL_DATA: u64 = 1 << 2;
    /// The header's compression type byte is valid.
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    /// L2 entries are 128 bits with subclusters.
    pub const EXTENDED_L2: u64 = 1 << 4;
}

/// Header extension types.
mod extension {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    pub const EXTERNAL_DATA_FILE: u32 = 0x4441_5441;
    pub const FULL_DISK_ENCRYPTION: u32 = 0x0537_be77;
}

/// How compressed clusters are compressed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Compression {
    /// Raw deflate (zlib without its header), the default.
    Zlib,
    /// A zstd frame.
    Zstd,
}

/// A parsed, checked header.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Header {
    /// 2 or 3.
    pub version: u32,
    /// log2 of the cluster size.
    pub cluster_bits: u32,
    /// Guest-visible size in bytes.
    pub size: u64,
    /// L1 entries.
    pub l1_size: u32,
    /// L1 table offset (cluster-aligned).
    pub l1_table_offset: u64,
    /// Refcount table offset (cluster-aligned).
    pub refcount_table_offset: u64,
    /// Refcount table length in clusters.
    pub refcount_table_clusters: u32,
    /// Internal snapshots.
    pub nb_snapshots: u32,
    /// Incompatible feature bits.
    pub incompatible: u64,
    /// Compatible feature bits.
    pub compatible: u64,
    /// Auto-clear feature bits.
    pub autoclear: u64,
    /// log2 of the refcount width in bits (4: 16-bit, the only choice of version 2).
    pub refcount_order: u32,
    /// Header length (where extensions start).
    pub header_length: u32,
    /// Compression of compressed clusters.
    pub compression: Compression,
    /// Backing file name as stored (relative to the image's directory unless absolute).
    pub backing_file: Option<Vec<u8>>,
    /// Backing format from the header extension (`raw`, `qcow2`).
    pub backing_format: Option<String>,
}

/// Why a header is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Not qcow2.
    #[error("not a qcow2 image (no QFI\\xfb magic)")]
    Magic,
    /// Shorter than its header.
    #[error("truncated: {len} bytes, the qcow2 header needs {needed}")]
    Truncated {
        /// File length.
        len: u64,
        /// Bytes the header needs.
        needed: u64,
    },
    /// A field is out of range or points outside the file.
    #[error("{field}: {reason}")]
    Field {
        /// The header field.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// A feature rvmm cannot honour.
    #[error("{0} is not supported")]
    Unsupported(String),
}

fn field(field: &'static str, reason: impl Into<String>) -> HeaderError {
    HeaderError::Field {
        field,
        reason: reason.into(),
    }
}

fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

impl Header {
    /// Cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// L2 entries per L2 table.
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / 8
    }

    /// Refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// Parses `head` (the file's first bytes: at least the first cluster, or the whole file
    /// when shorter) of a file `file_len` bytes long. Every offset and size is checked
    /// against the file, so nothing sized by the header is allocated before it is known to
    /// exist.
    pub fn parse(head: &[u8], file_len: u64) -> Result<Self, HeaderError> {
        if head.len() < 4 || head[..4] != MAGIC {
            return Err(HeaderError::Magic);
        }
        let truncated = |needed: usize| HeaderError::Truncated {
            len: file_len,
            needed: needed as u64,
        };
        if head.len() < V2_HEADER_LEN {
            return Err(truncated(V2_HEADER_LEN));
        }
        let version = be32(head, 4);
        if version != 2 && version != 3 {
            return Err(HeaderError::Unsupported(format!("qcow2 version {version}")));
        }
        let cluster_bits = be32(head, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(field(
                "cluster_bits",
                format!("{cluster_bits} is outside {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"),
            ));
        }
        let cluster_size = 1u64 << cluster_bits;
        #[allow(clippy::cast_possible_truncation, reason = "a 72-byte constant")]
        let v2_header_len = V2_HEADER_LEN as u32;
        let mut h = Header {
            version,
            cluster_bits,
            size: be64(head, 24),
            l1_size: be32(head, 36),
            l1_table_offset: be64(head, 40),
            refcount_table_offset: be64(head, 48),
            refcount_table_clusters: be32(head, 56),
            nb_snapshots: be32(head, 60),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: v2_header_len,
            compression: Compression::Zlib,
            backing_file: None,
            backing_format: None,
        };
        if be32(head, 32) != 0 {
            return Err(HeaderError::Unsupported("encryption (crypt_method)".into()));
        }
        if version == 3 {
            if head.len() < V3_HEADER_LEN {
                return Err(truncated(V3_HEADER_LEN));
            }
            h.incompatible = be64(head, 72);
            h.compatible = be64(head, 80);
            h.autoclear = be64(head, 88);
            h.refcount_order = be32(head, 96);
            h.header_length = be32(head, 100);
            if h.refcount_order > 6 {
                return Err(field(
                    "refcount_order",
                    format!("{} is above 6", h.refcount_order),
                ));
            }
            let len = u64::from(h.header_length);
            if len < V3_HEADER_LEN as u64 || len % 8 != 0 || len > cluster_size {
                return Err(field(
                    "header_length",
                    format!(
                        "{len} is not a multiple of 8 between {V3_HEADER_LEN} and the cluster size"
                    ),
                ));
            }
            if head.len() < h.header_length as usize {
                return Err(truncated(h.header_length as usize));
            }
        }
        h.check_features(head)?;
        h.check_tables(file_len)?;
        h.parse_backing_name(head, file_len)?;
        h.parse_extensions(head)?;
        Ok(h)
    }

    fn check_features(&mut self, head: &[u8]) -> Result<(), HeaderError> {
        use incompatible::*;
        let bits = self.incompatible;
        if bits & EXTERNAL_DATA != 0 {
            return Err(HeaderError::Unsupported("an external data file".into()));
        }
        if bits & EXTENDED_L2 != 0 {
            return Err(HeaderError::Unsupported(
                "extended L2 entries (subclusters)".into(),
            ));
        }
        if bits & COMPRESSION_TYPE != 0 {
            let len = self.header_length as usize;
            let kind = if len > V3_HEADER_LEN {
                head[V3_HEADER_LEN]
            } else {
                0
            };
            self.compression = match kind {
                0 => Compression::Zlib,
                1 => Compression::Zstd,
                other => {
                    return Err(HeaderError::Unsupported(format!(
                        "compression type {other}"
                    )));
                }
            };
        }
        let unknown = bits & !(DIRTY | CORRUPT | COMPRESSION_TYPE);
        if unknown != 0 {
            let names: Vec<String> = (0..64)
                .filter(|b| unknown & (1 << b) != 0)
                .map(|b| {
                    feature_name(head, self.header_length as usize, 0, b)
                        .map_or_else(|| format!("bit {b}"), |n| format!("'{n}' (bit {b})"))
                })
                .collect();
            return Err(HeaderError::Unsupported(format!(
                "incompatible feature {}",
                names.join(", ")
            )));
        }
        Ok(())
    }

    fn check_tables(&self, file_len: u64) -> Result<(), HeaderError> {
        let cs = self.cluster_size();
        if self.size > MAX_VIRTUAL_SIZE {
            return Err(field("size", format!("{} bytes is too large", self.size)));
        }
        // One L1 entry maps an L2 table's worth of clusters.
        let per_l1 = cs * self.l2_entries();
        let needed = self.size.div_ceil(per_l1);
        if u64::from(self.l1_size) < needed {
            return Err(field(
                "l1_size",
                format!(
                    "{} entries cannot map {} bytes (needs {needed})",
                    self.l1_size, self.size
                ),
            ));
        }
        let l1_bytes = u64::from(self.l1_size) * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(field(
                "l1_size",
                format!("{} entries is over QEMU's 32 MiB L1 limit", self.l1_size),
            ));
        }
        check_range(
            "l1_table_offset",
            self.l1_table_offset,
            l1_bytes,
            cs,
            file_len,
        )?;
        let rt_bytes = u64::from(self.refcount_table_clusters) * cs;
        if self.refcount_table_clusters == 0 {
            return Err(field("refcount_table_clusters", "is 0"));
        }
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(field(
                "refcount_table_clusters",
                format!(
                    "{} clusters is over QEMU's 8 MiB refcount table limit",
                    self.refcount_table_clusters
                ),
            ));
        }
        check_range(
            "refcount_table_offset",
            self.refcount_table_offset,
            rt_bytes,
            cs,
            file_len,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(field(
                "nb_snapshots",
                format!("{} is over {MAX_SNAPSHOTS}", self.nb_snapshots),
            ));
        }
        Ok(())
    }

    fn parse_backing_name(&mut self, head: &[u8], file_len: u64) -> Result<(), HeaderError> {
        let offset = be64(head, 8);
        let len = be32(head, 16);
        if offset == 0 {
            return Ok(());
        }
        if len == 0 || len > MAX_BACKING_NAME {
            return Err(field(
                "backing_file_size",
                format!("{len} is not 1 to {MAX_BACKING_NAME}"),
            ));
        }
        let end = offset.checked_add(u64::from(len));
        match end {
            Some(end) if end <= self.cluster_size() && end <= head.len() as u64 => {}
            _ => {
                return Err(field(
                    "backing_file_offset",
                    format!(
                        "{offset} (+{len} bytes) lies outside the first cluster or the file ({file_len} bytes)"
                    ),
                ));
            }
        }
        let name = head[usize_from(offset)..usize_from(offset) + len as usize].to_vec();
        if name.contains(&0) {
            return Err(field(
                "backing_file_offset",
                "the backing file name holds a NUL",
            ));
        }
        self.backing_file = Some(name);
        Ok(())
    }

    fn parse_extensions(&mut self, head: &[u8]) -> Result<(), HeaderError> {
        let end = usize_from(self.cluster_size()).min(head.len());
        let mut at = self.header_length as usize;
        loop {
            if at + 8 > end {
                // No end marker before the end of the first cluster (or the file).
                return Err(field("header extensions", "run past the first cluster"));
            }
            let kind = be32(head, at);
            let len = be32(head, at + 4) as usize;
            let data_start = at + 8;
            let data_end = data_start
                .checked_add(len)
                .filter(|&e| e <= end)
                .ok_or_else(|| {
                    field(
                        "header extensions",
                        format!("extension {kind:#x} of {len} bytes runs past the first cluster"),
                    )
                })?;
            let data = &head[data_start..data_end];
            match kind {
                extension::END => return Ok(()),
                extension::BACKING_FORMAT => {
                    let name = String::from_utf8_lossy(data)
                        .trim_end_matches('\0')
                        .to_string();
                    self.backing_format = Some(name);
                }
                extension::EXTERNAL_DATA_FILE => {
                    return Err(HeaderError::Unsupported("an external data file".into()));
                }
                extension::FULL_DISK_ENCRYPTION => {
                    return Err(HeaderError::Unsupported("encryption (LUKS)".into()));
                }
                // Feature names, bitmaps and unknown extensions: nothing rvmm needs.
                _ => {}
            }
            at = data_start + len.div_ceil(8) * 8;
        }
    }
}

/// `offset..offset + len` must be cluster-aligned and inside the file.
fn check_range(
    name: &'static str,
    offset: u64,
    len: u64,
    cluster_size: u64,
    file_len: u64,
) -> Result<(), HeaderError> {
    if offset == 0 || !offset.is_multiple_of(cluster_size) {
        return Err(field(
            name,
            format!("{offset:#x} is not a non-zero multiple of the cluster size {cluster_size}"),
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(field(
            name,
            format!("{offset:#x} (+{len} bytes) lies past the end of the file ({file_len} bytes)"),
        )),
    }
}

/// The name the feature name table gives feature `bit` of `kind` (0: incompatible).
fn feature_name(head: &[u8], header_length: usize, kind: u8, bit: u32) -> Option<String> {
    let mut at = header_length;
    while at + 8 <= head.len() {
        let ext = be32(head, at);
        let len = be32(head, at + 4) as usize;
        let data = head.get(at + 8..at + 8 + len)?;
        if ext == extension::END {
            return None;
        }
        if ext == extension::FEATURE_NAMES {
            for entry in data.chunks_exact(48) {
                if entry[0] == kind && u32::from(entry[1]) == bit {
                    let name = &entry[2..];
                    let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
                    return Some(String::from_utf8_lossy(&name[..end]).into_owned());
                }
            }
        }
        at += 8 + len.div_ceil(8) * 8;
    }
    None
}

/// Writes the 12 header bytes that move the refcount table (offset 48: offset and clusters).
pub fn refcount_table_field(offset: u64, clusters: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[..8].copy_from_slice(&offset.to_be_bytes());
    b[8..].copy_from_slice(&clusters.to_be_bytes());
    b
}

/// Offset of the refcount table fields in the header.
pub const REFCOUNT_TABLE_FIELD_OFFSET: u64 = 48;
/// Offset of the incompatible features field (version 3).
pub const INCOMPATIBLE_OFFSET: u64 = 72;
/// Offset of the auto-clear features field (version 3).
pub const AUTOCLEAR_OFFSET: u64 = 88;

#[cfg(test)]
#[path = "header_tests.rs"]
mod tests;
