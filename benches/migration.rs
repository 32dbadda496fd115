//! Live migration, Ferrovisor against QEMU in one invocation (root; QEMU from apt):
//!
//!     cargo bench --bench migration          (FERROVISOR_BENCH_RUNS=N, default 3)
//!
//! FERROVISOR_BENCH_RATES=64,256 measures those rates only; FERROVISOR_BENCH_QEMU=off leaves
//! QEMU's runs out (Ferrovisor's then follow each other); FERROVISOR_BENCH_LOCAL=off leaves the
//! local migrations out. Each run's figures go to stderr as it ends, and with
//! FERROVISOR_BENCH_GAPS_US=N the probe's longest gaps over N µs with when they began.
//!
//! A 1 GiB probe runs `dirty` over 256 MiB: idle (1 MiB/s) and dirtying at 64, 256 and 1024
//! MiB/s. It moves to a second VMM of the same kind over a Unix socket on this host, the two
//! VMMs' runs interleaved, medians reported. For each: the total time, the downtime as the VMM
//! reports it and as the probe measured it (its longest gap between two writes, by its TSC),
//! what was sent and the rounds. QEMU's bandwidth cap is lifted (`max-bandwidth`), its
//! downtime limit is 300 ms as Ferrovisor's default, and it may throttle the guest
//! (`auto-converge`) where Ferrovisor switches over after 30 rounds.
//!
//! Then Ferrovisor's local migration (an upgrade in place: guest memory's memfd handed over,
//! no page copied) of idle 1 GiB and 8 GiB probes with shared memory.
//!
//! For Ferrovisor it also reports the source VMM's extra memory during the move: the most its
//! own memory (resident memory less the guest's, from its /proc files) grew over what it was
//! before the send, sampled every 20 ms.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::sync::mpsc::{Receiver, channel};
use std::time::{Duration, Instant};

use support::{Qmp, api_vmm, median, ok, qemu_available};

const GUEST_MIB: u64 = 1024;
const DIRTY_MIB: u64 = 256;
/// How long the probe writes: longer than any migration here.
const SECS: u64 = 25;
/// From the probe's start to the migration: its TSC is measured and its pages written once.
const WARM_UP: Duration = Duration::from_secs(6);

fn runs() -> usize {
    std::env::var("FERROVISOR_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3)
}

fn probe() -> PathBuf {
    PathBuf::from(env!("FERROVISOR_PROBE_ELF"))
}

fn cmdline(rate_mib: u64) -> String {
    // FERROVISOR_BENCH_GAPS_US=N lists the probe's longest gaps over N µs, with when they began.
    let gaps = std::env::var("FERROVISOR_BENCH_GAPS_US").map(|us| format!(" probe.dirty.gaps_over_us={us}"));
    format!(
        "console=ttyS0 probe.test=dirty probe.dirty.mib={DIRTY_MIB} probe.dirty.secs={SECS} probe.dirty.rate_mib={rate_mib}{}",
        gaps.unwrap_or_default()
    )
}

/// A guest's serial lines, read on a thread.
fn lines(out: ChildStdout) -> Receiver<String> {
    let (send, receive) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            if send.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    receive
}

fn wait_line(lines: &Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(line) if line.starts_with("PROBE dirty gap") => eprintln!("  {line}"),
            Ok(_) => {}
            Err(_) => panic!("no '{needle}' from the guest"),
        }
    }
}

/// The probe's measure of the pause, in ms, from its `PROBE dirty ok` line.
fn probe_gap_ms(line: &str) -> f64 {
    let us: f64 = line.split("max_gap_us=").nth(1).and_then(|v| v.split_whitespace().next()?.parse().ok()).unwrap();
    us / 1000.0
}

#[derive(Clone, Copy, Debug, Default)]
struct Figures {
    total_ms: f64,
    vmm_downtime_ms: f64,
    probe_gap_ms: f64,
    sent_mib: f64,
    rounds: f64,
    /// The source VMM's own memory above what it held before the move (Ferrovisor only).
    extra_mib: f64,
}

/// `... the VM runs there; N rounds, X MiB sent, Y ms paused, Z ms in all` from the source's log.
fn source_figures(log: &str) -> Figures {
    let line = log.lines().find(|l| l.contains("the VM runs there;")).unwrap_or_else(|| panic!("no move: {log}"));
    let tail = line.split("the VM runs there; ").nth(1).unwrap();
    let numbers: Vec<f64> =
        tail.split(|c: char| !(c.is_ascii_digit() || c == '.')).filter_map(|w| w.parse().ok()).collect();
    Figures {
        rounds: numbers[0],
        sent_mib: numbers[1],
        vmm_downtime_ms: numbers[2],
        total_ms: numbers[3],
        probe_gap_ms: 0.0,
        extra_mib: 0.0,
    }
}

/// How a Ferrovisor run moves its probe.
#[derive(Clone, Copy)]
struct Move {
    guest_mib: u64,
    /// Hand memory over (shared memory, `"local": true`) rather than copy it.
    local: bool,
}

const COPY: Move = Move { guest_mib: GUEST_MIB, local: false };

fn ferrovisor(dir: &Path, rate_mib: u64, how: Move) -> Figures {
    let to = dir.join("fv-dst.sock");
    let mut destination = api_vmm(&to);
    let receiver = dir.join("fv-migrate.sock");
    let _ = std::fs::remove_file(&receiver);
    ok(&to, "PUT", "/ferrovisor/migration/receive", &format!(r#"{{"receiver_url": "unix:{}"}}"#, receiver.display()));
    let from = dir.join("fv-src.sock");
    let _ = std::fs::remove_file(&from);
    let mut source = Command::new(env!("CARGO_BIN_EXE_ferrovisor"))
        .args(["run", "--kernel", probe().to_str().unwrap(), "--memory"])
        .arg(if how.local { format!("size={},shared=on", how.guest_mib) } else { how.guest_mib.to_string() })
        .args(["--cmdline", &cmdline(rate_mib)])
        .arg("--api-sock")
        .arg(&from)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let guest = lines(source.stdout.take().unwrap());
    wait_line(&guest, "PROBE start");
    std::thread::sleep(WARM_UP);
    let send = format!(r#"{{"destination_url": "unix:{}", "local": {}}}"#, receiver.display(), how.local);
    let pid = source.id();
    let before = support::overhead_kib(pid);
    ok(&from, "PUT", "/ferrovisor/migration/send", &send);
    let sampler = std::thread::spawn(move || {
        let mut most = before;
        while let Some(kib) = support::overhead_kib_while_alive(pid) {
            most = most.max(kib);
            std::thread::sleep(Duration::from_millis(20));
        }
        most - before
    });
    let mut log = String::new();
    source.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert!(source.wait().unwrap().success(), "{log}");
    if std::env::var("FERROVISOR_BENCH_GAPS_US").is_ok() {
        log.lines().filter(|l| l.contains("DEBUG") || l.contains("migration")).for_each(|l| eprintln!("  source: {l}"));
    }
    let mut figures = source_figures(&log);
    figures.extra_mib = sampler.join().unwrap_or(0) as f64 / 1024.0;
    let moved = lines(destination.stdout.take().unwrap());
    figures.probe_gap_ms = probe_gap_ms(&wait_line(&moved, "PROBE dirty ok"));
    let _ = destination.kill();
    let _ = destination.wait();
    figures
}

fn qemu(qmp: &Path, extra: &[&str], rate_mib: u64) -> Child {
    support::qemu_with_qmp(&probe(), &cmdline(rate_mib), GUEST_MIB, qmp, extra)
}

fn qemu_run(dir: &Path, rate_mib: u64) -> Figures {
    let channel = dir.join("qemu-migrate.sock");
    let _ = std::fs::remove_file(&channel);
    let (qmp_src, qmp_dst) = (dir.join("qmp-src.sock"), dir.join("qmp-dst.sock"));
    let mut destination = qemu(&qmp_dst, &["-incoming", &format!("unix:{}", channel.display())], rate_mib);
    let mut source = qemu(&qmp_src, &[], rate_mib);
    let guest = lines(source.stdout.take().unwrap());
    wait_line(&guest, "PROBE start");
    let _dst = Qmp::connect(&qmp_dst);
    let mut q = Qmp::connect(&qmp_src);
    std::thread::sleep(WARM_UP);
    q.command(r#"{"execute": "migrate-set-capabilities", "arguments": {"capabilities": [{"capability": "auto-converge", "state": true}]}}"#);
    q.command(r#"{"execute": "migrate-set-parameters", "arguments": {"max-bandwidth": 1099511627776, "downtime-limit": 300}}"#);
    let answer =
        q.command(&format!(r#"{{"execute": "migrate", "arguments": {{"uri": "unix:{}"}}}}"#, channel.display()));
    assert!(answer.contains("\"return\""), "{answer}");
    let deadline = Instant::now() + Duration::from_secs(120);
    let info: serde_json::Value = loop {
        let answer = q.command(r#"{"execute": "query-migrate"}"#);
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
        match v["return"]["status"].as_str() {
            Some("completed") => break v["return"].clone(),
            Some("failed") | Some("cancelled") => panic!("QEMU's migration failed: {answer}"),
            _ => {}
        }
        assert!(Instant::now() < deadline, "QEMU's migration never completed");
        std::thread::sleep(Duration::from_millis(5));
    };
    let moved = lines(destination.stdout.take().unwrap());
    let gap = probe_gap_ms(&wait_line(&moved, "PROBE dirty ok"));
    for vm in [&mut source, &mut destination] {
        let _ = vm.kill();
        let _ = vm.wait();
    }
    Figures {
        total_ms: info["total-time"].as_f64().unwrap_or(0.0),
        vmm_downtime_ms: info["downtime"].as_f64().unwrap_or(0.0),
        probe_gap_ms: gap,
        sent_mib: info["ram"]["transferred"].as_f64().unwrap_or(0.0) / 1048576.0,
        rounds: info["ram"]["dirty-sync-count"].as_f64().unwrap_or(0.0),
        extra_mib: 0.0,
    }
}

fn medians(runs: &[Figures]) -> Figures {
    let m = |f: fn(&Figures) -> f64| median(runs.iter().map(f).collect());
    Figures {
        total_ms: m(|f| f.total_ms),
        vmm_downtime_ms: m(|f| f.vmm_downtime_ms),
        probe_gap_ms: m(|f| f.probe_gap_ms),
        sent_mib: m(|f| f.sent_mib),
        rounds: m(|f| f.rounds),
        extra_mib: m(|f| f.extra_mib),
    }
}

fn row(name: &str, f: &Figures) {
    let extra = if name == "QEMU" { String::new() } else { format!("  VMM memory +{:.1} MiB", f.extra_mib) };
    println!(
        "  {name:<11} total {:>7.0} ms  downtime {:>6.1} ms (VMM) {:>6.1} ms (probe)  sent {:>6.0} MiB  rounds {:>3.0}{extra}",
        f.total_ms, f.vmm_downtime_ms, f.probe_gap_ms, f.sent_mib, f.rounds
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ferrovisor-bench-migration-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let with_qemu = qemu_available() && std::env::var("FERROVISOR_BENCH_QEMU").map_or(true, |v| v != "off");
    let rates: Vec<u64> = match std::env::var("FERROVISOR_BENCH_RATES") {
        Ok(list) => list.split(',').filter_map(|r| r.trim().parse().ok()).collect(),
        Err(_) => vec![1, 64, 256, 1024],
    };
    println!(
        "live migration of a {GUEST_MIB} MiB probe writing {DIRTY_MIB} MiB, over a Unix socket (medians of {}):",
        runs()
    );
    for rate in rates {
        let (mut fv, mut qm) = (Vec::new(), Vec::new());
        for run in 0..runs() {
            fv.push(ferrovisor(&dir, rate, COPY));
            eprintln!("{rate} MiB/s run {run}: Ferrovisor {:?}", fv[run]);
            if with_qemu {
                qm.push(qemu_run(&dir, rate));
                eprintln!("{rate} MiB/s run {run}: QEMU {:?}", qm[run]);
            }
        }
        let label = if rate == 1 { "idle (1 MiB/s)".to_string() } else { format!("{rate} MiB/s") };
        println!("{label}:");
        let f = medians(&fv);
        row("Ferrovisor", &f);
        if with_qemu {
            let q = medians(&qm);
            row("QEMU", &q);
            println!(
                "  QEMU / Ferrovisor: total {:.2}x, probe-measured downtime {:.2}x",
                q.total_ms / f.total_ms,
                q.probe_gap_ms / f.probe_gap_ms
            );
        }
    }
    println!("local migration (guest memory's memfd handed over), idle probe writing {DIRTY_MIB} MiB at 1 MiB/s:");
    let local = std::env::var("FERROVISOR_BENCH_LOCAL").map_or(true, |v| v != "off");
    for guest_mib in [1024u64, 8192].into_iter().filter(|_| local) {
        let runs: Vec<Figures> = (0..runs()).map(|_| ferrovisor(&dir, 1, Move { guest_mib, local: true })).collect();
        row(&format!("{} GiB", guest_mib >> 10), &medians(&runs));
    }
    let _ = std::fs::remove_dir_all(dir);
}
