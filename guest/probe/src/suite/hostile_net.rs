//! `hostile-net`: behave as a malicious driver towards a virtio-net device, as `hostile` does
//! towards virtio-blk. Transmit scenarios corrupt a frame's chain; receive scenarios offer bad
//! receive buffers and then send an ARP request for the router 10.0.2.2, whose answer the
//! device must put somewhere (run it on `--net user`, whose router answers). After each
//! scenario the device is reset and a good frame must still be sent.
//!
//! Each reports `PROBE hostile-net-<name> ok answer=<what the device did> recovered=yes`:
//! `used-len=N` (the chain came back), `none` (ignored), `needs-reset`.

use crate::cmdline::{Cmdline, VirtioMmioSlot};
use crate::virtio::mmio::{self, Device};
use crate::virtio::queue::{DESC_F_NEXT, DESC_F_WRITE, Virtqueue, write_desc};
use crate::virtio::{alloc, bytes};
use super::hostile::{Answer, report_scenario};
use crate::{hw, report};

const NET_ID: u32 = 1;
const QUEUE_SIZE: u16 = 16;
const RX: u16 = 0;
const TX: u16 = 1;
const HEADER: usize = 12;
const ARP_FRAME: usize = 42;
const STATUS_NEEDS_RESET: u32 = 64;
const F_INDIRECT_DESC: u64 = 1 << 28;
const DESC_F_INDIRECT: u16 = 4;
const OBSERVE_CYCLES: u64 = 100_000_000;
const OUTSIDE_RAM: u64 = 0x000f_ff00_0000_0000;
const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0x0b, 0xad];

/// A virtio-net header and an ARP request for 10.0.2.2 from 10.0.2.15.
fn good_frame() -> Option<u64> {
    let buf = alloc(HEADER + ARP_FRAME, 64)?;
    let f = bytes(buf, HEADER + ARP_FRAME);
    f.fill(0);
    let frame = &mut f[HEADER..];
    frame[0..6].fill(0xff);
    frame[6..12].copy_from_slice(&GUEST_MAC);
    frame[12..14].copy_from_slice(&[0x08, 0x06]);
    frame[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    frame[22..28].copy_from_slice(&GUEST_MAC);
    frame[28..32].copy_from_slice(&[10, 0, 2, 15]);
    frame[38..42].copy_from_slice(&[10, 0, 2, 2]);
    Some(buf)
}

struct Net {
    dev: Device,
    rx: Virtqueue,
    tx: Virtqueue,
    frame: u64,
}

fn bring_up(slot: &VirtioMmioSlot) -> Option<Net> {
    let dev = Device::begin(slot, 0, F_INDIRECT_DESC).ok()?;
    let rx = dev.queue(RX, QUEUE_SIZE).ok()?;
    let tx = dev.queue(TX, QUEUE_SIZE).ok()?;
    dev.driver_ok();
    Some(Net { dev, rx, tx, frame: good_frame()? })
}

fn observe(dev: &Device, q: &mut Virtqueue) -> Answer {
    match dev.wait_used(q, hw::rdtsc() + OBSERVE_CYCLES) {
        Some((_, len)) => Answer::UsedLen(len),
        None if dev.status() & STATUS_NEEDS_RESET != 0 => Answer::NeedsReset,
        None => Answer::None,
    }
}

/// Sends the good frame on a clean transmit queue; true when the device takes it back.
fn send_good(net: &mut Net) -> bool {
    let len = (HEADER + ARP_FRAME) as u32;
    write_desc(net.tx.desc, 0, net.frame, len, 0, 0);
    net.tx.publish(0);
    net.dev.notify(TX);
    matches!(observe(&net.dev, &mut net.tx), Answer::UsedLen(_))
}

fn recovers(slot: &VirtioMmioSlot) -> bool {
    let Some(mut net) = bring_up(slot) else { return false };
    let ok = send_good(&mut net);
    net.dev.reset();
    ok
}

/// A transmit chain whose descriptors `bad` writes (head at slot 0).
fn on_tx(slot: &VirtioMmioSlot, bad: impl FnOnce(&mut Virtqueue, u64)) -> Answer {
    let Some(mut net) = bring_up(slot) else { return Answer::Word("setup-failed") };
    bad(&mut net.tx, net.frame);
    net.dev.notify(TX);
    let answer = observe(&net.dev, &mut net.tx);
    net.dev.reset();
    answer
}

/// Offers the receive buffers `bad` writes (head at slot 0), then makes the router answer.
fn on_rx(slot: &VirtioMmioSlot, bad: impl FnOnce(&mut Virtqueue)) -> Answer {
    let Some(mut net) = bring_up(slot) else { return Answer::Word("setup-failed") };
    bad(&mut net.rx);
    net.dev.notify(RX);
    if !send_good(&mut net) {
        net.dev.reset();
        return Answer::Word("send-failed");
    }
    let answer = observe(&net.dev, &mut net.rx);
    net.dev.reset();
    answer
}

fn frame_len() -> u32 {
    (HEADER + ARP_FRAME) as u32
}

type Scenario = (&'static str, fn(&VirtioMmioSlot, bool) -> Answer);

const SCENARIOS: &[Scenario] = &[
    ("tx-descriptor-loop", |s, _| {
        on_tx(s, |q, f| {
            write_desc(q.desc, 0, f, 6, DESC_F_NEXT, 1);
            write_desc(q.desc, 1, f + 6, frame_len() - 6, DESC_F_NEXT, 0);
            q.publish(0);
        })
    }),
    ("tx-outside-ram", |s, _| {
        on_tx(s, |q, _| {
            write_desc(q.desc, 0, OUTSIDE_RAM, frame_len(), 0, 0);
            q.publish(0);
        })
    }),
    ("tx-address-wraps", |s, _| {
        on_tx(s, |q, _| {
            write_desc(q.desc, 0, u64::MAX - 20, frame_len(), 0, 0);
            q.publish(0);
        })
    }),
    ("tx-huge-length", |s, _| {
        on_tx(s, |q, f| {
            write_desc(q.desc, 0, f, u32::MAX, 0, 0);
            q.publish(0);
        })
    }),
    ("tx-zero-length", |s, _| {
        on_tx(s, |q, f| {
            write_desc(q.desc, 0, f, 0, 0, 0);
            q.publish(0);
        })
    }),
    ("tx-write-only", |s, _| {
        on_tx(s, |q, f| {
            write_desc(q.desc, 0, f, frame_len(), DESC_F_WRITE, 0);
            q.publish(0);
        })
    }),
    ("tx-next-out-of-range", |s, _| {
        on_tx(s, |q, f| {
            write_desc(q.desc, 0, f, 6, DESC_F_NEXT, QUEUE_SIZE + 5);
            q.publish(0);
        })
    }),
    ("tx-head-out-of-range", |s, _| {
        on_tx(s, |q, f| {
            write_desc(q.desc, 0, f, frame_len(), 0, 0);
            q.publish(QUEUE_SIZE + 100);
        })
    }),
    ("tx-avail-index-jump", |s, _| {
        on_tx(s, |q, f| {
            write_desc(q.desc, 0, f, frame_len(), 0, 0);
            q.publish(0);
            // SAFETY: the avail ring's index field, in arena memory.
            unsafe { core::ptr::write_volatile((q.avail + 2) as *mut u16, 1001) };
        })
    }),
    ("tx-indirect-past-the-mtu", |s, indirect| {
        if !indirect {
            return Answer::Word("no-indirect-descriptors");
        }
        on_tx(s, |q, f| {
            // 64 descriptors of the same 1500 bytes: 96 KB claimed for one frame.
            let Some(table) = alloc(64 * 16, 16) else { return };
            for i in 0..64u16 {
                let (flags, next) = if i < 63 { (DESC_F_NEXT, i + 1) } else { (0, 0) };
                write_desc(table, i, f, 1500, flags, next);
            }
            write_desc(q.desc, 0, table, 64 * 16, DESC_F_INDIRECT, 0);
            q.publish(0);
        })
    }),
    ("rx-outside-ram", |s, _| {
        on_rx(s, |q| {
            write_desc(q.desc, 0, OUTSIDE_RAM, 1526, DESC_F_WRITE, 0);
            q.publish(0);
        })
    }),
    ("rx-read-only", |s, _| {
        on_rx(s, |q| {
            let Some(buf) = alloc(1526, 64) else { return };
            write_desc(q.desc, 0, buf, 1526, 0, 0);
            q.publish(0);
        })
    }),
    ("rx-tiny-buffer", |s, _| {
        on_rx(s, |q| {
            let Some(buf) = alloc(64, 64) else { return };
            write_desc(q.desc, 0, buf, 4, DESC_F_WRITE, 0);
            q.publish(0);
        })
    }),
    ("rx-descriptor-loop", |s, _| {
        on_rx(s, |q| {
            let Some(buf) = alloc(64, 64) else { return };
            write_desc(q.desc, 0, buf, 8, DESC_F_WRITE | DESC_F_NEXT, 1);
            write_desc(q.desc, 1, buf + 8, 8, DESC_F_WRITE | DESC_F_NEXT, 0);
            q.publish(0);
        })
    }),
];

pub fn run(cmdline: Cmdline) {
    const TEST: &str = "hostile-net";
    let Some(slot) = mmio::find(cmdline, NET_ID) else {
        return report::skip(TEST, format_args!("no virtio-net device among the virtio_mmio.device= entries"));
    };
    crate::virtio::reset_arena();
    let Some(net) = bring_up(&slot) else {
        return report::fail(TEST, format_args!("the virtio-net device could not be set up"));
    };
    let indirect = net.dev.features & F_INDIRECT_DESC != 0;
    net.dev.reset();
    for (name, scenario) in SCENARIOS {
        crate::virtio::reset_arena();
        let answer = scenario(&slot, indirect);
        crate::virtio::reset_arena();
        report_scenario("hostile-net-", name, answer, recovers(&slot));
    }
}
