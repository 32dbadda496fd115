//! virtio-console, one port (hvc0): what the guest writes goes to the VMM's stdout, a file or
//! a pseudo-terminal; what arrives on stdin or the pseudo-terminal goes to the guest.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Mutex};

use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress};

use crate::device::{ActivateError, Activation, VirtioDevice};
use crate::worker::{Backend, Worker, serve_queue, serve_queue_while};
use crate::{F_RING_EVENT_IDX, F_RING_INDIRECT_DESC, F_VERSION_1, GuestMemory, TYPE_CONSOLE};

const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
const QUEUE_SIZES: [u16; 2] = [256, 256];
/// Input held while the guest has no receive buffers; beyond it input waits in the kernel.
const PENDING_MAX: usize = 64 << 10;
/// Bytes copied per step, both ways.
const CHUNK: usize = 4096;
/// One chain's output at most: Linux sends a page at a time, and a chain claiming gigabytes
/// would otherwise copy all of guest RAM to the output in one request.
const MAX_TX_CHAIN: usize = 64 << 10;

/// Where the console goes.
pub struct ConsoleIo {
    pub output: Box<dyn Write + Send>,
    pub input: Option<File>,
    /// What to tell the user, e.g. the pseudo-terminal's path.
    pub description: String,
    /// The pseudo-terminal's slave side, held open so that the master never reports a hang-up
    /// (which would wake the worker forever) while no one has attached.
    pub _slave: Option<File>,
}

impl ConsoleIo {
    /// The VMM's stdout; stdin as input when it is a terminal, a pipe or a socket.
    pub fn stdio() -> std::io::Result<ConsoleIo> {
        // SAFETY: fstat on fd 0 with a zeroed stat buffer of the right type.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        let usable = unsafe { libc::fstat(0, &mut st) } == 0
            && matches!(st.st_mode & libc::S_IFMT, libc::S_IFCHR | libc::S_IFIFO | libc::S_IFSOCK)
            // SAFETY: isatty only inspects fd 0.
            && (st.st_mode & libc::S_IFMT != libc::S_IFCHR || unsafe { libc::isatty(0) } == 1);
        let input = if usable {
            // SAFETY: duplicating fd 0 (close-on-exec) returns a new descriptor or -1.
            let fd = unsafe { libc::fcntl(0, libc::F_DUPFD_CLOEXEC, 0) };
            // SAFETY: fd is a fresh descriptor that the File then owns.
            (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })
        } else {
            None
        };
        Ok(ConsoleIo { output: Box::new(std::io::stdout()), input, description: "stdio".into(), _slave: None })
    }

    /// Output to a regular file, at most `limit` bytes of it when there is a limit.
    pub fn file(path: &std::path::Path, limit: Option<u64>) -> std::io::Result<ConsoleIo> {
        let output = devices::serial::file_sink(path, limit)?;
        Ok(ConsoleIo { output, input: None, description: path.display().to_string(), _slave: None })
    }

    /// A new pseudo-terminal: the guest's console is its slave side, whose path is returned in
    /// `description`. Output the host does not read is dropped rather than blocking the device.
    pub fn pty() -> std::io::Result<ConsoleIo> {
        // SAFETY: posix_openpt returns a new fd or -1.
        let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh, owned descriptor.
        let master = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut name = [0 as libc::c_char; 128];
        // SAFETY: grantpt/unlockpt/ptsname_r on our pty master; the buffer holds 128 bytes.
        let ok = unsafe {
            libc::grantpt(fd) == 0 && libc::unlockpt(fd) == 0 && libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) == 0
        };
        if !ok {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: ptsname_r wrote a NUL-terminated string into `name`.
        let path = unsafe { std::ffi::CStr::from_ptr(name.as_ptr()) }.to_string_lossy().into_owned();
        let input = File::from(master.try_clone()?);
        let slave = std::fs::OpenOptions::new().read(true).write(true).custom_flags(libc::O_NOCTTY).open(&path)?;
        // Raw mode: no echo of the guest's output back as its input, no line editing.
        // SAFETY: termios calls on the open slave fd with a zeroed termios of the right type.
        unsafe {
            let mut tio: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(slave.as_raw_fd(), &mut tio) == 0 {
                libc::cfmakeraw(&mut tio);
                libc::tcsetattr(slave.as_raw_fd(), libc::TCSANOW, &tio);
            }
        }
        Ok(ConsoleIo {
            output: Box::new(File::from(master)),
            input: Some(input),
            description: path,
            _slave: Some(slave),
        })
    }
}

/// The console's output, shared by the device and each worker it starts.
type SharedOutput = Arc<Mutex<Box<dyn Write + Send>>>;

pub struct Console {
    /// Kept across resets: a driver that resets the device (as Linux does when it probes or
    /// recovers it) gets the same console back.
    output: SharedOutput,
    input: Option<File>,
    _slave: Option<File>,
    worker: Option<Worker>,
}

impl Console {
    pub fn new(io: ConsoleIo) -> Console {
        Console { output: Arc::new(Mutex::new(io.output)), input: io.input, _slave: io._slave, worker: None }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }
    fn features(&self) -> u64 {
        F_VERSION_1 | F_RING_INDIRECT_DESC | F_RING_EVENT_IDX
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports: meaningless without the SIZE and MULTIPORT features.
        crate::device::read_config_bytes(&[0; 8], offset, data);
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let input = self.input.as_ref().map(File::try_clone).transpose().map_err(ActivateError::Worker)?;
        let backend = ConsoleBackend { output: self.output.clone(), input, pending: VecDeque::new(), dropped: false };
        self.worker =
            Some(Worker::spawn(sandbox::ThreadKind::Console, backend, activation).map_err(ActivateError::Worker)?);
        Ok(())
    }
    fn quiesce(&mut self) -> Option<Vec<Queue>> {
        self.worker.take().and_then(|mut w| w.stop())
    }
    fn reset(&mut self) {
        self.worker = None;
    }
}

struct ConsoleBackend {
    output: SharedOutput,
    input: Option<File>,
    pending: VecDeque<u8>,
    /// Output was dropped because nobody reads it; logged once.
    dropped: bool,
}

impl ConsoleBackend {
    fn transmit(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let mut output = self.output.lock().unwrap_or_else(|p| p.into_inner());
        let dropped = &mut self.dropped;
        serve_queue("virtio-console", &mut queues[TX_QUEUE], mem, |chain| {
            let mut chunk = [0u8; CHUNK];
            let mut total = 0usize;
            for desc in chain.readable() {
                let mut done = 0usize;
                while done < desc.len() as usize {
                    let n = (desc.len() as usize - done).min(CHUNK);
                    total += n;
                    if total > MAX_TX_CHAIN {
                        crate::guest_fault!(
                            "virtio-console: a transmit chain of more than {MAX_TX_CHAIN} bytes was cut"
                        );
                        let _ = output.flush();
                        return 0;
                    }
                    let Some(addr) = desc.addr().0.checked_add(done as u64) else { break };
                    if mem.read_slice(&mut chunk[..n], GuestAddress(addr)).is_err() {
                        crate::guest_fault!("virtio-console: a transmit buffer lies outside guest RAM");
                        return 0;
                    }
                    if output.write_all(&chunk[..n]).is_err() && !*dropped {
                        crate::guest_fault!("virtio-console: output is not being read; it is dropped");
                        *dropped = true;
                    }
                    done += n;
                }
            }
            let _ = output.flush();
            0
        })
    }

    fn receive(&mut self, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let pending = std::cell::RefCell::new(&mut self.pending);
        serve_queue_while(
            "virtio-console",
            &mut queues[RX_QUEUE],
            mem,
            || !pending.borrow().is_empty(),
            |chain| {
                let mut pending = pending.borrow_mut();
                let mut written = 0u32;
                for desc in chain.writable() {
                    let n = (desc.len() as usize).min(pending.len());
                    let (a, b) = pending.as_slices();
                    let bytes: Vec<u8> = a.iter().chain(b).take(n).copied().collect();
                    if mem.write_slice(&bytes, desc.addr()).is_err() {
                        crate::guest_fault!("virtio-console: a receive buffer lies outside guest RAM");
                        break;
                    }
                    pending.drain(..n);
                    written += n as u32;
                    if pending.is_empty() {
                        break;
                    }
                }
                written
            },
        )
    }
}

impl Backend for ConsoleBackend {
    fn process_queue(&mut self, index: usize, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        match index {
            TX_QUEUE => self.transmit(queues, mem),
            _ => self.receive(queues, mem),
        }
    }

    fn extra_fds(&self) -> Vec<RawFd> {
        // Full: input waits in the kernel until the guest takes what is held.
        if self.pending.len() >= PENDING_MAX {
            return Vec::new();
        }
        self.input.iter().map(|f| f.as_raw_fd()).collect()
    }

    fn process_fd(&mut self, _fd: RawFd, queues: &mut [Queue], mem: &GuestMemory) -> bool {
        let Some(input) = self.input.as_mut() else { return false };
        let mut chunk = [0u8; CHUNK];
        let room = PENDING_MAX - self.pending.len();
        match input.read(&mut chunk[..room.min(CHUNK)]) {
            Ok(0) => self.input = None,
            Ok(n) => self.pending.extend(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            // A pseudo-terminal whose slave side is closed reports EIO until it is reopened.
            Err(e) if e.raw_os_error() == Some(libc::EIO) => {}
            Err(e) => {
                crate::guest_fault!("virtio-console: input failed ({e}); it is closed");
                self.input = None;
            }
        }
        self.receive(queues, mem)
    }
}

/// The worker's work for the fuzzer, over a receive and a transmit queue in `mem`: each
/// `script` byte notifies the receive queue (0), the transmit queue (1), or (2) types the
/// following bytes (up to the length it gives) on the console's input.
#[doc(hidden)]
pub fn fuzz_queues(mem: &GuestMemory, queues: &mut [Queue], script: &[u8]) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fresh fds into the array, which the Files below then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
        return;
    }
    // SAFETY: both fds are fresh and owned by nothing else.
    let (input, mut typing) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    let input_fd = input.as_raw_fd();
    let mut backend = ConsoleBackend {
        output: Arc::new(Mutex::new(Box::new(std::io::sink()))),
        input: Some(input),
        pending: VecDeque::new(),
        dropped: false,
    };
    let mut rest = script;
    while let [op, tail @ ..] = rest {
        rest = tail;
        match op % 3 {
            0 => backend.process_queue(RX_QUEUE, queues, mem),
            1 => backend.process_queue(TX_QUEUE, queues, mem),
            _ => {
                let [len, text @ ..] = rest else { break };
                let n = usize::from(*len).min(text.len());
                let _ = typing.write_all(&text[..n]);
                rest = &text[n..];
                backend.process_fd(input_fd, queues, mem)
            }
        };
        assert!(backend.pending.len() <= PENDING_MAX);
    }
}
