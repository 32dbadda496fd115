//! Logging of what a guest does. A hostile guest can repeat anything millions of times a
//! second (a fault, a device reset, a boot-timer write), so each call site that a guest can
//! trigger logs its first few occurrences and then every thousandth, with a running count.

use std::sync::atomic::{AtomicU64, Ordering};

/// Occurrences a call site logs in full before it samples.
const FIRST: u64 = 10;
/// Then one occurrence in this many.
const EVERY: u64 = 1000;

/// A per-call-site counter; see [`guest_fault!`](crate::guest_fault) and
/// [`guest_event!`](crate::guest_event).
pub struct FaultCounter(AtomicU64);

impl FaultCounter {
    pub const fn new() -> Self {
        FaultCounter(AtomicU64::new(0))
    }

    /// Counts one occurrence; returns its number when it should be logged.
    pub fn hit(&self) -> Option<u64> {
        let n = self.0.fetch_add(1, Ordering::Relaxed) + 1;
        (n <= FIRST || n.is_multiple_of(EVERY)).then_some(n)
    }
}

impl Default for FaultCounter {
    fn default() -> Self {
        Self::new()
    }
}

/// `tracing::warn!` for guest-caused faults, rate-limited per call site.
#[macro_export]
macro_rules! guest_fault {
    ($($arg:tt)*) => {{
        static COUNTER: $crate::guest_log::FaultCounter = $crate::guest_log::FaultCounter::new();
        if let Some(n) = COUNTER.hit() {
            tracing::warn!("{} (occurrence {n})", format_args!($($arg)*));
        }
    }};
}

/// `tracing::info!` for lifecycle events a guest can repeat at will (a device started, the
/// balloon moved, the boot timer written), rate-limited per call site the same way.
#[macro_export]
macro_rules! guest_event {
    ($($arg:tt)*) => {{
        static COUNTER: $crate::guest_log::FaultCounter = $crate::guest_log::FaultCounter::new();
        if let Some(n) = COUNTER.hit() {
            if n == 1 {
                tracing::info!($($arg)*);
            } else {
                tracing::info!("{} (occurrence {n})", format_args!($($arg)*));
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_the_first_ten_then_every_thousandth() {
        let c = FaultCounter::new();
        let logged: Vec<u64> = (0..5000).filter_map(|_| c.hit()).collect();
        assert_eq!(logged, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 1000, 2000, 3000, 4000, 5000]);
    }
}
