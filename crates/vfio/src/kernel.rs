//! The kernel VFIO back-end: a host PCI device (or SR-IOV virtual function) bound to
//! vfio-pci, reached through rust-vmm's vfio-ioctls (container, group, device), with guest
//! memory mapped into the IOMMU and KVM told of the group through the KVM-VFIO device.
//! This host has no IOMMU, so this path has not run here; what it plans is unit-tested.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use kvm_ioctls::VmFd;
use vfio_ioctls::{VfioContainer, VfioDevice, VfioDeviceFd, VfioRegionInfoCap};
use vmm_sys_util::eventfd::EventFd;

use crate::host::{HostPaths, check_assignable};
use crate::{Backend, DmaMapping, Error, INTX_IRQ, Region, RegionMmap};

/// Region indices a PCI device has under vfio-pci: six BARs, the ROM, configuration space.
const PCI_REGIONS: u32 = 8;

pub struct KernelDevice {
    path: PathBuf,
    container: Arc<VfioContainer>,
    device: VfioDevice,
    info: crate::DeviceInfo,
}

impl KernelDevice {
    /// Opens `sysfs` (a `/sys/bus/pci/devices/...` directory) for the VM `vm`.
    pub fn open(sysfs: &Path, vm: &VmFd) -> Result<KernelDevice, String> {
        check_assignable(sysfs, &HostPaths::default())?;
        let fail = |what: &str, e: &dyn std::fmt::Display| format!("vfio={}: {what} ({e})", sysfs.display());
        let mut kvm_vfio =
            kvm_bindings::kvm_create_device { type_: kvm_bindings::kvm_device_type_KVM_DEV_TYPE_VFIO, fd: 0, flags: 0 };
        let kvm_vfio = vm.create_device(&mut kvm_vfio).map_err(|e| fail("KVM has no VFIO device", &e))?;
        let handle = Arc::new(VfioDeviceFd::new_from_kvm(kvm_vfio));
        let container = Arc::new(VfioContainer::new(Some(handle)).map_err(|e| fail("the VFIO container", &e))?);
        let device = VfioDevice::new(sysfs, container.clone(), false).map_err(|e| fail("the VFIO device", &e))?;
        let mut regions = Vec::new();
        for index in 0..PCI_REGIONS {
            regions.push(region_of(&device, index).map_err(|e| fail("its regions", &e))?);
        }
        let irq_counts = (0..5).map(|i| device.get_irq_info(i).map_or(0, |irq| irq.count)).collect();
        let info = crate::DeviceInfo { regions, irq_counts };
        Ok(KernelDevice { path: sysfs.to_path_buf(), container, device, info })
    }
}

fn region_of(device: &VfioDevice, index: u32) -> std::io::Result<Region> {
    use vfio_bindings::bindings::vfio::{
        VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE,
    };
    let (flags, size) = (device.get_region_flags(index), device.get_region_size(index));
    let sparse: Vec<(u64, u64)> = device
        .get_region_caps(index)
        .iter()
        .filter_map(|cap| match cap {
            VfioRegionInfoCap::SparseMmap(s) => Some(s.areas.iter().map(|a| (a.offset, a.size)).collect::<Vec<_>>()),
            _ => None,
        })
        .flatten()
        .collect();
    let mmap = if flags & VFIO_REGION_INFO_FLAG_MMAP != 0 && size > 0 {
        let fd: OwnedFd = rustix_dup(device.as_raw_fd())?;
        Some(RegionMmap {
            fd: Arc::new(fd),
            file_offset: device.get_region_offset(index),
            areas: if sparse.is_empty() { vec![(0, size)] } else { sparse },
        })
    } else {
        None
    };
    Ok(Region {
        index,
        size,
        readable: flags & VFIO_REGION_INFO_FLAG_READ != 0,
        writable: flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
        mmap,
    })
}

/// A close-on-exec duplicate of `fd`.
fn rustix_dup(fd: i32) -> std::io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on a live fd returns a new fd or -1.
    let new = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if new < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `new` is a fresh fd owned from here on.
    Ok(unsafe { std::os::fd::FromRawFd::from_raw_fd(new) })
}

impl Backend for KernelDevice {
    fn describe(&self) -> String {
        format!("host device {}", self.path.display())
    }

    fn info(&self) -> &crate::DeviceInfo {
        &self.info
    }

    fn resettable(&self) -> bool {
        true
    }

    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        self.device.region_read(region, data, offset);
        Ok(())
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        self.device.region_write(region, data, offset);
        Ok(())
    }

    fn set_irqs(&mut self, index: u32, fds: &[&EventFd]) -> Result<(), Error> {
        let result =
            if fds.is_empty() { self.device.disable_irq(index) } else { self.device.enable_irq(index, fds.to_vec()) };
        result.map_err(|e| Error::Unsupported(format!("VFIO interrupt set-up failed ({e})")))
    }

    fn set_intx_unmask(&mut self, fd: &EventFd) -> Result<(), Error> {
        self.device
            .set_irq_resample_fd(INTX_IRQ, vec![fd])
            .map_err(|e| Error::Unsupported(format!("VFIO INTx unmask set-up failed ({e})")))
    }

    fn reset(&mut self) -> Result<(), Error> {
        self.device.reset();
        Ok(())
    }

    fn dma_map(&mut self, map: &DmaMapping) -> Result<(), Error> {
        // SAFETY: `host_addr` is guest memory, mapped for the life of the VM and only ever
        // accessed through volatile copies and system calls, as the IOMMU map requires.
        unsafe { self.container.vfio_dma_map(map.iova, map.size as usize, map.host_addr as *mut u8) }
            .map_err(|e| Error::Unsupported(format!("VFIO_IOMMU_MAP_DMA failed ({e})")))
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), Error> {
        self.container
            .vfio_dma_unmap(iova, size as usize)
            .map_err(|e| Error::Unsupported(format!("VFIO_IOMMU_UNMAP_DMA failed ({e})")))
    }
}
