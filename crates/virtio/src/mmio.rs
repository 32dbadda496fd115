//! The virtio-mmio transport, version 2 (virtio 1.2 section 4.2): the register window the
//! driver programs, feature negotiation, queue set-up and the device status machine. Anything
//! malformed the driver writes is logged and ignored, or ends in DEVICE_NEEDS_RESET.

use std::sync::Arc;

use devices::BusDevice;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{Activation, Interrupt, VirtioDevice};
use crate::{F_VERSION_1, GuestMemory};

/// The size of each device's MMIO window.
pub const WINDOW_SIZE: u64 = 0x1000;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
/// "FRVR": no PCI vendor behind an MMIO device.
const VENDOR_ID: u32 = 0x5256_5246;

pub const REG_MAGIC: u64 = 0x000;
pub const REG_VERSION: u64 = 0x004;
pub const REG_DEVICE_ID: u64 = 0x008;
pub const REG_VENDOR_ID: u64 = 0x00c;
pub const REG_DEVICE_FEATURES: u64 = 0x010;
pub const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
pub const REG_DRIVER_FEATURES: u64 = 0x020;
pub const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
pub const REG_QUEUE_SEL: u64 = 0x030;
pub const REG_QUEUE_NUM_MAX: u64 = 0x034;
pub const REG_QUEUE_NUM: u64 = 0x038;
pub const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
pub const REG_QUEUE_DESC_LOW: u64 = 0x080;
pub const REG_QUEUE_DESC_HIGH: u64 = 0x084;
pub const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
pub const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
pub const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
pub const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
pub const REG_CONFIG_GENERATION: u64 = 0x0fc;
pub const REG_CONFIG: u64 = 0x100;

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

/// What the driver wrote about one queue, kept apart from the queue so that bad values are
/// remembered (virtio-queue keeps only good ones).
#[derive(Clone, Copy, Default)]
struct QueueSetup {
    desc: u64,
    avail: u64,
    used: u64,
    bad_size: bool,
}

pub struct MmioTransport {
    name: String,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<Interrupt>,
    queues: Vec<Queue>,
    setups: Vec<QueueSetup>,
    queue_events: Vec<EventFd>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    active: bool,
}

impl MmioTransport {
    pub fn new(name: &str, device: Box<dyn VirtioDevice>, mem: GuestMemory, irqfd: EventFd) -> std::io::Result<Self> {
        let sizes = device.queue_max_sizes().to_vec();
        let queues = sizes.iter().map(|&max| Queue::new(max).expect("device queue sizes are powers of two")).collect();
        let queue_events = sizes.iter().map(|_| EventFd::new(libc::EFD_NONBLOCK)).collect::<Result<_, _>>()?;
        Ok(MmioTransport {
            name: name.into(),
            device,
            mem,
            interrupt: Arc::new(Interrupt::new(irqfd)),
            setups: vec![QueueSetup::default(); sizes.len()],
            queues,
            queue_events,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            active: false,
        })
    }

    /// One eventfd per queue, for KVM to signal on a notify write (ioeventfd, datamatch on the
    /// queue index at REG_QUEUE_NOTIFY).
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    fn selected(&mut self) -> Option<(&mut Queue, &mut QueueSetup)> {
        let i = self.queue_sel as usize;
        Some((self.queues.get_mut(i)?, self.setups.get_mut(i)?))
    }

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        for (queue, setup) in self.queues.iter_mut().zip(&mut self.setups) {
            queue.reset();
            *setup = QueueSetup::default();
        }
        for evt in &self.queue_events {
            let _ = evt.read();
        }
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.interrupt.clear();
    }

    fn needs_reset(&mut self, why: &str) {
        tracing::warn!("{}: {why}; the device needs a reset", self.name);
        self.status |= STATUS_NEEDS_RESET;
        if self.status & STATUS_DRIVER_OK != 0 {
            self.interrupt.signal_config_change();
        }
    }

    fn write_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let added = value & !self.status;
        if value & self.status != self.status {
            tracing::warn!(
                "{}: the driver cleared status bits ({:#x} -> {value:#x}) without a reset",
                self.name,
                self.status
            );
            return;
        }
        if added & STATUS_FAILED != 0 {
            tracing::info!("{}: the driver gave up on the device (FAILED)", self.name);
        }
        if added & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.acked_features & !offered != 0 || self.acked_features & F_VERSION_1 == 0 {
                tracing::warn!(
                    "{}: refused features {:#x} (offered {offered:#x}; VERSION_1 is required)",
                    self.name,
                    self.acked_features
                );
                self.status = value & !STATUS_FEATURES_OK;
                return;
            }
        }
        self.status = value;
        if added & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.status & STATUS_FEATURES_OK == 0 {
            return self.needs_reset("DRIVER_OK came before FEATURES_OK");
        }
        for (i, (queue, setup)) in self.queues.iter().zip(&self.setups).enumerate() {
            if !queue.ready() {
                continue;
            }
            if setup.bad_size {
                return self
                    .needs_reset(&format!("queue {i} was given a size that is not a power of two up to its maximum"));
            }
            if queue.desc_table() != setup.desc || queue.avail_ring() != setup.avail || queue.used_ring() != setup.used
            {
                return self.needs_reset(&format!("queue {i} has misaligned rings"));
            }
            if !queue.is_valid(&self.mem) {
                return self.needs_reset(&format!("queue {i} has rings outside guest RAM"));
            }
        }
        let queue_events = match self.queue_events.iter().map(EventFd::try_clone).collect::<Result<Vec<_>, _>>() {
            Ok(events) => events,
            Err(e) => return self.needs_reset(&format!("cannot share the queue eventfds ({e})")),
        };
        let event_idx = self.acked_features & crate::F_RING_EVENT_IDX != 0;
        // The device gets its own copies; the transport keeps the driver's configuration.
        let mut queues = Vec::with_capacity(self.queues.len());
        for q in &self.queues {
            match Queue::try_from(q.state()) {
                Ok(mut copy) => {
                    copy.set_event_idx(event_idx);
                    queues.push(copy);
                }
                Err(e) => return self.needs_reset(&format!("a queue cannot be handed over ({e})")),
            }
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            queue_events,
            interrupt: self.interrupt.clone(),
            acked_features: self.acked_features,
        };
        match self.device.activate(activation) {
            Ok(()) => {
                self.active = true;
                tracing::info!("{}: the driver started the device (features {:#x})", self.name, self.acked_features);
            }
            Err(e) => self.needs_reset(&format!("activation failed: {e}")),
        }
    }

    fn write_queue_register(&mut self, offset: u64, value: u32) {
        let name = self.name.clone();
        if self.status & STATUS_DRIVER_OK != 0 {
            tracing::warn!("{name}: ignored a queue register write at {offset:#x} after DRIVER_OK");
            return;
        }
        let Some((queue, setup)) = self.selected() else {
            tracing::warn!("{name}: ignored a write to queue register {offset:#x} of a queue that does not exist");
            return;
        };
        if queue.ready() && offset != REG_QUEUE_READY {
            tracing::warn!("{name}: ignored a write to queue register {offset:#x} of a ready queue");
            return;
        }
        let low = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        let high = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        match offset {
            REG_QUEUE_NUM => {
                setup.bad_size = value > u32::from(u16::MAX) || queue.try_set_size(value as u16).is_err();
            }
            REG_QUEUE_READY => queue.set_ready(value == 1),
            REG_QUEUE_DESC_LOW | REG_QUEUE_DESC_HIGH => {
                setup.desc = if offset == REG_QUEUE_DESC_LOW { low(setup.desc) } else { high(setup.desc) };
                let _ = queue.try_set_desc_table_address(GuestAddress(setup.desc));
            }
            REG_QUEUE_DRIVER_LOW | REG_QUEUE_DRIVER_HIGH => {
                setup.avail = if offset == REG_QUEUE_DRIVER_LOW { low(setup.avail) } else { high(setup.avail) };
                let _ = queue.try_set_avail_ring_address(GuestAddress(setup.avail));
            }
            REG_QUEUE_DEVICE_LOW | REG_QUEUE_DEVICE_HIGH => {
                setup.used = if offset == REG_QUEUE_DEVICE_LOW { low(setup.used) } else { high(setup.used) };
                let _ = queue.try_set_used_ring_address(GuestAddress(setup.used));
            }
            _ => unreachable!("only queue registers come here"),
        }
    }

    fn read_register(&self, offset: u64) -> u32 {
        let selected = self.queues.get(self.queue_sel as usize);
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => selected.map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => selected.map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => 0,
            _ => {
                tracing::debug!("{}: read of write-only or unknown register {offset:#x}", self.name);
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES => {
                if self.status & STATUS_DRIVER == 0 || self.status & STATUS_FEATURES_OK != 0 {
                    tracing::warn!("{}: ignored a feature write outside feature negotiation", self.name);
                    return;
                }
                match self.driver_features_sel {
                    0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
                    1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32),
                    sel => tracing::warn!("{}: ignored features for selector {sel}", self.name),
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => self.write_queue_register(offset, value),
            REG_QUEUE_NOTIFY => match self.queue_events.get(value as usize) {
                // KVM answers notifications through ioeventfds; this path serves VMMs and
                // tests that route the write here.
                Some(evt) => {
                    let _ = evt.write(1);
                }
                None => tracing::warn!("{}: notify for queue {value}, which does not exist", self.name),
            },
            REG_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            REG_STATUS => self.write_status(value),
            _ => tracing::warn!("{}: ignored a write to read-only or unknown register {offset:#x}", self.name),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            return self.device.read_config(offset - REG_CONFIG, data);
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            tracing::warn!("{}: {}-byte register read at {offset:#x}; registers are 32-bit", self.name, data.len());
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            return self.device.write_config(offset - REG_CONFIG, data);
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            tracing::warn!("{}: {}-byte register write at {offset:#x}; registers are 32-bit", self.name, data.len());
            return;
        };
        if !offset.is_multiple_of(4) {
            tracing::warn!("{}: unaligned register write at {offset:#x}", self.name);
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::ActivateError;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Record {
        activations: Vec<u64>,
        resets: usize,
    }

    struct FakeDevice(Arc<Mutex<Record>>);

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            42
        }
        fn features(&self) -> u64 {
            F_VERSION_1 | 0b101
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 8]
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::device::read_config_bytes(&[1, 2, 3, 4, 5, 6], offset, data);
        }
        fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
            self.0.lock().unwrap().activations.push(activation.acked_features);
            Ok(())
        }
        fn reset(&mut self) {
            self.0.lock().unwrap().resets += 1;
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Record>>) {
        let record = Arc::new(Mutex::new(Record::default()));
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (MmioTransport::new("fake", Box::new(FakeDevice(record.clone())), mem, irq).unwrap(), record)
    }

    fn read(t: &mut MmioTransport, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(offset, &mut b);
        u32::from_le_bytes(b)
    }

    fn write(t: &mut MmioTransport, offset: u64, value: u32) {
        t.write(offset, &value.to_le_bytes());
    }

    /// The driver's side of initialization up to FEATURES_OK, acking `features`.
    fn negotiate(t: &mut MmioTransport, features: u64) {
        write(t, REG_STATUS, STATUS_ACKNOWLEDGE);
        write(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        write(t, REG_DRIVER_FEATURES_SEL, 0);
        write(t, REG_DRIVER_FEATURES, features as u32);
        write(t, REG_DRIVER_FEATURES_SEL, 1);
        write(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        write(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
    }

    fn setup_queue(t: &mut MmioTransport, index: u32, size: u32, base: u64) {
        write(t, REG_QUEUE_SEL, index);
        write(t, REG_QUEUE_NUM, size);
        write(t, REG_QUEUE_DESC_LOW, base as u32);
        write(t, REG_QUEUE_DRIVER_LOW, (base + 0x1000) as u32);
        write(t, REG_QUEUE_DEVICE_LOW, (base + 0x2000) as u32);
        write(t, REG_QUEUE_READY, 1);
    }

    const ALL_OK: u32 = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;

    #[test]
    fn identity_registers() {
        let (mut t, _) = transport();
        assert_eq!(read(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(read(&mut t, REG_VERSION), 2);
        assert_eq!(read(&mut t, REG_DEVICE_ID), 42);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        write(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 0b101);
        write(&mut t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(read(&mut t, REG_DEVICE_FEATURES), 0);
        write(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 8);
        write(&mut t, REG_QUEUE_SEL, 9);
        assert_eq!(read(&mut t, REG_QUEUE_NUM_MAX), 0, "a queue that does not exist");
        let mut config = [0u8; 2];
        t.read(REG_CONFIG + 4, &mut config);
        assert_eq!(config, [5, 6]);
    }

    #[test]
    fn features_without_version_1_or_beyond_the_offer_are_refused() {
        let (mut t, _) = transport();
        negotiate(&mut t, 0b1);
        assert_eq!(read(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        write(&mut t, REG_STATUS, 0);
        negotiate(&mut t, F_VERSION_1 | 0b10);
        assert_eq!(read(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        write(&mut t, REG_STATUS, 0);
        negotiate(&mut t, F_VERSION_1 | 0b100);
        assert_ne!(read(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn driver_ok_activates_with_the_acked_features_and_reset_stops() {
        let (mut t, record) = transport();
        negotiate(&mut t, F_VERSION_1 | 0b1);
        setup_queue(&mut t, 0, 16, 0x1_0000);
        write(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(read(&mut t, REG_STATUS), ALL_OK);
        assert_eq!(record.lock().unwrap().activations, vec![F_VERSION_1 | 0b1]);
        // Queue registers are frozen once the device runs.
        write(&mut t, REG_QUEUE_SEL, 1);
        write(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 0);
        // Clearing bits without a reset is ignored; 0 resets.
        write(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(read(&mut t, REG_STATUS), ALL_OK);
        write(&mut t, REG_STATUS, 0);
        assert_eq!(read(&mut t, REG_STATUS), 0);
        assert_eq!(record.lock().unwrap().resets, 1);
        write(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(read(&mut t, REG_QUEUE_READY), 0, "queues are reset too");
    }

    #[test]
    fn bad_queues_end_in_needs_reset_without_activation() {
        for (size, base) in [(3, 0x1_0000), (32, 0x1_0000), (16, 0x1_0001), (16, 0xff_f000)] {
            let (mut t, record) = transport();
            negotiate(&mut t, F_VERSION_1);
            setup_queue(&mut t, 0, size, base);
            write(&mut t, REG_STATUS, ALL_OK);
            assert_ne!(read(&mut t, REG_STATUS) & STATUS_NEEDS_RESET, 0, "size {size} at {base:#x}");
            assert!(record.lock().unwrap().activations.is_empty());
        }
    }

    #[test]
    fn narrow_register_accesses_and_stray_writes_are_ignored() {
        let (mut t, _) = transport();
        let mut two = [0xffu8; 2];
        t.read(REG_MAGIC, &mut two);
        assert_eq!(two, [0, 0]);
        t.write(REG_STATUS, &[1]);
        assert_eq!(read(&mut t, REG_STATUS), 0);
        write(&mut t, 0x0fe, 5);
        write(&mut t, REG_MAGIC, 5);
        assert_eq!(read(&mut t, REG_MAGIC), MAGIC);
        write(&mut t, REG_DRIVER_FEATURES, 0xffff_ffff);
        negotiate(&mut t, F_VERSION_1);
        assert_ne!(read(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0, "features written before DRIVER were dropped");
    }

    #[test]
    fn notify_signals_the_queue_eventfd() {
        let (mut t, _) = transport();
        write(&mut t, REG_QUEUE_NOTIFY, 1);
        write(&mut t, REG_QUEUE_NOTIFY, 77);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);
        assert!(t.queue_events()[0].read().is_err(), "queue 0 was not notified");
    }
}
