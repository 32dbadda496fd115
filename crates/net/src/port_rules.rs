//! The kernel's copy of a managed-network port's firewall: an nftables table of the port's own
//! (`netdev fv_<tap>`), bound to its TAP, so that frames are filtered before they reach the
//! bridge and before they reach the VMM. It holds the port's guards (anti-spoofing, no DHCP
//! server answers, storm control) and its security-group rules, stateful through two sets of
//! flows the rules let open (the VM's address and port first, as the VMM's own flow table keys
//! them).
//!
//! A keeper process holds the table's life and applies rule changes: it reads one base64 nft
//! script per line from a pipe the VMM writes (the VMM's seccomp filter lets it write, not run
//! programs), and when the pipe closes, because the VMM ended however it ended (SIGKILL
//! included), it deletes the table, as the kernel deletes the TAP.

use std::io::Write;
use std::net::Ipv4Addr;
use std::process::{Child, Stdio};

use crate::firewall::{Action, Direction, Protocol, Rule, RuleSet};
use crate::network::nft;

const TCP_TIMEOUT_S: u32 = 600;
const UDP_TIMEOUT_S: u32 = 60;
const ICMP_TIMEOUT_S: u32 = 30;
/// ICMPv6's neighbour discovery and multicast listener messages, as the VMM's table lets them.
const NEIGHBOR_DISCOVERY: &str = "{ nd-router-solicit, nd-router-advert, nd-neighbor-solicit, nd-neighbor-advert, \
     nd-redirect, mld-listener-query, mld-listener-report, mld-listener-done, mld2-listener-report }";
/// Flows a port's sets hold at most, as in the VMM's table.
const MAX_FLOWS: usize = crate::firewall::MAX_FLOWS;

/// What the table of a port guards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Guards {
    pub mac: [u8; 6],
    pub ip: Option<Ipv4Addr>,
    pub anti_spoofing: bool,
    /// 0: no storm control.
    pub storm_pps: u32,
}

/// A port's table and its keeper; dropping it (or the VMM's end) removes the table.
pub struct PortRules {
    table: String,
    keeper: Child,
}

impl Drop for PortRules {
    fn drop(&mut self) {
        // Closing its stdin is the keeper's signal; it is not waited for.
        drop(self.keeper.stdin.take());
    }
}

/// The table of `tap`.
pub fn table(tap: &str) -> String {
    format!("fv_{tap}")
}

fn mac_text(mac: [u8; 6]) -> String {
    mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")
}

/// The guard rules, run on every frame from the VM before its security-group rules.
fn guard_rules(g: &Guards) -> Vec<String> {
    let mut rules = Vec::new();
    if g.storm_pps > 0 {
        rules.push(format!(
            "ether daddr & 01:00:00:00:00:00 == 01:00:00:00:00:00 limit rate over {0}/second burst {0} packets counter drop comment \"storm control\"",
            g.storm_pps
        ));
    }
    if !g.anti_spoofing {
        return rules;
    }
    let mac = mac_text(g.mac);
    rules.push(format!("ether saddr != {mac} counter drop comment \"spoofed MAC\""));
    rules.push(format!("arp saddr ether != {mac} counter drop comment \"spoofed ARP\""));
    rules.push("udp sport 67 counter drop comment \"DHCP server answer\"".into());
    rules.push("udp sport 547 counter drop comment \"DHCPv6 server answer\"".into());
    rules.push("icmpv6 type { nd-router-advert, nd-redirect } counter drop comment \"router advertisement\"".into());
    if let Some(ip) = g.ip {
        rules.push(format!("arp saddr ip != {{ 0.0.0.0, {ip} }} counter drop comment \"spoofed ARP\""));
        rules.push(format!("ip saddr != {{ 0.0.0.0, {ip} }} counter drop comment \"spoofed IP\""));
        // From 0.0.0.0 only a DHCP request.
        rules.push("ip saddr 0.0.0.0 udp dport != 67 counter drop comment \"spoofed IP\"".into());
    }
    rules
}

/// IPv4 or IPv6: each has its own flows sets, keyed by its own addresses.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Family {
    V4,
    V6,
}

impl Family {
    /// The families a rule applies to: its peer's, its ICMP's, or both.
    fn of(rule_protocol: Protocol, peer: Option<crate::firewall::Cidr>) -> &'static [Family] {
        match (rule_protocol, peer.map(|p| p.addr.is_ipv4())) {
            (Protocol::Icmp, _) | (_, Some(true)) => &[Family::V4],
            (Protocol::Icmpv6, _) | (_, Some(false)) => &[Family::V6],
            _ => &[Family::V4, Family::V6],
        }
    }

    /// `meta protocol`'s name, the address selector, the flows and pings sets, and the echo's.
    fn names(self) -> (&'static str, &'static str, &'static str, &'static str, &'static str) {
        match self {
            Family::V4 => ("ip", "ip", "flows", "pings", "icmp"),
            Family::V6 => ("ip6", "ip6", "flows6", "pings6", "icmpv6"),
        }
    }
}

/// Keys of the flows sets, with the VM's side first: in the chain of frames from the VM its
/// side is the source; in the chain of frames to it, the destination.
fn keys(direction: Direction, family: Family) -> (String, String) {
    let (_, ip, _, _, icmp) = family.names();
    let (vm, remote, vm_port, remote_port) = match direction {
        Direction::Out => ("saddr", "daddr", "sport", "dport"),
        Direction::In => ("daddr", "saddr", "dport", "sport"),
    };
    (
        format!("{ip} {vm} . meta l4proto . th {vm_port} . {ip} {remote} . th {remote_port}"),
        format!("{ip} {vm} . {ip} {remote} . {icmp} id"),
    )
}

/// The nft rules that let a new flow matching `matcher` open (and remember it), with the rule's
/// name as comment and counter, for each IP family the rule applies to.
fn allow(direction: Direction, matcher: &str, protocol: Protocol, families: &[Family], comment: &str) -> Vec<String> {
    let mut rules = Vec::new();
    for &family in families {
        let (flow, ping) = keys(direction, family);
        let (ethertype, _, flows, pings, icmp) = family.names();
        let only = format!("meta protocol {ethertype} ");
        // A tcp or udp rule's matcher names its protocol already.
        let l4 = |name: &str| if protocol == Protocol::Any { format!("meta l4proto {name} ") } else { String::new() };
        if matches!(protocol, Protocol::Tcp | Protocol::Any) {
            rules.push(format!(
                "{only}{matcher}{}update @{flows} {{ {flow} timeout {TCP_TIMEOUT_S}s }} counter accept{comment}",
                l4("tcp")
            ));
        }
        if matches!(protocol, Protocol::Udp | Protocol::Any) {
            rules.push(format!(
                "{only}{matcher}{}update @{flows} {{ {flow} timeout {UDP_TIMEOUT_S}s }} counter accept{comment}",
                l4("udp")
            ));
        }
        let echo = match family {
            Family::V4 => matches!(protocol, Protocol::Icmp | Protocol::Any),
            Family::V6 => matches!(protocol, Protocol::Icmpv6 | Protocol::Any),
        };
        if echo {
            rules.push(format!(
                "{only}{matcher}{icmp} type echo-request update @{pings} {{ {ping} timeout {ICMP_TIMEOUT_S}s }} counter accept{comment}"
            ));
        }
    }
    // The rest of an icmp, icmpv6 or any rule's traffic passes untracked (an icmp rule's
    // matcher names its protocol already).
    if matches!(protocol, Protocol::Icmp | Protocol::Icmpv6 | Protocol::Any) {
        rules.push(format!("{matcher}counter accept{comment}"));
    }
    rules
}

fn matcher(rule: &Rule) -> String {
    let mut m = String::new();
    match rule.protocol {
        Protocol::Tcp => m.push_str("meta l4proto tcp "),
        Protocol::Udp => m.push_str("meta l4proto udp "),
        Protocol::Icmp => m.push_str("meta l4proto icmp "),
        Protocol::Icmpv6 => m.push_str("meta l4proto ipv6-icmp "),
        Protocol::Any => {}
    }
    if let Some(peer) = rule.peer {
        let side = if rule.direction == Direction::Out { "daddr" } else { "saddr" };
        let family = if peer.addr.is_ipv4() { "ip" } else { "ip6" };
        m.push_str(&format!("{family} {side} {peer} "));
    }
    if let Some((low, high)) = rule.ports {
        m.push_str(&if low == high { format!("th dport {low} ") } else { format!("th dport {low}-{high} ") });
    }
    m
}

/// The rules of one direction's chain: replies to known flows, then the rules in order, then
/// the default policy.
fn direction_rules(rules: &RuleSet, direction: Direction) -> Vec<String> {
    // ARP resolves addresses both ways, and neighbour discovery and multicast listening are
    // IPv6's ARP; the guards checked the VM's.
    let mut out = vec!["meta protocol arp accept".to_string(), format!("icmpv6 type {NEIGHBOR_DISCOVERY} accept")];
    for family in [Family::V4, Family::V6] {
        let (flow, ping) = keys(direction, family);
        let (ethertype, _, flows, pings, icmp) = family.names();
        out.push(format!("meta protocol {ethertype} meta l4proto {{ tcp, udp }} {flow} @{flows} accept"));
        out.push(format!("meta protocol {ethertype} {icmp} type echo-reply {ping} @{pings} accept"));
    }
    for rule in rules.rules.iter().filter(|r| r.direction == direction) {
        // Checked names are plain text; anything else is dropped all the same, since the
        // comment goes into a script nft reads.
        let name: String = rule.name.chars().filter(|c| c.is_ascii_alphanumeric() || " _-.:".contains(*c)).collect();
        let comment = format!(" comment \"{name}\"");
        match rule.action {
            Action::Allow => {
                let families = Family::of(rule.protocol, rule.peer);
                out.extend(allow(direction, &matcher(rule), rule.protocol, families, &comment))
            }
            Action::Deny => out.push(format!("{}counter drop{comment}", matcher(rule))),
        }
    }
    let default = match direction {
        Direction::In => rules.default_in,
        Direction::Out => rules.default_out,
    };
    let comment = format!(" comment \"default {}\"", if direction == Direction::In { "in" } else { "out" });
    match default {
        Action::Allow => out.extend(allow(direction, "", Protocol::Any, &[Family::V4, Family::V6], &comment)),
        Action::Deny => out.push(format!("counter drop{comment}")),
    }
    out
}

fn chain_body(rules: &[String]) -> String {
    rules.iter().map(|r| format!("    {r}\n")).collect()
}

/// The whole table of `tap`.
pub fn script(tap: &str, guards: &Guards, rules: &RuleSet) -> String {
    let table = table(tap);
    let mut guard = guard_rules(guards);
    guard.push("jump rules_out".into());
    format!(
        "table netdev {table} {{\n\
         \x20 set flows {{ type ipv4_addr . inet_proto . inet_service . ipv4_addr . inet_service; flags dynamic, timeout; size {MAX_FLOWS}; }}\n\
         \x20 set pings {{ typeof ip saddr . ip daddr . icmp id; flags dynamic, timeout; size {MAX_FLOWS}; }}\n\
         \x20 set flows6 {{ type ipv6_addr . inet_proto . inet_service . ipv6_addr . inet_service; flags dynamic, timeout; size {MAX_FLOWS}; }}\n\
         \x20 set pings6 {{ typeof ip6 saddr . ip6 daddr . icmpv6 id; flags dynamic, timeout; size {MAX_FLOWS}; }}\n\
         \x20 chain rules_out {{\n{}  }}\n\
         \x20 chain rules_in {{\n{}  }}\n\
         \x20 chain from_vm {{\n    type filter hook ingress device \"{tap}\" priority -10; policy accept;\n{}  }}\n\
         \x20 chain to_vm {{\n    type filter hook egress device \"{tap}\" priority -10; policy accept;\n    jump rules_in\n  }}\n\
         }}\n",
        chain_body(&direction_rules(rules, Direction::Out)),
        chain_body(&direction_rules(rules, Direction::In)),
        chain_body(&guard),
    )
}

/// A script that puts `rules` in place of the table's: new flows meet them at once (known
/// flows are forgotten, and come back on their next packet the new rules allow).
pub fn update_script(tap: &str, rules: &RuleSet) -> String {
    let table = table(tap);
    let mut script = String::new();
    for chain in ["rules_out", "rules_in"] {
        script.push_str(&format!("flush chain netdev {table} {chain}\n"));
    }
    for set in ["flows", "pings", "flows6", "pings6"] {
        script.push_str(&format!("flush set netdev {table} {set}\n"));
    }
    for (chain, direction) in [("rules_out", Direction::Out), ("rules_in", Direction::In)] {
        for rule in direction_rules(rules, direction) {
            script.push_str(&format!("add rule netdev {table} {chain} {rule}\n"));
        }
    }
    script
}

fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            out.push(if i <= chunk.len() { ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

impl PortRules {
    /// Puts the table on `tap` (which must exist) and starts its keeper.
    pub fn install(tap: &str, guards: &Guards, rules: &RuleSet) -> Result<PortRules, String> {
        let table = table(tap);
        // A table left by a VMM whose keeper died too goes first.
        let _ =
            sandbox::helper_command("nft").args(["delete", "table", "netdev", &table]).stderr(Stdio::null()).status();
        nft(&script(tap, guards, rules))?;
        // The keeper ignores the signals a terminal sends to the VMM's whole group.
        let keeper = sandbox::helper_command("sh")
            .args([
                "-c",
                "trap '' INT TERM HUP
                 while IFS= read -r update; do
                     printf '%s' \"$update\" | base64 -d | nft -f - || echo \"ferrovisor: nftables refused an update of $1\" >&2
                 done
                 exec nft delete table netdev \"$1\"",
                "sh",
                &table,
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| {
                let _ = nft(&format!("delete table netdev {table}\n"));
                format!("the keeper of {table} cannot start ({e})")
            })?;
        // A keeper that stopped reading must not hang the VMM's API: a full pipe fails the
        // update instead.
        if let Some(stdin) = &keeper.stdin {
            let fd = std::os::fd::AsRawFd::as_raw_fd(stdin);
            // SAFETY: fcntl on a pipe fd this process owns; it changes only its flags.
            unsafe { libc::fcntl(fd, libc::F_SETFL, libc::fcntl(fd, libc::F_GETFL) | libc::O_NONBLOCK) };
        }
        Ok(PortRules { table, keeper })
    }

    /// Hands new rules to the keeper, which applies them; the VMM's own copy applies at once
    /// whatever happens here.
    pub fn update(&mut self, tap: &str, rules: &RuleSet) -> Result<(), String> {
        let line = base64(update_script(tap, rules).as_bytes()) + "\n";
        let stdin = self.keeper.stdin.as_mut().ok_or("the keeper is gone")?;
        stdin.write_all(line.as_bytes()).map_err(|e| format!("the keeper of {} took no update ({e})", self.table))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::firewall::RuleSetSpec;

    fn rules(json: &str) -> RuleSet {
        serde_json::from_str::<RuleSetSpec>(json).unwrap().check().unwrap()
    }

    #[test]
    fn the_table_guards_the_port_and_translates_the_rules() {
        let guards = Guards {
            mac: [2, 0xfe, 0, 0, 0, 1],
            ip: Some(Ipv4Addr::new(10, 1, 0, 5)),
            anti_spoofing: true,
            storm_pps: 500,
        };
        let rules = rules(
            r#"{"rules": [{"name": "web", "direction": "in", "protocol": "tcp", "ports": "80-90", "peer": "10.0.0.0/8", "action": "allow"},
                          {"name": "no-dns", "direction": "out", "protocol": "udp", "ports": "53", "action": "deny"},
                          {"name": "ping6", "direction": "in", "protocol": "icmpv6", "peer": "2001:db8::/32", "action": "allow"}]}"#,
        );
        let script = script("fv42n0", &guards, &rules);
        for line in [
            "table netdev fv_fv42n0 {",
            "type filter hook ingress device \"fv42n0\" priority -10; policy accept;",
            "type filter hook egress device \"fv42n0\" priority -10; policy accept;",
            "ether saddr != 02:fe:00:00:00:01 counter drop",
            "ip saddr != { 0.0.0.0, 10.1.0.5 } counter drop",
            "udp sport 67 counter drop",
            "limit rate over 500/second burst 500 packets counter drop",
            "meta protocol ip meta l4proto tcp ip saddr 10.0.0.0/8 th dport 80-90 update @flows { ip daddr . meta l4proto . th dport . ip saddr . th sport timeout 600s } counter accept comment \"web\"",
            "meta l4proto udp th dport 53 counter drop comment \"no-dns\"",
            "meta protocol ip meta l4proto { tcp, udp } ip saddr . meta l4proto . th sport . ip daddr . th dport @flows accept",
            "meta protocol ip6 meta l4proto { tcp, udp } ip6 saddr . meta l4proto . th sport . ip6 daddr . th dport @flows6 accept",
            "meta protocol ip6 meta l4proto ipv6-icmp ip6 saddr 2001:db8::/32 icmpv6 type echo-request update @pings6 { ip6 daddr . ip6 saddr . icmpv6 id timeout 30s } counter accept comment \"ping6\"",
            "counter drop comment \"default in\"",
        ] {
            assert!(script.contains(line), "{line}:\n{script}");
        }
        let update = update_script("fv42n0", &rules);
        assert!(update.starts_with("flush chain netdev fv_fv42n0 rules_out\n"), "{update}");
        assert!(update.contains("add rule netdev fv_fv42n0 rules_in meta protocol arp accept\n"), "{update}");
        let open = super::script("fv42n0", &Guards { anti_spoofing: false, storm_pps: 0, ..guards }, &rules);
        assert!(!open.contains("ether saddr") && !open.contains("limit"), "{open}");
    }

    #[test]
    fn base64_is_the_standard_alphabet_with_padding() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"flush chain\n"), "Zmx1c2ggY2hhaW4K");
    }
}
