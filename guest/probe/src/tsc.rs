//! The TSC's rate, for reporting throughput in MB/s: from `probe.tsc_khz=` when the harness
//! knows it, else measured against the CMOS clock's seconds (one to two seconds of waiting).

use core::sync::atomic::{AtomicU64, Ordering};

use crate::cmdline::Cmdline;
use crate::hw;

const CMOS_INDEX: u16 = 0x70;
const CMOS_DATA: u16 = 0x71;
const REG_SECONDS: u8 = 0;

fn cmos_seconds() -> u8 {
    hw::outb(CMOS_INDEX, REG_SECONDS);
    hw::inb(CMOS_DATA)
}

/// The measured rate, so that it is measured once per boot.
static MEASURED_KHZ: AtomicU64 = AtomicU64::new(0);

/// TSC kHz, or None when the clock never ticked (no CMOS RTC).
pub fn khz(cmdline: Cmdline) -> Option<u64> {
    if let Some(khz) = cmdline.param("tsc", "khz").and_then(crate::cmdline::parse_number) {
        return Some(khz);
    }
    let known = MEASURED_KHZ.load(Ordering::Relaxed);
    if known != 0 {
        return Some(known);
    }
    let khz = measure()?;
    MEASURED_KHZ.store(khz, Ordering::Relaxed);
    Some(khz)
}

fn measure() -> Option<u64> {
    // Give up after about three seconds at the TSC rates of today's hosts.
    let give_up = hw::rdtsc() + 8_000_000_000;
    let wait_tick = |from: u8| -> Option<u64> {
        while cmos_seconds() == from {
            if hw::rdtsc() > give_up {
                return None;
            }
        }
        Some(hw::rdtsc())
    };
    let start = wait_tick(cmos_seconds())?;
    let end = wait_tick(cmos_seconds())?;
    Some((end - start) / 1000)
}
