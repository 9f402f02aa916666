//! Disks made by the real tools (sfdisk, mkfs.ext4 -d, mkfs.vfat + mtools, qemu-img), in
//! the layouts distributions ship: Debian's grub.cfg on GPT + ext4, Fedora's /boot with
//! `blscfg` and grubenv, systemd-boot's ESP, extlinux on MBR. Without the tools the tests
//! skip with a reason (and fail under `CI=true`).

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

const MIB: u64 = 1 << 20;
const ROOT_UUID: &str = "4b1a2c3d-0e5f-4a6b-8c7d-9e0f1a2b3c4d";

struct TempDir(PathBuf);

impl TempDir {
    fn new(tag: &str) -> Self {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "rvmm-diskboot-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tools(test: &str) -> bool {
    let missing: Vec<&str> = ["sfdisk", "mkfs.ext4", "mkfs.vfat", "mcopy", "qemu-img"]
        .into_iter()
        .filter(|t| {
            Command::new(t).arg("--version").output().is_err()
                && Command::new(t).arg("-V").output().is_err()
        })
        .collect();
    if missing.is_empty() {
        return true;
    }
    assert!(
        std::env::var("CI").map_or(true, |v| v != "true"),
        "{test}: {missing:?} missing (fdisk, e2fsprogs, dosfstools, mtools, qemu-utils); CI=true requires them"
    );
    eprintln!("SKIPPED {test}: {missing:?} not installed");
    false
}

fn run(program: &str, args: &[&str]) {
    let out = Command::new(program).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A fake bzImage: the boot protocol's `HdrS` at 0x202 and a marker.
fn bzimage(marker: &str) -> Vec<u8> {
    let mut image = vec![0u8; 8192];
    image[0x202..0x206].copy_from_slice(b"HdrS");
    image[0x1000..0x1000 + marker.len()].copy_from_slice(marker.as_bytes());
    image
}

enum Fs<'a> {
    Ext4(&'a [(&'a str, Vec<u8>)]),
    Fat(&'a [(&'a str, Vec<u8>)]),
    /// Raw bytes at the partition's start (XFS's magic, say).
    Raw(&'a [u8]),
}

/// A disk with `label` (`gpt` or `dos`) and one partition per entry, 8 MiB each.
fn disk(dir: &TempDir, label: &str, parts: &[Fs<'_>]) -> PathBuf {
    let path = dir.0.join("disk.img");
    let size = (parts.len() as u64 * 8 + 2) * MIB;
    std::fs::write(&path, vec![0u8; size as usize]).unwrap();
    let mut script = format!("label: {label}\n");
    for (i, part) in parts.iter().enumerate() {
        let kind = match (label, part) {
            ("gpt", Fs::Fat(_)) => "U",
            ("gpt", _) => "L",
            (_, Fs::Fat(_)) => "c",
            _ => "83",
        };
        script += &format!("start={}, size={}, type={kind}\n", 2048 + i * 16384, 16384);
    }
    let mut child = Command::new("sfdisk")
        .args(["-q", path.to_str().unwrap()])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success());
    for (i, part) in parts.iter().enumerate() {
        let image = dir.0.join(format!("part{i}.img"));
        let _ = std::fs::remove_file(&image);
        match part {
            Fs::Ext4(files) => {
                let staging = dir.0.join(format!("staging{i}"));
                for (name, bytes) in *files {
                    let file = staging.join(name.trim_start_matches('/'));
                    std::fs::create_dir_all(file.parent().unwrap()).unwrap();
                    std::fs::write(file, bytes).unwrap();
                }
                std::fs::create_dir_all(&staging).unwrap();
                run(
                    "mkfs.ext4",
                    &[
                        "-q",
                        "-F",
                        "-U",
                        ROOT_UUID,
                        "-L",
                        "root",
                        "-d",
                        staging.to_str().unwrap(),
                        image.to_str().unwrap(),
                        "8M",
                    ],
                );
            }
            Fs::Fat(files) => {
                run(
                    "mkfs.vfat",
                    &["-C", "-i", "1234ABCD", image.to_str().unwrap(), "8192"],
                );
                let img = format!("-i{}", image.display());
                for (name, bytes) in *files {
                    let mut dir_path = String::new();
                    let parts: Vec<&str> = name.trim_start_matches('/').split('/').collect();
                    for d in &parts[..parts.len() - 1] {
                        dir_path += &format!("/{d}");
                        let _ = Command::new("mmd")
                            .args([&img, &format!("::{dir_path}")])
                            .output();
                    }
                    let local = dir.0.join("upload");
                    std::fs::write(&local, bytes).unwrap();
                    run(
                        "mcopy",
                        &["-o", &img, local.to_str().unwrap(), &format!("::{name}")],
                    );
                }
            }
            Fs::Raw(bytes) => {
                let mut content = bytes.to_vec();
                content.resize(MIB as usize, 0);
                std::fs::write(&image, content).unwrap();
            }
        }
        run(
            "dd",
            &[
                &format!("if={}", image.display()),
                &format!("of={}", path.display()),
                "bs=512",
                &format!("seek={}", 2048 + i * 16384),
                "conv=notrunc",
                "status=none",
            ],
        );
    }
    path
}

/// grub.cfg as Debian 12's grub-mkconfig writes it (trimmed of theme and os-prober parts).
fn debian_grub_cfg() -> String {
    format!(
        r#"#
# DO NOT EDIT THIS FILE
#
### BEGIN /etc/grub.d/00_header ###
if [ -s $prefix/grubenv ]; then
  set have_grubenv=true
  load_env
fi
if [ "${{next_entry}}" ] ; then
   set default="${{next_entry}}"
   set next_entry=
   save_env next_entry
   set boot_once=true
else
   set default="0"
fi

if [ x"${{feature_menuentry_id}}" = xy ]; then
  menuentry_id_option="--id"
else
  menuentry_id_option=""
fi

export menuentry_id_option

function savedefault {{
  if [ -z "${{boot_once}}" ]; then
    saved_entry="${{chosen}}"
    save_env saved_entry
  fi
}}
function load_video {{
  if [ x$feature_all_video_module = xy ]; then
    insmod all_video
  else
    insmod efi_gop
  fi
}}

terminal_output console
set timeout=5
### END /etc/grub.d/00_header ###

### BEGIN /etc/grub.d/10_linux ###
function gfxmode {{
	set gfxpayload="${{1}}"
}}
set linux_gfx_mode=
export linux_gfx_mode
menuentry 'Debian GNU/Linux' --class debian --class gnu-linux --class gnu --class os $menuentry_id_option 'gnulinux-simple-{ROOT_UUID}' {{
	load_video
	insmod gzio
	if [ x$grub_platform = xxen ]; then insmod xzio; insmod lzopio; fi
	insmod part_gpt
	insmod ext2
	search --no-floppy --fs-uuid --set=root {ROOT_UUID}
	echo	'Loading Linux 6.1.0-rvmm ...'
	linux	/boot/vmlinuz-6.1.0-rvmm root=UUID={ROOT_UUID} ro  quiet
	echo	'Loading initial ramdisk ...'
	initrd	/boot/initrd.img-6.1.0-rvmm
}}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-{ROOT_UUID}' {{
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-rvmm' --class debian $menuentry_id_option 'gnulinux-6.1.0-rvmm-advanced-{ROOT_UUID}' {{
		search --no-floppy --fs-uuid --set=root {ROOT_UUID}
		linux	/boot/vmlinuz-6.1.0-rvmm root=UUID={ROOT_UUID} ro single
		initrd	/boot/initrd.img-6.1.0-rvmm
	}}
	menuentry 'Debian GNU/Linux, with Linux 6.0.0-old' --class debian $menuentry_id_option 'gnulinux-6.0.0-old-advanced-{ROOT_UUID}' {{
		search --no-floppy --fs-uuid --set=root {ROOT_UUID}
		linux	/boot/vmlinuz-6.0.0-old root=UUID={ROOT_UUID} ro console=ttyS1,115200
		initrd	/boot/initrd.img-6.0.0-old
	}}
}}
### END /etc/grub.d/10_linux ###
"#
    )
}

fn debian_files(grubenv: Option<&str>) -> Vec<(&'static str, Vec<u8>)> {
    let mut files = vec![
        ("/boot/vmlinuz-6.1.0-rvmm", bzimage("kernel-new")),
        ("/boot/initrd.img-6.1.0-rvmm", b"initrd-new".to_vec()),
        ("/boot/vmlinuz-6.0.0-old", bzimage("kernel-old")),
        ("/boot/initrd.img-6.0.0-old", b"initrd-old".to_vec()),
        ("/boot/grub/grub.cfg", debian_grub_cfg().into_bytes()),
    ];
    if let Some(env) = grubenv {
        files.push(("/boot/grub/grubenv", env.as_bytes().to_vec()));
    }
    files
}

fn marker(kernel: &[u8]) -> &str {
    std::str::from_utf8(&kernel[0x1000..0x100a]).unwrap()
}

#[test]
fn debian_gpt_ext4_boots_its_first_entry_raw_and_as_qcow2() {
    if !tools("debian layout") {
        return;
    }
    let dir = TempDir::new("debian");
    let files = debian_files(None);
    // GPT with a BIOS boot partition first, as Debian's cloud images have.
    let raw = disk(&dir, "gpt", &[Fs::Raw(&[0; 512]), Fs::Ext4(&files)]);
    let qcow2 = dir.0.join("disk.qcow2");
    run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-O",
            "qcow2",
            raw.to_str().unwrap(),
            qcow2.to_str().unwrap(),
        ],
    );
    for path in [&raw, &qcow2] {
        let boot = boot_from_disk(path, None).unwrap();
        assert_eq!(marker(&boot.kernel), "kernel-new");
        assert_eq!(boot.initrd.as_deref(), Some(&b"initrd-new"[..]));
        assert_eq!(
            boot.cmdline,
            format!("root=UUID={ROOT_UUID} ro quiet console=ttyS0")
        );
        assert!(
            boot.source.contains("partition 2 /boot/grub/grub.cfg")
                && boot.source.contains("'Debian GNU/Linux'"),
            "{}",
            boot.source
        );
    }
}

#[test]
fn grubenv_saved_entry_picks_a_submenu_entry_and_keeps_its_serial_console() {
    if !tools("grubenv saved entry") {
        return;
    }
    let dir = TempDir::new("saved");
    let env = format!(
        "# GRUB Environment Block\nsaved_entry=gnulinux-advanced-{ROOT_UUID}>gnulinux-6.0.0-old-advanced-{ROOT_UUID}\nnext_entry=\n#####"
    );
    let mut files = debian_files(Some(&env));
    // `set default=saved` instead of "0".
    let cfg = debian_grub_cfg().replace("   set default=\"0\"", "   set default=\"saved\"");
    files[4].1 = cfg.into_bytes();
    let raw = disk(&dir, "gpt", &[Fs::Ext4(&files)]);
    let boot = boot_from_disk(&raw, None).unwrap();
    assert_eq!(marker(&boot.kernel), "kernel-old");
    assert_eq!(
        boot.cmdline,
        format!("root=UUID={ROOT_UUID} ro console=ttyS1,115200")
    );
}

#[test]
fn fedora_blscfg_with_kernelopts_boots_the_newest_bls_entry() {
    if !tools("fedora layout") {
        return;
    }
    let dir = TempDir::new("fedora");
    let grub_cfg = "set pager=1\nif [ -f ${config_directory}/grubenv ]; then\n  load_env -f ${config_directory}/grubenv\nelif [ -s $prefix/grubenv ]; then\n  load_env\nfi\nif [ \"${next_entry}\" ] ; then\n   set default=\"${next_entry}\"\nelse\n   set default=\"${saved_entry}\"\nfi\ninsmod blscfg\nblscfg\n";
    let entry = |v: &str| {
        format!(
            "title Fedora Linux ({v})\nversion {v}\nlinux /vmlinuz-{v}\ninitrd /initramfs-{v}.img\noptions $kernelopts\ngrub_users $grub_users\n"
        )
    };
    let boot_files = [
        ("/grub2/grub.cfg", grub_cfg.as_bytes().to_vec()),
        (
            "/grub2/grubenv",
            b"# GRUB Environment Block\nkernelopts=root=UUID=abc ro rhgb quiet\n###".to_vec(),
        ),
        (
            "/loader/entries/f1-6.2.9-300.fc38.x86_64.conf",
            entry("6.2.9-300.fc38.x86_64").into_bytes(),
        ),
        (
            "/loader/entries/f1-6.10.1-200.fc38.x86_64.conf",
            entry("6.10.1-200.fc38.x86_64").into_bytes(),
        ),
        ("/vmlinuz-6.2.9-300.fc38.x86_64", bzimage("kernel-old")),
        ("/vmlinuz-6.10.1-200.fc38.x86_64", bzimage("kernel-new")),
        (
            "/initramfs-6.10.1-200.fc38.x86_64.img",
            b"initrd-new".to_vec(),
        ),
        (
            "/initramfs-6.2.9-300.fc38.x86_64.img",
            b"initrd-old".to_vec(),
        ),
    ];
    let raw = disk(
        &dir,
        "gpt",
        &[
            Fs::Fat(&[]),
            Fs::Ext4(&boot_files),
            Fs::Ext4(&[("/etc/fstab", b"#".to_vec())]),
        ],
    );
    let boot = boot_from_disk(&raw, None).unwrap();
    assert_eq!(marker(&boot.kernel), "kernel-new", "{}", boot.source);
    assert_eq!(boot.initrd.as_deref(), Some(&b"initrd-new"[..]));
    assert_eq!(boot.cmdline, "root=UUID=abc ro rhgb quiet console=ttyS0");
}

#[test]
fn systemd_boot_esp_on_mbr_and_extlinux_are_found() {
    if !tools("esp and extlinux") {
        return;
    }
    let dir = TempDir::new("esp");
    let esp = [
        ("/loader/loader.conf", b"timeout 3\ndefault arch-lts.conf\n".to_vec()),
        ("/loader/entries/arch.conf", b"title Arch\nlinux /vmlinuz-linux\ninitrd /initramfs-linux.img\noptions root=LABEL=root rw\n".to_vec()),
        ("/loader/entries/arch-lts.conf", b"title Arch LTS\nlinux /vmlinuz-lts\ninitrd /intel-ucode.img\ninitrd /initramfs-lts.img\noptions root=LABEL=root rw console=ttyS0,115200\n".to_vec()),
        ("/vmlinuz-lts", bzimage("kernel-lts")),
        ("/vmlinuz-linux", bzimage("kernel-new")),
        ("/intel-ucode.img", b"ucode+".to_vec()),
        ("/initramfs-lts.img", b"initrd-lts".to_vec()),
    ];
    let raw = disk(&dir, "dos", &[Fs::Fat(&esp)]);
    let boot = boot_from_disk(&raw, None).unwrap();
    assert_eq!(marker(&boot.kernel), "kernel-lts");
    assert_eq!(boot.initrd.as_deref(), Some(&b"ucode+initrd-lts"[..]));
    assert_eq!(boot.cmdline, "root=LABEL=root rw console=ttyS0,115200");

    let dir = TempDir::new("extlinux");
    let ext = [
        ("/boot/extlinux/extlinux.conf", b"DEFAULT alpine\nLABEL alpine\n  MENU LABEL Alpine\n  LINUX vmlinuz-virt\n  INITRD initramfs-virt\n  APPEND root=/dev/vda1 modules=ext4 quiet\n".to_vec()),
        ("/boot/extlinux/vmlinuz-virt", bzimage("kernel-alp")),
        ("/boot/extlinux/initramfs-virt", b"initrd-alp".to_vec()),
    ];
    let raw = disk(&dir, "dos", &[Fs::Ext4(&ext)]);
    let boot = boot_from_disk(&raw, None).unwrap();
    assert_eq!(marker(&boot.kernel), "kernel-alp");
    assert_eq!(
        boot.cmdline,
        "root=/dev/vda1 modules=ext4 quiet console=ttyS0"
    );
}

fn problem(path: &Path) -> String {
    let err = boot_from_disk(path, None).unwrap_err();
    let mut text = err.to_string();
    let mut source = std::error::Error::source(&err);
    while let Some(s) = source {
        text += &format!(": {s}");
        source = s.source();
    }
    text
}

#[test]
fn disks_rvmm_cannot_boot_are_refused_naming_the_image_and_the_problem() {
    if !tools("refusals") {
        return;
    }
    let dir = TempDir::new("bad");
    // A whole-disk filesystem: no partition table.
    let whole = dir.0.join("whole.ext4");
    std::fs::write(&whole, vec![0u8; 4 << 20]).unwrap();
    run("mkfs.ext4", &["-q", "-F", whole.to_str().unwrap()]);
    let text = problem(&whole);
    assert!(
        text.contains("whole.ext4") && text.contains("no partition table"),
        "{text}"
    );
    // XFS on the only partition.
    let xfs = disk(&dir, "gpt", &[Fs::Raw(b"XFSB\0\0\x10\0")]);
    let text = problem(&xfs);
    assert!(
        text.contains("disk.img") && text.contains("partition 1 holds XFS"),
        "{text}"
    );
    // ext4 without any boot configuration.
    let dir = TempDir::new("noconf");
    let empty = disk(
        &dir,
        "gpt",
        &[Fs::Ext4(&[("/etc/hostname", b"x".to_vec())])],
    );
    assert!(
        problem(&empty).contains("no boot configuration"),
        "{}",
        problem(&empty)
    );
    // A UKI as the kernel.
    let dir = TempDir::new("uki");
    let mut uki = vec![0u8; 4096];
    uki[..2].copy_from_slice(b"MZ");
    uki[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
    uki[0x80..0x84].copy_from_slice(b"PE\0\0");
    uki[0x86..0x88].copy_from_slice(&1u16.to_le_bytes());
    uki[0x80 + 24..0x80 + 30].copy_from_slice(b".linux");
    let files = [
        (
            "/boot/extlinux/extlinux.conf",
            b"LABEL x\nKERNEL /boot/uki.efi\n".to_vec(),
        ),
        ("/boot/uki.efi", uki),
    ];
    let uki_disk = disk(&dir, "gpt", &[Fs::Ext4(&files)]);
    let text = problem(&uki_disk);
    assert!(
        text.contains("Unified Kernel Image") && text.contains("/boot/uki.efi"),
        "{text}"
    );
    // The entry's kernel is missing.
    let dir = TempDir::new("missing");
    let files = [(
        "/boot/extlinux/extlinux.conf",
        b"LABEL x\nKERNEL /boot/gone\n".to_vec(),
    )];
    let missing = disk(&dir, "gpt", &[Fs::Ext4(&files)]);
    assert!(
        problem(&missing).contains("kernel /boot/gone not found"),
        "{}",
        problem(&missing)
    );
}
