//! `virtio-pmem`: write a line at the start of each of the first `.pages` (16) pages of the
//! persistent memory region, through the mapping, then ask the device to flush, which must
//! answer 0. With `.readonly=on` the region is read-only: the probe writes anyway and checks
//! that nothing changed. It flushes `.flushes` (1) times; with `.wait=config` it first prints
//! `PROBE virtio-pmem ready` and waits for a configuration change (the host changed the
//! device, such as its rate limiter).
//!
//!     PROBE virtio-pmem ok start=0x... size=N pages=16 flush=ok flushes=1
//!
//! The line of page P is `ferrovisor pmem page=P`, padded with NUL bytes to 64.

use crate::cmdline::{Cmdline, VirtioMmioSlot};
use crate::virtio::mmio::{Device, REG_INTERRUPT_ACK, REG_INTERRUPT_STATUS};
use crate::{hw, report};
use crate::virtio::queue::Buffer;
use crate::virtio::{alloc, bytes};

const TEST: &str = "virtio-pmem";
const LINE: usize = 64;

fn line(page: u64) -> [u8; LINE] {
    use core::fmt::Write;
    struct Fill([u8; LINE], usize);
    impl Write for Fill {
        fn write_str(&mut self, s: &str) -> core::fmt::Result {
            let n = s.len().min(LINE - self.1);
            self.0[self.1..self.1 + n].copy_from_slice(&s.as_bytes()[..n]);
            self.1 += n;
            Ok(())
        }
    }
    let mut fill = Fill([0; LINE], 0);
    let _ = write!(fill, "ferrovisor pmem page={page}");
    fill.0
}

pub fn test(slot: &VirtioMmioSlot, cmdline: Cmdline) -> Result<(), &'static str> {
    let dev = Device::begin(slot, 0, 0).map_err(|_| "the device could not be set up")?;
    let mut q = dev.queue(0, 8).map_err(|_| "the request queue could not be set up")?;
    dev.driver_ok();
    let (start, size) = (dev.config_read64(0), dev.config_read64(8));
    if start.checked_add(size).is_none_or(|end| end > 4 << 30) {
        return Err("the region lies beyond the probe's identity map (4 GiB)");
    }
    let pages = cmdline.number(TEST, "pages", 16).min(size / 4096);
    let readonly = cmdline.param(TEST, "readonly") == Some("on");
    for page in 0..pages {
        let at = bytes(start + page * 4096, LINE);
        let before = at[0];
        at.copy_from_slice(&line(page));
        if readonly && bytes(start + page * 4096, LINE)[0] != before {
            return Err("a read-only region took a write");
        }
    }
    if cmdline.param(TEST, "wait") == Some("config") {
        crate::println!("PROBE virtio-pmem ready");
        let deadline = hw::rdtsc() + cmdline.number(TEST, "timeout", 60_000_000_000);
        while dev.read(REG_INTERRUPT_STATUS) & 2 == 0 {
            if hw::rdtsc() > deadline {
                return Err("the host never changed the device");
            }
            hw::spin_cycles(1_000_000);
        }
        dev.write(REG_INTERRUPT_ACK, 2);
    }
    let (request, response) = (alloc(4, 4).ok_or("out of probe memory")?, alloc(4, 4).ok_or("out of probe memory")?);
    let flushes = cmdline.number(TEST, "flushes", 1);
    for _ in 0..flushes {
        bytes(request, 4).fill(0); // FLUSH
        bytes(response, 4).fill(0xff);
        q.push(&[Buffer::readable(request, 4), Buffer::writable(response, 4)]).ok_or("request ring full")?;
        dev.notify(0);
        dev.wait_used(&mut q, super::request_deadline(cmdline)).ok_or("the flush was not answered")?;
        let status = u32::from_le_bytes(bytes(response, 4).try_into().unwrap_or([0xff; 4]));
        if status != 0 {
            return Err("the flush failed");
        }
    }
    dev.reset();
    report::ok(TEST, format_args!("start={start:#x} size={size} pages={pages} flush=ok flushes={flushes}"));
    Ok(())
}
