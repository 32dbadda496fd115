//! Security-group rules as files and the API write them, checked into the rule sets the
//! firewall applies, and the named sets `ferrovisor firewall` stores.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::frame::{PROTO_ICMP, PROTO_ICMPV6, PROTO_TCP, PROTO_UDP};

/// Rules a set may hold.
pub const MAX_RULES: usize = 1024;
/// Broadcast and multicast frames a port may send per second (and in one burst).
pub const DEFAULT_STORM_PPS: u32 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    In,
    Out,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Allow,
    Deny,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Icmp,
    Icmpv6,
    Any,
}

impl Protocol {
    fn matches(self, proto: u8) -> bool {
        match self {
            Protocol::Tcp => proto == PROTO_TCP,
            Protocol::Udp => proto == PROTO_UDP,
            Protocol::Icmp => proto == PROTO_ICMP,
            Protocol::Icmpv6 => proto == PROTO_ICMPV6,
            Protocol::Any => true,
        }
    }
}

/// An IPv4 or IPv6 network: `10.0.0.0/8`, `2001:db8::/32`, or one address. It matches only
/// addresses of its own family.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub addr: IpAddr,
    pub prefix: u8,
}

impl Cidr {
    /// The address as a 128-bit number, IPv4 in the low 32 bits, and its family's width.
    fn bits(ip: IpAddr) -> (u128, u8) {
        match ip {
            IpAddr::V4(a) => (u128::from(u32::from(a)), 32),
            IpAddr::V6(a) => (u128::from(a), 128),
        }
    }

    fn mask(self) -> u128 {
        let width = Self::bits(self.addr).1;
        let ones = u128::MAX.checked_shl(u32::from(width - self.prefix)).unwrap_or(0);
        ones & (u128::MAX >> (128 - u32::from(width)))
    }

    pub fn contains(self, ip: IpAddr) -> bool {
        self.addr.is_ipv4() == ip.is_ipv4() && Self::bits(ip).0 & self.mask() == Self::bits(self.addr).0 & self.mask()
    }
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let addr: IpAddr = addr.parse().map_err(|_| format!("'{s}' is not an IPv4 or IPv6 address or network"))?;
        let width = Self::bits(addr).1;
        let prefix: u8 = match prefix {
            None => width,
            Some(p) => p
                .parse()
                .ok()
                .filter(|p| *p <= width)
                .ok_or_else(|| format!("'{s}' has a prefix length that is not 0 to {width}"))?,
        };
        let cidr = Cidr { addr, prefix };
        if Self::bits(addr).0 & !cidr.mask() & (u128::MAX >> (128 - u32::from(width))) != 0 {
            return Err(format!("'{s}' has host bits set; write the network, such as {}", Cidr::network(cidr)));
        }
        Ok(cidr)
    }
}

impl Cidr {
    fn network(self) -> String {
        let network = Self::bits(self.addr).0 & self.mask();
        let addr = match self.addr {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::from(network as u32)),
            IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::from(network)),
        };
        format!("{addr}/{}", self.prefix)
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

/// A rule as a file or the API writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    pub direction: Direction,
    pub protocol: String,
    /// `80` or `8000-8080`; only with tcp or udp.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<String>,
    /// The other end, as a CIDR; any when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer: Option<String>,
    pub action: Action,
}

/// A rule set as a file or the API writes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleSetSpec {
    /// What happens to traffic no rule matches: by default inbound is denied and outbound
    /// allowed, as in a security group.
    #[serde(default = "deny")]
    pub default_in: Action,
    #[serde(default = "allow")]
    pub default_out: Action,
    #[serde(default)]
    pub rules: Vec<RuleSpec>,
    /// Drop frames from the VM with another MAC or IPv4 address, gratuitous ARP for another
    /// address, and DHCP server answers. Absent: the port's default (on for switches and
    /// managed networks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anti_spoofing: Option<bool>,
    /// Broadcast and multicast frames per second the VM may send; absent: 1000; 0: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storm_pps: Option<u32>,
}

fn deny() -> Action {
    Action::Deny
}

fn allow() -> Action {
    Action::Allow
}

impl Default for RuleSetSpec {
    fn default() -> Self {
        RuleSetSpec {
            default_in: Action::Deny,
            default_out: Action::Allow,
            rules: Vec::new(),
            anti_spoofing: None,
            storm_pps: None,
        }
    }
}

/// A checked rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub direction: Direction,
    pub protocol: Protocol,
    pub ports: Option<(u16, u16)>,
    pub peer: Option<Cidr>,
    pub action: Action,
}

/// A checked rule set.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSet {
    pub default_in: Action,
    pub default_out: Action,
    pub rules: Vec<Rule>,
    pub anti_spoofing: Option<bool>,
    pub storm_pps: Option<u32>,
}

impl RuleSetSpec {
    /// Checks every rule; the error names the rule and field and says what to write.
    pub fn check(&self) -> Result<RuleSet, String> {
        if self.rules.len() > MAX_RULES {
            return Err(format!("the rule set has {} rules; give at most {MAX_RULES}", self.rules.len()));
        }
        let mut rules = Vec::with_capacity(self.rules.len());
        for (i, r) in self.rules.iter().enumerate() {
            let name = r.name.clone().unwrap_or_else(|| format!("rule{}", i + 1));
            // Names go into logs, reports and the kernel's rule comments: plain text only.
            let plain = |c: char| c.is_ascii_alphanumeric() || " _-.:".contains(c);
            if name.is_empty() || name.len() > 64 || !name.chars().all(plain) {
                return Err(format!(
                    "rule {} name '{}' must be 1 to 64 letters, digits, spaces, '_', '-', '.' or ':'",
                    i + 1,
                    name.escape_default()
                ));
            }
            let what = format!("rule {} ({name})", i + 1);
            let protocol = match r.protocol.as_str() {
                "tcp" => Protocol::Tcp,
                "udp" => Protocol::Udp,
                "icmp" => Protocol::Icmp,
                "icmpv6" => Protocol::Icmpv6,
                "any" => Protocol::Any,
                other => {
                    return Err(format!("{what} protocol '{other}' is unknown; use tcp, udp, icmp, icmpv6 or any"));
                }
            };
            let ports = match &r.ports {
                None => None,
                Some(_) if !matches!(protocol, Protocol::Tcp | Protocol::Udp) => {
                    return Err(format!(
                        "{what} ports: only tcp and udp rules have ports; remove them or change the protocol"
                    ));
                }
                Some(text) => Some(parse_ports(text).map_err(|e| format!("{what} ports {e}"))?),
            };
            let peer = r.peer.as_deref().map(str::parse::<Cidr>).transpose().map_err(|e| format!("{what} peer {e}"))?;
            // ICMP is IPv4's and ICMPv6 IPv6's: a peer of the other family would match nothing.
            match (protocol, peer.map(|p| p.addr)) {
                (Protocol::Icmp, Some(IpAddr::V6(_))) | (Protocol::Icmpv6, Some(IpAddr::V4(_))) => {
                    return Err(format!(
                        "{what} peer {} is of the other IP family than protocol {}; use icmp with IPv4 and icmpv6 with IPv6",
                        r.peer.as_deref().unwrap_or_default(),
                        r.protocol
                    ));
                }
                _ => {}
            }
            rules.push(Rule { name, direction: r.direction, protocol, ports, peer, action: r.action });
        }
        Ok(RuleSet {
            default_in: self.default_in,
            default_out: self.default_out,
            rules,
            anti_spoofing: self.anti_spoofing,
            storm_pps: self.storm_pps,
        })
    }

    /// Parses a rules file: JSON, or TOML (by its `.toml` name, or when it is not JSON).
    pub fn from_file_text(text: &str, toml_name: bool) -> Result<RuleSetSpec, String> {
        let trimmed = text.trim_start();
        if !toml_name && (trimmed.starts_with('{') || trimmed.is_empty()) {
            return serde_json::from_str(text).map_err(|e| format!("is not a valid rules file ({e})"));
        }
        toml::from_str(text).map_err(|e| format!("is not a valid rules file ({})", e.message().trim()))
    }
}

fn parse_ports(text: &str) -> Result<(u16, u16), String> {
    let number = |s: &str| {
        s.trim()
            .parse::<u16>()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("'{text}': '{s}' is not a port from 1 to 65535"))
    };
    let (low, high) = match text.split_once('-') {
        Some((a, b)) => (number(a)?, number(b)?),
        None => {
            let p = number(text)?;
            (p, p)
        }
    };
    if low > high {
        return Err(format!("'{text}' runs backwards; write the lower port first ({high}-{low})"));
    }
    Ok((low, high))
}

impl Rule {
    pub(super) fn matches(&self, direction: Direction, proto: u8, remote: IpAddr, port: Option<u16>) -> bool {
        self.direction == direction
            && self.protocol.matches(proto)
            && self.peer.is_none_or(|c| c.contains(remote))
            && self.ports.is_none_or(|(low, high)| port.is_some_and(|p| (low..=high).contains(&p)))
    }

    pub(super) fn spec(&self) -> RuleSpec {
        RuleSpec {
            name: Some(self.name.clone()),
            direction: self.direction,
            protocol: format!("{:?}", self.protocol).to_lowercase(),
            ports: self.ports.map(|(l, h)| if l == h { l.to_string() } else { format!("{l}-{h}") }),
            peer: self.peer.map(|c| c.to_string()),
            action: self.action,
        }
    }
}

impl RuleSet {
    /// Broadcast and multicast frames a second the port may send (0: no limit).
    pub fn storm_pps(&self) -> u32 {
        self.storm_pps.unwrap_or(DEFAULT_STORM_PPS)
    }

    pub fn spec(&self) -> RuleSetSpec {
        RuleSetSpec {
            default_in: self.default_in,
            default_out: self.default_out,
            rules: self.rules.iter().map(Rule::spec).collect(),
            anti_spoofing: self.anti_spoofing,
            storm_pps: self.storm_pps,
        }
    }
}

/// Where named rule sets live (`ferrovisor firewall create`).
pub fn sets_dir() -> PathBuf {
    crate::network::state_dir().join("firewall")
}

/// A rule set's name: letters, digits, `-` and `_`, 1 to 64 of them.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    match ok {
        true => Ok(()),
        false => Err(format!("'{name}' is not a rule set name; use 1 to 64 letters, digits, - and _")),
    }
}

/// The rule set `reference` names: `@NAME` (a named set) or a JSON or TOML file; checked.
pub fn load(reference: &str) -> Result<RuleSetSpec, String> {
    let (path, what) = match reference.strip_prefix('@') {
        Some(name) => {
            check_name(name)?;
            (sets_dir().join(format!("{name}.json")), format!("rule set {name}"))
        }
        None => (PathBuf::from(reference), format!("rules file {reference}")),
    };
    let text = std::fs::read_to_string(&path).map_err(|e| match reference.strip_prefix('@') {
        Some(name) => format!("there is no {what} ({e}); create it with `ferrovisor firewall create {name} FILE`"),
        None => format!("{what} cannot be read ({e})"),
    })?;
    let toml = path.extension().is_some_and(|e| e == "toml");
    let spec = RuleSetSpec::from_file_text(&text, toml).map_err(|e| format!("{what} {e}"))?;
    spec.check().map_err(|e| format!("{what}: {e}"))?;
    Ok(spec)
}

/// Stores `spec` as the named set `name` (checked first: nothing half-written).
pub fn save(name: &str, spec: &RuleSetSpec) -> Result<PathBuf, String> {
    check_name(name)?;
    spec.check()?;
    let dir = sets_dir();
    std::fs::create_dir_all(&dir).map_err(|e| format!("{} cannot be created ({e})", dir.display()))?;
    let path = dir.join(format!("{name}.json"));
    let partial = dir.join(format!(".{name}.json.new"));
    let text = serde_json::to_string_pretty(spec).map_err(|e| e.to_string())?;
    std::fs::write(&partial, text + "\n")
        .and_then(|()| std::fs::rename(&partial, &path))
        .map_err(|e| format!("{} cannot be written ({e})", path.display()))?;
    Ok(path)
}
