//! Seccomp filters: one system call allowlist per kind of thread, installed by the thread
//! itself before it runs any device or guest code ([`spawn_filtered`]).
//!
//! A system call outside the list kills the whole process with SIGSYS (exit status 159 in a
//! shell), as in Firecracker; the kernel log names the thread and the call
//! (`audit: type=1326 ... comm="virtio-rng" ... sig=31 ... syscall=41`). `rvmm run
//! --seccomp=false` installs no filter, to tell a missing rule from another failure.
//!
//! Every rule says which code path needs it. The device workers' lists are here, with the
//! rules every filtered thread shares ([`common_rules`]) and those of the thread that activates
//! devices ([`activation_rules`]); vmm-core adds the vCPU's, the launcher its own threads'.

use std::collections::BTreeMap;
use std::sync::mpsc;
use std::thread::JoinHandle;

use seccompiler::{
    BackendError, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
    TargetArch,
};
pub use seccompiler::{BpfProgram, SeccompAction};

mod capabilities;
mod denied;
mod names;

pub use capabilities::{
    CapSet, Capability, CapsError, effective_capabilities, restrict_capabilities,
};
pub use denied::{DeniedAction, denied_action, set_denied_action};

/// What a product filter does with a system call outside its list by default: the process
/// dies with SIGSYS ([`set_denied_action`] can make it log instead, to debug).
pub const ON_DENIED: SeccompAction = SeccompAction::KillProcess;

/// (argument index, value) pairs that must all match, comparing the low 32 bits (ioctl
/// requests, fcntl commands, signal numbers and pids all fit).
pub type Pattern = Vec<(u8, u64)>;

/// One argument condition: `(argument & mask) == value`, on the low 32 bits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cond {
    arg: u8,
    mask: u32,
    value: u64,
}

/// A system call a filter lets through, and with which arguments.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Allow {
    syscall: i64,
    /// Any pattern (all its conditions) lets the call through; none at all: any arguments do.
    patterns: Vec<Vec<Cond>>,
}

fn exact(pattern: Pattern) -> Vec<Cond> {
    pattern
        .into_iter()
        .map(|(arg, value)| Cond {
            arg,
            mask: u32::MAX,
            value,
        })
        .collect()
}

impl Allow {
    /// `syscall` with any arguments.
    pub fn any(syscall: i64) -> Self {
        Self {
            syscall,
            patterns: Vec::new(),
        }
    }

    /// `syscall` when argument `arg` is one of `values`.
    pub fn arg_in(syscall: i64, arg: u8, values: &[u64]) -> Self {
        Self {
            syscall,
            patterns: values.iter().map(|&v| exact(vec![(arg, v)])).collect(),
        }
    }

    /// `syscall` when all the (argument index, value) pairs of one of `patterns` match.
    pub fn args_match(syscall: i64, patterns: Vec<Pattern>) -> Self {
        Self {
            syscall,
            patterns: patterns.into_iter().map(exact).collect(),
        }
    }

    /// `syscall` when argument `arg`, masked with `mask`, is one of `values` (e.g. an ioctl
    /// request's type byte: a whole family of requests).
    pub fn masked_in(syscall: i64, arg: u8, mask: u32, values: &[u64]) -> Self {
        Self {
            syscall,
            patterns: values
                .iter()
                .map(|&value| vec![Cond { arg, mask, value }])
                .collect(),
        }
    }

    /// The system call number.
    pub fn syscall(&self) -> i64 {
        self.syscall
    }
}

/// Errors building or installing a filter.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The rules do not make a valid BPF program.
    #[error("Cannot compile the seccomp filter")]
    Compile(#[source] BackendError),
    /// The kernel refused the filter.
    #[error("Cannot install the seccomp filter")]
    Install(#[source] seccompiler::Error),
}

/// Errors starting a filtered thread.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The thread cannot be created.
    #[error("Cannot create the thread")]
    Thread(#[source] std::io::Error),
    /// The thread cannot filter its system calls; it ended without running anything.
    #[error("The thread cannot filter its system calls")]
    Filter(#[source] SeccompError),
    /// The thread cannot drop its capabilities; it ended without running anything.
    #[error("The thread cannot drop its capabilities")]
    Capabilities(#[source] CapsError),
    /// The thread ended before saying whether its filter is in place.
    #[error("The thread ended while installing its seccomp filter")]
    Died,
}

/// Compiles `allowlist` into a filter that allows the calls listed and applies `on_denied` to
/// every other one. Rules for the same call are merged: "any arguments" wins, otherwise any of
/// the patterns is accepted.
pub fn compile(allowlist: &[Allow], on_denied: SeccompAction) -> Result<BpfProgram, SeccompError> {
    // `None`: any arguments.
    let mut merged: BTreeMap<i64, Option<Vec<Vec<Cond>>>> = BTreeMap::new();
    for allow in allowlist {
        let entry = merged
            .entry(allow.syscall)
            .or_insert_with(|| Some(Vec::new()));
        match (entry.as_mut(), allow.patterns.is_empty()) {
            (_, true) => *entry = None,
            (Some(patterns), false) => patterns.extend(allow.patterns.iter().cloned()),
            (None, false) => {}
        }
    }
    let mut rules = BTreeMap::new();
    for (syscall, patterns) in merged {
        let mut syscall_rules = Vec::new();
        for pattern in patterns.unwrap_or_default() {
            let conditions = pattern
                .into_iter()
                .map(|Cond { arg, mask, value }| {
                    let op = match mask {
                        u32::MAX => SeccompCmpOp::Eq,
                        mask => SeccompCmpOp::MaskedEq(u64::from(mask)),
                    };
                    SeccompCondition::new(arg, SeccompCmpArgLen::Dword, op, value)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(SeccompError::Compile)?;
            syscall_rules.push(SeccompRule::new(conditions).map_err(SeccompError::Compile)?);
        }
        rules.insert(syscall, syscall_rules);
    }
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(SeccompError::Compile)?;
    let filter = SeccompFilter::new(rules, on_denied, SeccompAction::Allow, arch)
        .map_err(SeccompError::Compile)?;
    BpfProgram::try_from(filter).map_err(SeccompError::Compile)
}

/// The product filter of a thread kind: [`common_rules`] plus `kind_rules`; anything else
/// kills the process (or is logged, see [`set_denied_action`]).
pub fn thread_filter(kind_rules: Vec<Allow>) -> Result<BpfProgram, SeccompError> {
    let mut allowlist = common_rules();
    allowlist.extend(kind_rules);
    compile(&allowlist, denied_action())
}

/// Makes every thread allocate from glibc's main malloc arena. Call it first thing in `main`,
/// before any thread starts, in a process whose threads are filtered.
///
/// Why: glibc gives threads arenas of their own (heaps carved from mmap), and the first time
/// it shrinks such a heap it opens and reads `/proc/sys/vm/overcommit_memory` (`openat`),
/// which no filter allows: a thread that frees a large buffer (a big request) would kill the
/// process. The main arena grows and shrinks with `brk`, allowed for every thread, and a
/// thread's cache (tcache) keeps small allocations off its lock.
pub fn single_malloc_arena() {
    // SAFETY: mallopt only changes glibc's allocator parameters; it is called before any
    // thread starts (the caller's promise), so no arena is being set up concurrently.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, 1) };
}

/// Installs `filter` on the calling thread (and the threads it starts afterwards). Filters
/// stack: a thread that already has one keeps it, and a call must pass both.
pub fn install(filter: &BpfProgram) -> Result<(), SeccompError> {
    denied::remember_thread_name();
    seccompiler::apply_filter(filter).map_err(SeccompError::Install)
}

/// Starts `body` on a thread called `name` that first drops every capability and installs
/// `filter` (none: no filter and no capability change, `--seccomp=false`). Returns once the
/// thread is confined; a thread that cannot confine itself ends without running `body`.
///
/// The new thread also inherits the calling thread's filter, if any: start threads from a
/// thread whose filter allows what they do (the VMM's main thread, before it filters itself).
pub fn spawn_filtered<F>(
    name: &str,
    filter: Option<BpfProgram>,
    body: F,
) -> Result<JoinHandle<()>, SpawnError>
where
    F: FnOnce() + Send + 'static,
{
    spawn_confined(name, filter, Some(&[]), body)
}

/// [`spawn_filtered`] for a thread that keeps capabilities: `keep` (`None`: all it has) when
/// it has a filter.
pub fn spawn_confined<F>(
    name: &str,
    filter: Option<BpfProgram>,
    keep: Option<&'static [Capability]>,
    body: F,
) -> Result<JoinHandle<()>, SpawnError>
where
    F: FnOnce() + Send + 'static,
{
    let (report, installed) = mpsc::sync_channel(1);
    let thread = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            let result = match (&filter, keep) {
                (None, _) => Ok(()),
                (Some(filter), keep) => keep
                    .map_or(Ok(()), restrict_capabilities)
                    .map_err(SpawnError::Capabilities)
                    .and_then(|()| install(filter).map_err(SpawnError::Filter)),
            };
            let confined = result.is_ok();
            drop(filter);
            // The spawner waits for this before returning.
            let _ = report.send(result);
            if confined {
                body();
            }
        })
        .map_err(SpawnError::Thread)?;
    let outcome = match installed.recv() {
        Ok(Ok(())) => return Ok(thread),
        Ok(Err(e)) => e,
        Err(_) => SpawnError::Died,
    };
    let _ = thread.join();
    Err(outcome)
}

/// How a child run by [`run_in_filtered_child`] ended.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildEnd {
    /// It exited with this status (2: the filter could not be installed).
    Exited(i32),
    /// A signal killed it (`SIGSYS`: the filter denied a system call).
    Killed(i32),
    /// Any other wait status.
    Other(i32),
}

/// A test aid: runs `action` in a forked child under `filter` and says how the child ended.
/// The child ends with status 0 when `action` returns.
///
/// # Safety
///
/// The calling process may have other threads (a test harness has), so `action` must only
/// make raw system calls and call async-signal-safe functions: no allocation, no locks.
#[doc(hidden)]
pub unsafe fn run_in_filtered_child(filter: &BpfProgram, action: fn()) -> ChildEnd {
    // SAFETY: the child only calls async-signal-safe functions and raw system calls below,
    // and `action` does the same (the caller's promise).
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed: {}", std::io::Error::last_os_error());
    if pid == 0 {
        let no_core = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: `no_core` is a valid rlimit; a SIGSYS death must not leave a core file.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
        if install(filter).is_err() {
            // SAFETY: ends the child without running the parent's exit handlers.
            unsafe { libc::_exit(2) };
        }
        action();
        // exit(2), not exit_group(2): every filter allows it, and the child has one thread,
        // so this ends it with status 0.
        // SAFETY: ends the calling (only) thread; nothing runs after it.
        unsafe { libc::syscall(libc::SYS_exit, 0) };
    }
    let mut status = 0;
    // SAFETY: `pid` is our child and `status` a valid out pointer.
    let waited = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(
        waited,
        pid,
        "waitpid failed: {}",
        std::io::Error::last_os_error()
    );
    if libc::WIFEXITED(status) {
        ChildEnd::Exited(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        ChildEnd::Killed(libc::WTERMSIG(status))
    } else {
        ChildEnd::Other(status)
    }
}

/// What every filtered rvmm thread needs, whatever it does: memory, locks, logging, signals,
/// ending the thread and aborting on a panic.
pub fn common_rules() -> Vec<Allow> {
    let pid = u64::from(std::process::id());
    vec![
        // Heap (glibc malloc: the main arena grows with brk, thread arenas with mmap, mprotect
        // and munmap, and shrink with madvise) and Vec growth (mremap).
        Allow::any(libc::SYS_brk),
        Allow::any(libc::SYS_mmap),
        Allow::any(libc::SYS_mprotect),
        Allow::any(libc::SYS_munmap),
        Allow::any(libc::SYS_mremap),
        // Also glibc freeing the stack of an ending thread (MADV_DONTNEED).
        Allow::any(libc::SYS_madvise),
        // Mutexes, condition variables, channels, joining threads.
        Allow::any(libc::SYS_futex),
        // Log records on stderr (env_logger) and eventfd writes (interrupts, wake-ups).
        Allow::any(libc::SYS_write),
        // Log timestamps, when the vDSO cannot answer.
        Allow::any(libc::SYS_clock_gettime),
        // Dropping file descriptors (eventfds, disk and tap clones); in debug builds std first
        // checks that the descriptor is open (fcntl F_GETFD).
        Allow::any(libc::SYS_close),
        Allow::arg_in(libc::SYS_fcntl, 1, &[libc::F_GETFD as u64]),
        // std's HashMap seeds its hasher once per thread (event-manager's maps).
        Allow::any(libc::SYS_getrandom),
        // Returning from a signal handler (vCPU kicks, Rust's stack overflow handler).
        Allow::any(libc::SYS_rt_sigreturn),
        // glibc blocks signals while a thread exits and around pthread_kill and abort.
        Allow::any(libc::SYS_rt_sigprocmask),
        // Rust removes the thread's alternate signal stack when it ends.
        Allow::any(libc::SYS_sigaltstack),
        // Ending the thread.
        Allow::any(libc::SYS_exit),
        // A panic aborts the process (release builds): abort() raises SIGABRT on itself with
        // tgkill(getpid(), gettid(), SIGABRT), so the panic message is not lost to SIGSYS.
        Allow::any(libc::SYS_getpid),
        Allow::any(libc::SYS_gettid),
        Allow::args_match(
            libc::SYS_tgkill,
            vec![vec![(0, pid), (2, libc::SIGABRT as u64)]],
        ),
    ]
}

/// What a device's activation and reset do on the thread that writes DRIVER_OK or the reset
/// status (a vCPU): building the worker's handler and event loop, handing it over, stopping
/// it; also dropping the devices when the last vCPU exits.
pub fn activation_rules() -> Vec<Allow> {
    vec![
        // Eventfds: the worker's stop event (EventFd::new), and io_uring's completion event.
        Allow::any(libc::SYS_eventfd2),
        // EventFd::try_clone (the queue eventfds handed to the worker, the stop event).
        Allow::any(libc::SYS_dup),
        // File::try_clone and OwnedFd::try_clone (the disk file, the tap).
        Allow::arg_in(libc::SYS_fcntl, 1, &[libc::F_DUPFD_CLOEXEC as u64]),
        // The worker's event loop (EventManager::new).
        Allow::any(libc::SYS_epoll_create1),
        // virtio-blk with io_uring: IoUringEngine::new sets up the ring, probes its opcodes
        // and registers the completion eventfd and the disk file.
        Allow::any(libc::SYS_io_uring_setup),
        Allow::any(libc::SYS_io_uring_register),
        // virtio-net: Net::handler sets the tap's offloads to what the driver accepted.
        Allow::arg_in(libc::SYS_ioctl, 1, &[libc::TUNSETOFFLOAD]),
        // Reset: draining the queue eventfds the old worker did not consume.
        Allow::any(libc::SYS_read),
    ]
}

/// The kinds of device worker thread, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WorkerKind {
    /// virtio-blk with the synchronous engine.
    BlockSync,
    /// virtio-blk with the io_uring engine.
    BlockIoUring,
    /// virtio-net on a tap.
    Net,
    /// virtio-rng.
    Rng,
}

impl WorkerKind {
    /// Every kind.
    pub const ALL: [WorkerKind; 4] = [Self::BlockSync, Self::BlockIoUring, Self::Net, Self::Rng];
}

/// What a worker of `kind` needs beyond [`common_rules`].
pub fn worker_rules(kind: WorkerKind) -> Vec<Allow> {
    let mut rules = vec![
        // The event loop (EventManager::run) waits for queue kicks and the stop event.
        Allow::any(libc::SYS_epoll_wait),
        Allow::any(libc::SYS_epoll_pwait),
        // Handlers watching their eventfds (init) and net's tap interest changes.
        Allow::any(libc::SYS_epoll_ctl),
        // Reading the queue, stop and completion eventfds.
        Allow::any(libc::SYS_read),
    ];
    let sync_engine = || {
        vec![
            // SyncEngine: one-buffer reads and writes, and zero-filling by hand where the
            // host cannot zero a range.
            Allow::any(libc::SYS_pread64),
            Allow::any(libc::SYS_pwrite64),
            // SyncEngine: scattered reads and writes.
            Allow::any(libc::SYS_preadv),
            Allow::any(libc::SYS_pwritev),
            // FLUSH, and the flush when the worker stops after writes.
            Allow::any(libc::SYS_fdatasync),
            // DISCARD (punch hole) and WRITE_ZEROES (zero range).
            Allow::any(libc::SYS_fallocate),
        ]
    };
    rules.extend(match kind {
        WorkerKind::BlockSync => sync_engine(),
        WorkerKind::BlockIoUring => {
            let mut rules = vec![
                // Submitting requests, and waiting for those in flight when the worker stops.
                Allow::any(libc::SYS_io_uring_enter),
            ];
            // open_backend falls back to the sync engine when the ring cannot be set up at
            // activation; the io_uring engine also zero-fills by hand (pwrite64) where the
            // host's fallocate cannot zero a range.
            rules.extend(sync_engine());
            rules
        }
        WorkerKind::Net => vec![
            // Tap frames: read/write for one buffer (allowed above), readv/writev for more.
            Allow::any(libc::SYS_readv),
            Allow::any(libc::SYS_writev),
        ],
        // virtio-rng's entropy is getrandom, allowed for every thread.
        WorkerKind::Rng => Vec::new(),
    });
    rules
}

/// The filter of a worker of `kind`.
pub fn worker_filter(kind: WorkerKind) -> Result<BpfProgram, SeccompError> {
    thread_filter(worker_rules(kind))
}

#[cfg(test)]
#[path = "seccomp_tests.rs"]
mod tests;
