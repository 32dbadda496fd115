//! vCPU threads: run KVM_RUN in a loop, route port I/O and MMIO exits to the buses, and turn
//! every other exit into a stop reason.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use kvm_bindings::{
    KVM_EXIT_DIRTY_RING_FULL, KVM_EXIT_IO_IN, KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET,
    KVM_SYSTEM_EVENT_SHUTDOWN, kvm_run,
};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::signal::{Killable, SIGRTMIN, register_signal_handler};

use arch::GuestMemory;
use devices::Bus;

use crate::exit::{ExitLatch, VmExit};
use crate::fault;

/// What the vCPU threads share.
pub struct VcpuShared {
    pub pio: Bus,
    pub mmio: Bus,
    pub mem: GuestMemory,
    /// Emptied here when KVM stops a vCPU because its dirty ring is full.
    pub kvm_log: Arc<crate::dirty::KvmDirtyLog>,
    pub latch: Arc<ExitLatch>,
    pub stop: AtomicBool,
    /// Size of each vCPU's kvm_run mapping (KVM_GET_VCPU_MMAP_SIZE).
    pub run_mmap_size: usize,
    pub pause: PauseGate,
    /// The running vCPU threads, which a throttle kicks (each is listed while it runs).
    pub running: Mutex<Vec<libc::pthread_t>>,
}

/// Where vCPU threads park while the VM is paused, or throttled for a moment (a migration's
/// auto-converge); the two do not undo each other.
#[derive(Default)]
pub struct PauseGate {
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Default)]
struct GateState {
    paused: bool,
    throttled: bool,
    parked: usize,
}

impl GateState {
    fn closed(&self) -> bool {
        self.paused || self.throttled
    }
}

impl PauseGate {
    /// Parks the calling vCPU thread while a pause (or throttle) is requested; returns at once
    /// otherwise.
    fn park_if_requested(&self, stop: &AtomicBool) {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !state.closed() {
            return;
        }
        state.parked += 1;
        self.changed.notify_all();
        while state.closed() && !stop.load(Ordering::SeqCst) {
            state = self.changed.wait(state).unwrap_or_else(|p| p.into_inner());
        }
        state.parked -= 1;
        self.changed.notify_all();
    }

    fn requested(&self) -> bool {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).closed()
    }

    pub fn request(&self, paused: bool) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).paused = paused;
        self.changed.notify_all();
    }

    /// Holds the vCPUs back (a throttle's off-time) or lets them go.
    pub fn throttle(&self, on: bool) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).throttled = on;
        self.changed.notify_all();
    }

    /// Waits until `count` threads are parked; false after `timeout`.
    fn wait_parked(&self, count: usize, timeout: Duration) -> bool {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (state, _) =
            self.changed.wait_timeout_while(state, timeout, |s| s.parked < count).unwrap_or_else(|p| p.into_inner());
        state.parked >= count
    }
}

/// Pauses every vCPU: each leaves KVM_RUN and parks. Its registers are then stable.
pub fn pause_all(shared: &VcpuShared, threads: &[sandbox::Thread<()>]) -> Result<(), String> {
    shared.pause.request(true);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        for thread in threads.iter().filter(|t| !t.is_finished()) {
            let _ = thread.kill(kick_signal());
        }
        let running = threads.iter().filter(|t| !t.is_finished()).count();
        if shared.pause.wait_parked(running, Duration::from_millis(10)) {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            shared.pause.request(false);
            return Err("the vCPUs did not stop within 5 seconds".into());
        }
    }
}

pub fn resume_all(shared: &VcpuShared) {
    shared.pause.request(false);
}

thread_local! {
    /// This thread's kvm_run, so that the kick signal can set `immediate_exit` on it.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    KVM_RUN.with(|run| {
        let run = run.get();
        if !run.is_null() {
            // SAFETY: the pointer is this thread's live kvm_run mapping (set after the vCPU is
            // created, cleared before it is dropped). A volatile byte store is async-signal-safe.
            // If the thread is about to enter KVM_RUN it returns at once with EINTR.
            unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
        }
    });
}

/// The signal that kicks a vCPU thread out of KVM_RUN.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

pub fn install_kick_handler() -> std::io::Result<()> {
    register_signal_handler(kick_signal(), on_kick).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
}

/// A vCPU's fd: its thread holds the lock while the vCPU runs and lets go while it is parked,
/// so that a paused VM's vCPU state can be read and written (snapshots).
pub type SharedVcpu = Arc<Mutex<VcpuFd>>;

/// Starts a thread for `vcpu`; it parks at once if a pause is requested.
/// The thread is named `fc_vcpu N`, as Firecracker names it: Kata Containers finds vCPU threads
/// by that name.
pub fn spawn(index: u32, vcpu: SharedVcpu, shared: Arc<VcpuShared>) -> std::io::Result<sandbox::Thread<()>> {
    sandbox::spawn(sandbox::ThreadKind::Vcpu, format!("fc_vcpu {index}"), move || {
        let run = vcpu.lock().unwrap_or_else(|p| p.into_inner()).get_kvm_run() as *mut kvm_run;
        // The kvm_run mapping lives as long as the VcpuFd, which outlives this thread.
        KVM_RUN.with(|r| r.set(run));
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        shared.running.lock().unwrap_or_else(|p| p.into_inner()).push(me);
        loop {
            shared.pause.park_if_requested(&shared.stop);
            if shared.stop.load(Ordering::SeqCst) {
                break;
            }
            let exit = run_loop(index, &mut vcpu.lock().unwrap_or_else(|p| p.into_inner()), &shared);
            if let Some(exit) = exit {
                shared.latch.set(exit);
                break;
            }
        }
        // Off the list before the thread ends: nothing kicks a thread that is gone.
        shared.running.lock().unwrap_or_else(|p| p.into_inner()).retain(|t| *t != me);
        KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
    })
}

/// Kicks every running vCPU thread out of KVM_RUN (from any thread).
pub fn kick_running(shared: &VcpuShared) {
    let running = shared.running.lock().unwrap_or_else(|p| p.into_inner());
    for &thread in running.iter() {
        // SAFETY: the thread is listed only while it runs (it leaves the list, under this lock,
        // before it ends), so the pthread_t names a live thread.
        unsafe { libc::pthread_kill(thread, kick_signal()) };
    }
}

/// Stops every vCPU thread: sets the stop flag and kicks each thread until it has exited.
pub fn stop_all(shared: &VcpuShared, threads: Vec<sandbox::Thread<()>>) {
    shared.stop.store(true, Ordering::SeqCst);
    shared.pause.request(false);
    for thread in threads {
        while !thread.is_finished() {
            let _ = thread.kill(kick_signal());
            std::thread::sleep(Duration::from_millis(1));
        }
        let _ = thread.join();
    }
}

/// A port access copied out of kvm_run, so that the vCPU can be borrowed again to answer it.
struct PioExit {
    port: u16,
    is_in: bool,
}

/// vCPU exits by reason, all vCPUs together (one VM per process).
pub static EXITS: [AtomicU64; EXIT_REASONS.len()] = [const { AtomicU64::new(0) }; EXIT_REASONS.len()];

/// The names of the [`EXITS`] counters.
pub const EXIT_REASONS: [&str; 9] =
    ["io_in", "io_out", "mmio_read", "mmio_write", "signal", "system_event", "hlt", "failure", "other"];

fn count_exit(result: &Result<VcpuExit, kvm_ioctls::Error>) {
    let reason = match result {
        Ok(VcpuExit::IoIn(..)) => 0,
        Ok(VcpuExit::IoOut(..)) => 1,
        Ok(VcpuExit::MmioRead(..)) => 2,
        Ok(VcpuExit::MmioWrite(..)) => 3,
        Ok(VcpuExit::Intr) => 4,
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => 4,
        Ok(VcpuExit::SystemEvent(..)) => 5,
        Ok(VcpuExit::Hlt) => 6,
        Ok(VcpuExit::Shutdown | VcpuExit::InternalError | VcpuExit::FailEntry(..)) | Err(_) => 7,
        Ok(_) => 8,
    };
    EXITS[reason].fetch_add(1, Ordering::Relaxed);
}

/// Full-ring exits in a row that find the rings empty before the vCPU is taken to be stuck (the
/// thread that empties the rings may have emptied them first, but not this often).
const EMPTY_FULL_RINGS: u32 = 100;

fn run_loop(index: u32, vcpu: &mut VcpuFd, shared: &VcpuShared) -> Option<VmExit> {
    let mut empty_full_rings = 0;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return None;
        }
        if shared.pause.requested() {
            // KVM finishes an emulated access on the next KVM_RUN; with immediate_exit it does
            // only that, so that the saved state holds no half-done instruction.
            vcpu.set_kvm_immediate_exit(1);
            let _ = vcpu.run();
            vcpu.set_kvm_immediate_exit(0);
            return None;
        }
        let mut pio = None;
        let result = vcpu.run();
        count_exit(&result);
        let reason = match result {
            Ok(VcpuExit::IoOut(port, _)) => {
                pio = Some(PioExit { port, is_in: false });
                None
            }
            Ok(VcpuExit::IoIn(port, _)) => {
                pio = Some(PioExit { port, is_in: true });
                None
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !shared.mmio.read(addr, data) {
                    tracing::debug!("vCPU {index}: read of {} bytes from unmapped MMIO {addr:#x}", data.len());
                    data.fill(0xff);
                }
                None
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                if !shared.mmio.write(addr, data) {
                    tracing::debug!("vCPU {index}: write of {} bytes to unmapped MMIO {addr:#x}", data.len());
                }
                None
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_RESET => Some(Stop::Clean(VmExit::Reset)),
                KVM_SYSTEM_EVENT_SHUTDOWN => Some(Stop::Clean(VmExit::PowerOff)),
                KVM_SYSTEM_EVENT_CRASH => Some(Stop::Fault("a guest crash event (KVM_SYSTEM_EVENT_CRASH)".into())),
                other => Some(Stop::Fault(format!("an unknown system event {other} (KVM_EXIT_SYSTEM_EVENT)"))),
            },
            Ok(VcpuExit::Shutdown) => Some(Stop::Fault("a triple fault (KVM_EXIT_SHUTDOWN)".into())),
            Ok(VcpuExit::InternalError) => Some(Stop::InternalError),
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(Stop::Fault(format!(
                "a failed VM entry (KVM_EXIT_FAIL_ENTRY, hardware reason {reason:#x}, host CPU {cpu})"
            ))),
            Ok(VcpuExit::Hlt) => Some(Stop::Fault("HLT with interrupts off (KVM_EXIT_HLT)".into())),
            Ok(VcpuExit::Intr) => None,
            // A full ring that keeps holding nothing to read is one KVM overran and lost count
            // of: the vCPU would stop for it again at once, forever.
            Ok(VcpuExit::Unsupported(KVM_EXIT_DIRTY_RING_FULL)) => match shared.kvm_log.collect() {
                Ok(0) if empty_full_rings + 1 >= EMPTY_FULL_RINGS => Some(Stop::Error(
                    "KVM keeps stopping the vCPU for a full dirty ring that holds nothing to read (KVM overran \
                     it); start the VM without dirty_ring"
                        .into(),
                )),
                Ok(0) => {
                    empty_full_rings += 1;
                    continue;
                }
                Ok(_) => None,
                Err(e) => Some(Stop::Error(e)),
            },
            Ok(other) => Some(Stop::Fault(format!("an exit the VMM does not handle ({other:?})"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => Some(Stop::Error(format!("KVM_RUN failed: {e}"))),
        };
        empty_full_rings = 0;
        if let Some(pio) = pio {
            handle_pio(vcpu, &pio, shared, index);
            continue;
        }
        match reason {
            None => {}
            Some(Stop::Clean(exit)) => return Some(exit),
            Some(Stop::Error(message)) => return Some(VmExit::VcpuError { vcpu: index, message }),
            Some(Stop::Fault(why)) => return Some(VmExit::Fault(fault::describe(vcpu, index, &shared.mem, why))),
            Some(Stop::InternalError) => {
                let why = internal_error_reason(vcpu.get_kvm_run());
                return Some(VmExit::Fault(fault::describe(vcpu, index, &shared.mem, why)));
            }
        }
    }
}

enum Stop {
    Clean(VmExit),
    Fault(String),
    InternalError,
    Error(String),
}

/// Names KVM's internal error, e.g. an instruction its emulator cannot run.
fn internal_error_reason(run: &kvm_run) -> String {
    // SAFETY: called right after a KVM_EXIT_INTERNAL_ERROR exit, so `internal` is the union
    // member KVM filled in.
    let internal = unsafe { run.__bindgen_anon_1.internal };
    let what = match internal.suberror {
        1 => "instruction emulation failed",
        2 => "a simultaneous exception",
        3 => "a delivery event during an exit",
        4 => "an unexpected exit reason",
        _ => "an unknown suberror",
    };
    let n = (internal.ndata as usize).min(internal.data.len()).min(4);
    let data: Vec<String> = internal.data[..n].iter().map(|d| format!("{d:#x}")).collect();
    format!(
        "a KVM internal error (KVM_EXIT_INTERNAL_ERROR, suberror {}: {what}; data [{}])",
        internal.suberror,
        data.join(", ")
    )
}

/// Answers a port access: each of `count` items of `size` bytes goes to the bus in turn, as
/// `rep ins`/`rep outs` would do on hardware. Unclaimed ports read as all ones.
fn handle_pio(vcpu: &mut VcpuFd, pio: &PioExit, shared: &VcpuShared, index: u32) {
    let run_mmap_size = shared.run_mmap_size;
    let run = vcpu.get_kvm_run();
    // SAFETY: called right after a KVM_EXIT_IO exit, so `io` is the union member KVM filled in.
    let io = unsafe { run.__bindgen_anon_1.io };
    let size = usize::from(io.size);
    let total = size * io.count as usize;
    let offset = io.data_offset as usize;
    if size == 0 || offset.checked_add(total).is_none_or(|end| end > run_mmap_size) {
        tracing::warn!("vCPU {index}: KVM reported a port access outside kvm_run; ignored");
        return;
    }
    // SAFETY: [offset, offset + total) lies inside the kvm_run mapping (checked above), which
    // stays mapped while `vcpu` lives; nothing else references those bytes while the vCPU is
    // out of KVM_RUN.
    let data = unsafe { std::slice::from_raw_parts_mut((run as *mut kvm_run).cast::<u8>().add(offset), total) };
    debug_assert_eq!(pio.is_in, u32::from(io.direction) == KVM_EXIT_IO_IN);
    for item in data.chunks_mut(size) {
        let claimed = if pio.is_in {
            shared.pio.read(u64::from(pio.port), item)
        } else {
            shared.pio.write(u64::from(pio.port), item)
        };
        if !claimed {
            if pio.is_in {
                item.fill(0xff);
            }
            tracing::trace!("vCPU {index}: {} unclaimed port {:#x}", if pio.is_in { "in" } else { "out" }, pio.port);
        }
    }
}
