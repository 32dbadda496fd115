//! The probe guest under Ferrovisor, and under QEMU microvm to keep it VMM-agnostic.

mod common;

use std::io::Write;
use std::process::Stdio;
use std::time::Duration;

use common::{Running, probe_command, probe_lines, probe_result, qemu_probe_command, scratch_dir};

const TIMEOUT: Duration = Duration::from_secs(30);

fn run_probe(cpus: u32, cmdline: &str) -> common::Outcome {
    Running::start(probe_command(cpus, cmdline)).finish(TIMEOUT)
}

#[test]
fn probe_starts_every_vcpu_and_each_reports_its_apic_id() {
    for (cpus, ids) in [(1, "0"), (2, "0,1")] {
        let out = run_probe(cpus, "probe.test=smp");
        assert!(out.status.success(), "{}", out.describe());
        let line = probe_result(&out.stdout, "smp").unwrap_or_else(|| panic!("{}", out.describe()));
        assert!(line.starts_with(&format!("PROBE smp ok cpus={cpus} apic_ids={ids} ")), "{line}");
        assert!(out.stdout.contains("PROBE done passed=1 failed=0 skipped=0"), "{}", out.describe());
        eprintln!("probe smp with {cpus} vCPU(s): launch to exit {:.1} ms", out.elapsed.as_secs_f64() * 1e3);
    }
}

#[test]
fn probe_exception_gives_a_readable_report() {
    let out = run_probe(1, "probe.test=fault");
    let report = probe_lines(&out.stdout).into_iter().find(|l| l.starts_with("PROBE FAIL exception"));
    let report = report.unwrap_or_else(|| panic!("{}", out.describe()));
    // A page fault (14) on a user read (error 4) of the address the test names.
    assert!(report.starts_with("PROBE FAIL exception vector=000000000000000e error=0000000000000004 rip="), "{report}");
    assert!(report.ends_with("cr2=00007fff00000000"), "{report}");
    assert!(!out.stdout.contains("PROBE done"), "{}", out.describe());
    assert!(out.status.success(), "the probe resets after the report: {}", out.describe());
}

#[test]
fn probe_echoes_a_line_typed_on_the_serial_console() {
    let mut cmd = probe_command(1, "probe.test=serial");
    cmd.stdin(Stdio::piped());
    let mut vm = Running::start_with_stdin(cmd);
    assert!(vm.wait_for_output("PROBE serial ready", TIMEOUT), "{}", vm.stdout());
    vm.child.stdin.take().unwrap().write_all(b"hello from the host\n").unwrap();
    let out = vm.finish(TIMEOUT);
    assert_eq!(
        probe_result(&out.stdout, "serial"),
        Some("PROBE serial ok echo=hello from the host"),
        "{}",
        out.describe()
    );
}

#[test]
fn probe_fills_memory_and_reports_devices_it_cannot_find_as_skipped() {
    let out = run_probe(
        1,
        "probe.test=memfill,virtio-blk,virtio-net,virtio-rng,virtio-console,virtio-vsock,virtio-balloon,nonsense \
         probe.memfill.mib=32 probe.memfill.pattern=unique",
    );
    assert!(out.status.success(), "{}", out.describe());
    let memfill = probe_result(&out.stdout, "memfill").unwrap_or_else(|| panic!("{}", out.describe()));
    assert!(memfill.starts_with("PROBE memfill ok mib=32 pattern=unique pages=8192 checksum=0x"), "{memfill}");
    for device in ["virtio-blk", "virtio-net", "virtio-rng", "virtio-console", "virtio-vsock", "virtio-balloon"] {
        let line = probe_result(&out.stdout, device).unwrap_or_else(|| panic!("{}", out.describe()));
        // A disk is looked for on PCI too.
        let pci = if device == "virtio-blk" { " or on PCI bus 0" } else { "" };
        assert_eq!(line, format!("PROBE {device} skip no {device} device among the virtio_mmio.device= entries{pci}"));
    }
    assert_eq!(probe_result(&out.stdout, "nonsense"), Some("PROBE nonsense FAIL unknown test"));
    assert!(out.stdout.contains("PROBE done passed=1 failed=1 skipped=6"), "{}", out.describe());
}

/// The results that should not depend on the VMM: test, status and the values that describe
/// the guest. Left out: cycle counts, skip reasons (they name device addresses), and ring-3
/// CPUID APIC IDs (native on hosts that emulate only ring 0, so they name host CPUs).
fn comparable(output: &str) -> Vec<String> {
    probe_lines(output)
        .into_iter()
        .filter(|l| !l.starts_with("PROBE start") && !l.starts_with("PROBE cycles"))
        .map(|l| {
            let words: Vec<&str> = l.split(' ').collect();
            match words.get(2) {
                Some(&"skip") => words[..3].join(" "),
                _ => words
                    .into_iter()
                    .filter(|w| !w.starts_with("cycles=") && !w.starts_with("cpuid_apic_ids="))
                    .collect::<Vec<_>>()
                    .join(" "),
            }
        })
        .collect()
}

#[test]
fn probe_reports_the_same_under_qemu_microvm() {
    // The devices both VMMs offer today, on identical disk images.
    let dir = scratch_dir("probe-same");
    let (ours_disk, qemu_disk) = (dir.join("ours.img"), dir.join("qemu.img"));
    std::fs::write(&ours_disk, vec![0u8; 1 << 20]).unwrap();
    std::fs::write(&qemu_disk, vec![0u8; 1 << 20]).unwrap();
    let tests = "probe.test=smp,memfill,virtio-rng,virtio-blk probe.smp.cpus=2 probe.memfill.mib=16 \
                 probe.memfill.pattern=unique probe.virtio-blk.sectors=300";
    let mut cmd = probe_command(2, tests);
    cmd.args(["--rng", "--disk", &format!("path={},id=probe-disk", ours_disk.display())]);
    let ours = Running::start(cmd).finish(TIMEOUT);
    let drive = format!("if=none,id=d0,file={},format=raw", qemu_disk.display());
    let qemu = qemu_probe_command(
        2,
        tests,
        &["-device", "virtio-rng-device", "-drive", &drive, "-device", "virtio-blk-device,drive=d0,serial=probe-disk"],
    );
    let theirs = Running::start(qemu).finish(TIMEOUT);
    assert!(theirs.stdout.contains("PROBE done"), "{}", theirs.describe());
    assert_eq!(
        comparable(&ours.stdout),
        comparable(&theirs.stdout),
        "\nours:\n{}\nqemu:\n{}",
        ours.stdout,
        theirs.stdout
    );
    assert!(ours.stdout.contains("PROBE done passed=4 failed=0 skipped=0"), "{}", ours.describe());
    assert_eq!(
        std::fs::read(&ours_disk).unwrap(),
        std::fs::read(&qemu_disk).unwrap(),
        "both disks hold the same bytes"
    );
    let _ = std::fs::remove_dir_all(dir);
}
