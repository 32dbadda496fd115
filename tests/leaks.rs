//! One process runs 200 probe VMs one after another, each configured and started through the
//! API as a Firecracker client would, under the default seccomp filters. A VM that leaves a
//! thread, an fd or memory behind shows up as growth over the 200.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::channel;
use std::time::{Duration, Instant};

use common::{http, probe_elf, scratch_dir};
use vmm::controller::Controller;
use vmm::exit::ExitLatch;

const VMS: u64 = 200;
const WARM_UP: u64 = 5;
/// Allocator caches and the like; a leak of 64 KiB per VM would show 12.5 MiB.
const RSS_MARGIN_KIB: u64 = 4 << 10;
const DISK_BYTES: usize = 1 << 20;

/// This process's open fds, threads and resident memory (KiB).
fn usage() -> (usize, usize, u64) {
    let fds = std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd").count();
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("{name} in {status}"));
        line.split_whitespace().nth(1).and_then(|v| v.parse().ok()).expect("a number")
    };
    (fds, field("Threads:") as usize, field("VmRSS:"))
}

fn put(socket: &Path, path: &str, body: serde_json::Value) {
    let (status, answer) = http(socket, "PUT", path, &body.to_string());
    assert_eq!(status, 204, "PUT {path}: {answer}");
}

/// Configures and starts one VM through its API socket, as a Firecracker client does, and
/// waits until the probe has run its tests and reset the VM.
fn run_vm(dir: &Path, n: u64, tap: Option<&str>) {
    let socket = dir.join("api.sock");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; DISK_BYTES]).unwrap();
    let latch = Arc::new(ExitLatch::new().expect("an eventfd"));
    let (calls, received) = channel();
    let poke = latch.clone();
    let server = api::Server::spawn(&socket, calls, Box::new(move || poke.poke())).expect("the API listens");
    // The VMM's main thread: it goes under the vmm filter once the VM is built.
    let main = std::thread::spawn(move || {
        let kvm = vmm::vm::open_kvm().expect("/dev/kvm opens");
        Controller::new(kvm, Instant::now(), latch).run(Some(received))
    });

    let seed = 100 + n;
    let tests = format!(
        "console=ttyS0 probe.test=virtio-rng,virtio-blk probe.virtio-blk.start=8 probe.virtio-blk.sectors=100 \
         probe.virtio-blk.seed={seed}"
    );
    put(&socket, "/boot-source", serde_json::json!({"kernel_image_path": probe_elf(), "boot_args": tests}));
    put(&socket, "/machine-config", serde_json::json!({"vcpu_count": 1, "mem_size_mib": 32}));
    put(
        &socket,
        "/drives/disk",
        serde_json::json!({"drive_id": "disk", "path_on_host": disk, "is_root_device": false, "is_read_only": false}),
    );
    put(&socket, "/entropy", serde_json::json!({}));
    put(&socket, "/vsock", serde_json::json!({"guest_cid": 3, "uds_path": dir.join("v.sock")}));
    put(
        &socket,
        "/balloon",
        serde_json::json!({"amount_mib": 0, "deflate_on_oom": false, "stats_polling_interval_s": 1}),
    );
    if let Some(tap) = tap {
        put(&socket, "/network-interfaces/eth0", serde_json::json!({"iface_id": "eth0", "host_dev_name": tap}));
    }
    put(&socket, "/actions", serde_json::json!({"action_type": "InstanceStart"}));
    let (status, info) = http(&socket, "GET", "/", "");
    assert_eq!(status, 200, "{info}");

    let exit = main.join().expect("the VMM's main thread");
    assert_eq!(exit.exit_code(), 0, "VM {n}: {exit}");
    drop(server);
    // The probe wrote its pattern through the VM's virtio-blk: the VM really ran.
    common::check_blk_pattern(&std::fs::read(&disk).unwrap(), seed, 8, 100);
}

#[test]
fn two_hundred_vms_in_one_process_leave_nothing_behind() {
    sandbox::init(&sandbox::Policy::Default).expect("the default filters");
    let dir = scratch_dir("leaks");
    // SAFETY: geteuid has no preconditions.
    let tap = (unsafe { libc::geteuid() } == 0).then(|| format!("fvleak{}", std::process::id() % 10000));
    if tap.is_none() {
        eprintln!("skipping the network interface: creating a TAP needs root");
    }
    for n in 0..WARM_UP {
        run_vm(&dir, n, tap.as_deref());
    }
    let before = usage();
    let started = Instant::now();
    for n in WARM_UP..WARM_UP + VMS {
        run_vm(&dir, n, tap.as_deref());
    }
    let elapsed = started.elapsed();
    // Connection threads end once their client has closed: give them a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut after = usage();
    while (after.0 != before.0 || after.1 != before.1) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = usage();
    }
    eprintln!(
        "{VMS} VMs in {elapsed:.1?}: fds {} -> {}, threads {} -> {}, RSS {} -> {} KiB",
        before.0, after.0, before.1, after.1, before.2, after.2
    );
    assert_eq!(after.0, before.0, "fds left behind");
    assert_eq!(after.1, before.1, "threads left behind");
    assert!(after.2 <= before.2 + RSS_MARGIN_KIB, "RSS grew by {} KiB", after.2 - before.2);
    let _ = std::fs::remove_dir_all(&dir);
}
