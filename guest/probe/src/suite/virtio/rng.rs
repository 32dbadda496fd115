//! `virtio-rng`: two 64-byte requests; the bytes must be non-zero and differ.

use crate::cmdline::{Cmdline, VirtioMmioSlot};
use crate::report;
use crate::virtio::mmio::Device;
use crate::virtio::queue::Buffer;
use crate::virtio::{alloc, bytes};

const TEST: &str = "virtio-rng";
const REQUEST: usize = 64;

pub fn test(slot: &VirtioMmioSlot, cmdline: Cmdline) -> Result<(), &'static str> {
    let dev = Device::begin(slot, 0, 0).map_err(|_| "the device could not be set up")?;
    let mut q = dev.queue(0, 8).map_err(|_| "queue 0 could not be set up")?;
    dev.driver_ok();
    let a = alloc(REQUEST, 64).ok_or("out of probe memory")?;
    let b = alloc(REQUEST, 64).ok_or("out of probe memory")?;
    let mut total = 0;
    for buf in [a, b] {
        q.push(&[Buffer::writable(buf, REQUEST as u32)]).ok_or("no free descriptors")?;
        dev.notify(0);
        match dev.wait_used(&mut q, super::request_deadline(cmdline)) {
            Some((_, len)) if len as usize <= REQUEST => total += len as usize,
            Some(_) => return Err("the device claims more bytes than the buffer holds"),
            None => return Err("no answer before the deadline"),
        }
    }
    let (first, second) = (bytes(a, REQUEST), bytes(b, REQUEST));
    dev.reset();
    if total == 0 || first.iter().all(|&x| x == 0) || first == second {
        return Err("the bytes the device returned do not look random");
    }
    report::ok(TEST, format_args!("bytes={total}"));
    Ok(())
}
