//! Snapshots with the probe: a guest counting on its disk is snapshotted, stopped and loaded
//! in a new process, and goes on counting from where it was with its disk intact; a diff
//! snapshot holds only the pages written since the last one; damaged or foreign files are
//! refused with a clear message; a multi-queue interface comes back with the pairs its driver
//! had set.

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{Running, api_call as expect, probe_elf, probe_ticks, scratch_dir};

const TIMEOUT: Duration = Duration::from_secs(60);

fn api_vmm(dir: &Path, name: &str) -> (Running, PathBuf) {
    common::api_vmm(dir, name, &[])
}

fn wait_for_ticks(vm: &mut Running, at_least: usize) -> Vec<u64> {
    common::wait_for_ticks(vm, at_least, TIMEOUT)
}

/// A probe counting on `disk` every ~4 ms, with dirty page tracking (in KVM's dirty rings of
/// `dirty_ring` pages a vCPU, or its bitmap if 0), started through the API.
fn counting_probe(dir: &Path, disk: &Path, dirty_ring: u32) -> (Running, PathBuf) {
    let (mut vm, socket) = api_vmm(dir, "first.sock");
    if dirty_ring > 0 {
        // A ring size that is no power of two is refused.
        expect(&socket, "PUT", "/ferrovisor/memory", r#"{"dirty_ring": 1000}"#, 400);
        expect(&socket, "PUT", "/ferrovisor/memory", &format!(r#"{{"dirty_ring": {dirty_ring}}}"#), 204);
    }
    let boot = serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": "console=ttyS0 probe.test=virtio-blk probe.virtio-blk.mode=counter probe.virtio-blk.every=10000000",
    });
    expect(&socket, "PUT", "/boot-source", &boot.to_string(), 204);
    expect(
        &socket,
        "PUT",
        "/machine-config",
        r#"{"vcpu_count": 1, "mem_size_mib": 64, "track_dirty_pages": true}"#,
        204,
    );
    // Through io_uring: the worker drains the ring before it stops for the snapshot.
    let drive = serde_json::json!({"drive_id": "counter", "path_on_host": disk, "is_root_device": false,
                                   "io_engine": "Async"});
    expect(&socket, "PUT", "/drives/counter", &drive.to_string(), 204);
    expect(&socket, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    wait_for_ticks(&mut vm, 20);
    (vm, socket)
}

/// A state file changed by `change` and given a matching checksum, as an attacker would.
fn resigned(good: &[u8], change: &dyn Fn(&mut serde_json::Value)) -> Vec<u8> {
    let split = good.iter().position(|&b| b == b'\n').unwrap();
    let mut body: serde_json::Value = serde_json::from_slice(&good[split + 1..]).unwrap();
    change(&mut body);
    vmm::snapshot::signed(&serde_json::to_vec(&body).unwrap())
}

fn snapshot_body(state: &Path, mem: &Path, kind: &str) -> String {
    serde_json::json!({"snapshot_path": state, "mem_file_path": mem, "snapshot_type": kind}).to_string()
}

fn load_body(state: &Path, mem: &Path, resume: bool) -> String {
    serde_json::json!({
        "snapshot_path": state,
        "mem_backend": {"backend_type": "File", "backend_path": mem},
        "resume_vm": resume,
    })
    .to_string()
}

#[test]
fn a_counting_probe_resumes_in_a_new_process_where_it_was_with_its_disk_intact() {
    let dir = scratch_dir("snapshot-counter");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let (first, socket) = counting_probe(&dir, &disk, 0);
    let (state, mem) = (dir.join("vm.snap"), dir.join("vm.mem"));
    let m = expect(&socket, "PUT", "/snapshot/create", &snapshot_body(&state, &mem, "Full"), 400);
    assert!(m.contains("pause it first"), "{m}");
    expect(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    expect(&socket, "PUT", "/snapshot/create", &snapshot_body(&state, &mem, "Full"), 204);
    // The first VMM goes away for good: what comes next is the snapshot's doing.
    expect(&socket, "PUT", "/ferrovisor/stop", "", 204);
    let first = first.finish(TIMEOUT);
    let at_snapshot = *probe_ticks(&first.stdout).last().expect("ticks before the snapshot");
    common::check_counter_disk(&std::fs::read(&disk).unwrap(), at_snapshot);

    let (mut second, socket) = api_vmm(&dir, "second.sock");
    expect(&socket, "PUT", "/snapshot/load", &load_body(&state, &mem, false), 204);
    assert!(expect(&socket, "GET", "/", "", 200).contains(r#""state":"Paused""#));
    std::thread::sleep(Duration::from_millis(300));
    assert!(probe_ticks(&second.stdout()).is_empty(), "a paused restore runs nothing: {}", second.stdout());
    expect(&socket, "PATCH", "/vm", r#"{"state": "Resumed"}"#, 204);
    let ticks = wait_for_ticks(&mut second, 30);
    // The count goes on from the snapshot: tick at_snapshot + 1 may have been cut in half.
    assert!(ticks[0] == at_snapshot + 1 || ticks[0] == at_snapshot + 2, "{at_snapshot} then {ticks:?}");
    // A restored VM snapshots again, onto the very files it was restored from and still maps
    // its memory from: they are replaced by new files, not truncated under it.
    let (state2, mem2) = (state.clone(), mem.clone());
    expect(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    expect(&socket, "PUT", "/snapshot/create", &snapshot_body(&state2, &mem2, "Full"), 204);
    expect(&socket, "PUT", "/ferrovisor/stop", "", 204);
    let second = second.finish(TIMEOUT);
    assert_eq!(second.status.code(), Some(0), "{}", second.describe());
    let at_second = common::assert_one_count(&[&first.stdout, &second.stdout]);
    common::check_counter_disk(&std::fs::read(&disk).unwrap(), at_second);

    let (mut third, socket) = api_vmm(&dir, "third.sock");
    expect(&socket, "PUT", "/snapshot/load", &load_body(&state2, &mem2, true), 204);
    wait_for_ticks(&mut third, 10);
    expect(&socket, "PUT", "/ferrovisor/stop", "", 204);
    let third = third.finish(TIMEOUT);
    let last = common::assert_one_count(&[&first.stdout, &second.stdout, &third.stdout]);
    assert!(last > at_second + 5, "the third VMM counted on");
    common::check_counter_disk(&std::fs::read(&disk).unwrap(), last);
    // The memory file is sparse: a 64 MiB guest that touched little takes little room.
    let allocated = std::fs::metadata(&mem).unwrap().blocks() * 512;
    assert_eq!(std::fs::metadata(&mem).unwrap().len(), 64 << 20);
    assert!(allocated < 8 << 20, "{allocated} bytes allocated for the memory file");
}

#[test]
fn a_diff_snapshot_holds_only_dirtied_pages_and_merges_onto_its_base() {
    // KVM's dirty bitmap logs the vCPUs' writes, then its dirty rings.
    for dirty_ring in [0, 4096] {
        diff_snapshot(dirty_ring);
    }
}

fn diff_snapshot(dirty_ring: u32) {
    let dir = scratch_dir(&format!("snapshot-diff-{dirty_ring}"));
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let (first, socket) = counting_probe(&dir, &disk, dirty_ring);
    let (base_state, base_mem) = (dir.join("base.snap"), dir.join("base.mem"));
    let (diff_state, diff_mem) = (dir.join("diff.snap"), dir.join("diff.mem"));
    expect(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    expect(&socket, "PUT", "/snapshot/create", &snapshot_body(&base_state, &base_mem, "Full"), 204);
    expect(&socket, "PATCH", "/vm", r#"{"state": "Resumed"}"#, 204);
    std::thread::sleep(Duration::from_millis(200));
    expect(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    expect(&socket, "PUT", "/snapshot/create", &snapshot_body(&diff_state, &diff_mem, "Diff"), 204);
    expect(&socket, "PUT", "/ferrovisor/stop", "", 204);
    let first = first.finish(TIMEOUT);
    if first.stderr.contains("which this KVM lacks") {
        eprintln!("dirty_ring={dirty_ring}: this host's KVM has no dirty rings; its bitmap logged instead");
    }
    let at_diff = *probe_ticks(&first.stdout).last().unwrap();

    // The counter touches a few pages (its stack, its buffers, the rings, the serial output
    // path); a diff of a 64 MiB guest is a handful of them, far fewer than the full one.
    let data_bytes = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;
    let (full, diff) = (data_bytes(&base_mem), data_bytes(&diff_mem));
    assert!(diff > 0 && diff <= 64 * 4096, "the diff holds {diff} bytes");
    assert!(diff * 4 < full, "the diff ({diff} bytes) is much smaller than the full snapshot ({full} bytes)");

    // The diff on top of the base is the VM at the diff's time.
    let merged = dir.join("merged.mem");
    std::fs::copy(&base_mem, &merged).unwrap();
    let out = common::run(
        &["snapshot-merge", "--base", merged.to_str().unwrap(), "--diff", diff_mem.to_str().unwrap()],
        TIMEOUT,
    );
    assert!(out.status.success(), "{}", out.describe());
    let (mut second, socket) = api_vmm(&dir, "second.sock");
    expect(&socket, "PUT", "/snapshot/load", &load_body(&diff_state, &merged, true), 204);
    wait_for_ticks(&mut second, 10);
    expect(&socket, "PUT", "/ferrovisor/stop", "", 204);
    let second = second.finish(TIMEOUT);
    assert_eq!(second.status.code(), Some(0));
    // The count goes on from the diff's time, not the base's.
    let last = common::assert_one_count(&[&first.stdout, &second.stdout]);
    assert!(last > at_diff + 5, "{last} after {at_diff}");
}

#[test]
fn damaged_and_foreign_snapshots_are_refused() {
    let dir = scratch_dir("snapshot-refused");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 64 << 10]).unwrap();
    let (first, socket) = counting_probe(&dir, &disk, 0);
    let (state, mem) = (dir.join("vm.snap"), dir.join("vm.mem"));
    expect(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    let m = expect(&socket, "PUT", "/snapshot/create", &snapshot_body(&state, &mem, "Full"), 204);
    assert!(m.is_empty());
    expect(&socket, "PUT", "/ferrovisor/stop", "", 204);
    first.finish(TIMEOUT);

    let (vm, socket) = api_vmm(&dir, "second.sock");
    let good = std::fs::read(&state).unwrap();
    let fault = |body: &str| {
        let answer = expect(&socket, "PUT", "/snapshot/load", body, 400);
        serde_json::from_str::<serde_json::Value>(&answer).unwrap()["fault_message"].as_str().unwrap().to_string()
    };
    // One byte changed in the state.
    let mut damaged = good.clone();
    let at = damaged.len() - 10;
    damaged[at] ^= 1;
    std::fs::write(&state, &damaged).unwrap();
    assert!(fault(&load_body(&state, &mem, true)).contains("is corrupt"));
    // Another format version.
    let text = String::from_utf8(good.clone()).unwrap();
    std::fs::write(&state, text.replacen(r#""format_version":1"#, r#""format_version":99"#, 1)).unwrap();
    let m = fault(&load_body(&state, &mem, true));
    assert!(m.contains("format 99") && m.contains("reads format 1 only"), "{m}");
    // Not a snapshot at all; a memory file too small; Uffd.
    std::fs::write(&state, b"hello\n").unwrap();
    assert!(fault(&load_body(&state, &mem, true)).contains("not a Ferrovisor snapshot"));
    std::fs::write(&state, &good).unwrap();
    let small = dir.join("small.mem");
    std::fs::write(&small, vec![0u8; 4096]).unwrap();
    assert!(fault(&load_body(&state, &small, true)).contains("the memory file holds 4096 bytes"));
    let uffd =
        serde_json::json!({"snapshot_path": state, "mem_backend": {"backend_type": "Uffd", "backend_path": "/x"}});
    assert!(fault(&uffd.to_string()).contains("Uffd is not supported"));
    // Files that are not what they must be are refused at once: no wait on a FIFO with no
    // writer, no endless read of /dev/zero.
    let fifo = dir.join("state.fifo");
    common::mkfifo(&fifo);
    assert!(fault(&load_body(&fifo, &mem, true)).contains("is a FIFO; give a regular file"));
    assert!(fault(&load_body(Path::new("/dev/zero"), &mem, true)).contains("is a character device"));
    assert!(fault(&load_body(&state, &fifo, true)).contains("is a FIFO; give a regular file"));
    // Files crafted with a valid checksum: every field is untrusted.
    let crafted = |change: &dyn Fn(&mut serde_json::Value)| {
        std::fs::write(&state, resigned(&good, change)).unwrap();
        fault(&load_body(&state, &mem, true))
    };
    let m = crafted(&|v| v["config"]["cpus"] = 0.into());
    assert!(m.contains("its configuration is refused"), "{m}");
    let m = crafted(&|v| v["config"]["memory_mib"] = 100_000_000.into());
    assert!(m.contains("its configuration is refused"), "{m}");
    let m = crafted(&|v| v["regions"] = serde_json::json!([[0, u64::MAX], [4096, 4096]]));
    assert!(m.contains("its memory regions do not match"), "{m}");
    std::fs::write(&state, &good).unwrap();
    // Nothing was left half-built: the good snapshot still loads.
    expect(&socket, "PUT", "/snapshot/load", &load_body(&state, &mem, true), 204);
    expect(&socket, "PUT", "/ferrovisor/stop", "", 204);
    assert_eq!(vm.finish(TIMEOUT).status.code(), Some(0));
}

/// vsock connections do not survive a snapshot (as in Firecracker): the guest is told with a
/// transport reset event, in the VM that goes on and in the one restored from the snapshot.
/// The restored VM takes its vsock socket and its interface's TAP from the load's overrides,
/// and its clock from the wall clock (`clock_realtime`); bad overrides are refused first.
#[test]
fn a_snapshot_resets_vsock_connections_and_tells_the_guest() {
    let dir = scratch_dir("snapshot-vsock");
    let (mut first, socket) = api_vmm(&dir, "first.sock");
    let boot = serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": "console=ttyS0 probe.test=virtio-vsock probe.virtio-vsock.mode=events probe.idle=on",
    });
    expect(&socket, "PUT", "/boot-source", &boot.to_string(), 204);
    let vsock = serde_json::json!({"guest_cid": 3, "uds_path": dir.join("v.sock")});
    expect(&socket, "PUT", "/vsock", &vsock.to_string(), 204);
    let (tap, moved_tap) = (format!("fvs{}a", std::process::id()), format!("fvs{}b", std::process::id()));
    let net = serde_json::json!({"iface_id": "eth0", "host_dev_name": tap, "mtu": 1400});
    expect(&socket, "PUT", "/network-interfaces/eth0", &net.to_string(), 204);
    expect(&socket, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    assert!(first.wait_for_output("PROBE virtio-vsock events ready", TIMEOUT), "{}", first.stderr());
    let (state, mem) = (dir.join("vm.snap"), dir.join("vm.mem"));
    expect(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    expect(&socket, "PUT", "/snapshot/create", &snapshot_body(&state, &mem, "Full"), 204);
    expect(&socket, "PATCH", "/vm", r#"{"state": "Resumed"}"#, 204);
    let reset = "PROBE virtio-vsock ok mode=events event=transport-reset";
    // (The device served again, its listener bound anew: else no event could come.)
    assert!(first.wait_for_output(reset, TIMEOUT), "the running guest heard of it: {}", first.stdout());
    expect(&socket, "PUT", "/ferrovisor/stop", "", 204);
    first.finish(TIMEOUT);

    let (mut second, socket) = api_vmm(&dir, "second.sock");
    let moved = dir.join("moved.sock");
    let load = |overrides: serde_json::Value| {
        let mut body: serde_json::Value = serde_json::from_str(&load_body(&state, &mem, true)).unwrap();
        body.as_object_mut().unwrap().extend(overrides.as_object().unwrap().clone());
        body.to_string()
    };
    for (overrides, needle) in [
        (serde_json::json!({"network_overrides": [{"iface_id": "eth9", "host_dev_name": "x"}]}), "no interface eth9"),
        (serde_json::json!({"network_overrides": [{"iface_id": "eth0", "host_dev_name": ""}]}), "host_dev_name"),
        (serde_json::json!({"vsock_override": {"uds_path": ""}}), "uds_path is empty"),
    ] {
        let answer = expect(&socket, "PUT", "/snapshot/load", &load(overrides.clone()), 400);
        assert!(answer.contains(needle), "{overrides}: {answer}");
    }
    let overrides = serde_json::json!({
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": moved_tap}],
        "vsock_override": {"uds_path": moved},
        "clock_realtime": true,
    });
    expect(&socket, "PUT", "/snapshot/load", &load(overrides), 204);
    assert!(second.wait_for_output(reset, TIMEOUT), "the restored guest heard of it: {}", second.stdout());
    let socket_type = std::fs::metadata(&moved).map(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type()));
    assert!(matches!(socket_type, Ok(true)), "the restored VM listens on the moved socket: {socket_type:?}");
    assert!(Path::new(&format!("/sys/class/net/{moved_tap}")).exists(), "the restored VM opened the moved TAP");
    let config: serde_json::Value = serde_json::from_str(&expect(&socket, "GET", "/vm/config", "", 200)).unwrap();
    assert_eq!(config["network-interfaces"][0]["host_dev_name"], moved_tap.as_str(), "{config}");
    assert_eq!(config["network-interfaces"][0]["mtu"], 1400, "{config}");
    expect(&socket, "PUT", "/ferrovisor/stop", "", 204);
    assert_eq!(second.finish(TIMEOUT).status.code(), Some(0));
}

const MQ_FLOWS: u16 = 64;

/// A probe that set two queue pairs on a multi-queue TAP is snapshotted while it waits for
/// frames. The VM it came from resumes, and a new process restores it: both keep using both
/// pairs (both TAP queues attached) without the driver asking again, so the host's flows
/// spread over both receive queues and all arrive, in each.
#[test]
fn a_multi_queue_interface_is_restored_with_the_pairs_its_driver_set() {
    let dir = scratch_dir("snapshot-mq");
    let tap = common::TestTap::multi_queue("fvsmq");
    let (mut first, socket) = api_vmm(&dir, "first.sock");
    let boot = serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": format!("console=ttyS0 probe.test=virtio-net probe.virtio-net.mode=mq probe.virtio-net.tx=0 \
                              probe.virtio-net.rx={MQ_FLOWS} probe.virtio.timeout=100000000000"),
    });
    expect(&socket, "PUT", "/boot-source", &boot.to_string(), 204);
    expect(&socket, "PUT", "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 64}"#, 204);
    let nic = serde_json::json!({"iface_id": "eth0", "host_dev_name": tap.name});
    expect(&socket, "PUT", "/network-interfaces/eth0", &nic.to_string(), 204);
    expect(&socket, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    assert!(first.wait_for_output(" pairs=2", TIMEOUT), "{}", first.stdout());
    let mac = common::probe_net_mac(&first.stdout());
    let (state, mem) = (dir.join("vm.snap"), dir.join("vm.mem"));
    expect(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    expect(&socket, "PUT", "/snapshot/create", &snapshot_body(&state, &mem, "Full"), 204);
    expect(&socket, "PATCH", "/vm", r#"{"state": "Resumed"}"#, 204);
    let check = common::send_flows_to_probe(&common::PacketSocket::bind(&tap.name), mac, 20000, MQ_FLOWS, 5);
    let first = first.finish(TIMEOUT);
    check(&first);
    assert!(first.stderr.contains("virtio-net: the driver uses 2 queue pairs"), "{}", first.describe());

    let (second, socket) = api_vmm(&dir, "second.sock");
    expect(&socket, "PUT", "/snapshot/load", &load_body(&state, &mem, true), 204);
    let check = common::send_flows_to_probe(&common::PacketSocket::bind(&tap.name), mac, 30000, MQ_FLOWS, 5);
    let second = second.finish(TIMEOUT);
    check(&second);
    assert!(
        !second.stderr.contains("the driver uses"),
        "the restored device did not need asking: {}",
        second.describe()
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// A snapshot written before interfaces had several queue pairs has no `queues` in its
/// configuration; each interface had one pair then, whatever the vCPUs. A VM of two vCPUs (which
/// would now get two pairs) restores from such a file with its one pair, and frames flow.
#[test]
fn a_snapshot_from_before_multi_queue_restores_its_interfaces_with_one_pair() {
    let dir = scratch_dir("snapshot-one-pair");
    let tap = common::TestTap::multi_queue("fvsop");
    let socket = dir.join("first.sock");
    let mut cmd = common::probe_command(
        2,
        "probe.test=virtio-net probe.virtio-net.mode=mq probe.virtio-net.mq=off probe.virtio-net.tx=0 \
         probe.virtio-net.rx=8 probe.virtio.timeout=100000000000",
    );
    cmd.args(["--net", &format!("tap={},queues=1", tap.name)]).arg("--api-sock").arg(&socket);
    let mut first = Running::start(cmd);
    assert!(first.wait_for_output(" pairs=1", TIMEOUT), "{}", first.stdout());
    let mac = common::probe_net_mac(&first.stdout());
    let (state, mem) = (dir.join("vm.snap"), dir.join("vm.mem"));
    expect(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    expect(&socket, "PUT", "/snapshot/create", &snapshot_body(&state, &mem, "Full"), 204);
    expect(&socket, "PUT", "/ferrovisor/stop", "", 204);
    first.finish(TIMEOUT);

    // The state file as the earlier Ferrovisor wrote it: no `queues`, signed again.
    let data = std::fs::read(&state).unwrap();
    let split = data.iter().position(|&b| b == b'\n').unwrap();
    let mut body: serde_json::Value = serde_json::from_slice(&data[split + 1..]).unwrap();
    for nic in body["config"]["nets"].as_array_mut().unwrap() {
        assert_eq!(nic.as_object_mut().unwrap().remove("queues"), Some(serde_json::json!(1)));
    }
    std::fs::write(&state, vmm::snapshot::signed(&serde_json::to_vec(&body).unwrap())).unwrap();

    let (second, socket) = api_vmm(&dir, "second.sock");
    expect(&socket, "PUT", "/snapshot/load", &load_body(&state, &mem, true), 204);
    let far_side = common::PacketSocket::bind(&tap.name);
    for flow in 0..8 {
        far_side.send(&common::udp_frame_to_probe(mac, 41000 + flow, 4));
    }
    let out = second.finish(TIMEOUT);
    let line = common::probe_result(&out.stdout, "virtio-net").unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(line.contains(" rx=8 ") && line.ends_with("rx_per_queue=8,0,0,0"), "{line}");
    let _ = std::fs::remove_dir_all(dir);
}

/// A snapshot taken while the guest keeps 32 reads in flight through io_uring: the worker
/// finishes what the ring holds before it stops, so in the new process the guest goes on
/// where it was, and every one of its reads (checked against the disk's pattern) is right.
#[test]
fn a_snapshot_with_reads_in_flight_resumes_with_every_read_exact() {
    let dir = scratch_dir("snapshot-in-flight");
    let image = dir.join("disk.img");
    std::fs::write(&image, common::patterned_image(7, 4 << 20)).unwrap();
    const OPS: u32 = 400_000;
    let (mut first, socket) = api_vmm(&dir, "first.sock");
    let boot = serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": format!("console=ttyS0 probe.test=virtio-blk probe.virtio-blk.mode=throughput \
                              probe.virtio-blk.mib=4 probe.virtio-blk.ops={OPS} probe.virtio-blk.depth=32 \
                              probe.virtio-blk.verify=7 probe.tsc.khz=1000000 probe.virtio.timeout=100000000000"),
    });
    expect(&socket, "PUT", "/boot-source", &boot.to_string(), 204);
    expect(&socket, "PUT", "/machine-config", r#"{"vcpu_count": 1, "mem_size_mib": 64}"#, 204);
    let drive = serde_json::json!({"drive_id": "data", "path_on_host": image, "is_root_device": false,
                                   "io_engine": "Async"});
    expect(&socket, "PUT", "/drives/data", &drive.to_string(), 204);
    expect(&socket, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    assert!(first.wait_for_output("PROBE start", TIMEOUT), "{}", first.stdout());
    // Into the random reads, which run for seconds.
    std::thread::sleep(Duration::from_millis(300));
    let (state, mem) = (dir.join("vm.snap"), dir.join("vm.mem"));
    expect(&socket, "PATCH", "/vm", r#"{"state": "Paused"}"#, 204);
    expect(&socket, "PUT", "/snapshot/create", &snapshot_body(&state, &mem, "Full"), 204);
    expect(&socket, "PUT", "/ferrovisor/stop", "", 204);
    let first = first.finish(TIMEOUT);
    assert!(
        common::probe_result(&first.stdout, "virtio-blk").is_none(),
        "the snapshot came before the reads ended; take it sooner or give more ops: {}",
        first.describe()
    );

    let (second, socket) = api_vmm(&dir, "second.sock");
    expect(&socket, "PUT", "/snapshot/load", &load_body(&state, &mem, true), 204);
    let second = second.finish(TIMEOUT);
    let line = common::probe_result(&second.stdout, "virtio-blk").unwrap_or_else(|| panic!("{}", second.describe()));
    assert!(line.starts_with("PROBE virtio-blk ok mode=throughput depth=32 event_idx=on "), "{line}");
    assert!(line.contains(" seq_bytes=4194304 ") && line.contains(&format!(" rand_ops={OPS} ")), "{line}");
    let _ = std::fs::remove_dir_all(dir);
}
