//! `ferrovisor vhost-user-blk`: a disk served to any vhost-user front-end (Ferrovisor, QEMU,
//! Cloud Hypervisor) with the built-in virtio-blk's request handling.

use std::sync::{Arc, Mutex};

use vhost::vhost_user::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackendMut, VringRwLock, VringT};
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier};

use virtio::GuestMemory;
use virtio::VirtioDevice;
use virtio::blk::Block;
use virtio::worker::{self, Backend, Pass, QueuePoller};

type Vring = VringRwLock<GuestMemoryAtomic<GuestMemoryMmap<()>>>;

/// One disk as a vhost-user back-end: a single request queue.
pub struct BlkBackend {
    disk: Block,
    config: Vec<u8>,
    /// Behind a lock only because the back-end trait wants Sync; one thread serves the queue.
    server: Mutex<Box<dyn Backend>>,
    mem: Option<GuestMemory>,
    /// The disk's `poll_us`, as the built-in device's worker polls.
    poller: QueuePoller,
}

impl BlkBackend {
    pub fn new(disk: Block) -> std::io::Result<BlkBackend> {
        let mut config = vec![0u8; super::super::frontend::BLK_CONFIG_LEN];
        disk.read_config(0, &mut config);
        let server = disk.server()?;
        let poller = QueuePoller::new(disk.polling());
        Ok(BlkBackend { disk, config, server: Mutex::new(server), mem: None, poller })
    }

    pub fn shared(self) -> Arc<Mutex<BlkBackend>> {
        Arc::new(Mutex::new(self))
    }
}

impl VhostUserBackendMut for BlkBackend {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        1
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.disk.queue_max_sizes()[0])
    }

    fn features(&self) -> u64 {
        self.disk.features() | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        VhostUserProtocolFeatures::CONFIG | VhostUserProtocolFeatures::REPLY_ACK | VhostUserProtocolFeatures::MQ
    }

    fn set_event_idx(&mut self, _enabled: bool) {}

    /// A new pair for each front-end's worker, so that its stop does not stop the next one's.
    /// (The library keeps the consumer's fd, one per front-end served.)
    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        new_event_consumer_and_notifier(EventFlag::NONBLOCK).ok()
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        let mut out = vec![0u8; size.min(self.config.len() as u32) as usize];
        virtio::device::read_config_bytes(&self.config, u64::from(offset), &mut out);
        out
    }

    fn update_memory(&mut self, mem: GuestMemoryAtomic<GuestMemoryMmap<()>>) -> std::io::Result<()> {
        self.mem = Some(super::memory::remap(&mem.memory())?);
        Ok(())
    }

    fn reset_device(&mut self) {
        // A fresh server: nothing of the last driver's requests is kept.
        match self.disk.server() {
            Ok(server) => self.server = Mutex::new(server),
            Err(e) => tracing::warn!("vhost-user-blk: the disk could not be opened again ({e})"),
        }
    }

    fn handle_event(
        &mut self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        _thread_id: usize,
    ) -> std::io::Result<()> {
        let (Some(mem), Some(vring)) = (self.mem.as_ref(), vrings.first()) else { return Ok(()) };
        if device_event != 0 {
            return Ok(());
        }
        let server = self.server.get_mut().unwrap_or_else(|p| p.into_inner());
        if !self.poller.polls() {
            let signal = server.process_queue(0, std::slice::from_mut(vring.get_mut().get_queue_mut()), mem);
            if signal {
                vring.signal_used_queue()?;
            }
            return Ok(());
        }
        let mut state = vring.get_mut();
        // The queue stays borrowed while it is polled: interrupts go through a copy of the fd.
        let call = state.get_call().as_ref().map(|call| call.try_clone()).transpose()?;
        let queue = std::slice::from_mut(state.get_queue_mut());
        self.poller.serve(|pass| {
            let answered = match pass {
                Pass::Woken => server.process_queue(0, queue, mem),
                Pass::Look => worker::pending(&queue[0], mem) && server.process_queue(0, queue, mem),
                Pass::Rearm => worker::rearm(&mut queue[0], mem) && server.process_queue(0, queue, mem),
            };
            if answered {
                super::interrupt(call.as_ref());
            }
            answered
        });
        Ok(())
    }
}
