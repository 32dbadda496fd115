//! virtio-vsock with a host-side Unix socket muxer, as Firecracker's users know it:
//! - the host connects to the socket PATH and writes `CONNECT <port>\n`; once the guest accepts,
//!   it reads `OK <host port>\n` and the stream carries the connection;
//! - a guest connecting to the host (CID 2) on port P reaches a listener at `PATH_P`.

pub mod packet;

use std::collections::{HashMap, VecDeque};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::timerfd::TimerFd;

use crate::device::{ActivateError, Activation, VirtioDevice, read_config_bytes};
use crate::worker::{Backend, Worker, serve_queue_limited, serve_queue_while};
use crate::{F_RING_INDIRECT_DESC, F_VERSION_1, GuestMemory, TYPE_VSOCK};
use packet::*;

const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const EVENT_QUEUE: usize = 2;
/// virtio_vsock_event id: the guest must drop every connection (virtio 1.2, 5.10.6.7).
const EVENT_TRANSPORT_RESET: u32 = 0;
const QUEUE_SIZES: [u16; 3] = [256, 256, 256];
/// Receive space the VMM offers each connection (its buf_alloc).
const BUF_ALLOC: u32 = 256 << 10;
/// Payload per packet to the guest: its receive buffers hold 4 KiB.
const MAX_RX_PAYLOAD: usize = 4096;
/// Payload per packet from the guest the VMM accepts.
const MAX_TX_PAYLOAD: usize = 64 << 10;
/// Packets waiting for guest receive buffers before streams stop being read.
const RX_PENDING_MAX: usize = 256;
const MAX_CONNECTIONS: usize = 1024;
/// The most the device holds of the guest's data that host sockets have not taken, all
/// connections together; past it the guest's packets wait in the ring.
const MAX_BUFFERED: usize = 4 << 20;
/// Host ports handed to host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// How long a host connection may wait for its CONNECT line, then for the guest's answer
/// (Firecracker's figure).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

pub struct Vsock {
    guest_cid: u64,
    uds: PathBuf,
    /// Kept for the device's life; each worker serves a clone of it, so that a reset never
    /// binds the path again (and a vCPU thread, which activates devices, never needs to).
    listener: UnixListener,
    worker: Option<Worker>,
    /// Host connections were dropped (a snapshot stopped the device, or this is a restored
    /// device): the next activation tells the guest to drop its side too.
    reset_pending: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("guest CID {0} is reserved; use 3 or more (or 0, as Firecracker allows)")]
    Cid(u64),
    #[error("{0}")]
    Path(String),
    #[error("cannot listen on {path}: {source}")]
    Listen { path: String, source: std::io::Error },
}

impl Vsock {
    /// Listens on `uds` (replacing a stale socket, and nothing else) for host-initiated
    /// connections.
    pub fn new(guest_cid: u64, uds: &Path) -> Result<Vsock, VsockError> {
        if guest_cid == 1 || guest_cid == 2 || guest_cid > u64::from(u32::MAX) {
            return Err(VsockError::Cid(guest_cid));
        }
        sandbox::files::remove_stale_socket(uds, "uds_path").map_err(VsockError::Path)?;
        let listener = UnixListener::bind(uds)
            .and_then(|l| l.set_nonblocking(true).map(|()| l))
            .map_err(|source| VsockError::Listen { path: uds.display().to_string(), source })?;
        Ok(Vsock { guest_cid, uds: uds.into(), listener, worker: None, reset_pending: false })
    }
}

impl Drop for Vsock {
    fn drop(&mut self) {
        let _ = sandbox::files::remove_stale_socket(&self.uds, "uds_path");
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_RING_INDIRECT_DESC
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        // A reset drops every connection; the listener stays, and connections that arrived
        // meanwhile wait in its backlog for the new worker.
        let listener = self.listener.try_clone().map_err(|e| ActivateError::Backend(format!("vsock listener: {e}")))?;
        let backend = Muxer::new(self.guest_cid, self.uds.clone(), listener, std::mem::take(&mut self.reset_pending))
            .map_err(ActivateError::Worker)?;
        self.worker =
            Some(Worker::spawn(sandbox::ThreadKind::Vsock, backend, activation).map_err(ActivateError::Worker)?);
        Ok(())
    }
    /// The connections live in the worker and end with it, as in Firecracker: a snapshot
    /// resets them, and the guest hears of it (a transport reset event) when the device
    /// serves again, in this VM and in a restored one.
    fn quiesce(&mut self) -> Option<Vec<Queue>> {
        let queues = self.worker.take().and_then(|mut w| w.stop());
        self.reset_pending = true;
        queues
    }
    fn save_state(&self) -> serde_json::Value {
        serde_json::json!({ "connections_reset": true })
    }
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        self.reset_pending = true;
        Ok(())
    }
    fn reset(&mut self) {
        self.worker = None;
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum State {
    /// The host asked to connect; the guest has not answered yet.
    AwaitingGuest,
    Established,
}

struct Connection {
    stream: UnixStream,
    state: State,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Payload bytes sent to the guest.
    tx_cnt: u32,
    /// Payload bytes from the guest written to the host stream.
    fwd_cnt: u32,
    fwd_cnt_told: u32,
    /// Guest data the host stream has not taken yet.
    to_host: Vec<u8>,
    /// The host end closed: nothing more to read.
    host_done: bool,
    /// When the host asked the guest to connect, until the guest answers.
    requested: Option<Instant>,
}

impl Connection {
    fn credit(&self) -> u32 {
        self.peer_buf_alloc.saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A host connection that has not said `CONNECT <port>` yet.
struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    since: Instant,
}

/// Connections by (host port, guest port).
type Key = (u32, u32);

struct Muxer {
    guest_cid: u64,
    uds: PathBuf,
    listener: UnixListener,
    handshakes: HashMap<RawFd, Handshake>,
    conns: HashMap<Key, Connection>,
    rx_pending: VecDeque<(Header, Vec<u8>)>,
    next_local_port: u32,
    /// A transport reset event is owed to the guest.
    send_transport_reset: bool,
    /// The transmit ring was left with chains in it: the host sides hold MAX_BUFFERED bytes.
    tx_stalled: bool,
    /// Fires when a host connection has waited CONNECT_TIMEOUT for its CONNECT line or for the
    /// guest's answer.
    timer: TimerFd,
    connect_timeout: Duration,
}

impl Muxer {
    /// A muxer with no connections yet, owing the guest a transport reset when `reset_owed`.
    fn new(guest_cid: u64, uds: PathBuf, listener: UnixListener, reset_owed: bool) -> std::io::Result<Muxer> {
        Ok(Muxer {
            guest_cid,
            uds,
            listener,
            handshakes: HashMap::new(),
            conns: HashMap::new(),
            rx_pending: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            send_transport_reset: reset_owed,
            tx_stalled: false,
            timer: TimerFd::new()?,
            connect_timeout: CONNECT_TIMEOUT,
        })
    }

    /// When the oldest host connection still waiting (for its CONNECT line, or for the guest
    /// to answer) began to wait.
    fn oldest_wait(&self) -> Option<Instant> {
        let handshakes = self.handshakes.values().map(|h| h.since);
        handshakes.chain(self.conns.values().filter_map(|c| c.requested)).min()
    }

    /// Sets the timer for the oldest waiting connection's deadline.
    fn arm_timeout(&mut self) {
        if let Some(oldest) = self.oldest_wait() {
            let left = (oldest + self.connect_timeout).saturating_duration_since(Instant::now());
            let _ = self.timer.reset(left.max(Duration::from_millis(1)), None);
        }
    }

    /// Ends host connections that waited too long: a host client that never says CONNECT, or a
    /// guest that never answers (the host sees the connection close and may retry).
    fn expire_waiting(&mut self) {
        let timeout = self.connect_timeout;
        let before = self.handshakes.len();
        self.handshakes.retain(|_, h| h.since.elapsed() < timeout);
        let unanswered: Vec<Key> = self
            .conns
            .iter()
            .filter(|(_, c)| c.requested.is_some_and(|since| since.elapsed() >= timeout))
            .map(|(k, _)| *k)
            .collect();
        if before > self.handshakes.len() || !unanswered.is_empty() {
            tracing::debug!(
                "virtio-vsock: {} host connection(s) timed out waiting",
                before - self.handshakes.len() + unanswered.len()
            );
        }
        for key in unanswered {
            // The guest hears of it too, in case its answer is still on the way.
            self.close(key, true);
        }
        self.arm_timeout();
    }

    /// Puts a transport reset event in the guest's first event buffer; false until it has one.
    fn transport_reset(&mut self, queue: &mut Queue, mem: &GuestMemory) -> bool {
        let Some(chain) = queue.pop_descriptor_chain(mem) else { return false };
        let head = chain.head_index();
        let Some(buffer) = chain.writable().find(|d| d.len() >= 4) else {
            crate::guest_fault!("virtio-vsock: an event buffer is smaller than an event");
            let _ = queue.add_used(mem, head, 0);
            return true;
        };
        if mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), buffer.addr()).is_err() {
            crate::guest_fault!("virtio-vsock: an event buffer lies outside guest RAM");
            let _ = queue.add_used(mem, head, 0);
            return true;
        }
        if let Err(e) = queue.add_used(mem, head, 4) {
            crate::guest_fault!("virtio-vsock: cannot return event descriptor {head} ({e})");
        }
        self.send_transport_reset = false;
        tracing::info!("virtio-vsock: told the guest its connections were reset");
        true
    }

    fn header(&self, key: Key, op: u16, len: u32, flags: u32) -> Header {
        let fwd_cnt = self.conns.get(&key).map_or(0, |c| c.fwd_cnt);
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len,
            kind: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt,
        }
    }

    fn send_control(&mut self, key: Key, op: u16, flags: u32) {
        // A guest that sends requests but never posts receive buffers must not grow this
        // queue without end: past the bound, control packets are dropped.
        if self.rx_pending.len() >= RX_PENDING_MAX * 2 {
            crate::guest_fault!(
                "virtio-vsock: the guest takes no packets; a control packet for port {} was dropped",
                key.0
            );
            return;
        }
        let h = self.header(key, op, 0, flags);
        self.rx_pending.push_back((h, Vec::new()));
    }

    fn close(&mut self, key: Key, tell_guest: bool) {
        if self.conns.remove(&key).is_some() && tell_guest {
            self.send_control(key, OP_RST, 0);
        }
    }

    /// A packet the guest sent.
    fn handle_guest_packet(&mut self, h: Header, payload: &[u8]) {
        if h.kind != TYPE_STREAM || h.src_cid != self.guest_cid || h.dst_cid != HOST_CID {
            crate::guest_fault!(
                "virtio-vsock: dropped a packet of type {} from CID {} to CID {}",
                h.kind,
                h.src_cid,
                h.dst_cid
            );
            return;
        }
        let key = (h.dst_port, h.src_port);
        if let Some(conn) = self.conns.get_mut(&key) {
            conn.peer_buf_alloc = h.buf_alloc;
            conn.peer_fwd_cnt = h.fwd_cnt;
        }
        match h.op {
            OP_REQUEST => self.guest_connects(key),
            OP_RESPONSE => match self.conns.get_mut(&key) {
                Some(conn) if conn.state == State::AwaitingGuest => {
                    conn.state = State::Established;
                    conn.requested = None;
                    let reply = format!("OK {}\n", key.0);
                    if conn.stream.write_all(reply.as_bytes()).is_err() {
                        self.close(key, true);
                    }
                }
                _ => self.send_control(key, OP_RST, 0),
            },
            OP_RW => {
                let Some(conn) = self.conns.get_mut(&key).filter(|c| c.state == State::Established) else {
                    return self.send_control(key, OP_RST, 0);
                };
                if conn.to_host.len() + payload.len() > BUF_ALLOC as usize {
                    crate::guest_fault!(
                        "virtio-vsock: the guest overran the credit of port {}; the connection is reset",
                        key.0
                    );
                    return self.close(key, true);
                }
                conn.to_host.extend_from_slice(payload);
                self.flush_to_host(key);
            }
            OP_CREDIT_REQUEST => {
                if self.conns.contains_key(&key) {
                    self.send_control(key, OP_CREDIT_UPDATE, 0);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_SHUTDOWN => {
                self.flush_to_host(key);
                if h.flags & (SHUTDOWN_RECEIVE | SHUTDOWN_SEND) == SHUTDOWN_RECEIVE | SHUTDOWN_SEND {
                    self.close(key, true);
                } else if h.flags & SHUTDOWN_SEND != 0
                    && let Some(conn) = self.conns.get(&key)
                {
                    let _ = conn.stream.shutdown(std::net::Shutdown::Write);
                }
            }
            OP_RST => self.close(key, false),
            op => {
                crate::guest_fault!("virtio-vsock: unknown operation {op}; the connection is reset");
                self.close(key, true);
            }
        }
    }

    /// The guest connects to host port key.0: reach the listener at `PATH_<port>`. A listener
    /// whose backlog is full refuses at once rather than hold up the worker.
    fn guest_connects(&mut self, key: Key) {
        if self.conns.contains_key(&key) || self.conns.len() >= MAX_CONNECTIONS {
            return self.send_control(key, OP_RST, 0);
        }
        let path = format!("{}_{}", self.uds.display(), key.0);
        match connect_without_waiting(&path) {
            Ok(stream) => {
                self.conns.insert(key, new_connection(stream, State::Established));
                self.send_control(key, OP_RESPONSE, 0);
            }
            Err(e) => {
                tracing::debug!(
                    "virtio-vsock: the guest's connection to port {} found no listener at {path} ({e})",
                    key.0
                );
                self.send_control(key, OP_RST, 0);
            }
        }
    }

    fn flush_to_host(&mut self, key: Key) {
        let Some(conn) = self.conns.get_mut(&key) else { return };
        let mut written = 0;
        while written < conn.to_host.len() {
            match conn.stream.write(&conn.to_host[written..]) {
                Ok(0) => break,
                Ok(n) => written += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => return self.close(key, true),
            }
        }
        conn.to_host.drain(..written);
        conn.fwd_cnt = conn.fwd_cnt.wrapping_add(written as u32);
        if conn.fwd_cnt.wrapping_sub(conn.fwd_cnt_told) >= BUF_ALLOC / 4 {
            conn.fwd_cnt_told = conn.fwd_cnt;
            self.send_control(key, OP_CREDIT_UPDATE, 0);
        }
    }

    /// A host connection spoke: finish its handshake, or move its data toward the guest.
    fn host_readable(&mut self, fd: RawFd) {
        if fd == self.listener.as_raw_fd() {
            while let Ok((stream, _)) = self.listener.accept() {
                if stream.set_nonblocking(true).is_ok() && self.handshakes.len() < MAX_CONNECTIONS {
                    self.handshakes
                        .insert(stream.as_raw_fd(), Handshake { stream, line: Vec::new(), since: Instant::now() });
                    self.arm_timeout();
                }
            }
            return;
        }
        if let Some(mut hs) = self.handshakes.remove(&fd) {
            let mut buf = [0u8; 64];
            match hs.stream.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => hs.line.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
            let Some(end) = hs.line.iter().position(|&b| b == b'\n') else {
                if hs.line.len() < 64 {
                    self.handshakes.insert(fd, hs);
                }
                return;
            };
            let port = std::str::from_utf8(&hs.line[..end])
                .ok()
                .and_then(|l| {
                    // Kata's runtime-rs says `connect`, Firecracker's users `CONNECT`.
                    let (verb, port) = l.trim().split_once(' ')?;
                    verb.eq_ignore_ascii_case("connect").then_some(port)
                })
                .and_then(|p| p.trim().parse::<u32>().ok());
            let Some(port) = port else {
                crate::guest_fault!("virtio-vsock: a host connection did not start with CONNECT <port>");
                return;
            };
            let key = (self.next_local_port, port);
            self.next_local_port = self.next_local_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
            // Anything the host sent after the CONNECT line, before OK, is not kept.
            let mut conn = new_connection(hs.stream, State::AwaitingGuest);
            conn.requested = Some(Instant::now());
            self.conns.insert(key, conn);
            self.arm_timeout();
            self.send_control(key, OP_REQUEST, 0);
            return;
        }
        let Some((&key, _)) = self.conns.iter().find(|(_, c)| c.stream.as_raw_fd() == fd) else { return };
        let conn = self.conns.get_mut(&key).expect("just found");
        let room = (conn.credit() as usize).min(MAX_RX_PAYLOAD);
        if conn.state != State::Established || room == 0 {
            return;
        }
        let mut buf = vec![0u8; room];
        match conn.stream.read(&mut buf) {
            Ok(0) => {
                conn.host_done = true;
                self.send_control(key, OP_SHUTDOWN, SHUTDOWN_RECEIVE | SHUTDOWN_SEND);
            }
            Ok(n) => {
                buf.truncate(n);
                conn.tx_cnt = conn.tx_cnt.wrapping_add(n as u32);
                let h = self.header(key, OP_RW, n as u32, 0);
                self.rx_pending.push_back((h, buf));
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(_) => self.close(key, true),
        }
    }

    /// Moves waiting packets into guest receive buffers.
    fn deliver(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let pending = std::cell::RefCell::new(&mut self.rx_pending);
        serve_queue_while(
            "virtio-vsock",
            &mut queues[RX_QUEUE],
            mem,
            || !pending.borrow().is_empty(),
            |chain| {
                let Some((header, payload)) = pending.borrow_mut().pop_front() else { return 0 };
                let mut bytes = header.bytes().to_vec();
                bytes.extend_from_slice(&payload);
                let mut done = 0;
                for desc in chain.writable() {
                    let n = (desc.len() as usize).min(bytes.len() - done);
                    if mem.write_slice(&bytes[done..done + n], desc.addr()).is_err() {
                        break;
                    }
                    done += n;
                    if done == bytes.len() {
                        break;
                    }
                }
                if done < bytes.len() {
                    crate::guest_fault!(
                        "virtio-vsock: a guest receive buffer was too small for a packet; it was dropped"
                    );
                }
                done as u32
            },
        )
    }

    /// Bytes the guest sent that the host sockets have not taken yet.
    fn buffered(&self) -> usize {
        self.conns.values().map(|c| c.to_host.len()).sum()
    }

    /// Takes the guest's packets one at a time, and stops while the host sides hold
    /// MAX_BUFFERED bytes they have not taken: the chains wait in the ring (the guest waits, as
    /// credit flow control intends) until a host socket drains.
    fn transmit(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let full = std::cell::Cell::new(self.buffered() >= MAX_BUFFERED);
        let used = serve_queue_limited(
            "virtio-vsock",
            &mut queues[TX_QUEUE],
            mem,
            || !full.get(),
            |chain| {
                if let Some((header, payload)) = read_packet(mem, chain) {
                    self.handle_guest_packet(header, &payload);
                }
                full.set(self.buffered() >= MAX_BUFFERED);
                Some(0)
            },
        );
        self.tx_stalled = full.get();
        used
    }
}

/// A packet from a transmit chain: its header and at most MAX_TX_PAYLOAD bytes of payload.
fn read_packet(mem: &GuestMemory, chain: virtio_queue::DescriptorChain<&GuestMemory>) -> Option<(Header, Vec<u8>)> {
    let mut bytes = Vec::new();
    for desc in chain.readable() {
        let n = (desc.len() as usize).min(HEADER_LEN + MAX_TX_PAYLOAD - bytes.len());
        let start = bytes.len();
        bytes.resize(start + n, 0);
        if mem.read_slice(&mut bytes[start..], GuestAddress(desc.addr().0)).is_err() {
            crate::guest_fault!("virtio-vsock: a transmit buffer lies outside guest RAM");
            return None;
        }
    }
    if bytes.len() < HEADER_LEN {
        crate::guest_fault!("virtio-vsock: dropped a packet shorter than its header");
        return None;
    }
    let header = Header::parse(bytes[..HEADER_LEN].try_into().expect("header length"));
    let len = (header.len as usize).min(bytes.len() - HEADER_LEN);
    bytes.truncate(HEADER_LEN + len);
    bytes.drain(..HEADER_LEN);
    Some((header, bytes))
}

/// Connects a non-blocking Unix stream socket to `path`. A Unix connect never completes
/// later: it succeeds, or fails at once (EAGAIN when the listener's backlog is full).
fn connect_without_waiting(path: &str) -> std::io::Result<UnixStream> {
    use std::os::fd::FromRawFd;
    let mut addr: libc::sockaddr_un = empty_sockaddr_un();
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    if path.len() >= addr.sun_path.len() {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "the socket path is too long"));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(path.bytes()) {
        *dst = src as libc::c_char;
    }
    // SAFETY: a new socket; the fd is owned by the UnixStream from here on.
    let stream = unsafe {
        let fd = libc::socket(libc::AF_UNIX, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        UnixStream::from_raw_fd(fd)
    };
    let len = (std::mem::size_of::<libc::sa_family_t>() + path.len()) as libc::socklen_t;
    // SAFETY: connect reads `len` bytes of a live sockaddr_un.
    if unsafe { libc::connect(stream.as_raw_fd(), (&raw const addr).cast(), len) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(stream)
}

fn empty_sockaddr_un() -> libc::sockaddr_un {
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid (empty) address.
    unsafe { std::mem::zeroed() }
}

fn new_connection(stream: UnixStream, state: State) -> Connection {
    Connection {
        stream,
        state,
        peer_buf_alloc: 0,
        peer_fwd_cnt: 0,
        tx_cnt: 0,
        fwd_cnt: 0,
        fwd_cnt_told: 0,
        to_host: Vec::new(),
        host_done: false,
        requested: None,
    }
}

impl Backend for Muxer {
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let used = match index {
            TX_QUEUE => self.transmit(queues, mem),
            RX_QUEUE => false,
            // The event queue carries only the transport reset a snapshot owes the guest.
            EVENT_QUEUE if self.send_transport_reset => return self.transport_reset(&mut queues[EVENT_QUEUE], mem),
            _ => return false,
        };
        // Retry data the host streams did not take, then hand over what is waiting.
        let keys: Vec<Key> = self.conns.iter().filter(|(_, c)| !c.to_host.is_empty()).map(|(k, _)| *k).collect();
        for key in keys {
            self.flush_to_host(key);
        }
        self.deliver(queues, mem) || used
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        let mut fds = vec![self.listener.as_raw_fd()];
        if self.oldest_wait().is_some() {
            fds.push(self.timer.as_raw_fd());
        }
        fds.extend(self.handshakes.keys());
        if self.rx_pending.len() < RX_PENDING_MAX {
            fds.extend(
                self.conns
                    .values()
                    .filter(|c| c.state == State::Established && !c.host_done && c.credit() > 0)
                    .map(|c| c.stream.as_raw_fd()),
            );
        }
        fds
    }

    /// Host sockets holding the guest's data they have not taken yet.
    fn writable_fds(&self) -> Vec<RawFd> {
        self.conns.values().filter(|c| !c.to_host.is_empty()).map(|c| c.stream.as_raw_fd()).collect()
    }

    fn process_fd(&mut self, fd: RawFd, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        if fd == self.timer.as_raw_fd() {
            // It fired (epoll said so): reading does not wait.
            let _ = self.timer.wait();
            self.expire_waiting();
            return self.deliver(queues, mem);
        }
        let draining: Option<Key> =
            self.conns.iter().find(|(_, c)| c.stream.as_raw_fd() == fd && !c.to_host.is_empty()).map(|(k, _)| *k);
        if let Some(key) = draining {
            self.flush_to_host(key);
        }
        self.host_readable(fd);
        // The host took some of what held the guest back: take its packets again.
        let resumed = self.tx_stalled && self.buffered() < MAX_BUFFERED && self.transmit(queues, mem);
        self.deliver(queues, mem) || resumed
    }
}

/// Feeds `data`, cut into packets (a header, then as much payload as it claims), to a fresh
/// device's packet handling, as a guest's transmit queue would: for the fuzzer.
#[doc(hidden)]
pub fn fuzz_guest_packets(data: &[u8]) {
    let name = format!("ferrovisor-fuzz-vsock-{}", std::process::id());
    let Ok(addr) = <std::os::unix::net::SocketAddr as std::os::linux::net::SocketAddrExt>::from_abstract_name(&name)
    else {
        return;
    };
    let Ok(listener) = UnixListener::bind_addr(&addr) else { return };
    // No host listener answers under this path: guest connections are refused at once.
    let Ok(mut muxer) = Muxer::new(3, PathBuf::from("/nonexistent/ferrovisor-fuzz/v.sock"), listener, false) else {
        return;
    };
    let mut rest = data;
    while rest.len() >= HEADER_LEN {
        let header = Header::parse(rest[..HEADER_LEN].try_into().expect("header length"));
        let len = (header.len as usize).min(rest.len() - HEADER_LEN).min(MAX_TX_PAYLOAD);
        muxer.handle_guest_packet(header, &rest[HEADER_LEN..HEADER_LEN + len]);
        rest = &rest[HEADER_LEN + len..];
        assert!(muxer.rx_pending.len() <= RX_PENDING_MAX * 2);
        assert!(muxer.buffered() <= MAX_BUFFERED + MAX_TX_PAYLOAD);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn muxer(dir: &Path) -> Muxer {
        let uds = dir.join("v.sock");
        let listener = UnixListener::bind(&uds).unwrap();
        listener.set_nonblocking(true).unwrap();
        Muxer::new(3, uds.clone(), listener, false).unwrap()
    }

    fn request(src_port: u32, dst_port: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            kind: TYPE_STREAM,
            op: OP_REQUEST,
            buf_alloc: 4096,
            ..Default::default()
        }
    }

    #[test]
    fn a_guest_that_never_takes_packets_cannot_grow_the_queue() {
        let dir = std::env::temp_dir().join(format!("ferrovisor-vsock-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut m = muxer(&dir);
        // Connections to ports with no listener are refused with RST, each queued for the guest.
        for port in 0..5000 {
            m.handle_guest_packet(request(port, 7), &[]);
        }
        assert_eq!(m.rx_pending.len(), RX_PENDING_MAX * 2);
        assert!(m.rx_pending.iter().all(|(h, _)| h.op == OP_RST));
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn packets_from_the_wrong_cid_or_type_are_dropped() {
        let dir = std::env::temp_dir().join(format!("ferrovisor-vsock-cid-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut m = muxer(&dir);
        m.handle_guest_packet(Header { src_cid: 9, ..request(1, 2) }, &[]);
        m.handle_guest_packet(Header { kind: 2, ..request(1, 2) }, &[]);
        m.handle_guest_packet(Header { dst_cid: 5, ..request(1, 2) }, &[]);
        assert!(m.rx_pending.is_empty());
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A host listener that accepts nothing, its backlog full: the guest's connection is
    /// refused at once instead of blocking the worker (and with it reset, snapshot and stop).
    #[test]
    fn a_full_listener_backlog_refuses_instead_of_blocking() {
        let dir = std::env::temp_dir().join(format!("fv-vsock-backlog-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("v.sock_9");
        let listener = UnixListener::bind(&path).unwrap();
        // SAFETY: listen on our own socket, with the smallest backlog.
        assert_eq!(unsafe { libc::listen(listener.as_raw_fd(), 0) }, 0);
        let path_text = path.to_str().unwrap().to_string();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            let outcome = loop {
                match connect_without_waiting(&path_text) {
                    Ok(stream) if held.len() < 64 => held.push(stream),
                    Ok(_) => break None,
                    Err(e) => break Some(e.kind()),
                }
            };
            let _ = tx.send(outcome);
        });
        let outcome = rx.recv_timeout(std::time::Duration::from_secs(5)).expect("connecting blocked");
        assert_eq!(outcome, Some(std::io::ErrorKind::WouldBlock));
        drop(listener);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A guest that keeps sending to host peers that read nothing: the device holds at most
    /// MAX_BUFFERED bytes (plus one packet), leaves the rest in the ring, and takes it once the
    /// peers read.
    #[test]
    fn host_peers_that_do_not_read_hold_the_guest_back_instead_of_filling_memory() {
        use virtio_queue::desc::{RawDescriptor, split::Descriptor as SplitDescriptor};
        let dir = std::env::temp_dir().join(format!("fv-vsock-backpressure-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut m = muxer(&dir);
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap();
        const PAYLOAD: usize = 60 << 10;
        const CONNS: u32 = 32;
        const ROUNDS: u32 = 4;
        let mut peers = Vec::new();
        for c in 0..CONNS {
            let (ours, peer) = UnixStream::pair().unwrap();
            ours.set_nonblocking(true).unwrap();
            peer.set_nonblocking(true).unwrap();
            let small: libc::c_int = 4096;
            // SAFETY: setsockopt reads one int of a live local.
            unsafe {
                libc::setsockopt(ours.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, (&raw const small).cast(), 4)
            };
            m.conns.insert((100 + c, 5000 + c), new_connection(ours, State::Established));
            peers.push(peer);
            let h = Header { src_port: 5000 + c, dst_port: 100 + c, op: OP_RW, len: PAYLOAD as u32, ..request(0, 0) };
            let at = 0x20_0000 + u64::from(c) * 0x10_000;
            mem.write_slice(&h.bytes(), GuestAddress(at)).unwrap();
            mem.write_slice(&[c as u8; PAYLOAD], GuestAddress(at + HEADER_LEN as u64)).unwrap();
        }
        // A split ring of 128 one-descriptor chains (laid out by hand: a ring this size is
        // larger than the mock's layout allows for).
        let chains = ROUNDS * CONNS;
        let (table, avail, used) = (0x1000u64, 0x2000u64, 0x3000u64);
        for i in 0..chains {
            let at = 0x20_0000 + u64::from(i % CONNS) * 0x10_000;
            let desc = RawDescriptor::from(SplitDescriptor::new(at, (HEADER_LEN + PAYLOAD) as u32, 0, 0));
            mem.write_obj(desc, GuestAddress(table + u64::from(i) * 16)).unwrap();
            mem.write_obj(i as u16, GuestAddress(avail + 4 + u64::from(i) * 2)).unwrap();
        }
        mem.write_obj(chains as u16, GuestAddress(avail + 2)).unwrap();
        let mut tx = Queue::new(256).unwrap();
        tx.set_size(chains as u16);
        tx.set_desc_table_address(Some(table as u32), Some(0));
        tx.set_avail_ring_address(Some(avail as u32), Some(0));
        tx.set_used_ring_address(Some(used as u32), Some(0));
        tx.set_ready(true);
        let mut queues = vec![Queue::new(256).unwrap(), tx, Queue::new(256).unwrap()];

        m.transmit(&mut queues, &mem);
        assert!(m.buffered() <= MAX_BUFFERED + PAYLOAD, "{} bytes held", m.buffered());
        assert!(m.tx_stalled, "taken {} chains, {} bytes held", queues[TX_QUEUE].next_avail(), m.buffered());
        let taken = queues[TX_QUEUE].next_avail();
        assert!(u32::from(taken) < ROUNDS * CONNS, "every chain was taken");
        // The peers read; the device takes the rest as they do.
        let mut received = 0usize;
        let mut buf = vec![0u8; 1 << 16];
        for _ in 0..10_000 {
            for peer in &mut peers {
                while let Ok(n) = peer.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    received += n;
                }
            }
            let fds = m.writable_fds();
            if fds.is_empty() && !m.tx_stalled {
                break;
            }
            for fd in fds {
                m.process_fd(fd, &mut queues, &mem);
            }
        }
        for peer in &mut peers {
            while let Ok(n) = peer.read(&mut buf) {
                if n == 0 {
                    break;
                }
                received += n;
            }
        }
        assert_eq!(u32::from(queues[TX_QUEUE].next_avail()), ROUNDS * CONNS);
        assert_eq!(m.conns.len(), CONNS as usize, "no connection was reset");
        assert_eq!(received, (ROUNDS * CONNS) as usize * PAYLOAD);
        let _ = std::fs::remove_dir_all(dir);
    }

    /// A host connection the guest never answers, and one that never says CONNECT, are closed
    /// after the timeout (the host client can retry), and the guest hears of the first.
    #[test]
    fn host_connections_that_wait_too_long_are_closed() {
        let dir = std::env::temp_dir().join(format!("fv-vsock-timeout-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let mut m = muxer(&dir);
        m.connect_timeout = Duration::from_millis(50);
        let mut asking = UnixStream::connect(&m.uds).unwrap();
        let silent = UnixStream::connect(&m.uds).unwrap();
        m.host_readable(m.listener.as_raw_fd());
        asking.write_all(b"CONNECT 52\n").unwrap();
        let fds: Vec<RawFd> = m.handshakes.keys().copied().collect();
        for fd in fds {
            m.host_readable(fd);
        }
        assert_eq!((m.conns.len(), m.handshakes.len()), (1, 1), "one asked, one is silent");
        assert!(m.extra_fds().contains(&m.timer.as_raw_fd()));
        std::thread::sleep(Duration::from_millis(100));
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_000)]).unwrap();
        let mut queues = vec![Queue::new(8).unwrap(), Queue::new(8).unwrap(), Queue::new(8).unwrap()];
        let timer = m.timer.as_raw_fd();
        m.process_fd(timer, &mut queues, &mem);
        assert!(m.conns.is_empty() && m.handshakes.is_empty());
        assert!(m.rx_pending.iter().any(|(h, _)| h.op == OP_RST && h.dst_port == 52), "the guest is told");
        asking.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut rest = Vec::new();
        assert_eq!(asking.read_to_end(&mut rest).unwrap(), 0, "the host sees the connection end");
        drop(silent);
        let _ = std::fs::remove_dir_all(dir);
    }
}
