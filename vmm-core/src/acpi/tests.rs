use std::path::Path;
use std::process::Command;

use vm_memory::GuestAddress;

use super::*;
use crate::memory::{MemoryLayout, create_guest_memory};

fn platform(pci: bool) -> AcpiPlatform {
    AcpiPlatform {
        vcpus: 2,
        pci: pci.then(|| PciHostBridge {
            ecam: 0xe000_0000,
            mmio32: 0xc000_0000..0xd000_0000,
            mmio64: 0x1_0000_0000..0x11_0000_0000,
            intx: vec![(1, 16), (2, 17)],
        }),
        virtio_mmio: if pci {
            vec![]
        } else {
            vec![VirtioMmioDevice {
                base: 0xd000_0000,
                size: 0x1000,
                irq: 5,
            }]
        },
    }
}

/// The tables as the guest finds them: from the RSDP through the XSDT, by signature.
fn tables(platform: &AcpiPlatform) -> Vec<([u8; 4], Vec<u8>)> {
    let mem = create_guest_memory(&MemoryLayout::new(64 << 20).unwrap()).unwrap();
    let rsdp_addr = write_acpi_tables(&mem, platform).unwrap();
    assert_eq!(rsdp_addr, 0xe_0000);
    let mut rsdp = [0u8; 36];
    mem.read_slice(&mut rsdp, GuestAddress(rsdp_addr)).unwrap();
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP checksum");
    assert_eq!(sum(&rsdp), 0, "RSDP extended checksum");
    let read = |addr: u64| {
        let mut header = [0u8; 8];
        mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
        let len = u32::from_le_bytes(header[4..8].try_into().unwrap()) as usize;
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
        assert_eq!(
            sum(&table),
            0,
            "{} checksum",
            String::from_utf8_lossy(&table[..4])
        );
        assert!(addr + len as u64 <= BIOS_END);
        table
    };
    let xsdt = read(u64::from_le_bytes(rsdp[24..32].try_into().unwrap()));
    let mut found = vec![(*b"XSDT", xsdt.clone())];
    for pointer in xsdt[36..].chunks(8) {
        let table = read(u64::from_le_bytes(pointer.try_into().unwrap()));
        if &table[..4] == b"FACP" {
            let dsdt = u64::from_le_bytes(table[140..148].try_into().unwrap());
            found.push((*b"DSDT", read(dsdt)));
            let facs = u64::from_le_bytes(table[132..140].try_into().unwrap());
            assert_eq!(facs % 64, 0, "FACS alignment");
            let mut signature = [0u8; 4];
            mem.read_slice(&mut signature, GuestAddress(facs)).unwrap();
            assert_eq!(&signature, b"FACS");
        }
        found.push((table[..4].try_into().unwrap(), table));
    }
    found
}

fn sum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
}

fn table<'a>(tables: &'a [([u8; 4], Vec<u8>)], signature: &[u8; 4]) -> Option<&'a [u8]> {
    tables
        .iter()
        .find(|(s, _)| s == signature)
        .map(|(_, t)| t.as_slice())
}

fn u16_at(table: &[u8], offset: usize) -> u16 {
    u16::from_le_bytes(table[offset..offset + 2].try_into().unwrap())
}

fn u32_at(table: &[u8], offset: usize) -> u32 {
    u32::from_le_bytes(table[offset..offset + 4].try_into().unwrap())
}

#[test]
fn the_xsdt_reaches_fadt_madt_and_with_pci_mcfg() {
    let with_pci = tables(&platform(true));
    let signatures: Vec<&[u8; 4]> = with_pci.iter().map(|(s, _)| s).collect();
    assert_eq!(signatures, [b"XSDT", b"DSDT", b"FACP", b"APIC", b"MCFG"]);
    let mcfg = table(&with_pci, b"MCFG").unwrap();
    assert_eq!(
        u64::from_le_bytes(mcfg[44..52].try_into().unwrap()),
        0xe000_0000
    );
    assert_eq!((mcfg[54], mcfg[55]), (0, 0), "bus 0 only");
    assert!(table(&tables(&platform(false)), b"MCFG").is_none());
}

#[test]
fn the_fadt_describes_the_pm1_blocks_sci_and_reset_register() {
    let tables = tables(&platform(true));
    let fadt = table(&tables, b"FACP").unwrap();
    assert_eq!(u16_at(fadt, 46), 9, "SCI_INT");
    assert_eq!(
        u32_at(fadt, 48),
        0,
        "no SMI command port: ACPI mode from the start"
    );
    assert_eq!(u32_at(fadt, 56), 0x600, "PM1a_EVT_BLK");
    assert_eq!(u32_at(fadt, 64), 0x604, "PM1a_CNT_BLK");
    assert_eq!((fadt[88], fadt[89]), (4, 2), "PM1_EVT_LEN, PM1_CNT_LEN");
    assert_eq!(u16_at(fadt, 109), IAPC_BOOT_ARCH);
    let flags = u32_at(fadt, 112);
    assert_eq!(flags & 1 << 4, 0, "fixed power button");
    assert_ne!(flags & 1 << 10, 0, "reset register supported");
    assert_eq!(flags & 1 << 20, 0, "not hardware-reduced");
    assert_eq!(
        (
            fadt[116],
            u64::from_le_bytes(fadt[120..128].try_into().unwrap())
        ),
        (1, 0x606)
    );
    assert_eq!(fadt[128], 1, "reset value");
}

#[test]
fn the_madt_has_every_cpu_the_ioapic_and_an_edge_sci() {
    let tables = tables(&platform(true));
    let madt = table(&tables, b"APIC").unwrap();
    assert_eq!(u32_at(madt, 36), 0xfee0_0000);
    let mut entries = Vec::new();
    let mut at = 44;
    while at < madt.len() {
        entries.push(madt[at..at + madt[at + 1] as usize].to_vec());
        at += madt[at + 1] as usize;
    }
    let kinds: Vec<u8> = entries.iter().map(|e| e[0]).collect();
    assert_eq!(kinds, [0, 0, 1, 2]);
    assert_eq!((entries[1][2], entries[1][3]), (1, 1), "CPU 1, APIC ID 1");
    assert_eq!(entries[2][2], 2, "IOAPIC ID as in the MP table");
    assert_eq!(u32_at(&entries[2], 4), 0xfec0_0000);
    assert_eq!(entries[3][3], 9, "SCI source");
    assert_eq!(
        (u32_at(&entries[3], 4), u16_at(&entries[3], 8)),
        (9, 0b0101)
    );
}

/// ACPICA's disassembler (Debian's acpica-tools), the tool firmware writers check tables
/// with: it must read every table without error and find what rvmm put in them.
fn disassemble(dir: &Path, signature: &[u8; 4], bytes: &[u8]) -> Option<String> {
    let name = String::from_utf8_lossy(signature).to_lowercase();
    let file = dir.join(format!("{name}.dat"));
    std::fs::write(&file, bytes).unwrap();
    let out = match Command::new("iasl").arg("-d").arg(&file).output() {
        Ok(out) => out,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("iasl (acpica-tools) is needed under CI=true: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED the ACPICA check: iasl: {e}");
            return None;
        }
    };
    let log =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "iasl -d {name}: {log}");
    assert!(!log.contains("Error"), "iasl -d {name}: {log}");
    Some(std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap())
}

#[test]
fn acpica_disassembles_every_table_and_finds_the_devices() {
    let dir = std::env::temp_dir().join(format!("rvmm-acpi-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for pci in [true, false] {
        for (signature, bytes) in tables(&platform(pci)) {
            let Some(text) = disassemble(&dir, &signature, &bytes) else {
                std::fs::remove_dir_all(&dir).unwrap();
                return;
            };
            match &signature {
                b"DSDT" => {
                    for wanted in ["_S5_", "PNP0501", "PNP0303", "IO (Decode16,"] {
                        assert!(text.contains(wanted), "{wanted} missing:\n{text}");
                    }
                    let pci_parts = ["PNP0A08", "_PRT", "0x0002FFFF", "0x11\n", "QWordMemory"];
                    for wanted in pci_parts {
                        assert_eq!(text.contains(wanted), pci, "{wanted}:\n{text}");
                    }
                    assert_eq!(text.contains("LNRO0005"), !pci, "{text}");
                }
                b"FACP" => {
                    assert!(
                        text.contains("PM1A Event Block Address : 00000600"),
                        "{text}"
                    );
                    assert!(text.contains("Reset Register Supported (V2) : 1"), "{text}");
                }
                b"APIC" => {
                    assert!(text.contains("Interrupt Source Override"), "{text}");
                }
                _ => {}
            }
        }
    }
    std::fs::remove_dir_all(&dir).unwrap();
}
