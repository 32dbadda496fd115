//! A small DHCP server (RFC 2131) for a managed network: one address per MAC, stable across
//! restarts (the leases are kept in a file), the gateway as router and DNS server.
//!
//! Against a guest that forges requests to take every address: each lease belongs to the port
//! the request came from (the caller tells which), a port holds at most MAX_LEASES_PER_PORT
//! live leases, and a lease not renewed within LEASE_SECONDS expires and its address goes back
//! to the pool. Lookups by MAC and by address are ordered maps (O(log n)).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

const OP_REQUEST: u8 = 1;
const OP_REPLY: u8 = 2;
const MAGIC: [u8; 4] = [99, 130, 83, 99];
const HEADER: usize = 240;

pub const DISCOVER: u8 = 1;
pub const OFFER: u8 = 2;
pub const REQUEST: u8 = 3;
pub const DECLINE: u8 = 4;
pub const ACK: u8 = 5;
pub const NAK: u8 = 6;
pub const RELEASE: u8 = 7;

const OPT_PAD: u8 = 0;
const OPT_SUBNET_MASK: u8 = 1;
const OPT_ROUTER: u8 = 3;
const OPT_DNS: u8 = 6;
const OPT_REQUESTED_IP: u8 = 50;
const OPT_LEASE_TIME: u8 = 51;
const OPT_MESSAGE_TYPE: u8 = 53;
const OPT_SERVER_ID: u8 = 54;
const OPT_END: u8 = 255;

/// The lease time handed out, in seconds.
pub const LEASE_SECONDS: u32 = 3600;
/// Live leases one port may hold: a VM has an address per interface, a nested guest a few.
pub const MAX_LEASES_PER_PORT: usize = 4;

/// What a client asked, from a BOOTREQUEST.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientMessage {
    pub kind: u8,
    pub xid: [u8; 4],
    pub flags: [u8; 2],
    pub ciaddr: Ipv4Addr,
    pub mac: [u8; 6],
    pub requested: Option<Ipv4Addr>,
    pub server_id: Option<Ipv4Addr>,
}

/// Parses a client's packet; None for anything that is not a well-formed Ethernet BOOTREQUEST.
pub fn parse(packet: &[u8]) -> Option<ClientMessage> {
    if packet.len() < HEADER || packet[0] != OP_REQUEST || packet[1] != 1 || packet[2] != 6 {
        return None;
    }
    if packet[236..240] != MAGIC {
        return None;
    }
    let ip = |at: usize| Ipv4Addr::new(packet[at], packet[at + 1], packet[at + 2], packet[at + 3]);
    let mut msg = ClientMessage {
        kind: 0,
        xid: packet[4..8].try_into().ok()?,
        flags: packet[10..12].try_into().ok()?,
        ciaddr: ip(12),
        mac: packet[28..34].try_into().ok()?,
        requested: None,
        server_id: None,
    };
    let mut at = HEADER;
    while at < packet.len() {
        let code = packet[at];
        match code {
            OPT_END => break,
            OPT_PAD => at += 1,
            _ => {
                let Some(&len) = packet.get(at + 1) else { break };
                let len = usize::from(len);
                let Some(value) = packet.get(at + 2..at + 2 + len) else { break };
                match (code, len) {
                    (OPT_MESSAGE_TYPE, 1) => msg.kind = value[0],
                    (OPT_REQUESTED_IP, 4) => {
                        msg.requested = Some(Ipv4Addr::new(value[0], value[1], value[2], value[3]))
                    }
                    (OPT_SERVER_ID, 4) => msg.server_id = Some(Ipv4Addr::new(value[0], value[1], value[2], value[3])),
                    _ => {}
                }
                at += 2 + len;
            }
        }
    }
    (msg.kind != 0).then_some(msg)
}

/// The network a server hands addresses out of.
#[derive(Clone, Debug)]
pub struct Pool {
    pub gateway: Ipv4Addr,
    pub prefix: u8,
    /// Addresses handed out: from `first` to `last`, both included.
    pub first: Ipv4Addr,
    pub last: Ipv4Addr,
}

impl Pool {
    fn mask(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::MAX.checked_shl(32 - u32::from(self.prefix)).unwrap_or(0))
    }
}

/// One client's lease.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub ip: Ipv4Addr,
    /// Seconds since the Unix epoch.
    pub expires: u64,
    /// The port the client asked from.
    pub port: u32,
}

/// A network's leases, by MAC ("02:fc:...") with indexes by address and by port.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Leases {
    #[serde(rename = "leases")]
    by_mac: BTreeMap<String, Lease>,
    #[serde(skip)]
    by_ip: BTreeMap<Ipv4Addr, String>,
    #[serde(skip)]
    by_port: BTreeMap<u32, BTreeSet<String>>,
}

impl Leases {
    /// Leases from a lease file's text; anything unreadable (or from an older format) is
    /// dropped, and two leases of one address keep the first.
    pub fn from_json(text: &str) -> Leases {
        let saved: Leases = serde_json::from_str(text).unwrap_or_default();
        let mut leases = Leases::default();
        for (mac, lease) in saved.by_mac {
            if !leases.by_ip.contains_key(&lease.ip) {
                leases.insert(mac, lease);
            }
        }
        leases
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.by_mac.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_mac.is_empty()
    }

    pub fn get(&self, mac: &[u8; 6]) -> Option<&Lease> {
        self.by_mac.get(&mac_text(mac))
    }

    fn insert(&mut self, mac: String, lease: Lease) {
        self.remove(&mac);
        self.by_ip.insert(lease.ip, mac.clone());
        self.by_port.entry(lease.port).or_default().insert(mac.clone());
        self.by_mac.insert(mac, lease);
    }

    fn remove(&mut self, mac: &str) {
        if let Some(old) = self.by_mac.remove(mac) {
            self.by_ip.remove(&old.ip);
            if let Some(macs) = self.by_port.get_mut(&old.port) {
                macs.remove(mac);
                if macs.is_empty() {
                    self.by_port.remove(&old.port);
                }
            }
        }
    }

    /// Live leases on `port` other than `mac`'s.
    fn live_on_port(&self, port: u32, mac: &str, now: u64) -> usize {
        self.by_port.get(&port).map_or(0, |macs| {
            macs.iter().filter(|m| *m != mac && self.by_mac.get(*m).is_some_and(|l| l.expires > now)).count()
        })
    }
}

pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The address for `mac` asking from `port` at `now`: its lease if it has one (renewed), else
/// a free or expired one (recorded); None when the pool is exhausted or the port holds its
/// share.
pub fn lease_for(pool: &Pool, leases: &mut Leases, mac: &[u8; 6], port: u32, now: u64) -> Option<Ipv4Addr> {
    let key = mac_text(mac);
    let expires = now + u64::from(LEASE_SECONDS);
    if let Some(lease) = leases.by_mac.get(&key).cloned() {
        leases.insert(key, Lease { expires, port, ..lease });
        return Some(lease.ip);
    }
    if leases.live_on_port(port, &key, now) >= MAX_LEASES_PER_PORT {
        devices::guest_fault!(
            "DHCP: port {port} holds {MAX_LEASES_PER_PORT} leases already; {} gets none",
            mac_text(mac)
        );
        return None;
    }
    let mut candidate = u32::from(pool.first);
    let ip = loop {
        if candidate > u32::from(pool.last) {
            return None;
        }
        let ip = Ipv4Addr::from(candidate);
        candidate += 1;
        if ip == pool.gateway {
            continue;
        }
        match leases.by_ip.get(&ip) {
            None => break ip,
            Some(owner) if leases.by_mac.get(owner).is_none_or(|l| l.expires <= now) => {
                let owner = owner.clone();
                leases.remove(&owner);
                break ip;
            }
            Some(_) => {}
        }
    };
    leases.insert(key, Lease { ip, expires, port });
    Some(ip)
}

/// The server's answer to `msg` from `port` at `now` (seconds since the epoch), if any: OFFER
/// to DISCOVER; ACK or NAK to REQUEST.
pub fn answer(pool: &Pool, leases: &mut Leases, msg: &ClientMessage, port: u32, now: u64) -> Option<Vec<u8>> {
    match msg.kind {
        DISCOVER => {
            let ip = lease_for(pool, leases, &msg.mac, port, now)?;
            Some(reply(pool, msg, OFFER, ip))
        }
        REQUEST => {
            // A request for another server's offer is not ours to answer.
            if msg.server_id.is_some_and(|s| s != pool.gateway) {
                return None;
            }
            let ip = lease_for(pool, leases, &msg.mac, port, now)?;
            let asked = msg.requested.or((!msg.ciaddr.is_unspecified()).then_some(msg.ciaddr));
            match asked {
                Some(asked) if asked != ip => Some(reply(pool, msg, NAK, Ipv4Addr::UNSPECIFIED)),
                _ => Some(reply(pool, msg, ACK, ip)),
            }
        }
        _ => None,
    }
}

fn reply(pool: &Pool, msg: &ClientMessage, kind: u8, yiaddr: Ipv4Addr) -> Vec<u8> {
    let mut p = vec![0u8; HEADER];
    p[0] = OP_REPLY;
    p[1] = 1;
    p[2] = 6;
    p[4..8].copy_from_slice(&msg.xid);
    p[10..12].copy_from_slice(&msg.flags);
    p[16..20].copy_from_slice(&yiaddr.octets());
    p[20..24].copy_from_slice(&pool.gateway.octets());
    p[28..34].copy_from_slice(&msg.mac);
    p[236..240].copy_from_slice(&MAGIC);
    let mut option = |code: u8, value: &[u8]| {
        p.push(code);
        p.push(value.len() as u8);
        p.extend_from_slice(value);
    };
    option(OPT_MESSAGE_TYPE, &[kind]);
    option(OPT_SERVER_ID, &pool.gateway.octets());
    if kind != NAK {
        option(OPT_LEASE_TIME, &LEASE_SECONDS.to_be_bytes());
        option(OPT_SUBNET_MASK, &pool.mask().octets());
        option(OPT_ROUTER, &pool.gateway.octets());
        option(OPT_DNS, &pool.gateway.octets());
    }
    p.push(OPT_END);
    // Some clients want at least a BOOTP-sized packet.
    p.resize(p.len().max(300), 0);
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(kind: u8, mac: [u8; 6], extra: &[u8]) -> Vec<u8> {
        let mut p = vec![0u8; HEADER];
        p[0] = OP_REQUEST;
        p[1] = 1;
        p[2] = 6;
        p[4..8].copy_from_slice(&[1, 2, 3, 4]);
        p[28..34].copy_from_slice(&mac);
        p[236..240].copy_from_slice(&MAGIC);
        p.extend_from_slice(&[OPT_MESSAGE_TYPE, 1, kind]);
        p.extend_from_slice(extra);
        p.push(OPT_END);
        p
    }

    /// An answer to a client on port 1 at time 1000.
    fn answer_at(pool: &Pool, leases: &mut Leases, msg: &ClientMessage) -> Option<Vec<u8>> {
        answer(pool, leases, msg, 1, 1000)
    }

    fn pool() -> Pool {
        Pool {
            gateway: Ipv4Addr::new(10, 9, 0, 1),
            prefix: 24,
            first: Ipv4Addr::new(10, 9, 0, 1),
            last: Ipv4Addr::new(10, 9, 0, 3),
        }
    }

    fn option(reply: &[u8], code: u8) -> Option<Vec<u8>> {
        let mut at = HEADER;
        while at < reply.len() && reply[at] != OPT_END {
            let len = usize::from(reply[at + 1]);
            if reply[at] == code {
                return Some(reply[at + 2..at + 2 + len].to_vec());
            }
            at += 2 + len;
        }
        None
    }

    #[test]
    fn discover_request_ack_with_a_stable_address_per_mac() {
        let (pool, mut leases) = (pool(), Leases::default());
        let a = [2, 0, 0, 0, 0, 0xa];
        let offer = answer_at(&pool, &mut leases, &parse(&request(DISCOVER, a, &[])).unwrap()).unwrap();
        assert_eq!(option(&offer, OPT_MESSAGE_TYPE), Some(vec![OFFER]));
        assert_eq!(&offer[16..20], &[10, 9, 0, 2], "the gateway's own address is skipped");
        assert_eq!(option(&offer, OPT_SUBNET_MASK), Some(vec![255, 255, 255, 0]));
        assert_eq!(option(&offer, OPT_ROUTER), Some(vec![10, 9, 0, 1]));
        let req = request(REQUEST, a, &[OPT_REQUESTED_IP, 4, 10, 9, 0, 2, OPT_SERVER_ID, 4, 10, 9, 0, 1]);
        let ack = answer_at(&pool, &mut leases, &parse(&req).unwrap()).unwrap();
        assert_eq!(option(&ack, OPT_MESSAGE_TYPE), Some(vec![ACK]));
        // Another MAC gets the next address; the first keeps its own.
        let b = [2, 0, 0, 0, 0, 0xb];
        let offer_b = answer_at(&pool, &mut leases, &parse(&request(DISCOVER, b, &[])).unwrap()).unwrap();
        assert_eq!(&offer_b[16..20], &[10, 9, 0, 3]);
        let again = answer_at(&pool, &mut leases, &parse(&request(DISCOVER, a, &[])).unwrap()).unwrap();
        assert_eq!(&again[16..20], &[10, 9, 0, 2]);
        // The pool is full for a third.
        assert!(
            answer_at(&pool, &mut leases, &parse(&request(DISCOVER, [2, 0, 0, 0, 0, 0xc], &[])).unwrap()).is_none()
        );
        // A request for an address that is not the lease is refused.
        let wrong = request(REQUEST, a, &[OPT_REQUESTED_IP, 4, 10, 9, 0, 3]);
        let nak = answer_at(&pool, &mut leases, &parse(&wrong).unwrap()).unwrap();
        assert_eq!(option(&nak, OPT_MESSAGE_TYPE), Some(vec![NAK]));
        // Another server's offer is left alone.
        let other = request(REQUEST, a, &[OPT_SERVER_ID, 4, 10, 9, 0, 99]);
        assert!(answer_at(&pool, &mut leases, &parse(&other).unwrap()).is_none());
    }

    #[test]
    fn malformed_packets_are_ignored() {
        assert!(parse(&[0u8; 10]).is_none());
        let mut p = request(DISCOVER, [2, 0, 0, 0, 0, 1], &[]);
        p[236] = 0;
        assert!(parse(&p).is_none(), "no magic cookie");
        let mut truncated = request(DISCOVER, [2, 0, 0, 0, 0, 1], &[]);
        truncated.truncate(truncated.len() - 1);
        truncated.extend_from_slice(&[OPT_REQUESTED_IP, 200]);
        assert_eq!(parse(&truncated).map(|m| m.requested), Some(None), "an option past the end is ignored");
    }

    fn discover(mac: [u8; 6]) -> ClientMessage {
        parse(&request(DISCOVER, mac, &[])).unwrap()
    }

    /// A guest that forges DISCOVERs with made-up MACs gets its port's share and no more;
    /// the other ports still get addresses; leases not renewed expire and free theirs.
    #[test]
    fn forged_discovers_cannot_take_the_pool() {
        let pool = Pool {
            gateway: Ipv4Addr::new(10, 9, 0, 1),
            prefix: 24,
            first: Ipv4Addr::new(10, 9, 0, 2),
            last: Ipv4Addr::new(10, 9, 0, 254),
        };
        let mut leases = Leases::default();
        let offered = (0..=252u8)
            .filter(|n| answer(&pool, &mut leases, &discover([2, 0xbb, 0, 0, 0, *n]), 7, 1000).is_some())
            .count();
        assert_eq!(offered, MAX_LEASES_PER_PORT, "the attacking port's share");
        let honest = answer(&pool, &mut leases, &discover([2, 0xaa, 0, 0, 0, 1]), 8, 1000).unwrap();
        assert_eq!(honest[16..20], [10, 9, 0, 6]);
        // An hour on, the attacker's leases are gone and their addresses reusable.
        let later = 1000 + u64::from(LEASE_SECONDS) + 1;
        let next = answer(&pool, &mut leases, &discover([2, 0xcc, 0, 0, 0, 1]), 9, later).unwrap();
        assert_eq!(next[16..20], [10, 9, 0, 2]);
        // Renewing keeps an address: the honest client asks again and keeps its own.
        let again = answer(&pool, &mut leases, &discover([2, 0xaa, 0, 0, 0, 1]), 8, later).unwrap();
        assert_eq!(again[16..20], [10, 9, 0, 6]);
        // The lease file round-trips, indexes included.
        let reloaded = Leases::from_json(&leases.to_json());
        assert_eq!(reloaded.get(&[2, 0xaa, 0, 0, 0, 1]).map(|l| l.ip), Some(Ipv4Addr::new(10, 9, 0, 6)));
        assert_eq!(reloaded.by_ip.len(), reloaded.len());
    }
}
