//! The probe: a small test guest any VMM can boot (a vmlinux-style ELF with a PVH entry note).
//! Ring 0 (boot.S) only sets up long mode, answers port I/O and reports exceptions; the tests
//! run in ring 3 (natively fast even where the host emulates ring 0), read their orders from
//! the command line and answer in a line protocol on COM1 (see report.rs).
#![no_std]
#![no_main]

mod cmdline;
mod console;
mod hw;
mod pattern;
mod pci;
mod pvh;
mod report;
mod suite;
mod tsc;
mod virtio;

use core::arch::{asm, global_asm};

global_asm!(include_str!("boot.S"), options(att_syntax));

/// Ring 3 of the boot CPU starts here.
#[unsafe(no_mangle)]
pub extern "C" fn probe_main(start_info: u64) -> ! {
    let started = hw::rdtsc();
    let Some(info) = pvh::StartInfo::read(start_info) else {
        println!("PROBE FAIL no PVH start info at {start_info:#x}");
        hw::reset()
    };
    let cmdline = cmdline::Cmdline::new(info.cmdline());
    println!("PROBE start ram_mib={} cmdline={}", info.ram_bytes >> 20, info.cmdline());
    for test in cmdline.tests() {
        suite::run(test, cmdline, &info);
    }
    println!("PROBE cycles={}", hw::rdtsc().wrapping_sub(started));
    report::done();
    if cmdline.switch("idle") {
        hw::park()
    }
    hw::reset()
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    println!("PROBE FAIL panic: {info}");
    hw::reset()
}

// The compiler's memory intrinsics: no libc here. `rep movsb`/`rep stosb` run natively in
// ring 3 and are fast on current CPUs.

/// # Safety
/// The usual memcpy contract: valid, non-overlapping ranges.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcpy(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees both ranges.
    unsafe {
        asm!("rep movsb", inout("rcx") n => _, inout("rdi") dest => _, inout("rsi") src => _,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// Valid ranges; they may overlap.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memmove(dest: *mut u8, src: *const u8, n: usize) -> *mut u8 {
    if (dest as usize) <= (src as usize) || (dest as usize) >= (src as usize).wrapping_add(n) {
        // SAFETY: a forward copy is correct when dest does not start inside src.
        return unsafe { memcpy(dest, src, n) };
    }
    // SAFETY: copies backwards from the last byte, so overlapping bytes are read first.
    unsafe {
        asm!("std", "rep movsb", "cld",
             inout("rcx") n => _, inout("rdi") dest.add(n - 1) => _, inout("rsi") src.add(n - 1) => _,
             options(nostack));
    }
    dest
}

/// # Safety
/// A valid destination range.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memset(dest: *mut u8, c: i32, n: usize) -> *mut u8 {
    // SAFETY: the caller guarantees the range.
    unsafe {
        asm!("rep stosb", inout("rcx") n => _, inout("rdi") dest => _, in("al") c as u8,
             options(nostack, preserves_flags));
    }
    dest
}

/// # Safety
/// Valid ranges of `n` bytes.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn memcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    for i in 0..n {
        // SAFETY: the caller guarantees both ranges.
        let (x, y) = unsafe { (*a.add(i), *b.add(i)) };
        if x != y {
            return i32::from(x) - i32::from(y);
        }
    }
    0
}

/// # Safety
/// As memcmp.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn bcmp(a: *const u8, b: *const u8, n: usize) -> i32 {
    // SAFETY: forwarded contract.
    unsafe { memcmp(a, b, n) }
}
