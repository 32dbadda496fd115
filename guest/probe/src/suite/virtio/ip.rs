//! `virtio-net` with `probe.virtio-net.mode=ip`: a tiny IPv4 host. It takes `.ip` (its
//! address), `.gw` (its router) and `.dst` (the far end, default the router), resolves the
//! router with ARP (and answers ARP for itself), then tries each of `.checks` (icmp,udp,tcp by
//! default) against dst: an echo request, a datagram to `.port` (7777) that should come back,
//! and a TCP handshake to `.port` followed by a line of data. `.wait` is how long each waits,
//! in TSC cycles (5G). It reports what came back:
//!
//!     PROBE virtio-net ok mode=ip mac=... gw_mac=... icmp=reply udp=reply tcp=open
//!
//! With `.flood=N` it then sends N datagrams of `.size` (64) bytes to dst:port with the
//! transmit ring kept full, and reports `flood_pps`.
//!
//! With `.listen=PORT` it then serves TCP on that port for `.serve` (20G) cycles: each
//! connection's data is echoed back, and it reports `served=BYTES`; with `.halfclose=on` it
//! acknowledges a peer's FIN but keeps its own side open. It answers echo requests
//! all along, and counts the frames that came from anyone but the router (`others=N`). A dst
//! on its own subnet (`.prefix`, 24) is reached directly (`peer=arp`, or `none` if it does
//! not answer ARP); then the checks go to it, not through the router.
//!
//! With `.get=PATH[,PATH...]` it then fetches each path from dst with HTTP/1.1 on `.port`
//! (80 here), one connection each, and prints `PROBE virtio-net http method=GET path=P
//! status=N body=B` (newlines in B shown as `|`). `.token=TTL` first asks for a session token
//! (`PUT /latest/api/token`, MMDS version 2) and sends it with each GET, after `.tokenwait`
//! cycles; `.forged=on` sends a made-up token instead; `.accept=json` asks for JSON.
//!
//! With `.delay=N` it first prints `PROBE virtio-net delaying` and waits N cycles before it
//! touches the device (time for the host to take a snapshot).
//!
//! For firewall checks: a `.gw` equal to `.ip` means no router (nothing to resolve first);
//! `.forge=N` first sends N datagrams to dst:port from a forged MAC and N from a forged IPv4
//! address; `.rogue=N` sends N datagrams of 300 bytes from UDP port 67 (as a DHCP server
//! answers); `.broadcast=on`
//! sends the flood to the broadcast MAC. When serving, UDP to the port is echoed back and
//! counted (`echoed=N`; with `.tally=on` also a line `PROBE virtio-net echoed=N` after each),
//! and a SYN to another port is answered with RST, as a host does.

use crate::cmdline::{Cmdline, VirtioMmioSlot};
use crate::report;
use crate::virtio::mmio::Device;
use crate::virtio::queue::{Buffer, Virtqueue};
use crate::virtio::{alloc, bytes};

const TEST: &str = "virtio-net";
const F_MAC: u64 = 1 << 5;
pub(super) const HEADER: usize = 12;
pub(super) const MAX_FRAME: usize = 1514;
pub(super) const RX_BUFFERS: usize = 16;
pub(super) const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;

const ETH_IP: u16 = 0x0800;
const ETH_ARP: u16 = 0x0806;
const PROTO_ICMP: u8 = 1;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
pub(super) const TCP_FIN: u8 = 0x01;
pub(super) const TCP_SYN: u8 = 0x02;
pub(super) const TCP_RST: u8 = 0x04;
const TCP_PSH: u8 = 0x08;
pub(super) const TCP_ACK: u8 = 0x10;
const UDP_SRC_PORT: u16 = 40000;
const TCP_SRC_PORT: u16 = 40001;
pub(super) const PAYLOAD: &[u8] = b"ferrovisor-probe\n";
/// The most of a packet's transport part kept: a full frame's.
const BODY: usize = MAX_FRAME - 34;
/// Each HTTP request takes a connection of its own, from ports counting up from here.
const HTTP_SRC_PORT: u16 = 41000;

type Ip = [u8; 4];

fn parse_ip(text: &str) -> Option<Ip> {
    let mut ip = [0u8; 4];
    let mut parts = text.split('.');
    for byte in &mut ip {
        *byte = parts.next()?.parse().ok()?;
    }
    parts.next().is_none().then_some(ip)
}

pub(super) fn checksum(sum: u32, data: &[u8]) -> u32 {
    let mut sum = sum;
    for pair in data.chunks(2) {
        let word = if pair.len() == 2 { u16::from_be_bytes([pair[0], pair[1]]) } else { u16::from(pair[0]) << 8 };
        sum += u32::from(word);
    }
    sum
}

pub(super) fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub(super) struct Host {
    pub(super) dev: Device,
    pub(super) rxq: Virtqueue,
    pub(super) txq: Virtqueue,
    pub(super) rx_area: u64,
    pub(super) heads: [u16; RX_BUFFERS],
    pub(super) tx_buf: u64,
    pub(super) mac: [u8; 6],
    pub(super) ip: Ip,
    pub(super) gw_mac: [u8; 6],
    /// How long one transmission may take, in TSC cycles (`probe.virtio.timeout`).
    pub(super) tx_timeout: u64,
    /// Where packets to dst go: the router, or dst itself on the same subnet.
    pub(super) next_hop: [u8; 6],
    /// Frames received from anyone but the router (port isolation checks count them).
    pub(super) others: u64,
}

/// A received IPv4 packet, as far as the checks need it.
struct Packet {
    proto: u8,
    src: Ip,
    src_mac: [u8; 6],
    /// The transport header and payload.
    body: [u8; BODY],
    body_len: usize,
}

impl Host {
    pub(super) fn rx_buffer(&self, i: usize) -> u64 {
        self.rx_area + (i * (HEADER + MAX_FRAME)) as u64
    }

    pub(super) fn send(&mut self, frame_len: usize) -> Result<(), &'static str> {
        bytes(self.tx_buf, HEADER).fill(0);
        self.txq.push(&[Buffer::readable(self.tx_buf, (HEADER + frame_len.max(60)) as u32)]).ok_or("transmit ring full")?;
        self.dev.notify(TX_QUEUE);
        let deadline = crate::hw::rdtsc() + self.tx_timeout;
        self.dev.wait_used(&mut self.txq, deadline).ok_or("a transmission did not complete")?;
        Ok(())
    }

    pub(super) fn frame(&self) -> &'static mut [u8] {
        let f = bytes(self.tx_buf + HEADER as u64, MAX_FRAME);
        f[..60].fill(0);
        f
    }

    pub(super) fn ethernet(&self, f: &mut [u8], dst: [u8; 6], ethertype: u16) {
        f[0..6].copy_from_slice(&dst);
        f[6..12].copy_from_slice(&self.mac);
        f[12..14].copy_from_slice(&ethertype.to_be_bytes());
    }

    fn arp(&mut self, op: u16, target_mac: [u8; 6], target_ip: Ip) -> Result<(), &'static str> {
        let f = self.frame();
        let dst = if op == 1 { [0xff; 6] } else { target_mac };
        self.ethernet(f, dst, ETH_ARP);
        f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, op as u8]);
        f[22..28].copy_from_slice(&self.mac);
        f[28..32].copy_from_slice(&self.ip);
        f[32..38].copy_from_slice(&target_mac);
        f[38..42].copy_from_slice(&target_ip);
        self.send(42)
    }

    /// An IPv4 packet to `dst` through the router, `body` being the transport part; for TCP
    /// and UDP the checksum at `csum_at` in the body is filled in over the pseudo-header.
    fn ip(&mut self, proto: u8, dst: Ip, body: &[u8], csum_at: Option<usize>) -> Result<(), &'static str> {
        self.ip_to(self.next_hop, proto, dst, body, csum_at)
    }

    fn ip_to(&mut self, to_mac: [u8; 6], proto: u8, dst: Ip, body: &[u8], csum_at: Option<usize>) -> Result<(), &'static str> {
        let f = self.frame();
        self.ethernet(f, to_mac, ETH_IP);
        let total = 20 + body.len();
        let ip = &mut f[14..34];
        ip.copy_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 1, 0x40, 0, 64, proto, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        ip[12..16].copy_from_slice(&self.ip);
        ip[16..20].copy_from_slice(&dst);
        let sum = fold(checksum(0, ip));
        ip[10..12].copy_from_slice(&sum.to_be_bytes());
        f[34..34 + body.len()].copy_from_slice(body);
        if let Some(at) = csum_at {
            let mut pseudo = [0u8; 12];
            pseudo[0..4].copy_from_slice(&self.ip);
            pseudo[4..8].copy_from_slice(&dst);
            pseudo[9] = proto;
            pseudo[10..12].copy_from_slice(&(body.len() as u16).to_be_bytes());
            let sum = fold(checksum(checksum(0, &pseudo), &f[34..34 + body.len()]));
            f[34 + at..36 + at].copy_from_slice(&sum.to_be_bytes());
        }
        self.send(14 + total)
    }

    /// The next frame received before `deadline`, copied into `copy` (its buffer goes back to
    /// the device): its length.
    pub(super) fn next_frame(&mut self, deadline: u64, copy: &mut [u8; MAX_FRAME]) -> Result<Option<usize>, &'static str> {
        let Some((head, len)) = self.dev.wait_used(&mut self.rxq, deadline) else { return Ok(None) };
        let slot = self.heads.iter().position(|&h| h == head).ok_or("the device returned an unknown buffer")?;
        let len = (len as usize).clamp(HEADER, HEADER + MAX_FRAME) - HEADER;
        let frame = bytes(self.rx_buffer(slot) + HEADER as u64, len);
        let n = len.min(copy.len());
        copy[..n].copy_from_slice(&frame[..n]);
        self.heads[slot] =
            self.rxq.push(&[Buffer::writable(self.rx_buffer(slot), (HEADER + MAX_FRAME) as u32)]).ok_or("receive ring full")?;
        self.dev.notify(RX_QUEUE);
        Ok(Some(n))
    }

    /// The next IPv4 packet for us before `deadline`; ARP requests for our address are
    /// answered on the way, ARP replies reported through `arp_reply`.
    fn receive(&mut self, deadline: u64, arp_reply: &mut Option<([u8; 6], Ip)>) -> Result<Option<Packet>, &'static str> {
        let mut copy = [0u8; MAX_FRAME];
        loop {
            let Some(n) = self.next_frame(deadline, &mut copy)? else { return Ok(None) };
            let f = &copy[..n];
            if f.len() < 42 {
                continue;
            }
            if f[6..12] != self.gw_mac && self.gw_mac != [0; 6] {
                self.others += 1;
            }
            match u16::from_be_bytes([f[12], f[13]]) {
                ETH_ARP => {
                    let (sender_mac, sender_ip, target_ip) =
                        (f[22..28].try_into().unwrap(), f[28..32].try_into().unwrap(), &f[38..42]);
                    match f[21] {
                        1 if target_ip == self.ip => self.arp(2, sender_mac, sender_ip)?,
                        2 => *arp_reply = Some((sender_mac, sender_ip)),
                        _ => {}
                    }
                }
                ETH_IP if f[14] >> 4 == 4 && f[30..34] == self.ip => {
                    let header = usize::from(f[14] & 0xf) * 4;
                    let total = usize::from(u16::from_be_bytes([f[16], f[17]])).min(f.len() - 14);
                    if total < header {
                        continue;
                    }
                    let mut packet = Packet {
                        proto: f[23],
                        src: f[26..30].try_into().unwrap(),
                        src_mac: f[6..12].try_into().unwrap(),
                        body: [0; BODY],
                        body_len: 0,
                    };
                    let body = &f[14 + header..14 + total];
                    packet.body_len = body.len().min(BODY);
                    packet.body[..packet.body_len].copy_from_slice(&body[..packet.body_len]);
                    if packet.proto == PROTO_ICMP && packet.body_len >= 8 && packet.body[0] == 8 {
                        // An echo request: answered, as any host does.
                        let mut reply = packet.body;
                        reply[0] = 0;
                        reply[2..4].fill(0);
                        let sum = fold(checksum(0, &reply[..packet.body_len]));
                        reply[2..4].copy_from_slice(&sum.to_be_bytes());
                        self.ip_to(packet.src_mac, PROTO_ICMP, packet.src, &reply[..packet.body_len], None)?;
                        continue;
                    }
                    return Ok(Some(packet));
                }
                _ => {}
            }
        }
    }

    fn resolve(&mut self, target: Ip, wait: u64) -> Result<Option<[u8; 6]>, &'static str> {
        for _ in 0..3 {
            self.arp(1, [0; 6], target)?;
            let deadline = crate::hw::rdtsc() + wait / 3;
            let mut reply = None;
            while crate::hw::rdtsc() < deadline {
                let _ = self.receive(deadline, &mut reply)?;
                if let Some((mac, ip)) = reply
                    && ip == target
                {
                    return Ok(Some(mac));
                }
            }
        }
        Ok(None)
    }

    /// Waits for a packet that `wanted` accepts.
    fn wait_for(&mut self, wait: u64, wanted: impl Fn(&Packet) -> bool) -> Result<Option<Packet>, &'static str> {
        let deadline = crate::hw::rdtsc() + wait;
        let mut arp = None;
        while let Some(p) = self.receive(deadline, &mut arp)? {
            if wanted(&p) {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }
}

impl Host {
    /// Sets up the device with its receive ring full, as a host at `ip`.
    pub(super) fn open(slot: &VirtioMmioSlot, cmdline: Cmdline, ip: Ip) -> Result<Host, &'static str> {
        let dev = Device::begin(slot, 0, F_MAC).map_err(|_| "the device could not be set up")?;
        let rxq = dev.queue(RX_QUEUE, RX_BUFFERS as u16).map_err(|_| "the receive queue could not be set up")?;
        let txq = dev.queue(TX_QUEUE, 16).map_err(|_| "the transmit queue could not be set up")?;
        let mac = super::net::device_mac(&dev);
        let rx_area = alloc(RX_BUFFERS * (HEADER + MAX_FRAME), 64).ok_or("out of probe memory")?;
        let tx_buf = alloc(HEADER + MAX_FRAME, 64).ok_or("out of probe memory")?;
        // Each transmission gets the whole timeout: a host may serve for longer than one.
        let tx_timeout = super::request_deadline(cmdline) - crate::hw::rdtsc();
        let mut host = Host {
            dev,
            rxq,
            txq,
            rx_area,
            heads: [0; RX_BUFFERS],
            tx_buf,
            mac,
            ip,
            gw_mac: [0; 6],
            tx_timeout,
            next_hop: [0; 6],
            others: 0,
        };
        for i in 0..usize::from(host.rxq.size).min(RX_BUFFERS) {
            let b = host.rx_buffer(i);
            host.heads[i] = host.rxq.push(&[Buffer::writable(b, (HEADER + MAX_FRAME) as u32)]).ok_or("receive ring full")?;
        }
        host.dev.driver_ok();
        host.dev.notify(RX_QUEUE);
        Ok(host)
    }
}

pub(super) fn tcp_segment(src_port: u16, dst_port: u16, seq: u32, ack: u32, flags: u8, data: &[u8], out: &mut [u8]) -> usize {
    out[0..2].copy_from_slice(&src_port.to_be_bytes());
    out[2..4].copy_from_slice(&dst_port.to_be_bytes());
    out[4..8].copy_from_slice(&seq.to_be_bytes());
    out[8..12].copy_from_slice(&ack.to_be_bytes());
    out[12] = 5 << 4;
    out[13] = flags;
    out[14..16].copy_from_slice(&8192u16.to_be_bytes());
    out[16..20].fill(0);
    out[20..20 + data.len()].copy_from_slice(data);
    20 + data.len()
}

pub fn test(slot: &VirtioMmioSlot, cmdline: Cmdline) -> Result<(), &'static str> {
    let ip = cmdline.param(TEST, "ip").and_then(parse_ip).ok_or("mode=ip needs probe.virtio-net.ip=A.B.C.D")?;
    let gw = cmdline.param(TEST, "gw").and_then(parse_ip).ok_or("mode=ip needs probe.virtio-net.gw=A.B.C.D")?;
    let dst = cmdline.param(TEST, "dst").and_then(parse_ip).unwrap_or(gw);
    let port = cmdline.number(TEST, "port", 7777) as u16;
    let wait = cmdline.number(TEST, "wait", 5_000_000_000);
    let checks = cmdline.param(TEST, "checks").unwrap_or("icmp,udp,tcp");
    let delay = cmdline.number(TEST, "delay", 0);
    if delay > 0 {
        crate::println!("PROBE virtio-net delaying");
        let until = crate::hw::rdtsc() + delay;
        while crate::hw::rdtsc() < until {
            crate::hw::spin_cycles(1_000_000);
        }
    }

    let mut host = Host::open(slot, cmdline, ip)?;
    let mac = host.mac;

    if gw != ip {
        let Some(gw_mac) = host.resolve(gw, wait)? else {
            return Err("the router did not answer ARP");
        };
        host.gw_mac = gw_mac;
        host.next_hop = gw_mac;
    }
    let gw_mac = host.gw_mac;
    // A destination on our own subnet is reached directly, found by ARP.
    let prefix = cmdline.number(TEST, "prefix", 24).min(32) as u32;
    let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
    let on_link = dst != gw && u32::from_be_bytes(dst) & mask == u32::from_be_bytes(ip) & mask;
    let mut peer = "-";
    if on_link {
        match host.resolve(dst, wait)? {
            Some(mac) => {
                host.next_hop = mac;
                peer = "arp";
            }
            None => peer = "none",
        }
    }
    let checks = if peer == "none" { "" } else { checks };
    let mut body = [0u8; 64];
    let udp_to = |body: &mut [u8; 64], src_port: u16| {
        let len = 8 + PAYLOAD.len();
        body[0..2].copy_from_slice(&src_port.to_be_bytes());
        body[2..4].copy_from_slice(&port.to_be_bytes());
        body[4..6].copy_from_slice(&(len as u16).to_be_bytes());
        body[6..8].fill(0);
        body[8..len].copy_from_slice(PAYLOAD);
        len
    };
    for _ in 0..cmdline.number(TEST, "forge", 0) {
        let len = udp_to(&mut body, UDP_SRC_PORT);
        let (own_mac, own_ip) = (host.mac, host.ip);
        host.mac = [0x02, 0x66, 0x66, 0x66, 0x66, 0x66];
        host.ip(PROTO_UDP, dst, &body[..len], Some(6))?;
        host.mac = own_mac;
        host.ip = [own_ip[0], own_ip[1], own_ip[2], own_ip[3].wrapping_add(100)];
        host.ip(PROTO_UDP, dst, &body[..len], Some(6))?;
        host.ip = own_ip;
    }
    // A DHCP server's answer is a BOOTP message of 300 bytes or more.
    const BOOTP_DATAGRAM: usize = 8 + 300;
    let mut bootp = [0u8; BOOTP_DATAGRAM];
    for _ in 0..cmdline.number(TEST, "rogue", 0) {
        let len = udp_to(&mut body, 67);
        bootp[..len].copy_from_slice(&body[..len]);
        bootp[4..6].copy_from_slice(&(BOOTP_DATAGRAM as u16).to_be_bytes());
        host.ip(PROTO_UDP, dst, &bootp, Some(6))?;
    }
    let mut results: [(&str, &str); 3] = [("icmp", "-"), ("udp", "-"), ("tcp", "-")];

    if checks.contains("icmp") {
        body[..8].copy_from_slice(&[8, 0, 0, 0, 0x7e, 0x57, 0, 1]);
        body[8..8 + PAYLOAD.len()].copy_from_slice(PAYLOAD);
        let len = 8 + PAYLOAD.len();
        let sum = fold(checksum(0, &body[..len]));
        body[2..4].copy_from_slice(&sum.to_be_bytes());
        host.ip(PROTO_ICMP, dst, &body[..len], None)?;
        let reply = host.wait_for(wait, |p| p.proto == PROTO_ICMP && p.src == dst && p.body[0] == 0 && p.body[4..6] == [0x7e, 0x57])?;
        results[0].1 = if reply.is_some() { "reply" } else { "none" };
    }
    if checks.contains("udp") {
        let len = udp_to(&mut body, UDP_SRC_PORT);
        host.ip(PROTO_UDP, dst, &body[..len], Some(6))?;
        let reply = host.wait_for(wait, |p| {
            p.proto == PROTO_UDP && p.src == dst && p.body[0..2] == port.to_be_bytes() && p.body[2..4] == UDP_SRC_PORT.to_be_bytes()
        })?;
        results[1].1 = if reply.is_some() { "reply" } else { "none" };
    }
    if checks.contains("tcp") {
        let iss = 0x1000_0000u32;
        let n = tcp_segment(TCP_SRC_PORT, port, iss, 0, TCP_SYN, &[], &mut body);
        host.ip(PROTO_TCP, dst, &body[..n], Some(16))?;
        let answer = host.wait_for(wait, |p| {
            p.proto == PROTO_TCP && p.src == dst && p.body[0..2] == port.to_be_bytes() && p.body[2..4] == TCP_SRC_PORT.to_be_bytes()
        })?;
        results[2].1 = match answer {
            Some(p) if p.body[13] & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK => {
                let their = u32::from_be_bytes(p.body[4..8].try_into().unwrap());
                // Complete the handshake, send a line, then reset: the server sees a connection.
                let n = tcp_segment(TCP_SRC_PORT, port, iss + 1, their + 1, TCP_ACK | TCP_PSH, PAYLOAD, &mut body);
                host.ip(PROTO_TCP, dst, &body[..n], Some(16))?;
                crate::hw::spin_cycles(wait / 10);
                let n = tcp_segment(TCP_SRC_PORT, port, iss + 1 + PAYLOAD.len() as u32, 0, TCP_RST, &[], &mut body);
                host.ip(PROTO_TCP, dst, &body[..n], Some(16))?;
                "open"
            }
            Some(p) if p.body[13] & TCP_RST != 0 => "refused",
            _ => "none",
        };
    }
    let flood = cmdline.number(TEST, "flood", 0);
    let flood_pps = if flood > 0 { flood_udp(&mut host, dst, port, flood, cmdline)? } else { 0 };
    let fetched = match cmdline.param(TEST, "get") {
        Some(paths) => fetch(&mut host, dst, cmdline, paths, wait)?,
        None => 0,
    };
    let listen = cmdline.number(TEST, "listen", 0) as u16;
    let (served, echoed) = if listen != 0 {
        let half_close = cmdline.param(TEST, "halfclose") == Some("on");
        let tally = cmdline.param(TEST, "tally") == Some("on");
        serve(&mut host, listen, cmdline.number(TEST, "serve", 20_000_000_000), half_close, tally)?
    } else {
        (0, 0)
    };
    host.dev.reset();
    let m = |m: [u8; 6]| m;
    let (a, b) = (m(mac), m(gw_mac));
    report::ok(
        TEST,
        format_args!(
            "mode=ip mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} gw_mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} peer={peer} {}={} {}={} {}={} served={served} others={} echoed={echoed} flood_pps={flood_pps} http={fetched}",
            a[0], a[1], a[2], a[3], a[4], a[5], b[0], b[1], b[2], b[3], b[4], b[5],
            results[0].0, results[0].1, results[1].0, results[1].1, results[2].0, results[2].1, host.others
        ),
    );
    Ok(())
}

/// Sends `count` UDP datagrams to dst:port, 16 in flight; returns packets per second.
fn flood_udp(host: &mut Host, dst: Ip, port: u16, count: u64, cmdline: Cmdline) -> Result<u64, &'static str> {
    const IN_FLIGHT: usize = 16;
    let size = (cmdline.number(TEST, "size", 64) as usize).clamp(8, 1400);
    let next_hop = host.next_hop;
    if cmdline.param(TEST, "broadcast") == Some("on") {
        host.next_hop = [0xff; 6];
    }
    // One frame built the usual way, then copied into each slot.
    let mut body = [0u8; 1408];
    body[0..2].copy_from_slice(&UDP_SRC_PORT.to_be_bytes());
    body[2..4].copy_from_slice(&port.to_be_bytes());
    body[4..6].copy_from_slice(&((8 + size) as u16).to_be_bytes());
    let frame_len = 14 + 20 + 8 + size;
    {
        // ip() sends it once: the template, and a first datagram.
        host.ip(PROTO_UDP, dst, &body[..8 + size], Some(6))?;
    }
    let template = bytes(host.tx_buf, HEADER + frame_len);
    let area = alloc(IN_FLIGHT * (HEADER + MAX_FRAME), 64).ok_or("out of probe memory")?;
    let slot = |i: usize| area + (i * (HEADER + MAX_FRAME)) as u64;
    for i in 0..IN_FLIGHT {
        bytes(slot(i), HEADER + frame_len).copy_from_slice(template);
    }
    let in_flight = usize::from(host.txq.size).min(IN_FLIGHT);
    let mut heads = [u16::MAX; IN_FLIGHT];
    let start = crate::hw::rdtsc();
    let (mut sent, mut done) = (1u64, 1u64);
    for (i, head) in heads.iter_mut().enumerate().take(in_flight) {
        if sent < count {
            *head = host.txq.push(&[Buffer::readable(slot(i), (HEADER + frame_len) as u32)]).ok_or("ring full")?;
            sent += 1;
        }
    }
    host.dev.notify(TX_QUEUE);
    while done < count {
        let deadline = crate::hw::rdtsc() + host.tx_timeout;
        let (head, _) = host.dev.wait_used(&mut host.txq, deadline).ok_or("transmissions stalled")?;
        done += 1;
        if sent < count {
            let i = heads.iter().position(|&h| h == head).ok_or("unknown buffer")?;
            heads[i] = host.txq.push(&[Buffer::readable(slot(i), (HEADER + frame_len) as u32)]).ok_or("ring full")?;
            sent += 1;
            host.dev.notify(TX_QUEUE);
        }
    }
    host.next_hop = next_hop;
    let khz = crate::tsc::khz(cmdline).unwrap_or(0).max(1);
    Ok(count * khz * 1000 / (crate::hw::rdtsc() - start).max(1))
}

/// Serves TCP on `port` until `cycles` pass: handshakes, echoes data, closes on FIN (or, with
/// `half_close`, only acknowledges it). One connection at a time is enough for the tests.
/// Returns the bytes echoed.
fn serve(host: &mut Host, port: u16, cycles: u64, half_close: bool, tally: bool) -> Result<(u64, u64), &'static str> {
    crate::println!("PROBE virtio-net listening port={port}");
    let end = crate::hw::rdtsc() + cycles;
    let mut body = [0u8; 64];
    let (mut served, mut echoed, mut our_seq) = (0u64, 0u64, 0x2000_0000u32);
    let mut arp = None;
    while let Some(p) = host.receive(end, &mut arp)? {
        if p.proto == PROTO_UDP && p.body_len >= 8 && p.body[2..4] == port.to_be_bytes() {
            // Echo: the ports swapped, the checksum left out (0 is allowed over IPv4).
            let n = p.body_len.min(body.len());
            body[..n].copy_from_slice(&p.body[..n]);
            body[0..2].copy_from_slice(&p.body[2..4]);
            body[2..4].copy_from_slice(&p.body[0..2]);
            body[4..6].copy_from_slice(&(n as u16).to_be_bytes());
            body[6..8].fill(0);
            host.ip_to(p.src_mac, PROTO_UDP, p.src, &body[..n], None)?;
            echoed += 1;
            if tally {
                crate::println!("PROBE virtio-net echoed={echoed}");
            }
            continue;
        }
        if p.proto != PROTO_TCP || p.body_len < 20 {
            continue;
        }
        if p.body[2..4] != port.to_be_bytes() {
            // A closed port: a SYN is refused, as any host refuses it.
            if p.body[13] & TCP_SYN != 0 && p.body[13] & TCP_ACK == 0 {
                let (theirs, to) = (u16::from_be_bytes([p.body[0], p.body[1]]), u16::from_be_bytes([p.body[2], p.body[3]]));
                let seq = u32::from_be_bytes(p.body[4..8].try_into().unwrap());
                let n = tcp_segment(to, theirs, 0, seq.wrapping_add(1), TCP_RST | TCP_ACK, &[], &mut body);
                host.ip_to(p.src_mac, PROTO_TCP, p.src, &body[..n], Some(16))?;
            }
            continue;
        }
        let peer_port = u16::from_be_bytes([p.body[0], p.body[1]]);
        let seq = u32::from_be_bytes(p.body[4..8].try_into().unwrap());
        let flags = p.body[13];
        let data_at = usize::from(p.body[12] >> 4) * 4;
        let data = &p.body[data_at.min(p.body_len)..p.body_len];
        let (reply_flags, ack, echo): (u8, u32, &[u8]) = if flags & TCP_SYN != 0 {
            our_seq = our_seq.wrapping_add(0x1000);
            (TCP_SYN | TCP_ACK, seq.wrapping_add(1), &[])
        } else if flags & TCP_FIN != 0 {
            let reply = if half_close { TCP_ACK } else { TCP_FIN | TCP_ACK };
            (reply, seq.wrapping_add(data.len() as u32 + 1), &[])
        } else if !data.is_empty() {
            served += data.len() as u64;
            (TCP_ACK | TCP_PSH, seq.wrapping_add(data.len() as u32), data)
        } else {
            continue;
        };
        let mut copy = [0u8; 44];
        let echo_len = echo.len().min(copy.len());
        copy[..echo_len].copy_from_slice(&echo[..echo_len]);
        let n = tcp_segment(port, peer_port, our_seq, ack, reply_flags, &copy[..echo_len], &mut body);
        // Back the way it came: the router, or a peer on the subnet.
        host.ip_to(p.src_mac, PROTO_TCP, p.src, &body[..n], Some(16))?;
        if reply_flags & TCP_SYN != 0 || reply_flags & TCP_FIN != 0 {
            our_seq = our_seq.wrapping_add(1);
        }
        our_seq = our_seq.wrapping_add(echo_len as u32);
    }
    Ok((served, echoed))
}

/// A request or response built in place.
struct Text {
    bytes: [u8; TEXT],
    len: usize,
}

const TEXT: usize = 1536;

impl core::fmt::Write for Text {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let end = self.len.checked_add(s.len()).filter(|&e| e <= self.bytes.len()).ok_or(core::fmt::Error)?;
        self.bytes[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// Sends `request` to dst:port over a fresh TCP connection from `src_port` and collects the
/// answer until the server closes; returns its length in `answer`.
fn http(host: &mut Host, dst: Ip, port: u16, src_port: u16, request: &[u8], wait: u64, answer: &mut [u8]) -> Result<usize, &'static str> {
    let ours = |p: &Packet| {
        p.proto == PROTO_TCP && p.src == dst && p.body_len >= 20 && p.body[0..2] == port.to_be_bytes() && p.body[2..4] == src_port.to_be_bytes()
    };
    let mut segment = [0u8; 1100];
    let iss = 0x3000_0000u32 | u32::from(src_port);
    let n = tcp_segment(src_port, port, iss, 0, TCP_SYN, &[], &mut segment);
    host.ip(PROTO_TCP, dst, &segment[..n], Some(16))?;
    let syn_ack = host.wait_for(wait, ours)?.ok_or("MMDS did not answer the SYN")?;
    if syn_ack.body[13] & (TCP_SYN | TCP_ACK) != TCP_SYN | TCP_ACK {
        return Err("MMDS refused the connection");
    }
    let mut expected = u32::from_be_bytes(syn_ack.body[4..8].try_into().unwrap()).wrapping_add(1);
    let our_seq = iss.wrapping_add(1);
    let n = tcp_segment(src_port, port, our_seq, expected, TCP_ACK | TCP_PSH, request, &mut segment);
    host.ip(PROTO_TCP, dst, &segment[..n], Some(16))?;
    let our_seq = our_seq.wrapping_add(request.len() as u32);
    let mut len = 0;
    loop {
        let p = host.wait_for(wait, ours)?.ok_or("MMDS went quiet before closing")?;
        let flags = p.body[13];
        if flags & TCP_RST != 0 {
            return Err("MMDS reset the connection");
        }
        let seq = u32::from_be_bytes(p.body[4..8].try_into().unwrap());
        let data_at = (usize::from(p.body[12] >> 4) * 4).min(p.body_len);
        let data = &p.body[data_at..p.body_len];
        if seq == expected && !data.is_empty() {
            let n = data.len().min(answer.len() - len);
            answer[len..len + n].copy_from_slice(&data[..n]);
            len += n;
            expected = expected.wrapping_add(data.len() as u32);
        }
        let fin = flags & TCP_FIN != 0 && seq.wrapping_add(data.len() as u32) == expected;
        if fin {
            expected = expected.wrapping_add(1);
        }
        let reply = if fin { TCP_ACK | TCP_FIN } else { TCP_ACK };
        let n = tcp_segment(src_port, port, our_seq, expected, reply, &[], &mut segment);
        host.ip(PROTO_TCP, dst, &segment[..n], Some(16))?;
        if fin {
            return Ok(len);
        }
    }
}

/// The `.get` requests (and a token first with `.token`); returns how many were answered.
fn fetch(host: &mut Host, dst: Ip, cmdline: Cmdline, paths: &str, wait: u64) -> Result<u64, &'static str> {
    use core::fmt::Write;
    let port = cmdline.number(TEST, "port", 80) as u16;
    let mut src_port = HTTP_SRC_PORT;
    let mut answer = [0u8; 1400];
    let mut token = Text { bytes: [0; TEXT], len: 0 };
    if let Some(ttl) = cmdline.param(TEST, "token") {
        let mut request = Text { bytes: [0; TEXT], len: 0 };
        let _ = write!(request, "PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: {ttl}\r\n\r\n");
        let n = http(host, dst, port, src_port, &request.bytes[..request.len], wait, &mut answer)?;
        src_port += 1;
        let body = report_answer(&answer[..n], "PUT", "/latest/api/token");
        let _ = token.write_str(body);
        crate::hw::spin_cycles(cmdline.number(TEST, "tokenwait", 0));
    }
    if cmdline.param(TEST, "forged") == Some("on") {
        token.len = 0;
        let _ = token.write_str("forged-token");
    }
    let json = cmdline.param(TEST, "accept") == Some("json");
    let mut answered = 0;
    for path in paths.split(',') {
        let mut request = Text { bytes: [0; TEXT], len: 0 };
        let _ = write!(request, "GET {path} HTTP/1.1\r\n");
        if token.len > 0 {
            let _ = write!(request, "X-metadata-token: {}\r\n", core::str::from_utf8(&token.bytes[..token.len]).unwrap_or(""));
        }
        if json {
            let _ = write!(request, "Accept: application/json\r\n");
        }
        let _ = write!(request, "\r\n");
        let n = http(host, dst, port, src_port, &request.bytes[..request.len], wait, &mut answer)?;
        src_port += 1;
        report_answer(&answer[..n], "GET", path);
        answered += 1;
    }
    Ok(answered)
}

/// Prints an HTTP answer's status and body on one line; returns the body.
fn report_answer<'a>(answer: &'a [u8], method: &str, path: &str) -> &'a str {
    use core::fmt::Write;
    let text = core::str::from_utf8(answer).unwrap_or("");
    let status = text.get(9..12).unwrap_or("???");
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let mut line = Text { bytes: [0; TEXT], len: 0 };
    for (i, part) in body.split('\n').enumerate() {
        let _ = write!(line, "{}{part}", if i > 0 { "|" } else { "" });
    }
    let shown = core::str::from_utf8(&line.bytes[..line.len]).unwrap_or("");
    crate::println!("PROBE virtio-net http method={method} path={path} status={status} body={shown}");
    body
}
