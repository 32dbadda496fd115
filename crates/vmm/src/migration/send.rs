//! The source side: a thread copies guest memory while the guest runs, round after round, and
//! asks the controller to pause and capture the VM when what is left fits the downtime target.

use std::io::{BufWriter, Write};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use api::models;
use kvm_ioctls::Kvm;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use arch::GuestMemory;

use super::lanes::{Lanes, MAX_CONNECTIONS};
use super::stream::{self, Kind, PAGE};
use super::transport::{self, Stream, Url};
use super::{DirtyPages, Phase, Shared, Status, Step};
use crate::config::VmConfig;
use crate::exit::ExitLatch;
use crate::vm::RunningVm;

/// `PUT /ferrovisor/migration/send`, checked.
#[derive(Clone, Debug)]
pub struct SendOptions {
    pub url: Url,
    pub downtime_ms: u64,
    pub timeout: Option<Duration>,
    /// On timeout, switch over at once rather than give up.
    pub switch_on_timeout: bool,
    pub max_rounds: u32,
    /// Same host: hand over guest memory's file and the TAPs rather than copy pages.
    pub local: bool,
    /// The source's side of TLS, for a `tls:` URL.
    pub tls: Option<Arc<rustls::ClientConfig>>,
    /// Switch over without the last pages; the destination fetches them.
    pub postcopy: bool,
    /// Pages go over this many connections at once.
    pub connections: u32,
}

impl SendOptions {
    pub const DEFAULT_DOWNTIME_MS: u64 = 300;
    pub const DEFAULT_MAX_ROUNDS: u32 = 30;

    /// The request's options; the error names the field and the fix.
    pub fn from_request(m: &models::MigrationSend) -> Result<SendOptions, String> {
        let url = Url::parse("destination_url", &m.destination_url)?;
        let downtime_ms = m.downtime_ms.unwrap_or(Self::DEFAULT_DOWNTIME_MS);
        if !(1..=60_000).contains(&downtime_ms) {
            return Err(format!("downtime_ms {downtime_ms} is not from 1 to 60000; give a target in that range."));
        }
        let max_rounds = m.max_rounds.unwrap_or(Self::DEFAULT_MAX_ROUNDS);
        if !(1..=1000).contains(&max_rounds) {
            return Err(format!("max_rounds {max_rounds} is not from 1 to 1000; give a count in that range."));
        }
        if m.timeout_s == Some(0) {
            return Err("timeout_s is 0; give a number of seconds, or leave it out for no limit.".into());
        }
        let switch_on_timeout = match m.timeout_action.as_deref() {
            None | Some("cancel") => false,
            Some("switch") => true,
            Some(other) => return Err(format!("timeout_action {other:?} is neither \"cancel\" nor \"switch\".")),
        };
        if m.local && !matches!(url, Url::Unix(_)) {
            return Err("local needs a unix: destination_url: the memory's file goes over the socket.".into());
        }
        if m.postcopy && m.local {
            return Err("postcopy copies pages and local copies none: leave one of the two out.".into());
        }
        let connections = m.connections.unwrap_or(1);
        if !(1..=MAX_CONNECTIONS).contains(&connections) {
            return Err(format!(
                "connections {connections} is not from 1 to {MAX_CONNECTIONS}; give a count in that range."
            ));
        }
        if connections > 1 && (m.local || m.postcopy) {
            return Err("connections above 1 carry copied pages: leave it out with local or postcopy.".into());
        }
        let tls = super::tls::TlsFiles::for_url(&url, "destination_url", &m.tls_cert, &m.tls_key, &m.tls_ca)?
            .map(|files| files.client())
            .transpose()?;
        Ok(SendOptions {
            url,
            downtime_ms,
            timeout: m.timeout_s.map(Duration::from_secs),
            switch_on_timeout,
            max_rounds,
            local: m.local,
            tls,
            postcopy: m.postcopy,
            connections,
        })
    }
}

/// The controller's handle on an outgoing migration.
pub struct Outgoing {
    shared: Arc<Shared>,
    url: Url,
    _thread: sandbox::Thread<()>,
}

/// What a poll of an outgoing migration found.
pub enum Outcome {
    /// Still copying (or nothing to do).
    Running,
    /// The VM runs on the destination: this VMM stops.
    Moved(String),
    /// The migration ended without moving the VM, which runs on here.
    Failed,
}

/// What the thread copies from.
struct Source {
    mem: GuestMemory,
    /// Memory mapped from a snapshot's file: a page not resident still holds data.
    restored: bool,
    hotplug: Option<Arc<virtio::mem::MemControl>>,
    config: Vec<u8>,
    vcpus: Arc<crate::vcpu::VcpuShared>,
}

impl Source {
    fn unplugged(&self) -> Vec<(u64, u64)> {
        self.hotplug.as_ref().map(|c| c.unplugged_ranges()).unwrap_or_default()
    }
}

impl Outgoing {
    /// Connects to the destination and starts copying; errors are sentences for a 400.
    pub fn start(
        vm: &mut RunningVm,
        config: &VmConfig,
        options: SendOptions,
        latch: &Arc<ExitLatch>,
    ) -> Result<Outgoing, String> {
        vm.check_movable().map_err(|e| format!("The VM cannot migrate: {e}."))?;
        let served = config.vhost_user_devices();
        if !served.is_empty() {
            return Err(format!(
                "The VM cannot migrate: its {} are served by other processes (vhost-user), whose state it cannot move.",
                served.join(", ")
            ));
        }
        if options.local && vm.memory().iter().any(|r| r.file_offset().is_none()) {
            return Err("A local migration hands guest memory over, so it must be shared: start the VM with \
                        --memory shared=on (or \"ferrovisor-memory\": {\"shared\": true})."
                .into());
        }
        if options.postcopy && config.memory.hugepages == crate::config::HugePages::On {
            return Err("Post-copy moves 4 KiB pages one by one: it needs guest memory without hugepages=on.".into());
        }
        // A local migration copies no pages: nothing to track.
        let dirty = match options.local {
            true => None,
            false => Some(vm.track_dirty_pages(config).map_err(|e| format!("The migration cannot start: {e}."))?),
        };
        let source = Source {
            mem: vm.memory().clone(),
            restored: vm.is_restored(),
            hotplug: vm.memory_hotplug().cloned(),
            vcpus: vm.vcpus(),
            config: serde_json::to_vec(config).map_err(|e| format!("The configuration cannot be encoded: {e}."))?,
        };
        let shared = Shared::new("source", &options.url, latch.clone());
        let url = options.url.clone();
        match &dirty {
            Some(dirty) => tracing::info!("migration to {url}: started; {} tell the pages written", dirty.sources()),
            None => tracing::info!("migration to {url}: started"),
        }
        // The thread connects (the main thread's filter has no sockets) and says how it went.
        let (connected, wait_connected) = std::sync::mpsc::sync_channel(1);
        shared.status().phase = Phase::Connecting;
        let thread = {
            let shared = shared.clone();
            sandbox::spawn(sandbox::ThreadKind::Migration, "migration", move || {
                let connection = match transport::connect(&options.url, options.tls.as_ref()) {
                    Ok(c) => c,
                    Err(e) => {
                        let _ = connected.send(Err(e.clone()));
                        return shared.finish(Err(e));
                    }
                };
                shared.connected(connection.as_ref());
                let _ = connected.send(Ok(()));
                let result = match &dirty {
                    Some(dirty) => run(&shared, connection, &options, &source, dirty),
                    None => run_local(&shared, connection, &source),
                };
                shared.finish(result);
            })
            .map_err(|e| format!("The migration thread cannot start: {e}."))?
        };
        match wait_connected.recv() {
            Ok(Ok(())) => Ok(Outgoing { shared, url, _thread: thread }),
            Ok(Err(e)) => Err(format!("The migration cannot start: {e}.")),
            Err(_) => Err("The migration thread ended before it connected.".into()),
        }
    }

    pub fn status(&self) -> Status {
        self.shared.status().clone()
    }

    /// Stops a migration before its switch-over; the VM runs on here.
    pub fn cancel(&self) -> Result<(), String> {
        match self.shared.status().phase {
            Phase::Connecting | Phase::Listening | Phase::Precopy => {
                self.shared.cancel();
                Ok(())
            }
            Phase::Switchover => Err("The migration is switching over; it can no longer be cancelled.".into()),
            _ => Err("The migration has ended already.".into()),
        }
    }

    /// Serves the thread: pauses and captures the VM when the switch-over is due, and waits for
    /// the destination's word; otherwise reports how the thread ended, if it did.
    pub fn poll(&self, vm: &mut RunningVm, kvm: &Kvm, config: &VmConfig) -> Outcome {
        enum Due {
            Switchover,
            Ended(Result<(), String>),
        }
        let due = self.shared.poll(|step| match std::mem::replace(step, Step::Working) {
            Step::SwitchoverDue => Some(Due::Switchover),
            Step::Finished(result) => {
                *step = Step::Closed;
                Some(Due::Ended(result))
            }
            other => {
                *step = other;
                None
            }
        });
        match due {
            None => Outcome::Running,
            Some(Due::Ended(result)) => self.ended(result, None, vm),
            Some(Due::Switchover) => {
                let paused_at = Instant::now();
                let was_paused = vm.is_paused();
                self.shared.status().phase = Phase::Switchover;
                let state = vm
                    .pause()
                    .map_err(|e| e.to_string())
                    .and_then(|()| vm.capture_state(kvm, config))
                    .and_then(|s| serde_json::to_vec(&s).map_err(|e| format!("the state cannot be encoded: {e}")))
                    .map(|body| crate::snapshot::signed(&body));
                self.shared.hand_over(Step::Captured(state));
                let result = self.shared.wait_for(|step| match std::mem::replace(step, Step::Closed) {
                    Step::Finished(result) => Some(result),
                    other => {
                        *step = other;
                        None
                    }
                });
                let downtime = paused_at.elapsed().as_secs_f64() * 1000.0;
                self.shared.status().downtime_ms = Some(downtime);
                super::counters::LAST_DOWNTIME_US.store((downtime * 1000.0) as u64, Ordering::Relaxed);
                // Once a post-copy told the destination to run the VM, or the whole VM went
                // without a word back, it may run there: this copy stays paused rather than run
                // twice.
                let committed = self.shared.status().phase == Phase::Postcopy;
                let handed_over = self.shared.handed_over.load(Ordering::SeqCst);
                if result.is_err() && committed {
                    tracing::error!("migration: post-copy broke after the switch-over; the VM stays paused here");
                } else if result.is_err() && handed_over {
                    tracing::error!(
                        "migration: the destination has the whole VM but never said whether it runs it; the VM stays \
                         paused here rather than risk running twice (resume it here only if the destination does not \
                         run it)"
                    );
                } else if result.is_err() {
                    vm.resume_devices();
                    if !was_paused {
                        vm.resume();
                    }
                }
                self.ended(result, Some(downtime), vm)
            }
        }
    }

    fn ended(&self, result: Result<(), String>, downtime_ms: Option<f64>, vm: &RunningVm) -> Outcome {
        let status = self.status();
        match result {
            Ok(()) => {
                tracing::info!(
                    "migration to {}: the VM runs there; {} rounds, {} MiB sent, {:.1} ms paused, {:.0} ms in all",
                    self.url,
                    status.round,
                    status.bytes >> 20,
                    downtime_ms.unwrap_or(0.0),
                    status.total_ms.unwrap_or(0.0)
                );
                Outcome::Moved(self.url.to_string())
            }
            Err(e) => {
                let state = if vm.is_paused() { "stays paused" } else { "runs on" };
                tracing::warn!("migration to {} failed: {e}; the VM {state} here", self.url);
                Outcome::Failed
            }
        }
    }
}

/// The stream with the page batch being built.
pub(super) struct Sender<'a> {
    /// Where the bytes sent are reported (the main stream's sender only).
    shared: Option<&'a Shared>,
    out: BufWriter<Box<dyn Stream>>,
    batch: Vec<u8>,
    batch_gpa: u64,
    pub(super) bytes: u64,
}

impl<'a> Sender<'a> {
    pub(super) fn new(stream: Box<dyn Stream>, shared: Option<&'a Shared>) -> Sender<'a> {
        Sender {
            shared,
            out: BufWriter::with_capacity(1 << 16, stream),
            batch: Vec::with_capacity(stream::MAX_PAGES_BYTES),
            batch_gpa: 0,
            bytes: 0,
        }
    }

    /// A frame of `kind`, after the pages batched so far: the order is the destination's.
    pub(super) fn frame(&mut self, kind: Kind, payload: &[u8]) -> Result<(), String> {
        self.flush_batch()?;
        stream::write_frame(&mut self.out, kind, payload).map_err(lost)?;
        self.bytes += 8 + payload.len() as u64;
        Ok(())
    }

    /// Adds the page at `gpa`, unless it is all zeroes and `skip_zero`.
    pub(super) fn page(&mut self, mem: &GuestMemory, gpa: u64, skip_zero: bool) -> Result<(), String> {
        let contiguous = self.batch_gpa + self.batch.len() as u64 == gpa;
        if !contiguous || self.batch.len() == stream::MAX_PAGES_BYTES {
            self.flush_batch()?;
            self.batch_gpa = gpa;
        }
        // Read straight into the batch; a zero page is taken back out.
        let at = self.batch.len();
        self.batch.resize(at + PAGE, 0);
        mem.read_slice(&mut self.batch[at..], GuestAddress(gpa))
            .map_err(|e| format!("guest memory at {gpa:#x} cannot be read ({e})"))?;
        if skip_zero && self.batch[at..].iter().all(|&b| b == 0) {
            self.batch.truncate(at);
        }
        Ok(())
    }

    fn flush_batch(&mut self) -> Result<(), String> {
        if !self.batch.is_empty() {
            stream::write_pages(&mut self.out, self.batch_gpa, &self.batch).map_err(lost)?;
            self.bytes += 16 + self.batch.len() as u64;
            self.batch.clear();
            if let Some(shared) = self.shared {
                shared.status().bytes = self.bytes;
            }
        }
        Ok(())
    }

    pub(super) fn flush(&mut self) -> Result<(), String> {
        self.flush_batch()?;
        self.out.flush().map_err(lost)
    }
}

fn lost(e: std::io::Error) -> String {
    format!("the destination stopped taking the stream ({e})")
}

/// Sends every page of guest memory that holds data: resident (or, for memory mapped from a
/// snapshot, any) and not all zeroes, since the destination's memory starts zeroed. It goes
/// 64 MiB at a time, which bounds the list of pages.
fn send_all(out: &mut Sender, lanes: &mut Lanes, source: &Source, shared: &Shared) -> Result<(), String> {
    const STEP: usize = (64 << 20) / PAGE;
    let unplugged = source.unplugged();
    let mut held_pages = Vec::with_capacity(STEP);
    for region in source.mem.iter() {
        let start = region.start_addr().0;
        let pages = (region.len() as usize).div_ceil(PAGE);
        let resident = match source.restored {
            true => None,
            false => crate::snapshot::residency(region.as_ptr(), region.len() as usize),
        };
        for first in (0..pages).step_by(STEP) {
            if shared.cancelled.load(Ordering::Relaxed) {
                return Err(cancelled());
            }
            held_pages.clear();
            for page in first..pages.min(first + STEP) {
                let gpa = start + (page * PAGE) as u64;
                let held = resident.as_ref().is_none_or(|r| r.get(page).is_some_and(|v| v & 1 != 0));
                if held && !crate::hotplug::in_ranges(&unplugged, gpa) {
                    held_pages.push(gpa);
                }
            }
            out.bytes += lanes.send(out, &held_pages, true)?;
        }
    }
    Ok(())
}

/// Pages set in `logs` (per region, as `DirtyPages::take` gives them), less unplugged memory.
fn dirty_pages(mem: &GuestMemory, logs: &[Vec<u64>], unplugged: &[(u64, u64)]) -> Vec<u64> {
    let mut pages = Vec::new();
    for (region, log) in mem.iter().zip(logs) {
        let start = region.start_addr().0;
        let count = (region.len() as usize).div_ceil(PAGE);
        for (w, &word) in log.iter().enumerate().filter(|(_, w)| **w != 0) {
            for bit in (0..64).filter(|b| word >> b & 1 != 0) {
                let page = w * 64 + bit;
                let gpa = start + (page * PAGE) as u64;
                if page < count && !crate::hotplug::in_ranges(unplugged, gpa) {
                    pages.push(gpa);
                }
            }
        }
    }
    pages
}

fn cancelled() -> String {
    "the migration was cancelled".into()
}

/// A local migration's source: it hands over guest memory's file and the TAPs' queues, which
/// the destination builds the VM around while the guest runs on here, then pauses and sends
/// the state; no page is copied.
fn run_local(shared: &Shared, connection: Box<dyn Stream>, source: &Source) -> Result<(), String> {
    let socket = connection.unix_fd().ok_or("a local migration needs a unix: destination")?;
    let mut out = Sender::new(connection, Some(shared));
    out.frame(Kind::Hello, &stream::Hello::frame(1))?;
    out.frame(Kind::Config, &source.config)?;
    out.flush()?;
    // The handover is a local migration's pre-copy.
    shared.status().phase = Phase::Precopy;
    let memory = source.mem.iter().next().and_then(|r| r.file_offset()).ok_or("guest memory has no file")?;
    let mut fds = vec![std::os::fd::AsRawFd::as_raw_fd(memory.file())];
    let mut taps = Vec::new();
    for (name, queues) in net::tap::opened() {
        taps.push((name, queues.len()));
        fds.extend(queues);
    }
    let handover = serde_json::to_vec(&stream::Handover { taps }).expect("names and counts encode");
    stream::write_frame_with_fds(socket, Kind::Memory, &handover, &fds).map_err(lost)?;
    let mut reply = Vec::new();
    match stream::read_frame(out.out.get_mut(), &mut reply) {
        Ok(Kind::Ready) => {}
        Ok(Kind::Error) => return Err(format!("the destination refused the VM: {}", String::from_utf8_lossy(&reply))),
        Ok(other) => return Err(format!("the destination answered the handover with a {other:?} frame")),
        Err(e) => return Err(format!("the destination never took the handover: {e}")),
    }
    let state = switch_over(shared)?;
    finish(out, &state)
}

/// Hands the switch-over to the controller, which pauses the VM and captures its state.
fn switch_over(shared: &Shared) -> Result<Vec<u8>, String> {
    shared.hand_to_controller(Step::SwitchoverDue);
    shared.wait_for(|step| match std::mem::replace(step, Step::Working) {
        Step::Captured(state) => Some(state),
        other => {
            *step = other;
            None
        }
    })
}

/// Sends the state and the end, and waits for the destination's word.
fn finish(mut out: Sender, state: &[u8]) -> Result<(), String> {
    out.frame(Kind::State, state)?;
    out.frame(Kind::End, &[])?;
    out.flush()?;
    let shared = out.shared;
    if let Some(shared) = shared {
        shared.status().bytes = out.bytes;
        shared.handed_over.store(true, Ordering::SeqCst);
    }
    let mut reply = Vec::new();
    let mut stream = out.out.into_inner().map_err(|e| lost(e.into_error()))?;
    match stream::read_frame(&mut stream, &mut reply) {
        Ok(Kind::Ack) => Ok(()),
        Ok(Kind::Error) => {
            // A refusal: the VM does not run there, and runs on here.
            if let Some(shared) = shared {
                shared.handed_over.store(false, Ordering::SeqCst);
            }
            Err(format!("the destination refused the VM: {}", String::from_utf8_lossy(&reply)))
        }
        Ok(other) => Err(format!("the destination answered with a {other:?} frame")),
        Err(e) => Err(format!("the destination never said the VM runs there: {e}")),
    }
}

/// The source's whole part; any error leaves the VM with the controller.
fn run(
    shared: &Shared,
    connection: Box<dyn Stream>,
    options: &SendOptions,
    source: &Source,
    dirty: &DirtyPages,
) -> Result<(), String> {
    let mut out = Sender::new(connection, Some(shared));
    out.frame(Kind::Hello, &stream::Hello::frame(options.connections))?;
    out.frame(Kind::Config, &source.config)?;
    // The destination takes the other connections once it has read the configuration.
    out.flush()?;
    let mut lanes = Lanes::open(&options.url, options.tls.as_ref(), options.connections, &source.mem, shared)?;
    shared.status().phase = Phase::Precopy;
    let deadline = options.timeout.map(|t| shared.started + t);
    let copying = Instant::now();
    send_all(&mut out, &mut lanes, source, shared)?;
    // Bytes per second over the last round; at least 1 MiB/s, so that a round of nothing does
    // not make every estimate infinite.
    let rate = |bytes: u64, took: Duration| (bytes as f64 / took.as_secs_f64().max(1e-6)).max(1048576.0);
    let mut bandwidth = rate(out.bytes, copying.elapsed());
    let mut round = 0u32;
    let mut last = Instant::now();
    // Auto-converge: two rounds in a row that dirtied more than half of what they sent hold
    // the vCPUs back one step more.
    let mut throttle = super::throttle::Throttle::new(source.vcpus.clone());
    let (mut sent_in_round, mut strikes) = (out.bytes, 0);
    let mut left_before = out.bytes;
    let pending = loop {
        if shared.cancelled.load(Ordering::Relaxed) {
            return Err(cancelled());
        }
        let logs = dirty.take()?;
        let pages = dirty_pages(&source.mem, &logs, &source.unplugged());
        let left = (pages.len() * PAGE) as u64;
        let expected_ms = left as f64 / bandwidth * 1000.0;
        let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
        {
            let mut status = shared.status();
            status.round = round;
            status.bytes = out.bytes;
            status.bytes_left = left;
            status.bandwidth_mib_s = bandwidth / 1048576.0;
            status.dirty_rate_mib_s = left as f64 / 1048576.0 / last.elapsed().as_secs_f64().max(1e-6);
            status.expected_downtime_ms = expected_ms;
        }
        last = Instant::now();
        if timed_out && !options.switch_on_timeout {
            return Err(format!(
                "it did not converge within timeout_s {} ({} MiB still dirty after {round} rounds)",
                options.timeout.map_or(0, |t| t.as_secs()),
                left >> 20
            ));
        }
        if round >= options.max_rounds
            || timed_out
            || within_target(expected_ms, left, left_before, options.downtime_ms)
        {
            break pages;
        }
        left_before = left;
        strikes = if left > sent_in_round / 2 { strikes + 1 } else { 0 };
        if strikes >= 2 && throttle.percent() < super::throttle::MAX {
            strikes = 0;
            match throttle.step_up() {
                Ok(percent) => {
                    shared.status().throttle_percent = percent;
                    tracing::info!(
                        "migration: the guest dirties memory faster than it moves; vCPUs held back {percent}%"
                    );
                }
                Err(e) => tracing::warn!("migration: the vCPUs cannot be throttled ({e})"),
            }
        }
        let (sent_before, started) = (out.bytes, Instant::now());
        out.bytes += lanes.send(&mut out, &pages, false)?;
        sent_in_round = out.bytes - sent_before;
        bandwidth = rate(sent_in_round, started.elapsed());
        round += 1;
    };
    // The switch-over pauses the VM outright.
    drop(throttle);
    // The switch-over: the controller pauses the VM and quiesces its devices.
    let state = switch_over(shared)?;
    let mut last_pages = dirty_pages(&source.mem, &dirty.take()?, &source.unplugged());
    last_pages.extend(pending);
    last_pages.sort_unstable();
    last_pages.dedup();
    if options.postcopy {
        return postcopy(out, shared, source, &state, last_pages);
    }
    out.bytes += lanes.send(&mut out, &last_pages, false)?;
    // Every lane's end is on the wire before the main stream's: the destination reads the
    // lanes to their ends before it builds the VM.
    lanes.finish();
    finish(out, &state)
}

/// Whether the pause that `left` bytes would take (`expected_ms`) is short enough to switch
/// over now. Within the target, rounds go on while each at least halves what is left of the
/// one before (`left_before`): a short round then buys a shorter pause, down to a millisecond.
fn within_target(expected_ms: f64, left: u64, left_before: u64, target_ms: u64) -> bool {
    expected_ms <= target_ms as f64 && (expected_ms <= 1.0 || left.saturating_mul(2) > left_before)
}

/// The post-copy switch-over: the state goes with the list of pages still owed, the VM runs on
/// the destination once it says so, and the owed pages follow, those it asks for first. From
/// that word on the VM lives on the destination: an error here loses it.
fn postcopy(mut out: Sender, shared: &Shared, source: &Source, state: &[u8], owed: Vec<u64>) -> Result<(), String> {
    let index = super::postcopy::PageIndex::new(&source.mem);
    out.frame(Kind::Dirty, &super::postcopy::bitmap_of(&index, &owed))?;
    out.frame(Kind::State, state)?;
    // From the next frame on the destination may run the VM: this copy must not run again.
    shared.status().phase = Phase::Postcopy;
    out.frame(Kind::Postcopy, &[])?;
    out.flush()?;
    let mut reply = Vec::new();
    // The destination may ask for pages while it builds the VM, before it says it runs.
    loop {
        match stream::read_frame(out.out.get_mut(), &mut reply) {
            Ok(Kind::Ack) => break,
            Ok(Kind::Request) => {
                out.page(&source.mem, stream::requested_page(&reply)?, false)?;
                out.flush()?;
            }
            Ok(Kind::Error) => {
                shared.status().phase = Phase::Switchover;
                return Err(format!("the destination refused the VM: {}", String::from_utf8_lossy(&reply)));
            }
            Ok(other) => return Err(format!("the destination answered with a {other:?} frame")),
            Err(e) => return Err(format!("the destination never said the VM runs there: {e}")),
        }
    }
    tracing::info!("migration: the VM runs on the destination; post-copy of {} pages", owed.len());
    super::postcopy::serve_source(&mut PostcopyLink { out: &mut out, mem: &source.mem }, owed)
        .map_err(|e| format!("{e}; the VM, which ran on the destination, is lost"))?;
    out.frame(Kind::End, &[])?;
    out.flush()?;
    match stream::read_frame(out.out.get_mut(), &mut reply) {
        Ok(Kind::Ack) => Ok(()),
        other => Err(format!("the destination did not confirm the last page ({other:?}); the VM may be lost")),
    }
}

/// The source's stream in post-copy: pages out through the sender, requests read from the
/// stream under it.
struct PostcopyLink<'a, 'b> {
    out: &'a mut Sender<'b>,
    mem: &'a GuestMemory,
}

impl super::postcopy::SourceLink for PostcopyLink<'_, '_> {
    fn send(&mut self, page: Option<u64>) -> Result<(), String> {
        match page {
            Some(gpa) => self.out.page(self.mem, gpa, false),
            None => self.out.flush(),
        }
    }

    fn stream(&mut self) -> &mut dyn Stream {
        self.out.out.get_mut().as_mut()
    }
}

#[cfg(test)]
mod tests {
    use super::{SendOptions, within_target};

    #[test]
    fn connections_are_counted_from_1_to_16_and_only_for_copies() {
        let options = |body: &str| SendOptions::from_request(&serde_json::from_str(body).unwrap());
        let url = r#""destination_url": "tcp:127.0.0.1:4444""#;
        assert_eq!(options(&format!("{{{url}}}")).unwrap().connections, 1);
        assert_eq!(options(&format!(r#"{{{url}, "connections": 16}}"#)).unwrap().connections, 16);
        for (extra, why) in [
            (r#""connections": 0"#, "connections 0 is not from 1 to 16"),
            (r#""connections": 17"#, "connections 17 is not from 1 to 16"),
            (r#""connections": 2, "postcopy": true"#, "leave it out with local or postcopy"),
        ] {
            let e = options(&format!("{{{url}, {extra}}}")).unwrap_err();
            assert!(e.contains(why), "{extra}: {e}");
        }
    }

    #[test]
    fn rounds_go_on_within_the_target_while_each_halves_what_is_left() {
        const MIB: u64 = 1 << 20;
        assert!(!within_target(400.0, 10 * MIB, 1000 * MIB, 300), "over the target");
        assert!(!within_target(40.0, 100 * MIB, 1000 * MIB, 300), "a round cuts what is left by more than half");
        assert!(within_target(40.0, 100 * MIB, 150 * MIB, 300), "a round no longer pays");
        assert!(within_target(0.8, MIB, 100 * MIB, 300), "a pause under a millisecond");
    }
}
