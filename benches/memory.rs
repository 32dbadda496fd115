//! Memory benchmark, in one invocation (root, for KSM):
//!
//!     cargo bench --bench memory          (FERROVISOR_BENCH_RUNS=N, default 3)
//!
//! 1. Snapshots of a probe guest that filled most of its RAM, 128 MiB and 1 GiB: time to write
//!    the snapshot and its size, and restore-to-running latency (the load request, memory
//!    mapped rather than copied). Peer: QEMU's migration to a file and back (`migrate` to
//!    exec:cat, `-incoming`), which copies the memory both ways. Ratios are QEMU / Ferrovisor.
//! 2. KSM: the memory (summed PSS) of 8 identical idle probe guests that filled 64 MiB each
//!    with pages that all differ within a guest (so only merging across guests counts),
//!    without and with `mergeable=on` and ksmd running; the ratio is what merging saves.
//! 3. The API's cost: the VMM's own memory (RSS minus guest RAM) with and without --api-sock,
//!    after 200 requests.

mod support;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{Qmp, api_vmm, http, median, ok, overhead_kib};

fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ferrovisor"))
}

fn probe() -> PathBuf {
    PathBuf::from(env!("FERROVISOR_PROBE_ELF"))
}

fn runs() -> usize {
    std::env::var("FERROVISOR_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3)
}

fn wait_for(child: &mut Child, needle: &str) {
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    let deadline = Instant::now() + Duration::from_secs(120);
    for line in lines.by_ref() {
        if line.unwrap_or_default().contains(needle) {
            break;
        }
        assert!(Instant::now() < deadline, "no '{needle}'");
    }
    // Keep draining so that the guest never blocks on a full pipe.
    std::thread::spawn(move || lines.for_each(drop));
}

fn fill_cmdline(mib: u64) -> String {
    // Leave room for the probe itself below 16 MiB.
    format!("console=ttyS0 probe.test=memfill probe.memfill.mib={} probe.idle=on", mib - 24)
}

struct SnapshotFigures {
    write_ms: f64,
    size_mib: f64,
    restore_ms: f64,
}

fn ferrovisor_snapshot(dir: &Path, mib: u64) -> SnapshotFigures {
    let socket = dir.join("fv.sock");
    let mut vm = api_vmm(&socket);
    let boot = format!(r#"{{"kernel_image_path": "{}", "boot_args": "{}"}}"#, probe().display(), fill_cmdline(mib));
    ok(&socket, "PUT", "/boot-source", &boot);
    ok(&socket, "PUT", "/machine-config", &format!(r#"{{"vcpu_count": 1, "mem_size_mib": {mib}}}"#));
    ok(&socket, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    wait_for(&mut vm, "PROBE done");
    ok(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    let (state, mem) = (dir.join("fv.snap"), dir.join("fv.mem"));
    let started = Instant::now();
    let body = format!(r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#, state.display(), mem.display());
    ok(&socket, "PUT", "/snapshot/create", &body);
    let write_ms = started.elapsed().as_secs_f64() * 1000.0;
    let size = std::fs::metadata(&mem).unwrap().blocks() * 512 + std::fs::metadata(&state).unwrap().len();
    ok(&socket, "PUT", "/ferrovisor/stop", "");
    let _ = vm.wait();
    let socket = dir.join("fv2.sock");
    let mut second = api_vmm(&socket);
    let started = Instant::now();
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
        state.display(),
        mem.display()
    );
    ok(&socket, "PUT", "/snapshot/load", &body);
    let restore_ms = started.elapsed().as_secs_f64() * 1000.0;
    ok(&socket, "PUT", "/ferrovisor/stop", "");
    let _ = second.wait();
    SnapshotFigures { write_ms, size_mib: size as f64 / (1 << 20) as f64, restore_ms }
}

fn qemu(mib: u64, qmp: &Path, extra: &[&str]) -> Child {
    support::qemu_with_qmp(&probe(), &fill_cmdline(mib), mib, qmp, extra)
}

fn qemu_snapshot(dir: &Path, mib: u64) -> SnapshotFigures {
    let qmp_path = dir.join("qmp.sock");
    let mut vm = qemu(mib, &qmp_path, &[]);
    wait_for(&mut vm, "PROBE done");
    let mut qmp = Qmp::connect(&qmp_path);
    qmp.command(r#"{"execute": "stop"}"#);
    let file = dir.join("qemu.state");
    let started = Instant::now();
    qmp.command(&format!(r#"{{"execute": "migrate", "arguments": {{"uri": "exec:cat > {}"}}}}"#, file.display()));
    qmp.wait_until(r#"{"execute": "query-migrate"}"#, "\"completed\"");
    let write_ms = started.elapsed().as_secs_f64() * 1000.0;
    let size = std::fs::metadata(&file).unwrap().blocks() * 512;
    let _ = vm.kill();
    let _ = vm.wait();
    let qmp2 = dir.join("qmp2.sock");
    let started = Instant::now();
    let mut second = qemu(mib, &qmp2, &["-incoming", &format!("exec:cat {}", file.display())]);
    let mut qmp = Qmp::connect(&qmp2);
    // The incoming state is loaded once the status leaves "inmigrate".
    let deadline = Instant::now() + Duration::from_secs(120);
    while qmp.command(r#"{"execute": "query-status"}"#).contains("inmigrate") {
        assert!(Instant::now() < deadline, "QEMU never loaded its state");
        std::thread::sleep(Duration::from_millis(2));
    }
    qmp.command(r#"{"execute": "cont"}"#);
    qmp.wait_until(r#"{"execute": "query-status"}"#, "\"running\"");
    let restore_ms = started.elapsed().as_secs_f64() * 1000.0;
    let _ = second.kill();
    let _ = second.wait();
    SnapshotFigures { write_ms, size_mib: size as f64 / (1 << 20) as f64, restore_ms }
}

fn snapshots(dir: &Path) {
    println!("snapshot of a probe that filled its RAM (medians of {}):", runs());
    for mib in [128u64, 1024] {
        let (mut fv, mut qm) = (Vec::new(), Vec::new());
        for _ in 0..runs() {
            fv.push(ferrovisor_snapshot(dir, mib));
            qm.push(qemu_snapshot(dir, mib));
        }
        let m = |v: &[SnapshotFigures], f: fn(&SnapshotFigures) -> f64| median(v.iter().map(f).collect());
        let row = |what: &str, f: fn(&SnapshotFigures) -> f64, unit: &str| {
            let (a, b) = (m(&fv, f), m(&qm, f));
            println!(
                "  {mib:>5} MiB {what:<22} ferrovisor {a:>9.1} {unit:<3} qemu {b:>9.1} {unit:<3} ratio {:.2}",
                b / a
            );
        };
        row("snapshot write", |s| s.write_ms, "ms");
        row("snapshot size", |s| s.size_mib, "MiB");
        row("restore to running", |s| s.restore_ms, "ms");
    }
}

fn pss_kib(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("Pss:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn ksm_write(name: &str, value: &str) {
    std::fs::write(format!("/sys/kernel/mm/ksm/{name}"), value).unwrap_or_else(|e| panic!("ksm {name} (root?): {e}"));
}

fn ksm_read(name: &str) -> String {
    std::fs::read_to_string(format!("/sys/kernel/mm/ksm/{name}")).unwrap_or_default().trim().to_string()
}

/// Summed PSS of 8 probes that filled 64 MiB each, once merging settled (or 90 s passed).
fn eight_probes(mergeable: bool) -> u64 {
    let memory = format!("size=128,mergeable={}", if mergeable { "on" } else { "off" });
    let mut vms: Vec<Child> = (0..8)
        .map(|_| {
            Command::new(bin())
                .args(["--log-level", "error", "run", "--kernel", probe().to_str().unwrap(), "--memory", &memory])
                .args([
                    "--cmdline",
                    "console=ttyS0 probe.test=memfill probe.memfill.mib=64 probe.memfill.pattern=unique probe.idle=on",
                ])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::null())
                .spawn()
                .unwrap()
        })
        .collect();
    for vm in &mut vms {
        wait_for(vm, "PROBE done");
    }
    let total = || vms.iter().map(|v| pss_kib(v.id())).sum::<u64>();
    let mut last = total();
    let deadline = Instant::now() + Duration::from_secs(90);
    if mergeable {
        // Settled: the total has stopped falling for two seconds.
        let mut steady = 0;
        while steady < 4 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(500));
            let now = total();
            steady = if now + 1024 >= last { steady + 1 } else { 0 };
            last = now;
        }
    }
    for vm in &mut vms {
        let _ = vm.kill();
        let _ = vm.wait();
    }
    last
}

fn ksm() {
    let saved: Vec<(&str, String)> =
        ["run", "pages_to_scan", "sleep_millisecs"].iter().map(|n| (*n, ksm_read(n))).collect();
    ksm_write("pages_to_scan", "5000");
    ksm_write("sleep_millisecs", "10");
    ksm_write("run", "1");
    let without = eight_probes(false);
    let with = eight_probes(true);
    for (name, value) in saved.iter().rev() {
        ksm_write(name, value);
    }
    println!("KSM, 8 idle probes that filled 64 MiB each with distinct pages, alike across probes (summed PSS):");
    println!(
        "  without merging {:.1} MiB, with merging {:.1} MiB, ratio {:.2}",
        without as f64 / 1024.0,
        with as f64 / 1024.0,
        without as f64 / with as f64
    );
}

fn api_overhead(dir: &Path) {
    let mut samples = (Vec::new(), Vec::new());
    for _ in 0..runs() {
        for with_api in [false, true] {
            let socket = dir.join("overhead.sock");
            let _ = std::fs::remove_file(&socket);
            let mut cmd = Command::new(bin());
            cmd.args(["--log-level", "error", "run", "--kernel", probe().to_str().unwrap()])
                .args(["--cmdline", "console=ttyS0 probe.idle=on"]);
            if with_api {
                cmd.arg("--api-sock").arg(&socket);
            }
            let mut vm = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
            wait_for(&mut vm, "PROBE done");
            if with_api {
                for i in 0..200 {
                    let path = ["/", "/machine-config", "/ferrovisor/metrics", "/vm/config"][i % 4];
                    http(&socket, "GET", path, "");
                }
            }
            std::thread::sleep(Duration::from_millis(200));
            let kib = overhead_kib(vm.id()) as f64;
            if with_api {
                samples.1.push(kib)
            } else {
                samples.0.push(kib)
            }
            let _ = vm.kill();
            let _ = vm.wait();
        }
    }
    let (without, with) = (median(samples.0), median(samples.1));
    println!("API cost, VMM memory besides guest RAM (medians of {}):", runs());
    println!(
        "  without --api-sock {without:.0} KiB, with it after 200 requests {with:.0} KiB: +{:.0} KiB",
        with - without
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let dir = std::env::temp_dir().join(format!("ferrovisor-bench-memory-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    api_overhead(&dir);
    snapshots(&dir);
    ksm();
    let _ = std::fs::remove_dir_all(&dir);
}
