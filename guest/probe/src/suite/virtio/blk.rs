//! `virtio-blk`: write a seeded pattern, flush, read it back and compare; ask for the device
//! ID; check that a read past the end fails with IOERR. On a read-only device: check that
//! writes are refused and report the checksum of what is there.
//!
//! Parameters: probe.virtio-blk.sectors (64), .start (0), .seed (1).

use crate::cmdline::{Cmdline, VirtioMmioSlot};
use crate::pattern::{FNV_OFFSET, fill_sector, fnv1a};
use crate::report;
use crate::virtio::mmio::Device;
use crate::virtio::queue::{Buffer, Virtqueue};
use crate::virtio::{alloc, bytes};

const TEST: &str = "virtio-blk";
const SECTOR: usize = 512;
/// Sectors per request.
const CHUNK: u64 = 64;

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;

struct Disk<'a> {
    dev: Device,
    q: Virtqueue,
    header: u64,
    status: u64,
    cmdline: Cmdline<'a>,
}

impl Disk<'_> {
    /// One request: header, optional data, status. Returns the status byte.
    fn request(&mut self, kind: u32, sector: u64, data: Option<(u64, u32, bool)>) -> Result<u8, &'static str> {
        let header = bytes(self.header, 16);
        header[0..4].copy_from_slice(&kind.to_le_bytes());
        header[4..8].fill(0);
        header[8..16].copy_from_slice(&sector.to_le_bytes());
        bytes(self.status, 1)[0] = 0xff;
        let mut chain = [Buffer::readable(self.header, 16); 3];
        let mut n = 1;
        if let Some((addr, len, device_writes)) = data {
            chain[n] = Buffer { addr, len, device_writes };
            n += 1;
        }
        chain[n] = Buffer::writable(self.status, 1);
        self.q.push(&chain[..=n]).ok_or("no free descriptors")?;
        self.dev.notify(0);
        self.dev.wait_used(&mut self.q, super::request_deadline(self.cmdline)).ok_or("no answer before the deadline")?;
        Ok(bytes(self.status, 1)[0])
    }
}

pub fn run(slot: &VirtioMmioSlot, cmdline: Cmdline) {
    match test(slot, cmdline) {
        Ok(()) => {}
        Err(reason) => report::fail(TEST, format_args!("{reason}")),
    }
}

fn test(slot: &VirtioMmioSlot, cmdline: Cmdline) -> Result<(), &'static str> {
    let dev = Device::begin(slot, 0, F_FLUSH | F_RO).map_err(|_| "the device could not be set up")?;
    let q = dev.queue(0, 16).map_err(|_| "queue 0 could not be set up")?;
    dev.driver_ok();
    let capacity = dev.config_read64(0);
    let readonly = dev.features & F_RO != 0;
    let flush = dev.features & F_FLUSH != 0;
    let data = alloc(CHUNK as usize * SECTOR, 4096).ok_or("out of probe memory")?;
    let readback = alloc(CHUNK as usize * SECTOR, 4096).ok_or("out of probe memory")?;
    let header = alloc(16, 16).ok_or("out of probe memory")?;
    let status = alloc(1, 1).ok_or("out of probe memory")?;
    let mut disk = Disk { dev, q, header, status, cmdline };

    let sectors = cmdline.number("virtio-blk", "sectors", 64);
    let start = cmdline.number("virtio-blk", "start", 0);
    let seed = cmdline.number("virtio-blk", "seed", 1);
    if start.checked_add(sectors).is_none_or(|end| end > capacity) {
        return Err("the sectors to test pass the end of the disk");
    }

    let id_buf = alloc(20, 4).ok_or("out of probe memory")?;
    let id_status = disk.request(T_GET_ID, 0, Some((id_buf, 20, true)))?;
    let id = bytes(id_buf, 20);
    let id_len = id.iter().position(|&b| b == 0).unwrap_or(20);
    let id_text = if id_status == S_OK { core::str::from_utf8(&id[..id_len]).unwrap_or("?") } else { "-" };

    let beyond = disk.request(T_IN, capacity, Some((readback, SECTOR as u32, true)))?;
    let beyond_end = if beyond == S_IOERR { "ioerr" } else { "accepted" };

    let mut checksum = FNV_OFFSET;
    let mut sector = start;
    while sector < start + sectors {
        let n = CHUNK.min(start + sectors - sector);
        let len = n as usize * SECTOR;
        if readonly {
            if disk.request(T_IN, sector, Some((readback, len as u32, true)))? != S_OK {
                return Err("a read of the read-only disk failed");
            }
        } else {
            let out = bytes(data, len);
            for (k, chunk) in out.chunks_exact_mut(SECTOR).enumerate() {
                fill_sector(seed, sector + k as u64, chunk);
            }
            if disk.request(T_OUT, sector, Some((data, len as u32, false)))? != S_OK {
                return Err("a write failed");
            }
            if flush && disk.request(T_FLUSH, 0, None)? != S_OK {
                return Err("a flush failed");
            }
            bytes(readback, len).fill(0);
            if disk.request(T_IN, sector, Some((readback, len as u32, true)))? != S_OK {
                return Err("a read failed");
            }
            if bytes(readback, len) != bytes(data, len) {
                return Err("the data read back differs from what was written");
            }
        }
        checksum = fnv1a(checksum, bytes(readback, len));
        sector += n;
    }
    let write = if readonly {
        match disk.request(T_OUT, start, Some((data, SECTOR as u32, false)))? {
            S_OK => return Err("the read-only disk accepted a write"),
            _ => "refused",
        }
    } else {
        "ok"
    };
    disk.dev.reset();
    report::ok(
        TEST,
        format_args!(
            "sectors={sectors} capacity={capacity} readonly={} flush={} write={write} beyond_end={beyond_end} id={id_text} checksum={checksum:#x}",
            if readonly { "yes" } else { "no" },
            if flush { "yes" } else { "no" }
        ),
    );
    Ok(())
}
