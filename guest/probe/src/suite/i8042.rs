//! `i8042`: read the keyboard controller's output until `.count` (8) bytes came or the
//! deadline passed, polling its status port, and report them: the host presses keys
//! (SendCtrlAltDel) after `PROBE i8042 ready`.

use crate::cmdline::Cmdline;
use crate::{hw, report};

const DATA_PORT: u16 = 0x60;
const STATUS_PORT: u16 = 0x64;
const OUTPUT_FULL: u8 = 0x01;

pub fn run(cmdline: Cmdline) {
    let want = cmdline.number("i8042", "count", 8).min(32) as usize;
    let deadline = hw::rdtsc() + cmdline.number("i8042", "timeout", 25_000_000_000);
    crate::println!("PROBE i8042 ready");
    let mut codes = [0u8; 32];
    let mut got = 0;
    while got < want && hw::rdtsc() < deadline {
        if hw::inb(STATUS_PORT) & OUTPUT_FULL != 0 {
            codes[got] = hw::inb(DATA_PORT);
            got += 1;
        }
    }
    if got == 0 {
        return report::fail("i8042", format_args!("no byte before the deadline"));
    }
    let mut text = [0u8; 96];
    let mut len = 0;
    for (i, code) in codes[..got].iter().enumerate() {
        let hex = b"0123456789abcdef";
        if i > 0 {
            text[len] = b',';
            len += 1;
        }
        text[len] = hex[usize::from(code >> 4)];
        text[len + 1] = hex[usize::from(code & 0xf)];
        len += 2;
    }
    let text = core::str::from_utf8(&text[..len]).unwrap_or("?");
    report::ok("i8042", format_args!("bytes={got} scancodes={text}"));
}
