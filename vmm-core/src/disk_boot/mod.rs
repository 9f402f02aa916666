//! Boot from a disk image without firmware or a boot loader in the guest: rvmm reads the
//! image (read-only, through the same image layer virtio-blk uses), finds the partition table
//! (GPT or MBR), the ext2/3/4 or FAT filesystems on it, and the boot configuration GRUB,
//! systemd-boot or extlinux would follow, then hands the entry's kernel, initrd and command
//! line to the direct boot loader.
//!
//! Order: a `grub.cfg` on any partition (its default entry; Fedora's `blscfg` reads the BLS
//! snippets), else BLS entries (`loader/entries/*.conf`, newest version first unless
//! `loader.conf` names a default), else `extlinux.conf`/`syslinux.cfg`. Files named by the
//! entry are looked up on the filesystem its `search`/`root` names, else the one holding the
//! configuration, else any other (with and without a `/boot` prefix, for a separate /boot).

pub mod bls;
pub mod fat;
pub mod fs;
pub mod grub;
pub mod kernel;
pub mod partition;

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::rc::Rc;

use rvmm_devices::image::{DiskImage, ImageError, ImageFormat};

use fs::{Content, Filesystem, PartReader};
use partition::PartitionError;

/// Positioned reads of a disk or partition.
pub trait DiskReader {
    /// Length in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset` (an error past the end).
    fn read(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

/// Largest kernel read from a disk.
pub const MAX_KERNEL: u64 = 256 << 20;
/// Largest total of initrds read from a disk.
pub const MAX_INITRD: u64 = 1 << 30;
/// Largest configuration file read.
const MAX_CONFIG: u64 = 1 << 20;
/// BLS entry files read at most.
const MAX_BLS_ENTRIES: usize = 256;
/// `configfile` chains followed at most.
const MAX_CONFIGFILE_DEPTH: usize = 4;

const GRUB_PATHS: &[&str] = &[
    "/boot/grub/grub.cfg",
    "/grub/grub.cfg",
    "/boot/grub2/grub.cfg",
    "/grub2/grub.cfg",
];
const BLS_DIRS: &[&str] = &["/loader/entries", "/boot/loader/entries"];
const EXTLINUX_PATHS: &[&str] = &[
    "/boot/extlinux/extlinux.conf",
    "/extlinux/extlinux.conf",
    "/boot/syslinux/syslinux.cfg",
    "/syslinux/syslinux.cfg",
    "/extlinux.conf",
    "/syslinux.cfg",
];

/// What a boot entry names, before its files are read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootEntry {
    /// Menu title (or BLS id, extlinux label).
    pub title: String,
    /// Kernel path, possibly with a GRUB device prefix.
    pub kernel: String,
    /// Initrd paths, concatenated in order.
    pub initrds: Vec<String>,
    /// Kernel arguments.
    pub args: String,
    /// Where the files are, if the entry says.
    pub root: Option<RootHint>,
}

/// Which filesystem an entry's paths are on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RootHint {
    /// `search --fs-uuid`.
    FsUuid(String),
    /// `search --label`.
    Label(String),
    /// `set root=(hd0,gpt2)`.
    Partition(u32),
    /// `search --file`.
    File(String),
}

/// What boots: read out of the disk.
#[derive(Debug)]
pub struct DiskBoot {
    /// The kernel image (a bzImage).
    pub kernel: Vec<u8>,
    /// The initrds, concatenated.
    pub initrd: Option<Vec<u8>>,
    /// The entry's command line, `console=ttyS0` added when it names no serial console.
    pub cmdline: String,
    /// Which configuration and entry, for the log.
    pub source: String,
}

/// What is wrong with a disk to boot from.
#[derive(Debug, thiserror::Error)]
pub enum BootProblem {
    /// No usable partition table.
    #[error(transparent)]
    Partition(#[from] PartitionError),
    /// A filesystem that cannot be read.
    #[error("partition {partition}: cannot read its {kind} filesystem")]
    Filesystem {
        /// Partition number.
        partition: u32,
        /// ext2/3/4 or FAT.
        kind: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// No filesystem, configuration, entry or file where one is needed.
    #[error("{0}")]
    NotFound(String),
    /// A kernel rvmm cannot start.
    #[error("{path}: {problem}")]
    Kernel {
        /// Its path on the disk.
        path: String,
        /// What it is.
        problem: String,
    },
    /// A file cannot be read.
    #[error("partition {partition}: cannot read {path}")]
    Read {
        /// Partition number.
        partition: u32,
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Booting from a disk failed.
#[derive(Debug, thiserror::Error)]
pub enum DiskBootError {
    /// The image itself (it names the image).
    #[error(transparent)]
    Image(#[from] ImageError),
    /// What the image holds.
    #[error("Cannot boot from disk image {}", path.display())]
    Boot {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        #[source]
        problem: BootProblem,
    },
}

/// A filesystem on the disk.
struct Volume {
    number: u32,
    fs: Filesystem,
}

impl Volume {
    fn read(&mut self, path: &str, limit: u64) -> Result<Option<Vec<u8>>, BootProblem> {
        self.fs
            .read_file(path, limit)
            .map_err(|source| BootProblem::Read {
                partition: self.number,
                path: path.to_string(),
                source,
            })
    }

    fn read_text(&mut self, path: &str) -> Result<Option<String>, BootProblem> {
        Ok(self
            .read(path, MAX_CONFIG)?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }
}

/// Finds what the disk image at `path` boots and reads it.
pub fn boot_from_disk(path: &Path, format: Option<ImageFormat>) -> Result<DiskBoot, DiskBootError> {
    let image = DiskImage::open(path, false, format)?;
    find_boot(image).map_err(|problem| DiskBootError::Boot {
        path: path.to_owned(),
        problem,
    })
}

/// [`boot_from_disk`] on an open image.
pub fn find_boot(image: DiskImage) -> Result<DiskBoot, BootProblem> {
    let shared = Rc::new(RefCell::new(image));
    let table = partition::read_table(&mut shared.clone())?;
    let mut volumes = Vec::new();
    let mut unreadable = Vec::new();
    for part in table.partitions() {
        if part.holds_no_filesystem() {
            continue;
        }
        let mut reader = PartReader::new(shared.clone(), part);
        let content = fs::probe(&mut reader).map_err(|source| BootProblem::Read {
            partition: part.number,
            path: "its first sectors".into(),
            source,
        })?;
        if let Content::Unsupported(name) = content {
            unreadable.push(format!(
                "partition {} holds {name}, which rvmm cannot read",
                part.number
            ));
            continue;
        }
        let kind = if content == Content::Fat {
            "FAT"
        } else {
            "ext2/3/4"
        };
        match Filesystem::open(content, reader) {
            Ok(Some(fs)) => volumes.push(Volume {
                number: part.number,
                fs,
            }),
            Ok(None) => {}
            Err(source) => {
                return Err(BootProblem::Filesystem {
                    partition: part.number,
                    kind,
                    source,
                });
            }
        }
    }
    let unreadable_note = if unreadable.is_empty() {
        String::new()
    } else {
        format!("; {} (ext2/3/4 and FAT only)", unreadable.join(", "))
    };
    if volumes.is_empty() {
        return Err(BootProblem::NotFound(format!(
            "no partition holds an ext2/3/4 or FAT filesystem{unreadable_note}"
        )));
    }
    let Some((entry, config, at)) = find_entry(&mut volumes)? else {
        let searched: Vec<String> = volumes
            .iter()
            .map(|v| format!("{} ({})", v.number, v.fs.kind()))
            .collect();
        return Err(BootProblem::NotFound(format!(
            "no boot configuration (grub.cfg, loader/entries/*.conf or extlinux.conf) on partition{} {}{unreadable_note}",
            if searched.len() == 1 { "" } else { "s" },
            searched.join(", ")
        )));
    };
    load_entry(&mut volumes, entry, &config, at)
}

/// The boot entry, the configuration file that chose it, and the volume holding that file.
fn find_entry(volumes: &mut [Volume]) -> Result<Option<(BootEntry, String, usize)>, BootProblem> {
    for at in 0..volumes.len() {
        for path in GRUB_PATHS {
            if let Some(text) = volumes[at].read_text(path)? {
                return grub_entry(volumes, at, path, &text, 0).map(Some);
            }
        }
    }
    for at in 0..volumes.len() {
        let conf = volumes[at].read_text("/loader/loader.conf")?;
        let default = conf.as_deref().and_then(|c| {
            c.lines()
                .filter_map(|l| l.trim().strip_prefix("default"))
                .map(|v| v.trim().to_string())
                .next_back()
        });
        if let Some(found) = bls_entry(volumes, at, default.as_deref(), &HashMap::new())? {
            return Ok(Some(found));
        }
    }
    for (at, volume) in volumes.iter_mut().enumerate() {
        for path in EXTLINUX_PATHS {
            if let Some(text) = volume.read_text(path)? {
                let mut entry = bls::extlinux(&text).ok_or_else(|| {
                    BootProblem::NotFound(format!(
                        "partition {}: {path} has no LABEL with a KERNEL",
                        volume.number
                    ))
                })?;
                // Relative paths are relative to the configuration's directory.
                let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
                let absolute = |p: &str| {
                    if p.starts_with('/') {
                        p.to_string()
                    } else {
                        format!("{dir}/{p}")
                    }
                };
                entry.kernel = absolute(&entry.kernel);
                entry.initrds = entry.initrds.iter().map(|p| absolute(p)).collect();
                return Ok(Some((entry, config_name(volume, path), at)));
            }
        }
    }
    Ok(None)
}

fn config_name(volume: &Volume, path: &str) -> String {
    format!("partition {} {path}", volume.number)
}

fn grub_entry(
    volumes: &mut [Volume],
    at: usize,
    path: &str,
    text: &str,
    depth: usize,
) -> Result<(BootEntry, String, usize), BootProblem> {
    let name = config_name(&volumes[at], path);
    let dir = path.rsplit_once('/').map_or("", |(d, _)| d).to_string();
    let mut menu = {
        let volume = &mut volumes[at];
        grub::parse(text, &mut |file: Option<&str>| {
            let file = file.map_or_else(
                || format!("{dir}/grubenv"),
                |f| strip_device(f).1.to_string(),
            );
            volume
                .read_text(&file)
                .ok()
                .flatten()
                .map(|t| grub::parse_grubenv(&t))
                .unwrap_or_default()
        })
    };
    if menu.blscfg {
        let default = menu.vars.get("default").cloned();
        if let Some(found) = bls_entry(volumes, at, default.as_deref(), &menu.vars)? {
            return Ok(found);
        }
    }
    if menu.items.is_empty()
        && depth < MAX_CONFIGFILE_DEPTH
        && let Some(target) = menu.configfile.pop()
    {
        let (device, file) = strip_device(&target);
        let hint = device
            .and_then(grub::device_partition)
            .map(RootHint::Partition)
            .or(menu.root.clone());
        let next = hint
            .as_ref()
            .and_then(|h| volume_for(volumes, h))
            .unwrap_or(at);
        if let Some(text) = volumes[next].read_text(file)? {
            return grub_entry(volumes, next, file, &text, depth + 1);
        }
    }
    let (title, entry) = grub::default_boot(&menu)
        .ok_or_else(|| BootProblem::NotFound(format!("{name} has no menu entry")))?;
    let entry = entry.ok_or_else(|| {
        BootProblem::NotFound(format!("{name}: entry '{title}' loads no Linux kernel"))
    })?;
    Ok((entry, name, at))
}

/// BLS entries of the volume at `at` (`loader/entries`), the default or newest chosen.
fn bls_entry(
    volumes: &mut [Volume],
    at: usize,
    default: Option<&str>,
    vars: &HashMap<String, String>,
) -> Result<Option<(BootEntry, String, usize)>, BootProblem> {
    for dir in BLS_DIRS {
        let volume = &mut volumes[at];
        let names = volume
            .fs
            .read_dir(dir)
            .map_err(|source| BootProblem::Read {
                partition: volume.number,
                path: dir.to_string(),
                source,
            })?;
        let Some(names) = names else { continue };
        let mut entries = Vec::new();
        for name in names
            .iter()
            .filter(|n| n.ends_with(".conf"))
            .take(MAX_BLS_ENTRIES)
        {
            if let Some(text) = volume.read_text(&format!("{dir}/{name}"))? {
                entries.push(bls::parse_entry(name.trim_end_matches(".conf"), &text));
            }
        }
        if entries.is_empty() {
            continue;
        }
        bls::sort(&mut entries);
        let chosen = bls::choose(&entries, default).expect("not empty");
        let config = format!(
            "{} {dir}/{}.conf",
            config_name(volume, "").trim_end(),
            chosen.id
        );
        if let Some(efi) = &chosen.efi {
            return Err(BootProblem::Kernel {
                path: efi.clone(),
                problem: format!(
                    "entry '{}' starts an EFI program (a Unified Kernel Image?), which rvmm cannot boot",
                    chosen.id
                ),
            });
        }
        let entry = bls::to_boot(chosen, vars)
            .ok_or_else(|| BootProblem::NotFound(format!("{config} names no linux kernel")))?;
        return Ok(Some((entry, config, at)));
    }
    Ok(None)
}

/// `(hd0,gpt2)/boot/x` -> (`Some("(hd0,gpt2)")`, `/boot/x`).
fn strip_device(path: &str) -> (Option<&str>, &str) {
    if path.starts_with('(')
        && let Some(end) = path.find(')')
    {
        return (Some(&path[..=end]), &path[end + 1..]);
    }
    (None, path)
}

fn volume_for(volumes: &mut [Volume], hint: &RootHint) -> Option<usize> {
    match hint {
        RootHint::FsUuid(uuid) => volumes.iter().position(|v| v.fs.uuid().eq_ignore_ascii_case(uuid)),
        RootHint::Label(label) => volumes.iter().position(|v| v.fs.label() == *label),
        RootHint::Partition(n) => volumes.iter().position(|v| v.number == *n),
        RootHint::File(file) => (0..volumes.len()).find(|&i| matches!(volumes[i].fs.read_dir(file.rsplit_once('/').map_or("/", |(d, _)| d)), Ok(Some(names)) if names.iter().any(|n| file.ends_with(&format!("/{n}"))))),
    }
}

/// Reads `path` for `entry`: on its root filesystem first, then the others; with the path
/// as written, then with `/boot` added or removed (a separate /boot partition).
fn read_boot_file(
    volumes: &mut [Volume],
    first: usize,
    path: &str,
    limit: u64,
) -> Result<Option<(Vec<u8>, u32)>, BootProblem> {
    let (device, path) = strip_device(path);
    let first = device
        .and_then(grub::device_partition)
        .and_then(|n| volumes.iter().position(|v| v.number == n))
        .unwrap_or(first);
    let mut candidates = vec![path.to_string()];
    match path.strip_prefix("/boot/") {
        Some(rest) => candidates.push(format!("/{rest}")),
        None => candidates.push(format!("/boot{path}")),
    }
    let order = std::iter::once(first).chain((0..volumes.len()).filter(|&i| i != first));
    for i in order.collect::<Vec<_>>() {
        for candidate in &candidates {
            if let Some(bytes) = volumes[i].read(candidate, limit)? {
                return Ok(Some((bytes, volumes[i].number)));
            }
        }
    }
    Ok(None)
}

fn load_entry(
    volumes: &mut [Volume],
    entry: BootEntry,
    config: &str,
    at: usize,
) -> Result<DiskBoot, BootProblem> {
    let root = entry
        .root
        .as_ref()
        .and_then(|h| volume_for(volumes, h))
        .unwrap_or(at);
    let missing = |what: &str, path: &str| {
        BootProblem::NotFound(format!(
            "{config}: entry '{}': {what} {path} not found",
            entry.title
        ))
    };
    let (kernel, part) = read_boot_file(volumes, root, &entry.kernel, MAX_KERNEL)?
        .ok_or_else(|| missing("kernel", &entry.kernel))?;
    kernel::check(&kernel).map_err(|problem| BootProblem::Kernel {
        path: format!("partition {part} {}", entry.kernel),
        problem,
    })?;
    let mut initrd: Option<Vec<u8>> = None;
    for path in &entry.initrds {
        let left = MAX_INITRD - initrd.as_ref().map_or(0, |i| i.len() as u64);
        let (bytes, _) =
            read_boot_file(volumes, root, path, left)?.ok_or_else(|| missing("initrd", path))?;
        initrd
            .get_or_insert_with(Vec::new)
            .extend_from_slice(&bytes);
    }
    Ok(DiskBoot {
        kernel,
        initrd,
        cmdline: with_serial_console(&entry.args),
        source: format!("{config}, entry '{}'", entry.title),
    })
}

/// `args`, with `console=ttyS0` appended unless a serial console is named already.
pub fn with_serial_console(args: &str) -> String {
    let args = args.trim();
    if args
        .split_whitespace()
        .any(|a| a.starts_with("console=ttyS"))
    {
        return args.to_string();
    }
    if args.is_empty() {
        "console=ttyS0".to_string()
    } else {
        format!("{args} console=ttyS0")
    }
}

#[cfg(test)]
mod tests;
