//! `fault`: a deliberate page fault, so that harnesses can check the exception report.

/// Canonical, but outside the 8 GiB identity map.
const UNMAPPED: u64 = 0x0000_7fff_0000_0000;

pub fn run() {
    crate::println!("PROBE fault reading {UNMAPPED:#x}");
    // SAFETY: this read faults on purpose; ring 0 reports the exception and ends the VM.
    let value = unsafe { core::ptr::read_volatile(UNMAPPED as *const u64) };
    crate::report::fail("fault", format_args!("reading {UNMAPPED:#x} did not fault (read {value:#x})"));
}
