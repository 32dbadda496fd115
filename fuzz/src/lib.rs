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
/// Room for one queue's table and rings, at 16 entries.
const QUEUE_STRIDE: u64 = 0x400;

/// Guest memory holding `data` from address 0, and a ready queue whose descriptor table and
/// available ring are the first bytes of it: the fuzzer writes the driver's side.
pub fn guest_with_queue(data: &[u8]) -> (GuestMemory, Queue) {
    let (mem, mut queues) = guest_with_queues(data, 1);
    (mem, queues.remove(0))
}

/// As guest_with_queue, with `count` ready queues: queue i has its rings 1 KiB further on.
pub fn guest_with_queues(data: &[u8], count: usize) -> (GuestMemory, Vec<Queue>) {
    let mem = GuestMemory::from_ranges(&[(GuestAddress(0), RAM)]).expect("64 KiB of guest RAM");
    let n = data.len().min(RAM);
    mem.write_slice(&data[..n], GuestAddress(0)).expect("within RAM");
    let queues = (0..count as u64)
        .map(|i| {
            let mut queue = Queue::new(QUEUE_SIZE).expect("a valid queue size");
            queue.set_size(QUEUE_SIZE);
            queue.set_desc_table_address(Some((QUEUE_STRIDE * i + DESC_TABLE) as u32), Some(0));
            queue.set_avail_ring_address(Some((QUEUE_STRIDE * i + AVAIL_RING) as u32), Some(0));
            queue.set_used_ring_address(Some((QUEUE_STRIDE * i + USED_RING) as u32), Some(0));
            queue.set_ready(true);
            queue
        })
        .collect();
    (mem, queues)
}

/// The fuzzer's bytes for a device with several queues: the first `control` bytes steer the
/// run (which queue is notified when, input from the host side), the rest is guest RAM.
pub fn split_control(data: &[u8], control: usize) -> (&[u8], &[u8]) {
    data.split_at(control.min(data.len()))
}

/// A device with two queues that accepts every activation: the transports' register logic is
/// what the fuzzer drives.
pub struct FakeDevice;

impl virtio::device::VirtioDevice for FakeDevice {
    fn device_type(&self) -> u32 {
        virtio::TYPE_BLOCK
    }
    fn features(&self) -> u64 {
        virtio::F_VERSION_1 | 0b101
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        virtio::device::read_config_bytes(&[1, 2, 3, 4, 5, 6, 7, 8], offset, data);
    }
    fn activate(&mut self, _activation: virtio::device::Activation) -> Result<(), virtio::device::ActivateError> {
        Ok(())
    }
    fn reset(&mut self) {}
}

/// Register accesses from the fuzzer's bytes: each six bytes are an offset (u16), a size
/// selector and direction, and a value (u24, widened).
pub fn accesses(data: &[u8]) -> impl Iterator<Item = (u64, usize, bool, u32)> + '_ {
    data.chunks_exact(6).map(|op| {
        let offset = u64::from(u16::from_le_bytes([op[0], op[1]]));
        let size = [1, 2, 4, 4][usize::from(op[2] & 3)];
        let write = op[2] & 0x80 != 0;
        let value = u32::from_le_bytes([op[3], op[4], op[5], op[3] ^ op[5]]);
        (offset, size, write, value)
    })
}
