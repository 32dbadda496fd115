//! The guest's view of an assigned PCI function. Configuration space is the device's, except
//! what the VMM must own: the BARs (placed in the VMM's MMIO window; sizing answered here),
//! the MSI-X and MSI capabilities (routed through KVM irqfds, the device's eventfds wired to
//! them), the interrupt line, and a function-level reset the VMM adds where the device can be
//! reset but shows no way for the guest to ask. BAR areas the device lets the VMM map go
//! straight into the guest; the rest of each BAR, and the MSI-X table and PBA, trap here.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use devices::BusDevice;
use devices::pci::{MsiRouter, PciDevice};
use vmm_sys_util::eventfd::EventFd;

use crate::{Backend, CONFIG_REGION, DmaMapping, INTX_IRQ, MSI_IRQ, MSIX_IRQ};

const COMMAND: usize = 0x04;
const STATUS_CAP_LIST: u32 = 1 << 20; // in the dword at COMMAND
const BAR0: usize = 0x10;
const BARS: usize = 6;
const ROM: usize = 0x30;
const CAP_POINTER: usize = 0x34;
const INTERRUPT_LINE: usize = 0x3c;
const CAP_MSI: u8 = 0x05;
const CAP_PCIE: u8 = 0x10;
const CAP_MSIX: u8 = 0x11;
const CAP_AF: u8 = 0x13;
const PCIE_DEVCAP_FLR: u32 = 1 << 28;
const AF_FLR: u8 = 1 << 1;
const AF_TRANSACTIONS_PENDING: u8 = 1;
/// Where the added reset capability goes: the last dword pair, free on most devices.
const AF_AT: usize = 0xf8;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_MASK_ALL: u16 = 1 << 14;
const MSI_ENABLE: u16 = 1;
const MSI_64BIT: u16 = 1 << 7;
const MSI_MASKABLE: u16 = 1 << 8;
const PAGE: u64 = 4096;

/// What the VMM hands an assigned function.
pub trait Resources {
    /// A naturally aligned guest-physical window of `size` bytes; None when none is left.
    fn mmio(&mut self, size: u64) -> Option<u64>;
    /// A GSI for one MSI or MSI-X vector and the irqfd KVM injects it through.
    fn msi_vector(&mut self) -> Result<(u32, EventFd), String>;
    /// An IOAPIC line for INTx, its level-triggered irqfd, and the resample fd KVM signals at
    /// the guest's EOI.
    fn intx(&mut self) -> Result<(u8, EventFd, EventFd), String>;
}

/// A BAR as placed in the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bar {
    pub addr: u64,
    pub size: u64,
    /// The type bits of the BAR register (memory, 64-bit, prefetchable).
    pub flags: u32,
    pub is64: bool,
}

/// A BAR area to map into the guest: `len` bytes at `gpa`, from `fd` at `file_offset`.
#[derive(Clone, Debug)]
pub struct MappableArea {
    pub gpa: u64,
    pub len: u64,
    pub fd: Arc<OwnedFd>,
    pub file_offset: u64,
}

#[derive(Clone, Copy, Default)]
struct MsixEntry {
    addr: u64,
    data: u32,
    masked: bool,
}

impl MsixEntry {
    fn bytes(&self) -> [u8; 16] {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&self.addr.to_le_bytes());
        b[8..12].copy_from_slice(&self.data.to_le_bytes());
        b[12] = u8::from(self.masked);
        b
    }

    fn from_bytes(b: &[u8; 16]) -> MsixEntry {
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&b[0..8]);
        MsixEntry {
            addr: u64::from_le_bytes(addr),
            data: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            masked: b[12] & 1 != 0,
        }
    }
}

struct Msix {
    cap: usize,
    table_bar: usize,
    table_offset: u64,
    pba_bar: usize,
    pba_offset: u64,
    /// The read-only part of the message control word (the table size).
    table_size_bits: u16,
    table: Vec<MsixEntry>,
    enabled: bool,
    masked: bool,
    gsis: Vec<u32>,
    irqfds: Vec<EventFd>,
    /// Whether each vector's irqfd is attached to KVM; a held vector's is not (see `held`).
    attached: Vec<bool>,
    /// The PBA: a held vector the device signalled.
    pending: Vec<bool>,
}

impl Msix {
    /// A vector masked while MSI-X is on: what the device signals waits in its eventfd,
    /// detached from KVM, and is delivered once the guest unmasks it.
    fn held(&self, v: usize) -> bool {
        self.enabled && (self.masked || self.table[v].masked)
    }

    /// Moves what the device signalled on held vector `v` into its pending bit.
    fn collect(&mut self, v: usize) {
        if !self.attached[v] && self.irqfds[v].read().is_ok_and(|n| n > 0) {
            self.pending[v] = true;
        }
    }

    fn pba(&mut self) -> Vec<u8> {
        for v in 0..self.table.len() {
            self.collect(v);
        }
        let mut bits = vec![0u8; self.pba_len() as usize];
        for (v, _) in self.pending.iter().enumerate().filter(|(_, pending)| **pending) {
            bits[v / 8] |= 1 << (v % 8);
        }
        bits
    }

    fn table_len(&self) -> u64 {
        self.table.len() as u64 * 16
    }
    fn pba_len(&self) -> u64 {
        (self.table.len() as u64).div_ceil(64) * 8
    }
    fn control(&self) -> u16 {
        self.table_size_bits | if self.enabled { MSIX_ENABLE } else { 0 } | if self.masked { MSIX_MASK_ALL } else { 0 }
    }
}

struct Msi {
    cap: usize,
    len: usize,
    is64: bool,
    /// The capability as the guest sees it (one vector, no per-vector masking).
    shadow: [u8; 24],
    gsi: u32,
    irqfd: EventFd,
}

impl Msi {
    fn control(&self) -> u16 {
        u16::from_le_bytes([self.shadow[2], self.shadow[3]])
    }
    fn message(&self) -> (u64, u32) {
        let s = &self.shadow;
        let low = u64::from(u32::from_le_bytes([s[4], s[5], s[6], s[7]]));
        let (high, data_at) =
            if self.is64 { (u64::from(u32::from_le_bytes([s[8], s[9], s[10], s[11]])), 12) } else { (0, 8) };
        (low | high << 32, u32::from(u16::from_le_bytes([s[data_at], s[data_at + 1]])))
    }
}

/// The INTx eventfds, held open for as long as the device may signal them.
struct Intx {
    _irqfd: EventFd,
    _resample: EventFd,
}

pub struct Function {
    name: String,
    backend: Box<dyn Backend>,
    bars: [Option<Bar>; BARS],
    sizing: [bool; BARS],
    msix: Option<Msix>,
    msi: Option<Msi>,
    intx: Option<Intx>,
    /// Where the VMM's reset capability sits, when it added one.
    flr_at: Option<usize>,
    cap_head: u8,
    line: u8,
    dma: Vec<DmaMapping>,
    router: Arc<dyn MsiRouter>,
}

fn dword(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn overlaps(at: usize, len: usize, start: usize, end: usize) -> bool {
    at < end && start < at + len
}

impl Function {
    /// Takes the device behind `backend` into the guest: reset, BARs placed, interrupts wired,
    /// guest memory `dma` made reachable.
    pub fn new(
        name: &str,
        mut backend: Box<dyn Backend>,
        resources: &mut dyn Resources,
        router: Arc<dyn MsiRouter>,
        dma: &[DmaMapping],
    ) -> Result<Function, String> {
        let what = backend.describe();
        let fail = |e: crate::Error| format!("{name} ({what}): {e}");
        if backend.region(CONFIG_REGION).is_none_or(|r| r.size < 256) {
            return Err(format!("{name} ({what}) has no PCI configuration space; is it a PCI device?"));
        }
        if backend.resettable() {
            backend.reset().map_err(fail)?;
        }
        let mut header = [0u8; 256];
        backend.read(CONFIG_REGION, 0, &mut header).map_err(fail)?;
        let mut function = Function {
            name: name.to_string(),
            backend,
            bars: [None; BARS],
            sizing: [false; BARS],
            msix: None,
            msi: None,
            intx: None,
            flr_at: None,
            cap_head: header[CAP_POINTER] & 0xfc,
            line: 0,
            dma: Vec::new(),
            router,
        };
        function.place_bars(&header, resources)?;
        function.find_capabilities(&header, resources)?;
        function.wire_intx(&header, resources)?;
        for map in dma {
            function.backend.dma_map(map).map_err(|e| {
                format!("{name} ({what}): guest memory at {:#x} cannot be mapped for DMA ({e})", map.iova)
            })?;
            function.dma.push(*map);
        }
        Ok(function)
    }

    fn place_bars(&mut self, header: &[u8; 256], resources: &mut dyn Resources) -> Result<(), String> {
        let mut i = 0;
        while i < BARS {
            let register = dword(header, BAR0 + 4 * i);
            let size = self.backend.region(i as u32).map_or(0, |r| r.size);
            let is64 = register & 0x7 == 0x4;
            if size == 0 {
                i += 1;
                continue;
            }
            if register & 1 != 0 {
                tracing::warn!(
                    "{}: BAR {i} is an I/O port BAR, which Ferrovisor does not assign; it reads as 0",
                    self.name
                );
                i += 1;
                continue;
            }
            if is64 && i == BARS - 1 {
                return Err(format!("{}: BAR 5 claims to be 64-bit, which needs a sixth BAR register", self.name));
            }
            let size = size.checked_next_power_of_two().unwrap_or(u64::MAX).max(PAGE);
            let addr = resources.mmio(size).ok_or_else(|| {
                format!(
                    "{}: BAR {i} ({} KiB) does not fit in what is left of the MMIO window for assigned devices; assign fewer or smaller devices",
                    self.name,
                    size >> 10
                )
            })?;
            self.bars[i] = Some(Bar { addr, size, flags: register & 0xf, is64 });
            tracing::info!("{}: BAR {i} at {addr:#x} ({} KiB)", self.name, size >> 10);
            i += if is64 { 2 } else { 1 };
        }
        Ok(())
    }

    /// Walks the capability list for MSI-X, MSI and a reset the guest can ask for.
    fn find_capabilities(&mut self, header: &[u8; 256], resources: &mut dyn Resources) -> Result<(), String> {
        let mut caps = Vec::new();
        if dword(header, COMMAND) & STATUS_CAP_LIST != 0 {
            let mut at = usize::from(header[CAP_POINTER] & 0xfc);
            // 48 capabilities fill the space after the header: a longer list loops.
            while at >= 0x40 && caps.len() < 48 {
                caps.push((header[at], at));
                at = usize::from(header[at + 1] & 0xfc);
            }
        }
        let mut can_reset = false;
        for &(id, at) in &caps {
            match id {
                CAP_MSIX if at + 12 <= 256 => self.msix = self.msix_at(header, at, resources)?,
                CAP_MSI if at + 24 <= 256 => self.msi = self.msi_at(header, at, resources)?,
                CAP_PCIE if at + 8 <= 256 => can_reset |= dword(header, at + 4) & PCIE_DEVCAP_FLR != 0,
                CAP_AF if at + 4 <= 256 => can_reset |= header[at + 3] & AF_FLR != 0,
                _ => {}
            }
        }
        let room = header[AF_AT..].iter().all(|&b| b == 0) && caps.iter().all(|&(_, at)| at + 8 <= AF_AT);
        if self.backend.resettable() && !can_reset && room {
            self.flr_at = Some(AF_AT);
        }
        Ok(())
    }

    fn msix_at(&self, header: &[u8; 256], at: usize, resources: &mut dyn Resources) -> Result<Option<Msix>, String> {
        let control = u16::from_le_bytes([header[at + 2], header[at + 3]]);
        let (table, pba) = (dword(header, at + 4), dword(header, at + 8));
        let count = (usize::from(control & 0x7ff) + 1).min(self.backend.irq_count(MSIX_IRQ) as usize);
        let mut msix = Msix {
            cap: at,
            table_bar: (table & 7) as usize,
            table_offset: u64::from(table & !7),
            pba_bar: (pba & 7) as usize,
            pba_offset: u64::from(pba & !7),
            table_size_bits: control & 0x7ff,
            table: vec![MsixEntry { masked: true, ..Default::default() }; count],
            enabled: false,
            masked: false,
            gsis: Vec::new(),
            irqfds: Vec::new(),
            attached: vec![true; count],
            pending: vec![false; count],
        };
        let inside = |bar: usize, offset: u64, len: u64| {
            self.bars.get(bar).copied().flatten().is_some_and(|b| offset.checked_add(len).is_some_and(|e| e <= b.size))
        };
        if count == 0
            || !inside(msix.table_bar, msix.table_offset, msix.table_len())
            || !inside(msix.pba_bar, msix.pba_offset, msix.pba_len())
        {
            tracing::warn!(
                "{}: its MSI-X capability does not fit its BARs or interrupts; MSI-X is not offered",
                self.name
            );
            return Ok(None);
        }
        for _ in 0..count {
            let (gsi, irqfd) = resources.msi_vector().map_err(|e| format!("{}: MSI-X: {e}", self.name))?;
            msix.gsis.push(gsi);
            msix.irqfds.push(irqfd);
        }
        Ok(Some(msix))
    }

    fn msi_at(&self, header: &[u8; 256], at: usize, resources: &mut dyn Resources) -> Result<Option<Msi>, String> {
        if self.backend.irq_count(MSI_IRQ) == 0 {
            return Ok(None);
        }
        let control = u16::from_le_bytes([header[at + 2], header[at + 3]]);
        let is64 = control & MSI_64BIT != 0;
        let len = if is64 { 14 } else { 10 } + if control & MSI_MASKABLE != 0 { 10 } else { 0 };
        let mut shadow = [0u8; 24];
        shadow[..len].copy_from_slice(&header[at..at + len]);
        // One vector, not enabled: the guest may enable only what the VMM routes.
        let offered = control & MSI_64BIT;
        shadow[2..4].copy_from_slice(&offered.to_le_bytes());
        let (gsi, irqfd) = resources.msi_vector().map_err(|e| format!("{}: MSI: {e}", self.name))?;
        Ok(Some(Msi { cap: at, len: if is64 { 14 } else { 10 }, is64, shadow, gsi, irqfd }))
    }

    fn wire_intx(&mut self, header: &[u8; 256], resources: &mut dyn Resources) -> Result<(), String> {
        if header[INTERRUPT_LINE + 1] == 0 || self.backend.irq_count(INTX_IRQ) == 0 {
            return Ok(());
        }
        let (line, irqfd, resample) = resources.intx().map_err(|e| format!("{}: INTx: {e}", self.name))?;
        let wired = self.backend.set_irqs(INTX_IRQ, &[&irqfd]).and_then(|_| self.backend.set_intx_unmask(&resample));
        if let Err(e) = wired {
            tracing::warn!("{}: INTx is not wired ({e}); the device can still use MSI", self.name);
        }
        self.line = line;
        self.intx = Some(Intx { _irqfd: irqfd, _resample: resample });
        Ok(())
    }

    /// Where the VMM placed each BAR (None for BARs it did not assign).
    pub fn bars(&self) -> [Option<Bar>; BARS] {
        self.bars
    }

    /// The BAR areas the device lets the VMM map, less the pages of the MSI-X table and PBA,
    /// which must trap.
    pub fn mappable(&self) -> Vec<MappableArea> {
        let mut out = Vec::new();
        for (i, bar) in self.bars.iter().enumerate() {
            let (Some(bar), Some(mmap)) = (bar, self.backend.region(i as u32).and_then(|r| r.mmap.as_ref())) else {
                continue;
            };
            let mut holes = Vec::new();
            if let Some(m) = &self.msix {
                if m.table_bar == i {
                    holes.push((m.table_offset, m.table_len()));
                }
                if m.pba_bar == i {
                    holes.push((m.pba_offset, m.pba_len()));
                }
            }
            for &(offset, len) in &mmap.areas {
                for (start, end) in subtract_pages(offset, offset + len, &holes) {
                    out.push(MappableArea {
                        gpa: bar.addr + start,
                        len: end - start,
                        fd: mmap.fd.clone(),
                        file_offset: mmap.file_offset + start,
                    });
                }
            }
        }
        out
    }

    fn bar_register(&self, i: usize) -> u32 {
        if let Some(bar) = self.bars[i] {
            let mask = !(bar.size - 1);
            let addr = if self.sizing[i] { mask } else { bar.addr };
            return (addr as u32 & !0xf) | bar.flags;
        }
        match i.checked_sub(1).and_then(|low| self.bars[low]) {
            Some(low) if low.is64 => {
                let mask = !(low.size - 1);
                (if self.sizing[i] { mask } else { low.addr } >> 32) as u32
            }
            _ => 0,
        }
    }

    fn device_config(&mut self, at: usize) -> u32 {
        let mut b = [0u8; 4];
        match self.backend.read(CONFIG_REGION, at as u64, &mut b) {
            Ok(()) => u32::from_le_bytes(b),
            Err(_) => u32::MAX,
        }
    }

    fn read_config(&mut self, offset: u16) -> u32 {
        let at = usize::from(offset) & 0xfc;
        if let Some(m) = self.msix.as_ref().filter(|m| m.cap == at) {
            let control = m.control();
            return (self.device_config(at) & 0xffff) | u32::from(control) << 16;
        }
        if let Some(msi) = self.msi.as_ref().filter(|m| (m.cap..m.cap + m.len).contains(&at)) {
            let s = &msi.shadow;
            let i = at - msi.cap;
            return u32::from_le_bytes([s[i], s[i + 1], s[i + 2], s[i + 3]]);
        }
        if let Some(af) = self.flr_at.filter(|&af| (af..af + 8).contains(&at)) {
            let next = self.cap_head;
            return if at == af { u32::from_le_bytes([CAP_AF, next, 6, AF_FLR | AF_TRANSACTIONS_PENDING]) } else { 0 };
        }
        match at {
            COMMAND => {
                let added = if self.flr_at.is_some() { STATUS_CAP_LIST } else { 0 };
                self.device_config(at) | added
            }
            BAR0..0x28 => self.bar_register((at - BAR0) / 4),
            ROM => 0,
            CAP_POINTER => u32::from(self.flr_at.map_or(self.cap_head, |af| af as u8)),
            INTERRUPT_LINE => {
                let pin = if self.intx.is_some() { (self.device_config(at) >> 8) & 0xff } else { 0 };
                u32::from(self.line) | pin << 8
            }
            _ => self.device_config(at),
        }
    }

    fn write_config(&mut self, offset: u16, data: &[u8]) {
        let (at, len) = (usize::from(offset), data.len());
        if overlaps(at, len, BAR0, 0x28) {
            if let (0, Ok(bytes)) = (at % 4, <[u8; 4]>::try_from(data)) {
                let i = (at - BAR0) / 4;
                let value = u32::from_le_bytes(bytes);
                self.sizing[i] = value | 0xf == u32::MAX;
                if !self.sizing[i] && value & !0xf != self.bar_register(i) & !0xf {
                    devices::guest_event!("{}: the guest moved BAR {i}; it stays where the VMM placed it", self.name);
                }
            }
            return;
        }
        if overlaps(at, len, ROM, ROM + 4) || overlaps(at, len, CAP_POINTER, CAP_POINTER + 4) {
            return;
        }
        if at == INTERRUPT_LINE {
            self.line = data[0];
            return;
        }
        if let Some(cap) = self.msix.as_ref().map(|m| m.cap)
            && overlaps(at, len, cap, cap + 12)
        {
            let mut control = self.msix.as_ref().map_or(0, Msix::control).to_le_bytes();
            for (i, &byte) in data.iter().enumerate() {
                if let Some(slot) = (at + i).checked_sub(cap + 2).and_then(|j| control.get_mut(j)) {
                    *slot = byte;
                }
            }
            return self.set_msix_control(u16::from_le_bytes(control));
        }
        if let Some((cap, len_)) = self.msi.as_ref().map(|m| (m.cap, m.len))
            && overlaps(at, len, cap, cap + len_)
        {
            return self.write_msi(at, data);
        }
        if let Some(af) = self.flr_at.filter(|&af| overlaps(at, len, af, af + 8)) {
            if at <= af + 4 && af + 4 < at + len && data[af + 4 - at] & 1 != 0 {
                self.function_reset();
            }
            return;
        }
        if let Err(e) = self.backend.write(CONFIG_REGION, at as u64, data) {
            devices::guest_fault!("{}: a configuration write at {at:#x} failed ({e})", self.name);
        }
    }

    fn write_msi(&mut self, at: usize, data: &[u8]) {
        let Some(msi) = self.msi.as_mut() else { return };
        let was = msi.control() & MSI_ENABLE != 0;
        for (i, &byte) in data.iter().enumerate() {
            let Some(j) = (at + i).checked_sub(msi.cap) else { continue };
            match j {
                // Of the control word only enable is writable: one vector is offered.
                2 => msi.shadow[2] = (msi.shadow[2] & !1) | (byte & 1),
                4.. if j < msi.len => msi.shadow[j] = byte,
                _ => {}
            }
        }
        let enabled = msi.control() & MSI_ENABLE != 0;
        let (gsi, route) = (msi.gsi, enabled.then(|| msi.message()));
        let trigger = if enabled { Some(msi.irqfd.try_clone()) } else { None };
        self.router.set_routes(&[(gsi, route)]);
        if enabled == was {
            return;
        }
        let result = match trigger {
            Some(Ok(fd)) => self.backend.set_irqs(MSI_IRQ, &[&fd]),
            Some(Err(e)) => Err(e.into()),
            None => self.backend.set_irqs(MSI_IRQ, &[]),
        };
        if let Err(e) = result {
            devices::guest_fault!("{}: MSI cannot be switched ({e})", self.name);
        }
    }

    fn set_msix_control(&mut self, control: u16) {
        let Some(m) = self.msix.as_mut() else { return };
        let was = m.enabled;
        m.enabled = control & MSIX_ENABLE != 0;
        m.masked = control & MSIX_MASK_ALL != 0;
        self.route_msix();
        let Some(m) = self.msix.as_ref() else { return };
        if m.enabled != was {
            let fds: Vec<&EventFd> = if m.enabled { m.irqfds.iter().collect() } else { Vec::new() };
            if let Err(e) = self.backend.set_irqs(MSIX_IRQ, &fds) {
                devices::guest_fault!("{}: MSI-X cannot be switched ({e})", self.name);
            }
        }
    }

    /// Points each vector's GSI at its message, or nowhere while it cannot be delivered; holds
    /// the interrupts of masked vectors and delivers those of vectors the guest unmasked.
    fn route_msix(&mut self) {
        let Some(m) = self.msix.as_mut() else { return };
        // A newly held vector's irqfd leaves KVM first, so that nothing signalled is lost.
        for v in 0..m.table.len() {
            if m.held(v) && m.attached[v] {
                match self.router.attach_irqfd(m.gsis[v], &m.irqfds[v], false) {
                    Ok(()) => m.attached[v] = false,
                    Err(e) => devices::guest_fault!("{}: MSI-X vector {v} cannot be masked ({e})", self.name),
                }
            }
        }
        let routes: Vec<(u32, Option<(u64, u32)>)> = m
            .table
            .iter()
            .zip(&m.gsis)
            .map(|(e, &gsi)| (gsi, (m.enabled && !m.masked && !e.masked).then_some((e.addr, e.data))))
            .collect();
        self.router.set_routes(&routes);
        for v in 0..m.table.len() {
            if m.held(v) || m.attached[v] {
                continue;
            }
            m.collect(v);
            match self.router.attach_irqfd(m.gsis[v], &m.irqfds[v], true) {
                Ok(()) => m.attached[v] = true,
                Err(e) => devices::guest_fault!("{}: MSI-X vector {v} cannot be unmasked ({e})", self.name),
            }
        }
        // What was held goes out once the vector can deliver it (MSI-X on, nothing masked).
        for v in 0..m.table.len() {
            if m.pending[v] && m.enabled && m.attached[v] {
                m.pending[v] = false;
                let _ = m.irqfds[v].write(1);
            }
        }
    }

    /// A function-level reset, as the guest asked through the reset capability.
    fn function_reset(&mut self) {
        if let Some(m) = self.msix.as_mut() {
            m.enabled = false;
            m.masked = false;
            m.table.fill(MsixEntry { masked: true, ..Default::default() });
        }
        self.route_msix();
        // After the irqfds are back with KVM: what they held until then is forgotten too.
        if let Some(m) = self.msix.as_mut() {
            m.pending.fill(false);
        }
        if let Some(msi) = self.msi.as_mut() {
            msi.shadow[2] &= !1;
            self.router.set_routes(&[(msi.gsi, None)]);
        }
        let _ = self.backend.set_irqs(MSIX_IRQ, &[]);
        match self.backend.reset() {
            Ok(()) => devices::guest_event!("{}: reset at the guest's request", self.name),
            Err(e) => devices::guest_fault!("{}: the reset the guest asked for failed ({e})", self.name),
        }
    }

    fn msix_table_access(&self, bar: usize, offset: u64, len: usize) -> Option<MsixAccess> {
        let m = self.msix.as_ref()?;
        let end = offset.checked_add(len as u64)?;
        if bar == m.table_bar && offset >= m.table_offset && end <= m.table_offset + m.table_len() {
            let at = offset - m.table_offset;
            return Some(MsixAccess::Table { vector: (at / 16) as usize, at: (at % 16) as usize });
        }
        if bar == m.pba_bar && offset >= m.pba_offset && end <= m.pba_offset + m.pba_len() {
            return Some(MsixAccess::Pba);
        }
        None
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match self.msix_table_access(bar, offset, data.len()) {
            Some(MsixAccess::Table { vector, at }) => {
                let bytes = self.msix.as_ref().map(|m| m.table[vector].bytes()).unwrap_or_default();
                for (i, out) in data.iter_mut().enumerate() {
                    *out = bytes.get(at + i).copied().unwrap_or(0);
                }
            }
            Some(MsixAccess::Pba) => {
                let Some(m) = self.msix.as_mut() else { return data.fill(0) };
                let at = (offset - m.pba_offset) as usize;
                let bits = m.pba();
                for (i, out) in data.iter_mut().enumerate() {
                    *out = bits.get(at + i).copied().unwrap_or(0);
                }
            }
            None => {
                if let Err(e) = self.backend.read(bar as u32, offset, data) {
                    data.fill(0xff);
                    devices::guest_fault!("{}: a read of BAR {bar} at {offset:#x} failed ({e})", self.name);
                }
            }
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match self.msix_table_access(bar, offset, data.len()) {
            Some(MsixAccess::Table { vector, at }) => {
                let Some(m) = self.msix.as_mut() else { return };
                let mut bytes = m.table[vector].bytes();
                for (i, &b) in data.iter().enumerate() {
                    if let Some(slot) = bytes.get_mut(at + i) {
                        *slot = b;
                    }
                }
                m.table[vector] = MsixEntry::from_bytes(&bytes);
                self.route_msix();
            }
            Some(MsixAccess::Pba) => {}
            None => {
                if let Err(e) = self.backend.write(bar as u32, offset, data) {
                    devices::guest_fault!("{}: a write to BAR {bar} at {offset:#x} failed ({e})", self.name);
                }
            }
        }
    }
}

enum MsixAccess {
    Table { vector: usize, at: usize },
    Pba,
}

/// `[start, end)` less the pages that `holes` (offset, length) touch, as page-aligned ranges.
pub fn subtract_pages(start: u64, end: u64, holes: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut ranges = vec![(start.next_multiple_of(PAGE), end / PAGE * PAGE)];
    for &(offset, len) in holes {
        let (hole_start, hole_end) = (offset / PAGE * PAGE, (offset + len).next_multiple_of(PAGE));
        ranges = ranges
            .into_iter()
            .flat_map(|(s, e)| [(s, e.min(hole_start)), (s.max(hole_end), e)])
            .filter(|(s, e)| s < e)
            .collect();
    }
    ranges.retain(|(s, e)| s < e);
    ranges
}

impl Drop for Function {
    /// Detaches cleanly: interrupts off, the device reset, its DMA maps gone.
    fn drop(&mut self) {
        if self.msix.as_ref().is_some_and(|m| m.enabled) {
            let _ = self.backend.set_irqs(MSIX_IRQ, &[]);
        }
        if self.intx.is_some() {
            let _ = self.backend.set_irqs(INTX_IRQ, &[]);
        }
        if self.backend.resettable() {
            let _ = self.backend.reset();
        }
        for map in std::mem::take(&mut self.dma) {
            let _ = self.backend.dma_unmap(map.iova, map.size);
        }
    }
}

/// The function's configuration space, for the PCI root.
pub struct ConfigSpace(pub Arc<Mutex<Function>>);

impl PciDevice for ConfigSpace {
    fn config_read(&mut self, offset: u16) -> u32 {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).read_config(offset)
    }
    fn config_write(&mut self, offset: u16, data: &[u8]) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).write_config(offset, data)
    }
}

/// One BAR on the MMIO bus: the accesses that trap (all of it, less what is mapped).
pub struct BarWindow {
    pub function: Arc<Mutex<Function>>,
    pub bar: usize,
}

impl BusDevice for BarWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.function.lock().unwrap_or_else(|p| p.into_inner()).bar_read(self.bar, offset, data)
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        self.function.lock().unwrap_or_else(|p| p.into_inner()).bar_write(self.bar, offset, data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_device::InProcess;

    /// A GSI and where it routes to, if anywhere.
    type Route = (u32, Option<(u64, u32)>);

    /// What a VMM would hand out, and every route the function asked for.
    #[derive(Default)]
    struct Fake {
        next_mmio: u64,
        next_gsi: u32,
        routes: Mutex<Vec<Route>>,
        /// Every irqfd attached (true) to or detached from its GSI.
        irqfds: Mutex<Vec<(u32, bool)>>,
    }

    impl Resources for Fake {
        fn mmio(&mut self, size: u64) -> Option<u64> {
            let at = (0xe100_0000 + self.next_mmio).checked_next_multiple_of(size)?;
            let end = at.checked_add(size).filter(|&end| end <= 0xfe00_0000)?;
            self.next_mmio = end - 0xe100_0000;
            Some(at)
        }
        fn msi_vector(&mut self) -> Result<(u32, EventFd), String> {
            self.next_gsi += 1;
            Ok((100 + self.next_gsi, EventFd::new(libc::EFD_NONBLOCK).unwrap()))
        }
        fn intx(&mut self) -> Result<(u8, EventFd, EventFd), String> {
            Ok((23, EventFd::new(0).unwrap(), EventFd::new(0).unwrap()))
        }
    }

    impl MsiRouter for Fake {
        fn set_routes(&self, routes: &[(u32, Option<(u64, u32)>)]) {
            self.routes.lock().unwrap().extend_from_slice(routes);
        }
        fn attach_irqfd(&self, gsi: u32, _irqfd: &EventFd, attached: bool) -> Result<(), String> {
            self.irqfds.lock().unwrap().push((gsi, attached));
            Ok(())
        }
    }

    fn function() -> (Function, Arc<Fake>) {
        let router = Arc::new(Fake::default());
        let mut resources = Fake::default();
        let f =
            Function::new("dev0", Box::new(InProcess::new().unwrap()), &mut resources, router.clone(), &[]).unwrap();
        (f, router)
    }

    #[test]
    fn bars_are_placed_sized_and_kept_where_the_vmm_put_them() {
        let (mut f, _) = function();
        assert_eq!(f.read_config(0), 0x1fe0_1b36);
        let bar0 = f.read_config(0x10);
        assert_eq!(bar0, 0xe100_0000);
        f.write_config(0x10, &u32::MAX.to_le_bytes());
        assert_eq!(f.read_config(0x10), 0xffff_f000, "a 4 KiB memory BAR");
        f.write_config(0x10, &0x1234_0000u32.to_le_bytes());
        assert_eq!(f.read_config(0x10), bar0, "the guest cannot move it");
        // BAR 2 is 64-bit and prefetchable; its upper half sizes too.
        assert_eq!(f.read_config(0x18) & 0xf, 0xc);
        f.write_config(0x1c, &u32::MAX.to_le_bytes());
        assert_eq!(f.read_config(0x1c), u32::MAX);
        assert_eq!(f.read_config(0x30), 0, "no ROM");
        assert_eq!(f.read_config(0x3c) & 0xffff, 0x0117, "INTA on line 23");
    }

    #[test]
    fn msix_is_routed_as_the_guest_programs_it_and_reset_clears_it() {
        let (mut f, router) = function();
        for (offset, value) in [(0u64, 0xfee0_0000u32), (8, 0x45), (12, 0)] {
            f.bar_write(1, offset, &value.to_le_bytes());
        }
        let mut entry = [0u8; 4];
        f.bar_read(1, 8, &mut entry);
        assert_eq!(u32::from_le_bytes(entry), 0x45, "the table reads back");
        assert!(router.routes.lock().unwrap().iter().all(|r| r.1.is_none()), "nothing routes before MSI-X is on");
        let control = f.read_config(0x40) >> 16;
        assert_eq!(control & 0x7ff, 3, "four vectors");
        f.write_config(0x42, &0x8000u16.to_le_bytes());
        assert_eq!(f.read_config(0x40) >> 16, 0x8003);
        assert!(router.routes.lock().unwrap().contains(&(101, Some((0xfee0_0000, 0x45)))));
        // The added reset capability comes first in the list and resets MSI-X with the device.
        assert_eq!(f.read_config(0x34), 0xf8);
        assert_eq!(f.read_config(0xf8) & 0xffff, 0x4013);
        f.write_config(0x10 + 0xe8 + 4, &[1]);
        assert_eq!(f.read_config(0x40) >> 16, 3, "MSI-X off after the reset");
        let routes = router.routes.lock().unwrap();
        assert!(routes[routes.len() - 5..].contains(&(101, None)), "vector 0 unrouted: {routes:?}");
    }

    #[test]
    fn a_masked_vector_holds_what_the_device_signals_in_the_pba_until_unmasked() {
        let (mut f, router) = function();
        for (offset, value) in [(0u64, 0xfee0_0000u32), (8, 0x45), (12, 0)] {
            f.bar_write(1, offset, &value.to_le_bytes());
        }
        f.write_config(0x42, &0x8000u16.to_le_bytes());
        // Vectors 1-3 are masked (as after reset): their irqfds leave KVM; vector 0's stays.
        let taken: Vec<(u32, bool)> = std::mem::take(&mut *router.irqfds.lock().unwrap());
        assert_eq!(taken, [(102, false), (103, false), (104, false)]);
        let pba = |f: &mut Function| {
            let mut bits = [0u8; 8];
            f.bar_read(1, 0x800, &mut bits);
            u64::from_le_bytes(bits)
        };
        f.bar_write(1, 12, &1u32.to_le_bytes());
        assert_eq!(*router.irqfds.lock().unwrap(), [(101, false)], "vector 0's irqfd leaves KVM when masked");
        assert_eq!(router.routes.lock().unwrap().last(), Some(&(104, None)));
        assert_eq!(pba(&mut f), 0, "nothing signalled yet");
        // The device signals vector 0 (its eventfd) while the guest has it masked.
        f.msix.as_ref().unwrap().irqfds[0].write(1).unwrap();
        assert_eq!(pba(&mut f), 1, "pending while masked");
        assert_eq!(pba(&mut f), 1, "and still pending on a second read");
        f.bar_write(1, 12, &0u32.to_le_bytes());
        assert_eq!(*router.irqfds.lock().unwrap(), [(101, false), (101, true)], "back with KVM once unmasked");
        assert_eq!(f.msix.as_ref().unwrap().irqfds[0].read().ok(), Some(1), "the held interrupt is delivered");
        assert_eq!(pba(&mut f), 0, "and no longer pending");
        // Masking the whole function holds every vector; a reset forgets what was held.
        f.write_config(0x42, &0xc000u16.to_le_bytes());
        assert_eq!(router.irqfds.lock().unwrap().last(), Some(&(101, false)), "vector 0 held with the rest");
        f.msix.as_ref().unwrap().irqfds[3].write(1).unwrap();
        assert_eq!(pba(&mut f), 1 << 3);
        // Signalled again after the guest last looked: the reset forgets that too.
        f.msix.as_ref().unwrap().irqfds[2].write(1).unwrap();
        f.write_config(0x10 + 0xe8 + 4, &[1]);
        assert_eq!(pba(&mut f), 0, "a reset clears the PBA");
        let irqfds = &f.msix.as_ref().unwrap().irqfds;
        assert!(irqfds[3].read().is_err() && irqfds[2].read().is_err(), "and delivers nothing");
    }

    #[test]
    fn a_hostile_configuration_space_is_refused_or_tamed_never_a_panic() {
        let region = |index, size| crate::Region { index, size, readable: true, writable: true, mmap: None };
        let mut cases: Vec<([u8; 256], u64)> = Vec::new();
        let mut with_cap = |at: usize, id: u8, next: u8, bar_size: u64| {
            let mut c = [0u8; 256];
            c[6] = 0x10; // capability list
            c[0x34] = at as u8;
            c[at] = id;
            c[at + 1] = next;
            c[0x3d] = 1;
            cases.push((c, bar_size));
        };
        with_cap(0xfc, CAP_MSIX, 0, 0x1000); // MSI-X at the very end
        with_cap(0xf0, CAP_MSI, 0, 0x1000); // MSI with no room for its fields
        with_cap(0x40, CAP_MSIX, 0x40, 0x1000); // a list that loops
        with_cap(0xfc, CAP_PCIE, 0, 0x1000);
        with_cap(0x40, CAP_MSIX, 0, u64::MAX); // a BAR no window holds
        let mut last_bar_64 = [0u8; 256];
        last_bar_64[0x24] = 0x4;
        cases.push((last_bar_64, 0x1000));
        for (config, bar_size) in cases {
            let mut regions: Vec<crate::Region> = (0..8).map(|i| region(i, bar_size)).collect();
            regions[7].size = 256;
            let info = crate::DeviceInfo { regions, irq_counts: vec![u32::MAX; 3] };
            let backend = Box::new(crate::test_device::ConfigOnly { config, info, resettable: true });
            let router = Arc::new(Fake::default());
            if let Ok(mut f) = Function::new("dev", backend, &mut Fake::default(), router, &[]) {
                for offset in (0..256u16).step_by(4) {
                    f.read_config(offset);
                    f.write_config(offset, &[0xff; 4]);
                }
            }
        }
    }

    #[test]
    fn msix_pages_are_cut_out_of_mapped_areas() {
        assert_eq!(subtract_pages(0, 0x4000, &[]), [(0, 0x4000)]);
        assert_eq!(subtract_pages(0, 0x4000, &[(0x1000, 0x40)]), [(0, 0x1000), (0x2000, 0x4000)]);
        assert_eq!(subtract_pages(0, 0x4000, &[(0, 0x30), (0x3800, 0x8)]), [(0x1000, 0x3000)]);
        assert!(subtract_pages(0, 0x1000, &[(0x800, 8)]).is_empty());
        // Areas not on page boundaries shrink to the pages inside them.
        assert_eq!(subtract_pages(0x100, 0x3100, &[]), [(0x1000, 0x3000)]);
    }
}
