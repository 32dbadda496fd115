//! What the firewall reads of a frame: Ethernet, ARP, IPv4, and IPv6 past its extension
//! headers; TCP and UDP ports, ICMP and ICMPv6 echo identifiers; the DHCP, DHCPv6 and router
//! advertisement fields the guards learn addresses from. Pure functions of the bytes, bounded
//! by them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub(super) const ETH_IPV4: u16 = 0x0800;
pub(super) const ETH_IPV6: u16 = 0x86dd;
pub(super) const ETH_ARP: u16 = 0x0806;
pub(super) const ETH_VLAN: u16 = 0x8100;
pub const PROTO_ICMP: u8 = 1;
pub const PROTO_TCP: u8 = 6;
pub const PROTO_UDP: u8 = 17;
pub const PROTO_ICMPV6: u8 = 58;
/// IPv6 extension headers a packet may carry before its upper-layer header.
pub const MAX_EXTENSION_HEADERS: usize = 8;
pub(super) const ICMPV6_ECHO_REQUEST: u8 = 128;
pub(super) const ICMPV6_ECHO_REPLY: u8 = 129;
pub(super) const ICMPV6_MLD_QUERY: u8 = 130;
pub(super) const ICMPV6_MLD_REPORT: u8 = 131;
pub(super) const ICMPV6_ROUTER_SOLICIT: u8 = 133;
pub(super) const ICMPV6_ROUTER_ADVERT: u8 = 134;
pub(super) const ICMPV6_NEIGHBOR_SOLICIT: u8 = 135;
pub(super) const ICMPV6_NEIGHBOR_ADVERT: u8 = 136;
pub(super) const ICMPV6_REDIRECT: u8 = 137;
pub(super) const ICMPV6_MLD2_REPORT: u8 = 143;

/// The parts of a frame the firewall looks at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Packet {
    pub(super) src_mac: [u8; 6],
    pub(super) dst_mac: [u8; 6],
    pub(super) kind: Kind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Kind {
    /// IPv4 or IPv6, with the upper-layer protocol past any extension headers.
    Ip {
        src: IpAddr,
        dst: IpAddr,
        proto: u8,
        ports: Option<(u16, u16)>,
        tcp_flags: u8,
        fragment: Fragment,
        dhcp: Option<Dhcp>,
        icmpv6: Option<Icmpv6>,
        /// The first address a DHCPv6 Reply hands out (IA_NA).
        dhcpv6_address: Option<Ipv6Addr>,
    },
    Arp {
        sender_mac: [u8; 6],
        sender_ip: Ipv4Addr,
    },
    /// Everything else: only protocol `any` rules without a peer match it.
    Other,
    /// IPv6 with more extension headers than MAX_EXTENSION_HEADERS.
    HeaderChain,
    /// Too short or malformed to be what it says.
    Broken,
}

/// Where a packet stands among fragments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Fragment {
    Whole,
    /// The first fragment (offset 0, more to come), with the packet's identification.
    First(u32),
    /// A later fragment: no upper-layer header.
    Later(u32),
}

/// What the firewall reads of an ICMPv6 message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Icmpv6 {
    pub(super) kind: u8,
    /// A neighbour solicitation's or advertisement's target.
    pub(super) target: Option<Ipv6Addr>,
    /// A router advertisement's first prefix for address autoconfiguration (a /64 with the
    /// autonomous flag).
    pub(super) slaac_prefix: Option<Ipv6Addr>,
}

/// A DHCP message's type and the address it hands out, from a BOOTP reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Dhcp {
    pub(super) op: u8,
    pub(super) chaddr: [u8; 6],
    pub(super) yiaddr: Ipv4Addr,
    pub(super) message_type: Option<u8>,
}

pub(super) fn parse(frame: &[u8]) -> Option<Packet> {
    let mac = |at: usize| -> [u8; 6] { frame[at..at + 6].try_into().expect("six bytes") };
    if frame.len() < 14 {
        return None;
    }
    let (dst_mac, src_mac) = (mac(0), mac(6));
    let mut ethertype = u16::from_be_bytes([frame[12], frame[13]]);
    let mut at = 14;
    if ethertype == ETH_VLAN && frame.len() >= 18 {
        ethertype = u16::from_be_bytes([frame[16], frame[17]]);
        at = 18;
    }
    let payload = &frame[at..];
    let kind = match ethertype {
        ETH_IPV4 => parse_ipv4(payload),
        ETH_IPV6 => parse_ipv6(payload),
        ETH_ARP if payload.len() >= 28 => Kind::Arp {
            sender_mac: payload[8..14].try_into().expect("six bytes"),
            sender_ip: Ipv4Addr::new(payload[14], payload[15], payload[16], payload[17]),
        },
        ETH_ARP => Kind::Broken,
        _ => Kind::Other,
    };
    Some(Packet { src_mac, dst_mac, kind })
}

pub(super) fn parse_ipv4(p: &[u8]) -> Kind {
    if p.len() < 20 || p[0] >> 4 != 4 {
        return Kind::Broken;
    }
    let header = usize::from(p[0] & 0xf) * 4;
    let total = usize::from(u16::from_be_bytes([p[2], p[3]]));
    if header < 20 || total < header || p.len() < header {
        return Kind::Broken;
    }
    let (src, dst) = (Ipv4Addr::new(p[12], p[13], p[14], p[15]), Ipv4Addr::new(p[16], p[17], p[18], p[19]));
    let proto = p[9];
    let flags_offset = u16::from_be_bytes([p[6], p[7]]);
    let id = u32::from(u16::from_be_bytes([p[4], p[5]]));
    let fragment = match (flags_offset & 0x1fff, flags_offset & 0x2000 != 0) {
        (0, false) => Fragment::Whole,
        (0, true) => Fragment::First(id),
        _ => Fragment::Later(id),
    };
    let l4 = &p[header..total.min(p.len())];
    let (mut ports, mut tcp_flags, mut dhcp) = (None, 0, None);
    if fragment != Fragment::Later(id) {
        (ports, tcp_flags) = transport(proto, l4);
        match proto {
            PROTO_UDP if l4.len() >= 8 + 240 => dhcp = parse_dhcp(&l4[8..]),
            // An ICMP echo's identifier stands in for a port, so that replies find their flow.
            PROTO_ICMP if l4.len() >= 8 && matches!(l4[0], 0 | 8) => {
                let id = u16::from_be_bytes([l4[4], l4[5]]);
                ports = Some((id, id));
            }
            _ => {}
        }
    }
    let (src, dst) = (IpAddr::V4(src), IpAddr::V4(dst));
    Kind::Ip { src, dst, proto, ports, tcp_flags, fragment, dhcp, icmpv6: None, dhcpv6_address: None }
}

/// TCP's and UDP's ports, and TCP's flags.
pub(super) fn transport(proto: u8, l4: &[u8]) -> (Option<(u16, u16)>, u8) {
    match proto {
        PROTO_TCP | PROTO_UDP if l4.len() >= 4 => {
            let ports = Some((u16::from_be_bytes([l4[0], l4[1]]), u16::from_be_bytes([l4[2], l4[3]])));
            (ports, if proto == PROTO_TCP && l4.len() >= 14 { l4[13] } else { 0 })
        }
        _ => (None, 0),
    }
}

pub(super) fn ipv6_at(b: &[u8], at: usize) -> Option<Ipv6Addr> {
    let bytes: [u8; 16] = b.get(at..at + 16)?.try_into().ok()?;
    Some(Ipv6Addr::from(bytes))
}

pub(super) fn parse_ipv6(p: &[u8]) -> Kind {
    if p.len() < 40 || p[0] >> 4 != 6 {
        return Kind::Broken;
    }
    let end = (40 + usize::from(u16::from_be_bytes([p[4], p[5]]))).min(p.len());
    let (src, dst) = (ipv6_at(p, 8).expect("40 bytes"), ipv6_at(p, 24).expect("40 bytes"));
    let (mut next, mut at, mut fragment) = (p[6], 40, Fragment::Whole);
    let mut headers = 0;
    // Walk the extension headers to the upper-layer one.
    loop {
        let length = match next {
            // Hop-by-hop, routing, destination options, mobility, HIP, shim6: 8-octet units.
            0 | 43 | 60 | 135 | 139 | 140 => p.get(at + 1).map(|&l| (usize::from(l) + 1) * 8),
            // The authentication header counts 4-octet units, less two.
            51 => p.get(at + 1).map(|&l| (usize::from(l) + 2) * 4),
            44 => {
                let Some(h) = p.get(at..at + 8) else { return Kind::Broken };
                let offset = u16::from_be_bytes([h[2], h[3]]) >> 3;
                let id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
                fragment = match (offset, h[3] & 1 != 0) {
                    (0, false) => Fragment::Whole,
                    (0, true) => Fragment::First(id),
                    _ => Fragment::Later(id),
                };
                Some(8)
            }
            _ => break,
        };
        let Some(length) = length.filter(|l| at + l <= end) else { return Kind::Broken };
        headers += 1;
        if headers > MAX_EXTENSION_HEADERS {
            return Kind::HeaderChain;
        }
        next = p[at];
        at += length;
        if matches!(fragment, Fragment::Later(_)) {
            break;
        }
    }
    let proto = next;
    let l4 = &p[at..end];
    let (mut ports, mut tcp_flags, mut icmpv6, mut dhcpv6_address) = (None, 0, None, None);
    if !matches!(fragment, Fragment::Later(_)) {
        (ports, tcp_flags) = transport(proto, l4);
        match proto {
            PROTO_UDP if ports == Some((547, 546)) => dhcpv6_address = parse_dhcpv6_reply(l4.get(8..).unwrap_or(&[])),
            PROTO_ICMPV6 if !l4.is_empty() => {
                let kind = l4[0];
                if matches!(kind, ICMPV6_ECHO_REQUEST | ICMPV6_ECHO_REPLY) && l4.len() >= 8 {
                    let id = u16::from_be_bytes([l4[4], l4[5]]);
                    ports = Some((id, id));
                }
                let target =
                    matches!(kind, ICMPV6_NEIGHBOR_SOLICIT | ICMPV6_NEIGHBOR_ADVERT).then(|| ipv6_at(l4, 8)).flatten();
                let slaac_prefix = (kind == ICMPV6_ROUTER_ADVERT).then(|| slaac_prefix(l4)).flatten();
                icmpv6 = Some(Icmpv6 { kind, target, slaac_prefix });
            }
            _ => {}
        }
    }
    let (src, dst) = (IpAddr::V6(src), IpAddr::V6(dst));
    Kind::Ip { src, dst, proto, ports, tcp_flags, fragment, dhcp: None, icmpv6, dhcpv6_address }
}

/// ICMPv6's neighbour discovery (router and neighbour solicitations and advertisements,
/// redirects) and multicast listener messages.
pub(super) fn is_neighbor_discovery(kind: u8) -> bool {
    matches!(kind, ICMPV6_MLD_QUERY | ICMPV6_MLD_REPORT | 132 | ICMPV6_MLD2_REPORT) || (133..=137).contains(&kind)
}

/// A router advertisement's first prefix information option with the autonomous flag and a
/// /64 prefix, the one a host forms its address from.
pub(super) fn slaac_prefix(ra: &[u8]) -> Option<Ipv6Addr> {
    let mut at = 16;
    // Options are at least 8 octets: the loop ends within the message's length.
    while let (Some(&kind), Some(&units)) = (ra.get(at), ra.get(at + 1)) {
        let length = usize::from(units) * 8;
        if length == 0 {
            return None;
        }
        if kind == 3 && length == 32 && ra.get(at + 2) == Some(&64) && ra.get(at + 3).is_some_and(|f| f & 0x40 != 0) {
            return ipv6_at(ra, at + 16);
        }
        at += length;
    }
    None
}

/// The first address of a DHCPv6 Reply's IA_NA, if the message is one.
pub(super) fn parse_dhcpv6_reply(m: &[u8]) -> Option<Ipv6Addr> {
    const REPLY: u8 = 7;
    const IA_NA: u16 = 3;
    const IAADDR: u16 = 5;
    if m.first() != Some(&REPLY) {
        return None;
    }
    let option = |b: &[u8], at: usize| -> Option<(u16, usize)> {
        let h = b.get(at..at + 4)?;
        Some((u16::from_be_bytes([h[0], h[1]]), usize::from(u16::from_be_bytes([h[2], h[3]]))))
    };
    let mut at = 4;
    while let Some((code, length)) = option(m, at) {
        let body = m.get(at + 4..at + 4 + length)?;
        if code == IA_NA && body.len() >= 12 {
            let mut inner = 12;
            while let Some((code, length)) = option(body, inner) {
                if code == IAADDR && length >= 24 {
                    return ipv6_at(body, inner + 4);
                }
                inner += 4 + length;
            }
        }
        at += 4 + length;
    }
    None
}

/// The link-local address a host forms from its MAC (modified EUI-64), and its interface
/// identifier on any /64.
pub(super) fn eui64(prefix: Ipv6Addr, mac: [u8; 6]) -> Ipv6Addr {
    let p = prefix.octets();
    Ipv6Addr::from([
        p[0],
        p[1],
        p[2],
        p[3],
        p[4],
        p[5],
        p[6],
        p[7],
        mac[0] ^ 2,
        mac[1],
        mac[2],
        0xff,
        0xfe,
        mac[3],
        mac[4],
        mac[5],
    ])
}

pub(super) fn parse_dhcp(b: &[u8]) -> Option<Dhcp> {
    if b[236..240] != [99, 130, 83, 99] {
        return None;
    }
    let mut message_type = None;
    let mut at = 240;
    while at + 1 < b.len() {
        match b[at] {
            0 => at += 1,
            255 => break,
            code => {
                let len = usize::from(b[at + 1]);
                if code == 53 && len == 1 && at + 2 < b.len() {
                    message_type = Some(b[at + 2]);
                }
                at += 2 + len;
            }
        }
    }
    Some(Dhcp {
        op: b[0],
        chaddr: b[28..34].try_into().expect("six bytes"),
        yiaddr: Ipv4Addr::new(b[16], b[17], b[18], b[19]),
        message_type,
    })
}
