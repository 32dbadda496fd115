//! Firecracker's boot timer: the guest writes a magic byte once it considers itself booted and
//! the VMM logs how long that took since launch.

use std::time::Instant;

use crate::BusDevice;

pub struct BootTimer {
    launched: Instant,
    magic: u8,
}

impl BootTimer {
    pub fn new(launched: Instant, magic: u8) -> Self {
        Self { launched, magic }
    }
}

impl BusDevice for BootTimer {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset == 0 && data.first() == Some(&self.magic) {
            let elapsed = self.launched.elapsed();
            crate::guest_event!(
                "guest boot time: {} ms after launch ({} us)",
                elapsed.as_millis(),
                elapsed.as_micros()
            );
        }
    }
}
