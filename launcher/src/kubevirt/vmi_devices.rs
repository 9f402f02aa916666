//! The disks and network interfaces of a VMI: each disk's volume resolved to the image or
//! device the launcher pod holds, each interface checked against the pod network.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rvmm_devices::image::{DiskImage, ImageFormat};

use super::{
    Binding, LauncherDirs, POD_TAP, PlannedDisk, PlannedInterface, PrepareStep, Vmi, VmiError,
    Volume, invalid, unsupported,
};
use crate::kubevirt::nocloud::NoCloudData;
use crate::kubevirt::quantity::Quantity;

/// Kubernetes admits only DNS-1123 labels as disk, volume and interface names; rvmm joins
/// them to the pod's directories, so a VMI that skipped that admission must not name a path
/// outside them (`../x`, `/etc/passwd`).
pub(super) fn check_dns_label(field: &str, name: &str) -> Result<(), VmiError> {
    let valid = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-');
    if valid {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!("'{name}' is not a DNS-1123 label (a-z, 0-9, '-', at most 63)"),
        ))
    }
}

pub(super) fn disks(
    vmi: &Vmi,
    dirs: &LauncherDirs,
    formats: &BTreeMap<String, String>,
    prepare: &mut Vec<PrepareStep>,
    warnings: &mut Vec<String>,
) -> Result<Vec<PlannedDisk>, VmiError> {
    let spec = &vmi.spec;
    let mut planned = Vec::new();
    for (i, disk) in spec.domain.devices.disks.iter().enumerate() {
        let field = format!("spec.domain.devices.disks[{i}]");
        if disk.cdrom.is_some() {
            return Err(unsupported(
                format!("{field}.cdrom"),
                "CD-ROM drives are not supported (use disk)",
            ));
        }
        if disk.lun.is_some() {
            return Err(unsupported(
                format!("{field}.lun"),
                "SCSI LUNs are not supported (use disk)",
            ));
        }
        let target = disk.disk.clone().unwrap_or_default();
        if let Some(bus) = target.bus.as_deref()
            && bus != "virtio"
        {
            return Err(unsupported(
                format!("{field}.disk.bus"),
                format!("{bus} is not supported (virtio only)"),
            ));
        }
        if let Some(serial) = &disk.serial
            && serial.len() > crate::config::DISK_ID_MAX
        {
            return Err(unsupported(
                format!("{field}.serial"),
                format!(
                    "'{serial}' is longer than virtio-blk's {} bytes",
                    crate::config::DISK_ID_MAX
                ),
            ));
        }
        check_dns_label(&format!("{field}.name"), &disk.name)?;
        let (index, volume) = spec
            .volumes
            .iter()
            .enumerate()
            .find(|(_, v)| v.name == disk.name)
            .ok_or_else(|| {
                invalid(
                    format!("{field}.name"),
                    format!("no volume named '{}' in spec.volumes", disk.name),
                )
            })?;
        let format = match formats.get(&volume.name) {
            None => None,
            Some(name) => Some(ImageFormat::from_name(name).ok_or_else(|| {
                unsupported(
                    format!("spec.volumes[{index}]"),
                    format!(
                        "image format '{name}' (from DisksInfo) is not supported (raw or qcow2)"
                    ),
                )
            })?),
        };
        let source = volume_source(vmi, index, volume, target.readonly, format, dirs, prepare)?;
        planned.push(PlannedDisk {
            name: disk.name.clone(),
            path: source.path,
            readonly: target.readonly || source.readonly,
            block_device: source.block_device,
            target: guest_disk_name(planned.len()),
            serial: disk.serial.clone(),
            format: source.format,
            backing: source.backing,
            boot_order: disk.boot_order,
            boot: false,
        });
    }
    for (i, volume) in spec.volumes.iter().enumerate() {
        if !spec
            .domain
            .devices
            .disks
            .iter()
            .any(|d| d.name == volume.name)
        {
            warnings.push(format!(
                "spec.volumes[{i}]: '{}' is attached to no disk and is ignored",
                volume.name
            ));
        }
    }
    Ok(planned)
}

/// `vda`, `vdb`, ..., `vdz`, `vdaa`, ...
pub(super) fn guest_disk_name(index: usize) -> String {
    let mut suffix = Vec::new();
    let mut n = index + 1;
    while n > 0 {
        n -= 1;
        suffix.push(b'a' + (n % 26) as u8);
        n /= 26;
    }
    suffix.reverse();
    format!("vd{}", String::from_utf8_lossy(&suffix))
}

struct Source {
    path: PathBuf,
    readonly: bool,
    block_device: bool,
    format: ImageFormat,
    backing: Option<(PathBuf, ImageFormat)>,
}

/// A raw image (what KubeVirt assumes of PVCs, host and empty disks: a guest-written disk is
/// never probed, so a guest cannot turn its disk into a qcow2 pointing at host files).
fn file(path: PathBuf) -> Source {
    Source {
        path,
        readonly: false,
        block_device: false,
        format: ImageFormat::Raw,
        backing: None,
    }
}

/// The format and virtual size of the image at `path`: `format` when given, else by magic.
/// The image is opened (read-only) as rvmm will, so a truncated or lying qcow2, a backing
/// loop or a missing backing file is refused here, naming the volume.
fn inspect(
    path: &Path,
    format: Option<ImageFormat>,
    field: &str,
) -> Result<(ImageFormat, u64, bool), VmiError> {
    let image = DiskImage::open(path, false, format).map_err(|source| VmiError::Image {
        field: field.to_owned(),
        source,
    })?;
    let has_backing = matches!(&image, DiskImage::Qcow2(q) if q.header().backing_file.is_some());
    Ok((image.format(), image.virtual_size(), has_backing))
}

/// A qcow2 overlay in the ephemeral-disk directory over `backing`, as virt-launcher's
/// `<ephemeral-disk-dir>/disk-data/<volume>/disk.qcow2`.
fn overlay(
    dirs: &LauncherDirs,
    name: &str,
    backing: PathBuf,
    backing_format: ImageFormat,
    size: u64,
    prepare: &mut Vec<PrepareStep>,
) -> Source {
    let path = dirs
        .ephemeral_disks
        .join("disk-data")
        .join(name)
        .join("disk.qcow2");
    prepare.push(PrepareStep::CreateOverlay {
        path: path.clone(),
        backing: backing.clone(),
        backing_format,
        size,
    });
    Source {
        format: ImageFormat::Qcow2,
        backing: Some((backing, backing_format)),
        ..file(path)
    }
}

#[allow(clippy::too_many_arguments)]
fn volume_source(
    vmi: &Vmi,
    index: usize,
    volume: &Volume,
    readonly: bool,
    format: Option<ImageFormat>,
    dirs: &LauncherDirs,
    prepare: &mut Vec<PrepareStep>,
) -> Result<Source, VmiError> {
    let field = format!("spec.volumes[{index}]");
    let name = &volume.name;
    if let Some(cd) = &volume.container_disk {
        let image = dirs.container_disks.join(format!("disk_{index}.img"));
        let cd_field = format!("{field}.containerDisk");
        let (format, size, has_backing) = inspect(&image, format, &cd_field)?;
        if has_backing {
            // As KubeVirt's launcher: a containerDisk must stand on its own.
            return Err(invalid(
                format!("{cd_field}.image"),
                format!("{} holds a qcow2 image with a backing file", cd.image),
            ));
        }
        if readonly {
            return Ok(Source {
                readonly: true,
                format,
                ..file(image)
            });
        }
        // The container image is never written: the guest's writes go to an overlay.
        return Ok(overlay(dirs, name, image, format, size, prepare));
    }
    if let Some(eph) = &volume.ephemeral {
        let eph_field = format!("{field}.ephemeral.persistentVolumeClaim");
        if eph.persistent_volume_claim.is_none() {
            return Err(invalid(eph_field, "required"));
        }
        let base = claim(dirs, name, &eph_field, format)?;
        let (_, size, _) = inspect(&base.path, Some(base.format), &eph_field)?;
        return Ok(overlay(dirs, name, base.path, base.format, size, prepare));
    }
    if let Some(pvc) = &volume.persistent_volume_claim {
        if pvc.hotpluggable {
            return Err(unsupported(
                format!("{field}.persistentVolumeClaim.hotpluggable"),
                "volume hotplug is not supported",
            ));
        }
        let source = claim(
            dirs,
            name,
            &format!("{field}.persistentVolumeClaim"),
            format,
        )?;
        return Ok(Source {
            readonly: pvc.read_only,
            ..source
        });
    }
    if let Some(dv) = &volume.data_volume {
        if dv.hotpluggable {
            return Err(unsupported(
                format!("{field}.dataVolume.hotpluggable"),
                "volume hotplug is not supported",
            ));
        }
        return claim(dirs, name, &format!("{field}.dataVolume"), format);
    }
    if let Some(host) = &volume.host_disk {
        let path = dirs.spec_path(&host.path);
        match host.r#type.as_str() {
            "Disk" if path.exists() => {}
            "Disk" => {
                return Err(invalid(
                    format!("{field}.hostDisk.path"),
                    format!("{} does not exist (type Disk)", host.path),
                ));
            }
            "DiskOrCreate" => {
                let capacity = host.capacity.as_ref().ok_or_else(|| {
                    invalid(
                        format!("{field}.hostDisk.capacity"),
                        "required for DiskOrCreate",
                    )
                })?;
                let size = capacity_bytes(capacity, &format!("{field}.hostDisk.capacity"))?;
                prepare.push(PrepareStep::CreateSparse {
                    path: path.clone(),
                    size,
                });
            }
            other => {
                return Err(invalid(
                    format!("{field}.hostDisk.type"),
                    format!("'{other}': expected Disk or DiskOrCreate"),
                ));
            }
        }
        return Ok(file(path));
    }
    if let Some(empty) = &volume.empty_disk {
        let size = capacity_bytes(&empty.capacity, &format!("{field}.emptyDisk.capacity"))?;
        let path = dirs
            .ephemeral_disks
            .join("empty-disks")
            .join(format!("{name}.img"));
        prepare.push(PrepareStep::CreateSparse {
            path: path.clone(),
            size,
        });
        return Ok(file(path));
    }
    if let Some(cloud_init) = &volume.cloud_init_no_cloud {
        let data = NoCloudData::from_volume(vmi, index, cloud_init, dirs)?;
        let path = dirs
            .ephemeral_disks
            .join("cloud-init-data")
            .join(&vmi.metadata.namespace)
            .join(&vmi.metadata.name)
            .join("noCloud.iso");
        prepare.push(PrepareStep::WriteNoCloud {
            path: path.clone(),
            data,
        });
        return Ok(Source {
            readonly: true,
            ..file(path)
        });
    }
    Err(match volume.other_source() {
        Some(kind) => unsupported(
            format!("{field}.{kind}"),
            format!("{kind} volumes are not supported"),
        ),
        None => invalid(field, format!("volume '{name}' has no source")),
    })
}

/// A PVC or DataVolume: the filesystem-mode image, else the block-mode device; raw unless
/// DisksInfo says `format`.
fn claim(
    dirs: &LauncherDirs,
    volume: &str,
    field: &str,
    format: Option<ImageFormat>,
) -> Result<Source, VmiError> {
    let format = format.unwrap_or(ImageFormat::Raw);
    let image = dirs.private.join("vmi-disks").join(volume).join("disk.img");
    if image.is_file() {
        if format == ImageFormat::Qcow2 {
            inspect(&image, Some(format), field)?;
        }
        return Ok(Source {
            format,
            ..file(image)
        });
    }
    let device = dirs.dev.join(volume);
    if device.exists() {
        return Ok(Source {
            block_device: true,
            format,
            ..file(device)
        });
    }
    Err(invalid(
        field,
        format!(
            "neither the image {} nor the block device {} exists",
            image.display(),
            device.display()
        ),
    ))
}

fn capacity_bytes(capacity: &Quantity, field: &str) -> Result<u64, VmiError> {
    let bytes = capacity.value().map_err(|source| VmiError::Quantity {
        field: field.to_owned(),
        source,
    })?;
    if bytes == 0 {
        return Err(invalid(field, format!("{capacity} is no space")));
    }
    Ok(bytes)
}

pub(super) fn interfaces(vmi: &Vmi) -> Result<Vec<PlannedInterface>, VmiError> {
    let spec = &vmi.spec;
    let mut planned = Vec::new();
    for (i, iface) in spec.domain.devices.interfaces.iter().enumerate() {
        let field = format!("spec.domain.devices.interfaces[{i}]");
        if iface.state.as_deref() == Some("absent") {
            continue;
        }
        if let Some(binding) = iface.unsupported_binding() {
            return Err(unsupported(
                format!("{field}.{binding}"),
                format!("the {binding} binding is not supported (bridge or masquerade only)"),
            ));
        }
        if let Some(model) = iface.model.as_deref()
            && model != "virtio"
        {
            return Err(unsupported(
                format!("{field}.model"),
                format!("{model} is not supported (virtio only)"),
            ));
        }
        let (n, network) = spec
            .networks
            .iter()
            .enumerate()
            .find(|(_, n)| n.name == iface.name)
            .ok_or_else(|| {
                invalid(
                    format!("{field}.name"),
                    format!("no network named '{}' in spec.networks", iface.name),
                )
            })?;
        if network.multus.is_some() {
            return Err(unsupported(
                format!("spec.networks[{n}].multus"),
                "secondary (Multus) networks are not supported (pod network only)",
            ));
        }
        if network.pod.is_none() {
            return Err(invalid(format!("spec.networks[{n}]"), "names no network"));
        }
        let mac = match &iface.mac_address {
            Some(text) => {
                let mac = text.replace('-', ":").to_ascii_lowercase();
                match crate::config::parse_mac(&mac) {
                    Some(bytes) if bytes[0] & 1 == 0 => mac,
                    Some(_) => {
                        return Err(invalid(
                            format!("{field}.macAddress"),
                            format!("{text} is a multicast address"),
                        ));
                    }
                    None => {
                        return Err(invalid(
                            format!("{field}.macAddress"),
                            format!("'{text}' is not like 52:54:00:12:34:56"),
                        ));
                    }
                }
            }
            None => derived_mac(&vmi.metadata.uid, &iface.name),
        };
        let binding = if iface.masquerade.is_some() {
            Some(Binding::Masquerade)
        } else if iface.bridge.is_some() {
            Some(Binding::Bridge)
        } else {
            None
        };
        planned.push(PlannedInterface {
            name: iface.name.clone(),
            tap: POD_TAP.into(),
            mac,
            binding,
            mtu: None,
        });
    }
    Ok(planned)
}

/// A stable locally administered MAC for an interface the VMI gives none (FNV-1a of UID and
/// name in QEMU's `52:54:00` range), so restarts of one VMI keep one MAC.
fn derived_mac(uid: &str, name: &str) -> String {
    let mut hash: u32 = 0x811c_9dc5;
    for b in uid.bytes().chain([0]).chain(name.bytes()) {
        hash = (hash ^ u32::from(b)).wrapping_mul(0x0100_0193);
    }
    let [_, a, b, c] = hash.to_be_bytes();
    format!("52:54:00:{a:02x}:{b:02x}:{c:02x}")
}
