//! CPU templates in arch's terms.

/// A custom CPU template in arch's terms; the error names the field and the fix.
pub fn cpu_template(c: &api::models::CpuConfig) -> Result<arch::cpu_template::CpuTemplate, String> {
    use arch::cpu_template::{Bitmap, CpuTemplate, CpuidModifier, MsrModifier, Register, parse_number};
    if !c.vcpu_features.is_empty() || !c.reg_modifiers.is_empty() {
        return Err("cpu-config vcpu_features and reg_modifiers are for aarch64 hosts; this one is x86_64".into());
    }
    let number32 = |field: &str, text: &str| {
        parse_number(text)
            .and_then(|n| u32::try_from(n).map_err(|_| format!("{text} is more than 32 bits")))
            .map_err(|e| format!("cpu-config {field}: {e}"))
    };
    let mut template = CpuTemplate::default();
    for leaf in &c.cpuid_modifiers {
        let (number, subleaf) =
            (number32("cpuid_modifiers leaf", &leaf.leaf)?, number32("cpuid_modifiers subleaf", &leaf.subleaf)?);
        for m in &leaf.modifiers {
            template.cpuid.push(CpuidModifier {
                leaf: number,
                subleaf,
                register: Register::parse(&m.register).map_err(|e| format!("cpu-config cpuid_modifiers: {e}"))?,
                bitmap: Bitmap::parse(&m.bitmap, 32).map_err(|e| format!("cpu-config cpuid_modifiers: {e}"))?,
            });
        }
    }
    for m in &c.msr_modifiers {
        template.msrs.push(MsrModifier {
            addr: number32("msr_modifiers addr", &m.addr)?,
            bitmap: Bitmap::parse(&m.bitmap, 64).map_err(|e| format!("cpu-config msr_modifiers: {e}"))?,
        });
    }
    for cap in &c.kvm_capabilities {
        // "!N" removes capability N from the checks; Ferrovisor checks none by default.
        if let Some(removed) = cap.strip_prefix('!') {
            number32("kvm_capabilities", removed)?;
        } else {
            template.required_capabilities.push(number32("kvm_capabilities", cap)?);
        }
    }
    Ok(template)
}
