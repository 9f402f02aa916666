//! [`VmBuilder`]: a VM put together step by step, with the embedder's own devices.

use std::path::{Path, PathBuf};

use rvmm_devices::virtio::block::BlockConfig;
use rvmm_devices::virtio::net::NetConfig;

use super::{
    BootSource, BuildError, CustomDevice, CustomDevices, CustomVirtioDevice, SerialOutput,
    Transport, Vm, VmConfig, build,
};
use crate::cpuid::CpuProfile;
use crate::snapshot::{RestoreError, restore_vm};

/// The kernel command line of a [`BootSource::Kernel`] VM unless [`VmBuilder::cmdline`] says
/// otherwise: the console on the first serial port, a reset ends the VM, no reboot after a
/// panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";

/// Puts a VM together: memory, vCPUs, what it boots, rvmm's devices and the embedder's own.
///
/// Every setter returns the builder; [`VmBuilder::build`] borrows it, so the same builder
/// makes the VM again when the guest reboots (each embedder device comes from its factory,
/// anew). The defaults: 1 vCPU, 256 MiB, [`DEFAULT_CMDLINE`] for a kernel (none for a disk
/// boot), the CPU profile detected for this host, `/dev/kvm`, seccomp filters on, virtio-mmio
/// without ACPI, no devices besides the serial port and the i8042.
///
/// ```no_run
/// use rvmm_core::{BootSource, VmBuilder};
///
/// let vm = VmBuilder::new(BootSource::kernel("vmlinux"))
///     .vcpus(2)
///     .memory_mib(512)
///     .rng(true)
///     .build(Box::new(std::io::stdout()))?
///     .start()?;
/// println!("{}", vm.wait());
/// # Ok::<(), rvmm_core::BuildError>(())
/// ```
#[derive(Clone, Debug)]
pub struct VmBuilder {
    config: VmConfig,
    custom: CustomDevices,
}

impl VmBuilder {
    /// A VM booting `boot`, with the defaults above.
    pub fn new(boot: BootSource) -> Self {
        let cmdline = match boot {
            BootSource::Kernel { .. } => DEFAULT_CMDLINE.into(),
            BootSource::Disk { .. } => String::new(),
        };
        Self::from_config(VmConfig {
            vcpus: 1,
            memory_bytes: 256 << 20,
            boot,
            cmdline,
            cpu_profile: CpuProfile::detect(),
            kvm_path: PathBuf::from("/dev/kvm"),
            rng: false,
            disks: Vec::new(),
            nets: Vec::new(),
            seccomp: true,
            transport: Transport::Mmio,
            acpi: false,
        })
    }

    /// A VM as `config` describes it (the launcher's validated configuration), to which
    /// embedder devices can be added.
    pub fn from_config(config: VmConfig) -> Self {
        Self {
            config,
            custom: CustomDevices::default(),
        }
    }

    /// The configuration so far (without the embedder's devices).
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    /// Number of vCPUs (1 to 32; checked by [`VmBuilder::build`]).
    pub fn vcpus(mut self, vcpus: u8) -> Self {
        self.config.vcpus = vcpus;
        self
    }

    /// Guest RAM in MiB.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.config.memory_bytes = mib.saturating_mul(1 << 20);
        self
    }

    /// The kernel command line: all of it for a kernel, appended to the boot entry's for a
    /// disk boot.
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.config.cmdline = cmdline.into();
        self
    }

    /// The CPU features shown to the guest.
    pub fn cpu_profile(mut self, profile: CpuProfile) -> Self {
        self.config.cpu_profile = profile;
        self
    }

    /// The KVM device, if not `/dev/kvm`.
    pub fn kvm_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.config.kvm_path = path.into();
        self
    }

    /// Adds (or not) a virtio-rng device, fed by the host's `getrandom`.
    pub fn rng(mut self, rng: bool) -> Self {
        self.config.rng = rng;
        self
    }

    /// Adds a virtio-blk disk; the guest sees the disks in the order they were added.
    pub fn disk(mut self, disk: BlockConfig) -> Self {
        self.config.disks.push(disk);
        self
    }

    /// Adds a virtio-net interface on an existing tap; the guest sees them in order.
    pub fn net(mut self, net: NetConfig) -> Self {
        self.config.nets.push(net);
        self
    }

    /// Filters the system calls of the vCPU and device threads (on by default; see
    /// [`crate::seccomp`]).
    pub fn seccomp(mut self, on: bool) -> Self {
        self.config.seccomp = on;
        self
    }

    /// How the virtio devices reach the guest; [`Transport::Pci`] needs [`VmBuilder::acpi`].
    pub fn transport(mut self, transport: Transport) -> Self {
        self.config.transport = transport;
        self
    }

    /// Gives the guest ACPI tables and power management.
    pub fn acpi(mut self, acpi: bool) -> Self {
        self.config.acpi = acpi;
        self
    }

    /// Adds an embedder's port I/O or MMIO device. Its range must be clear of rvmm's devices,
    /// windows, guest RAM and the other embedder devices: [`VmBuilder::build`] refuses it
    /// otherwise ([`BuildError::ReservedRange`], naming both).
    pub fn device(mut self, device: CustomDevice) -> Self {
        self.custom.bus.push(device);
        self
    }

    /// Adds an embedder's virtio device, on the VM's transport after rvmm's virtio devices.
    pub fn virtio_device(mut self, device: CustomVirtioDevice) -> Self {
        self.custom.virtio.push(device);
        self
    }

    /// Builds the VM, its serial console writing to `serial_out`. Ready to
    /// [`start`](Vm::start).
    pub fn build(&self, serial_out: SerialOutput) -> Result<Vm, BuildError> {
        build(&self.config, &self.custom, serial_out)
    }

    /// Builds the VM from the snapshot in `dir` (taken from a VM of the same configuration),
    /// paused: [`VmHandle::resume`](crate::VmHandle::resume) lets it go on. With
    /// `prefault` the guest memory is read in at once rather than as the guest touches it.
    /// A VM with embedder devices cannot be restored (nor snapshotted).
    pub fn restore(
        &self,
        dir: &Path,
        prefault: bool,
        serial_out: SerialOutput,
    ) -> Result<Vm, RestoreError> {
        if let Some(name) = self.custom.names().into_iter().next() {
            return Err(BuildError::CustomDeviceRestore(name).into());
        }
        restore_vm(&self.config, dir, prefault, serial_out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setters_fill_the_configuration_build_uses() {
        let builder = VmBuilder::new(BootSource::kernel("/k"))
            .vcpus(2)
            .memory_mib(512)
            .cmdline("console=ttyS0")
            .rng(true)
            .disk(BlockConfig {
                path: "/d".into(),
                ..Default::default()
            })
            .transport(Transport::Pci)
            .acpi(true)
            .seccomp(false);
        let config = builder.config();
        assert_eq!((config.vcpus, config.memory_bytes), (2, 512 << 20));
        assert_eq!(config.cmdline, "console=ttyS0");
        assert!(config.rng && config.acpi && !config.seccomp);
        assert_eq!(config.disks.len(), 1);
        assert_eq!(config.transport, Transport::Pci);
        let disk_boot = VmBuilder::new(BootSource::Disk { index: 0 });
        assert_eq!(disk_boot.config().cmdline, "");
        assert_eq!(
            VmBuilder::new(BootSource::kernel("/k")).config().cmdline,
            DEFAULT_CMDLINE
        );
    }

    #[test]
    fn a_device_over_rvmm_is_refused_before_kvm_is_opened() {
        struct Nothing;
        impl rvmm_devices::BusDevice for Nothing {
            fn read(&mut self, _offset: u64, _data: &mut [u8]) {}
            fn write(&mut self, _offset: u64, _data: &[u8]) {}
        }
        let builder = VmBuilder::new(BootSource::kernel("/nonexistent"))
            .kvm_path("/nonexistent/kvm")
            .device(CustomDevice::pio("clash", 0x60, 1, |_| Ok(Nothing)));
        let err = builder.build(Box::new(std::io::sink())).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Device clash: port I/O range 0x60+0x1 overlaps i8042 at 0x60..0x65"
        );
    }

    #[test]
    fn a_restore_with_embedder_devices_is_refused_naming_one() {
        let builder = VmBuilder::new(BootSource::kernel("/nonexistent")).virtio_device(
            CustomVirtioDevice::new("mine", || Ok(rvmm_devices::virtio::rng::Rng::new())),
        );
        let dir = Path::new("/nonexistent/snapshot");
        let err = builder
            .restore(dir, false, Box::new(std::io::sink()))
            .unwrap_err();
        let cause = std::error::Error::source(&err).unwrap();
        assert_eq!(
            cause.to_string(),
            "Device mine is the embedder's: a snapshot cannot restore it"
        );
    }

    #[test]
    fn a_failing_factory_names_its_device() {
        let builder = VmBuilder::new(BootSource::kernel("/nonexistent")).virtio_device(
            CustomVirtioDevice::new("mine", || -> Result<rvmm_devices::virtio::rng::Rng, _> {
                Err("no backend".into())
            }),
        );
        let err = builder.build(Box::new(std::io::sink())).unwrap_err();
        assert_eq!(err.to_string(), "Cannot create device mine");
        let source = std::error::Error::source(&err).unwrap();
        assert_eq!(source.to_string(), "no backend");
    }
}
