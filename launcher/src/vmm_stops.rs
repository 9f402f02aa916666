//! How the VMM takes a stopped VM: the guest's own end (power-off, crash, a reset that ends
//! it) ends the VMM or waits for deletion, a guest reset with `--on-reboot restart` boots the
//! VM again on the `vm-restart` thread, and a stop rvmm asked for is reported as such.

use std::sync::Arc;

use rvmm_core::{Outcome, RebootCause, ShutdownReason, StopReason, VmEvent};

use super::{EXIT_GUEST_CRASH, EXIT_OK, EXIT_VMM_ERROR, Inner, OnReboot, StopCause, VmState, Vmm};
use crate::errors::error_chain;

impl Vmm {
    /// Called on the waiter thread once the VM of `generation` has stopped and been torn down
    /// (its disks flushed).
    pub(super) fn vm_stopped(self: &Arc<Self>, generation: u64, reason: StopReason) {
        let mut inner = self.lock();
        let restarter = inner.restarter.clone();
        let Some(slot) = inner.vm.as_mut() else {
            return;
        };
        let Some(mut active) = slot.active.take_if(|a| a.generation == generation) else {
            return;
        };
        if let Some(console) = &slot.console {
            console.detach();
        }
        // A guest reboot, as opposed to its end (a reset after the power button).
        let reboot = reason == StopReason::Reset
            && self.settings.on_reboot == OnReboot::Restart
            && !active.power_button_pressed;
        if let Some(restarter) = restarter.filter(|_| reboot && active.stop.is_none()) {
            // Still the active VM for whoever stops or reboots it meanwhile: they wait until
            // the restart thread has taken it over.
            log::info!("Guest reset: booting the VM again");
            active.restarting = true;
            slot.active = Some(active);
            let vmm = self.clone();
            restarter.submit(move || vmm.restart_after_reset(generation));
            return;
        }
        slot.state = VmState::Shutdown;
        if active.stop != Some(StopCause::Reboot) {
            // The server stops with the VM (a reboot boots it again at once).
            slot.dhcp = None;
        }
        self.clear_live_metrics();
        // Stopped by rvmm while the guest rebooted: it is rvmm's stop.
        let reason = match active.stop {
            Some(_) if reboot => StopReason::Requested,
            _ => reason,
        };
        match active.stop {
            Some(StopCause::Shutdown | StopCause::Exit) => self.emit(reason.event()),
            Some(StopCause::Reboot) => {}
            None => {
                // The guest ended itself (or KVM could not run it).
                let code = match reason.outcome() {
                    Outcome::Clean => {
                        log::info!("{reason}");
                        EXIT_OK
                    }
                    Outcome::GuestCrash => {
                        eprintln!("rvmm: {reason}");
                        EXIT_GUEST_CRASH
                    }
                    Outcome::VmmError => {
                        eprintln!("rvmm: {reason}");
                        EXIT_VMM_ERROR
                    }
                };
                self.emit(reason.event());
                self.guest_ended(&mut inner, code);
            }
        }
        self.changed.notify_all();
    }

    /// The VM ended by itself with the exit code `code`: the VMM's job is done, or (virt-launcher
    /// mode) the stopped VM waits to be deleted.
    pub(super) fn guest_ended(&self, inner: &mut Inner, code: u8) {
        inner.end_code = Some(code);
        if self.settings.exit_when_guest_ends {
            inner.exit_code.get_or_insert(code);
        }
    }

    /// On the `vm-restart` thread: boots the VM of `generation` again after its guest reset,
    /// unless it was asked to stop meanwhile.
    fn restart_after_reset(self: &Arc<Self>, generation: u64) {
        let mut inner = self.lock();
        let exiting = inner.exit_code.is_some();
        let Some(slot) = inner.vm.as_mut() else {
            return;
        };
        let Some(active) = slot
            .active
            .take_if(|a| a.generation == generation && a.restarting)
        else {
            return;
        };
        slot.state = VmState::Shutdown;
        // The old VM's handle holds its disks' descriptors, and so their image locks: it goes
        // before the new VM opens them.
        let stop = active.stop;
        drop(active);
        match stop {
            Some(StopCause::Reboot) => {}
            Some(StopCause::Shutdown | StopCause::Exit) => {
                self.emit(VmEvent::Shutdown(ShutdownReason::Requested));
            }
            None if exiting => self.emit(VmEvent::Shutdown(ShutdownReason::Reset)),
            None => match self.boot_locked(&mut inner) {
                Ok(boot) => self.emit(VmEvent::Rebooted {
                    boot,
                    cause: RebootCause::Guest,
                }),
                Err(e) => {
                    let reason = format!(
                        "Cannot boot the VM again after the guest reset: {}",
                        error_chain(&e)
                    );
                    eprintln!("rvmm: {reason}");
                    self.clear_live_metrics();
                    self.emit(VmEvent::Shutdown(ShutdownReason::RebootFailed(reason)));
                    self.guest_ended(&mut inner, EXIT_VMM_ERROR);
                }
            },
        }
        if stop.is_some() || exiting {
            self.clear_live_metrics();
        }
        if stop != Some(StopCause::Reboot)
            && let Some(slot) = inner.vm.as_mut().filter(|s| s.active.is_none())
        {
            // The VM did not come back: its DHCP server stops with it.
            slot.dhcp = None;
        }
        self.changed.notify_all();
    }
}
