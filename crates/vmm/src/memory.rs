//! Guest RAM: how it is backed (4 KiB pages, hugetlbfs, transparent huge pages, a shared
//! memfd), KSM marking, and what it costs the host, read back from /proc.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::bitmap::{AtomicBitmap, NewBitmap};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap, MmapRegion};

use arch::GuestMemory;

use crate::config::{HugePages, MemoryOptions};

const HUGE_PAGE: usize = 2 << 20;

#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("cannot reserve {mib} MiB of guest memory ({source}){hint}")]
    Map { mib: u64, source: std::io::Error, hint: &'static str },
    #[error("cannot create the shared memory file ({0})")]
    Memfd(std::io::Error),
    #[error("guest memory regions are inconsistent ({0})")]
    Regions(String),
}

fn map_error(len: usize, options: &MemoryOptions, source: std::io::Error) -> MemoryError {
    let hint =
        if options.hugepages == HugePages::On { "; reserve 2 MiB huge pages in /proc/sys/vm/nr_hugepages" } else { "" };
    MemoryError::Map { mib: (len >> 20) as u64, source, hint }
}

/// Anonymous private memory aligned to 2 MiB, for transparent huge pages.
fn map_aligned(len: usize, options: &MemoryOptions) -> Result<*mut u8, MemoryError> {
    let span = len + HUGE_PAGE;
    // SAFETY: a fresh anonymous mapping; nothing else refers to it.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            span,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return Err(map_error(len, options, std::io::Error::last_os_error()));
    }
    let start = raw as usize;
    let aligned = start.next_multiple_of(HUGE_PAGE);
    // SAFETY: both trims lie inside the mapping made above and outside [aligned, aligned + len).
    unsafe {
        if aligned > start {
            libc::munmap(raw, aligned - start);
        }
        let end = start + span;
        if end > aligned + len {
            libc::munmap((aligned + len) as *mut libc::c_void, end - aligned - len);
        }
    }
    Ok(aligned as *mut u8)
}

/// Creates guest memory for `regions` (guest address, length) backed as `options` asks. The
/// first `ram` regions are RAM; the rest (hotpluggable memory) are never prefaulted.
pub fn create(regions: &[(u64, u64)], ram: usize, options: &MemoryOptions) -> Result<GuestMemory, MemoryError> {
    let total: u64 = regions.iter().map(|r| r.1).sum();
    let memfd = if options.shared {
        let flags = libc::MFD_CLOEXEC | if options.hugepages == HugePages::On { libc::MFD_HUGETLB } else { 0 };
        // SAFETY: memfd_create with a NUL-terminated name returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"ferrovisor-guest-ram".as_ptr(), flags) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: fd is new and owned by the File from here on.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(total).map_err(MemoryError::Memfd)?;
        Some(file)
    } else {
        None
    };
    let mut mapped = Vec::new();
    let mut file_offset = 0u64;
    for (index, &(start, len)) in regions.iter().enumerate() {
        let size = len as usize;
        let prefault = options.prefault && index < ram;
        let mut flags = libc::MAP_NORESERVE;
        if prefault {
            flags |= libc::MAP_POPULATE;
        }
        let region: MmapRegion<AtomicBitmap> = if let Some(file) = &memfd {
            let file = file.try_clone().map_err(MemoryError::Memfd)?;
            MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
                .with_file_offset(FileOffset::new(file, file_offset))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(flags | libc::MAP_SHARED)
                .build()
                .map_err(|e| map_error(size, options, std::io::Error::other(e.to_string())))?
        } else if options.hugepages == HugePages::Thp {
            let addr = map_aligned(size, options)?;
            // SAFETY: [addr, addr + size) is a fresh private anonymous mapping made for this
            // region; it stays mapped for the life of the process.
            unsafe {
                MmapRegion::build_raw(
                    addr,
                    size,
                    libc::PROT_READ | libc::PROT_WRITE,
                    libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags,
                )
            }
            .map_err(|e| map_error(size, options, std::io::Error::other(e.to_string())))?
        } else {
            let huge = if options.hugepages == HugePages::On { libc::MAP_HUGETLB } else { 0 };
            MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
                .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | flags | huge)
                .with_hugetlbfs(options.hugepages == HugePages::On)
                .build()
                .map_err(|e| map_error(size, options, std::io::Error::other(e.to_string())))?
        };
        file_offset += len;
        mapped.push(guest_region(region, start, options, prefault)?);
    }
    GuestMemory::from_regions(mapped).map_err(|e| MemoryError::Regions(e.to_string()))
}

/// Guest RAM mapped from a snapshot's memory file: private, so the guest's writes stay in
/// this process, and loaded lazily, page by page, as the guest touches it.
pub fn restore(regions: &[(u64, u64)], file: &File, options: &MemoryOptions) -> Result<GuestMemory, MemoryError> {
    map_file(regions, file, options, libc::MAP_PRIVATE)
}

/// Guest memory another VMM on this host handed over (a local migration): its memfd mapped
/// shared at the offsets [`create`] lays regions out at, so that both map the same pages.
pub fn adopt(regions: &[(u64, u64)], file: &File, options: &MemoryOptions) -> Result<GuestMemory, MemoryError> {
    map_file(regions, file, options, libc::MAP_SHARED)
}

fn map_file(
    regions: &[(u64, u64)],
    file: &File,
    options: &MemoryOptions,
    sharing: libc::c_int,
) -> Result<GuestMemory, MemoryError> {
    let mut mapped = Vec::new();
    let mut file_offset = 0u64;
    for &(start, len) in regions {
        let size = len as usize;
        let file = file.try_clone().map_err(MemoryError::Memfd)?;
        let region: MmapRegion<AtomicBitmap> = MmapRegionBuilder::new_with_bitmap(size, AtomicBitmap::with_len(size))
            .with_file_offset(FileOffset::new(file, file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_NORESERVE | sharing)
            .build()
            .map_err(|e| map_error(size, options, std::io::Error::other(e.to_string())))?;
        file_offset += len;
        mapped.push(guest_region(region, start, options, false)?);
    }
    GuestMemory::from_regions(mapped).map_err(|e| MemoryError::Regions(e.to_string()))
}

/// A mapping advised as `options` say, placed at guest address `start`.
fn guest_region(
    region: MmapRegion<AtomicBitmap>,
    start: u64,
    options: &MemoryOptions,
    prefault: bool,
) -> Result<GuestRegionMmap<AtomicBitmap>, MemoryError> {
    advise(&region, options, prefault);
    GuestRegionMmap::new(region, GuestAddress(start))
        .ok_or(MemoryError::Regions(format!("region at {start:#x} wraps the address space")))
}

fn advise(region: &MmapRegion<AtomicBitmap>, options: &MemoryOptions, prefault: bool) {
    advise_range(region.as_ptr().cast(), region.size(), options, prefault);
}

/// Advises [addr, addr + len), guest memory mapped by this process, as `options` say.
pub(crate) fn advise_range(addr: *mut libc::c_void, len: usize, options: &MemoryOptions, prefault: bool) {
    let mut advice = Vec::new();
    if options.hugepages == HugePages::Thp {
        advice.push((libc::MADV_HUGEPAGE, "MADV_HUGEPAGE"));
        if prefault {
            advice.push((libc::MADV_POPULATE_WRITE, "MADV_POPULATE_WRITE"));
        }
    }
    if options.mergeable {
        advice.push((libc::MADV_MERGEABLE, "MADV_MERGEABLE"));
    }
    for (flag, name) in advice {
        // SAFETY: advice on memory this process mapped for guest RAM.
        if unsafe { libc::madvise(addr, len, flag) } != 0 {
            tracing::warn!("guest memory: {name} was refused ({})", std::io::Error::last_os_error());
        }
    }
}

/// What guest memory costs the host, from this process's /proc files.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MemoryStats {
    pub guest_ram_kib: u64,
    /// The VMM's resident memory, and the part of it that is guest RAM.
    pub rss_kib: u64,
    pub guest_rss_kib: u64,
    /// Guest RAM resident on transparent or hugetlbfs huge pages.
    pub huge_kib: u64,
    /// Pages of this process KSM has merged, and what that saved.
    pub ksm_merging_pages: u64,
    pub ksm_profit_bytes: i64,
}

impl MemoryStats {
    pub fn vmm_overhead_kib(&self) -> u64 {
        self.rss_kib.saturating_sub(self.guest_rss_kib)
    }
}

impl std::fmt::Display for MemoryStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "memory: guest_ram_mib={} rss_kib={} guest_rss_kib={} vmm_overhead_kib={} huge_kib={} ksm_merging_pages={} ksm_saved_mib={}",
            self.guest_ram_kib >> 10,
            self.rss_kib,
            self.guest_rss_kib,
            self.vmm_overhead_kib(),
            self.huge_kib,
            self.ksm_merging_pages,
            (self.ksm_merging_pages * 4) >> 10,
        )
    }
}

/// A `/proc` value like ` 1234 kB` in KiB (0 when it is not one).
pub(crate) fn kib(value: &str) -> u64 {
    value.trim().trim_end_matches("kB").trim().parse().unwrap_or(0)
}

/// Reads the stats of guest memory `mem` in this process.
pub fn stats(mem: &GuestMemory) -> MemoryStats {
    let ranges: Vec<(u64, u64)> = mem
        .iter()
        .filter_map(|r| {
            r.get_host_address(vm_memory::MemoryRegionAddress(0)).ok().map(|h| (h as u64, h as u64 + r.len()))
        })
        .collect();
    let mut s = MemoryStats { guest_ram_kib: mem.iter().map(|r| r.len() >> 10).sum(), ..Default::default() };
    let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap_or_default();
    let mut in_guest = false;
    for line in smaps.lines() {
        if let Some((range, _)) = line.split_once(' ')
            && let Some((a, b)) = range.split_once('-')
            && let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16))
        {
            in_guest = ranges.iter().any(|&(gs, ge)| start < ge && end > gs);
            continue;
        }
        let Some((key, value)) = line.split_once(':') else { continue };
        match key {
            "Rss" => {
                s.rss_kib += kib(value);
                if in_guest {
                    s.guest_rss_kib += kib(value);
                }
            }
            "AnonHugePages" | "ShmemPmdMapped" if in_guest => s.huge_kib += kib(value),
            // hugetlbfs pages are resident but not counted in Rss.
            "Private_Hugetlb" | "Shared_Hugetlb" if in_guest => {
                s.huge_kib += kib(value);
                s.guest_rss_kib += kib(value);
                s.rss_kib += kib(value);
            }
            _ => {}
        }
    }
    s.ksm_merging_pages =
        std::fs::read_to_string("/proc/self/ksm_merging_pages").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    let ksm_stat = std::fs::read_to_string("/proc/self/ksm_stat").unwrap_or_default();
    s.ksm_profit_bytes = ksm_stat
        .lines()
        .find_map(|l| l.strip_prefix("ksm_process_profit "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    s
}

#[cfg(test)]
mod dirty_tests {
    use super::*;
    use std::sync::atomic::Ordering;
    use vm_memory::Bytes;

    #[test]
    fn device_writes_mark_the_bitmap_that_diff_snapshots_read() {
        let mem = create(&[(0, 1 << 20)], 1, &MemoryOptions::default()).unwrap();
        mem.store(1u16, GuestAddress(0x5002), Ordering::Release).unwrap();
        mem.write_obj(7u32, GuestAddress(0x9000)).unwrap();
        let region = mem.iter().next().unwrap();
        let bitmap: &AtomicBitmap = std::ops::Deref::deref(region).bitmap();
        assert!(bitmap.is_addr_set(0x9000), "write_obj");
        assert!(bitmap.is_addr_set(0x5000), "store");
        assert!(!bitmap.is_addr_set(0x7000), "untouched");
    }
}
