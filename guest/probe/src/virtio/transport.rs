//! One face for a device on either transport, with what a device test needs: its features,
//! configuration reads, queues, notifications, polling and reset.

use super::mmio::Device;
use super::queue::Virtqueue;
use crate::pci::VirtioPci;

/// Queues a device test may set up on a PCI function.
const MAX_QUEUES: usize = 4;

pub enum Transport {
    Mmio(Device),
    Pci {
        dev: VirtioPci,
        features: u64,
        /// Each queue's notification address, as its setup found it.
        notify: [u64; MAX_QUEUES],
    },
}

impl Transport {
    /// The PCI function's transport once `required` (and what of `wanted` it offers) is agreed.
    pub fn pci(dev: VirtioPci, required: u64, wanted: u64) -> Result<Transport, &'static str> {
        let features = dev.negotiate(required, wanted).ok_or("the PCI function refused the features")?;
        Ok(Transport::Pci { dev, features, notify: [0; MAX_QUEUES] })
    }

    pub fn features(&self) -> u64 {
        match self {
            Transport::Mmio(dev) => dev.features,
            Transport::Pci { features, .. } => *features,
        }
    }

    pub fn queue(&mut self, index: u16, want: u16) -> Result<Virtqueue, &'static str> {
        match self {
            Transport::Mmio(dev) => dev.queue(index, want).map_err(|_| "a queue could not be set up"),
            Transport::Pci { dev, notify, .. } => {
                let slot = notify.get_mut(usize::from(index)).ok_or("the probe drives no such queue")?;
                let (q, at) = dev.queue(index, want).ok_or("a queue could not be set up")?;
                *slot = at;
                Ok(q)
            }
        }
    }

    pub fn driver_ok(&self) {
        match self {
            Transport::Mmio(dev) => dev.driver_ok(),
            Transport::Pci { dev, .. } => dev.driver_ok(),
        }
    }

    pub fn notify(&self, queue: u16) {
        match self {
            Transport::Mmio(dev) => dev.notify(queue),
            Transport::Pci { dev, notify, .. } => dev.notify(notify[usize::from(queue) % MAX_QUEUES], queue),
        }
    }

    pub fn wait_used(&self, q: &mut Virtqueue, deadline: u64) -> Option<(u16, u32)> {
        match self {
            Transport::Mmio(dev) => dev.wait_used(q, deadline),
            Transport::Pci { dev, .. } => dev.wait_used(q, deadline),
        }
    }

    /// A 64-bit field of the device-specific configuration (0 where there is none).
    pub fn config_read64(&self, offset: u64) -> u64 {
        match self {
            Transport::Mmio(dev) => dev.config_read64(offset),
            Transport::Pci { dev, .. } => dev.device_cfg.map_or(0, |at| {
                u64::from(crate::hw::mmio_read32(at + offset)) | u64::from(crate::hw::mmio_read32(at + offset + 4)) << 32
            }),
        }
    }

    pub fn reset(&self) {
        match self {
            Transport::Mmio(dev) => dev.reset(),
            Transport::Pci { dev, .. } => dev.reset(),
        }
    }
}
