//! Footprint benchmark (root, for the TAP): what each VM costs the host besides its guest RAM,
//! Ferrovisor and QEMU microvm in one invocation, runs interleaved.
//!
//!     cargo bench --bench footprint        (FERROVISOR_BENCH_RUNS=N, default 5)
//!
//! From `/proc/PID/smaps`, every mapping but guest RAM: the resident memory and its anonymous
//! part (heap, stacks, copied pages: what each more VM pays for itself; the rest is code and
//! read-only data that every process running the same binary maps from one page cache), for
//! - an idle probe without devices (1 vCPU, 128 MiB, 16 MiB of it written);
//! - an idle probe with a virtio-blk disk, a virtio-net TAP and (Ferrovisor alone: QEMU needs
//!   /dev/vhost-vsock for it) virtio-vsock;
//! - a Linux guest at the end of its boot: the test guest's kernel without a root device,
//!   halted at its root-mount panic (`panic=0`), at most 3 runs (a boot takes about 30 s here);
//! - the mean proportional set size (PSS, guest RAM included) of 30 idle probes run at once,
//!   and of their non-guest part.
//!
//! Firecracker's figures for the first and last lines, measured on this machine for issue 26:
//! 4,108 KiB resident, 300 KiB anonymous; 17.1 MiB mean PSS of 30 probes.

mod support;

use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use support::{Footprint, median};

const TAP: &str = "fvbench-fp0";
const PROBES_AT_ONCE: usize = 30;
/// The probe touches 16 MiB of its RAM and idles, as the probe of issue 26 did.
const PROBE_CMDLINE: &str =
    "console=ttyS0 probe.test=memfill probe.memfill.mib=16 probe.memfill.pattern=unique probe.idle=on";
const LINUX_CMDLINE: &str = "console=ttyS0 reboot=k panic=0 root=/dev/vdz noxsave \
    clearcpuid=popcnt,cx16,rdrand,rdseed,serialize,smap mitigations=off tsc=reliable 8250.nr_uarts=1";

fn runs() -> usize {
    std::env::var("FERROVISOR_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(5)
}

fn probe() -> &'static str {
    env!("FERROVISOR_PROBE_ELF")
}

fn guest_dir() -> PathBuf {
    std::env::var_os("FERROVISOR_GUEST_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/ferrovisor/guest/current")
    })
}

#[derive(Clone, Copy, PartialEq)]
enum Vmm {
    Ferrovisor,
    Qemu,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Ferrovisor => "ferrovisor",
            Vmm::Qemu => "qemu-system-x86_64",
        }
    }
}

/// What the VM has besides its vCPU and RAM.
#[derive(Clone, Copy, PartialEq)]
enum Scenario {
    IdleProbe,
    ProbeWithDevices,
    LinuxAtPanic,
}

struct Setup {
    dir: PathBuf,
    image: PathBuf,
}

fn command(vmm: Vmm, scenario: Scenario, setup: &Setup, index: usize) -> Command {
    let guest = guest_dir();
    let vmlinux = guest.join("vmlinux");
    let (kernel, cmdline, memory) = match scenario {
        Scenario::LinuxAtPanic => (vmlinux.to_str().unwrap().to_string(), LINUX_CMDLINE, "256"),
        _ => (probe().to_string(), PROBE_CMDLINE, "128"),
    };
    let devices = scenario == Scenario::ProbeWithDevices;
    match vmm {
        Vmm::Ferrovisor => {
            let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrovisor"));
            cmd.args(["--log-level", "warn", "run", "--kernel", &kernel, "--memory", memory, "--cpus", "1"])
                .args(["--cmdline", cmdline]);
            if devices {
                let vsock = setup.dir.join(format!("v{index}.sock"));
                cmd.arg("--disk")
                    .arg(format!("path={}", setup.image.display()))
                    .args(["--net", &format!("tap={TAP}")])
                    .arg("--vsock")
                    .arg(format!("cid={},uds={}", 3 + index, vsock.display()));
            }
            cmd
        }
        Vmm::Qemu => {
            let mut cmd = Command::new("qemu-system-x86_64");
            // -arch-capabilities: QEMU 7.2 aborts when nested kvm_pvm refuses that MSR.
            cmd.args(["-M", "microvm", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", memory, "-smp", "1"])
                .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"]);
            if devices {
                cmd.args(["-drive", &format!("id=d0,file={},format=raw,if=none", setup.image.display())])
                    .args(["-device", "virtio-blk-device,drive=d0"])
                    .args(["-netdev", &format!("tap,id=n0,ifname={TAP},script=no,downscript=no")])
                    .args(["-device", "virtio-net-device,netdev=n0"]);
            }
            cmd.args(["-kernel", &kernel, "-append", cmdline]);
            cmd
        }
    }
}

/// Starts a VM and returns it once its serial output shows `until`.
fn start(vmm: Vmm, scenario: Scenario, setup: &Setup, index: usize) -> Child {
    let until = match scenario {
        Scenario::LinuxAtPanic => "Kernel panic",
        _ => "PROBE done",
    };
    let mut child = command(vmm, scenario, setup, index)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("the VMM starts");
    let mut stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let (mut seen, mut buf) = (String::new(), [0u8; 4096]);
        while let Ok(n @ 1..) = stdout.read(&mut buf) {
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            if seen.contains(until) {
                let _ = tx.send(());
                seen.clear();
            }
        }
    });
    let timeout = Duration::from_secs(if scenario == Scenario::LinuxAtPanic { 180 } else { 30 });
    rx.recv_timeout(timeout).unwrap_or_else(|_| panic!("{} printed no '{until}' within {timeout:?}", vmm.name()));
    child
}

/// One VM's footprint once it has settled.
fn measure(vmm: Vmm, scenario: Scenario, setup: &Setup) -> Footprint {
    let mut child = start(vmm, scenario, setup, 0);
    std::thread::sleep(Duration::from_millis(500));
    let footprint = Footprint::of(child.id(), "ferrovisor");
    let threads = std::fs::read_dir(format!("/proc/{}/task", child.id())).map_or(0, |d| d.count());
    let _ = child.kill();
    let _ = child.wait();
    eprintln!(
        "{} {}: RSS {} KiB, {} anonymous, {threads} threads",
        vmm.name(),
        scenario_name(scenario),
        footprint.rss,
        footprint.anonymous
    );
    footprint
}

/// The mean PSS (with guest RAM, and without) of PROBES_AT_ONCE idle probes running together.
fn many(vmm: Vmm, setup: &Setup) -> (f64, f64) {
    let mut children: Vec<Child> = (0..PROBES_AT_ONCE).map(|i| start(vmm, Scenario::IdleProbe, setup, i)).collect();
    std::thread::sleep(Duration::from_millis(500));
    let footprints: Vec<Footprint> = children.iter().map(|c| Footprint::of(c.id(), "ferrovisor")).collect();
    for child in &mut children {
        let _ = child.kill();
        let _ = child.wait();
    }
    let mean =
        |f: &dyn Fn(&Footprint) -> u64| footprints.iter().map(f).sum::<u64>() as f64 / footprints.len() as f64 / 1024.0;
    (mean(&|f| f.pss_with_guest), mean(&|f| f.pss))
}

fn scenario_name(s: Scenario) -> &'static str {
    match s {
        Scenario::IdleProbe => "idle probe, no devices",
        Scenario::ProbeWithDevices => "idle probe, blk + net + vsock",
        Scenario::LinuxAtPanic => "Linux at its root-mount panic",
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let have_qemu = support::qemu_available();
    let dir = support::tap_and_scratch(TAP, "footprint");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let setup = Setup { dir: dir.clone(), image };
    let vmms: &[Vmm] = if have_qemu { &[Vmm::Ferrovisor, Vmm::Qemu] } else { &[Vmm::Ferrovisor] };
    let scenarios = [Scenario::IdleProbe, Scenario::ProbeWithDevices, Scenario::LinuxAtPanic];
    let mut results: Vec<[Vec<Footprint>; 2]> = scenarios.iter().map(|_| [Vec::new(), Vec::new()]).collect();
    let mut crowds = [Vec::new(), Vec::new()];
    for run in 0..runs() {
        for &vmm in vmms {
            for (i, &scenario) in scenarios.iter().enumerate() {
                if scenario == Scenario::LinuxAtPanic && run >= 3 {
                    continue;
                }
                results[i][vmm as usize].push(measure(vmm, scenario, &setup));
            }
            let crowd = many(vmm, &setup);
            eprintln!("{} {PROBES_AT_ONCE} probes: mean PSS {:.2} MiB ({:.2} non-guest)", vmm.name(), crowd.0, crowd.1);
            crowds[vmm as usize].push(crowd);
        }
    }
    let _ = Command::new("ip").args(["link", "del", TAP]).status();
    let _ = std::fs::remove_dir_all(&dir);

    println!("\nVMM footprint besides guest RAM, KiB, medians of {} runs (Linux: at most 3)", runs());
    println!("{:<44} {:>12} {:>12} {:>9}", "", "ferrovisor", "qemu-microvm", "qemu/ferro");
    let row = |name: &str, ours: f64, theirs: Option<f64>| {
        let (theirs_text, ratio) = match theirs {
            Some(t) => (format!("{t:.0}"), format!("{:.2}x", t / ours)),
            None => ("-".into(), "-".into()),
        };
        println!("{name:<44} {ours:>12.0} {theirs_text:>12} {ratio:>9}");
    };
    let med = |v: &[Footprint], f: &dyn Fn(&Footprint) -> u64| {
        (!v.is_empty()).then(|| median(v.iter().map(|x| f(x) as f64).collect()))
    };
    for (i, &scenario) in scenarios.iter().enumerate() {
        let [ours, theirs] = &results[i];
        row(
            &format!("{}: RSS", scenario_name(scenario)),
            med(ours, &|f| f.rss).unwrap_or(0.0),
            med(theirs, &|f| f.rss),
        );
        row("  of it anonymous", med(ours, &|f| f.anonymous).unwrap_or(0.0), med(theirs, &|f| f.anonymous));
    }
    let idle = &results[0][0];
    let kinds: Vec<String> = idle.first().map(|f| f.kinds.iter().map(|k| k.0.clone()).collect()).unwrap_or_default();
    println!("\nferrovisor, idle probe without devices, by mapping (RSS / anonymous KiB):");
    for kind in kinds {
        let of = |f: &Footprint, which: usize| {
            f.kinds.iter().find(|k| k.0 == kind).map_or(0, |k| if which == 0 { k.1 } else { k.2 })
        };
        let (rss, anonymous) = (med(idle, &|f| of(f, 0)).unwrap_or(0.0), med(idle, &|f| of(f, 1)).unwrap_or(0.0));
        println!("  {kind:<20} {rss:>8.0} {anonymous:>8.0}");
    }
    let crowd = |i: usize, which: usize| {
        (!crowds[i].is_empty())
            .then(|| median(crowds[i].iter().map(|c: &(f64, f64)| if which == 0 { c.0 } else { c.1 }).collect()))
    };
    println!("\n{PROBES_AT_ONCE} idle probes at once, mean PSS per process, MiB:");
    for (which, name) in [(0, "with guest RAM"), (1, "without guest RAM")] {
        let show = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        println!("  {name:<20} {:>10} {:>12}", show(crowd(0, which)), show(crowd(1, which)));
    }
}
