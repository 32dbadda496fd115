//! virtio-rng (entropy device): fills the driver's buffers from the host's getrandom(2).

use std::os::fd::RawFd;
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use crate::device::{ActivateError, Activation, VirtioDevice};
use crate::metrics::DeviceMetrics;
use crate::rate_limiter::{RateLimit, RateLimiter};
use crate::worker::{Backend, Worker, serve_queue_limited};
use crate::{F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, GuestMemory, TYPE_RNG};

/// Bytes served per chain at most: a guest cannot make the VMM spin on one huge buffer.
const MAX_CHAIN_BYTES: usize = 64 << 10;
const QUEUE_SIZES: [u16; 1] = [256];

#[derive(Default)]
pub struct Rng {
    metrics: Arc<DeviceMetrics>,
    rate_limit: Option<RateLimit>,
    worker: Option<Worker>,
}

impl Rng {
    pub fn new() -> Self {
        Self::default()
    }

    /// Limits the bytes and requests served (Firecracker's entropy `rate_limiter`).
    pub fn with_rate_limit(mut self, limit: Option<RateLimit>) -> Self {
        self.rate_limit = limit;
        self
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        self.worker = Some(
            Worker::spawn(
                sandbox::ThreadKind::Rng,
                RngBackend {
                    metrics: self.metrics.clone(),
                    limiter: RateLimiter::for_limit(self.rate_limit).map_err(ActivateError::Worker)?,
                },
                activation,
            )
            .map_err(ActivateError::Worker)?,
        );
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

struct RngBackend {
    metrics: Arc<DeviceMetrics>,
    limiter: Option<RateLimiter>,
}

/// Fills `len` bytes at `addr` with entropy; returns how many were written.
fn fill_random(mem: &GuestMemory, addr: GuestAddress, len: usize) -> usize {
    let mut chunk = [0u8; 4096];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(chunk.len());
        // SAFETY: getrandom writes at most `n` bytes into `chunk`, which holds 4096.
        let got = unsafe { libc::getrandom(chunk.as_mut_ptr().cast(), n, 0) };
        if got <= 0 {
            break;
        }
        let got = got as usize;
        let Some(at) = addr.0.checked_add(done as u64) else { break };
        if mem.write_slice(&chunk[..got], GuestAddress(at)).is_err() {
            break;
        }
        done += got;
    }
    done
}

/// The worker's work for the fuzzer: the driver notifies the request queue in `mem` `kicks`
/// times.
#[doc(hidden)]
pub fn fuzz_queues(mem: &GuestMemory, queues: &mut [Queue], kicks: usize) {
    let mut backend = RngBackend { metrics: Arc::default(), limiter: None };
    for _ in 0..kicks {
        backend.process_queue(0, queues, mem);
    }
    let served = backend.metrics.read_bytes.load(std::sync::atomic::Ordering::Relaxed);
    assert!(served <= (kicks * usize::from(virtio_queue::QueueT::size(&queues[0])) * MAX_CHAIN_BYTES) as u64);
}

impl Backend for RngBackend {
    fn process_queue(&mut self, _index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let (metrics, limiter) = (&self.metrics, &mut self.limiter);
        serve_queue_limited(
            "virtio-rng",
            &mut queues[0],
            mem,
            || true,
            |chain| {
                let wanted: usize =
                    chain.clone().writable().map(|d| d.len() as usize).sum::<usize>().min(MAX_CHAIN_BYTES);
                if let Some(limiter) = limiter.as_mut()
                    && !limiter.consume(wanted as u64)
                {
                    DeviceMetrics::add(&metrics.rate_limited, 1);
                    return None;
                }
                let mut budget = MAX_CHAIN_BYTES;
                let mut written = 0usize;
                for desc in chain.writable() {
                    let len = (desc.len() as usize).min(budget);
                    let n = fill_random(mem, desc.addr(), len);
                    written += n;
                    budget -= n;
                    if n < len || budget == 0 {
                        break;
                    }
                }
                metrics.request(written as u64, 0);
                Some(written as u32)
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
