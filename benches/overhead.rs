//! VMM overhead benchmark (root, for the TAP): what a VMM costs besides the guest, Ferrovisor
//! and QEMU microvm in one invocation, runs interleaved.
//!
//!     cargo bench --bench overhead        (FERROVISOR_BENCH_RUNS=N, default 5)
//!
//! The VM is the one of issue 15: the probe on 1 vCPU and 128 MiB with a virtio-blk disk and a
//! virtio-net TAP. For each VMM, medians of:
//! - launch to the guest's first instruction: the probe's first instruction writes the boot
//!   timer and Ferrovisor logs it (QEMU has no boot timer, so it has no figure here); measured
//!   from the bench's spawn to the log line's timestamp, so exec and dynamic loading count; and
//!   the part of it from the VMM's `main` on, which the log line gives; and for scale, what
//!   spawning `/bin/true` (to its exit) costs on this host;
//! - launch to the probe's first serial byte (both VMMs);
//! - non-guest RSS once the probe is done and idle: RSS less the resident part of the guest RAM
//!   mapping; and its anonymous part (heap, stacks, device buffers: what each more VM costs;
//!   the rest is code and data of the binary and libraries, which every process that runs it
//!   maps from the same page cache);
//! - VMs per second per core: probe VMs launched one after another, one process each, booted
//!   to `PROBE done` and stopped, divided by the CPU time the processes took (user + system);
//! - snapshot load to running (Ferrovisor): a probe that filled 64 MiB of its 128 MiB, restored
//!   by `PUT /snapshot/load` with `resume_vm: true`, from sending the request to the answer;
//! - snapshot creation (Ferrovisor): the distribution of 20 `PUT /snapshot/create` of that
//!   paused probe, one after another onto the same files.
//!   QEMU's restore (which copies the memory) is in `cargo bench --bench memory`.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::{Footprint, api_vmm, median, ok, overhead_kib};

const TAP: &str = "fvbench-ov0";
const TIMEOUT: Duration = Duration::from_secs(60);
/// VMs per run of the VMs-per-second figure.
const CHURN_VMS: u32 = 20;
/// Snapshots taken one after another for the creation figures.
const SNAPSHOTS: usize = 20;

fn runs() -> usize {
    std::env::var("FERROVISOR_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5)
}

fn probe() -> &'static str {
    env!("FERROVISOR_PROBE_ELF")
}

#[derive(Clone, Copy, PartialEq)]
enum Vmm {
    Ferrovisor,
    Qemu,
}

fn command(vmm: Vmm, image: &Path, cmdline: &str, with_tap: bool) -> Command {
    match vmm {
        Vmm::Ferrovisor => {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrovisor"));
            cmd.args(["--log-level", "info", "run", "--kernel", probe(), "--memory", "128", "--cpus", "1"])
                .args(["--cmdline", cmdline])
                .arg("--disk")
                .arg(format!("path={}", image.display()));
            if with_tap {
                cmd.args(["--net", &format!("tap={TAP}")]);
            }
            cmd
        }
        Vmm::Qemu => {
            let mut cmd = Command::new("qemu-system-x86_64");
            // -arch-capabilities: QEMU 7.2 aborts when nested kvm_pvm refuses that MSR.
            cmd.args(["-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "128", "-smp", "1"])
                .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"])
                .args(["-drive", &format!("id=d0,file={},format=raw,if=none", image.display())])
                .args(["-device", "virtio-blk-device,drive=d0"]);
            if with_tap {
                cmd.args(["-netdev", &format!("tap,id=n0,ifname={TAP},script=no,downscript=no")])
                    .args(["-device", "virtio-net-device,netdev=n0"]);
            }
            cmd.args(["-kernel", probe(), "-append", cmdline]);
            cmd
        }
    }
}

/// Seconds since midnight UTC of a tracing timestamp (`2026-11-30T09:33:40.093010Z`) at the
/// start of `line`.
fn log_time_of_day(line: &str) -> Option<f64> {
    let time = line.split_whitespace().next()?.split_once('T')?.1.trim_end_matches('Z');
    let mut parts = time.split(':');
    let (h, m, s): (f64, f64, f64) =
        (parts.next()?.parse().ok()?, parts.next()?.parse().ok()?, parts.next()?.parse().ok()?);
    Some(h * 3600.0 + m * 60.0 + s)
}

fn time_of_day(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH).unwrap().as_secs_f64() % 86400.0
}

struct Launch {
    first_instruction_ms: Option<f64>,
    /// From the VMM's `main` to the first instruction, as it logs.
    from_main_ms: Option<f64>,
    first_byte_ms: f64,
    overhead_kib: u64,
    anonymous_kib: u64,
}

enum Seen {
    FirstByte(Instant),
    Done,
    /// The log line's time of day, and the microseconds since `main` it gives.
    BootTimer(f64, Option<f64>),
}

/// The microseconds in `guest boot time: N ms after launch (M us)`.
fn logged_us(line: &str) -> Option<f64> {
    line.rsplit_once('(')?.1.strip_suffix(" us)")?.parse().ok()
}

fn launch(vmm: Vmm, image: &Path) -> Launch {
    let mut cmd = command(vmm, image, "console=ttyS0 probe.idle=on", true);
    let wall = SystemTime::now();
    let started = Instant::now();
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("the VMM");
    let (tx, rx) = mpsc::channel();
    let mut stdout = child.stdout.take().unwrap();
    let serial = tx.clone();
    std::thread::spawn(move || {
        let (mut seen, mut buf, mut first) = (String::new(), [0u8; 4096], true);
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            if std::mem::take(&mut first) {
                let _ = serial.send(Seen::FirstByte(Instant::now()));
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            if seen.contains("PROBE done") {
                let _ = serial.send(Seen::Done);
            }
        }
    });
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains("guest boot time:")
                && let Some(at) = log_time_of_day(&line)
            {
                let _ = tx.send(Seen::BootTimer(at, logged_us(&line)));
            }
        }
    });
    let (mut first_byte_ms, mut first_instruction_ms, mut from_main_ms) = (None, None, None);
    let since_spawn_ms = |at: f64| Some((at - time_of_day(wall)).rem_euclid(86400.0) * 1000.0);
    loop {
        match rx.recv_timeout(TIMEOUT) {
            Ok(Seen::FirstByte(at)) => first_byte_ms = Some((at - started).as_secs_f64() * 1000.0),
            Ok(Seen::BootTimer(at, us)) => {
                first_instruction_ms = since_spawn_ms(at);
                from_main_ms = us.map(|us| us / 1000.0);
            }
            Ok(Seen::Done) => break,
            Err(_) => panic!("no 'PROBE done' within {TIMEOUT:?}"),
        }
    }
    // The log line may come after the serial output: give it a moment.
    if vmm == Vmm::Ferrovisor && first_instruction_ms.is_none() {
        while let Ok(seen) = rx.recv_timeout(Duration::from_secs(2)) {
            if let Seen::BootTimer(at, us) = seen {
                first_instruction_ms = since_spawn_ms(at);
                from_main_ms = us.map(|us| us / 1000.0);
                break;
            }
        }
        assert!(first_instruction_ms.is_some(), "Ferrovisor logged no boot time");
    }
    std::thread::sleep(Duration::from_millis(300));
    let pid = child.id();
    let launch = Launch {
        first_instruction_ms,
        from_main_ms,
        first_byte_ms: first_byte_ms.expect("serial output before PROBE done"),
        overhead_kib: overhead_kib(pid),
        anonymous_kib: Footprint::of(pid, "ferrovisor").anonymous,
    };
    let _ = child.kill();
    let _ = child.wait();
    launch
}

/// Milliseconds to spawn `/bin/true` with piped output and see it exit, the median of 21: the
/// floor under any launch figure on this host.
fn spawn_floor_ms() -> f64 {
    let times = (0..21)
        .map(|_| {
            let started = Instant::now();
            let status = Command::new("true").stdout(Stdio::piped()).stderr(Stdio::piped()).status();
            assert!(status.is_ok_and(|s| s.success()), "/bin/true runs");
            started.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    median(times)
}

/// CPU seconds (user + system) the waited-for children have used so far.
fn children_cpu_s() -> f64 {
    // SAFETY: getrusage fills the zeroed struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let s = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    s(usage.ru_utime) + s(usage.ru_stime)
}

/// VMs per CPU second: CHURN_VMS probes, each booted to `PROBE done` and stopped (the probe
/// resets and the VMM exits), one after another.
fn churn(vmm: Vmm, image: &Path) -> f64 {
    let before = children_cpu_s();
    for _ in 0..CHURN_VMS {
        let out = command(vmm, image, "console=ttyS0", true)
            .stdin(Stdio::null())
            .stderr(Stdio::null())
            .output()
            .expect("the VMM");
        assert!(String::from_utf8_lossy(&out.stdout).contains("PROBE done"), "a churn VM did not finish");
    }
    f64::from(CHURN_VMS) / (children_cpu_s() - before)
}

/// A VMM on `socket` running the probe that filled 64 MiB of its 128 MiB, paused.
fn paused_memfill_probe(socket: &Path) -> std::process::Child {
    let mut vm = api_vmm(socket);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 probe.test=memfill probe.memfill.mib=64 probe.idle=on"}}"#,
        probe()
    );
    ok(socket, "PUT", "/boot-source", &boot);
    ok(socket, "PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 128}"#);
    ok(socket, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    let mut lines = BufReader::new(vm.stdout.take().unwrap()).lines();
    assert!(lines.any(|l| l.unwrap_or_default().contains("PROBE done")), "the memfill probe finished");
    std::thread::spawn(move || lines.for_each(drop));
    ok(socket, "PATCH", "/vm", r#"{"state": "Paused"}"#);
    vm
}

fn snapshot_body(state: &Path, mem: &Path) -> String {
    format!(r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#, state.display(), mem.display())
}

/// Milliseconds each of SNAPSHOTS `PUT /snapshot/create` of the paused memfill probe took, one
/// after another onto the same files, as a VM snapshotted periodically is.
fn snapshot_create_ms(dir: &Path) -> Vec<f64> {
    let socket = dir.join("create.sock");
    let mut vm = paused_memfill_probe(&socket);
    let body = snapshot_body(&dir.join("create.snap"), &dir.join("create.mem"));
    let times = (0..SNAPSHOTS)
        .map(|_| {
            let started = Instant::now();
            ok(&socket, "PUT", "/snapshot/create", &body);
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            std::thread::sleep(Duration::from_millis(200));
            ms
        })
        .collect();
    ok(&socket, "PUT", "/ferrovisor/stop", "");
    let _ = vm.wait();
    times
}

/// Milliseconds from sending PUT /snapshot/load (resume_vm) to its answer.
fn snapshot_load_ms(dir: &Path) -> f64 {
    let socket = dir.join("fv.sock");
    let mut vm = paused_memfill_probe(&socket);
    let (state, mem) = (dir.join("fv.snap"), dir.join("fv.mem"));
    ok(&socket, "PUT", "/snapshot/create", &snapshot_body(&state, &mem));
    ok(&socket, "PUT", "/ferrovisor/stop", "");
    let _ = vm.wait();
    let socket = dir.join("fv2.sock");
    let mut second = api_vmm(&socket);
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
        state.display(),
        mem.display()
    );
    let started = Instant::now();
    ok(&socket, "PUT", "/snapshot/load", &body);
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    ok(&socket, "PUT", "/ferrovisor/stop", "");
    let _ = second.wait();
    ms
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let have_qemu = support::qemu_available();
    let dir = support::tap_and_scratch(TAP, "overhead");
    let image: PathBuf = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 64 << 20]).unwrap();
    let vmms: &[Vmm] = if have_qemu { &[Vmm::Ferrovisor, Vmm::Qemu] } else { &[Vmm::Ferrovisor] };
    let (mut launches, mut churns) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
    let (mut loads, mut creates) = (Vec::new(), Vec::new());
    for run in 0..runs() {
        for &vmm in vmms {
            let i = vmm as usize;
            let l = launch(vmm, &image);
            let c = churn(vmm, &image);
            eprintln!(
                "run {} {}: first instruction {:?} ms, first byte {:.2} ms, RSS {} KiB ({} anonymous), {c:.1} VMs/s/core",
                run + 1,
                ["ferrovisor", "qemu"][i],
                l.first_instruction_ms,
                l.first_byte_ms,
                l.overhead_kib,
                l.anonymous_kib
            );
            launches[i].push(l);
            churns[i].push(c);
        }
        let ms = snapshot_load_ms(&dir);
        eprintln!("run {}: snapshot load to running {ms:.2} ms", run + 1);
        loads.push(ms);
        if run == 0 {
            creates = snapshot_create_ms(&dir);
            let shown: Vec<String> = creates.iter().map(|ms| format!("{ms:.0}")).collect();
            eprintln!("snapshot create ms, {SNAPSHOTS} in a row: {}", shown.join(" "));
        }
    }
    let _ = Command::new("ip").args(["link", "del", TAP]).status();
    let _ = std::fs::remove_dir_all(&dir);

    println!("\nVMM overhead, 1 vCPU 128 MiB probe with virtio-blk and virtio-net, medians of {}", runs());
    println!("{:<32} {:>12} {:>12} {:>12}", "", "ferrovisor", "qemu-microvm", "ferrovisor edge");
    let figure = |i: usize, f: &dyn Fn(&Launch) -> Option<f64>| {
        let v: Vec<f64> = launches[i].iter().filter_map(f).collect();
        (!v.is_empty()).then(|| median(v))
    };
    let print = |name: &str, ours: Option<f64>, theirs: Option<f64>, lower_is_better: bool| {
        let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let edge = match (ours, theirs) {
            (Some(a), Some(b)) if lower_is_better => format!("{:.2}x", b / a),
            (Some(a), Some(b)) => format!("{:.2}x", a / b),
            _ => "-".into(),
        };
        println!("{name:<32} {:>12} {:>12} {:>12}", show(ours), show(theirs), edge);
    };
    let both = |f: &dyn Fn(&Launch) -> Option<f64>| (figure(0, f), if have_qemu { figure(1, f) } else { None });
    let (a, b) = both(&|l| l.first_instruction_ms);
    print("launch to first instruction ms", a, b, true);
    let (a, b) = both(&|l| l.from_main_ms);
    print("  of it from the VMM's main ms", a, b, true);
    print("spawning /bin/true ms", Some(spawn_floor_ms()), None, true);
    let (a, b) = both(&|l| Some(l.first_byte_ms));
    print("launch to first serial byte ms", a, b, true);
    let (a, b) = both(&|l| Some(l.overhead_kib as f64 / 1024.0));
    print("non-guest RSS MiB", a, b, true);
    let (a, b) = both(&|l| Some(l.anonymous_kib as f64 / 1024.0));
    print("  of it anonymous MiB", a, b, true);
    let churn_median = |i: usize| (!churns[i].is_empty()).then(|| median(churns[i].clone()));
    print("VMs per second per core", churn_median(0), churn_median(1), false);
    print("snapshot load to running ms", Some(median(loads)), None, true);
    creates.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let at = |q: f64| creates[((creates.len() - 1) as f64 * q).round() as usize];
    println!(
        "snapshot create ms, {SNAPSHOTS} in a row (64 MiB written): min {:.1}, median {:.1}, p90 {:.1}, max {:.1}",
        at(0.0),
        at(0.5),
        at(0.9),
        at(1.0)
    );
}
