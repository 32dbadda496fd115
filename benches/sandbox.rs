//! Sandbox benchmark: what seccomp and the jailer cost at launch and in memory (root, for the
//! jailer). In one invocation, runs interleaved:
//!
//!     cargo bench --bench sandbox         (FERROVISOR_BENCH_RUNS=N, default 20)
//!
//! For each of: plain, --no-seccomp, jailed, jailed with --no-seccomp, it boots the probe
//! (`probe.test=smp`, 1 vCPU, 64 MiB) from a config file with the API on, and prints the
//! medians of launch -> API socket accepting and launch -> the guest's first serial line
//! (`PROBE start`: the first guest instructions ran). Then the VMM's own memory (RSS less the
//! guest RAM) of an idle probe with and without seccomp. Ratios are against the plain run.

mod support;

use std::io::Read;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::{median, overhead_kib};

const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq)]
enum Setup {
    Plain,
    NoSeccomp,
    Jailed,
    JailedNoSeccomp,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::Plain => "seccomp, no jailer",
            Setup::NoSeccomp => "no seccomp, no jailer",
            Setup::Jailed => "seccomp, jailer",
            Setup::JailedNoSeccomp => "no seccomp, jailer",
        }
    }
    fn jailed(self) -> bool {
        matches!(self, Setup::Jailed | Setup::JailedNoSeccomp)
    }
    fn seccomp(self) -> bool {
        matches!(self, Setup::Plain | Setup::Jailed)
    }
}

fn config(kernel: &str, cmdline: &str) -> String {
    serde_json::json!({
        "boot-source": {"kernel_image_path": kernel, "boot_args": cmdline},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
    })
    .to_string()
}

/// Starts the VMM for `setup` in `dir`; returns it and where its API socket appears.
fn launch(setup: Setup, dir: &Path, run: usize, cmdline: &str) -> (Child, PathBuf) {
    let probe = env!("FERROVISOR_PROBE_ELF");
    let seccomp: &[&str] = if setup.seccomp() { &[] } else { &["--no-seccomp"] };
    std::fs::create_dir_all(dir).unwrap();
    let (mut cmd, socket) = if setup.jailed() {
        let id = format!("bench{run}");
        let root = dir.join("ferrovisor").join(&id).join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::copy(probe, root.join("probe.elf")).unwrap();
        std::fs::write(root.join("vm.json"), config("/probe.elf", cmdline)).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_jailer"));
        cmd.args(["--id", &id, "--exec-file", env!("CARGO_BIN_EXE_ferrovisor"), "--uid", "0", "--gid", "0"])
            .arg("--chroot-base-dir")
            .arg(dir)
            .arg("--")
            .args(seccomp)
            .args(["--api-sock", "/run/api.sock", "--config-file", "/vm.json"]);
        (cmd, root.join("run/api.sock"))
    } else {
        let socket = dir.join(format!("api{run}.sock"));
        let file = dir.join(format!("vm{run}.json"));
        std::fs::write(&file, config(probe, cmdline)).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrovisor"));
        cmd.args(seccomp).arg("--api-sock").arg(&socket).arg("--config-file").arg(&file);
        (cmd, socket)
    };
    let child = cmd.args(["--level", "Error"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    (child, socket)
}

/// Launch -> socket accepting, launch -> `PROBE start`, in milliseconds.
fn boot_once(setup: Setup, dir: &Path, run: usize) -> (f64, f64) {
    let started = Instant::now();
    let (mut child, socket) = launch(setup, dir, run, "probe.test=smp");
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(11).any(|w| w == b"PROBE start") {
                let _ = tx.send(Instant::now());
                break;
            }
        }
    });
    let socket_ready = loop {
        if UnixStream::connect(&socket).is_ok() {
            break started.elapsed();
        }
        assert!(started.elapsed() < TIMEOUT, "{}: the API socket never appeared", setup.name());
        std::thread::sleep(Duration::from_micros(200));
    };
    let first_line = rx.recv_timeout(TIMEOUT).unwrap_or_else(|_| panic!("{}: the probe never started", setup.name()));
    let _ = child.wait();
    (socket_ready.as_secs_f64() * 1e3, first_line.duration_since(started).as_secs_f64() * 1e3)
}

/// The VMM's own memory with an idle probe, in KiB.
fn idle_overhead(setup: Setup, dir: &Path, run: usize) -> f64 {
    let (mut child, socket) = launch(setup, dir, run, "probe.test=smp probe.idle=on");
    let started = Instant::now();
    while UnixStream::connect(&socket).is_err() {
        assert!(started.elapsed() < TIMEOUT, "the API socket never appeared");
        std::thread::sleep(Duration::from_millis(1));
    }
    std::thread::sleep(Duration::from_millis(500));
    let kib = overhead_kib(child.id()) as f64;
    let _ = child.kill();
    let _ = child.wait();
    kib
}

fn main() {
    let runs = std::env::var("FERROVISOR_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(20);
    let dir = std::env::temp_dir().join(format!("ferrovisor-bench-sandbox-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let setups = [Setup::Plain, Setup::NoSeccomp, Setup::Jailed, Setup::JailedNoSeccomp];
    let mut samples: Vec<(Vec<f64>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); setups.len()];
    for run in 0..runs {
        for (i, setup) in setups.iter().enumerate() {
            let (socket, first) = boot_once(*setup, &dir.join(format!("s{i}")), run);
            samples[i].0.push(socket);
            samples[i].1.push(first);
        }
    }
    println!("sandbox: probe from a config file, medians of {runs} runs, interleaved");
    let plain = (median(samples[0].0.clone()), median(samples[0].1.clone()));
    for (setup, (socket, first)) in setups.iter().zip(&samples) {
        let (socket, first) = (median(socket.clone()), median(first.clone()));
        println!(
            "  {:<22} launch -> API socket {socket:6.2} ms ({:.2}x)   launch -> first guest line {first:6.2} ms ({:.2}x)",
            setup.name(),
            socket / plain.0,
            first / plain.1
        );
    }
    let memory_runs = runs.min(5);
    let mut memory = (Vec::new(), Vec::new());
    for run in 0..memory_runs {
        memory.0.push(idle_overhead(Setup::Plain, &dir.join("m0"), run));
        memory.1.push(idle_overhead(Setup::NoSeccomp, &dir.join("m1"), run));
    }
    let (on, off) = (median(memory.0), median(memory.1));
    println!(
        "  VMM memory (RSS less guest RAM), idle probe, medians of {memory_runs}: seccomp {on:.0} KiB, no seccomp {off:.0} KiB ({:+.0} KiB)",
        on - off
    );
    let _ = std::fs::remove_dir_all(&dir);
}
