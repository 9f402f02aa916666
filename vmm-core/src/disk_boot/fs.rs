//! The filesystems boot files are read from: ext2/3/4 (the `ext4-view` crate, no unsafe
//! code) and FAT (ours); any other content is named, so the error says what is there.

use std::cell::RefCell;
use std::io;
use std::rc::Rc;

use rvmm_devices::cast::usize_from;
use rvmm_devices::image::DiskImage;

use super::DiskReader;
use super::fat::Fat;
use super::partition::Partition;

/// A disk image shared by the readers of its partitions.
pub type SharedImage = Rc<RefCell<DiskImage>>;

impl DiskReader for SharedImage {
    fn size(&self) -> u64 {
        self.borrow().virtual_size()
    }

    fn read(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let mut image = self.borrow_mut();
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= image.virtual_size() => image.read_at(buf, offset),
            _ => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

/// One partition of a shared image, reads bounded by its length.
#[derive(Clone, Debug)]
pub struct PartReader {
    image: SharedImage,
    start: u64,
    len: u64,
}

impl PartReader {
    /// A reader of `part` of `image`.
    pub fn new(image: SharedImage, part: &Partition) -> Self {
        Self {
            image,
            start: part.start,
            len: part.len,
        }
    }
}

impl DiskReader for PartReader {
    fn size(&self) -> u64 {
        self.len
    }

    fn read(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => self.image.read(buf, self.start + offset),
            _ => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "read past the end of the partition",
            )),
        }
    }
}

impl ext4_view::Ext4Read for PartReader {
    fn read(
        &mut self,
        start_byte: u64,
        dst: &mut [u8],
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        DiskReader::read(self, dst, start_byte).map_err(|e| Box::new(e) as _)
    }
}

/// What a partition holds, by its magic numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Content {
    /// ext2, ext3 or ext4.
    Ext,
    /// FAT12/16/32.
    Fat,
    /// Something rvmm cannot read, by name (XFS, btrfs, an LVM physical volume, ...).
    Unsupported(&'static str),
    /// Nothing recognised.
    Unknown,
}

/// Recognises the content of a partition.
pub fn probe(part: &mut PartReader) -> io::Result<Content> {
    let mut head = vec![0u8; usize_from(part.size().min(8192))];
    part.read(&mut head, 0)?;
    let at = |offset: usize, magic: &[u8]| head.get(offset..offset + magic.len()) == Some(magic);
    if at(1024 + 56, &[0x53, 0xef]) {
        return Ok(Content::Ext);
    }
    if head.len() >= 512 && Fat::probe(&head[..512], part.size()).is_some() {
        return Ok(Content::Fat);
    }
    let named = [
        (0, &b"XFSB"[..], "XFS"),
        (0, b"LUKS\xba\xbe", "LUKS encryption"),
        (512, b"LABELONE", "an LVM physical volume"),
        (4086, b"SWAPSPACE2", "swap space"),
        (3, b"NTFS    ", "NTFS"),
        (0, b"hsqs", "squashfs"),
    ];
    for (offset, magic, name) in named {
        if at(offset, magic) {
            return Ok(Content::Unsupported(name));
        }
    }
    let mut btrfs = [0u8; 8];
    if part.size() >= 65536 + 72 {
        part.read(&mut btrfs, 65536 + 64)?;
        if &btrfs == b"_BHRfS_M" {
            return Ok(Content::Unsupported("btrfs"));
        }
    }
    Ok(Content::Unknown)
}

/// A readable filesystem.
pub enum Filesystem {
    /// ext2/3/4.
    Ext(Box<ext4_view::Ext4>),
    /// FAT.
    Fat(Fat, PartReader),
}

impl std::fmt::Debug for Filesystem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Ext(_) => "ext",
            Self::Fat(..) => "FAT",
        })
    }
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl Filesystem {
    /// Opens the filesystem `content` says `part` holds.
    pub fn open(content: Content, mut part: PartReader) -> io::Result<Option<Self>> {
        match content {
            Content::Ext => ext4_view::Ext4::load(Box::new(part))
                .map(|fs| Some(Self::Ext(Box::new(fs))))
                .map_err(invalid),
            Content::Fat => {
                let mut sector = [0u8; 512];
                part.read(&mut sector, 0)?;
                Ok(Fat::probe(&sector, part.size()).map(|fat| Self::Fat(fat, part)))
            }
            _ => Ok(None),
        }
    }

    /// `ext2/3/4` or `FAT`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Ext(_) => "ext2/3/4",
            Self::Fat(..) => "FAT",
        }
    }

    /// The UUID GRUB's `search --fs-uuid` matches (lower-case for ext, `XXXX-XXXX` for FAT).
    pub fn uuid(&self) -> String {
        match self {
            Self::Ext(fs) => fs.uuid().to_string(),
            Self::Fat(fat, _) => fat.uuid.clone(),
        }
    }

    /// The volume label.
    pub fn label(&self) -> String {
        match self {
            Self::Ext(fs) => fs.label().to_str().unwrap_or_default().to_string(),
            Self::Fat(fat, _) => fat.label.clone(),
        }
    }

    /// The file at `path` (absolute in the filesystem): `Ok(None)` when it does not exist;
    /// an error when it is larger than `limit` or unreadable.
    pub fn read_file(&mut self, path: &str, limit: u64) -> io::Result<Option<Vec<u8>>> {
        match self {
            Self::Ext(fs) => {
                let meta = match fs.metadata(path) {
                    Ok(meta) => meta,
                    Err(ext4_view::Ext4Error::NotFound | ext4_view::Ext4Error::NotADirectory) => {
                        return Ok(None);
                    }
                    Err(e) => return Err(invalid(e)),
                };
                if meta.is_dir() {
                    return Ok(None);
                }
                if meta.len() > limit {
                    return Err(invalid(format!(
                        "{path} is {} bytes, over {limit}",
                        meta.len()
                    )));
                }
                fs.read(path).map(Some).map_err(invalid)
            }
            Self::Fat(fat, part) => fat.read_file(part, path, limit),
        }
    }

    /// The names in the directory at `path`; `None` when it does not exist.
    pub fn read_dir(&mut self, path: &str) -> io::Result<Option<Vec<String>>> {
        match self {
            Self::Ext(fs) => {
                let entries = match fs.read_dir(path) {
                    Ok(entries) => entries,
                    Err(ext4_view::Ext4Error::NotFound | ext4_view::Ext4Error::NotADirectory) => {
                        return Ok(None);
                    }
                    Err(e) => return Err(invalid(e)),
                };
                let mut names = Vec::new();
                for entry in entries.take(MAX_DIR_ENTRIES) {
                    let entry = entry.map_err(invalid)?;
                    if let Ok(name) = entry.file_name().as_str()
                        && name != "."
                        && name != ".."
                    {
                        names.push(name.to_string());
                    }
                }
                Ok(Some(names))
            }
            Self::Fat(fat, part) => Ok(fat
                .read_dir(part, path)?
                .map(|entries| entries.into_iter().map(|e| e.name).collect())),
        }
    }
}

/// Directory entries looked at, at most (a boot entry directory has a handful).
const MAX_DIR_ENTRIES: usize = 4096;
