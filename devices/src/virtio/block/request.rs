//! Parsing a virtio-blk descriptor chain (virtio 1.x §5.2.6) into a [`BlockRequest`].
//!
//! Everything here distrusts the guest: directions, lengths, sector ranges and addresses are
//! all checked before any I/O is started. Nothing here knows about files.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::super::GuestMemoryMmap;
use super::super::guest_view::GuestView;

// The status byte's values (virtio-bindings has them as `u32`).
#[allow(
    clippy::cast_possible_truncation,
    reason = "virtio-blk statuses are 0 to 2"
)]
pub(crate) const STATUS_OK: u8 = VIRTIO_BLK_S_OK as u8;
#[allow(
    clippy::cast_possible_truncation,
    reason = "virtio-blk statuses are 0 to 2"
)]
pub(crate) const STATUS_IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
#[allow(
    clippy::cast_possible_truncation,
    reason = "virtio-blk statuses are 0 to 2"
)]
const STATUS_UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

/// The guest memory accesses parsing needs: through vm-memory, or through a [`GuestView`].
trait GuestAccess {
    fn mem(&self) -> &GuestMemoryMmap;
    /// Whether `addr..addr + len` is guest memory.
    fn in_memory(&self, addr: GuestAddress, len: u32) -> bool;
    /// The request header at `addr`, if it is guest memory.
    fn read_header(&self, addr: GuestAddress) -> Option<[u8; HEADER_SIZE as usize]>;
}

impl GuestAccess for GuestMemoryMmap {
    fn mem(&self) -> &GuestMemoryMmap {
        self
    }

    fn in_memory(&self, addr: GuestAddress, len: u32) -> bool {
        in_memory(self, addr, len)
    }

    fn read_header(&self, addr: GuestAddress) -> Option<[u8; HEADER_SIZE as usize]> {
        let mut raw = [0u8; HEADER_SIZE as usize];
        read_guest(self, addr, &mut raw).then_some(raw)
    }
}

impl GuestAccess for GuestView {
    fn mem(&self) -> &GuestMemoryMmap {
        GuestView::mem(self)
    }

    fn in_memory(&self, addr: GuestAddress, len: u32) -> bool {
        GuestView::in_memory(self, addr, len)
    }

    fn read_header(&self, addr: GuestAddress) -> Option<[u8; HEADER_SIZE as usize]> {
        self.read_array(addr)
    }
}

/// Sector size of the virtio-blk protocol, whatever the host's block size.
pub const SECTOR_SIZE: u64 = 512;
/// Size of the request header (`struct virtio_blk_outhdr`).
pub const HEADER_SIZE: u32 = 16;
/// Size of one discard / write-zeroes range (`struct virtio_blk_discard_write_zeroes`).
pub const RANGE_SIZE: u32 = 16;
/// Bytes of the GET_ID answer.
pub const ID_BYTES: usize = virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES as usize;

/// The command of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    /// Read sectors into the guest.
    In,
    /// Write guest data to sectors.
    Out,
    /// Make previous writes durable.
    Flush,
    /// Return the device id string.
    GetId,
    /// Deallocate sector ranges.
    Discard,
    /// Zero sector ranges.
    WriteZeroes,
    /// A type this device does not implement.
    Unsupported(u32),
}

impl RequestType {
    /// The request's name in messages (`VIRTIO_BLK_T_*`, lower case).
    pub fn name(self) -> &'static str {
        match self {
            Self::In => "read",
            Self::Out => "write",
            Self::Flush => "flush",
            Self::GetId => "get-id",
            Self::Discard => "discard",
            Self::WriteZeroes => "write-zeroes",
            Self::Unsupported(_) => "unsupported request",
        }
    }
}

impl From<u32> for RequestType {
    fn from(value: u32) -> Self {
        match value {
            VIRTIO_BLK_T_IN => Self::In,
            VIRTIO_BLK_T_OUT => Self::Out,
            VIRTIO_BLK_T_FLUSH => Self::Flush,
            VIRTIO_BLK_T_GET_ID => Self::GetId,
            VIRTIO_BLK_T_DISCARD => Self::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => Self::WriteZeroes,
            other => Self::Unsupported(other),
        }
    }
}

impl RequestType {
    /// Whether the request changes the disk (refused on a read-only device).
    pub fn writes(self) -> bool {
        matches!(self, Self::Out | Self::Discard | Self::WriteZeroes)
    }
}

/// One validated range of a DISCARD or WRITE_ZEROES request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectorRange {
    /// First sector.
    pub sector: u64,
    /// Number of sectors (not zero).
    pub num_sectors: u32,
    /// WRITE_ZEROES only: the device may deallocate the range.
    pub unmap: bool,
}

impl SectorRange {
    /// Byte offset of the range on the disk.
    pub fn offset(&self) -> u64 {
        self.sector * SECTOR_SIZE
    }

    /// Length of the range in bytes.
    pub fn len(&self) -> u64 {
        u64::from(self.num_sectors) * SECTOR_SIZE
    }

    /// Whether the range is empty (never true for a parsed range).
    pub fn is_empty(&self) -> bool {
        self.num_sectors == 0
    }
}

/// Limits a request is checked against: the device's geometry and what its configuration
/// space announces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RequestLimits {
    /// Disk size in 512-byte sectors.
    pub capacity: u64,
    /// Data descriptors per request at most.
    pub seg_max: u32,
    /// Bytes per IN/OUT data descriptor at most.
    pub size_max: u32,
    /// Sectors per discard range at most.
    pub max_discard_sectors: u32,
    /// Discard ranges per request at most.
    pub max_discard_seg: u32,
    /// Sectors per write-zeroes range at most.
    pub max_write_zeroes_sectors: u32,
    /// Write-zeroes ranges per request at most.
    pub max_write_zeroes_seg: u32,
}

/// Why a descriptor chain is not a valid request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The chain has no descriptor the status can be written to.
    #[error("No device-writable status descriptor")]
    NoStatus,
    /// The first descriptor is not a device-readable 16-byte header.
    #[error("Header descriptor is not a device-readable {HEADER_SIZE}-byte buffer")]
    BadHeader,
    /// The status descriptor is not a single byte.
    #[error("Status descriptor is {0} bytes, not 1")]
    StatusLength(u32),
    /// A data descriptor goes the wrong way for the request type.
    #[error("Data descriptor has the wrong direction for {0:?}")]
    Direction(RequestType),
    /// More data descriptors than `seg_max`.
    #[error("More than {0} data descriptors")]
    TooManySegments(u32),
    /// An IN/OUT data descriptor is longer than `size_max`.
    #[error("Data descriptor of {0} bytes is over size_max")]
    SegmentTooLong(u32),
    /// The data length does not fit the request type.
    #[error("Data length {0} is invalid for the request")]
    DataLength(u64),
    /// The sectors are not all inside the disk.
    #[error("Sectors {sector}+{sectors} are outside the disk")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        sectors: u64,
    },
    /// A buffer is not inside guest memory.
    #[error("Buffer {addr:#x}+{len} is outside guest memory")]
    BadAddress {
        /// Guest address of the buffer.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A discard or write-zeroes range asks for more than the configuration allows.
    #[error("Range of {0} sectors is over the device limit")]
    RangeTooLong(u32),
    /// A discard or write-zeroes range is empty.
    #[error("Empty discard or write-zeroes range")]
    EmptyRange,
    /// Flags this device does not know (or UNMAP on a discard).
    #[error("Unsupported range flags {0:#x}")]
    RangeFlags(u32),
    /// The request type is not implemented.
    #[error("Unsupported request type {0}")]
    UnsupportedType(u32),
}

impl ParseError {
    /// The status byte the guest gets for this error.
    pub fn status(&self) -> u8 {
        match self {
            Self::UnsupportedType(_) | Self::RangeFlags(_) => STATUS_UNSUPP,
            _ => STATUS_IOERR,
        }
    }
}

/// A chain that could not be parsed, and where to report it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejectedRequest {
    /// Where the status byte goes; `None` when the chain has no usable status descriptor
    /// (then the chain is returned with nothing written).
    pub status_addr: Option<GuestAddress>,
    /// Why the chain was rejected.
    pub error: ParseError,
}

/// A validated virtio-blk request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockRequest {
    /// The command.
    pub request_type: RequestType,
    /// First sector (IN/OUT).
    pub sector: u64,
    /// Guest buffers of the data, in order (IN/OUT/GET_ID).
    pub data: Vec<(GuestAddress, u32)>,
    /// Total bytes of `data`.
    pub data_len: u32,
    /// DISCARD/WRITE_ZEROES ranges.
    pub ranges: Vec<SectorRange>,
    /// Where the status byte goes.
    pub status_addr: GuestAddress,
}

impl Default for BlockRequest {
    fn default() -> Self {
        Self {
            request_type: RequestType::Flush,
            sector: 0,
            data: Vec::new(),
            data_len: 0,
            ranges: Vec::new(),
            status_addr: GuestAddress(0),
        }
    }
}

/// Direction a data descriptor must have for a request type.
#[derive(Clone, Copy, PartialEq, Eq)]
enum DataDirection {
    DeviceWrites,
    DeviceReads,
    None,
}

fn data_direction(t: RequestType) -> DataDirection {
    match t {
        RequestType::In | RequestType::GetId => DataDirection::DeviceWrites,
        RequestType::Out | RequestType::Discard | RequestType::WriteZeroes => {
            DataDirection::DeviceReads
        }
        RequestType::Flush | RequestType::Unsupported(_) => DataDirection::None,
    }
}

impl BlockRequest {
    /// Parses `chain` into a new request.
    pub fn parse<C>(
        chain: C,
        mem: &GuestMemoryMmap,
        limits: &RequestLimits,
    ) -> Result<Self, RejectedRequest>
    where
        C: Iterator<Item = Descriptor>,
    {
        let mut req = Self::default();
        req.parse_into(chain, mem, limits)?;
        Ok(req)
    }

    /// Parses `chain` into `self`, reusing its buffers (the worker's hot path allocates
    /// nothing per request).
    pub fn parse_into<C>(
        &mut self,
        chain: C,
        mem: &GuestMemoryMmap,
        limits: &RequestLimits,
    ) -> Result<(), RejectedRequest>
    where
        C: Iterator<Item = Descriptor>,
    {
        self.parse_with(chain, mem, limits)
    }

    /// [`BlockRequest::parse_into`] through the worker's [`GuestView`] (same checks, fewer
    /// lookups).
    pub(crate) fn parse_in_view<C>(
        &mut self,
        chain: C,
        view: &GuestView,
        limits: &RequestLimits,
    ) -> Result<(), RejectedRequest>
    where
        C: Iterator<Item = Descriptor>,
    {
        self.parse_with(chain, view, limits)
    }

    #[inline]
    fn parse_with<C, M>(
        &mut self,
        mut chain: C,
        mem: &M,
        limits: &RequestLimits,
    ) -> Result<(), RejectedRequest>
    where
        C: Iterator<Item = Descriptor>,
        M: GuestAccess + ?Sized,
    {
        self.data.clear();
        self.ranges.clear();
        self.data_len = 0;
        self.sector = 0;

        let Some(header) = chain.next() else {
            return Err(reject(None, ParseError::NoStatus));
        };
        let raw_header = if !header.is_write_only() && header.len() == HEADER_SIZE {
            mem.read_header(header.addr())
        } else {
            None
        };
        let header_ok = raw_header.is_some();
        let (request_type, sector) = if let Some(raw_header) = raw_header {
            let (t, rest) = raw_header.split_at(4);
            let t = u32::from_le_bytes(t.try_into().unwrap_or_default());
            let sector = u64::from_le_bytes(rest[4..].try_into().unwrap_or_default());
            (RequestType::from(t), sector)
        } else {
            (RequestType::Unsupported(u32::MAX), 0)
        };
        self.request_type = request_type;
        self.sector = sector;
        let direction = data_direction(request_type);

        // Every descriptor but the last is data; the last is the status. The iterator is
        // bounded by virtio-queue (queue size, indirect table size), so walking to the end to
        // find the status is bounded too.
        let mut error: Option<ParseError> = None;
        let mut pending: Option<Descriptor> = None;
        let mut total: u64 = 0;
        let mut segments: u32 = 0;
        for desc in chain {
            let Some(data) = pending.replace(desc) else {
                continue;
            };
            if error.is_some() {
                continue;
            }
            segments += 1;
            if let Err(e) = self.check_data(&data, direction, segments, mem, limits) {
                error = Some(e);
                continue;
            }
            total += u64::from(data.len());
            self.data.push((data.addr(), data.len()));
        }

        let Some(status) = pending else {
            return Err(reject(None, ParseError::NoStatus));
        };
        if !status.is_write_only()
            || status.len() == 0
            || !mem.in_memory(status.addr(), status.len())
        {
            return Err(reject(None, ParseError::NoStatus));
        }
        let status_addr = status.addr().unchecked_add(u64::from(status.len()) - 1);
        self.status_addr = status_addr;
        let fail = |e| Err(reject(Some(status_addr), e));

        if !header_ok {
            return fail(ParseError::BadHeader);
        }
        if status.len() != 1 {
            return fail(ParseError::StatusLength(status.len()));
        }
        if let Some(e) = error {
            return fail(e);
        }
        // Descriptor lengths are u32 and a chain is at most 2^32 bytes (virtio-queue ends it
        // otherwise), but keep the sum checked rather than rely on that.
        let Ok(data_len) = u32::try_from(total) else {
            return fail(ParseError::DataLength(total));
        };
        self.data_len = data_len;

        match request_type {
            RequestType::In | RequestType::Out => {
                if !total.is_multiple_of(SECTOR_SIZE) {
                    return fail(ParseError::DataLength(total));
                }
                let sectors = total / SECTOR_SIZE;
                let in_range = sector
                    .checked_add(sectors)
                    .is_some_and(|end| end <= limits.capacity);
                if !in_range {
                    return fail(ParseError::OutOfRange { sector, sectors });
                }
            }
            RequestType::Flush => {
                if total != 0 {
                    return fail(ParseError::DataLength(total));
                }
            }
            RequestType::GetId => {}
            RequestType::Discard | RequestType::WriteZeroes => {
                if let Err(e) = self.parse_ranges(mem.mem(), limits) {
                    return fail(e);
                }
            }
            RequestType::Unsupported(t) => return fail(ParseError::UnsupportedType(t)),
        }
        Ok(())
    }

    fn check_data<M: GuestAccess + ?Sized>(
        &self,
        desc: &Descriptor,
        direction: DataDirection,
        segments: u32,
        mem: &M,
        limits: &RequestLimits,
    ) -> Result<(), ParseError> {
        let t = self.request_type;
        match direction {
            DataDirection::DeviceWrites if !desc.is_write_only() => {
                return Err(ParseError::Direction(t));
            }
            DataDirection::DeviceReads if desc.is_write_only() => {
                return Err(ParseError::Direction(t));
            }
            DataDirection::None => {
                return Err(match t {
                    RequestType::Unsupported(raw) => ParseError::UnsupportedType(raw),
                    _ => ParseError::DataLength(u64::from(desc.len())),
                });
            }
            _ => {}
        }
        if segments > limits.seg_max {
            return Err(ParseError::TooManySegments(limits.seg_max));
        }
        if matches!(t, RequestType::In | RequestType::Out) && desc.len() > limits.size_max {
            return Err(ParseError::SegmentTooLong(desc.len()));
        }
        if !mem.in_memory(desc.addr(), desc.len()) {
            return Err(ParseError::BadAddress {
                addr: desc.addr().0,
                len: desc.len(),
            });
        }
        Ok(())
    }

    /// Reads and checks the DISCARD/WRITE_ZEROES ranges carried in the data.
    fn parse_ranges(
        &mut self,
        mem: &GuestMemoryMmap,
        limits: &RequestLimits,
    ) -> Result<(), ParseError> {
        let (max_sectors, max_seg) = if self.request_type == RequestType::Discard {
            (limits.max_discard_sectors, limits.max_discard_seg)
        } else {
            (limits.max_write_zeroes_sectors, limits.max_write_zeroes_seg)
        };
        let total = self.data_len;
        if total == 0 || !total.is_multiple_of(RANGE_SIZE) || total / RANGE_SIZE > max_seg {
            return Err(ParseError::DataLength(u64::from(total)));
        }
        let allowed_flags = if self.request_type == RequestType::WriteZeroes {
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP
        } else {
            0
        };
        // A range may straddle descriptors: gather the bytes first (bounded by max_seg above).
        let mut raw = [0u8; RANGE_SIZE as usize];
        let mut filled = 0usize;
        for &(addr, len) in &self.data {
            let mut done = 0usize;
            while done < len as usize {
                let n = (raw.len() - filled).min(len as usize - done);
                mem.read_slice(
                    &mut raw[filled..filled + n],
                    addr.unchecked_add(done as u64),
                )
                .map_err(|_| ParseError::BadAddress { addr: addr.0, len })?;
                filled += n;
                done += n;
                if filled == raw.len() {
                    let range = decode_range(&raw, allowed_flags, max_sectors, limits)?;
                    self.ranges.push(range);
                    filled = 0;
                }
            }
        }
        Ok(())
    }
}

fn decode_range(
    raw: &[u8; RANGE_SIZE as usize],
    allowed_flags: u32,
    max_sectors: u32,
    limits: &RequestLimits,
) -> Result<SectorRange, ParseError> {
    let sector = u64::from_le_bytes(raw[0..8].try_into().unwrap_or_default());
    let num_sectors = u32::from_le_bytes(raw[8..12].try_into().unwrap_or_default());
    let flags = u32::from_le_bytes(raw[12..16].try_into().unwrap_or_default());
    if flags & !allowed_flags != 0 {
        return Err(ParseError::RangeFlags(flags));
    }
    if num_sectors == 0 {
        return Err(ParseError::EmptyRange);
    }
    if num_sectors > max_sectors {
        return Err(ParseError::RangeTooLong(num_sectors));
    }
    let in_range = sector
        .checked_add(u64::from(num_sectors))
        .is_some_and(|end| end <= limits.capacity);
    if !in_range {
        return Err(ParseError::OutOfRange {
            sector,
            sectors: u64::from(num_sectors),
        });
    }
    Ok(SectorRange {
        sector,
        num_sectors,
        unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
    })
}

/// Whether `addr..addr+len` is guest memory. The single-region lookup comes first: it is the
/// common case and this runs for every descriptor.
fn in_memory(mem: &GuestMemoryMmap, addr: GuestAddress, len: u32) -> bool {
    mem.get_slice(addr, len as usize).is_ok() || mem.check_range(addr, len as usize)
}

/// Reads `buf.len()` bytes at `addr`; false if they are not all guest memory.
fn read_guest(mem: &GuestMemoryMmap, addr: GuestAddress, buf: &mut [u8]) -> bool {
    match mem.get_slice(addr, buf.len()) {
        Ok(slice) => {
            slice.copy_to(buf);
            true
        }
        // Spanning two regions (or not memory at all).
        Err(_) => mem.read_slice(buf, addr).is_ok(),
    }
}

fn reject(status_addr: Option<GuestAddress>, error: ParseError) -> RejectedRequest {
    RejectedRequest { status_addr, error }
}
