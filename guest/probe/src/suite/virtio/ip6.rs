//! `virtio-net` with `probe.virtio-net.mode=ip6`: a tiny IPv6 host on one link. Its addresses
//! are the link-local one its MAC gives (modified EUI-64) and `.ip6` if given, which it sends
//! from; it answers neighbour solicitations for them and echo requests. With `.dst6` it finds
//! that neighbour (neighbour discovery) and tries each of `.checks` (icmp,udp,tcp) against it,
//! as the IPv4 mode does: an echo request, a datagram to `.port` (7777) that should come back,
//! and a SYN to `.port`. It reports what came back:
//!
//!     PROBE virtio-net ok mode=ip6 mac=... peer=nd icmp=reply udp=reply tcp=open ...
//!
//! For the firewall: `.forge=N` first sends N datagrams to dst6:port from a forged source
//! address, `.ra=N` N router advertisements of 2001:db8:bad::/64 to all nodes, `.na=N` N
//! neighbour advertisements claiming dst6's address, and `.dhcp=N` N DHCPv6 server answers.
//! With `.listen=PORT` it serves for `.serve` (20G) cycles: datagrams to the port are echoed
//! back and counted (`echoed=N`), a SYN to it gets SYN-ACK and one to another port RST.
//! `others=N` counts the IPv6 packets for it that were none of these.

use super::ip::{Host, MAX_FRAME, PAYLOAD, TCP_ACK, TCP_RST, TCP_SYN, checksum, fold, tcp_segment};
use crate::cmdline::{Cmdline, VirtioMmioSlot};
use crate::report;

const TEST: &str = "virtio-net";
const ETH_IPV6: u16 = 0x86dd;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
const PROTO_ICMPV6: u8 = 58;
const ECHO_REQUEST: u8 = 128;
const ECHO_REPLY: u8 = 129;
const ROUTER_ADVERT: u8 = 134;
const NEIGHBOR_SOLICIT: u8 = 135;
const NEIGHBOR_ADVERT: u8 = 136;
const UDP_SRC_PORT: u16 = 40000;
const TCP_SRC_PORT: u16 = 40001;
const ECHO_ID: [u8; 2] = [0x7e, 0x57];
/// The most of a packet's upper-layer part kept.
const BODY: usize = MAX_FRAME - 54;

type Ip6 = [u8; 16];

const ALL_NODES: Ip6 = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// `2001:db8::1`, `fe80::ff:fe00:1`: eight groups, one `::` for a run of zeros.
fn parse_ip6(text: &str) -> Option<Ip6> {
    let mut groups = [0u16; 8];
    let (head, tail) = match text.split_once("::") {
        Some((h, t)) => (h, Some(t)),
        None => (text, None),
    };
    let parse = |part: &str, out: &mut [u16]| -> Option<usize> {
        if part.is_empty() {
            return Some(0);
        }
        let mut n = 0;
        for g in part.split(':') {
            *out.get_mut(n)? = u16::from_str_radix(g, 16).ok().filter(|_| (1..=4).contains(&g.len()))?;
            n += 1;
        }
        Some(n)
    };
    let mut front = [0u16; 8];
    let mut back = [0u16; 8];
    let n_front = parse(head, &mut front)?;
    let n_back = match tail {
        Some(t) => parse(t, &mut back)?,
        None if n_front == 8 => 0,
        None => return None,
    };
    if n_front + n_back > if tail.is_some() { 7 } else { 8 } {
        return None;
    }
    groups[..n_front].copy_from_slice(&front[..n_front]);
    groups[8 - n_back..].copy_from_slice(&back[..n_back]);
    let mut ip = [0u8; 16];
    for (i, g) in groups.iter().enumerate() {
        ip[2 * i..2 * i + 2].copy_from_slice(&g.to_be_bytes());
    }
    Some(ip)
}

/// fe80::/64 with the interface identifier a MAC gives.
fn link_local(mac: [u8; 6]) -> Ip6 {
    [0xfe, 0x80, 0, 0, 0, 0, 0, 0, mac[0] ^ 2, mac[1], mac[2], 0xff, 0xfe, mac[3], mac[4], mac[5]]
}

/// The solicited-node multicast address of `ip`, and its MAC.
fn solicited_node(ip: &Ip6) -> (Ip6, [u8; 6]) {
    let mut group = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0xff, 0, 0, 0];
    group[13..16].copy_from_slice(&ip[13..16]);
    (group, [0x33, 0x33, 0xff, ip[13], ip[14], ip[15]])
}

fn multicast_mac(ip: &Ip6) -> [u8; 6] {
    [0x33, 0x33, ip[12], ip[13], ip[14], ip[15]]
}

/// A received IPv6 packet for us.
struct Packet {
    next: u8,
    src: Ip6,
    src_mac: [u8; 6],
    body: [u8; BODY],
    len: usize,
}

struct Host6 {
    host: Host,
    link_local: Ip6,
    /// The address it sends from: `.ip6`, or its link-local one.
    source: Ip6,
    /// IPv6 packets for it that no check or service took.
    others: u64,
}

impl Host6 {
    fn owns(&self, ip: &Ip6) -> bool {
        *ip == self.link_local || *ip == self.source || ip[0] == 0xff
    }

    /// An IPv6 packet from `src` to `dst` at `dst_mac`; the upper-layer checksum at `csum_at`
    /// in `body` is filled in over the pseudo-header.
    fn send(&mut self, dst_mac: [u8; 6], src: Ip6, dst: Ip6, next: u8, body: &[u8], csum_at: usize) -> Result<(), &'static str> {
        let f = self.host.frame();
        self.host.ethernet(f, dst_mac, ETH_IPV6);
        let hop_limit = if next == PROTO_ICMPV6 { 255 } else { 64 };
        f[14..22].copy_from_slice(&[0x60, 0, 0, 0, (body.len() >> 8) as u8, body.len() as u8, next, hop_limit]);
        f[22..38].copy_from_slice(&src);
        f[38..54].copy_from_slice(&dst);
        let l4 = &mut f[54..54 + body.len()];
        l4.copy_from_slice(body);
        l4[csum_at..csum_at + 2].fill(0);
        let mut pseudo = [0u8; 40];
        pseudo[0..16].copy_from_slice(&src);
        pseudo[16..32].copy_from_slice(&dst);
        pseudo[32..36].copy_from_slice(&(body.len() as u32).to_be_bytes());
        pseudo[39] = next;
        let sum = fold(checksum(checksum(0, &pseudo), l4));
        l4[csum_at..csum_at + 2].copy_from_slice(&sum.to_be_bytes());
        self.host.send(54 + body.len())
    }

    /// A neighbour advertisement for `target` (solicited and overriding when `to` asked).
    fn advertise(&mut self, to_mac: [u8; 6], to: Ip6, target: Ip6, solicited: bool) -> Result<(), &'static str> {
        let mut na = [0u8; 32];
        na[0] = NEIGHBOR_ADVERT;
        na[4] = if solicited { 0x60 } else { 0x20 };
        na[8..24].copy_from_slice(&target);
        na[24..26].copy_from_slice(&[2, 1]);
        na[26..32].copy_from_slice(&self.host.mac);
        let src = self.source;
        self.send(to_mac, src, to, PROTO_ICMPV6, &na, 2)
    }

    /// The next IPv6 packet for us before `deadline`: neighbour solicitations for our
    /// addresses and echo requests are answered on the way.
    fn receive(&mut self, deadline: u64) -> Result<Option<Packet>, &'static str> {
        let mut copy = [0u8; MAX_FRAME];
        loop {
            let Some(n) = self.host.next_frame(deadline, &mut copy)? else { return Ok(None) };
            let f = &copy[..n];
            if n < 54 || u16::from_be_bytes([f[12], f[13]]) != ETH_IPV6 || f[14] >> 4 != 6 {
                continue;
            }
            let dst: Ip6 = f[38..54].try_into().unwrap();
            if !self.owns(&dst) {
                continue;
            }
            let len = usize::from(u16::from_be_bytes([f[18], f[19]])).min(n - 54).min(BODY);
            let mut packet = Packet { next: f[20], src: f[22..38].try_into().unwrap(), src_mac: f[6..12].try_into().unwrap(), body: [0; BODY], len };
            packet.body[..len].copy_from_slice(&f[54..54 + len]);
            if packet.next == PROTO_ICMPV6 && len >= 24 && packet.body[0] == NEIGHBOR_SOLICIT {
                let target: Ip6 = packet.body[8..24].try_into().unwrap();
                if target == self.source || target == self.link_local {
                    // From :: (duplicate address detection) the answer goes to all nodes.
                    let (to, to_mac, solicited) =
                        if packet.src == [0; 16] { (ALL_NODES, multicast_mac(&ALL_NODES), false) } else { (packet.src, packet.src_mac, true) };
                    self.advertise(to_mac, to, target, solicited)?;
                }
                continue;
            }
            if packet.next == PROTO_ICMPV6 && len >= 8 && packet.body[0] == ECHO_REQUEST {
                let mut reply = packet.body;
                reply[0] = ECHO_REPLY;
                let src = self.source;
                self.send(packet.src_mac, src, packet.src, PROTO_ICMPV6, &reply[..len], 2)?;
                continue;
            }
            return Ok(Some(packet));
        }
    }

    /// The MAC of neighbour `target`, from its advertisement.
    fn resolve(&mut self, target: Ip6, wait: u64) -> Result<Option<[u8; 6]>, &'static str> {
        let (group, group_mac) = solicited_node(&target);
        for _ in 0..3 {
            let mut ns = [0u8; 32];
            ns[0] = NEIGHBOR_SOLICIT;
            ns[8..24].copy_from_slice(&target);
            ns[24..26].copy_from_slice(&[1, 1]);
            ns[26..32].copy_from_slice(&self.host.mac);
            let src = self.source;
            self.send(group_mac, src, group, PROTO_ICMPV6, &ns, 2)?;
            let deadline = crate::hw::rdtsc() + wait / 3;
            while let Some(p) = self.receive(deadline)? {
                if p.next == PROTO_ICMPV6 && p.len >= 24 && p.body[0] == NEIGHBOR_ADVERT && p.body[8..24] == target {
                    return Ok(Some(p.src_mac));
                }
                self.others += 1;
            }
        }
        Ok(None)
    }

    fn wait_for(&mut self, wait: u64, wanted: impl Fn(&Packet) -> bool) -> Result<Option<Packet>, &'static str> {
        let deadline = crate::hw::rdtsc() + wait;
        while let Some(p) = self.receive(deadline)? {
            if wanted(&p) {
                return Ok(Some(p));
            }
            self.others += 1;
        }
        Ok(None)
    }
}

fn udp(src_port: u16, dst_port: u16, payload: &[u8], out: &mut [u8]) -> usize {
    let len = 8 + payload.len();
    out[0..2].copy_from_slice(&src_port.to_be_bytes());
    out[2..4].copy_from_slice(&dst_port.to_be_bytes());
    out[4..6].copy_from_slice(&(len as u16).to_be_bytes());
    out[8..len].copy_from_slice(payload);
    len
}

pub fn test(slot: &VirtioMmioSlot, cmdline: Cmdline) -> Result<(), &'static str> {
    let given = match cmdline.param(TEST, "ip6") {
        Some(text) => Some(parse_ip6(text).ok_or("probe.virtio-net.ip6 is not an IPv6 address")?),
        None => None,
    };
    let dst = match cmdline.param(TEST, "dst6") {
        Some(text) => Some(parse_ip6(text).ok_or("probe.virtio-net.dst6 is not an IPv6 address")?),
        None => None,
    };
    let port = cmdline.number(TEST, "port", 7777) as u16;
    let wait = cmdline.number(TEST, "wait", 5_000_000_000);
    let checks = cmdline.param(TEST, "checks").unwrap_or("icmp,udp,tcp");
    let host = Host::open(slot, cmdline, [0; 4])?;
    let link_local = link_local(host.mac);
    let mut h = Host6 { host, link_local, source: given.unwrap_or(link_local), others: 0 };

    let mut peer = "-";
    let mut results: [(&str, &str); 3] = [("icmp", "-"), ("udp", "-"), ("tcp", "-")];
    let mut body = [0u8; 128];
    if let Some(dst) = dst {
        let peer_mac = h.resolve(dst, wait)?;
        peer = if peer_mac.is_some() { "nd" } else { "none" };
        let to = peer_mac.unwrap_or(multicast_mac(&dst));
        let own = h.source;
        for _ in 0..cmdline.number(TEST, "forge", 0) {
            let mut forged = own;
            forged[15] = forged[15].wrapping_add(100);
            let n = udp(UDP_SRC_PORT, port, PAYLOAD, &mut body);
            h.send(to, forged, dst, PROTO_UDP, &body[..n], 6)?;
        }
        for _ in 0..cmdline.number(TEST, "ra", 0) {
            // Router lifetime 1800 s and one prefix, 2001:db8:bad::/64, on-link and autonomous.
            let mut ra = [0u8; 48];
            ra[0] = ROUTER_ADVERT;
            ra[4] = 64;
            ra[6..8].copy_from_slice(&1800u16.to_be_bytes());
            ra[16..20].copy_from_slice(&[3, 4, 64, 0xc0]);
            ra[20..24].copy_from_slice(&86400u32.to_be_bytes());
            ra[24..28].copy_from_slice(&14400u32.to_be_bytes());
            ra[32..38].copy_from_slice(&[0x20, 0x01, 0x0d, 0xb8, 0x0b, 0xad]);
            let ll = h.link_local;
            h.send(multicast_mac(&ALL_NODES), ll, ALL_NODES, PROTO_ICMPV6, &ra, 2)?;
        }
        for _ in 0..cmdline.number(TEST, "na", 0) {
            h.advertise(multicast_mac(&ALL_NODES), ALL_NODES, dst, false)?;
        }
        for _ in 0..cmdline.number(TEST, "dhcp", 0) {
            // A DHCPv6 Reply (type 7), as a server answers.
            let n = udp(547, 546, &[7, 0, 0, 1], &mut body);
            h.send(to, own, dst, PROTO_UDP, &body[..n], 6)?;
        }
        if peer_mac.is_some() && checks.contains("icmp") {
            body[..8].copy_from_slice(&[ECHO_REQUEST, 0, 0, 0, ECHO_ID[0], ECHO_ID[1], 0, 1]);
            body[8..8 + PAYLOAD.len()].copy_from_slice(PAYLOAD);
            h.send(to, own, dst, PROTO_ICMPV6, &body[..8 + PAYLOAD.len()], 2)?;
            let reply = h.wait_for(wait, |p| p.next == PROTO_ICMPV6 && p.src == dst && p.body[0] == ECHO_REPLY && p.body[4..6] == ECHO_ID)?;
            results[0].1 = if reply.is_some() { "reply" } else { "none" };
        }
        if peer_mac.is_some() && checks.contains("udp") {
            let n = udp(UDP_SRC_PORT, port, PAYLOAD, &mut body);
            h.send(to, own, dst, PROTO_UDP, &body[..n], 6)?;
            let reply = h.wait_for(wait, |p| {
                p.next == PROTO_UDP && p.src == dst && p.body[0..2] == port.to_be_bytes() && p.body[2..4] == UDP_SRC_PORT.to_be_bytes()
            })?;
            results[1].1 = if reply.is_some() { "reply" } else { "none" };
        }
        if peer_mac.is_some() && checks.contains("tcp") {
            let n = tcp_segment(TCP_SRC_PORT, port, 0x1000_0000, 0, TCP_SYN, &[], &mut body);
            h.send(to, own, dst, PROTO_TCP, &body[..n], 16)?;
            let answer = h.wait_for(wait, |p| {
                p.next == PROTO_TCP && p.src == dst && p.body[0..2] == port.to_be_bytes() && p.body[2..4] == TCP_SRC_PORT.to_be_bytes()
            })?;
            results[2].1 = match answer {
                Some(p) if p.body[13] & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK => {
                    let n = tcp_segment(TCP_SRC_PORT, port, 0x1000_0001, 0, TCP_RST, &[], &mut body);
                    h.send(to, own, dst, PROTO_TCP, &body[..n], 16)?;
                    "open"
                }
                Some(p) if p.body[13] & TCP_RST != 0 => "refused",
                _ => "none",
            };
        }
    }
    let listen = cmdline.number(TEST, "listen", 0) as u16;
    let echoed = if listen != 0 { serve(&mut h, listen, cmdline.number(TEST, "serve", 20_000_000_000))? } else { 0 };
    h.host.dev.reset();
    let a = h.host.mac;
    report::ok(
        TEST,
        format_args!(
            "mode=ip6 mac={:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x} peer={peer} {}={} {}={} {}={} echoed={echoed} others={}",
            a[0], a[1], a[2], a[3], a[4], a[5], results[0].0, results[0].1, results[1].0, results[1].1, results[2].0, results[2].1, h.others
        ),
    );
    Ok(())
}

/// Serves `port` for `cycles`: datagrams echoed (and counted), SYNs answered.
fn serve(h: &mut Host6, port: u16, cycles: u64) -> Result<u64, &'static str> {
    crate::println!("PROBE virtio-net listening port={port}");
    let deadline = crate::hw::rdtsc() + cycles;
    let (mut echoed, mut out) = (0, [0u8; BODY]);
    let own = h.source;
    while let Some(p) = h.receive(deadline)? {
        let to_port = p.len >= 4 && p.body[2..4] == port.to_be_bytes();
        let their_port = u16::from_be_bytes([p.body[0], p.body[1]]);
        match p.next {
            PROTO_UDP if to_port && p.len >= 8 => {
                let n = udp(port, their_port, &p.body[8..p.len], &mut out);
                h.send(p.src_mac, own, p.src, PROTO_UDP, &out[..n], 6)?;
                echoed += 1;
            }
            PROTO_TCP if p.len >= 20 && p.body[13] & TCP_SYN != 0 && p.body[13] & TCP_ACK == 0 => {
                let their_seq = u32::from_be_bytes(p.body[4..8].try_into().unwrap());
                let flags = if to_port { TCP_SYN | TCP_ACK } else { TCP_RST | TCP_ACK };
                let n = tcp_segment(port_of(&p), their_port, 0x2000_0000, their_seq + 1, flags, &[], &mut out);
                h.send(p.src_mac, own, p.src, PROTO_TCP, &out[..n], 16)?;
            }
            PROTO_TCP => {}
            _ => h.others += 1,
        }
    }
    Ok(echoed)
}

/// The port a TCP segment went to.
fn port_of(p: &Packet) -> u16 {
    u16::from_be_bytes([p.body[2], p.body[3]])
}
