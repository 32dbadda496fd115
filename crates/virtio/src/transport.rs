//! What every virtio transport does the same way: feature negotiation, the device status
//! machine, queue set-up and activation. The MMIO and PCI transports map their registers
//! onto this; anything malformed the driver writes is logged and ignored, or ends in
//! DEVICE_NEEDS_RESET.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::device::{Activation, VirtioDevice, VirtioInterrupt};
use crate::{F_VERSION_1, GuestMemory};

pub const STATUS_ACKNOWLEDGE: u32 = 1;
pub const STATUS_DRIVER: u32 = 2;
pub const STATUS_DRIVER_OK: u32 = 4;
pub const STATUS_FEATURES_OK: u32 = 8;
pub const STATUS_NEEDS_RESET: u32 = 64;
pub const STATUS_FAILED: u32 = 128;

/// The queue fields a driver programs before DRIVER_OK.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QueueField {
    Size,
    Ready,
    DescLow,
    DescHigh,
    DriverLow,
    DriverHigh,
    DeviceLow,
    DeviceHigh,
}

/// What the driver wrote about one queue, kept apart from the queue so that bad values are
/// remembered (virtio-queue keeps only good ones).
#[derive(Clone, Copy, Default)]
struct QueueSetup {
    desc: u64,
    avail: u64,
    used: u64,
    bad_size: bool,
}

/// One queue in a snapshot: what the driver programmed and where the rings stand.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedQueue {
    pub size: u16,
    pub ready: bool,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    pub bad_size: bool,
    pub next_avail: u16,
    pub next_used: u16,
}

/// A transport's state in a snapshot, device-specific state included.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SavedTransport {
    pub device_type: u32,
    pub status: u32,
    pub acked_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub queues: Vec<SavedQueue>,
    /// The MMIO InterruptStatus word.
    pub interrupt_status: u32,
    pub device: serde_json::Value,
}

pub struct VirtioState {
    pub name: String,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<Queue>,
    setups: Vec<QueueSetup>,
    queue_events: Vec<EventFd>,
    status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    acked_features: u64,
    pub queue_sel: u32,
    active: bool,
    /// Queues taken back from a quiesced device, to activate it again where it stood.
    quiesced: Option<Vec<Queue>>,
    /// Bumped whenever the device's configuration changes under the driver.
    config_generation: u32,
}

impl VirtioState {
    pub fn new(
        name: &str,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        interrupt: Arc<dyn VirtioInterrupt>,
    ) -> std::io::Result<Self> {
        let sizes = device.queue_max_sizes().to_vec();
        let queues = sizes.iter().map(|&max| Queue::new(max).expect("device queue sizes are powers of two")).collect();
        let queue_events =
            sizes.iter().map(|_| EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)).collect::<Result<_, _>>()?;
        Ok(VirtioState {
            name: name.into(),
            device,
            mem,
            interrupt,
            setups: vec![QueueSetup::default(); sizes.len()],
            queues,
            queue_events,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            active: false,
            quiesced: None,
            config_generation: 0,
        })
    }

    /// One eventfd per queue: what a notification of that queue signals.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    pub fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// The offered features, 32 bits at a time as `device_features_sel` picks.
    pub fn device_features(&self) -> u32 {
        match self.device_features_sel {
            0 => self.device.features() as u32,
            1 => (self.device.features() >> 32) as u32,
            _ => 0,
        }
    }

    pub fn write_driver_features(&mut self, value: u32) {
        if self.status & STATUS_DRIVER == 0 || self.status & STATUS_FEATURES_OK != 0 {
            crate::guest_fault!("{}: ignored a feature write outside feature negotiation", self.name);
            return;
        }
        match self.driver_features_sel {
            0 => self.acked_features = (self.acked_features & !0xffff_ffff) | u64::from(value),
            1 => self.acked_features = (self.acked_features & 0xffff_ffff) | (u64::from(value) << 32),
            sel => crate::guest_fault!("{}: ignored features for selector {sel}", self.name),
        }
    }

    /// The driver's features, 32 bits at a time as `driver_features_sel` picks.
    pub fn driver_features(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.acked_features as u32,
            1 => (self.acked_features >> 32) as u32,
            _ => 0,
        }
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.queue_sel as usize)
    }

    pub fn queue_max_size(&self) -> u16 {
        self.selected_queue().map_or(0, |q| q.max_size())
    }

    pub fn queue_size(&self) -> u16 {
        self.selected_queue().map_or(0, |q| q.size())
    }

    pub fn queue_ready(&self) -> bool {
        self.selected_queue().is_some_and(|q| q.ready())
    }

    /// The selected queue's ring addresses as the driver wrote them: (desc, avail, used).
    pub fn queue_addresses(&self) -> (u64, u64, u64) {
        self.setups.get(self.queue_sel as usize).map_or((0, 0, 0), |s| (s.desc, s.avail, s.used))
    }

    /// Signals queue `index`'s eventfd, as an ioeventfd would.
    pub fn notify(&self, index: u32) {
        match self.queue_events.get(index as usize) {
            Some(evt) => {
                let _ = evt.write(1);
            }
            None => crate::guest_fault!("{}: notify for queue {index}, which does not exist", self.name),
        }
    }

    /// Stops the device's worker and returns the transport's state, ring positions included;
    /// the device serves again after [`VirtioState::resume`].
    pub fn save(&mut self) -> Result<SavedTransport, String> {
        self.device.snapshot_support()?;
        if self.active && self.quiesced.is_none() {
            self.quiesced = Some(
                self.device
                    .quiesce()
                    .ok_or_else(|| format!("{}: the device's worker could not be stopped", self.name))?,
            );
        }
        let positions: Vec<(u16, u16)> = match &self.quiesced {
            Some(queues) => queues.iter().map(|q| (q.next_avail(), q.next_used())).collect(),
            None => vec![(0, 0); self.queues.len()],
        };
        let queues = self
            .queues
            .iter()
            .zip(&self.setups)
            .zip(positions)
            .map(|((q, setup), (next_avail, next_used))| SavedQueue {
                size: q.size(),
                ready: q.ready(),
                desc: setup.desc,
                avail: setup.avail,
                used: setup.used,
                bad_size: setup.bad_size,
                next_avail,
                next_used,
            })
            .collect();
        Ok(SavedTransport {
            device_type: self.device.device_type(),
            status: self.status,
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            queues,
            interrupt_status: 0,
            device: self.device.save_state(),
        })
    }

    pub fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// Changes the device while the driver may be using it: its worker stops (in-flight
    /// requests finish), `change` runs, the worker starts again where it stood, and the driver
    /// hears of a configuration change.
    pub fn update_device(
        &mut self,
        change: impl FnOnce(&mut dyn VirtioDevice) -> Result<(), String>,
    ) -> Result<(), String> {
        let queues = match self.active && self.quiesced.is_none() {
            true => Some(
                self.device
                    .quiesce()
                    .ok_or_else(|| format!("{}: the device's worker could not be stopped", self.name))?,
            ),
            false => None,
        };
        let result = change(self.device.as_mut());
        if let Some(queues) = queues {
            self.start_device(queues);
        }
        if result.is_ok() {
            self.config_generation = self.config_generation.wrapping_add(1);
            if self.status & STATUS_DRIVER_OK != 0 {
                self.interrupt.signal_config_change();
            }
        }
        result
    }

    /// Asks a running device's driver to announce it on its network (after a migration),
    /// where both offer that: a configuration change tells the driver.
    pub fn announce(&mut self) -> bool {
        let running = self.active && self.status & STATUS_DRIVER_OK != 0;
        if !running || !self.device.announce() {
            return false;
        }
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config_change();
        true
    }

    /// Lets a device stopped by [`VirtioState::save`] serve again, from where it stood.
    pub fn resume(&mut self) {
        if let Some(queues) = self.quiesced.take() {
            self.start_device(queues);
        }
    }

    /// Puts back a saved state on a fresh transport of the same device; an active device
    /// starts serving from the saved ring positions. A device saved with fewer queues (before
    /// virtio-net always had a control queue) keeps the others unready: its driver, whose
    /// features came with the state, never asked for them.
    pub fn restore(&mut self, saved: &SavedTransport) -> Result<(), String> {
        if saved.device_type != self.device.device_type() || saved.queues.len() > self.queues.len() {
            return Err(format!(
                "{}: the snapshot holds a different device here (type {}, {} queues)",
                self.name,
                saved.device_type,
                saved.queues.len()
            ));
        }
        self.device.restore_state(&saved.device)?;
        for ((queue, setup), s) in self.queues.iter_mut().zip(&mut self.setups).zip(&saved.queues) {
            *setup = QueueSetup { desc: s.desc, avail: s.avail, used: s.used, bad_size: s.bad_size };
            if !s.bad_size {
                let _ = queue.try_set_size(s.size);
            }
            let _ = queue.try_set_desc_table_address(GuestAddress(s.desc));
            let _ = queue.try_set_avail_ring_address(GuestAddress(s.avail));
            let _ = queue.try_set_used_ring_address(GuestAddress(s.used));
            queue.set_ready(s.ready);
        }
        self.status = saved.status;
        self.acked_features = saved.acked_features;
        self.device_features_sel = saved.device_features_sel;
        self.driver_features_sel = saved.driver_features_sel;
        self.queue_sel = saved.queue_sel;
        if self.status & STATUS_DRIVER_OK != 0 && self.status & STATUS_NEEDS_RESET == 0 {
            let mut queues = Vec::new();
            for (i, q) in self.queues.iter().enumerate() {
                let mut copy = Queue::try_from(q.state()).map_err(|e| format!("{}: {e}", self.name))?;
                if let Some(s) = saved.queues.get(i) {
                    copy.set_next_avail(s.next_avail);
                    copy.set_next_used(s.next_used);
                }
                queues.push(copy);
            }
            self.start_device(queues);
        }
        Ok(())
    }

    pub fn reset(&mut self) {
        self.quiesced = None;
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
    }

    fn needs_reset(&mut self, why: &str) {
        crate::guest_fault!("{}: {why}; the device needs a reset", self.name);
        self.status |= STATUS_NEEDS_RESET;
        if self.status & STATUS_DRIVER_OK != 0 {
            self.interrupt.signal_config_change();
        }
    }

    /// A write of the device status; 0 resets. Returns true when it was a reset.
    pub fn write_status(&mut self, value: u32) -> bool {
        if value == 0 {
            self.reset();
            return true;
        }
        let added = value & !self.status;
        if value & self.status != self.status {
            crate::guest_fault!(
                "{}: the driver cleared status bits ({:#x} -> {value:#x}) without a reset",
                self.name,
                self.status
            );
            return false;
        }
        if added & STATUS_FAILED != 0 {
            crate::guest_event!("{}: the driver gave up on the device (FAILED)", self.name);
        }
        if added & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.acked_features & !offered != 0 || self.acked_features & F_VERSION_1 == 0 {
                crate::guest_fault!(
                    "{}: refused features {:#x} (offered {offered:#x}; VERSION_1 is required)",
                    self.name,
                    self.acked_features
                );
                self.status = value & !STATUS_FEATURES_OK;
                return false;
            }
        }
        self.status = value;
        if added & STATUS_DRIVER_OK != 0 {
            self.activate();
        }
        false
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
        // The device gets its own copies; the transport keeps the driver's configuration.
        let mut queues = Vec::with_capacity(self.queues.len());
        for q in &self.queues {
            match Queue::try_from(q.state()) {
                Ok(copy) => queues.push(copy),
                Err(e) => return self.needs_reset(&format!("a queue cannot be handed over ({e})")),
            }
        }
        self.start_device(queues);
    }

    /// Activates the device with `queues`.
    fn start_device(&mut self, mut queues: Vec<Queue>) {
        let queue_events = match self.queue_events.iter().map(EventFd::try_clone).collect::<Result<Vec<_>, _>>() {
            Ok(events) => events,
            Err(e) => return self.needs_reset(&format!("cannot share the queue eventfds ({e})")),
        };
        let event_idx = self.acked_features & crate::F_RING_EVENT_IDX != 0;
        for q in &mut queues {
            q.set_event_idx(event_idx);
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
                crate::guest_event!(
                    "{}: the driver started the device (features {:#x})",
                    self.name,
                    self.acked_features
                );
            }
            Err(e) => self.needs_reset(&format!("activation failed: {e}")),
        }
    }

    /// A write to one of the selected queue's fields.
    pub fn write_queue(&mut self, field: QueueField, value: u32) {
        if self.status & STATUS_DRIVER_OK != 0 {
            crate::guest_fault!("{}: ignored a queue write ({field:?}) after DRIVER_OK", self.name);
            return;
        }
        let i = self.queue_sel as usize;
        let (Some(queue), Some(setup)) = (self.queues.get_mut(i), self.setups.get_mut(i)) else {
            crate::guest_fault!("{}: ignored a write ({field:?}) to queue {i}, which does not exist", self.name);
            return;
        };
        if queue.ready() && field != QueueField::Ready {
            crate::guest_fault!("{}: ignored a write ({field:?}) to a ready queue", self.name);
            return;
        }
        let low = |old: u64| (old & !0xffff_ffff) | u64::from(value);
        let high = |old: u64| (old & 0xffff_ffff) | (u64::from(value) << 32);
        match field {
            QueueField::Size => {
                setup.bad_size = value > u32::from(u16::MAX) || queue.try_set_size(value as u16).is_err();
            }
            QueueField::Ready => queue.set_ready(value == 1),
            QueueField::DescLow | QueueField::DescHigh => {
                setup.desc = if field == QueueField::DescLow { low(setup.desc) } else { high(setup.desc) };
                let _ = queue.try_set_desc_table_address(GuestAddress(setup.desc));
            }
            QueueField::DriverLow | QueueField::DriverHigh => {
                setup.avail = if field == QueueField::DriverLow { low(setup.avail) } else { high(setup.avail) };
                let _ = queue.try_set_avail_ring_address(GuestAddress(setup.avail));
            }
            QueueField::DeviceLow | QueueField::DeviceHigh => {
                setup.used = if field == QueueField::DeviceLow { low(setup.used) } else { high(setup.used) };
                let _ = queue.try_set_used_ring_address(GuestAddress(setup.used));
            }
        }
    }
}
