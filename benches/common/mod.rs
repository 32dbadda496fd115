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

/// A raw socket on `interface` for sending whole Ethernet frames into it (root).
pub fn packet_sender(interface: &str) -> std::os::fd::OwnedFd {
    use std::os::fd::FromRawFd;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: socket(2) returns a new fd or -1.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, i32::from(proto)) };
    assert!(fd >= 0, "AF_PACKET socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is new and owned from here on.
    let fd = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(interface).unwrap();
    // SAFETY: a NUL-terminated interface name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    // SAFETY: zeroed sockaddr_ll, then the fields bind needs.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    // SAFETY: binding our socket to a valid sockaddr_ll of its size.
    let rc = unsafe {
        libc::bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    assert_eq!(rc, 0, "bind to {interface}: {}", std::io::Error::last_os_error());
    fd
}
