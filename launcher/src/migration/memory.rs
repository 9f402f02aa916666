//! `Memory` requests: guest pages from the sender's memory into the receiver's.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, Ordering};

use rvmm_core::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::MigrationError;
use super::protocol::{Command, Header, ProtocolError, read_answer, write_header};

const PAGE: usize = 4096;
/// Guest bytes per `Memory` request at most (the sender buffers one request).
const BATCH_BYTES: usize = 16 << 20;
/// Ranges per request at most.
const MAX_RANGES: u64 = 1 << 20;

/// One request's ranges and their bytes.
struct Batch {
    ranges: Vec<(u64, u64)>,
    data: Vec<u8>,
}

impl Batch {
    fn push(&mut self, addr: u64, bytes: &[u8]) {
        match self.ranges.last_mut() {
            Some((start, len)) if *start + *len == addr => *len += bytes.len() as u64,
            _ => self.ranges.push((addr, bytes.len() as u64)),
        }
        self.data.extend_from_slice(bytes);
    }

    fn send(&mut self, out: &mut (impl Read + Write + ?Sized)) -> Result<(), ProtocolError> {
        if self.ranges.is_empty() {
            return Ok(());
        }
        let table_len = 8 + 16 * self.ranges.len();
        write_header(out, Command::Memory, (table_len + self.data.len()) as u64)?;
        let mut table = Vec::with_capacity(table_len);
        table.extend_from_slice(&(self.ranges.len() as u64).to_le_bytes());
        for (addr, len) in &self.ranges {
            table.extend_from_slice(&addr.to_le_bytes());
            table.extend_from_slice(&len.to_le_bytes());
        }
        out.write_all(&table)?;
        out.write_all(&self.data)?;
        out.flush()?;
        read_answer(out, Command::Memory)?;
        self.ranges.clear();
        self.data.clear();
        Ok(())
    }
}

/// Sends the pages of `ranges` (guest address, length); with `skip_zero` pages of zeros are
/// left out (the receiver's fresh memory is zero). Returns the guest bytes sent.
pub(super) fn send_pages(
    out: &mut (impl Read + Write + ?Sized),
    mem: &GuestMemoryMmap,
    ranges: &[(u64, u64)],
    skip_zero: bool,
    cancel: &AtomicBool,
) -> Result<u64, MigrationError> {
    let mut batch = Batch {
        ranges: Vec::new(),
        data: Vec::with_capacity(BATCH_BYTES),
    };
    let mut page = [0u8; PAGE];
    let mut sent = 0u64;
    for &(start, len) in ranges {
        let mut addr = start;
        while addr < start + len {
            let n = PAGE.min((start + len - addr) as usize);
            mem.read_slice(&mut page[..n], GuestAddress(addr))
                .map_err(|e| MigrationError::Invalid(format!("guest memory at {addr:#x}: {e}")))?;
            if !(skip_zero && page[..n].iter().all(|b| *b == 0)) {
                batch.push(addr, &page[..n]);
                sent += n as u64;
            }
            if batch.data.len() >= BATCH_BYTES || batch.ranges.len() as u64 >= MAX_RANGES {
                if cancel.load(Ordering::SeqCst) {
                    return Err(MigrationError::Cancelled);
                }
                batch.send(out)?;
            }
            addr += n as u64;
        }
    }
    batch.send(out)?;
    Ok(sent)
}

/// Reads a `Memory` request's payload into `mem`; every range must be guest memory and the
/// lengths must add up to the payload. Returns the guest bytes received.
pub(super) fn receive_pages(
    input: &mut (impl Read + ?Sized),
    mem: &GuestMemoryMmap,
    header: Header,
) -> Result<u64, MigrationError> {
    let invalid = |what: String| MigrationError::Invalid(format!("Memory request: {what}"));
    let mut word = [0u8; 8];
    input.read_exact(&mut word).map_err(ProtocolError::Io)?;
    let count = u64::from_le_bytes(word);
    if count > MAX_RANGES || 8 + 16 * count > header.len {
        return Err(invalid(format!(
            "{count} ranges do not fit {} bytes",
            header.len
        )));
    }
    let mut ranges = Vec::with_capacity(count as usize);
    let mut total = 0u64;
    for _ in 0..count {
        input.read_exact(&mut word).map_err(ProtocolError::Io)?;
        let addr = u64::from_le_bytes(word);
        input.read_exact(&mut word).map_err(ProtocolError::Io)?;
        let len = u64::from_le_bytes(word);
        let fits =
            usize::try_from(len).is_ok_and(|n| mem.check_range(GuestAddress(addr), n) && n > 0);
        if !fits {
            return Err(invalid(format!("{addr:#x}+{len:#x} is not guest memory")));
        }
        total = total.saturating_add(len);
        ranges.push((addr, len));
    }
    if 8 + 16 * count + total != header.len {
        return Err(invalid(format!(
            "ranges of {total} bytes in a payload of {} bytes",
            header.len
        )));
    }
    let mut buf = vec![0u8; BATCH_BYTES.min(total as usize)];
    for (addr, len) in ranges {
        let mut done = 0u64;
        while done < len {
            let n = buf.len().min((len - done) as usize);
            input.read_exact(&mut buf[..n]).map_err(ProtocolError::Io)?;
            mem.write_slice(&buf[..n], GuestAddress(addr + done))
                .map_err(|e| invalid(e.to_string()))?;
            done += n as u64;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use std::os::unix::net::UnixStream;

    use super::super::protocol::{answer, read_header};
    use super::*;

    #[test]
    fn pages_arrive_where_they_were_and_zero_pages_are_skipped_on_request() {
        let src = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let dst = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        src.write_slice(b"first", GuestAddress(0x1000)).unwrap();
        src.write_slice(b"second", GuestAddress(0x8ff0)).unwrap();
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let receiver = std::thread::spawn(move || {
            let header = read_header(&mut b).unwrap().unwrap();
            let got = receive_pages(&mut b, &dst, header).unwrap();
            answer(&mut b, Ok(())).unwrap();
            (got, dst)
        });
        let sent =
            send_pages(&mut a, &src, &[(0, 1 << 20)], true, &AtomicBool::new(false)).unwrap();
        let (got, dst) = receiver.join().unwrap();
        assert_eq!((sent, got), (2 * 4096, 2 * 4096));
        let mut buf = [0u8; 6];
        dst.read_slice(&mut buf, GuestAddress(0x8ff0)).unwrap();
        assert_eq!(&buf, b"second");
    }

    #[test]
    fn ranges_outside_guest_memory_or_not_adding_up_are_refused() {
        let dst = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let payload = |ranges: &[(u64, u64)], data: usize| {
            let mut p = (ranges.len() as u64).to_le_bytes().to_vec();
            for (a, l) in ranges {
                p.extend_from_slice(&a.to_le_bytes());
                p.extend_from_slice(&l.to_le_bytes());
            }
            p.extend(std::iter::repeat_n(0u8, data));
            p
        };
        for (ranges, data, needle) in [
            (vec![(0xff000u64, 0x2000u64)], 0x2000, "not guest memory"),
            (vec![(0, 0x1000)], 0x800, "payload"),
            (vec![(0, 0)], 0, "not guest memory"),
        ] {
            let p = payload(&ranges, data);
            let header = Header {
                command: Command::Memory,
                len: p.len() as u64,
            };
            let err = receive_pages(&mut p.as_slice(), &dst, header).unwrap_err();
            assert!(err.to_string().contains(needle), "{err}");
        }
        let huge = Header {
            command: Command::Memory,
            len: 16,
        };
        let p = u64::MAX.to_le_bytes();
        assert!(receive_pages(&mut p.as_slice(), &dst, huge).is_err());
    }
}
