//! Loading the kernel, initrd and command line, and writing the boot protocol's structures.

use std::fs::File;
use std::io::{Read, Seek};
use std::path::{Path, PathBuf};

use vm_memory::ReadVolatile;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability, load_cmdline};
use rvmm_devices::cast::usize_from;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, PVH_INFO_START, PVH_MEMMAP_START,
    PVH_MODLIST_START, ZERO_PAGE_START, below_4g,
};
use crate::memory::{GuestMemoryMmap, MemoryLayout};
use crate::regs::BootEntry;

const ELF_MAGIC: &[u8; 4] = b"\x7fELF";
const BZIMAGE_MAGIC_OFFSET: usize = 0x202;
const BZIMAGE_MAGIC: &[u8; 4] = b"HdrS";
// The bzImage 64-bit entry is 0x200 past the protected-mode kernel's start.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
// Keep the initrd under 2 GiB: every kernel's initrd_addr_max allows that.
const INITRD_MAX_END: u64 = 0x8000_0000;
const PAGE_SIZE: u64 = 4096;
// How many E820 entries fit in the zero page.
const E820_MAX_ENTRIES: usize = 128;

/// Errors loading what the guest boots.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened or read.
    #[error("Cannot read kernel {}", path.display())]
    ReadKernel {
        /// Kernel path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is not a kernel rvmm can boot.
    #[error("Kernel {} is neither an x86_64 ELF vmlinux nor a bzImage", path.display())]
    NotAKernel {
        /// Kernel path.
        path: PathBuf,
    },
    /// linux-loader rejected the kernel. Its errors print their own causes, so the cause is
    /// shown here rather than chained (the chain would repeat it).
    #[error("Cannot load kernel {}: {cause}", path.display())]
    LoadKernel {
        /// Kernel path.
        path: PathBuf,
        /// Cause.
        cause: linux_loader::loader::Error,
    },
    /// The initrd cannot be opened or read.
    #[error("Cannot read initrd {}", path.display())]
    ReadInitrd {
        /// Initrd path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The initrd does not fit between the kernel and the end of low memory.
    #[error("Initrd {} ({size} bytes) does not fit in guest memory ({room} bytes free below 2 GiB)", path.display())]
    InitrdTooLarge {
        /// Initrd path.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Room left.
        room: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("Cannot copy initrd {} into guest memory", path.display())]
    CopyInitrd {
        /// Initrd path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The command line is invalid or too long.
    #[error("Invalid kernel command line")]
    Cmdline(#[source] linux_loader::cmdline::Error),
    /// Writing the command line into guest memory failed.
    #[error("Cannot write the kernel command line to guest memory")]
    WriteCmdline(#[source] linux_loader::loader::Error),
    /// Writing boot_params or hvm_start_info failed.
    #[error("Cannot write the boot parameters to guest memory")]
    WriteBootParams(#[source] linux_loader::configurator::Error),
}

/// The loaded kernel.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// How vCPU 0 enters it.
    pub entry: BootEntry,
    /// First byte after the kernel image.
    pub end: u64,
    /// The bzImage's setup header, to copy into boot_params.
    pub setup_header: Option<setup_header>,
}

/// Where the initrd was put.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdRegion {
    /// Guest address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
}

enum KernelFormat {
    Elf,
    BzImage,
}

fn kernel_format(path: &Path, file: &mut impl Read) -> Result<KernelFormat, BootError> {
    let mut head = [0u8; BZIMAGE_MAGIC_OFFSET + 4];
    let mut filled = 0;
    while filled < head.len() {
        match file.read(&mut head[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(source) => {
                return Err(BootError::ReadKernel {
                    path: path.to_owned(),
                    source,
                });
            }
        }
    }
    if filled >= 4 && &head[..4] == ELF_MAGIC {
        Ok(KernelFormat::Elf)
    } else if filled == head.len() && &head[BZIMAGE_MAGIC_OFFSET..] == BZIMAGE_MAGIC {
        Ok(KernelFormat::BzImage)
    } else {
        Err(BootError::NotAKernel {
            path: path.to_owned(),
        })
    }
}

/// Loads an ELF vmlinux (PVH entry when it has the PVH note) or a bzImage at 1 MiB.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let mut file = File::open(path).map_err(|source| BootError::ReadKernel {
        path: path.to_owned(),
        source,
    })?;
    load_kernel_from(mem, &mut file, path)
}

/// Loads a kernel from `image` (a file, or bytes read out of a disk), named `path` in
/// errors.
pub fn load_kernel_from<F: Read + ReadVolatile + Seek>(
    mem: &GuestMemoryMmap,
    file: &mut F,
    path: &Path,
) -> Result<LoadedKernel, BootError> {
    let load_err = |cause| BootError::LoadKernel {
        path: path.to_owned(),
        cause,
    };
    file.rewind().map_err(|source| BootError::ReadKernel {
        path: path.to_owned(),
        source,
    })?;
    let himem = Some(GuestAddress(HIMEM_START));
    match kernel_format(path, file)? {
        KernelFormat::Elf => {
            let loaded = Elf::load(mem, None, file, himem).map_err(load_err)?;
            let entry = match loaded.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => BootEntry::Pvh(addr),
                _ => BootEntry::Linux64(loaded.kernel_load),
            };
            Ok(LoadedKernel {
                entry,
                end: loaded.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let loaded = BzImage::load(mem, None, file, himem).map_err(load_err)?;
            Ok(LoadedKernel {
                entry: BootEntry::Linux64(GuestAddress(
                    loaded.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                )),
                end: loaded.kernel_end,
                setup_header: loaded.setup_header,
            })
        }
    }
}

/// Where an initrd of `size` bytes goes: page-aligned, as high as possible below 2 GiB and the
/// end of low RAM, above the kernel.
pub fn initrd_placement(layout: &MemoryLayout, kernel_end: u64, size: u64) -> Option<u64> {
    let top = layout.low_ram_end().min(INITRD_MAX_END);
    let addr = top.checked_sub(size)? & !(PAGE_SIZE - 1);
    (addr >= kernel_end).then_some(addr)
}

/// [`initrd_placement`], or the error naming the initrd and the room there is.
fn place_initrd(
    layout: &MemoryLayout,
    kernel_end: u64,
    size: u64,
    path: &Path,
) -> Result<u64, BootError> {
    let room = layout
        .low_ram_end()
        .min(INITRD_MAX_END)
        .saturating_sub(kernel_end);
    initrd_placement(layout, kernel_end, size).ok_or(BootError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        room,
    })
}

/// Copies the initrd into guest memory.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    kernel_end: u64,
    path: &Path,
) -> Result<InitrdRegion, BootError> {
    let read_err = |source| BootError::ReadInitrd {
        path: path.to_owned(),
        source,
    };
    let mut file = File::open(path).map_err(read_err)?;
    let size = file.metadata().map_err(read_err)?.len();
    let addr = place_initrd(layout, kernel_end, size, path)?;
    mem.read_exact_volatile_from(GuestAddress(addr), &mut file, usize_from(size))
        .map_err(|source| BootError::CopyInitrd {
            path: path.to_owned(),
            source,
        })?;
    Ok(InitrdRegion { addr, size })
}

/// Copies an initrd held in memory (read out of a disk) into guest memory.
pub fn load_initrd_bytes(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    kernel_end: u64,
    bytes: &[u8],
    path: &Path,
) -> Result<InitrdRegion, BootError> {
    let size = bytes.len() as u64;
    let addr = place_initrd(layout, kernel_end, size, path)?;
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| BootError::CopyInitrd {
            path: path.to_owned(),
            source,
        })?;
    Ok(InitrdRegion { addr, size })
}

/// Builds the kernel command line from the user's text and what the VM builder adds (device
/// declarations); fails when it exceeds Linux's 2 KiB.
pub fn build_cmdline(user: &str, extra: &[String]) -> Result<Cmdline, BootError> {
    let mut cmdline = Cmdline::new(CMDLINE_MAX_SIZE).map_err(BootError::Cmdline)?;
    let user = user.trim();
    if !user.is_empty() {
        cmdline.insert_str(user).map_err(BootError::Cmdline)?;
    }
    for item in extra {
        cmdline.insert_str(item).map_err(BootError::Cmdline)?;
    }
    Ok(cmdline)
}

/// Writes the command line where the boot structures point; returns its size with the NUL.
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &Cmdline) -> Result<u32, BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline).map_err(BootError::WriteCmdline)?;
    let len = cmdline
        .as_cstring()
        .map_err(BootError::Cmdline)?
        .as_bytes_with_nul()
        .len();
    #[allow(
        clippy::cast_possible_truncation,
        reason = "at most CMDLINE_MAX_SIZE (2 KiB)"
    )]
    let len = len as u32;
    Ok(len)
}

/// What the boot structures tell the kernel about the platform beyond RAM.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PlatformInfo {
    /// The ACPI RSDP's address, when the VM has ACPI tables.
    pub acpi_rsdp: Option<u64>,
    /// Ranges (`(start, length)`) the memory map reserves besides the BIOS area: the PCIe ECAM
    /// window, which Linux uses only when it is reserved.
    pub reserved: Vec<(u64, u64)>,
}

/// Fills Linux's `boot_params` for the 64-bit entry.
pub fn linux_boot_params(
    layout: &MemoryLayout,
    kernel: &LoadedKernel,
    cmdline_size: u32,
    initrd: Option<InitrdRegion>,
    platform: &PlatformInfo,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    params.hdr.cmd_line_ptr = below_4g(CMDLINE_START);
    params.hdr.cmdline_size = cmdline_size;
    if let Some(initrd) = initrd {
        // Placed below INITRD_MAX_END by `place_initrd`.
        params.hdr.ramdisk_image = below_4g(initrd.addr);
        params.hdr.ramdisk_size = below_4g(initrd.size);
    }
    params.acpi_rsdp_addr = platform.acpi_rsdp.unwrap_or(0);
    let map = layout.e820_with_reserved(&platform.reserved);
    for (slot, entry) in params
        .e820_table
        .iter_mut()
        .zip(map.iter().take(E820_MAX_ENTRIES))
    {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind,
        };
    }
    #[allow(
        clippy::cast_possible_truncation,
        reason = "at most E820_MAX_ENTRIES (128)"
    )]
    let entries = map.len().min(E820_MAX_ENTRIES) as u8;
    params.e820_entries = entries;
    params
}

/// Writes the boot structures for `kernel`'s entry: `boot_params` or PVH `hvm_start_info`.
pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    layout: &MemoryLayout,
    kernel: &LoadedKernel,
    cmdline_size: u32,
    initrd: Option<InitrdRegion>,
    platform: &PlatformInfo,
) -> Result<(), BootError> {
    match kernel.entry {
        BootEntry::Linux64(_) => {
            let params = linux_boot_params(layout, kernel, cmdline_size, initrd, platform);
            LinuxBootConfigurator::write_bootparams(
                &BootParams::new(&params, GuestAddress(ZERO_PAGE_START)),
                mem,
            )
        }
        BootEntry::Pvh(_) => {
            let memmap: Vec<hvm_memmap_table_entry> = layout
                .e820_with_reserved(&platform.reserved)
                .iter()
                .map(|e| hvm_memmap_table_entry {
                    addr: e.addr,
                    size: e.size,
                    type_: e.kind,
                    reserved: 0,
                })
                .collect();
            let modules: Vec<hvm_modlist_entry> = initrd
                .iter()
                .map(|i| hvm_modlist_entry {
                    paddr: i.addr,
                    size: i.size,
                    ..Default::default()
                })
                .collect();
            #[allow(
                clippy::cast_possible_truncation,
                reason = "one initrd, a short e820 map"
            )]
            let (nr_modules, memmap_entries) = (modules.len() as u32, memmap.len() as u32);
            let start_info = hvm_start_info {
                magic: XEN_HVM_START_MAGIC_VALUE,
                version: 1,
                nr_modules,
                modlist_paddr: PVH_MODLIST_START,
                cmdline_paddr: CMDLINE_START,
                memmap_paddr: PVH_MEMMAP_START,
                memmap_entries,
                rsdp_paddr: platform.acpi_rsdp.unwrap_or(0),
                ..Default::default()
            };
            let mut params = BootParams::new(&start_info, GuestAddress(PVH_INFO_START));
            params.set_sections(&memmap, GuestAddress(PVH_MEMMAP_START));
            if !modules.is_empty() {
                params.set_modules(&modules, GuestAddress(PVH_MODLIST_START));
            }
            PvhBootConfigurator::write_bootparams(&params, mem)
        }
    }
    .map_err(BootError::WriteBootParams)
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, reason = "test values")]
mod tests {
    use std::io::Write;

    use super::*;
    use crate::memory::create_guest_memory;

    const MIB: u64 = 1 << 20;

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("rvmm-boot-{}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    #[test]
    fn a_file_that_is_no_kernel_is_named_in_the_error() {
        let layout = MemoryLayout::new(64 * MIB).unwrap();
        let mem = create_guest_memory(&layout).unwrap();
        let path = temp_file("garbage", &[0x55; 4096]);
        let err = load_kernel(&mem, &path).unwrap_err();
        assert!(matches!(err, BootError::NotAKernel { .. }));
        assert!(err.to_string().contains(path.to_str().unwrap()));
        let empty = temp_file("empty", &[]);
        assert!(matches!(
            load_kernel(&mem, &empty),
            Err(BootError::NotAKernel { .. })
        ));
        std::fs::remove_file(path).unwrap();
        std::fs::remove_file(empty).unwrap();
    }

    #[test]
    fn a_truncated_elf_is_rejected_by_the_loader() {
        let layout = MemoryLayout::new(64 * MIB).unwrap();
        let mem = create_guest_memory(&layout).unwrap();
        let path = temp_file("short-elf", b"\x7fELF\x02\x01\x01");
        let err = load_kernel(&mem, &path).unwrap_err();
        assert!(matches!(err, BootError::LoadKernel { .. }), "{err:?}");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn missing_kernel_is_a_read_error_naming_the_path() {
        let layout = MemoryLayout::new(64 * MIB).unwrap();
        let mem = create_guest_memory(&layout).unwrap();
        let err = load_kernel(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"));
    }

    #[test]
    fn initrd_goes_high_page_aligned_and_above_the_kernel() {
        let layout = MemoryLayout::new(64 * MIB).unwrap();
        let addr = initrd_placement(&layout, 2 * MIB, 1_000_000).unwrap();
        assert_eq!(addr % PAGE_SIZE, 0);
        assert!(addr + 1_000_000 <= 64 * MIB);
        assert!(addr >= 2 * MIB);
        assert_eq!(initrd_placement(&layout, 60 * MIB, 8 * MIB), None);
        let big = MemoryLayout::new(4 << 30).unwrap();
        assert!(initrd_placement(&big, 2 * MIB, MIB).unwrap() + MIB <= INITRD_MAX_END);
    }

    #[test]
    fn initrd_is_copied_into_guest_memory() {
        let layout = MemoryLayout::new(64 * MIB).unwrap();
        let mem = create_guest_memory(&layout).unwrap();
        let path = temp_file("initrd", b"070701 fake cpio");
        let region = load_initrd(&mem, &layout, 2 * MIB, &path).unwrap();
        let mut back = [0u8; 16];
        mem.read_slice(&mut back, GuestAddress(region.addr))
            .unwrap();
        assert_eq!(&back, b"070701 fake cpio");
        assert_eq!(region.size, 16);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn oversized_initrd_is_an_error_naming_the_path() {
        let layout = MemoryLayout::new(16 * MIB).unwrap();
        let mem = create_guest_memory(&layout).unwrap();
        let path = temp_file("big-initrd", &vec![0u8; 15 * MIB as usize]);
        let err = load_initrd(&mem, &layout, 2 * MIB, &path).unwrap_err();
        assert!(matches!(err, BootError::InitrdTooLarge { .. }));
        assert!(err.to_string().contains("big-initrd"));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn command_line_joins_user_text_and_device_declarations() {
        let extra = vec!["virtio_mmio.device=4K@0xd0000000:5".to_string()];
        let cmdline = build_cmdline(" console=ttyS0 ", &extra).unwrap();
        assert_eq!(
            cmdline.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 virtio_mmio.device=4K@0xd0000000:5"
        );
        assert!(build_cmdline(&"x".repeat(CMDLINE_MAX_SIZE), &[]).is_err());
    }

    #[test]
    fn boot_params_carry_cmdline_initrd_and_e820() {
        let layout = MemoryLayout::new(64 * MIB).unwrap();
        let kernel = LoadedKernel {
            entry: BootEntry::Linux64(GuestAddress(MIB)),
            end: 2 * MIB,
            setup_header: None,
        };
        let initrd = InitrdRegion {
            addr: 32 * MIB,
            size: 1234,
        };
        let platform = PlatformInfo {
            acpi_rsdp: Some(0xe_0000),
            reserved: vec![(0xe000_0000, MIB)],
        };
        let params = linux_boot_params(&layout, &kernel, 42, Some(initrd), &platform);
        assert_eq!({ params.hdr.boot_flag }, KERNEL_BOOT_FLAG_MAGIC);
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ params.hdr.cmdline_size }, 42);
        assert_eq!({ params.hdr.ramdisk_image }, 32 * MIB as u32);
        assert_eq!({ params.hdr.ramdisk_size }, 1234);
        assert_eq!({ params.acpi_rsdp_addr }, 0xe_0000);
        assert_eq!(params.e820_entries, 4);
        let ram = params.e820_table[2];
        assert_eq!(
            ({ ram.addr }, { ram.size }, { ram.r#type }),
            (MIB, 63 * MIB, 1)
        );
        let ecam = params.e820_table[3];
        assert_eq!(
            ({ ecam.addr }, { ecam.size }, { ecam.r#type }),
            (0xe000_0000, MIB, 2)
        );
    }

    #[test]
    fn pvh_start_info_is_written_with_memmap_and_initrd_module() {
        let layout = MemoryLayout::new(64 * MIB).unwrap();
        let mem = create_guest_memory(&layout).unwrap();
        let kernel = LoadedKernel {
            entry: BootEntry::Pvh(GuestAddress(MIB)),
            end: 2 * MIB,
            setup_header: None,
        };
        let initrd = InitrdRegion {
            addr: 32 * MIB,
            size: 4096,
        };
        let platform = PlatformInfo {
            acpi_rsdp: Some(0xe_0000),
            reserved: vec![],
        };
        write_boot_params(&mem, &layout, &kernel, 10, Some(initrd), &platform).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.rsdp_paddr, 0xe_0000);
        assert_eq!(info.memmap_entries, 3);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(PVH_MODLIST_START)).unwrap();
        assert_eq!((module.paddr, module.size), (32 * MIB, 4096));
        let ram: hvm_memmap_table_entry = mem
            .read_obj(GuestAddress(PVH_MEMMAP_START + 2 * 24))
            .unwrap();
        assert_eq!((ram.addr, ram.size, ram.type_), (MIB, 63 * MIB, 1));
    }
}
