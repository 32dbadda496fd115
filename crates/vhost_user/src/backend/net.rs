//! `ferrovisor vhost-user-net`: a network port (a TAP or a switch port) served to any
//! vhost-user front-end with the built-in virtio-net's frame handling and firewall.

use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier};

use virtio::GuestMemory;
use virtio::VirtioDevice;
use virtio::net::Net;
use virtio::worker::{self, Backend, Pass, QueuePoller};

type Vring = VringRwLock<GuestMemoryAtomic<GuestMemoryMmap<()>>>;

/// The queues: receive, transmit.
const QUEUES: usize = 2;
/// The host side's event, after the queues' and the library's exit event.
pub const HOST_EVENT: u16 = QUEUES as u16 + 1;
/// Bits the front-end handles itself (its configuration space, control queue, announces).
const FRONTEND_ONLY: u64 = (1 << 5) | (1 << 16) | (1 << 17) | (1 << 18) | (1 << 19) | (1 << 21) | (1 << 22);

/// One interface as a vhost-user back-end: a single queue pair.
pub struct NetBackend {
    net: Net,
    acked: u64,
    /// Behind a lock only because the back-end trait wants Sync; one thread serves it.
    server: Mutex<Option<Box<dyn Backend>>>,
    mem: Option<GuestMemory>,
    /// The port's `poll_us`, as the built-in device's worker polls.
    poller: QueuePoller,
}

impl NetBackend {
    pub fn new(net: Net) -> NetBackend {
        let poller = QueuePoller::new(net.polling());
        NetBackend { net, acked: 0, server: Mutex::new(None), mem: None, poller }
    }

    pub fn shared(self) -> Arc<Mutex<NetBackend>> {
        Arc::new(Mutex::new(self))
    }

    /// The host side's fd, which the daemon waits on (edge-triggered) beside the queues.
    pub fn host_fd(&self) -> Option<RawFd> {
        self.net.host_fd()
    }

    /// Serves `event` with both queues in hand; true when the driver should be interrupted.
    fn serve(&mut self, event: u16, vrings: &[Vring]) -> std::io::Result<bool> {
        let Some(mem) = self.mem.as_ref() else { return Ok(false) };
        let server = self.server.get_mut().unwrap_or_else(|p| p.into_inner());
        if server.is_none() {
            *server = Some(self.net.server(self.acked)?);
        }
        let Some(server) = server.as_mut() else { return Ok(false) };
        let (Some(rx), Some(tx)) = (vrings.first(), vrings.get(1)) else { return Ok(false) };
        let (mut rx, mut tx) = (rx.get_mut(), tx.get_mut());
        // Polled queues stay borrowed: interrupts then go through copies of the call fds.
        let clone = |call: &Option<EventNotifier>| call.as_ref().map(|c| c.try_clone()).transpose();
        let calls = match self.poller.polls() {
            true => Some([clone(rx.get_call())?, clone(tx.get_call())?]),
            false => None,
        };
        // The device's handling wants the pair as one slice; the library keeps them apart.
        let placeholder = || Queue::new(2).map_err(|e| std::io::Error::other(e.to_string()));
        let mut pair = [
            std::mem::replace(rx.get_queue_mut(), placeholder()?),
            std::mem::replace(tx.get_queue_mut(), placeholder()?),
        ];
        let host = self.net.host_fd().unwrap_or(-1);
        let mut signal = false;
        if let Some(calls) = calls {
            self.poller.serve(|pass| {
                let answered = match pass {
                    Pass::Woken => serve_event(server, event, host, &mut pair, mem),
                    Pass::Look => {
                        let mut answered = false;
                        for queue in 0..QUEUES {
                            if worker::pending(&pair[queue], mem) {
                                answered |= server.process_queue(queue, &mut pair, mem);
                            }
                        }
                        while server.process_fd(host, &mut pair, mem) {
                            answered = true;
                        }
                        answered
                    }
                    Pass::Rearm => {
                        let mut answered = false;
                        for queue in 0..QUEUES {
                            if worker::rearm(&mut pair[queue], mem) {
                                answered |= server.process_queue(queue, &mut pair, mem);
                            }
                        }
                        answered
                    }
                };
                if answered {
                    calls.iter().for_each(|call| super::interrupt(call.as_ref()));
                }
                answered
            });
        } else {
            signal = serve_event(server, event, host, &mut pair, mem);
        }
        let [rx_queue, tx_queue] = pair;
        *rx.get_queue_mut() = rx_queue;
        *tx.get_queue_mut() = tx_queue;
        Ok(signal)
    }
}

/// Serves what woke the back-end: a queue's kick, or frames from the host side.
fn serve_event(server: &mut Box<dyn Backend>, event: u16, host: RawFd, pair: &mut [Queue], mem: &GuestMemory) -> bool {
    match event {
        // Edge-triggered: read until nothing more is delivered (empty, or no buffers).
        HOST_EVENT => {
            let mut delivered = false;
            while server.process_fd(host, pair, mem) {
                delivered = true;
            }
            delivered
        }
        queue => server.process_queue(usize::from(queue), pair, mem),
    }
}

impl VhostUserBackendMut for NetBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        QUEUES
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.net.queue_max_sizes()[0])
    }

    fn features(&self) -> u64 {
        (self.net.features() & !FRONTEND_ONLY) | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn acked_features(&mut self, features: u64) {
        self.acked = features;
        // Offloads follow the driver's features: a new server at the next event.
        *self.server.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&mut self, _enabled: bool) {}

    /// A new pair for each front-end's worker (see the disk's back-end).
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap<()>>) -> std::io::Result<()> {
        self.mem = Some(super::memory::remap(&mem.memory())?);
        Ok(())
    }

    fn reset_device(&mut self) {
        *self.server.get_mut().unwrap_or_else(|p| p.into_inner()) = None;
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        if usize::from(device_event) >= QUEUES && device_event != HOST_EVENT {
            return Ok(());
        }
        let signal = self.serve(device_event, vrings)?;
        if signal && let Some(rx) = vrings.first() {
            rx.signal_used_queue()?;
            if let Some(tx) = vrings.get(1) {
                tx.signal_used_queue()?;
            }
        }
        Ok(())
    }
}
