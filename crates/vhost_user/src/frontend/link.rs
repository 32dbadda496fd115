//! The VMM's side of one vhost-user connection: connecting with bounded waits, the feature
//! handshake, and handing the back-end guest memory and the rings.

use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use vhost::vhost_user::message::VhostUserHeaderFlag;
use vhost::vhost_user::{Frontend, VhostUserFrontend, VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};
use vmm_sys_util::eventfd::EventFd;

use virtio::GuestMemory;

/// The longest the VMM waits for one reply (or to send one message): a vCPU that starts or
/// resets the device waits on the back-end, so a silent back-end costs it at most this.
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// The protocol features the VMM uses; it offers no others, so a back-end cannot open the
/// channels (back-end requests, shared memory, inflight regions) that it does not serve.
pub fn wanted_protocol() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::RESET_DEVICE
}

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot connect to {path} ({source}); start the back-end first")]
    Connect { path: String, source: std::io::Error },
    #[error("the back-end failed at {step} ({source})")]
    Protocol { step: &'static str, source: vhost::Error },
    #[error("{0}")]
    Refused(String),
}

fn step(step: &'static str) -> impl FnOnce(vhost::Error) -> LinkError {
    move |source| LinkError::Protocol { step, source }
}

/// A connected back-end and what it offered.
pub struct Link {
    pub frontend: Frontend,
    pub backend_features: u64,
    pub protocol: VhostUserProtocolFeatures,
    /// How many queues the back-end serves (its GET_QUEUE_NUM, or `queues` as asked).
    pub backend_queues: usize,
}

impl Link {
    /// Connects to `path` and runs the handshake (owner, features, protocol features) for a
    /// device of `queues` queues.
    pub fn connect(path: &Path, queues: usize) -> Result<Link, LinkError> {
        let connect_err = |source| LinkError::Connect { path: path.display().to_string(), source };
        let stream = UnixStream::connect(path).map_err(connect_err)?;
        stream.set_read_timeout(Some(REPLY_TIMEOUT)).map_err(connect_err)?;
        stream.set_write_timeout(Some(REPLY_TIMEOUT)).map_err(connect_err)?;
        Self::handshake(stream, queues)
    }

    /// The handshake on a connected stream (a test or fuzz target brings its own).
    pub fn handshake(stream: UnixStream, queues: usize) -> Result<Link, LinkError> {
        let mut frontend = Frontend::from_stream(stream, queues as u64);
        frontend.set_owner().map_err(step("SET_OWNER"))?;
        let backend_features = frontend.get_features().map_err(step("GET_FEATURES"))?;
        let mut protocol = VhostUserProtocolFeatures::empty();
        let mut backend_queues = queues;
        if backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            let offered = frontend.get_protocol_features().map_err(step("GET_PROTOCOL_FEATURES"))?;
            protocol = offered & wanted_protocol();
            frontend.set_protocol_features(protocol).map_err(step("SET_PROTOCOL_FEATURES"))?;
            if protocol.contains(VhostUserProtocolFeatures::REPLY_ACK) {
                // Every request is acknowledged, so that a back-end's refusal is seen at once.
                frontend.set_hdr_flags(VhostUserHeaderFlag::NEED_REPLY);
            }
            if protocol.contains(VhostUserProtocolFeatures::MQ) {
                let served = frontend.get_queue_num().map_err(step("GET_QUEUE_NUM"))?;
                backend_queues = usize::try_from(served).unwrap_or(usize::MAX);
            }
        }
        Ok(Link { frontend, backend_features, protocol, backend_queues })
    }

    /// The back-end's configuration space, `len` bytes.
    pub fn config(&mut self, len: usize) -> Result<Vec<u8>, LinkError> {
        if !self.protocol.contains(VhostUserProtocolFeatures::CONFIG) {
            return Err(LinkError::Refused(
                "the back-end does not give its configuration (protocol feature CONFIG), which this device needs"
                    .into(),
            ));
        }
        let buf = vec![0u8; len];
        let (_, config) = self
            .frontend
            .get_config(0, len as u32, vhost::vhost_user::message::VhostUserConfigFlags::WRITABLE, &buf)
            .map_err(step("GET_CONFIG"))?;
        Ok(config)
    }

    /// The features to acknowledge to the back-end for what the driver acknowledged.
    fn features_for(&self, driver: u64) -> u64 {
        let protocol = VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        (driver & self.backend_features) | (self.backend_features & protocol)
    }

    /// Hands the back-end guest memory and the rings and starts them.
    pub fn start(&mut self, rings: &Rings, bases: &[u16]) -> Result<(), LinkError> {
        let table = memory_table(&rings.mem)?;
        let features = self.features_for(rings.acked_features);
        let frontend = &mut self.frontend;
        frontend.set_features(features).map_err(step("SET_FEATURES"))?;
        frontend.set_mem_table(&table).map_err(step("SET_MEM_TABLE"))?;
        for (ring, &base) in rings.rings.iter().zip(bases) {
            let i = ring.index;
            frontend.set_vring_num(i, ring.size).map_err(step("SET_VRING_NUM"))?;
            frontend.set_vring_addr(i, &ring.addresses(&rings.mem)?).map_err(step("SET_VRING_ADDR"))?;
            frontend.set_vring_base(i, base).map_err(step("SET_VRING_BASE"))?;
            frontend.set_vring_call(i, &rings.calls[i]).map_err(step("SET_VRING_CALL"))?;
            frontend.set_vring_kick(i, &rings.kicks[i]).map_err(step("SET_VRING_KICK"))?;
        }
        if self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0 {
            for ring in &rings.rings {
                frontend.set_vring_enable(ring.index, true).map_err(step("SET_VRING_ENABLE"))?;
            }
        }
        Ok(())
    }

    /// Stops the rings (GET_VRING_BASE stops a ring in vhost-user); errors are logged, since a
    /// back-end that is gone has nothing left to stop.
    pub fn stop(&mut self, rings: &Rings, name: &str) {
        let enable = self.backend_features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() != 0;
        for ring in &rings.rings {
            if enable && let Err(e) = self.frontend.set_vring_enable(ring.index, false) {
                tracing::debug!("{name}: queue {} was not disabled ({e})", ring.index);
            }
            if let Err(e) = self.frontend.get_vring_base(ring.index) {
                tracing::debug!("{name}: queue {} was not stopped ({e})", ring.index);
            }
        }
        if self.protocol.contains(VhostUserProtocolFeatures::RESET_DEVICE)
            && let Err(e) = self.frontend.reset_device()
        {
            tracing::debug!("{name}: the back-end did not reset ({e})");
        }
    }

    pub fn socket_fd(&self) -> std::os::fd::RawFd {
        self.frontend.as_raw_fd()
    }
}

/// One ring the driver set up.
#[derive(Clone, Copy, Debug)]
pub struct Ring {
    pub index: usize,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub next_avail: u16,
}

impl Ring {
    /// The ring's addresses in the VMM's address space, as vhost-user wants them.
    fn addresses(&self, mem: &GuestMemory) -> Result<VringConfigData, LinkError> {
        let host = |gpa: u64| {
            mem.get_host_address(GuestAddress(gpa)).map(|p| p as u64).map_err(|_| {
                LinkError::Refused(format!("queue {} has a ring outside guest memory at {gpa:#x}", self.index))
            })
        };
        Ok(VringConfigData {
            queue_max_size: self.size,
            queue_size: self.size,
            flags: 0,
            desc_table_addr: host(self.desc)?,
            used_ring_addr: host(self.used)?,
            avail_ring_addr: host(self.avail)?,
            log_addr: None,
        })
    }

    /// Where the back-end must start on a new connection: the used index, so that requests
    /// it took but had not finished are served again.
    pub fn restart_base(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj::<u16>(GuestAddress(self.used.wrapping_add(2))).unwrap_or(self.next_avail)
    }
}

/// What a started device hands a back-end, kept to hand it again after a reconnection.
pub struct Rings {
    pub mem: GuestMemory,
    pub rings: Vec<Ring>,
    /// Per device queue (started or not), by queue index.
    pub kicks: Vec<EventFd>,
    pub calls: Vec<EventFd>,
    pub acked_features: u64,
}

/// Every guest memory region as the back-end maps it: the file behind it and the offset.
pub fn memory_table(mem: &GuestMemory) -> Result<Vec<VhostUserMemoryRegionInfo>, LinkError> {
    mem.iter()
        .map(|region| {
            let file = region.file_offset().ok_or_else(|| {
                LinkError::Refused("guest memory is not shared (a memfd), so a back-end cannot reach it".into())
            })?;
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|e| LinkError::Refused(format!("a guest memory region has no host address ({e})")))?;
            Ok(VhostUserMemoryRegionInfo {
                guest_phys_addr: region.start_addr().0,
                memory_size: region.len(),
                userspace_addr: host as u64,
                mmap_offset: file.start(),
                mmap_handle: file.file().as_raw_fd(),
            })
        })
        .collect()
}
