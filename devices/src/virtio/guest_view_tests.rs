//! The worker's `GuestView` as virtio-queue's guest memory: every access answers as vm-memory's
//! `GuestMemoryMmap` does, inline regions or not, and writes mark the dirty bitmap.

#![allow(
    clippy::cast_possible_truncation,
    reason = "test patterns are bytes taken modulo 251"
)]

use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryRegion, Permissions,
};

use super::GuestMemoryMmap;
use super::guest_view::GuestView;

/// Two adjacent regions (both kept inline by the view) and two the view leaves to vm-memory,
/// with holes between (the last is where virtio-queue's mock puts indirect tables).
fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 0x1_0000),
        (GuestAddress(0x1_0000), 0x1_0000),
        (GuestAddress(0x10_0000), 0x1_0000),
        (GuestAddress(0x3000_0000), 0x1_0000),
    ])
    .unwrap()
}

/// Accesses inside the first region, across the first two, in the third, across the hole, at
/// the very end, past the end, and empty ones.
const ACCESSES: [(u64, usize); 12] = [
    (0, 16),
    (0x100, 1),
    (0xfff8, 16),
    (0x1_0000, 8),
    (0x1_fffe, 2),
    (0x1_fffe, 4),
    (0x10_0010, 16),
    (0x10_fff8, 8),
    (0x10_fffc, 8),
    (0x11_0000, 2),
    (0x5_0000, 4),
    (0x20, 0),
];

fn clear_dirty(mem: &GuestMemoryMmap) {
    for region in mem.iter() {
        std::ops::Deref::deref(region).bitmap().reset();
    }
}

fn dirty(mem: &GuestMemoryMmap, addr: u64) -> bool {
    let region = mem.find_region(GuestAddress(addr)).unwrap();
    let offset = addr - region.start_addr().raw_value();
    std::ops::Deref::deref(region)
        .bitmap()
        .is_addr_set(usize::try_from(offset).unwrap())
}

#[test]
fn view_reads_and_writes_like_vm_memory_inside_and_across_regions() {
    let mem = memory();
    let view = GuestView::new(mem.clone());
    for (i, &(addr, len)) in ACCESSES.iter().enumerate() {
        let at = GuestAddress(addr);
        let what = format!("access {i}: {len} bytes at {addr:#x}");
        let pattern: Vec<u8> = (0..len).map(|b| ((b + 1 + i) % 251) as u8).collect();

        let through_view = view.write_slice(&pattern, at);
        let expected = mem.write_slice(&pattern, at);
        assert_eq!(
            through_view.as_ref().map_err(ToString::to_string),
            expected.as_ref().map_err(ToString::to_string),
            "{what}: write"
        );

        let mut from_view = vec![0u8; len];
        let mut from_mem = vec![0u8; len];
        let read_view = view.read_slice(&mut from_view, at);
        let read_mem = mem.read_slice(&mut from_mem, at);
        assert_eq!(
            read_view.as_ref().map_err(ToString::to_string),
            read_mem.as_ref().map_err(ToString::to_string),
            "{what}: read"
        );
        assert_eq!(from_view, from_mem, "{what}: bytes read");
        if expected.is_ok() {
            assert_eq!(from_view, pattern, "{what}: bytes written");
        }

        for access in [Permissions::Read, Permissions::Write] {
            assert_eq!(
                GuestMemory::check_range(&view, at, len, access),
                GuestMemoryBackend::check_range(&mem, at, len),
                "{what}: check_range"
            );
        }
    }
}

#[test]
fn view_atomic_accesses_match_vm_memory() {
    let mem = memory();
    let view = GuestView::new(mem.clone());
    let order = std::sync::atomic::Ordering::SeqCst;
    for addr in [0x40u64, 0x1_0002, 0x10_0004, 0xffff, 0x11_0000, 0x5_0000] {
        let at = GuestAddress(addr);
        let stored = view.store(0xbeef_u16, at, order);
        assert_eq!(
            stored.is_ok(),
            mem.store(0xbeef_u16, at, order).is_ok(),
            "store at {addr:#x}"
        );
        let through_view = view.load::<u16>(at, order);
        let expected = mem.load::<u16>(at, order);
        assert_eq!(
            through_view.map_err(|e| e.to_string()),
            expected.map_err(|e| e.to_string()),
            "load at {addr:#x}"
        );
    }
}

#[test]
fn writes_through_the_view_mark_their_pages_dirty_and_no_others() {
    let mem = memory();
    let view = GuestView::new(mem.clone());
    clear_dirty(&mem);
    view.write_obj(7u64, GuestAddress(0x3000)).unwrap();
    view.store(
        1u16,
        GuestAddress(0x1_5000),
        std::sync::atomic::Ordering::Release,
    )
    .unwrap();
    view.write_obj(9u32, GuestAddress(0x10_2000)).unwrap();
    // Across the first two regions: both pages.
    view.write_slice(&[1; 16], GuestAddress(0xfff8)).unwrap();
    let _: u64 = view.read_obj(GuestAddress(0x8000)).unwrap();
    for (addr, expected) in [
        (0x3000, true),
        (0x1_5000, true),
        (0x10_2000, true),
        (0xf000, true),
        (0x1_0000, true),
        (0x8000, false),
        (0x4000, false),
    ] {
        assert_eq!(dirty(&mem, addr), expected, "page of {addr:#x}");
    }
}

/// A queue with a direct chain of three descriptors, an indirect one and a chain
/// whose descriptors lie in the region the view leaves to vm-memory.
fn queue_with_chains(mem: &GuestMemoryMmap) -> MockSplitQueue<'_, GuestMemoryMmap> {
    let vq = MockSplitQueue::create(mem, GuestAddress(0x1_0000), 16);
    let d = |addr: u64, len: u32, flags: u16, next: u16| {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    };
    vq.add_desc_chains(
        &[
            d(0x2000, 16, 1, 1),
            d(0x3000, 512, 3, 2),
            d(0x4000, 1, 2, 0),
            d(0x10_0000, 16, 1, 4),
            d(0x10_1000, 4096, 2, 0),
        ],
        0,
    )
    .unwrap();
    vq
}

#[test]
fn virtio_queue_walks_the_same_chains_through_the_view_as_through_vm_memory() {
    let mem = memory();
    let view = GuestView::new(mem.clone());
    let mut vq = queue_with_chains(&mem);
    vq.add_indirect_chain(3).unwrap();
    let mut through_mem = vq.create_queue::<Queue>().unwrap();
    let mut through_view = vq.create_queue::<Queue>().unwrap();
    assert!(through_view.is_valid(&view));

    let walk = |chains: &mut dyn Iterator<Item = Vec<(u64, u32, bool)>>| chains.collect::<Vec<_>>();
    let expected = walk(&mut through_mem.iter(&mem).unwrap().map(|chain| {
        chain
            .map(|d| (d.addr().raw_value(), d.len(), d.is_write_only()))
            .collect()
    }));
    let got = walk(&mut through_view.iter(&view).unwrap().map(|chain| {
        chain
            .map(|d| (d.addr().raw_value(), d.len(), d.is_write_only()))
            .collect()
    }));
    assert_eq!(got.len(), 3, "chains: {got:?}");
    assert_eq!(got, expected);
    assert_eq!(got[1], [(0x10_0000, 16, false), (0x10_1000, 4096, true)]);

    clear_dirty(&mem);
    through_view.add_used(&view, 0, 513).unwrap();
    assert_eq!(vq.used().idx().load(), 1);
    let used = vq.used().ring().ref_at(0).unwrap().load();
    assert_eq!((used.id(), used.len()), (0, 513));
    assert!(dirty(&mem, vq.used_addr().raw_value()), "used ring page");
}
