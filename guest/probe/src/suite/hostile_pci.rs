//! `hostile-pci`: a malicious driver of a virtio-pci function (the first virtio-rng on bus 0;
//! run with `--virtio-transport pci --rng`): configuration space, BARs, the MSI-X table and
//! its PBA, the common configuration and notifications, and DMA aimed at the device's own
//! registers. After each scenario the function is reset and driven again by the probe's
//! polled virtio-pci driver: an entropy request must be served.
//!
//! Each reports `PROBE hostile-pci-<name> ok answer=<what the device showed> recovered=yes`.

use super::hostile::{Answer, report_scenario};
use crate::cmdline::Cmdline;
use crate::pci::{self, VirtioPci};
use crate::virtio::alloc;
use crate::virtio::queue::{DESC_F_WRITE, write_desc};
use crate::{hw, report};

const RNG: u32 = 4;
const OBSERVE_CYCLES: u64 = 50_000_000;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
const MSIX_ENABLE: u32 = 1 << 31;
const BAR_SIZE_GUESS: u64 = 0x8000;

/// Sets the function up with its request queue and asks for 64 bytes at `buffer` (which may
/// be anything a hostile driver names); returns what the device did within the deadline.
fn request(dev: &VirtioPci, buffer: u64, len: u32) -> Answer {
    if !dev.begin() {
        return Answer::Word("features-refused");
    }
    let Some((mut q, notify_at)) = dev.queue(0, 16) else { return Answer::Word("no-queue") };
    dev.driver_ok();
    write_desc(q.desc, 0, buffer, len, DESC_F_WRITE, 0);
    q.publish(0);
    dev.notify(notify_at, 0);
    let answer = match dev.wait_used(&mut q, hw::rdtsc() + OBSERVE_CYCLES) {
        Some((_, len)) => Answer::UsedLen(len),
        None if dev.status() & 64 != 0 => Answer::NeedsReset,
        None => Answer::None,
    };
    dev.reset();
    answer
}

fn recovers(dev: &VirtioPci) -> bool {
    let Some(buffer) = alloc(64, 64) else { return false };
    matches!(request(dev, buffer, 64), Answer::UsedLen(64))
}

type Scenario = (&'static str, fn(&VirtioPci) -> Answer);

const SCENARIOS: &[Scenario] = &[
    ("bar-sizing", |d| {
        let (low, high) = (pci::config_read(d.slot, 0x10), pci::config_read(d.slot, 0x14));
        pci::config_write(d.slot, 0x10, u32::MAX);
        pci::config_write(d.slot, 0x14, u32::MAX);
        let mask = pci::config_read(d.slot, 0x10);
        pci::config_write(d.slot, 0x10, low);
        pci::config_write(d.slot, 0x14, high);
        let size = !(mask & !0xf) as u64 + 1;
        Answer::Word(if size >= 0x1000 && size.is_power_of_two() { "size-reported" } else { "size-wrong" })
    }),
    ("bar-moved-onto-another", |d| {
        // Onto the next function's BAR, then onto RAM at 0: the VMM keeps the BAR where it is.
        let low = pci::config_read(d.slot, 0x10);
        pci::config_write(d.slot, 0x10, low.wrapping_add(0x1_0000));
        pci::config_write(d.slot, 0x10, 0x4);
        let kept = pci::config_read(d.slot, 0x10) == low;
        pci::config_write(d.slot, 0x10, low);
        Answer::Word(if kept { "bar-kept" } else { "bar-moved" })
    }),
    ("config-space-all-ones", |d| {
        let id = pci::config_read(d.slot, 0);
        let command = pci::config_read(d.slot, 0x04);
        let msix = d.msix_cap.map(|at| (at, pci::config_read(d.slot, at)));
        for offset in (0..=0xfcu8).step_by(4).filter(|o| !(0x10..0x28).contains(o)) {
            pci::config_write(d.slot, offset, u32::MAX);
        }
        for offset in 0..=0xffu8 {
            if !(0x10..0x28).contains(&offset) {
                pci::config_write8(d.slot, offset, 0xa5);
            }
        }
        let same = pci::config_read(d.slot, 0) == id;
        pci::config_write(d.slot, 0x04, command);
        if let Some((at, value)) = msix {
            pci::config_write(d.slot, at, value);
        }
        Answer::Word(if same { "ids-kept" } else { "ids-changed" })
    }),
    ("msix-garbage-routes", |d| {
        // Every entry unmasked with an address no APIC has and all-ones data, MSI-X on, the
        // queue's and the configuration's vectors pointing at them: the device then interrupts.
        let Some(at) = d.msix_cap else { return Answer::Word("no-msix") };
        for entry in 0..2u64 {
            let e = d.bar + MSIX_TABLE + entry * 16;
            hw::mmio_write32(e, 0xdead_b000);
            hw::mmio_write32(e + 4, 0xffff_ffff);
            hw::mmio_write32(e + 8, u32::MAX);
            hw::mmio_write32(e + 12, 0);
        }
        let control = pci::config_read(d.slot, at);
        pci::config_write(d.slot, at, control | MSIX_ENABLE);
        pci::write16(d.common + pci::COMMON_MSIX_CONFIG, 0);
        let answer = match alloc(64, 64) {
            Some(buffer) => {
                if !d.begin() {
                    return Answer::Word("features-refused");
                }
                let Some((mut q, notify_at)) = d.queue(0, 16) else { return Answer::Word("no-queue") };
                pci::write16(d.common + pci::COMMON_QUEUE_MSIX_VECTOR, 1);
                d.driver_ok();
                write_desc(q.desc, 0, buffer, 64, DESC_F_WRITE, 0);
                q.publish(0);
                d.notify(notify_at, 0);
                match d.wait_used(&mut q, hw::rdtsc() + OBSERVE_CYCLES) {
                    Some((_, len)) => Answer::UsedLen(len),
                    None => Answer::None,
                }
            }
            None => Answer::Word("out-of-memory"),
        };
        d.reset();
        pci::config_write(d.slot, at, control & !MSIX_ENABLE);
        answer
    }),
    ("msix-table-and-pba-flooded", |d| {
        // All ones over the whole table window and the PBA, which the driver may only read.
        for offset in (MSIX_TABLE..MSIX_PBA + 0x100).step_by(4) {
            hw::mmio_write32(d.bar + offset, u32::MAX);
        }
        let pba = hw::mmio_read32(d.bar + MSIX_PBA);
        for offset in (MSIX_TABLE..MSIX_TABLE + 32).step_by(4) {
            hw::mmio_write32(d.bar + offset, 0);
        }
        Answer::Word(if pba & !0b11 == 0 { "pba-intact" } else { "pba-written" })
    }),
    ("common-config-garbage", |d| {
        let c = d.common;
        pci::write16(c + pci::COMMON_QUEUE_SELECT, 0xffff);
        pci::write16(c + pci::COMMON_QUEUE_SIZE, 0xffff);
        hw::mmio_write32(c + pci::COMMON_QUEUE_DESC, u32::MAX);
        pci::write16(c + pci::COMMON_QUEUE_ENABLE, 1);
        pci::write16(c + pci::COMMON_QUEUE_MSIX_VECTOR, 0x1234);
        hw::mmio_write32(c + pci::COMMON_DEVICE_FEATURE_SELECT, u32::MAX);
        let _ = hw::mmio_read32(c + pci::COMMON_DEVICE_FEATURE);
        hw::mmio_write32(c + pci::COMMON_DRIVER_FEATURE_SELECT, u32::MAX);
        hw::mmio_write32(c + pci::COMMON_DRIVER_FEATURE, u32::MAX);
        pci::write16(c + pci::COMMON_MSIX_CONFIG, 0xfffe);
        pci::write8(c + pci::COMMON_STATUS, 0xff);
        // Every byte of the common window past the fields.
        for offset in (56..0x1000u64).step_by(4) {
            hw::mmio_write32(c + offset, u32::MAX);
        }
        // 0xff includes FAILED (128): the device must show that the driver gave up.
        Answer::Word(if pci::read8(c + pci::COMMON_STATUS) & 128 != 0 { "failed" } else { "not-failed" })
    }),
    ("notify-everything", |d| {
        // Notifications for queues that do not exist, before any setup, across the window.
        for offset in (0x3000..0x4000u64).step_by(2) {
            pci::write16(d.bar + offset, offset as u16);
        }
        Answer::Word("notified")
    }),
    ("between-bars", |d| {
        // Past the end of BAR 0, where no device answers.
        let past = d.bar + BAR_SIZE_GUESS;
        hw::mmio_write32(past, u32::MAX);
        Answer::Word(if hw::mmio_read32(past + 4) == 0 || hw::mmio_read32(past + 4) == u32::MAX {
            "unclaimed"
        } else {
            "claimed"
        })
    }),
    ("dma-into-own-registers", |d| {
        // An entropy buffer over the device's own MSI-X table and common configuration.
        let first = request(d, d.bar + MSIX_TABLE, 64);
        let second = request(d, d.common, 64);
        match (first, second) {
            (Answer::UsedLen(0), Answer::UsedLen(0)) => Answer::UsedLen(0),
            _ => Answer::Word("wrote-registers"),
        }
    }),
    ("dma-past-ram", |d| request(d, 0x000f_ff00_0000_0000, 64)),
];

pub fn run(cmdline: Cmdline) {
    let Some(dev) = VirtioPci::find(RNG) else {
        return report::skip("hostile-pci", format_args!("no virtio-rng function on PCI bus 0"));
    };
    crate::virtio::reset_arena();
    if !recovers(&dev) {
        return report::fail("hostile-pci", format_args!("the virtio-rng function does not serve a good request"));
    }
    let only = cmdline.param("hostile-pci", "only");
    for (name, scenario) in SCENARIOS.iter().filter(|(n, _)| only.is_none_or(|o| o.split(':').any(|x| x == *n))) {
        crate::virtio::reset_arena();
        let answer = scenario(&dev);
        dev.reset();
        crate::virtio::reset_arena();
        report_scenario("hostile-pci-", name, answer, recovers(&dev));
    }
}
