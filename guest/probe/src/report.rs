//! The line protocol every harness parses, whatever the VMM:
//!
//!     PROBE <test> ok key=value ...
//!     PROBE <test> FAIL reason
//!     PROBE <test> skip reason
//!     PROBE done passed=N failed=N skipped=N

use core::fmt;
use core::sync::atomic::{AtomicU32, Ordering};

static PASSED: AtomicU32 = AtomicU32::new(0);
static FAILED: AtomicU32 = AtomicU32::new(0);
static SKIPPED: AtomicU32 = AtomicU32::new(0);

pub fn ok(test: &str, details: fmt::Arguments) {
    PASSED.fetch_add(1, Ordering::Relaxed);
    crate::println!("PROBE {test} ok {details}");
}

pub fn fail(test: &str, reason: fmt::Arguments) {
    FAILED.fetch_add(1, Ordering::Relaxed);
    crate::println!("PROBE {test} FAIL {reason}");
}

pub fn skip(test: &str, reason: fmt::Arguments) {
    SKIPPED.fetch_add(1, Ordering::Relaxed);
    crate::println!("PROBE {test} skip {reason}");
}

pub fn done() {
    crate::println!(
        "PROBE done passed={} failed={} skipped={}",
        PASSED.load(Ordering::Relaxed),
        FAILED.load(Ordering::Relaxed),
        SKIPPED.load(Ordering::Relaxed)
    );
}
