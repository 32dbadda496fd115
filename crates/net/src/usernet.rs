//! User-mode networking: a VM's frames become host socket traffic, with no TAP and no
//! privileges (the role of QEMU's slirp). The guest sees a router at 10.0.2.2 that answers
//! ARP and pings, hands out 10.0.2.15 by DHCP, and stands for the host's loopback: a
//! connection to 10.0.2.2 reaches 127.0.0.1. TCP connections end in smoltcp sockets relayed
//! to host TcpStreams; UDP datagrams go out of host UdpSockets and their replies come back.
//! `hostfwd` forwards a host TCP port to a guest port.
//!
//! It runs on a thread of its own and talks to the virtio-net device over a SOCK_SEQPACKET
//! pair, as the switch does.

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant as StdInstant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::phy::{Device, DeviceCapabilities, TxToken};
use smoltcp::socket::tcp;
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpAddress, IpCidr, IpEndpoint, IpListenEndpoint};

use crate::switch::SwitchPort;

pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 2);
pub const GUEST: Ipv4Addr = Ipv4Addr::new(10, 0, 2, 15);
const PREFIX: u8 = 24;
const GATEWAY_MAC: [u8; 6] = [0x52, 0x55, 0x0a, 0x00, 0x02, 0x02];
const MTU: usize = 1514;
const TCP_BUFFER: usize = 64 << 10;
/// A UDP flow nobody used for this long is closed.
const UDP_IDLE: Duration = Duration::from_secs(60);
const MAX_TCP: usize = 256;
const MAX_UDP: usize = 256;

/// `hostfwd=tcp:ADDR:HPORT-:GPORT`: connections to ADDR:HPORT on the host reach GPORT.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct HostForward {
    pub host: SocketAddrV4,
    pub guest_port: u16,
}

impl std::str::FromStr for HostForward {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad =
            || format!("hostfwd takes tcp:HOST_ADDR:HOST_PORT-:GUEST_PORT, like tcp:127.0.0.1:2222-:22, not '{s}'");
        let rest = s.strip_prefix("tcp:").ok_or_else(bad)?;
        let (host, guest) = rest.split_once("-:").ok_or_else(bad)?;
        let host: SocketAddrV4 = host.parse().map_err(|_| bad())?;
        let guest_port: u16 = guest.parse().map_err(|_| bad())?;
        if guest_port == 0 {
            return Err(bad());
        }
        Ok(HostForward { host, guest_port })
    }
}

/// Starts the user-mode network; the returned port is the VM's side.
pub fn spawn(forwards: &[HostForward]) -> std::io::Result<SwitchPort> {
    let (vm_side, ours) = SwitchPort::pair()?;
    let listeners = forwards
        .iter()
        .map(|f| {
            let listener = TcpListener::bind(f.host)?;
            listener.set_nonblocking(true)?;
            tracing::info!("user network: forwarding {} to guest port {}", f.host, f.guest_port);
            Ok((listener, f.guest_port))
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    sandbox::spawn(sandbox::ThreadKind::Usernet, "usernet", move || {
        let mut stack = Stack::new(ours, listeners);
        if let Err(e) = stack.run() {
            tracing::warn!("the user network stopped: {e}");
        }
    })?;
    Ok(vm_side)
}

/// smoltcp's view of the guest link: frames queued from the guest, frames sent to it.
struct Link {
    port: SwitchPort,
    inbound: std::collections::VecDeque<Vec<u8>>,
}

struct Tx<'a>(&'a SwitchPort);

impl TxToken for Tx<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut frame = vec![0u8; len];
        let r = f(&mut frame);
        if let Err(e) = self.0.send_frame(&frame) {
            tracing::debug!("user network: a frame to the guest was dropped ({e})");
        }
        r
    }
}

impl Device for Link {
    type RxToken<'a> = crate::RxFrame;
    type TxToken<'a> = Tx<'a>;
    fn receive(&mut self, _: Instant) -> Option<(crate::RxFrame, Tx<'_>)> {
        let frame = self.inbound.pop_front()?;
        Some((crate::RxFrame(frame), Tx(&self.port)))
    }
    fn transmit(&mut self, _: Instant) -> Option<Tx<'_>> {
        Some(Tx(&self.port))
    }
    fn capabilities(&self) -> DeviceCapabilities {
        crate::ethernet_capabilities(MTU)
    }
}

/// A guest TCP connection and the host stream it is relayed to.
struct TcpRelay {
    handle: SocketHandle,
    host: TcpStream,
    /// The host connection is still being made.
    connecting: bool,
    host_eof: bool,
    host_write_shut: bool,
}

struct UdpFlow {
    socket: UdpSocket,
    guest_port: u16,
    remote: SocketAddrV4,
    last_used: StdInstant,
}

struct Stack {
    link: Link,
    iface: Interface,
    sockets: SocketSet<'static>,
    tcp: Vec<TcpRelay>,
    udp: Vec<UdpFlow>,
    listeners: Vec<(TcpListener, u16)>,
    guest_mac: [u8; 6],
    leases: crate::dhcp::Leases,
    started: StdInstant,
    next_local_port: u16,
    /// For the fuzzer: every host connection and datagram goes to these local sockets instead
    /// of the address the guest named.
    confined: Option<Confined>,
}

struct Confined {
    tcp: SocketAddrV4,
    udp: SocketAddrV4,
}

fn now(started: StdInstant) -> Instant {
    Instant::from_millis(started.elapsed().as_millis() as i64)
}

/// The host address a guest destination stands for: the router is the host's loopback.
fn host_address(dst: Ipv4Addr) -> Ipv4Addr {
    if dst == GATEWAY { Ipv4Addr::LOCALHOST } else { dst }
}

/// A nonblocking connect: the stream is usable once it is writable.
fn connect_nonblocking(addr: SocketAddrV4) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    // SAFETY: socket(2) with constant arguments; the fd goes into the TcpStream at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let stream = unsafe { TcpStream::from_raw_fd(fd) };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: addr.port().to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(*addr.ip()).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: connect reads a sockaddr_in of the given size.
    let rc = unsafe { libc::connect(fd, (&raw const sa).cast(), size_of::<libc::sockaddr_in>() as libc::socklen_t) };
    if rc < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            return Err(e);
        }
    }
    Ok(stream)
}

fn socket_error(stream: &TcpStream) -> Option<std::io::Error> {
    stream.take_error().ok().flatten()
}

impl Stack {
    fn new(port: SwitchPort, listeners: Vec<(TcpListener, u16)>) -> Stack {
        let mut link = Link { port, inbound: Default::default() };
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(GATEWAY_MAC)));
        config.random_seed = u64::from(std::process::id()) ^ 0x5eed;
        let started = StdInstant::now();
        let mut iface = Interface::new(config, &mut link, now(started));
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(IpAddress::Ipv4(GATEWAY), PREFIX));
        });
        // Accept packets for any address: the router stands for the whole internet.
        iface.set_any_ip(true);
        let _ = iface.routes_mut().add_default_ipv4_route(GATEWAY);
        Stack {
            link,
            iface,
            sockets: SocketSet::new(Vec::new()),
            tcp: Vec::new(),
            udp: Vec::new(),
            listeners,
            guest_mac: [0; 6],
            leases: Default::default(),
            started,
            next_local_port: 49152,
            confined: None,
        }
    }

    fn run(&mut self) -> std::io::Result<()> {
        let mut frame = vec![0u8; MTU + 64];
        loop {
            let timeout = self
                .iface
                .poll_delay(now(self.started), &self.sockets)
                .map_or(100, |d| d.total_millis().min(100) as i32);
            let mut fds = vec![libc::pollfd { fd: self.link.port.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
            let watch = |fd: RawFd, events: i16| libc::pollfd { fd, events, revents: 0 };
            fds.extend(self.listeners.iter().map(|(l, _)| watch(l.as_raw_fd(), libc::POLLIN)));
            fds.extend(self.udp.iter().map(|f| watch(f.socket.as_raw_fd(), libc::POLLIN)));
            // A host socket is read only while the guest's side can take data: one at its
            // end, or facing a full guest window, would be ready at once, again and again.
            for t in &self.tcp {
                if t.connecting {
                    fds.push(watch(t.host.as_raw_fd(), libc::POLLOUT));
                } else if !t.host_eof && self.sockets.get::<tcp::Socket>(t.handle).can_send() {
                    fds.push(watch(t.host.as_raw_fd(), libc::POLLIN));
                }
            }
            // SAFETY: poll reads and writes `fds.len()` pollfds of a live vector.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout) };
            if n < 0 && std::io::Error::last_os_error().kind() != ErrorKind::Interrupted {
                return Err(std::io::Error::last_os_error());
            }
            if fds[0].revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                return Ok(()); // The VM is gone.
            }
            loop {
                match self.link.port.recv_frame(&mut frame) {
                    Ok(0) => return Ok(()),
                    Ok(len) => self.handle_guest_frame(&frame[..len]),
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            self.accept_forwards();
            self.udp_replies();
            self.iface.poll(now(self.started), &mut self.link, &mut self.sockets);
            self.relay_tcp();
            self.iface.poll(now(self.started), &mut self.link, &mut self.sockets);
        }
    }

    /// A frame from the guest: DHCP and UDP are answered here, the rest goes to smoltcp
    /// (ARP, pings to the router, TCP), with a listening socket made for each new connection.
    fn handle_guest_frame(&mut self, frame: &[u8]) {
        if frame.len() < 14 {
            return;
        }
        self.guest_mac.copy_from_slice(&frame[6..12]);
        if frame[12..14] == [0x08, 0x00] && frame.len() >= 34 && frame[14] >> 4 == 4 {
            let header = usize::from(frame[14] & 0xf) * 4;
            let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
            if header < 20 || total < header || 14 + total > frame.len() {
                return;
            }
            let ip = &frame[14..14 + total];
            let (src, dst) =
                (Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]), Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]));
            let l4 = &ip[header..];
            // smoltcp answers the source of what it takes (SYN-ACK, RST, echo reply), and
            // asserts that there is one: from 0.0.0.0 that assertion aborted the VMM. Only UDP
            // (DHCP above all) may come from a non-unicast source; it never reaches smoltcp.
            let no_source = src.is_unspecified() || src.is_broadcast() || src.is_multicast();
            let udp = ip[9] == 17 && l4.len() >= 8;
            if no_source && !udp {
                return;
            }
            match ip[9] {
                17 if l4.len() >= 8 => {
                    let (sport, dport) = (u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]]));
                    let len = usize::from(u16::from_be_bytes([l4[4], l4[5]])).clamp(8, l4.len());
                    if dport == 67 {
                        self.dhcp(&l4[8..len]);
                    } else {
                        self.udp_out(src, sport, SocketAddrV4::new(dst, dport), &l4[8..len]);
                    }
                    return;
                }
                6 if l4.len() >= 20 => {
                    let flags = l4[13];
                    if flags & 0x02 != 0 && flags & 0x10 == 0 {
                        let dport = u16::from_be_bytes([l4[2], l4[3]]);
                        self.new_tcp(dst, dport);
                    }
                }
                _ => {}
            }
        }
        if self.link.inbound.len() < 1024 {
            self.link.inbound.push_back(frame.to_vec());
        }
    }

    fn dhcp(&mut self, packet: &[u8]) {
        let pool = crate::dhcp::Pool { gateway: GATEWAY, prefix: PREFIX, first: GUEST, last: GUEST };
        let Some(msg) = crate::dhcp::parse(packet) else { return };
        // One guest on one port: the user network is its own.
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if let Some(reply) = crate::dhcp::answer(&pool, &mut self.leases, &msg, 0, now) {
            let yiaddr = Ipv4Addr::new(reply[16], reply[17], reply[18], reply[19]);
            let to = if yiaddr.is_unspecified() { Ipv4Addr::BROADCAST } else { yiaddr };
            self.send_udp(SocketAddrV4::new(GATEWAY, 67), to, 68, &reply);
        }
    }

    /// A datagram from `from` to the guest at `to:port`, built by hand.
    fn send_udp(&self, from: SocketAddrV4, to: Ipv4Addr, port: u16, payload: &[u8]) {
        let total = 20 + 8 + payload.len();
        if total + 14 > MTU {
            return;
        }
        let mut f = vec![0u8; 14 + total];
        f[0..6].copy_from_slice(if to == Ipv4Addr::BROADCAST { &[0xff; 6] } else { &self.guest_mac });
        f[6..12].copy_from_slice(&GATEWAY_MAC);
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        ip[6] = 0x40;
        ip[8] = 64;
        ip[9] = 17;
        ip[12..16].copy_from_slice(&from.ip().octets());
        ip[16..20].copy_from_slice(&to.octets());
        let sum = ip_checksum(ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        let udp = &mut f[34..];
        udp[0..2].copy_from_slice(&from.port().to_be_bytes());
        udp[2..4].copy_from_slice(&port.to_be_bytes());
        udp[4..6].copy_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
        udp[8..].copy_from_slice(payload);
        // The UDP checksum is optional in IPv4; 0 says there is none.
        if let Err(e) = self.link.port.send_frame(&f) {
            tracing::debug!("user network: a datagram to the guest was dropped ({e})");
        }
    }

    fn udp_out(&mut self, _src: Ipv4Addr, guest_port: u16, remote: SocketAddrV4, payload: &[u8]) {
        let flow = match self.udp.iter_mut().position(|f| f.guest_port == guest_port && f.remote == remote) {
            Some(i) => &mut self.udp[i],
            None => {
                if self.udp.len() >= MAX_UDP {
                    tracing::debug!("user network: too many UDP flows; a datagram was dropped");
                    return;
                }
                let target = match &self.confined {
                    Some(c) => c.udp,
                    None => SocketAddrV4::new(host_address(*remote.ip()), remote.port()),
                };
                let socket = match UdpSocket::bind("0.0.0.0:0").and_then(|s| s.connect(target).map(|()| s)) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::debug!("user network: no UDP socket for {target} ({e})");
                        return;
                    }
                };
                let _ = socket.set_nonblocking(true);
                self.udp.push(UdpFlow { socket, guest_port, remote, last_used: StdInstant::now() });
                self.udp.last_mut().expect("just pushed")
            }
        };
        flow.last_used = StdInstant::now();
        let _ = flow.socket.send(payload);
    }

    fn udp_replies(&mut self) {
        let mut buf = vec![0u8; MTU];
        let mut replies = Vec::new();
        for flow in &mut self.udp {
            while let Ok(n) = flow.socket.recv(&mut buf) {
                flow.last_used = StdInstant::now();
                replies.push((flow.remote, flow.guest_port, buf[..n].to_vec()));
            }
        }
        for (remote, port, data) in replies {
            self.send_udp(remote, GUEST, port, &data);
        }
        self.udp.retain(|f| f.last_used.elapsed() < UDP_IDLE);
    }

    fn tcp_socket() -> tcp::Socket<'static> {
        tcp::Socket::new(tcp::SocketBuffer::new(vec![0; TCP_BUFFER]), tcp::SocketBuffer::new(vec![0; TCP_BUFFER]))
    }

    /// A SYN from the guest to dst:port: a listening socket to take it, and the host connection.
    fn new_tcp(&mut self, dst: Ipv4Addr, port: u16) {
        let endpoint = IpListenEndpoint { addr: Some(IpAddress::Ipv4(dst)), port };
        let listening = self.tcp.iter().any(|t| {
            let s = self.sockets.get::<tcp::Socket>(t.handle);
            s.state() == tcp::State::Listen && s.listen_endpoint() == endpoint
        });
        if listening || self.tcp.len() >= MAX_TCP {
            return;
        }
        let target = match &self.confined {
            Some(c) => c.tcp,
            None => SocketAddrV4::new(host_address(dst), port),
        };
        let host = match connect_nonblocking(target) {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!("user network: cannot connect to {target} ({e})");
                return; // smoltcp answers the SYN with a reset: nothing listens.
            }
        };
        let mut socket = Self::tcp_socket();
        if socket.listen(endpoint).is_err() {
            return;
        }
        let handle = self.sockets.add(socket);
        self.tcp.push(TcpRelay { handle, host, connecting: true, host_eof: false, host_write_shut: false });
    }

    fn accept_forwards(&mut self) {
        let mut accepted = Vec::new();
        for (listener, guest_port) in &self.listeners {
            while let Ok((stream, peer)) = listener.accept() {
                tracing::debug!("user network: {peer} forwarded to guest port {guest_port}");
                accepted.push((stream, *guest_port));
            }
        }
        for (stream, guest_port) in accepted {
            if self.tcp.len() >= MAX_TCP || stream.set_nonblocking(true).is_err() {
                continue;
            }
            let mut socket = Self::tcp_socket();
            self.next_local_port = if self.next_local_port >= 65000 { 49152 } else { self.next_local_port + 1 };
            let remote = IpEndpoint::new(IpAddress::Ipv4(GUEST), guest_port);
            if socket.connect(self.iface.context(), remote, self.next_local_port).is_err() {
                continue;
            }
            let handle = self.sockets.add(socket);
            self.tcp.push(TcpRelay {
                handle,
                host: stream,
                connecting: false,
                host_eof: false,
                host_write_shut: false,
            });
        }
    }

    /// Moves bytes both ways between each guest connection and its host stream.
    fn relay_tcp(&mut self) {
        let mut buf = vec![0u8; 16 << 10];
        let mut closed = Vec::new();
        for (i, relay) in self.tcp.iter_mut().enumerate() {
            let socket = self.sockets.get_mut::<tcp::Socket>(relay.handle);
            if relay.connecting {
                if let Some(e) = socket_error(&relay.host) {
                    tracing::debug!("user network: the host refused a connection ({e})");
                    socket.abort();
                    closed.push(i);
                    continue;
                }
                // Writable (or peer-addressed) means connected.
                if relay.host.peer_addr().is_ok() {
                    relay.connecting = false;
                } else if socket.state() == tcp::State::Closed {
                    closed.push(i);
                    continue;
                } else {
                    continue;
                }
            }
            // Guest to host.
            while socket.can_recv() {
                let host = &mut relay.host;
                let written = socket.recv(|data| match host.write(data) {
                    Ok(n) => (n, n),
                    Err(_) => (0, 0),
                });
                if !matches!(written, Ok(n) if n > 0) {
                    break;
                }
            }
            // The guest sent FIN and everything before it went out: pass the FIN on.
            let guest_done = matches!(
                socket.state(),
                tcp::State::CloseWait | tcp::State::LastAck | tcp::State::Closing | tcp::State::TimeWait
            );
            if guest_done && !relay.host_write_shut && socket.recv_queue() == 0 {
                let _ = relay.host.shutdown(std::net::Shutdown::Write);
                relay.host_write_shut = true;
            }
            // Host to guest.
            while !relay.host_eof && socket.can_send() {
                let room = (socket.send_capacity() - socket.send_queue()).min(buf.len());
                match relay.host.read(&mut buf[..room]) {
                    Ok(0) => {
                        relay.host_eof = true;
                        socket.close();
                    }
                    Ok(n) => {
                        let _ = socket.send_slice(&buf[..n]);
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(_) => {
                        relay.host_eof = true;
                        socket.abort();
                    }
                }
            }
            if matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait) {
                closed.push(i);
            }
        }
        for i in closed.into_iter().rev() {
            let relay = self.tcp.remove(i);
            self.sockets.remove(relay.handle);
        }
    }
}

/// Frames from the fuzzer through the user-mode network as the guest would send them: each
/// is a two-byte length and that many bytes. Host traffic goes to a local TCP listener and UDP
/// socket that take but never answer, so that nothing leaves the machine.
#[doc(hidden)]
pub fn fuzz_guest_frames(data: &[u8]) {
    let loopback = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0);
    let (Ok(tcp), Ok(udp)) = (TcpListener::bind(loopback), UdpSocket::bind(loopback)) else { return };
    let local = |addr: std::io::Result<std::net::SocketAddr>| match addr {
        Ok(std::net::SocketAddr::V4(a)) => Some(a),
        _ => None,
    };
    let (Some(tcp_addr), Some(udp_addr)) = (local(tcp.local_addr()), local(udp.local_addr())) else { return };
    let Ok((vm_side, ours)) = SwitchPort::pair() else { return };
    let mut stack = Stack::new(ours, Vec::new());
    stack.confined = Some(Confined { tcp: tcp_addr, udp: udp_addr });
    let mut to_guest = vec![0u8; MTU + 64];
    let mut rest = data;
    while let [hi, lo, tail @ ..] = rest {
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len()).min(MTU);
        stack.handle_guest_frame(&tail[..len]);
        rest = &tail[len..];
        stack.udp_replies();
        stack.iface.poll(now(stack.started), &mut stack.link, &mut stack.sockets);
        stack.relay_tcp();
        while let Ok(n) = vm_side.recv_frame(&mut to_guest) {
            assert!(n <= MTU, "a {n}-byte frame went to the guest");
        }
        assert!(stack.tcp.len() <= MAX_TCP && stack.udp.len() <= MAX_UDP && stack.link.inbound.len() <= 1024);
    }
}

fn ip_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostfwd_parses() {
        let f: HostForward = "tcp:127.0.0.1:2222-:22".parse().unwrap();
        assert_eq!(f, HostForward { host: "127.0.0.1:2222".parse().unwrap(), guest_port: 22 });
        assert!("udp:127.0.0.1:1-:2".parse::<HostForward>().unwrap_err().contains("tcp:HOST_ADDR"));
        assert!("tcp:127.0.0.1:1-:0".parse::<HostForward>().is_err());
        assert!("tcp:localhost:1-:2".parse::<HostForward>().is_err());
    }

    /// A SYN from 0.0.0.0 (found by the fuzzer): smoltcp would answer it to 0.0.0.0, which
    /// it asserts against, and the VMM aborts (panic = "abort").
    #[test]
    fn a_connection_from_no_address_is_dropped_not_answered() {
        let (vm_side, ours) = SwitchPort::pair().unwrap();
        let mut stack = Stack::new(ours, Vec::new());
        let host = TcpListener::bind("127.0.0.1:0").unwrap();
        let std::net::SocketAddr::V4(tcp) = host.local_addr().unwrap() else { unreachable!() };
        stack.confined = Some(Confined { tcp, udp: tcp });
        let (src, dst) = ([0u8; 4], GATEWAY.octets());
        let mut ip = vec![0x45, 0, 0, 40, 0, 0, 0x40, 0, 64, 6, 0, 0];
        ip.extend_from_slice(&src);
        ip.extend_from_slice(&dst);
        let sum = ip_checksum(&ip);
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        // A SYN from port 40000 to port 80, with its checksum over the pseudo-header.
        let mut syn = vec![0x9c, 0x40, 0, 80, 0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0];
        let mut pseudo = [src, dst].concat();
        pseudo.extend_from_slice(&[0, 6, 0, 20]);
        pseudo.extend_from_slice(&syn);
        let sum = ip_checksum(&pseudo);
        syn[16..18].copy_from_slice(&sum.to_be_bytes());
        let mut frame = [GATEWAY_MAC.as_slice(), &[0x52, 0x54, 0, 0, 0, 1, 0x08, 0x00]].concat();
        frame.extend_from_slice(&ip);
        frame.extend_from_slice(&syn);
        stack.handle_guest_frame(&frame);
        stack.iface.poll(now(stack.started), &mut stack.link, &mut stack.sockets);
        stack.relay_tcp();
        stack.iface.poll(now(stack.started), &mut stack.link, &mut stack.sockets);
        let mut buf = [0u8; 2048];
        assert!(vm_side.recv_frame(&mut buf).is_err(), "nothing is sent to the guest");
    }

    #[test]
    fn the_router_stands_for_the_hosts_loopback() {
        assert_eq!(host_address(GATEWAY), Ipv4Addr::LOCALHOST);
        assert_eq!(host_address(Ipv4Addr::new(192, 0, 2, 1)), Ipv4Addr::new(192, 0, 2, 1));
    }
}
