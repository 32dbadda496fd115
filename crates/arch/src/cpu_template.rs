//! Custom CPU templates, in Firecracker's terms: bit-level changes to CPUID leaves and to MSRs
//! a vCPU starts with, and KVM capabilities the host must have. A bitmap such as
//! `0b1x0` sets, leaves and clears bits from the most significant one given; missing high
//! characters are `x` (left alone) and `_` separates groups.
//!
//! A template may hide what the host has; it may not claim what the host lacks: a CPUID bit
//! set that KVM does not support, or a leaf KVM does not report, is refused with a sentence.

use kvm_bindings::{CpuId, kvm_cpuid_entry2};

/// Bits to change in a register: where `mask` has a 1, the bit becomes the one in `value`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bitmap {
    pub mask: u64,
    pub value: u64,
}

impl Bitmap {
    /// Parses `0b...` of at most `width` bit characters (0, 1, x; `_` ignored).
    pub fn parse(text: &str, width: u32) -> Result<Bitmap, String> {
        let digits = text.strip_prefix("0b").ok_or_else(|| format!("bitmap {text} must start with 0b"))?;
        let mut bitmap = Bitmap::default();
        for (bit, c) in (0u32..).zip(digits.chars().rev().filter(|&c| c != '_')) {
            if bit == width {
                return Err(format!("bitmap {text} has more than {width} bits"));
            }
            match c {
                '0' => bitmap.mask |= 1 << bit,
                '1' => {
                    bitmap.mask |= 1 << bit;
                    bitmap.value |= 1 << bit;
                }
                'x' | 'X' => {}
                _ => return Err(format!("bitmap {text} holds '{c}'; use 0, 1, x or _")),
            }
        }
        Ok(bitmap)
    }

    pub fn apply(&self, register: u64) -> u64 {
        (register & !self.mask) | (self.value & self.mask)
    }
}

/// A number in a template: `0x` hexadecimal or decimal.
pub fn parse_number(text: &str) -> Result<u64, String> {
    let parsed = match text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        Some(hex) => u64::from_str_radix(&hex.replace('_', ""), 16),
        None => text.parse(),
    };
    parsed.map_err(|_| format!("'{text}' is not a number; write it in decimal or as 0x hexadecimal"))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Register {
    Eax,
    Ebx,
    Ecx,
    Edx,
}

impl Register {
    pub fn parse(text: &str) -> Result<Register, String> {
        match text {
            "eax" => Ok(Register::Eax),
            "ebx" => Ok(Register::Ebx),
            "ecx" => Ok(Register::Ecx),
            "edx" => Ok(Register::Edx),
            _ => Err(format!("register '{text}' is none of eax, ebx, ecx, edx")),
        }
    }

    fn of(self, e: &mut kvm_cpuid_entry2) -> &mut u32 {
        match self {
            Register::Eax => &mut e.eax,
            Register::Ebx => &mut e.ebx,
            Register::Ecx => &mut e.ecx,
            Register::Edx => &mut e.edx,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Register::Eax => "eax",
            Register::Ebx => "ebx",
            Register::Ecx => "ecx",
            Register::Edx => "edx",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuidModifier {
    pub leaf: u32,
    pub subleaf: u32,
    pub register: Register,
    pub bitmap: Bitmap,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MsrModifier {
    pub addr: u32,
    pub bitmap: Bitmap,
}

/// A parsed custom CPU template (x86_64).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CpuTemplate {
    pub cpuid: Vec<CpuidModifier>,
    pub msrs: Vec<MsrModifier>,
    /// KVM capabilities (KVM_CAP_* numbers) the host must have.
    pub required_capabilities: Vec<u32>,
}

impl CpuTemplate {
    /// Changes KVM's supported CPUID as the template says; refuses a leaf KVM does not report
    /// and a bit set that KVM does not support.
    pub fn apply_cpuid(&self, cpuid: &mut CpuId) -> Result<(), String> {
        for m in &self.cpuid {
            let entry =
                cpuid.as_mut_slice().iter_mut().find(|e| e.function == m.leaf && e.index == m.subleaf).ok_or_else(
                    || {
                        format!(
                            "CPUID leaf {:#x} subleaf {:#x} is not one this host's KVM reports; remove its modifier",
                            m.leaf, m.subleaf
                        )
                    },
                )?;
            let register = m.register.of(entry);
            let wanted = m.bitmap.apply(u64::from(*register)) as u32;
            let added = wanted & !*register;
            if added != 0 {
                return Err(format!(
                    "CPUID leaf {:#x} subleaf {:#x} {}: bits {added:#x} are not supported by this host; a template may \
                     clear features, not add them",
                    m.leaf,
                    m.subleaf,
                    m.register.name()
                ));
            }
            *register = wanted;
        }
        Ok(())
    }
}

/// A CPUID feature bit: leaf, subleaf, register, bit.
type Feature = (u32, u32, Register, u8);

const fn f(leaf: u32, subleaf: u32, register: Register, bit: u8) -> Feature {
    (leaf, subleaf, register, bit)
}

use Register::{Eax, Ebx, Ecx, Edx};

/// What none of the static templates shows: the host's own monitoring, power, debug-store,
/// virtualization and enclave features, TSX, MPX, processor trace, protection keys, 5-level
/// paging, the compacted and supervisor XSAVE forms, and 1 GiB pages.
const HOST_ONLY: &[Feature] = &[
    f(1, 0, Ecx, 2),   // DTES64
    f(1, 0, Ecx, 3),   // MONITOR
    f(1, 0, Ecx, 4),   // DS-CPL
    f(1, 0, Ecx, 5),   // VMX
    f(1, 0, Ecx, 6),   // SMX
    f(1, 0, Ecx, 7),   // EIST
    f(1, 0, Ecx, 8),   // TM2
    f(1, 0, Ecx, 10),  // CNXT-ID
    f(1, 0, Ecx, 11),  // SDBG
    f(1, 0, Ecx, 14),  // xTPR update control
    f(1, 0, Ecx, 15),  // PDCM
    f(1, 0, Ecx, 18),  // DCA
    f(1, 0, Edx, 18),  // PSN
    f(1, 0, Edx, 21),  // DS
    f(1, 0, Edx, 22),  // ACPI thermal
    f(1, 0, Edx, 27),  // SS
    f(1, 0, Edx, 29),  // TM
    f(1, 0, Edx, 31),  // PBE
    f(7, 0, Ebx, 2),   // SGX
    f(7, 0, Ebx, 4),   // HLE
    f(7, 0, Ebx, 11),  // RTM
    f(7, 0, Ebx, 12),  // RDT monitoring
    f(7, 0, Ebx, 14),  // MPX
    f(7, 0, Ebx, 15),  // RDT allocation
    f(7, 0, Ebx, 25),  // processor trace
    f(7, 0, Ecx, 3),   // PKU
    f(7, 0, Ecx, 4),   // OSPKE
    f(7, 0, Ecx, 5),   // WAITPKG
    f(7, 0, Ecx, 16),  // LA57
    f(7, 0, Ecx, 30),  // SGX launch control
    f(0xd, 0, Eax, 3), // MPX state
    f(0xd, 0, Eax, 4),
    f(0xd, 0, Eax, 9),          // PKRU state
    f(0xd, 1, Eax, 1),          // XSAVEC
    f(0xd, 1, Eax, 2),          // XGETBV with ECX 1
    f(0xd, 1, Eax, 3),          // XSAVES
    f(0x8000_0001, 0, Edx, 26), // 1 GiB pages
];

/// AVX-512 in all its parts, and its XSAVE state.
const AVX512: &[Feature] = &[
    f(7, 0, Ebx, 16),  // F
    f(7, 0, Ebx, 17),  // DQ
    f(7, 0, Ebx, 21),  // IFMA
    f(7, 0, Ebx, 26),  // PF
    f(7, 0, Ebx, 27),  // ER
    f(7, 0, Ebx, 28),  // CD
    f(7, 0, Ebx, 30),  // BW
    f(7, 0, Ebx, 31),  // VL
    f(7, 0, Ecx, 1),   // VBMI
    f(7, 0, Ecx, 6),   // VBMI2
    f(7, 0, Ecx, 11),  // VNNI
    f(7, 0, Ecx, 12),  // BITALG
    f(7, 0, Ecx, 14),  // VPOPCNTDQ
    f(7, 0, Edx, 2),   // 4VNNIW
    f(7, 0, Edx, 3),   // 4FMAPS
    f(7, 0, Edx, 8),   // VP2INTERSECT
    f(7, 0, Edx, 23),  // FP16
    f(7, 1, Eax, 5),   // BF16
    f(0xd, 0, Eax, 5), // opmask, ZMM state
    f(0xd, 0, Eax, 6),
    f(0xd, 0, Eax, 7),
];

/// What processors after Haswell added (T2's and C3's processors lack them).
const AFTER_HASWELL: &[Feature] = &[
    f(7, 0, Ebx, 18),          // RDSEED
    f(7, 0, Ebx, 19),          // ADX
    f(7, 0, Ebx, 20),          // SMAP
    f(7, 0, Ebx, 23),          // CLFLUSHOPT
    f(7, 0, Ebx, 24),          // CLWB
    f(7, 0, Ebx, 29),          // SHA
    f(7, 0, Ecx, 8),           // GFNI
    f(7, 0, Ecx, 9),           // VAES
    f(7, 0, Ecx, 10),          // VPCLMULQDQ
    f(7, 0, Ecx, 22),          // RDPID
    f(7, 0, Ecx, 27),          // MOVDIRI
    f(7, 0, Ecx, 28),          // MOVDIR64B
    f(0x8000_0001, 0, Ecx, 8), // PREFETCHW
    f(0x8000_0008, 0, Ebx, 9), // WBNOINVD
];

/// What Haswell added over Ivy Bridge (C3's processor).
const HASWELL: &[Feature] = &[
    f(1, 0, Ecx, 12),          // FMA
    f(1, 0, Ecx, 22),          // MOVBE
    f(7, 0, Ebx, 3),           // BMI1
    f(7, 0, Ebx, 5),           // AVX2
    f(7, 0, Ebx, 8),           // BMI2
    f(7, 0, Ebx, 10),          // INVPCID
    f(0x8000_0001, 0, Ecx, 5), // LZCNT
];

/// AMD's own features, and what AMD's Milan has that Intel's Cascade Lake lacks (T2A hides
/// them so that its guests can move to T2CL hosts).
const AMD_BEYOND_CASCADE_LAKE: &[Feature] = &[
    f(7, 0, Ebx, 29),           // SHA
    f(7, 0, Ecx, 9),            // VAES
    f(7, 0, Ecx, 10),           // VPCLMULQDQ
    f(7, 0, Ecx, 22),           // RDPID
    f(0x8000_0001, 0, Ecx, 2),  // SVM
    f(0x8000_0001, 0, Ecx, 3),  // extended APIC space
    f(0x8000_0001, 0, Ecx, 6),  // SSE4A
    f(0x8000_0001, 0, Ecx, 7),  // misaligned SSE
    f(0x8000_0001, 0, Ecx, 9),  // OSVW
    f(0x8000_0001, 0, Ecx, 10), // IBS
    f(0x8000_0001, 0, Ecx, 11), // XOP
    f(0x8000_0001, 0, Ecx, 12), // SKINIT
    f(0x8000_0001, 0, Ecx, 13), // watchdog timer
    f(0x8000_0001, 0, Ecx, 15), // LWP
    f(0x8000_0001, 0, Ecx, 16), // FMA4
    f(0x8000_0001, 0, Ecx, 17), // translation cache extension
    f(0x8000_0001, 0, Ecx, 21), // TBM
    f(0x8000_0001, 0, Ecx, 22), // topology extensions
    f(0x8000_0001, 0, Ecx, 23), // core performance counters
    f(0x8000_0001, 0, Ecx, 24), // northbridge performance counters
    f(0x8000_0001, 0, Ecx, 26), // data breakpoint extension
    f(0x8000_0001, 0, Ecx, 27), // performance timestamp counter
    f(0x8000_0001, 0, Ecx, 28), // L2I performance counters
    f(0x8000_0001, 0, Ecx, 29), // MONITORX
];

/// Firecracker's static CPU templates (machine-config `cpu_template`), named after EC2
/// instance families: each hides the CPUID features that family's processor lacks, so that
/// the guest sees no more than it would there (and can move between hosts that have at least
/// that). They only hide features: the processor signature and the rest stay the host's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StaticTemplate {
    /// Ivy Bridge.
    C3,
    /// Haswell and Broadwell.
    T2,
    /// As T2 for CPUID (Firecracker's T2S also changes IA32_ARCH_CAPABILITIES; Ferrovisor
    /// leaves MSRs as KVM sets them).
    T2S,
    /// Intel Cascade Lake, compatible with T2A.
    T2CL,
    /// AMD Milan, compatible with T2CL.
    T2A,
}

impl StaticTemplate {
    /// The template `name` names; None for "None". The error is a sentence's middle.
    pub fn parse(name: &str) -> Result<Option<StaticTemplate>, String> {
        Ok(Some(match name {
            "None" => return Ok(None),
            "C3" => StaticTemplate::C3,
            "T2" => StaticTemplate::T2,
            "T2S" => StaticTemplate::T2S,
            "T2CL" => StaticTemplate::T2CL,
            "T2A" => StaticTemplate::T2A,
            "V1N1" => return Err("V1N1 is a template for aarch64 hosts; this one is x86_64".into()),
            _ => return Err(format!("'{name}' is none of C3, T2, T2S, T2CL, T2A and None")),
        }))
    }

    fn hidden(self) -> Vec<Feature> {
        let groups: &[&[Feature]] = match self {
            StaticTemplate::C3 => &[HOST_ONLY, AVX512, AFTER_HASWELL, HASWELL],
            StaticTemplate::T2 | StaticTemplate::T2S => &[HOST_ONLY, AVX512, AFTER_HASWELL],
            StaticTemplate::T2CL => &[HOST_ONLY, AVX512],
            StaticTemplate::T2A => &[HOST_ONLY, AVX512, AMD_BEYOND_CASCADE_LAKE],
        };
        groups.iter().flat_map(|g| g.iter().copied()).collect()
    }

    /// Clears the template's features in `cpuid` (leaves the host lacks are skipped); returns
    /// how many of them the host had.
    pub fn apply(self, cpuid: &mut CpuId) -> usize {
        let mut hidden = 0;
        for (leaf, subleaf, register, bit) in self.hidden() {
            let entries = cpuid.as_mut_slice().iter_mut();
            for entry in entries.filter(|e| e.function == leaf && e.index == subleaf) {
                let value = register.of(entry);
                if *value & (1 << bit) != 0 {
                    *value &= !(1u32 << bit);
                    hidden += 1;
                }
            }
        }
        hidden
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_templates_hide_what_their_processors_lack_and_nothing_else() {
        let full = |function, index| kvm_cpuid_entry2 {
            function,
            index,
            eax: u32::MAX,
            ebx: u32::MAX,
            ecx: u32::MAX,
            edx: u32::MAX,
            ..Default::default()
        };
        let host = [full(1, 0), full(7, 0), full(7, 1), full(0xd, 0), full(0xd, 1), full(0x8000_0001, 0)];
        let after = |t: StaticTemplate| {
            let mut cpuid = CpuId::from_entries(&host).unwrap();
            let hidden = t.apply(&mut cpuid);
            (hidden, cpuid.as_slice().to_vec())
        };
        let reg = |entries: &[kvm_cpuid_entry2], leaf: u32, r: fn(&kvm_cpuid_entry2) -> u32| {
            entries.iter().find(|e| e.function == leaf && e.index == 0).map(r).unwrap()
        };
        let (c3_hidden, c3) = after(StaticTemplate::C3);
        let (t2_hidden, t2) = after(StaticTemplate::T2);
        let (t2cl_hidden, t2cl) = after(StaticTemplate::T2CL);
        let (t2a_hidden, t2a) = after(StaticTemplate::T2A);
        // AVX2 (leaf 7 EBX bit 5): on T2's Haswell, not on C3's Ivy Bridge.
        assert_eq!(reg(&c3, 7, |e| e.ebx) & (1 << 5), 0);
        assert_ne!(reg(&t2, 7, |e| e.ebx) & (1 << 5), 0);
        // AVX-512F hidden everywhere; RDSEED shown on T2CL, not on T2; VMX nowhere.
        for entries in [&c3, &t2, &t2cl, &t2a] {
            assert_eq!(reg(entries, 7, |e| e.ebx) & (1 << 16), 0);
            assert_eq!(reg(entries, 1, |e| e.ecx) & (1 << 5), 0);
            assert_ne!(reg(entries, 1, |e| e.ecx) & (1 << 0), 0, "SSE3 stays");
        }
        assert_eq!(reg(&t2, 7, |e| e.ebx) & (1 << 18), 0);
        assert_ne!(reg(&t2cl, 7, |e| e.ebx) & (1 << 18), 0);
        // T2A hides AMD's SSE4A, which T2CL (for Intel hosts, which lack it) leaves alone.
        assert_eq!(reg(&t2a, 0x8000_0001, |e| e.ecx) & (1 << 6), 0);
        assert!(c3_hidden > t2_hidden && t2_hidden > t2cl_hidden && t2a_hidden > t2cl_hidden);
        // A host without a leaf: skipped, not refused.
        let mut bare = CpuId::from_entries(&[full(1, 0)]).unwrap();
        assert_eq!(StaticTemplate::T2.apply(&mut bare), 18);
        assert_eq!(StaticTemplate::parse("None"), Ok(None));
        assert!(StaticTemplate::parse("V1N1").unwrap_err().contains("aarch64"));
        assert!(StaticTemplate::parse("T3").unwrap_err().contains("none of"));
    }

    #[test]
    fn bitmaps_set_clear_and_leave_bits() {
        let b = Bitmap::parse("0b1x0_1", 32).unwrap();
        assert_eq!((b.mask, b.value), (0b1011, 0b1001));
        assert_eq!(b.apply(0b0110), 0b1101);
        assert!(Bitmap::parse("0b12", 32).unwrap_err().contains("'2'"));
        assert!(Bitmap::parse("101", 32).unwrap_err().contains("0b"));
        assert!(Bitmap::parse(&format!("0b{}", "x".repeat(33)), 32).unwrap_err().contains("more than 32"));
        assert_eq!(parse_number("0x1f").unwrap(), 31);
        assert_eq!(parse_number("7").unwrap(), 7);
        assert!(parse_number("seven").is_err());
    }

    #[test]
    fn a_template_hides_features_but_cannot_add_them() {
        let entry = kvm_cpuid_entry2 { function: 7, index: 0, ebx: 0b1010, ..Default::default() };
        let mut cpuid = CpuId::from_entries(&[entry]).unwrap();
        let clear = |bitmap: &str| CpuTemplate {
            cpuid: vec![CpuidModifier {
                leaf: 7,
                subleaf: 0,
                register: Register::Ebx,
                bitmap: Bitmap::parse(bitmap, 32).unwrap(),
            }],
            ..Default::default()
        };
        clear("0b0xxx").apply_cpuid(&mut cpuid).unwrap();
        assert_eq!(cpuid.as_slice()[0].ebx, 0b0010);
        let err = clear("0bx1xx").apply_cpuid(&mut cpuid).unwrap_err();
        assert!(err.contains("bits 0x4 are not supported"), "{err}");
        let mut missing = clear("0b0");
        missing.cpuid[0].leaf = 0x8000_0099;
        assert!(missing.apply_cpuid(&mut cpuid).unwrap_err().contains("not one this host's KVM reports"));
    }
}
