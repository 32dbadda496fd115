//! The destination side: a thread waits for the source, checks its stream as untrusted input
//! (sizes bounded, the configuration checked as a snapshot's is, every page inside the memory
//! that configuration lays out), fills fresh guest memory, and hands memory and state to the
//! controller, which builds and resumes the VM. The source hears `Ack` only once it runs.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use arch::GuestMemory;

use super::stream::{self, Kind};
use super::transport::{Listener, Stream, Url};
use super::{Phase, Shared, ShellStep, Status, Step};
use crate::config::{HostLimits, VmConfig};
use crate::exit::ExitLatch;
use crate::snapshot::Snapshot;

/// The controller's handle on an incoming migration.
pub struct Incoming {
    shared: Arc<Shared>,
    _thread: sandbox::Thread<()>,
}

impl Incoming {
    /// Listens on the request's URL and waits there for a VM; errors are sentences for a 400.
    pub fn start(
        m: &api::models::MigrationReceive,
        limits: HostLimits,
        latch: &Arc<ExitLatch>,
    ) -> Result<Incoming, String> {
        let url = Url::parse("receiver_url", &m.receiver_url)?;
        let tls = super::tls::TlsFiles::for_url(&url, "receiver_url", &m.tls_cert, &m.tls_key, &m.tls_ca)?
            .map(|files| files.server())
            .transpose()?;
        let listener = Listener::bind(&url, tls)?;
        let shared = Shared::new("destination", &url, latch.clone());
        tracing::info!("migration: waiting for a VM on {url}");
        let thread = {
            let shared = shared.clone();
            sandbox::spawn(sandbox::ThreadKind::Migration, "migration", move || {
                let result = receive(&shared, listener, &limits);
                if let Err(e) = &result {
                    tracing::warn!("migration: no VM runs here from this stream: {e}");
                }
                shared.finish(result);
            })
            .map_err(|e| format!("The migration thread cannot start: {e}."))?
        };
        Ok(Incoming { shared, _thread: thread })
    }

    pub fn status(&self) -> Status {
        self.shared.status().clone()
    }

    /// Stops waiting, or receiving, before the VM is built here.
    pub fn cancel(&self) -> Result<(), String> {
        match self.shared.status().phase {
            Phase::Listening | Phase::Precopy => {
                self.shared.cancel();
                Ok(())
            }
            _ => Err("The migration is past the point where it can be cancelled.".into()),
        }
    }

    /// The VM that arrived, for the controller to build; it answers with [`Self::built`].
    pub fn take_arrived(&self) -> Option<(Snapshot, GuestMemory)> {
        self.shared.poll(|step| match std::mem::replace(step, Step::Working) {
            Step::Arrived(vm) => Some(*vm),
            other => {
                *step = other;
                None
            }
        })
    }

    /// How the thread ended, once it has (taken once).
    pub fn take_finished(&self) -> Option<Result<(), String>> {
        self.shared.poll(|step| match std::mem::replace(step, Step::Closed) {
            Step::Finished(result) => Some(result),
            other => {
                *step = other;
                None
            }
        })
    }

    /// The configuration and memory of the VM on its way, once, as soon as its memory is made;
    /// the controller answers [`Self::shell_made`].
    pub fn take_shell_due(&self) -> Option<(VmConfig, GuestMemory)> {
        let mut shell = self.shared.shell();
        match std::mem::replace(&mut *shell, ShellStep::Waiting) {
            ShellStep::Due(due) => Some(*due),
            other => {
                *shell = other;
                None
            }
        }
    }

    pub fn shell_made(&self) {
        *self.shared.shell() = ShellStep::Made;
        self.shared.shell_made.notify_all();
    }

    pub fn built(&self, result: Result<(), String>) {
        self.shared.hand_over(Step::Built(result));
    }
}

fn receive(shared: &Arc<Shared>, listener: Listener, limits: &HostLimits) -> Result<(), String> {
    let mut connection = listener.accept(&shared.cancelled, None)?;
    shared.connected(connection.as_ref());
    shared.status().phase = Phase::Precopy;
    let unix = connection.unix_fd();
    // A local migration's source hears from here that the VM's shell is made.
    let mut replies = unix.and_then(|_| super::transport::cutter(connection.as_ref())).map(UnixStream::from);
    let here = Destination { shared, replies: replies.as_mut().map(|r| r as &mut dyn Write), listener: &listener };
    let arrived = receive_vm(&mut stream::Frames::new(&mut connection, unix), Some(here), limits);
    // A Unix socket's path goes with the listener.
    drop(listener);
    let (state, mem, owed) = match arrived {
        Ok(vm) => vm,
        Err(e) => {
            answer(&mut connection, &Err(e.clone()));
            return Err(e);
        }
    };
    // Post-copy: missing pages are caught from here on, the VM's build included.
    let missing = match owed.map(|owed| super::postcopy::Missing::start(&mem, owed)).transpose() {
        Ok(missing) => missing,
        Err(e) => {
            answer(&mut connection, &Err(e.clone()));
            return Err(e);
        }
    };
    shared.status().phase = Phase::Switchover;
    shared.hand_to_controller(Step::Arrived(Box::new((state, mem))));
    let Some(missing) = missing else {
        let result = wait_built(shared);
        answer(&mut connection, &result);
        return result;
    };
    // The build's word reaches the page server through a channel: it serves faults meanwhile.
    let (tell, hear) = std::sync::mpsc::sync_channel(1);
    let waiter = {
        let shared = shared.clone();
        sandbox::spawn(sandbox::ThreadKind::Migration, "migration", move || {
            let result = wait_built(&shared);
            if result.is_ok() {
                shared.status().phase = Phase::Postcopy;
            }
            let _ = tell.send(result);
        })
        .map_err(|e| format!("the post-copy thread cannot start ({e}); the VM is lost"))?
    };
    let result = super::postcopy::serve_destination(connection, missing, hear);
    let _ = waiter.join();
    // A VM that ran here without all of its memory cannot go on.
    if let Err(e) = &result
        && shared.status().phase == Phase::Postcopy
    {
        shared.latch.set(crate::exit::VmExit::Lost(e.clone()));
    }
    result
}

/// Waits for the controller's word on the VM that arrived.
fn wait_built(shared: &Shared) -> Result<(), String> {
    shared.wait_for(|step| match std::mem::replace(step, Step::Working) {
        Step::Built(result) => Some(result),
        other => {
            *step = other;
            None
        }
    })
}

/// Tells the source how it went (it may be gone already).
fn answer(connection: &mut Box<dyn Stream>, result: &Result<(), String>) {
    let _ = match result {
        Ok(()) => stream::write_frame(connection, Kind::Ack, &[]),
        Err(e) => {
            // Within the frame's bound, cut at a character boundary.
            let end = (0..=e.len().min(4000)).rev().find(|&i| e.is_char_boundary(i)).unwrap_or(0);
            stream::write_frame(connection, Kind::Error, &e.as_bytes()[..end])
        }
    };
}

/// How long a local migration's source may wait for the destination's shell, whose making
/// takes milliseconds.
const SHELL_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The destination's side of a stream beyond its frames (none for the fuzzer).
pub(crate) struct Destination<'a> {
    shared: &'a Shared,
    /// Unix streams only: where a local migration's `Ready` goes.
    replies: Option<&'a mut dyn Write>,
    /// Where the stream's other connections arrive.
    listener: &'a Listener,
}

/// Reads a whole migration stream into fresh guest memory (or, from a local migration, the
/// memory the source handed over): the VM's state and its memory.
pub(crate) fn receive_vm<R: Read>(
    frames: &mut stream::Frames<R>,
    mut here: Option<Destination>,
    limits: &HostLimits,
) -> Result<(Snapshot, GuestMemory, Option<Vec<u8>>), String> {
    let shared = here.as_ref().map(|h| h.shared);
    let mut buf = Vec::new();
    if frames.next(&mut buf)? != Kind::Hello {
        return Err("the stream does not begin with a hello".into());
    }
    let connections = stream::Hello::check(&buf)?.connections;
    if frames.next(&mut buf)? != Kind::Config {
        return Err("the stream has no configuration after its hello".into());
    }
    let config: VmConfig =
        serde_json::from_slice(&buf).map_err(|e| format!("the migrated configuration is not one ({e})"))?;
    // The files it names are checked when the VM is built, on a thread that may open them.
    config.validate_shape(limits).map_err(|e| format!("the migrated configuration is refused: {e}"))?;
    if !config.passthrough.is_empty() {
        return Err("the migrated configuration names assigned PCI devices, which cannot migrate".into());
    }
    let regions = config.memory_regions();
    let ram = arch::memory::ram_regions(config.memory_bytes()).len();
    let fresh = || {
        crate::memory::create(&regions, ram, &config.memory)
            .map_err(|e| format!("guest memory cannot be made here: {e}"))
    };
    // Made when the first frame needs it, so that a local migration's memory is never made
    // twice.
    let mut mem: Option<GuestMemory> = None;
    let mut shell_offered = false;
    let mut received = 0u64;
    let mut state = None;
    // Post-copy: the pages the source still owes, as a bitmap.
    let mut owed = None;
    // The stream's other connections, read into the same memory by threads of their own.
    let lanes = match (&here, connections) {
        (_, 1) => None,
        (Some(h), _) => {
            let mem = made(&mut mem, fresh)?;
            Some(super::lanes::LaneReaders::accept(h.listener, connections, mem, h.shared)?)
        }
        (None, _) => return Err("the stream comes over more connections than this reader takes".into()),
    };
    loop {
        if let (Some(s), Some(mem), false) = (shared, &mem, shell_offered) {
            s.memory_made(&config, mem);
            shell_offered = true;
        }
        if shared.is_some_and(|s| s.cancelled.load(Ordering::Relaxed)) {
            return Err("the migration was cancelled".into());
        }
        match frames.next(&mut buf)? {
            Kind::Pages => {
                received += write_pages(made(&mut mem, fresh)?, &buf)?;
                if let Some(s) = shared {
                    s.status().bytes = received;
                }
            }
            Kind::Memory if mem.is_none() => {
                let adopted = mem.insert(adopt(&buf, frames.take_fds(), &config)?);
                // The source pauses the guest once the shell is made, or after a bounded wait.
                if let Some(Destination { shared, replies: Some(replies), .. }) = &mut here {
                    shared.memory_made(&config, adopted);
                    shell_offered = true;
                    shared.wait_shell(SHELL_WAIT);
                    stream::write_frame(replies, Kind::Ready, &[])
                        .map_err(|e| format!("the source stopped listening ({e})"))?;
                }
            }
            Kind::State if state.is_none() => {
                let saved = Snapshot::parse(&buf, "the migrated state")?;
                let same = serde_json::to_value(&saved.config).ok() == serde_json::to_value(&config).ok();
                if !same {
                    return Err("the migrated state's configuration differs from the stream's".into());
                }
                crate::vm::check_restorable(&saved)?;
                state = Some(saved);
            }
            Kind::Dirty if owed.is_none() && state.is_none() && lanes.is_none() => {
                let mem = made(&mut mem, fresh)?;
                let expected = super::postcopy::PageIndex::new(mem).bitmap_len();
                if buf.len() != expected {
                    return Err(format!("the post-copy page list has {} bytes where {expected} were due", buf.len()));
                }
                owed = Some(buf.clone());
            }
            Kind::End if owed.is_none() => break,
            Kind::Postcopy if owed.is_some() && state.is_some() => break,
            other => return Err(format!("the stream has a {other:?} frame out of place")),
        }
    }
    if let Some(lanes) = lanes {
        received += lanes.join()?;
        if let Some(s) = shared {
            s.status().bytes = received;
        }
    }
    let state = state.ok_or("the stream ended without the VM's state")?;
    let mem = match mem {
        Some(mem) => mem,
        None => fresh()?,
    };
    // The bitmap counts the devices' writes from here on, not the stream's.
    for region in mem.iter() {
        let bitmap: &AtomicBitmap = std::ops::Deref::deref(region).bitmap();
        bitmap.reset();
    }
    Ok((state, mem, owed))
}

/// Writes a `Pages` frame's pages into `mem`, which they must lie inside; the bytes the frame
/// carried.
pub(super) fn write_pages(mem: &GuestMemory, frame: &[u8]) -> Result<u64, String> {
    let (gpa, data) = stream::pages(frame)?;
    if !mem.check_range(GuestAddress(gpa), data.len()) {
        return Err(format!("the stream has pages at {gpa:#x} outside the VM's memory"));
    }
    mem.write_slice(data, GuestAddress(gpa))
        .map_err(|e| format!("guest memory at {gpa:#x} cannot be written ({e})"))?;
    Ok(16 + data.len() as u64)
}

/// `mem`, made by `make` if it is not yet.
fn made(
    mem: &mut Option<GuestMemory>,
    make: impl FnOnce() -> Result<GuestMemory, String>,
) -> Result<&mut GuestMemory, String> {
    match mem {
        Some(mem) => Ok(mem),
        None => Ok(mem.insert(make()?)),
    }
}

/// A local migration's handover: guest memory's file, mapped shared as the source laid it out,
/// and the TAPs' queues, kept for the devices that open those TAPs.
fn adopt(payload: &[u8], fds: Vec<std::os::fd::OwnedFd>, config: &VmConfig) -> Result<GuestMemory, String> {
    let handover: stream::Handover =
        serde_json::from_slice(payload).map_err(|e| format!("the local handover is not one ({e})"))?;
    let mut fds = fds.into_iter();
    let file = std::fs::File::from(
        fds.next()
            .ok_or("the local handover carries no memory file; a local migration goes over a unix: URL on one host")?,
    );
    let total: u64 = config.memory_regions().iter().map(|r| r.1).sum();
    let meta = file.metadata().map_err(|e| format!("the handed-over memory file cannot be read ({e})"))?;
    if !meta.is_file() || meta.len() < total {
        return Err(format!(
            "the handed-over memory file holds {} bytes where the guest has {total}; it is not the VM's memory",
            meta.len()
        ));
    }
    let taps: Vec<&str> = config
        .nets
        .iter()
        .filter_map(|n| match &n.attachment {
            crate::config::NetAttachment::Tap(name) => Some(name.as_str()),
            _ => None,
        })
        .collect();
    for (name, queues) in handover.taps {
        if !taps.contains(&name.as_str()) {
            return Err(format!("the local handover names TAP {name}, which the VM does not use"));
        }
        let files: Vec<std::fs::File> = fds.by_ref().take(queues).map(std::fs::File::from).collect();
        if files.len() != queues || queues == 0 {
            return Err(format!("the local handover is missing queues of TAP {name}"));
        }
        net::tap::inherit(&name, files);
    }
    crate::memory::adopt(&config.memory_regions(), &file, &config.memory)
        .map_err(|e| format!("the handed-over memory cannot be mapped: {e}"))
}

/// The destination's parser for the fuzzer: a stream against a host of 64 MiB.
#[doc(hidden)]
pub fn fuzz_stream(data: &[u8]) {
    let limits = HostLimits { kvm_max_vcpus: 2, ram_mib: 64, free_huge_pages: 0 };
    let _ = receive_vm(&mut stream::Frames::new(data, None), None, &limits);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A whole stream from a 64 MiB probe: hello, configuration, one page, state, end (the fuzz
    /// target's seed).
    const STREAM: &[u8] = include_bytes!("../../../../fuzz/corpus/migration_stream/seed-stream");
    const LIMITS: HostLimits = HostLimits { kvm_max_vcpus: 2, ram_mib: 1024, free_huge_pages: 0 };

    #[test]
    fn a_whole_stream_fills_fresh_memory_and_a_cut_or_foreign_one_is_refused() {
        let frames = |bytes: &'static [u8]| stream::Frames::new(bytes, None);
        let (state, mem, owed) = receive_vm(&mut frames(STREAM), None, &LIMITS).unwrap();
        assert!(owed.is_none(), "a pre-copy stream owes nothing");
        assert_eq!(state.config.memory_mib, 64);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x100fff)).unwrap(), 0x90);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x101000)).unwrap(), 0, "pages not sent are zero");
        let cut = receive_vm(&mut frames(&STREAM[..STREAM.len() - 9]), None, &LIMITS).unwrap_err();
        assert!(cut.contains("the stream ended"), "{cut}");
        let small = HostLimits { ram_mib: 32, ..LIMITS };
        let e = receive_vm(&mut frames(STREAM), None, &small).unwrap_err();
        assert!(e.starts_with("the migrated configuration is refused"), "{e}");
        let mut twice = STREAM[..STREAM.len() - 8].to_vec();
        twice.extend_from_slice(&STREAM[..8]);
        let e = receive_vm(&mut stream::Frames::new(twice.as_slice(), None), None, &LIMITS).unwrap_err();
        assert!(e.contains("out of place") || e.contains("ended"), "{e}");
    }
}
