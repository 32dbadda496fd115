//! Device benchmark: the probe's throughput modes under Ferrovisor and under QEMU microvm, in
//! one invocation, on the same disk image and the same TAP, runs interleaved.
//!
//!     cargo bench --bench devices        (FERROVISOR_BENCH_RUNS=N, default 3; needs root for the TAP;
//!                                         FERROVISOR_BENCH_ONLY=vhost-user for that part alone)
//!
//! Prints medians of virtio-blk sequential MB/s (queue depth 8) and 4 KiB random IOPS at depths
//! 1, 8 and 32, virtio-net transmit packets/s (60- and 1500-byte frames), the VMM's CPU time
//! per request (all of the VMM's user and system time for the run, boot included, divided by
//! the requests it served), and the VMM's CPU over 10 s of guest idleness after its devices
//! worked (Ferrovisor's workers polling up to 50 µs), with a ratio that is above 1 wherever
//! Ferrovisor does better. The probe's drivers negotiate EVENT_IDX with both VMMs: they kick
//! only when the device asks and take completions from the used ring.
//!
//! Then vhost-user, in the same runs: 4 KiB random IOPS at depth 8 and sequential MB/s of a disk
//! served by `ferrovisor vhost-user-blk` and by qemu-storage-daemon against the built-in
//! virtio-blk (Ferrovisor's front-end; no polling anywhere), QEMU on Ferrovisor's back-end
//! against QEMU's own virtio-blk, the back-end polling (`poll_us=50`) against the built-in
//! device polling as long, and transmit packets/s through `ferrovisor vhost-user-net` against
//! the built-in virtio-net under both VMMs.

#[allow(dead_code)]
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Followed by the queue depth.
const BLK_TESTS: &str = "probe.test=virtio-blk probe.virtio-blk.mode=throughput probe.virtio-blk.mib=32 \
                         probe.virtio-blk.ops=8192 probe.virtio-blk.depth=";
const NET_TESTS: &str = "probe.test=virtio-net probe.virtio-net.mode=throughput probe.virtio-net.frames=50000";
const TAP: &str = "fvbench0";
const BACKEND_TAP: &str = "fvbench1";

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

/// The probe's receive rate in `sink` mode while the host floods the TAP with 60-byte probe
/// frames (the TAP drops what the guest does not take in time).
fn receive_rate(mut cmd: Command) -> Option<f64> {
    use std::io::BufRead;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().ok()?;
    let mut reader = std::io::BufReader::new(child.stdout.take()?);
    let mut line = String::new();
    let mut sending = None;
    let stop = std::sync::Arc::new(AtomicBool::new(false));
    let result = loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break None;
        }
        if line.contains("sink ready") && sending.is_none() {
            let stop = stop.clone();
            sending = Some(std::thread::spawn(move || {
                let fd = common::raw_socket::bind(TAP);
                let mut frame = [0u8; 60];
                frame[..6].fill(0xff);
                frame[6..12].copy_from_slice(&[2, 0, 0, 0, 0, 0x42]);
                frame[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
                while !stop.load(Ordering::Relaxed) {
                    // SAFETY: sending a live buffer on our socket.
                    unsafe { libc::send(std::os::fd::AsRawFd::as_raw_fd(&fd), frame.as_ptr().cast(), frame.len(), 0) };
                }
            }));
        }
        if line.starts_with("PROBE virtio-net ") && !line.contains("sink ready") {
            break field(&line, "virtio-net", "rx_pps=");
        }
    };
    stop.store(true, Ordering::Relaxed);
    if let Some(t) = sending {
        let _ = t.join();
    }
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Percent of one core the VMM `cmd` uses over 10 s after the probe printed `PROBE done`
/// (its devices worked, then parked); the VMM is killed afterwards.
fn idle_cpu(mut cmd: Command) -> Option<f64> {
    use std::io::BufRead;
    let mut child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().ok()?;
    let mut reader = std::io::BufReader::new(child.stdout.take()?);
    let mut line = String::new();
    let done = loop {
        line.clear();
        if reader.read_line(&mut line).unwrap_or(0) == 0 {
            break false;
        }
        if line.starts_with("PROBE done") {
            break true;
        }
    };
    let ticks = |pid: u32| -> Option<u64> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        let fields: Vec<&str> = stat.rsplit_once(") ")?.1.split(' ').collect();
        Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
    };
    let before = ticks(child.id());
    std::thread::sleep(Duration::from_secs(10));
    let after = ticks(child.id());
    let _ = child.kill();
    let _ = child.wait();
    // SAFETY: sysconf has no memory effects.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    (done && before.is_some()).then(|| (after.unwrap_or(0) - before.unwrap_or(0)) as f64 / hz / 10.0 * 100.0)
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

/// How a benchmark run starts a VMM: its device arguments and the probe's tests.
type VmmCommand = fn(&[String], &str) -> Command;

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

/// A vhost-user back-end process for the benchmark, killed when dropped.
struct BackEnd(std::process::Child);

impl BackEnd {
    fn start(mut cmd: Command, socket: &Path) -> BackEnd {
        let _ = std::fs::remove_file(socket);
        let child = cmd.stdout(Stdio::null()).stderr(Stdio::null()).spawn().expect("the back-end starts");
        for _ in 0..500 {
            if socket.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        BackEnd(child)
    }
}

impl Drop for BackEnd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// QEMU's arguments for guest memory a vhost-user back-end can map.
fn qemu_shared_memory() -> Vec<String> {
    ["-object", "memory-backend-memfd,id=mem,size=128M,share=on", "-machine", "memory-backend=mem"]
        .map(String::from)
        .to_vec()
}

/// One configuration of the vhost-user comparison: its name, how to start the VMM, its device
/// arguments, and the samples of each measure (IOPS at depth 8, MB/s, or packets/s).
struct Setup {
    name: &'static str,
    vmm: VmmCommand,
    args: Vec<String>,
    samples: Vec<f64>,
    seq: Vec<f64>,
}

fn vhost_user_runs(dir: &Path, image: &Path, khz: &str, have_tap: bool, runs: usize) {
    let ferrovisor_bin = env!("CARGO_BIN_EXE_ferrovisor");
    let blk_socket = dir.join("blk.sock");
    let qsd_socket = dir.join("qsd.sock");
    let net_socket = dir.join("net.sock");
    let mut own = Command::new(ferrovisor_bin);
    own.args(["vhost-user-blk", "--socket"]).arg(&blk_socket).arg("--disk").arg(format!("path={}", image.display()));
    let _own = BackEnd::start(own, &blk_socket);
    let polled_socket = dir.join("blk-polled.sock");
    let mut polled = Command::new(ferrovisor_bin);
    polled.args(["vhost-user-blk", "--socket"]).arg(&polled_socket);
    polled.arg("--disk").arg(format!("path={},poll_us=50", image.display()));
    let _polled = BackEnd::start(polled, &polled_socket);
    let qsd_image = dir.join("qsd.img");
    std::fs::copy(image, &qsd_image).unwrap();
    let mut qsd = Command::new("qemu-storage-daemon");
    qsd.arg("--blockdev").arg(format!("driver=file,node-name=d,filename={}", qsd_image.display()));
    qsd.arg("--export").arg(format!(
        "type=vhost-user-blk,id=e,node-name=d,addr.type=unix,addr.path={},writable=on",
        qsd_socket.display()
    ));
    let _qsd = BackEnd::start(qsd, &qsd_socket);
    // The back-end holds its TAP for as long as it runs: a TAP of its own, so that the
    // built-in devices' runs can open theirs.
    let backend_tap = have_tap
        && Command::new("ip").args(["tuntap", "add", BACKEND_TAP, "mode", "tap"]).status().is_ok_and(|s| s.success());
    if backend_tap {
        let _ = Command::new("ip").args(["link", "set", BACKEND_TAP, "up"]).status();
    }
    let _net = backend_tap.then(|| {
        let mut cmd = Command::new(ferrovisor_bin);
        cmd.args(["vhost-user-net", "--socket"]).arg(&net_socket).args(["--tap", BACKEND_TAP]);
        BackEnd::start(cmd, &net_socket)
    });
    let vu = |socket: &Path| vec!["--disk".to_string(), format!("vhost_user={}", socket.display())];
    let qemu_vu = |chardev: &str, device: Vec<String>| {
        let mut args = qemu_shared_memory();
        args.extend(["-chardev".to_string(), chardev.to_string()]);
        args.extend(device);
        args
    };
    let setup = |name, vmm, args| Setup { name, vmm, args, samples: vec![], seq: vec![] };
    let mut blk = vec![
        setup(
            "ferrovisor virtio-blk",
            ferrovisor as VmmCommand,
            vec!["--disk".into(), format!("path={}", image.display())],
        ),
        setup("ferrovisor + its vhost-user-blk", ferrovisor, vu(&blk_socket)),
        setup("ferrovisor + qemu-storage-daemon", ferrovisor, vu(&qsd_socket)),
        setup(
            "qemu virtio-blk",
            qemu,
            vec![
                "-drive".into(),
                format!("if=none,id=d0,file={},format=raw,cache=writeback,aio=threads", image.display()),
                "-device".into(),
                "virtio-blk-device,drive=d0".into(),
            ],
        ),
        setup(
            "qemu + ferrovisor vhost-user-blk",
            qemu,
            qemu_vu(
                &format!("socket,id=c,path={}", blk_socket.display()),
                vec!["-device".into(), "vhost-user-blk,chardev=c".into()],
            ),
        ),
        setup(
            "ferrovisor virtio-blk poll_us=50",
            ferrovisor,
            vec!["--disk".into(), format!("path={},poll_us=50", image.display())],
        ),
        setup("ferrovisor + vhost-user-blk poll_us=50", ferrovisor, vu(&polled_socket)),
    ];
    // Each row against its VMM's own device, polling alike.
    let blk_baseline = [0, 0, 0, 3, 3, 5, 5];
    let mut net = vec![
        setup("ferrovisor virtio-net", ferrovisor as VmmCommand, vec!["--net".into(), format!("tap={TAP}")]),
        setup(
            "ferrovisor + its vhost-user-net",
            ferrovisor,
            vec!["--net".into(), format!("vhost_user={}", net_socket.display())],
        ),
        setup(
            "qemu virtio-net (tap)",
            qemu,
            vec![
                "-netdev".into(),
                format!("tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off"),
                "-device".into(),
                "virtio-net-device,netdev=n0".into(),
            ],
        ),
        setup(
            "qemu + ferrovisor vhost-user-net",
            qemu,
            qemu_vu(
                &format!("socket,id=n,path={}", net_socket.display()),
                vec![
                    "-netdev".into(),
                    "vhost-user,id=n0,chardev=n".into(),
                    "-device".into(),
                    "virtio-net-device,netdev=n0".into(),
                ],
            ),
        ),
    ];
    for run_index in 0..runs {
        for s in &mut blk {
            let (out, _) = run((s.vmm)(&s.args, &format!("{BLK_TESTS}8{khz}")));
            match (field(&out, "virtio-blk", "rand_4k_iops="), field(&out, "virtio-blk", "seq_mb_per_s=")) {
                (Some(iops), Some(mbps)) => {
                    s.samples.push(iops);
                    s.seq.push(mbps);
                    eprintln!("run {run_index} {}: {iops} IOPS at depth 8, {mbps} MB/s", s.name);
                }
                _ => eprintln!("run {run_index}: {} failed:\n{out}", s.name),
            }
        }
        if !backend_tap {
            continue;
        }
        for s in &mut net {
            let (out, _) = run((s.vmm)(&s.args, &format!("{NET_TESTS} probe.virtio-net.size=60{khz}")));
            match field(&out, "virtio-net", "tx_pps=") {
                Some(pps) => {
                    s.samples.push(pps);
                    eprintln!("run {run_index} {}: {pps} pps", s.name);
                }
                None => eprintln!("run {run_index}: {} failed:\n{out}", s.name),
            }
        }
    }
    println!("\nvhost-user through the probe, medians of {runs} runs");
    println!("{:<34} {:>14} {:>10} {:>22}", "disk", "4K IOPS d8", "MB/s", "IOPS vs. its VMM's own");
    for (i, s) in blk.iter().enumerate() {
        let own = &blk[blk_baseline[i]];
        let ratio = median(s.samples.clone()) / median(own.samples.clone());
        println!("{:<34} {:>14.0} {:>10.1} {:>21.2}x", s.name, median(s.samples.clone()), median(s.seq.clone()), ratio);
    }
    if backend_tap {
        let _ = Command::new("ip").args(["link", "del", BACKEND_TAP]).status();
        println!("{:<34} {:>14} {:>33}", "network", "tx pps 60B", "vs. its VMM's own");
        for (i, s) in net.iter().enumerate() {
            let own = if i < 2 { &net[0] } else { &net[2] };
            let ratio = median(s.samples.clone()) / median(own.samples.clone());
            println!("{:<34} {:>14.0} {:>32.2}x", s.name, median(s.samples.clone()), ratio);
        }
    }
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let runs: usize = std::env::var("FERROVISOR_BENCH_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    let only_vhost_user = std::env::var("FERROVISOR_BENCH_ONLY").is_ok_and(|v| v == "vhost-user");
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
        row("blk 4K IOPS d1", true),
        row("blk 4K IOPS d8", true),
        row("blk 4K IOPS d32", true),
        row("blk CPU us/req", false),
        row("net tx pps 60B", true),
        row("net tx pps 1500B", true),
        row("net rx pps 60B", true),
        row("net CPU us/pkt", false),
        row("idle CPU %", false),
    ];
    // Measure the TSC once, so that no run spends seconds calibrating it on the CMOS clock.
    let (out, _) = run(ferrovisor(&[], "probe.test=tsc"));
    let khz = field(&out, "tsc", "khz=").map_or(String::new(), |k| format!(" probe.tsc.khz={k}"));
    // Ferrovisor's workers poll for up to 50 µs after work (off by default).
    let blk_ours = vec!["--disk".to_string(), format!("path={},poll_us=50", image.display())];
    let blk_qemu = vec![
        "-drive".to_string(),
        format!("if=none,id=d0,file={},format=raw,cache=writeback,aio=threads", image.display()),
        "-device".into(),
        "virtio-blk-device,drive=d0".into(),
    ];
    let net_ours = vec!["--net".to_string(), format!("tap={TAP},poll_us=50")];
    let net_qemu = vec![
        "-netdev".to_string(),
        format!("tap,id=n0,ifname={TAP},script=no,downscript=no,vhost=off"),
        "-device".into(),
        "virtio-net-device,netdev=n0".into(),
    ];
    let vmms: [(bool, VmmCommand); 2] = [(true, ferrovisor), (false, qemu)];
    let name = |ours: bool| if ours { "ferrovisor" } else { "qemu" };
    let push = |rows: &mut Vec<Row>, index: usize, ours: bool, v: f64| {
        if ours { rows[index].ours.push(v) } else { rows[index].theirs.push(v) }
    };
    // The main table's runs, unless only the vhost-user part is wanted.
    let main_runs = if only_vhost_user { 0 } else { runs };
    for run_index in 0..main_runs {
        for (row_index, depth) in [(1, 1), (2, 8), (3, 32)] {
            for (ours, cmd) in vmms {
                let args = if ours { &blk_ours } else { &blk_qemu };
                let (out, cpu) = run(cmd(args, &format!("{BLK_TESTS}{depth}{khz}")));
                let (Some(mbps), Some(iops), Some(ops)) = (
                    field(&out, "virtio-blk", "seq_mb_per_s="),
                    field(&out, "virtio-blk", "rand_4k_iops="),
                    field(&out, "virtio-blk", "rand_ops="),
                ) else {
                    eprintln!("run {run_index}: blk at depth {depth} under {} failed:\n{out}", name(ours));
                    continue;
                };
                push(&mut rows, row_index, ours, iops);
                let per = cpu.as_secs_f64() * 1e6 / (ops + 32.0 * 1024.0 / 128.0);
                if depth == 8 {
                    push(&mut rows, 0, ours, mbps);
                    push(&mut rows, 4, ours, per);
                }
                eprintln!(
                    "run {run_index} blk {} depth {depth}: {mbps} MB/s, {iops} IOPS, {per:.1} us CPU/request",
                    name(ours)
                );
            }
        }
        if !have_tap {
            continue;
        }
        for (row_index, size) in [(5, 60), (6, 1500)] {
            for (ours, cmd) in vmms {
                let args = if ours { &net_ours } else { &net_qemu };
                let (out, cpu) = run(cmd(args, &format!("{NET_TESTS} probe.virtio-net.size={size}{khz}")));
                let (Some(pps), Some(frames)) =
                    (field(&out, "virtio-net", "tx_pps="), field(&out, "virtio-net", "frames="))
                else {
                    eprintln!("run {run_index}: net under {} failed:\n{out}", name(ours));
                    continue;
                };
                push(&mut rows, row_index, ours, pps);
                let per = cpu.as_secs_f64() * 1e6 / frames;
                if size == 60 {
                    push(&mut rows, 8, ours, per);
                }
                eprintln!("run {run_index} net {} {size} B: {pps} pps, {per:.1} us CPU/packet", name(ours));
            }
        }
        // Receive: the host floods the TAP with 60-byte frames; the probe counts what arrives.
        for (ours, cmd) in vmms {
            let args = if ours { &net_ours } else { &net_qemu };
            let tests = format!("probe.test=virtio-net probe.virtio-net.mode=sink probe.virtio-net.frames=100000{khz}");
            match receive_rate(cmd(args, &tests)) {
                Some(pps) => {
                    push(&mut rows, 7, ours, pps);
                    eprintln!("run {run_index} net {} receive: {pps} pps", name(ours));
                }
                None => eprintln!("run {run_index}: net receive under {} failed", name(ours)),
            }
        }
        // Idle: the VMM's CPU over 10 s once the probe has worked its devices and parked.
        for (ours, cmd) in vmms {
            let mut args = if ours { blk_ours.clone() } else { blk_qemu.clone() };
            if have_tap {
                args.extend(if ours { net_ours.clone() } else { net_qemu.clone() });
            }
            let tests = format!("{BLK_TESTS}8{khz} probe.idle=on");
            match idle_cpu(cmd(&args, &tests)) {
                Some(percent) => {
                    push(&mut rows, 9, ours, percent);
                    eprintln!("run {run_index} idle {}: {percent:.2}% of a core", name(ours));
                }
                None => eprintln!("run {run_index}: the idle run under {} failed", name(ours)),
            }
        }
    }
    vhost_user_runs(&dir, &image, &khz, have_tap, runs);
    if !only_vhost_user {
        println!("\nvirtio devices through the probe, medians of {runs} runs");
        println!("{:<16} {:>14} {:>14} {:>16}", "", "ferrovisor", "qemu-microvm", "ferrovisor edge");
    }
    for row in rows.iter().filter(|_| !only_vhost_user) {
        let (o, t) = (median(row.ours.clone()), median(row.theirs.clone()));
        let edge = if row.higher_is_better { o / t } else { t / o };
        println!("{:<16} {:>14.1} {:>14.1} {:>15.2}x", row.name, o, t, edge);
    }
    if have_tap {
        let _ = Command::new("ip").args(["link", "del", TAP]).status();
    }
    let _ = std::fs::remove_dir_all(Path::new(&dir));
}
