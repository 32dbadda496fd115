//! Why a VM stopped, and the latch through which the first reason reaches the main thread.

use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Instant;

use vmm_sys_util::eventfd::EventFd;

use crate::fault::GuestFault;

/// The reason a VM stopped.
#[derive(Debug)]
pub enum VmExit {
    /// The guest asked for a reset (i8042 pulse or a KVM reset event).
    Reset,
    /// The guest powered off (a KVM shutdown event).
    PowerOff,
    /// The VMM received SIGINT or SIGTERM.
    Signal(i32),
    /// A stop was asked for through the API.
    Requested,
    /// The VM moved to another VMM (the destination's URL) and runs there now.
    Migrated(String),
    /// A VMM started to receive a VM (`run --incoming`) got none.
    NotReceived(String),
    /// A post-copy migration broke after the VM ran here: pages it never got are missing.
    Lost(String),
    /// The guest did something the VM cannot go on from.
    Fault(GuestFault),
    /// KVM failed a vCPU.
    VcpuError { vcpu: u32, message: String },
    /// The VMM could not put itself under its seccomp filter; it does not run unfiltered.
    Sandbox(String),
}

impl VmExit {
    /// 0 for a stop the guest or the user asked for, 1 for a failure.
    pub fn exit_code(&self) -> i32 {
        match self {
            VmExit::Reset | VmExit::PowerOff | VmExit::Signal(_) | VmExit::Requested | VmExit::Migrated(_) => 0,
            VmExit::Fault(_)
            | VmExit::VcpuError { .. }
            | VmExit::Sandbox(_)
            | VmExit::NotReceived(_)
            | VmExit::Lost(_) => 1,
        }
    }
}

impl std::fmt::Display for VmExit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            VmExit::Reset => write!(f, "the guest requested a reset; the VM stopped"),
            VmExit::PowerOff => write!(f, "the guest powered off; the VM stopped"),
            VmExit::Signal(sig) => write!(f, "stopped the VM on signal {sig} ({})", signal_name(*sig)),
            VmExit::Requested => write!(f, "stopped the VM as the API asked"),
            VmExit::Migrated(to) => write!(f, "the VM moved to {to} and runs there; it stopped here"),
            VmExit::NotReceived(why) => write!(f, "no VM arrived: {why}"),
            VmExit::Lost(why) => write!(f, "the VM is lost: its post-copy migration broke ({why})"),
            VmExit::Fault(fault) => write!(f, "{fault}"),
            VmExit::VcpuError { vcpu, message } => write!(f, "vCPU {vcpu} failed: {message}"),
            VmExit::Sandbox(message) => write!(f, "the VM stopped: {message}"),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// Holds the first exit reason; later ones are logged and dropped.
pub struct ExitLatch {
    reason: Mutex<Option<VmExit>>,
    event: EventFd,
}

impl ExitLatch {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self { reason: Mutex::new(None), event: EventFd::new(libc::EFD_CLOEXEC)? })
    }

    pub fn set(&self, exit: VmExit) {
        let mut slot = self.reason.lock().unwrap_or_else(|p| p.into_inner());
        if slot.is_none() {
            *slot = Some(exit);
            let _ = self.event.write(1);
        } else {
            tracing::debug!("a later stop reason was ignored: {exit}");
        }
    }

    /// Blocks until a reason is set, a stop signal arrives, SIGUSR1 asks for statistics, or
    /// `until` passes.
    pub fn wait(&self, until: Option<Instant>) -> Wake {
        STOP_EVENT_FD.store(self.event.as_raw_fd(), Ordering::SeqCst);
        loop {
            if let Some(exit) = self.reason.lock().unwrap_or_else(|p| p.into_inner()).take() {
                return Wake::Exit(exit);
            }
            let sig = STOP_SIGNAL.load(Ordering::SeqCst);
            if sig != 0 {
                return Wake::Exit(VmExit::Signal(sig));
            }
            if STATS_REQUESTED.swap(false, Ordering::SeqCst) {
                return Wake::Stats;
            }
            if let Some(until) = until {
                let left = until.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Wake::Timeout;
                }
                let mut fd = libc::pollfd { fd: self.event.as_raw_fd(), events: libc::POLLIN, revents: 0 };
                let millis = i32::try_from(left.as_millis().max(1)).unwrap_or(i32::MAX);
                // SAFETY: poll on one live pollfd; EINTR (a signal) just goes round the loop.
                if unsafe { libc::poll(&mut fd, 1, millis) } == 0 {
                    continue;
                }
            }
            // EINTR when a signal lands: the loop then sees it. Any other wake-up is a poke.
            if self.event.read().is_ok() && self.reason.lock().unwrap_or_else(|p| p.into_inner()).is_none() {
                return Wake::Poke;
            }
        }
    }

    /// Wakes [`ExitLatch::wait`] with [`Wake::Poke`]: something else (an API request) needs the
    /// main thread.
    pub fn poke(&self) {
        let _ = self.event.write(1);
    }
}

/// Why the main thread woke up.
pub enum Wake {
    Exit(VmExit),
    /// SIGUSR1: print the memory statistics and go on.
    Stats,
    /// [`ExitLatch::poke`] was called.
    Poke,
    /// The time given to [`ExitLatch::wait`] passed.
    Timeout,
}

/// Set by the SIGUSR1 handler; read by [`ExitLatch::wait`].
static STATS_REQUESTED: AtomicBool = AtomicBool::new(false);

/// Set by the SIGINT/SIGTERM handler; read by [`ExitLatch::wait`].
static STOP_SIGNAL: AtomicI32 = AtomicI32::new(0);
/// The latch's eventfd, so that the handler can wake the main thread.
static STOP_EVENT_FD: AtomicI32 = AtomicI32::new(-1);

extern "C" fn on_stop_signal(num: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    if num == libc::SIGUSR1 {
        STATS_REQUESTED.store(true, Ordering::SeqCst);
    } else {
        STOP_SIGNAL.store(num, Ordering::SeqCst);
    }
    let fd = STOP_EVENT_FD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; the buffer is a live u64 on this stack and the
        // fd is the latch's eventfd, which outlives every wait.
        unsafe { libc::write(fd, (&raw const one).cast(), 8) };
    }
}

/// Whether SIGINT or SIGTERM arrived (for loops other than the VM's, like the switch).
pub fn stop_requested() -> bool {
    STOP_SIGNAL.load(Ordering::SeqCst) != 0
}

/// Makes SIGINT and SIGTERM stop the VM cleanly, and SIGUSR1 print memory statistics.
pub fn install_stop_signal_handlers() -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
        vmm_sys_util::signal::register_signal_handler(sig, on_stop_signal)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    }
    Ok(())
}
