//! Split virtqueues (virtio 1.x section 2.7), driver side.

use core::sync::atomic::{Ordering, fence};

use super::alloc;

pub const DESC_F_NEXT: u16 = 1;
pub const DESC_F_WRITE: u16 = 2;

/// One buffer of a chain: where, how long, and whether the device writes it.
#[derive(Clone, Copy)]
pub struct Buffer {
    pub addr: u64,
    pub len: u32,
    pub device_writes: bool,
}

impl Buffer {
    pub fn readable(addr: u64, len: u32) -> Self {
        Buffer { addr, len, device_writes: false }
    }
    pub fn writable(addr: u64, len: u32) -> Self {
        Buffer { addr, len, device_writes: true }
    }
}

pub struct Virtqueue {
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    free: [u16; MAX_SIZE],
    free_count: usize,
    chain_len: [u16; MAX_SIZE],
    avail_idx: u16,
    last_used: u16,
    /// VIRTIO_F_RING_EVENT_IDX was negotiated: kicks follow the device's avail_event.
    pub event_idx: bool,
}

/// Whether an index moving from `old` to `new` passed `event` (virtio 1.2, 2.7.10: the
/// driver's and the device's `vring_need_event`).
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The largest queue the probe sets up.
pub const MAX_SIZE: usize = 256;

fn write16(addr: u64, v: u16) {
    // SAFETY: `addr` lies in this queue's rings, allocated from the arena.
    unsafe { core::ptr::write_volatile(addr as *mut u16, v) }
}
fn read16(addr: u64) -> u16 {
    // SAFETY: as for write16.
    unsafe { core::ptr::read_volatile(addr as *const u16) }
}
fn read32(addr: u64) -> u32 {
    // SAFETY: as for write16.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

/// Writes descriptor `i` of the table at `table`.
pub fn write_desc(table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
    let at = table + u64::from(i) * 16;
    // SAFETY: descriptor `i` lies in the table the caller allocated.
    unsafe {
        core::ptr::write_volatile(at as *mut u64, addr);
        core::ptr::write_volatile((at + 8) as *mut u32, len);
        core::ptr::write_volatile((at + 12) as *mut u16, flags);
        core::ptr::write_volatile((at + 14) as *mut u16, next);
    }
}

impl Virtqueue {
    /// Allocates the rings for a queue of `size` (a power of two up to MAX_SIZE).
    pub fn new(size: u16) -> Option<Virtqueue> {
        if size == 0 || !size.is_power_of_two() || usize::from(size) > MAX_SIZE {
            return None;
        }
        let n = u64::from(size);
        let desc = alloc(16 * n as usize, 4096)?;
        let avail = alloc(6 + 2 * n as usize, 2)?;
        let used = alloc(6 + 8 * n as usize, 4096)?;
        let mut free = [0u16; MAX_SIZE];
        for (i, slot) in free.iter_mut().enumerate().take(usize::from(size)) {
            *slot = i as u16;
        }
        Some(Virtqueue {
            size,
            desc,
            avail,
            used,
            free,
            free_count: usize::from(size),
            chain_len: [0; MAX_SIZE],
            avail_idx: 0,
            last_used: 0,
            event_idx: false,
        })
    }

    /// Puts a chain on the available ring; returns its head, or None when descriptors run out.
    pub fn push(&mut self, chain: &[Buffer]) -> Option<u16> {
        if chain.is_empty() || chain.len() > self.free_count {
            return None;
        }
        let ids: &[u16] = &self.free[self.free_count - chain.len()..self.free_count];
        let mut ids_copy = [0u16; MAX_SIZE];
        ids_copy[..chain.len()].copy_from_slice(ids);
        self.free_count -= chain.len();
        for (k, buf) in chain.iter().enumerate() {
            let last = k + 1 == chain.len();
            let flags = if buf.device_writes { DESC_F_WRITE } else { 0 } | if last { 0 } else { DESC_F_NEXT };
            let next = if last { 0 } else { ids_copy[k + 1] };
            write_desc(self.desc, ids_copy[k], buf.addr, buf.len, flags, next);
        }
        let head = ids_copy[0];
        self.chain_len[usize::from(head)] = chain.len() as u16;
        self.publish(head);
        Some(head)
    }

    /// Makes descriptor `head` available without touching the table: for hand-built chains.
    pub fn publish(&mut self, head: u16) {
        let slot = self.avail + 4 + u64::from(self.avail_idx % self.size) * 2;
        write16(slot, head);
        fence(Ordering::SeqCst);
        self.avail_idx = self.avail_idx.wrapping_add(1);
        write16(self.avail + 2, self.avail_idx);
        fence(Ordering::SeqCst);
    }

    /// The available index as the driver last published it: note it before a batch and pass
    /// it to `kick_needed` after.
    pub fn avail_index(&self) -> u16 {
        self.avail_idx
    }

    /// Whether the device asked to be told of what was published since `old`: with EVENT_IDX
    /// by its avail_event (the device moves it when it stops looking), else by the used ring's
    /// NO_NOTIFY flag. This is how Linux's drivers decide to kick.
    pub fn kick_needed(&self, old: u16) -> bool {
        fence(Ordering::SeqCst);
        if self.event_idx {
            let avail_event = read16(self.used + 4 + 8 * u64::from(self.size));
            need_event(avail_event, self.avail_idx, old)
        } else {
            read16(self.used) & 1 == 0
        }
    }

    /// Asks for no interrupts: the driver takes completions from the used ring (with EVENT_IDX
    /// a used_event of 0, as Linux writes it; else the NO_INTERRUPT flag).
    pub fn suppress_interrupts(&self) {
        if self.event_idx {
            write16(self.avail + 4 + 2 * u64::from(self.size), 0);
        } else {
            write16(self.avail, 1);
        }
        fence(Ordering::SeqCst);
    }

    /// The next completed chain: (head, bytes written by the device).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        fence(Ordering::SeqCst);
        if read16(self.used + 2) == self.last_used {
            return None;
        }
        let elem = self.used + 4 + u64::from(self.last_used % self.size) * 8;
        let (id, len) = (read32(elem), read32(elem + 4));
        self.last_used = self.last_used.wrapping_add(1);
        let head = (id as u16) % self.size;
        // Return the chain's descriptors, walking the table as the device left it.
        let count = self.chain_len[usize::from(head)].max(1);
        self.chain_len[usize::from(head)] = 0;
        let mut i = head;
        for _ in 0..count {
            if self.free_count < usize::from(self.size) {
                self.free[self.free_count] = i;
                self.free_count += 1;
            }
            let at = self.desc + u64::from(i) * 16;
            i = read16(at + 14) % self.size;
        }
        Some((head, len))
    }
}
