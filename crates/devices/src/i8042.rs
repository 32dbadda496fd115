//! The i8042 keyboard controller, as far as a guest needs it to reset the machine
//! (`reboot=k`: command 0xfe on the command port pulses the CPU reset line).

use crate::BusDevice;

const COMMAND_OFFSET: u64 = 4;
const CMD_PULSE_RESET: u8 = 0xfe;

/// Ports 0x60..=0x64. Reads see an empty, idle controller.
pub struct I8042 {
    on_reset: Box<dyn Fn() + Send>,
}

impl I8042 {
    pub fn new(on_reset: Box<dyn Fn() + Send>) -> Self {
        Self { on_reset }
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // No data, and a status of 0: both buffers empty, so the guest may write a command.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == COMMAND_OFFSET && data.first() == Some(&CMD_PULSE_RESET) {
            (self.on_reset)();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU32, Ordering};

    const DATA_OFFSET: u64 = 0;

    #[test]
    fn only_the_reset_command_resets() {
        let resets = Arc::new(AtomicU32::new(0));
        let counter = resets.clone();
        let mut dev = I8042::new(Box::new(move || {
            counter.fetch_add(1, Ordering::SeqCst);
        }));
        dev.write(DATA_OFFSET, &[CMD_PULSE_RESET]);
        dev.write(COMMAND_OFFSET, &[0xad]);
        assert_eq!(resets.load(Ordering::SeqCst), 0);
        dev.write(COMMAND_OFFSET, &[CMD_PULSE_RESET]);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        let mut status = [0xffu8];
        dev.read(COMMAND_OFFSET, &mut status);
        assert_eq!(status, [0]);
    }
}
