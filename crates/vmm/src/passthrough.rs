//! Assigned PCI devices on the guest's PCI root: each device's BARs in the assigned-device
//! window, the BAR areas it lets the VMM map as KVM memory slots (no exit per access), its
//! MSI/MSI-X vectors as KVM GSIs with irqfds, INTx as a resampled IOAPIC line, and all guest
//! memory mapped for its DMA. Dropping them detaches the devices (interrupts off, reset, DMA
//! unmapped) and unmaps the BARs.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use arch::GuestMemory;
use arch::layout::{IOAPIC_PINS, PASSTHROUGH_MMIO_END, PASSTHROUGH_MMIO_START};
use devices::Bus;
use devices::pci::{MsiRouter, PciRoot};
use vfio::function::{BarWindow, ConfigSpace};
use vfio::{Backend, Function};

use crate::config::{PassthroughBackend, VmConfig};
use crate::error::Error;

/// KVM's routing table holds GSIs below this.
const GSI_LIMIT: u32 = 4096;

/// A BAR area mapped from the device into the VMM, and from there into the guest.
struct BarMapping {
    host: usize,
    len: usize,
}

impl Drop for BarMapping {
    fn drop(&mut self) {
        // SAFETY: the range is a mapping made in `map_area` and used by nothing else now.
        unsafe { libc::munmap(self.host as *mut libc::c_void, self.len) };
    }
}

/// The assigned devices of a VM, by API id.
#[derive(Default)]
pub struct AttachedPassthrough {
    pub functions: Vec<(String, Arc<Mutex<Function>>)>,
    mappings: Vec<BarMapping>,
}

/// Where the next BAR, GSI and INTx line come from.
struct VmResources<'a> {
    vm: &'a VmFd,
    next_mmio: u64,
    next_gsi: u32,
    /// INTx lines are taken from the top pin down to `lowest_line`.
    next_line: u8,
    lowest_line: u8,
}

impl vfio::Resources for VmResources<'_> {
    fn mmio(&mut self, size: u64) -> Option<u64> {
        let at = self.next_mmio.checked_next_multiple_of(size)?;
        let end = at.checked_add(size).filter(|&end| end <= PASSTHROUGH_MMIO_END)?;
        self.next_mmio = end;
        Some(at)
    }

    fn msi_vector(&mut self) -> Result<(u32, EventFd), String> {
        let gsi = self.next_gsi;
        if gsi >= GSI_LIMIT {
            return Err(format!("KVM's {GSI_LIMIT} interrupt routes are all taken; assign fewer devices"));
        }
        let irqfd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| e.to_string())?;
        self.vm.register_irqfd(&irqfd, gsi).map_err(|e| format!("KVM refused an irqfd for GSI {gsi} ({e})"))?;
        self.next_gsi += 1;
        Ok((gsi, irqfd))
    }

    fn intx(&mut self) -> Result<(u8, EventFd, EventFd), String> {
        let line = self.next_line;
        if line < self.lowest_line {
            return Err("no IOAPIC line is left for INTx".into());
        }
        let irqfd = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| e.to_string())?;
        let resample = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(|e| e.to_string())?;
        self.vm
            .register_irqfd_with_resample(&irqfd, &resample, u32::from(line))
            .map_err(|e| format!("KVM refused a resampled irqfd on line {line} ({e})"))?;
        self.next_line -= 1;
        Ok((line, irqfd, resample))
    }
}

/// Where interrupts and memory slots for assigned devices begin.
pub struct Bases {
    pub first_gsi: u32,
    pub first_slot: u32,
    /// The lowest IOAPIC line no other device uses.
    pub lowest_line: u8,
}

/// Attaches every assigned device of `config` to `root` and `mmio`.
pub fn attach(
    vm: &VmFd,
    mem: &GuestMemory,
    config: &VmConfig,
    mmio: &mut Bus,
    root: &mut PciRoot,
    router: Arc<dyn MsiRouter>,
    bases: Bases,
) -> Result<AttachedPassthrough, Error> {
    let mut attached = AttachedPassthrough::default();
    let mut resources = VmResources {
        vm,
        next_mmio: PASSTHROUGH_MMIO_START,
        next_gsi: bases.first_gsi,
        next_line: IOAPIC_PINS - 1,
        lowest_line: bases.lowest_line,
    };
    let plan = vfio::dma_plan(mem);
    let mut slot = bases.first_slot;
    for (i, device) in config.passthrough.iter().enumerate() {
        let id = device.api_id(i);
        let name = format!("device {id}");
        let backend: Box<dyn Backend> = match &device.backend {
            PassthroughBackend::Vfio(path) => Box::new(
                vfio::kernel::KernelDevice::open(path, vm).map_err(|e| Error::Passthrough(format!("{name}: {e}")))?,
            ),
            PassthroughBackend::VfioUser(path) => {
                Box::new(vfio::user::UserDevice::connect(path).map_err(|e| Error::Passthrough(format!("{name}: {e}")))?)
            }
        };
        let function =
            Function::new(&name, backend, &mut resources, router.clone(), &plan).map_err(Error::Passthrough)?;
        let (bars, areas) = (function.bars(), function.mappable());
        let function = Arc::new(Mutex::new(function));
        for (bar, placed) in bars.iter().enumerate() {
            if let Some(placed) = placed {
                let window = Arc::new(Mutex::new(BarWindow { function: function.clone(), bar }));
                mmio.insert(placed.addr, placed.size, window)
                    .map_err(|e| Error::Passthrough(format!("{name}: BAR {bar}: {e}")))?;
            }
        }
        for area in areas {
            attached.mappings.push(map_area(vm, slot, &area).map_err(|e| {
                Error::Passthrough(format!("{name}: the BAR area at {:#x} cannot be mapped ({e})", area.gpa))
            })?);
            slot += 1;
        }
        let pci_slot = root
            .add(Arc::new(Mutex::new(ConfigSpace(function.clone()))))
            .ok_or_else(|| Error::Passthrough(format!("{name}: the PCI bus is full")))?;
        tracing::info!("{name} at PCI 00:{pci_slot:02x}.0");
        attached.functions.push((id, function));
    }
    Ok(attached)
}

/// Maps a BAR area of the device into the VMM and hands it to KVM as a memory slot, so the
/// guest reaches it without exits.
fn map_area(vm: &VmFd, slot: u32, area: &vfio::MappableArea) -> std::io::Result<BarMapping> {
    use std::os::fd::AsRawFd;
    let len = area.len as usize;
    // SAFETY: a new shared mapping of the device's region file; the kernel checks the range.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            area.fd.as_raw_fd(),
            area.file_offset as libc::off_t,
        )
    };
    if host == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let mapping = BarMapping { host: host as usize, len };
    let region = kvm_bindings::kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: area.gpa,
        memory_size: area.len,
        userspace_addr: host as u64,
    };
    // SAFETY: the host range is the mapping above, which AttachedPassthrough keeps until the
    // VM is gone.
    unsafe { vm.set_user_memory_region(region) }.map_err(std::io::Error::from)?;
    Ok(mapping)
}
