//! What a virtio device offers its transport, and the interrupt it raises.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemory;

/// InterruptStatus bits (virtio-mmio).
pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG_CHANGE: u32 = 2;

/// Queues by index, bit i for queue i (a device has fewer than 64).
pub type QueueSet = u64;

/// The set of queue `index` alone (empty past 63).
pub fn queue_bit(index: usize) -> QueueSet {
    1u64.checked_shl(index as u32).unwrap_or(0)
}

/// How a device tells the driver that it used buffers or changed its config; each transport
/// has its own way (an IRQ line and a status word, or an MSI-X vector per queue).
pub trait VirtioInterrupt: Send + Sync {
    /// The driver should look at the used rings of `queues`.
    fn signal_used_queues(&self, queues: QueueSet);
    fn signal_config_change(&self);
}

/// A device's interrupt as a worker that serves some of its queues sees it: the worker's
/// queue i is the device's queue `indices[i]`.
pub struct SubsetInterrupt {
    pub device: Arc<dyn VirtioInterrupt>,
    pub indices: Vec<usize>,
}

impl VirtioInterrupt for SubsetInterrupt {
    fn signal_used_queues(&self, queues: QueueSet) {
        let device = self
            .indices
            .iter()
            .enumerate()
            .filter(|&(i, _)| queues & queue_bit(i) != 0)
            .fold(0, |set, (_, &index)| set | queue_bit(index));
        self.device.signal_used_queues(device);
    }

    fn signal_config_change(&self) {
        self.device.signal_config_change();
    }
}

/// The virtio-mmio interrupt: a status word the driver reads and acknowledges, and the irqfd
/// that KVM delivers as the device's IRQ.
pub struct Interrupt {
    status: AtomicU32,
    irqfd: EventFd,
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self { status: AtomicU32::new(0), irqfd }
    }

    fn raise(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("a virtio interrupt was lost: {e}");
        }
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn acknowledge(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn clear(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// Sets status bits without an interrupt (a restored device: the irqchip's state already
    /// holds what was pending).
    pub fn raise_bits(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
    }
}

impl VirtioInterrupt for Interrupt {
    /// One line for the whole device.
    fn signal_used_queues(&self, _queues: QueueSet) {
        self.raise(INT_USED_RING);
    }

    fn signal_config_change(&self) {
        self.raise(INT_CONFIG_CHANGE);
    }
}

/// Everything a device needs to start serving its queues.
pub struct Activation {
    pub mem: GuestMemory,
    pub queues: Vec<Queue>,
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<dyn VirtioInterrupt>,
    pub acked_features: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up {got} queues where the device needs {want}")]
    QueueCount { want: usize, got: usize },
    #[error("the device's worker thread could not start: {0}")]
    Worker(std::io::Error),
    #[error("{0}")]
    Backend(String),
}

/// A virtio device, whatever its transport.
pub trait VirtioDevice: Send {
    fn device_type(&self) -> u32;
    /// Feature bits offered, VERSION_1 included.
    fn features(&self) -> u64;
    /// The largest size of each queue; the length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Reads device config space; bytes past its end read as 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes device config space; the default ignores writes (read-only config).
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        tracing::debug!("ignored a {}-byte config write at {offset:#x} to a read-only config", data.len());
    }
    /// Starts serving the queues.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops serving and drops the queues; the device can be activated again.
    fn reset(&mut self);

    /// Asks the driver to announce the device on its network (after a migration); false
    /// where the device or its driver has no such thing.
    fn announce(&mut self) -> bool {
        false
    }

    /// Stops serving without forgetting: returns the queues (ring positions included) so that
    /// the device can be saved and then activated again with them. None when not active.
    fn quiesce(&mut self) -> Option<Vec<Queue>> {
        None
    }
    /// Whether the device's state can be snapshotted (held connections cannot, say).
    fn snapshot_support(&self) -> Result<(), String> {
        Ok(())
    }
    /// Device-specific state for a snapshot, beyond what the transport keeps.
    fn save_state(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Puts back what `save_state` returned, before the device is activated again.
    fn restore_state(&mut self, _state: &serde_json::Value) -> Result<(), String> {
        Ok(())
    }
    /// Points the device at another backing file (a disk image), for a driver that is running.
    fn update_backing(&mut self, _path: &std::path::Path) -> Result<(), String> {
        Err("this device has no backing file".into())
    }
    /// Changes the device's rate limit; it applies from the next activation (update_device
    /// restarts the worker).
    fn update_rate_limit(&mut self, _limit: Option<crate::rate_limiter::RateLimit>) -> Result<(), String> {
        Err("this device has no rate limiter".into())
    }
    /// Changes a network device's receive and transmit rate limits (None: that one stays); it
    /// applies from the next activation, like update_rate_limit.
    fn update_rate_limits(
        &mut self,
        _rx: Option<Option<crate::rate_limiter::RateLimit>>,
        _tx: Option<Option<crate::rate_limiter::RateLimit>>,
    ) -> Result<(), String> {
        Err("this device has no receive and transmit rate limiters".into())
    }
    /// The device's counters, for the metrics endpoints.
    fn metrics(&self) -> Option<Arc<crate::metrics::DeviceMetrics>> {
        None
    }
}

/// Copies `config[offset..]` into `data`, zero past the end: config reads of any width.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(offset) = usize::try_from(offset) else { return };
    if let Some(src) = config.get(offset..) {
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_are_bounded() {
        let config = [1u8, 2, 3, 4, 5];
        let mut out = [9u8; 4];
        read_config_bytes(&config, 3, &mut out);
        assert_eq!(out, [4, 5, 0, 0]);
        read_config_bytes(&config, 100, &mut out);
        assert_eq!(out, [0; 4]);
        read_config_bytes(&config, u64::MAX, &mut out);
        assert_eq!(out, [0; 4]);
    }

    #[test]
    fn interrupt_status_is_raised_and_acknowledged() {
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap());
        irq.signal_used_queues(queue_bit(0));
        irq.signal_config_change();
        assert_eq!(irq.status(), 3);
        irq.acknowledge(INT_USED_RING);
        assert_eq!(irq.status(), INT_CONFIG_CHANGE);
        assert_eq!(irq.irqfd.read().unwrap(), 2);
    }
}
