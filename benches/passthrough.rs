//! Device assignment over vfio-user, measured by the probe against the test DMA engine served
//! by `ferrovisor device-server`: a register read and write that trap (a VM exit, then a
//! message to the server and its answer) against a read of the BAR the VMM maps into the
//! guest, DMA throughput of 1 MiB copies between guest buffers, and the round trip from the
//! guest's command to its MSI-X vector pending in the local APIC. Medians of
//! FERROVISOR_BENCH_RUNS runs (default 3).

#[allow(dead_code)]
mod common;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn field(output: &str, key: &str) -> Option<f64> {
    let line = output.lines().find(|l| l.starts_with("PROBE dma-engine ok ") || l.starts_with("PROBE tsc ok "))?;
    line.split(' ').find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse().ok())
}

fn probe(tests: &str, socket: Option<&std::path::Path>) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrovisor"));
    cmd.args(["--log-level", "error", "run", "--kernel", env!("FERROVISOR_PROBE_ELF"), "--memory", "128"])
        .args(["--cmdline", &format!("console=ttyS0 {tests}")]);
    if let Some(socket) = socket {
        cmd.arg("--device").arg(format!("vfio-user={}", socket.display()));
    }
    let out = cmd.stdin(Stdio::null()).stderr(Stdio::null()).output().expect("ferrovisor runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ferrovisor-bench-passthrough-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("dma.sock");
    let mut server = Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
        .arg("device-server")
        .arg(&socket)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("the device server starts");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !socket.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let khz = field(&probe("probe.test=tsc", None), "khz=").expect("the probe measures the TSC");
    let tests = format!("probe.test=dma-engine probe.dma-engine.mode=bench probe.tsc.khz={khz}");
    let keys = [
        ("trapped BAR read, ns", "trapped_read_ns="),
        ("trapped BAR write, ns", "trapped_write_ns="),
        ("MSI-X table read (VMM only), ns", "vmm_read_ns="),
        ("mapped BAR read, ns", "mapped_read_ps="),
        ("DMA copy, MB/s", "dma_mb_per_s="),
        ("command to MSI-X pending, ns", "irq_round_trip_ns="),
    ];
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); keys.len()];
    for _ in 0..common::runs() {
        let out = probe(&tests, Some(&socket));
        for ((_, key), values) in keys.iter().zip(&mut samples) {
            match field(&out, key) {
                Some(v) => values.push(if key.ends_with("_ps=") { v / 1000.0 } else { v }),
                None => panic!("no {key} in the probe's output:\n{out}"),
            }
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    println!("{:<32} {:>12}", "vfio-user test DMA engine", "median");
    let medians: Vec<f64> = samples.into_iter().map(common::median).collect();
    for ((name, _), value) in keys.iter().zip(&medians) {
        println!("{name:<32} {value:>12.1}");
    }
    println!("{:<32} {:>11.0}x", "trapped / mapped read", medians[0] / medians[3].max(0.001));
}
