//! The REST API on its Unix socket, driven by a plain HTTP client: bad input answered with the
//! right 4xx and a fault_message, a probe guest's lifecycle (start, pause, resume, metrics,
//! stop), the config file, and `ferrovisor ctl`.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{
    Running, api_call as expect, ferrovisor, http, probe_elf, probe_result, probe_ticks, scratch_dir, wait_for_socket,
};

const TIMEOUT: Duration = Duration::from_secs(60);

/// `ferrovisor --api-sock DIR/api.sock`, listening.
fn api_vmm(dir: &Path) -> (Running, PathBuf) {
    common::api_vmm(dir, "api.sock", &[])
}

/// The fault_message of an error answer; it must be one sentence that names a fix.
fn fault(socket: &Path, method: &str, path: &str, body: &str, status: u16) -> String {
    let answer = expect(socket, method, path, body, status);
    let value: serde_json::Value = serde_json::from_str(&answer).unwrap_or_else(|e| panic!("{answer}: {e}"));
    let message = value["fault_message"].as_str().unwrap_or_else(|| panic!("no fault_message in {answer}"));
    assert!(message.ends_with('.'), "a sentence: {message}");
    message.to_string()
}

fn disk_image(dir: &Path, bytes: usize) -> PathBuf {
    let path = dir.join("disk.img");
    std::fs::write(&path, vec![0u8; bytes]).unwrap();
    path
}

/// Configures the probe counting on a disk, through the API.
fn configure_counter_probe(socket: &Path, disk: &Path, extra_cmdline: &str) {
    let boot = serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": format!("console=ttyS0 probe.test=virtio-blk probe.virtio-blk.mode=counter {extra_cmdline}"),
    });
    expect(socket, "PUT", "/boot-source", &boot.to_string(), 204);
    expect(socket, "PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 64}"#, 204);
    let drive = serde_json::json!({"drive_id": "counter", "path_on_host": disk, "is_root_device": false});
    expect(socket, "PUT", "/drives/counter", &drive.to_string(), 204);
}

fn wait_for_ticks(vm: &mut Running, at_least: usize) -> Vec<u64> {
    common::wait_for_ticks(vm, at_least, TIMEOUT)
}

#[test]
fn bad_input_gets_the_right_4xx_and_the_vmm_keeps_running() {
    let dir = scratch_dir("api-bad-input");
    let (mut vm, socket) = api_vmm(&dir);
    let s = socket.as_path();
    let m = fault(s, "PUT", "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 64"#, 400);
    assert!(m.contains("not valid JSON"), "{m}");
    let m = fault(s, "PUT", "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 64, "cpus": 1}"#, 400);
    assert!(m.contains("unknown field `cpus`") && m.contains("remove it"), "{m}");
    let m = fault(s, "PUT", "/machine-config", r#"{"vcpu_count": "two", "mem_size_mib": 64}"#, 400);
    assert!(m.contains("vcpu_count") && m.contains("expected u8"), "{m}");
    let m = fault(s, "PUT", "/boot-source", r#"{"boot_args": "console=ttyS0"}"#, 400);
    assert!(m.contains("missing field `kernel_image_path`"), "{m}");
    let m = fault(s, "PUT", "/boot-source", r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#, 400);
    assert!(m.contains("kernel_image_path /nonexistent/vmlinux cannot be read"), "{m}");
    let m = fault(s, "PUT", "/machine-config", r#"{"vcpu_count": 0, "mem_size_mib": 64}"#, 400);
    assert!(m.contains("vcpu_count 0 is out of range"), "{m}");
    let m = fault(s, "GET", "/no/such/path", "", 404);
    assert!(m.contains("/no/such/path"), "{m}");
    let m = fault(s, "DELETE", "/drives/root", "", 405);
    assert!(m.contains("does not take DELETE"), "{m}");
    let m = fault(s, "PUT", "/actions", r#"{"action_type": "Reboot"}"#, 400);
    assert!(m.contains("action_type") && m.contains("InstanceStart"), "{m}");
    // Actions out of order.
    let m = fault(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 400);
    assert!(m.contains("PUT /boot-source"), "{m}");
    let m = fault(s, "PATCH", "/vm", r#"{"state": "Paused"}"#, 400);
    assert!(m.contains("needs a running VM"), "{m}");
    let m = fault(s, "PATCH", "/balloon", r#"{"amount_mib": 1}"#, 400);
    assert!(m.contains("needs a running VM"), "{m}");
    // A body over 64 KiB.
    let big = format!(r#"{{"boot_args": "{}"}}"#, "x".repeat(70 << 10));
    let m = fault(s, "PUT", "/boot-source", &big, 413);
    assert!(m.contains("at most 65536"), "{m}");
    // Not HTTP at all.
    {
        use std::io::{Read, Write};
        let mut raw = std::os::unix::net::UnixStream::connect(s).unwrap();
        raw.write_all(b"\x01\x02 garbage\r\n\r\n").unwrap();
        let mut answer = String::new();
        raw.read_to_string(&mut answer).unwrap();
        assert_eq!(common::parse_http_response(&answer).0, 400, "{answer}");
    }
    // 100 concurrent requests, half good and half bad: each gets its own right answer.
    let answers: Vec<(u16, u16, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..100)
            .map(|i| {
                scope.spawn(move || {
                    if i % 2 == 0 {
                        let (code, body) = http(s, "GET", "/", "");
                        (200, code, body)
                    } else {
                        let (code, body) = http(s, "PUT", "/machine-config", r#"{"vcpu_count": -1}"#);
                        (400, code, body)
                    }
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for (want, got, body) in &answers {
        assert_eq!(want, got, "{body}");
        if *want == 200 {
            assert!(body.contains(r#""state":"Not started""#), "{body}");
        } else {
            assert!(body.contains("vcpu_count"), "{body}");
        }
    }
    // Post-boot rules, with a probe running.
    let disk = disk_image(&dir, 64 << 10);
    configure_counter_probe(s, &disk, "");
    expect(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    wait_for_ticks(&mut vm, 1);
    let m = fault(
        s,
        "PUT",
        "/drives/late",
        &format!(r#"{{"drive_id":"late","path_on_host":"{}","is_root_device":false}}"#, disk.display()),
        400,
    );
    assert!(m.contains("only possible before InstanceStart"), "{m}");
    let m = fault(s, "PUT", "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 64}"#, 400);
    assert!(m.contains("only possible before InstanceStart"), "{m}");
    let m = fault(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 400);
    assert!(m.contains("already"), "{m}");
    let m = fault(s, "GET", "/balloon/statistics", "", 400);
    assert!(m.contains("no balloon"), "{m}");
    assert!(expect(s, "GET", "/", "", 200).contains(r#""state":"Running""#));
    // Every error was also logged.
    assert!(vm.stderr().contains("API error 413"), "{}", vm.stderr());
    assert!(matches!(vm.child.try_wait(), Ok(None)), "the VMM is still running");
    expect(s, "PUT", "/ferrovisor/stop", "", 204);
    let out = vm.finish(TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert!(!socket.exists(), "the socket is removed at exit");
}

#[test]
fn probe_lifecycle_through_the_socket_pause_resume_metrics() {
    let dir = scratch_dir("api-lifecycle");
    let (mut vm, socket) = api_vmm(&dir);
    let s = socket.as_path();
    let disk = disk_image(&dir, 64 << 10);
    configure_counter_probe(s, &disk, "probe.virtio-blk.every=20000000");
    let metrics = dir.join("metrics.json");
    expect(s, "PUT", "/metrics", &format!(r#"{{"metrics_path": "{}"}}"#, metrics.display()), 204);
    expect(s, "PUT", "/logger", r#"{"level": "Debug"}"#, 204);
    assert!(expect(s, "GET", "/", "", 200).contains(r#""state":"Not started""#));
    expect(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    wait_for_ticks(&mut vm, 5);

    expect(s, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    assert!(expect(s, "GET", "/", "", 200).contains(r#""state":"Paused""#));
    let at_pause = probe_ticks(&vm.stdout()).len();
    std::thread::sleep(Duration::from_millis(1000));
    let after_pause = probe_ticks(&vm.stdout()).len();
    // A tick already on its way out may land; nothing more in a second (ticks are ~10 ms).
    assert!(after_pause <= at_pause + 1, "the guest ran while paused: {at_pause} -> {after_pause} ticks");
    expect(s, "PATCH", "/vm", r#"{"state": "Resumed"}"#, 204);
    let ticks = wait_for_ticks(&mut vm, after_pause + 5);
    assert!(ticks.windows(2).all(|w| w[1] == w[0] + 1), "the count goes on without a gap: {ticks:?}");

    expect(s, "PUT", "/actions", r#"{"action_type": "FlushMetrics"}"#, 204);
    let line = std::fs::read_to_string(&metrics).unwrap();
    let flushed: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    let blk = &flushed["devices"]["virtio-blk0"];
    assert_eq!(blk["kind"], "block", "{flushed}");
    // One 512-byte write per tick that finished, and a flush.
    let written = blk["write_bytes"].as_u64().unwrap();
    assert!(written >= 512 * ticks.len() as u64, "{written} bytes for {} ticks: {flushed}", ticks.len());
    assert!(flushed["block"]["requests"].as_u64().unwrap() >= 2 * ticks.len() as u64, "{flushed}");
    assert!(flushed["vcpu"]["exits"]["mmio_write"].as_u64().unwrap() > 0, "{flushed}");
    assert!(flushed["api_server"]["requests"]["PATCH /vm"].as_u64() == Some(2), "{flushed}");
    let prometheus = expect(s, "GET", "/ferrovisor/metrics?format=prometheus", "", 200);
    assert!(
        prometheus.contains(r#"ferrovisor_device_write_bytes_total{device="virtio-blk0",kind="block"}"#),
        "{prometheus}"
    );
    let config: serde_json::Value = serde_json::from_str(&expect(s, "GET", "/vm/config", "", 200)).unwrap();
    assert_eq!(config["drives"][0]["drive_id"], "counter", "{config}");
    let stats: serde_json::Value = serde_json::from_str(&expect(s, "GET", "/ferrovisor/stats", "", 200)).unwrap();
    assert_eq!(stats["guest_ram_kib"], 64 << 10, "{stats}");

    expect(s, "PUT", "/ferrovisor/stop", "", 204);
    let out = vm.finish(TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    assert!(out.stderr.contains("DEBUG"), "PUT /logger raised the level: {}", out.stderr);
    let last = *probe_ticks(&out.stdout).last().unwrap();
    common::check_counter_disk(&std::fs::read(&disk).unwrap(), last);
}

/// PATCH /drives points a running guest's disk at another image: the probe counting on it goes
/// on, now writing to the new image, and the old one stays as it was.
#[test]
fn patch_drive_points_a_running_guests_disk_at_another_image() {
    let dir = scratch_dir("api-patch-drive");
    let (mut vm, socket) = api_vmm(&dir);
    let s = socket.as_path();
    let old = disk_image(&dir, 64 << 10);
    let new = dir.join("new.img");
    std::fs::write(&new, vec![0u8; 64 << 10]).unwrap();
    let patch = |path: &Path| serde_json::json!({"drive_id": "counter", "path_on_host": path}).to_string();
    let m = fault(s, "PATCH", "/drives/counter", &patch(&new), 400);
    assert!(m.contains("needs a running VM"), "{m}");
    configure_counter_probe(s, &old, "probe.virtio-blk.every=20000000");
    expect(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    wait_for_ticks(&mut vm, 10);
    let m = fault(s, "PATCH", "/drives/counter", &patch(&dir.join("missing.img")), 400);
    assert!(m.contains("path_on_host cannot be used"), "{m}");
    // A rate limiter on the running disk: accepted when sound, refused with a reason when not.
    let limit = |size: u64| {
        serde_json::json!({"drive_id": "counter", "rate_limiter": {"ops": {"size": size, "refill_time": 10}}})
            .to_string()
    };
    let m = fault(s, "PATCH", "/drives/counter", &limit(0), 400);
    assert!(m.contains("needs a size and a refill_time above 0"), "{m}");
    expect(s, "PATCH", "/drives/counter", &limit(1000), 204);
    expect(s, "PATCH", "/drives/counter", &patch(&new), 204);
    let at_swap = probe_ticks(&vm.stdout()).len();
    wait_for_ticks(&mut vm, at_swap + 70);
    expect(s, "PUT", "/ferrovisor/stop", "", 204);
    let out = vm.finish(TIMEOUT);
    let last = common::assert_one_count(&[&out.stdout]);
    // The new image holds every sector of the last 64 ticks; the old one none of the latest.
    common::check_counter_disk(&std::fs::read(&new).unwrap(), last);
    let old_disk = std::fs::read(&old).unwrap();
    let mut latest = vec![0u8; 512];
    common::pattern::fill_sector(last, last % 64, &mut latest);
    assert_ne!(&old_disk[(last % 64) as usize * 512..][..512], &latest[..], "the old image stopped changing");
}

fn field(line: &str, key: &str) -> u64 {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok()).unwrap_or(u64::MAX)
}

/// Rate limiters hold a disk and a network interface to their buckets: the probe's measured
/// rates stay under them (plus the full bucket it starts with), and the metrics count the
/// requests that had to wait. Only upper bounds are checked: a slow host only lowers rates.
#[test]
fn rate_limiters_hold_disk_and_network_to_their_buckets() {
    let dir = scratch_dir("api-rate-limits");
    let (mut vm, socket) = api_vmm(&dir);
    let s = socket.as_path();
    let disk = disk_image(&dir, 4 << 20);
    let tap = common::TestTap::new("fvrl");
    // 8 MiB of sequential reads against 2 MiB/s (1 MiB per 500 ms); then 300 random reads
    // against 100 per second: each takes over two seconds after its first bucket.
    let boot = serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": "console=ttyS0 probe.test=virtio-blk,virtio-net probe.virtio-blk.mode=throughput                       probe.virtio-blk.mib=4 probe.virtio-blk.ops=300 probe.virtio-net.mode=throughput                       probe.virtio-net.frames=300 probe.idle=on",
    });
    expect(s, "PUT", "/boot-source", &boot.to_string(), 204);
    let drive = serde_json::json!({
        "drive_id": "limited", "path_on_host": disk, "is_root_device": false,
        "rate_limiter": {"bandwidth": {"size": 1 << 20, "refill_time": 500}, "ops": {"size": 100, "refill_time": 1000}},
    });
    expect(s, "PUT", "/drives/limited", &drive.to_string(), 204);
    let nic = serde_json::json!({
        "iface_id": "eth0", "host_dev_name": tap.name,
        "tx_rate_limiter": {"ops": {"size": 100, "refill_time": 1000}},
    });
    expect(s, "PUT", "/network-interfaces/eth0", &nic.to_string(), 204);
    let bad = serde_json::json!({"drive_id": "x", "path_on_host": disk, "is_root_device": false,
                                 "rate_limiter": {"ops": {"size": 0, "refill_time": 1000}}});
    let m = fault(s, "PUT", "/drives/x", &bad.to_string(), 400);
    assert!(m.contains("rate_limiter ops needs a size and a refill_time above 0"), "{m}");
    expect(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    assert!(vm.wait_for_output("PROBE done", Duration::from_secs(120)), "{}", vm.stderr());
    let metrics: serde_json::Value = serde_json::from_str(&expect(s, "GET", "/ferrovisor/metrics", "", 200)).unwrap();
    expect(s, "PUT", "/ferrovisor/stop", "", 204);
    let out = vm.finish(TIMEOUT);
    let blk = common::probe_result(&out.stdout, "virtio-blk").unwrap_or_else(|| panic!("{}", out.describe()));
    let net = common::probe_result(&out.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", out.describe()));
    eprintln!("{blk}\n{net}");
    // 4 MiB at 2 MiB/s with 1 MiB at hand: 1.5 s at least, under 2.7 MB/s.
    // And not far under the limits: a limiter that held everything back would fail here.
    assert!((1..=3).contains(&field(blk, "seq_mb_per_s")), "{blk}");
    // 300 reads at 100/s with 100 at hand: 2 s at least.
    assert!((50..=160).contains(&field(blk, "rand_4k_iops")), "{blk}");
    assert!((50..=160).contains(&field(net, "tx_pps")), "{net}");
    assert!(metrics["devices"]["virtio-blk0"]["rate_limited"].as_u64().unwrap() > 0, "{metrics}");
    assert!(metrics["devices"]["virtio-net0"]["rate_limited"].as_u64().unwrap() > 0, "{metrics}");
}

/// PATCH /network-interfaces changes a running interface's limiters: the probe sends 400
/// frames against 40 per second, and after two seconds the limit goes up to 2000 per second.
/// The rate before the change is the old limit's, the probe's overall rate shows the new one
/// (without the change it would take ten seconds, 40 frames per second), and the VM's
/// configuration says what it runs with now.
#[test]
fn patch_network_interface_changes_a_running_vms_rate_limit() {
    let dir = scratch_dir("api-patch-net");
    let (mut vm, socket) = api_vmm(&dir);
    let s = socket.as_path();
    let tap = common::TestTap::new("fvpn");
    let boot = serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": "console=ttyS0 probe.test=virtio-net probe.virtio-net.mode=throughput probe.virtio-net.frames=400 probe.idle=on",
    });
    expect(s, "PUT", "/boot-source", &boot.to_string(), 204);
    for mtu in [67, 65536] {
        let nic = serde_json::json!({"iface_id": "eth0", "host_dev_name": tap.name, "mtu": mtu});
        let m = fault(s, "PUT", "/network-interfaces/eth0", &nic.to_string(), 400);
        assert!(m.contains(&format!("mtu {mtu} is out of range")), "{m}");
    }
    let nic = serde_json::json!({
        "iface_id": "eth0", "host_dev_name": tap.name, "mtu": 9000,
        "tx_rate_limiter": {"ops": {"size": 40, "refill_time": 1000}},
    });
    expect(s, "PUT", "/network-interfaces/eth0", &nic.to_string(), 204);
    let faster =
        serde_json::json!({"iface_id": "eth0", "tx_rate_limiter": {"ops": {"size": 2000, "refill_time": 1000}}});
    let m = fault(s, "PATCH", "/network-interfaces/eth0", &faster.to_string(), 400);
    assert!(m.contains("needs a running VM"), "{m}");
    expect(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    std::thread::sleep(Duration::from_secs(2));
    let metrics: serde_json::Value = serde_json::from_str(&expect(s, "GET", "/ferrovisor/metrics", "", 200)).unwrap();
    let before = metrics["devices"]["virtio-net0"]["requests"].as_u64().unwrap();

    let unknown = serde_json::json!({"iface_id": "eth9", "tx_rate_limiter": {}});
    let m = fault(s, "PATCH", "/network-interfaces/eth9", &unknown.to_string(), 400);
    assert!(m.contains("There is no network interface eth9"), "{m}");
    let broken = serde_json::json!({"iface_id": "eth0", "rx_rate_limiter": {"ops": {"size": 0, "refill_time": 1000}}});
    let m = fault(s, "PATCH", "/network-interfaces/eth0", &broken.to_string(), 400);
    assert!(m.contains("rate_limiter ops needs a size and a refill_time above 0"), "{m}");
    let m = fault(s, "PATCH", "/network-interfaces/eth0", r#"{"iface_id": "eth0", "host_dev_name": "x"}"#, 400);
    assert!(m.contains("host_dev_name"), "{m}");
    expect(s, "PATCH", "/network-interfaces/eth0", &faster.to_string(), 204);
    assert!(vm.wait_for_output("PROBE done", Duration::from_secs(5)), "the new limit did not apply: {}", vm.stderr());
    let config: serde_json::Value = serde_json::from_str(&expect(s, "GET", "/vm/config", "", 200)).unwrap();
    expect(s, "PUT", "/ferrovisor/stop", "", 204);
    let out = vm.finish(TIMEOUT);
    let net = common::probe_result(&out.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", out.describe()));
    eprintln!("{before} frames in the first 2 s; {net}");
    // 40 at hand and 40 a second: about 120 in two seconds; a limiter that passed nothing or
    // everything would be outside these bounds.
    assert!((40..=170).contains(&before), "{before} frames before the change");
    assert!(field(net, "tx_pps") >= 100, "{net}");
    assert!(net.contains(" mtu=9000 "), "the guest was told its MTU: {net}");
    let iface = &config["network-interfaces"][0];
    assert_eq!(iface["tx_rate_limiter"]["ops"]["size"], 2000, "{config}");
    assert_eq!(iface["host_dev_name"], tap.name.as_str(), "{config}");
}

/// PUT /serial sends the serial console to a file with a byte budget: the probe writes 64 KiB
/// at once against 4 KiB at hand and 4 KiB a second, so about that much of it reaches the
/// file, and the report it prints a second later arrives whole. A FIFO nobody reads does not
/// hold the guest back. Bad bodies are refused with a sentence.
#[test]
fn serial_output_goes_to_serial_out_path_within_its_rate_limit() {
    let dir = scratch_dir("api-serial");
    let log = dir.join("serial.log");
    let (vm, socket) = api_vmm(&dir);
    let s = socket.as_path();
    let m = fault(s, "PUT", "/serial", r#"{"serial_out_path": ""}"#, 400);
    assert!(m.contains("serial_out_path is empty"), "{m}");
    let m = fault(s, "PUT", "/serial", r#"{"rate_limiter": {"size": 0, "refill_time": 100}}"#, 400);
    assert!(m.contains("serial rate_limiter needs a size and a refill_time above 0"), "{m}");
    let m = fault(s, "PUT", "/serial", r#"{"serial_out_path": "x", "baud": 9600}"#, 400);
    assert!(m.contains("baud"), "{m}");
    let boot = serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": "console=ttyS0 probe.test=serial probe.serial.flood=65536",
    });
    expect(s, "PUT", "/boot-source", &boot.to_string(), 204);
    let serial = serde_json::json!({"serial_out_path": log, "rate_limiter": {"size": 4096, "refill_time": 1000}});
    expect(s, "PUT", "/serial", &serial.to_string(), 204);
    let config: serde_json::Value = serde_json::from_str(&expect(s, "GET", "/vm/config", "", 200)).unwrap();
    assert_eq!(config["serial"]["rate_limiter"]["size"], 4096, "{config}");
    let started = std::time::Instant::now();
    expect(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    let out = vm.finish(TIMEOUT);
    let elapsed = started.elapsed().as_secs() + 1;
    assert!(out.status.success(), "{}", out.describe());
    assert!(!out.stdout.contains("PROBE"), "the serial output went to stdout: {}", out.describe());
    let text = std::fs::read_to_string(&log).unwrap();
    let flooded = text.bytes().filter(|&b| b == b'x').count() as u64;
    eprintln!("{flooded} of 65536 flood bytes in the file after about {elapsed} s");
    assert!((2048..=4096 + 4096 * elapsed).contains(&flooded), "{flooded} bytes of the flood passed");
    assert!(text.contains("PROBE serial ok flood=65536"), "{text}");
    assert!(text.contains("PROBE done passed=1 failed=0"), "{text}");

    // A FIFO with no reader: output is dropped, the guest runs to its end.
    let fifo = dir.join("serial.fifo");
    common::mkfifo(&fifo);
    let (vm, socket) = common::api_vmm(&dir, "api2.sock", &[]);
    let s = socket.as_path();
    expect(s, "PUT", "/boot-source", &boot.to_string(), 204);
    expect(s, "PUT", "/serial", &serde_json::json!({"serial_out_path": fifo}).to_string(), 204);
    expect(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    let out = vm.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
}

/// What Firecracker's definition refuses is refused with a sentence naming the field: arrays
/// where objects belong (serde would take a struct's fields in order), at the top and nested,
/// MMDS contents that are not objects, and empty or missing paths; what real clients send (a
/// null or empty rate limiter) is still taken.
#[test]
fn arrays_for_objects_and_empty_paths_are_refused() {
    let dir = scratch_dir("api-strict");
    let (vm, socket) = api_vmm(&dir);
    let s = socket.as_path();
    for (method, path, body, needle) in [
        ("PUT", "/entropy", r#"{"rate_limiter": [null, null]}"#, "field rate_limiter: invalid type: sequence"),
        ("PUT", "/machine-config", "[2, 128]", "invalid type: sequence, expected struct MachineConfig"),
        (
            "PUT",
            "/drives/d",
            r#"{"drive_id": "d", "path_on_host": "/x", "is_root_device": false, "rate_limiter": {"ops": [1, 0, 1]}}"#,
            "field rate_limiter.ops: invalid type: sequence",
        ),
        ("PUT", "/boot-source", r#"{"kernel_image_path": ""}"#, "kernel_image_path is empty; give a path"),
        (
            "PUT",
            "/drives/d",
            r#"{"drive_id": "d", "path_on_host": "", "is_root_device": false}"#,
            "path_on_host is empty; give a path",
        ),
        ("PUT", "/vsock", r#"{"guest_cid": 3, "uds_path": ""}"#, "uds_path is empty"),
        ("PUT", "/logger", r#"{"log_path": ""}"#, "log_path is empty; give a path"),
        ("PUT", "/metrics", r#"{"metrics_path": ""}"#, "metrics_path is empty; give a path"),
        ("PUT", "/serial", r#"{"serial_out_path": ""}"#, "serial_out_path is empty"),
        ("PUT", "/mmds", "[null, null]", "PUT /mmds: the body must be a JSON object, not an array"),
        ("PATCH", "/mmds", "[null, null]", "PATCH /mmds: the body must be a JSON object, not an array"),
        ("PUT", "/mmds", "\"metadata\"", "the body must be a JSON object, not a string"),
        ("PATCH", "/mmds", "null", "the body must be a JSON object, not null"),
        (
            "PUT",
            "/vsock",
            r#"{"guest_cid": 3, "uds_path": "/nonexistent/dir/v.sock"}"#,
            "vsock uds_path /nonexistent/dir/v.sock: the directory /nonexistent/dir does not exist",
        ),
        (
            "PUT",
            "/serial",
            r#"{"serial_out_path": "/nonexistent/dir/serial.log"}"#,
            "serial serial_out_path /nonexistent/dir/serial.log: the directory /nonexistent/dir does not exist",
        ),
        (
            "PUT",
            "/ferrovisor/devices/dma",
            r#"{"id": "dma", "vfio_user": "/nonexistent.sock"}"#,
            "device dma vfio_user /nonexistent.sock cannot be reached",
        ),
        (
            "PUT",
            "/pmem/p",
            r#"{"id": "p", "path_on_host": "/nonexistent.img"}"#,
            "pmem p path_on_host /nonexistent.img cannot be opened",
        ),
        (
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "", "mem_backend": {"backend_type": "File", "backend_path": "/m"}}"#,
            "snapshot_path is empty; give a path",
        ),
    ] {
        let m = fault(s, method, path, body, 400);
        assert!(m.contains(needle), "{method} {path} {body}: {m}");
    }
    expect(s, "PUT", "/entropy", r#"{"rate_limiter": null}"#, 204);
    expect(s, "PUT", "/entropy", r#"{"rate_limiter": {}}"#, 204);
    expect(s, "PUT", "/ferrovisor/stop", "", 204);
    assert!(vm.finish(TIMEOUT).status.success());
}

/// The registers of CPUID leaf `leaf` in the probe's `cpuid` report.
fn cpuid_leaf(stdout: &str, leaf: &str) -> [u32; 4] {
    let line = stdout
        .lines()
        .find(|l| l.starts_with(&format!("PROBE cpuid leaf={leaf} ")))
        .unwrap_or_else(|| panic!("no CPUID leaf {leaf} in {stdout}"));
    let hex = |key: &str| {
        let value = line.split_whitespace().find_map(|w| w.strip_prefix(key)).unwrap();
        u32::from_str_radix(value.trim_start_matches("0x"), 16).unwrap()
    };
    [hex("eax="), hex("ebx="), hex("ecx="), hex("edx=")]
}

/// machine-config `cpu_template` (Firecracker's static templates): C3 hides what an Ivy
/// Bridge lacks, such as AVX2, from the guest's CPUID; the VMM says how many features this
/// host had that it hid. Unknown names, aarch64's V1N1 and a template given twice (with
/// /cpu-config) are refused with sentences.
#[test]
fn static_cpu_templates_hide_what_their_processor_lacks() {
    let dir = scratch_dir("api-static-template");
    let (vm, socket) = api_vmm(&dir);
    let s = socket.as_path();
    for (template, needle) in [
        (r#""T3""#, "'T3' is none of C3, T2, T2S, T2CL, T2A and None"),
        (r#""V1N1""#, "aarch64"),
        ("42", "not a template name"),
    ] {
        let body = format!(r#"{{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": {template}}}"#);
        let m = fault(s, "PUT", "/machine-config", &body, 400);
        assert!(m.contains(needle), "{body}: {m}");
    }
    let boot = serde_json::json!({"kernel_image_path": probe_elf(), "boot_args": "console=ttyS0 probe.test=cpuid"});
    expect(s, "PUT", "/boot-source", &boot.to_string(), 204);
    expect(s, "PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 128, "cpu_template": "C3"}"#, 204);
    expect(s, "PUT", "/cpu-config", r#"{"cpuid_modifiers": []}"#, 204);
    let m = fault(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 400);
    assert!(m.contains("both give a CPU template"), "{m}");
    expect(s, "PUT", "/cpu-config", "{}", 204);
    // An empty custom template is still a template: take the static one through a new VMM.
    drop(vm);
    let (vm, socket) = common::api_vmm(&dir, "c3.sock", &[]);
    let s = socket.as_path();
    expect(s, "PUT", "/boot-source", &boot.to_string(), 204);
    expect(s, "PATCH", "/machine-config", r#"{"cpu_template": "C3"}"#, 204);
    expect(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    let out = vm.finish(TIMEOUT);
    let hidden: usize = out
        .stderr
        .split("CPU template C3: hides ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{}", out.describe()));
    let [_, ebx7, _, _] = cpuid_leaf(&out.stdout, "0x7");
    if common::host_emulates_ring0() {
        eprintln!("C3 hid {hidden} features; kvm_pvm shows the guest the host's feature bits (leaf 7 EBX {ebx7:#x})");
    } else {
        assert_eq!(ebx7 & (1 << 5), 0, "no AVX2 under C3: {ebx7:#x}");
    }
    // Every x86 host since Haswell offers something C3 hides (AVX2, 1 GiB pages, ...).
    assert!(hidden > 0, "{}", out.stderr);
}

/// PUT /cpu-config (a custom CPU template in Firecracker's format) changes the CPUID the
/// guest sees: the probe (which runs CPUID in ring 0) finds leaf 1 EBX's CLFLUSH line size
/// changed and leaf 7 EBX without the feature bit the template clears. Claiming a feature the
/// host lacks, or an MSR KVM does not have, stops InstanceStart with a sentence; bad syntax is
/// refused at once.
#[test]
fn cpu_config_changes_the_guests_cpuid_and_refuses_what_the_host_lacks() {
    let plain = Running::start(common::probe_command(1, "probe.test=cpuid")).finish(TIMEOUT);
    let [_, leaf1_ebx, _, _] = cpuid_leaf(&plain.stdout, "0x1");
    let [_, leaf7_ebx, _, _] = cpuid_leaf(&plain.stdout, "0x7");
    // The highest set bit of the CLFLUSH line size (EBX[15:8]), and leaf 7 EBX's lowest set
    // and lowest clear bits.
    let clflush = 31 - (leaf1_ebx & 0xff00).leading_zeros();
    let (set, unset) = (leaf7_ebx.trailing_zeros(), (!leaf7_ebx).trailing_zeros());
    assert!((8..16).contains(&clflush) && set < 32 && unset < 32, "{}", plain.stdout);
    // A bitmap that makes bit `bit` `value` and leaves the bits above it.
    let bitmap = |bit: u32, value: char| format!("0b{value}{}", "x".repeat(bit as usize));
    let template = |bit: u32, value: char, msr: &str| {
        serde_json::json!({
            "kvm_capabilities": ["!56"],
            "cpuid_modifiers": [
                {"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                 "modifiers": [{"register": "ebx", "bitmap": bitmap(clflush, '0')}]},
                {"leaf": "0x7", "subleaf": "0x0", "flags": 1,
                 "modifiers": [{"register": "ebx", "bitmap": bitmap(bit, value)}]},
            ],
            "msr_modifiers": [{"addr": msr, "bitmap": "0bx"}],
        })
        .to_string()
    };
    let dir = scratch_dir("api-cpu-config");
    let (vm, socket) = api_vmm(&dir);
    let s = socket.as_path();
    let leaf = |register: &str, bitmap: &str| {
        format!(
            r#"{{"cpuid_modifiers": [{{"leaf": "0x7", "subleaf": "0", "flags": 0, "modifiers": [{{"register": "{register}", "bitmap": "{bitmap}"}}]}}]}}"#
        )
    };
    for (body, needle) in [
        (leaf("ebx", "0b2"), "holds '2'"),
        (leaf("rbx", "0b0"), "register 'rbx'"),
        (leaf("ebx", &format!("0b{}", "0".repeat(33))), "more than 32 bits"),
        (r#"{"vcpu_features": [{"index": 0, "bitmap": "0b1"}]}"#.to_string(), "for aarch64 hosts"),
        (r#"{"msr_modifiers": [], "cpu_flags": 1}"#.to_string(), "cpu_flags"),
    ] {
        let m = fault(s, "PUT", "/cpu-config", &body, 400);
        assert!(m.contains(needle), "{body}: {m}");
    }
    let boot = serde_json::json!({"kernel_image_path": probe_elf(), "boot_args": "console=ttyS0 probe.test=cpuid"});
    expect(s, "PUT", "/boot-source", &boot.to_string(), 204);
    expect(s, "PUT", "/cpu-config", &template(unset, '1', "0x1a0"), 204);
    let m = fault(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 400);
    assert!(m.contains(&format!("bits {:#x} are not supported by this host", 1u32 << unset)), "{m}");
    expect(s, "PUT", "/cpu-config", &template(set, '0', "0xdeadbeef"), 204);
    let m = fault(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 400);
    assert!(m.contains("MSR 0xdeadbeef is not one this host's KVM gives a guest"), "{m}");
    // MSR_IA32_MISC_ENABLE, left as it is: a modifier KVM takes.
    expect(s, "PUT", "/cpu-config", &template(set, '0', "0x1a0"), 204);
    expect(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    let out = vm.finish(TIMEOUT);
    let [_, ebx1, ecx1, _] = cpuid_leaf(&out.stdout, "0x1");
    assert_eq!(ebx1, leaf1_ebx & !(1 << clflush), "leaf 1 EBX {leaf1_ebx:#x} without bit {clflush}");
    assert_eq!(ecx1, cpuid_leaf(&plain.stdout, "0x1")[2], "what the template does not name is left alone");
    let [_, ebx7, _, _] = cpuid_leaf(&out.stdout, "0x7");
    if common::host_emulates_ring0() {
        // kvm_pvm keeps feature bits as the host has them: guest ring 3 runs natively there,
        // and its own CPUID could not be made to agree.
        eprintln!("not checking leaf 7 EBX ({ebx7:#x}): kvm_pvm shows the host's feature bits");
    } else {
        assert_eq!(ebx7, leaf7_ebx & !(1 << set), "leaf 7 EBX {leaf7_ebx:#x} without bit {set}");
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status.lines().find_map(|l| l.strip_prefix("VmRSS:")).unwrap();
    rss.trim().trim_end_matches("kB").trim().parse().unwrap()
}

/// Free page hinting through the API: the probe fills 48 MiB and waits; PATCH
/// /balloon/hinting/start gives it a run, it hints those pages free and says STOP, the host
/// answers DONE (acknowledge_on_stop), and the VMM's RSS falls by about 48 MiB. The status
/// shows both commands; a balloon without hinting, or no VM yet, is refused with a sentence.
#[test]
fn free_page_hinting_returns_hinted_pages_to_the_host() {
    let dir = scratch_dir("api-hinting");
    let (mut vm, socket) = api_vmm(&dir);
    let s = socket.as_path();
    let boot = serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": "console=ttyS0 probe.test=virtio-balloon probe.virtio-balloon.mode=hint probe.virtio-balloon.mib=48 probe.idle=on",
    });
    expect(s, "PUT", "/boot-source", &boot.to_string(), 204);
    let m = fault(s, "PATCH", "/balloon/hinting/start", "{}", 400);
    assert!(m.contains("needs a running VM"), "{m}");
    let balloon = r#"{"amount_mib": 0, "deflate_on_oom": false, "free_page_hinting": true}"#;
    expect(s, "PUT", "/balloon", balloon, 204);
    expect(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    assert!(vm.wait_for_output("PROBE virtio-balloon hint ready", TIMEOUT), "{}", vm.stdout());
    let filled = rss_kib(vm.child.id());
    assert_eq!(expect(s, "GET", "/balloon/hinting/status", "", 200), r#"{"host_cmd":0}"#);
    let m = fault(s, "PATCH", "/balloon/hinting/start", r#"{"acknowledge_on_stop": "yes"}"#, 400);
    assert!(m.contains("acknowledge_on_stop"), "{m}");
    expect(s, "PATCH", "/balloon/hinting/start", r#"{"acknowledge_on_stop": true}"#, 204);
    assert!(vm.wait_for_output("PROBE virtio-balloon ok mode=hint run=2 hinted_mib=48", TIMEOUT), "{}", vm.stdout());
    let hinted = rss_kib(vm.child.id());
    // The guest's STOP (0) was answered with DONE (1).
    assert_eq!(expect(s, "GET", "/balloon/hinting/status", "", 200), r#"{"host_cmd":1,"guest_cmd":0}"#);
    expect(s, "PATCH", "/balloon/hinting/stop", "", 204);
    expect(s, "PUT", "/ferrovisor/stop", "", 204);
    let out = vm.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    let returned = filled.saturating_sub(hinted);
    eprintln!("VMM RSS {filled} KiB filled, {hinted} KiB after hinting: {returned} KiB returned");
    assert!(returned >= 48 * 1024 * 8 / 10, "at least 80% of 48 MiB returned, got {returned} KiB");

    // A balloon without hinting refuses runs.
    let (vm, socket) = common::api_vmm(&dir, "api2.sock", &[]);
    let s = socket.as_path();
    let boot = serde_json::json!({"kernel_image_path": probe_elf(), "boot_args": "console=ttyS0 probe.idle=on"});
    expect(s, "PUT", "/boot-source", &boot.to_string(), 204);
    expect(s, "PUT", "/balloon", r#"{"amount_mib": 0, "deflate_on_oom": false}"#, 204);
    expect(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    let m = fault(s, "PATCH", "/balloon/hinting/start", "", 400);
    assert!(m.contains("Free page hinting is off"), "{m}");
    expect(s, "PUT", "/ferrovisor/stop", "", 204);
    assert!(vm.finish(TIMEOUT).status.success());
}

/// Memory hotplug (virtio-mem) through the API: the probe plugs the 64 MiB PATCH asks for,
/// writes all of it, and unplugs 48 MiB of it when asked for 16; the VMM's RSS rises and falls
/// with it, and GET /hotplug/memory follows. The probe then stores to every page it unplugged:
/// every store is dropped, counted and logged with its block, and the RSS stays down (without
/// enforcement each store would have mapped a page: 48 MiB). Bad sizes are refused with sentences naming the
/// field, and the region survives a snapshot and load (what was plugged stays plugged).
#[test]
fn memory_hotplug_plugs_and_unplugs_blocks_and_rss_follows() {
    let dir = scratch_dir("api-hotplug");
    let (mut vm, socket) = api_vmm(&dir);
    let s = socket.as_path();
    let boot = serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": "console=ttyS0 probe.test=virtio-mem probe.idle=on",
    });
    expect(s, "PUT", "/boot-source", &boot.to_string(), 204);
    for (body, field) in [
        (r#"{"total_size_mib": 200}"#, "total_size_mib"),
        (r#"{"total_size_mib": 0}"#, "total_size_mib"),
        (r#"{"total_size_mib": 256, "block_size_mib": 3}"#, "block_size_mib"),
        (r#"{"total_size_mib": 256, "slot_size_mib": 64}"#, "slot_size_mib"),
        (r#"{"total_size_mib": 256, "slot_size_mib": 129}"#, "slot_size_mib"),
        (r#"{"total_size_mib": 4194304}"#, "total_size_mib"),
        (r#"{"total_size_mib": null}"#, "total_size_mib"),
        (r#"{"slot_size_mib": 128}"#, "total_size_mib"),
        (r#"{"total_size_mib": 256, "size": 1}"#, "size"),
    ] {
        let m = fault(s, "PUT", "/hotplug/memory", body, 400);
        assert!(m.contains(field), "{body}: {m}");
    }
    let m = fault(s, "PATCH", "/hotplug/memory", r#"{"requested_size_mib": 64}"#, 400);
    assert!(m.contains("needs a running VM"), "{m}");
    let m = fault(s, "GET", "/hotplug/memory", "", 400);
    assert!(m.contains("PUT /hotplug/memory"), "{m}");
    expect(s, "PUT", "/hotplug/memory", r#"{"total_size_mib": 256}"#, 204);
    let status: serde_json::Value = serde_json::from_str(&expect(s, "GET", "/hotplug/memory", "", 200)).unwrap();
    assert_eq!(status["slot_size_mib"], 128, "{status}");
    assert_eq!(status["block_size_mib"], 2, "{status}");
    let config: serde_json::Value = serde_json::from_str(&expect(s, "GET", "/vm/config", "", 200)).unwrap();
    assert_eq!(config["memory-hotplug"]["total_size_mib"], 256, "{config}");
    expect(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    assert!(vm.wait_for_output("PROBE virtio-mem ready", TIMEOUT), "{}", vm.stdout());
    let before = rss_kib(vm.child.id());
    for (body, field) in [
        (r#"{"requested_size_mib": 3}"#, "requested_size_mib 3"),
        (r#"{"requested_size_mib": 512}"#, "requested_size_mib 512"),
        (r#"{"requested_size_mib": -1}"#, "requested_size_mib"),
        (r#"{}"#, "requested_size_mib"),
    ] {
        let m = fault(s, "PATCH", "/hotplug/memory", body, 400);
        assert!(m.contains(field), "{body}: {m}");
    }
    expect(s, "PATCH", "/hotplug/memory", r#"{"requested_size_mib": 64}"#, 204);
    assert!(vm.wait_for_output("PROBE virtio-mem plugged mib=64", TIMEOUT), "{}", vm.stdout());
    let plugged = rss_kib(vm.child.id());
    let status: serde_json::Value = serde_json::from_str(&expect(s, "GET", "/hotplug/memory", "", 200)).unwrap();
    assert_eq!(status["plugged_size_mib"], 64, "{status}");
    assert_eq!(status["requested_size_mib"], 64, "{status}");
    expect(s, "PATCH", "/hotplug/memory", r#"{"requested_size_mib": 16}"#, 204);
    assert!(vm.wait_for_output("PROBE virtio-mem ok plugged_mib=64 unplugged_mib=48", TIMEOUT), "{}", vm.stdout());
    assert!(vm.stdout().contains("stores_dropped=12288"), "{}", vm.stdout());
    let unplugged = rss_kib(vm.child.id());
    let status: serde_json::Value = serde_json::from_str(&expect(s, "GET", "/hotplug/memory", "", 200)).unwrap();
    assert_eq!(status["plugged_size_mib"], 16, "{status}");
    let stats: serde_json::Value = serde_json::from_str(&expect(s, "GET", "/ferrovisor/stats", "", 200)).unwrap();
    assert_eq!(stats["memory_hotplug"]["plugged_mib"], 16, "{stats}");
    // Each page was stored to once and read back once.
    assert_eq!(stats["memory_hotplug"]["unplugged_accesses"], 2 * 12288, "{stats}");

    // A snapshot keeps the plugged blocks and the requested size.
    expect(s, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    let (state, mem) = (dir.join("state"), dir.join("mem"));
    let create = serde_json::json!({"snapshot_path": state, "mem_file_path": mem});
    expect(s, "PUT", "/snapshot/create", &create.to_string(), 204);
    expect(s, "PUT", "/ferrovisor/stop", "", 204);
    let out = vm.finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    assert!(out.stderr.contains("virtio-mem: the guest plugged"), "{}", out.stderr);
    // The first dropped store names the first unplugged block: 16 MiB into 2 MiB blocks.
    assert!(out.stderr.contains("the guest wrote 8 bytes to unplugged block 8 (at 0x"), "{}", out.stderr);
    let (restored, socket) = common::api_vmm(&dir, "restored.sock", &[]);
    let s = socket.as_path();
    let load = serde_json::json!({"snapshot_path": state, "mem_file_path": mem, "resume_vm": true});
    expect(s, "PUT", "/snapshot/load", &load.to_string(), 204);
    let status: serde_json::Value = serde_json::from_str(&expect(s, "GET", "/hotplug/memory", "", 200)).unwrap();
    assert_eq!((status["plugged_size_mib"].as_u64(), status["requested_size_mib"].as_u64()), (Some(16), Some(16)));
    expect(s, "PUT", "/ferrovisor/stop", "", 204);
    assert!(restored.finish(TIMEOUT).status.success());

    eprintln!("VMM RSS {before} KiB ready, {plugged} KiB with 64 MiB plugged, {unplugged} KiB after unplugging 48");
    assert!(plugged.saturating_sub(before) >= 64 * 1024 * 8 / 10, "RSS rose by {} KiB", plugged - before);
    assert!(plugged.saturating_sub(unplugged) >= 48 * 1024 * 8 / 10, "RSS fell by {} KiB", plugged - unplugged);
}

/// Boots the probe through the API as an IPv4 host at 169.254.0.2 that reaches MMDS on its
/// first interface and fetches `gets` (plus `extra` probe parameters) once `setup` configured
/// the rest; returns the VM's output.
fn mmds_guest(dir: &Path, name: &str, taps: &[&str], extra: &str, setup: impl FnOnce(&Path)) -> common::Outcome {
    let (vm, socket) = common::api_vmm(dir, name, &[]);
    let s = socket.as_path();
    let boot = serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": format!(
            "console=ttyS0 probe.test=virtio-net probe.virtio-net.mode=ip probe.virtio-net.ip=169.254.0.2 \
             probe.virtio-net.gw=169.254.169.254 probe.virtio-net.prefix=16 probe.virtio-net.checks=icmp \
             probe.virtio-net.wait=1000000000 {extra}"
        ),
    });
    expect(s, "PUT", "/boot-source", &boot.to_string(), 204);
    for (i, tap) in taps.iter().enumerate() {
        let nic = serde_json::json!({"iface_id": format!("eth{i}"), "host_dev_name": tap});
        expect(s, "PUT", &format!("/network-interfaces/eth{i}"), &nic.to_string(), 204);
    }
    setup(s);
    expect(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    vm.finish(TIMEOUT)
}

/// MMDS's contents and configuration are in a snapshot: a guest snapshotted before it asked
/// reads, after the load in a new VMM, what the first VMM's API put there.
#[test]
fn mmds_contents_survive_a_snapshot_and_load() {
    let dir = scratch_dir("api-mmds-snapshot");
    let tap = common::TestTap::new("fvms");
    let (mut first, socket) = common::api_vmm(&dir, "first.sock", &[]);
    let s = socket.as_path();
    let boot = serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": "console=ttyS0 probe.test=virtio-net probe.virtio-net.mode=ip probe.virtio-net.ip=169.254.0.2 \
                      probe.virtio-net.gw=169.254.169.254 probe.virtio-net.prefix=16 probe.virtio-net.checks=icmp \
                      probe.virtio-net.wait=1000000000 probe.virtio-net.delay=3000000000 \
                      probe.virtio-net.token=60 probe.virtio-net.get=/latest/meta-data/ami-id",
    });
    expect(s, "PUT", "/boot-source", &boot.to_string(), 204);
    let nic = serde_json::json!({"iface_id": "eth0", "host_dev_name": tap.name});
    expect(s, "PUT", "/network-interfaces/eth0", &nic.to_string(), 204);
    expect(s, "PUT", "/mmds/config", r#"{"network_interfaces": ["eth0"], "version": "V2"}"#, 204);
    expect(s, "PUT", "/mmds", r#"{"latest": {"meta-data": {"ami-id": "ami-snapshotted"}}}"#, 204);
    expect(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    assert!(first.wait_for_output("PROBE virtio-net delaying", TIMEOUT), "{}", first.stderr());
    expect(s, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    let (state, mem) = (dir.join("vm.snap"), dir.join("vm.mem"));
    let create = serde_json::json!({"snapshot_path": state, "mem_file_path": mem});
    expect(s, "PUT", "/snapshot/create", &create.to_string(), 204);
    expect(s, "PUT", "/ferrovisor/stop", "", 204);
    let first = first.finish(TIMEOUT);
    assert!(!first.stdout.contains("PROBE virtio-net http"), "the snapshot came before the GET: {}", first.stdout);

    let (second, socket) = common::api_vmm(&dir, "second.sock", &[]);
    let s = socket.as_path();
    let load = serde_json::json!({"snapshot_path": state, "mem_file_path": mem, "resume_vm": true});
    expect(s, "PUT", "/snapshot/load", &load.to_string(), 204);
    let now: serde_json::Value = serde_json::from_str(&expect(s, "GET", "/mmds", "", 200)).unwrap();
    assert_eq!(now["latest"]["meta-data"]["ami-id"], "ami-snapshotted", "{now}");
    let out = second.finish(TIMEOUT);
    // Version 2 came back too: the probe's GET carried a token, as it must.
    assert!(http_line(&out, "GET", "/latest/meta-data/ami-id").ends_with("status=200 body=ami-snapshotted"));
}

/// The probe's `http` line for `path` (the first one).
fn http_line<'a>(out: &'a common::Outcome, method: &str, path: &str) -> &'a str {
    let prefix = format!("PROBE virtio-net http method={method} path={path} ");
    out.stdout
        .lines()
        .find(|l| l.starts_with(&prefix))
        .unwrap_or_else(|| panic!("no {method} {path}: {}", out.describe()))
}

/// MMDS (the microVM metadata service): what the API puts there (PUT, then a merge PATCH) the
/// guest reads with HTTP at 169.254.169.254 on the interface MMDS is enabled for, in IMDS form
/// or JSON; version 2 wants a live session token; another interface does not reach it; the
/// store's limit holds; bad configurations are refused with a sentence.
#[test]
fn mmds_serves_the_guest_what_the_api_put_there() {
    let dir = scratch_dir("api-mmds");
    let tap = common::TestTap::new("fvmd");
    let gets =
        "probe.virtio-net.get=/latest/meta-data/ami-id,/latest/meta-data,/latest/nothing,/latest/meta-data/count";
    let contents =
        serde_json::json!({"latest": {"meta-data": {"ami-id": "ami-12345678", "count": 3, "network": {"x": "y"}}}});
    let out = mmds_guest(&dir, "v1.sock", &[&tap.name], gets, |s| {
        for (body, needle) in [
            (r#"{"network_interfaces": ["eth9"]}"#, "eth9, which is no network interface"),
            (r#"{"network_interfaces": []}"#, "network_interfaces is empty"),
            (r#"{"network_interfaces": ["eth0"], "ipv4_address": "224.0.0.1"}"#, "not a unicast IPv4 address"),
            (r#"{"network_interfaces": ["eth0"], "version": "V3"}"#, "version"),
        ] {
            let m = fault(s, "PUT", "/mmds/config", body, 400);
            assert!(m.contains(needle), "{body}: {m}");
        }
        expect(s, "PUT", "/mmds/config", r#"{"network_interfaces": ["eth0"]}"#, 204);
        expect(s, "PUT", "/mmds", &contents.to_string(), 204);
        expect(s, "PATCH", "/mmds", r#"{"latest": {"meta-data": {"reservation-id": "r-1", "network": null}}}"#, 204);
        let now: serde_json::Value = serde_json::from_str(&expect(s, "GET", "/mmds", "", 200)).unwrap();
        assert_eq!(
            now["latest"]["meta-data"],
            serde_json::json!({"ami-id": "ami-12345678", "count": 3, "reservation-id": "r-1"})
        );
        let config: serde_json::Value = serde_json::from_str(&expect(s, "GET", "/vm/config", "", 200)).unwrap();
        assert_eq!(config["mmds-config"]["network_interfaces"][0], "eth0", "{config}");
    });
    assert!(
        probe_result(&out.stdout, "virtio-net").is_some_and(|l| l.contains(" icmp=reply ") && l.ends_with(" http=4")),
        "{}",
        out.describe()
    );
    assert!(http_line(&out, "GET", "/latest/meta-data/ami-id").ends_with("status=200 body=ami-12345678"));
    assert!(http_line(&out, "GET", "/latest/meta-data").ends_with("status=200 body=ami-id|count|reservation-id"));
    assert!(http_line(&out, "GET", "/latest/nothing").contains("status=404 body=Resource not found: /latest/nothing."));
    // IMDS form has strings and objects only; JSON has the rest.
    assert!(http_line(&out, "GET", "/latest/meta-data/count").contains("status=501"));
    let json = format!("{gets} probe.virtio-net.accept=json");
    let out = mmds_guest(&dir, "json.sock", &[&tap.name], &json, |s| {
        expect(s, "PUT", "/mmds/config", r#"{"network_interfaces": ["eth0"]}"#, 204);
        expect(s, "PUT", "/mmds", &contents.to_string(), 204);
    });
    assert!(http_line(&out, "GET", "/latest/meta-data/count").ends_with("status=200 body=3"), "{}", out.describe());

    // Version 2: a token first, then the value; a forged or expired token gets 401.
    let v2 = |s: &Path| {
        expect(s, "PUT", "/mmds/config", r#"{"network_interfaces": ["eth0"], "version": "V2"}"#, 204);
        expect(s, "PUT", "/mmds", &contents.to_string(), 204);
    };
    let path = "probe.virtio-net.get=/latest/meta-data/ami-id";
    let out = mmds_guest(&dir, "v2.sock", &[&tap.name], &format!("{path} probe.virtio-net.token=60"), v2);
    assert!(http_line(&out, "PUT", "/latest/api/token").contains("status=200 body="), "{}", out.describe());
    assert!(http_line(&out, "GET", "/latest/meta-data/ami-id").ends_with("status=200 body=ami-12345678"));
    let out = mmds_guest(&dir, "v2-none.sock", &[&tap.name], path, v2);
    assert!(http_line(&out, "GET", "/latest/meta-data/ami-id").contains("status=401 body=No MMDS token provided"));
    let forged = format!("{path} probe.virtio-net.forged=on");
    let out = mmds_guest(&dir, "v2-forged.sock", &[&tap.name], &forged, v2);
    assert!(http_line(&out, "GET", "/latest/meta-data/ami-id").contains("status=401 body=MMDS token not valid."));
    let expired = format!("{path} probe.virtio-net.token=1 probe.virtio-net.tokenwait=8000000000");
    let out = mmds_guest(&dir, "v2-expired.sock", &[&tap.name], &expired, v2);
    assert!(http_line(&out, "GET", "/latest/meta-data/ami-id").contains("status=401"), "{}", out.describe());

    // MMDS on the second interface only: the guest's first interface does not reach it.
    let other = common::TestTap::new("fvmo");
    let out = mmds_guest(&dir, "other.sock", &[&tap.name, &other.name], path, |s| {
        expect(s, "PUT", "/mmds/config", r#"{"network_interfaces": ["eth1"]}"#, 204);
    });
    let line = probe_result(&out.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", out.describe()));
    assert_eq!(line, "PROBE virtio-net FAIL the router did not answer ARP");

    // The store's limit, from --mmds-size-limit.
    let (vm, socket) = common::api_vmm(&dir, "limit.sock", &["--mmds-size-limit", "64"]);
    let m = fault(&socket, "PUT", "/mmds", &serde_json::json!({"big": "x".repeat(100)}).to_string(), 400);
    assert!(m.contains("more than its limit of 64"), "{m}");
    expect(&socket, "PUT", "/mmds", r#"{"small": "x"}"#, 204);
    assert!(vm.finish_after_signal(libc::SIGTERM, TIMEOUT).status.success());
}

/// PUT /pmem/{id}: a root pmem device becomes the kernel's root (`root=/dev/pmem0`), the
/// probe writes through it; bad files are refused with a sentence.
#[test]
fn pmem_through_the_api_is_the_root_device() {
    let dir = scratch_dir("api-pmem");
    let file = dir.join("rootfs.img");
    std::fs::write(&file, vec![0u8; 2 << 20]).unwrap();
    let odd = dir.join("odd.img");
    std::fs::write(&odd, vec![0u8; 4096]).unwrap();
    let (vm, socket) = api_vmm(&dir);
    let s = socket.as_path();
    let boot =
        serde_json::json!({"kernel_image_path": probe_elf(), "boot_args": "console=ttyS0 probe.test=virtio-pmem"});
    expect(s, "PUT", "/boot-source", &boot.to_string(), 204);
    for (body, needle) in [
        (serde_json::json!({"id": "p1", "path_on_host": odd}), "its size must be a non-zero multiple of 2 MiB"),
        (serde_json::json!({"id": "p1", "path_on_host": ""}), "path_on_host is empty"),
        (serde_json::json!({"id": "p2", "path_on_host": file}), "differs from the path's 'p1'"),
    ] {
        let m = fault(s, "PUT", "/pmem/p1", &body.to_string(), 400);
        assert!(m.contains(needle), "{body}: {m}");
    }
    let pmem = serde_json::json!({"id": "root", "path_on_host": file, "root_device": true, "read_only": false});
    expect(s, "PUT", "/pmem/root", &pmem.to_string(), 204);
    let config: serde_json::Value = serde_json::from_str(&expect(s, "GET", "/vm/config", "", 200)).unwrap();
    assert_eq!(config["pmem"][0]["root_device"], true, "{config}");
    expect(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    let out = vm.finish(TIMEOUT);
    assert!(out.stdout.contains(" root=/dev/pmem0 rw"), "{}", out.describe());
    assert!(
        probe_result(&out.stdout, "virtio-pmem").is_some_and(|l| l.ends_with("flush=ok flushes=1")),
        "{}",
        out.describe()
    );
    assert_eq!(&std::fs::read(&file).unwrap()[..22], b"ferrovisor pmem page=0");
}

/// PATCH /pmem/{id} changes a running device's rate limiter: the probe waits for the change
/// (a configuration interrupt), then flushes five times against one flush per 200 ms, and the
/// device's metrics count the flushes that had to wait. Bad patches are refused with sentences.
#[test]
fn pmem_rate_limiter_changes_on_a_running_vm() {
    let dir = scratch_dir("api-pmem-patch");
    let file = dir.join("pmem.img");
    std::fs::write(&file, vec![0u8; 2 << 20]).unwrap();
    let (mut vm, socket) = api_vmm(&dir);
    let s = socket.as_path();
    let boot = serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": "console=ttyS0 probe.test=virtio-pmem probe.virtio-pmem.wait=config probe.virtio-pmem.flushes=5 probe.idle=on",
    });
    expect(s, "PUT", "/boot-source", &boot.to_string(), 204);
    let m = fault(s, "PATCH", "/pmem/data", r#"{"id": "data"}"#, 400);
    assert!(m.contains("needs a running VM"), "{m}");
    let bad = serde_json::json!({"id": "data", "path_on_host": file, "rate_limiter": {"ops": {"size": 1}}});
    let m = fault(s, "PUT", "/pmem/data", &bad.to_string(), 400);
    assert!(m.contains("refill_time"), "{m}");
    expect(s, "PUT", "/pmem/data", &serde_json::json!({"id": "data", "path_on_host": file}).to_string(), 204);
    expect(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    assert!(vm.wait_for_output("PROBE virtio-pmem ready", TIMEOUT), "{}", vm.stdout());
    let m = fault(s, "PATCH", "/pmem/other", r#"{"id": "other"}"#, 400);
    assert!(m.contains("no pmem device other"), "{m}");
    let m = fault(
        s,
        "PATCH",
        "/pmem/data",
        r#"{"id": "data", "rate_limiter": {"ops": {"size": 0, "refill_time": 0, "x": 1}}}"#,
        400,
    );
    assert!(m.contains("x"), "{m}");
    let limit = r#"{"id": "data", "rate_limiter": {"ops": {"size": 1, "refill_time": 200}}}"#;
    expect(s, "PATCH", "/pmem/data", limit, 204);
    // The whole line: the VM stops right after.
    assert!(vm.wait_for_output("flush=ok flushes=5\n", TIMEOUT), "{}", vm.stdout());
    let metrics: serde_json::Value = serde_json::from_str(&expect(s, "GET", "/ferrovisor/metrics", "", 200)).unwrap();
    let device = &metrics["devices"]["virtio-pmem0"];
    assert!(device["rate_limited"].as_u64().unwrap() >= 3, "{metrics}");
    expect(s, "PUT", "/ferrovisor/stop", "", 204);
    let out = vm.finish(TIMEOUT);
    assert!(
        probe_result(&out.stdout, "virtio-pmem").is_some_and(|l| l.ends_with("flush=ok flushes=5")),
        "{}",
        out.describe()
    );
}

/// A stop asked for before any VM runs is answered before the VMM exits (it used to exit while
/// the answer was still on its way, and clients saw a dropped connection).
#[test]
fn a_stop_before_start_is_answered() {
    let dir = scratch_dir("api-early-stop");
    for i in 0..20 {
        let (vm, socket) = common::api_vmm(&dir, &format!("api{i}.sock"), &[]);
        expect(&socket, "PUT", "/ferrovisor/stop", "", 204);
        assert!(vm.finish(TIMEOUT).status.success());
    }
}

/// SendCtrlAltDel presses the keys on the i8042: the probe reads them, as set 1 scan codes
/// (the controller translates, as PCs do), press and release.
#[test]
fn send_ctrl_alt_del_reaches_the_guests_keyboard_controller() {
    let dir = scratch_dir("api-ctrl-alt-del");
    let (mut vm, socket) = api_vmm(&dir);
    let s = socket.as_path();
    let m = fault(s, "PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#, 400);
    assert!(m.contains("needs a running VM"), "{m}");
    let boot = serde_json::json!({"kernel_image_path": probe_elf(), "boot_args": "console=ttyS0 probe.test=i8042"});
    expect(s, "PUT", "/boot-source", &boot.to_string(), 204);
    expect(s, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    assert!(vm.wait_for_output("PROBE i8042 ready", TIMEOUT), "{}", vm.stderr());
    expect(s, "PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#, 204);
    let out = vm.finish(TIMEOUT);
    let line = common::probe_result(&out.stdout, "i8042").unwrap_or_else(|| panic!("{}", out.describe()));
    assert_eq!(line, "PROBE i8042 ok bytes=8 scancodes=1d,38,e0,53,e0,d3,b8,9d");
}

#[test]
fn config_file_starts_a_vm_without_the_api() {
    let dir = scratch_dir("api-config-file");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).unwrap();
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": probe_elf(),
            "boot_args": format!("console=ttyS0 {}", common::RNG_AND_BLK_TESTS),
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "smt": false},
        "drives": [{"drive_id": "probe-disk", "path_on_host": disk, "is_root_device": false, "is_read_only": false}],
        "entropy": {},
        "network-interfaces": [],
        "logger": {"level": "Info"},
    });
    let file = dir.join("vm.json");
    std::fs::write(&file, config.to_string()).unwrap();
    let mut cmd = ferrovisor();
    cmd.arg("--no-api").arg("--config-file").arg(&file);
    let out = Running::start(cmd).finish(TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    common::assert_rng_and_blk_results(&out, &disk);

    // A mistake in the file: one sentence naming the field, status 2, no VM.
    let mut broken = config.clone();
    broken["machine-config"]["vcpu_count"] = serde_json::json!("one");
    std::fs::write(&file, broken.to_string()).unwrap();
    let out = common::run(&["--no-api", "--config-file", file.to_str().unwrap()], TIMEOUT);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("machine-config.vcpu_count"), "{}", out.stderr);
    let out = common::run(&["--no-api"], TIMEOUT);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("--no-api needs --config-file"), "{}", out.stderr);
}

#[test]
fn ctl_controls_a_command_line_vm_over_its_socket() {
    let dir = scratch_dir("api-ctl");
    let socket = dir.join("api.sock");
    let disk = disk_image(&dir, 64 << 10);
    let mut cmd = common::probe_command(1, "console=ttyS0 probe.test=virtio-blk probe.virtio-blk.mode=counter");
    cmd.arg("--disk").arg(format!("path={}", disk.display())).arg("--api-sock").arg(&socket);
    cmd.args(["--balloon", "size=0,stats=on"]);
    let mut vm = Running::start(cmd);
    wait_for_socket(&socket);
    wait_for_ticks(&mut vm, 2);
    let ctl = |args: &[&str]| {
        let mut all = vec!["ctl", socket.to_str().unwrap()];
        all.extend_from_slice(args);
        common::run(&all, TIMEOUT)
    };
    let info = ctl(&["info"]);
    assert!(info.status.success() && info.stdout.contains(r#""state":"Running""#), "{}", info.describe());
    // Paused: the state says so and the guest stops counting; resumed: it counts on.
    assert!(ctl(&["pause"]).status.success());
    assert!(ctl(&["info"]).stdout.contains(r#""state":"Paused""#));
    let paused_at = common::probe_ticks(&vm.stdout()).len();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(common::probe_ticks(&vm.stdout()).len(), paused_at, "the paused guest counted on");
    assert!(ctl(&["resume"]).status.success());
    assert!(ctl(&["info"]).stdout.contains(r#""state":"Running""#));
    wait_for_ticks(&mut vm, paused_at + 2);
    let metrics = ctl(&["metrics", "--prometheus"]);
    assert!(metrics.stdout.contains("ferrovisor_vcpu_exits_total"), "{}", metrics.describe());
    let stats = common::run(&["stats", socket.to_str().unwrap()], TIMEOUT);
    assert!(stats.stdout.contains(r#""guest_ram_kib":131072"#), "{}", stats.describe());
    // The probe's balloon driver is not running: the target is set and reported all the same.
    assert!(ctl(&["balloon", "8"]).status.success());
    let (_, balloon) = http(&socket, "GET", "/balloon", "");
    assert!(balloon.contains(r#""amount_mib":8"#), "{balloon}");
    let too_big = ctl(&["balloon", "4096"]);
    assert_eq!(too_big.status.code(), Some(1));
    assert!(too_big.stderr.contains("exceeds the guest's 128 MiB"), "{}", too_big.describe());
    assert!(ctl(&["stop"]).status.success());
    let out = vm.finish(TIMEOUT);
    assert_eq!(out.status.code(), Some(0), "{}", out.describe());
    let gone = ctl(&["info"]);
    assert_eq!(gone.status.code(), Some(1));
    assert!(gone.stderr.contains("cannot reach the VMM"), "{}", gone.describe());
}

/// A client that sends a request a byte at a time cannot hold its connection slot: the whole
/// request must arrive within 5 s of its first byte, or the answer is 408 and the connection
/// ends. The VMM serves others meanwhile.
#[test]
fn a_trickling_client_is_cut_off_and_others_are_served() {
    use std::io::{Read, Write};
    let dir = scratch_dir("api-trickle");
    let (_vm, socket) = api_vmm(&dir);
    let mut slow = std::os::unix::net::UnixStream::connect(&socket).unwrap();
    slow.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
    let started = std::time::Instant::now();
    let mut request = b"GET / HTTP/1.1\r\nHost: localhost\r\nX-Slow: ".to_vec();
    request.extend(b"a".repeat(200));
    let mut answer = Vec::new();
    for byte in request {
        if slow.write_all(&[byte]).is_err() {
            break;
        }
        let mut buf = [0u8; 512];
        match slow.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
        if !answer.is_empty() {
            break;
        }
        // Meanwhile the API answers everybody else.
        assert!(expect(&socket, "GET", "/", "", 200).contains("Not started"));
        std::thread::sleep(Duration::from_millis(30));
    }
    let elapsed = started.elapsed();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer:?} after {elapsed:?}");
    assert!(elapsed < Duration::from_secs(8), "cut off after {elapsed:?}");
}

/// A supervisor that stops reading the VMM's stderr must not stall it: log lines that do not
/// fit are dropped and counted, and the API keeps answering.
#[test]
fn a_full_stderr_pipe_drops_log_lines_instead_of_stalling_the_vmm() {
    let dir = scratch_dir("api-stderr-full");
    let socket = dir.join("api.sock");
    let mut child = ferrovisor()
        .arg("--api-sock")
        .arg(&socket)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let _unread = child.stderr.take();
    wait_for_socket(&socket);
    // Each bad request logs a line of about 200 bytes: 2000 of them are six pipes' worth.
    let started = std::time::Instant::now();
    for _ in 0..2000 {
        expect(&socket, "PUT", "/machine-config", r#"{"vcpu_count": "a string where a number goes"}"#, 400);
    }
    assert!(started.elapsed() < TIMEOUT);
    let metrics: serde_json::Value =
        serde_json::from_str(&expect(&socket, "GET", "/ferrovisor/metrics", "", 200)).unwrap();
    assert!(metrics["logger"]["missed_log_count"].as_u64().unwrap() > 0, "{metrics}");
    let _ = child.kill();
    let _ = child.wait();
}
