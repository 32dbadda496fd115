//! virtio tests. For now they find the device among the `virtio_mmio.device=` entries and
//! report skip while the device's test is still to come.

use crate::cmdline::Cmdline;
use crate::{hw, report};

const MAGIC: u32 = 0x7472_6976; // "virt"
const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;

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

pub fn run(test: &str, id: u32, cmdline: Cmdline) {
    let found = cmdline.virtio_mmio_devices().find(|slot| {
        hw::mmio_read32(slot.base + REG_MAGIC) == MAGIC && hw::mmio_read32(slot.base + REG_DEVICE_ID) == id
    });
    match found {
        None => report::skip(test, format_args!("no {test} device among the virtio_mmio.device= entries")),
        Some(slot) => report::skip(
            test,
            format_args!(
                "found at {:#x} (virtio-mmio version {}, irq {}), but the probe does not drive it yet",
                slot.base,
                hw::mmio_read32(slot.base + REG_VERSION),
                slot.irq
            ),
        ),
    }
}
