//! The sandbox inside the VMM: every thread under its seccomp filter, a forbidden system call
//! reported and fatal, and paths from API clients checked for what they must be.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Running, api_call, ferrovisor, http, mkfifo, probe_command, scratch_dir, wait_for_socket};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Each thread of process `pid`: (name, `Seccomp:` mode, `NoNewPrivs:`).
fn threads(pid: u32) -> Vec<(String, String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default().trim().to_string();
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |key: &str| {
            status.lines().find_map(|l| l.strip_prefix(key)).map(|v| v.trim().to_string()).unwrap_or_default()
        };
        out.push((name, field("Seccomp:"), field("NoNewPrivs:")));
    }
    out
}

/// A probe with every kind of device, counting on its disk once its other tests ran (so that
/// the disk's worker runs).
fn busy_probe(dir: &Path, extra: &[&str]) -> (Running, std::path::PathBuf) {
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let socket = dir.join("api.sock");
    let mut cmd = probe_command(
        2,
        "probe.test=smp,virtio-rng,virtio-console,virtio-net,virtio-balloon,virtio-blk probe.virtio-blk.mode=counter \
         probe.virtio-net.tx=1 probe.virtio-net.rx=0",
    );
    cmd.args(extra)
        .args(["--disk", &format!("path={}", disk.display()), "--rng", "--net", "user"])
        .args(["--console", &format!("file:{}", dir.join("hvc0.log").display())])
        .args(["--balloon", "size=4", "--vsock", &format!("cid=3,uds={}", dir.join("v.sock").display())])
        .arg("--api-sock")
        .arg(&socket);
    let mut vm = Running::start(cmd);
    assert!(vm.wait_for_output("PROBE tick n=2", TIMEOUT), "{}\n{}", vm.stdout(), vm.stderr());
    (vm, socket)
}

#[test]
fn every_thread_of_a_running_vmm_is_under_a_seccomp_filter() {
    let dir = scratch_dir("sandbox-threads");
    let (vm, socket) = busy_probe(&dir, &[]);
    for test in ["smp", "virtio-rng", "virtio-console", "virtio-net", "virtio-balloon"] {
        assert!(vm.stdout().contains(&format!("PROBE {test} ok")), "{}", vm.stdout());
    }
    let all = threads(vm.child.id());
    let names: Vec<&str> = all.iter().map(|(n, _, _)| n.as_str()).collect();
    for expected in ["fc_vcpu 0", "fc_vcpu 1", "api", "launcher", "virtio-blk", "virtio-balloon", "usernet"] {
        assert!(names.contains(&expected), "no {expected} thread among {names:?}");
    }
    for (name, seccomp, no_new_privs) in &all {
        assert_eq!(seccomp, "2", "thread {name} runs without a seccomp filter: {all:?}");
        assert_eq!(no_new_privs, "1", "thread {name}");
    }
    // The API socket is the VMM user's alone.
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&socket).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    // The VMM keeps serving under its filters: a snapshot of the running VM.
    api_call(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    let snap = serde_json::json!({"snapshot_path": dir.join("s.state"), "mem_file_path": dir.join("s.mem")});
    api_call(&socket, "PUT", "/snapshot/create", &snap.to_string(), 204);
    api_call(&socket, "PATCH", "/vm", r#"{"state": "Resumed"}"#, 204);
    assert!(std::fs::metadata(dir.join("s.mem")).unwrap().len() > 0);
    let out = vm.finish_after_signal(libc::SIGTERM, TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    assert!(!out.stderr.contains("seccomp"), "{}", out.describe());

    let (vm, _) = busy_probe(&scratch_dir("sandbox-threads-off"), &["--no-seccomp"]);
    for (name, seccomp, _) in threads(vm.child.id()) {
        assert_eq!(seccomp, "0", "thread {name} is filtered despite --no-seccomp");
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Runs the probe's virtio-blk test under `filters` (a filter file's text).
fn probe_under_filters(dir: &Path, filters: &str) -> common::Outcome {
    let file = dir.join("filters.json");
    std::fs::write(&file, filters).unwrap();
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let mut cmd = ferrovisor();
    cmd.arg("--seccomp-filter").arg(&file);
    cmd.args(["run", "--kernel", common::probe_elf(), "--memory", "64", "--cmdline", "probe.test=virtio-blk"])
        .args(["--disk", &format!("path={}", disk.display())]);
    Running::start(cmd).finish(TIMEOUT)
}

#[test]
fn a_forbidden_system_call_stops_the_vmm_with_status_148_and_names_it() {
    let dir = scratch_dir("sandbox-violation");
    // A device worker that may not read or write its disk.
    let out = probe_under_filters(
        &dir,
        r#"{"virtio-blk": {"default_action": "allow", "filter_action": "trap",
            "filter": [{"syscall": "preadv"}, {"syscall": "pwritev"}]}}"#,
    );
    assert_eq!(out.status.code(), Some(148), "{}", out.describe());
    let line = out.stderr.lines().find(|l| l.contains("seccomp:")).unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(line.contains("thread 'virtio-blk' (virtio-blk filter) made system call"), "{line}");
    assert!(line.contains("(pwritev)") || line.contains("(preadv)"), "{line}");
    assert!(!out.stdout.contains("PROBE virtio-blk ok"), "{}", out.describe());

    // A vCPU that may not run.
    let out = probe_under_filters(
        &dir,
        r#"{"vcpu": {"default_action": "allow", "filter_action": "trap", "filter": [{"syscall": "ioctl",
            "args": [{"index": 1, "type": "dword", "op": "eq", "val": 44672, "comment": "KVM_RUN"}]}]}}"#,
    );
    assert_eq!(out.status.code(), Some(148), "{}", out.describe());
    assert!(
        out.stderr.contains(
            "thread 'fc_vcpu 0' (vcpu filter) made system call 16 (ioctl) with request 0xae80 (KVM_RUN), which its \
             filter forbids; the VMM exits with status 148."
        ),
        "{}",
        out.describe()
    );

    // A filter file for a thread Ferrovisor does not have is a usage error.
    let out =
        probe_under_filters(&dir, r#"{"vmmm": {"default_action": "allow", "filter_action": "trap", "filter": []}}"#);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("has a filter for 'vmmm', which is no Ferrovisor thread"), "{}", out.describe());
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_logger_or_metrics_fifo_without_a_reader_never_blocks_the_api() {
    let dir = scratch_dir("sandbox-fifo");
    let (_vm, socket) = common::api_vmm(&dir, "api.sock", &[]);
    let (logs, metrics) = (dir.join("logs.fifo"), dir.join("metrics.fifo"));
    mkfifo(&logs);
    mkfifo(&metrics);
    let logger = serde_json::json!({"log_path": logs, "level": "Debug"});
    api_call(&socket, "PUT", "/logger", &logger.to_string(), 204);
    api_call(&socket, "PUT", "/metrics", &serde_json::json!({"metrics_path": metrics}).to_string(), 204);
    // Every bad request logs a line: far more than a pipe holds (64 KiB), and nobody reads.
    let started = Instant::now();
    for _ in 0..600 {
        api_call(
            &socket,
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": "many, many vCPUs, more than a pipe holds"}"#,
            400,
        );
        api_call(&socket, "PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#, 204);
    }
    assert!(started.elapsed() < TIMEOUT);
    assert!(api_call(&socket, "GET", "/", "", 200).contains("Not started"));
    // What could not be written was counted, not waited for.
    let metrics: serde_json::Value =
        serde_json::from_str(&api_call(&socket, "GET", "/ferrovisor/metrics", "", 200)).unwrap();
    assert!(metrics["logger"]["missed_metrics_count"].as_u64().unwrap() > 0, "{metrics}");
    assert!(metrics["logger"]["missed_log_count"].as_u64().unwrap() > 0, "{metrics}");
    // Not a file or FIFO: refused, and nothing was opened.
    let answer = api_call(&socket, "PUT", "/logger", r#"{"log_path": "/dev/null"}"#, 400);
    assert!(answer.contains("is a character device; give a regular file or a FIFO"), "{answer}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn api_paths_are_checked_for_what_they_must_be() {
    let dir = scratch_dir("sandbox-paths");
    let keep = dir.join("precious.txt");
    std::fs::write(&keep, b"keep me").unwrap();
    let (_vm, socket) = common::api_vmm(&dir, "api.sock", &[]);
    // uds_path naming a regular file: refused, not deleted.
    let vsock = serde_json::json!({"guest_cid": 3, "uds_path": keep});
    let answer = api_call(&socket, "PUT", "/vsock", &vsock.to_string(), 400);
    assert!(answer.contains("is a regular file, not a socket"), "{answer}");
    assert_eq!(std::fs::read(&keep).unwrap(), b"keep me");
    // The command line is held to the same rule.
    let out = common::run(
        &["run", "--kernel", common::probe_elf(), "--vsock", &format!("cid=3,uds={}", keep.display())],
        TIMEOUT,
    );
    assert!(!out.status.success(), "{}", out.describe());
    assert!(out.stderr.contains("is a regular file, not a socket"), "{}", out.describe());
    assert_eq!(std::fs::read(&keep).unwrap(), b"keep me");

    // A drive that is neither a file nor a block device.
    let drive = serde_json::json!({"drive_id": "rootfs", "path_on_host": "/dev/null", "is_root_device": true,
                                   "is_read_only": false});
    let answer = api_call(&socket, "PUT", "/drives/rootfs", &drive.to_string(), 400);
    assert!(answer.contains("is a character device; give a disk image file or a block device"), "{answer}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn snapshot_files_overwrite_only_regular_files() {
    let dir = scratch_dir("sandbox-snapshot-paths");
    let socket = dir.join("api.sock");
    let mut cmd = probe_command(1, "probe.test=smp probe.idle=on");
    cmd.arg("--api-sock").arg(&socket);
    let mut vm = Running::start(cmd);
    assert!(vm.wait_for_output("PROBE done", TIMEOUT), "{}", vm.stderr());
    wait_for_socket(&socket);
    api_call(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    let fifo = dir.join("state.fifo");
    mkfifo(&fifo);
    let target = dir.join("target.txt");
    std::fs::write(&target, b"keep me").unwrap();
    let link = dir.join("link");
    std::os::unix::fs::symlink(&target, &link).unwrap();
    for (state, mem, what) in [
        (fifo.clone(), dir.join("m1"), "snapshot_path"),
        (dir.join("s2"), link.clone(), "mem_file_path"),
        (dir.clone(), dir.join("m3"), "snapshot_path"),
    ] {
        let body = serde_json::json!({"snapshot_path": state, "mem_file_path": mem});
        let (status, answer) = http(&socket, "PUT", "/snapshot/create", &body.to_string());
        assert_eq!(status, 400, "{body}: {answer}");
        assert!(answer.contains(what) && answer.contains("give a new path or a regular file"), "{answer}");
    }
    assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    let _ = std::fs::remove_dir_all(dir);
}
