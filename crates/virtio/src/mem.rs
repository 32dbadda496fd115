//! virtio-mem: a region of guest physical memory beside RAM that the guest plugs and unplugs
//! block by block, following the size the host requests. Unplugged blocks go back to the host,
//! so the VMM's RSS follows what the guest has plugged.
//!
//! The device offers VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE and enforces it through a
//! [`BlockMapper`]: the VMM's gives KVM a memory slot for each plugged block and none for an
//! unplugged one, so the guest's loads and stores to unplugged blocks exit to the VMM
//! ([`UnpluggedGuard`]: loads read zeroes, stores are dropped, each is counted and logged with
//! its block) and never map host memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::Bytes;

use crate::device::{ActivateError, Activation, VirtioDevice, VirtioInterrupt, read_config_bytes};
use crate::metrics::DeviceMetrics;
use crate::worker::{Backend, Worker, serve_queue};
use crate::{F_VERSION_1, GuestMemory, TYPE_MEM};

const QUEUE_SIZES: [u16; 1] = [128];
/// The guest must not touch unplugged memory (virtio 1.2, 5.15.3).
pub const F_UNPLUGGED_INACCESSIBLE: u64 = 1 << 1;
// Requests, responses and block states (virtio 1.2, 5.15.6).
const REQ_PLUG: u16 = 0;
const REQ_UNPLUG: u16 = 1;
const REQ_UNPLUG_ALL: u16 = 2;
const REQ_STATE: u16 = 3;
const RESP_ACK: u16 = 0;
const RESP_NACK: u16 = 1;
const RESP_ERROR: u16 = 3;
const STATE_PLUGGED: u16 = 0;
const STATE_UNPLUGGED: u16 = 1;
const STATE_MIXED: u16 = 2;
/// type, padding, addr, nb_blocks, padding.
const REQUEST_BYTES: usize = 24;
/// type, padding, state.
const RESPONSE_BYTES: usize = 10;
/// Blocks are whole pages, a power of two of them (the configuration asks for at least 2 MiB,
/// as Linux plugs whole pageblocks).
pub const MIN_BLOCK_SIZE: u64 = 4096;

/// Where the region lies and how it is cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemRegion {
    pub addr: u64,
    pub size: u64,
    pub block_size: u64,
}

impl MemRegion {
    fn blocks(&self) -> u64 {
        self.size / self.block_size
    }
}

/// What the guest has plugged and what the host asks for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Plugged {
    requested: u64,
    /// One bit per block.
    bits: Vec<u64>,
    count: u64,
}

impl Plugged {
    fn get(&self, block: u64) -> bool {
        self.bits[(block / 64) as usize] & (1 << (block % 64)) != 0
    }
    fn set(&mut self, block: u64, on: bool) {
        if self.get(block) != on {
            self.bits[(block / 64) as usize] ^= 1 << (block % 64);
            if on {
                self.count += 1;
            } else {
                self.count -= 1;
            }
        }
    }
}

fn check_requested(r: &MemRegion, bytes: u64) -> Result<(), String> {
    if bytes > r.size || !bytes.is_multiple_of(r.block_size) {
        return Err(format!(
            "the requested size must be a multiple of the {} MiB block size and at most the region's {} MiB",
            r.block_size >> 20,
            r.size >> 20
        ));
    }
    Ok(())
}

/// Makes blocks of the region guest memory (plug) or takes them away (unplug). Block numbers
/// count from the region's start and always lie within it.
pub trait BlockMapper: Send + Sync {
    /// Blocks [first, first + count) become guest memory; on an error none of them is.
    fn plug(&self, first: u64, count: u64) -> Result<(), String>;
    /// Blocks [first, first + count) stop being guest memory, and the host takes their pages.
    fn unplug(&self, first: u64, count: u64) -> Result<(), String>;
}

/// A mapper that only drops unplugged pages, for tests and the fuzzer.
pub struct ReleasingMapper {
    pub mem: GuestMemory,
    pub region: MemRegion,
}

impl BlockMapper for ReleasingMapper {
    fn plug(&self, _first: u64, _count: u64) -> Result<(), String> {
        Ok(())
    }
    fn unplug(&self, first: u64, count: u64) -> Result<(), String> {
        let bs = self.region.block_size;
        match crate::balloon::release(&self.mem, self.region.addr + first * bs, count * bs) {
            true => Ok(()),
            false => Err("the pages were not released".into()),
        }
    }
}

/// The device's handle for the VMM: set the requested size and read what is plugged.
pub struct MemControl {
    region: MemRegion,
    plugged: Mutex<Plugged>,
    /// Set once the driver is up, so that a new requested size can be announced.
    interrupt: Mutex<Option<Arc<dyn VirtioInterrupt>>>,
    mapper: Arc<dyn BlockMapper>,
    /// The guest's loads and stores that reached unplugged blocks.
    unplugged_accesses: AtomicU64,
}

/// What `GET /hotplug/memory` reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemStatus {
    pub region: MemRegion,
    pub plugged_bytes: u64,
    pub requested_bytes: u64,
    pub unplugged_accesses: u64,
}

impl MemControl {
    pub fn status(&self) -> MemStatus {
        let p = self.lock();
        MemStatus {
            region: self.region,
            plugged_bytes: p.count * self.region.block_size,
            requested_bytes: p.requested,
            unplugged_accesses: self.unplugged_accesses.load(Ordering::Relaxed),
        }
    }

    pub fn region(&self) -> MemRegion {
        self.region
    }

    /// Whether each block of the region is plugged, in order.
    pub fn plugged_blocks(&self) -> Vec<bool> {
        let p = self.lock();
        (0..self.region.blocks()).map(|b| p.get(b)).collect()
    }

    /// The unplugged runs of blocks as (guest address, length).
    pub fn unplugged_ranges(&self) -> Vec<(u64, u64)> {
        let bs = self.region.block_size;
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (block, plugged) in self.plugged_blocks().into_iter().enumerate() {
            let gpa = self.region.addr + block as u64 * bs;
            match ranges.last_mut() {
                _ if plugged => {}
                Some((start, len)) if *start + *len == gpa => *len += bs,
                _ => ranges.push((gpa, bs)),
            }
        }
        ranges
    }

    /// Counts and reports (rate-limited) a guest access that reached an unplugged block.
    fn unplugged_access(&self, offset: u64, len: usize, write: bool) {
        self.unplugged_accesses.fetch_add(1, Ordering::Relaxed);
        let block = offset / self.region.block_size;
        let gpa = self.region.addr + offset;
        if write {
            crate::guest_fault!(
                "virtio-mem: the guest wrote {len} bytes to unplugged block {block} (at {gpa:#x}); the write was dropped"
            );
        } else {
            crate::guest_fault!(
                "virtio-mem: the guest read {len} bytes from unplugged block {block} (at {gpa:#x}); it read zeroes"
            );
        }
    }

    /// Asks the guest for `bytes` of plugged memory (a whole number of blocks, at most the
    /// region) and tells the driver (a config change interrupt).
    pub fn set_requested(&self, bytes: u64) -> Result<(), String> {
        check_requested(&self.region, bytes)?;
        self.lock().requested = bytes;
        tracing::info!("virtio-mem: requested size set to {} MiB", bytes >> 20);
        if let Some(interrupt) = self.interrupt.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            interrupt.signal_config_change();
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Plugged> {
        self.plugged.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The blocks [first, first + count) when they lie in the region, else None.
    fn blocks_of(&self, addr: u64, count: u16) -> Option<std::ops::Range<u64>> {
        let r = self.region;
        let offset = addr.checked_sub(r.addr)?;
        if count == 0 || !offset.is_multiple_of(r.block_size) {
            return None;
        }
        let first = offset / r.block_size;
        let end = first.checked_add(u64::from(count))?;
        (end <= r.blocks()).then_some(first..end)
    }

    /// Serves one request: the response type and, for STATE, the state.
    fn serve(&self, mem: &GuestMemory, kind: u16, addr: u64, count: u16) -> (u16, u16) {
        let block_size = self.region.block_size;
        let mut p = self.lock();
        match kind {
            REQ_UNPLUG_ALL => {
                let mut block = 0;
                while block < self.region.blocks() {
                    let start = block;
                    while block < self.region.blocks() && p.get(block) {
                        block += 1;
                    }
                    if block > start && !self.unplug(mem, &mut p, start..block) {
                        return (RESP_NACK, 0);
                    }
                    block += 1;
                }
                crate::guest_event!("virtio-mem: the guest unplugged all its memory");
                (RESP_ACK, 0)
            }
            REQ_PLUG | REQ_UNPLUG | REQ_STATE => {
                let Some(blocks) = self.blocks_of(addr, count) else {
                    crate::guest_fault!(
                        "virtio-mem: request {kind} names blocks outside the region ({addr:#x}, {count})"
                    );
                    return (RESP_ERROR, 0);
                };
                let plugged = blocks.clone().filter(|b| p.get(*b)).count() as u64;
                let len = blocks.end - blocks.start;
                match kind {
                    REQ_STATE => {
                        let state = match plugged {
                            0 => STATE_UNPLUGGED,
                            n if n == len => STATE_PLUGGED,
                            _ => STATE_MIXED,
                        };
                        (RESP_ACK, state)
                    }
                    REQ_PLUG if plugged != 0 => {
                        crate::guest_fault!("virtio-mem: the guest plugs blocks at {addr:#x} that are plugged already");
                        (RESP_ERROR, 0)
                    }
                    REQ_PLUG if (p.count + len) * block_size > p.requested => (RESP_NACK, 0),
                    REQ_PLUG => {
                        if let Err(e) = self.mapper.plug(blocks.start, len) {
                            crate::guest_fault!("virtio-mem: blocks at {addr:#x} cannot be plugged: {e}");
                            return (RESP_NACK, 0);
                        }
                        blocks.for_each(|b| p.set(b, true));
                        crate::guest_event!(
                            "virtio-mem: the guest plugged {} MiB at {addr:#x}; {} MiB plugged",
                            (len * block_size) >> 20,
                            (p.count * block_size) >> 20
                        );
                        (RESP_ACK, 0)
                    }
                    _ if plugged != len => {
                        crate::guest_fault!("virtio-mem: the guest unplugs blocks at {addr:#x} that are not plugged");
                        (RESP_ERROR, 0)
                    }
                    _ => {
                        if !self.unplug(mem, &mut p, blocks) {
                            return (RESP_NACK, 0);
                        }
                        crate::guest_event!(
                            "virtio-mem: the guest unplugged {} MiB at {addr:#x}; {} MiB plugged",
                            (len * block_size) >> 20,
                            (p.count * block_size) >> 20
                        );
                        (RESP_ACK, 0)
                    }
                }
            }
            _ => {
                crate::guest_fault!("virtio-mem: unknown request type {kind}");
                (RESP_ERROR, 0)
            }
        }
    }

    /// Takes `blocks` from the guest and gives their pages back to the host. They are marked
    /// dirty, so that a diff snapshot records them as zeroes. False when the mapper failed.
    fn unplug(&self, mem: &GuestMemory, p: &mut Plugged, blocks: std::ops::Range<u64>) -> bool {
        let bs = self.region.block_size;
        let (gpa, len) = (self.region.addr + blocks.start * bs, (blocks.end - blocks.start) * bs);
        if let Err(e) = self.mapper.unplug(blocks.start, blocks.end - blocks.start) {
            // Guest-triggered, so rate-limited like the rest.
            crate::guest_fault!("virtio-mem: the host cannot take back {} MiB at {gpa:#x}: {e}", len >> 20);
            return false;
        }
        blocks.for_each(|b| p.set(b, false));
        crate::mark_dirty(mem, gpa, len);
        true
    }

    /// What the guest sees where it has no memory: the region on the MMIO bus.
    pub fn guard(self: &Arc<Self>) -> UnpluggedGuard {
        UnpluggedGuard(self.clone())
    }
}

/// The region as a device on the MMIO bus. Plugged blocks are KVM memory slots, so only the
/// guest's loads and stores to unplugged blocks arrive here: loads read zeroes, stores are
/// dropped, and each is counted and reported with its block.
pub struct UnpluggedGuard(Arc<MemControl>);

impl devices::BusDevice for UnpluggedGuard {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        self.0.unplugged_access(offset, data.len(), false);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.0.unplugged_access(offset, data.len(), true);
    }
}

pub struct Mem {
    control: Arc<MemControl>,
    metrics: Arc<DeviceMetrics>,
    worker: Option<Worker>,
}

impl Mem {
    /// A device for `region` (block size a power of two of pages dividing the size) asking for
    /// `requested` bytes from the start; `mapper` plugs and unplugs its blocks.
    pub fn new(region: MemRegion, requested: u64, mapper: Arc<dyn BlockMapper>) -> Result<Mem, String> {
        if !region.block_size.is_power_of_two()
            || region.block_size < MIN_BLOCK_SIZE
            || region.size == 0
            || !region.size.is_multiple_of(region.block_size)
            || !region.addr.is_multiple_of(region.block_size)
        {
            return Err(format!("the region {region:?} is not cut into whole blocks"));
        }
        check_requested(&region, requested)?;
        let words = region.blocks().div_ceil(64) as usize;
        let control = Arc::new(MemControl {
            region,
            plugged: Mutex::new(Plugged { requested, bits: vec![0; words], count: 0 }),
            interrupt: Mutex::new(None),
            mapper,
            unplugged_accesses: AtomicU64::new(0),
        });
        Ok(Mem { control, metrics: Arc::default(), worker: None })
    }

    pub fn control(&self) -> Arc<MemControl> {
        self.control.clone()
    }
}

impl VirtioDevice for Mem {
    fn device_type(&self) -> u32 {
        TYPE_MEM
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_UNPLUGGED_INACCESSIBLE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let status = self.control.status();
        let r = status.region;
        // block_size, node_id and padding, addr, region_size, usable_region_size,
        // plugged_size, requested_size.
        let mut config = [0u8; 56];
        for (at, value) in [
            (0, r.block_size),
            (16, r.addr),
            (24, r.size),
            (32, r.size),
            (40, status.plugged_bytes),
            (48, status.requested_bytes),
        ] {
            config[at..at + 8].copy_from_slice(&value.to_le_bytes());
        }
        read_config_bytes(&config, offset, data);
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        *self.control.interrupt.lock().unwrap_or_else(|p| p.into_inner()) = Some(activation.interrupt.clone());
        let backend = MemBackend { control: self.control.clone(), metrics: self.metrics.clone() };
        self.worker =
            Some(Worker::spawn(sandbox::ThreadKind::Mem, backend, activation).map_err(ActivateError::Worker)?);
        Ok(())
    }
    fn quiesce(&mut self) -> Option<Vec<Queue>> {
        self.worker.take().and_then(|mut w| w.stop())
    }
    /// Plugged blocks stay plugged across a reset (the specification requires it); the driver
    /// finds them in plugged_size and unplugs them if it does not know them.
    fn reset(&mut self) {
        self.worker = None;
        *self.control.interrupt.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
    fn save_state(&self) -> serde_json::Value {
        let p = self.control.lock();
        serde_json::json!({ "requested": p.requested, "plugged": p.bits })
    }
    fn restore_state(&mut self, state: &serde_json::Value) -> Result<(), String> {
        let region = self.control.region;
        let requested = state["requested"].as_u64().ok_or("virtio-mem: requested is missing")?;
        check_requested(&region, requested).map_err(|e| format!("virtio-mem: {e}"))?;
        let words: Vec<u64> = serde_json::from_value(state["plugged"].clone())
            .map_err(|_| "virtio-mem: plugged is not a list of blocks")?;
        let mut restored = Plugged { requested, bits: vec![0; region.blocks().div_ceil(64) as usize], count: 0 };
        if words.len() != restored.bits.len() {
            return Err(format!(
                "virtio-mem: the snapshot has {} words of blocks where the region has {}",
                words.len(),
                restored.bits.len()
            ));
        }
        // Bits past the region's last block are ignored.
        for block in (0..region.blocks()).filter(|b| words[(b / 64) as usize] & (1 << (b % 64)) != 0) {
            restored.set(block, true);
        }
        *self.control.lock() = restored;
        Ok(())
    }
    fn metrics(&self) -> Option<Arc<DeviceMetrics>> {
        Some(self.metrics.clone())
    }
}

struct MemBackend {
    control: Arc<MemControl>,
    metrics: Arc<DeviceMetrics>,
}

impl Backend for MemBackend {
    fn process_queue(&mut self, _index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let (control, metrics) = (&self.control, &self.metrics);
        serve_queue("virtio-mem", &mut queues[0], mem, |chain| {
            let mut request = None;
            let mut response = None;
            for desc in chain {
                if desc.is_write_only() {
                    response = response.or(Some(desc.addr()).filter(|_| desc.len() as usize >= RESPONSE_BYTES));
                } else if request.is_none() && desc.len() as usize >= REQUEST_BYTES {
                    let mut bytes = [0u8; REQUEST_BYTES];
                    request = mem.read_slice(&mut bytes, desc.addr()).ok().map(|()| bytes);
                }
            }
            let Some(response) = response else {
                crate::guest_fault!("virtio-mem: a request has no {RESPONSE_BYTES}-byte writable response");
                metrics.error();
                return 0;
            };
            let (kind, state) = match request {
                Some(r) => control.serve(
                    mem,
                    u16::from_le_bytes([r[0], r[1]]),
                    u64::from_le_bytes(r[8..16].try_into().expect("eight bytes")),
                    u16::from_le_bytes([r[16], r[17]]),
                ),
                None => {
                    crate::guest_fault!("virtio-mem: a request is shorter than {REQUEST_BYTES} bytes");
                    (RESP_ERROR, 0)
                }
            };
            if kind == RESP_ERROR {
                metrics.error();
            }
            metrics.request(0, 0);
            let mut out = [0u8; RESPONSE_BYTES];
            out[0..2].copy_from_slice(&kind.to_le_bytes());
            out[8..10].copy_from_slice(&state.to_le_bytes());
            match mem.write_slice(&out, response) {
                Ok(()) => RESPONSE_BYTES as u32,
                Err(_) => 0,
            }
        })
    }
}

/// The worker's work for the fuzzer: requests over a driver-written queue in `mem`, against a
/// region of the upper half of `mem` in 4 KiB blocks; `kicks` notifications, with the
/// requested size changing between them.
#[doc(hidden)]
pub fn fuzz_queues(mem: &GuestMemory, queues: &mut [Queue], kicks: usize) {
    use vm_memory::GuestMemoryBackend;
    let size = mem.last_addr().0.div_ceil(2);
    let region = MemRegion { addr: size, size, block_size: MIN_BLOCK_SIZE };
    let mapper = Arc::new(ReleasingMapper { mem: mem.clone(), region });
    let Ok(device) = Mem::new(region, 0, mapper) else { return };
    let mut backend = MemBackend { control: device.control(), metrics: Arc::default() };
    for kick in 0..kicks {
        let _ = backend.control.set_requested((kick as u64 + 1) % 3 * size / 2);
        backend.process_queue(0, queues, mem);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    const MIB: u64 = 1 << 20;

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    const REGION: MemRegion = MemRegion { addr: 8 * MIB, size: 8 * MIB, block_size: 2 * MIB };

    /// Records what it was asked to do; refuses to plug block 3.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<(bool, u64, u64)>>);

    impl BlockMapper for Recorder {
        fn plug(&self, first: u64, count: u64) -> Result<(), String> {
            if (first..first + count).contains(&3) {
                return Err("no slot left".into());
            }
            self.0.lock().unwrap().push((true, first, count));
            Ok(())
        }
        fn unplug(&self, first: u64, count: u64) -> Result<(), String> {
            self.0.lock().unwrap().push((false, first, count));
            Ok(())
        }
    }

    fn device() -> Mem {
        Mem::new(REGION, 4 * MIB, Arc::new(ReleasingMapper { mem: memory(), region: REGION })).unwrap()
    }

    #[test]
    fn plugs_up_to_the_requested_size_and_unplugs_only_what_is_plugged() {
        let (mem, dev) = (memory(), device());
        let c = dev.control();
        assert_eq!(c.serve(&mem, REQ_PLUG, 8 * MIB, 2), (RESP_ACK, 0));
        assert_eq!(c.status().plugged_bytes, 4 * MIB);
        assert_eq!(c.serve(&mem, REQ_PLUG, 12 * MIB, 1), (RESP_NACK, 0), "beyond the requested size");
        assert_eq!(c.serve(&mem, REQ_PLUG, 8 * MIB, 1), (RESP_ERROR, 0), "plugged already");
        assert_eq!(c.serve(&mem, REQ_STATE, 8 * MIB, 2), (RESP_ACK, STATE_PLUGGED));
        assert_eq!(c.serve(&mem, REQ_STATE, 8 * MIB, 3), (RESP_ACK, STATE_MIXED));
        assert_eq!(c.serve(&mem, REQ_STATE, 12 * MIB, 2), (RESP_ACK, STATE_UNPLUGGED));
        assert_eq!(c.serve(&mem, REQ_UNPLUG, 10 * MIB, 2), (RESP_ERROR, 0), "half of it is not plugged");
        assert_eq!(c.serve(&mem, REQ_UNPLUG, 10 * MIB, 1), (RESP_ACK, 0));
        assert_eq!(c.status().plugged_bytes, 2 * MIB);
        assert_eq!(c.serve(&mem, REQ_UNPLUG_ALL, 0, 0), (RESP_ACK, 0));
        assert_eq!(c.status().plugged_bytes, 0);
    }

    #[test]
    fn requests_outside_the_region_or_misaligned_are_errors() {
        let (mem, dev) = (memory(), device());
        let c = dev.control();
        for (addr, count) in
            [(0, 1), (7 * MIB, 1), (9 * MIB, 1), (8 * MIB, 0), (8 * MIB, 5), (14 * MIB, 2), (u64::MAX, 1)]
        {
            assert_eq!(c.serve(&mem, REQ_PLUG, addr, count), (RESP_ERROR, 0), "{addr:#x} {count}");
            assert_eq!(c.serve(&mem, REQ_STATE, addr, count), (RESP_ERROR, 0), "{addr:#x} {count}");
        }
        assert_eq!(c.serve(&mem, 9, 8 * MIB, 1), (RESP_ERROR, 0));
        assert_eq!(c.status().plugged_bytes, 0);
    }

    #[test]
    fn unplugged_memory_reads_zero_and_the_requested_size_is_checked() {
        let mem = memory();
        let dev = Mem::new(REGION, 4 * MIB, Arc::new(ReleasingMapper { mem: mem.clone(), region: REGION })).unwrap();
        let c = dev.control();
        assert_eq!(c.serve(&mem, REQ_PLUG, 8 * MIB, 1), (RESP_ACK, 0));
        mem.write_obj(0xfeed_u64, GuestAddress(8 * MIB + 4096)).unwrap();
        assert_eq!(c.serve(&mem, REQ_UNPLUG, 8 * MIB, 1), (RESP_ACK, 0));
        assert_eq!(mem.read_obj::<u64>(GuestAddress(8 * MIB + 4096)).unwrap(), 0);
        assert!(c.set_requested(3 * MIB).is_err());
        assert!(c.set_requested(10 * MIB).is_err());
        assert!(c.set_requested(8 * MIB).is_ok());
        assert_eq!(c.status().requested_bytes, 8 * MIB);
    }

    #[test]
    fn state_survives_save_and_restore_and_bad_state_is_refused() {
        let (mem, mut dev) = (memory(), device());
        dev.control().serve(&mem, REQ_PLUG, 10 * MIB, 2);
        let saved = dev.save_state();
        let mut other = device();
        other.restore_state(&saved).unwrap();
        assert_eq!(other.control().status(), dev.control().status());
        assert_eq!(other.control().serve(&mem, REQ_STATE, 10 * MIB, 2), (RESP_ACK, STATE_PLUGGED));
        assert!(other.restore_state(&serde_json::json!({"requested": 0, "plugged": [0, 0]})).is_err());
        assert!(other.restore_state(&serde_json::json!({"requested": 3, "plugged": [0]})).is_err());
        assert!(other.restore_state(&serde_json::json!({"requested": 0, "plugged": "x"})).is_err());
        // Bits past the region's last block are ignored.
        other.restore_state(&serde_json::json!({"requested": 0, "plugged": [u64::MAX]})).unwrap();
        assert_eq!(other.control().status().plugged_bytes, 8 * MIB);
        dev.reset();
        assert_eq!(dev.control().status().plugged_bytes, 4 * MIB, "a reset keeps plugged blocks");
    }

    #[test]
    fn the_mapper_sees_every_plug_and_unplug_and_a_refused_plug_is_a_nack() {
        let mem = memory();
        let recorder = Arc::new(Recorder::default());
        let dev = Mem::new(REGION, 8 * MIB, recorder.clone()).unwrap();
        let c = dev.control();
        assert_eq!(c.serve(&mem, REQ_PLUG, 8 * MIB, 2), (RESP_ACK, 0));
        assert_eq!(c.serve(&mem, REQ_PLUG, 12 * MIB, 2), (RESP_NACK, 0), "the mapper has no slot for block 3");
        assert_eq!(c.serve(&mem, REQ_STATE, 12 * MIB, 2), (RESP_ACK, STATE_UNPLUGGED), "a refused plug plugs nothing");
        assert_eq!(c.serve(&mem, REQ_PLUG, 12 * MIB, 1), (RESP_ACK, 0));
        assert_eq!(c.plugged_blocks(), [true, true, true, false]);
        assert_eq!(c.unplugged_ranges(), [(14 * MIB, 2 * MIB)]);
        assert_eq!(c.serve(&mem, REQ_UNPLUG, 10 * MIB, 1), (RESP_ACK, 0));
        assert_eq!(c.unplugged_ranges(), [(10 * MIB, 2 * MIB), (14 * MIB, 2 * MIB)]);
        assert_eq!(c.serve(&mem, REQ_UNPLUG_ALL, 0, 0), (RESP_ACK, 0));
        assert_eq!(
            *recorder.0.lock().unwrap(),
            [(true, 0, 2), (true, 2, 1), (false, 1, 1), (false, 0, 1), (false, 2, 1)],
            "UNPLUG_ALL unplugs each plugged run"
        );
        assert_eq!(dev.features() & F_UNPLUGGED_INACCESSIBLE, F_UNPLUGGED_INACCESSIBLE);
    }

    #[test]
    fn guest_accesses_to_unplugged_blocks_read_zeroes_and_are_counted() {
        use devices::BusDevice;
        let dev = device();
        let mut guard = dev.control().guard();
        let mut data = [0xaau8; 8];
        guard.read(2 * MIB + 8, &mut data);
        assert_eq!(data, [0; 8]);
        guard.write(6 * MIB, &[1, 2, 3, 4]);
        assert_eq!(dev.control().status().unplugged_accesses, 2);
    }
}
