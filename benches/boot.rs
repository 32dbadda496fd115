//! Boot benchmark: the project's Linux guest (vmlinux + initramfs) under Ferrovisor and under
//! QEMU's microvm machine, in one invocation, runs interleaved.
//!
//!     cargo bench --bench boot            (FERROVISOR_BENCH_RUNS=N for N runs each, default 3)
//!
//! For each VMM it prints the medians of: launch -> first byte on the serial console, launch ->
//! "Run /init as init process", and the VMM's own memory at that point (peak RSS minus the
//! resident part of the guest RAM mapping). Ratios are QEMU / Ferrovisor: above 1 means
//! Ferrovisor is faster or smaller.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

const MEMORY_MIB: u64 = 256;
const TIMEOUT: Duration = Duration::from_secs(300);
const INIT_LINE: &str = "Run /init as init process";
const HOST_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1 noxsave \
    clearcpuid=popcnt,cx16,rdrand,rdseed,serialize,smap mitigations=off tsc=reliable 8250.nr_uarts=1";

struct Sample {
    first_output: Duration,
    init: Duration,
    overhead_kib: u64,
}

enum Event {
    FirstByte(Instant),
    Init(Instant),
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
fn guest_ram_rss_kib(pid: u32) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let want = MEMORY_MIB * 1024;
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

fn measure(mut cmd: Command) -> Result<Sample, String> {
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
            if seen.contains(INIT_LINE) {
                let _ = tx.send(Event::Init(Instant::now()));
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
            Ok(Event::Init(at)) => {
                let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                let peak = kib_field(&status, "VmHWM:").unwrap_or(0);
                let overhead_kib = peak.saturating_sub(guest_ram_rss_kib(pid));
                break Ok(Sample {
                    first_output: first_output.unwrap_or(at - launched),
                    init: at - launched,
                    overhead_kib,
                });
            }
            Err(_) => break Err("no 'Run /init' before the timeout or the VMM exited".to_string()),
        }
    };
    let _ = child.kill();
    let _ = child.wait();
    result
}

fn ferrovisor_cmd(guest: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrovisor"));
    cmd.arg("run")
        .args(["--kernel".as_ref(), guest.join("vmlinux").as_os_str()])
        .args(["--initrd".as_ref(), guest.join("initramfs.cpio").as_os_str()])
        .args(["--memory", &MEMORY_MIB.to_string(), "--cmdline", HOST_CMDLINE]);
    cmd
}

fn qemu_cmd(guest: &Path) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    // QEMU 7.2 writes IA32_ARCH_CAPABILITIES for `-cpu host`, which nested kvm_pvm refuses (QEMU
    // then aborts); the guest boots the same without it.
    cmd.args(["-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-smp", "1"])
        .args(["-m", &MEMORY_MIB.to_string()])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"])
        .args(["-kernel".as_ref(), guest.join("vmlinux").as_os_str()])
        .args(["-initrd".as_ref(), guest.join("initramfs.cpio").as_os_str()])
        .args(["-append", HOST_CMDLINE]);
    cmd
}

fn median<T: Copy + Ord>(mut v: Vec<T>) -> T {
    v.sort();
    v[v.len() / 2]
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing we need.
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
    let mut results: Vec<(&str, Vec<Sample>)> = vec![("ferrovisor", Vec::new()), ("qemu-microvm", Vec::new())];
    for run in 0..runs {
        for (name, samples) in results.iter_mut() {
            let cmd = match *name {
                "ferrovisor" => ferrovisor_cmd(&guest),
                _ if have_qemu => qemu_cmd(&guest),
                _ => continue,
            };
            match measure(cmd) {
                Ok(s) => {
                    eprintln!(
                        "run {} {name}: first output {:.3} s, Run /init {:.2} s, VMM memory {} KiB",
                        run + 1,
                        s.first_output.as_secs_f64(),
                        s.init.as_secs_f64(),
                        s.overhead_kib
                    );
                    samples.push(s);
                }
                Err(e) => eprintln!("run {} {name}: failed: {e}", run + 1),
            }
        }
    }
    println!("\nboot of {} ({} MiB, 1 vCPU), medians of {runs} runs", guest.join("vmlinux").display(), MEMORY_MIB);
    println!("{:<14} {:>16} {:>14} {:>18}", "vmm", "first output s", "Run /init s", "VMM memory KiB");
    let mut medians = Vec::new();
    for (name, samples) in &results {
        if samples.is_empty() {
            continue;
        }
        let first = median(samples.iter().map(|s| s.first_output).collect());
        let init = median(samples.iter().map(|s| s.init).collect());
        let mem = median(samples.iter().map(|s| s.overhead_kib).collect());
        println!("{name:<14} {:>16.3} {:>14.2} {:>18}", first.as_secs_f64(), init.as_secs_f64(), mem);
        medians.push((first, init, mem));
    }
    if let [f, q] = medians[..] {
        println!(
            "{:<14} {:>16.2} {:>14.2} {:>18.2}",
            "qemu/ferro",
            q.0.as_secs_f64() / f.0.as_secs_f64(),
            q.1.as_secs_f64() / f.1.as_secs_f64(),
            q.2 as f64 / f.2.max(1) as f64
        );
    }
}
