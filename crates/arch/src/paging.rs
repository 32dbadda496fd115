//! Identity-mapping page tables for the 64-bit boot protocol.
//!
//! The first 4 GiB are mapped with 2 MiB pages so that the kernel, the boot tables and the
//! MMIO hole (LAPIC, IOAPIC, device windows) are all reachable before the kernel builds its own.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{IDENTITY_MAPPED_GIB, PD_START, PDPT_START, PML4_START};
use crate::{Error, GuestMemory, Result};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const HUGE_PAGE: u64 = 1 << 7;
const ENTRIES_PER_TABLE: u64 = 512;

/// The 64-bit entries of every table, each with the guest address it goes to.
pub fn identity_tables() -> Vec<(u64, Vec<u64>)> {
    let mut tables = vec![(PML4_START, vec![PDPT_START | PRESENT | WRITABLE])];
    let pdpt = (0..IDENTITY_MAPPED_GIB).map(|gib| (PD_START + gib * 0x1000) | PRESENT | WRITABLE);
    tables.push((PDPT_START, pdpt.collect()));
    for gib in 0..IDENTITY_MAPPED_GIB {
        let pd = (0..ENTRIES_PER_TABLE).map(|i| ((gib * ENTRIES_PER_TABLE + i) << 21) | PRESENT | WRITABLE | HUGE_PAGE);
        tables.push((PD_START + gib * 0x1000, pd.collect()));
    }
    tables
}

/// Writes the identity tables; returns the value for CR3.
pub fn write_identity_tables(mem: &GuestMemory) -> Result<u64> {
    for (addr, entries) in identity_tables() {
        for (i, entry) in entries.iter().enumerate() {
            let at = addr + i as u64 * 8;
            mem.write_obj(*entry, GuestAddress(at)).map_err(|_| Error::GuestWrite { what: "page tables", addr: at })?;
        }
    }
    Ok(PML4_START)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables as the MMU does for a 2 MiB page.
    fn translate(mem: &GuestMemory, cr3: u64, va: u64) -> Option<u64> {
        let read = |addr: u64| mem.read_obj::<u64>(GuestAddress(addr)).unwrap();
        let pml4e = read(cr3 + ((va >> 39) & 511) * 8);
        if pml4e & PRESENT == 0 {
            return None;
        }
        let pdpte = read((pml4e & !0xfff) + ((va >> 30) & 511) * 8);
        if pdpte & PRESENT == 0 {
            return None;
        }
        let pde = read((pdpte & !0xfff) + ((va >> 21) & 511) * 8);
        if pde & PRESENT == 0 || pde & HUGE_PAGE == 0 {
            return None;
        }
        Some((pde & !0x1f_ffff & !(1 << 63)) | (va & 0x1f_ffff))
    }

    #[test]
    fn first_four_gib_map_to_themselves() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let cr3 = write_identity_tables(&mem).unwrap();
        for va in [0, 0x1000, 0x10_0000, 0x1234_5678, 0xfee0_0300, 0xffff_ffff] {
            assert_eq!(translate(&mem, cr3, va), Some(va), "{va:#x}");
        }
        assert_eq!(translate(&mem, cr3, 0x1_0000_0000), None);
    }

    #[test]
    fn tables_do_not_overlap() {
        let tables = identity_tables();
        for pair in tables.windows(2) {
            assert!(pair[0].0 + pair[0].1.len() as u64 * 8 <= pair[1].0);
        }
    }
}
