//! Network benchmark (root; everything in network namespaces it makes and removes):
//!
//!     cargo bench --bench network          (FERROVISOR_BENCH_RUNS=N, default 3)
//!
//! Frames per second from one probe guest to another through a managed network's bridge and
//! through `ferrovisor switch` (the sender keeps its ring full with 60-byte frames, the
//! receiver counts them), and UDP datagrams per second from a guest to a host socket through
//! user-mode networking and to an outside server through a nat network (64-byte payloads;
//! counted where they arrive). Medians, with each path's rate relative to the bridge's.

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[allow(dead_code)]
mod common;

use common::{field, line_with, median, probe, runs, sh};

const FRAMES: u64 = 100_000;

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferrovisor"))
}

/// Frames per second from a sender probe to a receiver probe, both on `net`.
fn vm_to_vm(ns: Option<&str>, state: &Path, net: &str) -> f64 {
    let mut sink = probe(ns, Some(state), net, &format!("probe.virtio-net.mode=sink probe.virtio-net.frames={FRAMES}"));
    line_with(&mut sink, "sink ready");
    // The sender's frames are broadcasts: its port's storm control (on by default on switch
    // and managed-network ports) would hold them to 1000 a second.
    let unlimited = state.join("no-storm-control.json");
    std::fs::write(&unlimited, r#"{"default_in": "allow", "storm_pps": 0}"#).unwrap();
    let sender_net = format!("{net},firewall={}", unlimited.display());
    let mut sender = probe(
        ns,
        Some(state),
        &sender_net,
        &format!("probe.virtio-net.mode=throughput probe.virtio-net.frames={FRAMES}"),
    );
    let result = line_with(&mut sink, "PROBE virtio-net ok mode=sink");
    let _ = sender.kill();
    let _ = sender.wait();
    let _ = sink.wait();
    field(&result, "rx_pps")
}

/// Counts datagrams arriving on `socket` until `want` came or a second passed without one;
/// returns datagrams per second between the first and the last.
fn count_udp(socket: &UdpSocket, want: u64) -> f64 {
    socket.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 2048];
    let (mut got, mut first, mut last) = (0u64, None, Instant::now());
    while got < want {
        match socket.recv(&mut buf) {
            Ok(_) => {
                last = Instant::now();
                first.get_or_insert(last);
                got += 1;
            }
            Err(_) if got > 0 => break,
            Err(_) if first.is_none() && got == 0 => continue,
            Err(_) => break,
        }
    }
    let span = first.map_or(0.0, |f| last.duration_since(f).as_secs_f64());
    if span > 0.0 { (got - 1) as f64 / span } else { 0.0 }
}

fn user_nat(state: &Path) -> f64 {
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let port = socket.local_addr().unwrap().port();
    let tests = format!(
        "probe.virtio-net.mode=ip probe.virtio-net.ip=10.0.2.15 probe.virtio-net.gw=10.0.2.2 \
         probe.virtio-net.checks=icmp probe.virtio-net.port={port} probe.virtio-net.flood={FRAMES}"
    );
    let mut vm = probe(None, Some(state), "user", &tests);
    let rate = count_udp(&socket, FRAMES);
    let _ = vm.wait();
    rate
}

const COUNTER: &str = r#"
import socket, sys, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(("0.0.0.0", 9999)); s.settimeout(20)
got, first, last = 0, None, None
try:
    while got < int(sys.argv[1]):
        s.recv(2048); last = time.monotonic(); first = first or last; got += 1
        s.settimeout(1)
except socket.timeout:
    pass
print((got - 1) / (last - first) if got > 1 else 0, flush=True)
"#;

/// Datagrams per second from a guest on a nat network to a server outside.
fn nat(lab: &str, state: &Path) -> f64 {
    let counter = Command::new("ip")
        .args(["netns", "exec", &format!("{lab}o"), "python3", "-c", COUNTER, &FRAMES.to_string()])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let tests = format!(
        "probe.virtio-net.mode=ip probe.virtio-net.ip=10.91.0.10 probe.virtio-net.gw=10.91.0.1 \
         probe.virtio-net.dst=192.0.2.1 probe.virtio-net.checks=icmp probe.virtio-net.port=9999 probe.virtio-net.flood={FRAMES}"
    );
    let mut vm = probe(Some(&format!("{lab}h")), Some(state), "network=nat", &tests);
    let out = counter.wait_with_output().unwrap();
    let _ = vm.wait();
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0.0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let lab = format!("fvbench{}", std::process::id() % 10000);
    let (host, outside) = (format!("{lab}h"), format!("{lab}o"));
    let state = std::env::temp_dir().join(format!("{lab}-state"));
    let _ = std::fs::remove_dir_all(&state);
    sh(&["ip", "netns", "add", &host]);
    sh(&["ip", "netns", "add", &outside]);
    sh(&["ip", "link", "add", "fvbvh", "type", "veth", "peer", "name", "fvbvo"]);
    sh(&["ip", "link", "set", "fvbvh", "netns", &host]);
    sh(&["ip", "link", "set", "fvbvo", "netns", &outside]);
    sh(&["ip", "-n", &host, "addr", "add", "192.0.2.2/24", "dev", "fvbvh"]);
    sh(&["ip", "-n", &outside, "addr", "add", "192.0.2.1/24", "dev", "fvbvo"]);
    for (ns, dev) in [(&host, "fvbvh"), (&outside, "fvbvo")] {
        sh(&["ip", "-n", ns, "link", "set", dev, "up"]);
        sh(&["ip", "-n", ns, "link", "set", "lo", "up"]);
    }
    let network = |args: &[&str]| common::network(&host, &state, args);
    network(&["create", "br", "--mode", "isolated", "--subnet", "10.90.0.0/24"]);
    network(&["create", "nat", "--mode", "nat", "--subnet", "10.91.0.0/24", "--uplink", "fvbvh"]);
    let switch_path = state.join("switch.sock");
    let mut switch = Command::new(bin()).arg("switch").arg(&switch_path).stderr(Stdio::null()).spawn().unwrap();
    std::thread::sleep(Duration::from_millis(300));

    let (mut bridge, mut sw, mut user, mut masq) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs() {
        bridge.push(vm_to_vm(Some(&host), &state, "network=br"));
        sw.push(vm_to_vm(None, &state, &format!("switch={}", switch_path.display())));
        user.push(user_nat(&state));
        masq.push(nat(&lab, &state));
    }
    let _ = switch.kill();
    let _ = switch.wait();
    network(&["delete", "br"]);
    network(&["delete", "nat"]);
    let _ = Command::new("ip").args(["netns", "del", &host]).status();
    let _ = Command::new("ip").args(["netns", "del", &outside]).status();
    let _ = std::fs::remove_dir_all(&state);

    let base = median(bridge.clone());
    println!("network paths, medians of {} ({FRAMES} frames or datagrams each):", runs());
    for (what, samples) in [
        ("VM -> VM through the bridge", bridge),
        ("VM -> VM through the switch", sw),
        ("guest -> host UDP, user NAT", user),
        ("guest -> outside UDP, nat network", masq),
    ] {
        let m = median(samples);
        println!("  {what:<36} {m:>10.0} per s   ({:.2} x the bridge)", m / base);
    }
}
