//! `virtio-rng`: two 64-byte requests; the bytes must be non-zero and differ.

use crate::cmdline::{Cmdline, VirtioMmioSlot};
use crate::report;
use crate::virtio::mmio::Device;
use crate::virtio::queue::Buffer;
use crate::virtio::{alloc, bytes};

const TEST: &str = "virtio-rng";
const REQUEST: usize = 64;

pub fn run(slot: &VirtioMmioSlot, cmdline: Cmdline) {
    let dev = match Device::begin(slot, 0, 0) {
        Ok(dev) => dev,
        Err(e) => return report::fail(TEST, format_args!("setup: {e}")),
    };
    let mut q = match dev.queue(0, 8) {
        Ok(q) => q,
        Err(e) => return report::fail(TEST, format_args!("setup: {e}")),
    };
    dev.driver_ok();
    let (Some(a), Some(b)) = (alloc(REQUEST, 64), alloc(REQUEST, 64)) else {
        return report::fail(TEST, format_args!("out of probe memory"));
    };
    let mut total = 0;
    for buf in [a, b] {
        q.push(&[Buffer::writable(buf, REQUEST as u32)]);
        dev.notify(0);
        match dev.wait_used(&mut q, super::request_deadline(cmdline)) {
            Some((_, len)) if len as usize <= REQUEST => total += len as usize,
            Some((_, len)) => return report::fail(TEST, format_args!("the device claims {len} bytes of a {REQUEST}-byte buffer")),
            None => return report::fail(TEST, format_args!("no answer before the deadline")),
        }
    }
    let (first, second) = (bytes(a, REQUEST), bytes(b, REQUEST));
    dev.reset();
    if total == 0 || first.iter().all(|&x| x == 0) || first == second {
        return report::fail(TEST, format_args!("the device returned {total} bytes that do not look random"));
    }
    report::ok(TEST, format_args!("bytes={total}"));
}
