//! What the probe-driving benchmarks share: run counts, medians, shell steps, and probes whose
//! result lines they read.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Runs per measurement: FERROVISOR_BENCH_RUNS, default 3.
pub fn runs() -> usize {
    std::env::var("FERROVISOR_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3)
}

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

pub fn sh(args: &[&str]) {
    let ok = Command::new(args[0]).args(&args[1..]).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "{args:?} failed");
}

/// A 64 MiB probe running the virtio-net test with `tests`, on `--net net`, in network
/// namespace `ns` (None: here) and with managed networks' state in `state`, if given; its
/// stdout piped.
pub fn probe(ns: Option<&str>, state: Option<&Path>, net: &str, tests: &str) -> Child {
    let bin = env!("CARGO_BIN_EXE_ferrovisor");
    let mut cmd = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, bin]);
            c
        }
        None => Command::new(bin),
    };
    if let Some(state) = state {
        cmd.env("FERROVISOR_STATE_DIR", state);
    }
    cmd.args(["--log-level", "error", "run", "--kernel", env!("FERROVISOR_PROBE_ELF"), "--memory", "64"])
        .args(["--net", net, "--cmdline", &format!("console=ttyS0 probe.test=virtio-net {tests}")])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    cmd.spawn().expect("ferrovisor runs")
}

/// `ferrovisor network ARGS` in network namespace `ns`, managed networks' state in `state`;
/// it must succeed.
pub fn network(ns: &str, state: &Path, args: &[&str]) {
    let ok = Command::new("ip")
        .args(["netns", "exec", ns, env!("CARGO_BIN_EXE_ferrovisor"), "network"])
        .args(args)
        .env("FERROVISOR_STATE_DIR", state)
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(ok, "network {args:?}");
}

/// The probe's arguments for a broadcast UDP flood of `datagrams` from `subnet`.1 to
/// `subnet`.2 (port 9999), counted by the sender.
pub fn flood_tests(subnet: &str, datagrams: u64) -> String {
    format!(
        "probe.virtio-net.mode=ip probe.virtio-net.ip={subnet}.1 probe.virtio-net.gw={subnet}.1 \
         probe.virtio-net.dst={subnet}.2 probe.virtio-net.wait=100000000 probe.virtio-net.port=9999 \
         probe.virtio-net.broadcast=on probe.virtio-net.flood={datagrams}"
    )
}

/// Reads the child's lines until one contains `needle`; returns it.
pub fn line_with(child: &mut Child, needle: &str) -> String {
    let mut reader = BufReader::new(child.stdout.as_mut().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("the probe ended before '{needle}'");
        }
        if line.contains(needle) {
            return line;
        }
    }
}

/// The number after `key=` in a probe's result line (0 without one).
pub fn field(line: &str, key: &str) -> f64 {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok()).unwrap_or(0.0)
}

#[path = "../../tests/common/raw_socket.rs"]
pub mod raw_socket;
