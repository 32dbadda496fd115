//! A PCI root: configuration mechanism #1 at ports 0xcf8-0xcff, bus 0, one function per
//! device, a host bridge in slot 0. Absent devices read as all ones.

use std::sync::{Arc, Mutex};

use crate::BusDevice;

/// A PCI function's configuration space.
pub trait PciDevice: Send {
    /// The dword at `offset` (a multiple of 4 below 256).
    fn config_read(&mut self, offset: u16) -> u32;
    /// A write of 1, 2 or 4 bytes at `offset`.
    fn config_write(&mut self, offset: u16, data: &[u8]);
}

/// Where the VMM routes MSI messages: the KVM GSI of each vector.
pub trait MsiRouter: Send + Sync {
    /// Routes each `gsi` to its `msi` (address, data), or removes its route, all at once: one
    /// routing-table update for the lot (KVM's is costly, and a guest sets how often).
    fn set_routes(&self, routes: &[(u32, Option<(u64, u32)>)]);

    /// Attaches `irqfd` to `gsi`, so that KVM injects what it signals, or detaches it, so that
    /// the signals stay in the eventfd for the VMM to find: how an assigned device's masked
    /// MSI-X vector keeps its pending interrupt. Only assigned devices ask for it.
    fn attach_irqfd(&self, gsi: u32, irqfd: &vmm_sys_util::eventfd::EventFd, attached: bool) -> Result<(), String> {
        let _ = (gsi, irqfd, attached);
        Err("this interrupt router cannot hold interrupts".into())
    }
}

pub const CONFIG_PORT: u16 = 0xcf8;
pub const CONFIG_PORT_LEN: u64 = 8;
pub const SLOTS: usize = 32;
const ENABLE: u32 = 1 << 31;

pub struct PciRoot {
    address: u32,
    slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>>,
}

impl Default for PciRoot {
    fn default() -> Self {
        Self::new()
    }
}

impl PciRoot {
    /// A root with its host bridge in slot 0.
    pub fn new() -> PciRoot {
        let mut slots: Vec<Option<Arc<Mutex<dyn PciDevice>>>> = (0..SLOTS).map(|_| None).collect();
        slots[0] = Some(Arc::new(Mutex::new(HostBridge)));
        PciRoot { address: 0, slots }
    }

    /// Puts `device` in the first free slot; returns the slot, or None when all are taken.
    /// CONFIG_ADDRESS as the guest last wrote it, for snapshots.
    pub fn address(&self) -> u32 {
        self.address
    }

    pub fn set_address(&mut self, address: u32) {
        self.address = address;
    }

    pub fn add(&mut self, device: Arc<Mutex<dyn PciDevice>>) -> Option<usize> {
        let slot = self.slots.iter().position(Option::is_none)?;
        self.slots[slot] = Some(device);
        Some(slot)
    }

    /// The device and register CONFIG_ADDRESS selects, if it exists.
    fn selected(&self) -> Option<(&Arc<Mutex<dyn PciDevice>>, u16)> {
        let (bus, slot, function) = ((self.address >> 16) & 0xff, (self.address >> 11) & 0x1f, (self.address >> 8) & 7);
        if self.address & ENABLE == 0 || bus != 0 || function != 0 {
            return None;
        }
        let device = self.slots.get(slot as usize)?.as_ref()?;
        Some((device, (self.address & 0xfc) as u16))
    }
}

impl BusDevice for PciRoot {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset < 4 {
            if offset == 0 && data.len() == 4 {
                data.copy_from_slice(&self.address.to_le_bytes());
            } else {
                data.fill(0xff);
            }
            return;
        }
        let byte = (offset - 4) as usize;
        let dword = match self.selected() {
            Some((device, register)) => device.lock().unwrap_or_else(|p| p.into_inner()).config_read(register),
            None => u32::MAX,
        };
        let bytes = dword.to_le_bytes();
        for (i, out) in data.iter_mut().enumerate() {
            *out = bytes.get(byte + i).copied().unwrap_or(0xff);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset < 4 {
            if offset == 0
                && let Ok(bytes) = <[u8; 4]>::try_from(data)
            {
                self.address = u32::from_le_bytes(bytes);
            }
            return;
        }
        let byte = (offset - 4) as u16;
        if byte as usize + data.len() > 4 {
            return;
        }
        if let Some((device, register)) = self.selected() {
            device.lock().unwrap_or_else(|p| p.into_inner()).config_write(register + byte, data);
        }
    }
}

/// The host bridge Linux looks for before it trusts configuration mechanism #1.
struct HostBridge;

/// Red Hat's "QEMU PCIe host bridge" IDs: a plain host bridge every kernel knows.
const HOST_BRIDGE_ID: u32 = 0x0008_1b36;
const CLASS_HOST_BRIDGE: u32 = 0x0600_0000;

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: u16) -> u32 {
        match offset {
            0x00 => HOST_BRIDGE_ID,
            0x08 => CLASS_HOST_BRIDGE,
            _ => 0,
        }
    }
    fn config_write(&mut self, _offset: u16, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn select(root: &mut PciRoot, slot: u32, register: u32) {
        root.write(0, &(ENABLE | slot << 11 | register).to_le_bytes());
    }

    fn read32(root: &mut PciRoot) -> u32 {
        let mut b = [0u8; 4];
        root.read(4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn host_bridge_is_found_and_empty_slots_read_all_ones() {
        let mut root = PciRoot::new();
        select(&mut root, 0, 0);
        assert_eq!(read32(&mut root), HOST_BRIDGE_ID);
        select(&mut root, 0, 8);
        assert_eq!(read32(&mut root) >> 16, 0x0600);
        select(&mut root, 5, 0);
        assert_eq!(read32(&mut root), u32::MAX);
        root.write(0, &(5u32 << 11).to_le_bytes()); // enable bit clear
        assert_eq!(read32(&mut root), u32::MAX);
    }

    #[test]
    fn byte_reads_pick_the_right_lane() {
        let mut root = PciRoot::new();
        select(&mut root, 0, 0);
        let mut b = [0u8; 2];
        root.read(6, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x0008);
        let mut one = [0u8; 1];
        root.read(4, &mut one);
        assert_eq!(one, [0x36]);
    }
}
