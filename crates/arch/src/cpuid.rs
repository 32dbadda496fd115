//! The CPUID a vCPU sees: KVM's supported set, passed through, with the topology of this VM
//! (APIC IDs, logical processor counts) written in. No feature the host KVM hides is added back.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_V2_EXT_TOPOLOGY: u32 = 0x1f;

const FEATURES_EDX_HTT: u32 = 1 << 28;
const FEATURES_ECX_HYPERVISOR: u32 = 1 << 31;
/// Extended topology level types (ECX[15:8]).
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to hold `count` distinct IDs.
fn id_bits(count: u32) -> u32 {
    if count <= 1 { 0 } else { 32 - (count - 1).leading_zeros() }
}

/// Rewrites `entries` for vCPU `index` of `count`: one socket, one thread per core, the
/// APIC ID equal to the vCPU index.
pub fn apply_topology(entries: &mut [kvm_cpuid_entry2], index: u32, count: u32) {
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                e.ebx = (e.ebx & 0x0000_ffff) | (index << 24) | ((count.min(255)) << 16);
                if count > 1 {
                    e.edx |= FEATURES_EDX_HTT;
                } else {
                    e.edx &= !FEATURES_EDX_HTT;
                }
                e.ecx |= FEATURES_ECX_HYPERVISOR;
            }
            LEAF_CACHE_PARAMS => {
                // EAX[31:26]: cores per package - 1; EAX[25:14]: logical CPUs sharing the cache
                // - 1 (only the last level is shared between cores).
                let cache_level = (e.eax >> 5) & 0x7;
                let sharing = if cache_level >= 3 { count - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | ((count - 1).min(63) << 26) | (sharing.min(0xfff) << 14);
            }
            LEAF_EXT_TOPOLOGY | LEAF_V2_EXT_TOPOLOGY => {
                e.edx = index;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = (LEVEL_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = id_bits(count);
                        e.ebx = count;
                        e.ecx = (LEVEL_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, eax: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, eax, ebx, ecx, edx, ..Default::default() }
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0x0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            entry(0x1, 0, 0x806f8, 0x0007_0800, 0x8000_0001, 0x078b_fbff),
            entry(0x4, 0, 0x121, 0, 0, 0),
            entry(0x4, 3, 0x163, 0, 0, 0),
            entry(0xb, 0, 1, 2, 0x100, 9),
            entry(0xb, 1, 4, 16, 0x201, 9),
            entry(0xb, 2, 0, 0, 2, 9),
            entry(0x4000_0000, 0, 0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d),
        ]
    }

    #[test]
    fn leaf_1_carries_apic_id_and_count() {
        let mut e = sample();
        apply_topology(&mut e, 3, 4);
        assert_eq!(e[1].ebx >> 24, 3);
        assert_eq!((e[1].ebx >> 16) & 0xff, 4);
        assert_eq!(e[1].ebx & 0xffff, 0x0800, "CLFLUSH size is kept");
        assert_ne!(e[1].edx & FEATURES_EDX_HTT, 0);
        assert_ne!(e[1].ecx & FEATURES_ECX_HYPERVISOR, 0);
        assert_eq!(e[1].ecx & 1, 1, "other features pass through");
    }

    #[test]
    fn single_cpu_clears_htt() {
        let mut e = sample();
        apply_topology(&mut e, 0, 1);
        assert_eq!(e[1].edx & FEATURES_EDX_HTT, 0);
        assert_eq!((e[1].ebx >> 16) & 0xff, 1);
    }

    #[test]
    fn extended_topology_describes_one_socket_of_single_thread_cores() {
        let mut e = sample();
        apply_topology(&mut e, 5, 6);
        assert_eq!((e[4].eax, e[4].ebx, e[4].ecx, e[4].edx), (0, 1, 0x100, 5));
        assert_eq!((e[5].eax, e[5].ebx, e[5].ecx, e[5].edx), (3, 6, 0x201, 5));
        assert_eq!((e[6].eax, e[6].ebx, e[6].ecx & 0xff00), (0, 0, 0));
    }

    #[test]
    fn cache_leaf_counts_cores_and_shares_only_the_last_level() {
        let mut e = sample();
        apply_topology(&mut e, 0, 4);
        assert_eq!(e[2].eax >> 26, 3);
        assert_eq!((e[2].eax >> 14) & 0xfff, 0, "L1 is per core");
        assert_eq!((e[3].eax >> 14) & 0xfff, 3, "L3 is shared");
        assert_eq!(e[2].eax & 0x3fff, 0x121);
    }

    #[test]
    fn kvm_signature_leaf_is_kept() {
        let mut e = sample();
        apply_topology(&mut e, 1, 2);
        assert_eq!(e[7], sample()[7]);
    }

    #[test]
    fn id_bits_rounds_up() {
        assert_eq!([1, 2, 3, 4, 5, 254].map(id_bits), [0, 1, 2, 2, 3, 8]);
    }
}
