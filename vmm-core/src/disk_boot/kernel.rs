//! What kind of kernel image a boot entry names: a bzImage (or ELF vmlinux) rvmm can start
//! directly, or something it cannot, named in the error (an EFI-stub-only PE, a Unified
//! Kernel Image, a compressed image).

fn le16(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn le32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Whether `image` boots through the Linux boot protocol; else what it is.
pub fn check(image: &[u8]) -> Result<(), String> {
    if image.get(0x202..0x206) == Some(b"HdrS") {
        return Ok(());
    }
    if image.starts_with(b"\x7fELF") {
        return Ok(());
    }
    if image.starts_with(b"MZ") {
        return Err(if pe_sections(image).iter().any(|s| s == ".linux") {
            "a Unified Kernel Image (a PE with a .linux section), which rvmm cannot boot: it needs a kernel with the Linux boot protocol (bzImage)".into()
        } else {
            "an EFI-stub-only kernel (a PE without the Linux boot protocol), which rvmm cannot boot: it needs a bzImage".into()
        });
    }
    let compressed = [
        (&b"\x1f\x8b"[..], "gzip"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"\xfd7zXZ", "xz"),
    ];
    if let Some((_, name)) = compressed.iter().find(|(m, _)| image.starts_with(m)) {
        return Err(format!("a {name}-compressed image, not a bzImage"));
    }
    Err("not a Linux kernel (no bzImage header)".into())
}

/// The section names of a PE image (empty when it is no valid PE).
fn pe_sections(image: &[u8]) -> Vec<String> {
    let Some(pe) = le32(image, 0x3c).map(|o| o as usize) else {
        return Vec::new();
    };
    if image.get(pe..pe + 4) != Some(b"PE\0\0") {
        return Vec::new();
    }
    let (Some(count), Some(optional)) = (le16(image, pe + 6), le16(image, pe + 20)) else {
        return Vec::new();
    };
    let table = pe + 24 + usize::from(optional);
    (0..usize::from(count).min(96))
        .filter_map(|i| image.get(table + 40 * i..table + 40 * i + 8))
        .map(|name| {
            let end = name.iter().position(|&b| b == 0).unwrap_or(8);
            String::from_utf8_lossy(&name[..end]).into_owned()
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation, reason = "test values")]
mod tests {
    use super::*;

    fn pe(sections: &[&str]) -> Vec<u8> {
        let mut image = vec![0u8; 1024];
        image[..2].copy_from_slice(b"MZ");
        image[0x3c..0x40].copy_from_slice(&0x80u32.to_le_bytes());
        image[0x80..0x84].copy_from_slice(b"PE\0\0");
        image[0x86..0x88].copy_from_slice(&(sections.len() as u16).to_le_bytes());
        image[0x94..0x96].copy_from_slice(&0xf0u16.to_le_bytes());
        for (i, name) in sections.iter().enumerate() {
            let at = 0x80 + 24 + 0xf0 + 40 * i;
            image[at..at + name.len()].copy_from_slice(name.as_bytes());
        }
        image
    }

    #[test]
    fn bzimages_and_elf_pass_pe_only_kernels_and_ukis_are_named() {
        let mut bz = pe(&[".text"]);
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(check(&bz), Ok(()));
        assert_eq!(check(b"\x7fELF\x02\x01"), Ok(()));
        assert!(
            check(&pe(&[".text", ".reloc"]))
                .unwrap_err()
                .contains("EFI-stub-only")
        );
        assert!(
            check(&pe(&[".osrel", ".cmdline", ".linux", ".initrd"]))
                .unwrap_err()
                .contains("Unified Kernel Image")
        );
        assert!(check(b"\x1f\x8b\x08\x00").unwrap_err().contains("gzip"));
        assert!(check(b"hello").unwrap_err().contains("not a Linux kernel"));
    }
}
