//! `hostile-vsock`, `hostile-balloon`, `hostile-console`, `hostile-rng`: the malicious driver
//! of `hostile`, turned on every queue of these devices. Each scenario corrupts one chain (or
//! the ring) of one queue on a freshly set up device; then the device is reset, set up again,
//! and a good request must be served (vsock: a packet sent; balloon: a deflate; console: a
//! line written; rng: entropy read).
//!
//! Each reports `PROBE hostile-<device>-<queue>-<scenario> ok answer=<what the device did>
//! recovered=yes`: `used-len=N` (the chain came back), `none` (ignored; a queue the device
//! only fills when it has something to say answers this), `needs-reset`.

use super::hostile::{Answer, report_scenario};
use crate::cmdline::{Cmdline, VirtioMmioSlot};
use crate::virtio::mmio::Device;
use crate::virtio::queue::{DESC_F_NEXT, DESC_F_WRITE, Virtqueue, write_desc};
use crate::virtio::{alloc, bytes};
use crate::{hw, report};

const QUEUE_SIZE: u16 = 16;
const STATUS_NEEDS_RESET: u32 = 64;
const F_INDIRECT_DESC: u64 = 1 << 28;
const DESC_F_INDIRECT: u16 = 4;
const OBSERVE_CYCLES: u64 = 50_000_000;
const OUTSIDE_RAM: u64 = 0x000f_ff00_0000_0000;
const BALLOON_F_STATS_VQ: u64 = 1 << 1;
const BALLOON_F_REPORTING: u64 = 1 << 5;

/// A device under attack: its virtio id, queue names and directions, and its good request.
struct Target {
    test: &'static str,
    id: u32,
    wanted: u64,
    /// (name, the device writes its buffers) for each queue, in order.
    queues: fn(u64) -> &'static [(&'static str, bool)],
    /// Queues a request on `queues` and names the queue to watch; None when setup failed.
    good: fn(&mut Queues) -> Option<usize>,
}

type Queues = [Option<Virtqueue>; 4];

const TARGETS: &[Target] = &[
    Target {
        test: "hostile-vsock",
        id: 19,
        wanted: 0,
        queues: |_| &[("rx", true), ("tx", false), ("event", true)],
        good: |qs| {
            // A connection request to a host port: the device takes the packet (and answers).
            let packet = alloc(44, 8)?;
            let h = bytes(packet, 44);
            h[8..16].copy_from_slice(&2u64.to_le_bytes());
            h[16..20].copy_from_slice(&40_000u32.to_le_bytes());
            h[20..24].copy_from_slice(&1u32.to_le_bytes());
            h[28..30].copy_from_slice(&1u16.to_le_bytes());
            h[30..32].copy_from_slice(&1u16.to_le_bytes());
            h[36..40].copy_from_slice(&4096u32.to_le_bytes());
            let q = qs[1].as_mut()?;
            write_desc(q.desc, 0, packet, 44, 0, 0);
            q.publish(0);
            Some(1)
        },
    },
    Target {
        test: "hostile-balloon",
        id: 5,
        wanted: BALLOON_F_STATS_VQ | BALLOON_F_REPORTING,
        queues: |features| match (features & BALLOON_F_STATS_VQ != 0, features & BALLOON_F_REPORTING != 0) {
            (true, true) => &[("inflate", false), ("deflate", false), ("stats", false), ("reporting", true)],
            (true, false) => &[("inflate", false), ("deflate", false), ("stats", false)],
            (false, true) => &[("inflate", false), ("deflate", false), ("reporting", true)],
            (false, false) => &[("inflate", false), ("deflate", false)],
        },
        good: |qs| {
            // Deflate one page: the device takes the page frame number back.
            let pfns = alloc(4096, 4096)?;
            let page = (pfns >> 12) as u32;
            bytes(pfns, 4).copy_from_slice(&page.to_le_bytes());
            let q = qs[1].as_mut()?;
            write_desc(q.desc, 0, pfns, 4, 0, 0);
            q.publish(0);
            Some(1)
        },
    },
    Target {
        test: "hostile-console",
        id: 3,
        wanted: 0,
        queues: |_| &[("rx", true), ("tx", false)],
        good: |qs| {
            let line = alloc(16, 8)?;
            bytes(line, 16).copy_from_slice(b"console serves\r\n");
            let q = qs[1].as_mut()?;
            write_desc(q.desc, 0, line, 16, 0, 0);
            q.publish(0);
            Some(1)
        },
    },
    Target {
        test: "hostile-rng",
        id: 4,
        wanted: 0,
        queues: |_| &[("requests", true)],
        good: |qs| {
            let buffer = alloc(64, 8)?;
            let q = qs[0].as_mut()?;
            write_desc(q.desc, 0, buffer, 64, DESC_F_WRITE, 0);
            q.publish(0);
            Some(0)
        },
    },
];

/// A device set up with all its queues and DRIVER_OK.
fn bring_up(target: &Target, slot: &VirtioMmioSlot) -> Option<(Device, Queues)> {
    let dev = Device::begin(slot, 0, target.wanted | F_INDIRECT_DESC).ok()?;
    let mut queues = [None, None, None, None];
    for (i, q) in queues.iter_mut().enumerate().take((target.queues)(dev.features).len()) {
        *q = Some(dev.queue(i as u16, QUEUE_SIZE).ok()?);
    }
    dev.driver_ok();
    Some((dev, queues))
}

fn observe(dev: &Device, q: &mut Virtqueue) -> Answer {
    match dev.wait_used(q, hw::rdtsc() + OBSERVE_CYCLES) {
        Some((_, len)) => Answer::UsedLen(len),
        None if dev.status() & STATUS_NEEDS_RESET != 0 => Answer::NeedsReset,
        None => Answer::None,
    }
}

/// After a reset, is a good request served?
fn recovers(target: &Target, slot: &VirtioMmioSlot) -> bool {
    let Some((dev, mut queues)) = bring_up(target, slot) else { return false };
    let served = match (target.good)(&mut queues) {
        Some(watch) => {
            dev.notify(watch as u16);
            queues[watch].as_mut().is_some_and(|q| matches!(observe(&dev, q), Answer::UsedLen(_)))
        }
        None => false,
    };
    dev.reset();
    served
}

/// What a scenario does to queue `q` of a device whose buffers there are device-writable when
/// `writable`.
type Attack = fn(&mut Virtqueue, u64, bool);

fn flags(writable: bool) -> u16 {
    if writable { DESC_F_WRITE } else { 0 }
}

const SCENARIOS: &[(&str, Attack)] = &[
    ("descriptor-loop", |q, buf, w| {
        write_desc(q.desc, 0, buf, 8, flags(w) | DESC_F_NEXT, 1);
        write_desc(q.desc, 1, buf + 8, 8, flags(w) | DESC_F_NEXT, 0);
        q.publish(0);
    }),
    ("outside-ram", |q, _, w| {
        write_desc(q.desc, 0, OUTSIDE_RAM, 4096, flags(w), 0);
        q.publish(0);
    }),
    ("address-wraps", |q, _, w| {
        write_desc(q.desc, 0, u64::MAX - 255, 512, flags(w), 0);
        q.publish(0);
    }),
    ("huge-length", |q, buf, w| {
        write_desc(q.desc, 0, buf, u32::MAX, flags(w), 0);
        q.publish(0);
    }),
    ("zero-length", |q, buf, w| {
        write_desc(q.desc, 0, buf, 0, flags(w), 0);
        q.publish(0);
    }),
    ("wrong-direction", |q, buf, w| {
        write_desc(q.desc, 0, buf, 64, flags(!w), 0);
        q.publish(0);
    }),
    ("next-out-of-range", |q, buf, w| {
        write_desc(q.desc, 0, buf, 8, flags(w) | DESC_F_NEXT, QUEUE_SIZE + 3);
        q.publish(0);
    }),
    ("head-out-of-range", |q, buf, w| {
        write_desc(q.desc, 0, buf, 8, flags(w), 0);
        q.publish(QUEUE_SIZE + 100);
    }),
    ("avail-index-jump", |q, buf, w| {
        write_desc(q.desc, 0, buf, 8, flags(w), 0);
        q.publish(0);
        // SAFETY: the avail ring's index field, in arena memory.
        unsafe { core::ptr::write_volatile((q.avail + 2) as *mut u16, 1001) };
    }),
    ("indirect-longer-than-queue", |q, buf, w| {
        // 64 chained entries, 4x the queue size (ignored unless INDIRECT_DESC was offered).
        let Some(table) = alloc(64 * 16, 16) else { return };
        for i in 0..64u16 {
            let next = if i < 63 { DESC_F_NEXT } else { 0 };
            write_desc(table, i, buf, 8, flags(w) | next, i + 1);
        }
        write_desc(q.desc, 0, table, 64 * 16, DESC_F_INDIRECT, 0);
        q.publish(0);
    }),
];

fn attack(target: &Target, slot: &VirtioMmioSlot, queue: usize, writable: bool, scenario: Attack) -> Answer {
    let Some((dev, mut queues)) = bring_up(target, slot) else { return Answer::Word("setup-failed") };
    let (Some(q), Some(buf)) = (queues[queue].as_mut(), alloc(4096, 64)) else { return Answer::Word("setup-failed") };
    scenario(q, buf, writable);
    dev.notify(queue as u16);
    let answer = observe(&dev, q);
    dev.reset();
    answer
}

pub fn run(test: &str, cmdline: Cmdline) {
    let Some(target) = TARGETS.iter().find(|t| t.test == test) else {
        return report::fail(test, format_args!("unknown test"));
    };
    let Some(slot) = crate::virtio::mmio::find(cmdline, target.id) else {
        return report::skip(test, format_args!("no such device among the virtio_mmio.device= entries"));
    };
    crate::virtio::reset_arena();
    let Some((dev, _)) = bring_up(target, &slot) else {
        return report::fail(test, format_args!("the device could not be set up"));
    };
    let features = dev.features;
    dev.reset();
    for (queue, &(queue_name, writable)) in (target.queues)(features).iter().enumerate() {
        for &(name, scenario) in SCENARIOS {
            crate::virtio::reset_arena();
            let answer = attack(target, &slot, queue, writable, scenario);
            crate::virtio::reset_arena();
            let mut label = [0u8; 40];
            let label = join(&mut label, &[&test[8..], "-", queue_name, "-", name]);
            report_scenario("hostile-", label, answer, recovers(target, &slot));
        }
    }
}

/// `parts` one after another in `buf`, cut at its end.
fn join<'a>(buf: &'a mut [u8], parts: &[&str]) -> &'a str {
    let mut n = 0;
    for part in parts {
        let take = part.len().min(buf.len() - n);
        buf[n..n + take].copy_from_slice(&part.as_bytes()[..take]);
        n += take;
    }
    core::str::from_utf8(&buf[..n]).unwrap_or("hostile")
}
