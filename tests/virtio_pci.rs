//! Ferrovisor's virtio-pci transport driven by a hostile guest: the probe's own polled
//! virtio-pci driver (it finds the function and its structures through configuration space and
//! the capability list) attacks configuration space, BAR 0, the MSI-X table and PBA, the
//! common configuration and notifications, and aims DMA at the device's own registers.

mod common;

use std::time::Duration;

use common::{Running, probe_command, probe_result};

const TIMEOUT: Duration = Duration::from_secs(30);

#[test]
fn hostile_pci_driver_is_answered_logged_and_the_function_keeps_serving() {
    let mut cmd = probe_command(1, "probe.test=hostile-pci");
    cmd.args(["--virtio-transport", "pci", "--balloon", "size=0", "--rng"]);
    let out = Running::start(cmd).finish(TIMEOUT);
    let hostile: Vec<&str> = out.stdout.lines().filter(|l| l.starts_with("PROBE hostile-pci-")).collect();
    assert_eq!(hostile.len(), 10, "{}", out.describe());
    for line in &hostile {
        assert!(line.ends_with(" recovered=yes"), "{line}");
    }
    for (scenario, answer) in [
        // The BAR reads back its size while being sized, and stays put when moved.
        ("bar-sizing", "size-reported"),
        ("bar-moved-onto-another", "bar-kept"),
        ("config-space-all-ones", "ids-kept"),
        // MSI-X routes to an address no APIC has: KVM takes them, the request is served.
        ("msix-garbage-routes", "used-len=64"),
        ("msix-table-and-pba-flooded", "pba-intact"),
        // Status 0xff includes FAILED: the device shows it until the reset.
        ("common-config-garbage", "failed"),
        ("between-bars", "unclaimed"),
        // DMA never reaches MMIO: only guest RAM is written.
        ("dma-into-own-registers", "used-len=0"),
        ("dma-past-ram", "used-len=0"),
    ] {
        let line = probe_result(&out.stdout, &format!("hostile-pci-{scenario}")).unwrap();
        assert!(line.contains(&format!("answer={answer} ")), "{line}");
    }
    for fault in [
        "virtio-rng: the guest moved BAR 0",
        "virtio-rng: ignored a write (Size) to queue 65535, which does not exist",
        "virtio-rng: notify for queue 1000, which does not exist",
    ] {
        assert!(out.stderr.contains(fault), "'{fault}' logged: {}", out.describe());
    }
    assert!(out.stdout.contains("PROBE done passed=10 failed=0 skipped=0"), "{}", out.describe());
    assert!(out.status.success(), "{}", out.describe());
}
