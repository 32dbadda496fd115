//! Hotpluggable memory (virtio-mem) as KVM and the devices see it.
//!
//! KVM gets one memory slot per plugged block and none for an unplugged one: the guest's loads
//! and stores to an unplugged block exit to the VMM (`virtio::mem::UnpluggedGuard`) and never
//! map host memory. One slot per block costs a slot change per block plugged, but no change
//! ever touches a block the guest is using, so no vCPU has to stop.
//!
//! In the VMM's own mapping an unplugged block is a view of one block-sized sink. A device
//! that the guest points at unplugged memory (a disk read into it) writes into the sink, which
//! holds at most one block of host memory however many blocks the guest names.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_userspace_memory_region};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use arch::GuestMemory;
use virtio::mem::{BlockMapper, MemRegion};

use crate::config::MemoryOptions;

/// KVM slots from here on are the region's blocks, block `b` in slot `FIRST_BLOCK_SLOT + b`
/// (at most `MemoryHotplugConfig::MAX_BLOCKS` of them); the slots below are RAM, pmem and
/// assigned devices' BARs.
pub const FIRST_BLOCK_SLOT: u32 = 256;

const PAGE: u64 = 4096;

/// Whether `gpa` lies in one of `ranges` (guest address, length), as unplugged memory is given.
pub fn in_ranges(ranges: &[(u64, u64)], gpa: u64) -> bool {
    ranges.iter().any(|&(at, len)| gpa >= at && gpa - at < len)
}

/// How a plugged block is backed again once the host has taken its pages.
enum Backing {
    /// The guest-memory memfd, at this offset of the region's start.
    Shared { file: File, offset: u64 },
    /// Fresh private anonymous memory (also for a VM restored from a memory file, whose
    /// unplugged blocks held nothing worth keeping).
    Private { hugetlb: bool },
}

pub struct PluggableMemory {
    vm: Arc<VmFd>,
    region: MemRegion,
    /// Where the region is mapped in this process; `_mem` keeps the mapping alive.
    host: u64,
    _mem: GuestMemory,
    backing: Backing,
    sink: File,
    options: MemoryOptions,
    dirty_log: AtomicBool,
    /// Which blocks have a KVM slot; held across every slot change.
    slotted: Mutex<Vec<bool>>,
}

impl PluggableMemory {
    /// The blocks of `region`, part of `mem`. Nothing changes until [`Self::sync`].
    pub fn new(
        vm: Arc<VmFd>,
        mem: &GuestMemory,
        region: MemRegion,
        options: MemoryOptions,
        dirty_log: bool,
    ) -> Result<PluggableMemory, String> {
        let mapped = mem
            .find_region(GuestAddress(region.addr))
            .filter(|r| r.start_addr().0 == region.addr && r.len() == region.size)
            .ok_or("the hotpluggable region is not one guest memory region")?;
        let host = mapped.as_ptr() as u64;
        let backing = match mapped.file_offset() {
            Some(f) if mapped.flags() & libc::MAP_SHARED != 0 => Backing::Shared {
                file: f.file().try_clone().map_err(|e| format!("the guest memory file cannot be shared ({e})"))?,
                offset: f.start(),
            },
            _ => Backing::Private { hugetlb: options.hugepages == crate::config::HugePages::On },
        };
        // SAFETY: memfd_create with a NUL-terminated name returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"ferrovisor-unplugged".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(format!("the sink for unplugged blocks cannot be made ({})", std::io::Error::last_os_error()));
        }
        // SAFETY: fd is new and owned by the File from here on.
        let sink = unsafe { File::from_raw_fd(fd) };
        sink.set_len(region.block_size).map_err(|e| format!("the sink for unplugged blocks cannot be sized ({e})"))?;
        let slotted = Mutex::new(vec![false; (region.size / region.block_size) as usize]);
        Ok(PluggableMemory {
            vm,
            region,
            host,
            _mem: mem.clone(),
            backing,
            sink,
            options,
            dirty_log: AtomicBool::new(dirty_log),
            slotted,
        })
    }

    /// Brings KVM and the mapping in line with `plugged` (one flag per block), for a new VM (all
    /// unplugged) or one restored from a snapshot: plugged blocks keep what they hold.
    pub fn sync(&self, plugged: &[bool]) -> Result<(), String> {
        for (block, &on) in plugged.iter().enumerate() {
            let block = block as u64;
            if on { self.set_slot(block, true)? } else { self.map_sink(block)? }
        }
        Ok(())
    }

    /// Turns KVM's dirty log on for every plugged block's slot, and for those plugged later.
    pub fn log_dirty_pages(&self) -> Result<(), String> {
        let slotted = self.lock_slots();
        self.dirty_log.store(true, Ordering::Relaxed);
        for (block, _) in slotted.iter().enumerate().filter(|(_, on)| **on) {
            self.register(block as u64, true)?;
        }
        Ok(())
    }

    fn lock_slots(&self) -> std::sync::MutexGuard<'_, Vec<bool>> {
        self.slotted.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// KVM's dirty log of the region (one bit per page, in u64 words), read and cleared from
    /// the plugged blocks' slots; unplugged blocks read as clean.
    pub fn dirty_log(&self, kvm_log: &crate::dirty::KvmDirtyLog) -> Result<Vec<u64>, String> {
        let words_per_block = (self.region.block_size / PAGE / 64) as usize;
        let slotted = self.lock_slots();
        let mut log = vec![0u64; slotted.len() * words_per_block];
        for (block, _) in slotted.iter().enumerate().filter(|(_, on)| **on) {
            let slot = FIRST_BLOCK_SLOT + block as u32;
            let words = kvm_log
                .take(slot, self.region.block_size as usize)
                .map_err(|e| format!("hotplugged block {block}: {e}"))?;
            let at = block * words_per_block;
            for (to, from) in log[at..at + words_per_block].iter_mut().zip(words) {
                *to |= from;
            }
        }
        Ok(log)
    }

    fn block_host(&self, block: u64) -> u64 {
        self.host + block * self.region.block_size
    }

    /// Gives block `block` a KVM slot over its host mapping, or takes the slot away.
    fn set_slot(&self, block: u64, on: bool) -> Result<(), String> {
        let mut slotted = self.lock_slots();
        self.register(block, on)?;
        if let Some(flag) = slotted.get_mut(block as usize) {
            *flag = on;
        }
        Ok(())
    }

    /// KVM_SET_USER_MEMORY_REGION for block `block`; the caller holds `slotted`.
    fn register(&self, block: u64, on: bool) -> Result<(), String> {
        let bs = self.region.block_size;
        let slot = kvm_userspace_memory_region {
            slot: FIRST_BLOCK_SLOT + block as u32,
            flags: if self.dirty_log.load(Ordering::Relaxed) { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
            guest_phys_addr: self.region.addr + block * bs,
            memory_size: if on { bs } else { 0 },
            userspace_addr: self.block_host(block),
        };
        // SAFETY: the host range is a block of the region's live mapping, which `_mem` keeps
        // for as long as this exists; a size of zero deletes the slot.
        unsafe { self.vm.set_user_memory_region(slot) }
            .map_err(|e| format!("KVM refused the memory slot of block {block} ({e})"))
    }

    /// Replaces `count` blocks from `block` of the mapping with `fd` at `offset` (or fresh
    /// anonymous memory when `fd` is -1).
    fn remap(&self, block: u64, count: u64, flags: i32, fd: i32, offset: u64) -> Result<(), String> {
        let len = (count * self.region.block_size) as usize;
        let addr = self.block_host(block) as *mut libc::c_void;
        // SAFETY: [addr, addr + len) lies in the region's mapping, which this process owns and
        // `_mem` keeps; MAP_FIXED replaces those pages and nothing else. KVM has no slot over an
        // unplugged block, and a plugged block is remapped before its slot exists.
        let got = unsafe {
            libc::mmap(
                addr,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags | libc::MAP_FIXED | libc::MAP_NORESERVE,
                fd,
                offset as libc::off_t,
            )
        };
        if got == libc::MAP_FAILED {
            return Err(format!("its memory cannot be mapped ({})", std::io::Error::last_os_error()));
        }
        Ok(())
    }

    fn map_sink(&self, block: u64) -> Result<(), String> {
        self.remap(block, 1, libc::MAP_SHARED, self.sink.as_raw_fd(), 0)
    }

    fn map_backing(&self, block: u64, count: u64) -> Result<(), String> {
        match &self.backing {
            Backing::Shared { file, offset } => {
                self.remap(block, count, libc::MAP_SHARED, file.as_raw_fd(), offset + block * self.region.block_size)
            }
            Backing::Private { hugetlb } => {
                let huge = if *hugetlb { libc::MAP_HUGETLB } else { 0 };
                self.remap(block, count, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | huge, -1, 0)?;
                let len = (count * self.region.block_size) as usize;
                crate::memory::advise_range(self.block_host(block) as *mut libc::c_void, len, &self.options, false);
                Ok(())
            }
        }
    }

    /// Gives the memfd's pages of `count` blocks from `block` back to the host.
    fn punch(&self, block: u64, count: u64) {
        if let Backing::Shared { file, offset } = &self.backing {
            let bs = self.region.block_size;
            // SAFETY: fallocate on an fd this struct owns; it changes only the file's pages.
            let punched = unsafe {
                libc::fallocate(
                    file.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    (offset + block * bs) as libc::off_t,
                    (count * bs) as libc::off_t,
                )
            };
            if punched != 0 {
                tracing::warn!(
                    "virtio-mem: the memory of unplugged block {block} stays in the guest memory file ({})",
                    std::io::Error::last_os_error()
                );
            }
        }
    }
}

impl BlockMapper for PluggableMemory {
    fn plug(&self, first: u64, count: u64) -> Result<(), String> {
        self.map_backing(first, count)?;
        for block in first..first + count {
            if let Err(e) = self.set_slot(block, true) {
                // Back to unplugged: the guest is told that none of them is plugged.
                let _ = self.unplug(first, block - first);
                for rest in block..first + count {
                    let _ = self.map_sink(rest);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    fn unplug(&self, first: u64, count: u64) -> Result<(), String> {
        for block in first..first + count {
            self.set_slot(block, false)?;
        }
        self.punch(first, count);
        for block in first..first + count {
            self.map_sink(block)?;
        }
        Ok(())
    }
}
