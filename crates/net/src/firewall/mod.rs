//! The virtual firewall on a VM's network port: security-group rules (ordered, per direction,
//! by protocol, port range and peer CIDR, IPv4 or IPv6, with a default policy each way),
//! stateful (replies to an allowed connection pass; flows are tracked with timeouts in a bounded
//! table, so that an established flow costs one lookup), and port guards: anti-spoofing (the
//! port's own MAC; once known its IPv4 address; its IPv6 link-local address and those it was
//! given or learned from DHCPv6 and router advertisements; neighbour advertisements for its own
//! addresses only), no DHCP or DHCPv6 server answers and no router advertisements from the VM,
//! and storm control for its broadcast and multicast frames (ND and MLD among them).
//!
//! IPv6 extension headers are walked up to MAX_EXTENSION_HEADERS; a longer chain is dropped.
//! A fragment after the first (IPv4 or IPv6) follows the verdict its first fragment got, as
//! Linux's conntrack reassembles before it decides; one whose first fragment was not seen
//! within FRAGMENT_TIMEOUT is dropped.
//!
//! "in" is traffic to the VM, "out" traffic from it; a rule's `peer` is the other end and its
//! `ports` the destination port of the packet in the rule's direction.

mod frame;
mod rules;

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;

use frame::*;
pub use frame::{MAX_EXTENSION_HEADERS, PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};
pub use rules::*;

/// Flows a port tracks at most; a new flow beyond that is dropped once no old one expired.
pub const MAX_FLOWS: usize = 16384;
const TCP_TIMEOUT: Duration = Duration::from_secs(600);
const TCP_CLOSING_TIMEOUT: Duration = Duration::from_secs(10);
const UDP_TIMEOUT: Duration = Duration::from_secs(60);
const OTHER_TIMEOUT: Duration = Duration::from_secs(30);
/// Fragmented packets whose first fragment's verdict a port remembers at most.
pub const MAX_FRAGMENTED: usize = 1024;
/// How long later fragments may follow their first, as Linux's reassembly timeout.
pub const FRAGMENT_TIMEOUT: Duration = Duration::from_secs(30);
/// IPv6 addresses a port learns for its VM at most (from DHCPv6 and router advertisements).
pub const MAX_LEARNED_IPV6: usize = 8;

/// What the port is: its MAC and, once known, its IPv4 address; the IPv6 address it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortIdentity {
    pub mac: [u8; 6],
    pub ip: Option<Ipv4Addr>,
    pub ip6: Option<Ipv6Addr>,
    /// Whether anti-spoofing is on when the rule set does not say.
    pub anti_spoofing: bool,
}

/// Why a frame was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DropReason {
    Rule,
    Default,
    SpoofedMac,
    SpoofedIp,
    SpoofedArp,
    RogueDhcp,
    Storm,
    FlowTableFull,
    /// A router advertisement or redirect from the VM.
    RogueRouterAdvert,
    /// A neighbour advertisement for an address the VM does not own.
    SpoofedNeighborAdvert,
    /// More IPv6 extension headers than MAX_EXTENSION_HEADERS, or a truncated chain.
    HeaderChain,
    /// A later fragment whose first fragment was not seen (or was dropped).
    OrphanFragment,
}

impl DropReason {
    pub const ALL: [DropReason; 12] = [
        DropReason::Rule,
        DropReason::Default,
        DropReason::SpoofedMac,
        DropReason::SpoofedIp,
        DropReason::SpoofedArp,
        DropReason::RogueDhcp,
        DropReason::Storm,
        DropReason::FlowTableFull,
        DropReason::RogueRouterAdvert,
        DropReason::SpoofedNeighborAdvert,
        DropReason::HeaderChain,
        DropReason::OrphanFragment,
    ];

    pub fn name(self) -> &'static str {
        match self {
            DropReason::Rule => "rule",
            DropReason::Default => "default_policy",
            DropReason::SpoofedMac => "spoofed_mac",
            DropReason::SpoofedIp => "spoofed_ip",
            DropReason::SpoofedArp => "spoofed_arp",
            DropReason::RogueDhcp => "rogue_dhcp",
            DropReason::Storm => "storm_control",
            DropReason::FlowTableFull => "flow_table_full",
            DropReason::RogueRouterAdvert => "rogue_router_advert",
            DropReason::SpoofedNeighborAdvert => "spoofed_neighbor_advert",
            DropReason::HeaderChain => "ipv6_header_chain",
            DropReason::OrphanFragment => "orphan_fragment",
        }
    }
}

/// One direction of a flow, seen from the VM: its address and port, the other end's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct FlowKey {
    proto: u8,
    vm: (IpAddr, u16),
    remote: (IpAddr, u16),
}

/// A fragmented packet: source, destination, identification and protocol.
type FragmentKey = (IpAddr, IpAddr, u32, u8);

#[derive(Clone, Copy, Debug)]
struct Flow {
    /// Who opened it.
    origin: Direction,
    /// The rule that let it open (None: the default policy).
    rule: Option<usize>,
    expires: Instant,
    packets: u64,
}

/// Counters of one rule, or of a default policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Counters {
    pub packets: u64,
    pub bytes: u64,
}

impl Counters {
    fn add(&mut self, bytes: usize) {
        self.packets += 1;
        self.bytes += bytes as u64;
    }
}

/// A token bucket of frames per second.
#[derive(Debug)]
struct StormBucket {
    pps: u32,
    tokens: f64,
    at: Instant,
}

impl StormBucket {
    fn new(pps: u32, now: Instant) -> StormBucket {
        StormBucket { pps, tokens: f64::from(pps), at: now }
    }

    fn take(&mut self, now: Instant) -> bool {
        if self.pps == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * f64::from(self.pps)).min(f64::from(self.pps));
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

struct State {
    rules: RuleSet,
    counters: Vec<Counters>,
    default_in: Counters,
    default_out: Counters,
    flows: HashMap<FlowKey, Flow>,
    identity: PortIdentity,
    storm: StormBucket,
    drops: HashMap<DropReason, u64>,
    /// When expired flows were last swept out of a full table: at most once a second, so
    /// that a guest opening flows without end cannot make every frame pay for a sweep.
    swept: Option<Instant>,
    /// When expired fragments were last swept out of a full table, on the same terms.
    fragments_swept: Option<Instant>,
    /// Fragmented packets whose first fragment was seen: whether it passed, until when.
    fragments: HashMap<FragmentKey, (bool, Instant)>,
    /// IPv6 addresses learned for the VM, newest last.
    learned6: Vec<Ipv6Addr>,
}

/// The firewall of one port; shared by the port's worker and the API. An inactive one (a port
/// given no rules and no guards) passes everything until rules are put on it.
pub struct Firewall {
    active: AtomicBool,
    state: Mutex<State>,
}

/// What a report shows of a rule.
#[derive(Clone, Debug, Serialize)]
pub struct RuleReport {
    #[serde(flatten)]
    pub spec: RuleSpec,
    pub packets: u64,
    pub bytes: u64,
}

/// A tracked flow, for `ferrovisor firewall show`.
#[derive(Clone, Debug, Serialize)]
pub struct FlowReport {
    pub protocol: u8,
    pub vm: String,
    pub remote: String,
    pub origin: Direction,
    pub rule: Option<String>,
    pub packets: u64,
    pub expires_in_s: u64,
}

/// Everything `GET /ferrovisor/firewall/{iface}` answers.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub default_in: Action,
    pub default_out: Action,
    pub rules: Vec<RuleReport>,
    pub default_in_counters: Counters,
    pub default_out_counters: Counters,
    pub anti_spoofing: bool,
    pub storm_pps: u32,
    pub ip: Option<Ipv4Addr>,
    pub drops: std::collections::BTreeMap<&'static str, u64>,
    pub flows: Vec<FlowReport>,
}

impl Firewall {
    pub fn new(rules: RuleSet, identity: PortIdentity) -> Firewall {
        let now = Instant::now();
        let storm = StormBucket::new(rules.storm_pps(), now);
        let counters = vec![Counters::default(); rules.rules.len()];
        Firewall {
            active: AtomicBool::new(true),
            state: Mutex::new(State {
                rules,
                counters,
                default_in: Counters::default(),
                default_out: Counters::default(),
                flows: HashMap::new(),
                identity,
                storm,
                drops: HashMap::new(),
                swept: None,
                fragments_swept: None,
                fragments: HashMap::new(),
                learned6: Vec::new(),
            }),
        }
    }

    /// A port with nothing to enforce yet: allows all, guards nothing, until `replace`.
    pub fn inactive(identity: PortIdentity) -> Firewall {
        let open = RuleSet {
            default_in: Action::Allow,
            default_out: Action::Allow,
            rules: Vec::new(),
            anti_spoofing: Some(false),
            storm_pps: Some(0),
        };
        let firewall = Firewall::new(open, identity);
        firewall.active.store(false, Ordering::Relaxed);
        firewall
    }

    pub fn is_active(&self) -> bool {
        self.active.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Replaces the rules while traffic flows: counters start again, and tracked flows the new
    /// rules would not let open are closed at once.
    pub fn replace(&self, rules: RuleSet) {
        let mut s = self.lock();
        self.active.store(true, Ordering::Relaxed);
        s.storm = StormBucket::new(rules.storm_pps(), Instant::now());
        s.counters = vec![Counters::default(); rules.rules.len()];
        s.rules = rules;
        let State { flows, rules, .. } = &mut *s;
        flows.retain(|key, flow| {
            // The flow's first packet went to this port.
            let port = match flow.origin {
                Direction::Out => key.remote.1,
                Direction::In => key.vm.1,
            };
            match decide(rules, flow.origin, key.proto, key.remote.0, Some(port)) {
                (Action::Allow, rule) => {
                    flow.rule = rule;
                    true
                }
                (Action::Deny, _) => false,
            }
        });
    }

    /// The VM's address, learned from a DHCP answer (or given); IPv4 anti-spoofing uses it.
    pub fn ip(&self) -> Option<Ipv4Addr> {
        self.lock().identity.ip
    }

    /// A frame from the VM: true if it may leave.
    pub fn outbound(&self, frame: &[u8]) -> bool {
        !self.is_active() || self.lock().filter(Direction::Out, frame, Instant::now())
    }

    /// A frame for the VM: true if it may arrive.
    pub fn inbound(&self, frame: &[u8]) -> bool {
        !self.is_active() || self.lock().filter(Direction::In, frame, Instant::now())
    }

    pub fn report(&self) -> Report {
        let s = self.lock();
        let now = Instant::now();
        let rules = s
            .rules
            .rules
            .iter()
            .zip(&s.counters)
            .map(|(r, c)| RuleReport { spec: r.spec(), packets: c.packets, bytes: c.bytes })
            .collect();
        let mut flows: Vec<FlowReport> = s
            .flows
            .iter()
            .filter(|(_, f)| f.expires > now)
            .map(|(k, f)| FlowReport {
                protocol: k.proto,
                vm: std::net::SocketAddr::new(k.vm.0, k.vm.1).to_string(),
                remote: std::net::SocketAddr::new(k.remote.0, k.remote.1).to_string(),
                origin: f.origin,
                rule: f.rule.and_then(|i| s.rules.rules.get(i)).map(|r| r.name.clone()),
                packets: f.packets,
                expires_in_s: f.expires.saturating_duration_since(now).as_secs(),
            })
            .collect();
        flows.sort_by(|a, b| (&a.vm, &a.remote).cmp(&(&b.vm, &b.remote)));
        Report {
            default_in: s.rules.default_in,
            default_out: s.rules.default_out,
            rules,
            default_in_counters: s.default_in,
            default_out_counters: s.default_out,
            anti_spoofing: s.anti_spoofing(),
            storm_pps: s.storm.pps,
            ip: s.identity.ip,
            drops: DropReason::ALL.iter().map(|r| (r.name(), s.drops.get(r).copied().unwrap_or(0))).collect(),
            flows,
        }
    }

    /// Frames dropped, for the metrics.
    pub fn dropped(&self) -> u64 {
        self.lock().drops.values().sum()
    }

    /// The rule set as it was given (for snapshots and GET /vm/config).
    pub fn spec(&self) -> RuleSetSpec {
        self.lock().rules.spec()
    }
}

/// The first rule that matches a new flow, or the default policy.
fn decide(
    rules: &RuleSet,
    direction: Direction,
    proto: u8,
    remote: IpAddr,
    port: Option<u16>,
) -> (Action, Option<usize>) {
    match rules.rules.iter().position(|r| r.matches(direction, proto, remote, port)) {
        Some(i) => (rules.rules[i].action, Some(i)),
        None => (
            match direction {
                Direction::In => rules.default_in,
                Direction::Out => rules.default_out,
            },
            None,
        ),
    }
}

impl State {
    fn anti_spoofing(&self) -> bool {
        self.rules.anti_spoofing.unwrap_or(self.identity.anti_spoofing)
    }

    fn drop(&mut self, reason: DropReason, direction: Direction, packet: Option<&Packet>) -> bool {
        *self.drops.entry(reason).or_default() += 1;
        let what = match packet.map(|p| p.kind) {
            Some(Kind::Ip { src, dst, proto, ports, .. }) => {
                let (sp, dp) = ports.unwrap_or((0, 0));
                let (src, dst) = (std::net::SocketAddr::new(src, sp), std::net::SocketAddr::new(dst, dp));
                format!("proto {proto} {src} -> {dst}")
            }
            Some(Kind::Arp { sender_ip, .. }) => format!("ARP from {sender_ip}"),
            _ => "a frame that is neither IP nor ARP".into(),
        };
        devices::guest_event!("firewall: dropped {direction:?} {what} ({})", reason.name());
        false
    }

    fn filter(&mut self, direction: Direction, frame: &[u8], now: Instant) -> bool {
        let Some(packet) = parse(frame) else { return self.drop(DropReason::Default, direction, None) };
        if direction == Direction::In {
            self.learn(&packet);
        } else if let Some(reason) = self.guard(&packet, now) {
            return self.drop(reason, direction, Some(&packet));
        }
        let (src, dst, proto, fragment) = match packet.kind {
            // Neighbour discovery and multicast listening are IPv6's ARP: without them nothing
            // reaches the VM, so they pass as ARP does (security groups allow them too).
            Kind::Ip { icmpv6: Some(Icmpv6 { kind, .. }), .. } if is_neighbor_discovery(kind) => return true,
            Kind::Ip { src, dst, proto, fragment, .. } => (src, dst, proto, fragment),
            // ARP resolves addresses both ways; the guard checked the VM's.
            Kind::Arp { .. } => return true,
            Kind::HeaderChain => return self.drop(DropReason::HeaderChain, direction, Some(&packet)),
            Kind::Other | Kind::Broken => {
                let (action, rule) = self.decide_other(direction);
                return self.count(action, rule, direction, frame.len(), &packet);
            }
        };
        match fragment {
            Fragment::Whole => self.filter_ip(direction, frame.len(), &packet, now),
            Fragment::First(id) => {
                let passed = self.filter_ip(direction, frame.len(), &packet, now);
                self.remember_fragment((src, dst, id, proto), passed, now);
                passed
            }
            Fragment::Later(id) => match self.fragments.get(&(src, dst, id, proto)).filter(|f| f.1 > now) {
                Some(&(true, _)) => true,
                _ => self.drop(DropReason::OrphanFragment, direction, Some(&packet)),
            },
        }
    }

    /// Keeps a first fragment's verdict for the fragments after it, in a bounded table (a full
    /// one keeps nothing more: the later fragments are dropped).
    fn remember_fragment(&mut self, key: FragmentKey, passed: bool, now: Instant) {
        if self.fragments.len() >= MAX_FRAGMENTED && sweep_due(&mut self.fragments_swept, now) {
            self.fragments.retain(|_, f| f.1 > now);
        }
        if self.fragments.len() < MAX_FRAGMENTED || self.fragments.contains_key(&key) {
            self.fragments.insert(key, (passed, now + FRAGMENT_TIMEOUT));
        }
    }

    /// A whole IP packet or a first fragment: its flow, or the rules for a new one.
    fn filter_ip(&mut self, direction: Direction, len: usize, packet: &Packet, now: Instant) -> bool {
        let Kind::Ip { src, dst, proto, ports, tcp_flags, .. } = packet.kind else { return false };
        let (vm, remote) = match direction {
            Direction::Out => ((src, ports.map_or(0, |p| p.0)), (dst, ports.map_or(0, |p| p.1))),
            Direction::In => ((dst, ports.map_or(0, |p| p.1)), (src, ports.map_or(0, |p| p.0))),
        };
        let key = FlowKey { proto, vm, remote };
        let closing = proto == PROTO_TCP && tcp_flags & 0x05 != 0;
        if let Some(flow) = self.flows.get_mut(&key).filter(|f| f.expires > now) {
            flow.packets += 1;
            flow.expires = now + timeout(proto, closing);
            if flow.origin == direction
                && let Some(counter) = flow.rule.and_then(|i| self.counters.get_mut(i))
            {
                counter.add(len);
            }
            return true;
        }
        // A new flow: the destination port in this packet's direction decides.
        let port = ports.map(|p| p.1);
        let (action, rule) = decide(&self.rules, direction, proto, remote.0, port);
        if action == Action::Allow && ports.is_some() {
            if self.flows.len() >= MAX_FLOWS && sweep_due(&mut self.swept, now) {
                self.flows.retain(|_, f| f.expires > now);
            }
            if self.flows.len() >= MAX_FLOWS {
                return self.drop(DropReason::FlowTableFull, direction, Some(packet));
            }
            self.flows
                .insert(key, Flow { origin: direction, rule, expires: now + timeout(proto, closing), packets: 1 });
        }
        self.count(action, rule, direction, len, packet)
    }

    fn decide_other(&self, direction: Direction) -> (Action, Option<usize>) {
        let rule = self
            .rules
            .rules
            .iter()
            .position(|r| r.direction == direction && r.protocol == Protocol::Any && r.peer.is_none());
        match rule {
            Some(i) => (self.rules.rules[i].action, Some(i)),
            None => (
                match direction {
                    Direction::In => self.rules.default_in,
                    Direction::Out => self.rules.default_out,
                },
                None,
            ),
        }
    }

    fn count(
        &mut self,
        action: Action,
        rule: Option<usize>,
        direction: Direction,
        len: usize,
        packet: &Packet,
    ) -> bool {
        let counter = match (rule, direction) {
            (Some(i), _) => &mut self.counters[i],
            (None, Direction::In) => &mut self.default_in,
            (None, Direction::Out) => &mut self.default_out,
        };
        counter.add(len);
        match (action, rule) {
            (Action::Allow, _) => true,
            (Action::Deny, Some(_)) => self.drop(DropReason::Rule, direction, Some(packet)),
            (Action::Deny, None) => self.drop(DropReason::Default, direction, Some(packet)),
        }
    }

    /// The port's guards on a frame from the VM: the reason to drop it, if any.
    fn guard(&mut self, p: &Packet, now: Instant) -> Option<DropReason> {
        if p.dst_mac[0] & 1 != 0 && !self.storm.take(now) {
            return Some(DropReason::Storm);
        }
        if !self.anti_spoofing() {
            return None;
        }
        let own = self.identity;
        if p.src_mac != own.mac {
            return Some(DropReason::SpoofedMac);
        }
        match p.kind {
            Kind::Arp { sender_mac, sender_ip } => {
                let ip_ok = sender_ip.is_unspecified() || own.ip.is_none_or(|ip| ip == sender_ip);
                (sender_mac != own.mac || !ip_ok).then_some(DropReason::SpoofedArp)
            }
            Kind::Ip { src: IpAddr::V4(src), proto, ports, .. } => {
                if proto == PROTO_UDP && ports.is_some_and(|(sp, _)| sp == 67) {
                    return Some(DropReason::RogueDhcp);
                }
                // Before it has an address, a VM may ask DHCP for one from 0.0.0.0.
                let dhcp_request = src.is_unspecified() && proto == PROTO_UDP && ports == Some((68, 67));
                (own.ip.is_some_and(|ip| ip != src) && !dhcp_request).then_some(DropReason::SpoofedIp)
            }
            Kind::Ip { src: IpAddr::V6(src), proto, ports, icmpv6, .. } => {
                if proto == PROTO_UDP && ports.is_some_and(|(sp, _)| sp == 547) {
                    return Some(DropReason::RogueDhcp);
                }
                let kind = icmpv6.map(|m| m.kind);
                if matches!(kind, Some(ICMPV6_ROUTER_ADVERT | ICMPV6_REDIRECT)) {
                    return Some(DropReason::RogueRouterAdvert);
                }
                if kind == Some(ICMPV6_NEIGHBOR_ADVERT)
                    && !icmpv6.and_then(|m| m.target).is_some_and(|t| self.owns_ipv6(t))
                {
                    return Some(DropReason::SpoofedNeighborAdvert);
                }
                // Before it has an address, a VM sends from :: its duplicate address detection,
                // its router solicitations and its multicast listener reports alone.
                let unspecified_ok = matches!(
                    kind,
                    Some(ICMPV6_NEIGHBOR_SOLICIT | ICMPV6_ROUTER_SOLICIT | ICMPV6_MLD_REPORT | ICMPV6_MLD2_REPORT)
                );
                let ok = if src.is_unspecified() { unspecified_ok } else { self.owns_ipv6(src) };
                (!ok).then_some(DropReason::SpoofedIp)
            }
            Kind::Other | Kind::HeaderChain | Kind::Broken => None,
        }
    }

    /// Whether the VM may send from `ip`: its link-local address, the address it was given, or
    /// one it learned.
    fn owns_ipv6(&self, ip: Ipv6Addr) -> bool {
        let own = self.identity;
        ip == eui64(Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), own.mac)
            || own.ip6 == Some(ip)
            || self.learned6.contains(&ip)
    }

    fn learn_ipv6(&mut self, ip: Ipv6Addr, from: &str) {
        if self.owns_ipv6(ip) || ip.is_unspecified() || ip.is_multicast() {
            return;
        }
        if self.learned6.len() >= MAX_LEARNED_IPV6 {
            self.learned6.remove(0);
        }
        tracing::info!("firewall: the VM's IPv6 address {ip} ({from})");
        self.learned6.push(ip);
    }

    /// Learns the VM's addresses: IPv4 from a DHCP ACK for its MAC, IPv6 from a DHCPv6 Reply
    /// and from the prefix a router advertisement offers for autoconfiguration.
    fn learn(&mut self, p: &Packet) {
        match p.kind {
            Kind::Ip { dhcpv6_address: Some(ip), .. } => self.learn_ipv6(ip, "its DHCPv6 lease"),
            Kind::Ip { icmpv6: Some(Icmpv6 { slaac_prefix: Some(prefix), .. }), .. } => {
                let ip = eui64(prefix, self.identity.mac);
                self.learn_ipv6(ip, "autoconfigured from a router advertisement");
            }
            _ => {}
        }
        if let Kind::Ip { proto: PROTO_UDP, ports: Some((67, 68)), dhcp: Some(d), .. } = p.kind
            && d.op == 2
            && d.message_type == Some(5)
            && d.chaddr == self.identity.mac
            && !d.yiaddr.is_unspecified()
            && self.identity.ip != Some(d.yiaddr)
        {
            tracing::info!("firewall: the VM's address is {} (its DHCP lease)", d.yiaddr);
            self.identity.ip = Some(d.yiaddr);
        }
    }
}

/// Whether a full table may be swept of its expired entries now: at most once a second (and
/// then `last` says so), so that a guest keeping it full cannot make every frame pay for a sweep.
fn sweep_due(last: &mut Option<Instant>, now: Instant) -> bool {
    let due = last.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
    if due {
        *last = Some(now);
    }
    due
}

fn timeout(proto: u8, closing: bool) -> Duration {
    match proto {
        PROTO_TCP if closing => TCP_CLOSING_TIMEOUT,
        PROTO_TCP => TCP_TIMEOUT,
        PROTO_UDP => UDP_TIMEOUT,
        _ => OTHER_TIMEOUT,
    }
}

/// Runs frames through a firewall built from the first bytes, for the fuzzer.
#[doc(hidden)]
pub fn fuzz_frames(data: &[u8]) {
    let spec = RuleSetSpec {
        rules: vec![
            RuleSpec {
                name: None,
                direction: Direction::In,
                protocol: "tcp".into(),
                ports: Some("1-1000".into()),
                peer: Some("10.0.0.0/8".into()),
                action: Action::Allow,
            },
            RuleSpec {
                name: None,
                direction: Direction::Out,
                protocol: "udp".into(),
                ports: None,
                peer: None,
                action: Action::Deny,
            },
            RuleSpec {
                name: None,
                direction: Direction::In,
                protocol: "udp".into(),
                ports: Some("5000-6000".into()),
                peer: Some("2001:db8::/32".into()),
                action: Action::Allow,
            },
            RuleSpec {
                name: None,
                direction: Direction::In,
                protocol: "icmpv6".into(),
                ports: None,
                peer: None,
                action: Action::Allow,
            },
        ],
        storm_pps: Some(5),
        ..Default::default()
    };
    let Ok(rules) = spec.check() else { return };
    let identity = PortIdentity { mac: [2, 0, 0, 0, 0, 1], ip: None, ip6: None, anti_spoofing: true };
    let fw = Firewall::new(rules, identity);
    let mut rest = data;
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len).min(tail.len());
        let (frame, next) = tail.split_at(n);
        if len & 1 == 0 {
            fw.outbound(frame);
        } else {
            fw.inbound(frame);
        }
        rest = next;
    }
    let _ = fw.report();
}

#[cfg(test)]
mod tests {
    use super::*;

    const VM_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const PEER_MAC: [u8; 6] = [2, 0, 0, 0, 0, 2];
    const VM: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
    const PEER: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);

    fn frame(
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        src: Ipv4Addr,
        dst: Ipv4Addr,
        proto: u8,
        sport: u16,
        dport: u16,
    ) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[0..6].copy_from_slice(&dst_mac);
        f[6..12].copy_from_slice(&src_mac);
        f[12..14].copy_from_slice(&ETH_IPV4.to_be_bytes());
        let ip = &mut f[14..34];
        ip[0] = 0x45;
        ip[2..4].copy_from_slice(&40u16.to_be_bytes());
        ip[9] = proto;
        ip[12..16].copy_from_slice(&src.octets());
        ip[16..20].copy_from_slice(&dst.octets());
        let l4 = &mut f[34..];
        match proto {
            PROTO_ICMP => {
                l4[0] = if sport == 0 { 0 } else { 8 };
                l4[4..6].copy_from_slice(&dport.to_be_bytes());
            }
            _ => {
                l4[0..2].copy_from_slice(&sport.to_be_bytes());
                l4[2..4].copy_from_slice(&dport.to_be_bytes());
                l4[13] = 0x02; // SYN
            }
        }
        f
    }

    fn out(proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        frame(VM_MAC, PEER_MAC, VM, PEER, proto, sport, dport)
    }

    fn into_vm(proto: u8, sport: u16, dport: u16) -> Vec<u8> {
        frame(PEER_MAC, VM_MAC, PEER, VM, proto, sport, dport)
    }

    fn firewall(json: &str) -> Firewall {
        let spec: RuleSetSpec = serde_json::from_str(json).unwrap();
        Firewall::new(spec.check().unwrap(), PortIdentity { mac: VM_MAC, ip: Some(VM), ip6: None, anti_spoofing: true })
    }

    /// The VM's link-local address, from VM_MAC.
    fn vm_link_local() -> Ipv6Addr {
        "fe80::ff:fe00:1".parse().unwrap()
    }

    const PEER6: &str = "2001:db8::2";

    /// An IPv6 frame: `headers` are extension headers (next-header, bytes) before `l4`.
    fn frame6(
        src_mac: [u8; 6],
        dst_mac: [u8; 6],
        src: Ipv6Addr,
        dst: Ipv6Addr,
        headers: &[(u8, Vec<u8>)],
        proto: u8,
        l4: &[u8],
    ) -> Vec<u8> {
        let mut body = Vec::new();
        let mut next = proto;
        for (i, (kind, bytes)) in headers.iter().enumerate().rev() {
            let mut h = bytes.clone();
            h[0] = next;
            next = *kind;
            body.splice(0..0, h);
            let _ = i;
        }
        body.extend_from_slice(l4);
        let mut f = vec![0u8; 14 + 40];
        f[0..6].copy_from_slice(&dst_mac);
        f[6..12].copy_from_slice(&src_mac);
        f[12..14].copy_from_slice(&ETH_IPV6.to_be_bytes());
        f[14] = 0x60;
        f[18..20].copy_from_slice(&(body.len() as u16).to_be_bytes());
        f[20] = next;
        f[22..38].copy_from_slice(&src.octets());
        f[38..54].copy_from_slice(&dst.octets());
        f.extend_from_slice(&body);
        f
    }

    fn udp6(sport: u16, dport: u16) -> Vec<u8> {
        let mut l4 = vec![0u8; 8];
        l4[0..2].copy_from_slice(&sport.to_be_bytes());
        l4[2..4].copy_from_slice(&dport.to_be_bytes());
        l4
    }

    fn icmp6(kind: u8, rest: &[u8]) -> Vec<u8> {
        let mut l4 = vec![kind, 0, 0, 0, 0, 7, 0, 1];
        l4.extend_from_slice(rest);
        l4
    }

    fn fragment_header(offset: u16, more: bool, id: u32) -> (u8, Vec<u8>) {
        let mut h = vec![0u8; 8];
        h[2..4].copy_from_slice(&(offset << 3 | u16::from(more)).to_be_bytes());
        h[4..8].copy_from_slice(&id.to_be_bytes());
        (44, h)
    }

    #[test]
    fn ipv6_rules_match_their_family_and_flows_are_stateful() {
        let fw = firewall(
            r#"{"rules": [{"direction": "in", "protocol": "udp", "ports": "5000", "peer": "2001:db8::/32", "action": "allow"},
                          {"direction": "in", "protocol": "icmpv6", "action": "allow"},
                          {"direction": "in", "protocol": "udp", "ports": "6000", "peer": "10.0.0.0/8", "action": "allow"}]}"#,
        );
        let (vm, peer) = (vm_link_local(), PEER6.parse().unwrap());
        let inbound = |dport| frame6(PEER_MAC, VM_MAC, peer, vm, &[], PROTO_UDP, &udp6(4000, dport));
        assert!(fw.inbound(&inbound(5000)), "an IPv6 peer rule lets its network in");
        assert!(!fw.inbound(&inbound(6000)), "an IPv4 peer rule does not match IPv6");
        let other: Ipv6Addr = "2001:db9::2".parse().unwrap();
        assert!(!fw.inbound(&frame6(PEER_MAC, VM_MAC, other, vm, &[], PROTO_UDP, &udp6(4000, 5000))));
        assert!(fw.inbound(&frame6(PEER_MAC, VM_MAC, other, vm, &[], PROTO_ICMPV6, &icmp6(ICMPV6_ECHO_REQUEST, &[]))));
        // The VM's own connection out: its reply comes back though inbound UDP 7000 is denied.
        assert!(fw.outbound(&frame6(VM_MAC, PEER_MAC, vm, peer, &[], PROTO_UDP, &udp6(7000, 53))));
        assert!(fw.inbound(&frame6(PEER_MAC, VM_MAC, peer, vm, &[], PROTO_UDP, &udp6(53, 7000))), "a reply");
        assert!(!fw.inbound(&frame6(PEER_MAC, VM_MAC, peer, vm, &[], PROTO_UDP, &udp6(54, 7000))), "not a reply");
        let report = fw.report();
        assert!(report.flows.iter().any(|f| f.remote == "[2001:db8::2]:53"), "{:?}", report.flows);
    }

    #[test]
    fn extension_headers_are_walked_and_a_long_chain_is_dropped() {
        let fw = firewall(r#"{"rules": [{"direction": "in", "protocol": "udp", "ports": "5000", "action": "allow"}]}"#);
        let (vm, peer) = (vm_link_local(), PEER6.parse().unwrap());
        let options = |n: usize| -> Vec<(u8, Vec<u8>)> { (0..n).map(|_| (60, vec![0u8; 8])).collect() };
        let udp = udp6(4000, 5000);
        assert!(fw.inbound(&frame6(PEER_MAC, VM_MAC, peer, vm, &options(MAX_EXTENSION_HEADERS), PROTO_UDP, &udp)));
        assert!(!fw.inbound(&frame6(PEER_MAC, VM_MAC, peer, vm, &options(MAX_EXTENSION_HEADERS + 1), PROTO_UDP, &udp)));
        assert_eq!(fw.report().drops["ipv6_header_chain"], 1);
        // A header that claims more than the packet holds is broken, not followed.
        let mut truncated = frame6(PEER_MAC, VM_MAC, peer, vm, &options(1), PROTO_UDP, &udp);
        truncated[54 + 1] = 200;
        assert!(!fw.inbound(&truncated));
    }

    #[test]
    fn later_fragments_follow_their_first_and_orphans_are_dropped() {
        let fw = firewall(r#"{"rules": [{"direction": "in", "protocol": "udp", "ports": "5000", "action": "allow"}]}"#);
        let (vm, peer) = (vm_link_local(), PEER6.parse().unwrap());
        let piece = |offset, more, id, l4: &[u8]| {
            frame6(PEER_MAC, VM_MAC, peer, vm, &[fragment_header(offset, more, id)], PROTO_UDP, l4)
        };
        assert!(fw.inbound(&piece(0, true, 1, &udp6(4000, 5000))), "a first fragment the rules allow");
        assert!(fw.inbound(&piece(1, false, 1, &[0u8; 8])), "its later fragment follows");
        assert!(!fw.inbound(&piece(0, true, 2, &udp6(4000, 5001))), "a first fragment the rules deny");
        assert!(!fw.inbound(&piece(1, false, 2, &[0u8; 8])), "its later fragment is dropped too");
        assert!(!fw.inbound(&piece(1, false, 3, &[0u8; 8])), "a fragment without its first");
        assert_eq!(fw.report().drops["orphan_fragment"], 2);
        // IPv4 the same way: a later fragment carries no ports of its own.
        let mut first = into_vm(PROTO_UDP, 4000, 5000);
        first[14 + 4..14 + 8].copy_from_slice(&[0, 9, 0x20, 0]);
        let mut later = into_vm(PROTO_UDP, 0, 0);
        later[14 + 4..14 + 8].copy_from_slice(&[0, 9, 0, 3]);
        assert!(!fw.inbound(&later), "before its first fragment");
        assert!(fw.inbound(&first) && fw.inbound(&later), "after it");
        // The table is bounded: once full of fresh entries, a new first fragment passes on its
        // own merits but its later fragments are not remembered for it.
        for id in 100..100 + MAX_FRAGMENTED as u32 {
            assert!(fw.inbound(&piece(0, true, id, &udp6(4000, 5000))));
        }
        let overflow = 100 + MAX_FRAGMENTED as u32;
        assert!(fw.inbound(&piece(0, true, overflow, &udp6(4000, 5000))));
        assert!(!fw.inbound(&piece(1, false, overflow, &[0u8; 8])), "not remembered: the table is full");
        assert!(fw.inbound(&piece(1, false, 100, &[0u8; 8])), "an earlier one still is");
    }

    #[test]
    fn ipv6_anti_spoofing_keeps_the_vm_to_its_addresses_and_stops_router_advertisements() {
        let fw = firewall("{}");
        let (vm, peer): (Ipv6Addr, Ipv6Addr) = (vm_link_local(), PEER6.parse().unwrap());
        let from = |src: Ipv6Addr, proto, l4: &[u8]| fw.outbound(&frame6(VM_MAC, PEER_MAC, src, peer, &[], proto, l4));
        assert!(from(vm, PROTO_UDP, &udp6(1, 2)), "the link-local address derived from its MAC");
        let global: Ipv6Addr = "2001:db8::1:ff:fe00:1".parse().unwrap();
        assert!(!from(global, PROTO_UDP, &udp6(1, 2)), "an address it was not given");
        assert!(from(Ipv6Addr::UNSPECIFIED, PROTO_ICMPV6, &icmp6(ICMPV6_NEIGHBOR_SOLICIT, &global.octets())), "DAD");
        assert!(!from(Ipv6Addr::UNSPECIFIED, PROTO_UDP, &udp6(1, 2)), "from :: only ND, RS and MLD");
        assert!(!from(vm, PROTO_ICMPV6, &icmp6(ICMPV6_ROUTER_ADVERT, &[0u8; 8])), "RA guard");
        assert!(!from(vm, PROTO_UDP, &udp6(547, 546)), "no DHCPv6 server");
        assert!(from(vm, PROTO_ICMPV6, &icmp6(ICMPV6_NEIGHBOR_ADVERT, &vm.octets())), "an NA for its own address");
        assert!(!from(vm, PROTO_ICMPV6, &icmp6(ICMPV6_NEIGHBOR_ADVERT, &peer.octets())), "an NA for another's");
        let drops = fw.report().drops;
        assert_eq!((drops["rogue_router_advert"], drops["spoofed_neighbor_advert"]), (1, 1));
        assert_eq!((drops["spoofed_ip"], drops["rogue_dhcp"]), (2, 1));

        // A router's advertisement of 2001:db8:0:1::/64 for autoconfiguration: the VM's
        // EUI-64 address on it becomes its own.
        let mut ra = vec![0u8; 8];
        let mut prefix_option = vec![3, 4, 64, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        prefix_option.extend_from_slice(&"2001:db8:0:1::".parse::<Ipv6Addr>().unwrap().octets());
        ra.extend_from_slice(&prefix_option);
        let router: Ipv6Addr = "fe80::1".parse().unwrap();
        let all_nodes: Ipv6Addr = "ff02::1".parse().unwrap();
        assert!(fw.inbound(&frame6(
            PEER_MAC,
            [0x33, 0x33, 0, 0, 0, 1],
            router,
            all_nodes,
            &[],
            PROTO_ICMPV6,
            &icmp6(ICMPV6_ROUTER_ADVERT, &ra)
        )));
        let slaac: Ipv6Addr = "2001:db8:0:1:0:ff:fe00:1".parse().unwrap();
        assert!(from(slaac, PROTO_UDP, &udp6(1, 2)), "its autoconfigured address");

        // A DHCPv6 Reply's IA_NA address becomes its own too.
        let leased: Ipv6Addr = "2001:db8::100".parse().unwrap();
        let mut reply = vec![7, 0, 0, 1];
        let mut iaaddr = vec![0, 5, 0, 24];
        iaaddr.extend_from_slice(&leased.octets());
        iaaddr.extend_from_slice(&[0u8; 8]);
        let mut ia_na = vec![0, 3, 0, (12 + iaaddr.len()) as u8];
        ia_na.extend_from_slice(&[0u8; 12]);
        ia_na.extend_from_slice(&iaaddr);
        reply.extend_from_slice(&ia_na);
        let mut l4 = udp6(547, 546);
        l4.extend_from_slice(&reply);
        assert!(!from(leased, PROTO_UDP, &udp6(1, 2)), "before the lease");
        fw.inbound(&frame6(PEER_MAC, VM_MAC, router, vm, &[], PROTO_UDP, &l4));
        assert!(from(leased, PROTO_UDP, &udp6(1, 2)), "after it");

        let given = Firewall::new(
            RuleSetSpec::default().check().unwrap(),
            PortIdentity { mac: VM_MAC, ip: None, ip6: Some(global), anti_spoofing: true },
        );
        assert!(given.outbound(&frame6(VM_MAC, PEER_MAC, global, peer, &[], PROTO_UDP, &udp6(1, 2))), "ip6= given");
    }

    #[test]
    fn rules_decide_new_flows_in_order_and_the_defaults_the_rest() {
        let fw = firewall(
            r#"{"rules": [
                {"name": "web", "direction": "in", "protocol": "tcp", "ports": "80", "action": "allow"},
                {"direction": "in", "protocol": "udp", "ports": "5000-5010", "peer": "10.0.0.0/24", "action": "allow"},
                {"direction": "in", "protocol": "udp", "action": "deny"},
                {"name": "no-dns", "direction": "out", "protocol": "udp", "ports": "53", "action": "deny"}
            ]}"#,
        );
        assert!(fw.inbound(&into_vm(PROTO_TCP, 40000, 80)));
        assert!(!fw.inbound(&into_vm(PROTO_TCP, 40000, 81)), "the default denies inbound");
        assert!(fw.inbound(&into_vm(PROTO_UDP, 1, 5005)));
        assert!(!fw.inbound(&into_vm(PROTO_UDP, 1, 5011)));
        assert!(!fw.inbound(&into_vm(PROTO_ICMP, 8, 1)));
        assert!(!fw.outbound(&out(PROTO_UDP, 999, 53)));
        assert!(fw.outbound(&out(PROTO_UDP, 999, 54)), "the default allows outbound");
        let report = fw.report();
        assert_eq!(report.rules[0].packets, 1);
        assert_eq!(report.rules[0].spec.name.as_deref(), Some("web"));
        assert_eq!(report.rules[3].packets, 1);
        assert_eq!(report.drops["default_policy"], 2);
        assert_eq!(report.drops["rule"], 2);
    }

    #[test]
    fn replies_to_allowed_flows_pass_both_ways_and_inbound_connections_do_not() {
        let fw = firewall(r#"{}"#);
        assert!(fw.outbound(&out(PROTO_TCP, 40000, 22)));
        assert!(fw.inbound(&into_vm(PROTO_TCP, 22, 40000)), "the reply to the VM's own connection");
        assert!(!fw.inbound(&into_vm(PROTO_TCP, 40001, 22)), "a connection to the VM");
        assert!(fw.outbound(&out(PROTO_ICMP, 8, 7)));
        assert!(fw.inbound(&into_vm(PROTO_ICMP, 0, 7)), "the echo reply");
        assert!(!fw.inbound(&into_vm(PROTO_ICMP, 8, 9)), "someone else's echo request");
        assert_eq!(fw.report().flows.len(), 2);
    }

    #[test]
    fn new_rules_apply_at_once_and_close_flows_they_would_not_allow() {
        let fw = firewall(r#"{"rules": [{"direction": "in", "protocol": "tcp", "ports": "22", "action": "allow"}]}"#);
        assert!(fw.inbound(&into_vm(PROTO_TCP, 40000, 22)));
        assert!(fw.outbound(&out(PROTO_TCP, 22, 40000)));
        let tighter: RuleSetSpec =
            serde_json::from_str(r#"{"rules": [{"direction": "in", "protocol": "udp", "action": "allow"}]}"#).unwrap();
        fw.replace(tighter.check().unwrap());
        assert!(!fw.inbound(&into_vm(PROTO_TCP, 40000, 22)), "the flow closed with its rule");
        assert!(fw.inbound(&into_vm(PROTO_UDP, 1, 9)), "the new rule took effect");
        assert_eq!(fw.report().rules[0].packets, 1, "counters start again");
    }

    #[test]
    fn the_flow_table_is_bounded() {
        let fw = firewall(r#"{}"#);
        for port in 0..MAX_FLOWS as u32 + 10 {
            let ok = fw.outbound(&frame(
                VM_MAC,
                PEER_MAC,
                VM,
                PEER,
                PROTO_UDP,
                (port % 50000) as u16 + 1000,
                (port / 50000) as u16 + 1,
            ));
            assert_eq!(ok, (port as usize) < MAX_FLOWS, "flow {port}");
        }
        assert_eq!(fw.report().drops["flow_table_full"], 10);
    }

    #[test]
    fn anti_spoofing_drops_forged_sources_and_rogue_dhcp_and_keeps_honest_frames() {
        let fw = firewall(r#"{}"#);
        assert!(!fw.outbound(&frame(PEER_MAC, PEER_MAC, VM, PEER, PROTO_UDP, 1, 2)), "forged MAC");
        assert!(!fw.outbound(&frame(VM_MAC, PEER_MAC, PEER, PEER, PROTO_UDP, 1, 2)), "forged IP");
        assert!(!fw.outbound(&out(PROTO_UDP, 67, 68)), "a DHCP server answer");
        assert!(fw.outbound(&frame(VM_MAC, [0xff; 6], Ipv4Addr::UNSPECIFIED, Ipv4Addr::BROADCAST, PROTO_UDP, 68, 67)));
        assert!(fw.outbound(&out(PROTO_UDP, 1, 2)), "honest");
        let mut arp = vec![0u8; 42];
        arp[0..6].copy_from_slice(&[0xff; 6]);
        arp[6..12].copy_from_slice(&VM_MAC);
        arp[12..14].copy_from_slice(&ETH_ARP.to_be_bytes());
        arp[22..28].copy_from_slice(&VM_MAC);
        arp[28..32].copy_from_slice(&PEER.octets());
        assert!(!fw.outbound(&arp), "gratuitous ARP for the neighbour's address");
        arp[28..32].copy_from_slice(&VM.octets());
        assert!(fw.outbound(&arp), "ARP for its own");
        let drops = fw.report().drops;
        assert_eq!(
            (drops["spoofed_mac"], drops["spoofed_ip"], drops["rogue_dhcp"], drops["spoofed_arp"]),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn the_vm_address_is_learned_from_its_dhcp_ack() {
        let fw = Firewall::new(
            RuleSetSpec::default().check().unwrap(),
            PortIdentity { mac: VM_MAC, ip: None, ip6: None, anti_spoofing: true },
        );
        assert!(fw.outbound(&frame(VM_MAC, PEER_MAC, PEER, VM, PROTO_UDP, 1, 2)), "any address before a lease");
        let mut ack = frame(PEER_MAC, VM_MAC, PEER, VM, PROTO_UDP, 67, 68);
        ack.resize(34 + 8 + 300, 0);
        ack[16..18].copy_from_slice(&(8 + 300 + 20u16).to_be_bytes());
        let bootp = &mut ack[42..];
        bootp[0] = 2;
        bootp[16..20].copy_from_slice(&VM.octets());
        bootp[28..34].copy_from_slice(&VM_MAC);
        bootp[236..240].copy_from_slice(&[99, 130, 83, 99]);
        bootp[240..243].copy_from_slice(&[53, 1, 5]);
        bootp[243] = 255;
        fw.inbound(&ack);
        assert_eq!(fw.ip(), Some(VM));
        assert!(!fw.outbound(&frame(VM_MAC, PEER_MAC, PEER, VM, PROTO_UDP, 1, 2)), "only its lease after it");
    }

    #[test]
    fn storm_control_holds_broadcasts_to_the_rate() {
        let fw = firewall(r#"{"storm_pps": 50}"#);
        let broadcast = frame(VM_MAC, [0xff; 6], VM, Ipv4Addr::BROADCAST, PROTO_UDP, 1, 2);
        let passed = (0..500).filter(|_| fw.outbound(&broadcast)).count();
        assert!((50..=55).contains(&passed), "{passed}");
        assert!(fw.outbound(&out(PROTO_UDP, 1, 3)), "unicast is not held");
    }

    #[test]
    fn bad_rules_are_refused_with_the_rule_and_field_named() {
        let check = |json: &str| {
            serde_json::from_str::<RuleSetSpec>(json).map_err(|e| e.to_string()).and_then(|s| s.check().map(|_| ()))
        };
        let rule =
            |fields: &str| format!(r#"{{"rules": [{{"name": "r", "direction": "in", "action": "allow", {fields}}}]}}"#);
        for (fields, needle) in [
            (r#""protocol": "sctp""#, "rule 1 (r) protocol 'sctp' is unknown"),
            (r#""protocol": "tcp", "ports": "90-80""#, "rule 1 (r) ports '90-80' runs backwards"),
            (r#""protocol": "tcp", "ports": "0""#, "not a port from 1 to 65535"),
            (r#""protocol": "icmp", "ports": "1""#, "only tcp and udp rules have ports"),
            (r#""protocol": "tcp", "peer": "10.0.0.0/33""#, "rule 1 (r) peer '10.0.0.0/33' has a prefix length"),
            (r#""protocol": "tcp", "peer": "10.0.0.1/8""#, "host bits set; write the network, such as 10.0.0.0/8"),
            (r#""protocol": "tcp", "peer": "ten""#, "not an IPv4 or IPv6 address"),
            (r#""protocol": "tcp", "peer": "2001:db8::/129""#, "has a prefix length that is not 0 to 128"),
            (
                r#""protocol": "tcp", "peer": "2001:db8::1/32""#,
                "host bits set; write the network, such as 2001:db8::/32",
            ),
            (r#""protocol": "icmp", "peer": "2001:db8::/32""#, "of the other IP family than protocol icmp"),
            (r#""protocol": "icmpv6", "peer": "10.0.0.0/8""#, "use icmp with IPv4 and icmpv6 with IPv6"),
        ] {
            let e = check(&rule(fields)).unwrap_err();
            assert!(e.contains(needle), "{fields}: {e}");
        }
        assert!(
            check(r#"{"rules": [{"direction": "up", "protocol": "tcp", "action": "allow"}]}"#)
                .unwrap_err()
                .contains("up")
        );
        let injected =
            r#"{"rules": [{"name": "x\"\nflush ruleset\n", "direction": "in", "protocol": "tcp", "action": "allow"}]}"#;
        let e = check(injected).unwrap_err();
        assert!(e.contains(r#"rule 1 name 'x\"\nflush ruleset\n' must be"#), "{e}");
        let e = RuleSetSpec::from_file_text("{\"rules\": [", false).unwrap_err();
        assert!(e.starts_with("is not a valid rules file"), "{e}");
        let toml = "default_in = \"deny\"\n[[rules]]\nname = \"ssh\"\ndirection = \"in\"\nprotocol = \"tcp\"\nports = \"22\"\naction = \"allow\"\n";
        let spec = RuleSetSpec::from_file_text(toml, true).unwrap();
        assert_eq!(spec.check().unwrap().rules[0].ports, Some((22, 22)));
        assert!(RuleSetSpec::from_file_text("[[rules]]\nname = 3\n", true).is_err());
    }
}
