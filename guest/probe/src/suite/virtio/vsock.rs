//! `virtio-vsock`: connect to a host port and have bytes echoed; then, with `.listen=PORT`,
//! accept one connection from the host and echo what it sends until it shuts down.
//!
//! Parameters: probe.virtio-vsock.port (5000), .bytes (8192), .seed (1), .listen (none). The
//! probe prints `PROBE virtio-vsock listening port=N` when it waits for the host, and refuses
//! (RST) connections to other ports meanwhile.
//!
//! With `probe.virtio-vsock.mode=events` it only offers event buffers, prints `PROBE
//! virtio-vsock events ready` and waits up to `.wait` TSC cycles (60G) for an event: a
//! snapshot's transport reset.

use crate::cmdline::{Cmdline, VirtioMmioSlot};
use crate::pattern::{FNV_OFFSET, fnv1a, mix};
use crate::report;
use crate::virtio::mmio::Device;
use crate::virtio::queue::{Buffer, Virtqueue};
use crate::virtio::{alloc, bytes};

const TEST: &str = "virtio-vsock";
const HEADER: usize = 44;
const RX_PAYLOAD: usize = 4096;
const RX_BUFFERS: usize = 8;
const TX_CHUNK: usize = 2048;
const HOST_CID: u64 = 2;
const BUF_ALLOC: u32 = 64 << 10;
const LOCAL_PORT: u32 = 40_000;

const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;

#[derive(Clone, Copy, Default)]
struct Header {
    src_cid: u64,
    dst_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    op: u16,
    flags: u32,
}

fn put_header(at: u64, h: &Header, fwd_cnt: u32) {
    let b = bytes(at, HEADER);
    b.fill(0);
    b[0..8].copy_from_slice(&h.src_cid.to_le_bytes());
    b[8..16].copy_from_slice(&h.dst_cid.to_le_bytes());
    b[16..20].copy_from_slice(&h.src_port.to_le_bytes());
    b[20..24].copy_from_slice(&h.dst_port.to_le_bytes());
    b[24..28].copy_from_slice(&h.len.to_le_bytes());
    b[28..30].copy_from_slice(&1u16.to_le_bytes()); // stream
    b[30..32].copy_from_slice(&h.op.to_le_bytes());
    b[32..36].copy_from_slice(&h.flags.to_le_bytes());
    b[36..40].copy_from_slice(&BUF_ALLOC.to_le_bytes());
    b[40..44].copy_from_slice(&fwd_cnt.to_le_bytes());
}

fn get_header(at: u64) -> Header {
    let b = bytes(at, HEADER);
    let u32_at = |i: usize| u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    Header {
        src_cid: u64::from(u32_at(0)) | u64::from(u32_at(4)) << 32,
        dst_cid: u64::from(u32_at(8)) | u64::from(u32_at(12)) << 32,
        src_port: u32_at(16),
        dst_port: u32_at(20),
        len: u32_at(24),
        op: u16::from_le_bytes([b[30], b[31]]),
        flags: u32_at(32),
    }
}

struct Socket<'a> {
    dev: Device,
    rx: Virtqueue,
    tx: Virtqueue,
    rx_area: u64,
    rx_heads: [u16; RX_BUFFERS],
    tx_buf: u64,
    cid: u64,
    fwd_cnt: u32,
    cmdline: Cmdline<'a>,
    /// The port the probe accepts host connections on, once it does.
    listening: Option<u32>,
}

impl Socket<'_> {
    fn rx_buffer(&self, slot: usize) -> u64 {
        self.rx_area + (slot * (HEADER + RX_PAYLOAD)) as u64
    }

    fn send(&mut self, op: u16, local: u32, peer: u32, flags: u32, payload: &[u8]) -> Result<(), &'static str> {
        let h = Header {
            src_cid: self.cid,
            dst_cid: HOST_CID,
            src_port: local,
            dst_port: peer,
            len: payload.len() as u32,
            op,
            flags,
        };
        put_header(self.tx_buf, &h, self.fwd_cnt);
        bytes(self.tx_buf + HEADER as u64, payload.len()).copy_from_slice(payload);
        self.tx.push(&[Buffer::readable(self.tx_buf, (HEADER + payload.len()) as u32)]).ok_or("transmit ring full")?;
        self.dev.notify(1);
        self.dev.wait_used(&mut self.tx, super::request_deadline(self.cmdline)).ok_or("a packet was not taken")?;
        Ok(())
    }

    /// The next packet from the host: its header and where its payload is.
    /// The next packet; host connection requests to a port nobody listens on are refused
    /// (RST) on the way, as a guest kernel does.
    fn recv(&mut self) -> Result<(Header, u64), &'static str> {
        loop {
            let (h, payload) = self.recv_any()?;
            if h.op == OP_REQUEST && Some(h.dst_port) != self.listening {
                self.send(OP_RST, h.dst_port, h.src_port, 0, &[])?;
                continue;
            }
            return Ok((h, payload));
        }
    }

    fn recv_any(&mut self) -> Result<(Header, u64), &'static str> {
        let (head, _) = self.dev.wait_used(&mut self.rx, super::request_deadline(self.cmdline)).ok_or("no packet from the host")?;
        let slot = self.rx_heads.iter().position(|&h| h == head).ok_or("the device returned an unknown buffer")?;
        let at = self.rx_buffer(slot);
        let mut h = get_header(at);
        h.len = h.len.min(RX_PAYLOAD as u32);
        // Copy the payload out before the buffer goes back on the ring.
        let copy = alloc(RX_PAYLOAD, 64).ok_or("out of probe memory")?;
        bytes(copy, h.len as usize).copy_from_slice(bytes(at + HEADER as u64, h.len as usize));
        self.rx_heads[slot] = self.rx.push(&[Buffer::writable(at, (HEADER + RX_PAYLOAD) as u32)]).ok_or("receive ring full")?;
        self.dev.notify(0);
        Ok((h, copy))
    }
}

pub fn events(slot: &VirtioMmioSlot, cmdline: Cmdline) -> Result<(), &'static str> {
    let dev = Device::begin(slot, 0, 0).map_err(|_| "the device could not be set up")?;
    dev.queue(0, 8).map_err(|_| "the receive queue could not be set up")?;
    dev.queue(1, 8).map_err(|_| "the transmit queue could not be set up")?;
    let mut ev = dev.queue(2, 8).map_err(|_| "the event queue could not be set up")?;
    let area = alloc(4 * 8, 8).ok_or("out of probe memory")?;
    let mut heads = [0u16; 4];
    for (i, head) in heads.iter_mut().enumerate() {
        bytes(area + i as u64 * 8, 4).fill(0xff);
        *head = ev.push(&[Buffer::writable(area + i as u64 * 8, 4)]).ok_or("event ring full")?;
    }
    dev.driver_ok();
    dev.notify(2);
    crate::println!("PROBE virtio-vsock events ready");
    let deadline = crate::hw::rdtsc() + cmdline.number(TEST, "wait", 60_000_000_000);
    let (head, len) = dev.wait_used(&mut ev, deadline).ok_or("no event before the deadline")?;
    let slot = heads.iter().position(|&h| h == head).ok_or("the device returned an unknown event buffer")?;
    let id = u32::from_le_bytes(bytes(area + slot as u64 * 8, 4).try_into().unwrap());
    dev.reset();
    match (id, len) {
        (0, 4) => report::ok(TEST, format_args!("mode=events event=transport-reset")),
        _ => report::fail(TEST, format_args!("an unknown event {id} of {len} bytes")),
    }
    Ok(())
}

pub fn test(slot: &VirtioMmioSlot, cmdline: Cmdline) -> Result<(), &'static str> {
    let dev = Device::begin(slot, 0, 0).map_err(|_| "the device could not be set up")?;
    let rx = dev.queue(0, RX_BUFFERS as u16).map_err(|_| "the receive queue could not be set up")?;
    let tx = dev.queue(1, 8).map_err(|_| "the transmit queue could not be set up")?;
    dev.queue(2, 8).map_err(|_| "the event queue could not be set up")?;
    let rx_area = alloc(RX_BUFFERS * (HEADER + RX_PAYLOAD), 64).ok_or("out of probe memory")?;
    let tx_buf = alloc(HEADER + TX_CHUNK, 64).ok_or("out of probe memory")?;
    let cid = dev.config_read64(0);
    let mut s =
        Socket { dev, rx, tx, rx_area, rx_heads: [0; RX_BUFFERS], tx_buf, cid, fwd_cnt: 0, cmdline, listening: None };
    for i in 0..RX_BUFFERS {
        let at = s.rx_buffer(i);
        s.rx_heads[i] = s.rx.push(&[Buffer::writable(at, (HEADER + RX_PAYLOAD) as u32)]).ok_or("receive ring full")?;
    }
    s.dev.driver_ok();
    s.dev.notify(0);

    // Guest to host: connect, send a pattern, expect it echoed.
    let port = cmdline.number(TEST, "port", 5000) as u32;
    let total = cmdline.number(TEST, "bytes", 8192) as usize;
    let seed = cmdline.number(TEST, "seed", 1);
    s.send(OP_REQUEST, LOCAL_PORT, port, 0, &[])?;
    let (h, _) = s.recv()?;
    match h.op {
        OP_RESPONSE => {}
        OP_RST => return Err("the host refused the connection"),
        _ => return Err("the host answered the connection request with something else"),
    }
    let data: [u8; TX_CHUNK] = core::array::from_fn(|i| mix(seed ^ i as u64) as u8);
    let (mut sent, mut echoed, mut checksum) = (0usize, 0usize, FNV_OFFSET);
    while echoed < total {
        if sent < total && sent - echoed < BUF_ALLOC as usize / 2 {
            let n = TX_CHUNK.min(total - sent);
            s.send(OP_RW, LOCAL_PORT, port, 0, &data[..n])?;
            sent += n;
            continue;
        }
        let (h, payload) = s.recv()?;
        match h.op {
            OP_RW => {
                let got = bytes(payload, h.len as usize);
                for (k, b) in got.iter().enumerate() {
                    if *b != data[(echoed + k) % TX_CHUNK] {
                        return Err("the echo differs from what was sent");
                    }
                }
                checksum = fnv1a(checksum, got);
                echoed += got.len();
                s.fwd_cnt = s.fwd_cnt.wrapping_add(h.len);
            }
            OP_CREDIT_UPDATE => {}
            OP_RST | OP_SHUTDOWN => return Err("the host closed the connection before the echo was complete"),
            _ => return Err("an unexpected packet arrived"),
        }
    }
    s.send(OP_SHUTDOWN, LOCAL_PORT, port, 3, &[])?;

    // Host to guest, when asked: accept one connection and echo until the host shuts down.
    let mut accepted = 0usize;
    if let Some(listen) = cmdline.param(TEST, "listen").and_then(crate::cmdline::parse_number) {
        let listen = listen as u32;
        s.listening = Some(listen);
        crate::println!("PROBE virtio-vsock listening port={listen}");
        let peer = loop {
            let (h, _) = s.recv()?;
            if h.op == OP_REQUEST {
                break h.src_port;
            }
        };
        s.fwd_cnt = 0;
        s.send(OP_RESPONSE, listen, peer, 0, &[])?;
        loop {
            let (h, payload) = s.recv()?;
            match h.op {
                OP_RW => {
                    let mut chunk = [0u8; RX_PAYLOAD];
                    let n = h.len as usize;
                    chunk[..n].copy_from_slice(bytes(payload, n));
                    s.fwd_cnt = s.fwd_cnt.wrapping_add(h.len);
                    s.send(OP_RW, listen, peer, 0, &chunk[..n.min(TX_CHUNK)])?;
                    accepted += n;
                }
                OP_SHUTDOWN | OP_RST => break,
                _ => {}
            }
        }
        s.send(OP_RST, listen, peer, 0, &[])?;
    }
    s.dev.reset();
    report::ok(TEST, format_args!("cid={cid} port={port} bytes={echoed} checksum={checksum:#x} accepted_bytes={accepted}"));
    Ok(())
}
