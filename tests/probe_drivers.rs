//! The probe's virtio drivers against QEMU microvm's virtio-mmio devices, checked from the
//! host byte for byte: what the probe wrote to a disk image, the frames it sent through a
//! UDP socket back-end, and the frames it received.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::UdpSocket;
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{Running, pattern, probe_result, qemu_probe_command, scratch_dir};

const TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn blk_pattern_reaches_the_image_and_rng_gives_bytes() {
    let dir = scratch_dir("probe-blk");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let drive = format!("if=none,id=d0,file={},format=raw", image.display());
    let qemu = qemu_probe_command(
        1,
        common::RNG_AND_BLK_TESTS,
        &["-device", "virtio-rng-device", "-drive", &drive, "-device", "virtio-blk-device,drive=d0,serial=probe-disk"],
    );
    let out = Running::start(qemu).finish(TIMEOUT);
    common::assert_rng_and_blk_results(&out, &image);
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn blk_read_only_disk_refuses_writes() {
    let dir = scratch_dir("probe-blk-ro");
    let image = dir.join("disk.img");
    let content: Vec<u8> = (0..(256 * 1024u32)).map(|i| (i % 251) as u8).collect();
    std::fs::write(&image, &content).unwrap();
    let drive = format!("if=none,id=d0,file={},format=raw,readonly=on", image.display());
    let qemu = qemu_probe_command(
        1,
        "probe.test=virtio-blk probe.virtio-blk.sectors=16",
        &["-drive", &drive, "-device", "virtio-blk-device,drive=d0"],
    );
    let out = Running::start(qemu).finish(TIMEOUT);
    common::assert_read_only_blk_result(&out, &content);
    assert_eq!(std::fs::read(&image).unwrap(), content, "the image is unchanged");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn net_frames_are_exact_in_both_directions() {
    let host = UdpSocket::bind("127.0.0.1:0").unwrap();
    host.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // QEMU's end of the socket back-end: a free port, found by binding and letting go.
    let qemu_port = UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let netdev =
        format!("socket,id=n0,udp=127.0.0.1:{},localaddr=127.0.0.1:{qemu_port}", host.local_addr().unwrap().port());
    let qemu = qemu_probe_command(
        1,
        common::NET_EXCHANGE_TESTS,
        &["-netdev", &netdev, "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56"],
    );
    let mut vm = Running::start(qemu);
    assert!(vm.wait_for_output(common::NET_EXCHANGE_READY, TIMEOUT), "{}", vm.stdout());
    for frame in common::host_frames() {
        host.send_to(&frame, ("127.0.0.1", qemu_port)).unwrap();
    }
    let mut received = Vec::new();
    let mut buf = [0u8; 2048];
    for _ in 0..4 {
        let (n, _) = host.recv_from(&mut buf).expect("a frame from the probe");
        received.push(buf[..n].to_vec());
    }
    let out = vm.finish(TIMEOUT);
    common::assert_net_exchange(&out, &received);
}

#[test]
fn console_line_goes_out_and_host_input_comes_in() {
    let dir = scratch_dir("probe-console");
    let socket = dir.join("console.sock");
    let chardev = format!("socket,id=c0,path={},server=on,wait=off", socket.display());
    let qemu = qemu_probe_command(
        1,
        "probe.test=virtio-console probe.virtio-console.seed=42 probe.virtio-console.rx=11",
        &["-device", "virtio-serial-device", "-chardev", &chardev, "-device", "virtconsole,chardev=c0"],
    );
    let mut vm = Running::start(qemu);
    let deadline = std::time::Instant::now() + TIMEOUT;
    let mut stream = loop {
        match UnixStream::connect(&socket) {
            Ok(s) => break s,
            Err(_) if std::time::Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => panic!("cannot connect to QEMU's console socket: {e}"),
        }
    };
    assert!(vm.wait_for_output("PROBE virtio-console ready", TIMEOUT), "{}", vm.stdout());
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut line = String::new();
    BufReader::new(stream.try_clone().unwrap()).read_line(&mut line).unwrap();
    assert_eq!(line, "probe console says 42\n");
    stream.write_all(b"from host!\n").unwrap();
    let out = vm.finish(TIMEOUT);
    let checksum = pattern::fnv1a(pattern::FNV_OFFSET, b"from host!\n");
    assert_eq!(
        probe_result(&out.stdout, "virtio-console"),
        Some(format!("PROBE virtio-console ok tx_bytes=22 rx_bytes=11 rx_checksum={checksum:#x}").as_str()),
        "{}",
        out.describe()
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// Sends one QMP command and returns its answer line.
fn qmp(reader: &mut BufReader<UnixStream>, command: &str) -> String {
    reader.get_mut().write_all(command.as_bytes()).unwrap();
    reader.get_mut().write_all(b"\n").unwrap();
    let mut answer = String::new();
    reader.read_line(&mut answer).unwrap();
    answer
}

#[test]
fn balloon_inflates_as_far_as_the_host_asks() {
    let dir = scratch_dir("probe-balloon");
    let socket = dir.join("qmp.sock");
    let qmp_arg = format!("unix:{},server=on,wait=off", socket.display());
    let qemu =
        qemu_probe_command(1, "probe.test=virtio-balloon", &["-device", "virtio-balloon-device", "-qmp", &qmp_arg]);
    let mut vm = Running::start(qemu);
    assert!(vm.wait_for_output("PROBE virtio-balloon ready", TIMEOUT), "{}", vm.stdout());
    let mut reader = BufReader::new(UnixStream::connect(&socket).unwrap());
    let mut greeting = String::new();
    reader.read_line(&mut greeting).unwrap();
    assert!(greeting.contains("QMP"), "{greeting}");
    assert_eq!(qmp(&mut reader, r#"{"execute":"qmp_capabilities"}"#).trim(), r#"{"return": {}}"#);
    // 128 MiB of RAM down to 96: a 32 MiB balloon.
    let answer = qmp(&mut reader, &format!(r#"{{"execute":"balloon","arguments":{{"value":{}}}}}"#, 96 << 20));
    assert_eq!(answer.trim(), r#"{"return": {}}"#);
    let out = vm.finish(TIMEOUT);
    assert_eq!(
        probe_result(&out.stdout, "virtio-balloon"),
        Some("PROBE virtio-balloon ok inflated_pages=8192 mib=32"),
        "{}",
        out.describe()
    );
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn hostile_driver_scenarios_leave_qemus_virtio_blk_serving() {
    let dir = scratch_dir("probe-hostile");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let drive = format!("if=none,id=d0,file={},format=raw", image.display());
    let qemu =
        qemu_probe_command(1, "probe.test=hostile", &["-drive", &drive, "-device", "virtio-blk-device,drive=d0"]);
    let out = Running::start(qemu).finish(TIMEOUT);
    let scenarios = [
        "descriptor-loop",
        "outside-ram",
        "address-wraps",
        "zero-length",
        "huge-length",
        "chain-longer-than-queue",
        "write-only-header",
        "read-only-status",
        "head-out-of-range",
        "next-out-of-range",
        "avail-index-jump",
        "unaligned-rings",
        "queue-size-not-power-of-two",
        "queue-size-too-big",
        "notify-before-driver-ok",
        "config-write-out-of-range",
    ];
    for name in scenarios {
        let line =
            probe_result(&out.stdout, &format!("hostile-{name}")).unwrap_or_else(|| panic!("{}", out.describe()));
        assert!(line.ends_with(" recovered=yes"), "{line}");
    }
    assert!(
        out.stdout.contains(&format!("PROBE done passed={} failed=0 skipped=0", scenarios.len())),
        "{}",
        out.describe()
    );
    // QEMU names the faults it saw, as a VMM should.
    assert!(out.stderr.contains("zero sized buffers are not allowed"), "{}", out.describe());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn throughput_modes_report_rates_from_the_tsc() {
    let dir = scratch_dir("probe-throughput");
    let image = dir.join("disk.img");
    std::fs::write(&image, vec![0u8; 4 << 20]).unwrap();
    let drive = format!("if=none,id=d0,file={},format=raw", image.display());
    let host = UdpSocket::bind("127.0.0.1:0").unwrap();
    let netdev = format!("socket,id=n0,udp=127.0.0.1:{},localaddr=127.0.0.1:0", host.local_addr().unwrap().port());
    let tests = "probe.test=tsc,virtio-blk,virtio-net probe.virtio-blk.mode=throughput probe.virtio-blk.mib=2 \
                 probe.virtio-blk.ops=256 probe.virtio-blk.depth=4 probe.virtio-net.mode=throughput probe.virtio-net.frames=500";
    let qemu = qemu_probe_command(
        1,
        tests,
        &[
            "-drive",
            &drive,
            "-device",
            "virtio-blk-device,drive=d0",
            "-netdev",
            &netdev,
            "-device",
            "virtio-net-device,netdev=n0",
        ],
    );
    let out = Running::start(qemu).finish(TIMEOUT);
    let field = |line: &str, key: &str| -> u64 {
        let word = line.split(' ').find_map(|w| w.strip_prefix(key)).unwrap_or_else(|| panic!("{key} in {line}"));
        word.parse().unwrap()
    };
    let tsc = probe_result(&out.stdout, "tsc").unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(field(tsc, "khz=") > 100_000, "a TSC of at least 100 MHz: {tsc}");
    let blk = probe_result(&out.stdout, "virtio-blk").unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(blk.starts_with("PROBE virtio-blk ok mode=throughput depth=4 "), "{blk}");
    assert_eq!(field(blk, "seq_bytes="), 2 << 20);
    assert!(field(blk, "seq_mb_per_s=") > 0 && field(blk, "rand_4k_iops=") > 0, "{blk}");
    let net = probe_result(&out.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(net.starts_with("PROBE virtio-net ok mode=throughput size=60 "), "{net}");
    assert!(field(net, "tx_pps=") > 0 && field(net, "frames=") == 500, "{net}");
    let _ = std::fs::remove_dir_all(dir);
}
