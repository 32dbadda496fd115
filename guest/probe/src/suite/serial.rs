//! `serial`: echo one line the host types on COM1.

use crate::cmdline::Cmdline;
use crate::{hw, report};

const MAX_LINE: usize = 256;

pub fn run(cmdline: Cmdline) {
    // probe.serial.timeout is in TSC cycles (about 4 s at 2.5 GHz by default).
    let deadline = hw::rdtsc() + cmdline.number("serial", "timeout", 10_000_000_000);
    crate::println!("PROBE serial ready");
    let mut line = [0u8; MAX_LINE];
    let mut len = 0;
    loop {
        match crate::console::read_byte(deadline) {
            None => return report::fail("serial", format_args!("no complete line before the deadline ({len} bytes)")),
            Some(b'\n') | Some(b'\r') if len > 0 => break,
            Some(b'\n') | Some(b'\r') => {}
            Some(byte) if len < MAX_LINE => {
                line[len] = byte;
                len += 1;
            }
            Some(_) => return report::fail("serial", format_args!("line longer than {MAX_LINE} bytes")),
        }
    }
    match core::str::from_utf8(&line[..len]) {
        Ok(text) => report::ok("serial", format_args!("echo={text}")),
        Err(_) => report::fail("serial", format_args!("the line is not UTF-8")),
    }
}
