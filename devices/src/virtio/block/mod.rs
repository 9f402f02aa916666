//! virtio-blk (virtio 1.x §5.2): a disk backed by a host file or block device.
//!
//! [`Block`] is the device as the transport sees it; its worker is a [`BlockHandler`] running
//! requests through a [`DiskBackend`] (synchronous system calls or io_uring, see [`Engine`]).

mod backend;
mod handler;
mod persist;
mod qcow2_backend;
mod request;

use std::fs::File;
use std::io::{Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO,
    VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

pub use super::guest_view::HostBuf;
pub use backend::{
    Completions, DiskBackend, DiskOp, Engine, IoUringEngine, SyncEngine, open_backend,
};
pub use handler::{BlockHandler, DiskContext};
pub use persist::BlockState;
pub use qcow2_backend::{ImageSlot, Qcow2Backend};
pub use request::{
    BlockRequest, ID_BYTES, ParseError, RejectedRequest, RequestLimits, RequestType, SECTOR_SIZE,
    SectorRange,
};

// The stop tests start a worker by hand.
use super::persist::{RestoreError, VirtioDeviceState};
#[cfg(test)]
use super::spawn_worker;
use super::{
    ActivateError, ActiveQueue, DeviceWorker, GuestMemoryMmap, TYPE_BLOCK, VIRTIO_F_VERSION_1,
    VirtioDevice, VirtioInterrupt, WorkerError, read_config_bytes, take_queues,
};
use crate::image::{DiskImage, ImageError, ImageFormat};
use crate::image_lock::{ImageAccess, ImageLockError, lock_image, unlock_image};
use crate::seccomp::WorkerKind;

/// Size of the device's only queue.
pub const QUEUE_SIZE: u16 = 256;
/// Data descriptors per request at most (`seg_max`): the queue minus header and status.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// Bytes per data descriptor at most (`size_max`).
pub const SIZE_MAX: u32 = 1 << 20;
/// Sectors per discard or write-zeroes range at most (just under 4 GiB).
pub const MAX_RANGE_SECTORS: u32 = (u32::MAX >> 9) - 1;
/// Ranges per discard or write-zeroes request at most.
pub const MAX_RANGES: u32 = 32;
/// Discard granularity hint, in sectors (4 KiB).
const DISCARD_ALIGNMENT: u32 = 8;
/// Length of `struct virtio_blk_config` up to `write_zeroes_may_unmap` and its padding.
const CONFIG_LEN: usize = 60;

/// How to set up a [`Block`] device.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BlockConfig {
    /// Disk image or block device.
    pub path: PathBuf,
    /// Open read-only and offer `VIRTIO_BLK_F_RO`.
    pub readonly: bool,
    /// GET_ID answer, at most 20 bytes; default: the file name.
    pub id: Option<String>,
    /// I/O engine.
    pub engine: Engine,
    /// Image format; `None`: by the image's magic (a qcow2 header, else raw).
    pub format: Option<ImageFormat>,
}

/// Errors creating a [`Block`] device.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The disk cannot be opened for writing (its file or file system is read-only to us).
    #[error("Cannot open disk {path} for writing (readonly=on gives the guest a read-only disk)")]
    OpenForWriting {
        /// The disk.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Another VM (or another disk of this one) uses the image in a way that excludes this.
    #[error("Cannot lock the disk image")]
    Locked(#[source] ImageLockError),
    /// The disk cannot be opened.
    #[error("Cannot open disk {path}")]
    Open {
        /// The disk.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The disk image is invalid or unsupported (the error names the image).
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The disk size cannot be read.
    #[error("Cannot get the size of disk {path}")]
    Size {
        /// The disk.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The configured id does not fit GET_ID.
    #[error("Disk id {0:?} is longer than {ID_BYTES} bytes")]
    IdTooLong(String),
    /// A second descriptor of the disk file (for [`DiskSync`]) cannot be made.
    #[error("Cannot duplicate the file descriptor of disk {path}")]
    Duplicate {
        /// The disk.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// `fdatasync` failed: writes may not be on stable storage.
    #[error("Cannot flush disk {path}")]
    Flush {
        /// The disk.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// A writable disk's file, for making its completed writes durable from outside the device
/// (the launcher, before the process exits). The device's worker flushes by itself when it
/// stops; this is for callers that want the result.
#[derive(Debug)]
pub struct DiskSync {
    path: PathBuf,
    file: File,
    /// The image locks are handed over ([`DiskSync::release_lock`]); shared with the device,
    /// whose worker then writes nothing to the image.
    handed_over: Arc<AtomicBool>,
}

impl DiskSync {
    /// The disk's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Hands the image over to another VMM (a live migration's destination, once the VM is
    /// paused and the disk flushed): drops the device's image locks, which belong to the file
    /// description this handle shares with the device. The VM must not run here again
    /// before [`DiskSync::reacquire_lock`] succeeds.
    pub fn release_lock(&self) {
        self.handed_over.store(true, Ordering::SeqCst);
        unlock_image(&self.file, ImageAccess::Write);
    }

    /// Takes the image locks back after [`DiskSync::release_lock`] (a migration that failed);
    /// refused while another VMM has the image for writing. Does nothing when they were not
    /// released.
    pub fn reacquire_lock(&self) -> Result<(), BlockError> {
        if self.handed_over.load(Ordering::SeqCst) {
            lock_image(&self.file, &self.path, ImageAccess::Write).map_err(BlockError::Locked)?;
            self.handed_over.store(false, Ordering::SeqCst);
        }
        Ok(())
    }

    /// Makes every write completed so far durable (`fdatasync`; the file is the device's, so
    /// it covers the worker's writes too).
    pub fn sync(&self) -> Result<(), BlockError> {
        self.file.sync_data().map_err(|source| BlockError::Flush {
            path: self.path.clone(),
            source,
        })
    }
}

/// Per-device statistics. Counts completed requests; `errors` counts every request answered
/// with a status other than OK (malformed, unsupported or failed).
#[derive(Debug, Default)]
pub struct BlockCounters {
    /// Reads completed.
    pub reads: AtomicU64,
    /// Writes completed.
    pub writes: AtomicU64,
    /// Bytes read by completed reads.
    pub bytes_read: AtomicU64,
    /// Bytes written by completed writes.
    pub bytes_written: AtomicU64,
    /// Flushes completed.
    pub flushes: AtomicU64,
    /// Requests answered IOERR or UNSUPP.
    pub errors: AtomicU64,
    /// Of those, the ones the host failed (ENOSPC, EIO, a file shorter than the disk): the
    /// guest's request was valid.
    pub host_errors: AtomicU64,
}

impl BlockCounters {
    /// Loads a counter (relaxed: statistics only).
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// The virtio-blk device.
#[derive(Debug)]
pub struct Block {
    file: File,
    path: PathBuf,
    readonly: bool,
    engine: Engine,
    id: [u8; ID_BYTES],
    capacity: u64,
    format: ImageFormat,
    /// The qcow2 image, between activations; `None` for a raw disk.
    image: Option<ImageSlot>,
    config: [u8; CONFIG_LEN],
    acked: u64,
    counters: Arc<BlockCounters>,
    /// See [`DiskContext::handed_over`].
    handed_over: Arc<AtomicBool>,
    worker: DeviceWorker,
}

impl Block {
    /// Opens the disk of `config`.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        let BlockConfig {
            path,
            readonly,
            id,
            engine,
            format,
        } = config;
        let id = device_id(&path, id.as_deref())?;
        let opened = DiskImage::open(&path, !readonly, format).map_err(|e| match e {
            // The file is there but not writable: say that readonly=on would do.
            ImageError::Open { path, source }
                if !readonly
                    && matches!(
                        source.raw_os_error(),
                        Some(libc::EACCES | libc::EPERM | libc::EROFS)
                    ) =>
            {
                BlockError::OpenForWriting { path, source }
            }
            other => BlockError::Image(other),
        })?;
        let (mut file, image) = match opened {
            DiskImage::Qcow2(image) => {
                let file = image
                    .storage()
                    .file()
                    .ok_or_else(|| BlockError::Open {
                        path: path.clone(),
                        source: std::io::ErrorKind::Unsupported.into(),
                    })?
                    .try_clone()
                    .map_err(|source| BlockError::Duplicate {
                        path: path.clone(),
                        source,
                    })?;
                (file, Some(image))
            }
            raw => (
                raw.into_raw_file().map_err(|_| BlockError::Open {
                    path: path.clone(),
                    source: std::io::ErrorKind::Unsupported.into(),
                })?,
                None,
            ),
        };
        let access = if readonly {
            ImageAccess::Read
        } else {
            ImageAccess::Write
        };
        // The image's own descriptor (a qcow2 image's shares it): QEMU's locks, so that a
        // second writer is refused whichever VMM it is.
        lock_image(&file, &path, access).map_err(BlockError::Locked)?;
        let size = match &image {
            Some(image) => image.virtual_size(),
            // lseek works for block devices too, whose metadata length is 0.
            None => file
                .seek(SeekFrom::End(0))
                .map_err(|source| BlockError::Size {
                    path: path.clone(),
                    source,
                })?,
        };
        if !size.is_multiple_of(SECTOR_SIZE) {
            log::warn!(
                "virtio-blk: {} is {size} bytes, not a multiple of {SECTOR_SIZE}; the last {} bytes are not visible",
                path.display(),
                size % SECTOR_SIZE
            );
        }
        let capacity = size / SECTOR_SIZE;
        let engine = resolve_engine(engine, &file);
        Ok(Self {
            file,
            path,
            readonly,
            engine,
            id,
            capacity,
            format: if image.is_some() {
                ImageFormat::Qcow2
            } else {
                ImageFormat::Raw
            },
            image: image.map(|image| Arc::new(std::sync::Mutex::new(Some(image)))),
            config: config_space(capacity),
            acked: 0,
            counters: Arc::new(BlockCounters::default()),
            handed_over: Arc::default(),
            worker: DeviceWorker::new(worker_name(&id)),
        })
    }

    /// Disk size in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The engine in use (io_uring may have fallen back to synchronous I/O).
    pub fn engine(&self) -> Engine {
        self.engine
    }

    /// The image format.
    pub fn format(&self) -> ImageFormat {
        self.format
    }

    /// The GET_ID answer.
    pub fn id(&self) -> &[u8; ID_BYTES] {
        &self.id
    }

    /// The disk's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether the disk is read-only.
    pub fn readonly(&self) -> bool {
        self.readonly
    }

    /// A handle that flushes this disk from any thread; `None` for a read-only disk.
    pub fn disk_sync(&self) -> Result<Option<DiskSync>, BlockError> {
        if self.readonly {
            return Ok(None);
        }
        let file = self
            .file
            .try_clone()
            .map_err(|source| BlockError::Duplicate {
                path: self.path.clone(),
                source,
            })?;
        Ok(Some(DiskSync {
            path: self.path.clone(),
            file,
            handed_over: self.handed_over.clone(),
        }))
    }

    /// Request statistics, shared with the worker.
    pub fn counters(&self) -> Arc<BlockCounters> {
        self.counters.clone()
    }

    /// The limits requests are checked against (what the configuration space announces).
    pub fn limits(&self) -> RequestLimits {
        RequestLimits {
            capacity: self.capacity,
            seg_max: SEG_MAX,
            size_max: SIZE_MAX,
            max_discard_sectors: MAX_RANGE_SECTORS,
            max_discard_seg: MAX_RANGES,
            max_write_zeroes_sectors: MAX_RANGE_SECTORS,
            max_write_zeroes_seg: MAX_RANGES,
        }
    }

    /// Builds the worker for `queue` without starting a thread: [`VirtioDevice::activate`]
    /// runs it on the device's worker thread; tests and benchmarks drive it directly. The
    /// handler's queue eventfd is `queue.notify`; an io_uring backend adds a completion
    /// eventfd ([`BlockHandler::completion_fd`]) that the handler registers itself when run as
    /// an event subscriber.
    pub fn handler<I: ?Sized + VirtioInterrupt>(
        &self,
        mem: GuestMemoryMmap,
        queue: ActiveQueue,
        interrupt: Arc<I>,
    ) -> std::io::Result<BlockHandler<I>> {
        let engine = open_backend(self.engine, self.file.try_clone()?);
        let backend: Box<dyn DiskBackend> = match &self.image {
            Some(slot) => Box::new(Qcow2Backend::new(slot.clone(), engine)?),
            None => engine,
        };
        let disk = DiskContext {
            limits: self.limits(),
            read_only: self.readonly,
            id: self.id,
            counters: self.counters.clone(),
            path: self.path.clone(),
            handed_over: self.handed_over.clone(),
        };
        Ok(BlockHandler::new(
            mem,
            queue.queue,
            queue.notify,
            interrupt,
            backend,
            disk,
        ))
    }
}

fn worker_name(id: &[u8; ID_BYTES]) -> String {
    format!(
        "virtio-blk-{}",
        String::from_utf8_lossy(id).trim_end_matches('\0')
    )
}

/// Checks once that io_uring works, so a device reports the engine it will really use.
fn resolve_engine(wanted: Engine, file: &File) -> Engine {
    if wanted != Engine::IoUring {
        return wanted;
    }
    match file.try_clone().and_then(IoUringEngine::new) {
        Ok(_) => Engine::IoUring,
        Err(e) => {
            log::warn!("virtio-blk: io_uring unavailable, using synchronous I/O: {e}");
            Engine::Sync
        }
    }
}

/// The GET_ID answer: the configured id or the disk's file name, NUL-padded.
fn device_id(path: &std::path::Path, id: Option<&str>) -> Result<[u8; ID_BYTES], BlockError> {
    let mut out = [0u8; ID_BYTES];
    let bytes = match id {
        Some(id) if id.len() > ID_BYTES => return Err(BlockError::IdTooLong(id.to_string())),
        Some(id) => id.as_bytes(),
        None => path
            .file_name()
            .map(|n| n.as_encoded_bytes())
            .unwrap_or_default(),
    };
    let n = bytes.len().min(ID_BYTES);
    out[..n].copy_from_slice(&bytes[..n]);
    Ok(out)
}

/// `struct virtio_blk_config`, little-endian.
fn config_space(capacity: u64) -> [u8; CONFIG_LEN] {
    let mut c = [0u8; CONFIG_LEN];
    let mut put =
        |offset: usize, bytes: &[u8]| c[offset..offset + bytes.len()].copy_from_slice(bytes);
    put(0, &capacity.to_le_bytes());
    put(8, &SIZE_MAX.to_le_bytes());
    put(12, &SEG_MAX.to_le_bytes());
    // geometry (16..20) and topology (24..32) are not offered: zeros.
    #[allow(clippy::cast_possible_truncation, reason = "512")]
    let block_size = SECTOR_SIZE as u32;
    put(20, &block_size.to_le_bytes());
    // Writes land in the host page cache until a FLUSH.
    put(32, &[1]);
    put(34, &1u16.to_le_bytes());
    put(36, &MAX_RANGE_SECTORS.to_le_bytes());
    put(40, &MAX_RANGES.to_le_bytes());
    put(44, &DISCARD_ALIGNMENT.to_le_bytes());
    put(48, &MAX_RANGE_SECTORS.to_le_bytes());
    put(52, &MAX_RANGES.to_le_bytes());
    // write_zeroes_may_unmap: the UNMAP flag is honoured with a hole punch.
    put(56, &[1]);
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut features = VIRTIO_F_VERSION_1
            | 1 << VIRTIO_RING_F_EVENT_IDX
            | 1 << VIRTIO_BLK_F_SEG_MAX
            | 1 << VIRTIO_BLK_F_SIZE_MAX
            | 1 << VIRTIO_BLK_F_BLK_SIZE
            | 1 << VIRTIO_BLK_F_FLUSH;
        if self.readonly {
            features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            features |= 1 << VIRTIO_BLK_F_DISCARD | 1 << VIRTIO_BLK_F_WRITE_ZEROES;
        }
        features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked = features & self.features();
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `writeback` is writable, and only with CONFIG_WCE, which is not offered.
        log::debug!(
            "virtio-blk: ignoring a {}-byte config write at {offset:#x}",
            data.len()
        );
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<dyn VirtioInterrupt>,
        queues: Vec<ActiveQueue>,
    ) -> Result<(), ActivateError> {
        let [queue] = take_queues(&self.worker, queues)?;
        let handler = self
            .handler(mem, queue, interrupt)
            .map_err(ActivateError::Worker)?;
        self.worker.activate(handler).map_err(ActivateError::Run)?;
        log::debug!(
            "virtio-blk: {} active ({:?} engine)",
            self.path.display(),
            self.engine
        );
        Ok(())
    }

    fn reset(&mut self) {
        // Stopping the worker drops its handler, which completes the I/O in flight and flushes
        // the disk if it was written since the last FLUSH. Dropping the device (VM teardown)
        // does the same through the worker handle's Drop.
        self.worker.stop();
        self.acked = 0;
    }

    fn start_worker_thread(&mut self, seccomp: bool) -> Result<(), WorkerError> {
        let kind = match self.engine {
            Engine::Sync => WorkerKind::BlockSync,
            Engine::IoUring => WorkerKind::BlockIoUring,
        };
        self.worker.start_thread(kind, seccomp)
    }

    fn worker(&self) -> Option<&DeviceWorker> {
        Some(&self.worker)
    }

    fn worker_mut(&mut self) -> Option<&mut DeviceWorker> {
        Some(&mut self.worker)
    }

    fn save_state(&self) -> Option<VirtioDeviceState> {
        Some(VirtioDeviceState::Block(self.persist()))
    }

    fn restore_state(&mut self, state: &VirtioDeviceState) -> Result<(), RestoreError> {
        self.restore(state)
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_io;
#[cfg(test)]
mod tests_parse;
#[cfg(test)]
mod tests_qcow2;
#[cfg(test)]
mod tests_stop;
