//! The boot GDT and the KVM segment registers derived from it.

use kvm_bindings::kvm_segment;

/// Packs a segment descriptor from its flags (access byte and the high nibble), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << (48 - 16))
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// Descriptor flags: present, ring 0, with granularity and size bits.
pub const CODE64_FLAGS: u16 = 0xa09b;
pub const CODE32_FLAGS: u16 = 0xc09b;
pub const DATA_FLAGS: u16 = 0xc093;
pub const TSS_FLAGS: u16 = 0x808b;

/// Indices in the boot GDT; the selector is `index * 8`.
pub const CODE_INDEX: u16 = 1;
pub const DATA_INDEX: u16 = 2;
pub const TSS_INDEX: u16 = 3;

/// The boot GDT: null, code (64-bit for long mode, 32-bit for PVH), flat data, and a TSS.
pub fn boot_gdt(long_mode: bool) -> [u64; 4] {
    let code_flags = if long_mode { CODE64_FLAGS } else { CODE32_FLAGS };
    [0, gdt_entry(code_flags, 0, 0xfffff), gdt_entry(DATA_FLAGS, 0, 0xfffff), gdt_entry(TSS_FLAGS, 0, 0xfffff)]
}

/// The segment register KVM needs for the descriptor `entry` at GDT slot `index`.
pub fn kvm_segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let raw_limit = (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0xffff)) as u32;
    let granular = bit(55) == 1;
    kvm_segment {
        base: ((entry & 0xff00_0000_0000_0000) >> 32)
            | ((entry & 0x0000_00ff_0000_0000) >> 16)
            | ((entry & 0x0000_0000_ffff_0000) >> 16),
        limit: if granular { (raw_limit << 12) | 0xfff } else { raw_limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: if bit(47) == 1 { 0 } else { 1 },
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_code_segment_is_64_bit_flat_ring_0() {
        let gdt = boot_gdt(true);
        let cs = kvm_segment_from_gdt(gdt[1], CODE_INDEX);
        assert_eq!((cs.l, cs.db, cs.dpl, cs.present, cs.s), (1, 0, 0, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.selector, 8);
        assert_eq!((cs.base, cs.limit), (0, 0xffff_ffff));
    }

    #[test]
    fn pvh_code_segment_is_32_bit() {
        let cs = kvm_segment_from_gdt(boot_gdt(false)[1], CODE_INDEX);
        assert_eq!((cs.l, cs.db, cs.g), (0, 1, 1));
    }

    #[test]
    fn base_and_limit_round_trip() {
        let byte_granular_tss = TSS_FLAGS & !0x8000;
        let entry = gdt_entry(byte_granular_tss, 0x1234_5678, 0x6_7fff);
        let seg = kvm_segment_from_gdt(entry, TSS_INDEX);
        assert_eq!(seg.base, 0x1234_5678);
        assert_eq!(seg.limit, 0x6_7fff);
        assert_eq!(seg.type_, 0xb);
        assert_eq!(seg.selector, 24);
    }

    #[test]
    fn null_descriptor_is_unusable() {
        assert_eq!(kvm_segment_from_gdt(0, 0).unusable, 1);
    }
}
