//! What the fuzz targets share: guest memory and a virtqueue laid out from the fuzzer's bytes.

use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

pub type GuestMemory = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Guest RAM for the fuzz targets: 64 KiB, with addresses past it to be refused.
pub const RAM: usize = 64 << 10;
const QUEUE_SIZE: u16 = 16;
const DESC_TABLE: u64 = 0;
const AVAIL_RING: u64 = 0x100;
const USED_RING: u64 = 0x200;

/// Guest memory holding `data` from address 0, and a ready queue whose descriptor table and
/// available ring are the first bytes of it: the fuzzer writes the driver's side.
pub fn guest_with_queue(data: &[u8]) -> (GuestMemory, Queue) {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), RAM)]).expect("64 KiB of guest RAM");
    let n = data.len().min(RAM);
    mem.write_slice(&data[..n], GuestAddress(0)).expect("within RAM");
    let mut queue = Queue::new(QUEUE_SIZE).expect("a valid queue size");
    queue.set_size(QUEUE_SIZE);
    queue.set_desc_table_address(Some(DESC_TABLE as u32), Some(0));
    queue.set_avail_ring_address(Some(AVAIL_RING as u32), Some(0));
    queue.set_used_ring_address(Some(USED_RING as u32), Some(0));
    queue.set_ready(true);
    (mem, queue)
}
