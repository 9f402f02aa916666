//! Parser tests: limits on segments, lengths and discard / write-zeroes ranges, checked on
//! descriptor lists directly (no queue).

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    reason = "test fixtures use small known values"
)]

use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use vm_memory::{Bytes, GuestAddress};

use super::tests::*;
use super::*;

/// A request type, its ranges (sector, sectors, flags) and the expected error.
type RangeCase<'a> = (u32, &'a [(u64, u32, u32)], ParseError);

fn limits(seg_max: u32, size_max: u32) -> RequestLimits {
    RequestLimits {
        capacity: 128,
        seg_max,
        size_max,
        max_discard_sectors: 16,
        max_discard_seg: 2,
        max_write_zeroes_sectors: 16,
        max_write_zeroes_seg: 2,
    }
}

fn parse(
    mem: &GuestMemoryMmap,
    parts: &[(u64, u32, u32)],
    limits: &RequestLimits,
) -> Result<BlockRequest, RejectedRequest> {
    let descs: Vec<SplitDescriptor> = chain(0, parts)
        .into_iter()
        .map(SplitDescriptor::from)
        .collect();
    BlockRequest::parse(descs.into_iter(), mem, limits)
}

#[test]
fn more_data_descriptors_than_seg_max_are_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let mut parts = vec![(HDR, 16, R)];
    parts.extend((0..5).map(|i| (DATA + 512 * i, 512, W)));
    parts.push((STATUS, 1, W));
    let err = parse(&mem, &parts, &limits(4, 4096)).unwrap_err();
    assert_eq!(err.error, ParseError::TooManySegments(4));
    assert_eq!(err.status_addr, Some(GuestAddress(STATUS)));
    assert!(parse(&mem, &parts, &limits(5, 4096)).is_ok());
}

#[test]
fn data_descriptor_over_size_max_is_ioerr() {
    let mem = memory();
    write_header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
    let parts = [(HDR, 16, R), (DATA, 8192, W), (STATUS, 1, W)];
    let err = parse(&mem, &parts, &limits(4, 4096)).unwrap_err();
    assert_eq!(err.error, ParseError::SegmentTooLong(8192));
}

#[test]
fn data_lengths_summing_past_4_gib_are_rejected_without_overflow() {
    // Anonymous memory is reserved lazily: 2 GiB of address space costs nothing here.
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x8000_0000)]).unwrap();
    write_header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
    let big = 0x7000_0000;
    let parts = [
        (HDR, 16, R),
        (DATA, big, R),
        (DATA, big, R),
        (DATA, big, R),
        (STATUS, 1, W),
    ];
    let mut l = limits(8, u32::MAX);
    l.capacity = u64::MAX;
    let err = parse(&mem, &parts, &l).unwrap_err();
    assert_eq!(err.error, ParseError::DataLength(3 * u64::from(big)));
}

fn write_range(mem: &GuestMemoryMmap, addr: u64, sector: u64, num: u32, flags: u32) {
    mem.write_obj(sector.to_le(), GuestAddress(addr)).unwrap();
    mem.write_obj(num.to_le(), GuestAddress(addr + 8)).unwrap();
    mem.write_obj(flags.to_le(), GuestAddress(addr + 12))
        .unwrap();
}

#[test]
fn discard_and_write_zeroes_ranges_are_checked_against_the_limits() {
    let mem = memory();
    let l = limits(4, 4096);
    let range_req = |t: u32, ranges: &[(u64, u32, u32)]| {
        write_header(&mem, HDR, t, 0);
        for (i, &(sector, num, flags)) in ranges.iter().enumerate() {
            write_range(&mem, DATA + 16 * i as u64, sector, num, flags);
        }
        let len = 16 * ranges.len() as u32;
        parse(&mem, &[(HDR, 16, R), (DATA, len, R), (STATUS, 1, W)], &l)
    };
    let unmap = VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP;
    let ok = range_req(VIRTIO_BLK_T_WRITE_ZEROES, &[(0, 16, unmap), (100, 10, 0)]).unwrap();
    assert_eq!(ok.ranges.len(), 2);
    assert!(ok.ranges[0].unmap && !ok.ranges[1].unmap);
    let cases: [RangeCase<'_>; 7] = [
        (
            VIRTIO_BLK_T_DISCARD,
            &[(0, 17, 0)],
            ParseError::RangeTooLong(17),
        ),
        (
            VIRTIO_BLK_T_DISCARD,
            &[(0, 1, 0); 3],
            ParseError::DataLength(48),
        ),
        (
            VIRTIO_BLK_T_DISCARD,
            &[(120, 9, 0)],
            ParseError::OutOfRange {
                sector: 120,
                sectors: 9,
            },
        ),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[(u64::MAX, 1, 0)],
            ParseError::OutOfRange {
                sector: u64::MAX,
                sectors: 1,
            },
        ),
        (VIRTIO_BLK_T_DISCARD, &[(0, 0, 0)], ParseError::EmptyRange),
        (
            VIRTIO_BLK_T_DISCARD,
            &[(0, 1, unmap)],
            ParseError::RangeFlags(unmap),
        ),
        (
            VIRTIO_BLK_T_WRITE_ZEROES,
            &[(0, 1, 2)],
            ParseError::RangeFlags(2),
        ),
    ];
    for (t, ranges, expected) in cases {
        let err = range_req(t, ranges).unwrap_err();
        assert_eq!(err.error, expected, "type {t} ranges {ranges:?}");
    }
    assert_eq!(ParseError::RangeFlags(1).status(), S_UNSUPP);
    assert_eq!(ParseError::RangeTooLong(1).status(), S_IOERR);
    // A payload that is not a whole number of ranges.
    write_header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    let err = parse(&mem, &[(HDR, 16, R), (DATA, 20, R), (STATUS, 1, W)], &l).unwrap_err();
    assert_eq!(err.error, ParseError::DataLength(20));
}

#[test]
fn a_range_split_across_descriptors_is_read_whole() {
    let mem = memory();
    write_header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
    write_range(&mem, DATA, 5, 3, 0);
    // Move the second half of the range elsewhere and point a second descriptor at it.
    let mut tail = [0u8; 8];
    mem.read_slice(&mut tail, GuestAddress(DATA + 8)).unwrap();
    mem.write_slice(&tail, GuestAddress(DATA + 0x1000)).unwrap();
    let parts = [
        (HDR, 16, R),
        (DATA, 8, R),
        (DATA + 0x1000, 8, R),
        (STATUS, 1, W),
    ];
    let req = parse(&mem, &parts, &limits(4, 4096)).unwrap();
    assert_eq!(
        req.ranges,
        [SectorRange {
            sector: 5,
            num_sectors: 3,
            unmap: false
        }]
    );
}
