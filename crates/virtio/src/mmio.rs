//! The virtio-mmio transport, version 2 (virtio 1.2 section 4.2): the register window the
//! driver programs, mapped onto the shared transport state (transport.rs).

use std::sync::Arc;

use devices::BusDevice;
use vmm_sys_util::eventfd::EventFd;

use crate::GuestMemory;
use crate::device::{Interrupt, VirtioDevice};
use crate::transport::{QueueField, VirtioState};

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

pub use crate::transport::{
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, STATUS_NEEDS_RESET,
};

pub struct MmioTransport {
    state: VirtioState,
    interrupt: Arc<Interrupt>,
}

impl MmioTransport {
    pub fn new(name: &str, device: Box<dyn VirtioDevice>, mem: GuestMemory, irqfd: EventFd) -> std::io::Result<Self> {
        let interrupt = Arc::new(Interrupt::new(irqfd));
        Ok(MmioTransport { state: VirtioState::new(name, device, mem, interrupt.clone())?, interrupt })
    }

    /// One eventfd per queue, for KVM to signal on a notify write (ioeventfd, datamatch on the
    /// queue index at REG_QUEUE_NOTIFY).
    pub fn queue_events(&self) -> &[EventFd] {
        self.state.queue_events()
    }

    pub fn device_type(&self) -> u32 {
        self.state.device().device_type()
    }

    pub fn virtio_state(&mut self) -> &mut VirtioState {
        &mut self.state
    }

    /// Quiesces the device and returns the transport's state (see [`VirtioState::save`]).
    pub fn save(&mut self) -> Result<crate::transport::SavedTransport, String> {
        let mut saved = self.state.save()?;
        saved.interrupt_status = self.interrupt.status();
        Ok(saved)
    }

    pub fn resume(&mut self) {
        self.state.resume();
    }

    pub fn restore(&mut self, saved: &crate::transport::SavedTransport) -> Result<(), String> {
        self.interrupt.clear();
        self.interrupt.raise_bits(saved.interrupt_status);
        self.state.restore(saved)
    }

    fn read_register(&self, offset: u64) -> u32 {
        let s = &self.state;
        match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => s.device().device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => s.device_features(),
            REG_QUEUE_NUM_MAX => u32::from(s.queue_max_size()),
            REG_QUEUE_READY => u32::from(s.queue_ready()),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => s.status(),
            REG_CONFIG_GENERATION => s.config_generation(),
            _ => {
                tracing::debug!("{}: read of write-only or unknown register {offset:#x}", s.name);
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, value: u32) {
        let queue_field = match offset {
            REG_QUEUE_NUM => Some(QueueField::Size),
            REG_QUEUE_READY => Some(QueueField::Ready),
            REG_QUEUE_DESC_LOW => Some(QueueField::DescLow),
            REG_QUEUE_DESC_HIGH => Some(QueueField::DescHigh),
            REG_QUEUE_DRIVER_LOW => Some(QueueField::DriverLow),
            REG_QUEUE_DRIVER_HIGH => Some(QueueField::DriverHigh),
            REG_QUEUE_DEVICE_LOW => Some(QueueField::DeviceLow),
            REG_QUEUE_DEVICE_HIGH => Some(QueueField::DeviceHigh),
            _ => None,
        };
        if let Some(field) = queue_field {
            return self.state.write_queue(field, value);
        }
        match offset {
            REG_DEVICE_FEATURES_SEL => self.state.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.state.driver_features_sel = value,
            REG_DRIVER_FEATURES => self.state.write_driver_features(value),
            REG_QUEUE_SEL => self.state.queue_sel = value,
            // KVM answers notifications through ioeventfds; this path serves VMMs and tests
            // that route the write here.
            REG_QUEUE_NOTIFY => self.state.notify(value),
            REG_INTERRUPT_ACK => self.interrupt.acknowledge(value),
            REG_STATUS => {
                if self.state.write_status(value) {
                    self.interrupt.clear();
                }
            }
            _ => {
                crate::guest_fault!("{}: ignored a write to read-only or unknown register {offset:#x}", self.state.name)
            }
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            return self.state.device().read_config(offset - REG_CONFIG, data);
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            crate::guest_fault!(
                "{}: {}-byte register read at {offset:#x}; registers are 32-bit",
                self.state.name,
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_register(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            return self.state.device_mut().write_config(offset - REG_CONFIG, data);
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            crate::guest_fault!(
                "{}: {}-byte register write at {offset:#x}; registers are 32-bit",
                self.state.name,
                data.len()
            );
            return;
        };
        if !offset.is_multiple_of(4) {
            crate::guest_fault!("{}: unaligned register write at {offset:#x}", self.state.name);
            return;
        }
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::F_VERSION_1;
    use crate::device::{ActivateError, Activation};
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

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
        let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
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
