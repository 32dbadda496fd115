//! Applies the boot state to KVM vCPUs: CPUID, MSRs, LAPIC, FPU and, on the boot vCPU, the
//! registers the entry protocol asks for.

use kvm_bindings::{CpuId, Msrs, kvm_fpu, kvm_lapic_state, kvm_msr_entry, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use crate::boot::EntryMode;
use crate::cpu_template::{CpuTemplate, MsrModifier};
use crate::gdt::{CODE_INDEX, DATA_INDEX, TSS_INDEX, boot_gdt, kvm_segment_from_gdt};
use crate::layout::*;
use crate::paging::write_identity_tables;
use crate::{Error, GuestMemory, Result, cpuid};

pub const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const MTRR_ENABLE: u64 = 1 << 11;
const MTRR_TYPE_WRITE_BACK: u64 = 6;

const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

/// The MSR values every vCPU starts with.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let entry = |index, data| kvm_msr_entry { index, data, ..Default::default() };
    vec![
        entry(MSR_IA32_SYSENTER_CS, 0),
        entry(MSR_IA32_SYSENTER_ESP, 0),
        entry(MSR_IA32_SYSENTER_EIP, 0),
        entry(MSR_STAR, 0),
        entry(MSR_CSTAR, 0),
        entry(MSR_KERNEL_GS_BASE, 0),
        entry(MSR_SYSCALL_MASK, 0),
        entry(MSR_LSTAR, 0),
        entry(MSR_IA32_TSC, 0),
        entry(MSR_IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        entry(MSR_MTRR_DEF_TYPE, MTRR_ENABLE | MTRR_TYPE_WRITE_BACK),
    ]
}

fn lapic_reg(lapic: &kvm_lapic_state, offset: usize) -> u32 {
    let b = &lapic.regs[offset..offset + 4];
    u32::from_le_bytes([b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8])
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        lapic.regs[offset + i] = *byte as _;
    }
}

/// Wires LINT0 to the PIC (ExtINT) and LINT1 to NMI, as a BIOS leaves them.
pub fn set_lint_modes(lapic: &mut kvm_lapic_state) {
    let with_mode = |reg: u32, mode: u32| (reg & !0x700) | (mode << 8);
    set_lapic_reg(lapic, APIC_LVT0, with_mode(lapic_reg(lapic, APIC_LVT0), APIC_MODE_EXTINT));
    set_lapic_reg(lapic, APIC_LVT1, with_mode(lapic_reg(lapic, APIC_LVT1), APIC_MODE_NMI));
}

/// Sets the state every vCPU needs, boot vCPU or not.
pub fn configure_vcpu(
    vcpu: &VcpuFd,
    index: u32,
    count: u32,
    supported_cpuid: &CpuId,
    template: Option<&CpuTemplate>,
) -> Result<()> {
    let fail = |what| move |source| Error::Vcpu { index, what, source };
    let mut guest_cpuid = supported_cpuid.clone();
    if let Some(t) = template {
        t.apply_cpuid(&mut guest_cpuid).map_err(Error::Template)?;
    }
    cpuid::apply_topology(guest_cpuid.as_mut_slice(), index, count);
    vcpu.set_cpuid2(&guest_cpuid).map_err(fail("setting CPUID"))?;
    let entries = boot_msrs();
    let msrs = Msrs::from_entries(&entries).expect("the boot MSR list fits a kvm_msrs");
    let written = vcpu.set_msrs(&msrs).map_err(fail("setting MSRs"))?;
    if let Some(refused) = entries.get(written) {
        return Err(Error::MsrRefused { index, msr: refused.index });
    }
    for m in template.map_or(&[][..], |t| &t.msrs) {
        apply_msr_modifier(vcpu, m)?;
    }
    let mut lapic = vcpu.get_lapic().map_err(fail("reading the LAPIC"))?;
    set_lint_modes(&mut lapic);
    vcpu.set_lapic(&lapic).map_err(fail("setting the LAPIC"))?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    vcpu.set_fpu(&fpu).map_err(fail("setting the FPU"))?;
    Ok(())
}

/// Reads MSR `m.addr` as the vCPU has it, changes the template's bits and writes it back; an
/// MSR KVM does not let the guest have, or a value it refuses, is an error.
fn apply_msr_modifier(vcpu: &VcpuFd, m: &MsrModifier) -> Result<()> {
    let mut msrs =
        Msrs::from_entries(&[kvm_msr_entry { index: m.addr, ..Default::default() }]).expect("one MSR fits a kvm_msrs");
    let unknown =
        || Error::Template(format!("MSR {:#x} is not one this host's KVM gives a guest; remove its modifier", m.addr));
    if vcpu.get_msrs(&mut msrs).map_err(|_| unknown())? != 1 {
        return Err(unknown());
    }
    let value = m.bitmap.apply(msrs.as_slice()[0].data);
    let msrs = Msrs::from_entries(&[kvm_msr_entry { index: m.addr, data: value, ..Default::default() }])
        .expect("one MSR fits a kvm_msrs");
    match vcpu.set_msrs(&msrs) {
        Ok(1) => Ok(()),
        _ => Err(Error::Template(format!("KVM refused MSR {:#x} = {value:#x}; change its modifier", m.addr))),
    }
}

/// Sets the boot vCPU's registers for `mode` and writes the GDT, IDT and page tables it uses.
pub fn configure_boot_vcpu(vcpu: &VcpuFd, mem: &GuestMemory, mode: EntryMode, entry: u64) -> Result<()> {
    let fail = |what| move |source| Error::Vcpu { index: 0, what, source };
    let long_mode = mode == EntryMode::Linux64;
    let gdt = boot_gdt(long_mode);
    for (i, e) in gdt.iter().enumerate() {
        let at = BOOT_GDT_START + i as u64 * 8;
        mem.write_obj(*e, GuestAddress(at)).map_err(|_| Error::GuestWrite { what: "GDT", addr: at })?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))
        .map_err(|_| Error::GuestWrite { what: "IDT", addr: BOOT_IDT_START })?;

    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(fail("reading segment registers"))?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = 7;
    let code = kvm_segment_from_gdt(gdt[CODE_INDEX as usize], CODE_INDEX);
    let data = kvm_segment_from_gdt(gdt[DATA_INDEX as usize], DATA_INDEX);
    sregs.cs = code;
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment_from_gdt(gdt[TSS_INDEX as usize], TSS_INDEX);

    let mut regs = kvm_regs { rflags: 0x2, rip: entry, ..Default::default() };
    match mode {
        EntryMode::Pvh => {
            sregs.cr0 = CR0_PE;
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rbx = PVH_INFO_START;
        }
        EntryMode::Linux64 => {
            sregs.cr3 = write_identity_tables(mem)?;
            sregs.cr4 |= CR4_PAE;
            sregs.cr0 |= CR0_PE | CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
    }
    vcpu.set_sregs(&sregs).map_err(fail("setting segment registers"))?;
    vcpu.set_regs(&regs).map_err(fail("setting registers"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lint_modes_keep_the_other_bits() {
        let mut lapic = kvm_lapic_state::default();
        set_lapic_reg(&mut lapic, APIC_LVT0, 0x0001_0000);
        set_lapic_reg(&mut lapic, APIC_LVT1, 0x0001_0700);
        set_lint_modes(&mut lapic);
        assert_eq!(lapic_reg(&lapic, APIC_LVT0), 0x0001_0700);
        assert_eq!(lapic_reg(&lapic, APIC_LVT1), 0x0001_0400);
    }

    #[test]
    fn boot_msrs_enable_fast_strings_and_write_back_mtrr() {
        let msrs = boot_msrs();
        let get = |i| msrs.iter().find(|e| e.index == i).unwrap().data;
        assert_eq!(get(MSR_IA32_MISC_ENABLE), 1);
        assert_eq!(get(MSR_MTRR_DEF_TYPE), 0x806);
    }
}
