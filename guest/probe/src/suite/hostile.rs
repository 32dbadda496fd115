//! `hostile`: behave as a malicious driver towards a virtio-blk device, one scenario at a
//! time, and report what the device did. After each scenario the probe resets the device and
//! checks that a good request (read sector 0) still succeeds: a device that stops serving is a
//! FAIL; a VMM that crashes or hangs shows as a missing `PROBE done`.
//!
//! Each scenario reports `PROBE hostile-<name> ok answer=<what the device did> recovered=yes`,
//! where the answer is `status=N` (the request completed with that virtio-blk status),
//! `used-len=N` (completed without writing the status byte), `none` (ignored),
//! `needs-reset` (the device set DEVICE_NEEDS_RESET) or a scenario-specific word.

use crate::cmdline::{Cmdline, VirtioMmioSlot};
use crate::virtio::mmio::{self, Device};
use crate::virtio::queue::{DESC_F_NEXT, DESC_F_WRITE, Virtqueue, write_desc};
use crate::virtio::{alloc, bytes};
use crate::{hw, report};

const BLK_ID: u32 = 2;
const QUEUE_SIZE: u16 = 16;
const T_IN: u32 = 0;
const STATUS_NEEDS_RESET: u32 = 64;
const F_INDIRECT_DESC: u64 = 1 << 28;
const DESC_F_INDIRECT: u16 = 4;
/// How long to watch for the device's answer: about 20 ms.
const OBSERVE_CYCLES: u64 = 50_000_000;
/// Far above any guest RAM this probe is given, below the 52-bit physical limit.
const OUTSIDE_RAM: u64 = 0x000f_ff00_0000_0000;

/// One request's memory: header, a sector of data, the status byte.
#[derive(Clone, Copy)]
struct Request {
    header: u64,
    data: u64,
    status: u64,
}

impl Request {
    fn new(sector: u64) -> Option<Request> {
        let req = Request { header: alloc(16, 16)?, data: alloc(512, 512)?, status: alloc(1, 1)? };
        let h = bytes(req.header, 16);
        h[0..4].copy_from_slice(&T_IN.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        bytes(req.status, 1)[0] = 0xff;
        Some(req)
    }

    /// The well-formed three-descriptor chain at table slots 0, 1, 2.
    fn write_chain(&self, desc: u64) {
        write_desc(desc, 0, self.header, 16, DESC_F_NEXT, 1);
        write_desc(desc, 1, self.data, 512, DESC_F_WRITE | DESC_F_NEXT, 2);
        write_desc(desc, 2, self.status, 1, DESC_F_WRITE, 0);
    }
}

struct Ctx<'a> {
    slot: &'a VirtioMmioSlot,
    indirect: bool,
}

/// A device with queue 0 set up and DRIVER_OK, plus one request's memory.
fn bring_up(slot: &VirtioMmioSlot) -> Option<(Device, Virtqueue, Request)> {
    let dev = Device::begin(slot, 0, F_INDIRECT_DESC).ok()?;
    let q = dev.queue(0, QUEUE_SIZE).ok()?;
    dev.driver_ok();
    Some((dev, q, Request::new(0)?))
}

/// Watches the queue: what did the device do with the request?
fn observe(dev: &Device, q: &mut Virtqueue, req: &Request) -> Answer {
    let deadline = hw::rdtsc() + OBSERVE_CYCLES;
    match dev.wait_used(q, deadline) {
        Some((_, len)) => match bytes(req.status, 1)[0] {
            0xff => Answer::UsedLen(len),
            status => Answer::Status(status),
        },
        None if dev.status() & STATUS_NEEDS_RESET != 0 => Answer::NeedsReset,
        None => Answer::None,
    }
}

/// What a device did with a hostile request (also what `hostile-net` reports).
#[derive(Clone, Copy)]
pub(super) enum Answer {
    Status(u8),
    UsedLen(u32),
    NeedsReset,
    None,
    Word(&'static str),
}

impl core::fmt::Display for Answer {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Answer::Status(s) => write!(f, "status={s}"),
            Answer::UsedLen(l) => write!(f, "used-len={l}"),
            Answer::NeedsReset => write!(f, "needs-reset"),
            Answer::None => write!(f, "none"),
            Answer::Word(w) => write!(f, "{w}"),
        }
    }
}

/// After a reset, does a good request still complete with status OK?
fn recovers(slot: &VirtioMmioSlot) -> bool {
    let Some((dev, mut q, req)) = bring_up(slot) else { return false };
    req.write_chain(q.desc);
    q.publish(0);
    dev.notify(0);
    let ok = matches!(observe(&dev, &mut q, &req), Answer::Status(0));
    dev.reset();
    ok
}

/// A scenario on a freshly set up device: it corrupts something, then observe() tells.
fn on_queue(ctx: &Ctx, hostile: impl FnOnce(&Device, &mut Virtqueue, &Request)) -> Answer {
    let Some((dev, mut q, req)) = bring_up(ctx.slot) else { return Answer::Word("setup-failed") };
    hostile(&dev, &mut q, &req);
    dev.notify(0);
    let answer = observe(&dev, &mut q, &req);
    dev.reset();
    answer
}

/// The well-formed chain with descriptor `index` replaced by what `bad` returns
/// (address, length, flags, next).
fn one_bad_descriptor(ctx: &Ctx, index: u16, bad: fn(&Request) -> (u64, u32, u16, u16)) -> Answer {
    on_queue(ctx, |_, q, r| {
        r.write_chain(q.desc);
        let (addr, len, flags, next) = bad(r);
        write_desc(q.desc, index, addr, len, flags, next);
        q.publish(0);
    })
}

/// Sets up queue 0 by hand with `size` entries and ring addresses shifted by `skew`.
fn raw_queue(ctx: &Ctx, size: u32, skew: u64) -> Answer {
    let Ok(dev) = Device::begin(ctx.slot, 0, 0) else { return Answer::Word("setup-failed") };
    let (Some(desc), Some(avail), Some(used), Some(req)) =
        (alloc(16 * 16 + 16, 4096), alloc(64, 64), alloc(4096, 4096), Request::new(0))
    else {
        return Answer::Word("out-of-memory");
    };
    let (desc, avail, used) = (desc + skew, avail + skew, used + skew);
    dev.write(mmio::REG_QUEUE_SEL, 0);
    dev.write(mmio::REG_QUEUE_NUM, size);
    dev.set_queue_addresses(desc, avail, used);
    dev.write(mmio::REG_QUEUE_READY, 1);
    let ready = dev.read(mmio::REG_QUEUE_READY);
    dev.driver_ok();
    req.write_chain(desc);
    // SAFETY: the avail ring lies in arena memory allocated above (skew stays inside it).
    unsafe {
        core::ptr::write_unaligned((avail + 4) as *mut u16, 0);
        core::ptr::write_unaligned((avail + 2) as *mut u16, 1);
    }
    dev.notify(0);
    hw::spin_cycles(OBSERVE_CYCLES);
    // SAFETY: as above.
    let used_idx = unsafe { core::ptr::read_unaligned((used + 2) as *const u16) };
    let needs_reset = dev.status() & STATUS_NEEDS_RESET != 0;
    dev.reset();
    Answer::Word(match (ready, used_idx, needs_reset) {
        (_, _, true) => "needs-reset",
        (0, _, _) => "queue-refused",
        (_, 0, _) => "ignored",
        _ => "served",
    })
}

type Scenario = (&'static str, fn(&Ctx) -> Answer);

const SCENARIOS: &[Scenario] = &[
    ("descriptor-loop", |ctx| one_bad_descriptor(ctx, 2, |r| (r.status, 1, DESC_F_WRITE | DESC_F_NEXT, 0))),
    ("outside-ram", |ctx| one_bad_descriptor(ctx, 1, |_| (OUTSIDE_RAM, 512, DESC_F_WRITE | DESC_F_NEXT, 2))),
    ("address-wraps", |ctx| one_bad_descriptor(ctx, 1, |_| (u64::MAX - 255, 512, DESC_F_WRITE | DESC_F_NEXT, 2))),
    ("zero-length", |ctx| one_bad_descriptor(ctx, 0, |r| (r.header, 0, DESC_F_NEXT, 1))),
    ("huge-length", |ctx| one_bad_descriptor(ctx, 1, |r| (r.data, u32::MAX, DESC_F_WRITE | DESC_F_NEXT, 2))),
    ("chain-longer-than-queue", |ctx| {
        if !ctx.indirect {
            return Answer::Word("no-indirect-descriptors");
        }
        on_queue(ctx, |_, q, r| {
            // An indirect table of 64 descriptors, 4x the queue size, all of them chained.
            let Some(table) = alloc(64 * 16, 16) else { return };
            write_desc(table, 0, r.header, 16, DESC_F_NEXT, 1);
            for i in 1..63u16 {
                write_desc(table, i, r.data, 8, DESC_F_WRITE | DESC_F_NEXT, i + 1);
            }
            write_desc(table, 63, r.status, 1, DESC_F_WRITE, 0);
            write_desc(q.desc, 0, table, 64 * 16, DESC_F_INDIRECT, 0);
            q.publish(0);
        })
    }),
    ("write-only-header", |ctx| one_bad_descriptor(ctx, 0, |r| (r.header, 16, DESC_F_WRITE | DESC_F_NEXT, 1))),
    ("read-only-status", |ctx| one_bad_descriptor(ctx, 2, |r| (r.status, 1, 0, 0))),
    ("head-out-of-range", |ctx| {
        on_queue(ctx, |_, q, r| {
            r.write_chain(q.desc);
            q.publish(QUEUE_SIZE + 100);
        })
    }),
    ("next-out-of-range", |ctx| one_bad_descriptor(ctx, 1, |r| (r.data, 512, DESC_F_WRITE | DESC_F_NEXT, QUEUE_SIZE + 3))),
    ("avail-index-jump", |ctx| {
        on_queue(ctx, |_, q, r| {
            r.write_chain(q.desc);
            q.publish(0);
            // Claim a thousand more entries than the ring has.
            let avail_idx = q.avail + 2;
            // SAFETY: the avail ring's index field, in arena memory.
            unsafe { core::ptr::write_volatile(avail_idx as *mut u16, 1001) };
        })
    }),
    ("unaligned-rings", |ctx| raw_queue(ctx, u32::from(QUEUE_SIZE), 1)),
    ("queue-size-not-power-of-two", |ctx| raw_queue(ctx, 3, 0)),
    ("queue-size-too-big", |ctx| raw_queue(ctx, 65535, 0)),
    ("notify-before-driver-ok", |ctx| {
        let Ok(dev) = Device::begin(ctx.slot, 0, 0) else { return Answer::Word("setup-failed") };
        let (Ok(mut q), Some(req)) = (dev.queue(0, QUEUE_SIZE), Request::new(0)) else {
            return Answer::Word("setup-failed");
        };
        req.write_chain(q.desc);
        q.publish(0);
        dev.notify(0);
        let answer = observe(&dev, &mut q, &req);
        dev.reset();
        answer
    }),
    ("config-write-out-of-range", |ctx| {
        let Ok(dev) = Device::begin(ctx.slot, 0, 0) else { return Answer::Word("setup-failed") };
        let capacity = dev.config_read64(0);
        // The last word of the device's window: past any virtio-blk config field.
        let last = ctx.slot.size.min(0x1000) - 4;
        dev.write(last, 0xdead_beef);
        dev.write(mmio::REG_CONFIG, 0x1234_5678);
        let unchanged = dev.config_read64(0) == capacity;
        dev.reset();
        Answer::Word(if unchanged { "config-unchanged" } else { "config-changed" })
    }),
];

pub fn run(cmdline: Cmdline) {
    let Some(slot) = mmio::find(cmdline, BLK_ID) else {
        return report::skip("hostile", format_args!("no virtio-blk device among the virtio_mmio.device= entries"));
    };
    crate::virtio::reset_arena();
    let Some((dev, _, _)) = bring_up(&slot) else {
        return report::fail("hostile", format_args!("the virtio-blk device could not be set up"));
    };
    let ctx = Ctx { slot: &slot, indirect: dev.features & F_INDIRECT_DESC != 0 };
    dev.reset();
    let only = cmdline.param("hostile", "only");
    for (name, scenario) in SCENARIOS.iter().filter(|(n, _)| only.is_none_or(|o| o.split(':').any(|x| x == *n))) {
        crate::virtio::reset_arena();
        let answer = scenario(&ctx);
        crate::virtio::reset_arena();
        report_scenario("hostile-", name, answer, recovers(&slot));
    }
}

/// Reports scenario `name` as test `<prefix><name>`: ok when the device served again after a
/// reset.
pub(super) fn report_scenario(prefix: &str, name: &str, answer: Answer, recovered: bool) {
    let mut label = [0u8; 64];
    let p = prefix.len().min(label.len());
    label[..p].copy_from_slice(&prefix.as_bytes()[..p]);
    let n = name.len().min(label.len() - p);
    label[p..p + n].copy_from_slice(&name.as_bytes()[..n]);
    let test = core::str::from_utf8(&label[..p + n]).unwrap_or("hostile");
    if recovered {
        report::ok(test, format_args!("answer={answer} recovered=yes"));
    } else {
        report::fail(test, format_args!("answer={answer} recovered=no: the device stopped serving after a reset"));
    }
}
