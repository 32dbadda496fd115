//! `memfill`: fill M MiB of RAM from 16 MiB up, with identical pages (`pattern=same`) or with
//! pages that differ (`pattern=unique`), for memory-sharing tests. Pair with `probe.idle=on` to
//! keep the memory while the host measures.

use crate::cmdline::Cmdline;
use crate::pvh::StartInfo;
use crate::report;

const START: u64 = 16 << 20;
const PAGE: u64 = 4096;
const SAME_WORD: u64 = 0x5a5a_5a5a_5a5a_5a5a;

pub fn run(cmdline: Cmdline, info: &StartInfo) {
    let mib = cmdline.number("memfill", "mib", 64);
    let unique = match cmdline.param("memfill", "pattern").unwrap_or("same") {
        "same" => false,
        "unique" => true,
        other => return report::fail("memfill", format_args!("pattern={other} is neither same nor unique")),
    };
    let end = START.saturating_add(mib << 20);
    if end > info.low_ram_end {
        return report::fail(
            "memfill",
            format_args!("{mib} MiB from 16 MiB passes the end of RAM at {:#x}", info.low_ram_end),
        );
    }
    let mut checksum = 0xcbf2_9ce4_8422_2325u64;
    let mut page = START;
    while page < end {
        let word = if unique { (page / PAGE).wrapping_mul(0x9e37_79b9_7f4a_7c15) } else { SAME_WORD };
        let mut at = page;
        while at < page + PAGE {
            // SAFETY: [START, end) is RAM (checked against the memory map above), identity-mapped,
            // and above the probe's image (the linker script asserts it ends below 16 MiB).
            unsafe { core::ptr::write_volatile(at as *mut u64, word) };
            at += 8;
        }
        checksum = (checksum ^ word).wrapping_mul(0x0000_0100_0000_01b3); // FNV-1a step per page
        page += PAGE;
    }
    let pattern = if unique { "unique" } else { "same" };
    report::ok("memfill", format_args!("mib={mib} pattern={pattern} pages={} checksum={checksum:#x}", (end - START) / PAGE));
}
