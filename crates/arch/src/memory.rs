//! Guest RAM regions and the e820 map that describes them.

use crate::layout::{EBDA_START, HIMEM_START, MMIO_HOLE_END, MMIO_HOLE_START};

/// An e820 range type, as the BIOS interface numbers them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Type,
}

/// The smallest VM: the kernel loads at 1 MiB and needs room above it.
pub const MIN_MEMORY: u64 = 2 << 20;

/// Guest RAM for `size` bytes: one region below the MMIO hole and, when larger, one at 4 GiB.
pub fn ram_regions(size: u64) -> Vec<(u64, u64)> {
    let low = size.min(MMIO_HOLE_START);
    let mut regions = vec![(0, low)];
    if size > low {
        regions.push((MMIO_HOLE_END, size - low));
    }
    regions
}

/// The e820 map for `size` bytes of RAM: conventional memory up to the EBDA, the BIOS area
/// reserved (it holds the MP table), then RAM from 1 MiB around the MMIO hole.
pub fn e820_map(size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry { addr: 0, size: EBDA_START, kind: E820Type::Ram },
        E820Entry { addr: EBDA_START, size: HIMEM_START - EBDA_START, kind: E820Type::Reserved },
    ];
    for (start, len) in ram_regions(size) {
        let start = start.max(HIMEM_START);
        let end = if start < MMIO_HOLE_START { len.min(MMIO_HOLE_START) } else { start + len };
        if end > start {
            map.push(E820Entry { addr: start, size: end - start, kind: E820Type::Ram });
        }
    }
    map
}

/// Where hotpluggable memory (virtio-mem) starts for `size` bytes of RAM: above RAM and the
/// MMIO hole, 2 GiB-aligned, so that it starts on a Linux memory block of any size.
pub fn hotplug_start(size: u64) -> u64 {
    let ram_end = ram_regions(size).last().map_or(0, |&(start, len)| start + len);
    ram_end.max(MMIO_HOLE_END).next_multiple_of(HOTPLUG_ALIGNMENT)
}

pub const HOTPLUG_ALIGNMENT: u64 = 2 << 30;

/// The end of RAM below the MMIO hole: where the initramfs goes.
pub fn low_ram_end(size: u64) -> u64 {
    size.min(MMIO_HOLE_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;

    #[test]
    fn hotplug_memory_starts_above_ram_and_the_hole_on_a_2_gib_boundary() {
        assert_eq!(hotplug_start(128 * MIB), 4 * GIB);
        assert_eq!(hotplug_start(3 * GIB), 4 * GIB);
        assert_eq!(hotplug_start(3 * GIB + 1), 6 * GIB);
        assert_eq!(hotplug_start(5 * GIB), 6 * GIB);
    }

    #[test]
    fn small_vm_has_one_region_and_three_e820_entries() {
        assert_eq!(ram_regions(256 * MIB), vec![(0, 256 * MIB)]);
        let map = e820_map(256 * MIB);
        assert_eq!(map.len(), 3);
        assert_eq!(map[0], E820Entry { addr: 0, size: 0x9fc00, kind: E820Type::Ram });
        assert_eq!(map[1].kind, E820Type::Reserved);
        assert_eq!(map[1].addr + map[1].size, HIMEM_START);
        assert_eq!(map[2], E820Entry { addr: MIB, size: 255 * MIB, kind: E820Type::Ram });
    }

    #[test]
    fn large_vm_splits_around_the_mmio_hole() {
        let size = 6 * GIB;
        assert_eq!(ram_regions(size), vec![(0, 3 * GIB), (4 * GIB, 3 * GIB)]);
        let map = e820_map(size);
        assert_eq!(map.len(), 4);
        assert_eq!(map[2].addr + map[2].size, MMIO_HOLE_START);
        assert_eq!(map[3], E820Entry { addr: 4 * GIB, size: 3 * GIB, kind: E820Type::Ram });
        let ram: u64 = map.iter().filter(|e| e.kind == E820Type::Ram).map(|e| e.size).sum();
        assert_eq!(ram, size - HIMEM_START + EBDA_START);
    }

    #[test]
    fn e820_ranges_never_overlap_the_hole_or_each_other() {
        for size in [MIN_MEMORY, 3 * GIB, 3 * GIB + 4096, 5 * GIB] {
            let map = e820_map(size);
            for pair in map.windows(2) {
                assert!(pair[0].addr + pair[0].size <= pair[1].addr, "{map:?}");
            }
            for e in &map {
                let end = e.addr + e.size;
                assert!(end <= MMIO_HOLE_START || e.addr >= MMIO_HOLE_END, "{e:?}");
            }
        }
    }
}
