//! The report printed when a guest stops in a way the VMM cannot recover from: the exit
//! reason, where the vCPU was, and the instruction bytes it was running.

use std::fmt;

use kvm_bindings::{kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use arch::GuestMemory;

/// The longest x86 instruction.
const MAX_INSTRUCTION_LEN: usize = 15;
const CR0_PE: u64 = 1;
const CR0_PG: u64 = 1 << 31;
const EFER_LMA: u64 = 1 << 10;

#[derive(Debug, Clone)]
pub struct GuestFault {
    pub vcpu: u32,
    /// What KVM reported, e.g. "a triple fault (KVM_EXIT_SHUTDOWN)".
    pub reason: String,
    pub rip: u64,
    pub mode: &'static str,
    pub cpl: u8,
    /// Bytes at RIP, or why they could not be read.
    pub code: Result<Vec<u8>, &'static str>,
}

impl fmt::Display for GuestFault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "vCPU {} stopped on {} at RIP {:#x} ({}, CPL {}); ",
            self.vcpu, self.reason, self.rip, self.mode, self.cpl
        )?;
        match &self.code {
            Ok(bytes) => {
                write!(f, "instruction bytes at RIP:")?;
                for b in bytes {
                    write!(f, " {b:02x}")?;
                }
                Ok(())
            }
            Err(why) => write!(f, "instruction bytes unavailable: {why}"),
        }
    }
}

/// The processor mode the segment and control registers describe.
pub fn cpu_mode(sregs: &kvm_sregs) -> &'static str {
    if sregs.cr0 & CR0_PE == 0 {
        "real mode"
    } else if sregs.efer & EFER_LMA != 0 {
        if sregs.cs.l == 1 { "64-bit long mode" } else { "compatibility mode" }
    } else if sregs.cr0 & CR0_PG != 0 {
        "32-bit protected mode, paging on"
    } else {
        "32-bit protected mode, paging off"
    }
}

/// The linear address of the instruction at RIP.
pub fn code_linear_address(regs: &kvm_regs, sregs: &kvm_sregs) -> u64 {
    if sregs.cr0 & CR0_PE == 0 {
        sregs.cs.base.wrapping_add(regs.rip & 0xffff)
    } else if sregs.efer & EFER_LMA != 0 && sregs.cs.l == 1 {
        regs.rip
    } else {
        sregs.cs.base.wrapping_add(regs.rip) & 0xffff_ffff
    }
}

/// Reads up to one instruction's bytes from guest RAM, stopping at the end of RAM.
pub fn read_code(mem: &GuestMemory, gpa: u64) -> Vec<u8> {
    let mut bytes = Vec::with_capacity(MAX_INSTRUCTION_LEN);
    for i in 0..MAX_INSTRUCTION_LEN as u64 {
        let Some(addr) = gpa.checked_add(i) else { break };
        match mem.read_obj::<u8>(GuestAddress(addr)) {
            Ok(b) => bytes.push(b),
            Err(_) => break,
        }
    }
    bytes
}

/// Builds the report for `vcpu`, reading its registers and the code at RIP.
pub fn describe(vcpu: &VcpuFd, index: u32, mem: &GuestMemory, reason: String) -> GuestFault {
    let (regs, sregs) = match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => (r, s),
        _ => {
            return GuestFault {
                vcpu: index,
                reason,
                rip: 0,
                mode: "unknown mode",
                cpl: 0,
                code: Err("KVM did not return the vCPU's registers"),
            };
        }
    };
    let linear = code_linear_address(&regs, &sregs);
    let gpa = if sregs.cr0 & CR0_PG != 0 {
        match vcpu.translate_gva(linear) {
            Ok(t) if t.valid != 0 => Ok(t.physical_address),
            _ => Err("RIP is not mapped by the guest's page tables"),
        }
    } else {
        Ok(linear)
    };
    let code = gpa.and_then(|gpa| {
        let bytes = read_code(mem, gpa);
        if bytes.is_empty() { Err("RIP is outside guest RAM") } else { Ok(bytes) }
    });
    GuestFault { vcpu: index, reason, rip: regs.rip, mode: cpu_mode(&sregs), cpl: sregs.cs.dpl, code }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_is_one_readable_line() {
        let fault = GuestFault {
            vcpu: 1,
            reason: "a triple fault (KVM_EXIT_SHUTDOWN)".into(),
            rip: 0xffff_ffff_8100_0000,
            mode: "64-bit long mode",
            cpl: 0,
            code: Ok(vec![0x0f, 0x0b]),
        };
        assert_eq!(
            fault.to_string(),
            "vCPU 1 stopped on a triple fault (KVM_EXIT_SHUTDOWN) at RIP 0xffffffff81000000 \
             (64-bit long mode, CPL 0); instruction bytes at RIP: 0f 0b"
        );
        let unmapped = GuestFault { code: Err("RIP is outside guest RAM"), ..fault };
        assert!(unmapped.to_string().ends_with("instruction bytes unavailable: RIP is outside guest RAM"));
    }

    #[test]
    fn modes_and_linear_addresses() {
        let mut sregs = kvm_sregs::default();
        let mut regs = kvm_regs { rip: 0x1_0123, ..Default::default() };
        sregs.cs.base = 0x10000;
        assert_eq!(cpu_mode(&sregs), "real mode");
        assert_eq!(code_linear_address(&regs, &sregs), 0x10123);
        sregs.cr0 = CR0_PE;
        sregs.cs.base = 0;
        regs.rip = 0x10_0000;
        assert_eq!(cpu_mode(&sregs), "32-bit protected mode, paging off");
        assert_eq!(code_linear_address(&regs, &sregs), 0x10_0000);
        sregs.cr0 |= CR0_PG;
        sregs.efer = EFER_LMA;
        sregs.cs.l = 1;
        regs.rip = 0xffff_ffff_8100_0000;
        assert_eq!(cpu_mode(&sregs), "64-bit long mode");
        assert_eq!(code_linear_address(&regs, &sregs), 0xffff_ffff_8100_0000);
    }

    #[test]
    fn code_reads_stop_at_the_end_of_ram() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x1000)]).unwrap();
        mem.write_slice(&[0xcc; 4], GuestAddress(0xffc)).unwrap();
        assert_eq!(read_code(&mem, 0xffc), vec![0xcc; 4]);
        assert_eq!(read_code(&mem, 0x10_0000), Vec::<u8>::new());
        assert_eq!(read_code(&mem, u64::MAX).len(), 0);
        assert_eq!(read_code(&mem, 0).len(), MAX_INSTRUCTION_LEN);
    }
}
