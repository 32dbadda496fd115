//! virtio-mmio register sequences: status, features, queue setup, notifications and config.
#![no_main]

use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

fuzz_target!(|data: &[u8]| {
    let (mem, _) = ferrovisor_fuzz::guest_with_queue(&[]);
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else { return };
    let Ok(mut transport) = virtio::mmio::MmioTransport::new("fuzz", Box::new(ferrovisor_fuzz::FakeDevice), mem, irq)
    else {
        return;
    };
    for (offset, size, write, value) in ferrovisor_fuzz::accesses(data) {
        let offset = offset % 0x200;
        if write {
            transport.write(offset, &value.to_le_bytes()[..size]);
        } else {
            let mut out = [0u8; 4];
            transport.read(offset, &mut out[..size]);
        }
    }
});
