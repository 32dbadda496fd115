//! The thread beside a started vhost-user device: it turns the back-end's call eventfds into
//! the transport's interrupt, notices the back-end hanging up, and connects again when the
//! back-end is back, handing it memory and the rings where the driver left them.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use virtio::device::{QueueSet, VirtioInterrupt, queue_bit};

use super::Kind;
use super::Shared;
use super::link::{Link, Rings};

/// How often the monitor tries a back-end that went away.
const RETRY: Duration = Duration::from_millis(200);

const KILL_TOKEN: u64 = u64::MAX;
const SOCKET_TOKEN: u64 = u64::MAX - 1;

pub struct Monitor {
    kill: EventFd,
    thread: sandbox::Thread<Rings>,
}

impl Monitor {
    /// Starts the monitor of a device whose back-end holds the rings (`socket` is its
    /// connection), or that waits for its back-end (`socket` None).
    pub fn spawn(
        shared: Arc<Shared>,
        rings: Rings,
        interrupt: Arc<dyn VirtioInterrupt>,
        socket: Option<RawFd>,
        kind: Kind,
    ) -> std::io::Result<Monitor> {
        let kill = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?;
        let epoll = Epoll::new()?;
        let add = |fd: RawFd, token: u64, events: EventSet| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
        };
        add(kill.as_raw_fd(), KILL_TOKEN, EventSet::IN)?;
        for (i, call) in rings.calls.iter().enumerate() {
            add(call.as_raw_fd(), i as u64, EventSet::IN)?;
        }
        if let Some(fd) = socket {
            // Only a hang-up: replies are read by whoever asked.
            add(fd, SOCKET_TOKEN, EventSet::READ_HANG_UP)?;
        }
        let watch = Watch { shared, rings, interrupt, epoll, away: socket.is_none(), broken: false, kind };
        let thread = sandbox::spawn(sandbox::ThreadKind::VhostUser, watch.kind.name(), move || watch.run())?;
        Ok(Monitor { kill, thread })
    }

    /// Stops the thread and gives back the rings (None if it panicked).
    pub fn stop(self) -> Option<Rings> {
        let _ = self.kill.write(1);
        self.thread.join().ok()
    }
}

struct Watch {
    shared: Arc<Shared>,
    rings: Rings,
    interrupt: Arc<dyn VirtioInterrupt>,
    epoll: Epoll,
    /// The back-end hung up and has not come back.
    away: bool,
    /// It came back unable to take the device: no more tries.
    broken: bool,
    kind: Kind,
}

impl Watch {
    fn run(mut self) -> Rings {
        let mut events = vec![EpollEvent::default(); self.rings.calls.len() + 2];
        loop {
            let timeout = if self.away && !self.broken { RETRY.as_millis() as i32 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::error!("{}: the monitor cannot wait for events ({e}); the device stops", self.shared.name);
                    return self.rings;
                }
            };
            let mut used: QueueSet = 0;
            let mut hung_up = false;
            for event in &events[..n] {
                match event.data() {
                    KILL_TOKEN => return self.rings,
                    SOCKET_TOKEN => hung_up = true,
                    i => {
                        if let Some(call) = self.rings.calls.get(i as usize) {
                            let _ = call.read();
                            used |= queue_bit(i as usize);
                        }
                    }
                }
            }
            if used != 0 {
                self.interrupt.signal_used_queues(used);
            }
            if hung_up {
                self.lost();
            }
            if n == 0 && self.away && !self.broken {
                self.reconnect();
            }
        }
    }

    fn lost(&mut self) {
        if let Some(link) = self.shared.link().take() {
            let _ = self.epoll.ctl(ControlOperation::Delete, link.socket_fd(), EpollEvent::default());
        }
        self.away = true;
        tracing::warn!(
            "{}: the back-end at {} hung up; the device waits for it to come back",
            self.shared.name,
            self.shared.socket.display()
        );
    }

    fn reconnect(&mut self) {
        let mut link = match Link::connect(&self.shared.socket, self.rings.calls.len()) {
            Ok(link) => link,
            // Not listening yet: the next try may find it.
            Err(super::LinkError::Connect { .. }) => return,
            Err(e) => return self.give_up(&e.to_string()),
        };
        let acked = self.rings.acked_features;
        if self.kind.offered_features(link.backend_features) & acked != acked {
            return self.give_up("the back-end that came back offers fewer features than the driver uses");
        }
        let bases: Vec<u16> = self.rings.rings.iter().map(|r| r.restart_base(&self.rings.mem)).collect();
        if let Err(e) = link.start(&self.rings, &bases) {
            return self.give_up(&e.to_string());
        }
        let fd = link.socket_fd();
        if let Err(e) = self.epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::READ_HANG_UP, SOCKET_TOKEN))
        {
            return self.give_up(&format!("its connection cannot be watched ({e})"));
        }
        *self.shared.link() = Some(link);
        self.away = false;
        // Requests the back-end finished as it went may not have been signalled.
        self.interrupt.signal_used_queues(self.rings.rings.iter().fold(0, |set, r| set | queue_bit(r.index)));
        tracing::info!("{}: the {} back-end is back; the device serves again", self.shared.name, self.kind.name());
    }

    fn give_up(&mut self, why: &str) {
        self.broken = true;
        tracing::error!(
            "{}: the back-end at {} came back but cannot take the device ({why}); the device stays broken, the VM goes on",
            self.shared.name,
            self.shared.socket.display()
        );
    }
}
