//! Device benchmark: the probe's throughput modes under Ferrovisor and under QEMU microvm, in
//! one invocation, on the same disk image and the same TAP, runs interleaved.
//!
//!     cargo bench --bench devices        (FERROVISOR_BENCH_RUNS=N, default 3; needs root for the TAP)
//!
//! Prints medians of virtio-blk sequential MB/s and 4 KiB random IOPS (queue depth 8, polled),
//! virtio-net transmit packets/s (60-byte frames), and the VMM's CPU time per request (all of
//! the VMM's user and system time for the run, boot included, divided by the requests it
//! served), with a ratio that is above 1 wherever Ferrovisor does better.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const BLK_TESTS: &str = "probe.test=virtio-blk probe.virtio-blk.mode=throughput probe.virtio-blk.mib=32 \
                         probe.virtio-blk.ops=8192 probe.virtio-blk.depth=8";
const NET_TESTS: &str = "probe.test=virtio-net probe.virtio-net.mode=throughput probe.virtio-net.frames=50000";
const TAP: &str = "fvbench0";

fn probe() -> &'static str {
    env!("FERROVISOR_PROBE_ELF")
}

fn qemu_slots() -> String {
    (0..24u64)
        .map(|n| format!("virtio_mmio.device=512@{:#x}:{}", 0xfeb0_0000 + n * 0x200, 12 + n))
        .collect::<Vec<_>>()
        .join(" ")
}

/// User plus system time of every child this process has waited for.
fn children_cpu() -> Duration {
    // SAFETY: rusage is plain data that getrusage fills in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Runs `cmd` to completion; returns stdout and the child's user+system CPU time.
fn run(mut cmd: Command) -> (String, Duration) {
    let before = children_cpu();
    let mut child =
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().expect("the VMM starts");
    let mut output = String::new();
    std::io::Read::read_to_string(child.stdout.as_mut().unwrap(), &mut output).unwrap();
    let _ = child.wait();
    (output, children_cpu().saturating_sub(before))
}

fn field(output: &str, test: &str, key: &str) -> Option<f64> {
    let line = output.lines().find(|l| l.starts_with(&format!("PROBE {test} ok ")))?;
    line.split(' ').find_map(|w| w.strip_prefix(key)).and_then(|v| v.parse().ok())
}

fn ferrovisor(args: &[String], tests: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrovisor"));
    cmd.args(["run", "--kernel", probe(), "--memory", "128", "--serial", "stdio", "--cmdline", tests]).args(args);
    cmd
}

fn qemu(args: &[String], tests: &str) -> Command {
    let mut cmd = Command::new("qemu-system-x86_64");
    // -arch-capabilities: QEMU 7.2 aborts when nested kvm_pvm refuses that MSR.
    cmd.args(["-M", "microvm,rtc=on", "-enable-kvm", "-cpu", "host,-arch-capabilities", "-m", "128"])
        .args(["-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot"])
        .args(["-global", "virtio-mmio.force-legacy=false"])
        .args(args)
        .args(["-kernel", probe(), "-append", &format!("{tests} {}", qemu_slots())]);
    cmd
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

struct Row {
    name: &'static str,
    higher_is_better: bool,
    ours: Vec<f64>,
    theirs: Vec<f64>,
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs: usize = std::env::var("FERROVISOR_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let dir = std::env::temp_dir().join(format!("ferrovisor-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let image: PathBuf = dir.join("disk.img");
    std::fs::write(&image, vec![0x5au8; 64 << 20]).unwrap();
    let have_tap = Command::new("ip").args(["tuntap", "add", TAP, "mode", "tap"]).status().is_ok_and(|s| s.success());
    if have_tap {
        let _ = Command::new("ip").args(["link", "set", TAP, "up"]).status();
    } else {
        eprintln!("cannot create TAP {TAP} (root needed): virtio-net is not measured");
    }
    let row = |name, higher_is_better| Row { name, higher_is_better, ours: vec![], theirs: vec![] };
    let mut rows = vec![
        row("blk seq MB/s", true),
        row("blk 4K IOPS", true),
        row("blk CPU us/req", false),
        row("net tx pps", true),
        row("net CPU us/pkt", false),
    ];
    // Measure the TSC once, so that no run spends seconds calibrating it on the CMOS clock.
    let (out, _) = run(ferrovisor(&[], "probe.test=tsc"));
    let khz = field(&out, "tsc", "khz=").map_or(String::new(), |k| format!(" probe.tsc.khz={k}"));
    let (blk_tests, net_tests) = (format!("{BLK_TESTS}{khz}"), format!("{NET_TESTS}{khz}"));
    let blk_ours = vec!["--disk".to_string(), format!("path={}", image.display())];
    let blk_qemu = vec![
        "-drive".to_string(),
        format!("if=none,id=d0,file={},format=raw,cache=writeback,aio=threads", image.display()),
        "-device".into(),
        "virtio-blk-device,drive=d0".into(),
    ];
    let net_ours = vec!["--net".to_string(), format!("tap={TAP}")];
    let net_qemu = vec![
        "-netdev".to_string(),
        format!("tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off"),
        "-device".into(),
        "virtio-net-device,netdev=n0".into(),
    ];
    for run_index in 0..runs {
        for (ours, (args, cmd)) in
            [(true, (&blk_ours, ferrovisor as fn(&[String], &str) -> Command)), (false, (&blk_qemu, qemu))]
        {
            let (out, cpu) = run(cmd(args, &blk_tests));
            let (Some(mbps), Some(iops), Some(ops)) = (
                field(&out, "virtio-blk", "seq_mb_per_s="),
                field(&out, "virtio-blk", "rand_4k_iops="),
                field(&out, "virtio-blk", "rand_ops="),
            ) else {
                eprintln!("run {run_index}: blk under {} failed:\n{out}", if ours { "ferrovisor" } else { "qemu" });
                continue;
            };
            let requests = ops + 32.0 * 1024.0 / 128.0;
            let per = cpu.as_secs_f64() * 1e6 / requests;
            for (row, v) in rows.iter_mut().take(3).zip([mbps, iops, per]) {
                if ours { row.ours.push(v) } else { row.theirs.push(v) }
            }
            eprintln!(
                "run {run_index} blk {}: {mbps} MB/s, {iops} IOPS, {per:.1} us CPU/request",
                if ours { "ferrovisor" } else { "qemu" }
            );
        }
        if !have_tap {
            continue;
        }
        for (ours, (args, cmd)) in
            [(true, (&net_ours, ferrovisor as fn(&[String], &str) -> Command)), (false, (&net_qemu, qemu))]
        {
            let (out, cpu) = run(cmd(args, &net_tests));
            let (Some(pps), Some(frames)) =
                (field(&out, "virtio-net", "tx_pps="), field(&out, "virtio-net", "frames="))
            else {
                eprintln!("run {run_index}: net under {} failed:\n{out}", if ours { "ferrovisor" } else { "qemu" });
                continue;
            };
            let per = cpu.as_secs_f64() * 1e6 / frames;
            for (row, v) in rows.iter_mut().skip(3).zip([pps, per]) {
                if ours { row.ours.push(v) } else { row.theirs.push(v) }
            }
            eprintln!(
                "run {run_index} net {}: {pps} pps, {per:.1} us CPU/packet",
                if ours { "ferrovisor" } else { "qemu" }
            );
        }
    }
    println!("\nvirtio devices through the probe, medians of {runs} runs");
    println!("{:<16} {:>14} {:>14} {:>16}", "", "ferrovisor", "qemu-microvm", "ferrovisor edge");
    for row in &rows {
        let (o, t) = (median(row.ours.clone()), median(row.theirs.clone()));
        let edge = if row.higher_is_better { o / t } else { t / o };
        println!("{:<16} {:>14.1} {:>14.1} {:>15.2}x", row.name, o, t, edge);
    }
    if have_tap {
        let _ = Command::new("ip").args(["link", "del", TAP]).status();
    }
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}
