//! `virtio-console`: write a line on port 0 and read back what the host sends.
//!
//! Parameters: probe.virtio-console.rx (bytes to wait for, 0), .seed (1). The probe writes
//! `probe console says <seed>` and a newline, then prints `PROBE virtio-console ready`.

use crate::cmdline::{Cmdline, VirtioMmioSlot};
use crate::pattern::{FNV_OFFSET, fnv1a};
use crate::report;
use crate::virtio::mmio::Device;
use crate::virtio::queue::Buffer;
use crate::virtio::{alloc, bytes};

const TEST: &str = "virtio-console";
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
const RX_BUFFER: usize = 256;

struct LineBuf {
    bytes: [u8; 64],
    len: usize,
}

impl core::fmt::Write for LineBuf {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.bytes.len() - self.len;
        let n = s.len().min(room);
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

pub fn test(slot: &VirtioMmioSlot, cmdline: Cmdline) -> Result<(), &'static str> {
    let dev = Device::begin(slot, 0, 0).map_err(|_| "the device could not be set up")?;
    let mut rxq = dev.queue(RX_QUEUE, 8).map_err(|_| "the receive queue could not be set up")?;
    let mut txq = dev.queue(TX_QUEUE, 8).map_err(|_| "the transmit queue could not be set up")?;
    let rx_buf = alloc(RX_BUFFER, 64).ok_or("out of probe memory")?;
    rxq.push(&[Buffer::writable(rx_buf, RX_BUFFER as u32)]).ok_or("receive ring full")?;
    dev.driver_ok();
    dev.notify(RX_QUEUE);

    let seed = cmdline.number(TEST, "seed", 1);
    let mut line = LineBuf { bytes: [0; 64], len: 0 };
    let _ = core::fmt::write(&mut line, format_args!("probe console says {seed}\n"));
    let tx_buf = alloc(line.len, 64).ok_or("out of probe memory")?;
    bytes(tx_buf, line.len).copy_from_slice(&line.bytes[..line.len]);
    txq.push(&[Buffer::readable(tx_buf, line.len as u32)]).ok_or("transmit ring full")?;
    dev.notify(TX_QUEUE);
    dev.wait_used(&mut txq, super::request_deadline(cmdline)).ok_or("the line was not taken")?;
    crate::println!("PROBE virtio-console ready");

    let want = cmdline.number(TEST, "rx", 0) as usize;
    let (mut received, mut checksum) = (0usize, FNV_OFFSET);
    while received < want {
        let (_, len) = dev.wait_used(&mut rxq, super::request_deadline(cmdline)).ok_or("input did not arrive")?;
        let len = (len as usize).min(RX_BUFFER);
        checksum = fnv1a(checksum, bytes(rx_buf, len));
        received += len;
        rxq.push(&[Buffer::writable(rx_buf, RX_BUFFER as u32)]).ok_or("receive ring full")?;
        dev.notify(RX_QUEUE);
    }
    dev.reset();
    report::ok(TEST, format_args!("tx_bytes={} rx_bytes={received} rx_checksum={checksum:#x}", line.len));
    Ok(())
}
