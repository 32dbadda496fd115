//! Ferrovisor's virtio-mmio devices, driven by the probe guest and checked from the host: the
//! bytes on the disk image, data that survives a SIGKILL after a flush, and a VMM that keeps
//! serving (and logs) when the driver turns hostile.

mod common;

use std::path::Path;
use std::time::Duration;

use common::{Running, check_blk_pattern, pattern, probe_command, probe_result, scratch_dir};

const TIMEOUT: Duration = Duration::from_secs(30);

fn image(dir: &Path, name: &str, bytes: Vec<u8>) -> String {
    let path = dir.join(name);
    std::fs::write(&path, bytes).unwrap();
    path.display().to_string()
}

/// With each way a disk's requests reach its file: preadv/pwritev through the page cache,
/// io_uring, O_DIRECT, and both.
#[test]
fn blk_writes_reach_the_image_and_rng_gives_bytes() {
    for options in ["", ",io_engine=async", ",cache=none", ",io_engine=async,cache=none"] {
        let dir = scratch_dir("vmmio-blk");
        let disk = image(&dir, "disk.img", vec![0; 1 << 20]);
        let mut cmd = probe_command(1, common::RNG_AND_BLK_TESTS);
        cmd.args(["--rng", "--disk", &format!("path={disk},id=probe-disk{options}")]);
        let out = Running::start(cmd).finish(TIMEOUT);
        common::assert_rng_and_blk_results(&out, Path::new(&disk));
        assert!(out.status.success(), "{options}: {}", out.describe());
        assert!(!out.stderr.contains("io_uring is unavailable"), "{}", out.describe());
        let _ = std::fs::remove_dir_all(dir);
    }
}

#[test]
fn read_only_disk_refuses_writes() {
    let dir = scratch_dir("vmmio-blk-ro");
    let content: Vec<u8> = (0..(256 * 1024u32)).map(|i| (i % 251) as u8).collect();
    let disk = image(&dir, "disk.img", content.clone());
    let mut cmd = probe_command(1, "probe.test=virtio-blk probe.virtio-blk.sectors=16");
    cmd.args(["--disk", &format!("path={disk},readonly=on")]);
    let out = Running::start(cmd).finish(TIMEOUT);
    common::assert_read_only_blk_result(&out, &content);
    assert_eq!(std::fs::read(&disk).unwrap(), content, "the image is unchanged");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn flushed_data_survives_a_sigkill_of_the_vmm() {
    let dir = scratch_dir("vmmio-blk-kill");
    let disk = image(&dir, "disk.img", vec![0; 1 << 20]);
    let mut cmd =
        probe_command(1, "probe.test=virtio-blk probe.virtio-blk.sectors=64 probe.virtio-blk.seed=3 probe.idle=on");
    cmd.args(["--disk", &format!("path={disk}")]);
    let mut vm = Running::start(cmd);
    assert!(vm.wait_for_output("PROBE done passed=1", TIMEOUT), "{}", vm.stdout());
    vm.child.kill().unwrap();
    let out = vm.finish(TIMEOUT);
    assert!(!out.status.success(), "SIGKILL ended the VMM: {}", out.describe());
    check_blk_pattern(&std::fs::read(&disk).unwrap(), 3, 0, 64);
    let _ = std::fs::remove_dir_all(dir);
}

/// The guest's FLUSH reaches the host's disk: the device calls fdatasync on the image after
/// the writes it covers. (Killing the VMM cannot show this: the page cache outlives the
/// process.) Watched with strace.
#[test]
fn a_guest_flush_is_an_fdatasync_of_the_image_after_its_writes() {
    if std::process::Command::new("strace").arg("-V").output().is_err() {
        assert!(std::env::var_os("FERROVISOR_TEST_SCRIPT").is_none(), "scripts/test.sh installs strace");
        eprintln!("skipped: strace is not installed");
        return;
    }
    let dir = scratch_dir("vmmio-blk-flush");
    let disk = image(&dir, "disk.img", vec![0; 1 << 20]);
    let log = dir.join("strace.log");
    let mut cmd = std::process::Command::new("strace");
    cmd.args(["-f", "-qq", "-e", "trace=pwrite64,pwritev,fdatasync,fsync,write", "-o"])
        .arg(&log)
        .arg(env!("CARGO_BIN_EXE_ferrovisor"))
        .args(["run", "--kernel", common::probe_elf(), "--memory", "64", "--disk", &format!("path={disk}")])
        .args(["--cmdline", "probe.test=virtio-blk probe.virtio-blk.sectors=64 probe.virtio-blk.seed=5"]);
    let out = Running::start(cmd).finish(TIMEOUT);
    assert!(out.stdout.contains("PROBE virtio-blk ok") && out.stdout.contains("flush=yes"), "{}", out.describe());
    let trace = std::fs::read_to_string(&log).unwrap();
    // The pattern's writes to the image (the only file written with pwrite), then a sync of
    // that same file.
    let lines: Vec<&str> = trace.lines().collect();
    let fd_of = |line: &str| {
        line.split_once('(').map(|(_, rest)| rest.chars().take_while(char::is_ascii_digit).collect::<String>())
    };
    let first_write = lines
        .iter()
        .position(|l| l.contains("pwrite64(") || l.contains("pwritev("))
        .unwrap_or_else(|| panic!("no disk write in the trace:\n{trace}"));
    let disk_fd = fd_of(lines[first_write]).unwrap();
    let synced = lines[first_write..].iter().any(|l| {
        (l.contains("fdatasync(") || l.contains("fsync("))
            && fd_of(l).as_deref() == Some(disk_fd.as_str())
            && l.ends_with("= 0")
    });
    assert!(synced, "no fdatasync of the image (fd {disk_fd}) after its writes:\n{trace}");
    check_blk_pattern(&std::fs::read(&disk).unwrap(), 5, 0, 64);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn hostile_driver_is_answered_logged_and_the_other_devices_keep_working() {
    let dir = scratch_dir("vmmio-hostile");
    let disk = image(&dir, "disk.img", vec![0; 1 << 20]);
    let mut cmd = probe_command(1, "probe.test=hostile,virtio-rng,virtio-blk");
    cmd.args(["--rng", "--disk", &format!("path={disk}")]);
    let out = Running::start(cmd).finish(TIMEOUT);
    let hostile: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("PROBE hostile-")).collect();
    assert_eq!(hostile.len(), 16, "{}", out.describe());
    for line in &hostile {
        assert!(line.ends_with(" recovered=yes"), "{line}");
    }
    // Each kind of bad input is named in the log.
    for fault in [
        "the chain does not end in a writable status byte",
        "the chain is empty or its header is not 16 readable bytes",
        "the driver corrupted a queue",
        "queue 0 has misaligned rings; the device needs a reset",
        "queue 0 was given a size that is not a power of two",
    ] {
        assert!(out.stderr.contains(fault), "'{fault}' logged: {}", out.describe());
    }
    assert_eq!(probe_result(&out.stdout, "virtio-rng"), Some("PROBE virtio-rng ok bytes=128"), "{}", out.describe());
    assert!(probe_result(&out.stdout, "virtio-blk").is_some_and(|l| l.starts_with("PROBE virtio-blk ok")));
    assert!(out.stdout.contains("PROBE done passed=18 failed=0 skipped=0"), "{}", out.describe());
    assert!(out.status.success(), "{}", out.describe());
    let _ = std::fs::remove_dir_all(dir);
}

/// virtio-pmem: the probe writes through the mapped file and flushes; the lines are in the
/// host file. Read-only, its writes change nothing; a file whose size is not a multiple of
/// 2 MiB is refused with a sentence.
#[test]
fn pmem_writes_reach_the_file_and_read_only_keeps_it() {
    let dir = scratch_dir("vmmio-pmem");
    let file = dir.join("pmem.img");
    std::fs::write(&file, vec![0u8; 4 << 20]).unwrap();
    let mut cmd = probe_command(1, "probe.test=virtio-pmem");
    cmd.args(["--pmem", &format!("path={}", file.display())]);
    let out = Running::start(cmd).finish(TIMEOUT);
    let line = probe_result(&out.stdout, "virtio-pmem").unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(
        line.starts_with("PROBE virtio-pmem ok start=0x") && line.ends_with("size=4194304 pages=16 flush=ok flushes=1"),
        "{line}"
    );
    let bytes = std::fs::read(&file).unwrap();
    for page in 0..16usize {
        let text = format!("ferrovisor pmem page={page}");
        assert_eq!(&bytes[page * 4096..page * 4096 + text.len()], text.as_bytes(), "page {page}");
    }
    assert!(bytes[16 * 4096..].iter().all(|&b| b == 0), "only the first 16 pages were written");

    std::fs::write(&file, vec![0u8; 2 << 20]).unwrap();
    let mut cmd = probe_command(1, "probe.test=virtio-pmem probe.virtio-pmem.readonly=on probe.virtio-pmem.pages=4");
    cmd.args(["--pmem", &format!("path={},readonly=on", file.display())]);
    let out = Running::start(cmd).finish(TIMEOUT);
    assert!(
        probe_result(&out.stdout, "virtio-pmem").is_some_and(|l| l.ends_with("pages=4 flush=ok flushes=1")),
        "{}",
        out.describe()
    );
    assert!(std::fs::read(&file).unwrap().iter().all(|&b| b == 0), "a read-only file was written");

    std::fs::write(&file, vec![0u8; 3 << 20]).unwrap();
    let mut cmd = probe_command(1, "probe.test=virtio-pmem");
    cmd.args(["--pmem", &format!("path={}", file.display())]);
    let out = Running::start(cmd).finish(TIMEOUT);
    assert!(!out.status.success(), "{}", out.describe());
    assert!(out.stderr.contains("its size must be a non-zero multiple of 2 MiB"), "{}", out.describe());
    let _ = std::fs::remove_dir_all(dir);
}

/// The same on every queue of vsock, balloon (statistics and free page reporting on),
/// console and rng: ten corrupted chains or rings per queue, each answered or ignored and
/// logged, the device serving a good request after a reset (the console too: it used to close
/// its output at the first reset), and no unbounded work or log line on the way.
#[test]
fn hostile_driver_on_vsock_balloon_console_and_rng_queues_leaves_them_serving() {
    let dir = scratch_dir("vmmio-hostile-queues");
    let hvc0 = dir.join("hvc0.log");
    let mut cmd = probe_command(1, "probe.test=hostile-vsock,hostile-balloon,hostile-console,hostile-rng,virtio-rng");
    cmd.args(["--rng", "--balloon", "size=0,stats=on,free_page_reporting=on"])
        .args(["--console", &format!("file:{}", hvc0.display())])
        .args(["--vsock", &format!("cid=3,uds={}", dir.join("v.sock").display())]);
    let out = Running::start(cmd).finish(TIMEOUT);
    let hostile: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("PROBE hostile-")).collect();
    // vsock 3 queues, balloon 4, console 2, rng 1; ten scenarios each.
    assert_eq!(hostile.len(), 100, "{}", out.describe());
    for line in &hostile {
        assert!(line.ends_with(" recovered=yes"), "{line}");
    }
    for (scenario, answer) in [
        ("vsock-tx-outside-ram", "used-len=0"),
        ("balloon-inflate-outside-ram", "used-len=0"),
        ("console-tx-huge-length", "used-len=0"),
        ("rng-requests-huge-length", "used-len=65536"),
        ("rng-requests-outside-ram", "used-len=0"),
    ] {
        let line = probe_result(&out.stdout, &format!("hostile-{scenario}")).unwrap();
        assert!(line.contains(&format!("answer={answer} ")), "{line}");
    }
    for fault in [
        "virtio-vsock: a transmit buffer lies outside guest RAM",
        "virtio-vsock: the driver corrupted a queue",
        "virtio-balloon: an inflate buffer lies outside guest RAM",
        "virtio-balloon: a statistics buffer lies outside guest RAM",
        "virtio-balloon: an inflate request of more than 65536 pages was cut",
        "virtio-console: a transmit chain of more than 65536 bytes was cut",
        "virtio-rng: the driver corrupted a queue",
    ] {
        assert!(out.stderr.contains(fault), "'{fault}' logged: {}", out.describe());
    }
    // virtio-queue's own unlimited ERROR lines for bad rings stay out of the log.
    assert!(!out.stderr.contains(" ERROR "), "{}", out.stderr);
    // Each of the 20 console recoveries wrote its line; the 4 GiB chain wrote at most 64 KiB.
    let console = std::fs::read(&hvc0).unwrap();
    assert_eq!(String::from_utf8_lossy(&console).matches("console serves").count(), 20);
    assert!(console.len() < 128 << 10, "{} bytes of console output", console.len());
    assert_eq!(probe_result(&out.stdout, "virtio-rng"), Some("PROBE virtio-rng ok bytes=128"), "{}", out.describe());
    assert!(out.stdout.contains("PROBE done passed=101 failed=0 skipped=0"), "{}", out.describe());
    assert!(out.status.success(), "{}", out.describe());
    let _ = std::fs::remove_dir_all(dir);
}

/// The same for virtio-net: corrupted transmit chains and bad receive buffers (the user-mode
/// network's router answers an ARP request into them) are dropped or cut short and logged, the
/// device keeps serving after a reset, and so does the VMM.
#[test]
fn hostile_network_driver_is_answered_logged_and_the_device_keeps_working() {
    let mut cmd = probe_command(1, "probe.test=hostile-net,virtio-rng");
    cmd.args(["--rng", "--net", "user"]);
    let out = Running::start(cmd).finish(TIMEOUT);
    let hostile: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("PROBE hostile-net-")).collect();
    assert_eq!(hostile.len(), 14, "{}", out.describe());
    for line in &hostile {
        assert!(line.ends_with(" recovered=yes"), "{line}");
    }
    for (scenario, answer) in [
        ("tx-outside-ram", "used-len=0"),
        ("tx-huge-length", "used-len=0"),
        ("tx-indirect-past-the-mtu", "used-len=0"),
        ("rx-outside-ram", "used-len=0"),
        ("rx-read-only", "used-len=0"),
        // Without mergeable buffers a frame is cut to the buffer, as the driver asked.
        ("rx-tiny-buffer", "used-len=4"),
    ] {
        let line = probe_result(&out.stdout, &format!("hostile-net-{scenario}")).unwrap();
        assert!(line.contains(&format!("answer={answer} ")), "{line}");
    }
    for fault in [
        "virtio-net: dropped a frame whose buffer lies outside guest RAM",
        "virtio-net: dropped a frame longer than the MTU allows",
        "virtio-net: a receive buffer lies outside guest RAM",
        "virtio-net: the driver corrupted a queue",
    ] {
        assert!(out.stderr.contains(fault), "'{fault}' logged: {}", out.describe());
    }
    assert_eq!(probe_result(&out.stdout, "virtio-rng"), Some("PROBE virtio-rng ok bytes=128"), "{}", out.describe());
    assert!(out.stdout.contains("PROBE done passed=15 failed=0 skipped=0"), "{}", out.describe());
    assert!(out.status.success(), "{}", out.describe());
}

#[test]
fn bad_disk_options_are_refused_with_a_sentence() {
    let dir = scratch_dir("vmmio-cli");
    let odd = image(&dir, "odd.img", vec![0; 1000]);
    for (disk, expected) in [
        (
            format!("path={odd}"),
            format!("error: --disk path={odd} is 1000 bytes, not a whole number of 512-byte sectors"),
        ),
        (
            "path=/nonexistent/disk.img".to_string(),
            "error: --disk path=/nonexistent/disk.img cannot be opened".to_string(),
        ),
        ("readonly=on".to_string(), "--disk needs path=IMAGE".to_string()),
    ] {
        let mut cmd = probe_command(1, "");
        cmd.args(["--disk", &disk]);
        let out = Running::start(cmd).finish(TIMEOUT);
        assert_eq!(out.status.code(), Some(2), "{}", out.describe());
        assert!(out.stderr.contains(&expected), "{expected}: {}", out.describe());
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn console_on_a_pty_carries_a_line_each_way() {
    let mut cmd = probe_command(1, "probe.test=virtio-console probe.virtio-console.rx=11 probe.virtio-console.seed=42");
    cmd.args(["--console", "pty"]);
    let vm = Running::start(cmd);
    let deadline = std::time::Instant::now() + TIMEOUT;
    let pty = loop {
        let err = vm.stderr();
        if let Some(at) = err.find("virtio-console on /dev/pts/") {
            let path: String =
                err[at + "virtio-console on ".len()..].chars().take_while(|c| !c.is_whitespace()).collect();
            break path;
        }
        assert!(std::time::Instant::now() < deadline, "no pty announced: {err}");
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut tty = std::fs::OpenOptions::new().read(true).write(true).open(&pty).unwrap();
    let mut line = [0u8; 22];
    std::io::Read::read_exact(&mut tty, &mut line).unwrap();
    assert_eq!(&line, b"probe console says 42\n");
    std::io::Write::write_all(&mut tty, b"from host!\n").unwrap();
    let out = vm.finish(TIMEOUT);
    let checksum = pattern::fnv1a(pattern::FNV_OFFSET, b"from host!\n");
    assert_eq!(
        probe_result(&out.stdout, "virtio-console"),
        Some(format!("PROBE virtio-console ok tx_bytes=22 rx_bytes=11 rx_checksum={checksum:#x}").as_str()),
        "{}",
        out.describe()
    );
}

#[test]
fn console_output_can_go_to_a_file() {
    let dir = scratch_dir("vmmio-console-file");
    let log = dir.join("console.log");
    let mut cmd = probe_command(1, "probe.test=virtio-console probe.virtio-console.seed=9");
    cmd.args(["--console", &format!("file:{}", log.display())]);
    let out = Running::start(cmd).finish(TIMEOUT);
    assert!(probe_result(&out.stdout, "virtio-console").is_some_and(|l| l.starts_with("PROBE virtio-console ok")));
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "probe console says 9\n");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn net_frames_through_a_tap_are_exact_both_ways() {
    let tap = common::TestTap::new("fvn");
    let far_side = common::PacketSocket::bind(&tap.name);
    let mut cmd = probe_command(1, common::NET_EXCHANGE_TESTS);
    cmd.args(["--net", &format!("tap={},mac=52:54:00:12:34:56", tap.name)]);
    let mut vm = Running::start(cmd);
    assert!(vm.wait_for_output(common::NET_EXCHANGE_READY, TIMEOUT), "{}", vm.stdout());
    for frame in common::host_frames() {
        far_side.send(&frame);
    }
    let received: Vec<Vec<u8>> =
        (0..4).map(|_| far_side.recv_ethertype(pattern::ETHERTYPE_PROBE).expect("a frame from the guest")).collect();
    let out = vm.finish(TIMEOUT);
    common::assert_net_exchange(&out, &received);
    assert!(out.status.success(), "{}", out.describe());
}

#[test]
fn net_refuses_bad_options_and_names_the_tap_problem() {
    let mut cmd = probe_command(1, "");
    cmd.args(["--net", "tap=fvbad,mac=01:02:03:04:05:06"]);
    let out = Running::start(cmd).finish(TIMEOUT);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("multicast address"), "{}", out.describe());
}

/// The VMM's resident memory once the probe has reported `PROBE done` and idles.
fn idle_rss_kib(extra: &[&str]) -> (u64, common::Outcome) {
    let mut cmd = probe_command(1, "probe.test=memfill,virtio-balloon probe.memfill.mib=96 probe.idle=on");
    cmd.args(extra);
    let mut vm = Running::start(cmd);
    assert!(vm.wait_for_output("PROBE done", TIMEOUT), "{}", vm.stdout());
    let status = std::fs::read_to_string(format!("/proc/{}/status", vm.child.id())).unwrap();
    let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap();
    let rss: u64 = rss.trim().trim_end_matches("kB").trim().parse().unwrap();
    vm.child.kill().unwrap();
    (rss, vm.finish(TIMEOUT))
}

#[test]
fn balloon_inflation_returns_guest_memory_to_the_host() {
    // The probe fills 96 MiB from 16 MiB up, then gives the balloon the pages it asks for,
    // starting at 16 MiB: those pages were touched, so returning them must show in the RSS.
    let (full, without) = idle_rss_kib(&[]);
    let (ballooned, with) = idle_rss_kib(&["--balloon", "size=64"]);
    assert!(without.stdout.contains("PROBE virtio-balloon skip"), "{}", without.describe());
    assert_eq!(
        probe_result(&with.stdout, "virtio-balloon"),
        Some("PROBE virtio-balloon ok inflated_pages=16384 mib=64")
    );
    assert!(with.stderr.contains("virtio-balloon: the guest holds 64 MiB in the balloon"), "{}", with.describe());
    let returned = full.saturating_sub(ballooned);
    eprintln!("VMM RSS {full} KiB without the balloon, {ballooned} KiB with 64 MiB in it: {returned} KiB returned");
    assert!(returned >= 64 * 1024 * 8 / 10, "at least 80% of 64 MiB returned, got {returned} KiB");
}

#[test]
fn vsock_connects_both_ways_through_the_host_socket() {
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::{UnixListener, UnixStream};
    let dir = scratch_dir("vmmio-vsock");
    let uds = dir.join("vsock.sock");
    // The guest connects to host port 5000: Ferrovisor reaches the listener at <uds>_5000.
    let echo = UnixListener::bind(format!("{}_5000", uds.display())).unwrap();
    let server = std::thread::spawn(move || {
        let (mut conn, _) = echo.accept().unwrap();
        let mut total = 0;
        let mut buf = [0u8; 65536];
        loop {
            let n = conn.read(&mut buf).unwrap();
            if n == 0 {
                return total;
            }
            conn.write_all(&buf[..n]).unwrap();
            total += n;
        }
    });
    let mut cmd =
        probe_command(1, "probe.test=virtio-vsock probe.virtio-vsock.bytes=20000 probe.virtio-vsock.listen=6000");
    cmd.args(["--vsock", &format!("cid=7,uds={}", uds.display())]);
    let mut vm = Running::start(cmd);
    assert!(vm.wait_for_output("PROBE virtio-vsock listening port=6000", TIMEOUT), "{}", vm.stdout());
    // The host connects to guest port 6000 as Firecracker's users do.
    let mut host = UnixStream::connect(&uds).unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    host.write_all(b"CONNECT 6000\n").unwrap();
    let mut reader = BufReader::new(host.try_clone().unwrap());
    let mut ok = String::new();
    reader.read_line(&mut ok).unwrap();
    assert!(ok.starts_with("OK ") && ok.ends_with('\n'), "{ok:?}");
    host.write_all(b"hello vsock\n").unwrap();
    let mut echoed = String::new();
    reader.read_line(&mut echoed).unwrap();
    assert_eq!(echoed, "hello vsock\n");
    drop(reader);
    drop(host);
    let out = vm.finish(TIMEOUT);
    let line = probe_result(&out.stdout, "virtio-vsock").unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(line.starts_with("PROBE virtio-vsock ok cid=7 port=5000 bytes=20000 checksum=0x"), "{line}");
    assert!(line.ends_with(" accepted_bytes=12"), "{line}");
    assert_eq!(server.join().unwrap(), 20000, "the host echoed every byte the guest sent");
    let _ = std::fs::remove_dir_all(dir);
}

/// With the worker polling and without: the guest kicks only when the device asks (EVENT_IDX),
/// so a frame the device misses while it stops polling would stay in the ring.
#[test]
fn net_under_load_loses_and_duplicates_no_frame_either_way() {
    for poll_us in [0, 200] {
        net_under_load(poll_us);
    }
}

fn net_under_load(poll_us: u32) {
    let tap = common::TestTap::new("fvq");
    let net = format!("tap={},poll_us={poll_us}", tap.name);
    let far_side = common::PacketSocket::bind(&tap.name);
    const OUT: u64 = 5000;
    const IN: u64 = 2000;
    let tests = format!(
        "probe.test=virtio-net probe.virtio-net.mode=throughput probe.virtio-net.frames={OUT} probe.tsc.khz=1000000"
    );
    // First the guest blasts OUT frames; every sequence number must arrive exactly once.
    let mut cmd = probe_command(1, &tests);
    cmd.args(["--net", &net]);
    let out = Running::start(cmd).finish(TIMEOUT);
    assert!(out.stdout.contains(&format!("frames={OUT}")), "{}", out.describe());
    far_side.set_timeout(Duration::from_secs(1));
    let mut seen = vec![0u32; OUT as usize];
    while let Some(frame) = far_side.recv_ethertype(pattern::ETHERTYPE_PROBE) {
        let seq = u64::from_le_bytes(frame[14..22].try_into().unwrap());
        assert!(seq < OUT, "sequence number {seq} was never sent");
        seen[seq as usize] += 1;
    }
    let lost = seen.iter().filter(|&&n| n == 0).count();
    let doubled = seen.iter().filter(|&&n| n > 1).count();
    assert_eq!((lost, doubled), (0, 0), "frames lost or duplicated on the way out (poll_us={poll_us})");

    // Then the host sends IN frames in bursts; the guest must count every one, bytes intact.
    let mut cmd = probe_command(1, &format!("probe.test=virtio-net probe.virtio-net.tx=0 probe.virtio-net.rx={IN}"));
    cmd.args(["--net", &net]);
    let mut vm = Running::start(cmd);
    assert!(vm.wait_for_output("PROBE virtio-net ready", TIMEOUT), "{}", vm.stdout());
    let mut checksum = pattern::FNV_OFFSET;
    let mut bytes = 0;
    for i in 0..IN {
        let mut frame = vec![0u8; 60 + (i as usize % 1000)];
        pattern::fill_frame(11, i, [2, 0, 0, 0, 0, 9], &mut frame);
        far_side.send(&frame);
        checksum = pattern::fnv1a(checksum, &frame);
        bytes += frame.len();
        // The TAP's own queue holds 1000 frames: bursts of 100 stay well inside it.
        if i % 100 == 99 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let out = vm.finish(TIMEOUT);
    let line = probe_result(&out.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(
        line.ends_with(&format!("rx={IN} rx_bytes={bytes} rx_checksum={checksum:#x}")),
        "poll_us={poll_us}: {line}"
    );
}

/// Every read of the throughput mode checked against the pattern the disk holds, at depths 1,
/// 8 and 32, with the worker polling and without, through io_uring and O_DIRECT, kicks and
/// interrupts suppressed by EVENT_IDX.
#[test]
fn blk_reads_are_exact_at_every_depth_polling_or_not_on_every_engine() {
    let dir = scratch_dir("blk-depths");
    let image = dir.join("disk.img");
    std::fs::write(&image, common::patterned_image(7, 4 << 20)).unwrap();
    let engines = ["poll_us=0", "poll_us=200", "io_engine=async", "cache=none", "io_engine=async,cache=none"];
    for depth in [1, 8, 32] {
        for options in engines {
            let mut cmd = probe_command(
                1,
                &format!(
                    "probe.test=virtio-blk probe.virtio-blk.mode=throughput probe.virtio-blk.mib=4 \
                     probe.virtio-blk.ops=2048 probe.virtio-blk.depth={depth} probe.virtio-blk.verify=7 \
                     probe.tsc.khz=1000000"
                ),
            );
            cmd.args(["--disk", &format!("path={},{options}", image.display())]);
            let out = Running::start(cmd).finish(TIMEOUT);
            let line = probe_result(&out.stdout, "virtio-blk").unwrap_or_else(|| panic!("{}", out.describe()));
            assert!(
                line.starts_with(&format!("PROBE virtio-blk ok mode=throughput depth={depth} event_idx=on ")),
                "{options}: {line}"
            );
            assert!(line.contains(" seq_bytes=4194304 ") && line.contains(" rand_ops=2048 "), "{line}");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Multi-queue virtio-net: on a multi-queue TAP a 2-vCPU VM offers two queue pairs; the device
/// refuses a third through the control queue and takes two; frames sent on both transmit queues
/// reach the TAP byte for byte, and 64 UDP flows from the host arrive whole, spread by the
/// kernel over both receive queues.
#[test]
fn net_multi_queue_spreads_flows_over_the_pairs_the_driver_set() {
    let tap = common::TestTap::multi_queue("fvmq");
    let far_side = common::PacketSocket::bind(&tap.name);
    const FLOWS: u16 = 64;
    let mut cmd = probe_command(
        2,
        &format!(
            "probe.test=virtio-net probe.virtio-net.mode=mq probe.virtio-net.tx=8 probe.virtio-net.rx={FLOWS} \
             probe.virtio-net.seed=3"
        ),
    );
    cmd.args(["--net", &format!("tap={}", tap.name)]);
    let mut vm = Running::start(cmd);
    // The line ends with the pair count the driver set.
    assert!(vm.wait_for_output(" pairs=2", TIMEOUT), "{}", vm.stdout());
    let mac = common::probe_net_mac(&vm.stdout());
    far_side.set_timeout(Duration::from_secs(10));
    for i in 0..8u64 {
        let frame = far_side.recv_ethertype(pattern::ETHERTYPE_PROBE).expect("a frame from the guest");
        let mut expected = vec![0u8; 60 + (i as usize * 97) % (1514 - 60)];
        pattern::fill_frame(3, i, mac, &mut expected);
        assert_eq!(frame, expected, "frame {i}, sent on transmit queue {}", i % 2);
    }
    let check = common::send_flows_to_probe(&far_side, mac, 20000, FLOWS, 3);
    let out = vm.finish(TIMEOUT);
    check(&out);
    assert!(out.stderr.contains("virtio-net: the driver uses 2 queue pairs"), "{}", out.describe());
    assert!(out.stderr.contains("the driver asked for 3 queue pairs where the device has 2"), "{}", out.describe());
}

/// A driver without multi-queue on a multi-queue TAP reads one receive queue: the device keeps
/// the TAP's other queues detached, so that all 64 flows arrive there rather than half of them
/// in a queue nobody reads.
#[test]
fn net_a_driver_without_multi_queue_gets_every_flow_on_a_multi_queue_tap() {
    let tap = common::TestTap::multi_queue("fvnm");
    let far_side = common::PacketSocket::bind(&tap.name);
    const FLOWS: u16 = 64;
    let mut cmd = probe_command(
        2,
        &format!(
            "probe.test=virtio-net probe.virtio-net.mode=mq probe.virtio-net.mq=off probe.virtio-net.tx=0 \
             probe.virtio-net.rx={FLOWS}"
        ),
    );
    cmd.args(["--net", &format!("tap={}", tap.name)]);
    let mut vm = Running::start(cmd);
    assert!(vm.wait_for_output(" pairs=1", TIMEOUT), "{}", vm.stdout());
    let mac = common::probe_net_mac(&vm.stdout());
    for flow in 0..FLOWS {
        far_side.send(&common::udp_frame_to_probe(mac, 40000 + flow, 9));
    }
    let out = vm.finish(TIMEOUT);
    let line = probe_result(&out.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(
        line.contains(&format!(" rx={FLOWS} ")) && line.ends_with(&format!("rx_per_queue={FLOWS},0,0,0")),
        "{line}"
    );
}

/// One pair on a TAP made with multi_queue (a 1-vCPU VM, as CNI plugins may make TAPs): the
/// TAP takes only multi-queue opens, so the device opens one queue of it, and frames flow.
#[test]
fn net_one_pair_on_a_multi_queue_tap() {
    let tap = common::TestTap::multi_queue("fvoq");
    let far_side = common::PacketSocket::bind(&tap.name);
    let mut cmd = probe_command(
        1,
        "probe.test=virtio-net probe.virtio-net.mode=mq probe.virtio-net.mq=off probe.virtio-net.tx=2 \
         probe.virtio-net.rx=8",
    );
    cmd.args(["--net", &format!("tap={}", tap.name)]);
    let mut vm = Running::start(cmd);
    assert!(vm.wait_for_output(" pairs=1", TIMEOUT), "{}", vm.stdout());
    let mac = common::probe_net_mac(&vm.stdout());
    for flow in 0..8 {
        far_side.send(&common::udp_frame_to_probe(mac, 50000 + flow, 2));
    }
    let out = vm.finish(TIMEOUT);
    let line = probe_result(&out.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(line.contains(" tx=2 ") && line.ends_with("rx_per_queue=8,0,0,0"), "{line}");
}

/// A TAP made without multi_queue (as `ip tuntap add` makes them) gives one pair: the VMM says
/// so, offers no multi-queue, and the interface works.
#[test]
fn net_on_a_single_queue_tap_offers_one_pair_and_says_why() {
    let tap = common::TestTap::new("fvsq");
    let mut cmd = probe_command(2, "probe.test=virtio-net probe.virtio-net.mode=mq");
    cmd.args(["--net", &format!("tap={}", tap.name)]);
    let out = Running::start(cmd).finish(TIMEOUT);
    assert_eq!(
        probe_result(&out.stdout, "virtio-net"),
        Some("PROBE virtio-net FAIL the device offers no multi-queue"),
        "{}",
        out.describe()
    );
    assert!(
        out.stderr.contains("was created without multi-queue support: it gets one queue pair"),
        "{}",
        out.describe()
    );
}

#[test]
fn net_refuses_frames_over_the_mtu_and_says_so() {
    let tap = common::TestTap::new("fvm");
    let far_side = common::PacketSocket::bind(&tap.name);
    let mut cmd = probe_command(
        1,
        "probe.test=virtio-net probe.virtio-net.tx=1 probe.virtio-net.size=100 probe.virtio-net.oversize=4000",
    );
    cmd.args(["--net", &format!("tap={}", tap.name)]);
    let out = Running::start(cmd).finish(TIMEOUT);
    assert!(probe_result(&out.stdout, "virtio-net").is_some_and(|l| l.contains(" ok ")), "{}", out.describe());
    assert!(out.stderr.contains("virtio-net: dropped a frame longer than the MTU allows"), "{}", out.describe());
    far_side.set_timeout(Duration::from_millis(500));
    let mut sizes = Vec::new();
    while let Some(frame) = far_side.recv_ethertype(pattern::ETHERTYPE_PROBE) {
        sizes.push(frame.len());
    }
    assert_eq!(sizes, [100], "only the frame within the MTU crossed");
}
