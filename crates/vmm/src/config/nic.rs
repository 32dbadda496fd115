//! virtio-net interfaces: where they are plugged on the host, and `--net`.

use std::path::PathBuf;
use std::str::FromStr;

use super::disk::parse_poll_us;
use super::{key_values, on_off};

/// Where a virtio-net interface is plugged on the host.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NetAttachment {
    /// A TAP device, created if absent.
    Tap(String),
    /// A port on `ferrovisor switch PATH`, in a VLAN.
    Switch { path: PathBuf, vlan: u16 },
    /// A TAP the VMM creates on a managed network's bridge; `isolated` ports cannot reach
    /// each other.
    Network { name: String, isolated: bool },
    /// User-mode networking through host sockets, with TCP ports forwarded into the guest.
    User { forwards: Vec<net::usernet::HostForward> },
    /// A vhost-user back-end serves the interface's queues.
    VhostUser(super::VhostUserOptions),
}

/// A virtio-net interface: `--net tap=NAME[,mac=..]` or `--net switch=PATH[,vlan=N][,mac=..]`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    pub attachment: NetAttachment,
    pub mac: Option<[u8; 6]>,
    /// Firecracker's `rx_rate_limiter` and `tx_rate_limiter`.
    #[serde(default)]
    pub rx_rate_limit: Option<virtio::rate_limiter::RateLimit>,
    #[serde(default)]
    pub tx_rate_limit: Option<virtio::rate_limiter::RateLimit>,
    /// MMDS's address, when MMDS answers on this interface.
    #[serde(default)]
    pub mmds: Option<std::net::Ipv4Addr>,
    /// The API's `iface_id` (`net<N>` when there is none).
    #[serde(default)]
    pub id: Option<String>,
    /// The MTU the guest is told (VIRTIO_NET_F_MTU); none: the guest picks its own.
    #[serde(default)]
    pub mtu: Option<u16>,
    /// The port's firewall rules (`firewall=FILE|@NAME`).
    #[serde(default)]
    pub firewall: Option<net::firewall::RuleSetSpec>,
    /// The VM's address on this port, for anti-spoofing before (or without) a DHCP lease.
    #[serde(default)]
    pub ip: Option<std::net::Ipv4Addr>,
    /// The VM's IPv6 address on this port (`ip6=`), besides its link-local one and those it
    /// learns from DHCPv6 and router advertisements.
    #[serde(default)]
    pub ip6: Option<std::net::Ipv6Addr>,
    /// How long the device's worker polls after work, in µs (None: the default; 0: never).
    #[serde(default)]
    pub poll_us: Option<u32>,
    /// Queue pairs (`queues=N`) on a TAP; None: one per vCPU, where the interface allows.
    #[serde(default)]
    pub queues: Option<u16>,
}

/// The most queue pairs a virtio-net interface offers.
pub const MAX_QUEUE_PAIRS: u16 = 16;

impl NetConfig {
    /// Whether the host side is a TAP, which alone has several queues.
    fn on_tap(&self) -> bool {
        matches!(self.attachment, NetAttachment::Tap(_) | NetAttachment::Network { .. })
    }

    /// Whether something must see the whole interface in one worker: MMDS or a rate limit.
    fn needs_one_worker(&self) -> bool {
        self.mmds.is_some() || self.rx_rate_limit.is_some() || self.tx_rate_limit.is_some()
    }

    /// The queue pairs this interface offers on a VM of `cpus` vCPUs: `queues=` or one per
    /// vCPU on a TAP; one where the interface cannot spread (a switch port, the user network,
    /// and MMDS or rate limits, which see the whole interface).
    pub fn queue_pairs(&self, cpus: u32) -> u16 {
        match self.queues {
            Some(n) => n,
            None if self.on_tap() && !self.needs_one_worker() => cpus.clamp(1, u32::from(MAX_QUEUE_PAIRS)) as u16,
            None => 1,
        }
    }

    /// What `queues=` asks that the interface cannot give, as an error naming the fix.
    pub fn check_queues(&self, index: usize) -> Result<(), String> {
        let Some(n) = self.queues.filter(|&n| n > 1) else { return Ok(()) };
        if !self.on_tap() {
            return Err(format!("net{index}: queues={n} needs a TAP (tap= or network=); use queues=1 here"));
        }
        if self.needs_one_worker() {
            return Err(format!(
                "net{index}: queues={n} cannot be combined with MMDS or rate limits, which see the whole interface; use queues=1"
            ));
        }
        Ok(())
    }

    /// The id the API knows interface `index` by: its own, or `net<index>`.
    pub fn api_id(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| format!("net{index}"))
    }
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A unicast MAC address like 02:00:00:00:00:01; the error completes "mac= ...".
pub fn parse_unicast_mac(text: &str) -> Result<[u8; 6], String> {
    match parse_mac(text) {
        Some(m) if m[0] & 1 == 0 => Ok(m),
        Some(_) => Err(format!("{text} is a multicast address; use a unicast one")),
        None => Err(format!("takes six hex bytes like 02:00:00:00:00:01, not '{text}'")),
    }
}

/// The options every `--net` port takes: `firewall=FILE|@NAME`, `ip=A.B.C.D` and
/// `poll_us=N`.
#[derive(Default)]
struct PortOptions {
    firewall: Option<net::firewall::RuleSetSpec>,
    ip: Option<std::net::Ipv4Addr>,
    ip6: Option<std::net::Ipv6Addr>,
    poll_us: Option<u32>,
    queues: Option<u16>,
}

/// Takes `key` into `options` when it is one of theirs: Some(()) then.
fn port_option(key: &str, value: &str, options: &mut PortOptions) -> Result<Option<()>, String> {
    match key {
        "firewall" => options.firewall = Some(net::firewall::load(value).map_err(|e| format!("--net firewall=: {e}"))?),
        "ip" => {
            options.ip =
                Some(value.parse().map_err(|_| format!("--net ip= takes the VM's IPv4 address, not '{value}'"))?)
        }
        "ip6" => {
            options.ip6 =
                Some(value.parse().map_err(|_| format!("--net ip6= takes the VM's IPv6 address, not '{value}'"))?)
        }
        "poll_us" => options.poll_us = Some(parse_poll_us("--net", value)?),
        "queues" => match value.parse::<u16>() {
            Ok(n @ 1..=MAX_QUEUE_PAIRS) => options.queues = Some(n),
            _ => return Err(format!("--net queues= takes queue pairs from 1 to {MAX_QUEUE_PAIRS}, not '{value}'")),
        },
        _ => return Ok(None),
    }
    Ok(Some(()))
}

/// `--net user[,hostfwd=tcp:ADDR:HPORT-:GPORT]...[,mac=..]`.
fn parse_user_net(rest: &str) -> Result<NetConfig, String> {
    let (mut forwards, mut mac, mut port) = (Vec::new(), None, PortOptions::default());
    if !rest.is_empty() {
        for (key, value) in key_values("--net user", rest)? {
            if let Some(()) = port_option(key, value, &mut port)? {
                continue;
            }
            match key {
                "hostfwd" => forwards.push(value.parse().map_err(|e| format!("--net user,{e}"))?),
                "mac" => mac = Some(parse_unicast_mac(value).map_err(|e| format!("--net mac= {e}"))?),
                _ => {
                    return Err(format!(
                        "--net user has no option '{key}'; use hostfwd=, mac=, firewall=, ip=, ip6=, poll_us= and queues="
                    ));
                }
            }
        }
    }
    Ok(NetConfig {
        attachment: NetAttachment::User { forwards },
        mac,
        rx_rate_limit: None,
        tx_rate_limit: None,
        mmds: None,
        id: None,
        mtu: None,
        firewall: port.firewall,
        ip: port.ip,
        ip6: port.ip6,
        poll_us: port.poll_us,
        queues: port.queues,
    })
}

impl FromStr for NetConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("user").filter(|r| r.is_empty() || r.starts_with(',')) {
            return parse_user_net(rest.trim_start_matches(','));
        }
        let (mut tap, mut switch, mut network, mut vlan, mut isolated, mut mac) = (None, None, None, None, None, None);
        let mut port = PortOptions::default();
        let (mut vhost_user, mut queue_size) = (None, None);
        for (key, value) in key_values("--net", s)? {
            if let Some(()) = port_option(key, value, &mut port)? {
                continue;
            }
            match key {
                "vhost_user" if !value.is_empty() => vhost_user = Some(PathBuf::from(value)),
                "queue_size" => {
                    let mut options = None;
                    super::VhostUserOptions::parse_key(&mut options, "--net", key, value)?;
                    queue_size = options.map(|o| o.queue_size);
                }
                "tap" if !value.is_empty() && value.len() < 16 => tap = Some(value.to_string()),
                "tap" => return Err(format!("--net tap= takes an interface name of 1 to 15 bytes, not '{value}'")),
                "switch" if !value.is_empty() => switch = Some(PathBuf::from(value)),
                "network" if !value.is_empty() => network = Some(value.to_string()),
                "vlan" => match value.parse::<u16>() {
                    Ok(v) if v < 4095 => vlan = Some(v),
                    _ => return Err(format!("--net vlan= takes a VLAN number from 0 to 4094, not '{value}'")),
                },
                "isolated" => isolated = Some(on_off("--net", key, value)?),
                "mac" => mac = Some(parse_unicast_mac(value).map_err(|e| format!("--net mac= {e}"))?),
                _ => {
                    return Err(format!(
                        "--net has no option '{key}'; use tap=, switch=, vlan=, network=, isolated=, mac=, firewall=, \
                         ip=, ip6=, poll_us=, queues=, or vhost_user= with queue_size="
                    ));
                }
            }
        }
        if vlan.is_some() && switch.is_none() {
            return Err("--net vlan= goes with switch=".into());
        }
        if isolated.is_some() && network.is_none() {
            return Err("--net isolated= goes with network=".into());
        }
        if queue_size.is_some() && vhost_user.is_none() {
            return Err("--net queue_size= goes with vhost_user=".into());
        }
        let attachment = match (tap, switch, network, vhost_user) {
            (None, None, None, Some(socket)) => {
                if port.firewall.is_some() || port.ip.is_some() || port.ip6.is_some() || port.queues.is_some() {
                    return Err("--net vhost_user= takes no firewall=, ip=, ip6= or queues=: its frames never pass \
                                through the VMM; give those to the back-end"
                        .into());
                }
                let mut options = super::VhostUserOptions::new(socket);
                options.queue_size = queue_size.unwrap_or(options.queue_size);
                NetAttachment::VhostUser(options)
            }
            (tap, switch, network, Some(_)) if tap.is_some() || switch.is_some() || network.is_some() => {
                return Err("--net takes one of tap=, switch=, network= and vhost_user=".into());
            }
            (tap, switch, network, _) => match (tap, switch, network) {
                (Some(tap), None, None) => NetAttachment::Tap(tap),
                (None, Some(path), None) => NetAttachment::Switch { path, vlan: vlan.unwrap_or(0) },
                (None, None, Some(name)) => {
                    net::network::check_name(&name).map_err(|e| format!("--net network=: {e}"))?;
                    NetAttachment::Network { name, isolated: isolated.unwrap_or(false) }
                }
                (None, None, None) => {
                    return Err("--net needs tap=NAME, switch=PATH, network=NAME or vhost_user=SOCKET".into());
                }
                _ => return Err("--net takes one of tap=, switch=, network= and vhost_user=".into()),
            },
        };
        Ok(NetConfig {
            attachment,
            mac,
            rx_rate_limit: None,
            tx_rate_limit: None,
            mmds: None,
            id: None,
            mtu: None,
            firewall: port.firewall,
            ip: port.ip,
            ip6: port.ip6,
            poll_us: port.poll_us,
            queues: port.queues,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_option_parses_and_names_its_mistakes() {
        let n: NetConfig = "tap=fv0,mac=02:00:00:aa:bb:cc".parse().unwrap();
        assert_eq!(
            n,
            NetConfig {
                attachment: NetAttachment::Tap("fv0".into()),
                mac: Some([2, 0, 0, 0xaa, 0xbb, 0xcc]),
                rx_rate_limit: None,
                tx_rate_limit: None,
                mmds: None,
                id: None,
                mtu: None,
                firewall: None,
                ip: None,
                ip6: None,
                poll_us: None,
                queues: None,
            }
        );
        assert_eq!("tap=fv0".parse::<NetConfig>().unwrap().mac, None);
        assert_eq!(
            "mac=02:00:00:00:00:01".parse::<NetConfig>().unwrap_err(),
            "--net needs tap=NAME, switch=PATH, network=NAME or vhost_user=SOCKET"
        );
        let v: NetConfig = "vhost_user=/run/net.sock,queue_size=512".parse().unwrap();
        assert!(matches!(&v.attachment, NetAttachment::VhostUser(o) if o.queue_size == 512));
        assert!("vhost_user=/s,firewall=@x".parse::<NetConfig>().is_err());
        assert!("vhost_user=/s,ip=10.0.0.2".parse::<NetConfig>().unwrap_err().contains("never pass through the VMM"));
        assert!("tap=a,vhost_user=/s".parse::<NetConfig>().unwrap_err().contains("one of tap="));
        assert!("tap=a,queue_size=64".parse::<NetConfig>().unwrap_err().contains("goes with vhost_user="));
        let n: NetConfig = "network=lab,isolated=on".parse().unwrap();
        assert_eq!(n.attachment, NetAttachment::Network { name: "lab".into(), isolated: true });
        assert!("tap=x,isolated=on".parse::<NetConfig>().unwrap_err().contains("isolated= goes with network="));
        let u: NetConfig = "user,hostfwd=tcp:127.0.0.1:2222-:22".parse().unwrap();
        assert!(matches!(&u.attachment, NetAttachment::User { forwards } if forwards[0].guest_port == 22));
        assert!("user,hostfwd=tcp:1".parse::<NetConfig>().unwrap_err().starts_with("--net user,hostfwd takes"));
        assert!(matches!("user".parse::<NetConfig>().unwrap().attachment, NetAttachment::User { .. }));
        let sw: NetConfig = "switch=/tmp/sw.sock,vlan=7".parse().unwrap();
        assert_eq!(sw.attachment, NetAttachment::Switch { path: "/tmp/sw.sock".into(), vlan: 7 });
        assert!("tap=a,switch=/x".parse::<NetConfig>().unwrap_err().contains("one of tap=, switch=, network= and"));
        assert!("tap=a,vlan=3".parse::<NetConfig>().unwrap_err().contains("goes with switch="));
        assert!("switch=/x,vlan=5000".parse::<NetConfig>().unwrap_err().contains("0 to 4094"));
        assert!("tap=fv0,mac=01:00:00:00:00:01".parse::<NetConfig>().unwrap_err().contains("multicast"));
        assert!("tap=fv0,mac=02:00:00:00:00".parse::<NetConfig>().unwrap_err().contains("six hex bytes"));
        assert!("tap=fv0,mac=02:00:00:00:00:01:02".parse::<NetConfig>().unwrap_err().contains("six hex bytes"));
        assert!("tap=a-very-long-tap-name".parse::<NetConfig>().unwrap_err().contains("1 to 15 bytes"));
        assert!("tap=fv0,vhost=on".parse::<NetConfig>().unwrap_err().contains("no option 'vhost'"));
        assert_eq!("tap=fv0,queues=4".parse::<NetConfig>().unwrap().queues, Some(4));
        assert!("tap=fv0,poll_us=x".parse::<NetConfig>().unwrap_err().contains("--net poll_us= takes microseconds"));
        assert_eq!("user,poll_us=20".parse::<NetConfig>().unwrap().poll_us, Some(20));
        for bad in ["tap=fv0,queues=0", "tap=fv0,queues=17", "tap=fv0,queues=many"] {
            assert!(bad.parse::<NetConfig>().unwrap_err().contains("queues= takes queue pairs from 1 to 16"), "{bad}");
        }
    }

    #[test]
    fn queue_pairs_follow_the_vcpus_where_the_interface_can_spread() {
        let tap: NetConfig = "tap=fv0".parse().unwrap();
        assert_eq!((tap.queue_pairs(1), tap.queue_pairs(4), tap.queue_pairs(64)), (1, 4, MAX_QUEUE_PAIRS));
        let mmds = NetConfig { mmds: Some(net::mmds::DEFAULT_IPV4), ..tap.clone() };
        assert_eq!(mmds.queue_pairs(4), 1, "MMDS answers one interface-wide stack");
        let switch: NetConfig = "switch=/x".parse().unwrap();
        assert_eq!(switch.queue_pairs(4), 1);
        let asked: NetConfig = "tap=fv0,queues=3".parse().unwrap();
        assert_eq!(asked.queue_pairs(1), 3);
        assert!(asked.check_queues(0).is_ok());
        let limited = NetConfig { mmds: Some(net::mmds::DEFAULT_IPV4), ..asked };
        assert!(limited.check_queues(2).unwrap_err().starts_with("net2: queues=3 cannot be combined with MMDS"));
        let on_switch: NetConfig = "switch=/x,queues=2".parse().unwrap();
        assert!(on_switch.check_queues(0).unwrap_err().contains("needs a TAP"));
    }
}
