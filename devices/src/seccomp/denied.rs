//! What a filter does with a system call outside its list. In production the process dies
//! with SIGSYS ([`DeniedAction::Kill`]). For debugging (`rvmm run --seccomp=log`) the filters
//! trap instead ([`DeniedAction::Log`]): a SIGSYS handler writes one line naming the thread and
//! the call to stderr, the first time each call is denied, and the call fails with ENOSYS, so
//! the VMM goes on and every missing rule shows up, not just the first. (x86-64 only, like the
//! rest of rvmm: the handler reads the call's number from `siginfo` and sets `rax`.)

use std::cell::Cell;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use seccompiler::SeccompAction;

use super::names::syscall_name;

/// What filters built from now on do with a call outside their list.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeniedAction {
    /// The process dies with SIGSYS (exit status 159; the kernel's audit log names the call).
    Kill,
    /// rvmm logs the thread and the call, which fails with ENOSYS.
    Log,
}

static LOG_DENIED: AtomicBool = AtomicBool::new(false);

/// Calls already logged, one bit per system call number.
static LOGGED: [AtomicU64; 8] = [const { AtomicU64::new(0) }; 8];

thread_local! {
    /// The thread's name, for the SIGSYS handler (which cannot ask the kernel: its own calls
    /// go through the filter too). Constant-initialised and without a destructor, so reading
    /// it in a signal handler is a plain load.
    static THREAD_NAME: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

/// Sets what filters built afterwards do with a denied call; [`DeniedAction::Log`] also
/// installs the process's SIGSYS handler. Call it before any thread is filtered.
pub fn set_denied_action(action: DeniedAction) -> io::Result<()> {
    if action == DeniedAction::Log {
        // SAFETY: sigaction is plain data; zeroed is a valid empty mask and no flags.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_denied_call as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        // SAFETY: installs a handler that only makes async-signal-safe calls (write).
        if unsafe { libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) } != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    LOG_DENIED.store(action == DeniedAction::Log, Ordering::SeqCst);
    Ok(())
}

/// The seccomp action for denied calls (see [`set_denied_action`]).
pub fn denied_action() -> SeccompAction {
    if LOG_DENIED.load(Ordering::SeqCst) {
        SeccompAction::Trap
    } else {
        SeccompAction::KillProcess
    }
}

/// Keeps the calling thread's name for the SIGSYS handler; called as the thread filters
/// itself.
pub(super) fn remember_thread_name() {
    let mut name = [0u8; 16];
    if let Some(current) = std::thread::current().name() {
        let n = current.len().min(15);
        name[..n].copy_from_slice(&current.as_bytes()[..n]);
    }
    THREAD_NAME.with(|cell| cell.set(name));
}

/// `SIGSYS` from a trapping filter: `siginfo`'s `_sigsys` member holds the call's number at
/// byte 24 (after signo, errno, code, padding and the caller's address).
extern "C" fn on_denied_call(
    _: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler; SIGSYS from
    // seccomp fills `_sigsys`, whose `_syscall` int is at offset 24 on x86-64.
    let nr = i64::from(unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() });
    // The kernel rolled the call back: rax holds its number again. Make it return -ENOSYS.
    // SAFETY: `context` is the interrupted thread's ucontext, which the kernel restores from
    // when the handler returns; only rax is changed.
    unsafe {
        let context = &mut *context.cast::<libc::ucontext_t>();
        context.uc_mcontext.gregs[libc::REG_RAX as usize] = -i64::from(libc::ENOSYS);
    }
    let Ok(index) = usize::try_from(nr) else {
        return;
    };
    if let Some(word) = LOGGED.get(index / 64) {
        let bit = 1u64 << (index % 64);
        if word.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            return;
        }
    }
    let name = THREAD_NAME.with(Cell::get);
    let mut line = Line::default();
    line.push(b"rvmm: seccomp (--seccomp=log): thread ");
    line.push(&name[..name.iter().position(|&b| b == 0).unwrap_or(name.len())]);
    line.push(b" made system call ");
    line.push(syscall_name(nr).unwrap_or("?").as_bytes());
    line.push(b" (");
    line.push_number(index);
    line.push(b"), outside its filter: it fails with ENOSYS\n");
    // SAFETY: write(2) on stderr from a valid buffer; async-signal-safe and allowed by every
    // filter.
    unsafe { libc::write(libc::STDERR_FILENO, line.buf.as_ptr().cast(), line.len) };
}

/// A message built without allocating (in a signal handler).
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Default for Line {
    fn default() -> Self {
        Self {
            buf: [0; 160],
            len: 0,
        }
    }
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut n: usize) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b"0123456789"[n % 10];
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}
