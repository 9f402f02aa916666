//! Where an image's bytes live: a host file, or memory (tests and fuzzing). Positioned I/O
//! only, so one storage can be shared by readers without a cursor.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Mutex;

/// Positioned reads and writes on an image's bytes.
pub trait Storage: Send + std::fmt::Debug {
    /// Fills `buf` from `offset`; a range past the end is an `UnexpectedEof` error.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Reads what there is from `offset` into `buf` (short at the end); returns the count.
    fn read_upto(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    /// Writes all of `buf` at `offset`, growing the storage when it ends before.
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes completed writes durable.
    fn sync(&self) -> io::Result<()>;
    /// The length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage holds no bytes.
    fn is_empty(&self) -> io::Result<bool> {
        self.len().map(|n| n == 0)
    }
    /// The host file, when there is one (data I/O then bypasses this trait).
    fn file(&self) -> Option<&File> {
        None
    }
}

impl Storage for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.read_exact_at(buf, offset)
    }

    fn read_upto(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut done = 0;
        while done < buf.len() {
            match FileExt::read_at(self, &mut buf[done..], offset + done as u64) {
                Ok(0) => break,
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn len(&self) -> io::Result<u64> {
        // lseek works for block devices too, whose metadata length is 0.
        use std::io::Seek;
        let mut f = self;
        f.seek(io::SeekFrom::End(0))
    }

    fn file(&self) -> Option<&File> {
        Some(self)
    }
}

/// An image held in memory.
#[derive(Debug, Default)]
pub struct MemStorage {
    bytes: Mutex<Vec<u8>>,
    /// Writes fail once the storage would grow past this (a bound for fuzzing).
    limit: usize,
}

impl MemStorage {
    /// Storage holding `bytes`, allowed to grow to `limit` bytes.
    pub fn new(bytes: Vec<u8>, limit: usize) -> Self {
        Self {
            bytes: Mutex::new(bytes),
            limit,
        }
    }

    /// A copy of the content.
    pub fn to_vec(&self) -> Vec<u8> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.bytes.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Storage for MemStorage {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let n = self.read_upto(buf, offset)?;
        if n < buf.len() {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        Ok(())
    }

    fn read_upto(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let bytes = self.lock();
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let n = buf.len().min(bytes.len() - start);
        buf[..n].copy_from_slice(&bytes[start..start + n]);
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        let mut bytes = self.lock();
        let end = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(buf.len()))
            .filter(|&end| end <= self.limit)
            .ok_or_else(|| io::Error::from(io::ErrorKind::StorageFull))?;
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[end - buf.len()..end].copy_from_slice(buf);
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.lock().len() as u64)
    }
}
