//! The Intel MultiProcessor table: how a kernel without ACPI learns the CPUs, the IOAPIC and
//! how ISA interrupts are wired.

use vm_memory::{Bytes, GuestAddress};

use crate::layout::{IOAPIC_PINS, IOAPIC_START, LAPIC_START, MPTABLE_MAX_SIZE, MPTABLE_START};
use crate::{Error, GuestMemory, Result};

const FLOATING_POINTER_SIZE: usize = 16;
const HEADER_SIZE: usize = 44;
const SPEC_REVISION: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTSTRAP: u8 = 2;
/// Family 6 signature and FPU + APIC feature flags, as the MP spec asks for.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = 0x201;

const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const ISA_BUS_ID: u8 = 0;
const ALL_LOCAL_APICS: u8 = 0xff;

/// The most vCPUs the table can name: APIC IDs are 8 bits, 0xff is broadcast and the IOAPIC
/// takes the ID after the last CPU.
pub const MAX_CPUS: u32 = 254;

/// Bytes of the table for `cpus` vCPUs, to be placed at `base`.
pub fn mptable_bytes(base: u64, cpus: u32) -> Result<Vec<u8>> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::TooManyCpus { count: cpus, max: MAX_CPUS });
    }
    let ioapic_id = cpus as u8;
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTSTRAP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_SIGNATURE.to_le_bytes());
        entries.extend_from_slice(&CPU_FEATURES.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    count += 2;
    for pin in 0..IOAPIC_PINS {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_TYPE_INT, 0, 0, ISA_BUS_ID, pin, ioapic_id, pin]);
        count += 1;
    }
    for (kind, lint) in [(INT_TYPE_EXTINT, 0), (INT_TYPE_NMI, 1)] {
        entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, kind, 0, 0, ISA_BUS_ID, 0, ALL_LOCAL_APICS, lint]);
        count += 1;
    }

    let table_addr = base + FLOATING_POINTER_SIZE as u64;
    let table_len = HEADER_SIZE + entries.len();
    let mut table = Vec::with_capacity(table_len);
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&(table_len as u16).to_le_bytes());
    table.extend_from_slice(&[SPEC_REVISION, 0]);
    table.extend_from_slice(b"FERROVSR");
    table.extend_from_slice(b"KVM MICROVM ");
    table.extend_from_slice(&[0; 4]); // OEM table pointer
    table.extend_from_slice(&[0; 2]); // OEM table size
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(LAPIC_START as u32).to_le_bytes());
    table.extend_from_slice(&[0; 4]); // extended table length and checksum, reserved
    table.extend_from_slice(&entries);
    table[7] = checksum_complement(&table);

    let mut out = Vec::with_capacity(FLOATING_POINTER_SIZE + table_len);
    out.extend_from_slice(b"_MP_");
    out.extend_from_slice(&(table_addr as u32).to_le_bytes());
    out.extend_from_slice(&[1, SPEC_REVISION, 0, 0, 0, 0, 0, 0]);
    out[10] = checksum_complement(&out);
    out.extend_from_slice(&table);
    if out.len() as u64 > MPTABLE_MAX_SIZE {
        return Err(Error::TooManyCpus { count: cpus, max: MAX_CPUS });
    }
    Ok(out)
}

/// The byte that makes the sum of `bytes` zero.
fn checksum_complement(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// Writes the MP table for `cpus` vCPUs into the BIOS area.
pub fn write_mptable(mem: &GuestMemory, cpus: u32) -> Result<()> {
    let bytes = mptable_bytes(MPTABLE_START, cpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(|_| Error::GuestWrite { what: "MP table", addr: MPTABLE_START })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROCESSOR_ENTRY_SIZE: usize = 20;
    const SHORT_ENTRY_SIZE: usize = 8;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
    }

    /// Parses the table the way Linux's mpparse does and returns the APIC IDs of the CPUs.
    fn parse_cpus(bytes: &[u8], base: u64) -> Vec<(u8, u8)> {
        assert_eq!(&bytes[..4], b"_MP_");
        assert_eq!(sum(&bytes[..16]), 0, "floating pointer checksum");
        let table = (u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64 - base) as usize;
        let t = &bytes[table..];
        assert_eq!(&t[..4], b"PCMP");
        let len = u16::from_le_bytes([t[4], t[5]]) as usize;
        assert_eq!(sum(&t[..len]), 0, "table checksum");
        let count = u16::from_le_bytes([t[34], t[35]]);
        let mut at = HEADER_SIZE;
        let mut cpus = Vec::new();
        for _ in 0..count {
            if t[at] == ENTRY_PROCESSOR {
                cpus.push((t[at + 1], t[at + 3]));
                at += PROCESSOR_ENTRY_SIZE;
            } else {
                at += SHORT_ENTRY_SIZE;
            }
        }
        assert_eq!(at, len, "entry count matches the length");
        cpus
    }

    #[test]
    fn table_names_every_cpu_once_with_cpu0_as_bootstrap() {
        let bytes = mptable_bytes(MPTABLE_START, 4).unwrap();
        let cpus = parse_cpus(&bytes, MPTABLE_START);
        assert_eq!(cpus, vec![(0, 3), (1, 1), (2, 1), (3, 1)]);
    }

    #[test]
    fn largest_table_fits_its_area() {
        let bytes = mptable_bytes(MPTABLE_START, MAX_CPUS).unwrap();
        assert_eq!(parse_cpus(&bytes, MPTABLE_START).len(), MAX_CPUS as usize);
        assert!(bytes.len() as u64 <= MPTABLE_MAX_SIZE);
    }

    #[test]
    fn zero_or_too_many_cpus_are_refused() {
        assert!(mptable_bytes(MPTABLE_START, 0).is_err());
        assert!(matches!(mptable_bytes(MPTABLE_START, 255), Err(Error::TooManyCpus { max: 254, .. })));
    }
}
