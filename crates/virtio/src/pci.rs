//! The virtio-pci transport, modern only (virtio 1.2 section 4.1): a PCI function whose BAR 0
//! holds the common configuration, ISR, device configuration, notification area and an MSI-X
//! table with a vector per queue plus one for configuration changes, so that a driver can give
//! each queue its own (Linux does, and spreads them over CPUs) or share them as it likes.

use std::sync::atomic::{AtomicU16, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use devices::BusDevice;
use devices::pci::PciDevice;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemory;
use crate::device::{QueueSet, VirtioDevice, VirtioInterrupt, queue_bit};
use crate::transport::{QueueField, VirtioState};

pub const BAR_SIZE: u64 = 0x8000;
const COMMON_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x5000;
const NO_VECTOR: u16 = 0xffff;

const VENDOR_ID: u16 = 0x1af4;
const DEVICE_ID_BASE: u16 = 0x1040;
const CAP_VENDOR: u8 = 0x09;
const CAP_MSIX: u8 = 0x11;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
const COMMAND_WRITABLE: u16 = 0x0407; // I/O, memory, bus master, INTx disable
const STATUS_CAP_LIST: u16 = 1 << 4;

pub use devices::pci::MsiRouter;

/// Absolute offsets of the notification area: what the VMM attaches ioeventfds to.
/// A virtio-pci function in a snapshot: its configuration space, MSI-X table and vectors, and
/// the transport-neutral state.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedPciTransport {
    pub transport: crate::transport::SavedTransport,
    pub config: Vec<u8>,
    pub bar_written: [u32; 2],
    pub queue_vectors: Vec<u16>,
    pub config_vector: u16,
    pub queue_vector: u16,
    pub isr: u32,
    /// (address, data, masked) per vector.
    pub msix_table: Vec<(u64, u32, bool)>,
    pub msix_pending: Vec<bool>,
    pub msix_enabled: bool,
    pub msix_function_masked: bool,
}

/// The MSI-X vectors of a function whose device has `queues` queues.
pub fn vectors_for(queues: usize) -> usize {
    queues + 1
}

pub fn notify_offset(queue: usize) -> u64 {
    NOTIFY_OFFSET + queue as u64 * u64::from(NOTIFY_MULTIPLIER)
}

#[derive(Clone, Copy, Default)]
struct MsixEntry {
    addr: u64,
    data: u32,
    masked: bool,
}

/// MSI-X state shared by the transport (which the guest programs) and the interrupt (which the
/// device's worker raises).
struct Msix {
    table: Vec<MsixEntry>,
    pending: Vec<bool>,
    enabled: bool,
    function_masked: bool,
    irqfds: Vec<EventFd>,
    gsis: Vec<u32>,
    router: Arc<dyn MsiRouter>,
}

impl Msix {
    fn deliverable(&self, v: usize) -> bool {
        self.enabled && !self.function_masked && !self.table[v].masked
    }

    /// Re-routes every vector after the guest changed the table or the enable bits, and
    /// delivers what was held while masked.
    fn update(&mut self) {
        let routes: Vec<(u32, Option<(u64, u32)>)> = (0..self.table.len())
            .map(|v| (self.gsis[v], self.deliverable(v).then_some((self.table[v].addr, self.table[v].data))))
            .collect();
        self.router.set_routes(&routes);
        for v in 0..self.table.len() {
            if self.deliverable(v) && self.pending[v] {
                self.pending[v] = false;
                let _ = self.irqfds[v].write(1);
            }
        }
    }

    fn fire(&mut self, vector: u16) {
        let v = usize::from(vector);
        if v >= self.table.len() {
            return;
        }
        if self.deliverable(v) {
            let _ = self.irqfds[v].write(1);
        } else {
            self.pending[v] = true;
        }
    }
}

/// The PCI transport's interrupt: MSI-X when the guest enabled it, else only the ISR bits
/// (this transport has no INTx line).
pub struct PciInterrupt {
    isr: AtomicU32,
    config_vector: AtomicU16,
    /// The vector the driver gave each queue.
    queue_vectors: Vec<AtomicU16>,
    msix: Arc<Mutex<Msix>>,
}

impl VirtioInterrupt for PciInterrupt {
    /// Each vector the driver gave one of `queues`, once.
    fn signal_used_queues(&self, queues: QueueSet) {
        self.isr.fetch_or(1, Ordering::SeqCst);
        let mut msix = self.msix.lock().unwrap_or_else(|p| p.into_inner());
        let mut fired: QueueSet = 0;
        for (_, vector) in self.queue_vectors.iter().enumerate().filter(|&(q, _)| queues & queue_bit(q) != 0) {
            let vector = vector.load(Ordering::SeqCst);
            if fired & queue_bit(usize::from(vector)) == 0 {
                fired |= queue_bit(usize::from(vector));
                msix.fire(vector);
            }
        }
    }
    fn signal_config_change(&self) {
        self.isr.fetch_or(2, Ordering::SeqCst);
        self.msix.lock().unwrap_or_else(|p| p.into_inner()).fire(self.config_vector.load(Ordering::SeqCst));
    }
}

pub struct PciTransport {
    state: VirtioState,
    interrupt: Arc<PciInterrupt>,
    msix: Arc<Mutex<Msix>>,
    config: [u8; 256],
    bar_addr: u64,
    /// The BAR value the guest wrote last (all ones while it sizes the BAR).
    bar_written: [u32; 2],
}

impl PciTransport {
    /// `gsis` and `irqfds` are the KVM GSI of each MSI-X vector and the irqfd registered on it.
    pub fn new(
        name: &str,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        bar_addr: u64,
        gsis: Vec<u32>,
        irqfds: Vec<EventFd>,
        router: Arc<dyn MsiRouter>,
    ) -> std::io::Result<PciTransport> {
        let queues = device.queue_max_sizes().len();
        let vectors = vectors_for(queues);
        assert_eq!((gsis.len(), irqfds.len()), (vectors, vectors), "one GSI and irqfd per vector");
        let msix = Arc::new(Mutex::new(Msix {
            table: vec![MsixEntry { masked: true, ..Default::default() }; vectors],
            pending: vec![false; vectors],
            enabled: false,
            function_masked: false,
            irqfds,
            gsis,
            router,
        }));
        let interrupt = Arc::new(PciInterrupt {
            isr: AtomicU32::new(0),
            config_vector: AtomicU16::new(NO_VECTOR),
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            msix: msix.clone(),
        });
        let device_type = device.device_type();
        let state = VirtioState::new(name, device, mem, interrupt.clone())?;
        let mut t = PciTransport {
            state,
            interrupt,
            msix,
            config: [0; 256],
            bar_addr,
            bar_written: [bar_addr as u32, (bar_addr >> 32) as u32],
        };
        t.build_config(device_type, vectors);
        Ok(t)
    }

    pub fn virtio_state(&mut self) -> &mut VirtioState {
        &mut self.state
    }

    /// Quiesces the device and returns the function's state (see [`VirtioState::save`]).
    pub fn save(&mut self) -> Result<SavedPciTransport, String> {
        let transport = self.state.save()?;
        let queue_vectors = self.queue_vectors();
        let msix = self.msix.lock().unwrap_or_else(|p| p.into_inner());
        Ok(SavedPciTransport {
            transport,
            config: self.config.to_vec(),
            bar_written: self.bar_written,
            queue_vector: queue_vectors.first().copied().unwrap_or(NO_VECTOR),
            queue_vectors,
            config_vector: self.interrupt.config_vector.load(Ordering::SeqCst),
            isr: self.interrupt.isr.load(Ordering::SeqCst),
            msix_table: msix.table.iter().map(|e| (e.addr, e.data, e.masked)).collect(),
            msix_pending: msix.pending.to_vec(),
            msix_enabled: msix.enabled,
            msix_function_masked: msix.function_masked,
        })
    }

    pub fn resume(&mut self) {
        self.state.resume();
    }

    /// The vectors the driver chose, once it starts the device: how it spread the interrupts.
    fn log_vectors(&self) {
        let show = |v: u16| if v == NO_VECTOR { "none".to_string() } else { v.to_string() };
        let queues: Vec<String> = self.queue_vectors().into_iter().map(show).collect();
        crate::guest_event!(
            "{}: MSI-X vectors: configuration {}, queues {}",
            self.state.name,
            show(self.interrupt.config_vector.load(Ordering::SeqCst)),
            queues.join(" ")
        );
    }

    /// The vectors the function's MSI-X capability offers.
    fn table_size(&self) -> usize {
        usize::from(u16::from_le_bytes([self.config[0x42], self.config[0x43]]) & 0x7ff) + 1
    }

    fn queue_vectors(&self) -> Vec<u16> {
        self.interrupt.queue_vectors.iter().map(|v| v.load(Ordering::SeqCst)).collect()
    }

    /// Puts a saved function back on a fresh transport of the same device: configuration
    /// space, MSI-X table (its KVM routes set again), vectors, then the device itself. A
    /// function saved with fewer vectors (before each queue had one: two) keeps its table
    /// size, which its saved configuration space tells the driver.
    pub fn restore(&mut self, saved: &SavedPciTransport) -> Result<(), String> {
        let vectors = self.interrupt.queue_vectors.len() + 1;
        if saved.config.len() != self.config.len()
            || saved.msix_table.is_empty()
            || saved.msix_table.len() > vectors
            || saved.msix_pending.len() > vectors
            || saved.queue_vectors.len() > self.interrupt.queue_vectors.len()
        {
            return Err(format!("{}: the snapshot holds a different PCI function here", self.state.name));
        }
        let table_size = saved.msix_table.len() as u16 - 1;
        let in_table = |v: u16| if v < table_size + 1 { v } else { NO_VECTOR };
        self.config.copy_from_slice(&saved.config);
        // The table size is read-only: what the saved table holds, whatever the file says.
        let control = u16::from_le_bytes([self.config[0x42], self.config[0x43]]);
        self.put16(0x42, (control & (MSIX_ENABLE | MSIX_FUNCTION_MASK)) | table_size);
        self.bar_written = saved.bar_written;
        for (vector, &saved) in self.interrupt.queue_vectors.iter().zip(&saved.queue_vectors) {
            vector.store(in_table(saved), Ordering::SeqCst);
        }
        self.interrupt.config_vector.store(in_table(saved.config_vector), Ordering::SeqCst);
        self.interrupt.isr.store(saved.isr, Ordering::SeqCst);
        {
            let mut msix = self.msix.lock().unwrap_or_else(|p| p.into_inner());
            for (entry, &(addr, data, masked)) in msix.table.iter_mut().zip(&saved.msix_table) {
                *entry = MsixEntry { addr, data, masked };
            }
            for (pending, &p) in msix.pending.iter_mut().zip(&saved.msix_pending) {
                *pending = p;
            }
            msix.enabled = saved.msix_enabled;
            msix.function_masked = saved.msix_function_masked;
            msix.update();
        }
        self.state.restore(&saved.transport)
    }

    pub fn queue_events(&self) -> &[EventFd] {
        self.state.queue_events()
    }

    fn put16(&mut self, at: usize, v: u16) {
        self.config[at..at + 2].copy_from_slice(&v.to_le_bytes());
    }
    fn put32(&mut self, at: usize, v: u32) {
        self.config[at..at + 4].copy_from_slice(&v.to_le_bytes());
    }

    fn build_config(&mut self, device_type: u32, vectors: usize) {
        self.put16(0x00, VENDOR_ID);
        self.put16(0x02, DEVICE_ID_BASE + device_type as u16);
        self.put16(0x06, STATUS_CAP_LIST);
        self.config[0x08] = 1; // revision: modern
        let class: u32 = match device_type {
            crate::TYPE_NET => 0x02_0000,
            crate::TYPE_BLOCK => 0x01_0000,
            _ => 0xff_0000,
        };
        self.config[0x09..0x0c].copy_from_slice(&class.to_le_bytes()[..3]);
        self.put32(0x10, self.bar_addr as u32 | 0x4); // 64-bit memory BAR
        self.put32(0x14, (self.bar_addr >> 32) as u32);
        self.put16(0x2c, VENDOR_ID);
        self.put16(0x2e, device_type as u16);
        self.config[0x34] = 0x40;
        // MSI-X: table and PBA in BAR 0.
        self.config[0x40] = CAP_MSIX;
        self.config[0x41] = 0x4c;
        self.put16(0x42, vectors as u16 - 1);
        self.put32(0x44, MSIX_TABLE_OFFSET as u32);
        self.put32(0x48, MSIX_PBA_OFFSET as u32);
        // virtio capabilities: type, then offset and length in BAR 0.
        let caps: [(usize, u8, u64, u32, u8); 4] = [
            (0x4c, CAP_COMMON, COMMON_OFFSET, 0x38, 0x5c),
            (0x5c, CAP_ISR, ISR_OFFSET, 1, 0x6c),
            (0x6c, CAP_DEVICE, DEVICE_OFFSET, 0x1000, 0x7c),
            (0x7c, CAP_NOTIFY, NOTIFY_OFFSET, 0x1000, 0),
        ];
        for (at, kind, offset, len, next) in caps {
            self.config[at] = CAP_VENDOR;
            self.config[at + 1] = next;
            self.config[at + 2] = if kind == CAP_NOTIFY { 20 } else { 16 };
            self.config[at + 3] = kind;
            self.config[at + 4] = 0; // BAR 0
            self.put32(at + 8, offset as u32);
            self.put32(at + 12, len);
        }
        self.put32(0x7c + 16, NOTIFY_MULTIPLIER);
    }

    fn msix_control(&mut self, value: u16) {
        let control = (u16::from_le_bytes([self.config[0x42], self.config[0x43]])
            & !(MSIX_ENABLE | MSIX_FUNCTION_MASK))
            | (value & (MSIX_ENABLE | MSIX_FUNCTION_MASK));
        self.put16(0x42, control);
        let mut msix = self.msix.lock().unwrap_or_else(|p| p.into_inner());
        msix.enabled = control & MSIX_ENABLE != 0;
        msix.function_masked = control & MSIX_FUNCTION_MASK != 0;
        msix.update();
    }

    fn read_common(&self, offset: u64) -> u32 {
        let s = &self.state;
        let sel = s.queue_sel as usize;
        match offset {
            0 => s.device_features_sel,
            4 => s.device_features(),
            8 => s.driver_features_sel,
            12 => s.driver_features(),
            16 => u32::from(self.interrupt.config_vector.load(Ordering::SeqCst)),
            18 => s.num_queues() as u32,
            20 => s.status(),
            21 => s.config_generation(),
            22 => s.queue_sel,
            24 => u32::from(s.queue_size()),
            26 => u32::from(self.interrupt.queue_vectors.get(sel).map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst))),
            28 => u32::from(s.queue_ready()),
            30 => s.queue_sel, // queue_notify_off: queue q notifies at q * multiplier
            32 => s.queue_addresses().0 as u32,
            36 => (s.queue_addresses().0 >> 32) as u32,
            40 => s.queue_addresses().1 as u32,
            44 => (s.queue_addresses().1 >> 32) as u32,
            48 => s.queue_addresses().2 as u32,
            52 => (s.queue_addresses().2 >> 32) as u32,
            _ => 0,
        }
    }

    fn write_common(&mut self, offset: u64, value: u32) {
        let field = match offset {
            24 => Some(QueueField::Size),
            28 => Some(QueueField::Ready),
            32 => Some(QueueField::DescLow),
            36 => Some(QueueField::DescHigh),
            40 => Some(QueueField::DriverLow),
            44 => Some(QueueField::DriverHigh),
            48 => Some(QueueField::DeviceLow),
            52 => Some(QueueField::DeviceHigh),
            _ => None,
        };
        if let Some(field) = field {
            return self.state.write_queue(field, value);
        }
        let vectors = self.table_size();
        let vector = |v: u32| if (v as usize) < vectors { v as u16 } else { NO_VECTOR };
        match offset {
            0 => self.state.device_features_sel = value,
            8 => self.state.driver_features_sel = value,
            12 => self.state.write_driver_features(value),
            16 => self.interrupt.config_vector.store(vector(value), Ordering::SeqCst),
            20 => {
                let driver_ok = |status: u32| status & crate::transport::STATUS_DRIVER_OK != 0;
                let was_started = driver_ok(self.state.status());
                if self.state.write_status(value) {
                    self.interrupt.isr.store(0, Ordering::SeqCst);
                    self.interrupt.config_vector.store(NO_VECTOR, Ordering::SeqCst);
                    for v in &self.interrupt.queue_vectors {
                        v.store(NO_VECTOR, Ordering::SeqCst);
                    }
                } else if !was_started && driver_ok(self.state.status()) {
                    self.log_vectors();
                }
            }
            22 => self.state.queue_sel = value & 0xffff,
            26 => {
                let sel = self.state.queue_sel as usize;
                if let Some(slot) = self.interrupt.queue_vectors.get(sel) {
                    slot.store(vector(value), Ordering::SeqCst);
                }
            }
            _ => crate::guest_fault!("{}: ignored a write to common configuration offset {offset:#x}", self.state.name),
        }
    }

    fn read_msix(&self, offset: u64) -> u32 {
        let msix = self.msix.lock().unwrap_or_else(|p| p.into_inner());
        if offset >= MSIX_PBA_OFFSET {
            // Each dword holds the pending bits of 32 vectors.
            let first = ((offset - MSIX_PBA_OFFSET) / 4 * 32) as usize;
            let pending = msix.pending.iter().skip(first).take(32);
            return pending.enumerate().fold(0, |acc, (i, &p)| acc | (u32::from(p) << i));
        }
        let (v, field) = (((offset - MSIX_TABLE_OFFSET) / 16) as usize, (offset - MSIX_TABLE_OFFSET) % 16);
        let Some(e) = msix.table.get(v) else { return 0 };
        match field {
            0 => e.addr as u32,
            4 => (e.addr >> 32) as u32,
            8 => e.data,
            12 => u32::from(e.masked),
            _ => 0,
        }
    }

    fn write_msix(&mut self, offset: u64, value: u32) {
        if offset >= MSIX_PBA_OFFSET {
            return;
        }
        let mut msix = self.msix.lock().unwrap_or_else(|p| p.into_inner());
        let (v, field) = (((offset - MSIX_TABLE_OFFSET) / 16) as usize, (offset - MSIX_TABLE_OFFSET) % 16);
        let Some(e) = msix.table.get_mut(v) else { return };
        match field {
            0 => e.addr = (e.addr & !0xffff_ffff) | u64::from(value),
            4 => e.addr = (e.addr & 0xffff_ffff) | (u64::from(value) << 32),
            8 => e.data = value,
            12 => e.masked = value & 1 != 0,
            _ => {}
        }
        msix.update();
    }
}

impl PciDevice for PciTransport {
    fn config_read(&mut self, offset: u16) -> u32 {
        let at = usize::from(offset & 0xfc);
        match at {
            // While the guest sizes the BAR it reads back the size mask.
            0x10 if self.bar_written[0] == u32::MAX => !(BAR_SIZE as u32 - 1) | 0x4,
            0x14 if self.bar_written[1] == u32::MAX => u32::MAX,
            _ => u32::from_le_bytes(self.config[at..at + 4].try_into().expect("4 bytes")),
        }
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) {
        let at = usize::from(offset);
        let value = data.iter().rev().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
        match (at, data.len()) {
            (0x04, 2) | (0x04, 4) => self.put16(0x04, value as u16 & COMMAND_WRITABLE),
            (0x10, 4) | (0x14, 4) => {
                let i = (at - 0x10) / 4;
                self.bar_written[i] = value;
                let current = if i == 0 { self.bar_addr as u32 | 0x4 } else { (self.bar_addr >> 32) as u32 };
                if value != u32::MAX && value & !0xf != current & !0xf {
                    crate::guest_fault!(
                        "{}: the guest moved BAR 0 ({value:#x}); moving BARs is not supported",
                        self.state.name
                    );
                }
            }
            (0x42, 2) => self.msix_control(value as u16),
            (0x40, 4) => self.msix_control((value >> 16) as u16),
            _ => tracing::debug!("{}: ignored a {}-byte PCI config write at {at:#x}", self.state.name, data.len()),
        }
    }
}

impl BusDevice for PciTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if (DEVICE_OFFSET..NOTIFY_OFFSET).contains(&offset) {
            return self.state.device().read_config(offset - DEVICE_OFFSET, data);
        }
        let value = match offset {
            ISR_OFFSET => self.interrupt.isr.swap(0, Ordering::SeqCst),
            // Every field sits at its own offset and is read whole.
            o if o < ISR_OFFSET => self.read_common(o),
            o if (MSIX_TABLE_OFFSET..BAR_SIZE).contains(&o) => self.read_msix(o & !3),
            _ => 0,
        };
        for (i, out) in data.iter_mut().enumerate() {
            *out = (u64::from(value) >> (i * 8)) as u8;
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if (DEVICE_OFFSET..NOTIFY_OFFSET).contains(&offset) {
            return self.state.device_mut().write_config(offset - DEVICE_OFFSET, data);
        }
        let value = data.iter().take(4).rev().fold(0u32, |acc, b| (acc << 8) | u32::from(*b));
        match offset {
            o if o < ISR_OFFSET => {
                // Byte and word fields (status, vectors, queue fields) sit at their own offsets.
                self.write_common(o, value)
            }
            o if (NOTIFY_OFFSET..MSIX_TABLE_OFFSET).contains(&o) => {
                self.state.notify(((o - NOTIFY_OFFSET) / u64::from(NOTIFY_MULTIPLIER)) as u32)
            }
            o if (MSIX_TABLE_OFFSET..BAR_SIZE).contains(&o) => self.write_msix(o & !3, value),
            _ => tracing::debug!("{}: ignored a write at BAR offset {offset:#x}", self.state.name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::{ActivateError, Activation};
    use crate::transport::{STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK};
    use crate::{F_VERSION_1, TYPE_BLOCK};
    use vm_memory::GuestAddress;

    /// A route update: the GSI and its MSI (address, data), None when removed.
    type RouteUpdate = (u32, Option<(u64, u32)>);

    /// Every route set, and how many updates set them.
    #[derive(Default)]
    struct Routes(Mutex<Vec<RouteUpdate>>, std::sync::atomic::AtomicUsize);
    impl MsiRouter for Routes {
        fn set_routes(&self, routes: &[RouteUpdate]) {
            self.0.lock().unwrap().extend_from_slice(routes);
            self.1.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Where the fake device keeps the interrupt it was activated with.
    type Captured = Arc<Mutex<Option<Arc<dyn VirtioInterrupt>>>>;

    /// The interrupt it was activated with, and its queues (given back when quiesced).
    struct FakeBlock(Captured, Option<Vec<virtio_queue::Queue>>);
    impl VirtioDevice for FakeBlock {
        fn device_type(&self) -> u32 {
            TYPE_BLOCK
        }
        fn features(&self) -> u64 {
            F_VERSION_1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::device::read_config_bytes(&[9, 8, 7, 6], offset, data);
        }
        fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
            *self.0.lock().unwrap() = Some(activation.interrupt);
            self.1 = Some(activation.queues);
            Ok(())
        }
        fn reset(&mut self) {}
        fn quiesce(&mut self) -> Option<Vec<virtio_queue::Queue>> {
            self.1.take()
        }
    }

    struct Rig {
        t: PciTransport,
        routes: Arc<Routes>,
        irqfds: Vec<EventFd>,
        interrupt: Captured,
    }

    fn rig() -> Rig {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let routes = Arc::new(Routes::default());
        // Two queues: three vectors.
        let irqfds: Vec<EventFd> =
            (0..3).map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap()).collect();
        let clones = irqfds.iter().map(|e| e.try_clone().unwrap()).collect();
        let interrupt = Arc::new(Mutex::new(None));
        let device = Box::new(FakeBlock(interrupt.clone(), None));
        let t = PciTransport::new("fake", device, mem, 0xe000_0000, vec![24, 25, 26], clones, routes.clone()).unwrap();
        Rig { t, routes, irqfds, interrupt }
    }

    fn bar_write(t: &mut PciTransport, offset: u64, value: u32, len: usize) {
        t.write(offset, &value.to_le_bytes()[..len]);
    }

    fn bar_read(t: &mut PciTransport, offset: u64, len: usize) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b[..len]);
        u32::from_le_bytes(b)
    }

    #[test]
    fn config_space_describes_a_modern_virtio_function() {
        let mut r = rig();
        assert_eq!(r.t.config_read(0), 0x1042_1af4);
        assert_eq!(r.t.config_read(0x08) >> 8, 0x01_0000, "mass storage class");
        assert_eq!(r.t.config_read(0x10), 0xe000_0004);
        assert_eq!(r.t.config_read(0x34) & 0xff, 0x40);
        // The capability chain: MSI-X, then common, ISR, device and notify configuration.
        let mut at = 0x40u16;
        let mut kinds = Vec::new();
        while at != 0 {
            let head = r.t.config_read(at);
            kinds.push(if head & 0xff == u32::from(CAP_MSIX) { 0x11 } else { (head >> 24) as u8 });
            at = ((head >> 8) & 0xff) as u16;
        }
        assert_eq!(kinds, [0x11, CAP_COMMON, CAP_ISR, CAP_DEVICE, CAP_NOTIFY]);
    }

    #[test]
    fn bar_sizing_reads_the_size_mask() {
        let mut r = rig();
        r.t.config_write(0x10, &u32::MAX.to_le_bytes());
        r.t.config_write(0x14, &u32::MAX.to_le_bytes());
        assert_eq!(r.t.config_read(0x10), !(BAR_SIZE as u32 - 1) | 0x4);
        assert_eq!(r.t.config_read(0x14), u32::MAX);
        r.t.config_write(0x10, &0xe000_0000u32.to_le_bytes());
        r.t.config_write(0x14, &0u32.to_le_bytes());
        assert_eq!(r.t.config_read(0x10), 0xe000_0004);
    }

    #[test]
    fn msix_routes_follow_the_table_and_masks() {
        let mut r = rig();
        bar_write(&mut r.t, MSIX_TABLE_OFFSET + 16, 0xfee0_0000, 4);
        bar_write(&mut r.t, MSIX_TABLE_OFFSET + 16 + 8, 0x41, 4);
        bar_write(&mut r.t, MSIX_TABLE_OFFSET + 16 + 12, 0, 4); // unmask vector 1
        let updates = r.routes.1.load(Ordering::SeqCst);
        r.t.config_write(0x42, &MSIX_ENABLE.to_le_bytes());
        // Enabling re-routes every vector in one update, not one per vector.
        assert_eq!(r.routes.1.load(Ordering::SeqCst), updates + 1);
        let routes = r.routes.0.lock().unwrap().clone();
        assert!(routes.iter().rev().take(3).any(|r| *r == (25, Some((0xfee0_0000, 0x41)))), "{routes:?}");
        assert!(routes.iter().any(|&(gsi, msi)| gsi == 24 && msi.is_none()), "vector 0 stays masked");
        assert_eq!(bar_read(&mut r.t, MSIX_TABLE_OFFSET + 16 + 8, 4), 0x41);
    }

    #[test]
    fn common_configuration_negotiates_sets_up_queues_and_signals_msix() {
        let mut r = rig();
        for status in [STATUS_ACKNOWLEDGE, STATUS_ACKNOWLEDGE | STATUS_DRIVER] {
            bar_write(&mut r.t, 20, status, 1);
        }
        assert_eq!(bar_read(&mut r.t, 18, 2), 2, "num_queues");
        bar_write(&mut r.t, 0, 1, 4); // device_feature_select = 1
        assert_eq!(bar_read(&mut r.t, 4, 4), 1, "VERSION_1 is bit 32");
        bar_write(&mut r.t, 8, 1, 4);
        bar_write(&mut r.t, 12, 1, 4);
        bar_write(&mut r.t, 20, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK, 1);
        assert_ne!(bar_read(&mut r.t, 20, 1) & STATUS_FEATURES_OK, 0);
        for (q, base) in [(0u32, 0x1_0000u32), (1, 0x2_0000)] {
            bar_write(&mut r.t, 22, q, 2);
            assert_eq!(bar_read(&mut r.t, 24, 2), 16);
            assert_eq!(bar_read(&mut r.t, 30, 2), q, "queue_notify_off");
            bar_write(&mut r.t, 26, 1, 2);
            assert_eq!(bar_read(&mut r.t, 26, 2), 1);
            bar_write(&mut r.t, 32, base, 4);
            bar_write(&mut r.t, 40, base + 0x1000, 4);
            bar_write(&mut r.t, 48, base + 0x2000, 4);
            bar_write(&mut r.t, 28, 1, 2);
        }
        bar_write(&mut r.t, 22, 0, 2);
        bar_write(&mut r.t, 26, 7, 2);
        assert_eq!(bar_read(&mut r.t, 26, 2), u32::from(NO_VECTOR), "a vector beyond the table is refused");
        bar_write(&mut r.t, 26, 3, 2);
        assert_eq!(bar_read(&mut r.t, 26, 2), u32::from(NO_VECTOR), "three vectors: 0 to 2");
        bar_write(&mut r.t, 26, 1, 2);
        bar_write(&mut r.t, 20, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK, 1);
        let interrupt = r.interrupt.lock().unwrap().clone().expect("activated");
        // MSI-X is off: the ISR records it, nothing fires.
        interrupt.signal_used_queues(queue_bit(0));
        assert!(r.irqfds[1].read().is_err());
        assert_eq!(bar_read(&mut r.t, ISR_OFFSET, 1), 1);
        assert_eq!(bar_read(&mut r.t, ISR_OFFSET, 1), 0, "reading the ISR clears it");
        bar_write(&mut r.t, MSIX_TABLE_OFFSET + 16 + 12, 0, 4);
        r.t.config_write(0x42, &MSIX_ENABLE.to_le_bytes());
        assert_eq!(r.irqfds[1].read().unwrap(), 1, "the interrupt held while MSI-X was off is delivered");
        interrupt.signal_used_queues(queue_bit(0));
        assert_eq!(r.irqfds[1].read().unwrap(), 1);
        // Device configuration and notifications.
        assert_eq!(bar_read(&mut r.t, DEVICE_OFFSET + 1, 2), 0x0708);
        bar_write(&mut r.t, NOTIFY_OFFSET + 4, 1, 2);
        assert_eq!(r.t.queue_events()[1].read().unwrap(), 1);
    }

    /// Drives the rig's function to DRIVER_OK with MSI-X on and `vectors[q]` given to queue q;
    /// returns the device's interrupt.
    fn started(r: &mut Rig, vectors: [u32; 2]) -> Arc<dyn VirtioInterrupt> {
        for status in [STATUS_ACKNOWLEDGE, STATUS_ACKNOWLEDGE | STATUS_DRIVER] {
            bar_write(&mut r.t, 20, status, 1);
        }
        bar_write(&mut r.t, 8, 1, 4);
        bar_write(&mut r.t, 12, 1, 4);
        bar_write(&mut r.t, 20, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK, 1);
        for (q, base) in [(0u32, 0x1_0000u32), (1, 0x2_0000)] {
            bar_write(&mut r.t, 22, q, 2);
            bar_write(&mut r.t, 26, vectors[q as usize], 2);
            bar_write(&mut r.t, 32, base, 4);
            bar_write(&mut r.t, 40, base + 0x1000, 4);
            bar_write(&mut r.t, 48, base + 0x2000, 4);
            bar_write(&mut r.t, 28, 1, 2);
        }
        bar_write(&mut r.t, 20, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK, 1);
        for v in 0..3 {
            bar_write(&mut r.t, MSIX_TABLE_OFFSET + 16 * v + 12, 0, 4);
        }
        r.t.config_write(0x42, &MSIX_ENABLE.to_le_bytes());
        r.interrupt.lock().unwrap().clone().expect("activated")
    }

    #[test]
    fn each_queue_fires_the_vector_its_driver_gave_it() {
        let mut r = rig();
        assert_eq!(r.t.config_read(0x40) >> 16 & 0x7ff, 2, "a vector per queue and one for configuration");
        let interrupt = started(&mut r, [1, 2]);
        interrupt.signal_used_queues(queue_bit(1));
        assert_eq!((r.irqfds[1].read().ok(), r.irqfds[2].read().ok()), (None, Some(1)), "queue 1's own vector");
        interrupt.signal_used_queues(queue_bit(0) | queue_bit(1));
        assert_eq!((r.irqfds[1].read().ok(), r.irqfds[2].read().ok()), (Some(1), Some(1)));
        // Queues sharing a vector (as a driver short of vectors sets them) fire it once.
        let mut shared = rig();
        let interrupt = started(&mut shared, [1, 1]);
        interrupt.signal_used_queues(queue_bit(0) | queue_bit(1));
        assert_eq!(shared.irqfds[1].read().ok(), Some(1));
        assert!(shared.irqfds[2].read().is_err());
    }

    #[test]
    fn a_function_saved_with_two_vectors_keeps_its_table_size_when_restored() {
        let mut r = rig();
        started(&mut r, [1, 1]);
        let mut saved = r.t.save().unwrap();
        // As Ferrovisor wrote it when every function had two vectors.
        saved.msix_table.truncate(2);
        saved.msix_pending.truncate(2);
        saved.config[0x42] = 1;
        let mut fresh = rig();
        fresh.t.restore(&saved).unwrap();
        assert_eq!(fresh.t.config_read(0x40) >> 16, u32::from(MSIX_ENABLE) | 1, "two vectors, MSI-X on");
        bar_write(&mut fresh.t, 22, 1, 2);
        assert_eq!(bar_read(&mut fresh.t, 26, 2), 1, "queue 1 keeps the shared vector");
        bar_write(&mut fresh.t, 26, 2, 2);
        assert_eq!(bar_read(&mut fresh.t, 26, 2), u32::from(NO_VECTOR), "vector 2 is past its table");
        // A table larger than the function's is refused.
        let mut bigger = r.t.save().unwrap();
        bigger.msix_table.push((0, 0, true));
        assert!(rig().t.restore(&bigger).unwrap_err().contains("a different PCI function"));
    }
}
