//! The probe's serial console on COM1: line output shared by all CPUs, and polled input.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicBool, Ordering};

use crate::hw;

const COM1: u16 = 0x3f8;
const LSR: u16 = COM1 + 5;
const LSR_DATA_READY: u8 = 1;

static LOCK: AtomicBool = AtomicBool::new(false);

struct Com1;

impl Write for Com1 {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        hw::outsb(COM1, s.as_bytes());
        Ok(())
    }
}

/// Prints one formatted line; lines from different CPUs never interleave.
pub fn print_line(args: fmt::Arguments) {
    while LOCK.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        core::hint::spin_loop();
    }
    let _ = Com1.write_fmt(args);
    let _ = Com1.write_str("\n");
    LOCK.store(false, Ordering::Release);
}

#[macro_export]
macro_rules! println {
    ($($t:tt)*) => { $crate::console::print_line(format_args!($($t)*)) };
}

/// The next received byte, or `None` once `deadline` (a TSC value) has passed.
pub fn read_byte(deadline: u64) -> Option<u8> {
    loop {
        if hw::inb(LSR) & LSR_DATA_READY != 0 {
            return Some(hw::inb(COM1));
        }
        if hw::rdtsc() > deadline {
            return None;
        }
    }
}
