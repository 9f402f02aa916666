//! virtio-blk over qcow2 images made by qemu-img/qemu-io: requests that span data,
//! compressed, zero and backing-file clusters, on both engines; writes checked afterwards by
//! `qemu-img check` and read back by `qemu-img convert`.

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    reason = "test fixtures use small known values"
)]

use virtio_bindings::virtio_blk::*;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::tests::*;
use super::*;
use crate::image::qcow2::tests::run as run_tool;
use crate::image::qcow2::tests::{TempDir, check_status, have_qemu_img, qemu_contents};

const MIB: u64 = 1 << 20;

/// A 4 MiB qcow2 over a raw backing file: data at 0..128K, compressed at 1M, zeroes at
/// 2M..2M+64K, the rest falls through to the backing file's pattern.
fn image(dir: &TempDir) -> std::path::PathBuf {
    let base = dir.path("base.raw");
    let content: Vec<u8> = (0..4 * MIB as usize).map(pattern).collect();
    std::fs::write(&base, content).unwrap();
    let top = dir.path("top.qcow2");
    run_tool(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "raw",
            top.to_str().unwrap(),
        ],
    );
    run_tool(
        "qemu-io",
        &[
            "-f",
            "qcow2",
            "-c",
            "write -P 0x11 0 128k",
            "-c",
            "write -c -P 0x22 1M 64k",
            "-c",
            "write -z 2M 64k",
            top.to_str().unwrap(),
        ],
    );
    top
}

fn qcow2_device(path: &std::path::Path, engine: Engine) -> Block {
    let dev = Block::new(BlockConfig {
        path: path.to_owned(),
        readonly: false,
        id: None,
        engine,
        format: None,
    })
    .unwrap();
    assert_eq!(dev.format(), crate::image::ImageFormat::Qcow2);
    assert_eq!(dev.capacity(), 4 * MIB / 512);
    dev
}

#[test]
fn reads_across_data_compressed_zero_and_backing_clusters_match_qemu() {
    if !have_qemu_img("virtio-blk qcow2 reads") {
        return;
    }
    for engine in engines() {
        let dir = TempDir::new("blk-read");
        let top = image(&dir);
        let expected = qemu_contents(&top);
        let dev = qcow2_device(&top, engine);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 64);
        // One buffer over data and backing clusters; two buffers over backing, compressed
        // and backing again; one buffer over zero and backing clusters.
        let reads: [(u64, Vec<(u64, u32)>); 3] = [
            (64 * 1024, vec![(DATA, 256 * 1024)]),
            (
                MIB - 4096,
                vec![(DATA + MIB, 8192), (DATA + MIB + 0x10000, 65536)],
            ),
            (2 * MIB - 512, vec![(DATA + 2 * MIB, 65536 + 1024)]),
        ];
        let mut first = 0;
        for (slot, (offset, bufs)) in reads.iter().enumerate() {
            let data: Vec<(u64, u32, u32)> = bufs.iter().map(|&(a, l)| (a, l, W)).collect();
            add_request(
                &mem,
                &vq,
                first,
                slot as u64,
                VIRTIO_BLK_T_IN,
                offset / 512,
                &data,
            );
            first += data.len() as u16 + 2;
        }
        let (mut h, _) = handler(&dev, &mem, &vq);
        assert_eq!(run(&mut h), 3, "{engine:?}");
        for (slot, (offset, bufs)) in reads.iter().enumerate() {
            assert_eq!(status(&mem, slot as u64), S_OK, "{engine:?} read {slot}");
            let mut at = *offset as usize;
            for &(addr, len) in bufs {
                let mut got = vec![0u8; len as usize];
                mem.read_slice(&mut got, GuestAddress(addr)).unwrap();
                assert!(
                    got == expected[at..at + len as usize],
                    "{engine:?} read {slot} at {at:#x}"
                );
                at += len as usize;
            }
        }
    }
}

#[test]
fn writes_and_flush_leave_an_image_qemu_reads_back_and_checks_clean() {
    if !have_qemu_img("virtio-blk qcow2 writes") {
        return;
    }
    for engine in engines() {
        let dir = TempDir::new("blk-write");
        let top = image(&dir);
        let base_before = std::fs::read(dir.path("base.raw")).unwrap();
        let mut model = qemu_contents(&top);
        let dev = qcow2_device(&top, engine);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 64);
        // Partial clusters over the backing file, the compressed and the zero cluster, and
        // two buffers across allocated and new clusters.
        let writes: [(u64, Vec<(u64, u32)>); 4] = [
            (200 * 1024, vec![(DATA, 3000 - 3000 % 512)]),
            (MIB + 512, vec![(DATA + MIB, 1024)]),
            (2 * MIB + 4096, vec![(DATA + 2 * MIB, 512)]),
            (
                100 * 1024,
                vec![(DATA + 3 * MIB, 40960), (DATA + 3 * MIB + 0x20000, 131072)],
            ),
        ];
        let mut first = 0;
        for (slot, (offset, bufs)) in writes.iter().enumerate() {
            let mut at = *offset as usize;
            for (n, &(addr, len)) in bufs.iter().enumerate() {
                let data: Vec<u8> = (0..len as usize)
                    .map(|i| (i as u8) ^ (slot as u8 * 16 + n as u8 + 1))
                    .collect();
                mem.write_slice(&data, GuestAddress(addr)).unwrap();
                model[at..at + len as usize].copy_from_slice(&data);
                at += len as usize;
            }
            let data: Vec<(u64, u32, u32)> = bufs.iter().map(|&(a, l)| (a, l, R)).collect();
            add_request(
                &mem,
                &vq,
                first,
                slot as u64,
                VIRTIO_BLK_T_OUT,
                offset / 512,
                &data,
            );
            first += data.len() as u16 + 2;
        }
        add_request(&mem, &vq, first, 9, VIRTIO_BLK_T_FLUSH, 0, &[]);
        let (mut h, _) = handler(&dev, &mem, &vq);
        assert_eq!(run(&mut h), 5, "{engine:?}");
        for slot in [0, 1, 2, 3, 9] {
            assert_eq!(status(&mem, slot), S_OK, "{engine:?} request {slot}");
        }
        // Flushed: the image is consistent even before the worker stops.
        let (code, text) = check_status(&top);
        assert_eq!(code, 0, "{engine:?}: {text}");
        drop(h);
        drop(dev);
        let (code, text) = check_status(&top);
        assert_eq!(code, 0, "{engine:?}: {text}");
        assert!(
            qemu_contents(&top) == model,
            "{engine:?}: qemu-img reads differ"
        );
        assert!(std::fs::read(dir.path("base.raw")).unwrap() == base_before);
    }
}

#[test]
fn a_pause_writes_the_metadata_back_so_the_file_alone_holds_completed_writes() {
    if !have_qemu_img("virtio-blk qcow2 pause") {
        return;
    }
    for engine in engines() {
        let dir = TempDir::new("blk-pause");
        let top = image(&dir);
        let mut model = qemu_contents(&top);
        let dev = qcow2_device(&top, engine);
        let mem = memory();
        let vq = MockSplitQueue::new(&mem, 16);
        // A write into a new cluster, and no FLUSH: the mapping is only in memory.
        mem.write_slice(&[0x7e; 4096], GuestAddress(DATA)).unwrap();
        add_request(
            &mem,
            &vq,
            0,
            0,
            VIRTIO_BLK_T_OUT,
            (3 * MIB) / 512,
            &[(DATA, 4096, R)],
        );
        let (mut h, _) = handler(&dev, &mem, &vq);
        assert_eq!(run(&mut h), 1, "{engine:?}");
        model[3 * MIB as usize..3 * MIB as usize + 4096].fill(0x7e);
        crate::virtio::DeviceHandler::quiesce(&mut h);
        // The worker is paused, not gone: the image on disk is complete already.
        let (code, text) = check_status(&top);
        assert_eq!(code, 0, "{engine:?}: {text}");
        assert!(
            qemu_contents(&top) == model,
            "{engine:?}: the write is not in the file"
        );
        drop(h);
    }
}
