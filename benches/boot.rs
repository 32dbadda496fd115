//! Boot benchmark: the project's Linux guest (vmlinux + initramfs) under Ferrovisor and under
//! QEMU's microvm machine, in one invocation, runs interleaved.
//!
//!     cargo bench --bench boot            (FERROVISOR_BENCH_RUNS=N for N runs each, default 3)
//!
//! For each VMM it prints the medians of: launch -> first byte on the serial console, launch ->
//! "Run /init as init process", and the VMM's own memory at that point (peak RSS minus the
//! resident part of the guest RAM mapping). Then the same for the probe guest (target/<profile>/
//! probe.elf, `probe.test=smp` on 2 vCPUs) up to `PROBE done`. Ratios are QEMU / Ferrovisor:
//! above 1 means Ferrovisor is faster or smaller.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const TIMEOUT: Duration = Duration::from_secs(300);
const PROBE_CMDLINE: &str = "probe.test=smp probe.smp.cpus=2";
const HOST_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 noxsave \
    clearcpuid=popcnt,cx16,rdrand,rdseed,serialize,smap mitigations=off tsc=reliable 8250.nr_uarts=1";

struct Sample {
    first_output: Duration,
    /// Launch to the line the run waits for.
    reached: Duration,
    overhead_kib: u64,
}

enum Event {
    FirstByte(Instant),
    Reached(Instant),
}

/// One kind of boot: which guest, how long its RAM is, and the line that ends the measurement.
struct Workload {
    name: &'static str,
    until: &'static str,
    memory_mib: u64,
    runs: usize,
}

fn guest_dir() -> PathBuf {
    std::env::var_os("FERROVISOR_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/ferrovisor/guest/current")
    })
}

fn kib_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident KiB of the guest RAM mapping: the anonymous mapping sized like guest RAM (QEMU
/// may round it up a little).
fn guest_ram_rss_kib(pid: u32, memory_mib: u64) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let want = memory_mib * 1024;
    let mut best = 0;
    let mut size = 0;
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            size = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("Rss:") {
            let rss: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
            if (want..=want + 4096).contains(&size) {
                best = best.max(rss);
            }
        }
    }
    best
}

fn measure(mut cmd: Command, work: &Workload) -> Result<Sample, String> {
    let until = work.until;
    let launched = Instant::now();
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().map_err(|e| e.to_string())?;
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        let mut first = true;
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 {
                return;
            }
            if first {
                first = false;
                let _ = tx.send(Event::FirstByte(Instant::now()));
            }
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            if seen.contains(until) {
                let _ = tx.send(Event::Reached(Instant::now()));
                return;
            }
            // Keep only a tail long enough to hold a split line.
            if seen.len() > 8192 {
                seen.drain(..seen.len() - 256);
            }
        }
    });
    let pid = child.id();
    let mut first_output = None;
    let result = loop {
        match rx.recv_timeout(TIMEOUT.saturating_sub(launched.elapsed())) {
            Ok(Event::FirstByte(at)) => first_output = Some(at - launched),
            Ok(Event::Reached(at)) => {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let peak = kib_field(&status, "VmHWM:").unwrap_or(0);
                let overhead_kib = peak.saturating_sub(guest_ram_rss_kib(pid, work.memory_mib));
                let reached = at - launched;
                break Ok(Sample { first_output: first_output.unwrap_or(reached), reached, overhead_kib });
            }
            Err(_) => break Err(format!("no '{until}' before the timeout or the VMM exited")),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// How a VMM is told to boot a guest.
struct Boot<'a> {
    kernel: &'a Path,
    initrd: Option<&'a Path>,
    cmdline: &'a str,
    cpus: u32,
    memory_mib: u64,
}

fn ferrovisor_cmd(boot: &Boot) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrovisor"));
    cmd.arg("run").args(["--kernel".as_ref(), boot.kernel.as_os_str()]);
    if let Some(initrd) = boot.initrd {
        cmd.args(["--initrd".as_ref(), initrd.as_os_str()]);
    }
    cmd.args(["--memory", &boot.memory_mib.to_string(), "--cpus", &boot.cpus.to_string()])
        .args(["--cmdline", boot.cmdline]);
    cmd
}

fn qemu_cmd(boot: &Boot) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    // QEMU 7.2 writes IA32_ARCH_CAPABILITIES for `-cpu host`, which nested kvm_pvm refuses (QEMU
    // then aborts); the guest boots the same without it.
    cmd.args(["-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities"])
        .args(["-smp", &boot.cpus.to_string(), "-m", &boot.memory_mib.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"])
        .args(["-kernel".as_ref(), boot.kernel.as_os_str()]);
    if let Some(initrd) = boot.initrd {
        cmd.args(["-initrd".as_ref(), initrd.as_os_str()]);
    }
    cmd.args(["-append", boot.cmdline]);
    cmd
}

fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

fn bench(work: &Workload, boot: &Boot, have_qemu: bool) {
    let mut results: Vec<(&str, Vec<Sample>)> = vec![("ferrovisor", Vec::new()), ("qemu-microvm", Vec::new())];
    for run in 0..work.runs {
        for (vmm, samples) in results.iter_mut() {
            let cmd = match *vmm {
                "ferrovisor" => ferrovisor_cmd(boot),
                _ if have_qemu => qemu_cmd(boot),
                _ => continue,
            };
            match measure(cmd, work) {
                Ok(s) => {
                    eprintln!(
                        "{} run {} {vmm}: first output {:.3} s, '{}' {:.3} s, VMM memory {} KiB",
                        work.name,
                        run + 1,
                        s.first_output.as_secs_f64(),
                        work.until,
                        s.reached.as_secs_f64(),
                        s.overhead_kib
                    );
                    samples.push(s);
                }
                Err(e) => eprintln!("{} run {} {vmm}: failed: {e}", work.name, run + 1),
            }
        }
    }
    println!(
        "\n{}: {} ({} MiB, {} vCPU), medians of {} runs",
        work.name,
        boot.kernel.display(),
        boot.memory_mib,
        boot.cpus,
        work.runs
    );
    println!("{:<14} {:>16} {:>16} {:>18}", "vmm", "first output s", "until line s", "VMM memory KiB");
    let mut medians = Vec::new();
    for (vmm, samples) in &results {
        if samples.is_empty() {
            continue;
        }
        let first = median(samples.iter().map(|s| s.first_output).collect());
        let reached = median(samples.iter().map(|s| s.reached).collect());
        let mem = median(samples.iter().map(|s| s.overhead_kib).collect());
        println!("{vmm:<14} {:>16.3} {:>16.3} {:>18}", first.as_secs_f64(), reached.as_secs_f64(), mem);
        medians.push((first, reached, mem));
    }
    if let [f, q] = medians[..] {
        println!(
            "{:<14} {:>16.2} {:>16.2} {:>18.2}",
            "qemu/ferro",
            q.0.as_secs_f64() / f.0.as_secs_f64(),
            q.1.as_secs_f64() / f.1.as_secs_f64(),
            q.2 as f64 / f.2.max(1) as f64
        );
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let guest = guest_dir();
    if !guest.join("vmlinux").exists() {
        eprintln!("no Linux guest in {}: run guest/build.sh first", guest.display());
        std::process::exit(1);
    }
    let runs: usize = std::env::var("FERROVISOR_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let have_qemu = Command::new("qemu-system-x86_64").arg("--version").output().is_ok_and(|o| o.status.success());
    if !have_qemu {
        eprintln!("qemu-system-x86_64 is missing (apt-get install qemu-system-x86): measuring Ferrovisor alone");
    }
    let probe = PathBuf::from(env!("FERROVISOR_PROBE_ELF"));
    let probe_work = Workload { name: "probe", until: "PROBE done", memory_mib: 128, runs: runs * 5 };
    let probe_boot = Boot { kernel: &probe, initrd: None, cmdline: PROBE_CMDLINE, cpus: 2, memory_mib: 128 };
    bench(&probe_work, &probe_boot, have_qemu);
    let (vmlinux, initrd) = (guest.join("vmlinux"), guest.join("initramfs.cpio"));
    let linux_work = Workload { name: "linux", until: "Run /init as init process", memory_mib: 256, runs };
    let linux_boot = Boot { kernel: &vmlinux, initrd: Some(&initrd), cmdline: HOST_CMDLINE, cpus: 1, memory_mib: 256 };
    bench(&linux_work, &linux_boot, have_qemu);
}
