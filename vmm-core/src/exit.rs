//! Decoding of KVM exits into what the vCPU loop does next. A free function over the exit and
//! the buses, so tests feed it made-up exits without running a guest.

use kvm_ioctls::VcpuExit;
use vmm_sys_util::errno;

use crate::bus::Bus;

// KVM_SYSTEM_EVENT_* types.
const SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const SYSTEM_EVENT_RESET: u32 = 2;
const SYSTEM_EVENT_CRASH: u32 = 3;

/// Why the guest stopped, as far as the exit itself tells.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestStop {
    /// The guest asked for a reset (i8042 pulse, or a reset system event).
    Reset,
    /// The guest powered off.
    PowerOff,
    /// The guest triple-faulted (`KVM_EXIT_SHUTDOWN`).
    TripleFault,
    /// The guest reported a crash (a crash system event, e.g. pvpanic).
    Crash,
    /// KVM could not run or emulate the guest's instruction (`KVM_EXIT_INTERNAL_ERROR`).
    InternalError,
    /// Hardware refused to enter the guest (`KVM_EXIT_FAIL_ENTRY`).
    FailEntry {
        /// Hardware entry failure reason.
        reason: u64,
    },
    /// An exit rvmm does not expect with its configuration.
    UnexpectedExit(&'static str),
    /// `KVM_RUN` itself failed.
    RunFailed(errno::Error),
}

/// What the vCPU loop does after an exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Re-enter the guest (after checking for pause or stop requests).
    Continue,
    /// Stop the VM.
    Stop(GuestStop),
}

/// Why `KVM_RUN` returned, as the VM's metrics count it. One variant per exit that
/// [`handle_kvm_exit`] decodes on its own; the rest are [`ExitReason::Other`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ExitReason {
    /// Port read (`KVM_EXIT_IO`, in).
    IoIn,
    /// Port write (`KVM_EXIT_IO`, out).
    IoOut,
    /// MMIO read.
    MmioRead,
    /// MMIO write (virtio register accesses; queue notifications go to ioeventfds instead).
    MmioWrite,
    /// `HLT` (only without the in-kernel irqchip's halt handling).
    Hlt,
    /// Triple fault (`KVM_EXIT_SHUTDOWN`).
    Shutdown,
    /// `KVM_EXIT_SYSTEM_EVENT` (power off, reset, crash, ...).
    SystemEvent,
    /// `KVM_EXIT_INTERNAL_ERROR`.
    InternalError,
    /// `KVM_EXIT_FAIL_ENTRY`.
    FailEntry,
    /// `KVM_RUN` returned EINTR or EAGAIN: a kick (pause, stop) or a host signal.
    Interrupted,
    /// `KVM_RUN` failed with another error.
    RunFailed,
    /// Any other exit (IRQ window, EOI and interrupt notifications, unexpected exits).
    Other,
}

impl ExitReason {
    /// Every reason, in the stable order metrics list them.
    pub const ALL: [ExitReason; 12] = [
        Self::IoIn,
        Self::IoOut,
        Self::MmioRead,
        Self::MmioWrite,
        Self::Hlt,
        Self::Shutdown,
        Self::SystemEvent,
        Self::InternalError,
        Self::FailEntry,
        Self::Interrupted,
        Self::RunFailed,
        Self::Other,
    ];

    /// The reason's name in metrics (snake case, stable).
    pub fn name(self) -> &'static str {
        match self {
            Self::IoIn => "io_in",
            Self::IoOut => "io_out",
            Self::MmioRead => "mmio_read",
            Self::MmioWrite => "mmio_write",
            Self::Hlt => "hlt",
            Self::Shutdown => "shutdown",
            Self::SystemEvent => "system_event",
            Self::InternalError => "internal_error",
            Self::FailEntry => "fail_entry",
            Self::Interrupted => "interrupted",
            Self::RunFailed => "run_failed",
            Self::Other => "other",
        }
    }

    /// Classifies one return of `KVM_RUN` (before [`handle_kvm_exit`] consumes it).
    pub fn of(run: &Result<VcpuExit<'_>, errno::Error>) -> Self {
        match run {
            Ok(VcpuExit::IoIn(..)) => Self::IoIn,
            Ok(VcpuExit::IoOut(..)) => Self::IoOut,
            Ok(VcpuExit::MmioRead(..)) => Self::MmioRead,
            Ok(VcpuExit::MmioWrite(..)) => Self::MmioWrite,
            Ok(VcpuExit::Hlt) => Self::Hlt,
            Ok(VcpuExit::Shutdown) => Self::Shutdown,
            Ok(VcpuExit::SystemEvent(..)) => Self::SystemEvent,
            Ok(VcpuExit::InternalError) => Self::InternalError,
            Ok(VcpuExit::FailEntry(..)) => Self::FailEntry,
            Ok(_) => Self::Other,
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Self::Interrupted,
            Err(_) => Self::RunFailed,
        }
    }
}

/// Handles one return of `KVM_RUN`: device accesses go to the buses, stops are reported.
pub fn handle_kvm_exit(
    run: Result<VcpuExit<'_>, errno::Error>,
    pio: &Bus,
    mmio: &Bus,
) -> ExitAction {
    let exit = match run {
        Ok(exit) => exit,
        // A kick (signal) or an immediate exit request: the loop checks what was asked.
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
            return ExitAction::Continue;
        }
        Err(e) => return ExitAction::Stop(GuestStop::RunFailed(e)),
    };
    match exit {
        VcpuExit::IoIn(port, data) => pio.read(u64::from(port), data),
        VcpuExit::IoOut(port, data) => pio.write(u64::from(port), data),
        VcpuExit::MmioRead(addr, data) => mmio.read(addr, data),
        VcpuExit::MmioWrite(addr, data) => mmio.write(addr, data),
        // With the in-kernel irqchip these are handled by KVM, or are only notifications.
        VcpuExit::Hlt | VcpuExit::IrqWindowOpen | VcpuExit::Intr | VcpuExit::IoapicEoi(_) => {}
        VcpuExit::Shutdown => return ExitAction::Stop(GuestStop::TripleFault),
        VcpuExit::SystemEvent(kind, _) => match kind {
            SYSTEM_EVENT_SHUTDOWN => return ExitAction::Stop(GuestStop::PowerOff),
            SYSTEM_EVENT_RESET => return ExitAction::Stop(GuestStop::Reset),
            SYSTEM_EVENT_CRASH => return ExitAction::Stop(GuestStop::Crash),
            other => rvmm_devices::limited_log!(
                log::Level::Warn,
                "Ignoring KVM system event of type {other}"
            ),
        },
        VcpuExit::InternalError => return ExitAction::Stop(GuestStop::InternalError),
        VcpuExit::FailEntry(reason, _) => return ExitAction::Stop(GuestStop::FailEntry { reason }),
        other => return ExitAction::Stop(GuestStop::UnexpectedExit(exit_name(&other))),
    }
    ExitAction::Continue
}

fn exit_name(exit: &VcpuExit<'_>) -> &'static str {
    match exit {
        VcpuExit::Unknown => "KVM_EXIT_UNKNOWN",
        VcpuExit::Exception => "KVM_EXIT_EXCEPTION",
        VcpuExit::Hypercall(_) => "KVM_EXIT_HYPERCALL",
        VcpuExit::Debug(_) => "KVM_EXIT_DEBUG",
        VcpuExit::Nmi => "KVM_EXIT_NMI",
        VcpuExit::X86Rdmsr(_) => "KVM_EXIT_X86_RDMSR",
        VcpuExit::X86Wrmsr(_) => "KVM_EXIT_X86_WRMSR",
        VcpuExit::MemoryFault { .. } => "KVM_EXIT_MEMORY_FAULT",
        VcpuExit::Hyperv => "KVM_EXIT_HYPERV",
        VcpuExit::SetTpr | VcpuExit::TprAccess => "KVM_EXIT_TPR",
        _ => "an unsupported KVM exit",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use rvmm_devices::BusDevice;

    use super::*;

    #[derive(Default)]
    struct Recorder(Vec<(u64, Vec<u8>)>);

    impl BusDevice for Recorder {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0x42);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    fn buses() -> (Bus, Bus, Arc<Mutex<Recorder>>, Arc<Mutex<Recorder>>) {
        let port_dev = Arc::new(Mutex::new(Recorder::default()));
        let mmio_dev = Arc::new(Mutex::new(Recorder::default()));
        let mut pio = Bus::new("port I/O");
        pio.insert(0x3f8, 8, port_dev.clone()).unwrap();
        let mut mmio = Bus::new("MMIO");
        mmio.insert(0xd000_0000, 0x1000, mmio_dev.clone()).unwrap();
        (pio, mmio, port_dev, mmio_dev)
    }

    #[test]
    fn port_io_goes_to_the_port_bus() {
        let (pio, mmio, port_dev, _) = buses();
        let action = handle_kvm_exit(Ok(VcpuExit::IoOut(0x3f8, b"x")), &pio, &mmio);
        assert_eq!(action, ExitAction::Continue);
        assert_eq!(port_dev.lock().unwrap().0, vec![(0, vec![b'x'])]);
        let mut data = [0u8; 1];
        let action = handle_kvm_exit(Ok(VcpuExit::IoIn(0x3fd, &mut data)), &pio, &mmio);
        assert_eq!(action, ExitAction::Continue);
        assert_eq!(data, [0x42]);
    }

    #[test]
    fn mmio_goes_to_the_mmio_bus() {
        let (pio, mmio, _, mmio_dev) = buses();
        let exit = VcpuExit::MmioWrite(0xd000_0050, &[1, 0, 0, 0]);
        assert_eq!(handle_kvm_exit(Ok(exit), &pio, &mmio), ExitAction::Continue);
        assert_eq!(mmio_dev.lock().unwrap().0, vec![(0x50, vec![1, 0, 0, 0])]);
        let mut data = [0u8; 4];
        handle_kvm_exit(Ok(VcpuExit::MmioRead(0xd000_0000, &mut data)), &pio, &mmio);
        assert_eq!(data, [0x42; 4]);
    }

    #[test]
    fn unclaimed_port_and_mmio_accesses_are_not_fatal() {
        let (pio, mmio, _, _) = buses();
        let mut data = [0u8; 2];
        assert_eq!(
            handle_kvm_exit(Ok(VcpuExit::IoIn(0x5678, &mut data)), &pio, &mmio),
            ExitAction::Continue
        );
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(
            handle_kvm_exit(Ok(VcpuExit::MmioWrite(0xe000_0000, &[1])), &pio, &mmio),
            ExitAction::Continue
        );
    }

    #[test]
    fn triple_fault_and_system_events_stop_the_vm() {
        let (pio, mmio, _, _) = buses();
        let cases = [
            (VcpuExit::Shutdown, GuestStop::TripleFault),
            (VcpuExit::SystemEvent(1, &[]), GuestStop::PowerOff),
            (VcpuExit::SystemEvent(2, &[]), GuestStop::Reset),
            (VcpuExit::SystemEvent(3, &[]), GuestStop::Crash),
            (VcpuExit::InternalError, GuestStop::InternalError),
            (
                VcpuExit::FailEntry(0x21, 0),
                GuestStop::FailEntry { reason: 0x21 },
            ),
            (
                VcpuExit::Exception,
                GuestStop::UnexpectedExit("KVM_EXIT_EXCEPTION"),
            ),
        ];
        for (exit, stop) in cases {
            assert_eq!(
                handle_kvm_exit(Ok(exit), &pio, &mmio),
                ExitAction::Stop(stop)
            );
        }
    }

    #[test]
    fn unknown_system_events_and_notifications_continue() {
        let (pio, mmio, _, _) = buses();
        for exit in [
            VcpuExit::SystemEvent(99, &[]),
            VcpuExit::Hlt,
            VcpuExit::IrqWindowOpen,
            VcpuExit::IoapicEoi(3),
        ] {
            assert_eq!(handle_kvm_exit(Ok(exit), &pio, &mmio), ExitAction::Continue);
        }
    }

    #[test]
    fn every_decoded_exit_has_its_own_reason_and_the_rest_are_other() {
        let mut byte = [0u8; 1];
        let mut word = [0u8; 4];
        let cases: Vec<(Result<VcpuExit<'_>, errno::Error>, ExitReason)> = vec![
            (Ok(VcpuExit::IoIn(0x3f8, &mut byte)), ExitReason::IoIn),
            (Ok(VcpuExit::IoOut(0x3f8, b"x")), ExitReason::IoOut),
            (
                Ok(VcpuExit::MmioRead(0xd000_0000, &mut word)),
                ExitReason::MmioRead,
            ),
            (
                Ok(VcpuExit::MmioWrite(0xd000_0000, &[1])),
                ExitReason::MmioWrite,
            ),
            (Ok(VcpuExit::Hlt), ExitReason::Hlt),
            (Ok(VcpuExit::Shutdown), ExitReason::Shutdown),
            (Ok(VcpuExit::SystemEvent(1, &[])), ExitReason::SystemEvent),
            (Ok(VcpuExit::InternalError), ExitReason::InternalError),
            (Ok(VcpuExit::FailEntry(0x21, 0)), ExitReason::FailEntry),
            (Ok(VcpuExit::IrqWindowOpen), ExitReason::Other),
            (Ok(VcpuExit::Exception), ExitReason::Other),
            (Err(errno::Error::new(libc::EINTR)), ExitReason::Interrupted),
            (
                Err(errno::Error::new(libc::EAGAIN)),
                ExitReason::Interrupted,
            ),
            (Err(errno::Error::new(libc::EFAULT)), ExitReason::RunFailed),
        ];
        for (run, reason) in &cases {
            assert_eq!(ExitReason::of(run), *reason, "{run:?}");
        }
    }

    #[test]
    fn exit_reason_names_are_unique_snake_case() {
        let names: std::collections::HashSet<_> =
            ExitReason::ALL.iter().map(|r| r.name()).collect();
        assert_eq!(names.len(), ExitReason::ALL.len());
        assert!(
            names
                .iter()
                .all(|n| n.chars().all(|c| c.is_ascii_lowercase() || c == '_'))
        );
    }

    #[test]
    fn interrupted_run_continues_but_other_errors_stop() {
        let (pio, mmio, _, _) = buses();
        let eintr = errno::Error::new(libc::EINTR);
        assert_eq!(
            handle_kvm_exit(Err(eintr), &pio, &mmio),
            ExitAction::Continue
        );
        let efault = errno::Error::new(libc::EFAULT);
        assert_eq!(
            handle_kvm_exit(Err(efault), &pio, &mmio),
            ExitAction::Stop(GuestStop::RunFailed(efault))
        );
    }
}
