//! Per-device counters, updated by the workers with relaxed atomics and read by the metrics
//! endpoints. One registry per process: a VMM runs one VM.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What every device counts. Bytes are from the guest's point of view: `read_bytes` went to
/// the guest (disk reads, received frames, random bytes), `write_bytes` came from it.
#[derive(Debug, Default)]
pub struct DeviceMetrics {
    /// Requests served: block requests, frames sent plus received, buffers filled.
    pub requests: AtomicU64,
    pub read_bytes: AtomicU64,
    pub write_bytes: AtomicU64,
    /// Requests answered with an error, and malformed input from the driver.
    pub errors: AtomicU64,
    /// Requests held back by a rate limiter.
    pub rate_limited: AtomicU64,
    /// Frames the port's firewall dropped (network devices).
    pub firewall_dropped: AtomicU64,
}

impl DeviceMetrics {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub fn request(&self, read: u64, written: u64) {
        Self::add(&self.requests, 1);
        Self::add(&self.read_bytes, read);
        Self::add(&self.write_bytes, written);
    }

    pub fn error(&self) {
        Self::add(&self.errors, 1);
    }

    /// The counters as (name, value), in a fixed order.
    pub fn snapshot(&self) -> [(&'static str, u64); 6] {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("requests", get(&self.requests)),
            ("read_bytes", get(&self.read_bytes)),
            ("write_bytes", get(&self.write_bytes)),
            ("errors", get(&self.errors)),
            ("rate_limited", get(&self.rate_limited)),
            ("firewall_dropped", get(&self.firewall_dropped)),
        ]
    }
}

/// A registered device: its name (`virtio-blk0`), its kind (`block`) and its counters.
pub struct Registered {
    pub name: String,
    pub kind: &'static str,
    pub metrics: Arc<DeviceMetrics>,
}

static REGISTRY: Mutex<Vec<Registered>> = Mutex::new(Vec::new());

/// Registers `metrics` under `name`; a name registered again replaces the older entry.
pub fn register(name: &str, kind: &'static str, metrics: Arc<DeviceMetrics>) {
    let mut registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    registry.retain(|r| r.name != name);
    registry.push(Registered { name: name.to_string(), kind, metrics });
}

/// Calls `f` with every registered device, in registration order.
pub fn for_each(mut f: impl FnMut(&Registered)) {
    let registry = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    registry.iter().for_each(&mut f);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_errors_add_up() {
        let m = DeviceMetrics::default();
        m.request(512, 0);
        m.request(0, 4096);
        m.error();
        assert_eq!(
            m.snapshot(),
            [
                ("requests", 2),
                ("read_bytes", 512),
                ("write_bytes", 4096),
                ("errors", 1),
                ("rate_limited", 0),
                ("firewall_dropped", 0)
            ]
        );
    }
}
