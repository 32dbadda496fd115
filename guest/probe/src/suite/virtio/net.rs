//! `virtio-net`: send frames of given sizes and receive frames, reporting counts and checksums
//! so that the host can check both directions byte for byte.
//!
//! Parameters: probe.virtio-net.tx (4 frames), .size (60 bytes; frames alternate between this
//! and 1514), .rx (probe frames, EtherType 0x88b5, to wait for: 0), .seed (1). After the receive ring is filled the probe
//! prints `PROBE virtio-net ready mac=...`: the host sends its frames after that line.
//!
//! With `probe.virtio-net.mode=throughput` it transmits `.frames` (100000) frames of `.size`
//! bytes with the ring kept full, and reports packets per second from the TSC (see tsc.rs).
//! Each frame carries its sequence number (little-endian u64 right after the EtherType), so
//! that the host can check that none was lost or duplicated.
//!
//! With `probe.virtio-net.mode=sink` it receives probe frames until `.frames` (100000) came or
//! `.cycles` (10G) passed since the first, and reports how many and the rate.

use crate::cmdline::{Cmdline, VirtioMmioSlot};
use crate::pattern::{ETHERTYPE_PROBE, FNV_OFFSET, fill_frame, fnv1a};
use crate::report;
use crate::virtio::mmio::Device;
use crate::virtio::queue::Buffer;
use crate::virtio::{alloc, bytes};

const TEST: &str = "virtio-net";
const F_MAC: u64 = 1 << 5;
const F_MTU: u64 = 1 << 3;
/// virtio_net_hdr with num_buffers: its size whenever VERSION_1 is negotiated.
const HEADER: usize = 12;
const MAX_FRAME: usize = 1514;
const RX_BUFFERS: usize = 16;
/// The largest oversized frame the probe will build.
const OVERSIZE_MAX: usize = 16 << 10;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;

struct Mac([u8; 6]);

impl core::fmt::Display for Mac {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

const TX_IN_FLIGHT: usize = 16;

/// The device's MAC when it offers one (F_MAC negotiated), else 02:00:00:00:00:01: honest
/// frames come from it, as a port's anti-spoofing guard wants.
pub fn device_mac(dev: &Device) -> [u8; 6] {
    let mut mac = [0x02, 0, 0, 0, 0, 1];
    if dev.features & F_MAC != 0 {
        for (i, byte) in mac.iter_mut().enumerate() {
            *byte = (dev.config_read32(i as u64 & !3) >> ((i % 4) * 8)) as u8;
        }
    }
    mac
}

const F_EVENT_IDX: u64 = 1 << 29;

/// EVENT_IDX unless `probe.virtio-net.event_idx=off`: kicks only when the device asks, and
/// completions taken from the used ring with interrupts suppressed, as Linux does when it polls.
fn event_idx(cmdline: Cmdline) -> u64 {
    if cmdline.param(TEST, "event_idx") == Some("off") { 0 } else { F_EVENT_IDX }
}

pub fn throughput(slot: &VirtioMmioSlot, cmdline: Cmdline) -> Result<(), &'static str> {
    let dev = Device::begin(slot, 0, F_MAC | F_MTU | event_idx(cmdline)).map_err(|_| "the device could not be set up")?;
    dev.queue(RX_QUEUE, 8).map_err(|_| "the receive queue could not be set up")?;
    let mut txq = dev.queue(TX_QUEUE, TX_IN_FLIGHT as u16).map_err(|_| "the transmit queue could not be set up")?;
    txq.event_idx = dev.features & F_EVENT_IDX != 0;
    if txq.event_idx {
        txq.suppress_interrupts();
    }
    dev.driver_ok();
    let frames = cmdline.number(TEST, "frames", 100_000);
    let size = (cmdline.number(TEST, "size", 60) as usize).clamp(60, MAX_FRAME);
    let in_flight = usize::from(txq.size).min(TX_IN_FLIGHT);
    let area = alloc(in_flight * (HEADER + MAX_FRAME), 64).ok_or("out of probe memory")?;
    let buffer = |i: usize| area + (i * (HEADER + MAX_FRAME)) as u64;
    let mac = device_mac(&dev);
    for i in 0..in_flight {
        fill_frame(1, i as u64, mac, bytes(buffer(i) + HEADER as u64, size));
    }
    let mut heads = [u16::MAX; TX_IN_FLIGHT];
    let start = crate::hw::rdtsc();
    let (mut sent, mut done) = (0u64, 0u64);
    let stamp = |slot: usize, seq: u64| bytes(buffer(slot) + (HEADER + 14) as u64, 8).copy_from_slice(&seq.to_le_bytes());
    let old = txq.avail_index();
    for head in heads.iter_mut().take(in_flight) {
        if sent < frames {
            stamp(sent as usize, sent);
            *head = txq.push(&[Buffer::readable(buffer(sent as usize), (HEADER + size) as u32)]).ok_or("ring full")?;
            sent += 1;
        }
    }
    if txq.kick_needed(old) {
        dev.notify(TX_QUEUE);
    }
    while done < frames {
        let (head, _) = dev.wait_used(&mut txq, super::request_deadline(cmdline)).ok_or("transmissions stalled")?;
        done += 1;
        if sent < frames {
            let slot = heads.iter().position(|&h| h == head).ok_or("unknown buffer")?;
            stamp(slot, sent);
            let old = txq.avail_index();
            heads[slot] = txq.push(&[Buffer::readable(buffer(slot), (HEADER + size) as u32)]).ok_or("ring full")?;
            sent += 1;
            if txq.kick_needed(old) {
                dev.notify(TX_QUEUE);
            }
        }
    }
    let cycles = crate::hw::rdtsc() - start;
    // The MTU the device advertised (0: none); max_virtqueue_pairs is the word before it.
    let mtu = if dev.offered_features() & F_MTU != 0 { dev.config_read32(8) >> 16 } else { 0 };
    dev.reset();
    let khz = crate::tsc::khz(cmdline).unwrap_or(0).max(1);
    let pps = frames * khz * 1000 / cycles.max(1);
    report::ok(
        TEST,
        format_args!(
            "mode=throughput size={size} tx_pps={pps} frames={frames} cycles={cycles} tsc_khz={khz} mtu={mtu} event_idx={}",
            if txq.event_idx { "on" } else { "off" }
        ),
    );
    Ok(())
}

pub fn sink(slot: &VirtioMmioSlot, cmdline: Cmdline) -> Result<(), &'static str> {
    let dev = Device::begin(slot, 0, F_MAC | event_idx(cmdline)).map_err(|_| "the device could not be set up")?;
    let mut rxq = dev.queue(RX_QUEUE, 256).map_err(|_| "the receive queue could not be set up")?;
    dev.queue(TX_QUEUE, 8).map_err(|_| "the transmit queue could not be set up")?;
    rxq.event_idx = dev.features & F_EVENT_IDX != 0;
    if rxq.event_idx {
        rxq.suppress_interrupts();
    }
    let slots = usize::from(rxq.size).min(256);
    let area = alloc(slots * (HEADER + MAX_FRAME), 64).ok_or("out of probe memory")?;
    let buffer = |i: usize| area + (i * (HEADER + MAX_FRAME)) as u64;
    let mut heads = [0u16; 256];
    for (i, head) in heads.iter_mut().enumerate().take(slots) {
        *head = rxq.push(&[Buffer::writable(buffer(i), (HEADER + MAX_FRAME) as u32)]).ok_or("receive ring full")?;
    }
    dev.driver_ok();
    dev.notify(RX_QUEUE);
    crate::println!("PROBE virtio-net sink ready");
    let want = cmdline.number(TEST, "frames", 100_000);
    let window = cmdline.number(TEST, "cycles", 10_000_000_000);
    let (mut got, mut first, mut last) = (0u64, 0u64, 0u64);
    let wait_first = crate::hw::rdtsc() + 4 * window;
    while got < want {
        let deadline = if got == 0 { wait_first } else { first + window };
        let Some((head, _)) = dev.wait_used(&mut rxq, deadline) else { break };
        let slot = heads.iter().take(slots).position(|&h| h == head).ok_or("the device returned an unknown buffer")?;
        let frame = bytes(buffer(slot) + HEADER as u64, 14);
        if frame[12..14] == ETHERTYPE_PROBE.to_be_bytes() {
            last = crate::hw::rdtsc();
            if got == 0 {
                first = last;
            }
            got += 1;
        }
        let old = rxq.avail_index();
        heads[slot] = rxq.push(&[Buffer::writable(buffer(slot), (HEADER + MAX_FRAME) as u32)]).ok_or("receive ring full")?;
        // With EVENT_IDX the device says when it ran short of buffers; without, buffers are
        // handed back in batches: one notification (a VM exit) per 32 frames.
        let kick = if rxq.event_idx { rxq.kick_needed(old) } else { got % 32 == 0 };
        if kick {
            dev.notify(RX_QUEUE);
        }
    }
    dev.reset();
    let khz = crate::tsc::khz(cmdline).unwrap_or(0).max(1);
    let pps = got.saturating_sub(1) * khz * 1000 / (last - first).max(1);
    report::ok(
        TEST,
        format_args!(
            "mode=sink rx_frames={got} rx_pps={pps} tsc_khz={khz} event_idx={}",
            if rxq.event_idx { "on" } else { "off" }
        ),
    );
    Ok(())
}

pub fn test(slot: &VirtioMmioSlot, cmdline: Cmdline) -> Result<(), &'static str> {
    let dev = Device::begin(slot, 0, F_MAC).map_err(|_| "the device could not be set up")?;
    let mut rxq = dev.queue(RX_QUEUE, RX_BUFFERS as u16).map_err(|_| "the receive queue could not be set up")?;
    let mut txq = dev.queue(TX_QUEUE, 16).map_err(|_| "the transmit queue could not be set up")?;
    let mac = device_mac(&dev);
    let rx_area = alloc(RX_BUFFERS * (HEADER + MAX_FRAME), 64).ok_or("out of probe memory")?;
    let buffer = |i: usize| rx_area + (i * (HEADER + MAX_FRAME)) as u64;
    let mut heads = [0u16; RX_BUFFERS];
    for (i, head) in heads.iter_mut().enumerate().take(usize::from(rxq.size).min(RX_BUFFERS)) {
        *head = rxq.push(&[Buffer::writable(buffer(i), (HEADER + MAX_FRAME) as u32)]).ok_or("receive ring full")?;
    }
    dev.driver_ok();
    dev.notify(RX_QUEUE);
    crate::println!("PROBE virtio-net ready mac={}", Mac(mac));

    let tx_count = cmdline.number(TEST, "tx", 4);
    let size = (cmdline.number(TEST, "size", 60) as usize).clamp(60, MAX_FRAME);
    let seed = cmdline.number(TEST, "seed", 1);
    let tx_buf = alloc(HEADER + MAX_FRAME, 64).ok_or("out of probe memory")?;
    let (mut tx_bytes, mut tx_checksum) = (0usize, FNV_OFFSET);
    for index in 0..tx_count {
        let len = if index % 2 == 0 { size } else { MAX_FRAME };
        bytes(tx_buf, HEADER).fill(0);
        let frame = bytes(tx_buf + HEADER as u64, len);
        fill_frame(seed, index, mac, frame);
        tx_checksum = fnv1a(tx_checksum, frame);
        tx_bytes += len;
        txq.push(&[Buffer::readable(tx_buf, (HEADER + len) as u32)]).ok_or("transmit ring full")?;
        dev.notify(TX_QUEUE);
        dev.wait_used(&mut txq, super::request_deadline(cmdline)).ok_or("a transmission did not complete")?;
    }

    // probe.virtio-net.oversize=N: one more frame of N bytes, past the MTU, which the device
    // must refuse (the host checks that it never reaches the far side).
    let oversize = cmdline.number(TEST, "oversize", 0) as usize;
    if oversize > 0 {
        let len = oversize.min(OVERSIZE_MAX);
        let big = alloc(HEADER + len, 64).ok_or("out of probe memory")?;
        bytes(big, HEADER).fill(0);
        fill_frame(seed, tx_count, mac, bytes(big + HEADER as u64, len));
        txq.push(&[Buffer::readable(big, (HEADER + len) as u32)]).ok_or("transmit ring full")?;
        dev.notify(TX_QUEUE);
        dev.wait_used(&mut txq, super::request_deadline(cmdline)).ok_or("the oversized frame was not returned")?;
    }

    let rx_want = cmdline.number(TEST, "rx", 0);
    let (mut rx, mut rx_bytes, mut rx_checksum) = (0u64, 0usize, FNV_OFFSET);
    while rx < rx_want {
        let (head, len) = dev.wait_used(&mut rxq, super::request_deadline(cmdline)).ok_or("frames did not arrive")?;
        let slot = heads.iter().position(|&h| h == head).ok_or("the device returned an unknown buffer")?;
        let len = len as usize;
        if !(HEADER..=HEADER + MAX_FRAME).contains(&len) {
            return Err("the device reported an impossible frame length");
        }
        let frame = bytes(buffer(slot) + HEADER as u64, len - HEADER);
        // Only probe frames count: a host stack may send its own (IPv6 discovery, say).
        if frame.len() >= 14 && frame[12..14] == ETHERTYPE_PROBE.to_be_bytes() {
            rx_checksum = fnv1a(rx_checksum, frame);
            rx_bytes += frame.len();
            rx += 1;
        }
        heads[slot] = rxq.push(&[Buffer::writable(buffer(slot), (HEADER + MAX_FRAME) as u32)]).ok_or("receive ring full")?;
        dev.notify(RX_QUEUE);
    }
    dev.reset();
    report::ok(
        TEST,
        format_args!(
            "mac={} tx={tx_count} tx_bytes={tx_bytes} tx_checksum={tx_checksum:#x} rx={rx} rx_bytes={rx_bytes} rx_checksum={rx_checksum:#x}",
            Mac(mac)
        ),
    );
    Ok(())
}

const F_CTRL_VQ: u64 = 1 << 17;
const F_MQ: u64 = 1 << 22;
/// The most pairs the probe drives.
const MQ_MAX_PAIRS: usize = 4;
const MQ_RX_BUFFERS: usize = 16;
/// The UDP port of the frames the host sends in multi-queue mode (IPv4, so that the TAP's
/// flow hash spreads them over its queues).
const MQ_UDP_PORT: u16 = 7777;

/// One control command (class, command, 16-bit argument) on `ctrl`; returns the device's
/// status byte (0: VIRTIO_NET_OK).
fn control(dev: &Device, ctrl: &mut crate::virtio::queue::Virtqueue, index: u16, command: [u8; 4], cmdline: Cmdline) -> Result<u8, &'static str> {
    let area = alloc(8, 8).ok_or("out of probe memory")?;
    bytes(area, 4).copy_from_slice(&command);
    bytes(area + 4, 1)[0] = 0xff;
    ctrl.push(&[Buffer::readable(area, 2), Buffer::readable(area + 2, 2), Buffer::writable(area + 4, 1)])
        .ok_or("control ring full")?;
    dev.notify(index);
    dev.wait_used(ctrl, super::request_deadline(cmdline)).ok_or("a control command was not answered")?;
    Ok(bytes(area + 4, 1)[0])
}

/// `probe.virtio-net.mode=mq`: negotiates VIRTIO_NET_F_MQ, asks for one pair more than the
/// device has (which it must refuse), then for all it has (up to 4); sends `.tx` frames spread
/// over the transmit queues (frame i on queue i mod pairs) and receives `.rx` IPv4/UDP frames
/// to port 7777 on whichever receive queue the device puts them. It reports the wrapping sum
/// of the frames' FNV-1a checksums and how many frames each receive queue got, so that the
/// host can check that its frames arrived whole and spread.
///
/// With `.mq=off` it is a driver without multi-queue on the same device: one pair, no control
/// queue, and every frame must still arrive on its receive queue.
pub fn multi_queue(slot: &VirtioMmioSlot, cmdline: Cmdline) -> Result<(), &'static str> {
    let negotiate = cmdline.param(TEST, "mq") != Some("off");
    let required = if negotiate { F_CTRL_VQ | F_MQ } else { 0 };
    let dev = Device::begin(slot, required, F_MAC).map_err(|_| "the device offers no multi-queue")?;
    let offered = if negotiate { (dev.config_read32(8) & 0xffff) as usize } else { 1 };
    if negotiate && offered < 2 {
        return Err("the device offers multi-queue with fewer than 2 pairs");
    }
    let pairs = offered.min(MQ_MAX_PAIRS);
    let mut rxqs = [const { None }; MQ_MAX_PAIRS];
    let mut txqs = [const { None }; MQ_MAX_PAIRS];
    for pair in 0..pairs {
        rxqs[pair] = Some(dev.queue(2 * pair as u16, MQ_RX_BUFFERS as u16).map_err(|_| "a receive queue could not be set up")?);
        txqs[pair] = Some(dev.queue(2 * pair as u16 + 1, 16).map_err(|_| "a transmit queue could not be set up")?);
    }
    let ctrl_index = 2 * offered as u16;
    let mut ctrl = match negotiate {
        true => Some(dev.queue(ctrl_index, 8).map_err(|_| "the control queue could not be set up")?),
        false => None,
    };
    let mac = device_mac(&dev);
    let area = alloc(pairs * MQ_RX_BUFFERS * (HEADER + MAX_FRAME), 64).ok_or("out of probe memory")?;
    let buffer = |pair: usize, i: usize| area + ((pair * MQ_RX_BUFFERS + i) * (HEADER + MAX_FRAME)) as u64;
    let mut heads = [[0u16; MQ_RX_BUFFERS]; MQ_MAX_PAIRS];
    for pair in 0..pairs {
        let rxq = rxqs[pair].as_mut().ok_or("no receive queue")?;
        for (i, head) in heads[pair].iter_mut().enumerate().take(usize::from(rxq.size).min(MQ_RX_BUFFERS)) {
            *head = rxq.push(&[Buffer::writable(buffer(pair, i), (HEADER + MAX_FRAME) as u32)]).ok_or("receive ring full")?;
        }
    }
    dev.driver_ok();
    for pair in 0..pairs {
        dev.notify(2 * pair as u16);
    }
    if let Some(ctrl) = ctrl.as_mut() {
        let too_many = (offered as u16 + 1).to_le_bytes();
        let refused = control(&dev, ctrl, ctrl_index, [4, 0, too_many[0], too_many[1]], cmdline)?;
        let wanted = (pairs as u16).to_le_bytes();
        let accepted = control(&dev, ctrl, ctrl_index, [4, 0, wanted[0], wanted[1]], cmdline)?;
        if (refused, accepted) != (1, 0) {
            crate::println!("PROBE virtio-net control answers: {refused} for {} pairs, {accepted} for {pairs}", offered + 1);
            return Err("the device answered VQ_PAIRS_SET wrongly");
        }
    }
    crate::println!("PROBE virtio-net ready mac={} pairs={pairs}", Mac(mac));

    let tx_count = cmdline.number(TEST, "tx", 8);
    let seed = cmdline.number(TEST, "seed", 1);
    let tx_buf = alloc(HEADER + MAX_FRAME, 64).ok_or("out of probe memory")?;
    let (mut tx_bytes, mut tx_checksum) = (0usize, FNV_OFFSET);
    for index in 0..tx_count {
        let len = 60 + (index as usize * 97) % (MAX_FRAME - 60);
        bytes(tx_buf, HEADER).fill(0);
        let frame = bytes(tx_buf + HEADER as u64, len);
        fill_frame(seed, index, mac, frame);
        tx_checksum = fnv1a(tx_checksum, frame);
        tx_bytes += len;
        let pair = index as usize % pairs;
        let txq = txqs[pair].as_mut().ok_or("no transmit queue")?;
        txq.push(&[Buffer::readable(tx_buf, (HEADER + len) as u32)]).ok_or("transmit ring full")?;
        dev.notify(2 * pair as u16 + 1);
        dev.wait_used(txq, super::request_deadline(cmdline)).ok_or("a transmission did not complete")?;
    }

    let rx_want = cmdline.number(TEST, "rx", 0);
    // Queues deliver in their own order: the frames' checksums are summed, not chained.
    let (mut rx, mut rx_bytes, mut rx_sum) = (0u64, 0usize, 0u64);
    let mut per_queue = [0u64; MQ_MAX_PAIRS];
    let deadline = super::request_deadline(cmdline);
    while rx < rx_want {
        if crate::hw::rdtsc() > deadline {
            return Err("frames did not arrive");
        }
        for pair in 0..pairs {
            let rxq = rxqs[pair].as_mut().ok_or("no receive queue")?;
            let Some((head, len)) = rxq.pop_used() else { continue };
            let slot = heads[pair].iter().position(|&h| h == head).ok_or("the device returned an unknown buffer")?;
            let len = len as usize;
            if !(HEADER..=HEADER + MAX_FRAME).contains(&len) {
                return Err("the device reported an impossible frame length");
            }
            let frame = bytes(buffer(pair, slot) + HEADER as u64, len - HEADER);
            let udp_to_probe = frame.len() >= 42
                && frame[12..14] == [0x08, 0x00]
                && frame[23] == 17
                && frame[36..38] == MQ_UDP_PORT.to_be_bytes();
            if udp_to_probe {
                rx_sum = rx_sum.wrapping_add(fnv1a(FNV_OFFSET, frame));
                rx_bytes += frame.len();
                rx += 1;
                per_queue[pair] += 1;
            }
            heads[pair][slot] =
                rxq.push(&[Buffer::writable(buffer(pair, slot), (HEADER + MAX_FRAME) as u32)]).ok_or("receive ring full")?;
            dev.notify(2 * pair as u16);
        }
    }
    dev.reset();
    let q = |i: usize| per_queue[i];
    report::ok(
        TEST,
        format_args!(
            "mode=mq pairs={pairs} tx={tx_count} tx_bytes={tx_bytes} tx_checksum={tx_checksum:#x} rx={rx} rx_bytes={rx_bytes} rx_sum={rx_sum:#x} rx_per_queue={},{},{},{}",
            q(0), q(1), q(2), q(3)
        ),
    );
    Ok(())
}
