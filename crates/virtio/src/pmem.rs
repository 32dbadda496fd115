//! virtio-pmem: a host file mapped into guest physical memory as persistent memory. The guest
//! reads and writes the mapping directly (KVM maps the file's pages); its one queue carries
//! flush requests, answered once the file's data reached the disk (fsync).

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::Bytes;

use crate::device::{ActivateError, Activation, VirtioDevice, read_config_bytes};
use crate::metrics::DeviceMetrics;
use crate::rate_limiter::{RateLimit, RateLimiter};
use crate::worker::{Backend, Worker, serve_queue_limited};
use crate::{F_VERSION_1, GuestMemory, TYPE_PMEM};

const QUEUE_SIZES: [u16; 1] = [256];
const REQ_FLUSH: u32 = 0;
const RESP_OK: u32 = 0;
const RESP_EIO: u32 = 1;
/// The region's size must be a whole number of these (Linux maps it in 2 MiB pages).
pub const ALIGNMENT: u64 = 2 << 20;

/// A file mapped for a guest: the mapping lives as long as the device (KVM's memory slot
/// points into it).
pub struct PmemMapping {
    pub file: File,
    pub host_addr: u64,
    pub len: u64,
    pub readonly: bool,
}

impl PmemMapping {
    /// Maps `file` (whose length must be a non-zero multiple of 2 MiB) shared, so that guest
    /// writes reach it.
    pub fn new(file: File, readonly: bool) -> Result<PmemMapping, String> {
        let len = file.metadata().map_err(|e| format!("cannot examine the file ({e})"))?.len();
        if len == 0 || !len.is_multiple_of(ALIGNMENT) {
            return Err(format!("is {len} bytes; its size must be a non-zero multiple of 2 MiB (truncate -s)"));
        }
        let prot = if readonly { libc::PROT_READ } else { libc::PROT_READ | libc::PROT_WRITE };
        // SAFETY: a fresh shared mapping of the whole file, at an address the kernel picks; the
        // result is checked, and the mapping is owned by the returned value until it drops.
        let addr =
            unsafe { libc::mmap(std::ptr::null_mut(), len as usize, prot, libc::MAP_SHARED, file.as_raw_fd(), 0) };
        if addr == libc::MAP_FAILED {
            return Err(format!("cannot be mapped ({})", std::io::Error::last_os_error()));
        }
        Ok(PmemMapping { file, host_addr: addr as u64, len, readonly })
    }
}

impl Drop for PmemMapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in new(); KVM's slot onto it is gone by now
        // (the VM is dropped before its devices).
        unsafe { libc::munmap(self.host_addr as *mut libc::c_void, self.len as usize) };
    }
}

pub struct Pmem {
    mapping: Arc<PmemMapping>,
    /// Where the guest finds it.
    guest_addr: u64,
    metrics: Arc<DeviceMetrics>,
    rate_limit: Option<RateLimit>,
    worker: Option<Worker>,
}

impl Pmem {
    pub fn new(mapping: Arc<PmemMapping>, guest_addr: u64) -> Pmem {
        Pmem { mapping, guest_addr, metrics: Arc::default(), rate_limit: None, worker: None }
    }

    /// Paces flush requests (Firecracker's pmem `rate_limiter`): each is one op; flushes
    /// carry no bytes, so a bandwidth bucket never holds one back.
    pub fn with_rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.rate_limit = limit;
        self
    }
}

impl VirtioDevice for Pmem {
    fn device_type(&self) -> u32 {
        TYPE_PMEM
    }
    fn features(&self) -> u64 {
        F_VERSION_1
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // start, size.
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.guest_addr.to_le_bytes());
        config[8..].copy_from_slice(&self.mapping.len.to_le_bytes());
        read_config_bytes(&config, offset, data);
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let backend = PmemBackend {
            mapping: self.mapping.clone(),
            metrics: self.metrics.clone(),
            limiter: RateLimiter::for_limit(self.rate_limit).map_err(ActivateError::Worker)?,
        };
        self.worker =
            Some(Worker::spawn(sandbox::ThreadKind::Pmem, backend, activation).map_err(ActivateError::Worker)?);
        Ok(())
    }
    fn quiesce(&mut self) -> Option<Vec<Queue>> {
        self.worker.take().and_then(|mut w| w.stop())
    }
    fn reset(&mut self) {
        self.worker = None;
    }
    fn update_rate_limit(&mut self, limit: Option<RateLimit>) -> Result<(), String> {
        self.rate_limit = limit;
        Ok(())
    }
    fn metrics(&self) -> Option<Arc<DeviceMetrics>> {
        Some(self.metrics.clone())
    }
}

struct PmemBackend {
    mapping: Arc<PmemMapping>,
    metrics: Arc<DeviceMetrics>,
    limiter: Option<RateLimiter>,
}

impl Backend for PmemBackend {
    fn process_queue(&mut self, _index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let (mapping, metrics, limiter) = (&self.mapping, &self.metrics, &mut self.limiter);
        serve_queue_limited(
            "virtio-pmem",
            &mut queues[0],
            mem,
            || true,
            |chain| {
                if let Some(limiter) = limiter.as_mut()
                    && !limiter.consume(0)
                {
                    DeviceMetrics::add(&metrics.rate_limited, 1);
                    return None;
                }
                let mut request = None;
                let mut response = None;
                for desc in chain {
                    if desc.is_write_only() {
                        response = response.or(Some(desc.addr()).filter(|_| desc.len() >= 4));
                    } else if request.is_none() && desc.len() >= 4 {
                        request = mem.read_obj::<u32>(desc.addr()).ok();
                    }
                }
                let Some(response) = response else {
                    crate::guest_fault!("virtio-pmem: a request has no 4-byte writable response");
                    metrics.error();
                    return Some(0);
                };
                let status = match request {
                    Some(REQ_FLUSH) if mapping.readonly => RESP_OK,
                    // SAFETY: fsync on the file this device owns.
                    Some(REQ_FLUSH) => match unsafe { libc::fsync(mapping.file.as_raw_fd()) } {
                        0 => RESP_OK,
                        _ => {
                            tracing::warn!("virtio-pmem: flushing failed ({})", std::io::Error::last_os_error());
                            RESP_EIO
                        }
                    },
                    _ => {
                        crate::guest_fault!("virtio-pmem: a request is not a 4-byte FLUSH");
                        metrics.error();
                        RESP_EIO
                    }
                };
                metrics.request(0, 0);
                Some(match mem.write_obj(status, response) {
                    Ok(()) => 4,
                    Err(_) => 0,
                })
            },
        )
    }
    fn extra_fds(&self) -> Vec<RawFd> {
        crate::rate_limiter::waiting_timer(&self.limiter).into_iter().collect()
    }
    fn process_fd(&mut self, _fd: RawFd, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        crate::rate_limiter::timer_fired(&mut self.limiter);
        self.process_queue(0, queues, mem)
    }
}

/// The worker's work for the fuzzer: flush requests over a driver-written queue in `mem`,
/// against a 2 MiB in-memory file; `kicks` notifications.
#[doc(hidden)]
pub fn fuzz_queues(mem: &GuestMemory, queues: &mut [Queue], kicks: usize) {
    use std::os::fd::FromRawFd;
    // SAFETY: memfd_create with a NUL-terminated name; the fd goes into the File at once.
    let fd = unsafe { libc::memfd_create(c"ferrovisor-fuzz-pmem".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return;
    }
    // SAFETY: `fd` is a fresh descriptor nothing else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    if file.set_len(ALIGNMENT).is_err() {
        return;
    }
    let Ok(mapping) = PmemMapping::new(file, kicks.is_multiple_of(2)) else { return };
    let mut backend = PmemBackend { mapping: Arc::new(mapping), metrics: Arc::default(), limiter: None };
    for _ in 0..kicks {
        backend.process_queue(0, queues, mem);
    }
}
