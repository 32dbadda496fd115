//! Port sequences against the 8250 UART, the i8042 and the CMOS clock: each three bytes are a
//! device, an offset and a value; a write when the value's top bit is set, else a read.
#![no_main]

use devices::BusDevice;
use libfuzzer_sys::fuzz_target;
use vmm_sys_util::eventfd::EventFd;

fuzz_target!(|data: &[u8]| {
    let Ok(irq) = EventFd::new(libc::EFD_NONBLOCK) else { return };
    let mut serial = devices::serial::SerialDevice::new(irq, devices::serial::null_sink());
    let mut keyboard = devices::i8042::I8042::new(Box::new(|| {}));
    let mut cmos = devices::cmos::Cmos::new(Box::new(|| 1_795_599_930));
    for op in data.chunks_exact(3) {
        let device: &mut dyn BusDevice = match op[0] % 3 {
            0 => &mut serial,
            1 => &mut keyboard,
            _ => &mut cmos,
        };
        let offset = u64::from(op[1] % 16);
        if op[2] & 0x80 != 0 {
            device.write(offset, &[op[2] & 0x7f | (op[1] & 0x80)]);
        } else {
            let mut byte = [0u8];
            device.read(offset, &mut byte);
        }
    }
});
