//! Address-range dispatch for port I/O and MMIO exits.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// A device reached through a bus. `offset` is relative to the device's base address.
pub trait BusDevice: Send {
    fn read(&mut self, offset: u64, data: &mut [u8]);
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device as the buses and the VMM share it.
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    #[error("The range {base:#x}+{len:#x} overlaps a device already on the bus.")]
    Overlap { base: u64, len: u64 },
    #[error("The range {base:#x}+{len:#x} is empty or wraps around the address space.")]
    BadRange { base: u64, len: u64 },
}

struct Slot {
    len: u64,
    device: SharedDevice,
}

/// Devices keyed by base address; ranges never overlap.
#[derive(Default)]
pub struct Bus {
    slots: BTreeMap<u64, Slot>,
}

impl Bus {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert(&mut self, base: u64, len: u64, device: SharedDevice) -> Result<(), BusError> {
        let end = base.checked_add(len).filter(|_| len > 0).ok_or(BusError::BadRange { base, len })?;
        let before = self.slots.range(..end).next_back();
        if before.is_some_and(|(b, s)| b + s.len > base) {
            return Err(BusError::Overlap { base, len });
        }
        self.slots.insert(base, Slot { len, device });
        Ok(())
    }

    fn find(&self, addr: u64) -> Option<(u64, &Slot)> {
        let (base, slot) = self.slots.range(..=addr).next_back()?;
        (addr - base < slot.len).then_some((addr - base, slot))
    }

    /// Reads from the device at `addr`; `false` when nothing is there.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, slot)) => {
                lock(&slot.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; `false` when nothing is there.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, slot)) => {
                lock(&slot.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// A device whose lock was poisoned by a panicking vCPU thread still serves the others.
fn lock(device: &Mutex<dyn BusDevice>) -> std::sync::MutexGuard<'_, dyn BusDevice + 'static> {
    device.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Recorder(Vec<(u64, Vec<u8>)>);
    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.0.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_relative_offsets() {
        let dev = Arc::new(Mutex::new(Recorder(Vec::new())));
        let mut bus = Bus::new();
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        let mut byte = [0u8];
        assert!(bus.read(0x3fd, &mut byte));
        assert_eq!(byte, [5]);
        assert!(bus.write(0x3f8, b"x"));
        assert!(!bus.write(0x400, b"y"));
        assert!(!bus.read(0x3f7, &mut byte));
        assert_eq!(dev.lock().unwrap().0, vec![(0, b"x".to_vec())]);
    }

    #[test]
    fn refuses_overlaps_and_bad_ranges() {
        let dev = Arc::new(Mutex::new(Recorder(Vec::new())));
        let mut bus = Bus::new();
        bus.insert(0x100, 0x10, dev.clone()).unwrap();
        assert_eq!(bus.insert(0x108, 0x10, dev.clone()), Err(BusError::Overlap { base: 0x108, len: 0x10 }));
        assert_eq!(bus.insert(0xf8, 0x10, dev.clone()), Err(BusError::Overlap { base: 0xf8, len: 0x10 }));
        assert!(bus.insert(0x110, 0x10, dev.clone()).is_ok());
        assert!(bus.insert(0xf0, 0x10, dev.clone()).is_ok());
        assert!(matches!(bus.insert(u64::MAX, 2, dev.clone()), Err(BusError::BadRange { .. })));
        assert!(matches!(bus.insert(0x500, 0, dev), Err(BusError::BadRange { .. })));
    }
}
