//! qcow2 against QEMU: images made by `qemu-img`/`qemu-io` read back, images rvmm writes
//! checked by `qemu-img check` and read back by `qemu-img convert`. These need qemu-utils;
//! without it they skip with a reason (and fail under `CI=true`).

#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_possible_wrap,
    reason = "test fixtures use small known values"
)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::*;
use crate::image::{DiskImage, ImageError, ImageFormat, MemStorage};

pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    pub(crate) fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rvmm-qcow2-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether QEMU's tools are here; under `CI=true` they must be.
pub(crate) fn have_qemu_img(test: &str) -> bool {
    if Command::new("qemu-img").arg("--version").output().is_ok() {
        return true;
    }
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "{test}: qemu-img is missing (qemu-utils); CI=true requires it"
    );
    eprintln!("SKIPPED {test}: qemu-img not installed (apt-get install qemu-utils)");
    false
}

pub(crate) fn run(program: &str, args: &[&str]) -> std::process::Output {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn qemu_io(image: &Path, fmt: &str, commands: &[&str]) {
    let mut args = vec!["-f", fmt];
    for c in commands {
        args.extend(["-c", c]);
    }
    args.push(image.to_str().unwrap());
    run("qemu-io", &args);
}

/// `qemu-img check`'s exit status: 0 clean, 2 corruption, 3 leaks only. `-U` (force share):
/// a device under test may still hold the image's write lock, as QEMU's own would.
pub(crate) fn check_status(image: &Path) -> (i32, String) {
    let out = Command::new("qemu-img")
        .args(["check", "-U", image.to_str().unwrap()])
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr),
    )
}

fn assert_clean(image: &Path) {
    let (code, text) = check_status(image);
    assert_eq!(code, 0, "qemu-img check {}: {text}", image.display());
}

/// The guest's view of `image` through QEMU (`qemu-img convert -U -O raw`: shared, as in
/// [`check_status`]).
pub(crate) fn qemu_contents(image: &Path) -> Vec<u8> {
    let raw = image.with_extension("converted.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-U",
            "-O",
            "raw",
            image.to_str().unwrap(),
            raw.to_str().unwrap(),
        ],
    );
    let bytes = std::fs::read(&raw).unwrap();
    std::fs::remove_file(raw).unwrap();
    bytes
}

fn open(path: &Path, writable: bool) -> DiskImage {
    DiskImage::open(path, writable, None).unwrap()
}

fn read_all(image: &mut DiskImage) -> Vec<u8> {
    let mut out = vec![0u8; image.virtual_size() as usize];
    image.read_at(&mut out, 0).unwrap();
    out
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn qemu_written_images_read_back_alike_in_every_variant() {
    if !have_qemu_img("qcow2 variants") {
        return;
    }
    let dir = TempDir::new("variants");
    let variants: &[(&str, &[&str])] = &[
        ("v3", &[]),
        ("v2", &["-o", "compat=0.10"]),
        ("c512", &["-o", "cluster_size=512"]),
        ("c2m", &["-o", "cluster_size=2M"]),
        ("rc1", &["-o", "refcount_bits=1"]),
        ("rc64", &["-o", "refcount_bits=64"]),
        ("zstd", &["-o", "compression_type=zstd"]),
    ];
    for (name, opts) in variants {
        let path = dir.path(&format!("{name}.qcow2"));
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        args.extend_from_slice(opts);
        args.extend([path.to_str().unwrap(), "4M"]);
        run("qemu-img", &args);
        // Compressed writes must be whole, aligned clusters.
        let compressed = match *name {
            "c512" => "write -c -P 0x44 3M 512",
            "c2m" => "write -c -P 0x44 2M 2M",
            _ => "write -c -P 0x44 3M 64k",
        };
        let mut commands = vec![
            "write -P 0x11 0 64k",
            "write -P 0x22 100k 3k",
            "write -P 0x33 1M 1M",
            compressed,
        ];
        if *name != "v2" {
            commands.push("write -z 1152k 64k");
        }
        qemu_io(&path, "qcow2", &commands);
        let expected = qemu_contents(&path);
        let got = read_all(&mut open(&path, false));
        assert!(
            got == expected,
            "{name}: rvmm reads differ from qemu-img convert"
        );
    }
}

#[test]
fn writes_land_where_qemu_reads_them_and_check_stays_clean() {
    if !have_qemu_img("qcow2 writes") {
        return;
    }
    let dir = TempDir::new("writes");
    for (name, opts) in [
        ("v3", "compat=1.1"),
        ("v2", "compat=0.10"),
        ("c4k", "cluster_size=4096"),
    ] {
        let path = dir.path(&format!("{name}.qcow2"));
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                opts,
                path.to_str().unwrap(),
                "8M",
            ],
        );
        qemu_io(
            &path,
            "qcow2",
            &["write -P 0x5a 0 128k", "write -c -P 0x6b 2M 64k"],
        );
        let mut model = qemu_contents(&path);
        let mut image = open(&path, true);
        let writes: &[(u64, usize, u8)] = &[
            (512, 1000, 1),                   // inside an allocated cluster
            (70_000, 100_000, 2),             // across unallocated clusters, partial both ends
            (2 * 1024 * 1024 + 4096, 512, 3), // into the compressed cluster
            (5 * 1024 * 1024, 1 << 20, 4),    // whole clusters
            (8 * 1024 * 1024 - 512, 512, 5),  // the last sector
        ];
        for &(offset, len, seed) in writes {
            let data = pattern(len, seed);
            image.write_at(&data, offset).unwrap();
            model[offset as usize..offset as usize + len].copy_from_slice(&data);
        }
        // Reads before the flush see the writes.
        assert!(read_all(&mut image) == model, "{name}: reads before flush");
        image.flush().unwrap();
        drop(image);
        assert_clean(&path);
        assert!(
            qemu_contents(&path) == model,
            "{name}: qemu-img reads differ"
        );
    }
}

#[test]
fn zeroing_whole_and_partial_clusters_reads_zeroes_in_qemu() {
    if !have_qemu_img("qcow2 write zeroes") {
        return;
    }
    let dir = TempDir::new("zeroes");
    let base = dir.path("base.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", base.to_str().unwrap(), "4M"],
    );
    qemu_io(&base, "qcow2", &["write -P 0x77 0 4M"]);
    let top = dir.path("top.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            base.to_str().unwrap(),
            "-F",
            "qcow2",
            top.to_str().unwrap(),
        ],
    );
    qemu_io(
        &top,
        "qcow2",
        &["write -P 0x12 1M 64k", "write -c -P 0x13 2M 64k"],
    );
    let mut model = qemu_contents(&top);
    let mut image = open(&top, true);
    let Ok(()) = (match &mut image {
        DiskImage::Qcow2(q) => {
            // Unallocated over a backing file, allocated, compressed, partial.
            for (offset, len) in [
                (0u64, 128 * 1024u64),
                (1 << 20, 65536),
                (2 << 20, 65536),
                (3 << 20, 1000),
            ] {
                q.write_zeroes(offset, len).unwrap();
                model[offset as usize..(offset + len) as usize].fill(0);
            }
            q.flush()
        }
        DiskImage::Raw(_) => panic!("not qcow2"),
    }) else {
        panic!("flush failed")
    };
    drop(image);
    assert_clean(&top);
    assert!(qemu_contents(&top) == model);
}

#[test]
fn a_tiny_cluster_image_outgrows_its_refcount_table_cleanly() {
    if !have_qemu_img("qcow2 refcount table growth") {
        return;
    }
    let dir = TempDir::new("grow");
    let path = dir.path("small.qcow2");
    // 512-byte clusters: one refcount table cluster covers 64 blocks x 256 clusters = 8 MiB.
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=512",
            path.to_str().unwrap(),
            "24M",
        ],
    );
    let mut image = open(&path, true);
    let mut model = vec![0u8; 24 << 20];
    for i in 0..24u64 {
        let data = pattern(600 << 10, i as u8);
        let offset = i << 20;
        image.write_at(&data, offset).unwrap();
        model[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
    }
    image.flush().unwrap();
    drop(image);
    assert_clean(&path);
    assert!(qemu_contents(&path) == model);
}

#[test]
fn overlays_rvmm_creates_pass_qemu_img_check_and_read_through() {
    if !have_qemu_img("qcow2 overlay creation") {
        return;
    }
    let dir = TempDir::new("overlay");
    let base = dir.path("base.raw");
    let content = pattern(3 << 20, 9);
    std::fs::write(&base, &content).unwrap();
    let top = dir.path("top.qcow2");
    create_overlay(&top, &base, "raw", content.len() as u64).unwrap();
    assert_clean(&top);
    let info = run(
        "qemu-img",
        &["info", "--output=json", top.to_str().unwrap()],
    );
    let info = String::from_utf8_lossy(&info.stdout);
    assert!(
        info.contains("\"backing-filename-format\": \"raw\""),
        "{info}"
    );
    let mut image = open(&top, true);
    assert!(read_all(&mut image) == content);
    image.write_at(&[0xEE; 4096], 8192).unwrap();
    image.flush().unwrap();
    drop(image);
    assert_clean(&top);
    let mut model = content.clone();
    model[8192..8192 + 4096].fill(0xEE);
    assert!(qemu_contents(&top) == model);
    // The backing file is never written.
    assert!(std::fs::read(&base).unwrap() == content);
}

/// Storage that stops writing after `left` writes, as a process killed at that point would.
#[derive(Debug)]
struct Dies {
    file: std::fs::File,
    left: std::sync::Mutex<usize>,
}

impl Storage for Dies {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        Storage::read_at(&self.file, buf, offset)
    }
    fn read_upto(&self, buf: &mut [u8], offset: u64) -> std::io::Result<usize> {
        self.file.read_upto(buf, offset)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let mut left = self.left.lock().unwrap();
        if *left == 0 {
            return Err(std::io::Error::other("killed"));
        }
        *left -= 1;
        Storage::write_at(&self.file, buf, offset)
    }
    fn sync(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn len(&self) -> std::io::Result<u64> {
        Storage::len(&self.file)
    }
}

#[test]
fn a_crash_at_any_write_leaves_leaks_at_worst() {
    if !have_qemu_img("qcow2 crash ordering") {
        return;
    }
    let dir = TempDir::new("crash");
    let base = dir.path("base.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            base.to_str().unwrap(),
            "2M",
        ],
    );
    qemu_io(
        &base,
        "qcow2",
        &["write -c -P 0x31 0 4k", "write -P 0x32 8k 8k"],
    );
    let pristine = std::fs::read(&base).unwrap();
    let mut last_writes = 0;
    for budget in 0.. {
        let path = dir.path("img.qcow2");
        std::fs::write(&path, &pristine).unwrap();
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let storage = Dies {
            file,
            left: std::sync::Mutex::new(budget),
        };
        let mut image = Qcow2::open(Box::new(storage), true).unwrap();
        let result = (|| {
            image.write_at(&[1; 100], 0)?; // over the compressed cluster (freed)
            image.write_at(&[2; 9000], 600 * 1024)?; // new L2 entries
            image.write_zeroes(8192, 4096)?;
            image.flush()?;
            image.write_at(&[3; 4096], 1 << 20)?;
            image.flush()
        })();
        drop(image);
        let (code, text) = check_status(&path);
        assert!(
            code == 0 || code == 3,
            "killed after {budget} writes: {text}"
        );
        if result.is_ok() {
            assert_eq!(code, 0, "{text}");
            last_writes = budget;
            break;
        }
    }
    assert!(last_writes > 5, "the sequence needs several writes");
}

fn header_bytes(size: u64) -> Vec<u8> {
    create::overlay_bytes(b"/nonexistent/base", "raw", size).unwrap()
}

fn mem_open(bytes: Vec<u8>) -> Result<DiskImage, ImageError> {
    let len = bytes.len() + (1 << 20);
    DiskImage::from_storage(
        Box::new(MemStorage::new(bytes, len)),
        true,
        None,
        Path::new("mem.qcow2"),
        |_, _, _| {
            DiskImage::from_storage(
                Box::new(MemStorage::new(vec![0; 512], 512)),
                false,
                Some(ImageFormat::Raw),
                Path::new("b"),
                |_, _, _| unreachable!(),
            )
        },
    )
}

#[test]
fn lying_headers_are_refused_naming_the_field() {
    let good = header_bytes(1 << 30);
    assert!(mem_open(good.clone()).is_ok());
    type Corrupt = Box<dyn Fn(&mut Vec<u8>)>;
    let cases: Vec<(Corrupt, &str)> = vec![
        (Box::new(|b| b.truncate(50)), "truncated"),
        (
            Box::new(|b| b[36..40].copy_from_slice(&u32::MAX.to_be_bytes())),
            "l1_size",
        ),
        (
            Box::new(|b| b[40..48].copy_from_slice(&(1u64 << 40).to_be_bytes())),
            "l1_table_offset",
        ),
        (
            Box::new(|b| b[56..60].copy_from_slice(&100_000u32.to_be_bytes())),
            "refcount_table_clusters",
        ),
        (
            Box::new(|b| b[20..24].copy_from_slice(&40u32.to_be_bytes())),
            "cluster_bits",
        ),
        (
            Box::new(|b| b[24..32].copy_from_slice(&(1u64 << 62).to_be_bytes())),
            "size",
        ),
        (
            Box::new(|b| b[32..36].copy_from_slice(&1u32.to_be_bytes())),
            "encryption",
        ),
        (
            Box::new(|b| b[72..80].copy_from_slice(&(1u64 << 40).to_be_bytes())),
            "bit 40",
        ),
        (
            Box::new(|b| b[16..20].copy_from_slice(&5000u32.to_be_bytes())),
            "backing_file_size",
        ),
        (
            Box::new(|b| b[4..8].copy_from_slice(&4u32.to_be_bytes())),
            "version 4",
        ),
    ];
    for (corrupt, needle) in cases {
        let mut bytes = good.clone();
        corrupt(&mut bytes);
        let err = mem_open(bytes).expect_err(needle);
        let text = error_chain(&err);
        assert!(text.contains("mem.qcow2"), "{text}");
        assert!(text.contains(needle), "{needle}: {text}");
    }
}

pub(crate) fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text += ": ";
        text += &s.to_string();
        source = s.source();
    }
    text
}

#[test]
fn backing_loops_and_missing_backing_files_are_refused() {
    let dir = TempDir::new("loop");
    let a = dir.path("a.qcow2");
    let b = dir.path("b.qcow2");
    create_overlay(&a, Path::new("b.qcow2"), "qcow2", 1 << 20).unwrap();
    create_overlay(&b, Path::new("a.qcow2"), "qcow2", 1 << 20).unwrap();
    let err = DiskImage::open(&a, false, None).unwrap_err();
    assert!(matches!(err, ImageError::Loop { .. }), "{err:?}");
    assert!(
        error_chain(&err).contains("loops back to"),
        "{}",
        error_chain(&err)
    );
    let c = dir.path("c.qcow2");
    create_overlay(&c, Path::new("missing.raw"), "raw", 1 << 20).unwrap();
    let text = error_chain(&DiskImage::open(&c, false, None).unwrap_err());
    assert!(
        text.contains("c.qcow2") && text.contains("missing.raw"),
        "{text}"
    );
    // A qcow2 that is its own backing file.
    create_overlay(&c, Path::new("c.qcow2"), "qcow2", 1 << 20).unwrap();
    assert!(matches!(
        DiskImage::open(&c, false, None),
        Err(ImageError::Loop { .. })
    ));
}

#[test]
fn a_truncated_image_is_refused_not_read_past_its_end() {
    if !have_qemu_img("qcow2 truncated") {
        return;
    }
    let dir = TempDir::new("trunc");
    let path = dir.path("t.qcow2");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", path.to_str().unwrap(), "64M"],
    );
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..100_000]).unwrap();
    let text = error_chain(&DiskImage::open(&path, false, None).unwrap_err());
    assert!(
        text.contains("t.qcow2") && text.contains("past the end of the file"),
        "{text}"
    );
}
