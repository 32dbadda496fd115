//! virtio-pci: configuration-space and BAR sequences, the MSI-X table and its routes included.
#![no_main]

use std::sync::Arc;

use devices::BusDevice;
use devices::pci::PciDevice;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

/// Routes go nowhere; the transport's bookkeeping is what is fuzzed.
struct NoRoutes;

impl virtio::pci::MsiRouter for NoRoutes {
    fn set_routes(&self, routes: &[(u32, Option<(u64, u32)>)]) {
        assert!(routes.len() <= vectors());
    }
}

/// The fake device's vectors: one per queue and one for configuration.
fn vectors() -> usize {
    use virtio::device::VirtioDevice;
    virtio::pci::vectors_for(ferrovisor_fuzz::FakeDevice.queue_max_sizes().len())
}

fuzz_target!(|data: &[u8]| {
    let (mem, _) = ferrovisor_fuzz::guest_with_queue(&[]);
    let irqfds: Vec<EventFd> = (0..vectors()).filter_map(|_| EventFd::new(libc::EFD_NONBLOCK).ok()).collect();
    if irqfds.len() != vectors() {
        return;
    }
    let gsis = (24..24 + vectors() as u32).collect();
    let Ok(mut transport) = virtio::pci::PciTransport::new(
        "fuzz",
        Box::new(ferrovisor_fuzz::FakeDevice),
        mem,
        0xe000_0000,
        gsis,
        irqfds,
        Arc::new(NoRoutes),
    ) else {
        return;
    };
    for (offset, size, write, value) in ferrovisor_fuzz::accesses(data) {
        // Configuration space (256 bytes) when the offset's top bit is set, else the BAR.
        if offset & 0x8000 != 0 {
            let at = (offset & 0xff) as u16;
            if write {
                transport.config_write(at, &value.to_le_bytes()[..size]);
            } else {
                transport.config_read(at);
            }
        } else if write {
            transport.write(offset & 0x3fff, &value.to_le_bytes()[..size]);
        } else {
            let mut out = [0u8; 4];
            transport.read(offset & 0x3fff, &mut out[..size]);
        }
    }
});
