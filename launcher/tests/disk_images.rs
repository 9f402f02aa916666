//! `rvmm run` with disk images it must refuse: one line naming the image and what is wrong,
//! exit status 2, nothing started (KVM is `/nonexistent/kvm`: an image that got past the
//! checks would fail there instead, and the guest never prints). The images are made by the
//! real tools (qemu-img, sfdisk, mkfs.ext4); without them the tests skip with a reason, and
//! fail under `CI=true`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::run_rvmm;

struct Dir(PathBuf);

impl Dir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("rvmm-images-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tools(test: &str) -> bool {
    let missing: Vec<&str> = ["qemu-img", "sfdisk", "mkfs.ext4"]
        .into_iter()
        .filter(|t| Command::new(t).arg("-V").output().is_err())
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "{test}: {missing:?} missing; CI=true requires them"
    );
    eprintln!("SKIPPED {test}: {missing:?} not installed");
    false
}

fn run(program: &str, args: &[&str], input: Option<&str>) {
    let mut command = Command::new(program);
    command.args(args).stdin(std::process::Stdio::piped());
    let mut child = command.spawn().unwrap();
    if let Some(input) = input {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    }
    drop(child.stdin.take());
    assert!(child.wait().unwrap().success(), "{program} {args:?}");
}

/// `rvmm run --disk path=IMAGE` without a kernel: (exit status, stderr, stdout).
fn boot(image: &Path) -> (Option<i32>, String, String) {
    let disk = format!("path={}", image.display());
    let out = run_rvmm(
        &[
            "run",
            "--disk",
            &disk,
            "--kvm-device",
            "/nonexistent/kvm",
            "--serial",
            "stdio",
        ],
        Duration::from_secs(60),
    );
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

/// A GPT disk of 16 MiB whose one partition holds `fill` (an ext4 image path, or bytes).
fn gpt_disk(dir: &Dir, name: &str, partition: &[u8]) -> PathBuf {
    let disk = dir.path(name);
    std::fs::write(&disk, vec![0u8; 16 << 20]).unwrap();
    run(
        "sfdisk",
        &["-q", disk.to_str().unwrap()],
        Some("label: gpt\nstart=2048, type=L\n"),
    );
    let mut bytes = std::fs::read(&disk).unwrap();
    bytes[1 << 20..(1 << 20) + partition.len()].copy_from_slice(partition);
    std::fs::write(&disk, bytes).unwrap();
    disk
}

fn ext4(dir: &Dir, files: &[(&str, &[u8])]) -> Vec<u8> {
    let staging = dir.path("staging");
    for (name, bytes) in files {
        let path = staging.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    std::fs::create_dir_all(&staging).unwrap();
    let image = dir.path("fs.ext4");
    let _ = std::fs::remove_file(&image);
    run(
        "mkfs.ext4",
        &[
            "-q",
            "-F",
            "-d",
            staging.to_str().unwrap(),
            image.to_str().unwrap(),
            "8M",
        ],
        None,
    );
    std::fs::remove_dir_all(&staging).unwrap();
    std::fs::read(&image).unwrap()
}

#[test]
fn bad_boot_images_are_refused_in_one_line_naming_the_image_and_the_problem() {
    if !tools("bad boot images") {
        return;
    }
    let dir = Dir::new("bad");
    // A qcow2 cut short: its L1 table lies past the end.
    let truncated = dir.path("truncated.qcow2");
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            truncated.to_str().unwrap(),
            "1G",
        ],
        None,
    );
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..0x30000 + 8]).unwrap();
    // Two overlays backed by each other.
    let (a, b) = (dir.path("a.qcow2"), dir.path("b.qcow2"));
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", b.to_str().unwrap(), "1M"],
        None,
    );
    run(
        "qemu-img",
        &[
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "b.qcow2",
            "-F",
            "qcow2",
            a.to_str().unwrap(),
        ],
        None,
    );
    run(
        "qemu-img",
        &[
            "rebase",
            "-u",
            "-b",
            "a.qcow2",
            "-F",
            "qcow2",
            b.to_str().unwrap(),
        ],
        None,
    );
    // A whole-disk filesystem, no partition table.
    let whole = dir.path("whole.img");
    std::fs::write(
        &whole,
        ext4(&dir, &[("boot/grub/grub.cfg", b"menuentry x { linux /k }")]),
    )
    .unwrap();
    // A partition table, a filesystem, but nothing that boots.
    let no_config = gpt_disk(
        &dir,
        "noconfig.img",
        &ext4(&dir, &[("etc/hostname", b"vm")]),
    );
    // XFS (its superblock magic) on the only partition.
    let xfs = gpt_disk(&dir, "xfs.img", b"XFSB\0\0\x10\0");
    let cases: [(&Path, &str); 5] = [
        (
            &truncated,
            "is not a usable qcow2 image: l1_table_offset: 0x30000 (+16 bytes) lies past the end of the file",
        ),
        (&a, "the backing chain loops back to"),
        (&whole, "no partition table (GPT or MBR)"),
        (
            &no_config,
            "no boot configuration (grub.cfg, loader/entries/*.conf or extlinux.conf) on partition 1 (ext2/3/4)",
        ),
        (
            &xfs,
            "partition 1 holds XFS, which rvmm cannot read (ext2/3/4 and FAT only)",
        ),
    ];
    for (image, problem) in cases {
        let (code, stderr, stdout) = boot(image);
        assert_eq!(code, Some(2), "{}: {stderr}", image.display());
        assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
        let name = image.file_name().unwrap().to_str().unwrap();
        assert!(
            stderr.contains(name) && stderr.contains(problem),
            "{name}: {stderr}"
        );
        assert!(
            !stderr.contains("nonexistent/kvm"),
            "got as far as KVM: {stderr}"
        );
        assert!(stdout.is_empty(), "the guest printed: {stdout}");
    }
}
