//! The cloud-init NoCloud disk for a `cloudInitNoCloud` volume: an ISO 9660 image labelled
//! `cidata` holding `meta-data`, `user-data` and (optionally) `network-config`, which
//! cloud-init finds by label on any block device (virtio-blk here).
//!
//! The image is the smallest ISO 9660 Linux and blkid accept: one primary volume descriptor,
//! path tables, a root directory and the files, without Rock Ridge or Joliet (Linux shows
//! `USER-DATA.;1` as `user-data`).

use std::path::PathBuf;

use super::vmi::{LauncherDirs, VmiError};
use super::vmi_model::{CloudInitNoCloud, Vmi};

const SECTOR: usize = 2048;
/// Sectors: 16 system, PVD, terminator, L path table, M path table, root directory.
const ROOT_SECTOR: u32 = 20;
const VOLUME_LABEL: &str = "cidata";

/// The files of a NoCloud disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NoCloudData {
    /// `meta-data` (JSON, which is YAML): instance id and hostname.
    pub meta_data: String,
    /// `user-data` (cloud-config, a script, ...); may be empty.
    pub user_data: String,
    /// `network-config`, if the VMI gives one.
    pub network_config: Option<String>,
}

impl NoCloudData {
    /// The data of volume `index` of `vmi`: inline text, base64, or the Secret virt-controller
    /// mounted at `<private>/secret/<volume>/`.
    pub fn from_volume(
        vmi: &Vmi,
        index: usize,
        source: &CloudInitNoCloud,
        dirs: &LauncherDirs,
    ) -> Result<Self, VmiError> {
        let field = format!("spec.volumes[{index}].cloudInitNoCloud");
        let secret_dir = dirs
            .private
            .join("secret")
            .join(&vmi.spec.volumes[index].name);
        let pick = |text: &Option<String>,
                    b64: &Option<String>,
                    secret: bool,
                    name: &str,
                    keys: [&str; 2]|
         -> Result<Option<String>, VmiError> {
            if let Some(text) = text {
                return Ok(Some(text.clone()));
            }
            if let Some(encoded) = b64 {
                let bytes = decode_base64(encoded).ok_or_else(|| VmiError::Invalid {
                    field: format!("{field}.{name}Base64"),
                    reason: "not base64".into(),
                })?;
                return Ok(Some(String::from_utf8_lossy(&bytes).into_owned()));
            }
            if secret {
                let path = secret_file(&secret_dir, keys);
                return std::fs::read_to_string(&path)
                    .map(Some)
                    .map_err(|source| VmiError::Read {
                        field: format!("{field}.{name}SecretRef"),
                        path,
                        source,
                    });
            }
            Ok(None)
        };
        let user_data = pick(
            &source.user_data,
            &source.user_data_base64,
            source.user_data_secret_ref.is_some(),
            "userData",
            ["userdata", "userData"],
        )?;
        let network_config = pick(
            &source.network_data,
            &source.network_data_base64,
            source.network_data_secret_ref.is_some(),
            "networkData",
            ["networkdata", "networkData"],
        )?;
        if user_data.is_none() && network_config.is_none() {
            return Err(VmiError::Invalid {
                field,
                reason: "gives neither user data nor network data".into(),
            });
        }
        let meta = &vmi.metadata;
        let hostname = vmi.spec.hostname.as_deref().unwrap_or(&meta.name);
        let meta_data = serde_json::json!({
            "instance-id": format!("{}.{}", meta.name, meta.namespace),
            "local-hostname": hostname,
        })
        .to_string();
        Ok(Self {
            meta_data,
            user_data: user_data.unwrap_or_default(),
            network_config,
        })
    }

    /// The ISO 9660 image.
    pub fn to_iso(&self) -> Vec<u8> {
        // ISO 9660 wants directory records sorted by identifier.
        let mut files: Vec<(&str, &[u8])> = vec![
            ("META-DATA.;1", self.meta_data.as_bytes()),
            ("USER-DATA.;1", self.user_data.as_bytes()),
        ];
        if let Some(net) = &self.network_config {
            files.push(("NETWORK-CONFIG.;1", net.as_bytes()));
        }
        files.sort_by_key(|(name, _)| *name);
        let mut next = ROOT_SECTOR + 1;
        let mut extents = Vec::new();
        for (_, data) in &files {
            extents.push(next);
            next += u32::try_from(data.len().div_ceil(SECTOR)).unwrap_or(u32::MAX);
        }
        let total_sectors = next;
        let mut image = vec![0u8; total_sectors as usize * SECTOR];
        let sector = |n: u32| n as usize * SECTOR;
        // Root directory: ".", "..", the files.
        let mut root = Vec::new();
        root.extend(dir_record(&[0], ROOT_SECTOR, SECTOR as u32, true));
        root.extend(dir_record(&[1], ROOT_SECTOR, SECTOR as u32, true));
        for ((name, data), extent) in files.iter().zip(&extents) {
            root.extend(dir_record(
                name.as_bytes(),
                *extent,
                data.len() as u32,
                false,
            ));
            image[sector(*extent)..sector(*extent) + data.len()].copy_from_slice(data);
        }
        image[sector(ROOT_SECTOR)..sector(ROOT_SECTOR) + root.len()].copy_from_slice(&root);
        // Path tables: the root only.
        let path_table = |le: bool| {
            let mut t = vec![1u8, 0];
            let (extent, parent) = if le {
                (ROOT_SECTOR.to_le_bytes(), 1u16.to_le_bytes())
            } else {
                (ROOT_SECTOR.to_be_bytes(), 1u16.to_be_bytes())
            };
            t.extend(extent);
            t.extend(parent);
            t.extend([0, 0]);
            t
        };
        let l_table = path_table(true);
        image[sector(18)..sector(18) + l_table.len()].copy_from_slice(&l_table);
        image[sector(19)..sector(19) + l_table.len()].copy_from_slice(&path_table(false));
        let pvd = primary_volume_descriptor(total_sectors, l_table.len() as u32);
        image[sector(16)..sector(17)].copy_from_slice(&pvd);
        let terminator = &mut image[sector(17)..sector(18)];
        terminator[0] = 255;
        terminator[1..6].copy_from_slice(b"CD001");
        terminator[6] = 1;
        image
    }
}

fn secret_file(dir: &std::path::Path, keys: [&str; 2]) -> PathBuf {
    keys.iter()
        .map(|k| dir.join(k))
        .find(|p| p.is_file())
        .unwrap_or_else(|| dir.join(keys[0]))
}

/// Both-endian 32-bit field.
fn both32(v: u32) -> [u8; 8] {
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&v.to_le_bytes());
    out[4..].copy_from_slice(&v.to_be_bytes());
    out
}

/// Both-endian 16-bit field.
fn both16(v: u16) -> [u8; 4] {
    let mut out = [0u8; 4];
    out[..2].copy_from_slice(&v.to_le_bytes());
    out[2..].copy_from_slice(&v.to_be_bytes());
    out
}

fn dir_record(name: &[u8], extent: u32, size: u32, directory: bool) -> Vec<u8> {
    let len = 33 + name.len() + (name.len() + 1) % 2;
    let mut r = vec![0u8; len];
    r[0] = len as u8;
    r[2..10].copy_from_slice(&both32(extent));
    r[10..18].copy_from_slice(&both32(size));
    // Recorded 1970-01-01 00:00:00 UTC.
    r[18..25].copy_from_slice(&[70, 1, 1, 0, 0, 0, 0]);
    r[25] = if directory { 2 } else { 0 };
    r[28..32].copy_from_slice(&both16(1));
    r[32] = name.len() as u8;
    r[33..33 + name.len()].copy_from_slice(name);
    r
}

fn padded(text: &str, len: usize) -> Vec<u8> {
    let mut field = vec![b' '; len];
    field[..text.len()].copy_from_slice(text.as_bytes());
    field
}

fn primary_volume_descriptor(total_sectors: u32, path_table_len: u32) -> Vec<u8> {
    let mut d = vec![0u8; SECTOR];
    d[0] = 1;
    d[1..6].copy_from_slice(b"CD001");
    d[6] = 1;
    d[8..40].copy_from_slice(&padded("LINUX", 32));
    d[40..72].copy_from_slice(&padded(VOLUME_LABEL, 32));
    d[80..88].copy_from_slice(&both32(total_sectors));
    d[120..124].copy_from_slice(&both16(1));
    d[124..128].copy_from_slice(&both16(1));
    d[128..132].copy_from_slice(&both16(SECTOR as u16));
    d[132..140].copy_from_slice(&both32(path_table_len));
    d[140..144].copy_from_slice(&18u32.to_le_bytes());
    d[148..152].copy_from_slice(&19u32.to_be_bytes());
    d[156..190].copy_from_slice(&dir_record(&[0], ROOT_SECTOR, SECTOR as u32, true));
    // Volume set, publisher, preparer, application, copyright, abstract, bibliography ids.
    d[190..813].fill(b' ');
    d[574..702].copy_from_slice(&padded("RVMM", 128));
    // Four unspecified dates: sixteen '0' digits and a zero time zone each.
    for date in d[813..881].chunks_mut(17) {
        date[..16].fill(b'0');
    }
    d[881] = 1;
    d
}

/// Standard base64 with padding; whitespace is skipped.
pub(crate) fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let clean: Vec<u8> = text.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    if !clean.len().is_multiple_of(4) {
        return None;
    }
    let mut out = Vec::with_capacity(clean.len() / 4 * 3);
    let quads = clean.len() / 4;
    for (q, chunk) in clean.chunks(4).enumerate() {
        let pad = chunk.iter().rev().take_while(|&&c| c == b'=').count();
        if pad > 2 || (pad > 0 && q + 1 != quads) {
            return None;
        }
        let mut acc: u32 = 0;
        for &c in &chunk[..4 - pad] {
            acc = (acc << 6) | u32::from(value(c)?);
        }
        acc <<= 6 * pad as u32;
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..4 - pad]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> NoCloudData {
        NoCloudData {
            meta_data: r#"{"instance-id":"vm.ns","local-hostname":"vm"}"#.into(),
            user_data: "#cloud-config\npassword: fedora\n".into(),
            network_config: Some("version: 2\n".into()),
        }
    }

    #[test]
    fn iso_has_cidata_label_and_iso9660_signature() {
        let iso = data().to_iso();
        assert!(iso.len().is_multiple_of(SECTOR));
        assert_eq!(&iso[16 * SECTOR + 1..16 * SECTOR + 6], b"CD001");
        assert_eq!(&iso[16 * SECTOR + 40..16 * SECTOR + 46], b"cidata");
        assert_eq!(iso[17 * SECTOR], 255, "descriptor set terminator");
        let total = u32::from_le_bytes(iso[16 * SECTOR + 80..16 * SECTOR + 84].try_into().unwrap());
        assert_eq!(total as usize * SECTOR, iso.len());
    }

    #[test]
    fn iso_root_directory_lists_files_with_their_contents() {
        let d = data();
        let iso = d.to_iso();
        let root = &iso[ROOT_SECTOR as usize * SECTOR..(ROOT_SECTOR as usize + 1) * SECTOR];
        let mut offset = 0;
        let mut found = Vec::new();
        while root[offset] != 0 {
            let len = root[offset] as usize;
            let rec = &root[offset..offset + len];
            let name = &rec[33..33 + rec[32] as usize];
            let extent = u32::from_le_bytes(rec[2..6].try_into().unwrap()) as usize;
            let size = u32::from_le_bytes(rec[10..14].try_into().unwrap()) as usize;
            if rec[25] & 2 == 0 {
                let body = &iso[extent * SECTOR..extent * SECTOR + size];
                found.push((String::from_utf8_lossy(name).into_owned(), body.to_vec()));
            }
            offset += len;
        }
        assert_eq!(
            found,
            vec![
                ("META-DATA.;1".into(), d.meta_data.into_bytes()),
                ("NETWORK-CONFIG.;1".into(), b"version: 2\n".to_vec()),
                ("USER-DATA.;1".into(), d.user_data.into_bytes()),
            ]
        );
    }

    #[test]
    fn base64_decodes_padded_text_and_rejects_garbage() {
        assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(decode_base64("aGVs\nbG8h").unwrap(), b"hello!");
        assert_eq!(decode_base64("aGk=").unwrap(), b"hi");
        assert_eq!(decode_base64("").unwrap(), b"");
        assert!(decode_base64("aGVsbG8").is_none());
        assert!(decode_base64("a=Vs").is_none());
        assert!(decode_base64("****").is_none());
    }
}
