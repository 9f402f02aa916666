//! What a panic does: rvmm aborts, in every build. The release profile has `panic = "abort"`
//! (no unwinding tables: a smaller, leaner binary, see benches/boot-time), as Firecracker
//! does; [`abort_on_panic`] makes debug builds and tests of the binary behave the same, so no
//! code relies on catching a panic that release builds never unwind. A panic is a bug: the
//! message (thread, location, payload) goes to stderr and the process ends with SIGABRT,
//! guest and all, rather than running on with a half-done operation. Every seccomp filter
//! lets the abort through (`tgkill(getpid(), tid, SIGABRT)`), so the message is not lost to a
//! SIGSYS.

/// Makes every panic print its message and abort the process. Call first thing in `main`.
///
/// The message is one line on stderr, without the standard hook's backtrace: symbolising one
/// opens the binary and reads the working directory, which a filtered thread may not (the
/// release binary is stripped anyway).
pub fn abort_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let payload = info
            .payload()
            .downcast_ref::<&str>()
            .copied()
            .or_else(|| info.payload().downcast_ref::<String>().map(String::as_str))
            .unwrap_or("(no message)");
        let place = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        eprintln!(
            "rvmm: thread '{}' panicked{place}: {payload}; aborting",
            thread.name().unwrap_or("?")
        );
        std::process::abort();
    }));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_thread::ControlThread;
    use crate::seccomp::tests::run_test_in_child;
    use crate::seccomp::{control_rules, thread_filter_for};
    use std::os::unix::process::ExitStatusExt;

    const CHILD_ENV: &str = "RVMM_TEST_PANIC_CHILD";

    #[test]
    fn a_panicking_vm_operation_aborts_the_process_with_its_message() {
        if std::env::var_os(CHILD_ENV).is_some() {
            // The child: rvmm's panic set-up, an operation that panics on a filtered control
            // thread (as vmm-control runs API operations).
            abort_on_panic();
            let filter = thread_filter_for(true, control_rules()).unwrap();
            let control = ControlThread::start("vmm-control", filter).unwrap();
            let runtime = tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap();
            let _ = runtime.block_on(control.run(|| -> u8 { panic!("a bug in an operation") }));
            unreachable!("the process survived a panic");
        }
        let output = run_test_in_child(
            concat!(
                module_path!(),
                "::a_panicking_vm_operation_aborts_the_process_with_its_message"
            ),
            &[(CHILD_ENV, "1")],
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.signal(), Some(libc::SIGABRT), "{stderr}");
        assert!(
            stderr.contains("rvmm: thread 'vmm-control' panicked at launcher/src/panic.rs:")
                && stderr.contains(": a bug in an operation; aborting"),
            "{stderr}"
        );
    }
}
