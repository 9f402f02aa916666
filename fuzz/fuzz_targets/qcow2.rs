//! qcow2 images from untrusted bytes: the header, L1/L2 tables, refcounts, compressed and
//! zero clusters, through `DiskImage::from_storage` on an in-memory image (a backing file
//! resolves to a small raw image), then a sequence of reads, writes, zeroings and flushes.
//!
//! Oracles: nothing panics, hangs or allocates what the header merely claims (libFuzzer's
//! RSS limit); every open error names the image; a write that succeeds reads back as written
//! (before and after a flush) as long as no later operation failed; reads never come back
//! with data of the wrong length.

#![no_main]

use std::path::Path;

use arbitrary::{Arbitrary, Unstructured};
use rvmm_devices::image::{DiskImage, ImageFormat, MemStorage};
use libfuzzer_sys::fuzz_target;

/// The image may grow by this much through writes.
const GROWTH: usize = 8 << 20;
/// Largest read or write.
const MAX_IO: u32 = 256 << 10;

#[derive(Arbitrary, Debug)]
enum Op {
    Read { offset: u32, len: u32 },
    Write { offset: u32, len: u32, byte: u8 },
    Zero { offset: u32, len: u32 },
    Flush,
}

/// The input: a flags byte (bit 0: open writable), the image's length (u32, little-endian),
/// the image (the seeds hold real ones, from qemu-img), then the operations (`arbitrary`).
struct Input {
    writable: bool,
    image: Vec<u8>,
    ops: Vec<Op>,
}

impl Input {
    fn parse(data: &[u8]) -> Option<Self> {
        let (&flags, rest) = data.split_first()?;
        let len = u32::from_le_bytes(rest.get(..4)?.try_into().ok()?) as usize;
        let rest = &rest[4..];
        let (image, ops) = rest.split_at(len.min(rest.len()));
        Some(Self {
            writable: flags & 1 != 0,
            image: image.to_vec(),
            ops: Unstructured::new(ops).arbitrary().unwrap_or_default(),
        })
    }
}

fn backing() -> DiskImage {
    let storage = MemStorage::new((0..4096u32).map(|i| i as u8).collect(), 4096);
    DiskImage::from_storage(Box::new(storage), false, Some(ImageFormat::Raw), Path::new("base"), |_, _, _| {
        unreachable!("raw images have no backing file")
    })
    .expect("raw")
}

fuzz_target!(|data: &[u8]| {
    let Some(input) = Input::parse(data) else {
        return;
    };
    let limit = input.image.len() + GROWTH;
    let storage = MemStorage::new(input.image, limit);
    let opened = DiskImage::from_storage(
        Box::new(storage),
        input.writable,
        Some(ImageFormat::Qcow2),
        Path::new("fuzz.qcow2"),
        |_, _, _| Ok(backing()),
    );
    let mut image = match opened {
        Ok(image) => image,
        Err(e) => {
            assert!(e.to_string().contains("fuzz.qcow2"), "{e}");
            return;
        }
    };
    let size = image.virtual_size();
    let range = |offset: u32, len: u32| {
        let len = u64::from(len % MAX_IO + 1);
        let offset = u64::from(offset) % size.max(1);
        (offset, len.min(size - offset))
    };
    // The bytes written, while every operation since succeeded.
    let mut written: Vec<(u64, Vec<u8>)> = Vec::new();
    for op in input.ops.into_iter().take(64) {
        if size == 0 {
            break;
        }
        let ok = match op {
            Op::Read { offset, len } => {
                let (offset, len) = range(offset, len);
                let mut buf = vec![0u8; len as usize];
                image.read_at(&mut buf, offset).is_ok()
            }
            Op::Write { offset, len, byte } => {
                let (offset, len) = range(offset, len);
                let data = vec![byte; len as usize];
                let ok = image.write_at(&data, offset).is_ok();
                if ok {
                    written.retain(|(o, d)| o + d.len() as u64 <= offset || *o >= offset + len);
                    written.push((offset, data));
                }
                ok
            }
            Op::Zero { offset, len } => {
                let (offset, len) = range(offset, len);
                let ok = match &mut image {
                    DiskImage::Qcow2(q) => q.write_zeroes(offset, len).is_ok(),
                    DiskImage::Raw(_) => true,
                };
                written.retain(|(o, d)| o + d.len() as u64 <= offset || *o >= offset + len);
                ok
            }
            Op::Flush => image.flush().is_ok(),
        };
        if !ok {
            written.clear();
        }
        for (offset, data) in &written {
            let mut back = vec![0u8; data.len()];
            if image.read_at(&mut back, *offset).is_ok() {
                assert!(back == *data, "write at {offset:#x} read back differently");
            }
        }
    }
});
