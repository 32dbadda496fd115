//! A polled virtio driver core: the modern virtio-mmio transport (version 2) and split
//! virtqueues, for ring 3. No interrupts: the probe polls used rings with a TSC deadline.

pub mod mmio;
pub mod queue;
pub mod transport;

use core::sync::atomic::{AtomicUsize, Ordering};

/// Memory for rings and buffers. Guest-physical equals virtual in the probe's identity map.
#[repr(C, align(4096))]
struct Arena([u8; ARENA_SIZE]);
const ARENA_SIZE: usize = 8 << 20;
static mut ARENA: Arena = Arena([0; ARENA_SIZE]);
static ARENA_USED: AtomicUsize = AtomicUsize::new(0);

/// Zeroed memory from the arena, never freed: each test takes what it needs once.
pub fn alloc(size: usize, align: usize) -> Option<u64> {
    let base = (&raw mut ARENA) as usize;
    let mut used = ARENA_USED.load(Ordering::Relaxed);
    loop {
        let start = (base + used).next_multiple_of(align) - base;
        let end = start.checked_add(size).filter(|&e| e <= ARENA_SIZE)?;
        match ARENA_USED.compare_exchange(used, end, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => {
                let addr = (base + start) as u64;
                // SAFETY: [addr, addr + size) lies in the arena and no one else was given it.
                unsafe { core::ptr::write_bytes(addr as *mut u8, 0, size) };
                return Some(addr);
            }
            Err(now) => used = now,
        }
    }
}

/// Returns the whole arena; only between tests, when no device uses it.
pub fn reset_arena() {
    ARENA_USED.store(0, Ordering::Relaxed);
}

/// A byte slice over arena memory.
pub fn bytes<'a>(addr: u64, len: usize) -> &'a mut [u8] {
    // SAFETY: callers pass memory `alloc` handed out; devices write it only while a request is
    // in flight, and the probe reads it after the request completed.
    unsafe { core::slice::from_raw_parts_mut(addr as *mut u8, len) }
}
