//! Instructions the probe's ring-3 code uses to reach hardware.

use core::arch::asm;

/// `out %al,%dx`; on hosts that fault port I/O at CPL 3, ring 0 completes it.
#[inline(always)]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port output touches no memory; the probe owns the machine.
    unsafe { asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags)) };
}

/// `in %dx,%al`.
#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: port input touches no memory.
    unsafe { asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags)) };
    value
}

/// `out %eax,%dx`.
#[inline(always)]
pub fn outl(port: u16, value: u32) {
    // SAFETY: port output touches no memory.
    unsafe { asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags)) };
}

/// `in %dx,%eax`.
#[inline(always)]
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: port input touches no memory.
    unsafe { asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags)) };
    value
}

/// `rep outsb`: one trap per string where ring 0 has to complete port I/O.
#[inline(always)]
pub fn outsb(port: u16, bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    // SAFETY: reads `bytes.len()` bytes from a live slice.
    unsafe {
        asm!("rep outsb", in("dx") port, inout("rsi") bytes.as_ptr() => _, inout("rcx") bytes.len() => _,
             options(readonly, nostack, preserves_flags));
    }
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: rdtsc has no memory effects.
    unsafe { core::arch::x86_64::_rdtsc() }
}

pub fn cpuid(leaf: u32) -> core::arch::x86_64::CpuidResult {
    core::arch::x86_64::__cpuid(leaf)
}

/// CPUID as the VM answers it: ring 0 runs it (the #GP handler takes `rdmsr` from ring 3 to
/// mean this), since some hosts run guest ring 3 natively and its CPUID then shows the host.
pub fn vm_cpuid(leaf: u32, subleaf: u32) -> core::arch::x86_64::CpuidResult {
    let (eax, ebx, ecx, edx): (u32, u32, u32, u32);
    // SAFETY: rdmsr from ring 3 traps to the probe's ring 0, which runs CPUID and returns; rbx
    // is saved around it because the compiler reserves it.
    unsafe {
        asm!("mov {saved:r}, rbx", "rdmsr", "xchg {saved:r}, rbx", saved = out(reg) ebx,
             inout("eax") leaf => eax, inout("ecx") subleaf => ecx, out("edx") edx, options(nostack, preserves_flags));
    }
    core::arch::x86_64::CpuidResult { eax, ebx, ecx, edx }
}

/// Reads a 32-bit device register. The caller names an address that is MMIO or RAM in the
/// identity map (the first 4 GiB).
pub fn mmio_read32(addr: u64) -> u32 {
    // SAFETY: the first 4 GiB are identity-mapped; a read of MMIO or RAM there is defined.
    unsafe { core::ptr::read_volatile(addr as *const u32) }
}

pub fn mmio_write32(addr: u64, value: u32) {
    // SAFETY: as for mmio_read32.
    unsafe { core::ptr::write_volatile(addr as *mut u32, value) }
}

/// Busy-waits `cycles` TSC cycles.
pub fn spin_cycles(cycles: u64) {
    let start = rdtsc();
    while rdtsc().wrapping_sub(start) < cycles {
        core::hint::spin_loop();
    }
}

/// Parks this CPU for good: `hlt` at CPL 3 traps and ring 0 halts with interrupts off.
pub fn park() -> ! {
    loop {
        // SAFETY: traps to ring 0, which never returns.
        unsafe { asm!("hlt", options(nomem, nostack)) };
    }
}

/// Tells ring 0 that a ring-3 `hlt` means "end the VM" (boot.S).
const RESET_MAGIC: u64 = 0x7e5e7;

/// Ends the VM: an i8042 reset, and where there is no i8042 (QEMU microvm), a triple fault
/// from ring 0, which `-no-reboot` turns into an exit.
pub fn reset() -> ! {
    outb(0x64, 0xfe);
    // SAFETY: traps to ring 0, which resets and never returns.
    unsafe { asm!("hlt", in("rax") RESET_MAGIC, options(noreturn, nomem, nostack)) }
}
