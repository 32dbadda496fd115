//! Auto-converge: when the guest dirties memory faster than the link carries it, its vCPUs are
//! held back for a growing share of every 20 ms (as QEMU's cpu-throttle), so that the rounds
//! shrink and the switch-over comes with a short pause rather than after `max_rounds`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use crate::vcpu::{self, VcpuShared};

const WINDOW: Duration = Duration::from_millis(20);
/// The first step, each later step, and the most the guest is held back, in percent.
const FIRST: u32 = 20;
const STEP: u32 = 10;
pub const MAX: u32 = 99;

/// A throttle on the vCPUs of one VM; dropping it lets them run freely again.
pub struct Throttle {
    vcpus: Arc<VcpuShared>,
    percent: Arc<AtomicU32>,
    stop: Arc<AtomicBool>,
    thread: Option<sandbox::Thread<()>>,
}

impl Throttle {
    pub fn new(vcpus: Arc<VcpuShared>) -> Throttle {
        Throttle { vcpus, percent: Arc::default(), stop: Arc::default(), thread: None }
    }

    pub fn percent(&self) -> u32 {
        self.percent.load(Ordering::Relaxed)
    }

    /// One step more (the first is 20%, then 10% more each, up to 99%); the new share.
    pub fn step_up(&mut self) -> std::io::Result<u32> {
        let next = match self.percent() {
            0 => FIRST,
            p => (p + STEP).min(MAX),
        };
        self.percent.store(next, Ordering::Relaxed);
        if self.thread.is_none() {
            let (vcpus, percent, stop) = (self.vcpus.clone(), self.percent.clone(), self.stop.clone());
            self.thread = Some(sandbox::spawn(sandbox::ThreadKind::Migration, "throttle", move || {
                hold_back(&vcpus, &percent, &stop)
            })?);
        }
        Ok(next)
    }
}

/// Holds the vCPUs back for `percent` of every window until `stop`.
fn hold_back(vcpus: &VcpuShared, percent: &AtomicU32, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        let held = WINDOW * percent.load(Ordering::Relaxed).min(MAX) / 100;
        vcpus.pause.throttle(true);
        vcpu::kick_running(vcpus);
        std::thread::sleep(held);
        vcpus.pause.throttle(false);
        std::thread::sleep(WINDOW - held);
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        self.vcpus.pause.throttle(false);
    }
}
