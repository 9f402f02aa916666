//! Partition tables: GPT (primary header, else the backup at the disk's end; CRCs checked)
//! and MBR (primary partitions and the logical ones in an extended partition). Pure parsing
//! over a reader of the disk; sizes and counts are bounded before anything is allocated.

use rvmm_devices::cast::usize_from;

use super::DiskReader;

/// Sector size the tables are read with (virtio-blk's logical block).
pub const SECTOR: u64 = 512;
/// At most this many GPT entries are read (the usual table has 128).
const MAX_GPT_ENTRIES: u32 = 1024;
/// Logical partitions followed in an extended partition, at most.
const MAX_LOGICAL: u32 = 128;

/// A partition.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Partition {
    /// 1-based number (`/dev/vda1`, GRUB's `gpt1`/`msdos1`).
    pub number: u32,
    /// First byte on the disk.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// Its type.
    pub kind: PartitionKind,
}

/// What the table says a partition is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PartitionKind {
    /// A GPT partition of this type GUID (mixed-endian bytes as stored).
    Gpt([u8; 16]),
    /// An MBR partition of this type byte.
    Mbr(u8),
}

/// The GPT type of BIOS boot partitions (GRUB's core image, no filesystem).
const BIOS_BOOT: [u8; 16] = guid(
    0x2168_6148,
    0x6453,
    0x6e6f,
    [0x74, 0x4e, 0x65, 0x65, 0x64, 0x45, 0x46, 0x49],
);

/// A GUID as GPT stores it (first three fields little-endian).
const fn guid(a: u32, b: u16, c: u16, d: [u8; 8]) -> [u8; 16] {
    let a = a.to_le_bytes();
    let b = b.to_le_bytes();
    let c = c.to_le_bytes();
    [
        a[0], a[1], a[2], a[3], b[0], b[1], c[0], c[1], d[0], d[1], d[2], d[3], d[4], d[5], d[6],
        d[7],
    ]
}

impl Partition {
    /// Whether the partition can hold no filesystem (BIOS boot, MBR extended).
    pub fn holds_no_filesystem(&self) -> bool {
        match self.kind {
            PartitionKind::Gpt(t) => t == BIOS_BOOT,
            PartitionKind::Mbr(t) => matches!(t, 0x05 | 0x0f | 0x85),
        }
    }
}

/// The partition table of a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Table {
    /// GPT.
    Gpt(Vec<Partition>),
    /// MBR.
    Mbr(Vec<Partition>),
}

impl Table {
    /// The partitions.
    pub fn partitions(&self) -> &[Partition] {
        match self {
            Self::Gpt(p) | Self::Mbr(p) => p,
        }
    }

    /// `gpt` or `msdos`, as GRUB names them.
    pub fn grub_name(&self) -> &'static str {
        match self {
            Self::Gpt(_) => "gpt",
            Self::Mbr(_) => "msdos",
        }
    }
}

/// Why a disk's partition table cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PartitionError {
    /// Neither GPT nor MBR.
    #[error("no partition table (GPT or MBR)")]
    None,
    /// A table that lies.
    #[error("{0}")]
    Invalid(String),
    /// The disk cannot be read.
    #[error("cannot read the partition table")]
    Read(#[source] std::io::Error),
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn le64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// CRC-32 (IEEE 802.3), as GPT uses.
pub fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Reads the partition table of the disk behind `disk`.
pub fn read_table(disk: &mut dyn DiskReader) -> Result<Table, PartitionError> {
    let size = disk.size();
    let mut mbr = [0u8; 512];
    if size < 512 {
        return Err(PartitionError::None);
    }
    disk.read(&mut mbr, 0).map_err(PartitionError::Read)?;
    let has_signature = mbr[510] == 0x55 && mbr[511] == 0xaa;
    let protective = has_signature && (0..4).any(|i| mbr[446 + 16 * i + 4] == 0xee);
    if protective || !has_signature {
        // GPT also without a protective MBR (some tools write none).
        match read_gpt(disk, size)? {
            Some(parts) => return Ok(Table::Gpt(parts)),
            None if protective => {
                return Err(PartitionError::Invalid(
                    "a protective MBR but no valid GPT header (primary or backup)".into(),
                ));
            }
            None => return Err(PartitionError::None),
        }
    }
    read_mbr(disk, &mbr, size).map(Table::Mbr)
}

fn read_gpt(
    disk: &mut dyn DiskReader,
    size: u64,
) -> Result<Option<Vec<Partition>>, PartitionError> {
    let last_lba = size / SECTOR - 1;
    for lba in [1, last_lba] {
        let mut header = [0u8; 512];
        disk.read(&mut header, lba * SECTOR)
            .map_err(PartitionError::Read)?;
        if &header[..8] != b"EFI PART" {
            continue;
        }
        let header_size = le32(&header, 12) as usize;
        if !(92..=512).contains(&header_size) {
            continue;
        }
        let stored = le32(&header, 16);
        let mut copy = header;
        copy[16..20].fill(0);
        if crc32(&copy[..header_size]) != stored {
            log::warn!("GPT header at LBA {lba} has a bad CRC; trying the other one");
            continue;
        }
        let entries_lba = le64(&header, 72);
        let count = le32(&header, 80);
        let entry_size = le32(&header, 84);
        let entries_crc = le32(&header, 88);
        if count > MAX_GPT_ENTRIES
            || !(128..=4096).contains(&entry_size)
            || !entry_size.is_multiple_of(8)
        {
            return Err(PartitionError::Invalid(format!(
                "GPT with {count} entries of {entry_size} bytes"
            )));
        }
        let bytes = u64::from(count) * u64::from(entry_size);
        if entries_lba
            .checked_mul(SECTOR)
            .and_then(|s| s.checked_add(bytes))
            .is_none_or(|end| end > size)
        {
            return Err(PartitionError::Invalid(
                "GPT partition entries lie past the end of the disk".into(),
            ));
        }
        let mut table = vec![0u8; usize_from(bytes)];
        disk.read(&mut table, entries_lba * SECTOR)
            .map_err(PartitionError::Read)?;
        if crc32(&table) != entries_crc {
            log::warn!("GPT entries of the header at LBA {lba} have a bad CRC");
            continue;
        }
        let mut parts = Vec::new();
        for (number, entry) in (1u32..).zip(table.chunks_exact(entry_size as usize)) {
            let kind: [u8; 16] = entry[..16].try_into().expect("16 bytes");
            if kind == [0; 16] {
                continue;
            }
            let (first, last) = (le64(entry, 32), le64(entry, 40));
            if first > last || last > last_lba {
                return Err(PartitionError::Invalid(format!(
                    "GPT partition {number} spans LBA {first} to {last}, outside the disk ({} sectors)",
                    last_lba + 1
                )));
            }
            parts.push(Partition {
                number,
                start: first * SECTOR,
                len: (last - first + 1) * SECTOR,
                kind: PartitionKind::Gpt(kind),
            });
        }
        return Ok(Some(parts));
    }
    Ok(None)
}

fn mbr_entry(sector: &[u8], i: usize) -> (u8, u64, u64) {
    let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
    (e[4], u64::from(le32(e, 8)), u64::from(le32(e, 12)))
}

fn read_mbr(
    disk: &mut dyn DiskReader,
    mbr: &[u8; 512],
    size: u64,
) -> Result<Vec<Partition>, PartitionError> {
    let mut parts = Vec::new();
    let mut extended = None;
    for (number, i) in (1u32..).zip(0..4) {
        let (kind, lba, sectors) = mbr_entry(mbr, i);
        if kind == 0 || sectors == 0 {
            continue;
        }
        let part = checked(number, kind, lba, sectors, size)?;
        if part.holds_no_filesystem() && extended.is_none() {
            extended = Some(lba);
        }
        parts.push(part);
    }
    // A boot sector whose "partitions" are all empty is no partition table (a FAT or
    // whole-disk filesystem also ends with 55 aa).
    if parts.is_empty() {
        return Err(PartitionError::None);
    }
    if let Some(base) = extended {
        let mut ebr_lba = base;
        for n in 0..MAX_LOGICAL {
            let mut ebr = [0u8; 512];
            disk.read(&mut ebr, ebr_lba * SECTOR)
                .map_err(PartitionError::Read)?;
            if ebr[510] != 0x55 || ebr[511] != 0xaa {
                break;
            }
            let (kind, rel, sectors) = mbr_entry(&ebr, 0);
            if kind != 0 && sectors != 0 {
                parts.push(checked(5 + n, kind, ebr_lba + rel, sectors, size)?);
            }
            let (next_kind, next_rel, _) = mbr_entry(&ebr, 1);
            if next_kind == 0 || next_rel == 0 {
                break;
            }
            // Later EBRs are relative to the extended partition's start.
            ebr_lba = base + next_rel;
            if ebr_lba * SECTOR >= size {
                break;
            }
        }
    }
    Ok(parts)
}

fn checked(
    number: u32,
    kind: u8,
    lba: u64,
    sectors: u64,
    size: u64,
) -> Result<Partition, PartitionError> {
    let start = lba * SECTOR;
    let len = sectors * SECTOR;
    if lba == 0 || start + len > size {
        return Err(PartitionError::Invalid(format!(
            "MBR partition {number} spans {start:#x}+{len:#x} bytes, outside the disk ({size} bytes)"
        )));
    }
    Ok(Partition {
        number,
        start,
        len,
        kind: PartitionKind::Mbr(kind),
    })
}
