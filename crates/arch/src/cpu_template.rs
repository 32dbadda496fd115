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

#[cfg(test)]
mod tests {
    use super::*;

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
