//! The thread an active device runs on: it waits on the queues' notification eventfds (and any
//! back-end fds), lets the device's back-end serve them, and raises the interrupt.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemory;
use crate::device::{Activation, Interrupt};

/// A device's request handling, run on its worker thread.
pub trait Backend: Send + 'static {
    /// Serves what the driver made available on queue `index`; true when buffers were used.
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool;
    /// Extra fds to wait on (a TAP, a socket); default none.
    fn extra_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// `extra_fds()[index]` is readable; true when buffers were used.
    fn process_fd(&mut self, _index: usize, _queues: &mut [Queue], _mem: &GuestMemory) -> bool {
        false
    }
}

/// A running worker; dropping it does not stop it, `stop` does.
pub struct Worker {
    kill: EventFd,
    thread: Option<JoinHandle<()>>,
}

const KILL_TOKEN: u64 = u64::MAX;
const FD_TOKEN_BASE: u64 = 1 << 32;

impl Worker {
    pub fn spawn(name: &str, mut backend: impl Backend, activation: Activation) -> std::io::Result<Worker> {
        let kill = EventFd::new(libc::EFD_NONBLOCK)?;
        let kill_in_thread = kill.try_clone()?;
        let epoll = Epoll::new()?;
        let Activation { mem, mut queues, queue_events, interrupt, .. } = activation;
        for (i, evt) in queue_events.iter().enumerate() {
            epoll.ctl(ControlOperation::Add, evt.as_raw_fd(), EpollEvent::new(EventSet::IN, i as u64))?;
        }
        for (i, fd) in backend.extra_fds().into_iter().enumerate() {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, FD_TOKEN_BASE + i as u64))?;
        }
        epoll.ctl(ControlOperation::Add, kill.as_raw_fd(), EpollEvent::new(EventSet::IN, KILL_TOKEN))?;
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            // The driver may have notified before DRIVER_OK: serve what is already there.
            let mut used = false;
            for i in 0..queues.len() {
                used |= backend.process_queue(i, &mut queues, &mem);
            }
            if used {
                interrupt.signal_used_queue();
            }
            run(&epoll, &mut backend, &mut queues, &queue_events, &kill_in_thread, &interrupt, &mem);
        })?;
        Ok(Worker { kill, thread: Some(thread) })
    }

    /// Stops the thread and waits for it.
    pub fn stop(&mut self) {
        let _ = self.kill.write(1);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.stop();
    }
}

fn run(
    epoll: &Epoll,
    backend: &mut impl Backend,
    queues: &mut [Queue],
    queue_events: &[EventFd],
    kill: &EventFd,
    interrupt: &Arc<Interrupt>,
    mem: &GuestMemory,
) {
    let mut events = vec![EpollEvent::default(); queue_events.len() + 8];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                tracing::error!("a virtio worker stopped: epoll failed: {e}");
                return;
            }
        };
        let mut used = false;
        for event in &events[..n] {
            match event.data() {
                KILL_TOKEN => {
                    let _ = kill.read();
                    return;
                }
                token if token >= FD_TOKEN_BASE => {
                    used |= backend.process_fd((token - FD_TOKEN_BASE) as usize, queues, mem);
                }
                token => {
                    let index = token as usize;
                    let _ = queue_events[index].read();
                    used |= backend.process_queue(index, queues, mem);
                }
            }
        }
        if used {
            interrupt.signal_used_queue();
        }
    }
}

/// Serves every chain the driver made available on `queue`, `serve` answering each with the
/// number of bytes it wrote into the chain. Returns whether the driver should be interrupted.
/// A ring the driver corrupted (an available index too far ahead) stops the queue until reset.
pub fn serve_queue<F>(name: &str, queue: &mut Queue, mem: &GuestMemory, mut serve: F) -> bool
where
    F: FnMut(virtio_queue::DescriptorChain<&GuestMemory>) -> u32,
{
    use virtio_queue::{QueueOwnedT, QueueT};
    if !queue.ready() {
        return false;
    }
    let mut used = false;
    loop {
        let _ = queue.disable_notification(mem);
        loop {
            let chain = match queue.iter(mem) {
                Ok(mut iter) => iter.next(),
                Err(e) => {
                    tracing::warn!("{name}: the driver corrupted a queue ({e}); it is ignored until a reset");
                    queue.set_ready(false);
                    return used;
                }
            };
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let written = serve(chain);
            if let Err(e) = queue.add_used(mem, head, written) {
                tracing::warn!("{name}: cannot return descriptor {head} ({e})");
            }
            used = true;
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            _ => break,
        }
    }
    used && queue.needs_notification(mem).unwrap_or(true)
}
