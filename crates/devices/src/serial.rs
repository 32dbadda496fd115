//! The 8250/16550 UART on COM1 (vm-superio), its interrupt line and where its output goes.

use std::io::{self, Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::BusDevice;

/// Raises the UART's interrupt by signalling an eventfd that KVM delivers as an IRQ (irqfd).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where the guest's serial output is written.
pub type SerialSink = Box<dyn Write + Send>;

/// A sink for `--serial file:PATH`: the file is created or truncated.
/// Output to a new or truncated regular file (never a device or FIFO), at most `limit` bytes
/// of it when there is a limit: a guest cannot fill the host's disk through its console.
pub fn file_sink(path: &Path, limit: Option<u64>) -> io::Result<SerialSink> {
    let file = sandbox::files::create_output(path, "output file").map_err(io::Error::other)?;
    Ok(Box::new(Capped { inner: file, left: limit.unwrap_or(u64::MAX) }))
}

/// A writer that takes `left` more bytes, then drops the rest as if written.
pub struct Capped<W> {
    pub inner: W,
    pub left: u64,
}

impl<W: Write> Write for Capped<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if n == 0 {
            return Ok(buf.len());
        }
        let written = self.inner.write(&buf[..n])?;
        self.left -= written as u64;
        Ok(written)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Output through a budget (a rate limiter): `allow(n)` says how many of `n` bytes may be
/// written now; the rest is dropped as if written, since a UART write cannot wait.
pub struct Limited<W> {
    pub inner: W,
    pub allow: Box<dyn FnMut(usize) -> usize + Send>,
}

impl<W: Write> Write for Limited<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = (self.allow)(buf.len()).min(buf.len());
        if n < buf.len() {
            crate::guest_event!("serial: output over its rate limit is dropped");
        }
        if n > 0 {
            // Whatever the sink does not take is dropped too (a full FIFO).
            let _ = self.inner.write(&buf[..n]);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Output to a regular file (appended to) or a FIFO that is never waited on: Firecracker's
/// `serial_out_path`.
pub fn path_sink(path: &Path) -> io::Result<SerialSink> {
    let file = sandbox::files::open_output(path, "serial_out_path").map_err(io::Error::other)?;
    Ok(Box::new(file))
}

/// A sink that drops the output.
pub fn null_sink() -> SerialSink {
    Box::new(io::sink())
}

/// A sink on the VMM's standard output.
pub fn stdout_sink() -> SerialSink {
    Box::new(io::stdout())
}

pub struct SerialDevice {
    uart: Serial<IrqTrigger, vm_superio::serial::NoEvents, SerialSink>,
}

/// The UART's registers and receive FIFO, for snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedSerial {
    pub registers: [u8; 9],
    pub in_buffer: Vec<u8>,
}

impl SerialDevice {
    pub fn new(interrupt: EventFd, out: SerialSink) -> Self {
        Self { uart: Serial::new(IrqTrigger(interrupt), out) }
    }

    /// A UART in a saved state.
    pub fn restored(interrupt: EventFd, out: SerialSink, saved: &SavedSerial) -> io::Result<Self> {
        let r = saved.registers;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer: saved.in_buffer.clone(),
        };
        let uart = Serial::from_state(&state, IrqTrigger(interrupt), vm_superio::serial::NoEvents, out)
            .map_err(|e| io::Error::other(format!("{e:?}")))?;
        Ok(Self { uart })
    }

    pub fn save(&self) -> SavedSerial {
        let s = self.uart.state();
        SavedSerial {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// Room left in the receive FIFO.
    pub fn input_room(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues bytes for the guest to read; returns how many fit.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.input_room().min(bytes.len());
        if room == 0 {
            return 0;
        }
        match self.uart.enqueue_raw_bytes(&bytes[..room]) {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!("serial input was dropped: {e:?}");
                room
            }
        }
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let value = u8::try_from(offset).map(|o| self.uart.read(o)).unwrap_or(0xff);
        data.fill(value);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), Some(&value)) = (u8::try_from(offset), data.first()) else { return };
        if let Err(e) = self.uart.write(offset, value) {
            // The guest cannot be blocked on a full or closed output: the byte is lost.
            tracing::debug!("serial output byte lost: {e:?}");
        }
    }
}

/// Feeds `input` (the VMM's stdin) to the UART until it ends, waiting while the FIFO is full.
pub fn spawn_input_thread(serial: Arc<Mutex<SerialDevice>>, mut input: impl Read + Send + 'static) -> io::Result<()> {
    sandbox::spawn(sandbox::ThreadKind::SerialInput, "serial-input", move || {
        let mut buf = [0u8; 64];
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            let mut pending = &buf[..n];
            while !pending.is_empty() {
                let taken = serial.lock().map(|mut s| s.enqueue_input(pending)).unwrap_or(pending.len());
                pending = &pending[taken..];
                if !pending.is_empty() {
                    thread::sleep(Duration::from_millis(5));
                }
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn transmits_to_the_sink_and_receives_input() {
        let out = Shared::default();
        let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
        let mut dev = SerialDevice::new(irq.try_clone().unwrap(), Box::new(out.clone()));
        dev.write(1, &[0x03]); // IER: received data and THR empty interrupts
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        assert!(irq.read().unwrap() >= 1, "THR empty raised the interrupt");

        assert_eq!(dev.enqueue_input(b"ok"), 2);
        let mut lsr = [0];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 1, 1, "data ready");
        let mut byte = [0];
        dev.read(0, &mut byte);
        assert_eq!(byte, *b"o");
    }

    #[test]
    fn a_flood_of_input_is_bounded_by_the_fifo() {
        let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
        let mut dev = SerialDevice::new(irq, null_sink());
        let taken = dev.enqueue_input(&[b'x'; 1000]);
        assert!(taken < 1000 && taken > 0);
        assert_eq!(dev.enqueue_input(b"y"), 0);
    }

    #[test]
    fn out_of_range_offsets_are_harmless() {
        let irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).unwrap();
        let mut dev = SerialDevice::new(irq, null_sink());
        dev.write(0x1_0000, &[1]);
        dev.write(0, &[]);
        let mut b = [0];
        dev.read(u64::MAX, &mut b);
        assert_eq!(b, [0xff]);
    }

    #[test]
    fn capped_output_stops_at_its_limit() {
        let mut out = Capped { inner: Vec::new(), left: 10 };
        for _ in 0..100 {
            out.write_all(b"0123").unwrap();
        }
        assert_eq!(out.inner, b"0123012301");
    }
}
