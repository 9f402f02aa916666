//! A read-only FAT12/16/32 reader (long file names included), enough to find and read boot
//! files. Every cluster chain is bounded by the filesystem's cluster count, every read by
//! the caller's size limit and the partition.

use std::io;

use rvmm_devices::cast::usize_from;

use super::DiskReader;

/// The content of a FAT filesystem's boot sector that locates everything else.
#[derive(Clone, Debug)]
pub struct Fat {
    bytes_per_sector: u64,
    sectors_per_cluster: u64,
    fat_start: u64,
    fat_bits: u32,
    /// FAT12/16: the fixed root directory's first byte and length.
    root_dir: Option<(u64, u64)>,
    /// FAT32: the root directory's first cluster.
    root_cluster: u32,
    data_start: u64,
    clusters: u32,
    /// The volume serial number, as `XXXX-XXXX` (GRUB's and Linux's UUID of a FAT volume).
    pub uuid: String,
    /// The volume label.
    pub label: String,
}

/// A directory entry.
#[derive(Clone, Debug)]
pub struct Entry {
    /// The long name, else the 8.3 name.
    pub name: String,
    /// A directory.
    pub dir: bool,
    first_cluster: u32,
    /// Bytes.
    pub size: u32,
}

fn le16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what)
}

impl Fat {
    /// Parses the boot sector; `None` when it is no FAT boot sector.
    pub fn probe(sector: &[u8], partition_len: u64) -> Option<Self> {
        if sector.len() < 512 || sector[510] != 0x55 || sector[511] != 0xaa {
            return None;
        }
        if !matches!(sector[0], 0xeb | 0xe9) {
            return None;
        }
        let bytes_per_sector = u64::from(le16(sector, 11));
        let sectors_per_cluster = u64::from(sector[13]);
        let reserved = u64::from(le16(sector, 14));
        let fats = u64::from(sector[16]);
        let root_entries = u64::from(le16(sector, 17));
        let total16 = u64::from(le16(sector, 19));
        let fat16_size = u64::from(le16(sector, 22));
        let total32 = u64::from(le32(sector, 32));
        let fat32_size = u64::from(le32(sector, 36));
        if !matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096)
            || !sectors_per_cluster.is_power_of_two()
            || sectors_per_cluster > 128
            || reserved == 0
            || fats == 0
        {
            return None;
        }
        let total = if total16 != 0 { total16 } else { total32 };
        let fat_size = if fat16_size != 0 {
            fat16_size
        } else {
            fat32_size
        };
        let root_sectors = (root_entries * 32).div_ceil(bytes_per_sector);
        let data_sector = reserved + fats * fat_size + root_sectors;
        if fat_size == 0 || total <= data_sector || total * bytes_per_sector > partition_len {
            return None;
        }
        let clusters = (total - data_sector) / sectors_per_cluster;
        let fat_bits = match clusters {
            0..4085 => 12,
            4085..65525 => 16,
            _ => 32,
        };
        // The FAT must hold an entry for every cluster.
        if fat_size * bytes_per_sector * 8 < (clusters + 2) * fat_bits {
            return None;
        }
        let (serial_at, label_at) = if fat_bits == 32 { (67, 71) } else { (39, 43) };
        let serial = le32(sector, serial_at);
        let label = String::from_utf8_lossy(&sector[label_at..label_at + 11])
            .trim_end()
            .to_string();
        Some(Self {
            bytes_per_sector,
            sectors_per_cluster,
            fat_start: reserved * bytes_per_sector,
            fat_bits: u32::try_from(fat_bits).ok()?,
            root_dir: (fat_bits != 32).then_some((
                (reserved + fats * fat_size) * bytes_per_sector,
                root_sectors * bytes_per_sector,
            )),
            root_cluster: le32(sector, 44),
            data_start: data_sector * bytes_per_sector,
            clusters: u32::try_from(clusters).ok()?,
            uuid: format!("{:04X}-{:04X}", serial >> 16, serial & 0xffff),
            label,
        })
    }

    fn cluster_bytes(&self) -> u64 {
        self.bytes_per_sector * self.sectors_per_cluster
    }

    /// The FAT entry of `cluster`: the next cluster, or `None` at the end of the chain.
    fn next(&self, disk: &mut dyn DiskReader, cluster: u32) -> io::Result<Option<u32>> {
        let value = match self.fat_bits {
            12 => {
                let at = self.fat_start + u64::from(cluster) * 3 / 2;
                let mut b = [0u8; 2];
                disk.read(&mut b, at)?;
                let v = u16::from_le_bytes(b);
                u32::from(if cluster & 1 == 1 { v >> 4 } else { v & 0xfff })
            }
            16 => {
                let at = self.fat_start + u64::from(cluster) * 2;
                let mut b = [0u8; 2];
                disk.read(&mut b, at)?;
                u32::from(u16::from_le_bytes(b))
            }
            _ => {
                let at = self.fat_start + u64::from(cluster) * 4;
                let mut b = [0u8; 4];
                disk.read(&mut b, at)?;
                u32::from_le_bytes(b) & 0x0fff_ffff
            }
        };
        let end = match self.fat_bits {
            12 => 0xff8,
            16 => 0xfff8,
            _ => 0x0fff_fff8,
        };
        if value >= end {
            return Ok(None);
        }
        if value < 2 || value >= self.clusters + 2 {
            return Err(bad(format!("FAT: cluster {cluster} links to {value:#x}")));
        }
        Ok(Some(value))
    }

    /// Reads the chain starting at `first`: `limit` bytes at most (`None`: the whole chain,
    /// for directories).
    fn read_chain(&self, disk: &mut dyn DiskReader, first: u32, limit: u64) -> io::Result<Vec<u8>> {
        let mut out = Vec::new();
        let mut cluster = Some(first);
        let size = self.cluster_bytes();
        let mut steps = 0u32;
        while let Some(c) = cluster {
            if (out.len() as u64) >= limit {
                break;
            }
            if c < 2 || c >= self.clusters + 2 {
                return Err(bad(format!("FAT: chain reaches cluster {c}")));
            }
            steps += 1;
            if steps > self.clusters {
                return Err(bad("FAT: a cluster chain loops".into()));
            }
            let n = usize_from(size.min(limit - out.len() as u64));
            let at = self.data_start + u64::from(c - 2) * size;
            let start = out.len();
            out.resize(start + n, 0);
            disk.read(&mut out[start..], at)?;
            cluster = self.next(disk, c)?;
        }
        Ok(out)
    }

    fn root(&self, disk: &mut dyn DiskReader) -> io::Result<Vec<u8>> {
        match self.root_dir {
            Some((at, len)) => {
                let mut out = vec![0u8; usize_from(len)];
                disk.read(&mut out, at)?;
                Ok(out)
            }
            None => self.read_chain(disk, self.root_cluster, MAX_DIR_BYTES),
        }
    }

    /// The entries of the directory at `path` (`/`-separated, case-insensitive); `None` when
    /// it does not exist.
    pub fn read_dir(
        &self,
        disk: &mut dyn DiskReader,
        path: &str,
    ) -> io::Result<Option<Vec<Entry>>> {
        let mut dir = self.root(disk)?;
        for part in path.split('/').filter(|p| !p.is_empty()) {
            let Some(entry) = parse_dir(&dir)
                .into_iter()
                .find(|e| e.name.eq_ignore_ascii_case(part))
            else {
                return Ok(None);
            };
            if !entry.dir {
                return Ok(None);
            }
            dir = if entry.first_cluster == 0 {
                self.root(disk)?
            } else {
                self.read_chain(disk, entry.first_cluster, MAX_DIR_BYTES)?
            };
        }
        Ok(Some(parse_dir(&dir)))
    }

    /// The file at `path`: `Ok(None)` when missing; an error when larger than `limit`.
    pub fn read_file(
        &self,
        disk: &mut dyn DiskReader,
        path: &str,
        limit: u64,
    ) -> io::Result<Option<Vec<u8>>> {
        let path = path.trim_start_matches('/');
        let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
        let Some(entries) = self.read_dir(disk, dir)? else {
            return Ok(None);
        };
        let Some(entry) = entries
            .iter()
            .find(|e| !e.dir && e.name.eq_ignore_ascii_case(name))
        else {
            return Ok(None);
        };
        if u64::from(entry.size) > limit {
            return Err(bad(format!("{path} is {} bytes, over {limit}", entry.size)));
        }
        if entry.size == 0 {
            return Ok(Some(Vec::new()));
        }
        let data = self.read_chain(disk, entry.first_cluster, u64::from(entry.size))?;
        if data.len() < entry.size as usize {
            return Err(bad(format!("{path}: its cluster chain ends early")));
        }
        Ok(Some(data))
    }
}

/// Directories larger than this are not read (a chain that long is corruption here).
const MAX_DIR_BYTES: u64 = 4 << 20;

/// The entries of a directory's bytes, long names assembled.
fn parse_dir(bytes: &[u8]) -> Vec<Entry> {
    let mut out = Vec::new();
    let mut long: Vec<(u8, [u16; 13])> = Vec::new();
    for raw in bytes.chunks_exact(32) {
        match raw[0] {
            0 => break,
            0xe5 => {
                long.clear();
                continue;
            }
            _ => {}
        }
        let attr = raw[11];
        if attr & 0x3f == 0x0f {
            let mut units = [0u16; 13];
            for (i, at) in [1, 3, 5, 7, 9, 14, 16, 18, 20, 22, 24, 28, 30]
                .into_iter()
                .enumerate()
            {
                units[i] = le16(raw, at);
            }
            long.push((raw[0] & 0x1f, units));
            continue;
        }
        if attr & 0x08 != 0 {
            long.clear();
            continue; // Volume label.
        }
        let name = if long.is_empty() {
            short_name(raw)
        } else {
            long.sort_by_key(|(order, _)| *order);
            let units: Vec<u16> = long
                .iter()
                .flat_map(|(_, u)| u.iter().copied())
                .take_while(|&u| u != 0 && u != 0xffff)
                .collect();
            String::from_utf16_lossy(&units)
        };
        long.clear();
        if name == "." || name == ".." {
            continue;
        }
        let first_cluster = (u32::from(le16(raw, 20)) << 16) | u32::from(le16(raw, 26));
        out.push(Entry {
            name,
            dir: attr & 0x10 != 0,
            first_cluster,
            size: le32(raw, 28),
        });
    }
    out
}

fn short_name(raw: &[u8]) -> String {
    let base = String::from_utf8_lossy(&raw[..8]).trim_end().to_string();
    let ext = String::from_utf8_lossy(&raw[8..11]).trim_end().to_string();
    // NT's lower-case flags for base and extension.
    let base = if raw[12] & 0x08 != 0 {
        base.to_lowercase()
    } else {
        base
    };
    let ext = if raw[12] & 0x10 != 0 {
        ext.to_lowercase()
    } else {
        ext
    };
    if ext.is_empty() {
        base
    } else {
        format!("{base}.{ext}")
    }
}
