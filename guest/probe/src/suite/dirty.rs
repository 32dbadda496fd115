//! `dirty`: keeps memory changing for a migration to chase. It writes a pattern over `mib` MiB
//! from 16 MiB up (default 32), page after page and pass after pass, for `secs` seconds
//! (default 10), at `rate_mib` MiB/s (default 0: as fast as it can). A table below the pages
//! keeps each page's generation. Every page is written once first, then the paced writes
//! begin. A page holds its index, its generation and a checksum, and the rest of it follows
//! from those. Each rewrite first checks the page's generation and checksum, and at the end
//! every page is checked whole: a page that went back a generation, or holds anything else, is
//! a FAIL naming it. The longest gap between two readings of the TSC, in the writes or in the
//! waits between them, is the pause the guest saw:
//!
//!     PROBE dirty ok pages=N generations=G writes=W max_gap_us=U
//!
//! With `gaps_over_us` set, the eight longest gaps over it are listed first, each with when it
//! began after the paced writes did: `PROBE dirty gap at_ms=T us=U`.

use crate::cmdline::Cmdline;
use crate::pvh::StartInfo;
use crate::{hw, report};

const TEST: &str = "dirty";
const START: u64 = 16 << 20;
const PAGE: u64 = 4096;
const WORDS: u64 = PAGE / 8;

/// The longest gaps seen, by (start, length) in TSC cycles.
struct Gaps {
    over: u64,
    longest: [(u64, u64); 8],
}

impl Gaps {
    fn saw(&mut self, at: u64, gap: u64) {
        if self.over == 0 || gap <= self.over {
            return;
        }
        let shortest = (0..self.longest.len()).min_by_key(|&i| self.longest[i].1).unwrap_or(0);
        if gap > self.longest[shortest].1 {
            self.longest[shortest] = (at, gap);
        }
    }
}

fn checksum(index: u64, generation: u64) -> u64 {
    (index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ generation).wrapping_mul(0x0000_0100_0000_01b3)
}

fn word(index: u64, generation: u64, at: u64) -> u64 {
    match at {
        0 => index,
        1 => generation,
        2 => checksum(index, generation),
        _ => checksum(index, generation) ^ at.wrapping_mul(0xff51_afd7_ed55_8ccd),
    }
}

pub fn run(cmdline: Cmdline, info: &StartInfo) {
    if let Err(e) = test(cmdline, info) {
        report::fail(TEST, format_args!("{e}"));
    }
}

fn test(cmdline: Cmdline, info: &StartInfo) -> Result<(), &'static str> {
    let mib = cmdline.number(TEST, "mib", 32);
    let secs = cmdline.number(TEST, "secs", 10);
    let rate_mib = cmdline.number(TEST, "rate_mib", 0);
    let pages = (mib << 20) / PAGE;
    let table = START;
    let first = START + (pages * 4).div_ceil(PAGE) * PAGE;
    if pages == 0 || first + pages * PAGE > info.low_ram_end {
        return Err("the pages and their table do not fit in RAM from 16 MiB");
    }
    let khz = crate::tsc::khz(cmdline).ok_or("the TSC rate is unknown (no CMOS clock)")?;
    let generation_of = |page: u64| (table + page * 4) as *mut u32;
    // Every page holds generation 1 before the paced writes begin, so that each is checked
    // whatever the rate.
    let write = |page: u64, generation: u64| {
        let base = first + page * PAGE;
        for at in 0..WORDS {
            // SAFETY: the page lies in [first, first + pages * PAGE), RAM above the probe's image
            // (checked above), identity-mapped.
            unsafe { core::ptr::write_volatile((base + at * 8) as *mut u64, word(page, generation, at)) };
        }
        // SAFETY: the table lies in RAM above the probe's image (checked above), identity-mapped.
        unsafe { core::ptr::write_volatile(generation_of(page), generation as u32) };
    };
    for page in 0..pages {
        write(page, 1);
    }
    let cycles_per_page = if rate_mib == 0 { 0 } else { khz * 1000 / (rate_mib * 256) };
    let start = hw::rdtsc();
    let end = start + secs * khz * 1000;
    let (mut last, mut max_gap, mut writes, mut page) = (start, 0u64, 0u64, 0u64);
    let mut gaps = Gaps { over: cmdline.number(TEST, "gaps_over_us", 0) * khz / 1000, longest: [(0, 0); 8] };
    loop {
        let now = hw::rdtsc();
        max_gap = max_gap.max(now.saturating_sub(last));
        gaps.saw(last, now.saturating_sub(last));
        last = now;
        if now >= end {
            break;
        }
        // SAFETY: as above.
        let held = unsafe { core::ptr::read_volatile(generation_of(page)) } as u64;
        // Each rewrite first checks what the page holds, so that a page lost in a move is
        // caught before the rewrite hides it.
        let base = first + page * PAGE;
        // SAFETY: as above.
        let found = unsafe { [core::ptr::read_volatile((base + 8) as *const u64), core::ptr::read_volatile((base + 16) as *const u64)] };
        if found != [held, checksum(page, held)] {
            report::fail(TEST, format_args!("page {page} at {base:#x} holds generation {} where the table says {held}", found[0]));
            return Ok(());
        }
        write(page, held + 1);
        writes += 1;
        page = (page + 1) % pages;
        if cycles_per_page != 0 {
            // A pause that falls between two paced writes counts as itself, not as itself
            // plus the wait for the next write.
            loop {
                let now = hw::rdtsc();
                max_gap = max_gap.max(now.saturating_sub(last));
                gaps.saw(last, now.saturating_sub(last));
                last = now;
                if now >= start + writes * cycles_per_page {
                    break;
                }
                core::hint::spin_loop();
            }
        }
    }
    let mut generations = 0;
    for page in 0..pages {
        // SAFETY: as above.
        let generation = unsafe { core::ptr::read_volatile(generation_of(page)) } as u64;
        generations = generations.max(generation);
        let base = first + page * PAGE;
        for at in 0..WORDS {
            // SAFETY: as above.
            let found = unsafe { core::ptr::read_volatile((base + at * 8) as *const u64) };
            if found != word(page, generation, at) {
                // SAFETY: as above.
                let held = unsafe { core::ptr::read_volatile((base + 8) as *const u64) };
                let why = if held < generation { "went back a generation" } else { "holds what was never written" };
                // The report names the page, which a fixed sentence cannot.
                report::fail(TEST, format_args!("page {page} at {base:#x} {why} (generation {held}, table {generation})"));
                return Ok(());
            }
        }
    }
    let mut longest = gaps.longest;
    longest.sort_unstable_by_key(|g| g.0);
    for (at, gap) in longest.into_iter().filter(|g| g.1 > 0) {
        crate::println!("PROBE dirty gap at_ms={} us={}", at.saturating_sub(start) / khz, gap * 1000 / khz);
    }
    report::ok(
        TEST,
        format_args!("pages={pages} generations={generations} writes={writes} max_gap_us={}", max_gap * 1000 / khz),
    );
    Ok(())
}
