//! Where virtio-net frames go and come from: a [`NetBackend`] moves one frame at a time, each
//! preceded by its 12-byte `virtio_net_hdr_v1`, between guest buffers and the host. [`Tap`] is
//! the real one; [`SocketBackend`] (a Unix datagram socket pair) serves tests and benchmarks.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::marker::PhantomData;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use vm_memory::VolatileSlice;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

/// Length of the header before every frame (`struct virtio_net_hdr_v1`, with `num_buffers`).
pub const VNET_HDR_LEN: usize =
    std::mem::size_of::<virtio_bindings::virtio_net::virtio_net_hdr_v1>();

const TUN_DEVICE: &str = "/dev/net/tun";

/// Reusable storage for [`IoBufs`], kept by a handler between frames so the data path does not
/// allocate.
#[derive(Default)]
pub struct IovecCache(Vec<libc::iovec>);

// SAFETY: an `IovecCache` is only ever at rest empty (`IoBufs::into_cache` clears it), so no
// pointer it could hold crosses threads; the vector's allocation itself is plain memory.
unsafe impl Send for IovecCache {}

impl std::fmt::Debug for IovecCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IovecCache")
            .field("capacity", &self.0.capacity())
            .finish()
    }
}

/// A frame's buffers, in order: guest memory or host bytes, borrowed for `'a`. Backends pass
/// them to `readv`/`writev` through [`IoBufs::iovecs`].
pub struct IoBufs<'a> {
    iovs: Vec<libc::iovec>,
    len: usize,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl std::fmt::Debug for IoBufs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IoBufs")
            .field("buffers", &self.iovs.len())
            .field("len", &self.len)
            .finish()
    }
}

impl<'a> IoBufs<'a> {
    /// Empty buffers reusing `cache`'s allocation.
    pub fn new(cache: IovecCache) -> Self {
        let mut iovs = cache.0;
        iovs.clear();
        Self {
            iovs,
            len: 0,
            _borrow: PhantomData,
        }
    }

    /// Appends a slice of guest memory (or of host memory: any bitmap).
    pub fn push_slice<B: vm_memory::bitmap::BitmapSlice>(&mut self, slice: &VolatileSlice<'a, B>) {
        if slice.is_empty() {
            return;
        }
        self.iovs.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: slice.len(),
        });
        self.len += slice.len();
    }

    /// Appends host bytes.
    pub fn push_bytes(&mut self, bytes: &'a mut [u8]) {
        self.push_slice(&VolatileSlice::from(bytes));
    }

    /// Total length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No buffer at all.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffers, valid for reads and writes of their lengths while `self` lives.
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iovs
    }

    /// Copies `bytes` into the buffers from `offset` on, as far as they go; returns how many
    /// bytes were copied. Never writes past a buffer.
    pub fn write_at(&self, offset: usize, bytes: &[u8]) -> usize {
        let mut skip = offset;
        let mut src = bytes;
        for iov in &self.iovs {
            if src.is_empty() {
                break;
            }
            if skip >= iov.iov_len {
                skip -= iov.iov_len;
                continue;
            }
            let n = (iov.iov_len - skip).min(src.len());
            // SAFETY: the iovec was pushed from a `VolatileSlice` or a `&mut [u8]` borrowed for
            // `'a`, which `self` does not outlive, so it is valid for writes of `iov_len` bytes;
            // `skip + n <= iov_len`.
            let dst = unsafe { VolatileSlice::new(iov.iov_base.cast::<u8>().add(skip), n) };
            dst.copy_from(&src[..n]);
            src = &src[n..];
            skip = 0;
        }
        bytes.len() - src.len()
    }

    /// Fills `out` from the start of the buffers, as far as they go; returns how many bytes
    /// were copied.
    pub fn read_into(&self, out: &mut [u8]) -> usize {
        let mut at = 0;
        for iov in &self.iovs {
            if at == out.len() {
                break;
            }
            let n = iov.iov_len.min(out.len() - at);
            // SAFETY: the iovec was pushed from a `VolatileSlice` or a `&mut [u8]` borrowed for
            // `'a`, which `self` does not outlive, so it is valid for reads of `iov_len >= n`
            // bytes.
            let src = unsafe { VolatileSlice::new(iov.iov_base.cast::<u8>(), n) };
            src.copy_to(&mut out[at..at + n]);
            at += n;
        }
        at
    }

    /// Appends all of `other`'s buffers.
    pub fn extend_from(&mut self, other: &IoBufs<'a>) {
        self.iovs.extend_from_slice(&other.iovs);
        self.len += other.len;
    }

    /// Gives the allocation back for the next frame.
    pub fn into_cache(mut self) -> IovecCache {
        self.iovs.clear();
        IovecCache(std::mem::take(&mut self.iovs))
    }
}

/// A source and sink of frames, each preceded by a [`VNET_HDR_LEN`]-byte `virtio_net_hdr_v1`.
/// Non-blocking: calls that cannot proceed fail with [`io::ErrorKind::WouldBlock`].
pub trait NetBackend: Send + std::fmt::Debug {
    /// Reads the next frame (header first) into `bufs`; returns its length. A frame longer than
    /// `bufs` is truncated (the device always offers more room than the largest frame).
    fn read_frame(&mut self, bufs: &IoBufs<'_>) -> io::Result<usize>;

    /// Writes one frame (header first) gathered from `bufs`; returns the bytes written.
    fn write_frame(&mut self, bufs: &IoBufs<'_>) -> io::Result<usize>;

    /// The descriptor to poll: readable when a frame can be read, writable when one can be
    /// written.
    fn raw_fd(&self) -> RawFd;

    /// Sets which offloads (`TUN_F_*`) frames read from the backend may carry.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;

    /// Another handle on the same backend (each activation of the device gets one).
    fn try_clone(&self) -> io::Result<Box<dyn NetBackend>>;
}

/// The iovec count for `readv`/`writev` (a guest chain's descriptors, bounded by the ring).
fn iov_count(iovs: &[libc::iovec]) -> io::Result<libc::c_int> {
    libc::c_int::try_from(iovs.len()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn readv(fd: RawFd, bufs: &IoBufs<'_>) -> io::Result<usize> {
    let iovs = bufs.iovecs();
    let count = iov_count(iovs)?;
    loop {
        // One buffer goes through `read`: cheaper than `readv` (no iovec array to import).
        let n = match iovs {
            // SAFETY: the iovec points to memory valid for writes of its length for as long as
            // `bufs` is borrowed; the kernel writes at most that much.
            [one] => unsafe { libc::read(fd, one.iov_base, one.iov_len) },
            // SAFETY: every iovec of `bufs` points to memory valid for writes of its length for
            // as long as `bufs` is borrowed; the kernel writes at most that much.
            _ => unsafe { libc::readv(fd, iovs.as_ptr(), count) },
        };
        if n >= 0 {
            return Ok(n.unsigned_abs());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

fn writev(fd: RawFd, bufs: &IoBufs<'_>) -> io::Result<usize> {
    let iovs = bufs.iovecs();
    let count = iov_count(iovs)?;
    loop {
        // One buffer goes through `write`: cheaper than `writev`.
        let n = match iovs {
            // SAFETY: the iovec points to memory valid for reads of its length for as long as
            // `bufs` is borrowed; the kernel only reads it.
            [one] => unsafe { libc::write(fd, one.iov_base, one.iov_len) },
            // SAFETY: every iovec of `bufs` points to memory valid for reads of its length for
            // as long as `bufs` is borrowed; the kernel only reads it.
            _ => unsafe { libc::writev(fd, iovs.as_ptr(), count) },
        };
        if n >= 0 {
            return Ok(n.unsigned_abs());
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// Errors opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name is empty or longer than an interface name can be.
    #[error("Invalid tap name {0:?}")]
    InvalidName(String),
    /// No interface has this name (in this network namespace).
    #[error("Tap {0} does not exist")]
    NotFound(String),
    /// `/dev/net/tun` cannot be opened.
    #[error("Cannot open {TUN_DEVICE}")]
    TunDevice(#[source] io::Error),
    /// The tap belongs to another user or creating one needs CAP_NET_ADMIN.
    #[error("No permission to open tap {name}")]
    PermissionDenied {
        /// The tap.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The interface exists but is not a tap.
    #[error("{name} is not a tap device")]
    NotATap {
        /// The interface.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another process has the tap open.
    #[error("Tap {name} is in use")]
    Busy {
        /// The tap.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Attaching to or configuring the tap failed otherwise.
    #[error("Cannot set up tap {name}")]
    Setup {
        /// The tap.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A tap interface opened with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, non-blocking, with a
/// 12-byte vnet header.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens the existing tap `name` (a tap created beforehand, e.g. by KubeVirt or
    /// `ip tuntap add`). A multi-queue tap is opened as one queue.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let cname = interface_name(name)?;
        // SAFETY: `cname` is a valid NUL-terminated string.
        if unsafe { libc::if_nametoindex(cname.as_ptr()) } == 0 {
            return Err(TapError::NotFound(name.to_string()));
        }
        Self::attach(name)
    }

    /// Opens the tap `name`, creating it (needs CAP_NET_ADMIN) if it does not exist. A tap
    /// created here disappears when its last descriptor is closed.
    pub fn create(name: &str) -> Result<Self, TapError> {
        interface_name(name)?;
        Self::attach(name)
    }

    fn attach(name: &str) -> Result<Self, TapError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(TapError::TunDevice)?;
        let flags = libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR;
        let mut result = set_iff(&file, name, flags);
        if matches!(&result, Err(e) if e.raw_os_error() == Some(libc::EINVAL)) {
            // An existing multi-queue tap only accepts IFF_MULTI_QUEUE attachments.
            result = set_iff(&file, name, flags | libc::IFF_MULTI_QUEUE);
        }
        result.map_err(|source| {
            let name = name.to_string();
            match source.raw_os_error() {
                Some(libc::EPERM | libc::EACCES) => TapError::PermissionDenied { name, source },
                Some(libc::EINVAL) => TapError::NotATap { name, source },
                Some(libc::EBUSY) => TapError::Busy { name, source },
                _ => TapError::Setup { name, source },
            }
        })?;
        #[allow(
            clippy::cast_possible_truncation,
            clippy::cast_possible_wrap,
            reason = "12 bytes"
        )]
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one c_int from the given reference.
        let ret = unsafe { ioctl_with_ref(&file, libc::TUNSETVNETHDRSZ as _, &hdr_len) };
        if ret < 0 {
            return Err(TapError::Setup {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(Self {
            file,
            name: name.to_string(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

fn interface_name(name: &str) -> Result<CString, TapError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ']) {
        return Err(TapError::InvalidName(name.to_string()));
    }
    CString::new(name).map_err(|_| TapError::InvalidName(name.to_string()))
}

fn set_iff(file: &File, name: &str, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: `ifreq` is plain old data for which all-zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *dst = libc::c_char::from_ne_bytes([src]);
    }
    req.ifr_ifru.ifru_flags =
        libc::c_short::try_from(flags).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: TUNSETIFF reads and updates the `ifreq` it is given, which lives on this frame.
    let ret = unsafe { ioctl_with_mut_ref(file, libc::TUNSETIFF as _, &mut req) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn read_frame(&mut self, bufs: &IoBufs<'_>) -> io::Result<usize> {
        readv(self.file.as_raw_fd(), bufs)
    }

    fn write_frame(&mut self, bufs: &IoBufs<'_>) -> io::Result<usize> {
        writev(self.file.as_raw_fd(), bufs)
    }

    fn raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no memory of ours.
        let ret = unsafe {
            ioctl_with_val(
                &self.file,
                libc::TUNSETOFFLOAD as _,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn try_clone(&self) -> io::Result<Box<dyn NetBackend>> {
        Ok(Box::new(Self {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        }))
    }
}

/// One end of a Unix datagram socket pair; each datagram is one header + frame. For tests and
/// benchmarks: the other end plays the network.
#[derive(Debug)]
pub struct SocketBackend {
    sock: OwnedFd,
    offload: Arc<AtomicU32>,
}

impl SocketBackend {
    /// A connected pair: the device's end and the network's (both non-blocking).
    pub fn pair() -> io::Result<(Self, UnixDatagram)> {
        let (ours, peer) = UnixDatagram::pair()?;
        ours.set_nonblocking(true)?;
        peer.set_nonblocking(true)?;
        Ok((
            Self {
                sock: OwnedFd::from(ours),
                offload: Arc::new(AtomicU32::new(0)),
            },
            peer,
        ))
    }

    /// The offloads last set with [`NetBackend::set_offload`] (on any handle).
    pub fn offload(&self) -> u32 {
        self.offload.load(Ordering::SeqCst)
    }

    /// Another handle on the same socket, e.g. to keep watching [`SocketBackend::offload`]
    /// after handing one to the device.
    pub fn duplicate(&self) -> io::Result<Self> {
        Ok(Self {
            sock: self.sock.try_clone()?,
            offload: self.offload.clone(),
        })
    }
}

impl NetBackend for SocketBackend {
    fn read_frame(&mut self, bufs: &IoBufs<'_>) -> io::Result<usize> {
        readv(self.sock.as_raw_fd(), bufs)
    }

    fn write_frame(&mut self, bufs: &IoBufs<'_>) -> io::Result<usize> {
        writev(self.sock.as_raw_fd(), bufs)
    }

    fn raw_fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.offload.store(flags, Ordering::SeqCst);
        Ok(())
    }

    fn try_clone(&self) -> io::Result<Box<dyn NetBackend>> {
        Ok(Box::new(self.duplicate()?))
    }
}
