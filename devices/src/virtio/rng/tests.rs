#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    reason = "test fixtures use small known values"
)]

use std::sync::atomic::Ordering;

use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EFD_NONBLOCK;

use super::*;
use crate::virtio::test_utils::CountingInterrupt;

fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u32, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags as u16, next))
}

fn handler(
    mem: &GuestMemoryMmap,
    vq: &MockSplitQueue<'_, GuestMemoryMmap>,
) -> (RngHandler<CountingInterrupt>, Arc<CountingInterrupt>) {
    let interrupt = Arc::new(CountingInterrupt::default());
    let h = RngHandler::new(
        mem.clone(),
        vq.create_queue().unwrap(),
        EventFd::new(EFD_NONBLOCK).unwrap(),
        interrupt.clone(),
    );
    (h, interrupt)
}

#[test]
fn writable_buffers_are_filled_with_random_bytes() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(&[desc(0x10_0000, 256, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    let (mut h, interrupt) = handler(&mem, &vq);
    assert_eq!(h.process_queue().unwrap(), 1);
    let mut buf = [0u8; 256];
    mem.read_slice(&mut buf, GuestAddress(0x10_0000)).unwrap();
    assert!(
        buf.iter().any(|b| *b != 0),
        "256 random bytes are not all zero"
    );
    assert_eq!(vq.used().idx().load(), 1);
    assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 256);
    assert_eq!(interrupt.queue.load(Ordering::SeqCst), 1);
}

#[test]
fn read_only_descriptors_are_skipped_and_counted_as_zero_bytes() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let chain = [
        desc(0x10_0000, 64, VRING_DESC_F_NEXT, 1),
        desc(0x10_1000, 32, VRING_DESC_F_WRITE, 0),
    ];
    vq.add_desc_chains(&chain, 0).unwrap();
    mem.write_slice(&[7u8; 64], GuestAddress(0x10_0000))
        .unwrap();
    let (mut h, _) = handler(&mem, &vq);
    h.process_queue().unwrap();
    let mut ro = [0u8; 64];
    mem.read_slice(&mut ro, GuestAddress(0x10_0000)).unwrap();
    assert_eq!(ro, [7u8; 64], "device must not write read-only buffers");
    assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 32);
}

#[test]
fn buffer_outside_guest_memory_completes_with_zero_bytes_and_the_worker_goes_on() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    let chains = [
        desc(0x4000_0000, 64, VRING_DESC_F_WRITE, 0),
        desc(0x10_0000, 16, VRING_DESC_F_WRITE, 0),
    ];
    vq.add_desc_chains(&chains, 0).unwrap();
    let (mut h, interrupt) = handler(&mem, &vq);
    assert_eq!(h.process_queue().unwrap(), 2);
    assert_eq!(vq.used().ring().ref_at(0).unwrap().load().len(), 0);
    assert_eq!(vq.used().ring().ref_at(1).unwrap().load().len(), 16);
    assert_eq!(interrupt.needs_reset.load(Ordering::SeqCst), 0);
}

#[test]
fn huge_requests_are_capped() {
    let mem = memory();
    let vq = MockSplitQueue::new(&mem, 16);
    vq.add_desc_chains(&[desc(0x10_0000, 0x40_0000, VRING_DESC_F_WRITE, 0)], 0)
        .unwrap();
    let (mut h, _) = handler(&mem, &vq);
    h.process_queue().unwrap();
    assert_eq!(
        vq.used().ring().ref_at(0).unwrap().load().len(),
        MAX_REQUEST_BYTES
    );
}

#[test]
fn device_offers_one_queue_and_version_1_only() {
    let rng = Rng::new();
    assert_eq!(rng.device_type(), TYPE_RNG);
    assert_eq!(rng.queue_max_sizes(), &[QUEUE_SIZE]);
    assert_eq!(rng.features(), VIRTIO_F_VERSION_1);
}
