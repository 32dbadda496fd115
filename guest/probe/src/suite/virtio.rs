//! virtio tests: find the device among the `virtio_mmio.device=` entries, drive it, report.

mod balloon;
mod blk;
mod console;
mod net;
mod rng;

use crate::cmdline::Cmdline;
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
        _ => return None,
    })
}

/// How long one request may take, in TSC cycles (a few seconds on today's hosts).
pub fn request_deadline(cmdline: Cmdline) -> u64 {
    crate::hw::rdtsc() + cmdline.number("virtio", "timeout", 10_000_000_000)
}

pub fn run(test: &str, id: u32, cmdline: Cmdline, info: &StartInfo) {
    let Some(slot) = mmio::find(cmdline, id) else {
        return report::skip(test, format_args!("no {test} device among the virtio_mmio.device= entries"));
    };
    crate::virtio::reset_arena();
    match test {
        "virtio-rng" => rng::run(&slot, cmdline),
        "virtio-blk" => blk::run(&slot, cmdline),
        "virtio-net" => net::run(&slot, cmdline),
        "virtio-console" => console::run(&slot, cmdline),
        "virtio-balloon" => balloon::run(&slot, cmdline, info.low_ram_end),
        _ => report::skip(
            test,
            format_args!("found at {:#x} (irq {}), but the probe does not drive it yet", slot.base, slot.irq),
        ),
    }
}
