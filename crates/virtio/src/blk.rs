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
use crate::worker::{Backend, Taken, Worker, serve_queue_limited};
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

/// How a disk's reads and writes reach its file: one system call each on the worker (`Sync`),
/// or many in flight at once through io_uring (`Async`, Firecracker's name for it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum IoEngine {
    #[default]
    Sync,
    Async,
}

/// Whether the host's page cache holds the disk's data (`Writeback`) or the file is opened
/// with O_DIRECT and reads and writes go to the storage itself (`None`). Flushes are honoured
/// either way.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum CacheMode {
    #[default]
    Writeback,
    None,
}

/// The alignment O_DIRECT transfers get: buffers and lengths on 4 KiB serve every device.
const DIRECT_ALIGN: usize = 4096;
/// Reads and writes one io_uring submission holds.
const RING_ENTRIES: u32 = 128;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("cannot open disk image {path}: {source}")]
    Open { path: String, source: std::io::Error },
    #[error(
        "cannot open disk image {path} with cache=none ({source}); its file system has no O_DIRECT (tmpfs has \
         none): use cache=writeback or put the image elsewhere"
    )]
    Direct { path: String, source: std::io::Error },
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
    cache: CacheMode,
    engine: IoEngine,
    worker: Option<Worker>,
}

impl Block {
    /// Opens `path`; `id` is what GET_ID answers (at most 20 bytes are kept).
    pub fn open(path: &Path, readonly: bool, id: &str) -> Result<Block, BlockError> {
        Block::open_cached(path, readonly, id, CacheMode::Writeback)
    }

    /// As open, with `cache=none` opening the file for direct I/O.
    pub fn open_cached(path: &Path, readonly: bool, id: &str, cache: CacheMode) -> Result<Block, BlockError> {
        use std::os::unix::fs::OpenOptionsExt;
        let direct = if cache == CacheMode::None { libc::O_DIRECT } else { 0 };
        let file = OpenOptions::new().read(true).write(!readonly).custom_flags(direct).open(path).map_err(
            |source| match (cache, source.raw_os_error()) {
                (CacheMode::None, Some(libc::EINVAL)) => {
                    BlockError::Direct { path: path.display().to_string(), source }
                }
                _ => BlockError::Open { path: path.display().to_string(), source },
            },
        )?;
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
            cache,
            engine: IoEngine::Sync,
            worker: None,
        })
    }

    /// Limits the requests the device serves (Firecracker's `rate_limiter`).
    pub fn with_rate_limit(mut self, limit: Option<RateLimit>) -> Block {
        self.rate_limit = limit;
        self
    }

    /// Serves reads and writes with `engine`.
    pub fn with_engine(mut self, engine: IoEngine) -> Block {
        self.engine = engine;
        self
    }

    /// Has the worker poll for up to `poll_us` after work (0: never).
    pub fn with_polling(mut self, poll_us: u32) -> Block {
        self.poll = std::time::Duration::from_micros(u64::from(poll_us));
        self
    }

    /// How long the worker polls after work.
    pub fn polling(&self) -> std::time::Duration {
        self.poll
    }

    pub fn capacity_sectors(&self) -> u64 {
        self.capacity
    }

    fn backend(&self) -> std::io::Result<BlockBackend> {
        Ok(BlockBackend {
            file: self.file.try_clone()?,
            capacity: self.capacity,
            readonly: self.readonly,
            id: self.id,
            bounce: Vec::new(),
            metrics: self.metrics.clone(),
            limiter: RateLimiter::for_limit(self.rate_limit)?,
            direct: self.cache == CacheMode::None,
            engine: self.engine,
            ring: None,
            finished: Vec::new(),
        })
    }

    /// The disk's request handling on its own, for a host other than the device's worker (a
    /// vhost-user back-end): the same parsing, checks and I/O engines.
    pub fn server(&self) -> std::io::Result<Box<dyn Backend>> {
        Ok(Box::new(self.backend()?))
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
        let backend = self.backend().map_err(ActivateError::Worker)?;
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
        let updated = Block::open_cached(path, self.readonly, "", self.cache).map_err(|e| e.to_string())?;
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
    /// The file is open with O_DIRECT: transfers must be aligned.
    direct: bool,
    engine: IoEngine,
    /// The io_uring of the Async engine, made on the worker when it first serves.
    ring: Option<Box<BlockRing>>,
    /// Chains answered in the current batch: head and bytes written.
    finished: Vec<(u16, u32)>,
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
                // Straight between the file and guest memory where the buffers allow it (and,
                // for O_DIRECT, are aligned; the kernel may still refuse, and then the aligned
                // bounce buffer serves).
                if let Some(mut iovs) = guest_iovecs(mem, &req.data, len).filter(|i| !self.direct || aligned(i)) {
                    let write = req.kind == VIRTIO_BLK_T_OUT;
                    match transfer(&self.file, &mut iovs, offset, write) {
                        Ok(()) => return rw_done(mem, req),
                        Err(e) if self.direct && e.raw_os_error() == Some(libc::EINVAL) => {}
                        Err(_) => return (VIRTIO_BLK_S_IOERR as u8, 0),
                    }
                }
                self.bounce_rw(mem, req, offset)
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

    /// A read or write through the bounce buffer (aligned for O_DIRECT): for buffers that
    /// span guest memory regions, or that direct I/O refused.
    fn bounce_rw(&mut self, mem: &GuestMemory, req: &Request, offset: u64) -> (u8, u32) {
        let len = req.data_len as usize;
        self.bounce.resize(len + DIRECT_ALIGN, 0);
        let skip = self.bounce.as_ptr().align_offset(DIRECT_ALIGN);
        let buffer = &mut self.bounce[skip..skip + len];
        if req.kind == VIRTIO_BLK_T_IN {
            if self.file.read_exact_at(buffer, offset).is_err() {
                return (VIRTIO_BLK_S_IOERR as u8, 0);
            }
            match scatter(mem, &req.data, buffer) {
                Some(()) => (VIRTIO_BLK_S_OK as u8, len as u32),
                None => (VIRTIO_BLK_S_IOERR as u8, 0),
            }
        } else {
            if gather(mem, &req.data, buffer).is_none() {
                return (VIRTIO_BLK_S_IOERR as u8, 0);
            }
            match self.file.write_all_at(buffer, offset) {
                Ok(()) => (VIRTIO_BLK_S_OK as u8, 0),
                Err(_) => (VIRTIO_BLK_S_IOERR as u8, 0),
            }
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

/// A read or write that went straight into guest memory is done: what the guest reads is
/// marked dirty (for diff snapshots), and the status and bytes written are returned.
fn rw_done(mem: &GuestMemory, req: &Request) -> (u8, u32) {
    if req.kind != VIRTIO_BLK_T_IN {
        return (VIRTIO_BLK_S_OK as u8, 0);
    }
    for &(addr, n) in &req.data {
        crate::mark_dirty(mem, addr, u64::from(n));
    }
    (VIRTIO_BLK_S_OK as u8, req.data_len)
}

/// Whether every iovec suits O_DIRECT: aligned start and length.
fn aligned(iovs: &[libc::iovec]) -> bool {
    iovs.iter().all(|i| (i.iov_base as usize).is_multiple_of(DIRECT_ALIGN) && i.iov_len.is_multiple_of(512))
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

impl BlockBackend {
    /// Whether a request the rate limiter cannot pay for yet must wait (it goes back to the ring).
    fn must_wait(&mut self, parsed: &Result<Request, ParseError>) -> bool {
        if let (Ok(req), Some(limiter)) = (parsed, self.limiter.as_mut())
            && !limiter.consume(u64::from(req.data_len))
        {
            DeviceMetrics::add(&self.metrics.rate_limited, 1);
            return true;
        }
        false
    }

    fn count(&self, req: &Request, code: u8, written: u32) {
        let from_guest = if req.kind == VIRTIO_BLK_T_OUT { u64::from(req.data_len) } else { 0 };
        if u32::from(code) == VIRTIO_BLK_S_OK {
            self.metrics.request(u64::from(written), from_guest);
        } else {
            self.metrics.error();
        }
    }

    /// Serves a request (or answers its parse error) now; the bytes written into the chain,
    /// status byte included.
    fn answer(&mut self, mem: &GuestMemory, parsed: Result<Request, ParseError>, status: Option<u64>) -> u32 {
        let (code, written) = match parsed {
            Ok(req) => {
                let (code, written) = self.execute(mem, &req);
                self.count(&req, code, written);
                (code, written)
            }
            Err(e) => {
                crate::guest_fault!("virtio-blk: bad request from the driver: {e}");
                self.metrics.error();
                (VIRTIO_BLK_S_IOERR as u8, 0)
            }
        };
        with_status(mem, status, code, written)
    }

    /// A read or write the ring can take: its file offset and its buffers as iovecs.
    fn ring_transfer(&self, mem: &GuestMemory, req: &Request) -> Option<(u64, Vec<libc::iovec>)> {
        let len = req.data_len as usize;
        let rw = matches!(req.kind, VIRTIO_BLK_T_IN | VIRTIO_BLK_T_OUT) && len > 0;
        if !rw || !(len as u64).is_multiple_of(SECTOR_SIZE) || (req.kind == VIRTIO_BLK_T_OUT && self.readonly) {
            return None;
        }
        let offset = self.range(req.sector, len as u64)?;
        let iovs = guest_iovecs(mem, &req.data, len).filter(|i| !self.direct || aligned(i))?;
        Some((offset, iovs))
    }

    /// Waits for every read and write in flight and answers them; a short or refused one is
    /// done again without the ring (the bounce buffer takes what direct I/O refused).
    fn drain(&mut self, mem: &GuestMemory) {
        let Some(ring) = self.ring.as_mut() else { return };
        let in_flight = std::mem::take(&mut ring.in_flight);
        if in_flight.is_empty() {
            return;
        }
        let results = ring.wait(in_flight.len());
        if results.is_none() {
            // Entries the kernel did not take would be submitted later with freed iovecs: the
            // ring goes, and the sync engine serves from now on.
            tracing::warn!("virtio-blk: io_uring failed; reads and writes use preadv and pwritev from now on");
            self.ring = None;
            self.engine = IoEngine::Sync;
        }
        let results = results.unwrap_or_default();
        for (i, flight) in in_flight.into_iter().enumerate() {
            let (code, written) = match results.get(i) {
                Some(&result) if result == i64::from(flight.req.data_len) => rw_done(mem, &flight.req),
                _ => self.execute(mem, &flight.req),
            };
            self.count(&flight.req, code, written);
            let written = with_status(mem, Some(flight.req.status), code, written);
            self.finished.push((flight.head, written));
        }
    }
}

/// Writes the status byte, when the chain has one: the bytes written into the chain.
fn with_status(mem: &GuestMemory, status: Option<u64>, code: u8, written: u32) -> u32 {
    match status {
        Some(addr) if mem.write_obj(code, GuestAddress(addr)).is_ok() => written + 1,
        _ => written,
    }
}

/// A read or write on the ring, with the iovecs the kernel uses until it completes.
struct InFlight {
    head: u16,
    req: Request,
    iovs: Vec<libc::iovec>,
}

/// The Async engine's io_uring, restricted before it is enabled to reads and writes of
/// iovecs: a ring's operations bypass seccomp, so it may do nothing else.
struct BlockRing {
    ring: io_uring::IoUring,
    in_flight: Vec<InFlight>,
}

// SAFETY: the iovecs point into guest memory, which lives as long as the VM; the ring and its
// requests move with the worker thread and are used by it alone.
unsafe impl Send for BlockRing {}

impl BlockRing {
    fn new() -> std::io::Result<BlockRing> {
        use io_uring::{opcode, register::Restriction};
        let ring = io_uring::IoUring::builder().setup_r_disabled().build(RING_ENTRIES)?;
        let mut allowed = [Restriction::sqe_op(opcode::Readv::CODE), Restriction::sqe_op(opcode::Writev::CODE)];
        ring.submitter().register_restrictions(&mut allowed)?;
        ring.submitter().register_enable_rings()?;
        Ok(BlockRing { ring, in_flight: Vec::new() })
    }

    /// Queues `flight` on `fd`; gives it back when the submission queue is full.
    fn push(&mut self, fd: RawFd, offset: u64, flight: InFlight) -> Result<(), InFlight> {
        use io_uring::{opcode, types};
        let index = self.in_flight.len() as u64;
        let (iovs, count) = (flight.iovs.as_ptr(), flight.iovs.len() as u32);
        let entry = if flight.req.kind == VIRTIO_BLK_T_IN {
            opcode::Readv::new(types::Fd(fd), iovs, count).offset(offset).build()
        } else {
            opcode::Writev::new(types::Fd(fd), iovs, count).offset(offset).build()
        }
        .user_data(index);
        // SAFETY: the iovecs (and the guest memory they name) stay alive in `in_flight` until
        // `wait` has reaped this entry's completion.
        if unsafe { self.ring.submission().push(&entry) }.is_err() {
            return Err(flight);
        }
        self.in_flight.push(flight);
        Ok(())
    }

    /// Submits what is queued and waits for all `count` completions: each one's result
    /// (bytes moved, or a negative errno), in submission order; None when the ring failed.
    fn wait(&mut self, count: usize) -> Option<Vec<i64>> {
        let mut results = vec![None; count];
        let mut reaped = 0;
        while reaped < count {
            match self.ring.submit_and_wait(count - reaped) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return None,
            }
            for cqe in self.ring.completion() {
                if let Some(slot) = results.get_mut(cqe.user_data() as usize).filter(|r| r.is_none()) {
                    *slot = Some(i64::from(cqe.result()));
                    reaped += 1;
                }
            }
        }
        Some(results.into_iter().map(|r| r.unwrap_or(-i64::from(libc::EIO))).collect())
    }
}

impl crate::worker::Batch for BlockBackend {
    fn take(&mut self, mem: &GuestMemory, chain: DescriptorChain<&GuestMemory>) -> Taken {
        let head = chain.head_index();
        let (parsed, status) = parse_request(mem, chain);
        if self.must_wait(&parsed) {
            return Taken::NotNow;
        }
        let fd = self.file.as_raw_fd();
        let parsed = match parsed {
            Ok(req) => match (self.ring_transfer(mem, &req), self.ring.as_mut()) {
                (Some((offset, iovs)), Some(ring)) => match ring.push(fd, offset, InFlight { head, req, iovs }) {
                    Ok(()) if ring.in_flight.len() >= RING_ENTRIES as usize => return Taken::Full,
                    Ok(()) => return Taken::Queued,
                    Err(flight) => Ok(flight.req),
                },
                _ => Ok(req),
            },
            Err(e) => Err(e),
        };
        // Anything else waits for what is in flight (a flush covers the writes before it) and
        // is answered now, in order.
        self.drain(mem);
        let written = self.answer(mem, parsed, status);
        self.finished.push((head, written));
        Taken::Queued
    }

    fn complete(&mut self, mem: &GuestMemory) -> Vec<(u16, u32)> {
        self.drain(mem);
        std::mem::take(&mut self.finished)
    }
}

impl Backend for BlockBackend {
    fn process_queue(&mut self, _index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        if self.engine == IoEngine::Async && self.ring.is_none() {
            match BlockRing::new() {
                Ok(ring) => self.ring = Some(Box::new(ring)),
                Err(e) => {
                    tracing::warn!(
                        "virtio-blk: io_uring is unavailable ({e}); reads and writes use preadv and pwritev"
                    );
                    self.engine = IoEngine::Sync;
                }
            }
        }
        if self.ring.is_some() {
            return crate::worker::serve_queue_batched("virtio-blk", &mut queues[0], mem, self);
        }
        serve_queue_limited(
            "virtio-blk",
            &mut queues[0],
            mem,
            || true,
            |chain| {
                let (parsed, status) = parse_request(mem, chain);
                if self.must_wait(&parsed) {
                    return None;
                }
                Some(self.answer(mem, parsed, status))
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
                direct: false,
                engine: IoEngine::Sync,
                ring: None,
                finished: Vec::new(),
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
