//! The i8042 keyboard controller: enough of it for a guest to reset the machine (`reboot=k`:
//! command 0xfe pulses the CPU reset line), for Linux's i8042 and atkbd drivers to find a
//! keyboard, and for the VMM to press Ctrl-Alt-Del (Firecracker's SendCtrlAltDel).

use std::collections::VecDeque;

use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

const DATA_OFFSET: u64 = 0;
const COMMAND_OFFSET: u64 = 4;

// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_WRITE_OUTPUT: u8 = 0xd2;
const CMD_PULSE_RESET: u8 = 0xfe;

// Status register bits.
const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM: u8 = 0x04;
const STATUS_COMMAND: u8 = 0x08;
const STATUS_UNLOCKED: u8 = 0x10;

// Controller configuration byte bits.
const CTR_KBD_INTERRUPT: u8 = 0x01;
const CTR_SYSTEM: u8 = 0x04;
const CTR_TRANSLATE: u8 = 0x40;

// Keyboard commands (port 0x60) and answers.
const KBD_ACK: u8 = 0xfa;
const KBD_RESET: u8 = 0xff;
const KBD_SELF_TEST_OK: u8 = 0xaa;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_SET_LEDS: u8 = 0xed;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_TYPEMATIC: u8 = 0xf3;

/// A bound on queued bytes: the guest drains them, a stuck one does not grow the queue.
const MAX_OUTPUT: usize = 64;

/// Ctrl, Alt and Delete pressed, then released: in scan code set 2 as a keyboard sends them,
/// and in set 1 as the controller delivers them when it translates (the usual setting).
const CTRL_ALT_DEL_SET2: &[u8] = &[0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14];
const CTRL_ALT_DEL_SET1: &[u8] = &[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d];

/// Ports 0x60..=0x64.
pub struct I8042 {
    on_reset: Box<dyn Fn() + Send>,
    /// Raised (edge) when a byte is ready and the keyboard interrupt is enabled: IRQ 1.
    irq: Option<EventFd>,
    ctr: u8,
    output: VecDeque<u8>,
    /// A controller command that takes a data byte next (0x60, 0xd2).
    pending_command: Option<u8>,
    /// A keyboard command that takes a parameter byte next (LEDs, scan code set, rate).
    pending_kbd: Option<u8>,
    last_was_command: bool,
}

impl I8042 {
    pub fn new(on_reset: Box<dyn Fn() + Send>) -> Self {
        Self {
            on_reset,
            irq: None,
            ctr: CTR_KBD_INTERRUPT | CTR_SYSTEM | CTR_TRANSLATE,
            output: VecDeque::new(),
            pending_command: None,
            pending_kbd: None,
            last_was_command: false,
        }
    }

    /// Connects IRQ 1.
    pub fn with_irq(mut self, irq: EventFd) -> Self {
        self.irq = Some(irq);
        self
    }

    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.output.len() < MAX_OUTPUT {
                self.output.push_back(b);
            }
        }
        self.raise();
    }

    fn raise(&self) {
        if !self.output.is_empty()
            && self.ctr & CTR_KBD_INTERRUPT != 0
            && let Some(irq) = &self.irq
            && let Err(e) = irq.write(1)
        {
            tracing::warn!("i8042: the keyboard interrupt was lost: {e}");
        }
    }

    /// The configuration byte, for snapshots (queued bytes are not kept).
    pub fn ctr(&self) -> u8 {
        self.ctr
    }

    pub fn set_ctr(&mut self, ctr: u8) {
        self.ctr = ctr;
    }

    /// Presses and releases Ctrl-Alt-Del, as the host's SendCtrlAltDel asks.
    pub fn ctrl_alt_del(&mut self) {
        let codes = if self.ctr & CTR_TRANSLATE != 0 { CTRL_ALT_DEL_SET1 } else { CTRL_ALT_DEL_SET2 };
        self.push(codes);
    }

    fn status(&self) -> u8 {
        let mut s = STATUS_UNLOCKED;
        if !self.output.is_empty() {
            s |= STATUS_OUTPUT_FULL;
        }
        if self.ctr & CTR_SYSTEM != 0 {
            s |= STATUS_SYSTEM;
        }
        if self.last_was_command {
            s |= STATUS_COMMAND;
        }
        s
    }

    fn command(&mut self, cmd: u8) {
        match cmd {
            CMD_PULSE_RESET => (self.on_reset)(),
            CMD_READ_CTR => self.push(&[self.ctr]),
            CMD_WRITE_CTR | CMD_WRITE_OUTPUT => self.pending_command = Some(cmd),
            CMD_SELF_TEST => self.push(&[0x55]),
            CMD_TEST_KBD | CMD_TEST_AUX => self.push(&[0x00]),
            CMD_DISABLE_KBD | CMD_ENABLE_KBD | CMD_DISABLE_AUX | CMD_ENABLE_AUX => {}
            other => tracing::debug!("i8042: ignored controller command {other:#x}"),
        }
    }

    fn data(&mut self, value: u8) {
        if let Some(cmd) = self.pending_command.take() {
            match cmd {
                CMD_WRITE_CTR => {
                    self.ctr = value;
                    self.raise();
                }
                _ => self.push(&[value]),
            }
            return;
        }
        if self.pending_kbd.take().is_some() {
            self.push(&[KBD_ACK]);
            return;
        }
        match value {
            KBD_RESET => {
                self.output.clear();
                self.push(&[KBD_ACK, KBD_SELF_TEST_OK]);
            }
            KBD_IDENTIFY => self.push(&[KBD_ACK, 0xab, 0x83]),
            KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_TYPEMATIC => {
                self.pending_kbd = Some(value);
                self.push(&[KBD_ACK]);
            }
            // Enable, disable, defaults and the rest: acknowledged.
            _ => self.push(&[KBD_ACK]),
        }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            DATA_OFFSET => {
                let byte = self.output.pop_front().unwrap_or(0);
                // More to read: the guest gets another interrupt.
                self.raise();
                byte
            }
            COMMAND_OFFSET => self.status(),
            _ => 0,
        };
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match offset {
            COMMAND_OFFSET => {
                self.last_was_command = true;
                self.command(value);
            }
            DATA_OFFSET => {
                self.last_was_command = false;
                self.data(value);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn controller() -> (I8042, Arc<AtomicU32>, EventFd) {
        let resets = Arc::new(AtomicU32::new(0));
        let counter = resets.clone();
        let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
        let dev = I8042::new(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }))
        .with_irq(irq.try_clone().unwrap());
        (dev, resets, irq)
    }

    fn read(dev: &mut I8042, offset: u64) -> u8 {
        let mut b = [0u8];
        dev.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn only_the_reset_command_resets() {
        let (mut dev, resets, _) = controller();
        dev.write(DATA_OFFSET, &[CMD_PULSE_RESET]);
        dev.write(COMMAND_OFFSET, &[CMD_DISABLE_KBD]);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        dev.write(COMMAND_OFFSET, &[CMD_PULSE_RESET]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn linux_probe_sequence_is_answered() {
        let (mut dev, _, _) = controller();
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0, "empty at start");
        dev.write(COMMAND_OFFSET, &[CMD_SELF_TEST]);
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, STATUS_OUTPUT_FULL);
        assert_eq!(read(&mut dev, DATA_OFFSET), 0x55);
        dev.write(COMMAND_OFFSET, &[CMD_READ_CTR]);
        let ctr = read(&mut dev, DATA_OFFSET);
        assert_eq!(ctr & CTR_TRANSLATE, CTR_TRANSLATE);
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[ctr & !CTR_TRANSLATE]);
        dev.write(DATA_OFFSET, &[KBD_RESET]);
        assert_eq!((read(&mut dev, DATA_OFFSET), read(&mut dev, DATA_OFFSET)), (KBD_ACK, KBD_SELF_TEST_OK));
        dev.write(DATA_OFFSET, &[KBD_SET_LEDS]);
        dev.write(DATA_OFFSET, &[0x02]);
        assert_eq!((read(&mut dev, DATA_OFFSET), read(&mut dev, DATA_OFFSET)), (KBD_ACK, KBD_ACK));
        assert_eq!(read(&mut dev, COMMAND_OFFSET) & STATUS_OUTPUT_FULL, 0);
    }

    #[test]
    fn ctrl_alt_del_arrives_in_the_scan_code_set_the_guest_reads_with_an_interrupt() {
        let (mut dev, _, irq) = controller();
        dev.ctrl_alt_del();
        assert!(irq.read().is_ok(), "IRQ 1 was raised");
        let codes: Vec<u8> = (0..CTRL_ALT_DEL_SET1.len()).map(|_| read(&mut dev, DATA_OFFSET)).collect();
        assert_eq!(codes, CTRL_ALT_DEL_SET1, "translated to set 1");
        let _ = irq.read();
        dev.write(COMMAND_OFFSET, &[CMD_WRITE_CTR]);
        dev.write(DATA_OFFSET, &[CTR_SYSTEM]);
        dev.ctrl_alt_del();
        assert!(irq.read().is_err(), "no interrupt while the guest disabled it");
        let codes: Vec<u8> = (0..CTRL_ALT_DEL_SET2.len()).map(|_| read(&mut dev, DATA_OFFSET)).collect();
        assert_eq!(codes, CTRL_ALT_DEL_SET2);
        // A flood stays bounded.
        for _ in 0..100 {
            dev.ctrl_alt_del();
        }
        assert_eq!(dev.output.len(), MAX_OUTPUT);
    }
}
