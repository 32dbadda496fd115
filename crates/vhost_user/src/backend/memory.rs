//! Guest memory as a back-end sees it: the regions of the front-end's memory table, mapped a
//! second time with a dirty bitmap, the memory type the built-in devices work on.

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use virtio::GuestMemory;

/// The front-end's memory table (as vhost-user-backend mapped it) in the devices' terms.
pub fn remap(table: &vm_memory::GuestMemoryMmap<()>) -> std::io::Result<GuestMemory> {
    let mut regions = Vec::new();
    for region in table.iter() {
        let file =
            region.file_offset().ok_or_else(|| std::io::Error::other("a memory table region has no file"))?.clone();
        let len = usize::try_from(region.len()).map_err(std::io::Error::other)?;
        let mapped = MmapRegionBuilder::new_with_bitmap(len, AtomicBitmap::with_len(len))
            .with_file_offset(file)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let guest = GuestRegionMmap::new(mapped, region.start_addr())
            .ok_or_else(|| std::io::Error::other("a memory table region wraps the address space"))?;
        regions.push(guest);
    }
    GuestMemory::from_regions(regions).map_err(|e| std::io::Error::other(e.to_string()))
}
