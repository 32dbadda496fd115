//! virtio-blk on a raw image file: read, write, flush (fdatasync), get-id, discard and
//! write-zeroes. Requests the driver got wrong (bad chains, ranges past the end, writes to a
//! read-only disk) are answered with VIRTIO_BLK_S_IOERR, or UNSUPP for unknown types.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use virtio_bindings::virtio_blk::*;
use virtio_queue::{DescriptorChain, Queue};
use vm_memory::{Bytes, GuestAddress};

use crate::device::{ActivateError, Activation, VirtioDevice, read_config_bytes};
use crate::metrics::DeviceMetrics;
use crate::rate_limiter::{RateLimit, RateLimiter};
use crate::worker::{Backend, Worker, serve_queue_limited};
use crate::{F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, GuestMemory, TYPE_BLOCK};

pub const SECTOR_SIZE: u64 = 512;
/// The most data one request may carry: bounds the VMM's bounce buffer.
pub const MAX_REQUEST_BYTES: u32 = 4 << 20;
/// Segments per request the driver may use (advertised as seg_max).
const SEG_MAX: u32 = 128;
const QUEUE_SIZES: [u16; 1] = [256];
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
const DISCARD_SEGMENT_BYTES: u32 = 16;
const MAX_DISCARD_SEGMENTS: u32 = 1;

fn bit(b: u32) -> u64 {
    1 << b
}

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error("disk image {path} is {size} bytes, not a whole number of 512-byte sectors")]
    Size { path: String, size: u64 },
}

pub struct Block {
    file: File,
    capacity: u64,
    readonly: bool,
    id: [u8; ID_BYTES],
    config: Vec<u8>,
    metrics: Arc<DeviceMetrics>,
    rate_limit: Option<RateLimit>,
    poll: std::time::Duration,
    worker: Option<Worker>,
}

impl Block {
    /// Opens `path`; `id` is what GET_ID answers (at most 20 bytes are kept).
    pub fn open(path: &Path, readonly: bool, id: &str) -> Result<Block, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
            .map_err(|source| BlockError::Open { path: path.display().to_string(), source })?;
        let size =
            file.metadata().map_err(|source| BlockError::Open { path: path.display().to_string(), source })?.len();
        if !size.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::Size { path: path.display().to_string(), size });
        }
        let capacity = size / SECTOR_SIZE;
        let mut id_bytes = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        Ok(Block {
            file,
            capacity,
            readonly,
            id: id_bytes,
            config: config_space(capacity),
            metrics: Arc::default(),
            rate_limit: None,
            poll: std::time::Duration::ZERO,
            worker: None,
        })
    }

    /// Limits the requests the device serves (Firecracker's `rate_limiter`).
    pub fn with_rate_limit(mut self, limit: Option<RateLimit>) -> Block {
        self.rate_limit = limit;
        self
    }

    /// Has the worker poll for up to `poll_us` after work (0: never).
    pub fn with_polling(mut self, poll_us: u32) -> Block {
        self.poll = std::time::Duration::from_micros(u64::from(poll_us));
        self
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }
}

/// struct virtio_blk_config, little-endian, up to write_zeroes_may_unmap.
fn config_space(capacity: u64) -> Vec<u8> {
    let mut c = vec![0u8; 60];
    c[0..8].copy_from_slice(&capacity.to_le_bytes());
    c[8..12].copy_from_slice(&MAX_REQUEST_BYTES.to_le_bytes()); // size_max
    c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
    c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes()); // blk_size
    let max_sectors = MAX_REQUEST_BYTES / SECTOR_SIZE as u32;
    c[36..40].copy_from_slice(&max_sectors.to_le_bytes()); // max_discard_sectors
    c[40..44].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
    c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
    c[48..52].copy_from_slice(&max_sectors.to_le_bytes()); // max_write_zeroes_sectors
    c[52..56].copy_from_slice(&MAX_DISCARD_SEGMENTS.to_le_bytes());
    c[56] = 1; // write_zeroes_may_unmap
    c
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn features(&self) -> u64 {
        let mut f = F_VERSION_1
            | F_RING_INDIRECT_DESC
            | F_RING_EVENT_IDX
            | bit(VIRTIO_BLK_F_SIZE_MAX)
            | bit(VIRTIO_BLK_F_SEG_MAX)
            | bit(VIRTIO_BLK_F_BLK_SIZE)
            | bit(VIRTIO_BLK_F_FLUSH);
        if self.readonly {
            f |= bit(VIRTIO_BLK_F_RO);
        } else {
            f |= bit(VIRTIO_BLK_F_DISCARD) | bit(VIRTIO_BLK_F_WRITE_ZEROES);
        }
        f
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let file = self.file.try_clone().map_err(ActivateError::Worker)?;
        let backend = BlockBackend {
            file,
            capacity: self.capacity,
            readonly: self.readonly,
            id: self.id,
            bounce: Vec::new(),
            metrics: self.metrics.clone(),
            limiter: RateLimiter::for_limit(self.rate_limit).map_err(ActivateError::Worker)?,
        };
        self.worker = Some(
            Worker::spawn_polling(sandbox::ThreadKind::Block, backend, activation, self.poll)
                .map_err(ActivateError::Worker)?,
        );
        Ok(())
    }
    fn update_rate_limit(&mut self, limit: Option<RateLimit>) -> Result<(), String> {
        self.rate_limit = limit;
        Ok(())
    }
    fn update_backing(&mut self, path: &Path) -> Result<(), String> {
        let updated = Block::open(path, self.readonly, "").map_err(|e| e.to_string())?;
        self.file = updated.file;
        self.capacity = updated.capacity;
        self.config = updated.config;
        tracing::info!("virtio-blk: now backed by {} ({} sectors)", path.display(), self.capacity);
        Ok(())
    }
    fn quiesce(&mut self) -> Option<Vec<Queue>> {
        self.worker.take().and_then(|mut w| w.stop())
    }
    fn reset(&mut self) {
        self.worker = None;
    }
    fn metrics(&self) -> Option<Arc<DeviceMetrics>> {
        Some(self.metrics.clone())
    }
}

/// A request as the driver laid it out, checked against the chain's shape.
#[derive(Debug, PartialEq, Eq)]
pub struct Request {
    pub kind: u32,
    pub sector: u64,
    /// Data buffers in chain order: (guest address, length).
    pub data: Vec<(u64, u32)>,
    pub data_len: u32,
    pub status: u64,
}

/// Why a chain is not a well-formed request: answered with IOERR when it has a status byte.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("the chain is empty or its header is not 16 readable bytes")]
    BadHeader,
    #[error("the chain does not end in a writable status byte")]
    NoStatus,
    #[error("a data buffer has the wrong direction for the request")]
    WrongDirection,
    #[error("the request carries more than {MAX_REQUEST_BYTES} bytes or more than {SEG_MAX} segments")]
    TooLarge,
    #[error("the header cannot be read from guest memory")]
    Unreadable,
}

/// Parses `chain` into a request. Pure: reads the header from guest memory, nothing else.
pub fn parse_request(
    mem: &GuestMemory,
    chain: DescriptorChain<&GuestMemory>,
) -> (Result<Request, ParseError>, Option<u64>) {
    let descs: Vec<_> = chain.take(SEG_MAX as usize + 3).collect();
    // The status byte's address, when the chain has one: errors are reported there.
    let status = descs.last().filter(|d| d.is_write_only() && d.len() >= 1 && descs.len() >= 2).map(|d| d.addr().0);
    let Some(header) = descs.first().filter(|d| !d.is_write_only() && d.len() >= 16) else {
        return (Err(ParseError::BadHeader), status);
    };
    let Some(status_addr) = status else { return (Err(ParseError::NoStatus), None) };
    let Ok(raw) = mem.read_obj::<[u8; 16]>(header.addr()) else { return (Err(ParseError::Unreadable), status) };
    let kind = u32::from_le_bytes(raw[0..4].try_into().unwrap());
    let sector = u64::from_le_bytes(raw[8..16].try_into().unwrap());
    let middle = &descs[1..descs.len() - 1];
    if middle.len() > SEG_MAX as usize {
        return (Err(ParseError::TooLarge), status);
    }
    let device_writes = matches!(kind, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID);
    let mut data = Vec::with_capacity(middle.len());
    let mut data_len: u32 = 0;
    for d in middle {
        if d.is_write_only() != device_writes {
            return (Err(ParseError::WrongDirection), status);
        }
        match data_len.checked_add(d.len()).filter(|&n| n <= MAX_REQUEST_BYTES) {
            Some(n) => data_len = n,
            None => return (Err(ParseError::TooLarge), status),
        }
        data.push((d.addr().0, d.len()));
    }
    (Ok(Request { kind, sector, data, data_len, status: status_addr }), status)
}

struct BlockBackend {
    file: File,
    capacity: u64,
    readonly: bool,
    id: [u8; ID_BYTES],
    bounce: Vec<u8>,
    metrics: Arc<DeviceMetrics>,
    limiter: Option<RateLimiter>,
}

impl BlockBackend {
    /// The byte range of `sectors` starting at `sector`, if it lies on the disk.
    fn range(&self, sector: u64, bytes: u64) -> Option<u64> {
        let end = sector.checked_mul(SECTOR_SIZE)?.checked_add(bytes)?;
        (end <= self.capacity * SECTOR_SIZE).then_some(sector * SECTOR_SIZE)
    }

    /// Executes a parsed request: returns the status and the bytes written into guest buffers.
    fn execute(&mut self, mem: &GuestMemory, req: &Request) -> (u8, u32) {
        let len = req.data_len as usize;
        match req.kind {
            VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT => {
                if !(len as u64).is_multiple_of(SECTOR_SIZE) {
                    return (VIRTIO_BLK_S_IOERR as u8, 0);
                }
                let Some(offset) = self.range(req.sector, len as u64) else {
                    return (VIRTIO_BLK_S_IOERR as u8, 0);
                };
                if req.kind == VIRTIO_BLK_T_OUT && self.readonly {
                    return (VIRTIO_BLK_S_IOERR as u8, 0);
                }
                // Straight between the file and guest memory where the buffers allow it.
                if let Some(mut iovs) = guest_iovecs(mem, &req.data, len) {
                    return if req.kind == VIRTIO_BLK_T_IN {
                        match transfer(&self.file, &mut iovs, offset, false) {
                            Ok(()) => {
                                for &(addr, n) in &req.data {
                                    crate::mark_dirty(mem, addr, u64::from(n));
                                }
                                (VIRTIO_BLK_S_OK as u8, len as u32)
                            }
                            Err(_) => (VIRTIO_BLK_S_IOERR as u8, 0),
                        }
                    } else {
                        match transfer(&self.file, &mut iovs, offset, true) {
                            Ok(()) => (VIRTIO_BLK_S_OK as u8, 0),
                            Err(_) => (VIRTIO_BLK_S_IOERR as u8, 0),
                        }
                    };
                }
                self.bounce.resize(len, 0);
                if req.kind == VIRTIO_BLK_T_IN {
                    if self.file.read_exact_at(&mut self.bounce[..len], offset).is_err() {
                        return (VIRTIO_BLK_S_IOERR as u8, 0);
                    }
                    match scatter(mem, &req.data, &self.bounce[..len]) {
                        Some(()) => (VIRTIO_BLK_S_OK as u8, len as u32),
                        None => (VIRTIO_BLK_S_IOERR as u8, 0),
                    }
                } else {
                    if gather(mem, &req.data, &mut self.bounce[..len]).is_none() {
                        return (VIRTIO_BLK_S_IOERR as u8, 0);
                    }
                    match self.file.write_all_at(&self.bounce[..len], offset) {
                        Ok(()) => (VIRTIO_BLK_S_OK as u8, 0),
                        Err(_) => (VIRTIO_BLK_S_IOERR as u8, 0),
                    }
                }
            }
            VIRTIO_BLK_T_FLUSH => match self.file.sync_data() {
                Ok(()) => (VIRTIO_BLK_S_OK as u8, 0),
                Err(_) => (VIRTIO_BLK_S_IOERR as u8, 0),
            },
            VIRTIO_BLK_T_GET_ID => {
                let n = len.min(ID_BYTES);
                match scatter(mem, &req.data, &self.id[..n]) {
                    Some(()) => (VIRTIO_BLK_S_OK as u8, n as u32),
                    None => (VIRTIO_BLK_S_IOERR as u8, 0),
                }
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES if !self.readonly => {
                (self.discard_or_zero(mem, req) as u8, 0)
            }
            VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => (VIRTIO_BLK_S_IOERR as u8, 0),
            _ => (VIRTIO_BLK_S_UNSUPP as u8, 0),
        }
    }

    fn discard_or_zero(&mut self, mem: &GuestMemory, req: &Request) -> u32 {
        let len = req.data_len as usize;
        if len == 0
            || !len.is_multiple_of(DISCARD_SEGMENT_BYTES as usize)
            || len > (DISCARD_SEGMENT_BYTES * MAX_DISCARD_SEGMENTS) as usize
        {
            return VIRTIO_BLK_S_IOERR;
        }
        let mut segments = [0u8; (DISCARD_SEGMENT_BYTES * MAX_DISCARD_SEGMENTS) as usize];
        if gather(mem, &req.data, &mut segments[..len]).is_none() {
            return VIRTIO_BLK_S_IOERR;
        }
        for seg in segments[..len].chunks_exact(DISCARD_SEGMENT_BYTES as usize) {
            let sector = u64::from_le_bytes(seg[0..8].try_into().unwrap());
            let count = u64::from(u32::from_le_bytes(seg[8..12].try_into().unwrap()));
            let Some(offset) = self.range(sector, count * SECTOR_SIZE) else { return VIRTIO_BLK_S_IOERR };
            // Both punch a hole: the range reads back as zeroes, and the host may free it.
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            // SAFETY: fallocate on our own open file descriptor with in-range values.
            let rc =
                unsafe { libc::fallocate(self.file.as_raw_fd(), mode, offset as i64, (count * SECTOR_SIZE) as i64) };
            if rc != 0 {
                return VIRTIO_BLK_S_IOERR;
            }
        }
        VIRTIO_BLK_S_OK
    }
}

/// The first `total` bytes of the guest buffers as host iovecs, for preadv and pwritev
/// straight into and out of guest memory; None when a buffer is not wholly inside one guest
/// memory region (the bounce buffer serves those).
fn guest_iovecs(mem: &GuestMemory, buffers: &[(u64, u32)], total: usize) -> Option<Vec<libc::iovec>> {
    use vm_memory::GuestMemoryBackend;
    let mut iovs = Vec::with_capacity(buffers.len());
    let mut left = total;
    for &(addr, len) in buffers {
        if left == 0 {
            break;
        }
        let n = (len as usize).min(left);
        let slice = mem.get_slice(GuestAddress(addr), n).ok()?;
        iovs.push(libc::iovec { iov_base: slice.ptr_guard_mut().as_ptr().cast(), iov_len: n });
        left -= n;
    }
    (left == 0).then_some(iovs)
}

/// Reads the file at `offset` into `iovs` (or writes them there), to the last byte.
fn transfer(file: &File, iovs: &mut [libc::iovec], mut offset: u64, write: bool) -> std::io::Result<()> {
    let mut first = 0;
    while first < iovs.len() {
        let rest = &iovs[first..];
        let count = rest.len().min(libc::UIO_MAXIOV as usize) as i32;
        // SAFETY: each iovec spans guest memory that `mem` keeps mapped for the call (checked
        // by guest_iovecs); the kernel reads or writes only those bytes. The guest may touch
        // them meanwhile, which a system call tolerates.
        let n = unsafe {
            if write {
                libc::pwritev(file.as_raw_fd(), rest.as_ptr(), count, offset as libc::off_t)
            } else {
                libc::preadv(file.as_raw_fd(), rest.as_ptr(), count, offset as libc::off_t)
            }
        };
        let mut n = match n {
            n if n > 0 => n as usize,
            0 => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
        };
        offset += n as u64;
        while n > 0 && first < iovs.len() {
            let iov = &mut iovs[first];
            if n >= iov.iov_len {
                n -= iov.iov_len;
                first += 1;
            } else {
                // SAFETY: advancing within the same iovec's span.
                iov.iov_base = unsafe { iov.iov_base.cast::<u8>().add(n).cast() };
                iov.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

/// Copies `src` into the guest buffers in order; None if any lies outside guest RAM.
fn scatter(mem: &GuestMemory, buffers: &[(u64, u32)], src: &[u8]) -> Option<()> {
    let mut done = 0;
    for &(addr, len) in buffers {
        if done == src.len() {
            break;
        }
        let n = (len as usize).min(src.len() - done);
        mem.write_slice(&src[done..done + n], GuestAddress(addr)).ok()?;
        done += n;
    }
    Some(())
}

/// Fills `dst` from the guest buffers in order; None if any lies outside guest RAM.
fn gather(mem: &GuestMemory, buffers: &[(u64, u32)], dst: &mut [u8]) -> Option<()> {
    let mut done = 0;
    for &(addr, len) in buffers {
        if done == dst.len() {
            break;
        }
        let n = (len as usize).min(dst.len() - done);
        mem.read_slice(&mut dst[done..done + n], GuestAddress(addr)).ok()?;
        done += n;
    }
    Some(())
}

impl Backend for BlockBackend {
    fn process_queue(&mut self, _index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        serve_queue_limited(
            "virtio-blk",
            &mut queues[0],
            mem,
            || true,
            |chain| {
                let (parsed, status) = parse_request(mem, chain);
                // A request the rate limiter cannot pay for yet goes back to the ring.
                if let (Ok(req), Some(limiter)) = (&parsed, self.limiter.as_mut())
                    && !limiter.consume(u64::from(req.data_len))
                {
                    DeviceMetrics::add(&self.metrics.rate_limited, 1);
                    return None;
                }
                let (code, written) = match parsed {
                    Ok(req) => {
                        let (code, written) = self.execute(mem, &req);
                        let from_guest = if req.kind == VIRTIO_BLK_T_OUT { u64::from(req.data_len) } else { 0 };
                        if u32::from(code) == VIRTIO_BLK_S_OK {
                            self.metrics.request(u64::from(written), from_guest);
                        } else {
                            self.metrics.error();
                        }
                        (code, written)
                    }
                    Err(e) => {
                        crate::guest_fault!("virtio-blk: bad request from the driver: {e}");
                        self.metrics.error();
                        (VIRTIO_BLK_S_IOERR as u8, 0)
                    }
                };
                Some(match status {
                    Some(addr) if mem.write_obj(code, GuestAddress(addr)).is_ok() => written + 1,
                    _ => written,
                })
            },
        )
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        crate::rate_limiter::waiting_timer(&self.limiter).into_iter().collect()
    }

    /// The rate limiter's wait is over: serve what waited.
    fn process_fd(&mut self, _fd: RawFd, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        crate::rate_limiter::timer_fired(&mut self.limiter);
        self.process_queue(0, queues, mem)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::desc::split::Descriptor as SplitDescriptor;
    use virtio_queue::mock::MockSplitQueue;

    const HEADER: u64 = 0x1000;
    const DATA: u64 = 0x2000;
    const STATUS: u64 = 0x3000;
    const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    const WRITE: u16 = VRING_DESC_F_WRITE as u16;

    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap()
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn header(mem: &GuestMemory, kind: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&kind.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HEADER)).unwrap();
    }

    fn parse(mem: &GuestMemory, descs: &[RawDescriptor]) -> (Result<Request, ParseError>, Option<u64>) {
        let queue = MockSplitQueue::create(mem, GuestAddress(0x8000), 16);
        let chain = queue.build_multiple_desc_chains(descs).unwrap();
        parse_request(mem, chain)
    }

    #[test]
    fn well_formed_read_parses() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_IN, 7);
        let (req, status) = parse(
            &m,
            &[
                desc(HEADER, 16, NEXT, 1),
                desc(DATA, 512, WRITE | NEXT, 2),
                desc(DATA + 512, 512, WRITE | NEXT, 3),
                desc(STATUS, 1, WRITE, 0),
            ],
        );
        let req = req.unwrap();
        assert_eq!((req.kind, req.sector, req.data_len, req.status), (VIRTIO_BLK_T_IN, 7, 1024, STATUS));
        assert_eq!(req.data, vec![(DATA, 512), (DATA + 512, 512)]);
        assert_eq!(status, Some(STATUS));
    }

    #[test]
    fn malformed_chains_are_named() {
        let m = mem();
        header(&m, VIRTIO_BLK_T_OUT, 0);
        let write_header = [desc(HEADER, 16, WRITE | NEXT, 1), desc(STATUS, 1, WRITE, 0)];
        assert_eq!(parse(&m, &write_header), (Err(ParseError::BadHeader), Some(STATUS)));
        let short_header = [desc(HEADER, 8, NEXT, 1), desc(STATUS, 1, WRITE, 0)];
        assert_eq!(parse(&m, &short_header).0, Err(ParseError::BadHeader));
        let readable_status = [desc(HEADER, 16, NEXT, 1), desc(STATUS, 1, 0, 0)];
        assert_eq!(parse(&m, &readable_status), (Err(ParseError::NoStatus), None));
        let write_into_device_buffer =
            [desc(HEADER, 16, NEXT, 1), desc(DATA, 512, WRITE | NEXT, 2), desc(STATUS, 1, WRITE, 0)];
        assert_eq!(parse(&m, &write_into_device_buffer).0, Err(ParseError::WrongDirection));
        let huge = [desc(HEADER, 16, NEXT, 1), desc(DATA, MAX_REQUEST_BYTES + 512, NEXT, 2), desc(STATUS, 1, WRITE, 0)];
        assert_eq!(parse(&m, &huge).0, Err(ParseError::TooLarge));
        let header_outside_ram = [desc(0x7fff_0000_0000, 16, NEXT, 1), desc(STATUS, 1, WRITE, 0)];
        assert_eq!(parse(&m, &header_outside_ram).0, Err(ParseError::Unreadable));
    }

    fn backend(sectors: u64, readonly: bool) -> (BlockBackend, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("ferrovisor-blk-{}-{}-{readonly}", std::process::id(), sectors));
        std::fs::write(&path, vec![0xabu8; (sectors * SECTOR_SIZE) as usize]).unwrap();
        let file = OpenOptions::new().read(true).write(true).open(&path).unwrap();
        (
            BlockBackend {
                file,
                capacity: sectors,
                readonly,
                id: *b"disk-id-for-tests\0\0\0",
                bounce: Vec::new(),
                metrics: Arc::default(),
                limiter: None,
            },
            path,
        )
    }

    fn request(kind: u32, sector: u64, data: Vec<(u64, u32)>) -> Request {
        let data_len = data.iter().map(|d| d.1).sum();
        Request { kind, sector, data, data_len, status: STATUS }
    }

    #[test]
    fn reads_writes_and_ranges() {
        let m = mem();
        let (mut b, path) = backend(8, false);
        m.write_slice(&[0x5au8; 1024], GuestAddress(DATA)).unwrap();
        assert_eq!(b.execute(&m, &request(VIRTIO_BLK_T_OUT, 6, vec![(DATA, 1024)])), (0, 0));
        assert_eq!(std::fs::read(&path).unwrap()[6 * 512..], [0x5a; 1024]);
        assert_eq!(b.execute(&m, &request(VIRTIO_BLK_T_IN, 0, vec![(DATA, 512)])), (0, 512));
        let mut back = [0u8; 512];
        m.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert_eq!(back, [0xab; 512]);
        // Past the end, wrapping sectors, partial sectors: IOERR, nothing touched.
        for (sector, len) in [(7, 1024), (8, 512), (u64::MAX / 256, 512), (0, 100)] {
            assert_eq!(b.execute(&m, &request(VIRTIO_BLK_T_IN, sector, vec![(DATA, len)])).0, 1, "{sector} {len}");
        }
        assert_eq!(b.execute(&m, &request(VIRTIO_BLK_T_IN, 0, vec![(0x7fff_0000_0000, 512)])).0, 1);
        assert_eq!(b.execute(&m, &request(VIRTIO_BLK_T_FLUSH, 0, vec![])), (0, 0));
        assert_eq!(b.execute(&m, &request(0x55, 0, vec![])).0, VIRTIO_BLK_S_UNSUPP as u8);
        assert_eq!(b.execute(&m, &request(VIRTIO_BLK_T_GET_ID, 0, vec![(DATA, 64)])), (0, 20));
        let mut id = [0u8; 17];
        m.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"disk-id-for-tests");
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn read_only_disks_refuse_writes_and_discards() {
        let m = mem();
        let (mut b, path) = backend(8, true);
        assert_eq!(b.execute(&m, &request(VIRTIO_BLK_T_OUT, 0, vec![(DATA, 512)])).0, 1);
        assert_eq!(b.execute(&m, &request(VIRTIO_BLK_T_DISCARD, 0, vec![(DATA, 16)])).0, 1);
        assert_eq!(std::fs::read(&path).unwrap(), vec![0xab; 8 * 512]);
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn write_zeroes_and_discard_zero_the_range() {
        let m = mem();
        let (mut b, path) = backend(16, false);
        let mut seg = [0u8; 16];
        seg[0..8].copy_from_slice(&8u64.to_le_bytes());
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        m.write_slice(&seg, GuestAddress(DATA)).unwrap();
        assert_eq!(b.execute(&m, &request(VIRTIO_BLK_T_WRITE_ZEROES, 0, vec![(DATA, 16)])).0, 0);
        let image = std::fs::read(&path).unwrap();
        assert_eq!(image[..8 * 512], [0xab; 8 * 512]);
        assert_eq!(image[8 * 512..], [0; 8 * 512]);
        seg[0..8].copy_from_slice(&12u64.to_le_bytes());
        m.write_slice(&seg, GuestAddress(DATA)).unwrap();
        assert_eq!(b.execute(&m, &request(VIRTIO_BLK_T_DISCARD, 0, vec![(DATA, 16)])).0, 1, "12 + 8 > 16 sectors");
        assert_eq!(b.execute(&m, &request(VIRTIO_BLK_T_DISCARD, 0, vec![(DATA, 15)])).0, 1, "partial segment");
        std::fs::remove_file(path).unwrap();
    }
}
