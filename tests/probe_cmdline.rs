//! Unit tests of the probe's command-line parsing, compiled for the host.

#[path = "../guest/probe/src/cmdline.rs"]
mod cmdline;

use cmdline::{Cmdline, VirtioMmioSlot, parse_number, parse_virtio_mmio};

#[test]
fn tests_and_parameters() {
    let c = Cmdline::new("console=ttyS0 probe.test=smp,memfill probe.memfill.mib=64 probe.test=serial, probe.idle=on");
    assert_eq!(c.tests().collect::<Vec<_>>(), ["smp", "memfill", "serial"]);
    assert_eq!(c.param("memfill", "mib"), Some("64"));
    assert_eq!(c.number("memfill", "mib", 1), 64);
    assert_eq!(c.number("memfill", "pages", 7), 7);
    assert_eq!(c.param("mem", "fill.mib"), None);
    assert!(c.switch("idle"));
    assert!(!c.switch("id"));
    assert_eq!(Cmdline::new("").tests().count(), 0);
}

#[test]
fn later_parameters_win() {
    let c = Cmdline::new("probe.smp.cpus=2 probe.smp.cpus=4");
    assert_eq!(c.number("smp", "cpus", 0), 4);
}

#[test]
fn virtio_mmio_entries_parse_as_the_kernel_reads_them() {
    let c = Cmdline::new(
        "virtio_mmio.device=4K@0xd0000000:5 virtio_mmio.device=0x200@0xfeb00200:13:1 virtio_mmio.device=junk",
    );
    let slots: Vec<VirtioMmioSlot> = c.virtio_mmio_devices().collect();
    assert_eq!(
        slots,
        [
            VirtioMmioSlot { base: 0xd000_0000, size: 4096, irq: 5 },
            VirtioMmioSlot { base: 0xfeb0_0200, size: 0x200, irq: 13 }
        ]
    );
    assert_eq!(parse_virtio_mmio("0@0x1000:5"), None);
    assert_eq!(parse_virtio_mmio("4K@0xffffffffffffffff:5"), None);
    assert_eq!(parse_virtio_mmio("4K@0x1000"), None);
}

#[test]
fn numbers_take_hex_and_size_suffixes() {
    assert_eq!(parse_number("42"), Some(42));
    assert_eq!(parse_number("0x1F"), Some(31));
    assert_eq!(parse_number("2M"), Some(2 << 20));
    assert_eq!(parse_number("1g"), Some(1 << 30));
    assert_eq!(parse_number(""), None);
    assert_eq!(parse_number("K"), None);
    assert_eq!(parse_number("99999999999999999999"), None);
    assert_eq!(parse_number("0xffffffffffffffffG"), None);
}
