//! virtio-net on a TAP device or a port of Ferrovisor's switch. Frames cross a TAP with their
//! virtio-net header, which the TAP speaks too (IFF_VNET_HDR), so checksum offload needs no work
//! here; the switch takes bare frames, and no offload is offered with it. Receive waits, rather than
//! drops, when the guest has no buffers: the TAP is not read until buffers arrive.
//!
//! Frames are copied once each way, on purpose. Sent, the copy is what the firewall judges and
//! what leaves, so the guest cannot rewrite a frame after the verdict; sending the payload
//! straight from guest memory (a writev of copied headers and guest buffers) was measured
//! 10-15% slower for 1500-byte frames on this host than one write of the copy. Received, the
//! firewall must see a frame (and learn the VM's address from DHCP answers) before any of it
//! reaches guest memory, where a frame it drops must never be readable.

use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};

use net::firewall::Firewall;
use net::mmds::MmdsStack;
use net::switch::SwitchPort;
use net::tap::{TUN_F_CSUM, Tap};
use virtio_bindings::virtio_net::*;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{ActivateError, Activation, SubsetInterrupt, VirtioDevice, read_config_bytes};
use crate::metrics::DeviceMetrics;
use crate::rate_limiter::{RateLimit, RateLimiter, timer_fired, waiting_timer};
use crate::worker::{Backend, Worker, serve_queue, serve_queue_limited};
use crate::{F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, GuestMemory, TYPE_NET};

/// struct virtio_net_hdr_v1: its size whenever VERSION_1 is negotiated.
pub const VNET_HDR_LEN: usize = 12;
const NUM_BUFFERS_OFFSET: usize = 10;
// A worker's queues: its pair's receive and transmit queues, and for the first pair the
// control queue when the driver uses one.
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const CTRL_QUEUE: usize = 2;
const QUEUE_SIZE: u16 = 256;
const CTRL_QUEUE_SIZE: u16 = 64;
/// Ethernet header plus the default MTU: the largest frame without segmentation offload.
const MAX_FRAME: usize = 14 + 1500;
/// The TAP never hands over more than this (64 KiB packets plus the header).
const MAX_TAP_READ: usize = 65536 + VNET_HDR_LEN;
/// Frames moved per wake-up before other queues get a turn.
const BUDGET: usize = 256;

fn bit(b: u32) -> u64 {
    1 << b
}

/// Where frames go on the host: a TAP (frames with virtio-net headers) or a port on
/// Ferrovisor's user-space switch (bare frames).
pub enum NetHost {
    Tap(Tap),
    Switch(SwitchPort),
}

impl NetHost {
    fn try_clone(&self) -> std::io::Result<NetHost> {
        Ok(match self {
            NetHost::Tap(t) => NetHost::Tap(t.try_clone()?),
            NetHost::Switch(s) => NetHost::Switch(s.try_clone()?),
        })
    }

    fn raw_fd(&self) -> RawFd {
        match self {
            NetHost::Tap(t) => t.as_raw_fd(),
            NetHost::Switch(s) => s.as_raw_fd(),
        }
    }

    /// Sends `frame`, which starts with a virtio-net header.
    fn send(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        match self {
            NetHost::Tap(t) => t.write(frame),
            NetHost::Switch(s) => s.send_frame(&frame[VNET_HDR_LEN..]),
        }
    }

    /// Receives a frame into `buf` behind a virtio-net header; returns the length with it.
    fn recv(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            NetHost::Tap(t) => t.read(buf),
            NetHost::Switch(s) => {
                buf[..VNET_HDR_LEN].fill(0);
                s.recv_frame(&mut buf[VNET_HDR_LEN..]).map(|n| n + VNET_HDR_LEN)
            }
        }
    }
}

/// Tells the network where the guest is after it moved here, as QEMU's self-announce does:
/// RARP frames from the guest's MAC on the interface's new port, so that bridges and switches
/// learn the port at once rather than when the guest next sends.
pub struct Announcer {
    host: NetHost,
    mac: [u8; 6],
}

impl Announcer {
    /// The RARP request QEMU announces with, padded to the 60-byte minimum, behind a virtio-net
    /// header.
    fn frame(mac: [u8; 6]) -> Vec<u8> {
        let mut frame = vec![0u8; VNET_HDR_LEN + 60];
        let eth = &mut frame[VNET_HDR_LEN..];
        eth[0..6].fill(0xff);
        eth[6..12].copy_from_slice(&mac);
        eth[12..14].copy_from_slice(&0x8035u16.to_be_bytes());
        // Ethernet hardware, IPv4 protocol, 6- and 4-byte addresses, reverse request.
        eth[14..22].copy_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 3]);
        eth[22..28].copy_from_slice(&mac);
        eth[32..38].copy_from_slice(&mac);
        frame
    }

    /// Sends one announcement.
    pub fn announce(&mut self) -> std::io::Result<()> {
        self.host.send(&Self::frame(self.mac)).map(|_| ())
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }
}

pub struct Net {
    /// The host side of each queue pair: one, or a multi-queue TAP's queues.
    hosts: Vec<NetHost>,
    queue_sizes: Vec<u16>,
    mac: [u8; 6],
    /// MMDS's address, when MMDS answers on this interface.
    mmds: Option<Ipv4Addr>,
    mtu: Option<u16>,
    firewall: Option<Arc<Firewall>>,
    metrics: Arc<DeviceMetrics>,
    rx_limit: Option<RateLimit>,
    tx_limit: Option<RateLimit>,
    poll: std::time::Duration,
    /// The running workers, one per queue pair, with the device queue indices each serves.
    workers: Vec<(Vec<usize>, Worker)>,
    /// Queues no worker serves (pairs the driver did not negotiate), kept for quiesce.
    idle: Vec<(usize, Queue)>,
    /// The pairs in use, while the driver has negotiated VIRTIO_NET_F_MQ.
    pairs: Option<Arc<QueuePairs>>,
    /// The pairs in use when the device was quiesced or snapshotted, for the next activation.
    restored_pairs: Option<usize>,
    /// The configuration's status: link up, and an announcement asked of the driver until it
    /// acknowledges it on the control queue (shared with the worker that serves that queue).
    status: Arc<AtomicU16>,
    /// The driver's features, once it started the device.
    acked: u64,
}

impl Net {
    pub fn new(host: NetHost, mac: [u8; 6]) -> Net {
        Net::with_queue_pairs(vec![host], mac)
    }

    /// An interface with one queue pair per host side in `hosts` (more than one: a multi-queue
    /// TAP's queues), offering VIRTIO_NET_F_MQ when there are several.
    pub fn with_queue_pairs(hosts: Vec<NetHost>, mac: [u8; 6]) -> Net {
        assert!(!hosts.is_empty(), "an interface has a host side");
        let mut queue_sizes = vec![QUEUE_SIZE; 2 * hosts.len()];
        queue_sizes.push(CTRL_QUEUE_SIZE);
        Net {
            hosts,
            queue_sizes,
            mac,
            mmds: None,
            mtu: None,
            firewall: None,
            metrics: Arc::default(),
            rx_limit: None,
            tx_limit: None,
            poll: std::time::Duration::ZERO,
            workers: Vec::new(),
            idle: Vec::new(),
            pairs: None,
            restored_pairs: None,
            status: Arc::new(AtomicU16::new(VIRTIO_NET_S_LINK_UP as u16)),
            acked: 0,
        }
    }

    /// Answers MMDS requests to `ip` on this interface (Firecracker's `network_interfaces` of
    /// `/mmds/config`).
    /// Tells the guest its MTU (VIRTIO_NET_F_MTU).
    pub fn with_mtu(mut self, mtu: Option<u16>) -> Net {
        self.mtu = mtu;
        self
    }

    /// Has the worker poll the queues and the host side for up to `poll_us` after work.
    /// How long the worker polls after work.
    pub fn polling(&self) -> std::time::Duration {
        self.poll
    }

    pub fn with_polling(mut self, poll_us: u32) -> Net {
        self.poll = std::time::Duration::from_micros(u64::from(poll_us));
        self
    }

    /// Puts `firewall` on the port: both directions go through it.
    pub fn with_firewall(mut self, firewall: Option<Arc<Firewall>>) -> Net {
        self.firewall = firewall;
        self
    }

    pub fn with_mmds(mut self, ip: Option<Ipv4Addr>) -> Net {
        self.mmds = ip;
        self
    }

    /// The first queue pair's frame handling on its own, for a host other than the device's
    /// worker (a vhost-user back-end): queue 0 receives, queue 1 transmits, and the host side
    /// (`host_fd`) is read when it is ready. `acked` are the driver's features.
    pub fn server(&self, acked: u64) -> std::io::Result<Box<dyn Backend>> {
        let host = self.hosts.first().ok_or_else(|| std::io::Error::other("the interface has no host side"))?;
        if let NetHost::Tap(tap) = host {
            let offload = if acked & bit(VIRTIO_NET_F_GUEST_CSUM) != 0 { TUN_F_CSUM } else { 0 };
            tap.set_offload(offload).map_err(|e| std::io::Error::other(format!("TAP offload: {e}")))?;
        }
        Ok(Box::new(NetBackend {
            rx_limiter: RateLimiter::for_limit(self.rx_limit)?,
            tx_limiter: RateLimiter::for_limit(self.tx_limit)?,
            mmds: self.mmds.map(MmdsStack::new),
            firewall: self.firewall.clone(),
            ..NetBackend::new(host.try_clone()?, acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0, self.metrics.clone())
        }))
    }

    /// What announces the guest on this interface's port after a migration.
    pub fn announcer(&self) -> std::io::Result<Announcer> {
        let host = self.hosts.first().ok_or_else(|| std::io::Error::other("the interface has no host side"))?;
        Ok(Announcer { host: host.try_clone()?, mac: self.mac })
    }

    /// The host side's fd (a TAP's or a switch port's), to wait on beside the queues.
    pub fn host_fd(&self) -> Option<RawFd> {
        self.hosts.first().map(NetHost::raw_fd)
    }

    /// Limits what the guest receives and sends (Firecracker's rx/tx `rate_limiter`).
    pub fn with_rate_limits(mut self, rx: Option<RateLimit>, tx: Option<RateLimit>) -> Net {
        self.rx_limit = rx;
        self.tx_limit = tx;
        self
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn features(&self) -> u64 {
        // The control queue takes the pair count and the driver's acknowledgement of an
        // announcement (after a migration).
        let mut base = F_VERSION_1
            | F_RING_INDIRECT_DESC
            | F_RING_EVENT_IDX
            | bit(VIRTIO_NET_F_MAC)
            | bit(VIRTIO_NET_F_MRG_RXBUF)
            | bit(VIRTIO_NET_F_STATUS)
            | bit(VIRTIO_NET_F_CTRL_VQ)
            | bit(VIRTIO_NET_F_GUEST_ANNOUNCE);
        if self.mtu.is_some() {
            base |= bit(VIRTIO_NET_F_MTU);
        }
        if self.hosts.len() > 1 {
            base |= bit(VIRTIO_NET_F_MQ);
        }
        match self.hosts[0] {
            // The TAP completes partial checksums both ways; the switch moves bare frames.
            NetHost::Tap(_) => base | bit(VIRTIO_NET_F_CSUM) | bit(VIRTIO_NET_F_GUEST_CSUM),
            NetHost::Switch(_) => base,
        }
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac, status, max_virtqueue_pairs and mtu.
        let mut config = [0u8; 12];
        config[..6].copy_from_slice(&self.mac);
        config[6..8].copy_from_slice(&self.status.load(Ordering::SeqCst).to_le_bytes());
        config[8..10].copy_from_slice(&(self.hosts.len() as u16).to_le_bytes());
        config[10..12].copy_from_slice(&self.mtu.unwrap_or(0).to_le_bytes());
        read_config_bytes(&config, offset, data);
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let acked = activation.acked_features;
        for host in &self.hosts {
            if let NetHost::Tap(tap) = host {
                // The guest completes partial checksums only if it said so.
                let offload = if acked & bit(VIRTIO_NET_F_GUEST_CSUM) != 0 { TUN_F_CSUM } else { 0 };
                tap.set_offload(offload).map_err(|e| ActivateError::Backend(format!("TAP offload: {e}")))?;
            }
        }
        let offered = self.hosts.len();
        let multi_queue = offered > 1 && acked & bit(VIRTIO_NET_F_MQ) != 0;
        let control = acked & bit(VIRTIO_NET_F_CTRL_VQ) != 0;
        self.acked = acked;
        // The control queue follows the pairs the driver negotiated: 2N with MQ, else 2.
        let control_index = if multi_queue { 2 * offered } else { 2 };
        let serving = if multi_queue { offered } else { 1 };
        let Activation { mem, queues, queue_events, interrupt, acked_features } = activation;
        if queues.len() != self.queue_sizes.len() || queue_events.len() != queues.len() {
            return Err(ActivateError::QueueCount { want: self.queue_sizes.len(), got: queues.len() });
        }
        self.pairs = None;
        let restored = self.restored_pairs.take();
        if offered > 1 {
            let pairs = QueuePairs::new(&self.hosts, &queue_events).map_err(ActivateError::Worker)?;
            // Until the driver says otherwise (VQ_PAIRS_SET) it uses the first pair only, and a
            // driver without multi-queue never uses another: the kernel must steer to it alone.
            let active = if multi_queue { restored.unwrap_or(1).clamp(1, offered) } else { 1 };
            pairs.set_active(active).map_err(|e| ActivateError::Backend(format!("TAP queues: {e}")))?;
            self.pairs = multi_queue.then(|| Arc::new(pairs));
        }
        let mut queues: Vec<Option<Queue>> = queues.into_iter().map(Some).collect();
        let mut events: Vec<Option<EventFd>> = queue_events.into_iter().map(Some).collect();
        for pair in 0..serving {
            let mut indices = vec![2 * pair, 2 * pair + 1];
            if pair == 0 && control {
                indices.push(control_index);
            }
            let own_queues: Vec<Queue> = indices.iter().filter_map(|&i| queues[i].take()).collect();
            let own_events: Vec<EventFd> = indices.iter().filter_map(|&i| events[i].take()).collect();
            let host = self.hosts[pair].try_clone().map_err(ActivateError::Worker)?;
            let backend = NetBackend {
                pair,
                pairs: self.pairs.clone(),
                rx_limiter: RateLimiter::for_limit(self.rx_limit).map_err(ActivateError::Worker)?,
                tx_limiter: RateLimiter::for_limit(self.tx_limit).map_err(ActivateError::Worker)?,
                mmds: self.mmds.map(MmdsStack::new),
                firewall: self.firewall.clone(),
                announcing: (acked & bit(VIRTIO_NET_F_GUEST_ANNOUNCE) != 0).then(|| self.status.clone()),
                ..NetBackend::new(host, acked & bit(VIRTIO_NET_F_MRG_RXBUF) != 0, self.metrics.clone())
            };
            // The worker's queues are some of the device's: its interrupts name theirs.
            let interrupt = Arc::new(SubsetInterrupt { device: interrupt.clone(), indices: indices.clone() });
            let activation = Activation {
                mem: mem.clone(),
                queues: own_queues,
                queue_events: own_events,
                interrupt,
                acked_features,
            };
            let worker = Worker::spawn_polling(sandbox::ThreadKind::Net, backend, activation, self.poll)
                .map_err(ActivateError::Worker)?;
            self.workers.push((indices, worker));
        }
        self.idle = queues.into_iter().enumerate().filter_map(|(i, q)| Some((i, q?))).collect();
        Ok(())
    }
    fn quiesce(&mut self) -> Option<Vec<Queue>> {
        if self.workers.is_empty() {
            return None;
        }
        // Activated again where it stood (after a snapshot, a rate-limit change), the device
        // keeps the pairs the driver set.
        self.restored_pairs = self.pairs.as_ref().map(|p| p.active());
        let mut all = std::mem::take(&mut self.idle);
        let mut complete = true;
        for (indices, mut worker) in self.workers.drain(..) {
            match worker.stop() {
                Some(queues) => all.extend(indices.into_iter().zip(queues)),
                None => complete = false,
            }
        }
        all.sort_by_key(|(i, _)| *i);
        complete.then(|| all.into_iter().map(|(_, q)| q).collect())
    }
    fn reset(&mut self) {
        self.workers.clear();
        self.idle.clear();
        self.pairs = None;
        self.restored_pairs = None;
        self.acked = 0;
        self.status.store(VIRTIO_NET_S_LINK_UP as u16, Ordering::SeqCst);
    }
    fn announce(&mut self) -> bool {
        let wanted = bit(VIRTIO_NET_F_GUEST_ANNOUNCE) | bit(VIRTIO_NET_F_CTRL_VQ);
        if self.acked & wanted != wanted {
            return false;
        }
        self.status.fetch_or(VIRTIO_NET_S_ANNOUNCE as u16, Ordering::SeqCst);
        true
    }
    fn update_rate_limits(
        &mut self,
        rx: Option<Option<RateLimit>>,
        tx: Option<Option<RateLimit>>,
    ) -> Result<(), String> {
        if self.hosts.len() > 1 && (rx.flatten().is_some() || tx.flatten().is_some()) {
            return Err(format!(
                "this interface has {} queue pairs, and rate limits need the whole interface in one (queues=1)",
                self.hosts.len()
            ));
        }
        if let Some(rx) = rx {
            self.rx_limit = rx;
        }
        if let Some(tx) = tx {
            self.tx_limit = tx;
        }
        Ok(())
    }
    fn metrics(&self) -> Option<Arc<DeviceMetrics>> {
        Some(self.metrics.clone())
    }
    fn save_state(&self) -> serde_json::Value {
        match &self.pairs {
            Some(pairs) => serde_json::json!({ "queue_pairs": pairs.active() }),
            None => serde_json::Value::Null,
        }
    }
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        // Checked against the pairs offered when the device activates.
        self.restored_pairs = state.get("queue_pairs").and_then(serde_json::Value::as_u64).map(|n| n as usize);
        Ok(())
    }
}

/// The queue pairs of a multi-queue TAP, shared by the pairs' workers: how many the driver
/// uses, each pair's TAP queue (attached only while its pair is in use, so that the kernel
/// steers nothing to a pair the driver does not read), and each pair's receive notifier (to
/// wake a worker whose TAP queue was attached while it slept).
struct QueuePairs {
    active: AtomicUsize,
    taps: Vec<Tap>,
    wake: Vec<EventFd>,
}

impl QueuePairs {
    fn new(hosts: &[NetHost], queue_events: &[EventFd]) -> std::io::Result<QueuePairs> {
        let mut taps = Vec::with_capacity(hosts.len());
        let mut wake = Vec::with_capacity(hosts.len());
        for (pair, host) in hosts.iter().enumerate() {
            let NetHost::Tap(tap) = host else {
                return Err(std::io::Error::other("only a TAP has several queue pairs"));
            };
            taps.push(tap.try_clone()?);
            wake.push(queue_events[2 * pair].try_clone()?);
        }
        Ok(QueuePairs { active: AtomicUsize::new(1), taps, wake })
    }

    fn active(&self) -> usize {
        self.active.load(Ordering::SeqCst)
    }

    /// Uses the first `n` pairs: their TAP queues attached, the others' detached.
    fn set_active(&self, n: usize) -> std::io::Result<()> {
        for (pair, tap) in self.taps.iter().enumerate() {
            match tap.set_queue_attached(pair < n) {
                // EINVAL: it already was.
                Err(e) if e.raw_os_error() != Some(libc::EINVAL) => return Err(e),
                _ => {}
            }
        }
        let before = self.active.swap(n, Ordering::SeqCst);
        for wake in self.wake.iter().take(n).skip(before) {
            let _ = wake.write(1);
        }
        Ok(())
    }
}

/// Answers a control queue command (class, command, data) with VIRTIO_NET_OK or
/// VIRTIO_NET_ERR. `offered` is the pair count when the driver negotiated multi-queue, and
/// `use_pairs` puts a valid VQ_PAIRS_SET into effect. `announcing` is the configuration's
/// status when the driver negotiated announcements: its acknowledgement clears the request.
fn control_command(
    command: &[u8],
    offered: Option<usize>,
    announcing: Option<&AtomicU16>,
    use_pairs: impl FnOnce(usize) -> std::io::Result<()>,
) -> u8 {
    let (mq, set) = (VIRTIO_NET_CTRL_MQ as u8, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET as u8);
    let (announce, ack) = (VIRTIO_NET_CTRL_ANNOUNCE as u8, VIRTIO_NET_CTRL_ANNOUNCE_ACK as u8);
    if let ([class, cmd, ..], Some(status)) = (command, announcing)
        && (*class, *cmd) == (announce, ack)
    {
        let before = status.fetch_and(!(VIRTIO_NET_S_ANNOUNCE as u16), Ordering::SeqCst);
        if before & VIRTIO_NET_S_ANNOUNCE as u16 != 0 {
            crate::guest_event!("virtio-net: the driver announced the interface on its new port");
        }
        return VIRTIO_NET_OK as u8;
    }
    match (command, offered) {
        ([class, cmd, lo, hi, ..], Some(offered)) if (*class, *cmd) == (mq, set) => {
            let n = usize::from(u16::from_le_bytes([*lo, *hi]));
            if !(1..=offered).contains(&n) {
                crate::guest_fault!("virtio-net: the driver asked for {n} queue pairs where the device has {offered}");
                return VIRTIO_NET_ERR as u8;
            }
            match use_pairs(n) {
                Ok(()) => {
                    crate::guest_event!("virtio-net: the driver uses {n} queue pairs");
                    VIRTIO_NET_OK as u8
                }
                Err(e) => {
                    tracing::warn!("virtio-net: the TAP's queues cannot follow the driver's {n} pairs ({e})");
                    VIRTIO_NET_ERR as u8
                }
            }
        }
        _ => {
            let (class, cmd) = (command.first().copied(), command.get(1).copied());
            crate::guest_fault!(
                "virtio-net: refused control command {class:?}/{cmd:?}, which the device does not offer"
            );
            VIRTIO_NET_ERR as u8
        }
    }
}

struct NetBackend {
    host: NetHost,
    /// Which queue pair this worker serves.
    pair: usize,
    /// The pairs in use, with a multi-queue TAP.
    pairs: Option<Arc<QueuePairs>>,
    mergeable: bool,
    /// The frame being moved, header included.
    frame: Vec<u8>,
    /// The frame being sent: apart from `frame`, which may hold a received frame that waits
    /// for guest buffers while the guest transmits.
    tx_frame: Vec<u8>,
    /// Length of a frame read from the TAP that found no guest buffer yet.
    deferred: Option<usize>,
    /// No receive buffers: the TAP is left unread until the guest adds some.
    rx_waiting: bool,
    metrics: Arc<DeviceMetrics>,
    rx_limiter: Option<RateLimiter>,
    tx_limiter: Option<RateLimiter>,
    /// The metadata service, when this interface carries it: frames to its address stop here.
    mmds: Option<MmdsStack>,
    /// The port's firewall: frames it refuses never reach the host side or the guest.
    firewall: Option<Arc<Firewall>>,
    /// The configuration's status, when the driver negotiated announcements.
    announcing: Option<Arc<AtomicU16>>,
}

/// Copies `data` into the writable buffers of `chain`; returns the bytes written and the
/// address of the first buffer when it is large enough for the whole header.
fn write_chain(mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>, data: &[u8]) -> (usize, Option<u64>) {
    let mut done = 0;
    let mut first = None;
    for (i, desc) in chain.writable().enumerate() {
        // The header's num_buffers is patched later: only where the first buffer holds it.
        if i == 0 && desc.len() as usize >= VNET_HDR_LEN {
            first = Some(desc.addr().0);
        }
        if done == data.len() {
            break;
        }
        let n = (desc.len() as usize).min(data.len() - done);
        if mem.write_slice(&data[done..done + n], desc.addr()).is_err() {
            crate::guest_fault!("virtio-net: a receive buffer lies outside guest RAM");
            break;
        }
        done += n;
    }
    (done, first)
}

impl NetBackend {
    /// A back-end for the first pair, with no limits, MMDS or firewall.
    fn new(host: NetHost, mergeable: bool, metrics: Arc<DeviceMetrics>) -> NetBackend {
        NetBackend {
            host,
            pair: 0,
            pairs: None,
            mergeable,
            frame: vec![0; MAX_TAP_READ],
            tx_frame: vec![0; VNET_HDR_LEN + MAX_FRAME],
            deferred: None,
            rx_waiting: false,
            metrics,
            rx_limiter: None,
            tx_limiter: None,
            mmds: None,
            firewall: None,
            announcing: None,
        }
    }

    fn transmit(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let (host, frame, metrics, limiter) = (&mut self.host, &mut self.tx_frame, &self.metrics, &mut self.tx_limiter);
        let mmds = &mut self.mmds;
        let firewall = &self.firewall;
        let used = serve_queue_limited(
            "virtio-net",
            &mut queues[TX_QUEUE],
            mem,
            || true,
            |chain| {
                let mut len = 0usize;
                for desc in chain.readable() {
                    let n = desc.len() as usize;
                    if len + n > VNET_HDR_LEN + MAX_FRAME {
                        crate::guest_fault!("virtio-net: dropped a frame longer than the MTU allows");
                        metrics.error();
                        return Some(0);
                    }
                    if mem.read_slice(&mut frame[len..len + n], desc.addr()).is_err() {
                        crate::guest_fault!("virtio-net: dropped a frame whose buffer lies outside guest RAM");
                        metrics.error();
                        return Some(0);
                    }
                    len += n;
                }
                if len < VNET_HDR_LEN + 14 {
                    crate::guest_fault!(
                        "virtio-net: dropped a frame of {len} bytes, too short for a header and Ethernet"
                    );
                    metrics.error();
                    return Some(0);
                }
                if let Some(mmds) = mmds.as_mut()
                    && mmds.wants(&frame[VNET_HDR_LEN..len])
                {
                    mmds.receive(&frame[VNET_HDR_LEN..len]);
                    metrics.request(0, (len - VNET_HDR_LEN) as u64);
                    return Some(0);
                }
                if let Some(fw) = firewall
                    && !fw.outbound(&frame[VNET_HDR_LEN..len])
                {
                    DeviceMetrics::add(&metrics.firewall_dropped, 1);
                    return Some(0);
                }
                // A frame the rate limiter cannot pay for yet goes back to the ring.
                if let Some(limiter) = limiter.as_mut()
                    && !limiter.consume((len - VNET_HDR_LEN) as u64)
                {
                    DeviceMetrics::add(&metrics.rate_limited, 1);
                    return None;
                }
                match host.send(&frame[..len]) {
                    Ok(_) => metrics.request(0, (len - VNET_HDR_LEN) as u64),
                    Err(e) => {
                        crate::guest_fault!("virtio-net: the host side refused a frame ({e})");
                        metrics.error();
                    }
                }
                Some(0)
            },
        );
        // MMDS answers go straight to the receive queue.
        let answered = self.mmds.as_ref().is_some_and(|m| m.peek().is_some()) && self.receive(queues, mem);
        used || answered
    }

    /// Puts the frame in `self.frame[..len]` into guest receive buffers; false when the guest
    /// has too few.
    fn deliver(&mut self, len: usize, rx: &mut Queue, mem: &GuestMemory) -> bool {
        deliver(&self.frame[..len], self.mergeable, rx, mem)
    }

    /// Delivers what MMDS has for the guest; false when the guest has no buffer for it (the
    /// frame waits for one).
    fn deliver_mmds(&mut self, rx: &mut Queue, mem: &GuestMemory) -> bool {
        let Some(mmds) = self.mmds.as_mut() else { return true };
        while let Some(out) = mmds.peek() {
            let mut frame = vec![0u8; VNET_HDR_LEN + out.len()];
            frame[VNET_HDR_LEN..].copy_from_slice(out);
            let delivered = out.len() as u64;
            if !deliver(&frame, self.mergeable, rx, mem) {
                return false;
            }
            mmds.pop();
            self.metrics.request(delivered, 0);
        }
        true
    }

    /// Whether the driver uses this worker's pair: a pair it does not has its TAP queue
    /// detached, which is neither read nor watched.
    fn pair_in_use(&self) -> bool {
        self.pairs.as_ref().is_none_or(|p| self.pair < p.active())
    }

    /// Answers the driver's control commands (only VQ_PAIRS_SET is offered).
    fn control(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let Some(queue) = queues.get_mut(CTRL_QUEUE) else { return false };
        let (pairs, announcing) = (self.pairs.clone(), self.announcing.clone());
        serve_queue("virtio-net", queue, mem, |chain| {
            // class, command and a 16-bit argument; the status goes in the first writable byte.
            let (mut command, mut got, mut status_at) = ([0u8; 4], 0usize, None);
            for desc in chain {
                if desc.is_write_only() {
                    status_at = status_at.or((desc.len() > 0).then(|| desc.addr()));
                } else if got < command.len() {
                    let n = (desc.len() as usize).min(command.len() - got);
                    if mem.read_slice(&mut command[got..got + n], desc.addr()).is_err() {
                        crate::guest_fault!("virtio-net: a control command lies outside guest RAM");
                        return 0;
                    }
                    got += n;
                }
            }
            let offered = pairs.as_ref().map(|p| p.taps.len());
            let status = control_command(&command[..got], offered, announcing.as_deref(), |n| match &pairs {
                Some(pairs) => pairs.set_active(n),
                None => Ok(()),
            });
            match status_at.map(|at| mem.write_obj(status, at)) {
                Some(Ok(())) => 1,
                _ => {
                    crate::guest_fault!("virtio-net: a control command has no writable status byte in guest RAM");
                    0
                }
            }
        })
    }

    fn receive(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        if !self.pair_in_use() {
            return false;
        }
        let rx = &mut queues[RX_QUEUE];
        if !rx.ready() {
            // Nowhere to put a frame: leave the host side unread until the driver sets the
            // queue up and notifies it, or a ready host fd would wake the worker forever.
            self.rx_waiting = true;
            return false;
        }
        let pending_mmds = self.mmds.as_ref().is_some_and(|m| m.peek().is_some());
        if !self.deliver_mmds(rx, mem) {
            self.rx_waiting = true;
            return false;
        }
        let mut used = pending_mmds;
        for _ in 0..BUDGET {
            // A deferred frame passed the firewall already.
            let (len, fresh) = match self.deferred.take() {
                Some(len) => (len, false),
                None => match self.host.recv(&mut self.frame) {
                    Ok(len) => (len, true),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => {
                        crate::guest_fault!("virtio-net: reading the host side failed ({e})");
                        break;
                    }
                },
            };
            if len < VNET_HDR_LEN {
                continue;
            }
            if fresh
                && let Some(fw) = &self.firewall
                && !fw.inbound(&self.frame[VNET_HDR_LEN..len])
            {
                DeviceMetrics::add(&self.metrics.firewall_dropped, 1);
                continue;
            }
            if let Some(limiter) = self.rx_limiter.as_mut()
                && !limiter.consume((len - VNET_HDR_LEN) as u64)
            {
                // The frame waits for the limiter's timer; the TAP is left unread meanwhile.
                DeviceMetrics::add(&self.metrics.rate_limited, 1);
                self.deferred = Some(len);
                break;
            }
            if !self.deliver(len, rx, mem) {
                self.deferred = Some(len);
                self.rx_waiting = true;
                break;
            }
            self.rx_waiting = false;
            self.metrics.request((len - VNET_HDR_LEN) as u64, 0);
            used = true;
        }
        used && rx.needs_notification(mem).unwrap_or(true)
    }
}

/// Puts `frame` (a virtio-net header and the frame) into guest receive buffers; false when
/// the guest has too few.
fn deliver(frame: &[u8], mergeable: bool, rx: &mut Queue, mem: &GuestMemory) -> bool {
    let len = frame.len();
    let mut heads: Vec<(u16, u32)> = Vec::new();
    let mut header_at = None;
    let mut done = 0;
    while done < len {
        let chain = match rx.iter(mem) {
            Ok(mut iter) => iter.next(),
            Err(e) => {
                crate::guest_fault!(
                    "virtio-net: the driver corrupted the receive queue ({e}); it is ignored until a reset"
                );
                rx.set_ready(false);
                return false;
            }
        };
        let Some(chain) = chain else { break };
        let head = chain.head_index();
        let (written, first) = write_chain(mem, chain, &frame[done..len]);
        if heads.is_empty() {
            header_at = first.filter(|_| written >= VNET_HDR_LEN);
        }
        heads.push((head, written as u32));
        done += written;
        if !mergeable || written == 0 {
            break;
        }
    }
    if heads.is_empty() {
        return false;
    }
    if done < len {
        // Not enough buffers: without mergeable buffers the frame is cut short, as the
        // driver asked for; with them, the partial frame is returned empty.
        tracing::debug!("virtio-net: a {len}-byte frame did not fit the guest's buffers");
    }
    // num_buffers lives in the header, at the start of the first chain's first buffer
    // (1 without mergeable buffers, as the specification asks).
    if let Some(at) = header_at.and_then(|a| a.checked_add(NUM_BUFFERS_OFFSET as u64)) {
        let _ = mem.write_slice(&(heads.len() as u16).to_le_bytes(), GuestAddress(at));
    }
    for (head, written) in heads {
        if let Err(e) = rx.add_used(mem, head, written) {
            crate::guest_fault!("virtio-net: cannot return receive descriptor {head} ({e})");
        }
    }
    true
}

impl Backend for NetBackend {
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        match index {
            TX_QUEUE => self.transmit(queues, mem),
            CTRL_QUEUE => self.control(queues, mem),
            _ => {
                // New receive buffers: deliver what waited, and read the TAP again.
                self.rx_waiting = false;
                self.receive(queues, mem)
            }
        }
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        let rx_blocked = waiting_timer(&self.rx_limiter);
        let mut fds: Vec<RawFd> = rx_blocked.into_iter().chain(waiting_timer(&self.tx_limiter)).collect();
        // With no receive buffers, or receiving rate-limited, the TAP is left unread: frames
        // wait in its queue.
        if !self.rx_waiting && rx_blocked.is_none() && self.pair_in_use() {
            fds.push(self.host.raw_fd());
        }
        fds
    }

    fn process_fd(&mut self, fd: RawFd, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let timer_of = |l: &Option<RateLimiter>| l.as_ref().map(RateLimiter::timer_fd);
        if timer_of(&self.tx_limiter) == Some(fd) {
            timer_fired(&mut self.tx_limiter);
            return self.transmit(queues, mem);
        }
        if timer_of(&self.rx_limiter) == Some(fd) {
            timer_fired(&mut self.rx_limiter);
        }
        self.receive(queues, mem)
    }
}

/// The worker's work for the fuzzer, over a receive and a transmit queue in `mem`. The first
/// `script` byte says whether mergeable buffers were negotiated (bit 0) and MMDS answers on the
/// interface (bit 1); each next byte notifies the
/// receive queue (0), the transmit queue (1), the control queue (3, when `queues` has a third),
/// or (2) brings a frame from the host side whose length (times 6) and content the following
/// bytes give.
#[doc(hidden)]
pub fn fuzz_queues(mem: &GuestMemory, queues: &mut [Queue], script: &[u8]) {
    let Ok((vm_side, outside)) = SwitchPort::pair() else { return };
    let Some((&options, mut rest)) = script.split_first() else { return };
    let host_fd = vm_side.as_raw_fd();
    let mut backend = NetBackend {
        // MMDS on the interface for half of the inputs: its stack takes what the guest sends it.
        mmds: (options & 2 != 0).then(|| MmdsStack::new(net::mmds::DEFAULT_IPV4)),
        ..NetBackend::new(NetHost::Switch(vm_side), options & 1 != 0, Arc::default())
    };
    let mut sent = vec![0u8; MAX_TAP_READ];
    while let [op, tail @ ..] = rest {
        rest = tail;
        match op % 4 {
            0 => backend.process_queue(RX_QUEUE, queues, mem),
            1 => backend.process_queue(TX_QUEUE, queues, mem),
            3 => backend.process_queue(CTRL_QUEUE, queues, mem),
            _ => {
                let [len, content @ ..] = rest else { break };
                let frame: Vec<u8> =
                    content.iter().copied().chain(std::iter::repeat(0)).take(usize::from(*len) * 6).collect();
                rest = &content[content.len().min(8)..];
                let _ = outside.send_frame(&frame);
                backend.process_fd(host_fd, queues, mem)
            }
        };
        // What the guest sent reaches the host side whole and no longer than the MTU allows.
        while let Ok(n) = outside.recv_frame(&mut sent) {
            assert!((14..=MAX_FRAME).contains(&n), "a {n}-byte frame left the guest");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backend(host: NetHost) -> NetBackend {
        NetBackend::new(host, false, Arc::default())
    }

    /// A frame from the host side that waits for guest receive buffers is delivered as it
    /// came, even when the guest transmits meanwhile (the two used to share one buffer, and
    /// the guest received its own frame instead).
    #[test]
    fn a_frame_waiting_for_receive_buffers_survives_a_transmission() {
        use virtio_queue::desc::RawDescriptor;
        use virtio_queue::desc::split::Descriptor as SplitDescriptor;
        use virtio_queue::mock::MockSplitQueue;
        let (vm_side, outside) = SwitchPort::pair().unwrap();
        let mut backend = backend(NetHost::Switch(vm_side));
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rx_ring = MockSplitQueue::create(&mem, GuestAddress(0x1000), 16);
        let tx_ring = MockSplitQueue::create(&mem, GuestAddress(0x4000), 16);
        let mut queues: Vec<Queue> = vec![rx_ring.create_queue().unwrap(), tx_ring.create_queue().unwrap()];
        // The host sends 0xaa frames; no receive buffer yet, so the first waits.
        outside.send_frame(&[0xaa; 60]).unwrap();
        let fd = backend.host.raw_fd();
        backend.process_fd(fd, &mut queues, &mem);
        assert!(backend.deferred.is_some());
        // The guest sends a 0xbb frame.
        mem.write_slice(&[0u8; VNET_HDR_LEN], GuestAddress(0x8_0000)).unwrap();
        mem.write_slice(&[0xbb; 60], GuestAddress(0x8_0000 + VNET_HDR_LEN as u64)).unwrap();
        let tx = SplitDescriptor::new(0x8_0000, (VNET_HDR_LEN + 60) as u32, 0, 0);
        tx_ring.add_desc_chains(&[RawDescriptor::from(tx)], 0).unwrap();
        backend.process_queue(TX_QUEUE, &mut queues, &mem);
        let mut sent = [0u8; 128];
        assert_eq!(outside.recv_frame(&mut sent).unwrap(), 60);
        // Now a receive buffer: it gets the host's frame.
        let flags = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
        let rx = SplitDescriptor::new(0x9_0000, 2048, flags, 0);
        rx_ring.add_desc_chains(&[RawDescriptor::from(rx)], 0).unwrap();
        backend.process_queue(RX_QUEUE, &mut queues, &mem);
        let mut got = [0u8; 60];
        mem.read_slice(&mut got, GuestAddress(0x9_0000 + VNET_HDR_LEN as u64)).unwrap();
        assert_eq!(got, [0xaa; 60]);
    }

    /// VQ_PAIRS_SET takes 1 to the pairs offered and nothing else; other commands, short ones
    /// and commands without multi-queue are refused, and none of those touch the TAP.
    #[test]
    fn control_commands_set_only_the_pairs_the_device_has() {
        let (ok, err) = (VIRTIO_NET_OK as u8, VIRTIO_NET_ERR as u8);
        let mut applied = Vec::new();
        let mut run = |command: &[u8], offered| {
            control_command(command, offered, None, |n| {
                applied.push(n);
                Ok(())
            })
        };
        assert_eq!(run(&[4, 0, 2, 0], Some(4)), ok);
        assert_eq!(run(&[4, 0, 4, 0], Some(4)), ok);
        assert_eq!(run(&[4, 0, 5, 0], Some(4)), err);
        assert_eq!(run(&[4, 0, 0, 0], Some(4)), err);
        assert_eq!(run(&[4, 0, 0, 1], Some(4)), err, "256 pairs");
        assert_eq!(run(&[4, 0, 2], Some(4)), err, "a command cut short");
        assert_eq!(run(&[4, 1, 2, 0], Some(4)), err, "RSS configuration is not offered");
        assert_eq!(run(&[0, 0, 1, 0], Some(4)), err, "receive filtering is not offered");
        assert_eq!(run(&[4, 0, 1, 0], None), err, "no multi-queue negotiated");
        assert_eq!(run(&[], Some(4)), err);
        assert_eq!(applied, [2, 4]);
        let failing = control_command(&[4, 0, 2, 0], Some(2), None, |_| Err(std::io::Error::other("detached")));
        assert_eq!(failing, err, "a TAP that cannot follow is the driver's error too");
    }

    /// An announcement is asked of the driver only once it negotiated it; its acknowledgement
    /// on the control queue clears the request, and without the feature the command is refused.
    #[test]
    fn the_driver_acknowledges_an_announcement_it_negotiated() {
        let (vm_side, _outside) = SwitchPort::pair().unwrap();
        let mut net = Net::new(NetHost::Switch(vm_side), [2, 0, 0, 0, 0, 1]);
        let wanted = bit(VIRTIO_NET_F_GUEST_ANNOUNCE) | bit(VIRTIO_NET_F_CTRL_VQ) | bit(VIRTIO_NET_F_STATUS);
        assert_eq!(net.features() & wanted, wanted);
        assert!(!net.announce(), "no driver negotiated it yet");
        net.acked = wanted;
        assert!(net.announce());
        let mut status = [0u8; 2];
        net.read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status), (VIRTIO_NET_S_LINK_UP | VIRTIO_NET_S_ANNOUNCE) as u16);
        let ack = [VIRTIO_NET_CTRL_ANNOUNCE as u8, VIRTIO_NET_CTRL_ANNOUNCE_ACK as u8];
        let ok = VIRTIO_NET_OK as u8;
        assert_eq!(control_command(&ack, None, Some(&net.status), |_| Ok(())), ok);
        net.read_config(6, &mut status);
        assert_eq!(u16::from_le_bytes(status), VIRTIO_NET_S_LINK_UP as u16, "the request is cleared");
        assert_eq!(control_command(&ack, None, None, |_| Ok(())), VIRTIO_NET_ERR as u8);
    }

    /// A driver that starts the device without a ready receive queue: a frame waiting on the
    /// host side must not keep the worker's wait returning at once (100% of a core).
    #[test]
    fn a_frame_for_a_receive_queue_that_is_not_ready_leaves_the_host_side_unwatched() {
        let (vm_side, outside) = SwitchPort::pair().unwrap();
        let mut backend = backend(NetHost::Switch(vm_side));
        let fd = backend.host.raw_fd();
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut queues = vec![Queue::new(256).unwrap(), Queue::new(256).unwrap()];
        assert!(backend.extra_fds().contains(&fd));
        outside.send_frame(&[0xff; 60]).unwrap();
        assert!(!backend.process_fd(fd, &mut queues, &mem));
        assert!(!backend.extra_fds().contains(&fd), "the worker would wake for this fd again and again");
        // The driver's notification of the receive queue watches the host side again.
        backend.process_queue(RX_QUEUE, &mut queues, &mem);
        assert!(!backend.extra_fds().contains(&fd), "still not ready");
    }
}
