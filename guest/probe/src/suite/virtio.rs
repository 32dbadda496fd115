//! virtio tests: find the device among the `virtio_mmio.device=` entries, drive it, report.

mod balloon;
mod blk;
mod console;
mod ip;
mod ip6;
mod mem;
mod net;
mod pmem;
mod rng;
mod vsock;

use crate::cmdline::{Cmdline, VirtioMmioSlot};
use crate::pvh::StartInfo;
use crate::report;
use crate::virtio::mmio;

/// The virtio device ID each test drives.
pub fn device_id(test: &str) -> Option<u32> {
    Some(match test {
        "virtio-net" => 1,
        "virtio-blk" => 2,
        "virtio-console" => 3,
        "virtio-rng" => 4,
        "virtio-balloon" => 5,
        "virtio-vsock" => 19,
        "virtio-mem" => 24,
        "virtio-pmem" => 27,
        _ => return None,
    })
}

/// How long one request may take, in TSC cycles (a few seconds on today's hosts).
pub fn request_deadline(cmdline: Cmdline) -> u64 {
    crate::hw::rdtsc() + cmdline.number("virtio", "timeout", 10_000_000_000)
}

/// A device test: Ok, or the reason for its FAIL line.
type DeviceTest = fn(&VirtioMmioSlot, Cmdline) -> Result<(), &'static str>;

/// Runs `check`, or `throughput` when `probe.<test>.mode=throughput`; an error is reported.
fn run_device(test: &str, slot: &VirtioMmioSlot, cmdline: Cmdline, check: DeviceTest, throughput: Option<DeviceTest>) {
    let chosen = match (cmdline.param(test, "mode"), throughput) {
        (Some("throughput"), Some(throughput)) => throughput,
        (Some("throughput"), None) => {
            return report::fail(test, format_args!("{test} has no throughput mode"));
        }
        _ => check,
    };
    if let Err(reason) = chosen(slot, cmdline) {
        report::fail(test, format_args!("{reason}"));
    }
}

fn run_device_on(test: &str, check: impl FnOnce() -> Result<(), &'static str>) {
    if let Err(reason) = check() {
        report::fail(test, format_args!("{reason}"));
    }
}

pub fn run(test: &str, id: u32, cmdline: Cmdline, info: &StartInfo) {
    let Some(slot) = mmio::find(cmdline, id) else {
        // A disk may be a PCI function instead (on a PC machine).
        if test == "virtio-blk" {
            let Some(dev) = crate::pci::VirtioPci::find(id) else {
                return report::skip(test, format_args!("no {test} device among the virtio_mmio.device= entries or on PCI bus 0"));
            };
            crate::virtio::reset_arena();
            return run_device_on(test, || blk::test_pci(dev, cmdline));
        }
        return report::skip(test, format_args!("no {test} device among the virtio_mmio.device= entries"));
    };
    crate::virtio::reset_arena();
    match test {
        "virtio-rng" => run_device(test, &slot, cmdline, rng::test, None),
        "virtio-blk" if cmdline.param(test, "mode") == Some("counter") => {
            if let Err(reason) = blk::counter(&slot, cmdline) {
                report::fail(test, format_args!("{reason}"));
            }
        }
        "virtio-blk" => run_device(test, &slot, cmdline, blk::test, Some(blk::throughput)),
        "virtio-net" if cmdline.param(test, "mode") == Some("sink") => {
            if let Err(reason) = net::sink(&slot, cmdline) {
                report::fail(test, format_args!("{reason}"));
            }
        }
        "virtio-net" if cmdline.param(test, "mode") == Some("mq") => {
            if let Err(reason) = net::multi_queue(&slot, cmdline) {
                report::fail(test, format_args!("{reason}"));
            }
        }
        "virtio-net" if cmdline.param(test, "mode") == Some("ip") => {
            if let Err(reason) = ip::test(&slot, cmdline) {
                report::fail(test, format_args!("{reason}"));
            }
        }
        "virtio-net" if cmdline.param(test, "mode") == Some("ip6") => {
            if let Err(reason) = ip6::test(&slot, cmdline) {
                report::fail(test, format_args!("{reason}"));
            }
        }
        "virtio-net" => run_device(test, &slot, cmdline, net::test, Some(net::throughput)),
        "virtio-console" => run_device(test, &slot, cmdline, console::test, None),
        "virtio-vsock" if cmdline.param(test, "mode") == Some("events") => {
            if let Err(reason) = vsock::events(&slot, cmdline) {
                report::fail(test, format_args!("{reason}"));
            }
        }
        "virtio-vsock" => run_device(test, &slot, cmdline, vsock::test, None),
        "virtio-pmem" => run_device(test, &slot, cmdline, pmem::test, None),
        "virtio-mem" => run_device(test, &slot, cmdline, mem::test, None),
        "virtio-balloon" => {
            if let Err(reason) = balloon::test(&slot, cmdline, info.low_ram_end) {
                report::fail(test, format_args!("{reason}"));
            }
        }
        _ => report::skip(
            test,
            format_args!("found at {:#x} (irq {}), but the probe does not drive it yet", slot.base, slot.irq),
        ),
    }
}
