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

use serde::Serialize;
use vm_memory::GuestMemoryBackend;
use vm_memory::bitmap::AtomicBitmap;

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

/// Reads which pages were written since the last read: KVM's dirty log (which the source turned
/// on for every slot) and the devices' writes in the guest memory bitmap.
pub struct DirtyPages {
    kvm_log: Arc<crate::dirty::KvmDirtyLog>,
    mem: GuestMemory,
    hotplug: Option<Arc<crate::hotplug::PluggableMemory>>,
    /// The host's view of the same writes and of KVM's own, where the kernel offers it.
    written: Option<written::WriteTracker>,
}

impl DirtyPages {
    pub(crate) fn new(
        kvm_log: Arc<crate::dirty::KvmDirtyLog>,
        mem: GuestMemory,
        hotplug: Option<Arc<crate::hotplug::PluggableMemory>>,
    ) -> DirtyPages {
        let written = written::WriteTracker::start(&mem);
        DirtyPages { kvm_log, mem, hotplug, written }
    }

    /// What tells the written pages, for the log.
    pub fn sources(&self) -> String {
        let kvm = if self.kvm_log.uses_rings() { "KVM's dirty rings" } else { "KVM's dirty bitmap" };
        match self.written {
            Some(_) => format!("{kvm}, the devices' bitmap and the host's page tables"),
            None => format!("{kvm} and the devices' bitmap"),
        }
    }

    /// Per region, one bit per page (u64 words), read and cleared.
    pub fn take(&self) -> Result<Vec<Vec<u64>>, String> {
        let started = Instant::now();
        let mut logs = crate::dirty::take_all(&self.kvm_log, &self.mem, self.hotplug.as_deref())?;
        let kvm = started.elapsed();
        for (log, region) in logs.iter_mut().zip(self.mem.iter()) {
            let bitmap: &AtomicBitmap = std::ops::Deref::deref(region).bitmap();
            for (word, device) in log.iter_mut().zip(bitmap.get_and_reset()) {
                *word |= device;
            }
        }
        let host = Instant::now();
        match &self.written {
            Some(tracker) => tracker.take(&mut logs)?,
            // The host's page tables would still see every write; KVM's log alone would not.
            None if self.kvm_log.overran() => {
                return Err("KVM overran a vCPU's dirty ring, so the pages written are no longer all known".into());
            }
            None => {}
        }
        tracing::debug!(
            "migration: written pages read in {:.2} ms (KVM's log {:.2} ms, the host's page tables {:.2} ms)",
            started.elapsed().as_secs_f64() * 1e3,
            kvm.as_secs_f64() * 1e3,
            host.elapsed().as_secs_f64() * 1e3
        );
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
