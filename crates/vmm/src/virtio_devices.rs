//! Puts the configured virtio devices on virtio-mmio: a window in the MMIO hole, an IRQ, an
//! irqfd, one ioeventfd per queue, and a `virtio_mmio.device=` entry on the command line.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, VmFd};
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use arch::GuestMemory;
use arch::layout::{VIRTIO_FIRST_IRQ, VIRTIO_MMIO_START, VIRTIO_MMIO_WINDOW};
use devices::Bus;
use virtio::VirtioDevice;
use virtio::blk::Block;
use virtio::console::{Console, ConsoleIo};
use virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use virtio::rng::Rng;

use crate::config::{ConsoleConfig, VmConfig};
use crate::vm::Error;

/// Creates every virtio device of `config`, maps it and announces it on `cmdline`.
pub fn attach_all(
    vm: &VmFd,
    mem: &GuestMemory,
    config: &VmConfig,
    mmio: &mut Bus,
    cmdline: &mut Cmdline,
) -> Result<(), Error> {
    let mut devices: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let block = Block::open(&disk.path, disk.readonly, &disk.id).map_err(|e| Error::Device(e.to_string()))?;
        devices.push((format!("virtio-blk{i}"), Box::new(block)));
    }
    for (i, nic) in config.nets.iter().enumerate() {
        let tap =
            net::Tap::open(&nic.tap, virtio::net::VNET_HDR_LEN as i32).map_err(|e| Error::Device(e.to_string()))?;
        // Locally administered, unicast, and different for each interface.
        let mac = nic.mac.unwrap_or([0x02, 0xfe, 0x00, 0x00, 0x00, i as u8 + 1]);
        devices.push((format!("virtio-net{i}"), Box::new(virtio::net::Net::new(tap, mac))));
    }
    if let Some(vsock) = &config.vsock {
        let device = virtio::vsock::Vsock::new(vsock.cid, &vsock.uds)
            .map_err(|e| Error::Device(format!("virtio-vsock: {e}")))?;
        tracing::info!("virtio-vsock: guest CID {}, host connections through {}", vsock.cid, vsock.uds.display());
        devices.push(("virtio-vsock".into(), Box::new(device)));
    }
    if let Some(options) = config.balloon {
        devices.push(("virtio-balloon".into(), Box::new(virtio::balloon::Balloon::new(options))));
    }
    if config.rng {
        devices.push(("virtio-rng".into(), Box::new(Rng::new())));
    }
    if let Some(console) = &config.console {
        let io = match console {
            ConsoleConfig::Stdio => ConsoleIo::stdio(),
            ConsoleConfig::File(path) => ConsoleIo::file(path),
            ConsoleConfig::Pty => ConsoleIo::pty(),
        }
        .map_err(|e| Error::Device(format!("virtio-console: {e}")))?;
        tracing::info!("virtio-console on {}", io.description);
        devices.push(("virtio-console".into(), Box::new(Console::new(io))));
    }
    for (slot, (name, device)) in devices.into_iter().enumerate() {
        let base = VIRTIO_MMIO_START + slot as u64 * VIRTIO_MMIO_WINDOW;
        let irq = VIRTIO_FIRST_IRQ + slot as u32;
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| Error::Device(format!("{name}: {e}")))?;
        vm.register_irqfd(&irqfd, irq).map_err(|e| Error::Device(format!("{name}: routing IRQ {irq}: {e}")))?;
        let transport =
            MmioTransport::new(&name, device, mem.clone(), irqfd).map_err(|e| Error::Device(format!("{name}: {e}")))?;
        for (queue, evt) in transport.queue_events().iter().enumerate() {
            vm.register_ioevent(evt, &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY), queue as u32)
                .map_err(|e| Error::Device(format!("{name}: queue {queue} notification: {e}")))?;
        }
        mmio.insert(base, VIRTIO_MMIO_WINDOW, Arc::new(Mutex::new(transport)))
            .map_err(|e| Error::Device(format!("{name}: {e}")))?;
        cmdline.add_virtio_mmio_device(VIRTIO_MMIO_WINDOW, GuestAddress(base), irq, None)?;
        tracing::info!("{name} at {base:#x}, IRQ {irq}");
    }
    Ok(())
}
