//! Device assignment: a PCI function of the guest's PCI root whose configuration space, BARs,
//! interrupts and DMA belong to a device outside the VMM. Two back-ends speak the same VFIO
//! model: kernel VFIO (a host device bound to vfio-pci, behind an IOMMU) and vfio-user (a
//! device served by another process over a Unix socket).

pub mod function;
pub mod host;
pub mod kernel;
pub mod test_device;
pub mod user;

use std::os::fd::OwnedFd;
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

pub use function::{Function, MappableArea, Resources};

/// VFIO's region indices for a PCI device: BARs 0-5, the ROM, then configuration space.
pub const CONFIG_REGION: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_CONFIG_REGION_INDEX;
pub const ROM_REGION: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_ROM_REGION_INDEX;
/// VFIO's interrupt indices for a PCI device.
pub const INTX_IRQ: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_INTX_IRQ_INDEX;
pub const MSI_IRQ: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_MSI_IRQ_INDEX;
pub const MSIX_IRQ: u32 = vfio_bindings::bindings::vfio::VFIO_PCI_MSIX_IRQ_INDEX;

/// A device region (a BAR, the ROM, configuration space) as the back-end describes it.
#[derive(Clone, Debug, Default)]
pub struct Region {
    pub index: u32,
    pub size: u64,
    pub readable: bool,
    pub writable: bool,
    /// Where the VMM may map the region instead of forwarding each access.
    pub mmap: Option<RegionMmap>,
}

/// The mappable part of a region: a file, the region's offset in it, and the areas (offset in
/// the region, length) that may be mapped; the whole region when the device names none.
#[derive(Clone, Debug)]
pub struct RegionMmap {
    pub fd: Arc<OwnedFd>,
    pub file_offset: u64,
    pub areas: Vec<(u64, u64)>,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("the device's server broke the vfio-user protocol ({0})")]
    Protocol(String),
    #[error("the device refused {what} (errno {errno})")]
    Refused { what: &'static str, errno: u32 },
    #[error("the device is gone (its server stopped answering earlier)")]
    Gone,
    #[error("{0}")]
    Unsupported(String),
}

/// What a device told of itself: its regions by index, and how many interrupts it has at each
/// VFIO interrupt index.
#[derive(Clone, Debug, Default)]
pub struct DeviceInfo {
    pub regions: Vec<Region>,
    pub irq_counts: Vec<u32>,
}

/// One way of reaching an assigned device. Calls may block on the device (a vfio-user server
/// answers over a socket, with a deadline); a back-end whose device is gone fails every call.
pub trait Backend: Send {
    /// A name for logs: the socket or the sysfs path.
    fn describe(&self) -> String;
    fn info(&self) -> &DeviceInfo;
    fn region(&self, index: u32) -> Option<&Region> {
        self.info().regions.get(index as usize)
    }
    /// How many interrupts of VFIO index `index` (INTx, MSI, MSI-X) the device has.
    fn irq_count(&self, index: u32) -> u32 {
        self.info().irq_counts.get(index as usize).copied().unwrap_or(0)
    }
    fn resettable(&self) -> bool;
    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), Error>;
    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Error>;
    /// Has the device signal `fds[i]` for interrupt `i` of `index`; no fds turns `index` off.
    fn set_irqs(&mut self, index: u32, fds: &[&EventFd]) -> Result<(), Error>;
    /// The eventfd through which the VMM unmasks a level-triggered INTx after the guest's EOI.
    fn set_intx_unmask(&mut self, fd: &EventFd) -> Result<(), Error>;
    fn reset(&mut self) -> Result<(), Error>;
    /// Lets the device reach guest memory `[iova, iova + size)`.
    fn dma_map(&mut self, map: &DmaMapping) -> Result<(), Error>;
    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), Error>;
}

/// Guest memory the device may reach by DMA: at `iova` (the guest physical address), backed by
/// `host_addr` in the VMM, and by `file` at an offset where another process needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMapping {
    pub iova: u64,
    pub size: u64,
    pub host_addr: u64,
    pub file: Option<(std::os::fd::RawFd, u64)>,
}

/// What to map for DMA: every guest memory region, RAM and hotpluggable memory alike, so that
/// memory the guest gets later (a deflated balloon, plugged blocks) is reachable without a new
/// map. A region without a file can only be mapped for kernel VFIO.
pub fn dma_plan<M: vm_memory::GuestMemoryBackend>(mem: &M) -> Vec<DmaMapping> {
    use vm_memory::GuestMemoryRegion;
    mem.iter()
        .filter_map(|region| {
            let host_addr = region.get_host_address(vm_memory::MemoryRegionAddress(0)).ok()? as u64;
            let file = region.file_offset().map(|f| (std::os::fd::AsRawFd::as_raw_fd(f.file()), f.start()));
            Some(DmaMapping { iova: region.start_addr().0, size: region.len(), host_addr, file })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

    #[test]
    fn dma_covers_every_region_with_its_file_and_offset() {
        // RAM below the MMIO hole, RAM above it, and hotpluggable memory: one memfd, as the
        // VMM lays out shared guest memory.
        let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        file.set_len(0x7000).unwrap();
        let ranges = [(0u64, 0x2000u64, 0u64), (0x1_0000_0000, 0x1000, 0x2000), (0x2_0000_0000, 0x4000, 0x3000)];
        let mem: GuestMemoryMmap = GuestMemoryMmap::from_ranges_with_files(ranges.iter().map(|&(gpa, len, off)| {
            (GuestAddress(gpa), len as usize, Some(FileOffset::new(file.try_clone().unwrap(), off)))
        }))
        .unwrap();
        let plan = dma_plan(&mem);
        let got: Vec<(u64, u64, u64)> = plan.iter().map(|m| (m.iova, m.size, m.file.unwrap().1)).collect();
        assert_eq!(got, ranges);
        assert!(plan.iter().all(|m| m.host_addr != 0));
        let anonymous: GuestMemoryMmap = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        assert_eq!(dma_plan(&anonymous)[0].file, None, "only kernel VFIO can map memory without a file");
    }
}
