//! Device assignment through vfio-user: the probe's PCI driver drives the test DMA engine that
//! `ferrovisor device-server` serves from its own process (registers, DMA both ways, MSI-X,
//! the BAR mapped into the guest, reset), a server that dies leaves the VM running with the
//! device reading all ones, and each way of getting assignment wrong is refused with its fix.

mod common;

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{DeviceServer, Running, api_call, ferrovisor, probe_command, probe_elf, probe_result, scratch_dir};

const TIMEOUT: Duration = Duration::from_secs(60);

#[test]
fn the_probe_drives_a_dma_engine_served_by_another_process() {
    let dir = scratch_dir("passthrough-dma");
    let mut server = DeviceServer::start(&dir, &[]);
    let mut cmd = probe_command(1, "probe.test=dma-engine");
    cmd.args(["--device", &server.device_arg()]);
    let out = Running::start(cmd).finish(TIMEOUT);
    assert!(out.status.success(), "{}", out.describe());
    let line = probe_result(&out.stdout, "dma-engine").unwrap();
    // BAR 0 sized as firmware sizes it; registers; 64 KiB copied each way and checksummed;
    // the completion as MSI-X vector 0 pending in the local APIC and the device saying it
    // signalled MSI-X; a completion signalled while vector 0 was masked held in the PBA and
    // delivered once unmasked; the probe's writes to the mapped BAR read by the device; a DMA
    // outside guest memory failed in the device; the reset capability cleared the device.
    for part in [
        "bar0_size=0x1000 ",
        "regs=ok ",
        "dma=65536 ",
        "msix=pending ",
        "signalled=3 ",
        "masked=held ",
        "mapped=ok ",
        "bad_dma=refused ",
        "completed=6 ",
        "reset=ok ",
        // After the reset: a completion as MSI, then as INTx through the IOAPIC.
        "msi=pending/2 ",
        "intx=pending/1",
    ] {
        assert!(line.contains(part), "'{part}' in {line}");
    }
    assert!(out.stderr.contains("device dev0: reset at the guest's request"), "{}", out.describe());
    assert!(out.stdout.contains("PROBE done passed=1 failed=0 skipped=0"), "{}", out.describe());
    // The server outlives the VM and serves the next one.
    assert!(server.alive(), "the device server died with the VMM");
    let mut again = probe_command(1, "probe.test=dma-engine");
    again.args(["--device", &server.device_arg()]);
    let out = Running::start(again).finish(TIMEOUT);
    assert!(probe_result(&out.stdout, "dma-engine").is_some_and(|l| l.contains("dma=65536 ")), "{}", out.describe());
}

#[test]
fn a_dead_device_server_reads_all_ones_and_the_vm_runs_on() {
    let dir = scratch_dir("passthrough-gone");
    let mut server = DeviceServer::start(&dir, &[]);
    // Configured through the API, before boot, with another device beside it.
    let socket = dir.join("api.sock");
    let mut cmd = ferrovisor();
    cmd.arg("--api-sock").arg(&socket);
    let mut vm = Running::start(cmd);
    common::wait_for_socket(&socket);
    let boot = serde_json::json!({
        "kernel_image_path": probe_elf(),
        "boot_args": "console=ttyS0 probe.test=dma-engine,virtio-rng probe.dma-engine.mode=gone",
    });
    api_call(&socket, "PUT", "/boot-source", &boot.to_string(), 204);
    api_call(&socket, "PUT", "/entropy", "{}", 204);
    let device = serde_json::json!({"id": "dma", "vfio_user": server.socket});
    api_call(&socket, "PUT", "/ferrovisor/devices/dma", &device.to_string(), 204);
    api_call(&socket, "PUT", "/actions", r#"{"action_type": "InstanceStart"}"#, 204);
    assert!(vm.wait_for_output("PROBE dma-engine ok", TIMEOUT), "{}", vm.stderr());
    server.child.kill().unwrap();
    // The probe ends the VM when it is done: the VMM exits.
    let out = vm.finish(TIMEOUT);
    let gone = probe_result(&out.stdout, "dma-engine-gone").unwrap();
    assert_eq!(gone, "PROBE dma-engine-gone ok id=0xffffffff scratch=0xffffffff config=0xffffffff");
    assert!(probe_result(&out.stdout, "virtio-rng").is_some_and(|l| l.contains(" ok ")), "{}", out.describe());
    assert!(out.stderr.contains("is gone"), "the loss is logged: {}", out.describe());
    assert!(out.status.success(), "{}", out.describe());
}

#[test]
fn a_stalled_device_server_costs_the_vcpu_one_deadline_not_the_vm() {
    let dir = scratch_dir("passthrough-stalled");
    let server = DeviceServer::start(&dir, &[]);
    let mut cmd = probe_command(1, "probe.test=dma-engine,tsc probe.dma-engine.mode=gone");
    cmd.args(["--device", &server.device_arg()]);
    let mut vm = Running::start(cmd);
    assert!(vm.wait_for_output("PROBE dma-engine ok", TIMEOUT), "{}", vm.stderr());
    // Stopped, not dead: the socket stays open and nothing answers.
    // SAFETY: kill with the server's own pid.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGSTOP) };
    let stopped = std::time::Instant::now();
    let out = vm.finish(TIMEOUT);
    // SAFETY: as above; the server is killed when dropped.
    unsafe { libc::kill(server.child.id() as i32, libc::SIGCONT) };
    let gone = probe_result(&out.stdout, "dma-engine-gone").unwrap_or_default();
    assert!(gone.contains("id=0xffffffff"), "{}", out.describe());
    assert!(probe_result(&out.stdout, "tsc").is_some_and(|l| l.contains(" ok ")), "{}", out.describe());
    assert!(out.stderr.contains("is gone"), "{}", out.describe());
    assert!(stopped.elapsed() < Duration::from_secs(20), "the VM waited {:?}", stopped.elapsed());
    assert!(out.status.success(), "{}", out.describe());
}

#[test]
fn assignment_mistakes_are_refused_with_their_fix() {
    let dir = scratch_dir("passthrough-mistakes");
    let refused = |device: &str| {
        let mut cmd = probe_command(1, "probe.test=dma-engine");
        cmd.args(["--device", device]);
        let out = Running::start(cmd).finish(TIMEOUT);
        assert!(!out.status.success(), "{device}: {}", out.describe());
        out.stderr
    };
    // A socket that is not there is refused before the VM starts, as every missing path is.
    let mut cmd = probe_command(1, "probe.test=dma-engine");
    cmd.args(["--device", &format!("vfio-user={}", dir.join("none.sock").display())]);
    let out = Running::start(cmd).finish(TIMEOUT);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("cannot be reached (No such file or directory"), "{}", out.describe());
    assert!(out.stderr.contains("start the device's vfio-user server first"), "{}", out.describe());

    // A socket whose server speaks something else.
    let not_vfio = dir.join("http.sock");
    let _ = std::fs::remove_file(&not_vfio);
    let listener = UnixListener::bind(&not_vfio).unwrap();
    let talker = std::thread::spawn(move || {
        use std::io::{Read, Write};
        let (mut s, _) = listener.accept().unwrap();
        let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
        let _ = s.read(&mut [0u8; 64]);
    });
    let wrong = refused(&format!("vfio-user={}", not_vfio.display()));
    assert!(wrong.contains("does not speak vfio-user"), "{wrong}");
    talker.join().unwrap();

    // A BAR larger than the window for assigned devices.
    let server = DeviceServer::start(&dir, &["--shared-bar-kib", "1048576"]);
    let big = refused(&server.device_arg());
    assert!(big.contains("BAR 2 (1048576 KiB) does not fit"), "{big}");
    drop(server);

    // Kernel VFIO on a host without an IOMMU: the error names what is missing.
    if Path::new("/dev/vfio/vfio").exists() {
        eprintln!("skipping the no-IOMMU case: this host has /dev/vfio/vfio");
    } else {
        let host_device = std::fs::read_dir("/sys/bus/pci/devices")
            .ok()
            .and_then(|mut d| d.next())
            .and_then(Result::ok)
            .map_or_else(|| PathBuf::from("/sys/bus/pci/devices/0000:00:00.0"), |e| e.path());
        let no_iommu = refused(&format!("vfio={}", host_device.display()));
        assert!(
            no_iommu.contains("kernel VFIO needs an IOMMU") || no_iommu.contains("is not a PCI device"),
            "{no_iommu}"
        );
        if host_device.exists() {
            assert!(no_iommu.contains("vfio-pci") && no_iommu.contains("IOMMU"), "{no_iommu}");
        }
    }

    // The API and the command line name the field and the fix.
    let out = common::run(&["run", "--kernel", probe_elf(), "--device", "vfio-user="], TIMEOUT);
    assert_eq!(out.status.code(), Some(2), "{}", out.describe());
    assert!(out.stderr.contains("use vfio=, vfio-user= and id="), "{}", out.stderr);
    let (vm, socket) = common::api_vmm(&dir, "api.sock", &[]);
    let both = r#"{"id": "d", "vfio": "/sys", "vfio_user": "/tmp"}"#;
    let answer = api_call(&socket, "PUT", "/ferrovisor/devices/d", both, 400);
    assert!(answer.contains("give exactly one of vfio"), "{answer}");
    let answer = api_call(&socket, "PUT", "/ferrovisor/devices/e", r#"{"id": "d", "vfio_user": "/tmp"}"#, 400);
    assert!(answer.contains("differs from the path's"), "{answer}");
    drop(vm);
}
