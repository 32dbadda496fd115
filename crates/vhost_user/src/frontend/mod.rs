//! vhost-user front-ends: a virtio device whose queues another process serves. The VMM keeps
//! the transport and the configuration space; the back-end gets guest memory (the memfd), the
//! rings, the kick eventfds (KVM's ioeventfds, so kicks go straight to it) and one call eventfd
//! per queue, which a monitor thread turns into the transport's interrupt.

mod kind;
mod link;
mod monitor;

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use virtio::device::{ActivateError, Activation, VirtioDevice};

pub use kind::{BLK_CONFIG_LEN, FS_TAG_LEN, Kind};
pub use link::{Link, LinkError, REPLY_TIMEOUT, Ring, Rings, memory_table};

/// The back-end as the device and its monitor thread share it: None while it is away.
pub(crate) struct Shared {
    pub name: String,
    pub socket: PathBuf,
    pub link: Mutex<Option<Link>>,
}

impl Shared {
    pub fn link(&self) -> MutexGuard<'_, Option<Link>> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A virtio device served by a vhost-user back-end.
pub struct VhostUserDevice {
    kind: Kind,
    shared: Arc<Shared>,
    queue_sizes: Vec<u16>,
    offered: u64,
    config: Vec<u8>,
    running: Option<monitor::Monitor>,
}

impl VhostUserDevice {
    /// Connects to the back-end at `socket` for a device of `kind` with `requested` request
    /// queues (or queue pairs) of `queue_size` entries, and reads what it offers.
    pub fn connect(
        name: &str,
        kind: Kind,
        socket: PathBuf,
        requested: usize,
        queue_size: u16,
    ) -> Result<VhostUserDevice, LinkError> {
        let most = kind.queue_count(requested, u64::MAX, &[u8::MAX; BLK_CONFIG_LEN]);
        let mut link = Link::connect(&socket, most)?;
        let from_backend = match kind.config_from_backend() {
            true => Some(link.config(BLK_CONFIG_LEN)?),
            false => None,
        };
        let queues = kind.queue_count(requested, link.backend_features, from_backend.as_deref().unwrap_or(&[]));
        if link.backend_queues < queues {
            return Err(LinkError::Refused(format!(
                "the back-end serves {} queues where the device needs {queues}; ask for fewer queues",
                link.backend_queues
            )));
        }
        let offered = kind.offered_features(link.backend_features);
        if offered & virtio::F_VERSION_1 == 0 {
            return Err(LinkError::Refused("the back-end does not offer VIRTIO_F_VERSION_1".into()));
        }
        tracing::info!(
            "{name}: {} at {} ({queues} queues of {queue_size}, features {offered:#x}, protocol {:#x})",
            kind.name(),
            socket.display(),
            link.protocol.bits()
        );
        let config = kind.config(from_backend, queues);
        Ok(VhostUserDevice {
            kind,
            shared: Arc::new(Shared { name: name.into(), socket, link: Mutex::new(Some(link)) }),
            queue_sizes: vec![queue_size; queues],
            offered,
            config,
            running: None,
        })
    }

    fn stop(&mut self) {
        let Some(monitor) = self.running.take() else { return };
        if let Some(rings) = monitor.stop()
            && let Some(link) = self.shared.link().as_mut()
        {
            link.stop(&rings, &self.shared.name);
        }
    }
}

impl VirtioDevice for VhostUserDevice {
    fn device_type(&self) -> u32 {
        self.kind.device_type()
    }

    fn features(&self) -> u64 {
        self.offered
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        virtio::device::read_config_bytes(&self.config, offset, data);
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.stop();
        let Activation { mem, queues, queue_events, interrupt, acked_features } = activation;
        let rings: Vec<Ring> = queues
            .iter()
            .enumerate()
            .filter(|(_, q)| q.ready())
            .map(|(index, q)| Ring {
                index,
                size: q.size(),
                desc: q.desc_table(),
                avail: q.avail_ring(),
                used: q.used_ring(),
                next_avail: q.next_avail(),
            })
            .collect();
        let calls = queue_events
            .iter()
            .map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))
            .collect::<Result<Vec<_>, _>>()
            .map_err(ActivateError::Worker)?;
        let rings = Rings { mem, rings, kicks: queue_events, calls, acked_features };
        let bases: Vec<u16> = rings.rings.iter().map(|r| r.next_avail).collect();
        // A back-end that is away gets the rings when the monitor finds it back.
        let socket_fd = match self.shared.link().as_mut() {
            Some(link) => {
                link.start(&rings, &bases).map_err(|e| ActivateError::Backend(e.to_string()))?;
                Some(link.socket_fd())
            }
            None => None,
        };
        let monitor = monitor::Monitor::spawn(self.shared.clone(), rings, interrupt, socket_fd, self.kind.clone())
            .map_err(ActivateError::Worker)?;
        self.running = Some(monitor);
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }

    fn snapshot_support(&self) -> Result<(), String> {
        Err(format!(
            "{} is served by another process (the back-end at {}), whose state the VMM cannot save or move",
            self.shared.name,
            self.shared.socket.display()
        ))
    }
}

impl Drop for VhostUserDevice {
    fn drop(&mut self) {
        self.stop();
    }
}
