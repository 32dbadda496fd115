//! An assigned PCI function as the guest drives it: configuration-space and BAR sequences over
//! the test DMA engine in this process (BAR sizing, MSI-X and MSI capabilities and table, the
//! added reset capability, and the device's own registers with guest-chosen DMA addresses);
//! or, when the first byte is odd, over a device whose configuration space (the next 256
//! bytes) and region sizes (8 more, as powers of two) are the input's.
#![no_main]

use std::sync::{Arc, Mutex};

use devices::BusDevice;
use devices::pci::PciDevice;
use libfuzzer_sys::fuzz_target;
use vfio::function::{BarWindow, ConfigSpace};
use vmm_sys_util::eventfd::EventFd;

struct Fake {
    next_mmio: u64,
    next_gsi: u32,
}

impl vfio::Resources for Fake {
    fn mmio(&mut self, size: u64) -> Option<u64> {
        let at = self.next_mmio.checked_next_multiple_of(size)?;
        self.next_mmio = at.checked_add(size).filter(|&end| end <= 0xfe00_0000)?;
        Some(at)
    }
    fn msi_vector(&mut self) -> Result<(u32, EventFd), String> {
        if self.next_gsi > 4096 {
            return Err("no GSI left".into());
        }
        self.next_gsi += 1;
        EventFd::new(libc::EFD_NONBLOCK).map(|e| (self.next_gsi, e)).map_err(|e| e.to_string())
    }
    fn intx(&mut self) -> Result<(u8, EventFd, EventFd), String> {
        let fd = || EventFd::new(libc::EFD_NONBLOCK).map_err(|e| e.to_string());
        Ok((23, fd()?, fd()?))
    }
}

fn device(data: &[u8]) -> Option<(Box<dyn vfio::Backend>, &[u8])> {
    match data.split_first() {
        Some((kind, rest)) if kind & 1 == 1 && rest.len() >= 264 => {
            let mut config = [0u8; 256];
            config.copy_from_slice(&rest[..256]);
            let regions = (0..8u32)
                .map(|i| vfio::Region {
                    index: i,
                    size: if i == vfio::CONFIG_REGION {
                        256
                    } else {
                        1u64.checked_shl(u32::from(rest[256 + i as usize] & 63)).unwrap_or(0)
                    },
                    readable: true,
                    writable: true,
                    mmap: None,
                })
                .collect();
            let info = vfio::DeviceInfo { regions, irq_counts: vec![1, 1, 2048] };
            let resettable = config[0] & 1 != 0;
            Some((Box::new(vfio::test_device::ConfigOnly { config, info, resettable }), &rest[264..]))
        }
        Some((_, rest)) => Some((Box::new(vfio::test_device::InProcess::new().ok()?), rest)),
        None => None,
    }
}

struct NoRoutes;

impl devices::pci::MsiRouter for NoRoutes {
    fn set_routes(&self, routes: &[(u32, Option<(u64, u32)>)]) {
        assert!(routes.len() <= 2048);
    }
    fn attach_irqfd(&self, _gsi: u32, _irqfd: &EventFd, _attached: bool) -> Result<(), String> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((device, data)) = device(data) else { return };
    let mut resources = Fake { next_mmio: 0xe100_0000, next_gsi: 100 };
    let Ok(function) = vfio::Function::new("fuzz", device, &mut resources, Arc::new(NoRoutes), &[]) else {
        return;
    };
    let function = Arc::new(Mutex::new(function));
    let mut config = ConfigSpace(function.clone());
    let mut bars: Vec<BarWindow> = (0..3).map(|bar| BarWindow { function: function.clone(), bar }).collect();
    for (offset, size, write, value) in ferrovisor_fuzz::accesses(data) {
        // Configuration space when the offset's top bit is set, else a BAR (bits 12-13).
        if offset & 0x8000 != 0 {
            let at = (offset & 0xff) as u16;
            if write {
                config.config_write(at, &value.to_le_bytes()[..size]);
            } else {
                config.config_read(at);
            }
        } else {
            let bar = &mut bars[((offset >> 12) & 3).min(2) as usize];
            let at = offset & 0xfff;
            if write {
                bar.write(at, &value.to_le_bytes()[..size]);
            } else {
                let mut out = [0u8; 4];
                bar.read(at, &mut out[..size]);
            }
        }
    }
});
