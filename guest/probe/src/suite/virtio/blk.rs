//! `virtio-blk`: write a seeded pattern, flush, read it back and compare; ask for the device
//! ID; check that a read past the end fails with IOERR. On a read-only device: check that
//! writes are refused and report the checksum of what is there.
//!
//! Parameters: probe.virtio-blk.sectors (64), .start (0), .seed (1), .buffers (an address,
//! 4 KiB-aligned below 8 GiB, for the data buffers instead of the probe's arena: memory the
//! guest plugged with virtio-mem, say).
//!
//! With `probe.virtio-blk.mode=throughput` it measures instead: sequential 128 KiB reads over
//! `.mib` (16) MiB, then `.ops` (4096) random 4 KiB reads, `.depth` (8) requests in flight,
//! polled; it reports MB/s and IOPS from the TSC (see tsc.rs). With EVENT_IDX (unless
//! `.event_idx=off`) it kicks only when the device asks and takes completions from the used
//! ring with interrupts suppressed. `.verify=SEED` checks every read against the pattern of
//! that seed (a disk the test filled with it).
//!
//! With `probe.virtio-blk.mode=counter` it counts: tick n (from 1) writes sector n % 64 with
//! the pattern of seed n, flushes, prints `PROBE tick n=N`, then waits `.every` TSC cycles
//! (100M). It stops after `.ticks` ticks (0: never), for pause and snapshot tests.

use crate::cmdline::{Cmdline, VirtioMmioSlot};
use crate::pattern::{FNV_OFFSET, fill_sector, fnv1a};
use crate::report;
use crate::virtio::mmio::Device;
use crate::virtio::queue::{Buffer, Virtqueue};
use crate::virtio::transport::Transport;
use crate::virtio::{alloc, bytes};

const TEST: &str = "virtio-blk";
const SECTOR: usize = 512;
/// Sectors per request.
const CHUNK: u64 = 64;

const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;
const F_EVENT_IDX: u64 = 1 << 29;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;
const S_OK: u8 = 0;
const S_IOERR: u8 = 1;

struct Disk<'a> {
    dev: Transport,
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

const MAX_DEPTH: usize = 32;
const SEQ_REQUEST: usize = 128 << 10;
const RAND_REQUEST: usize = 4 << 10;

/// Whether `data` holds the pattern of `seed` for the sectors from `sector` on.
fn holds_pattern(data: &[u8], seed: u64, sector: u64) -> bool {
    let mut expected = [0u8; SECTOR];
    data.chunks_exact(SECTOR).enumerate().all(|(k, actual)| {
        fill_sector(seed, sector + k as u64, &mut expected);
        actual == expected
    })
}

/// Keeps `depth` reads in flight until `total` have completed; returns the TSC cycles taken.
/// With `verify`, each read's bytes must be the pattern of that seed for its sectors.
#[allow(clippy::too_many_arguments)]
fn read_stream(
    dev: &Device,
    q: &mut Virtqueue,
    slots: &[(u64, u64, u64)],
    total: u64,
    len: usize,
    mut next_sector: impl FnMut(u64) -> u64,
    verify: Option<u64>,
    cmdline: Cmdline,
) -> Result<u64, &'static str> {
    let start = crate::hw::rdtsc();
    let (mut issued, mut done) = (0u64, 0u64);
    let mut heads = [u16::MAX; MAX_DEPTH];
    let mut sectors = [0u64; MAX_DEPTH];
    let submit = |q: &mut Virtqueue, slot: usize, sector: u64| -> Option<u16> {
        let (header, data, status) = slots[slot];
        let h = bytes(header, 16);
        h[0..4].copy_from_slice(&T_IN.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        q.push(&[Buffer::readable(header, 16), Buffer::writable(data, len as u32), Buffer::writable(status, 1)])
    };
    let old = q.avail_index();
    for (slot, head) in heads.iter_mut().enumerate().take(slots.len()) {
        if issued < total {
            sectors[slot] = next_sector(issued);
            *head = submit(q, slot, sectors[slot]).ok_or("no free descriptors")?;
            issued += 1;
        }
    }
    if q.kick_needed(old) {
        dev.notify(0);
    }
    while done < total {
        let (head, _) = dev.wait_used(q, super::request_deadline(cmdline)).ok_or("no answer before the deadline")?;
        let slot = heads.iter().position(|&h| h == head).ok_or("the device completed an unknown request")?;
        if bytes(slots[slot].2, 1)[0] != S_OK {
            return Err("a read failed");
        }
        if let Some(seed) = verify
            && !holds_pattern(bytes(slots[slot].1, len), seed, sectors[slot])
        {
            return Err("a read returned other bytes than the disk holds");
        }
        done += 1;
        if issued < total {
            let old = q.avail_index();
            sectors[slot] = next_sector(issued);
            heads[slot] = submit(q, slot, sectors[slot]).ok_or("no free descriptors")?;
            issued += 1;
            if q.kick_needed(old) {
                dev.notify(0);
            }
        }
    }
    Ok(crate::hw::rdtsc() - start)
}

pub fn throughput(slot: &VirtioMmioSlot, cmdline: Cmdline) -> Result<(), &'static str> {
    // EVENT_IDX unless `.event_idx=off`: kicks only when the device asks, completions taken
    // from the used ring with interrupts suppressed, as Linux's driver does when it polls.
    let wanted = if cmdline.param(TEST, "event_idx") == Some("off") { 0 } else { F_EVENT_IDX };
    let dev = Device::begin(slot, 0, wanted).map_err(|_| "the device could not be set up")?;
    let depth = (cmdline.number(TEST, "depth", 8) as usize).clamp(1, MAX_DEPTH);
    let mut q = dev.queue(0, (depth * 3).next_power_of_two() as u16).map_err(|_| "queue 0 could not be set up")?;
    q.event_idx = dev.features & F_EVENT_IDX != 0;
    if q.event_idx {
        q.suppress_interrupts();
    }
    if usize::from(q.size) < depth * 3 {
        return Err("the device's queue is too small for that depth");
    }
    dev.driver_ok();
    let capacity = dev.config_read64(0);
    let mut slots = [(0u64, 0u64, 0u64); MAX_DEPTH];
    for s in slots.iter_mut().take(depth) {
        *s = (
            alloc(16, 16).ok_or("out of probe memory")?,
            alloc(SEQ_REQUEST, 4096).ok_or("out of probe memory")?,
            alloc(1, 1).ok_or("out of probe memory")?,
        );
    }
    let slots = &slots[..depth];
    let mib = cmdline.number(TEST, "mib", 16);
    let seq_sectors = (SEQ_REQUEST / SECTOR) as u64;
    let seq_requests = (mib << 20) / SEQ_REQUEST as u64;
    if seq_requests * seq_sectors > capacity {
        return Err("the disk is smaller than the sequential read");
    }
    let verify = cmdline.param(TEST, "verify").and_then(crate::cmdline::parse_number);
    let seq_cycles =
        read_stream(&dev, &mut q, slots, seq_requests, SEQ_REQUEST, |i| i * seq_sectors, verify, cmdline)?;
    let ops = cmdline.number(TEST, "ops", 4096);
    let rand_sectors = (RAND_REQUEST / SECTOR) as u64;
    let blocks = (capacity / rand_sectors).max(1);
    let rand_cycles = read_stream(
        &dev,
        &mut q,
        slots,
        ops,
        RAND_REQUEST,
        |i| crate::pattern::mix(i) % blocks * rand_sectors,
        verify,
        cmdline,
    )?;
    dev.reset();
    let khz = crate::tsc::khz(cmdline).unwrap_or(0).max(1);
    let seq_bytes = seq_requests * SEQ_REQUEST as u64;
    // bytes / (cycles / (khz * 1000)) / 2^20
    let mb_per_s = seq_bytes * khz * 1000 / seq_cycles.max(1) / (1 << 20);
    let iops = ops * khz * 1000 / rand_cycles.max(1);
    report::ok(
        TEST,
        format_args!(
            "mode=throughput depth={depth} event_idx={} seq_mb_per_s={mb_per_s} rand_4k_iops={iops} seq_bytes={seq_bytes} seq_cycles={seq_cycles} rand_ops={ops} rand_cycles={rand_cycles} tsc_khz={khz}",
            if q.event_idx { "on" } else { "off" }
        ),
    );
    Ok(())
}

/// Sectors the counter cycles through.
pub const COUNTER_SECTORS: u64 = 64;

pub fn counter(slot: &VirtioMmioSlot, cmdline: Cmdline) -> Result<(), &'static str> {
    let dev = Device::begin(slot, 0, F_FLUSH).map_err(|_| "the device could not be set up")?;
    let q = dev.queue(0, 16).map_err(|_| "queue 0 could not be set up")?;
    dev.driver_ok();
    if dev.features & F_FLUSH == 0 {
        return Err("the counter needs a disk with flush");
    }
    let data = alloc(SECTOR, 4096).ok_or("out of probe memory")?;
    let header = alloc(16, 16).ok_or("out of probe memory")?;
    let status = alloc(1, 1).ok_or("out of probe memory")?;
    let mut disk = Disk { dev: Transport::Mmio(dev), q, header, status, cmdline };
    let every = cmdline.number(TEST, "every", 100_000_000);
    let ticks = cmdline.number(TEST, "ticks", 0);
    let mut n = 1u64;
    while ticks == 0 || n <= ticks {
        let sector = n % COUNTER_SECTORS;
        fill_sector(n, sector, bytes(data, SECTOR));
        if disk.request(T_OUT, sector, Some((data, SECTOR as u32, false)))? != S_OK {
            return Err("a counter write failed");
        }
        if disk.request(T_FLUSH, 0, None)? != S_OK {
            return Err("a counter flush failed");
        }
        crate::println!("PROBE tick n={n}");
        crate::hw::spin_cycles(every);
        n += 1;
    }
    report::ok(TEST, format_args!("mode=counter ticks={ticks}"));
    Ok(())
}

pub fn test(slot: &VirtioMmioSlot, cmdline: Cmdline) -> Result<(), &'static str> {
    let dev = Device::begin(slot, 0, F_FLUSH | F_RO).map_err(|_| "the device could not be set up")?;
    check(Transport::Mmio(dev), cmdline)
}

/// The same test of a disk that is a PCI function (one that QEMU, say, puts on its bus).
pub fn test_pci(dev: crate::pci::VirtioPci, cmdline: Cmdline) -> Result<(), &'static str> {
    check(Transport::pci(dev, 0, F_FLUSH | F_RO)?, cmdline)
}

fn check(mut dev: Transport, cmdline: Cmdline) -> Result<(), &'static str> {
    let q = dev.queue(0, 16)?;
    dev.driver_ok();
    let capacity = dev.config_read64(0);
    let readonly = dev.features() & F_RO != 0;
    let flush = dev.features() & F_FLUSH != 0;
    let (data, readback) = match cmdline.number(TEST, "buffers", 0) {
        0 => (
            alloc(CHUNK as usize * SECTOR, 4096).ok_or("out of probe memory")?,
            alloc(CHUNK as usize * SECTOR, 4096).ok_or("out of probe memory")?,
        ),
        at if at % 4096 == 0 && at + 2 * CHUNK * SECTOR as u64 <= 8 << 30 => (at, at + CHUNK * SECTOR as u64),
        _ => return Err("probe.virtio-blk.buffers must be 4 KiB-aligned and below 8 GiB"),
    };
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
