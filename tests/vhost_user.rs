//! vhost-user both ways: Ferrovisor fronting disks that qemu-storage-daemon and its own
//! `ferrovisor vhost-user-blk` serve, QEMU using Ferrovisor's back-end, and a back-end that
//! restarts under a running guest.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Running, ferrovisor, pattern, probe_command, probe_result, qemu_probe_command, scratch_dir};

/// A back-end process listening on `socket`, killed when dropped.
struct BackEnd {
    child: Child,
    socket: PathBuf,
    log: PathBuf,
}

impl BackEnd {
    fn spawn(mut cmd: Command, socket: PathBuf, log: PathBuf) -> BackEnd {
        let _ = std::fs::remove_file(&socket);
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd.stdout(Stdio::null()).stderr(out).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "the back-end never listened: {}",
                std::fs::read_to_string(&log).unwrap()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        BackEnd { child, socket, log }
    }

    /// `ferrovisor vhost-user-blk` serving `image` (serial probe-disk).
    fn ferrovisor_blk(dir: &Path, image: &Path) -> BackEnd {
        BackEnd::ferrovisor_blk_with(dir, image, "")
    }

    /// The same with more `--disk` options (`,key=value...`).
    fn ferrovisor_blk_with(dir: &Path, image: &Path, options: &str) -> BackEnd {
        let socket = dir.join("blk.sock");
        let mut cmd = ferrovisor();
        cmd.args(["vhost-user-blk", "--socket"]).arg(&socket);
        cmd.arg("--disk").arg(format!("path={},id=probe-disk{options}", image.display()));
        BackEnd::spawn(cmd, socket, dir.join("backend.log"))
    }

    /// qemu-storage-daemon exporting `image` as vhost-user-blk.
    fn qemu_storage_daemon(dir: &Path, image: &Path) -> BackEnd {
        let socket = dir.join("qsd.sock");
        let mut cmd = Command::new("qemu-storage-daemon");
        cmd.arg("--blockdev").arg(format!("driver=file,node-name=disk,filename={}", image.display()));
        cmd.arg("--export").arg(format!(
            "type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path={},writable=on",
            socket.display()
        ));
        BackEnd::spawn(cmd, socket, dir.join("qsd.log"))
    }

    fn disk_arg(&self) -> String {
        format!("vhost_user={}", self.socket.display())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for BackEnd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a VMM (or QEMU) to its end.
fn finish(cmd: Command) -> common::Outcome {
    Running::start(cmd).finish(Duration::from_secs(120))
}

/// A probe command with `extra` Ferrovisor arguments.
fn probe_with(tests: &str, extra: &[&str]) -> Command {
    let mut cmd = probe_command(1, tests);
    cmd.args(extra);
    cmd
}

/// QEMU's arguments for `devices` on the back-end's socket (chardev `vu`), its guest memory a
/// shared memfd that the back-end can map.
fn on_back_end(backend: &BackEnd, devices: &[&str]) -> Vec<String> {
    let chardev = format!("socket,id=vu,path={}", backend.socket.display());
    let mut extra = vec!["-object", "memory-backend-memfd,id=mem,size=128M,share=on", "-machine", "memory-backend=mem"];
    extra.extend(["-chardev", &chardev]);
    extra.extend(devices);
    extra.into_iter().map(String::from).collect()
}

/// QEMU's microvm booting the probe with `devices` on the back-end.
fn qemu_on_back_end(tests: &str, backend: &BackEnd, devices: &[&str]) -> Command {
    qemu_probe_command(1, tests, &on_back_end(backend, devices))
}

fn blank_image(dir: &Path) -> PathBuf {
    common::write_file(dir, "disk.img", &vec![0u8; 1 << 20])
}

const BLK_PATTERN: &str =
    "probe.test=virtio-blk probe.virtio-blk.start=8 probe.virtio-blk.sectors=100 probe.virtio-blk.seed=7";

/// Checks the probe's pattern line and the image behind it; `id` is what GET_ID answered.
fn assert_pattern_written(out: &common::Outcome, image: &Path, id: &str) {
    let blk = probe_result(&out.stdout, "virtio-blk").unwrap_or_else(|| panic!("{}", out.describe()));
    let expected = format!(
        "PROBE virtio-blk ok sectors=100 capacity=2048 readonly=no flush=yes write=ok beyond_end=ioerr id={id} "
    );
    assert!(blk.starts_with(&expected), "{blk}");
    let checksum = common::check_blk_pattern(&std::fs::read(image).unwrap(), 7, 8, 100);
    assert!(blk.ends_with(&format!("checksum={checksum:#x}")), "{blk} vs {checksum:#x}");
}

#[test]
fn qemu_storage_daemon_serves_a_disk_the_probe_writes() {
    let dir = scratch_dir("vhost-user-qsd");
    let image = blank_image(&dir);
    let qsd = BackEnd::qemu_storage_daemon(&dir, &image);
    let api = dir.join("api.sock");
    let mut vm = Running::start(probe_with(
        &format!("{BLK_PATTERN} probe.idle=on"),
        &["--disk", &qsd.disk_arg(), "--api-sock", api.to_str().unwrap()],
    ));
    assert!(vm.wait_for_output("PROBE done", Duration::from_secs(60)), "{}", vm.stdout());
    // Its state is the back-end's: snapshots and migrations are refused with a sentence.
    let send = r#"{"destination_url": "unix:/tmp/nowhere.sock"}"#;
    let (code, body) = common::http(&api, "PUT", "/ferrovisor/migration/send", send);
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("served by other processes (vhost-user)"), "{body}");
    let out = vm.finish_after_signal(libc::SIGTERM, Duration::from_secs(10));
    // libvhost-user answers GET_ID with its own name.
    assert_pattern_written(&out, &image, "vhost_user_blk");
    assert!(out.stderr.contains("vhost-user-blk at"), "{}", out.describe());
}

#[test]
fn ferrovisors_back_end_passes_the_block_and_hostile_suites_for_one_vmm_after_another() {
    let dir = scratch_dir("vhost-user-own");
    let image = blank_image(&dir);
    let mut backend = BackEnd::ferrovisor_blk(&dir, &image);
    let out = finish(probe_with(BLK_PATTERN, &["--disk", &backend.disk_arg()]));
    assert_pattern_written(&out, &image, "probe-disk");
    // The same back-end serves the next VMM, whose driver is hostile.
    let out = finish(probe_with("probe.test=hostile", &["--disk", &backend.disk_arg()]));
    let done = common::probe_lines(&out.stdout).into_iter().find(|l| l.starts_with("PROBE done")).unwrap_or_default();
    assert!(done.starts_with("PROBE done passed=16 failed=0"), "{}", out.describe());
    assert!(backend.alive(), "the back-end died: {}", backend.log());
    // And the next, whose front-end is a virtio-pci function, on the emptied image.
    std::fs::write(&image, vec![0u8; 1 << 20]).unwrap();
    let out = finish(probe_with(BLK_PATTERN, &["--disk", &backend.disk_arg(), "--virtio-transport", "pci"]));
    assert_pattern_written(&out, &image, "probe-disk");
    assert!(out.stderr.contains("virtio-blk0 at PCI 00:01.0"), "{}", out.describe());
    let log = backend.log();
    assert!(log.contains("the driver corrupted a queue"), "the hostile driver's faults are logged: {log}");
    assert_eq!(log.matches("the front-end went").count(), 3, "{log}");
}

/// A back-end reaches memory the guest plugged with virtio-mem after it started: the memory
/// table covers the whole hotpluggable region (unplugged blocks are holes in the shared memfd),
/// so a plug needs no new table. The probe plugs 64 MiB, gives back all but 16, then writes its
/// disk pattern from, and reads it back into, buffers in what stays plugged.
#[test]
fn a_back_end_reaches_memory_the_guest_plugged() {
    const TIMEOUT: Duration = Duration::from_secs(120);
    let dir = scratch_dir("vhost-user-plugged");
    let image = blank_image(&dir);
    let backend = BackEnd::ferrovisor_blk(&dir, &image);
    let api = dir.join("api.sock");
    let plugged_buffers = BLK_PATTERN
        .replace("probe.test=virtio-blk", "probe.test=virtio-mem,virtio-blk probe.virtio-blk.buffers=0x100000000");
    let mut cmd = probe_with(&plugged_buffers, &["--disk", &backend.disk_arg(), "--memory-hotplug", "total=128"]);
    cmd.arg("--api-sock").arg(&api);
    let mut vm = Running::start(cmd);
    let size = |mib: u32| format!(r#"{{"requested_size_mib": {mib}}}"#);
    assert!(vm.wait_for_output("PROBE virtio-mem ready", TIMEOUT), "{}", vm.stdout());
    common::api_call(&api, "PATCH", "/hotplug/memory", &size(64), 204);
    assert!(vm.wait_for_output("PROBE virtio-mem plugged mib=64", TIMEOUT), "{}", vm.stdout());
    common::api_call(&api, "PATCH", "/hotplug/memory", &size(16), 204);
    let out = vm.finish(TIMEOUT);
    let mem = probe_result(&out.stdout, "virtio-mem").unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(mem.contains("plugged_mib=64 unplugged_mib=48") && mem.contains("start=0x100000000"), "{mem}");
    assert_pattern_written(&out, &image, "probe-disk");
}

/// A back-end that polls its queue after work (`poll_us`, as the built-in device's worker)
/// serves the pattern and reads at a depth of eight, and stands a hostile driver, whose
/// corrupted rings do not hold it.
#[test]
fn a_polling_back_end_passes_the_block_and_hostile_suites() {
    let dir = scratch_dir("vhost-user-polling");
    let image = blank_image(&dir);
    let mut backend = BackEnd::ferrovisor_blk_with(&dir, &image, ",poll_us=1000");
    let out = finish(probe_with(BLK_PATTERN, &["--disk", &backend.disk_arg()]));
    assert_pattern_written(&out, &image, "probe-disk");
    // Eight reads in flight: the next comes while the back-end still looks.
    let reads =
        "probe.test=virtio-blk probe.virtio-blk.mode=throughput probe.virtio-blk.mib=1 probe.virtio-blk.ops=512";
    let out = finish(probe_with(reads, &["--disk", &backend.disk_arg()]));
    assert!(probe_result(&out.stdout, "virtio-blk").is_some_and(|r| r.contains(" ok ")), "{}", out.describe());
    let out = finish(probe_with("probe.test=hostile", &["--disk", &backend.disk_arg()]));
    let done = common::probe_lines(&out.stdout).into_iter().find(|l| l.starts_with("PROBE done")).unwrap_or_default();
    assert!(done.starts_with("PROBE done passed=16 failed=0"), "{}", out.describe());
    assert!(backend.alive(), "the back-end died: {}", backend.log());
}

/// QEMU runs the probe's block test on Ferrovisor's back-end twice: as `vhost-user-blk` on
/// virtio-mmio (microvm), and as `vhost-user-blk-pci` on a PC machine, where SeaBIOS places the
/// function's BARs and the probe finds it on PCI bus 0.
#[test]
fn qemu_boots_the_probe_on_ferrovisors_block_back_end() {
    let dir = scratch_dir("vhost-user-qemu");
    let image = blank_image(&dir);
    let backend = BackEnd::ferrovisor_blk(&dir, &image);
    let out = finish(qemu_on_back_end(BLK_PATTERN, &backend, &["-device", "vhost-user-blk,chardev=vu"]));
    assert_pattern_written(&out, &image, "probe-disk");

    let dir = scratch_dir("vhost-user-qemu-pci");
    let image = blank_image(&dir);
    let backend = BackEnd::ferrovisor_blk(&dir, &image);
    let pci = on_back_end(&backend, &["-device", "vhost-user-blk-pci,chardev=vu,disable-legacy=on"]);
    let out = finish(common::qemu_pc_probe_command(BLK_PATTERN, &pci));
    assert_pattern_written(&out, &image, "probe-disk");
}

#[test]
fn a_back_end_that_restarts_gets_the_disk_back_without_a_guest_reboot() {
    let dir = scratch_dir("vhost-user-restart");
    let image = blank_image(&dir);
    let backend = BackEnd::ferrovisor_blk(&dir, &image);
    // Ticks every ~20M cycles; a request may wait 60G cycles for its answer.
    let tests = "probe.test=virtio-blk probe.virtio-blk.mode=counter probe.virtio-blk.every=20000000 probe.virtio.timeout=60000000000";
    let mut vm = Running::start({
        let mut cmd = probe_command(1, tests);
        cmd.args(["--disk", &backend.disk_arg()]);
        cmd
    });
    assert!(vm.wait_for_output("PROBE tick n=5\n", Duration::from_secs(30)), "{}", vm.stdout());
    let socket = backend.socket.clone();
    drop(backend);
    std::thread::sleep(Duration::from_millis(300));
    let before = common::probe_ticks(&vm.stdout()).last().copied().unwrap_or(0);
    let mut cmd = ferrovisor();
    cmd.args(["vhost-user-blk", "--socket"]).arg(&socket);
    cmd.arg("--disk").arg(format!("path={},id=probe-disk", image.display()));
    let backend = BackEnd::spawn(cmd, socket, dir.join("backend2.log"));
    let target = format!("PROBE tick n={}\n", before + 10);
    assert!(vm.wait_for_output(&target, Duration::from_secs(30)), "the ticks did not go on: {}", vm.stderr());
    let out = vm.finish_after_signal(libc::SIGTERM, Duration::from_secs(10));
    let last = common::probe_ticks(&out.stdout).last().copied().unwrap();
    drop(backend);
    common::check_counter_disk(&std::fs::read(&image).unwrap(), last);
    assert_eq!(out.stderr.matches("hung up; the device waits for it to come back").count(), 1, "{}", out.stderr);
    assert_eq!(out.stderr.matches("back-end is back; the device serves again").count(), 1, "{}", out.stderr);
}

#[test]
fn vhost_user_options_are_checked_before_boot() {
    let dir = scratch_dir("vhost-user-options");
    let missing = dir.join("nobody.sock");
    let out = finish(probe_with("probe.test=virtio-blk", &["--disk", &format!("vhost_user={}", missing.display())]));
    assert_eq!(out.status.code(), Some(2), "a configuration mistake: {}", out.describe());
    assert!(out.stderr.contains("start the vhost-user back-end first"), "{}", out.stderr);
    // A socket nobody accepts on: the connection is refused with a sentence.
    let listener = std::os::unix::net::UnixListener::bind(&missing).unwrap();
    drop(listener);
    let out = finish(probe_with("probe.test=virtio-blk", &["--fs", &format!("tag=root,socket={}", missing.display())]));
    assert_ne!(out.status.code(), Some(0), "{}", out.describe());
    assert!(out.stderr.contains("cannot connect to"), "{}", out.stderr);
    let out = finish(probe_with("probe.test=virtio-blk", &["--net", "vhost_user=/x,ip=10.0.0.2"]));
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("its frames never pass through the VMM"), "{}", out.stderr);
}

/// `ferrovisor vhost-user-net` on a new test TAP.
/// `ferrovisor vhost-user-net` on `tap`, with `--port` options unless empty.
fn ferrovisor_net(dir: &Path, tap: &str, port: &str) -> BackEnd {
    let socket = dir.join("net.sock");
    let mut cmd = ferrovisor();
    cmd.args(["vhost-user-net", "--socket"]).arg(&socket).args(["--tap", tap]);
    if !port.is_empty() {
        cmd.args(["--port", port]);
    }
    BackEnd::spawn(cmd, socket, dir.join("net-backend.log"))
}

/// The probe's frame exchange through `vm`, whose interface the back-end puts on `tap`.
fn exchange_frames(vm: Running, tap: &common::TestTap) -> common::Outcome {
    let far_side = common::PacketSocket::bind(&tap.name);
    let mut vm = vm;
    assert!(vm.wait_for_output(common::NET_EXCHANGE_READY, Duration::from_secs(60)), "{}", vm.stdout());
    for frame in common::host_frames() {
        far_side.send(&frame);
    }
    let received: Vec<Vec<u8>> =
        (0..4).map(|_| far_side.recv_ethertype(pattern::ETHERTYPE_PROBE).expect("a frame from the guest")).collect();
    let out = vm.finish(Duration::from_secs(60));
    common::assert_net_exchange(&out, &received);
    out
}

#[test]
fn frames_cross_ferrovisors_net_back_end_both_ways() {
    // A back-end woken by each kick and frame, then one that polls after work.
    for (i, port) in ["", "poll_us=1000"].into_iter().enumerate() {
        let dir = scratch_dir(&format!("vhost-user-net-{i}"));
        let tap = common::TestTap::new(&format!("fvvu{i}"));
        let mut backend = ferrovisor_net(&dir, &tap.name, port);
        let vm = Running::start(probe_with(
            common::NET_EXCHANGE_TESTS,
            &["--net", &format!("vhost_user={},mac=52:54:00:12:34:56", backend.socket.display())],
        ));
        let out = exchange_frames(vm, &tap);
        assert!(out.status.success(), "{port}: {}", out.describe());
        assert!(backend.alive(), "{port}: {}", backend.log());
    }
}
#[test]
fn qemu_moves_frames_through_ferrovisors_net_back_end() {
    let dir = scratch_dir("vhost-user-net-qemu");
    let tap = common::TestTap::new("fvvq");
    let backend = ferrovisor_net(&dir, &tap.name, "");
    let devices =
        ["-netdev", "vhost-user,id=n0,chardev=vu", "-device", "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56"];
    exchange_frames(Running::start(qemu_on_back_end(common::NET_EXCHANGE_TESTS, &backend, &devices)), &tap);
}
