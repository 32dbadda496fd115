//! `serial`: echo one line the host types on COM1. With `probe.serial.flood=BYTES` it
//! instead writes that many bytes (lines of `x`) as fast as it can, waits `settle` TSC cycles
//! (about 1 s by default) and reports: a rate limit on the host's side shows as missing bytes.

use crate::cmdline::Cmdline;
use crate::{hw, report};

const MAX_LINE: usize = 256;

fn flood(bytes: u64, settle: u64) {
    let mut line = [b'x'; 64];
    line[63] = b'\n';
    let mut left = bytes;
    while left > 0 {
        let n = left.min(64);
        hw::outsb(0x3f8, &line[..n as usize]);
        left -= n;
    }
    hw::spin_cycles(settle);
    report::ok("serial", format_args!("flood={bytes}"));
}

pub fn run(cmdline: Cmdline) {
    let bytes = cmdline.number("serial", "flood", 0);
    if bytes > 0 {
        return flood(bytes, cmdline.number("serial", "settle", 2_500_000_000));
    }
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
