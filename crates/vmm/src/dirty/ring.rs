//! KVM's dirty rings (KVM_CAP_DIRTY_LOG_RING): each vCPU pushes the pages it writes into a ring
//! shared with the VMM, which empties the rings into a bitmap per slot and has KVM protect the
//! emptied pages again (KVM_RESET_DIRTY_RINGS). Reading costs what was written, not the size of
//! memory; a full ring stops its vCPU until the rings are emptied (`collect`).

use std::collections::HashMap;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, MutexGuard};

use kvm_bindings::{KVM_CAP_DIRTY_LOG_RING, KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_DIRTY_LOG_PAGE_OFFSET, kvm_dirty_gfn};
use kvm_ioctls::{VcpuFd, VmFd};

const PAGE: usize = 4096;
/// The entry's page is dirty, and waits to be read.
const GFN_DIRTY: u32 = 1;
/// The entry was read, and waits for KVM_RESET_DIRTY_RINGS.
const GFN_RESET: u32 = 2;
/// A slot's bitmap never grows past this many pages (16 TiB): KVM names only its own slots'
/// pages, and this keeps a wrong entry from costing more than a bounded allocation.
const MAX_SLOT_PAGES: u64 = 1 << 32;

vmm_sys_util::ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, kvm_bindings::KVMIO, 0xc7);

pub(super) struct Rings {
    entries: u32,
    /// Held from emptying the rings to KVM's reset: a page whose bit a reader takes is always
    /// protected again before the reader copies it.
    state: Mutex<State>,
}

struct State {
    vcpus: Vec<VcpuRing>,
    /// A ring was found full: KVM may have written over entries not yet read (KVM that
    /// emulates guest code can outrun its own stop), and from then on the rings and this reader
    /// disagree on where the next entry is.
    overran: bool,
    /// Per slot (KVM's slot field: address space << 16 | slot), one bit per page.
    dirty: HashMap<u32, Vec<u64>>,
}

/// One vCPU's ring, mapped from its fd, and where the next unread entry is.
struct VcpuRing {
    gfns: NonNull<kvm_dirty_gfn>,
    bytes: usize,
    next: u32,
}

// SAFETY: the mapping is the process's, valid until drop, and used only under `Rings::state`.
unsafe impl Send for VcpuRing {}

impl VcpuRing {
    /// Entry `at` (masked into the ring of `entries`) and its flags, which KVM updates
    /// concurrently and which are only ever accessed atomically here.
    fn entry(&self, at: u32, entries: u32) -> (*mut kvm_dirty_gfn, &AtomicU32) {
        // SAFETY: the index is masked into the ring, which holds `entries` entries.
        let gfn = unsafe { self.gfns.as_ptr().add((at & (entries - 1)) as usize) };
        // SAFETY: `flags` is an aligned u32 in the live mapping, which outlives `self`.
        (gfn, unsafe { AtomicU32::from_ptr(&raw mut (*gfn).flags) })
    }
}

impl Drop for VcpuRing {
    fn drop(&mut self) {
        // SAFETY: the mapping was made with this address and length and is not used after this.
        unsafe { libc::munmap(self.gfns.as_ptr().cast(), self.bytes) };
    }
}

impl Rings {
    /// Turns the rings on for `vm`, which must have no vCPU yet: `entries` (a power of two)
    /// pages a vCPU, fewer if KVM allows fewer. None where KVM offers no ring or refuses it.
    pub(super) fn enable(vm: &VmFd, entries: u32) -> Option<Rings> {
        let entry = std::mem::size_of::<kvm_dirty_gfn>() as u32;
        // x86 takes either; the acquire-release one is the one every architecture has.
        let (cap, max_bytes) = [KVM_CAP_DIRTY_LOG_RING_ACQ_REL, KVM_CAP_DIRTY_LOG_RING]
            .into_iter()
            .map(|cap| (cap, vm.check_extension_raw(u64::from(cap))))
            .find(|(_, bytes)| *bytes > 0)?;
        // A configuration from a snapshot or a migration stream may ask for anything.
        let wanted = entries.checked_next_power_of_two().and_then(|e| e.checked_mul(entry)).unwrap_or(u32::MAX);
        let bytes = wanted.min(max_bytes as u32).max(PAGE as u32);
        let enable = kvm_bindings::kvm_enable_cap { cap, args: [u64::from(bytes), 0, 0, 0], ..Default::default() };
        if let Err(e) = vm.enable_cap(&enable) {
            tracing::warn!("KVM offers dirty rings but refused one of {bytes} bytes ({e}); the dirty bitmap is used");
            return None;
        }
        Some(Rings {
            entries: bytes / entry,
            state: Mutex::new(State { vcpus: Vec::new(), overran: false, dirty: HashMap::new() }),
        })
    }

    /// Maps `vcpu`'s ring.
    pub(super) fn attach(&self, vcpu: &VcpuFd) -> Result<(), String> {
        use std::os::fd::AsRawFd;
        let bytes = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: maps KVM's ring of this vCPU at its documented offset; the result is checked.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu.as_raw_fd(),
                KVM_DIRTY_LOG_PAGE_OFFSET as libc::off_t * PAGE as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(format!("KVM's dirty ring of a vCPU cannot be mapped ({})", std::io::Error::last_os_error()));
        }
        let gfns = NonNull::new(addr.cast()).ok_or("KVM mapped a dirty ring at address 0")?;
        self.lock().vcpus.push(VcpuRing { gfns, bytes, next: 0 });
        Ok(())
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn collect(&self, vm: &VmFd) -> Result<usize, String> {
        self.lock().collect(vm, self.entries)
    }

    /// How many entries wait in the rings.
    #[cfg(test)]
    pub(super) fn unread(&self) -> usize {
        let state = self.lock();
        let mut unread = 0;
        for ring in &state.vcpus {
            for at in 0..self.entries {
                let (_, flags) = ring.entry(at, self.entries);
                unread += usize::from(flags.load(Ordering::Acquire) & GFN_DIRTY != 0);
            }
        }
        unread
    }

    /// Whether KVM ever filled a ring, so that the log may miss pages.
    pub(super) fn overran(&self) -> bool {
        self.lock().overran
    }

    /// Empties the rings, then returns and clears slot `slot`'s bits (`pages` of them).
    pub(super) fn take(&self, vm: &VmFd, slot: u32, pages: usize) -> Result<Vec<u64>, String> {
        let mut state = self.lock();
        state.collect(vm, self.entries)?;
        let mut bits = state.dirty.remove(&slot).unwrap_or_default();
        bits.resize(pages.div_ceil(64), 0);
        Ok(bits)
    }
}

impl State {
    /// Moves every dirty entry of every ring into the bitmaps, then has KVM protect those pages
    /// again and free their entries; returns how many there were.
    fn collect(&mut self, vm: &VmFd, entries: u32) -> Result<usize, String> {
        let mut read = 0;
        for ring in &mut self.vcpus {
            let first = ring.next;
            loop {
                let (gfn, flags) = ring.entry(ring.next, entries);
                if flags.load(Ordering::Acquire) & GFN_DIRTY == 0 {
                    break;
                }
                // SAFETY: KVM wrote the entry before it set GFN_DIRTY (acquired above) and does
                // not touch it again until it is reset.
                let (slot, page) = unsafe { ((*gfn).slot, (*gfn).offset) };
                if page < MAX_SLOT_PAGES {
                    let bits = self.dirty.entry(slot).or_default();
                    let word = (page / 64) as usize;
                    if bits.len() <= word {
                        bits.resize(word + 1, 0);
                    }
                    bits[word] |= 1 << (page % 64);
                }
                flags.store(GFN_RESET, Ordering::Release);
                ring.next = ring.next.wrapping_add(1);
                read += 1;
            }
            if ring.next.wrapping_sub(first) >= entries && !self.overran {
                self.overran = true;
                tracing::error!(
                    "KVM filled a vCPU's dirty ring of {entries} pages before it was read: pages may be missing from \
                     its log from now on"
                );
            }
        }
        if read > 0 {
            // SAFETY: KVM_RESET_DIRTY_RINGS takes no argument and only touches the rings.
            let rc = unsafe { vmm_sys_util::ioctl::ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
            if rc < 0 {
                return Err(format!("KVM refused to reset its dirty rings: {}", std::io::Error::last_os_error()));
            }
        }
        Ok(read)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ring_found_full_marks_the_log_as_overrun() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm opens");
        let vm = kvm.create_vm().unwrap();
        let Some(rings) = Rings::enable(&vm, 256) else {
            eprintln!("skipped: this host's KVM offers no dirty ring");
            return;
        };
        let bytes = rings.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // A ring as KVM leaves it when it wrote every entry (an anonymous mapping stands in).
        // SAFETY: a new private anonymous mapping, owned by the VcpuRing from here on.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        let gfns = NonNull::new(addr.cast::<kvm_dirty_gfn>()).unwrap();
        let fill = |count: u32| {
            for at in 0..count {
                // SAFETY: `at` is within the mapping's entries.
                unsafe { *gfns.as_ptr().add(at as usize) = kvm_dirty_gfn { flags: GFN_DIRTY, slot: 0, offset: 7 } };
            }
        };
        rings.lock().vcpus.push(VcpuRing { gfns, bytes, next: 0 });
        fill(rings.entries - 1);
        assert_eq!(rings.collect(&vm), Ok(rings.entries as usize - 1));
        assert!(!rings.overran(), "a ring one short of full is read whole");
        fill(rings.entries);
        assert_eq!(rings.collect(&vm), Ok(rings.entries as usize));
        assert!(rings.overran());
    }
}
