//! `smp`: start every other CPU with INIT-SIPI-SIPI; each reports its xAPIC ID. The IDs CPUID
//! leaf 1 gives in ring 3 are reported beside them but not checked: some hosts run ring-3
//! CPUID natively, so it shows the host's IDs. `probe.smp.cpus=N` says how many CPUs to expect; without it the probe counts
//! the processors of the MP table, and failing that waits about a second for whoever comes.

use core::fmt;
use core::sync::atomic::{AtomicU32, Ordering};

use crate::cmdline::Cmdline;
use crate::{hw, report};

/// As many as boot.S has TSS descriptors and boot records for.
pub const MAX_APS: usize = 15;
const LAPIC: u64 = 0xfee0_0000;
const LAPIC_ID: u64 = LAPIC + 0x20;
const ICR_LOW: u64 = LAPIC + 0x300;
const ICR_HIGH: u64 = LAPIC + 0x310;
const ICR_INIT_ALL_BUT_SELF: u32 = 0x000c_4500;
const ICR_SIPI_ALL_BUT_SELF: u32 = 0x000c_4600;
const TRAMPOLINE: u64 = 0x8000;
const RING0_STACK: usize = 8192;
const RING3_STACK: usize = 16384;
const TSS_SIZE: usize = 104;
/// About a second at the TSC rates of today's hosts.
const ARRIVAL_TIMEOUT_CYCLES: u64 = 3_000_000_000;

unsafe extern "C" {
    static ap_trampoline_start: u8;
    static ap_trampoline_end: u8;
    static mut gdt_ap_tss: [[u8; 16]; MAX_APS];
    static mut ap_boot_records: [[u64; 2]; MAX_APS];
}

#[repr(C, align(4096))]
struct ApArea {
    ring0: [[u8; RING0_STACK]; MAX_APS],
    ring3: [[u8; RING3_STACK]; MAX_APS],
    tss: [[u8; TSS_SIZE]; MAX_APS],
}

static mut AP_AREA: ApArea =
    ApArea { ring0: [[0; RING0_STACK]; MAX_APS], ring3: [[0; RING3_STACK]; MAX_APS], tss: [[0; TSS_SIZE]; MAX_APS] };

static ARRIVED: AtomicU32 = AtomicU32::new(0);
static AP_APIC_IDS: [AtomicU32; MAX_APS] = [const { AtomicU32::new(u32::MAX) }; MAX_APS];
static AP_CPUID_IDS: [AtomicU32; MAX_APS] = [const { AtomicU32::new(u32::MAX) }; MAX_APS];

fn apic_id() -> u32 {
    hw::mmio_read32(LAPIC_ID) >> 24
}

fn cpuid_apic_id() -> u32 {
    hw::cpuid(1).ebx >> 24
}

/// Ring 3 of each AP lands here with the slot boot.S gave it.
#[unsafe(no_mangle)]
pub extern "C" fn probe_ap_main(slot: u64) -> ! {
    let slot = slot as usize;
    if let (Some(apic), Some(cpuid)) = (AP_APIC_IDS.get(slot), AP_CPUID_IDS.get(slot)) {
        cpuid.store(cpuid_apic_id(), Ordering::Relaxed);
        apic.store(apic_id(), Ordering::Relaxed);
    }
    ARRIVED.fetch_add(1, Ordering::Release);
    hw::park()
}

/// Gives each AP slot its stacks and a TSS, and the GDT a descriptor for that TSS.
fn prepare_ap_slots() {
    // SAFETY: the APs are not started yet, so ring 3 on the BSP is the only user of these
    // statics; raw pointers avoid references to mutable statics.
    unsafe {
        let area = &raw mut AP_AREA;
        for slot in 0..MAX_APS {
            let ring0_top = (&raw mut (*area).ring0[slot]) as u64 + RING0_STACK as u64;
            let ring3_top = (&raw mut (*area).ring3[slot]) as u64 + RING3_STACK as u64;
            let tss = &raw mut (*area).tss[slot];
            let mut image = [0u8; TSS_SIZE];
            image[4..12].copy_from_slice(&ring0_top.to_le_bytes()); // RSP0
            image[102..104].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes()); // no I/O bitmap
            tss.write(image);
            // SysV: rsp is 8 mod 16 at a function's entry.
            (*(&raw mut ap_boot_records))[slot] = [ring0_top, ring3_top - 8];
            (*(&raw mut gdt_ap_tss))[slot] = tss_descriptor(tss as u64);
        }
    }
}

/// A 64-bit available-TSS descriptor.
fn tss_descriptor(base: u64) -> [u8; 16] {
    let mut d = [0u8; 16];
    d[0..2].copy_from_slice(&(TSS_SIZE as u16 - 1).to_le_bytes());
    d[2..4].copy_from_slice(&(base as u16).to_le_bytes());
    d[4] = (base >> 16) as u8;
    d[5] = 0x89;
    d[7] = (base >> 24) as u8;
    d[8..12].copy_from_slice(&((base >> 32) as u32).to_le_bytes());
    d
}

/// Processors in the MP table, if the VMM wrote one where BIOSes do.
fn mp_table_cpus() -> Option<u32> {
    let candidates = (0x9fc00u64..0xa0000).step_by(16).chain((0xf0000u64..0x10_0000).step_by(16));
    for at in candidates {
        if hw::mmio_read32(at) != u32::from_le_bytes(*b"_MP_") {
            continue;
        }
        let table = u64::from(hw::mmio_read32(at + 4));
        if table == 0 || table >= 0x10_0000 || hw::mmio_read32(table) != u32::from_le_bytes(*b"PCMP") {
            return None;
        }
        let count = hw::mmio_read32(table + 32) >> 16;
        let mut entry = table + 44;
        let mut cpus = 0;
        for _ in 0..count.min(1024) {
            let kind = hw::mmio_read32(entry) & 0xff;
            if kind == 0 {
                cpus += 1;
                entry += 20;
            } else {
                entry += 8;
            }
        }
        return Some(cpus);
    }
    None
}

struct IdList<'a>(&'a [u32]);

impl fmt::Display for IdList<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, id) in self.0.iter().enumerate() {
            write!(f, "{}{id}", if i == 0 { "" } else { "," })?;
        }
        Ok(())
    }
}

pub fn run(cmdline: Cmdline) {
    let expected = cmdline.param("smp", "cpus").and_then(crate::cmdline::parse_number).map(|n| n as u32).or_else(mp_table_cpus).filter(|&n| n > 0);
    if expected.is_some_and(|n| n as usize > MAX_APS + 1) {
        return report::fail("smp", format_args!("the probe starts at most {} CPUs", MAX_APS + 1));
    }
    prepare_ap_slots();
    // SAFETY: copies the trampoline (a few dozen bytes inside the image) to 0x8000, free RAM
    // below 1 MiB that nothing else uses once the VMM's boot tables have been read.
    unsafe {
        let start = &raw const ap_trampoline_start;
        let len = (&raw const ap_trampoline_end) as usize - start as usize;
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len);
    }
    let bsp = apic_id();
    let started = hw::rdtsc();
    hw::mmio_write32(ICR_HIGH, 0);
    hw::mmio_write32(ICR_LOW, ICR_INIT_ALL_BUT_SELF);
    hw::spin_cycles(10_000_000);
    for _ in 0..2 {
        hw::mmio_write32(ICR_LOW, ICR_SIPI_ALL_BUT_SELF | (TRAMPOLINE >> 12) as u32);
        hw::spin_cycles(1_000_000);
    }
    let wanted_aps = expected.map(|n| n.saturating_sub(1));
    while hw::rdtsc().wrapping_sub(started) < ARRIVAL_TIMEOUT_CYCLES {
        if wanted_aps.is_some_and(|n| ARRIVED.load(Ordering::Acquire) >= n) {
            break;
        }
        core::hint::spin_loop();
    }
    let arrived = ARRIVED.load(Ordering::Acquire) as usize;
    let mut ids = [0u32; MAX_APS + 1];
    let mut cpuid_ids = [0u32; MAX_APS + 1];
    (ids[0], cpuid_ids[0]) = (bsp, cpuid_apic_id());
    let mut n = 1;
    for (apic, cpuid) in AP_APIC_IDS.iter().zip(&AP_CPUID_IDS) {
        let id = apic.load(Ordering::Relaxed);
        if id != u32::MAX {
            (ids[n], cpuid_ids[n]) = (id, cpuid.load(Ordering::Relaxed));
            n += 1;
        }
    }
    ids[..n].sort_unstable();
    cpuid_ids[..n].sort_unstable();
    let (ids, cpuid_ids) = (&ids[..n], &cpuid_ids[..n]);
    let cycles = hw::rdtsc().wrapping_sub(started);
    if let Some(want) = expected.filter(|&want| want as usize != arrived + 1) {
        return report::fail("smp", format_args!("expected {want} CPUs, {} came up (apic_ids={})", arrived + 1, IdList(ids)));
    }
    if ids.windows(2).any(|w| w[0] == w[1]) {
        return report::fail("smp", format_args!("APIC IDs repeat: {}", IdList(ids)));
    }
    report::ok(
        "smp",
        format_args!("cpus={n} apic_ids={} cpuid_apic_ids={} cycles={cycles}", IdList(ids), IdList(cpuid_ids)),
    );
}
