//! Parallel connections (`connections`): pages also travel over extra connections, the lanes,
//! beside the main stream. Guest memory is dealt out in 2 MiB blocks, round-robin: each block
//! always goes over the same connection, so that every copy of a page travels one connection,
//! in order, and a later round's copy can never be overtaken by an earlier one. A lane carries
//! a hello, pages and an `End`; the destination reads every lane to its end before it builds
//! the VM, and the main stream carries everything else.

use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

use arch::GuestMemory;

use super::Shared;
use super::send::Sender;
use super::stream::{self, Kind};
use super::transport::{self, Listener, PEER_TIMEOUT, Url};

/// The most connections one migration uses.
pub const MAX_CONNECTIONS: u32 = 16;
/// Blocks of 2 MiB, dealt round-robin among the connections.
const BLOCK_SHIFT: u32 = 21;

/// Which of `connections` carries the page at `gpa` (0: the main stream).
fn lane_of(gpa: u64, connections: usize) -> usize {
    ((gpa >> BLOCK_SHIFT) % connections as u64) as usize
}

/// The source's lanes, each written by a thread of its own.
pub(super) struct Lanes {
    lanes: Vec<Lane>,
    mem: GuestMemory,
}

struct Lane {
    /// Pages to send (and whether to skip zero pages); closing it ends the lane.
    work: Option<SyncSender<(Vec<u64>, bool)>>,
    /// The bytes each batch of work put on the wire, or why the lane broke.
    sent: Receiver<Result<u64, String>>,
    thread: Option<sandbox::Thread<()>>,
}

impl Lanes {
    /// Opens `connections - 1` lanes to `url`, each with its hello (none for one connection).
    pub(super) fn open(
        url: &Url,
        tls: Option<&std::sync::Arc<rustls::ClientConfig>>,
        connections: u32,
        mem: &GuestMemory,
        shared: &Shared,
    ) -> Result<Lanes, String> {
        let mut lanes = Vec::new();
        for _ in 1..connections {
            let mut connection = transport::connect(url, tls)?;
            shared.connected(connection.as_ref());
            stream::write_frame(&mut connection, Kind::Hello, &stream::Hello::frame(connections))
                .map_err(|e| format!("a lane to the destination broke ({e})"))?;
            let (work, take_work) = sync_channel::<(Vec<u64>, bool)>(1);
            let (report, sent) = sync_channel(1);
            let mem = mem.clone();
            let thread = sandbox::spawn(sandbox::ThreadKind::Migration, "migration lane", move || {
                let mut out = Sender::new(connection, None);
                for (pages, skip_zero) in take_work {
                    let before = out.bytes;
                    let done =
                        pages.iter().try_for_each(|&gpa| out.page(&mem, gpa, skip_zero)).and_then(|()| out.flush());
                    if report.send(done.map(|()| out.bytes - before)).is_err() {
                        return;
                    }
                }
                let _ = out.frame(Kind::End, &[]).and_then(|()| out.flush());
            })
            .map_err(|e| format!("a migration lane cannot start: {e}"))?;
            lanes.push(Lane { work: Some(work), sent, thread: Some(thread) });
        }
        Ok(Lanes { lanes, mem: mem.clone() })
    }

    /// Sends `pages` (guest addresses, each a page), each over its connection: the main
    /// stream's share through `main`, flushed, the others by their lanes. Returns what the
    /// lanes put on the wire.
    pub(super) fn send(&mut self, main: &mut Sender, pages: &[u64], skip_zero: bool) -> Result<u64, String> {
        let connections = self.lanes.len() + 1;
        let mut shares = vec![Vec::new(); connections];
        for &gpa in pages {
            shares[lane_of(gpa, connections)].push(gpa);
        }
        let mut shares = shares.into_iter();
        let own = shares.next().unwrap_or_default();
        for (lane, share) in self.lanes.iter().zip(shares) {
            let work = lane.work.as_ref().ok_or("a migration lane has ended")?;
            work.send((share, skip_zero)).map_err(|_| "a migration lane stopped".to_string())?;
        }
        for &gpa in &own {
            main.page(&self.mem, gpa, skip_zero)?;
        }
        main.flush()?;
        let mut bytes = 0;
        for lane in &self.lanes {
            bytes += lane.sent.recv().map_err(|_| "a migration lane stopped".to_string())??;
        }
        Ok(bytes)
    }

    /// Ends every lane with `End` and waits until each has written it.
    pub(super) fn finish(&mut self) {
        for lane in &mut self.lanes {
            lane.work = None;
        }
        for lane in &mut self.lanes {
            if let Some(thread) = lane.thread.take() {
                let _ = thread.join();
            }
        }
    }
}

impl Drop for Lanes {
    fn drop(&mut self) {
        self.finish();
    }
}

/// The destination's readers of the lanes, one thread each.
pub(super) struct LaneReaders {
    threads: Vec<sandbox::Thread<Result<u64, String>>>,
}

impl LaneReaders {
    /// Accepts the stream's other `connections - 1` connections on `listener` within the
    /// peer timeout, checks each one's hello, and reads its pages into `mem` until its end.
    pub(super) fn accept(
        listener: &Listener,
        connections: u32,
        mem: &GuestMemory,
        shared: &Shared,
    ) -> Result<Self, String> {
        let deadline = Instant::now() + PEER_TIMEOUT;
        let mut threads = Vec::new();
        for _ in 1..connections {
            let mut connection = listener.accept(&shared.cancelled, Some(deadline))?;
            shared.connected(connection.as_ref());
            let mem = mem.clone();
            let thread = sandbox::spawn(sandbox::ThreadKind::Migration, "migration lane", move || {
                read_lane(&mut stream::Frames::new(&mut connection, None), &mem)
            })
            .map_err(|e| format!("a migration lane cannot start: {e}"))?;
            threads.push(thread);
        }
        tracing::info!("migration: pages arrive over {connections} connections");
        Ok(LaneReaders { threads })
    }

    /// Waits until every lane has ended; returns the bytes they carried, or why one broke.
    pub(super) fn join(self) -> Result<u64, String> {
        let mut bytes = 0;
        for thread in self.threads {
            bytes += thread.join().map_err(|_| "a migration lane failed".to_string())??;
        }
        Ok(bytes)
    }
}

/// One lane: a hello, then pages inside guest memory, then its end.
fn read_lane<R: std::io::Read>(frames: &mut stream::Frames<R>, mem: &GuestMemory) -> Result<u64, String> {
    let mut buf = Vec::new();
    if frames.next(&mut buf)? != Kind::Hello {
        return Err("a lane of the stream does not begin with a hello".into());
    }
    stream::Hello::check(&buf)?;
    let mut received = 0u64;
    loop {
        match frames.next(&mut buf)? {
            Kind::Pages => received += super::receive::write_pages(mem, &buf)?,
            Kind::End => return Ok(received),
            other => return Err(format!("a lane of the stream has a {other:?} frame, where only pages go")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_block_keeps_to_one_lane_and_the_lanes_share_memory_evenly() {
        let mib = 1u64 << 20;
        assert_eq!(lane_of(0, 1), 0);
        assert_eq!(lane_of(0x1000, 4), lane_of(2 * mib - 0x1000, 4), "one block, one lane");
        let mut counts = [0; 4];
        for block in 0..64 {
            counts[lane_of(block * 2 * mib + 0x3000, 4)] += 1;
        }
        assert_eq!(counts, [16; 4]);
    }
}
