//! Which pages of guest memory were written, from the host's own page tables: guest memory is
//! write-protected with userfaultfd's asynchronous mode, and `PAGEMAP_SCAN` reports the pages
//! written since and protects them again in one step (Linux 6.7 and later).
//!
//! This sees every write, whoever makes it: the vCPUs (through KVM), the devices, and KVM
//! itself. KVM's dirty log misses writes that KVM makes on the guest's behalf without logging
//! them; on this nested host the exception frames its ring-0 emulation pushes are such writes,
//! and a migration that trusted the log alone lost them (a stack frame from an earlier fault,
//! seen on the destination). Where the kernel lacks either facility the tracker is absent and
//! the migration relies on KVM's log and the device bitmap.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use arch::GuestMemory;

use super::uffd::{self, UffdioRange, ioctl};

const PAGE: u64 = 4096;
/// Memory is protected this much at a time: one call over all of it held the guest up for
/// 13 ms per GiB on this host (KVM's mappings of the range are invalidated under its lock).
const PROTECT_CHUNK: u64 = 16 << 20;

// userfaultfd write protection (include/uapi/linux/userfaultfd.h).
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
const UFFD_FEATURE_WP_ASYNC: u64 = 1 << 15;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, 0xaa, 0x06, UffdioWriteprotect);

// PAGEMAP_SCAN (include/uapi/linux/fs.h).
const PM_SCAN_WP_MATCHING: u64 = 1 << 0;
const PM_SCAN_CHECK_WPASYNC: u64 = 1 << 1;
const PAGE_IS_WRITTEN: u64 = 1 << 1;
vmm_sys_util::ioctl_iowr_nr!(PAGEMAP_SCAN, b'f' as u32, 16, PmScanArg);

#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
#[derive(Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// Guest memory under asynchronous write protection; closing it lifts the protection.
pub struct WriteTracker {
    uffd: OwnedFd,
    pagemap: File,
    /// Each guest memory region's host range, in region order.
    ranges: Vec<(u64, u64)>,
}

impl WriteTracker {
    /// Protects all of `mem`; None where the kernel lacks asynchronous write protection or
    /// `PAGEMAP_SCAN` (the reason is logged).
    pub fn start(mem: &GuestMemory) -> Option<WriteTracker> {
        match Self::try_start(mem) {
            Ok(tracker) => Some(tracker),
            Err(e) => {
                tracing::info!("migration: the host's page tables cannot track writes ({e}); KVM's log alone does");
                None
            }
        }
    }

    fn try_start(mem: &GuestMemory) -> Result<WriteTracker, String> {
        let ranges: Vec<(u64, u64)> = mem.iter().map(|r| (r.as_ptr() as u64, r.len())).collect();
        let uffd = uffd::open(UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM)?;
        let pagemap = File::open("/proc/self/pagemap").map_err(|e| format!("/proc/self/pagemap: {e}"))?;
        for &(start, len) in &ranges {
            uffd::register(&uffd, start, len, UFFDIO_REGISTER_MODE_WP)?;
            for at in (0..len).step_by(PROTECT_CHUNK as usize) {
                let range = UffdioRange { start: start + at, len: PROTECT_CHUNK.min(len - at) };
                let mut protect = UffdioWriteprotect { range, mode: UFFDIO_WRITEPROTECT_MODE_WP };
                ioctl(&uffd, UFFDIO_WRITEPROTECT(), &mut protect, "UFFDIO_WRITEPROTECT")?;
            }
        }
        let tracker = WriteTracker { uffd, pagemap, ranges };
        // A scan proves the kernel has PAGEMAP_SCAN before anything depends on it.
        let mut logs: Vec<Vec<u64>> =
            tracker.ranges.iter().map(|&(_, len)| vec![0; (len / PAGE).div_ceil(64) as usize]).collect();
        tracker.take(&mut logs)?;
        Ok(tracker)
    }

    /// Sets in `logs` (per region, one bit per page) the pages written since the last call,
    /// and protects them again, in one step per range.
    pub fn take(&self, logs: &mut [Vec<u64>]) -> Result<(), String> {
        let mut regions = vec![PageRegion::default(); 1024];
        for (&(start, len), log) in self.ranges.iter().zip(logs.iter_mut()) {
            let end = start + len;
            let mut from = start;
            while from < end {
                let mut arg = PmScanArg {
                    size: size_of::<PmScanArg>() as u64,
                    flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                    start: from,
                    end,
                    vec: regions.as_mut_ptr() as u64,
                    vec_len: regions.len() as u64,
                    category_mask: PAGE_IS_WRITTEN,
                    return_mask: PAGE_IS_WRITTEN,
                    ..Default::default()
                };
                // SAFETY: PAGEMAP_SCAN on this process's pagemap over guest memory it maps; the
                // kernel writes at most vec_len entries into `regions`.
                let found = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(&self.pagemap, PAGEMAP_SCAN(), &mut arg) };
                if found < 0 {
                    return Err(format!("PAGEMAP_SCAN: {}", std::io::Error::last_os_error()));
                }
                for r in &regions[..found as usize] {
                    for page in (r.start.max(start) - start) / PAGE..(r.end.min(end) - start).div_ceil(PAGE) {
                        if let Some(word) = log.get_mut((page / 64) as usize) {
                            *word |= 1 << (page % 64);
                        }
                    }
                }
                if arg.walk_end <= from {
                    return Err("PAGEMAP_SCAN made no progress".into());
                }
                from = arg.walk_end;
            }
        }
        Ok(())
    }
}

impl AsRawFd for WriteTracker {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.uffd.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn writes_by_anyone_are_reported_once_and_then_protected_again() {
        let mem = crate::memory::create(&[(0, 4 << 20)], 1, &crate::config::MemoryOptions::default()).unwrap();
        mem.write_obj(1u8, GuestAddress(0x3000)).unwrap();
        let Some(tracker) = WriteTracker::start(&mem) else {
            eprintln!("skipped: this kernel has no asynchronous write protection or PAGEMAP_SCAN");
            return;
        };
        let fresh = || vec![vec![0u64; 16]];
        let mut logs = fresh();
        tracker.take(&mut logs).unwrap();
        assert_eq!(logs[0].iter().map(|w| w.count_ones()).sum::<u32>(), 0, "nothing written yet");
        mem.write_obj(2u8, GuestAddress(0x3000)).unwrap();
        mem.write_obj(3u8, GuestAddress(0x200_0000 / 16 + 5)).unwrap();
        // A page never touched before counts too.
        mem.write_obj(4u8, GuestAddress(0x30_0000)).unwrap();
        // The kernel's own write into guest memory (a read(2) into it) counts as well.
        let host = mem.get_host_address(GuestAddress(0x31_0000)).unwrap();
        let zero = File::open("/dev/zero").unwrap();
        // SAFETY: reads 8 bytes into guest memory this test mapped.
        assert_eq!(unsafe { libc::read(zero.as_raw_fd(), host.cast(), 8) }, 8);
        let mut logs = fresh();
        tracker.take(&mut logs).unwrap();
        let pages: Vec<u64> = (0..1024u64).filter(|p| logs[0][(p / 64) as usize] >> (p % 64) & 1 != 0).collect();
        assert_eq!(pages, [3, 0x200, 0x300, 0x310]);
        let mut logs = fresh();
        tracker.take(&mut logs).unwrap();
        assert_eq!(logs[0].iter().map(|w| w.count_ones()).sum::<u32>(), 0, "each write is reported once");
    }
}
