//! Boots the project's Linux guest (guest/build.sh). Each boot costs about 30 s of one core on
//! hosts that emulate the guest's ring 0; nextest runs at most two of them at once.

mod common;

use std::time::Duration;

use common::{LINUX_HOST_CMDLINE, Running, ferrovisor, linux_guest};

const BOOT_TIMEOUT: Duration = Duration::from_secs(300);

/// Checks how a guest that ran its init ended. On hardware /init runs and reboots; on hosts
/// that emulate ring 0, init dies on its first system call and the kernel panics and reboots.
/// Both end in an i8042 reset and status 0. Those hosts' emulator also lacks `fwait`, which the
/// kernel runs when init exits (fpu__drop) whenever the host did not keep the FPU loaded: then
/// the VMM must stop with its readable report of that instruction (byte 9b) and status 1.
fn assert_ended_after_init(out: &common::Outcome) {
    assert_ended_after(out, "init as init process");
}

/// As [`assert_ended_after_init`], with the documented gap accepted only once the guest printed
/// `milestone`: before that it is a failure (the boot is retried once, see boot_reaching).
fn assert_ended_after(out: &common::Outcome, milestone: &str) {
    let log = out.describe();
    if out.status.code() == Some(0) {
        assert!(out.stderr.contains("the guest requested a reset"), "{log}");
        return;
    }
    assert!(out.stdout.contains(milestone), "the VM stopped before '{milestone}': {log}");
    assert!(fwait_gap(out), "the VM must end in a reset: {log}");
    assert_eq!(out.status.code(), Some(1), "{log}");
    eprintln!("this host's instruction emulator could not run fwait after '{milestone}'; the VMM reported it");
}

/// Whether the VM stopped on this host's missing `fwait` emulation (see above). The kernel
/// runs it whenever a thread that used the FPU exits, which under load can come a little
/// before init starts, after the boot work the tests check.
fn fwait_gap(out: &common::Outcome) -> bool {
    common::host_emulates_ring0()
        && out.status.code() == Some(1)
        && out.stderr.contains("suberror 1: instruction emulation failed")
        && out.stderr.contains("instruction bytes at RIP: 9b")
}

/// Runs `boot`, and once more when the documented fwait gap stopped it before it printed
/// `line`: the line is then required of the second run.
fn boot_reaching(line: &str, mut boot: impl FnMut() -> common::Outcome) -> common::Outcome {
    let out = boot();
    if out.stdout.contains(line) || !fwait_gap(&out) {
        return out;
    }
    eprintln!("this host's emulator could not run fwait before '{line}'; booting once more");
    boot()
}

/// The kernel started init: the line must be there.
fn assert_started_init(out: &common::Outcome, line: &str) {
    assert!(out.stdout.contains(line), "'{line}': {}", out.describe());
}

#[test]
fn linux_vmlinux_boots_to_init() {
    let guest = linux_guest();
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 {LINUX_HOST_CMDLINE}");
    // An assigned device on the PCI root, served by another process: Linux enumerates it.
    let server = common::DeviceServer::start(&common::scratch_dir("linux-vmlinux"), &[]);
    let out = boot_reaching("Run /init as init process", || {
        let mut cmd = ferrovisor();
        cmd.arg("run")
            .args(["--kernel", guest.join("vmlinux").to_str().unwrap()])
            .args(["--initrd", guest.join("initramfs.cpio").to_str().unwrap()])
            .args(["--memory", "256", "--cmdline", &cmdline, "--device", &server.device_arg()]);
        Running::start(cmd).finish(BOOT_TIMEOUT)
    });
    let log = out.describe();
    assert!(out.stdout.contains("Linux version 6.1"), "{log}");
    // Linux sized the BARs where the VMM placed them, the 64-bit prefetchable one included.
    for line in [
        "pci 0000:00:01.0: [1b36:1fe0] type 00 class 0xff0000",
        "pci 0000:00:01.0: BAR 0 [mem 0xe1000000-0xe1000fff]",
        "pci 0000:00:01.0: BAR 2 [mem 0xe1010000-0xe101ffff 64bit pref]",
    ] {
        assert!(out.stdout.contains(line), "'{line}' in {log}");
    }
    // 256 MiB requested: usable RAM from 1 MiB to 256 MiB - 1, as the e820 map says.
    assert!(out.stdout.contains("BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable"), "{log}");
    assert!(out.stdout.contains("MPTABLE: OEM ID: FERROVSR"), "{log}");
    assert!(out.stdout.contains("Run /init as init process"), "{log}");
    assert_ended_after_init(&out);
    eprintln!("vmlinux: launch to exit {:.1} s", out.elapsed.as_secs_f64());
}

/// Linux mounts its ext4 root from virtio-pmem (`/dev/pmem0`, the rootfs image mapped into its
/// physical memory) and starts init.
#[test]
fn linux_mounts_its_root_from_virtio_pmem() {
    let guest = linux_guest();
    let dir = common::scratch_dir("linux-pmem");
    let root = dir.join("rootfs.ext4");
    std::fs::copy(guest.join("rootfs.ext4"), &root).unwrap();
    // A pmem file is a whole number of 2 MiB blocks; ext4 does not mind the room at the end.
    let len = std::fs::metadata(&root).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&root).unwrap().set_len(len.next_multiple_of(2 << 20)).unwrap();
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 {LINUX_HOST_CMDLINE} root=/dev/pmem0 rw");
    let out = boot_reaching("Run /sbin/init as init process", || {
        let mut cmd = ferrovisor();
        cmd.arg("run")
            .args(["--kernel", guest.join("vmlinux").to_str().unwrap()])
            .args(["--memory", "256", "--cmdline", &cmdline])
            .args(["--pmem", &format!("path={}", root.display())]);
        Running::start(cmd).finish(BOOT_TIMEOUT)
    });
    let log = out.describe();
    assert!(out.stderr.contains("virtio-pmem0: the driver started the device"), "{log}");
    assert!(out.stdout.contains("EXT4-fs (pmem0): mounted filesystem"), "{log}");
    assert_started_init(&out, "Run /sbin/init as init process");
    assert_ended_after_init(&out);
    let _ = std::fs::remove_dir_all(dir);
}

/// Linux mounts its root from a directory that virtiofsd (Debian's, over vhost-user) shares as
/// virtio-fs, and starts init from it: the directory holds the guest's initramfs, unpacked.
#[test]
fn linux_mounts_its_root_from_virtio_fs_served_by_virtiofsd() {
    let guest = linux_guest();
    let dir = common::scratch_dir("linux-virtiofs");
    let root = dir.join("root");
    std::fs::create_dir_all(&root).unwrap();
    let cpio = std::fs::File::open(guest.join("initramfs.cpio")).unwrap();
    let unpacked = std::process::Command::new("cpio").arg("-idm").current_dir(&root).stdin(cpio).output().unwrap();
    assert!(unpacked.status.success(), "cpio: {}", String::from_utf8_lossy(&unpacked.stderr));
    let socket = dir.join("fs.sock");
    let mut virtiofsd = std::process::Command::new("/usr/lib/qemu/virtiofsd")
        .arg(format!("--socket-path={}", socket.display()))
        .args(["-o", &format!("source={}", root.display()), "-o", "cache=none"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("virtiofsd runs (qemu-system-common installs it)");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !socket.exists() {
        assert!(std::time::Instant::now() < deadline, "virtiofsd never listened");
        std::thread::sleep(Duration::from_millis(20));
    }
    // The host's ext4 root flags would make virtiofs refuse the mount.
    let host: Vec<&str> = LINUX_HOST_CMDLINE.split_whitespace().filter(|p| !p.starts_with("rootflags=")).collect();
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 {} rootfstype=virtiofs root=rootfs rw", host.join(" "));
    let mut cmd = ferrovisor();
    cmd.arg("run")
        .args(["--kernel", guest.join("vmlinux").to_str().unwrap()])
        .args(["--memory", "256", "--cmdline", &cmdline])
        .args(["--fs", &format!("tag=rootfs,socket={}", socket.display())]);
    let out = Running::start(cmd).finish(BOOT_TIMEOUT);
    let _ = virtiofsd.kill();
    let _ = virtiofsd.wait();
    let log = out.describe();
    assert!(out.stderr.contains("virtio-fs0: the driver started the device"), "{log}");
    assert!(out.stdout.contains("VFS: Mounted root (virtiofs filesystem)"), "{log}");
    // The kernel read /sbin/init through FUSE to start it.
    assert_started_init(&out, "Run /sbin/init as init process");
    let _ = std::fs::remove_dir_all(dir);
}

/// Linux's virtio-mem driver plugs the 64 MiB requested at boot and, once PATCH asks for
/// 128, logs the 64 it holds and the new request, and plugs the rest: the host sees every
/// block plugged, and the kernel counts the new pages (its zone lists are rebuilt). Told that
/// unplugged memory is inaccessible (each plugged block is a KVM slot of its own), the kernel
/// never touches the rest of the region.
#[test]
fn linux_plugs_hotplugged_memory_as_virtio_mem_asks() {
    let guest = linux_guest();
    let dir = common::scratch_dir("linux-mem");
    let socket = dir.join("api.sock");
    // No root: the kernel waits 30 s for one (time to change the request), then panics.
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 {LINUX_HOST_CMDLINE} root=/dev/vdz rootdelay=30");
    let mut cmd = ferrovisor();
    cmd.arg("run")
        .args(["--kernel", guest.join("vmlinux").to_str().unwrap()])
        .args(["--memory", "128", "--cmdline", &cmdline])
        .args(["--memory-hotplug", "total=256,requested=64"])
        .arg("--api-sock")
        .arg(&socket);
    let mut vm = Running::start(cmd);
    let plugged = |vm: &mut Running, mib: u64| {
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        loop {
            let status = api(&socket, "GET", "/hotplug/memory", "", 200);
            if status["plugged_size_mib"] == mib {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "{status}\n{}\n{}", vm.stdout(), vm.stderr());
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    assert!(vm.wait_for_output("requested size: 0x4000000", BOOT_TIMEOUT), "{}\n{}", vm.stdout(), vm.stderr());
    plugged(&mut vm, 64);
    api(&socket, "PATCH", "/hotplug/memory", r#"{"requested_size_mib": 128}"#, 204);
    assert!(vm.wait_for_output("requested size: 0x8000000", BOOT_TIMEOUT), "{}\n{}", vm.stdout(), vm.stderr());
    plugged(&mut vm, 128);
    let stats = api(&socket, "GET", "/ferrovisor/stats", "", 200);
    assert_eq!(stats["memory_hotplug"]["unplugged_accesses"], 0, "{stats}");
    api(&socket, "PUT", "/ferrovisor/stop", "", 204);
    let out = vm.finish(BOOT_TIMEOUT);
    let log = out.describe();
    for line in [
        "virtio_mem virtio0: start address: 0x100000000",
        "virtio_mem virtio0: region size: 0x10000000",
        "virtio_mem virtio0: device block size: 0x200000",
        "virtio_mem virtio0: plugged size: 0x4000000",
    ] {
        assert!(out.stdout.contains(line), "'{line}': {log}");
    }
    let zonelists = out.stdout.matches("Built 1 zonelists").count();
    assert!(zonelists >= 2, "the kernel rebuilt its zone lists for the plugged memory: {log}");
    assert!(out.stderr.contains("virtio-mem: the guest plugged"), "{log}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A kernel panic with panic=-1 reboot=k ends the VMM with status 0, through the i8042. No
/// root and no init: the panic comes before any user space, on every host.
#[test]
fn linux_panic_reboots_through_the_i8042_and_the_vmm_exits_0() {
    let guest = linux_guest();
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 {LINUX_HOST_CMDLINE} root=/dev/vdz");
    let mut cmd = ferrovisor();
    cmd.arg("run").args(["--kernel", guest.join("vmlinux").to_str().unwrap()]).args([
        "--memory",
        "128",
        "--cmdline",
        &cmdline,
    ]);
    let out = Running::start(cmd).finish(BOOT_TIMEOUT);
    let log = out.describe();
    assert!(out.stdout.contains("Kernel panic - not syncing: VFS: Unable to mount root fs"), "{log}");
    assert!(!out.stdout.contains("as init process"), "{log}");
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(out.stderr.contains("the guest requested a reset"), "{log}");
}

#[test]
fn linux_bzimage_boots_and_sigterm_stops_the_vm_cleanly() {
    let guest = linux_guest();
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 {LINUX_HOST_CMDLINE}");
    let mut cmd = ferrovisor();
    cmd.arg("run").args(["--kernel", guest.join("bzImage").to_str().unwrap()]).args([
        "--memory",
        "128",
        "--cmdline",
        &cmdline,
    ]);
    let mut vm = Running::start(cmd);
    // 128 MiB requested: the last line of the e820 map, printed a little after the banner.
    let e820_ram = "BIOS-e820: [mem 0x0000000000100000-0x0000000007ffffff] usable";
    let reached = vm.wait_for_output(e820_ram, BOOT_TIMEOUT);
    let pid = vm.child.id() as i32;
    // SAFETY: signalling a child process this test started and has not yet reaped.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    let out = vm.finish(Duration::from_secs(30));
    let log = out.describe();
    assert!(reached, "the bzImage never printed its memory map: {log}");
    assert!(out.stdout.contains("Linux version 6.1"), "{log}");
    assert_eq!(out.status.code(), Some(0), "{log}");
    assert!(out.stderr.contains("stopped the VM on signal 15 (SIGTERM)"), "{log}");
}

/// Linux on every virtio-mmio device Ferrovisor has: its root on virtio-blk (and a second,
/// read-only disk), an address from a
/// DHCP server on the TAP's far side (in a network namespace the test makes), pings from the
/// host answered by the guest kernel, entropy from virtio-rng, its console on hvc0, a
/// balloon inflated to the host's target, and the vsock driver bound.
#[test]
fn linux_on_virtio_mmio_devices_mounts_root_gets_dhcp_answers_pings_and_logs_to_hvc0() {
    let guest = linux_guest();
    let dir = common::scratch_dir("linux-devices");
    // A panicked read-write mount leaves a journal to recover: each boot gets a fresh copy.
    let root = dir.join("rootfs.ext4");
    std::fs::copy(guest.join("rootfs.ext4"), &root).unwrap();
    let pristine = std::fs::read(&root).unwrap();
    let data_disk = dir.join("data.img");
    std::fs::write(&data_disk, vec![0u8; 1 << 20]).unwrap();
    let hvc0 = dir.join("hvc0.log");

    let ns = common::NetNs::new("fvl");
    let tap = "fvtap0";
    common::sh("ip", &["-n", &ns.name, "tuntap", "add", tap, "mode", "tap"]);
    common::sh("ip", &["-n", &ns.name, "addr", "add", "10.0.2.2/24", "dev", tap]);
    common::sh("ip", &["-n", &ns.name, "link", "set", tap, "up"]);
    let mut dnsmasq = ns.command("dnsmasq");
    dnsmasq
        .args(["--keep-in-foreground", "--no-resolv", "--no-hosts", "--port=0", "--bind-interfaces"])
        .args([format!("--interface={tap}"), "--dhcp-range=10.0.2.15,10.0.2.15,1h".into()])
        .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
        .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _dhcp = common::KillOnDrop(dnsmasq.spawn().expect("dnsmasq starts (apt-get install dnsmasq-base)"));

    // rootdelay holds the kernel after DHCP, with interrupts on, while the host pings it.
    let cmdline = format!(
        "console=ttyS0 console=hvc0 reboot=k panic=-1 {LINUX_HOST_CMDLINE} root=/dev/vda rw ip=dhcp rootdelay=15"
    );
    let mut network = None;
    let out = boot_reaching("Run /sbin/init as init process", || {
        // A second boot gets a fresh copy of the root too.
        std::fs::write(&root, &pristine).unwrap();
        let mut cmd = ns.command(env!("CARGO_BIN_EXE_ferrovisor"));
        cmd.arg("run")
            .args(["--kernel", guest.join("vmlinux").to_str().unwrap()])
            .args(["--memory", "256", "--rng", "--cmdline", &cmdline])
            // The root through io_uring and O_DIRECT: ext4's journal writes and flushes too.
            .args(["--disk", &format!("path={},io_engine=async,cache=none", root.display())])
            .args(["--disk", &format!("path={},readonly=on", data_disk.display())])
            // One MAC for both boots: dnsmasq has one address to lease, and a second boot (after
            // the fwait gap) must get it again.
            .args(["--net", &format!("tap={tap},mac=02:fc:00:00:02:0f")])
            .args(["--console", &format!("file:{}", hvc0.display())])
            .args(["--balloon", "size=8"])
            .args(["--vsock", &format!("cid=3,uds={}", dir.join("vsock.sock").display())]);
        let mut vm = Running::start(cmd);
        let leased =
            vm.wait_for_output("IP-Config: Got DHCP answer from 10.0.2.2, my address is 10.0.2.15", BOOT_TIMEOUT);
        // A first round resolves ARP, which a guest whose kernel is emulated answers slowly; the
        // second round is the one that counts.
        let _ = ns.command("ping").args(["-c", "3", "-i", "1", "-W", "3", "10.0.2.15"]).output();
        let ping = ns.command("ping").args(["-c", "4", "-i", "0.5", "-W", "5", "10.0.2.15"]).output().unwrap();
        network = Some((leased, ping));
        vm.finish(BOOT_TIMEOUT)
    });
    let (leased, ping) = network.expect("booted");
    let log = out.describe();
    assert!(leased, "{log}");
    // Nearly every echo must come back.
    let ping_out = String::from_utf8_lossy(&ping.stdout);
    let received: u32 =
        ping_out.split(", ").find_map(|part| part.strip_suffix(" received")).and_then(|n| n.parse().ok()).unwrap_or(0);
    assert!(received >= 3, "the guest answers pings: {ping_out}\n{log}");
    for line in [
        "virtio_blk virtio0: [vda] 32768 512-byte logical blocks",
        "virtio_blk virtio1: [vdb] 2048 512-byte logical blocks",
        "EXT4-fs (vda): mounted filesystem",
        "random: crng init done",
    ] {
        assert!(out.stdout.contains(line), "'{line}': {log}");
    }
    assert!(!out.stderr.contains("io_uring is unavailable"), "{log}");
    assert_ne!(std::fs::read(&root).unwrap(), pristine, "the read-write mount wrote the image through io_uring");
    assert_started_init(&out, "Run /sbin/init as init process");
    // The balloon driver probed and gave the 8 MiB the host asked for; the vsock driver probed.
    assert!(out.stderr.contains("virtio-balloon: the guest holds 8 MiB in the balloon"), "{log}");
    assert!(out.stderr.contains("virtio-vsock: the driver started the device"), "{log}");
    let console = std::fs::read_to_string(&hvc0).unwrap_or_default();
    assert!(console.contains("EXT4-fs (vda): mounted filesystem"), "kernel output on hvc0: {console}");
    // The read-write mount wrote to the disk (superblock state and times).
    assert_ne!(std::fs::read(&root).unwrap(), pristine, "the guest's writes reached the image");
    assert_ended_after_init(&out);
    let _ = std::fs::remove_dir_all(dir);
}

/// Linux on virtio-pci: a disk, an entropy source and a balloon, each a function with an MSI-X
/// vector per queue. Snapshotted while the kernel waits for its root; a new process mounts it.
#[test]
fn linux_finds_its_devices_on_virtio_pci_with_msix_and_mounts_root_after_a_snapshot() {
    let guest = linux_guest();
    let dir = common::scratch_dir("linux-pci");
    let root = dir.join("rootfs.ext4");
    std::fs::copy(guest.join("rootfs.ext4"), &root).unwrap();
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 {LINUX_HOST_CMDLINE} root=/dev/vda rw rootdelay=30");
    let socket = dir.join("first.sock");
    let mut cmd = ferrovisor();
    cmd.arg("run")
        .args(["--kernel", guest.join("vmlinux").to_str().unwrap()])
        .args(["--memory", "256", "--virtio-transport", "pci", "--rng", "--cmdline", &cmdline])
        .args(["--disk", &format!("path={}", root.display())])
        .args(["--balloon", "size=0"])
        .arg("--api-sock")
        .arg(&socket);
    let mut first = Running::start(cmd);
    // The drivers are up and the kernel waits for its root: snapshot the PCI functions and
    // their MSI-X state, and let a new process mount the root.
    assert!(first.wait_for_output("Waiting 30 sec before mounting root device", BOOT_TIMEOUT), "{}", first.stderr());
    let (state, mem) = (dir.join("pci.snap"), dir.join("pci.mem"));
    api(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    api(
        &socket,
        "PUT",
        "/snapshot/create",
        &serde_json::json!({"snapshot_path": state, "mem_file_path": mem}).to_string(),
        204,
    );
    api(&socket, "PUT", "/ferrovisor/stop", "", 204);
    let first = first.finish(BOOT_TIMEOUT);
    let second = restore_and_boot_on(&dir, &state, &mem);
    let both = format!("{}{}", first.stdout, second.stdout);
    let log = format!("{}\n{}", first.describe(), second.describe());
    assert!(!both.contains("virtio_mmio.device="), "no command-line devices on PCI: {log}");
    for line in [
        "pci 0000:00:00.0: [1b36:0008] type 00 class 0x060000",
        "pci 0000:00:01.0: [1af4:1042] type 00 class 0x010000",
        "pci 0000:00:02.0: [1af4:1045] type 00 class 0xff0000",
        "pci 0000:00:03.0: [1af4:1044] type 00 class 0xff0000",
        "virtio-pci 0000:00:01.0: enabling device",
        "virtio_blk virtio0: [vda] 32768 512-byte logical blocks",
        // The functions have no INTx pin: the drivers work only through MSI-X, in both VMMs.
        "random: crng init done",
    ] {
        assert!(both.contains(line), "'{line}': {log}");
    }
    // A vector per queue: Linux gives the balloon's inflate and deflate queues one each.
    assert!(first.stderr.contains("virtio-balloon: MSI-X vectors: configuration 0, queues 1 2"), "{log}");
    let _ = std::fs::remove_dir_all(dir);
}

use common::api_vmm;

fn api(socket: &std::path::Path, method: &str, path: &str, body: &str, status: u16) -> serde_json::Value {
    serde_json::from_str(&common::api_call(socket, method, path, body, status)).unwrap_or(serde_json::Value::Null)
}

/// Loads a snapshot taken while the kernel waited for its root device into a new VMM, which
/// must mount the root without booting again, and then start init. Past the mount, the fwait
/// gap (see assert_ended_after_init) is accepted: restores measured before the root flags of
/// LINUX_HOST_CMDLINE hit it after the mount in 4 of 12 (ext4's lazy-init thread exiting).
fn restore_and_boot_on(dir: &std::path::Path, state: &std::path::Path, mem: &std::path::Path) -> common::Outcome {
    const MOUNTED: &str = "EXT4-fs (vda): mounted filesystem";
    let out = boot_reaching(MOUNTED, || {
        let (second, socket) = api_vmm(dir, "second.sock", &[]);
        let load = serde_json::json!({
            "snapshot_path": state,
            "mem_backend": {"backend_type": "File", "backend_path": mem},
            "resume_vm": true,
        });
        api(&socket, "PUT", "/snapshot/load", &load.to_string(), 204);
        second.finish(BOOT_TIMEOUT)
    });
    let log = out.describe();
    assert!(!out.stdout.contains("Linux version"), "the restored guest does not boot again: {log}");
    assert!(out.stdout.contains(MOUNTED), "{log}");
    assert_ended_after(&out, MOUNTED);
    out
}

/// The whole lifecycle through the socket only: configure, start, pause and resume, inflate
/// the balloon on the running guest (its kernel driver answers; the VMM's RSS falls), read the
/// metrics, snapshot during boot and load the snapshot in a new process, which boots on to
/// user space. `rootdelay` holds the kernel, interrupts on, between its drivers and its root.
#[test]
fn linux_lifecycle_through_the_api_socket_with_balloon_metrics_and_snapshot() {
    let guest = linux_guest();
    let dir = common::scratch_dir("linux-api");
    let root = dir.join("rootfs.ext4");
    std::fs::copy(guest.join("rootfs.ext4"), &root).unwrap();
    let tap = common::TestTap::new("fvapi");
    let (mut first, socket) = api_vmm(&dir, "first.sock", &[]);
    let s = socket.as_path();
    let boot_args = format!("console=ttyS0 reboot=k panic=-1 {LINUX_HOST_CMDLINE} rootdelay=30");
    let boot = serde_json::json!({"kernel_image_path": guest.join("vmlinux"), "boot_args": boot_args});
    api(s, "PUT", "/boot-source", &boot.to_string(), 204);
    api(s, "PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 128}"#, 204);
    // Every guest page resident from the start: the balloon's effect shows in the RSS.
    api(s, "PUT", "/ferrovisor/memory", r#"{"prefault": true}"#, 204);
    let drive = serde_json::json!({"drive_id": "rootfs", "path_on_host": root, "is_root_device": true});
    api(s, "PUT", "/drives/rootfs", &drive.to_string(), 204);
    let nic = serde_json::json!({"iface_id": "eth0", "host_dev_name": tap.name, "guest_mac": "02:fc:00:00:00:05"});
    api(s, "PUT", "/network-interfaces/eth0", &nic.to_string(), 204);
    api(s, "PUT", "/balloon", r#"{"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1}"#, 204);
    let metrics = dir.join("metrics.json");
    api(s, "PUT", "/metrics", &serde_json::json!({"metrics_path": metrics}).to_string(), 204);
    api(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    assert!(
        first.wait_for_output("Waiting 30 sec before mounting root device", BOOT_TIMEOUT),
        "{}\n{}",
        first.stdout(),
        first.stderr()
    );

    // Paused, the guest prints nothing.
    api(s, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    let before = first.stdout().len();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(first.stdout().len(), before, "the paused guest wrote to its serial port");
    api(s, "PATCH", "/vm", r#"{"state": "Resumed"}"#, 204);

    // The running guest's driver takes the new target; its pages go back to the host.
    let rss = |s: &std::path::Path| api(s, "GET", "/ferrovisor/stats", "", 200)["rss_kib"].as_u64().unwrap();
    let rss_before = rss(s);
    api(s, "PATCH", "/balloon", r#"{"amount_mib": 32}"#, 204);
    // Generous: the guest's ring 0 is emulated on some hosts, and CI runs other guests beside it.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let stats = loop {
        let stats = api(s, "GET", "/balloon/statistics", "", 200);
        if stats["actual_mib"] == 32 && stats["total_memory"].as_u64().is_some() {
            break stats;
        }
        assert!(std::time::Instant::now() < deadline, "the balloon did not reach 32 MiB: {stats}\n{}", first.stderr());
        std::thread::sleep(Duration::from_millis(200));
    };
    let rss_after = rss(s);
    eprintln!("balloon 32 MiB: VMM RSS {rss_before} -> {rss_after} KiB; guest statistics {stats}");
    assert!(rss_before - rss_after >= 32 * 1024 * 8 / 10, "RSS fell by {} KiB", rss_before - rss_after);
    assert!(stats["total_memory"].as_u64().unwrap() > 64 << 20, "{stats}");

    // The root disk moves to a larger copy while the kernel waits for it: its driver hears of
    // the new size; the root it mounts later (in the restored VM) is the copy.
    let moved = dir.join("moved.ext4");
    std::fs::copy(&root, &moved).unwrap();
    let len = std::fs::metadata(&moved).unwrap().len();
    std::fs::OpenOptions::new().write(true).open(&moved).unwrap().set_len(len + (1 << 20)).unwrap();
    let pristine_moved = std::fs::read(&moved).unwrap();
    let patch = serde_json::json!({"drive_id": "rootfs", "path_on_host": moved});
    api(s, "PATCH", "/drives/rootfs", &patch.to_string(), 204);
    let new_size = format!("[vda] new size: {} 512-byte logical blocks", (len + (1 << 20)) / 512);
    assert!(first.wait_for_output(&new_size, Duration::from_secs(30)), "{}", first.stdout());

    // The partition scan and the superblock read: the disk's bytes are in the metrics.
    api(s, "PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#, 204);
    let line = std::fs::read_to_string(&metrics).unwrap();
    let flushed: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert!(flushed["devices"]["virtio-blk0"]["read_bytes"].as_u64().unwrap() > 0, "{flushed}");

    // Snapshot during boot; the first VMM goes away; a new one loads it and boots on.
    let (state, mem) = (dir.join("linux.snap"), dir.join("linux.mem"));
    api(s, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    let snap = serde_json::json!({"snapshot_path": state, "mem_file_path": mem});
    api(s, "PUT", "/snapshot/create", &snap.to_string(), 204);
    api(s, "PUT", "/ferrovisor/stop", "", 204);
    let first = first.finish(BOOT_TIMEOUT);
    assert!(!first.stdout.contains("EXT4-fs (vda): mounted"), "the snapshot came before the root mount");

    restore_and_boot_on(&dir, &state, &mem);
    assert_ne!(std::fs::read(&moved).unwrap(), pristine_moved, "the restored guest mounted the moved disk");
    let _ = std::fs::remove_dir_all(dir);
}

/// The same lifecycle from a Firecracker configuration file (its API socket still serves):
/// the guest's free page reporting hands the host its free memory (prefaulted RAM, so that the
/// RSS shows it), the VM is paused, resumed and snapshotted, and the snapshot boots on to user
/// space in a new process; the metrics file holds the disk's bytes.
#[test]
fn linux_lifecycle_from_a_firecracker_config_file() {
    let guest = linux_guest();
    let dir = common::scratch_dir("linux-config-file");
    let root = dir.join("rootfs.ext4");
    std::fs::copy(guest.join("rootfs.ext4"), &root).unwrap();
    let metrics = dir.join("metrics.json");
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest.join("vmlinux"),
            "boot_args": format!("console=ttyS0 reboot=k panic=-1 {LINUX_HOST_CMDLINE} rootdelay=30"),
        },
        // Linux reports free memory only above its low watermark plus 64 MiB: 256 MiB leaves room.
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 256, "track_dirty_pages": true},
        "drives": [{"drive_id": "rootfs", "path_on_host": root, "is_root_device": true, "is_read_only": true,
                    "io_engine": "Async"}],
        "balloon": {"amount_mib": 0, "deflate_on_oom": true, "free_page_reporting": true},
        "metrics": {"metrics_path": metrics},
        "ferrovisor-memory": {"prefault": true},
    });
    let file = dir.join("vm.json");
    std::fs::write(&file, config.to_string()).unwrap();
    let (mut first, socket) = api_vmm(&dir, "first.sock", &["--config-file", file.to_str().unwrap()]);
    let s = socket.as_path();
    assert!(first.wait_for_output("Waiting 30 sec before mounting root device", BOOT_TIMEOUT), "{}", first.stderr());
    assert!(first.stdout().contains("root=/dev/vda ro"), "the root drive is on the command line");
    // The guest reports its free memory in 2 MiB blocks; the host drops those pages.
    // Generous: the guest's ring 0 is emulated on some hosts, and CI runs other guests beside it.
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    let stats = loop {
        let stats = api(s, "GET", "/ferrovisor/stats", "", 200);
        if stats["balloon"]["released_pages"].as_u64().unwrap_or(0) >= 16384 {
            break stats;
        }
        assert!(std::time::Instant::now() < deadline, "no free page reports: {stats}");
        std::thread::sleep(Duration::from_millis(250));
    };
    eprintln!("free page reporting: {stats}");
    assert!(stats["guest_rss_kib"].as_u64().unwrap() < 192 * 1024, "reported pages left the RSS: {stats}");

    api(s, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    assert_eq!(api(s, "GET", "/", "", 200)["state"], "Paused");
    api(s, "PATCH", "/vm", r#"{"state": "Resumed"}"#, 204);
    let (state, mem) = (dir.join("linux.snap"), dir.join("linux.mem"));
    api(s, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    api(
        s,
        "PUT",
        "/snapshot/create",
        &serde_json::json!({"snapshot_path": state, "mem_file_path": mem}).to_string(),
        204,
    );
    api(s, "PUT", "/ferrovisor/stop", "", 204);
    first.finish(BOOT_TIMEOUT);
    let line = std::fs::read_to_string(&metrics).unwrap();
    let flushed: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert!(flushed["block"]["read_bytes"].as_u64().unwrap() > 0, "{flushed}");

    restore_and_boot_on(&dir, &state, &mem);
    let _ = std::fs::remove_dir_all(dir);
}

/// Linux on a managed network with `cpus` vCPUs, `ip=dhcp`: its lease comes from the
/// network's DHCP server.
fn linux_on_network(lab: &common::NetLab, net: &str, cpus: u32) -> common::Outcome {
    let guest = linux_guest();
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 {LINUX_HOST_CMDLINE} ip=dhcp");
    boot_reaching("Run /init as init process", || {
        let mut cmd = lab.ferrovisor();
        cmd.args(["run", "--kernel", guest.join("vmlinux").to_str().unwrap()])
            .args(["--initrd", guest.join("initramfs.cpio").to_str().unwrap()])
            .args(["--cpus", &cpus.to_string()])
            .args(["--memory", "128", "--net", net, "--cmdline", &cmdline]);
        Running::start(cmd).finish(BOOT_TIMEOUT)
    })
}

#[test]
fn linux_gets_its_address_from_a_nat_networks_dhcp_server() {
    let lab = common::NetLab::new("fvld");
    let out = lab.network(&["create", "lab", "--mode", "nat", "--subnet", "10.85.0.0/24", "--uplink", "vh"]);
    assert!(out.status.success(), "{out:?}");
    // Two vCPUs: the network's TAP gets two queues, and Linux's driver takes both pairs.
    let out = linux_on_network(&lab, "network=lab,mac=02:fc:00:00:00:07", 2);
    let log = out.describe();
    assert!(out.stderr.contains("virtio-net: the driver uses 2 queue pairs"), "{log}");
    assert!(out.stdout.contains("IP-Config: Got DHCP answer from 10.85.0.1, my address is 10.85.0.2"), "{log}");
    assert!(out.stdout.contains("gw=10.85.0.1"), "the router option: {log}");
    // The lease is kept: the same MAC gets the same address next time.
    let leases = std::fs::read_to_string(lab.state.join("networks/lab.leases.json")).unwrap();
    let leases: serde_json::Value = serde_json::from_str(&leases).unwrap();
    let lease = &leases["leases"]["02:fc:00:00:00:07"];
    assert_eq!(lease["ip"], "10.85.0.2", "{leases}");
    // Tied to the guest's bridge port (never 0: that is no port), for an hour.
    assert!(lease["port"].as_u64().is_some_and(|p| p > 0), "{leases}");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    assert!(lease["expires"].as_u64().is_some_and(|e| e > now + 3000 && e <= now + 3600), "{leases}");
    assert_ended_after_init(&out);
}

#[test]
fn linux_on_a_bridge_network_gets_its_address_from_the_uplinks_segment() {
    let lab = common::NetLab::new("fvlb");
    let dir = common::scratch_dir("linux-bridge-network");
    let mut dnsmasq = lab.outside.command("dnsmasq");
    dnsmasq
        .args(["--keep-in-foreground", "--no-resolv", "--no-hosts", "--port=0", "--bind-interfaces"])
        .args(["--interface=vo", "--dhcp-range=192.0.2.50,192.0.2.50,1h"])
        .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
        .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    let _dhcp = common::KillOnDrop(dnsmasq.spawn().expect("dnsmasq starts (apt-get install dnsmasq-base)"));
    let out = lab.network(&["create", "seg", "--mode", "bridge", "--uplink", "vh"]);
    assert!(out.status.success(), "{out:?}");
    let out = linux_on_network(&lab, "network=seg", 1);
    let log = out.describe();
    assert!(out.stdout.contains("IP-Config: Got DHCP answer from 192.0.2.1, my address is 192.0.2.50"), "{log}");
    assert_ended_after_init(&out);
    let _ = std::fs::remove_dir_all(dir);
}

/// Linux on the user-mode network: its DHCP lease comes from the VMM itself, no TAP, no root
/// needed (the test runs as root only to reach /dev/kvm).
#[test]
fn linux_gets_its_address_from_the_user_mode_network() {
    let guest = linux_guest();
    let cmdline = format!("console=ttyS0 reboot=k panic=-1 {LINUX_HOST_CMDLINE} ip=dhcp");
    let mut cmd = ferrovisor();
    cmd.args(["run", "--kernel", guest.join("vmlinux").to_str().unwrap()])
        .args(["--initrd", guest.join("initramfs.cpio").to_str().unwrap()])
        .args(["--memory", "128", "--net", "user", "--cmdline", &cmdline]);
    let out = Running::start(cmd).finish(BOOT_TIMEOUT);
    let log = out.describe();
    assert!(out.stdout.contains("IP-Config: Got DHCP answer from 10.0.2.2, my address is 10.0.2.15"), "{log}");
    assert!(out.stdout.contains("gw=10.0.2.2"), "{log}");
    assert_ended_after_init(&out);
}

/// Linux with a static address on a TAP moves to another VMM, which puts the interface on
/// another TAP, while it waits for a root device that never comes. On the destination its
/// virtio-net driver, which negotiated
/// VIRTIO_NET_F_GUEST_ANNOUNCE, is asked to announce itself: a gratuitous ARP for its address
/// leaves on the TAP, and the driver acknowledges on the control queue. (The VMM's own RARP
/// announcement, another ethertype, goes too.)
#[test]
fn linux_announces_its_address_itself_after_a_migration() {
    const WAITING: &str = "Waiting for root device";
    let guest = linux_guest();
    let dir = common::scratch_dir("linux-announce");
    let (tap, new_tap) = (common::TestTap::new("fvan"), common::TestTap::new("fvam"));
    let mac = [0x02, 0xfc, 0, 0, 0x0a, 0x0f];
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=-1 {LINUX_HOST_CMDLINE} ip=10.0.3.15::10.0.3.1:255.255.255.0::eth0:off \
         root=/dev/vda rootwait"
    );
    let (destination, to) = api_vmm(&dir, "destination.sock", &[]);
    let url = format!("unix:{}", dir.join("migrate.sock").display());
    let receive = serde_json::json!({"receiver_url": url,
        "network_overrides": [{"iface_id": "net0", "host_dev_name": new_tap.name}]});
    api(&to, "PUT", "/ferrovisor/migration/receive", &receive.to_string(), 204);
    let from = dir.join("source.sock");
    let mut cmd = ferrovisor();
    cmd.arg("run")
        .args(["--kernel", guest.join("vmlinux").to_str().unwrap()])
        .args(["--memory", "256", "--cmdline", &cmdline])
        .args(["--net", &format!("tap={},mac=02:fc:00:00:0a:0f", tap.name)])
        .arg("--api-sock")
        .arg(&from);
    let mut source = Running::start(cmd);
    assert!(source.wait_for_output(WAITING, BOOT_TIMEOUT), "{}\n{}", source.stdout(), source.stderr());
    assert!(source.stdout().contains("IP-Config: Complete"), "{}", source.stdout());
    let far_side = common::PacketSocket::bind(&new_tap.name);
    far_side.set_timeout(Duration::from_secs(60));
    api(&from, "PUT", "/ferrovisor/migration/send", &format!(r#"{{"destination_url": "{url}"}}"#), 204);
    let source = source.finish(BOOT_TIMEOUT);
    assert!(source.status.success(), "{}", source.describe());
    // A gratuitous ARP request from the guest: its MAC, and its address as sender and target.
    let arp = far_side.recv_ethertype(0x0806).expect("a gratuitous ARP from the guest on the TAP");
    assert_eq!(&arp[6..12], &mac, "from the guest's MAC");
    assert_eq!(&arp[20..22], &[0, 1], "an ARP request");
    assert_eq!(&arp[28..32], &[10, 0, 3, 15], "the guest's address as sender");
    assert_eq!(&arp[38..42], &[10, 0, 3, 15], "and as target");
    let acknowledged = (0..200).any(|_| {
        std::thread::sleep(Duration::from_millis(100));
        destination.stderr().contains("the driver announced the interface on its new port")
    });
    api(&to, "PUT", "/ferrovisor/stop", "", 204);
    let out = destination.finish(BOOT_TIMEOUT);
    let log = out.describe();
    assert!(acknowledged, "the driver acknowledged on the control queue: {log}");
    assert!(out.stderr.contains("asked the guest to announce 1 interface(s) itself"), "{log}");
    assert!(!out.stdout.contains("Linux version"), "the guest does not boot again: {log}");
    let _ = std::fs::remove_dir_all(dir);
}

/// Linux with a read-write virtio-blk root moves to another VMM early in its boot, while its
/// emulated ring 0 sets itself up: on the destination it finds its disk, mounts the root and
/// goes on, without booting again.
#[test]
fn linux_migrated_during_boot_mounts_its_root_on_the_destination() {
    const MOUNTED: &str = "EXT4-fs (vda): mounted filesystem";
    let guest = linux_guest();
    let dir = common::scratch_dir("linux-migrate");
    let out = boot_reaching(MOUNTED, || {
        let root = dir.join("rootfs.ext4");
        std::fs::copy(guest.join("rootfs.ext4"), &root).unwrap();
        let cmdline = format!("console=ttyS0 reboot=k panic=-1 {LINUX_HOST_CMDLINE} root=/dev/vda rw");
        let (destination, to) = api_vmm(&dir, "destination.sock", &[]);
        let receiver = format!(r#"{{"receiver_url": "unix:{}"}}"#, dir.join("migrate.sock").display());
        api(&to, "PUT", "/ferrovisor/migration/receive", &receiver, 204);
        let from = dir.join("source.sock");
        let mut cmd = ferrovisor();
        cmd.arg("run")
            .args(["--kernel", guest.join("vmlinux").to_str().unwrap()])
            .args(["--memory", "256", "--cmdline", &cmdline])
            .args(["--disk", &format!("path={}", root.display())])
            .arg("--api-sock")
            .arg(&from);
        let mut source = Running::start(cmd);
        assert!(source.wait_for_output("Linux version", BOOT_TIMEOUT), "{}", source.stderr());
        std::thread::sleep(Duration::from_secs(2));
        let send = format!(r#"{{"destination_url": "unix:{}"}}"#, dir.join("migrate.sock").display());
        api(&from, "PUT", "/ferrovisor/migration/send", &send, 204);
        let source = source.finish(BOOT_TIMEOUT);
        assert!(source.status.success(), "{}", source.describe());
        assert!(source.stderr.contains("the VM runs there"), "{}", source.describe());
        assert!(!source.stdout.contains(MOUNTED), "the move came before the mount: {}", source.describe());
        destination.finish(BOOT_TIMEOUT)
    });
    let log = out.describe();
    assert!(!out.stdout.contains("Linux version"), "the guest does not boot again: {log}");
    assert!(out.stderr.contains("migration: the VM runs here"), "{log}");
    assert!(out.stdout.contains("virtio_blk virtio0: [vda]"), "{log}");
    assert_ended_after(&out, MOUNTED);
    let _ = std::fs::remove_dir_all(dir);
}
