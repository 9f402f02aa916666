//! virtio-blk over a qcow2 image: each request's guest range is translated by
//! [`Qcow2::map_read`]/[`Qcow2::map_write`] into host ranges of the image file, whose data
//! then moves through the device's own engine (sync or io_uring) straight between guest
//! memory and the file, as for a raw disk. Zero, backing and compressed ranges are read
//! synchronously into guest memory. A FLUSH first waits for the data in flight, then writes
//! the image's metadata back in its crash-safe order and syncs.
//!
//! A request over one host range goes to the engine with the request's own token; one over
//! several is split into sub-operations whose completions are gathered before the request
//! completes.

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use super::super::GuestMemoryMmap;
use super::super::guest_view::HostBuf;
use super::backend::{Completions, DiskBackend, DiskOp, Engine};
use crate::cast::usize_from;
use crate::image::qcow2::{Extent, Qcow2};

/// Where a qcow2 image waits between activations of its device (the worker owns it while it
/// runs and puts it back when it stops, its metadata written).
pub type ImageSlot = Arc<Mutex<Option<Box<Qcow2>>>>;

/// Sub-operation tokens carry this bit (request tokens are small slot indexes, and the stop
/// flush's token is never handed to the engine).
const SUB: u64 = 1 << 62;

/// An offset or length inside one request's data buffer, which a `u32` spans.
fn within_request(n: u64) -> io::Result<u32> {
    u32::try_from(n)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "past a request's data"))
}

/// A request split into several engine operations.
#[derive(Debug)]
struct Split {
    left: u32,
    error: Option<io::Error>,
}

/// A [`DiskBackend`] for a qcow2 image over an engine on the image's file.
#[allow(missing_debug_implementations)]
pub struct Qcow2Backend {
    image: Option<Box<Qcow2>>,
    slot: ImageSlot,
    engine: Box<dyn DiskBackend>,
    /// Sub-operation index -> the request's token.
    subs: Vec<Option<u64>>,
    free_subs: Vec<usize>,
    splits: HashMap<u64, Split>,
    /// Requests finished outside `reap` (while waiting for a FLUSH).
    finished: Completions,
    scratch: Vec<u8>,
    pieces: Vec<(GuestAddress, u32)>,
    engine_done: Completions,
}

impl Qcow2Backend {
    /// Takes the image out of `slot` for a worker doing its data I/O through `engine`.
    pub fn new(slot: ImageSlot, engine: Box<dyn DiskBackend>) -> io::Result<Self> {
        let image = slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
            .ok_or_else(|| io::Error::other("the qcow2 image is held by another worker"))?;
        Ok(Self {
            image: Some(image),
            slot,
            engine,
            subs: Vec::new(),
            free_subs: Vec::new(),
            splits: HashMap::new(),
            finished: Vec::new(),
            scratch: Vec::new(),
            pieces: Vec::new(),
            engine_done: Vec::new(),
        })
    }

    fn image(&mut self) -> &mut Qcow2 {
        self.image.as_mut().expect("held until drop")
    }

    fn sub_token(&mut self, parent: u64) -> u64 {
        let index = self.free_subs.pop().unwrap_or_else(|| {
            self.subs.push(None);
            self.subs.len() - 1
        });
        self.subs[index] = Some(parent);
        SUB | index as u64
    }

    /// Accounts engine completions: requests' own tokens pass through; sub-operations count
    /// down their request.
    fn gather(&mut self, engine_done: &mut Completions, out: &mut Completions) {
        for (token, result) in engine_done.drain(..) {
            if token & SUB == 0 {
                out.push((token, result));
                continue;
            }
            let index = usize_from(token & !SUB);
            let Some(parent) = self.subs.get_mut(index).and_then(Option::take) else {
                log::error!("virtio-blk: qcow2 completion for unknown operation {token:#x}");
                continue;
            };
            self.free_subs.push(index);
            if let Some(split) = self.splits.get_mut(&parent) {
                if let Err(e) = result {
                    split.error.get_or_insert(e);
                }
                split.left -= 1;
                if split.left == 0 {
                    let split = self.splits.remove(&parent).expect("present");
                    out.push((parent, split.error.map_or(Ok(()), Err)));
                }
            }
        }
    }

    /// Starts the engine operation for `len` bytes of the request at `done` bytes in: the
    /// host range `host`. Returns whether it is still in flight, and under which token.
    #[allow(clippy::too_many_arguments)]
    fn start_data(
        &mut self,
        mem: &GuestMemoryMmap,
        write: bool,
        target: Target<'_>,
        done: u64,
        len: u64,
        host: u64,
        token: u64,
        whole: bool,
    ) -> Result<InFlight, io::Error> {
        let own = if whole && token & SUB == 0 {
            token
        } else {
            self.sub_token(token)
        };
        let outcome = match target {
            Target::Buf(buf) => {
                let part = buf.slice(within_request(done)?, within_request(len)?);
                let op = if write {
                    DiskOp::WriteBuf {
                        offset: host,
                        buf: part,
                    }
                } else {
                    DiskOp::ReadBuf {
                        offset: host,
                        buf: part,
                    }
                };
                self.engine.start(mem, op, own)
            }
            Target::List(data) => {
                let mut pieces = std::mem::take(&mut self.pieces);
                pieces_of(data, done, len, &mut pieces);
                let op = if write {
                    DiskOp::Write {
                        offset: host,
                        data: &pieces,
                    }
                } else {
                    DiskOp::Read {
                        offset: host,
                        data: &pieces,
                    }
                };
                let outcome = self.engine.start(mem, op, own);
                self.pieces = pieces;
                outcome
            }
        };
        match outcome {
            Some(result) => {
                if own & SUB != 0 {
                    let index = usize_from(own & !SUB);
                    self.subs[index] = None;
                    self.free_subs.push(index);
                }
                result.map(|()| InFlight::No)
            }
            None if own == token => Ok(InFlight::Direct),
            None => Ok(InFlight::Sub),
        }
    }

    /// Reads or writes the whole request; returns the result now, or `None` when engine
    /// operations are in flight (its completion then comes from `reap`).
    fn transfer(
        &mut self,
        mem: &GuestMemoryMmap,
        write: bool,
        offset: u64,
        target: Target<'_>,
        token: u64,
    ) -> Option<io::Result<()>> {
        let total = target.len();
        let mut done = 0;
        let mut pending = 0u32;
        let mut direct = false;
        let mut error = None;
        while done < total {
            let at = offset + done;
            let step = if write {
                self.image()
                    .map_write(at, total - done)
                    .map(|(host, n)| (Extent::Data(host), n))
            } else {
                self.image().map_read(at, total - done)
            };
            let (extent, n) = match step {
                Ok(step) => step,
                Err(e) => {
                    error = Some(e);
                    break;
                }
            };
            let result = match extent {
                Extent::Data(host) => {
                    let whole = done == 0 && n == total;
                    self.start_data(mem, write, target, done, n, host, token, whole)
                }
                other => self
                    .read_special(mem, other, at, target, done, n)
                    .map(|()| InFlight::No),
            };
            match result {
                Ok(InFlight::Direct) => direct = true,
                Ok(InFlight::Sub) => pending += 1,
                Ok(InFlight::No) => {}
                Err(e) => {
                    error = Some(e);
                    break;
                }
            }
            done += n;
        }
        if direct {
            // One operation for the whole request, under the request's own token.
            return None;
        }
        if pending == 0 {
            return Some(error.map_or(Ok(()), Err));
        }
        self.splits.insert(
            token,
            Split {
                left: pending,
                error,
            },
        );
        None
    }

    /// Reads a zero, backing or compressed range into the request's buffers.
    fn read_special(
        &mut self,
        mem: &GuestMemoryMmap,
        extent: Extent,
        at: u64,
        target: Target<'_>,
        done: u64,
        len: u64,
    ) -> io::Result<()> {
        let done_in_buf = within_request(done)?;
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(usize_from(len), 0);
        let result = self.image().read_extent(extent, at, &mut scratch);
        if result.is_ok() {
            match target {
                Target::Buf(buf) => buf.copy_from(done_in_buf, &scratch),
                Target::List(data) => {
                    let mut pieces = std::mem::take(&mut self.pieces);
                    pieces_of(data, done, len, &mut pieces);
                    let mut from = 0usize;
                    for &(addr, n) in &pieces {
                        let n = n as usize;
                        if mem.write_slice(&scratch[from..from + n], addr).is_err() {
                            self.pieces = pieces;
                            self.scratch = scratch;
                            return Err(io::Error::other("guest buffer outside memory"));
                        }
                        from += n;
                    }
                    self.pieces = pieces;
                }
            }
        }
        self.scratch = scratch;
        result
    }

    /// Waits for every engine operation in flight, gathering their requests.
    fn drain_engine(&mut self) -> io::Result<()> {
        let mut engine_done = std::mem::take(&mut self.engine_done);
        let waited = self.engine.wait_all(&mut engine_done);
        let mut finished = std::mem::take(&mut self.finished);
        self.gather(&mut engine_done, &mut finished);
        self.finished = finished;
        self.engine_done = engine_done;
        waited
    }
}

/// Whether an engine operation is in flight, and under which token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum InFlight {
    /// Completed.
    No,
    /// In flight under the request's own token (the whole request).
    Direct,
    /// In flight under a sub-operation token.
    Sub,
}

/// A request's data: one host buffer or a list of guest buffers.
#[derive(Clone, Copy)]
enum Target<'a> {
    Buf(HostBuf),
    List(&'a [(GuestAddress, u32)]),
}

impl Target<'_> {
    fn len(&self) -> u64 {
        match self {
            Self::Buf(b) => u64::from(b.len()),
            Self::List(data) => data.iter().map(|&(_, n)| u64::from(n)).sum(),
        }
    }
}

/// The guest buffers holding bytes `skip..skip + len` of `data`.
fn pieces_of(
    data: &[(GuestAddress, u32)],
    skip: u64,
    len: u64,
    out: &mut Vec<(GuestAddress, u32)>,
) {
    out.clear();
    let mut pos = 0u64;
    let end = skip + len;
    for &(addr, n) in data {
        let (start, stop) = (pos, pos + u64::from(n));
        pos = stop;
        if stop <= skip {
            continue;
        }
        if start >= end {
            break;
        }
        let from = skip.max(start);
        let to = end.min(stop);
        #[allow(
            clippy::cast_possible_truncation,
            reason = "a part of one descriptor's u32"
        )]
        let part = (to - from) as u32;
        out.push((GuestAddress(addr.0 + (from - start)), part));
    }
}

impl DiskBackend for Qcow2Backend {
    fn start(
        &mut self,
        mem: &GuestMemoryMmap,
        op: DiskOp<'_>,
        token: u64,
    ) -> Option<io::Result<()>> {
        match op {
            DiskOp::ReadBuf { offset, buf } => {
                self.transfer(mem, false, offset, Target::Buf(buf), token)
            }
            DiskOp::WriteBuf { offset, buf } => {
                self.transfer(mem, true, offset, Target::Buf(buf), token)
            }
            DiskOp::Read { offset, data } => {
                self.transfer(mem, false, offset, Target::List(data), token)
            }
            DiskOp::Write { offset, data } => {
                self.transfer(mem, true, offset, Target::List(data), token)
            }
            DiskOp::Flush => {
                // Everything started before the FLUSH first; then the metadata, in order.
                Some(self.drain_engine().and_then(|()| self.image().flush()))
            }
            // Advisory: the clusters stay allocated.
            DiskOp::Discard { .. } => Some(Ok(())),
            DiskOp::WriteZeroes { offset, len, .. } => Some(self.image().write_zeroes(offset, len)),
        }
    }

    fn submit(&mut self) -> io::Result<()> {
        self.engine.submit()
    }

    fn reap(&mut self, done: &mut Completions) {
        done.append(&mut self.finished);
        let mut engine_done = std::mem::take(&mut self.engine_done);
        self.engine.reap(&mut engine_done);
        self.gather(&mut engine_done, done);
        self.engine_done = engine_done;
    }

    fn wait_all(&mut self, done: &mut Completions) -> io::Result<()> {
        let waited = self.drain_engine();
        done.append(&mut self.finished);
        waited
    }

    fn write_back(&mut self) -> io::Result<()> {
        self.drain_engine()?;
        self.image().flush()
    }

    fn completion_fd(&self) -> Option<RawFd> {
        self.engine.completion_fd()
    }

    fn engine(&self) -> Engine {
        self.engine.engine()
    }
}

impl Drop for Qcow2Backend {
    fn drop(&mut self) {
        // The handler drained and flushed before its fields (this backend) drop; the image
        // goes back for the next activation.
        if let Err(e) = self.drain_engine() {
            log::error!("virtio-blk: cannot wait for qcow2 I/O in flight: {e}");
        }
        *self.slot.lock().unwrap_or_else(|p| p.into_inner()) = self.image.take();
    }
}
