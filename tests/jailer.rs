//! The jailer, checked from outside: a jailed probe as an unprivileged user in a network
//! namespace and cgroups the test made, and the launch sequences of Kata Containers (Go
//! runtime and runtime-rs) and firecracker-containerd, run as they run them, with the probe
//! as the guest and its vsock listener as their agent.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{NetNs, api_call, http, mkfifo, probe_elf, scratch_dir, sh};

const TIMEOUT: Duration = Duration::from_secs(60);

fn jailer() -> Command {
    Command::new(env!("CARGO_BIN_EXE_jailer"))
}

/// The VMM installed under the name Kata and firecracker-containerd look for.
fn firecracker_binary(dir: &Path) -> PathBuf {
    let bin = dir.join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let path = bin.join("firecracker");
    std::fs::copy(env!("CARGO_BIN_EXE_ferrovisor"), &path).unwrap();
    path
}

fn alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    unsafe { libc::kill(pid, 0) == 0 }
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill with a pid the test started.
    unsafe { libc::kill(pid, sig) };
}

/// Waits for `pid` (not our child) to go away.
fn wait_gone(pid: i32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "));
        if !alive(pid) || zombie {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// The pid file the jailer writes, read with retries as Kata does (5 s).
fn read_pid_file(path: &Path) -> i32 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(pid) = std::fs::read_to_string(path).ok().and_then(|t| t.trim().parse().ok()) {
            return pid;
        }
        assert!(Instant::now() < deadline, "no pid file at {}", path.display());
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn status_field(pid: i32, key: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .unwrap_or_default()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

fn inode(path: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.dev(), m.ino())
}

/// Nothing of the jail may stay mounted on the host.
fn assert_no_mounts_under(dir: &Path) {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let dir = dir.to_str().unwrap();
    assert!(!mounts.contains(dir), "still mounted under {dir}:\n{mounts}");
}

/// Removes a cgroup the jailer made, once the exited VMM has left it.
fn remove_cgroup(path: &Path) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while let Err(e) = std::fs::remove_dir(path) {
        assert!(Instant::now() < deadline, "cgroup {} stays ({e})", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An echo server on a Unix socket: the probe first connects to the host (port 5000).
fn echo_listener(path: &Path) {
    let listener = UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = stream.read(&mut buf) {
                    if n == 0 || stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// A host connection through the VM's vsock socket at `uds`: `CONNECT port` in the case the
/// caller uses, then the reply line.
fn vsock_connect(uds: &Path, verb: &str, port: u32) -> (UnixStream, String) {
    let mut stream = UnixStream::connect(uds).unwrap_or_else(|e| panic!("{}: {e}", uds.display()));
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(format!("{verb} {port}\n").as_bytes()).unwrap();
    let mut line = String::new();
    let _ = BufReader::new(stream.try_clone().unwrap()).read_line(&mut line);
    (stream, line)
}

/// The agent's handshake, retried for up to 10 s as the runtimes retry it while the agent
/// starts, then bytes echoed by the probe's listener.
fn agent_round_trip(uds: &Path, verb: &str, port: u32) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        let (stream, reply) = vsock_connect(uds, verb, port);
        if reply.starts_with("OK ") {
            break stream;
        }
        assert!(Instant::now() < deadline, "the handshake answered {reply:?}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let message = b"hello from the agent's host side";
    stream.write_all(message).unwrap();
    let mut echoed = vec![0u8; message.len()];
    stream.read_exact(&mut echoed).unwrap();
    assert_eq!(&echoed, message);
}

/// Retries a request until it answers 2xx, as Kata's runtime-rs does (500 x 10 ms).
fn until_2xx(socket: &Path, method: &str, path: &str, body: &str) {
    for _ in 0..500 {
        if UnixStream::connect(socket).is_ok() {
            let (status, answer) = http(socket, method, path, body);
            if (200..300).contains(&status) {
                return;
            }
            if status >= 400 && status != 503 {
                panic!("{method} {path} {body}: {status} {answer}");
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("{method} {path} never answered 2xx");
}

/// A jailed probe as uid/gid 4242 in a network namespace and v1 cgroups the test made.
#[test]
fn a_jailed_probe_runs_unprivileged_in_its_namespace_cgroups_and_chroot() {
    let dir = scratch_dir("jailer-v1");
    let id = format!("fvjail-{}", std::process::id());
    let parent = format!("fvtest-{}", std::process::id());
    let netns = NetNs::new("fvj");
    let root = dir.join("ferrovisor").join(&id).join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::copy(probe_elf(), root.join("probe.elf")).unwrap();
    let mut cmd = jailer();
    cmd.args(["--id", &id, "--exec-file", env!("CARGO_BIN_EXE_ferrovisor"), "--uid", "4242", "--gid", "4242"])
        .arg("--chroot-base-dir")
        .arg(&dir)
        .args(["--netns", &format!("/var/run/netns/{}", netns.name), "--parent-cgroup", &parent])
        .args(["--cgroup", "memory.limit_in_bytes=536870912", "--cgroup", "pids.max=64"])
        .args(["--", "--api-sock", "/run/api.sock"]);
    let mut vm = common::Running::start(cmd);
    let socket = root.join("run/api.sock");
    common::wait_for_socket(&socket);
    let pid = read_pid_file(&root.join("ferrovisor.pid"));
    assert_eq!(pid, vm.child.id() as i32, "without --daemonize the jailer becomes the VMM");
    let boot = serde_json::json!({"kernel_image_path": "/probe.elf", "boot_args": "probe.test=smp probe.idle=on"});
    api_call(&socket, "PUT", "/boot-source", &boot.to_string(), 204);
    api_call(&socket, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    assert!(vm.wait_for_output("PROBE smp ok", TIMEOUT), "{}\n{}", vm.stdout(), vm.stderr());

    // The chroot: the VMM's root is the jail's directory.
    assert_eq!(inode(&PathBuf::from(format!("/proc/{pid}/root"))), inode(&root));
    assert!(Path::new(&format!("/proc/{pid}/root/ferrovisor")).exists());
    assert!(!Path::new(&format!("/proc/{pid}/root/etc")).exists(), "the host's files are out of sight");
    assert_eq!(status_field(pid, "Uid:"), "4242 4242 4242 4242");
    assert_eq!(status_field(pid, "Gid:"), "4242 4242 4242 4242");
    assert_eq!(status_field(pid, "NoNewPrivs:"), "1");
    assert_eq!(status_field(pid, "Seccomp:"), "2");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    for controller in ["memory", "pids"] {
        assert!(cgroups.contains(&format!(":{controller}:/{parent}/{id}\n")), "{cgroups}");
    }
    let memory = format!("/sys/fs/cgroup/memory/{parent}/{id}");
    assert_eq!(std::fs::read_to_string(format!("{memory}/memory.limit_in_bytes")).unwrap().trim(), "536870912");
    assert_eq!(std::fs::read_to_string(format!("/sys/fs/cgroup/pids/{parent}/{id}/pids.max")).unwrap().trim(), "64");
    let ns_link = std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let (_, ns_inode) = inode(Path::new(&format!("/var/run/netns/{}", netns.name)));
    assert_eq!(ns_link.to_str().unwrap(), format!("net:[{ns_inode}]"));

    // An API client cannot write outside the jail.
    api_call(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    let escape = format!("/tmp/fv-escape-{}", std::process::id());
    for (state, mem) in [
        (format!("../../../..{escape}.state"), format!("../../../..{escape}.mem")),
        (format!("{escape}.state"), format!("{escape}.mem")),
    ] {
        let body = serde_json::json!({"snapshot_path": state, "mem_file_path": mem});
        let (status, _) = http(&socket, "PUT", "/snapshot/create", &body.to_string());
        assert_eq!(status, 400);
        assert!(!Path::new(&format!("{escape}.state")).exists() && !Path::new(&format!("{escape}.mem")).exists());
    }

    let out = vm.finish_after_signal(libc::SIGTERM, TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    for controller in ["memory", "pids"] {
        remove_cgroup(&PathBuf::from(format!("/sys/fs/cgroup/{controller}/{parent}/{id}")));
        remove_cgroup(&PathBuf::from(format!("/sys/fs/cgroup/{controller}/{parent}")));
    }
    assert_no_mounts_under(&dir);
    let _ = std::fs::remove_dir_all(dir);
}

/// The cgroup v2 hierarchy, with what this host offers there (hugetlb), and the VMM as PID 1
/// of a new PID namespace.
#[test]
fn the_jailer_uses_the_cgroup_v2_hierarchy_and_a_new_pid_namespace_when_asked() {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    let Some(unified) = mounts.lines().find(|l| l.split_whitespace().nth(2) == Some("cgroup2")) else {
        eprintln!("skipped: this host mounts no cgroup v2 hierarchy");
        return;
    };
    let unified = PathBuf::from(unified.split_whitespace().nth(1).unwrap());
    let controllers = std::fs::read_to_string(unified.join("cgroup.controllers")).unwrap_or_default();
    if !controllers.split_whitespace().any(|c| c == "hugetlb") {
        eprintln!("skipped: the cgroup v2 hierarchy offers no hugetlb controller here ({controllers:?})");
        return;
    }
    let dir = scratch_dir("jailer-v2");
    let id = format!("fvjail2-{}", std::process::id());
    let parent = format!("fvtest2-{}", std::process::id());
    let jailed = jailer()
        .args(["--id", &id, "--exec-file", env!("CARGO_BIN_EXE_ferrovisor"), "--uid", "4242", "--gid", "4242"])
        .arg("--chroot-base-dir")
        .arg(&dir)
        .args(["--cgroup-version", "2", "--parent-cgroup", &parent, "--cgroup", "hugetlb.2MB.max=0"])
        .args(["--new-pid-ns", "--daemonize", "--", "--api-sock", "/run/api.sock"])
        .output()
        .unwrap();
    assert!(jailed.status.success(), "{}", String::from_utf8_lossy(&jailed.stderr));
    let root = dir.join("ferrovisor").join(&id).join("root");
    let pid = read_pid_file(&root.join("ferrovisor.pid"));
    common::wait_for_socket(&root.join("run/api.sock"));
    // PID 1 of its own namespace, seen by its host pid.
    let nspid = status_field(pid, "NSpid:");
    assert_eq!(nspid, format!("{pid} 1"), "NSpid");
    assert_eq!(status_field(pid, "Uid:"), "4242 4242 4242 4242");
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(cgroups.contains(&format!("0::/{parent}/{id}\n")), "{cgroups}");
    let leaf = unified.join(&parent).join(&id);
    assert_eq!(std::fs::read_to_string(leaf.join("hugetlb.2MB.max")).unwrap().trim(), "0");
    signal(pid, libc::SIGTERM);
    assert!(wait_gone(pid, TIMEOUT), "the VMM did not stop on SIGTERM");
    remove_cgroup(&leaf);
    remove_cgroup(&unified.join(&parent));
    assert_no_mounts_under(&dir);
    let _ = std::fs::remove_dir_all(dir);
}

/// Firecracker's metrics keys that Kata looks for.
const FIRECRACKER_METRICS_KEYS: [&str; 17] = [
    "api_server",
    "block",
    "get_api_requests",
    "i8042",
    "latencies_us",
    "logger",
    "mmds",
    "net",
    "patch_api_requests",
    "put_api_requests",
    "rtc",
    "seccomp",
    "vcpu",
    "vmm",
    "uart",
    "signals",
    "vsock",
];

/// Reads a FIFO from its read end (opened first, as Kata does) into a shared string.
fn fifo_reader(path: &Path) -> std::sync::Arc<std::sync::Mutex<String>> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut fifo = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).unwrap();
    let text = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let into = text.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match fifo.read(&mut buf) {
                Ok(n) if n > 0 => into.lock().unwrap().push_str(&String::from_utf8_lossy(&buf[..n])),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    });
    text
}

/// What a Kata runtime prepares before it starts the jailer: the VM's network namespace with
/// its TAP, and the jail's root holding the kernel (the probe) and the root disk, bind-mounted
/// there by Kata and copied here. The agent's host side of the probe's outgoing connection
/// (port 5000) echoes.
struct KataSandbox {
    dir: PathBuf,
    binary: PathBuf,
    base: PathBuf,
    id: String,
    netns: NetNs,
    root: PathBuf,
}

impl KataSandbox {
    fn new(test: &str, base: &str) -> KataSandbox {
        let dir = scratch_dir(test);
        let binary = firecracker_binary(&dir);
        let base = dir.join(base);
        let id = format!("{test}-{}", std::process::id());
        let netns = NetNs::new("fvk");
        sh("ip", &["-n", &netns.name, "tuntap", "add", "tap0_kata", "mode", "tap"]);
        let root = base.join("firecracker").join(&id).join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::copy(probe_elf(), root.join("vmlinux")).unwrap();
        std::fs::write(root.join("rootfs"), vec![0u8; 1 << 20]).unwrap();
        echo_listener(&root.join("kata.hvsock_5000"));
        KataSandbox { dir, binary, base, id, netns, root }
    }

    /// Nothing of the jail stays mounted; the namespace (and its TAP) and the files go.
    fn clean_up(self) {
        assert_no_mounts_under(&self.dir);
        drop(self.netns);
        let _ = std::fs::remove_dir_all(self.dir);
    }
}

/// Kata Containers' Go runtime: jailed, daemonized, in a network namespace, booted from
/// /fcConfig.json, logger and metrics on FIFOs, agent over hybrid vsock, placeholders hot-plugged.
#[test]
fn kata_go_runtime_launch_sequence() {
    let kata = KataSandbox::new("kata-go", "vc");
    let (binary, base, id, root) = (&kata.binary, &kata.base, &kata.id, &kata.root);
    let mut drives = vec![serde_json::json!({"drive_id": "rootfs", "path_on_host": "/rootfs",
                                              "is_root_device": false, "is_read_only": true})];
    for n in 0..8 {
        std::fs::write(root.join(format!("drive_{n}")), b"").unwrap();
        drives.push(serde_json::json!({"drive_id": format!("drive_{n}"), "path_on_host": format!("/drive_{n}"),
                                        "is_root_device": false, "is_read_only": false}));
    }
    mkfifo(&root.join("logs.fifo"));
    mkfifo(&root.join("metrics.fifo"));
    let logs = fifo_reader(&root.join("logs.fifo"));
    let metrics = fifo_reader(&root.join("metrics.fifo"));
    let config = serde_json::json!({
        "boot-source": {"kernel_image_path": "/vmlinux",
            "boot_args": "console=ttyS0 pci=off reboot=k panic=1 iommu=off net.ifnames=0 random.trust_cpu=on \
                          acpi=off probe.test=virtio-vsock probe.virtio-vsock.listen=1024 probe.idle=on"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "smt": false},
        "drives": drives,
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0_kata", "guest_mac": "02:fc:00:00:00:07",
                                "rx_rate_limiter": {}, "tx_rate_limiter": {}}],
        "vsock": {"vsock_id": "root", "guest_cid": 3, "uds_path": "/kata.hvsock"},
        "logger": {"level": "Debug", "log_path": "/logs.fifo"},
        "metrics": {"metrics_path": "/metrics.fifo"},
    });
    std::fs::write(root.join("fcConfig.json"), config.to_string()).unwrap();

    // Kata's version gate: the second field of the first line, a semantic version >= 0.21.1.
    let version = Command::new(binary).arg("--version").output().unwrap();
    let first = String::from_utf8_lossy(&version.stdout).lines().next().unwrap_or_default().to_string();
    let semver: Vec<u64> = first
        .split(' ')
        .nth(1)
        .unwrap_or_default()
        .trim_start_matches('v')
        .split('.')
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(semver.len() == 3 && semver >= vec![0, 21, 1], "{first}");

    let jailed = jailer()
        .args(["--id", id, "--exec-file", binary.to_str().unwrap(), "--uid", "0", "--gid", "0"])
        .arg("--chroot-base-dir")
        .arg(base)
        .args(["--daemonize", "--netns", &format!("/var/run/netns/{}", kata.netns.name)])
        .args(["--", "--config-file", "/fcConfig.json"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(jailed.status.success(), "{}", String::from_utf8_lossy(&jailed.stderr));
    let pid = read_pid_file(&root.join("firecracker.pid"));
    let socket = root.join("run/firecracker.socket");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if UnixStream::connect(&socket).is_ok() && http(&socket, "GET", "/", "").1.contains("\"Running\"") {
            break;
        }
        assert!(Instant::now() < deadline, "not Running within 10 s; log: {}", logs.lock().unwrap());
        std::thread::sleep(Duration::from_millis(10));
    }
    // The vsock socket exists right after boot, and Kata restricts it.
    let hvsock = root.join("kata.hvsock");
    std::fs::set_permissions(&hvsock, std::os::unix::fs::PermissionsExt::from_mode(0o640)).unwrap();
    let threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| std::fs::read_to_string(t.path().join("comm")).unwrap_or_default().trim().to_string())
        .collect();
    assert!(threads.iter().any(|t| t == "fc_vcpu 0"), "{threads:?}");
    agent_round_trip(&hvsock, "CONNECT", 1024);
    // A placeholder swapped for a real disk.
    std::fs::write(root.join("hotplug.img"), vec![0u8; 2 << 20]).unwrap();
    api_call(&socket, "PATCH", "/drives/drive_0", r#"{"drive_id": "drive_0", "path_on_host": "/hotplug.img"}"#, 204);
    api_call(&socket, "PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#, 204);
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        if let Some(line) = metrics.lock().unwrap().lines().last() {
            break line.to_string();
        }
        assert!(Instant::now() < deadline, "no metrics line");
        std::thread::sleep(Duration::from_millis(20));
    };
    let value: serde_json::Value = serde_json::from_str(&line).unwrap();
    for key in FIRECRACKER_METRICS_KEYS {
        assert!(value.get(key).is_some(), "metrics lack {key}: {line}");
    }
    assert!(logs.lock().unwrap().contains("virtio-vsock"), "{}", logs.lock().unwrap());

    // Kata stops the VM with SIGTERM, then SIGKILL after 15 s.
    signal(pid, libc::SIGTERM);
    if !wait_gone(pid, Duration::from_secs(15)) {
        signal(pid, libc::SIGKILL);
    }
    assert!(wait_gone(pid, Duration::from_secs(5)), "the VMM outlived SIGKILL");
    kata.clean_up();
}

/// Kata Containers' runtime-rs: jailed without --daemonize inside the netns it joined, every
/// request retried until 2xx, a second PUT /vsock replacing the first, the agent's lower-case
/// handshake, and SIGKILL at the end.
#[test]
fn kata_runtime_rs_launch_sequence() {
    let kata = KataSandbox::new("kata-rs", "kata");
    let root = &kata.root;
    for n in 1..=5 {
        std::fs::write(root.join(format!("drive{n}")), b"").unwrap();
    }
    let mut cmd = kata.netns.command(env!("CARGO_BIN_EXE_jailer"));
    cmd.args(["--id", &kata.id, "--gid", "0", "--uid", "0", "--exec-file", kata.binary.to_str().unwrap()])
        .arg("--chroot-base-dir")
        .arg(&kata.base)
        .args(["--", "--api-sock", "/run//fc.sock"]);
    let mut vm = common::Running::start(cmd);
    let socket = root.join("run/fc.sock");
    let boot = serde_json::json!({"kernel_image_path": "/vmlinux",
        "boot_args": "console=ttyS0 reboot=k panic=1 probe.test=virtio-vsock probe.virtio-vsock.listen=1024 probe.idle=on"});
    until_2xx(&socket, "PUT", "/boot-source", &boot.to_string());
    until_2xx(&socket, "PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 128, "smt": false}"#);
    until_2xx(
        &socket,
        "PUT",
        "/drives/rootfs",
        r#"{"drive_id": "rootfs", "path_on_host": "/rootfs", "is_root_device": false, "is_read_only": true}"#,
    );
    for n in 1..=5 {
        let drive = serde_json::json!({"drive_id": format!("drive{n}"), "path_on_host": format!("/drive{n}"),
                                       "is_root_device": false, "is_read_only": false});
        until_2xx(&socket, "PUT", &format!("/drives/drive{n}"), &drive.to_string());
    }
    until_2xx(&socket, "PUT", "/vsock", r#"{"guest_cid": 3, "uds_path": "kata.hvsock", "vsock_id": "root"}"#);
    until_2xx(
        &socket,
        "PUT",
        "/network-interfaces/eth0",
        r#"{"iface_id": "eth0", "guest_mac": null, "host_dev_name": "tap0_kata"}"#,
    );
    until_2xx(&socket, "PUT", "/vsock", r#"{"guest_cid": 4, "uds_path": "kata.hvsock", "vsock_id": "root"}"#);
    until_2xx(&socket, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#);
    assert!(vm.wait_for_output("PROBE virtio-vsock listening", TIMEOUT), "{}\n{}", vm.stdout(), vm.stderr());
    let config = api_call(&socket, "GET", "/vm/config", "", 200);
    assert!(config.contains("\"guest_cid\":4"), "the second PUT /vsock replaced the first: {config}");
    agent_round_trip(&root.join("kata.hvsock"), "connect", 1024);
    assert!(vm.wait_for_output("PROBE virtio-vsock ok cid=4", TIMEOUT), "{}", vm.stdout());
    // runtime-rs stops the VM with SIGKILL; the end of its stderr says it stopped.
    signal(vm.child.id() as i32, libc::SIGKILL);
    let out = vm.finish(TIMEOUT);
    assert_eq!(out.status.code(), None, "killed: {}", out.describe());
    kata.clean_up();
}

/// firecracker-containerd: no jailer, a relative API socket, the logger and metrics first,
/// drives with partuuid, rate limiters and cache types, vsock with guest_cid 0, pause and
/// resume, a stub drive swapped, the balloon; a refused host connection closed promptly; the
/// VMM exits when the guest reboots.
#[test]
fn firecracker_containerd_launch_sequence() {
    let dir = scratch_dir("fc-containerd");
    let binary = firecracker_binary(&dir);
    let tap = common::TestTap::new("fvfcc");
    let vm_id = format!("fcc-{}", std::process::id());
    std::fs::copy(probe_elf(), dir.join("kernel-image")).unwrap();
    std::fs::write(dir.join("root.img"), vec![0u8; 1 << 20]).unwrap();
    std::fs::write(dir.join("stub0"), vec![0u8; 512]).unwrap();
    std::fs::write(dir.join("container.img"), vec![0u8; 1 << 20]).unwrap();
    mkfifo(&dir.join("fc-logs.fifo"));
    mkfifo(&dir.join("fc-metrics.fifo"));
    let logs = fifo_reader(&dir.join("fc-logs.fifo"));
    let _metrics = fifo_reader(&dir.join("fc-metrics.fifo"));
    echo_listener(&dir.join("firecracker.vsock_5000"));
    let mut cmd = Command::new(&binary);
    cmd.current_dir(&dir).args(["--api-sock", "firecracker.sock", "--id", &vm_id]);
    let mut vm = common::Running::start(cmd);
    let socket = dir.join("firecracker.sock");
    common::wait_for_socket(&socket);
    until_2xx(&socket, "GET", "/machine-config", "");
    let rate = serde_json::json!({"bandwidth": {"size": 1 << 30, "refill_time": 1000}, "ops": {"size": 100000, "refill_time": 1000}});
    let steps: Vec<(&str, String, serde_json::Value)> = vec![
        (
            "PUT",
            "/logger".into(),
            serde_json::json!({"log_path": "fc-logs.fifo", "level": "Debug", "show_level": true, "show_log_origin": false}),
        ),
        ("PUT", "/metrics".into(), serde_json::json!({"metrics_path": "fc-metrics.fifo"})),
        ("PUT", "/machine-config".into(), serde_json::json!({"vcpu_count": 1, "mem_size_mib": 128, "smt": false})),
        (
            "PUT",
            "/boot-source".into(),
            serde_json::json!({"kernel_image_path": "kernel-image",
            "boot_args": "console=ttyS0 reboot=k panic=1 probe.test=virtio-vsock probe.virtio-vsock.listen=10789"}),
        ),
        (
            "PUT",
            "/drives/root_drive".into(),
            serde_json::json!({"drive_id": "root_drive", "path_on_host": "root.img",
            "is_root_device": true, "is_read_only": false, "partuuid": "0eaa91a0-01", "rate_limiter": rate, "cache_type": "Unsafe"}),
        ),
        (
            "PUT",
            "/drives/stub0".into(),
            serde_json::json!({"drive_id": "stub0", "path_on_host": "stub0",
            "is_root_device": false, "is_read_only": false, "rate_limiter": null, "cache_type": "Writeback"}),
        ),
        (
            "PUT",
            format!("/network-interfaces/{}", "1"),
            serde_json::json!({"iface_id": "1", "host_dev_name": tap.name,
            "guest_mac": "02:fc:00:00:00:11", "rx_rate_limiter": {}, "tx_rate_limiter": null}),
        ),
        (
            "PUT",
            "/vsock".into(),
            serde_json::json!({"vsock_id": "agent_api", "guest_cid": 0, "uds_path": "firecracker.vsock"}),
        ),
        (
            "PUT",
            "/balloon".into(),
            serde_json::json!({"amount_mib": 0, "deflate_on_oom": true, "stats_polling_interval_s": 1}),
        ),
        ("PUT", "/actions".into(), serde_json::json!({"action_type": "InstanceStart"})),
    ];
    for (method, path, body) in &steps {
        let expected = if method == &"GET" { 200 } else { 204 };
        api_call(&socket, method, path, &body.to_string(), expected);
    }
    assert!(vm.wait_for_output("PROBE virtio-vsock listening port=10789", TIMEOUT), "{}\n{}", vm.stdout(), vm.stderr());
    api_call(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    assert!(api_call(&socket, "GET", "/", "", 200).contains("\"Paused\""));
    api_call(&socket, "PATCH", "/vm", r#"{"state": "Resumed"}"#, 204);
    assert!(api_call(&socket, "GET", "/", "", 200).contains("\"Running\""));
    api_call(&socket, "PATCH", "/drives/stub0", r#"{"drive_id": "stub0", "path_on_host": "container.img"}"#, 204);
    api_call(&socket, "PATCH", "/balloon", r#"{"amount_mib": 0}"#, 204);
    api_call(&socket, "GET", "/balloon/statistics", "", 200);

    // A port the guest does not listen on: the guest refuses and the host side is closed
    // promptly, so that the client retries.
    let started = Instant::now();
    let (mut refused, reply) = vsock_connect(&dir.join("firecracker.vsock"), "CONNECT", 10790);
    assert!(!reply.starts_with("OK"), "{reply}");
    let mut rest = Vec::new();
    let _ = refused.read_to_end(&mut rest);
    assert!(started.elapsed() < Duration::from_secs(1), "the refused connection took {:?} to close", started.elapsed());
    // The agent's port, retried until it answers OK within a second, as firecracker-containerd does.
    agent_round_trip(&dir.join("firecracker.vsock"), "CONNECT", 10789);
    // The guest reboots when its tests are done (reboot=k), and the VMM exits with it.
    let out = vm.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    assert!(out.stdout.contains("PROBE virtio-vsock ok cid=0"), "{}", out.describe());
    assert!(logs.lock().unwrap().contains("INFO") || logs.lock().unwrap().contains("DEBUG"));
    let _ = std::fs::remove_dir_all(dir);
}
