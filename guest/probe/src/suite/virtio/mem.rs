//! `virtio-mem`: plug what the host asks for, use it, and give it back. The probe first checks
//! that the device refuses a misaligned plug, a plug outside the region and a plug beyond the
//! requested size; prints `PROBE virtio-mem ready`; waits for a requested size above zero;
//! plugs it (runs of up to 16 blocks per request), writes every page of it and reads it back;
//! prints `PROBE virtio-mem plugged mib=N`; waits for the host to ask for less; unplugs the
//! top blocks down to the new size; and checks their state. The device offers
//! VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE, and the probe breaks that rule on purpose to see it
//! enforced: it stores to every page of the blocks it unplugged and reads them back, and every
//! store must have been dropped (they read zeroes). Then:
//!
//!     PROBE virtio-mem ok plugged_mib=N unplugged_mib=M block_kib=B start=0x... stores_dropped=P

use crate::cmdline::{Cmdline, VirtioMmioSlot};
use crate::virtio::mmio::Device;
use crate::virtio::queue::{Buffer, Virtqueue};
use crate::virtio::{alloc, bytes};
use crate::{hw, report};

const TEST: &str = "virtio-mem";
/// The probe's identity map ends here.
const MAPPED: u64 = 8 << 30;
const CONFIG_BLOCK_SIZE: u64 = 0;
const CONFIG_ADDR: u64 = 16;
const CONFIG_REGION_SIZE: u64 = 24;
const CONFIG_PLUGGED: u64 = 40;
const CONFIG_REQUESTED: u64 = 48;
const PLUG: u16 = 0;
const UNPLUG: u16 = 1;
const UNPLUG_ALL: u16 = 2;
const STATE: u16 = 3;
const ACK: u16 = 0;
const NACK: u16 = 1;
const ERROR: u16 = 3;
const PLUGGED: u16 = 0;
const UNPLUGGED: u16 = 1;
/// Blocks per plug request.
const RUN: u64 = 16;

struct Driver<'a> {
    dev: Device,
    q: Virtqueue,
    request: u64,
    response: u64,
    cmdline: Cmdline<'a>,
}

impl Driver<'_> {
    /// One request: the response type and state.
    fn send(&mut self, kind: u16, addr: u64, blocks: u16) -> Result<(u16, u16), &'static str> {
        let r = bytes(self.request, 24);
        r.fill(0);
        r[0..2].copy_from_slice(&kind.to_le_bytes());
        r[8..16].copy_from_slice(&addr.to_le_bytes());
        r[16..18].copy_from_slice(&blocks.to_le_bytes());
        bytes(self.response, 10).fill(0xff);
        self.q
            .push(&[Buffer::readable(self.request, 24), Buffer::writable(self.response, 10)])
            .ok_or("request ring full")?;
        self.dev.notify(0);
        self.dev.wait_used(&mut self.q, super::request_deadline(self.cmdline)).ok_or("a request was not answered")?;
        let a = bytes(self.response, 10);
        Ok((u16::from_le_bytes([a[0], a[1]]), u16::from_le_bytes([a[8], a[9]])))
    }

    fn expect(&mut self, kind: u16, addr: u64, blocks: u16, want: (u16, u16), why: &'static str) -> Result<(), &'static str> {
        match self.send(kind, addr, blocks)? == want {
            true => Ok(()),
            false => Err(why),
        }
    }

    /// Polls the requested size until `wanted` accepts it.
    fn wait_requested(&self, wanted: impl Fn(u64) -> bool) -> Result<u64, &'static str> {
        let deadline = hw::rdtsc() + self.cmdline.number(TEST, "timeout", 60_000_000_000);
        loop {
            let requested = self.dev.config_read64(CONFIG_REQUESTED);
            if wanted(requested) {
                return Ok(requested);
            }
            if hw::rdtsc() > deadline {
                return Err("the host never changed the requested size");
            }
            hw::spin_cycles(1_000_000);
        }
    }
}

pub fn test(slot: &VirtioMmioSlot, cmdline: Cmdline) -> Result<(), &'static str> {
    let dev = Device::begin(slot, 0, 0).map_err(|_| "the device could not be set up")?;
    let q = dev.queue(0, 8).map_err(|_| "the request queue could not be set up")?;
    dev.driver_ok();
    let (block, start, size) =
        (dev.config_read64(CONFIG_BLOCK_SIZE), dev.config_read64(CONFIG_ADDR), dev.config_read64(CONFIG_REGION_SIZE));
    if block == 0 || block % 4096 != 0 || size % block != 0 || start % block != 0 {
        return Err("the region is not cut into whole blocks of pages");
    }
    if start.checked_add(size).is_none_or(|end| end > MAPPED) {
        return Err("the region lies beyond the probe's identity map (8 GiB)");
    }
    let (request, response) = (alloc(24, 8).ok_or("out of probe memory")?, alloc(16, 8).ok_or("out of probe memory")?);
    let mut d = Driver { dev, q, request, response, cmdline };
    if d.dev.config_read64(CONFIG_PLUGGED) != 0 {
        d.expect(UNPLUG_ALL, 0, 0, (ACK, 0), "UNPLUG_ALL was refused")?;
    }
    d.expect(PLUG, start + block / 2, 1, (ERROR, 0), "a misaligned plug was not an error")?;
    d.expect(PLUG, start + size, 1, (ERROR, 0), "a plug past the region was not an error")?;
    d.expect(PLUG, start, 0, (ERROR, 0), "a plug of no blocks was not an error")?;
    if d.dev.config_read64(CONFIG_REQUESTED) == 0 {
        d.expect(PLUG, start, 1, (NACK, 0), "a plug beyond the requested size was not refused")?;
    }
    crate::println!("PROBE virtio-mem ready");
    let want = d.wait_requested(|r| r > 0)?;
    if want > size || want % block != 0 {
        return Err("the requested size does not fit the region");
    }
    let blocks = want / block;
    let mut first = 0;
    while first < blocks {
        let n = RUN.min(blocks - first);
        d.expect(PLUG, start + first * block, n as u16, (ACK, 0), "a plug within the requested size failed")?;
        first += n;
    }
    if d.dev.config_read64(CONFIG_PLUGGED) != want {
        return Err("plugged_size differs from what was plugged");
    }
    d.expect(PLUG, start, 1, (ERROR, 0), "plugging a plugged block was not an error")?;
    for page in (start..start + want).step_by(4096) {
        bytes(page, 8).copy_from_slice(&page.to_le_bytes());
    }
    for page in (start..start + want).step_by(4096) {
        if bytes(page, 8) != page.to_le_bytes() {
            return Err("plugged memory did not keep what was written");
        }
    }
    crate::println!("PROBE virtio-mem plugged mib={}", want >> 20);
    let keep = d.wait_requested(|r| r < want)?;
    if keep % block != 0 {
        return Err("the new requested size is not a whole number of blocks");
    }
    let gone = (want - keep) / block;
    d.expect(UNPLUG, start + keep, gone as u16, (ACK, 0), "the unplug failed")?;
    d.expect(STATE, start + keep, gone as u16, (ACK, UNPLUGGED), "unplugged blocks are not reported unplugged")?;
    if keep > 0 {
        d.expect(STATE, start, (keep / block) as u16, (ACK, PLUGGED), "kept blocks are not reported plugged")?;
    }
    d.expect(UNPLUG, start + keep, 1, (ERROR, 0), "unplugging an unplugged block was not an error")?;
    if d.dev.config_read64(CONFIG_PLUGGED) != keep {
        return Err("plugged_size differs after the unplug");
    }
    let unplugged = (start + keep..start + want).step_by(4096);
    for page in unplugged.clone() {
        // SAFETY: the page lies in the identity map (checked above); the store is meant to
        // reach unplugged memory, which the host must refuse.
        unsafe { core::ptr::write_volatile(page as *mut u64, !page) };
    }
    let mut dropped = 0u64;
    for page in unplugged {
        // SAFETY: as above.
        if unsafe { core::ptr::read_volatile(page as *const u64) } != 0 {
            return Err("a store to unplugged memory was kept: the host gave it memory");
        }
        dropped += 1;
    }
    report::ok(
        TEST,
        format_args!(
            "plugged_mib={} unplugged_mib={} block_kib={} start={start:#x} stores_dropped={dropped}",
            want >> 20,
            (want - keep) >> 20,
            block >> 10
        ),
    );
    Ok(())
}
