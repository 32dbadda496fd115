//! Firewall benchmark:
//!
//!     cargo bench --bench firewall          (FERROVISOR_BENCH_RUNS=N, default 3)
//!
//! 1. The engine alone: nanoseconds per frame of an established UDP flow, IPv4 and IPv6,
//!    through a port's firewall that is off, with an empty rule set, with 10 rules and with 100
//!    (none of which matches the flow, so that a new flow would scan them all).
//! 2. A VM on `ferrovisor switch`: UDP datagrams per second a probe floods to a neighbour
//!    through its VMM's transmit path, its port's firewall and into the switch, the port with
//!    an empty rule set, 10 rules and 100 (the neighbour is there to receive them; the switch
//!    drops what its socket cannot take, so the sender's rate is what is measured).
//!
//! 3. A VM on a managed network (isolated, in a network namespace of its own; root): the same
//!    flood into the bridge from a port with its nftables table (an empty rule set, and 100
//!    rules) and from a plain TAP on the same bridge with no table and no firewall.
//!
//! Medians, each relative to the empty rule set's.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use net::firewall::{Firewall, PortIdentity, RuleSetSpec};

#[allow(dead_code)]
mod common;

use common::{field, line_with, median, probe, runs, sh};

const DATAGRAMS: u64 = 50_000;
const ENGINE_FRAMES: u32 = 2_000_000;

/// A rule set of `count` rules that never match an outbound UDP flow (inbound TCP ports), all
/// traffic otherwise allowed, no storm control.
fn rules(count: u16) -> RuleSetSpec {
    let rules: Vec<serde_json::Value> = (0..count)
        .map(|i| {
            serde_json::json!({"name": format!("r{i}"), "direction": "in", "protocol": "tcp",
                               "ports": (1000 + i).to_string(), "peer": "192.168.0.0/16", "action": "allow"})
        })
        .collect();
    serde_json::from_value(serde_json::json!({"default_in": "allow", "storm_pps": 0, "rules": rules})).unwrap()
}

/// An IPv4 UDP frame from 10.0.0.1:40000 (MAC 02:..:01) to 10.0.0.2:9999.
fn udp_frame() -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[8, 0]);
    f[14] = 0x45;
    f[16..18].copy_from_slice(&46u16.to_be_bytes());
    f[23] = 17;
    f[26..30].copy_from_slice(&[10, 0, 0, 1]);
    f[30..34].copy_from_slice(&[10, 0, 0, 2]);
    f[34..36].copy_from_slice(&40000u16.to_be_bytes());
    f[36..38].copy_from_slice(&9999u16.to_be_bytes());
    f
}

/// The same datagram over IPv6, from the VM's link-local address (fe80::ff:fe00:1, from its MAC)
/// to 2001:db8::2.
fn udp6_frame() -> Vec<u8> {
    let mut f = vec![0u8; 14 + 40 + 8 + 10];
    f[0..6].copy_from_slice(&[2, 0, 0, 0, 0, 2]);
    f[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 1]);
    f[12..14].copy_from_slice(&[0x86, 0xdd]);
    f[14] = 0x60;
    f[18..20].copy_from_slice(&18u16.to_be_bytes());
    f[20] = 17;
    f[21] = 64;
    f[22..38].copy_from_slice(&"fe80::ff:fe00:1".parse::<std::net::Ipv6Addr>().unwrap().octets());
    f[38..54].copy_from_slice(&"2001:db8::2".parse::<std::net::Ipv6Addr>().unwrap().octets());
    f[54..56].copy_from_slice(&40000u16.to_be_bytes());
    f[56..58].copy_from_slice(&9999u16.to_be_bytes());
    f
}

/// Nanoseconds per frame through `firewall`, outbound, on one established flow.
fn engine(firewall: &Firewall, frame: &[u8]) -> f64 {
    assert!(firewall.outbound(frame));
    let start = Instant::now();
    for _ in 0..ENGINE_FRAMES {
        std::hint::black_box(firewall.outbound(std::hint::black_box(frame)));
    }
    start.elapsed().as_nanos() as f64 / f64::from(ENGINE_FRAMES)
}

fn identity() -> PortIdentity {
    PortIdentity { mac: [2, 0, 0, 0, 0, 1], ip: Some(Ipv4Addr::new(10, 0, 0, 1)), ip6: None, anti_spoofing: true }
}

fn switch_probe(switch: &Path, host: u8, firewall: Option<&Path>, tests: &str) -> Child {
    let firewall = firewall.map(|f| format!(",firewall={}", f.display())).unwrap_or_default();
    let net = format!("switch={},mac=02:00:00:00:00:{host:02x},ip=10.0.0.{host}{firewall}", switch.display());
    probe(None, None, &net, tests)
}

/// Datagrams per second a sender whose port has `rules` got out.
fn vm_to_vm(switch: &Path, rules_file: &Path) -> f64 {
    let mut sink =
        switch_probe(switch, 2, None, &format!("probe.virtio-net.mode=sink probe.virtio-net.frames={DATAGRAMS}"));
    line_with(&mut sink, "sink ready");
    // No router; the receiver does not answer ARP, so the datagrams go to the broadcast MAC
    // (storm control is off in every rule set here).
    let mut sender = switch_probe(switch, 1, Some(rules_file), &common::flood_tests("10.0.0", DATAGRAMS));
    let result = line_with(&mut sender, "PROBE virtio-net ok mode=ip");
    let _ = sender.wait();
    let _ = sink.kill();
    let _ = sink.wait();
    field(&result, "flood_pps")
}

/// The flood's rate from a probe at 10.93.0.1 with `--net net` in namespace `ns`.
fn flood_rate(ns: &str, net: &str, state: &Path) -> f64 {
    let mut sender = probe(Some(ns), Some(state), net, &common::flood_tests("10.93.0", DATAGRAMS));
    let result = line_with(&mut sender, "PROBE virtio-net ok mode=ip");
    let _ = sender.wait();
    field(&result, "flood_pps")
}

/// Managed network: medians for an empty rule set, 100 rules, and no table.
fn managed(dir: &Path, files: &[(&str, PathBuf)]) -> Vec<(String, f64)> {
    let ns = format!("fvfwb{}", std::process::id() % 10000);
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    sh(&["ip", "netns", "add", &ns]);
    let state = dir.join("state");
    let network = |args: &[&str]| common::network(&ns, &state, args);
    network(&["create", "fwb", "--mode", "isolated", "--subnet", "10.93.0.0/24"]);
    sh(&["ip", "-n", &ns, "tuntap", "add", "fvbplain", "mode", "tap"]);
    sh(&["ip", "-n", &ns, "link", "set", "fvbplain", "master", "fv-fwb", "up"]);
    let mut samples: Vec<(String, Vec<f64>)> = Vec::new();
    let mut add = |label: String, rate: f64| match samples.iter_mut().find(|(l, _)| *l == label) {
        Some((_, v)) => v.push(rate),
        None => samples.push((label, vec![rate])),
    };
    for _ in 0..runs() {
        for (name, file) in files.iter().filter(|(n, _)| *n != "10 rules") {
            let net = format!("network=fwb,mac=02:00:00:00:93:01,ip=10.93.0.1,firewall={}", file.display());
            add(format!("nftables, {name}"), flood_rate(&ns, &net, &state));
        }
        add("plain TAP, no table".into(), flood_rate(&ns, "tap=fvbplain,mac=02:00:00:00:93:01", &state));
    }
    sh(&["ip", "-n", &ns, "link", "del", "fvbplain"]);
    network(&["delete", "fwb"]);
    let _ = Command::new("ip").args(["netns", "del", &ns]).status();
    samples.into_iter().map(|(l, v)| (l, median(v))).collect()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    // Per rule set: IPv4's samples, then IPv6's.
    let mut engines: Vec<(&str, [Vec<f64>; 2])> = ["off", "empty rule set", "10 rules", "100 rules"]
        .into_iter()
        .map(|name| (name, [Vec::new(), Vec::new()]))
        .collect();
    for _ in 0..runs() {
        for (family, frame) in [udp_frame(), udp6_frame()].iter().enumerate() {
            engines[0].1[family].push(engine(&Firewall::inactive(identity()), frame));
            for (i, count) in [(1, 0), (2, 10), (3, 100)] {
                engines[i].1[family].push(engine(&Firewall::new(rules(count).check().unwrap(), identity()), frame));
            }
        }
    }
    let dir = std::env::temp_dir().join(format!("fvfwbench{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let files: Vec<(&str, PathBuf)> = [("empty rule set", 0), ("10 rules", 10), ("100 rules", 100)]
        .into_iter()
        .map(|(name, count)| {
            let path = dir.join(format!("rules{count}.json"));
            std::fs::write(&path, serde_json::to_string(&rules(count)).unwrap()).unwrap();
            (name, path)
        })
        .collect();
    let switch_path = dir.join("switch.sock");
    let mut switch = Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
        .arg("switch")
        .arg(&switch_path)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !switch_path.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut switched: Vec<Vec<f64>> = vec![Vec::new(); files.len()];
    for _ in 0..runs() {
        for (i, (_, file)) in files.iter().enumerate() {
            switched[i].push(vm_to_vm(&switch_path, file));
        }
    }
    let _ = switch.kill();
    let _ = switch.wait();
    let managed = managed(&dir, &files);
    let _ = std::fs::remove_dir_all(&dir);

    println!("firewall engine, one established UDP flow, medians of {} x {ENGINE_FRAMES} frames:", runs());
    let base = median(engines[1].1[0].clone());
    for (name, [v4, v6]) in engines {
        let (ns4, ns6) = (median(v4), median(v6));
        println!(
            "  {name:<16} IPv4 {ns4:>7.1} ns/frame ({:.2}x the empty rule set's), IPv6 {ns6:>7.1} ns/frame ({:.2}x IPv4's)",
            ns4 / base,
            ns6 / ns4
        );
    }
    println!("a VM's datagrams into the switch, {DATAGRAMS} each run, medians of {}:", runs());
    let base = median(switched[0].clone());
    for ((name, _), samples) in files.iter().zip(switched) {
        let pps = median(samples);
        println!("  {name:<16} {pps:>9.0} datagrams/s   {:.2}x the empty rule set's rate", pps / base);
    }
    println!("a VM's datagrams into a managed network's bridge, {DATAGRAMS} each run, medians of {}:", runs());
    let base = managed.iter().find(|(l, _)| l == "nftables, empty rule set").map_or(1.0, |(_, v)| *v);
    for (name, pps) in managed {
        println!("  {name:<28} {pps:>9.0} datagrams/s   {:.2}x the empty rule set's rate", pps / base);
    }
}
