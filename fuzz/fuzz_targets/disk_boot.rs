//! Booting from an untrusted disk: partition tables (GPT, MBR with logical partitions),
//! ext2/3/4 and FAT filesystems, and the boot configuration on them, through
//! `disk_boot::find_boot` on an in-memory 8 MiB raw disk.
//!
//! The input is sparse: records of a sector index (u32, little-endian, modulo the disk) and
//! 512 bytes for that sector; everything else is zero. The seeds are real disks (sfdisk,
//! mkfs.ext4 -d, mkfs.vfat + mtools) holding grub.cfg, BLS and extlinux configurations.
//!
//! Oracles: nothing panics, hangs or allocates without bound (libFuzzer's RSS limit); a disk
//! that boots yields a kernel with the Linux boot protocol or an ELF header, and a command
//! line that names a serial console.

#![no_main]

use std::path::Path;

use rvmm_devices::image::{DiskImage, ImageFormat, MemStorage};
use libfuzzer_sys::fuzz_target;
use rvmm_core::disk_boot::{find_boot, kernel};

const SECTORS: u32 = 16384;

fuzz_target!(|data: &[u8]| {
    let mut disk = vec![0u8; SECTORS as usize * 512];
    for record in data.chunks_exact(516) {
        let sector = u32::from_le_bytes(record[..4].try_into().unwrap()) % SECTORS;
        let at = sector as usize * 512;
        disk[at..at + 512].copy_from_slice(&record[4..]);
    }
    let len = disk.len();
    let image = DiskImage::from_storage(
        Box::new(MemStorage::new(disk, len)),
        false,
        Some(ImageFormat::Raw),
        Path::new("fuzz.img"),
        |_, _, _| unreachable!("raw images have no backing file"),
    )
    .expect("a raw image in memory opens");
    if let Ok(boot) = find_boot(image) {
        assert_eq!(kernel::check(&boot.kernel), Ok(()));
        assert!(boot.cmdline.split_whitespace().any(|a| a.starts_with("console=ttyS")));
    }
});
