//! The thread an active device runs on: it waits on the queues' notification eventfds (and any
//! back-end fds), lets the device's back-end serve them, and raises the interrupt.

use std::cell::Cell;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use sandbox::ThreadKind;

use crate::GuestMemory;
use crate::device::{Activation, QueueSet, VirtioInterrupt, queue_bit};

/// A device's request handling, run on its worker thread.
pub trait Backend: Send + 'static {
    /// Serves what the driver made available on queue `index`; true when buffers were used.
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool;
    /// The fds to wait on now besides the queues (a TAP, sockets). Asked again after every
    /// wake-up: a back-end with nowhere to put input (no guest buffers, an input that ended)
    /// leaves its fd out, so that the worker does not spin on it.
    fn extra_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// Fds to wait on until they can be written to (host sockets with data the host has not
    /// taken yet); asked again after every wake-up, like extra_fds.
    fn writable_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// `fd` (one of extra_fds or writable_fds) is ready; true when buffers were used.
    fn process_fd(&mut self, _fd: RawFd, _queues: &mut [Queue], _mem: &GuestMemory) -> bool {
        false
    }
}

/// A running worker; dropping it does not stop it, `stop` does.
pub struct Worker {
    kill: EventFd,
    thread: Option<sandbox::Thread<Vec<Queue>>>,
}

const KILL_TOKEN: u64 = u64::MAX;
const FD_TOKEN_BASE: u64 = 1 << 32;

thread_local! {
    /// Set while the worker polls: queues keep their notifications off after serving (see
    /// serve_queue_limited), so that the driver need not kick a device that is looking.
    static POLLING: Cell<bool> = const { Cell::new(false) };
}

/// Adaptive polling, in the spirit of QEMU's `poll-max-ns`: after work, the worker keeps
/// looking at its rings and fds for `window` before it sleeps. The window grows (up to `max`)
/// when work came soon after the worker went to sleep, and shrinks when a sleep outlasted `max`,
/// so that an idle device stops polling altogether.
#[derive(Clone, Copy, Debug)]
struct Polling {
    max: Duration,
    window: Duration,
}

const MIN_POLL_WINDOW: Duration = Duration::from_micros(4);

impl Polling {
    fn after_sleep(&mut self, slept: Duration) {
        if slept > self.max {
            self.window /= 2;
            if self.window < MIN_POLL_WINDOW {
                self.window = Duration::ZERO;
            }
        } else if self.window < self.max && slept > self.window {
            self.window = (self.window * 2).clamp(MIN_POLL_WINDOW, self.max);
        }
    }
}

/// The worker's polling for a server that is woken by someone else's loop (a vhost-user
/// back-end): after a kick's work it keeps looking for more, for the same adaptive window, with
/// the driver's notifications left off.
pub struct QueuePoller {
    polling: Polling,
    asleep_since: Option<Instant>,
}

/// A [`QueuePoller`] gives its queues back after this many of its longest windows, busy or not.
pub const POLL_TURNS: u32 = 16;

/// What a [`QueuePoller`] asks of the server it polls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Pass {
    /// Serve what the wake-up was for.
    Woken,
    /// Serve whatever is pending; answer whether anything was.
    Look,
    /// Turn the queues' notifications on again and serve what slipped in before.
    Rearm,
}

impl QueuePoller {
    /// Polls for up to `max` after work (zero: never).
    pub fn new(max: Duration) -> QueuePoller {
        QueuePoller { polling: Polling { max, window: Duration::ZERO }, asleep_since: None }
    }

    pub fn polls(&self) -> bool {
        !self.polling.max.is_zero()
    }

    /// Has `serve` serve a wake-up, then look again and again while it finds work, until none
    /// came for the window, or for at most [`POLL_TURNS`] windows at the longest: the queues
    /// stay borrowed meanwhile, and the front-end's requests (a stop, say) wait for them.
    pub fn serve(&mut self, mut serve: impl FnMut(Pass) -> bool) {
        if let Some(since) = self.asleep_since.take()
            && self.polls()
        {
            self.polling.after_sleep(since.elapsed());
        }
        serve(Pass::Woken);
        if !self.polling.window.is_zero() {
            POLLING.with(|p| p.set(true));
            let mut last_work = Instant::now();
            let give_back = last_work + self.polling.max * POLL_TURNS;
            loop {
                // Only work done prolongs the window: a ring the driver corrupted stays
                // "pending" and must not hold the poller.
                if serve(Pass::Look) {
                    last_work = Instant::now();
                } else if last_work.elapsed() >= self.polling.window {
                    break;
                }
                if Instant::now() >= give_back {
                    break;
                }
                std::hint::spin_loop();
            }
            POLLING.with(|p| p.set(false));
            serve(Pass::Rearm);
        }
        self.asleep_since = Some(Instant::now());
    }
}

/// Whether the driver made chains available on `queue` that the device has not taken.
pub fn pending(queue: &Queue, mem: &GuestMemory) -> bool {
    use virtio_queue::QueueT;
    queue.ready()
        && queue.avail_idx(mem, std::sync::atomic::Ordering::Acquire).is_ok_and(|idx| idx.0 != queue.next_avail())
}

/// Turns `queue`'s notifications on again; true if chains arrived while they were off.
pub fn rearm(queue: &mut Queue, mem: &GuestMemory) -> bool {
    use virtio_queue::QueueT;
    queue.ready() && queue.enable_notification(mem).unwrap_or(false)
}

impl Worker {
    /// Starts `backend` on a thread named after `kind`, under its filter.
    pub fn spawn(kind: ThreadKind, backend: impl Backend, activation: Activation) -> std::io::Result<Worker> {
        Worker::spawn_polling(kind, backend, activation, Duration::ZERO)
    }

    /// As spawn, polling for up to `poll_max` after work (zero: never).
    pub fn spawn_polling(
        kind: ThreadKind,
        mut backend: impl Backend,
        activation: Activation,
        poll_max: Duration,
    ) -> std::io::Result<Worker> {
        let kill = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let kill_in_thread = kill.try_clone()?;
        let epoll = Epoll::new()?;
        let Activation { mem, mut queues, queue_events, interrupt, .. } = activation;
        for (i, evt) in queue_events.iter().enumerate() {
            epoll.ctl(ControlOperation::Add, evt.as_raw_fd(), EpollEvent::new(EventSet::IN, i as u64))?;
        }
        let extra = ExtraFds { registered: Vec::new() };
        epoll.ctl(ControlOperation::Add, kill.as_raw_fd(), EpollEvent::new(EventSet::IN, KILL_TOKEN))?;
        let polling = Polling { max: poll_max, window: Duration::ZERO };
        let used_before = Vec::with_capacity(queues.len());
        let mut event_loop =
            EventLoop { epoll, queue_events, kill: kill_in_thread, interrupt, mem, extra, polling, used_before };
        let thread = sandbox::spawn(kind, kind.name(), move || {
            // The driver may have notified before DRIVER_OK: serve what is already there.
            event_loop.mark_used(&queues);
            let mut used = false;
            for i in 0..queues.len() {
                used |= backend.process_queue(i, &mut queues, &event_loop.mem);
            }
            event_loop.signal(used, &queues);
            event_loop.extra.sync(&event_loop.epoll, &backend);
            event_loop.run(&mut backend, &mut queues);
            queues
        })?;
        Ok(Worker { kill, thread: Some(thread) })
    }

    /// Stops the thread and waits for it; returns the queues with their ring positions (None
    /// when the thread was already stopped or died).
    pub fn stop(&mut self) -> Option<Vec<Queue>> {
        let _ = self.kill.write(1);
        self.thread.take().and_then(|thread| thread.join().ok())
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The back-end's fds that epoll waits on now, with what for.
struct ExtraFds {
    registered: Vec<(RawFd, EventSet)>,
}

impl ExtraFds {
    /// Adds, changes and removes fds so that epoll waits on exactly what the back-end wants now.
    fn sync(&mut self, epoll: &Epoll, backend: &impl Backend) {
        let mut wanted: Vec<(RawFd, EventSet)> =
            backend.extra_fds().into_iter().map(|fd| (fd, EventSet::IN | EventSet::READ_HANG_UP)).collect();
        for fd in backend.writable_fds() {
            match wanted.iter_mut().find(|(f, _)| *f == fd) {
                Some((_, events)) => *events |= EventSet::OUT,
                None => wanted.push((fd, EventSet::OUT)),
            }
        }
        self.registered.retain(|&(fd, _)| {
            if wanted.iter().any(|(f, _)| *f == fd) {
                return true;
            }
            // An fd the back-end closed is already gone from epoll: ignore the error.
            let _ = epoll.ctl(ControlOperation::Delete, fd, EpollEvent::default());
            false
        });
        for (fd, events) in wanted {
            let event = EpollEvent::new(events, FD_TOKEN_BASE + fd as u64);
            let known = self.registered.iter().position(|(f, _)| *f == fd);
            // Modify first: an fd number the back-end closed and reused is no longer in epoll,
            // and then only Add works.
            if let Some(i) = known
                && epoll.ctl(ControlOperation::Modify, fd, event).is_ok()
            {
                self.registered[i].1 = events;
                continue;
            }
            match epoll.ctl(ControlOperation::Add, fd, event) {
                Ok(()) => match known {
                    Some(i) => self.registered[i].1 = events,
                    None => self.registered.push((fd, events)),
                },
                Err(e) => tracing::warn!("a virtio back-end fd cannot be watched ({e})"),
            }
        }
    }
}

/// What the worker thread owns besides the back-end and the queues.
struct EventLoop {
    epoll: Epoll,
    queue_events: Vec<EventFd>,
    kill: EventFd,
    interrupt: Arc<dyn VirtioInterrupt>,
    mem: GuestMemory,
    extra: ExtraFds,
    polling: Polling,
    /// Each queue's used index when the work now being done began (see `signal`).
    used_before: Vec<u16>,
}

/// What one look at the worker's events found.
enum Handled {
    Used(bool),
    Killed,
}

impl EventLoop {
    /// Notes where each queue's used ring stands before serving.
    fn mark_used(&mut self, queues: &[Queue]) {
        use virtio_queue::QueueT;
        self.used_before.clear();
        self.used_before.extend(queues.iter().map(|q| q.next_used()));
    }

    /// Interrupts the driver, when serving said it wants that (its EVENT_IDX allowing), for the
    /// queues whose used ring moved since `mark_used`: with MSI-X each has its own vector.
    fn signal(&self, wanted: bool, queues: &[Queue]) {
        use virtio_queue::QueueT;
        if !wanted {
            return;
        }
        let moved = queues
            .iter()
            .zip(&self.used_before)
            .enumerate()
            .filter(|(_, (q, before))| q.next_used() != **before)
            .fold(0, |set: QueueSet, (i, _)| set | queue_bit(i));
        // Asked for with no ring moved (not expected): tell about them all rather than nothing.
        let queues = match moved {
            0 => (0..queues.len()).fold(0, |set, i| set | queue_bit(i)),
            moved => moved,
        };
        self.interrupt.signal_used_queues(queues);
    }

    fn run(&mut self, backend: &mut impl Backend, queues: &mut [Queue]) {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let slept = Instant::now();
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("a virtio worker stopped: epoll failed: {e}");
                    return;
                }
            };
            if !self.polling.max.is_zero() {
                self.polling.after_sleep(slept.elapsed());
            }
            self.mark_used(queues);
            let used = match self.handle(&events[..n], backend, queues) {
                Handled::Killed => return,
                Handled::Used(used) => used,
            };
            self.signal(used, queues);
            self.extra.sync(&self.epoll, backend);
            if !self.polling.window.is_zero() && self.poll(backend, queues, &mut events) {
                return;
            }
        }
    }

    fn handle(&mut self, events: &[EpollEvent], backend: &mut impl Backend, queues: &mut [Queue]) -> Handled {
        let mut used = false;
        for event in events {
            match event.data() {
                KILL_TOKEN => {
                    let _ = self.kill.read();
                    return Handled::Killed;
                }
                token if token >= FD_TOKEN_BASE => {
                    used |= backend.process_fd((token - FD_TOKEN_BASE) as RawFd, queues, &self.mem);
                }
                token => {
                    let index = token as usize;
                    let _ = self.queue_events[index].read();
                    used |= backend.process_queue(index, queues, &self.mem);
                }
            }
        }
        Handled::Used(used)
    }

    /// Looks at the rings and fds until nothing has come for the polling window, with the
    /// queues' notifications left off; then turns them back on and serves what slipped in
    /// meanwhile. True when the worker was told to stop.
    fn poll(&mut self, backend: &mut impl Backend, queues: &mut [Queue], events: &mut [EpollEvent]) -> bool {
        use virtio_queue::QueueT;
        POLLING.with(|p| p.set(true));
        let mut last_work = Instant::now();
        let killed = loop {
            self.mark_used(queues);
            let mut used = false;
            for i in 0..queues.len() {
                let q = &queues[i];
                let pending = q.ready()
                    && q.avail_idx(&self.mem, std::sync::atomic::Ordering::Acquire)
                        .is_ok_and(|idx| idx.0 != q.next_avail());
                if pending {
                    used |= backend.process_queue(i, queues, &self.mem);
                }
            }
            let n = self.epoll.wait(0, events).unwrap_or(0);
            match self.handle(&events[..n], backend, queues) {
                Handled::Killed => break true,
                Handled::Used(u) => used |= u,
            }
            if used {
                self.signal(true, queues);
                self.extra.sync(&self.epoll, backend);
                last_work = Instant::now();
            } else if last_work.elapsed() >= self.polling.window {
                break false;
            }
            std::hint::spin_loop();
        };
        POLLING.with(|p| p.set(false));
        if killed {
            return true;
        }
        // Notifications on again; a chain made available just before is served now, since no
        // kick will come for it.
        self.mark_used(queues);
        let mut used = false;
        for i in 0..queues.len() {
            if queues[i].ready() && queues[i].enable_notification(&self.mem).unwrap_or(false) {
                used |= backend.process_queue(i, queues, &self.mem);
            }
        }
        self.signal(used, queues);
        false
    }
}

/// Serves every chain the driver made available on `queue`, `serve` answering each with the
/// number of bytes it wrote into the chain. Returns whether the driver should be interrupted.
/// A ring the driver corrupted (an available index too far ahead) stops the queue until reset.
pub fn serve_queue<F>(name: &str, queue: &mut Queue, mem: &GuestMemory, mut serve: F) -> bool
where
    F: FnMut(virtio_queue::DescriptorChain<&GuestMemory>) -> u32,
{
    serve_queue_limited(name, queue, mem, || true, |chain| Some(serve(chain)))
}

/// As serve_queue, but takes a chain only while `more()` says there is something to put in it
/// (input waiting for receive buffers).
pub fn serve_queue_while<F, M>(name: &str, queue: &mut Queue, mem: &GuestMemory, more: M, mut serve: F) -> bool
where
    F: FnMut(virtio_queue::DescriptorChain<&GuestMemory>) -> u32,
    M: FnMut() -> bool,
{
    serve_queue_limited(name, queue, mem, more, |chain| Some(serve(chain)))
}

/// The general form: `serve` may also answer None, "not now" (a rate limiter is waiting), and
/// the chain goes back to the ring to be served later.
pub fn serve_queue_limited<F, M>(name: &str, queue: &mut Queue, mem: &GuestMemory, more: M, serve: F) -> bool
where
    F: FnMut(virtio_queue::DescriptorChain<&GuestMemory>) -> Option<u32>,
    M: FnMut() -> bool,
{
    serve_ring(name, queue, mem, &mut AtOnce { name, mem, more, serve, used: false })
}

/// How [`serve_ring`] hands over the chains it takes and puts finished ones on the used ring.
trait Answer {
    /// Whether a chain could be filled now.
    fn more(&mut self) -> bool;
    fn take(&mut self, queue: &mut Queue, chain: virtio_queue::DescriptorChain<&GuestMemory>) -> Taken;
    /// Puts what is finished on the used ring; true when there was anything.
    fn complete(&mut self, queue: &mut Queue) -> bool;
}

/// Each chain answered as it is taken (serve_queue_limited).
struct AtOnce<'a, F, M> {
    name: &'a str,
    mem: &'a GuestMemory,
    more: M,
    serve: F,
    /// A chain went on the used ring since the last `complete`.
    used: bool,
}

impl<F, M> Answer for AtOnce<'_, F, M>
where
    F: FnMut(virtio_queue::DescriptorChain<&GuestMemory>) -> Option<u32>,
    M: FnMut() -> bool,
{
    fn more(&mut self) -> bool {
        (self.more)()
    }

    fn take(&mut self, queue: &mut Queue, chain: virtio_queue::DescriptorChain<&GuestMemory>) -> Taken {
        use virtio_queue::QueueT;
        let head = chain.head_index();
        let Some(written) = (self.serve)(chain) else { return Taken::NotNow };
        if let Err(e) = queue.add_used(self.mem, head, written) {
            crate::guest_fault!("{}: cannot return descriptor {head} ({e})", self.name);
        }
        self.used = true;
        Taken::Queued
    }

    fn complete(&mut self, _queue: &mut Queue) -> bool {
        std::mem::take(&mut self.used)
    }
}

/// Chains taken into a [`Batch`] and completed together (serve_queue_batched).
struct InBatches<'a, B> {
    name: &'a str,
    mem: &'a GuestMemory,
    batch: &'a mut B,
}

impl<B: Batch> Answer for InBatches<'_, B> {
    fn more(&mut self) -> bool {
        true
    }

    fn take(&mut self, _queue: &mut Queue, chain: virtio_queue::DescriptorChain<&GuestMemory>) -> Taken {
        self.batch.take(self.mem, chain)
    }

    fn complete(&mut self, queue: &mut Queue) -> bool {
        add_all(self.name, queue, self.mem, self.batch.complete(self.mem))
    }
}

/// Serves `queue` through `answer` until the ring is empty, a chain cannot be filled yet, or
/// the back-end says "not now" (that chain goes back to the ring). Notifications are off while
/// it works and, unless the worker polls, on again at the end, looking once more for chains
/// made available meanwhile. Returns whether the driver should be interrupted. A ring the
/// driver corrupted (an available index too far ahead) stops the queue until reset.
fn serve_ring(name: &str, queue: &mut Queue, mem: &GuestMemory, answer: &mut impl Answer) -> bool {
    use virtio_queue::{QueueOwnedT, QueueT};
    if !queue.ready() {
        return false;
    }
    let mut used = false;
    loop {
        let _ = queue.disable_notification(mem);
        while answer.more() {
            let chain = match queue.iter(mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => {
                    crate::guest_fault!("{name}: the driver corrupted a queue ({e}); it is ignored until a reset");
                    used |= answer.complete(queue);
                    queue.set_ready(false);
                    return used;
                }
            };
            let Some(chain) = chain else { break };
            match answer.take(queue, chain) {
                Taken::Queued => {}
                Taken::Full => used |= answer.complete(queue),
                Taken::NotNow => {
                    queue.go_to_previous_position();
                    used |= answer.complete(queue);
                    return used && queue.needs_notification(mem).unwrap_or(true);
                }
            }
        }
        used |= answer.complete(queue);
        // A polling worker looks again soon: notifications stay off.
        if POLLING.with(Cell::get) {
            break;
        }
        // More chains arrived while notifications were off: serve them too, if there is
        // anything to put in them.
        match queue.enable_notification(mem) {
            Ok(true) if answer.more() => continue,
            _ => break,
        }
    }
    used && queue.needs_notification(mem).unwrap_or(true)
}

/// What a batched back-end did with a chain it was handed.
pub enum Taken {
    /// Queued (or already answered); more may follow in this batch.
    Queued,
    /// Queued, and the batch is full: it is completed before more are handed over.
    Full,
    /// Not now (a rate limiter is waiting): the chain goes back to the ring.
    NotNow,
}

/// Puts every completed chain (head, bytes written) on the used ring; true when there was one.
fn add_all(name: &str, queue: &mut Queue, mem: &GuestMemory, done: Vec<(u16, u32)>) -> bool {
    use virtio_queue::QueueT;
    let any = !done.is_empty();
    for (head, written) in done {
        if let Err(e) = queue.add_used(mem, head, written) {
            crate::guest_fault!("{name}: cannot return descriptor {head} ({e})");
        }
    }
    any
}

/// A back-end that completes chains later, many at once (io_uring).
pub trait Batch {
    /// Takes an available chain.
    fn take(&mut self, mem: &GuestMemory, chain: virtio_queue::DescriptorChain<&GuestMemory>) -> Taken;
    /// Finishes everything taken so far: each chain's head and the bytes written into it.
    fn complete(&mut self, mem: &GuestMemory) -> Vec<(u16, u32)>;
}

/// As serve_queue_limited, for a [`Batch`] back-end: chains are taken until the ring is empty
/// or the batch full, then completed together.
pub fn serve_queue_batched(name: &str, queue: &mut Queue, mem: &GuestMemory, batch: &mut impl Batch) -> bool {
    serve_ring(name, queue, mem, &mut InBatches { name, mem, batch })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_queue_poller_looks_while_work_comes_and_gives_the_queues_back_in_time() {
        let mut poller = QueuePoller::new(Duration::from_micros(200));
        let mut passes = Vec::new();
        // No sleep behind the first wake-up: no window yet.
        poller.serve(|pass| {
            passes.push(pass);
            true
        });
        assert_eq!(passes, [Pass::Woken]);
        // Woken again at once: the window opens; endless work still ends the polling.
        passes.clear();
        let started = Instant::now();
        poller.serve(|pass| {
            passes.push(pass);
            true
        });
        assert!(started.elapsed() < Duration::from_millis(200), "{:?}", started.elapsed());
        assert!(started.elapsed() >= Duration::from_micros(200) * POLL_TURNS);
        assert_eq!((passes.first(), passes.last()), (Some(&Pass::Woken), Some(&Pass::Rearm)));
        assert!(passes.len() > 3);
        // Nothing to find: one window of looks, then the queues go back.
        passes.clear();
        poller.serve(|pass| {
            passes.push(pass);
            pass == Pass::Woken
        });
        assert_eq!((passes.first(), passes.last()), (Some(&Pass::Woken), Some(&Pass::Rearm)));
        assert!(passes.contains(&Pass::Look));
        // A device that does not poll only serves its wake-ups.
        let mut never = QueuePoller::new(Duration::ZERO);
        passes.clear();
        for _ in 0..3 {
            never.serve(|pass| {
                passes.push(pass);
                true
            });
        }
        assert_eq!(passes, [Pass::Woken; 3]);
    }
}
