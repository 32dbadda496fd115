//! The virtio-mmio transport, version 2 (virtio 1.x section 4.2), driver side.

use crate::cmdline::VirtioMmioSlot;
use crate::hw::{self, mmio_read32, mmio_write32};

use super::queue::Virtqueue;

pub const MAGIC: u32 = 0x7472_6976; // "virt"
pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC: u64 = 0x080;
pub const REG_QUEUE_DRIVER: u64 = 0x090;
pub const REG_QUEUE_DEVICE: u64 = 0x0a0;
pub const REG_CONFIG: u64 = 0x100;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;

pub const F_VERSION_1: u64 = 1 << 32;

/// Why a device could not be brought up.
#[derive(Clone, Copy, Debug)]
pub enum SetupError {
    Legacy(u32),
    FeaturesRefused,
    MissingFeature(u64),
    QueueUnavailable(u16),
    OutOfMemory,
}

impl core::fmt::Display for SetupError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SetupError::Legacy(v) => write!(f, "virtio-mmio version {v} (legacy) is not supported"),
            SetupError::FeaturesRefused => write!(f, "the device refused FEATURES_OK"),
            SetupError::MissingFeature(bit) => write!(f, "the device lacks feature {:#x}", bit),
            SetupError::QueueUnavailable(q) => write!(f, "queue {q} is missing or already in use"),
            SetupError::OutOfMemory => write!(f, "the probe's ring memory ran out"),
        }
    }
}

pub struct Device {
    pub base: u64,
    pub features: u64,
}

impl Device {
    pub fn read(&self, reg: u64) -> u32 {
        mmio_read32(self.base + reg)
    }
    pub fn write(&self, reg: u64, value: u32) {
        mmio_write32(self.base + reg, value)
    }
    pub fn config_read32(&self, offset: u64) -> u32 {
        self.read(REG_CONFIG + offset)
    }
    pub fn config_read64(&self, offset: u64) -> u64 {
        u64::from(self.config_read32(offset)) | u64::from(self.config_read32(offset + 4)) << 32
    }
    pub fn status(&self) -> u32 {
        self.read(REG_STATUS)
    }

    pub fn offered_features(&self) -> u64 {
        self.write(REG_DEVICE_FEATURES_SEL, 0);
        let low = self.read(REG_DEVICE_FEATURES);
        self.write(REG_DEVICE_FEATURES_SEL, 1);
        u64::from(low) | u64::from(self.read(REG_DEVICE_FEATURES)) << 32
    }

    /// Reset, ACKNOWLEDGE, DRIVER, and feature negotiation: `required` must be offered,
    /// `wanted` is taken where offered. VERSION_1 is always required.
    pub fn begin(slot: &VirtioMmioSlot, required: u64, wanted: u64) -> Result<Device, SetupError> {
        let mut dev = Device { base: slot.base, features: 0 };
        let version = dev.read(REG_VERSION);
        if version != 2 {
            return Err(SetupError::Legacy(version));
        }
        dev.write(REG_STATUS, 0);
        dev.write(REG_STATUS, STATUS_ACKNOWLEDGE);
        dev.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let offered = dev.offered_features();
        let required = required | F_VERSION_1;
        if offered & required != required {
            return Err(SetupError::MissingFeature(required & !offered));
        }
        dev.features = required | (wanted & offered);
        dev.write(REG_DRIVER_FEATURES_SEL, 0);
        dev.write(REG_DRIVER_FEATURES, dev.features as u32);
        dev.write(REG_DRIVER_FEATURES_SEL, 1);
        dev.write(REG_DRIVER_FEATURES, (dev.features >> 32) as u32);
        dev.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        if dev.status() & STATUS_FEATURES_OK == 0 {
            return Err(SetupError::FeaturesRefused);
        }
        Ok(dev)
    }

    /// Sets up queue `index` with up to `want` entries.
    pub fn queue(&self, index: u16, want: u16) -> Result<Virtqueue, SetupError> {
        self.write(REG_QUEUE_SEL, u32::from(index));
        let max = self.read(REG_QUEUE_NUM_MAX);
        if max == 0 || self.read(REG_QUEUE_READY) != 0 {
            return Err(SetupError::QueueUnavailable(index));
        }
        let size = (want as u32).min(max).min(super::queue::MAX_SIZE as u32);
        // The largest power of two that fits.
        let size = 1u16 << (31 - size.leading_zeros());
        let q = Virtqueue::new(size).ok_or(SetupError::OutOfMemory)?;
        self.write(REG_QUEUE_NUM, u32::from(size));
        self.set_queue_addresses(q.desc, q.avail, q.used);
        self.write(REG_QUEUE_READY, 1);
        Ok(q)
    }

    pub fn set_queue_addresses(&self, desc: u64, avail: u64, used: u64) {
        for (reg, addr) in [(REG_QUEUE_DESC, desc), (REG_QUEUE_DRIVER, avail), (REG_QUEUE_DEVICE, used)] {
            self.write(reg, addr as u32);
            self.write(reg + 4, (addr >> 32) as u32);
        }
    }

    pub fn driver_ok(&self) {
        self.write(REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }

    pub fn notify(&self, queue: u16) {
        self.write(REG_QUEUE_NOTIFY, u32::from(queue));
    }

    /// Resets the device, which drops its queues: the end of every test.
    pub fn reset(&self) {
        self.write(REG_STATUS, 0);
    }

    /// Polls `q` until a chain completes or `deadline` (TSC) passes.
    pub fn wait_used(&self, q: &mut Virtqueue, deadline: u64) -> Option<(u16, u32)> {
        loop {
            if let Some(done) = q.pop_used() {
                // Interrupts are off: acknowledge so that the device does not keep the line up
                // (a driver that suppressed interrupts has none to acknowledge).
                if !q.event_idx {
                    let pending = self.read(REG_INTERRUPT_STATUS);
                    if pending != 0 {
                        self.write(REG_INTERRUPT_ACK, pending);
                    }
                }
                return Some(done);
            }
            if hw::rdtsc() > deadline {
                return None;
            }
            core::hint::spin_loop();
        }
    }
}

/// The first announced slot holding a virtio device of type `id`.
pub fn find(cmdline: crate::cmdline::Cmdline, id: u32) -> Option<VirtioMmioSlot> {
    cmdline
        .virtio_mmio_devices()
        .find(|slot| mmio_read32(slot.base + REG_MAGIC) == MAGIC && mmio_read32(slot.base + REG_DEVICE_ID) == id)
}
