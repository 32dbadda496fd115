//! A hostile vfio-user server: the input is everything the server says, fed to the VMM's
//! client through a socket pair, while the client negotiates, reads the device's regions and
//! interrupts, and then reads, writes, resets and sets interrupts up. Nothing it says may
//! panic the client, make it allocate without bound, or hang it.
#![no_main]

use std::io::Write;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use vfio::Backend;

fuzz_target!(|data: &[u8]| {
    let Ok((client, mut server)) = UnixStream::pair() else { return };
    // The whole answer is queued before the client speaks; a short answer ends in EOF.
    let _ = server.set_nonblocking(true);
    let _ = server.write_all(&data[..data.len().min(128 << 10)]);
    let _ = server.shutdown(std::net::Shutdown::Write);
    let Ok(mut device) = vfio::user::UserDevice::over(client, std::path::Path::new("fuzz")) else { return };
    let mut buf = [0u8; 8];
    let _ = device.read(vfio::CONFIG_REGION, 0, &mut buf);
    let _ = device.write(0, 4, &buf[..4]);
    if let Ok(fd) = vmm_sys_util::eventfd::EventFd::new(0) {
        let _ = device.set_irqs(vfio::MSIX_IRQ, &[&fd, &fd]);
    }
    let _ = device.reset();
    for index in 0..9 {
        let _ = device.region(index).map(|r| r.size);
    }
});
