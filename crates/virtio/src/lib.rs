//! virtio devices for Ferrovisor: the MMIO transport, the device interface it drives, the
//! worker thread each active device runs on, and the devices themselves.
//!
//! Data flows one way: a guest notification (ioeventfd) wakes the device's worker, which pops
//! descriptor chains from its split virtqueues (virtio-queue), parses them into requests,
//! serves them, returns them on the used ring and raises the interrupt (irqfd).

pub mod balloon;
pub mod blk;
pub mod console;
pub mod device;
pub mod mem;
pub mod metrics;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod pmem;
pub mod rate_limiter;
pub mod rng;
pub mod transport;
pub mod vsock;
pub mod worker;

/// Guest-triggered logging, rate-limited per call site.
pub use devices::{guest_event, guest_fault};

pub use device::{ActivateError, Interrupt, VirtioDevice, VirtioInterrupt};
pub use mmio::MmioTransport;

/// Guest RAM, as the rest of Ferrovisor sees it.
pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Marks [gpa, gpa + len) of guest memory dirty, for changes the VMM made without writing
/// (dropped pages), so that diff snapshots record them.
pub fn mark_dirty(mem: &GuestMemory, gpa: u64, len: u64) {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
    let Some(region) = mem.find_region(GuestAddress(gpa)) else { return };
    let offset = gpa - region.start_addr().0;
    let len = len.min(region.len() - offset);
    if let (Ok(offset), Ok(len)) = (usize::try_from(offset), usize::try_from(len)) {
        region.bitmap().mark_dirty(offset, len);
    }
}

/// Device IDs (virtio 1.2 section 5).
pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_CONSOLE: u32 = 3;
pub const TYPE_RNG: u32 = 4;
pub const TYPE_BALLOON: u32 = 5;
pub const TYPE_VSOCK: u32 = 19;
pub const TYPE_MEM: u32 = 24;
pub const TYPE_PMEM: u32 = 27;

/// Feature bits every device shares.
pub const F_VERSION_1: u64 = 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
pub const F_RING_INDIRECT_DESC: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_INDIRECT_DESC;
pub const F_RING_EVENT_IDX: u64 = 1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
