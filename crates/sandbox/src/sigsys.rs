//! The report of a forbidden system call: the filters trap (SIGSYS), and the handler writes
//! one line naming the thread and the call, then ends the process with [`EXIT_BAD_SYSCALL`].

use std::cell::Cell;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::ThreadKind;

/// The exit status after a forbidden system call (Firecracker's).
pub const EXIT_BAD_SYSCALL: i32 = 148;

thread_local! {
    /// This thread's filter and name, for the report (set before the filter goes on).
    static THREAD: Cell<Option<(ThreadKind, [u8; 16])>> = const { Cell::new(None) };
}

/// Where the report goes besides stderr: the log file, once `PUT /logger` names one.
static LOG_FD: AtomicI32 = AtomicI32::new(-1);

/// Also writes reports to `fd`, which must stay open for the life of the process.
pub fn report_to(fd: i32) {
    LOG_FD.store(fd, Ordering::Relaxed);
}

pub(crate) fn set_thread(kind: ThreadKind) {
    let mut name = [0u8; 16];
    // SAFETY: PR_GET_NAME writes at most 16 bytes, NUL included, into the buffer.
    unsafe { libc::prctl(libc::PR_GET_NAME, name.as_mut_ptr()) };
    THREAD.with(|t| t.set(Some((kind, name))));
}

pub(crate) fn install() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a handler of the SA_SIGINFO signature; the handler only
    // formats into a stack buffer, writes and exits, all async-signal-safe.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// A fixed buffer to format into without allocating (the handler may run inside malloc).
struct Line {
    bytes: [u8; 320],
    len: usize,
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let n = s.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t; for SIGSYS, the system call number is the
    // int at offset 24 (after si_signo, si_errno, si_code, padding and _call_addr).
    let nr = unsafe { *(info as *const u8).add(24).cast::<i32>() } as i64;
    // SAFETY: with SA_SIGINFO the third argument is the interrupted thread's ucontext_t.
    let arg1 = unsafe { (*(context as *const libc::ucontext_t)).uc_mcontext.gregs[libc::REG_RSI as usize] } as u64;
    let mut line = Line { bytes: [0; 320], len: 0 };
    // A thread not yet under its own filter runs under the launcher's.
    let (kind, name) =
        THREAD.with(|t| t.get()).map_or(("launcher", *b"(starting)\0\0\0\0\0\0"), |(k, n)| (k.name(), n));
    let name_len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
    let name = std::str::from_utf8(&name[..name_len]).unwrap_or("?");
    let _ = write!(
        line,
        "ERROR seccomp: thread '{name}' ({kind} filter) made system call {nr} ({})",
        crate::syscalls::name(nr).unwrap_or("unknown")
    );
    if nr == libc::SYS_ioctl {
        let _ = write!(line, " with request {arg1:#x} ({})", crate::ioctls::name(arg1).unwrap_or("unnamed"));
    }
    let _ = writeln!(line, ", which its filter forbids; the VMM exits with status {EXIT_BAD_SYSCALL}.");
    let log_fd = LOG_FD.load(Ordering::Relaxed);
    // SAFETY: write and _exit are async-signal-safe; the buffer is ours and `len` is in bounds.
    unsafe {
        libc::write(2, line.bytes.as_ptr().cast(), line.len);
        if log_fd >= 0 {
            libc::write(log_fd, line.bytes.as_ptr().cast(), line.len);
        }
        libc::_exit(EXIT_BAD_SYSCALL);
    }
}
