//! `dma-engine`: a PCI driver for the test DMA engine that `ferrovisor device-server` serves
//! over vfio-user (the VMM assigns it with `--device vfio-user=SOCKET`). It finds the function
//! on bus 0, reads the BARs the VMM placed and sizes one, checks the registers, moves bytes
//! both ways between two guest buffers by DMA, takes the completion as an MSI-X interrupt
//! (seen pending in the local APIC: interrupts stay off in the probe) and by polling,
//! checksums what it wrote into the BAR the VMM mapped into the guest, and resets the
//! function through the reset capability.
//!
//! A completion signalled while its MSI-X vector is masked must wait: its PBA bit set, nothing
//! in the local APIC, then delivered once the vector is unmasked (`masked=held`; otherwise
//! `lost`, `leaked`, `undelivered` or `stuck`, the PBA bit left set).
//! After the reset it takes a completion as MSI, then as INTx through the IOAPIC.
//!
//! `PROBE dma-engine ok slot=S bar0_size=N regs=ok dma=N msix=pending signalled=3 masked=held
//! mapped=ok bad_dma=refused completed=6 reset=ok msi=pending/2 intx=pending/1` (the numbers
//! after the slashes are how the device says it signalled: 3 MSI-X, 2 MSI, 1 INTx).
//! `probe.dma-engine.mode=gone`: afterwards, polls the ID register until the device reads as
//! all ones (its server was killed), then `PROBE dma-engine-gone ok id=... config=...`.
//! `probe.dma-engine.mode=bench`: trapped BAR reads and writes, mapped BAR reads, DMA throughput
//! and interrupt round trips, timed by the TSC.

use crate::cmdline::Cmdline;
use crate::pci;
use crate::virtio::{alloc, bytes};
use crate::{hw, report};

const TEST: &str = "dma-engine";
const ID_MATCH: u32 = 0x1fe0 << 16 | 0x1b36;
const ID: u32 = u32::from_le_bytes(*b"FVMA");
const SCRATCH: u64 = 0x04;
const SRC: u64 = 0x08;
const DST: u64 = 0x10;
const LEN: u64 = 0x18;
const CMD: u64 = 0x1c;
const STATUS: u64 = 0x20;
const RESULT: u64 = 0x24;
const COMPLETED: u64 = 0x28;
const SIGNALLED: u64 = 0x2c;
const CMD_COPY: u32 = 1;
const CMD_CHECKSUM: u32 = 2;
const CMD_CHECKSUM_SHARED: u32 = 3;
const LAPIC: u64 = 0xfee0_0000;
const LAPIC_SVR: u64 = LAPIC + 0xf0;
const LAPIC_IRR: u64 = LAPIC + 0x200;
const FIRST_VECTOR: u32 = 0x50;

fn fnv1a(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5, |h, &b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

struct Engine {
    slot: u8,
    regs: u64,
    msix_table: u64,
    msix_pba: u64,
    shared: u64,
    msix_cap: Option<u8>,
    msi_cap: Option<u8>,
    reset_cap: Option<u8>,
}

impl Engine {
    fn find() -> Option<Engine> {
        let slot = (0..pci::SLOTS).find(|&s| pci::config_read(s, 0) == ID_MATCH)?;
        let bar = |i: u8| u64::from(pci::config_read(slot, 0x10 + 4 * i) & !0xf);
        let shared = bar(2) | u64::from(pci::config_read(slot, 0x1c)) << 32;
        let (mut msix_cap, mut msi_cap, mut reset_cap) = (None, None, None);
        let mut at = (pci::config_read(slot, 0x34) & 0xfc) as u8;
        for _ in 0..48 {
            if at == 0 {
                break;
            }
            let head = pci::config_read(slot, at);
            match head & 0xff {
                0x11 => msix_cap = Some(at),
                0x05 => msi_cap = Some(at),
                0x13 => reset_cap = Some(at),
                _ => {}
            }
            at = ((head >> 8) & 0xfc) as u8;
        }
        let msix_pba = msix_cap.map_or(0, |cap| {
            let pba = pci::config_read(slot, cap + 8);
            bar((pba & 7) as u8) + u64::from(pba & !7)
        });
        Some(Engine { slot, regs: bar(0), msix_table: bar(1), msix_pba, shared, msix_cap, msi_cap, reset_cap })
    }

    fn reg(&self, offset: u64) -> u32 {
        hw::mmio_read32(self.regs + offset)
    }

    fn set(&self, offset: u64, value: u32) {
        hw::mmio_write32(self.regs + offset, value)
    }

    /// Runs `command` over `len` bytes and polls for its completion; its status word.
    fn run(&self, command: u32, src: u64, dst: u64, len: u32, deadline: u64) -> Option<u32> {
        self.set(STATUS, u32::MAX);
        self.set(SRC, src as u32);
        self.set(SRC + 4, (src >> 32) as u32);
        self.set(DST, dst as u32);
        self.set(DST + 4, (dst >> 32) as u32);
        self.set(LEN, len);
        self.set(CMD, command);
        loop {
            let status = self.reg(STATUS);
            if status & 1 != 0 {
                return Some(status);
            }
            if hw::rdtsc() > deadline {
                return None;
            }
            core::hint::spin_loop();
        }
    }

    /// Points MSI-X vector 0 at this CPU's local APIC with `vector`, unmasked.
    fn route_vector0(&self, vector: u32) {
        hw::mmio_write32(self.msix_table, 0xfee0_0000);
        hw::mmio_write32(self.msix_table + 4, 0);
        hw::mmio_write32(self.msix_table + 8, vector);
        hw::mmio_write32(self.msix_table + 12, 0);
    }

    fn msix_enable(&self, on: bool) {
        if let Some(cap) = self.msix_cap {
            let head = pci::config_read(self.slot, cap);
            let control = (head >> 16) & !(1 << 15) | if on { 1 << 15 } else { 0 };
            pci::config_write(self.slot, cap, (head & 0xffff) | control << 16);
        }
    }
}

/// Points the IOAPIC pin `line` at `vector` on this CPU, level-triggered, unmasked.
fn route_ioapic(line: u32, vector: u32) {
    const IOAPIC: u64 = 0xfec0_0000;
    let entry = 0x10 + 2 * line;
    hw::mmio_write32(IOAPIC, entry + 1);
    hw::mmio_write32(IOAPIC + 0x10, 0);
    hw::mmio_write32(IOAPIC, entry);
    hw::mmio_write32(IOAPIC + 0x10, vector | 1 << 15);
}

/// Runs an empty copy and tells whether `vector` became pending, and how the device said it
/// signalled.
fn signal_check(engine: &Engine, vector: u32, deadline: u64) -> (&'static str, u32) {
    let before = irr_pending(vector);
    engine.run(CMD_COPY, 0, 0, 0, deadline);
    wait_until(|| irr_pending(vector));
    (if irr_pending(vector) && !before { "pending" } else { "none" }, engine.reg(SIGNALLED))
}

/// Masks MSI-X vector 0, has the device signal it, and sees whether the interrupt waits in the
/// PBA and reaches the local APIC only once the vector is unmasked.
fn masked_check(engine: &Engine, deadline: u64) -> &'static str {
    let vector = FIRST_VECTOR + 0x30;
    engine.route_vector0(vector);
    hw::mmio_write32(engine.msix_table + 12, 1);
    if engine.run(CMD_COPY, 0, 0, 0, deadline).is_none() {
        return "no-completion";
    }
    // The device signals after it completes: give the signal time to land, wherever it lands.
    wait_until(|| hw::mmio_read32(engine.msix_pba) & 1 != 0 || irr_pending(vector));
    if irr_pending(vector) {
        return "leaked";
    }
    if hw::mmio_read32(engine.msix_pba) & 1 == 0 {
        return "lost";
    }
    hw::mmio_write32(engine.msix_table + 12, 0);
    wait_until(|| irr_pending(vector));
    if !irr_pending(vector) {
        "undelivered"
    } else if hw::mmio_read32(engine.msix_pba) & 1 != 0 {
        "stuck"
    } else {
        "held"
    }
}

/// Spins until `done` or for about 100 M TSC cycles, what a signal takes to land at most.
fn wait_until(done: impl Fn() -> bool) {
    let limit = hw::rdtsc() + 100_000_000;
    while !done() && hw::rdtsc() < limit {
        core::hint::spin_loop();
    }
}

fn irr_pending(vector: u32) -> bool {
    hw::mmio_read32(LAPIC_IRR + u64::from(vector / 32) * 0x10) & (1 << (vector % 32)) != 0
}

pub fn run(cmdline: Cmdline) {
    let Some(engine) = Engine::find() else {
        return report::skip(TEST, format_args!("no test DMA engine (1b36:1fe0) on PCI bus 0"));
    };
    crate::virtio::reset_arena();
    let deadline = || crate::suite::virtio::request_deadline(cmdline);
    // Memory space and bus mastering on; the local APIC software-enabled so that it takes MSIs.
    let command = pci::config_read(engine.slot, 0x04);
    pci::config_write(engine.slot, 0x04, command | 0x6);
    hw::mmio_write32(LAPIC_SVR, hw::mmio_read32(LAPIC_SVR) | 0x1ff);
    match cmdline.param(TEST, "mode") {
        Some("bench") => bench(&engine, cmdline),
        _ => check(&engine, cmdline, deadline),
    }
}

fn check(engine: &Engine, cmdline: Cmdline, deadline: impl Fn() -> u64) {
    // BAR 0 sized the way firmware does it, then put back.
    let low = pci::config_read(engine.slot, 0x10);
    pci::config_write(engine.slot, 0x10, u32::MAX);
    let bar0_size = !(pci::config_read(engine.slot, 0x10) & !0xf) as u64 + 1;
    pci::config_write(engine.slot, 0x10, low);
    if pci::config_read(engine.slot, 0x10) != low {
        return report::fail(TEST, format_args!("BAR 0 did not come back after sizing"));
    }
    if engine.reg(0) != ID {
        return report::fail(TEST, format_args!("the ID register reads {:#x}", engine.reg(0)));
    }
    engine.set(SCRATCH, 0x1234_5678);
    if engine.reg(SCRATCH) != 0x1234_5678 {
        return report::fail(TEST, format_args!("scratch reads back {:#x}", engine.reg(SCRATCH)));
    }

    engine.route_vector0(FIRST_VECTOR);
    engine.msix_enable(true);
    let len = cmdline.number(TEST, "len", 65536) as usize;
    let (Some(a), Some(b)) = (alloc(len, 4096), alloc(len, 4096)) else {
        return report::fail(TEST, format_args!("no room for two {len}-byte buffers"));
    };
    for (i, byte) in bytes(a, len).iter_mut().enumerate() {
        *byte = (crate::pattern::mix(i as u64) >> 7) as u8;
    }
    bytes(b, len).fill(0);
    let was_pending = irr_pending(FIRST_VECTOR);
    let Some(status) = engine.run(CMD_COPY, a, b, len as u32, deadline()) else {
        return report::fail(TEST, format_args!("the copy never completed"));
    };
    let msix = if irr_pending(FIRST_VECTOR) && !was_pending { "pending" } else { "none" };
    let signalled = engine.reg(SIGNALLED);
    if status & 2 != 0 || bytes(a, len) != bytes(b, len) {
        return report::fail(TEST, format_args!("the copy to the second buffer differs (status {status:#x})"));
    }
    let masked = masked_check(engine, deadline());
    // The other way, with other bytes.
    for (i, byte) in bytes(b, len).iter_mut().enumerate() {
        *byte = (crate::pattern::mix(i as u64 ^ 0xdead) >> 3) as u8;
    }
    match engine.run(CMD_COPY, b, a, len as u32, deadline()) {
        Some(s) if s & 2 == 0 && bytes(a, len) == bytes(b, len) => {}
        _ => return report::fail(TEST, format_args!("the copy back to the first buffer differs")),
    }
    let want = fnv1a(bytes(a, len));
    match engine.run(CMD_CHECKSUM, a, 0, len as u32, deadline()) {
        Some(s) if s & 2 == 0 && engine.reg(RESULT) == want => {}
        _ => return report::fail(TEST, format_args!("checksum {:#x} where {want:#x} was due", engine.reg(RESULT))),
    }
    // What the probe writes into the mapped BAR is what the device reads from its memory.
    let shared = 4096usize;
    let mut local = [0u8; 4096];
    for (i, byte) in local.iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(7) ^ 0x5a;
        pci::write8(engine.shared + i as u64, *byte);
    }
    let mapped = match engine.run(CMD_CHECKSUM_SHARED, 0, 0, shared as u32, deadline()) {
        Some(s) if s & 2 == 0 && engine.reg(RESULT) == fnv1a(&local) => "ok",
        _ => "differs",
    };
    // A DMA outside guest memory fails in the device, not in the VMM.
    let refused = matches!(engine.run(CMD_COPY, 0xfff0_0000_0000, a, 64, deadline()), Some(s) if s & 2 != 0);

    let completed = engine.reg(COMPLETED);
    let reset = match engine.reset_cap {
        Some(cap) => {
            pci::config_write8(engine.slot, cap + 4, 1);
            let msix_off = engine.msix_cap.is_none_or(|c| pci::config_read(engine.slot, c) & (1 << 31) == 0);
            if engine.reg(COMPLETED) == 0 && engine.reg(SCRATCH) == 0 && msix_off { "ok" } else { "incomplete" }
        }
        None => "no-capability",
    };
    // After the reset MSI-X is off: MSI next, then INTx through the IOAPIC.
    let (msi, msi_signalled) = match engine.msi_cap {
        Some(cap) => {
            pci::config_write(engine.slot, cap + 4, 0xfee0_0000);
            pci::config_write(engine.slot, cap + 8, 0);
            pci::config_write(engine.slot, cap + 12, FIRST_VECTOR + 0x10);
            let head = pci::config_read(engine.slot, cap);
            pci::config_write(engine.slot, cap, head | 1 << 16);
            let seen = signal_check(engine, FIRST_VECTOR + 0x10, deadline());
            pci::config_write(engine.slot, cap, head & !(1 << 16));
            seen
        }
        None => ("no-capability", 0),
    };
    let line = pci::config_read(engine.slot, 0x3c) & 0xff;
    route_ioapic(line, FIRST_VECTOR + 0x20);
    let (intx, intx_signalled) = signal_check(engine, FIRST_VECTOR + 0x20, deadline());
    report::ok(
        TEST,
        format_args!(
            "slot={} bar0_size={bar0_size:#x} regs=ok dma={len} msix={msix} signalled={signalled} masked={masked} \
             mapped={mapped} bad_dma={} completed={completed} reset={reset} msi={msi}/{msi_signalled} \
             intx={intx}/{intx_signalled}",
            engine.slot,
            if refused { "refused" } else { "accepted" }
        ),
    );
    if cmdline.param(TEST, "mode") == Some("gone") {
        gone(engine, cmdline);
    }
}

/// Waits for the device to vanish (its server killed), then shows what the guest sees.
fn gone(engine: &Engine, cmdline: Cmdline) {
    let deadline = hw::rdtsc() + cmdline.number(TEST, "gone-timeout", 60_000_000_000);
    while engine.reg(0) == ID {
        if hw::rdtsc() > deadline {
            return report::fail("dma-engine-gone", format_args!("the device was still there at the deadline"));
        }
        for _ in 0..1000 {
            core::hint::spin_loop();
        }
    }
    report::ok(
        "dma-engine-gone",
        format_args!(
            "id={:#x} scratch={:#x} config={:#x}",
            engine.reg(0),
            engine.reg(SCRATCH),
            pci::config_read(engine.slot, 0)
        ),
    );
}

fn bench(engine: &Engine, cmdline: Cmdline) {
    let Some(khz) = crate::tsc::khz(cmdline) else {
        return report::fail(TEST, format_args!("the TSC rate is unknown"));
    };
    let ns = |cycles: u64, n: u64| cycles * 1_000_000 / khz / n.max(1);
    let time = |n: u64, f: &dyn Fn()| {
        let start = hw::rdtsc();
        for _ in 0..n {
            f();
        }
        hw::rdtsc() - start
    };
    let trapped_reads = cmdline.number(TEST, "trapped", 2000);
    let trapped = ns(time(trapped_reads, &|| { engine.reg(SCRATCH); }), trapped_reads);
    let trapped_write = ns(time(trapped_reads, &|| engine.set(SCRATCH, 1)), trapped_reads);
    // A trap the VMM answers itself (the MSI-X table): the exit's share of a trapped access.
    let vmm_read = ns(time(trapped_reads, &|| { hw::mmio_read32(engine.msix_table + 8); }), trapped_reads);
    let mapped_reads = 100_000;
    let mapped_ps = ns(time(mapped_reads, &|| { hw::mmio_read32(engine.shared); }), mapped_reads / 1000);
    let len = 1usize << 20;
    let (Some(a), Some(b)) = (alloc(len, 4096), alloc(len, 4096)) else {
        return report::fail(TEST, format_args!("no room for two 1 MiB buffers"));
    };
    let copies = 16u64;
    let deadline = || crate::suite::virtio::request_deadline(cmdline);
    let cycles = time(copies, &|| { engine.run(CMD_COPY, a, b, len as u32, deadline()); });
    let mbps = (copies * len as u64) * khz / 1000 / cycles.max(1);
    // Interrupt round trips: from the command's write to the MSI-X vector pending, one fresh
    // vector each (with interrupts off a pending vector stays pending).
    engine.msix_enable(true);
    let mut total = 0u64;
    let rounds = 32u32;
    for round in 0..rounds {
        let vector = FIRST_VECTOR + 1 + round;
        engine.route_vector0(vector);
        engine.set(LEN, 0);
        let start = hw::rdtsc();
        engine.set(CMD, CMD_COPY);
        let limit = start + cmdline.number("virtio", "timeout", 10_000_000_000);
        while !irr_pending(vector) && hw::rdtsc() < limit {
            core::hint::spin_loop();
        }
        total += hw::rdtsc() - start;
    }
    report::ok(
        TEST,
        format_args!(
            "trapped_read_ns={trapped} trapped_write_ns={trapped_write} vmm_read_ns={vmm_read} mapped_read_ps={mapped_ps} dma_mb_per_s={mbps} \
             irq_round_trip_ns={}",
            ns(total, u64::from(rounds))
        ),
    );
}
