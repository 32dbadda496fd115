//! virtio-balloon: the host sets a target, the guest gives pages back, and the VMM returns
//! them to the host with madvise(MADV_DONTNEED). Optional statistics, free page reporting and
//! deflate-on-OOM.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::timerfd::TimerFd;

use crate::device::{ActivateError, Activation, VirtioDevice, VirtioInterrupt, read_config_bytes};
use crate::worker::{Backend, Worker, serve_queue};
use crate::{F_RING_INDIRECT_DESC, F_VERSION_1, GuestMemory, TYPE_BALLOON};

// Feature bits and sizes from the virtio specification (5.5); the binding crate has none.
pub const F_STATS_VQ: u64 = 1 << 1;
pub const F_DEFLATE_ON_OOM: u64 = 1 << 2;
pub const F_FREE_PAGE_HINT: u64 = 1 << 3;
/// Free page hinting's command IDs (virtio 1.2, 5.5.6.7): a run stops, a run's hints may be
/// reused; any other ID starts a run.
pub const CMD_ID_STOP: u32 = 0;
pub const CMD_ID_DONE: u32 = 1;
pub const F_FREE_PAGE_REPORTING: u64 = 1 << 5;
/// Balloon page frame numbers always count 4 KiB pages.
pub const PAGE_SIZE: u64 = 4096;
const PFN_SHIFT: u64 = 12;
/// Page frame numbers taken from one chain at most.
const MAX_PFNS_PER_CHAIN: usize = 1 << 16;
const STAT_BYTES: usize = 10;
const MAX_STATS: usize = 32;
const QUEUE_SIZE: u16 = 256;

/// What the user asked for: `--balloon size=MiB[,deflate_on_oom=on][,stats=on|SECONDS][,free_page_reporting=on]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonOptions {
    pub target_mib: u32,
    pub deflate_on_oom: bool,
    /// How often the guest is asked for fresh statistics, in seconds; 0: no statistics queue.
    pub stats_interval_s: u32,
    pub free_page_reporting: bool,
    /// Free page hinting (runs started through the API).
    #[serde(default)]
    pub free_page_hinting: bool,
}

/// What the host sees of the guest's balloon.
#[derive(Clone, Debug, Default)]
pub struct BalloonState {
    /// Pages the guest says it gave (the `actual` config field).
    pub actual_pages: u32,
    /// Pages the VMM returned to the host, by inflation or free page reporting.
    pub released_pages: u64,
    /// The latest statistics, as (tag, value).
    pub stats: Vec<(u16, u64)>,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Hinting,
    Reporting,
}

/// The balloon's handle for the VMM: change the target and the statistics interval of a
/// running guest, and read what it reported.
pub struct BalloonControl {
    target_pages: AtomicU32,
    state: Mutex<BalloonState>,
    /// Set once the driver is up, so that a new target can be announced.
    interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    stats_interval_s: AtomicU32,
    /// Fires every interval: the held statistics buffer then goes back to the guest.
    stats_timer: Mutex<TimerFd>,
    /// The statistics buffer the guest gave, held until the timer asks for fresh numbers.
    held_stats: Mutex<Option<u16>>,
    hinting: Mutex<Hinting>,
}

/// Where free page hinting stands: the command the host gave (in the config space) and the
/// last one the guest sent back on the hinting queue.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hinting {
    pub host_cmd: u32,
    pub guest_cmd: Option<u32>,
    /// Answer the guest's STOP with DONE at once, so that it may reuse the pages.
    pub acknowledge_on_stop: bool,
}

impl BalloonControl {
    pub fn target_mib(&self) -> u32 {
        pages_to_mib(self.target_pages.load(Ordering::SeqCst))
    }

    /// Sets the target and tells the driver (a config change interrupt).
    pub fn set_target_mib(&self, mib: u32) {
        self.target_pages.store(mib.saturating_mul(PAGES_PER_MIB), Ordering::SeqCst);
        tracing::info!("virtio-balloon: target set to {mib} MiB");
        if let Some(interrupt) = self.interrupt.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            interrupt.signal_config_change();
        }
    }

    pub fn state(&self) -> BalloonState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn stats_interval_s(&self) -> u32 {
        self.stats_interval_s.load(Ordering::SeqCst)
    }

    /// Changes how often statistics are refreshed; only between non-zero values, since the
    /// statistics queue exists only if it was configured at boot.
    pub fn set_stats_interval_s(&self, seconds: u32) {
        self.stats_interval_s.store(seconds, Ordering::SeqCst);
        self.arm_stats_timer();
    }

    fn arm_stats_timer(&self) {
        let seconds = self.stats_interval_s();
        let mut timer = self.stats_timer.lock().unwrap_or_else(|p| p.into_inner());
        let result = if seconds == 0 {
            timer.clear()
        } else {
            let every = Duration::from_secs(u64::from(seconds));
            timer.reset(every, Some(every))
        };
        if let Err(e) = result {
            tracing::warn!("virtio-balloon: the statistics timer cannot be set ({e})");
        }
    }

    pub fn hinting(&self) -> Hinting {
        *self.hinting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts a free page hinting run: a new command ID in the config space.
    pub fn start_hinting(&self, acknowledge_on_stop: bool) {
        let cmd = self.update_hinting(|h| {
            h.host_cmd = h.host_cmd.max(CMD_ID_DONE) + 1;
            h.acknowledge_on_stop = acknowledge_on_stop;
        });
        tracing::info!("virtio-balloon: free page hinting run {cmd} started");
    }

    /// Ends the run: DONE lets the guest reuse the pages it hinted.
    pub fn stop_hinting(&self) {
        self.update_hinting(|h| h.host_cmd = CMD_ID_DONE);
    }

    /// Changes the hinting state and tells the driver; returns the host's command.
    fn update_hinting(&self, change: impl FnOnce(&mut Hinting)) -> u32 {
        let cmd = {
            let mut h = self.hinting.lock().unwrap_or_else(|p| p.into_inner());
            change(&mut h);
            h.host_cmd
        };
        if let Some(interrupt) = self.interrupt.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            interrupt.signal_config_change();
        }
        cmd
    }

    fn take_held_stats(&self) -> Option<u16> {
        self.held_stats.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    fn with_state(&self, f: impl FnOnce(&mut BalloonState)) {
        f(&mut self.state.lock().unwrap_or_else(|p| p.into_inner()));
    }
}

const PAGES_PER_MIB: u32 = (1 << 20) / PAGE_SIZE as u32;

fn pages_to_mib(pages: u32) -> u32 {
    pages / PAGES_PER_MIB
}

pub struct Balloon {
    options: BalloonOptions,
    control: Arc<BalloonControl>,
    queue_sizes: Vec<u16>,
    worker: Option<Worker>,
}

impl Balloon {
    pub fn new(options: BalloonOptions) -> std::io::Result<Balloon> {
        let queues = 2
            + usize::from(options.stats_interval_s > 0)
            + usize::from(options.free_page_hinting)
            + usize::from(options.free_page_reporting);
        let control = Arc::new(BalloonControl {
            target_pages: AtomicU32::new(options.target_mib.saturating_mul(PAGES_PER_MIB)),
            state: Mutex::new(BalloonState::default()),
            interrupt: Mutex::new(None),
            stats_interval_s: AtomicU32::new(options.stats_interval_s),
            stats_timer: Mutex::new(TimerFd::new()?),
            held_stats: Mutex::new(None),
            hinting: Mutex::new(Hinting::default()),
        });
        Ok(Balloon { options, control, queue_sizes: vec![QUEUE_SIZE; queues], worker: None })
    }

    pub fn control(&self) -> Arc<BalloonControl> {
        self.control.clone()
    }
}

/// The role of each queue the driver set up: statsq and reporting_vq exist only when their
/// features were negotiated, and later queues take the indices of missing ones.
fn roles(acked: u64) -> Vec<Role> {
    let mut roles = vec![Role::Inflate, Role::Deflate];
    if acked & F_STATS_VQ != 0 {
        roles.push(Role::Stats);
    }
    if acked & F_FREE_PAGE_HINT != 0 {
        roles.push(Role::Hinting);
    }
    if acked & F_FREE_PAGE_REPORTING != 0 {
        roles.push(Role::Reporting);
    }
    roles
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }
    fn features(&self) -> u64 {
        let mut f = F_VERSION_1 | F_RING_INDIRECT_DESC;
        if self.options.deflate_on_oom {
            f |= F_DEFLATE_ON_OOM;
        }
        if self.options.stats_interval_s > 0 {
            f |= F_STATS_VQ;
        }
        if self.options.free_page_reporting {
            f |= F_FREE_PAGE_REPORTING;
        }
        if self.options.free_page_hinting {
            f |= F_FREE_PAGE_HINT;
        }
        f
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let actual = self.control.state().actual_pages;
        // num_pages, actual, free_page_hint_cmd_id, poison_val (no PAGE_POISON: 0).
        let mut config = [0u8; 16];
        config[0..4].copy_from_slice(&self.control.target_pages.load(Ordering::SeqCst).to_le_bytes());
        config[4..8].copy_from_slice(&actual.to_le_bytes());
        config[8..12].copy_from_slice(&self.control.hinting().host_cmd.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4..8) is the driver's to write.
        if offset != 4 || data.len() != 4 {
            crate::guest_fault!("virtio-balloon: ignored a {}-byte config write at {offset:#x}", data.len());
            return;
        }
        let pages = u32::from_le_bytes(data.try_into().expect("four bytes"));
        let target = self.control.target_pages.load(Ordering::SeqCst);
        self.control.with_state(|state| {
            if state.actual_pages != pages {
                let mib = (u64::from(pages) * PAGE_SIZE) >> 20;
                // Reaching the target and the steps on the way are counted apart, so that the
                // steps (which a guest can repeat without end) do not hide the arrival.
                if pages == target {
                    crate::guest_event!("virtio-balloon: the guest holds {mib} MiB in the balloon");
                } else {
                    crate::guest_event!("virtio-balloon: the guest holds {mib} MiB in the balloon");
                }
            }
            state.actual_pages = pages;
        });
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let roles = roles(activation.acked_features);
        if activation.queues.len() < roles.len() {
            return Err(ActivateError::QueueCount { want: roles.len(), got: activation.queues.len() });
        }
        *self.control.interrupt.lock().unwrap_or_else(|p| p.into_inner()) = Some(activation.interrupt.clone());
        let stats_timer = match roles.contains(&Role::Stats) {
            true => {
                let timer = self.control.stats_timer.lock().unwrap_or_else(|p| p.into_inner());
                Some(timer.as_raw_fd())
            }
            false => None,
        };
        if stats_timer.is_some() {
            self.control.arm_stats_timer();
        }
        let backend = BalloonBackend { roles, control: self.control.clone(), stats_timer };
        self.worker =
            Some(Worker::spawn(sandbox::ThreadKind::Balloon, backend, activation).map_err(ActivateError::Worker)?);
        Ok(())
    }
    fn save_state(&self) -> serde_json::Value {
        let c = &self.control;
        serde_json::json!({
            "target_pages": c.target_pages.load(Ordering::SeqCst),
            "actual_pages": c.state().actual_pages,
            "stats_interval_s": c.stats_interval_s(),
            "held_stats": *c.held_stats.lock().unwrap_or_else(|p| p.into_inner()),
        })
    }
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let number = |key: &str| {
            state[key].as_u64().and_then(|n| u32::try_from(n).ok()).ok_or(format!("virtio-balloon: {key} is missing"))
        };
        let c = &self.control;
        c.target_pages.store(number("target_pages")?, Ordering::SeqCst);
        c.with_state(|s| s.actual_pages = number("actual_pages").unwrap_or(0));
        c.stats_interval_s.store(number("stats_interval_s")?, Ordering::SeqCst);
        *c.held_stats.lock().unwrap_or_else(|p| p.into_inner()) =
            state["held_stats"].as_u64().and_then(|h| u16::try_from(h).ok());
        Ok(())
    }
    fn quiesce(&mut self) -> Option<Vec<Queue>> {
        self.worker.take().and_then(|mut w| w.stop())
    }
    fn reset(&mut self) {
        self.worker = None;
        *self.control.interrupt.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.control.take_held_stats();
        let mut timer = self.control.stats_timer.lock().unwrap_or_else(|p| p.into_inner());
        let _ = timer.clear();
    }
}

struct BalloonBackend {
    roles: Vec<Role>,
    control: Arc<BalloonControl>,
    /// The statistics timer's fd, when the driver set up the statistics queue.
    stats_timer: Option<RawFd>,
}

/// Returns guest pages [gpa, gpa + len) to the host; false when the range is not guest RAM.
pub fn release(mem: &GuestMemory, gpa: u64, len: u64) -> bool {
    if len == 0 || !gpa.is_multiple_of(PAGE_SIZE) || !len.is_multiple_of(PAGE_SIZE) {
        return false;
    }
    let Ok(len_usize) = usize::try_from(len) else { return false };
    // The whole range must sit in one region: a range crossing into the MMIO hole is refused.
    if !mem.check_range(GuestAddress(gpa), len_usize) {
        return false;
    }
    let Ok(host) = mem.get_host_address(GuestAddress(gpa)) else { return false };
    // Shared memory (a memfd) keeps its pages in the file: they must be punched out of it. A
    // private file mapping (a restored snapshot) only drops its own copies.
    let shared = mem.find_region(GuestAddress(gpa)).is_some_and(|r| r.flags() & libc::MAP_SHARED != 0);
    let advice = if shared { libc::MADV_REMOVE } else { libc::MADV_DONTNEED };
    // SAFETY: [host, host + len) is guest RAM mapped by this process (checked above): the
    // advice drops its pages and the guest reads zeroes if it touches them again, which is
    // what a released page is allowed to hold.
    unsafe { libc::madvise(host.cast(), len_usize, advice) == 0 }
}

/// Consecutive page frames from an inflate request.
#[derive(Default)]
struct PageRun {
    first: u64,
    pages: u64,
}

impl PageRun {
    /// Takes `pfn` when it follows the run; false when it starts another.
    fn extend(&mut self, pfn: u64) -> bool {
        if self.pages == 0 {
            *self = PageRun { first: pfn, pages: 1 };
        } else if self.first + self.pages == pfn {
            self.pages += 1;
        } else {
            return false;
        }
        true
    }

    /// Returns the run's pages to the host; a run that is not all guest RAM goes page by
    /// page. Returns how many were released.
    fn release(&self, mem: &GuestMemory) -> u64 {
        if self.pages == 0 {
            return 0;
        }
        if release(mem, self.first << PFN_SHIFT, self.pages * PAGE_SIZE) {
            return self.pages;
        }
        let released = (self.first..self.first + self.pages)
            .filter(|pfn| release(mem, pfn << PFN_SHIFT, PAGE_SIZE))
            .count() as u64;
        if released < self.pages {
            tracing::debug!("virtio-balloon: page frames from {:#x} are not all guest RAM", self.first);
        }
        released
    }
}

impl BalloonBackend {
    /// Inflation: the chain carries little-endian u32 page frame numbers.
    fn inflate(&self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let control = &self.control;
        serve_queue("virtio-balloon", queue, mem, |chain| {
            let mut released = 0u64;
            let mut taken = 0usize;
            // Consecutive frames are released together: one madvise per run, not per page.
            let mut run = PageRun::default();
            'chain: for desc in chain.readable() {
                let count = desc.len() as usize / 4;
                for i in 0..count {
                    if taken == MAX_PFNS_PER_CHAIN {
                        crate::guest_fault!(
                            "virtio-balloon: an inflate request of more than {MAX_PFNS_PER_CHAIN} pages was cut"
                        );
                        break 'chain;
                    }
                    taken += 1;
                    // A buffer that wraps the address space is outside RAM as well.
                    let at = desc.addr().checked_add(4 * i as u64);
                    let Some(Ok(pfn)) = at.map(|at| mem.read_obj::<u32>(at)) else {
                        crate::guest_fault!("virtio-balloon: an inflate buffer lies outside guest RAM");
                        break 'chain;
                    };
                    if !run.extend(u64::from(pfn)) {
                        released += run.release(mem);
                        run = PageRun { first: u64::from(pfn), pages: 1 };
                    }
                }
            }
            released += run.release(mem);
            control.with_state(|s| s.released_pages += released);
            0
        })
    }

    /// Free page hinting: a 4-byte readable buffer is a command ID from the guest (the run it
    /// starts hinting for, or STOP); writable buffers are free pages of the run under way,
    /// whose contents the host may drop.
    fn hint(&self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let control = &self.control;
        serve_queue("virtio-balloon", queue, mem, |chain| {
            let mut released = 0u64;
            for desc in chain {
                if !desc.is_write_only() {
                    let Some(Ok(cmd)) = (desc.len() == 4).then(|| mem.read_obj::<u32>(desc.addr())) else {
                        crate::guest_fault!("virtio-balloon: a hinting command is not 4 readable bytes");
                        continue;
                    };
                    let acknowledge = {
                        let mut h = control.hinting.lock().unwrap_or_else(|p| p.into_inner());
                        h.guest_cmd = Some(cmd);
                        cmd == CMD_ID_STOP && h.acknowledge_on_stop && h.host_cmd > CMD_ID_DONE
                    };
                    if acknowledge {
                        control.stop_hinting();
                    }
                    continue;
                }
                // Hints count only for the run the host asked for.
                let h = control.hinting();
                if h.host_cmd <= CMD_ID_DONE || h.guest_cmd != Some(h.host_cmd) {
                    crate::guest_fault!("virtio-balloon: a free page hint outside a hinting run was ignored");
                    continue;
                }
                let (gpa, len) = (desc.addr().0, u64::from(desc.len()));
                if release(mem, gpa, len) {
                    released += len / PAGE_SIZE;
                } else {
                    crate::guest_fault!(
                        "virtio-balloon: a hinted range {gpa:#x}+{len:#x} is not whole pages of guest RAM"
                    );
                }
            }
            control.with_state(|s| s.released_pages += released);
            0
        })
    }

    /// Free page reporting: each buffer is a free range the guest lends back.
    fn report(&self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let control = &self.control;
        serve_queue("virtio-balloon", queue, mem, |chain| {
            let mut released = 0u64;
            for desc in chain {
                let (gpa, len) = (desc.addr().0, u64::from(desc.len()));
                if release(mem, gpa, len) {
                    released += len / PAGE_SIZE;
                } else {
                    crate::guest_fault!(
                        "virtio-balloon: a reported range {gpa:#x}+{len:#x} is not whole pages of guest RAM"
                    );
                }
            }
            control.with_state(|s| s.released_pages += released);
            0
        })
    }

    /// Statistics: the guest's buffer of (tag, value) pairs. It is read and held until the
    /// timer asks for fresh numbers (returning it is the request), as the specification says.
    fn stats(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let mut used = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            // A driver that sends a second buffer gets the first one back.
            if let Some(old) = self.control.take_held_stats() {
                used |= self.give_back(queue, mem, old);
            }
            let head = chain.head_index();
            let mut stats = Vec::new();
            // At most MAX_STATS in all: an indirect table of thousands of buffers would
            // otherwise allocate megabytes per chain.
            'chain: for desc in chain.readable() {
                for i in 0..desc.len() as usize / STAT_BYTES {
                    if stats.len() == MAX_STATS {
                        break 'chain;
                    }
                    let mut raw = [0u8; STAT_BYTES];
                    let at = desc.addr().checked_add((i * STAT_BYTES) as u64);
                    if at.is_none_or(|at| mem.read_slice(&mut raw, at).is_err()) {
                        crate::guest_fault!("virtio-balloon: a statistics buffer lies outside guest RAM");
                        break;
                    }
                    let tag = u16::from_le_bytes([raw[0], raw[1]]);
                    let value = u64::from_le_bytes(raw[2..10].try_into().expect("eight bytes"));
                    stats.push((tag, value));
                }
            }
            self.control.with_state(|s| s.stats = stats);
            *self.control.held_stats.lock().unwrap_or_else(|p| p.into_inner()) = Some(head);
        }
        used
    }

    fn give_back(&self, queue: &mut Queue, mem: &GuestMemory, head: u16) -> bool {
        if let Err(e) = queue.add_used(mem, head, 0) {
            crate::guest_fault!("virtio-balloon: cannot return the statistics buffer ({e})");
            return false;
        }
        queue.needs_notification(mem).unwrap_or(true)
    }

    fn stats_index(&self) -> Option<usize> {
        self.roles.iter().position(|r| *r == Role::Stats)
    }
}

impl Backend for BalloonBackend {
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        match self.roles.get(index) {
            Some(Role::Inflate) => self.inflate(&mut queues[index], mem),
            // Deflated pages need nothing: they fault back in when the guest touches them.
            Some(Role::Deflate) => serve_queue("virtio-balloon", &mut queues[index], mem, |_| 0),
            Some(Role::Stats) => self.stats(&mut queues[index], mem),
            Some(Role::Hinting) => self.hint(&mut queues[index], mem),
            Some(Role::Reporting) => self.report(&mut queues[index], mem),
            None => false,
        }
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        self.stats_timer.into_iter().collect()
    }

    /// The statistics timer fired: hand the held buffer back, which asks for fresh numbers.
    fn process_fd(&mut self, fd: RawFd, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let mut expirations = [0u8; 8];
        // SAFETY: reads at most 8 bytes into a live 8-byte buffer from the timerfd we were
        // woken for; a failed read (nothing pending) is harmless.
        unsafe { libc::read(fd, expirations.as_mut_ptr().cast(), 8) };
        self.stats_due(queues, mem)
    }
}

impl BalloonBackend {
    /// The statistics interval has passed: the held buffer goes back, asking for fresh numbers.
    fn stats_due(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        match (self.control.take_held_stats(), self.stats_index()) {
            (Some(head), Some(index)) => self.give_back(&mut queues[index], mem, head),
            _ => false,
        }
    }
}

/// The worker's work for the fuzzer, over `queues` in `mem`: the first `script` byte holds
/// the features the driver acked, each next byte notifies a queue or, past the last queue,
/// fires the statistics timer.
#[doc(hidden)]
pub fn fuzz_queues(mem: &GuestMemory, queues: &mut [Queue], script: &[u8]) {
    let Some((&features, script)) = script.split_first() else { return };
    let acked = u64::from(features) & (F_STATS_VQ | F_DEFLATE_ON_OOM | F_FREE_PAGE_HINT | F_FREE_PAGE_REPORTING);
    // One balloon for the whole run (making its timer is most of a run's cost), emptied first.
    static BALLOON: std::sync::OnceLock<Option<Balloon>> = std::sync::OnceLock::new();
    let Some(balloon) = BALLOON.get_or_init(|| Balloon::new(BalloonOptions::default()).ok()) else { return };
    let control = balloon.control();
    control.take_held_stats();
    control.with_state(|s| *s = BalloonState::default());
    // A hinting run under way half of the time, so that hints are taken.
    *control.hinting.lock().unwrap_or_else(|p| p.into_inner()) =
        Hinting { host_cmd: 2, guest_cmd: (features & 0x80 != 0).then_some(2), acknowledge_on_stop: true };
    let mut backend = BalloonBackend { roles: roles(acked), control, stats_timer: None };
    for &op in script {
        match usize::from(op) % (queues.len() + 1) {
            index if index < queues.len() => backend.process_queue(index, queues, mem),
            _ => backend.stats_due(queues, mem),
        };
        assert!(backend.control.state().stats.len() <= MAX_STATS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_roles_follow_the_negotiated_features() {
        assert_eq!(roles(0), [Role::Inflate, Role::Deflate]);
        assert_eq!(roles(F_FREE_PAGE_REPORTING), [Role::Inflate, Role::Deflate, Role::Reporting]);
        assert_eq!(
            roles(F_STATS_VQ | F_FREE_PAGE_REPORTING),
            [Role::Inflate, Role::Deflate, Role::Stats, Role::Reporting]
        );
        assert_eq!(
            roles(F_STATS_VQ | F_FREE_PAGE_HINT | F_FREE_PAGE_REPORTING),
            [Role::Inflate, Role::Deflate, Role::Stats, Role::Hinting, Role::Reporting]
        );
    }

    /// One statistics chain through an indirect table of 1000 buffers, each full of tags: the
    /// VMM keeps MAX_STATS of them, not 32000.
    #[test]
    fn a_statistics_chain_of_many_buffers_keeps_a_bounded_list() {
        use virtio_bindings::virtio_ring::VRING_DESC_F_INDIRECT;
        use virtio_queue::desc::RawDescriptor;
        use virtio_queue::desc::split::Descriptor as SplitDescriptor;
        use virtio_queue::mock::MockSplitQueue;
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let (table, buffer, count) = (0x1_0000u64, 0x2_0000u64, 1000u16);
        for i in 0..count {
            let next = if i + 1 < count { virtio_bindings::virtio_ring::VRING_DESC_F_NEXT as u16 } else { 0 };
            let desc = RawDescriptor::from(SplitDescriptor::new(buffer, (MAX_STATS * STAT_BYTES) as u32, next, i + 1));
            mem.write_obj(desc, GuestAddress(table + 16 * u64::from(i))).unwrap();
        }
        let ring = MockSplitQueue::create(&mem, GuestAddress(0x8000), 16);
        let head = SplitDescriptor::new(table, 16 * u32::from(count), VRING_DESC_F_INDIRECT as u16, 0);
        ring.add_desc_chains(&[RawDescriptor::from(head)], 0).unwrap();
        let mut queue: Queue = ring.create_queue().unwrap();
        let mut backend = BalloonBackend {
            roles: roles(F_STATS_VQ),
            control: Balloon::new(BalloonOptions::default()).unwrap().control(),
            stats_timer: None,
        };
        backend.stats(&mut queue, &mem);
        assert_eq!(backend.control.state().stats.len(), MAX_STATS);
    }

    #[test]
    fn consecutive_frames_are_released_as_one_run() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut run = PageRun::default();
        assert!(run.extend(5) && run.extend(6) && run.extend(7));
        assert!(!run.extend(9));
        assert_eq!((run.first, run.pages), (5, 3));
        assert_eq!(run.release(&mem), 3);
        // A run that reaches past RAM releases the pages that are RAM.
        assert_eq!(PageRun { first: 0xfe, pages: 4 }.release(&mem), 2);
        assert_eq!(PageRun::default().release(&mem), 0);
    }

    #[test]
    fn release_takes_only_whole_pages_of_guest_ram() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 * PAGE_SIZE as usize)]).unwrap();
        mem.write_slice(&[7u8; 4096], GuestAddress(PAGE_SIZE)).unwrap();
        assert!(release(&mem, PAGE_SIZE, PAGE_SIZE));
        assert_eq!(mem.read_obj::<u64>(GuestAddress(PAGE_SIZE)).unwrap(), 0, "a released page reads as zero");
        assert!(!release(&mem, 100, PAGE_SIZE), "unaligned");
        assert!(!release(&mem, 0, 100), "partial page");
        assert!(!release(&mem, 15 * PAGE_SIZE, 2 * PAGE_SIZE), "past the end of RAM");
        assert!(!release(&mem, 0xffff_ffff_ffff_f000, PAGE_SIZE), "far outside");
    }

    #[test]
    fn config_shows_the_target_and_takes_only_actual() {
        let mut b = Balloon::new(BalloonOptions { target_mib: 64, ..Default::default() }).unwrap();
        let mut word = [0u8; 4];
        b.read_config(0, &mut word);
        assert_eq!(u32::from_le_bytes(word), 64 * 256);
        b.write_config(0, &[0xff; 4]);
        b.write_config(4, &1000u32.to_le_bytes());
        b.read_config(0, &mut word);
        assert_eq!(u32::from_le_bytes(word), 64 * 256, "the target is the host's");
        b.read_config(4, &mut word);
        assert_eq!(u32::from_le_bytes(word), 1000);
    }
}
