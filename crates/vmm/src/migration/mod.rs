//! Live migration: a running VM moves to another Ferrovisor over a stream, by pre-copy.
//!
//! The source sends all of guest memory while the guest runs, then, round after round, the
//! pages written since the last round: KVM's dirty log has the vCPUs' writes, the guest memory
//! bitmap the devices' (a receive buffer filled, a block read). When what is left fits the
//! downtime target (from the bandwidth of the rounds so far), or the rounds run out, the VM
//! pauses, the last pages and the device and vCPU state go, and the destination resumes the VM.
//! The source stops only once the destination says the VM runs there; until then any failure
//! leaves the VM running on the source.
//!
//! - `stream`: the versioned frames and their bounded parser;
//! - `transport`: `unix:`, `tcp:` and `tls:` URLs;
//! - `lanes`: extra connections that carry pages beside the main stream (`connections`);
//! - `send`: the source's thread; `receive`: the destination's.
//!
//! Each side's thread hands the VM to the controller (which owns it) through a [`Handoff`]: the
//! source's asks for the VM to be paused and captured, the destination's for it to be built.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use kvm_ioctls::VmFd;
use serde::Serialize;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use arch::GuestMemory;

use crate::config::VmConfig;
use crate::exit::ExitLatch;
use crate::snapshot::Snapshot;

pub mod control;
mod lanes;
pub mod postcopy;
pub mod receive;
pub mod send;
pub mod stream;
pub mod throttle;
pub mod tls;
pub mod transport;
mod uffd;
pub mod written;

pub use transport::Url;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    #[default]
    Listening,
    Connecting,
    Precopy,
    Switchover,
    /// The VM runs on the destination, which still fetches pages from the source.
    Postcopy,
    Completed,
    Failed,
    Cancelled,
}

/// What `GET /ferrovisor/migration` reports.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Status {
    /// "source" or "destination".
    pub role: &'static str,
    pub url: String,
    pub phase: Phase,
    pub round: u32,
    /// Memory sent (received) so far, frames included.
    pub bytes: u64,
    /// Dirty memory at the last count: what the next round or the switch-over sends.
    pub bytes_left: u64,
    pub dirty_rate_mib_s: f64,
    pub bandwidth_mib_s: f64,
    pub expected_downtime_ms: f64,
    /// The share of time auto-converge holds the vCPUs back, in percent.
    pub throttle_percent: u32,
    /// From the pause to the destination's word that the VM runs there.
    pub downtime_ms: Option<f64>,
    pub total_ms: Option<f64>,
    pub error: Option<String>,
}

/// Counters for the metrics (`migration` in `GET /ferrovisor/metrics`).
pub mod counters {
    use std::sync::atomic::AtomicU64;
    pub static STARTED: AtomicU64 = AtomicU64::new(0);
    pub static COMPLETED: AtomicU64 = AtomicU64::new(0);
    pub static FAILED: AtomicU64 = AtomicU64::new(0);
    pub static BYTES_SENT: AtomicU64 = AtomicU64::new(0);
    pub static BYTES_RECEIVED: AtomicU64 = AtomicU64::new(0);
    /// The last switch-over's pause on this source.
    pub static LAST_DOWNTIME_US: AtomicU64 = AtomicU64::new(0);
}

/// A migration thread's shared parts.
pub(crate) struct Shared {
    pub status: Mutex<Status>,
    pub cancelled: AtomicBool,
    /// Source: the whole VM is on the wire (state and end), so that the destination may run it
    /// whatever reaches this side now; only its explicit refusal lets the source resume.
    pub handed_over: AtomicBool,
    /// Cut the connections off on a cancel, so that a thread blocked on a silent peer returns.
    cutters: Mutex<Vec<std::os::fd::OwnedFd>>,
    handoff: Mutex<Step>,
    changed: Condvar,
    /// Destination: the VM's shell, which the controller makes while the rest arrives.
    shell: Mutex<ShellStep>,
    shell_made: Condvar,
    latch: Arc<ExitLatch>,
    pub started: Instant,
}

/// The destination's VM shell ([`crate::vm::Shell`]) between its thread and the controller.
pub(crate) enum ShellStep {
    /// No memory yet.
    Waiting,
    /// The configuration, and the memory the pages arrive in: the controller makes the shell.
    Due(Box<(VmConfig, GuestMemory)>),
    /// The controller tried (a failed attempt is made again, and reported, at the build).
    Made,
}

/// Where the VM stands between a migration thread and the controller.
pub(crate) enum Step {
    Working,
    /// Source: pause the VM and capture its state.
    SwitchoverDue,
    /// Source: the paused VM's state file, from the controller.
    Captured(Result<Vec<u8>, String>),
    /// Destination: memory and state arrived; the controller builds the VM.
    Arrived(Box<(Snapshot, GuestMemory)>),
    /// Destination: whether the VM runs, from the controller.
    Built(Result<(), String>),
    /// The thread is done.
    Finished(Result<(), String>),
    /// The controller took the outcome.
    Closed,
}

impl Shared {
    fn new(role: &'static str, url: &Url, latch: Arc<ExitLatch>) -> Arc<Shared> {
        counters::STARTED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let status = Status { role, url: url.to_string(), ..Default::default() };
        Arc::new(Shared {
            status: Mutex::new(status),
            cancelled: AtomicBool::new(false),
            handed_over: AtomicBool::new(false),
            cutters: Mutex::new(Vec::new()),
            handoff: Mutex::new(Step::Working),
            changed: Condvar::new(),
            shell: Mutex::new(ShellStep::Waiting),
            shell_made: Condvar::new(),
            latch,
            started: Instant::now(),
        })
    }

    /// Keeps a way to cut `connection` off for [`Self::cancel`].
    fn connected(&self, connection: &dyn transport::Stream) {
        let mut cutters = self.cutters.lock().unwrap_or_else(|p| p.into_inner());
        cutters.extend(transport::cutter(connection));
    }

    /// Asks the threads to stop, and cuts their connections so that they stop at once.
    fn cancel(&self) {
        self.cancelled.store(true, std::sync::atomic::Ordering::Relaxed);
        for fd in self.cutters.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            transport::cut(fd);
        }
    }

    pub fn status(&self) -> std::sync::MutexGuard<'_, Status> {
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn step(&self) -> std::sync::MutexGuard<'_, Step> {
        self.handoff.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The thread's side: moves to `step` and wakes the controller.
    fn hand_to_controller(&self, step: Step) {
        *self.step() = step;
        self.latch.poke();
    }

    fn shell(&self) -> std::sync::MutexGuard<'_, ShellStep> {
        self.shell.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Destination: the memory the pages go to is made; the controller may build around it.
    fn memory_made(&self, config: &VmConfig, mem: &GuestMemory) {
        *self.shell() = ShellStep::Due(Box::new((config.clone(), mem.clone())));
        self.latch.poke();
    }

    /// Destination: waits at most `limit` for the controller to make the shell.
    fn wait_shell(&self, limit: std::time::Duration) {
        let shell = self.shell();
        let _ = self.shell_made.wait_timeout_while(shell, limit, |s| !matches!(s, ShellStep::Made));
    }

    /// Either side: moves to `step` and wakes whoever waits.
    fn hand_over(&self, step: Step) {
        *self.step() = step;
        self.changed.notify_all();
    }

    /// Waits until `take` accepts the step, and returns what it took.
    fn wait_for<T>(&self, mut take: impl FnMut(&mut Step) -> Option<T>) -> T {
        let mut step = self.step();
        loop {
            if let Some(value) = take(&mut step) {
                return value;
            }
            step = self.changed.wait(step).unwrap_or_else(|p| p.into_inner());
        }
    }

    /// The controller's side: the step as it stands, taken when `take` wants it.
    fn poll<T>(&self, take: impl FnOnce(&mut Step) -> Option<T>) -> Option<T> {
        take(&mut self.step())
    }

    /// Ends the thread's part with `result`, recorded in the status.
    fn finish(&self, result: Result<(), String>) {
        // A cancel cuts the connection: what failed then is the cancel's doing.
        let cancelled = self.cancelled.load(std::sync::atomic::Ordering::Relaxed);
        let result = result.map_err(|e| if cancelled { "the migration was cancelled".into() } else { e });
        {
            use std::sync::atomic::Ordering::Relaxed;
            let mut status = self.status();
            let bytes = if status.role == "source" { &counters::BYTES_SENT } else { &counters::BYTES_RECEIVED };
            bytes.fetch_add(status.bytes, Relaxed);
            match result {
                Ok(()) => counters::COMPLETED.fetch_add(1, Relaxed),
                Err(_) => counters::FAILED.fetch_add(1, Relaxed),
            };
            status.total_ms = Some(self.started.elapsed().as_secs_f64() * 1000.0);
            match &result {
                Ok(()) => status.phase = Phase::Completed,
                Err(_) if cancelled => status.phase = Phase::Cancelled,
                Err(e) => {
                    status.phase = Phase::Failed;
                    status.error = Some(e.clone());
                }
            }
        }
        self.hand_to_controller(Step::Finished(result));
        self.changed.notify_all();
    }
}

vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, kvm_bindings::KVMIO, 0xc0, kvm_bindings::kvm_clear_dirty_log);

/// Turns on KVM's manual dirty-log protection, as QEMU does, where KVM offers it: turning the
/// log on then protects nothing at once (the log starts all set), and each read is followed by
/// a KVM_CLEAR_DIRTY_LOG of exactly the pages read, which protects them again. False where KVM
/// lacks it; reads then clear the log themselves.
pub(crate) fn enable_manual_protect(vm: &VmFd) -> bool {
    use kvm_bindings::{
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    };
    let wanted = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET);
    let offered = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    if offered < 0 || offered as u64 & wanted != wanted {
        return false;
    }
    let cap = kvm_bindings::kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [wanted, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).is_ok()
}

/// Reads memory slot `slot`'s dirty log (`len` bytes of memory, one bit per page) and, with
/// manual protection, clears what it read so that those pages are logged again.
pub(crate) fn take_dirty_log(vm: &VmFd, slot: u32, len: usize, manual: bool) -> Result<Vec<u64>, String> {
    let log = vm.get_dirty_log(slot, len).map_err(|e| format!("KVM refused to report dirty pages: {e}"))?;
    if manual {
        let mut clear = kvm_bindings::kvm_clear_dirty_log {
            slot,
            num_pages: len.div_ceil(stream::PAGE) as u32,
            first_page: 0,
            ..Default::default()
        };
        clear.__bindgen_anon_1.dirty_bitmap = log.as_ptr() as *mut libc::c_void;
        // SAFETY: the bitmap has a bit for each of the slot's pages and outlives the call, which
        // only reads it.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if rc < 0 {
            return Err(format!("KVM refused to clear dirty pages: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(log)
}

/// KVM's dirty log of every region of `mem` (one bit per page, per region), read and cleared:
/// one slot per region, but the hotpluggable region, always the last, is its blocks' slots.
pub(crate) fn kvm_dirty_logs(
    vm: &VmFd,
    mem: &GuestMemory,
    hotplug: Option<&crate::hotplug::PluggableMemory>,
    manual: bool,
) -> Result<Vec<Vec<u64>>, String> {
    let regions = mem.num_regions();
    mem.iter()
        .enumerate()
        .map(|(slot, region)| match hotplug {
            Some(blocks) if slot + 1 == regions => blocks.dirty_log(manual),
            _ => take_dirty_log(vm, slot as u32, region.len() as usize, manual),
        })
        .collect()
}

/// Reads which pages were written since the last read: KVM's dirty log (which the source turned
/// on for every slot) and the devices' writes in the guest memory bitmap.
pub struct DirtyPages {
    vm: Arc<VmFd>,
    mem: GuestMemory,
    hotplug: Option<Arc<crate::hotplug::PluggableMemory>>,
    manual: bool,
    /// The host's view of the same writes and of KVM's own, where the kernel offers it.
    written: Option<written::WriteTracker>,
}

impl DirtyPages {
    pub(crate) fn new(
        vm: Arc<VmFd>,
        mem: GuestMemory,
        hotplug: Option<Arc<crate::hotplug::PluggableMemory>>,
        manual: bool,
    ) -> DirtyPages {
        let written = written::WriteTracker::start(&mem);
        DirtyPages { vm, mem, hotplug, manual, written }
    }

    /// Per region, one bit per page (u64 words), read and cleared.
    pub fn take(&self) -> Result<Vec<Vec<u64>>, String> {
        let mut logs = kvm_dirty_logs(&self.vm, &self.mem, self.hotplug.as_deref(), self.manual)?;
        for (log, region) in logs.iter_mut().zip(self.mem.iter()) {
            let bitmap: &AtomicBitmap = std::ops::Deref::deref(region).bitmap();
            for (word, device) in log.iter_mut().zip(bitmap.get_and_reset()) {
                *word |= device;
            }
        }
        if let Some(tracker) = &self.written {
            tracker.take(&mut logs)?;
        }
        Ok(logs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handoff_wakes_the_waiting_side_with_the_step_it_waits_for() {
        let latch = Arc::new(ExitLatch::new().unwrap());
        let shared = Shared::new("source", &Url::Unix("/x".into()), latch);
        let thread = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                shared.hand_to_controller(Step::SwitchoverDue);
                shared.wait_for(|s| match std::mem::replace(s, Step::Working) {
                    Step::Captured(state) => Some(state),
                    other => {
                        *s = other;
                        None
                    }
                })
            })
        };
        while shared.poll(|s| matches!(s, Step::SwitchoverDue).then_some(())).is_none() {
            std::thread::yield_now();
        }
        shared.hand_over(Step::Captured(Ok(vec![1, 2])));
        assert_eq!(thread.join().unwrap(), Ok(vec![1, 2]));
        shared.finish(Err("the destination went away".into()));
        assert_eq!(shared.status().phase, Phase::Failed);
        assert!(matches!(*shared.step(), Step::Finished(Err(_))));
    }
}
