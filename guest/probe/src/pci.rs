//! PCI configuration mechanism #1 (ports 0xcf8/0xcfc, bus 0) and a polled modern virtio-pci
//! driver that finds its structures through the capability list, as a real driver does.

use crate::hw;
use crate::virtio::queue::Virtqueue;

const CONFIG_ADDRESS: u16 = 0xcf8;
const CONFIG_DATA: u16 = 0xcfc;
const ENABLE: u32 = 1 << 31;
pub const SLOTS: u8 = 32;
const VIRTIO_VENDOR: u32 = 0x1af4;
const VIRTIO_MODERN_BASE: u32 = 0x1040;
const CAP_VENDOR: u32 = 0x09;
const CFG_COMMON: u32 = 1;
const CFG_NOTIFY: u32 = 2;
const CFG_DEVICE: u32 = 4;
const STATUS_CAP_LIST: u32 = 1 << 20;
const F_VERSION_1: u32 = 1; // bit 32: bit 0 of the second feature word

// The common configuration structure (virtio 1.2, 4.1.4.3).
pub const COMMON_DEVICE_FEATURE_SELECT: u64 = 0;
pub const COMMON_DEVICE_FEATURE: u64 = 4;
pub const COMMON_DRIVER_FEATURE_SELECT: u64 = 8;
pub const COMMON_DRIVER_FEATURE: u64 = 12;
pub const COMMON_MSIX_CONFIG: u64 = 16;
pub const COMMON_STATUS: u64 = 20;
pub const COMMON_QUEUE_SELECT: u64 = 22;
pub const COMMON_QUEUE_SIZE: u64 = 24;
pub const COMMON_QUEUE_MSIX_VECTOR: u64 = 26;
pub const COMMON_QUEUE_ENABLE: u64 = 28;
const COMMON_QUEUE_NOTIFY_OFF: u64 = 30;
pub const COMMON_QUEUE_DESC: u64 = 32;
const COMMON_QUEUE_DRIVER: u64 = 40;
const COMMON_QUEUE_DEVICE: u64 = 48;

const STATUS_ACKNOWLEDGE: u8 = 1;
const STATUS_DRIVER: u8 = 2;
const STATUS_DRIVER_OK: u8 = 4;
const STATUS_FEATURES_OK: u8 = 8;

pub fn config_read(slot: u8, offset: u8) -> u32 {
    hw::outl(CONFIG_ADDRESS, ENABLE | u32::from(slot) << 11 | u32::from(offset & 0xfc));
    hw::inl(CONFIG_DATA)
}

pub fn config_write(slot: u8, offset: u8, value: u32) {
    hw::outl(CONFIG_ADDRESS, ENABLE | u32::from(slot) << 11 | u32::from(offset & 0xfc));
    hw::outl(CONFIG_DATA, value);
}

/// A one-byte write at any offset (through the data port's byte lanes).
pub fn config_write8(slot: u8, offset: u8, value: u8) {
    hw::outl(CONFIG_ADDRESS, ENABLE | u32::from(slot) << 11 | u32::from(offset & 0xfc));
    hw::outb(CONFIG_DATA + u16::from(offset & 3), value);
}

pub fn read8(addr: u64) -> u8 {
    // SAFETY: a device register in the identity-mapped first 4 GiB.
    unsafe { core::ptr::read_volatile(addr as *const u8) }
}

pub fn write8(addr: u64, value: u8) {
    // SAFETY: as for read8.
    unsafe { core::ptr::write_volatile(addr as *mut u8, value) }
}

pub fn read16(addr: u64) -> u16 {
    // SAFETY: as for read8.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}

pub fn write16(addr: u64, value: u16) {
    // SAFETY: as for read8.
    unsafe { core::ptr::write_volatile(addr as *mut u16, value) }
}

/// Where memory BAR `index` of the function in `slot` lies: None for an I/O BAR, an
/// unprogrammed one, or one above the probe's identity-mapped 4 GiB.
fn bar_address(slot: u8, index: u32) -> Option<u64> {
    if index > 5 {
        return None;
    }
    let at = 0x10 + 4 * index as u8;
    let low = config_read(slot, at);
    if low & 1 != 0 {
        return None;
    }
    let high = if low & 0x6 == 0x4 && index < 5 { u64::from(config_read(slot, at + 4)) << 32 } else { 0 };
    let addr = high | u64::from(low & !0xf);
    (addr != 0 && addr < 1 << 32).then_some(addr)
}

/// A modern virtio-pci function, its structures located through its capabilities.
pub struct VirtioPci {
    pub slot: u8,
    /// BAR 0 as the VMM placed it (0 when it is no memory BAR below 4 GiB).
    pub bar: u64,
    pub common: u64,
    notify: u64,
    notify_multiplier: u32,
    /// The device-specific configuration, where the function has one.
    pub device_cfg: Option<u64>,
    /// The capability list's MSI-X capability offset, if any.
    pub msix_cap: Option<u8>,
}

impl VirtioPci {
    /// The first function on bus 0 that is a modern virtio device of type `device_type`.
    pub fn find(device_type: u32) -> Option<VirtioPci> {
        let slot =
            (0..SLOTS).find(|&s| config_read(s, 0) == (VIRTIO_MODERN_BASE + device_type) << 16 | VIRTIO_VENDOR)?;
        let bar = bar_address(slot, 0).unwrap_or(0);
        let command = config_read(slot, 0x04);
        if command & STATUS_CAP_LIST == 0 {
            return None;
        }
        // Memory decoding and bus mastering (firmware may have left the second off; QEMU's
        // devices then do no DMA).
        config_write(slot, 0x04, (command & 0xffff) | 0x6);
        let mut dev =
            VirtioPci { slot, bar, common: 0, notify: 0, notify_multiplier: 0, device_cfg: None, msix_cap: None };
        let mut at = (config_read(slot, 0x34) & 0xfc) as u8;
        // At most 48 capabilities fit in the 192 bytes after the header: a loop ends there.
        for _ in 0..48 {
            if at == 0 {
                break;
            }
            let head = config_read(slot, at);
            // A structure lies in whichever memory BAR the capability names (QEMU's in BAR 4).
            let where_ = |bar_field: u32, offset: u32| Some(bar_address(slot, bar_field & 0xff)? + u64::from(offset));
            match head & 0xff {
                CAP_VENDOR => {
                    let (kind, bar_field, offset) =
                        ((head >> 24) & 0xff, config_read(slot, at + 4), config_read(slot, at + 8));
                    match kind {
                        CFG_COMMON => dev.common = where_(bar_field, offset)?,
                        CFG_NOTIFY => {
                            dev.notify = where_(bar_field, offset)?;
                            dev.notify_multiplier = config_read(slot, at + 16);
                        }
                        CFG_DEVICE => dev.device_cfg = where_(bar_field, offset),
                        _ => {}
                    }
                }
                0x11 => dev.msix_cap = Some(at),
                _ => {}
            }
            at = ((head >> 8) & 0xfc) as u8;
        }
        (dev.common != 0 && dev.notify != 0).then_some(dev)
    }

    pub fn reset(&self) {
        write8(self.common + COMMON_STATUS, 0);
    }

    pub fn status(&self) -> u8 {
        read8(self.common + COMMON_STATUS)
    }

    /// Reset, ACKNOWLEDGE, DRIVER, VERSION_1 only, FEATURES_OK; false when refused.
    pub fn begin(&self) -> bool {
        self.negotiate(0, 0).is_some()
    }

    /// Reset, ACKNOWLEDGE, DRIVER and feature negotiation: VERSION_1 and `required` must be
    /// offered, `wanted` is taken where offered. The features taken, or None when refused.
    pub fn negotiate(&self, required: u64, wanted: u64) -> Option<u64> {
        self.reset();
        write8(self.common + COMMON_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        let mut offered = 0u64;
        for word in 0..2u32 {
            hw::mmio_write32(self.common + COMMON_DEVICE_FEATURE_SELECT, word);
            offered |= u64::from(hw::mmio_read32(self.common + COMMON_DEVICE_FEATURE)) << (32 * word);
        }
        let required = required | u64::from(F_VERSION_1) << 32;
        if offered & required != required {
            return None;
        }
        let taken = required | (wanted & offered);
        for word in 0..2u32 {
            hw::mmio_write32(self.common + COMMON_DRIVER_FEATURE_SELECT, word);
            hw::mmio_write32(self.common + COMMON_DRIVER_FEATURE, (taken >> (32 * word)) as u32);
        }
        write8(self.common + COMMON_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
        (self.status() & STATUS_FEATURES_OK != 0).then_some(taken)
    }

    /// Sets up queue `index` with up to `want` entries; None when the device has no such queue.
    pub fn queue(&self, index: u16, want: u16) -> Option<(Virtqueue, u64)> {
        write16(self.common + COMMON_QUEUE_SELECT, index);
        let max = read16(self.common + COMMON_QUEUE_SIZE);
        if max == 0 {
            return None;
        }
        let size = want.min(max);
        let size = 1u16 << (15 - size.leading_zeros());
        let q = Virtqueue::new(size)?;
        write16(self.common + COMMON_QUEUE_SIZE, size);
        for (field, addr) in
            [(COMMON_QUEUE_DESC, q.desc), (COMMON_QUEUE_DRIVER, q.avail), (COMMON_QUEUE_DEVICE, q.used)]
        {
            hw::mmio_write32(self.common + field, addr as u32);
            hw::mmio_write32(self.common + field + 4, (addr >> 32) as u32);
        }
        write16(self.common + COMMON_QUEUE_ENABLE, 1);
        let notify_at =
            self.notify + u64::from(read16(self.common + COMMON_QUEUE_NOTIFY_OFF)) * u64::from(self.notify_multiplier);
        Some((q, notify_at))
    }

    pub fn driver_ok(&self) {
        write8(self.common + COMMON_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);
    }

    /// Notifies the queue whose notification address `queue` returned.
    pub fn notify(&self, notify_at: u64, index: u16) {
        write16(notify_at, index);
    }

    /// Polls `q` until a chain completes or `deadline` (TSC) passes.
    pub fn wait_used(&self, q: &mut Virtqueue, deadline: u64) -> Option<(u16, u32)> {
        loop {
            if let Some(done) = q.pop_used() {
                return Some(done);
            }
            if hw::rdtsc() > deadline {
                return None;
            }
            core::hint::spin_loop();
        }
    }
}
