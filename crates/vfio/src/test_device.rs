//! A small PCI device served over vfio-user (`ferrovisor device-server`): a DMA engine that
//! copies and checksums guest memory through the DMA regions the VMM shares, with a BAR of
//! registers, a BAR the VMM maps straight into the guest, and MSI-X, MSI and INTx. It runs as
//! its own process, so a bug in it stays out of the VMM's address space.
//!
//! BAR 0 (4 KiB, trapped), 32-bit registers:
//! `0x00` ID (`FVMA`), `0x04` scratch, `0x08`/`0x0c` source, `0x10`/`0x14` destination,
//! `0x18` length, `0x1c` command (1 copy, 2 checksum the source, 3 checksum BAR 2's first
//! `length` bytes), `0x20` status (bit 0 done, bit 1 error; write 1 to clear), `0x24` result
//! (FNV-1a of the bytes), `0x28` commands completed since reset, `0x2c` how the last
//! completion was signalled (0 none, 1 INTx, 2 MSI, 3 MSI-X).
//! BAR 1 (4 KiB): the MSI-X table (4 vectors) and PBA, which the VMM emulates.
//! BAR 2 (64 KiB unless `--shared-bar-kib` says otherwise; 64-bit, prefetchable): memory the
//! VMM maps into the guest.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::Path;

use vfio_bindings::bindings::vfio::{
    VFIO_IRQ_INFO_EVENTFD, VFIO_IRQ_SET_ACTION_TRIGGER, VFIO_IRQ_SET_DATA_EVENTFD, VFIO_REGION_INFO_FLAG_MMAP,
    VFIO_REGION_INFO_FLAG_READ, VFIO_REGION_INFO_FLAG_WRITE, vfio_region_info, vfio_region_sparse_mmap_area,
};
use vfio_user::{DmaMapFlags, DmaUnmapFlags, IrqInfo, Server, ServerBackend, ServerRegion, SparseArea};

pub const VENDOR_ID: u16 = 0x1b36;
pub const DEVICE_ID: u16 = 0x1fe0;
pub const ID: u32 = u32::from_le_bytes(*b"FVMA");
pub const REGISTERS_SIZE: u64 = 0x1000;
/// BAR 2's size unless the server is told otherwise.
pub const SHARED_SIZE: u64 = 0x1_0000;
pub const MSIX_VECTORS: u32 = 4;
/// The most one command moves: bounded so that a guest's length cannot stall the server.
pub const MAX_TRANSFER: u64 = 16 << 20;
const MAX_DMA_MAPS: usize = 64;

pub mod reg {
    pub const ID: u64 = 0x00;
    pub const SCRATCH: u64 = 0x04;
    pub const SRC: u64 = 0x08;
    pub const DST: u64 = 0x10;
    pub const LEN: u64 = 0x18;
    pub const CMD: u64 = 0x1c;
    pub const STATUS: u64 = 0x20;
    pub const RESULT: u64 = 0x24;
    pub const COMPLETED: u64 = 0x28;
    pub const SIGNALLED: u64 = 0x2c;
}

pub const CMD_COPY: u32 = 1;
pub const CMD_CHECKSUM: u32 = 2;
pub const CMD_CHECKSUM_SHARED: u32 = 3;
pub const STATUS_DONE: u32 = 1;
pub const STATUS_ERROR: u32 = 2;

/// FNV-1a over `bytes`: what the device reports as a checksum.
pub fn fnv1a(bytes: impl IntoIterator<Item = u8>) -> u32 {
    bytes.into_iter().fold(0x811c_9dc5, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

struct DmaRegion {
    iova: u64,
    size: u64,
    host: *mut u8,
}

/// A mapping of `len` bytes of `fd` at `offset`, shared with whoever else maps it.
fn map_shared(fd: i32, offset: u64, len: u64) -> std::io::Result<*mut u8> {
    // SAFETY: a new shared mapping of a file the caller holds; the kernel checks the range.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            offset as libc::off_t,
        )
    };
    if ptr == libc::MAP_FAILED { Err(std::io::Error::last_os_error()) } else { Ok(ptr.cast()) }
}

pub struct TestDevice {
    config: [u8; 256],
    regs: [u32; 12],
    shared_file: File,
    shared: *mut u8,
    shared_size: u64,
    dma: Vec<DmaRegion>,
    /// Trigger eventfds per VFIO interrupt index (INTx, MSI, MSI-X).
    irqs: [Vec<Option<File>>; 3],
}

// SAFETY: the raw pointers are mappings this device owns; one thread serves it at a time.
unsafe impl Send for TestDevice {}

impl TestDevice {
    /// A device whose BAR 2 is `shared_size` bytes (a power of two, at least 4 KiB).
    pub fn new(shared_size: u64) -> std::io::Result<TestDevice> {
        if !shared_size.is_power_of_two() || shared_size < 4096 {
            return Err(invalid("BAR 2's size must be a power of two of at least 4 KiB"));
        }
        // SAFETY: memfd_create with a NUL-terminated name returns a new fd or -1.
        let fd = unsafe { libc::memfd_create(c"ferrovisor-test-device-bar2".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: fd is new and owned by the File from here on.
        let shared_file = unsafe { File::from_raw_fd(fd) };
        shared_file.set_len(shared_size)?;
        let shared = map_shared(shared_file.as_raw_fd(), 0, shared_size)?;
        let mut config = [0u8; 256];
        let mut put = |at: usize, bytes: &[u8]| config[at..at + bytes.len()].copy_from_slice(bytes);
        put(0x00, &VENDOR_ID.to_le_bytes());
        put(0x02, &DEVICE_ID.to_le_bytes());
        put(0x06, &0x10u16.to_le_bytes()); // capability list
        put(0x08, &[1, 0, 0, 0xff]); // revision 1, class "unassigned"
        put(0x18, &0xcu32.to_le_bytes()); // BAR 2: 64-bit prefetchable memory
        put(0x2c, &VENDOR_ID.to_le_bytes());
        put(0x2e, &DEVICE_ID.to_le_bytes());
        put(0x34, &[0x40]);
        put(0x3d, &[1]); // INTA
        // MSI-X: 4 vectors, table at BAR 1 + 0, PBA at BAR 1 + 0x800.
        put(0x40, &[0x11, 0x50]);
        put(0x42, &((MSIX_VECTORS - 1) as u16).to_le_bytes());
        put(0x44, &1u32.to_le_bytes());
        put(0x48, &0x801u32.to_le_bytes());
        // MSI: 64-bit, one vector.
        put(0x50, &[0x05, 0x00]);
        put(0x52, &0x80u16.to_le_bytes());
        Ok(TestDevice {
            config,
            regs: [0; 12],
            shared_file,
            shared,
            shared_size,
            dma: Vec::new(),
            irqs: Default::default(),
        })
    }

    /// The regions and interrupts the server announces.
    pub fn layout(&self) -> (Vec<ServerRegion>, Vec<IrqInfo>) {
        let rw = VFIO_REGION_INFO_FLAG_READ | VFIO_REGION_INFO_FLAG_WRITE;
        let region = |index: u32, size: u64, flags: u32| vfio_region_info {
            argsz: std::mem::size_of::<vfio_region_info>() as u32,
            flags: if size > 0 { flags } else { 0 },
            index,
            cap_offset: 0,
            size,
            offset: 0,
        };
        let mut regions: Vec<ServerRegion> = (0..8)
            .map(|i| ServerRegion { region_info: region(i, 0, 0), sparse_areas: Vec::new(), mmap_fd: None })
            .collect();
        regions[0].region_info = region(0, REGISTERS_SIZE, rw);
        regions[1].region_info = region(1, 0x1000, rw);
        regions[2].region_info = region(2, self.shared_size, rw | VFIO_REGION_INFO_FLAG_MMAP);
        regions[2].sparse_areas =
            vec![SparseArea { area: vfio_region_sparse_mmap_area { offset: 0, size: self.shared_size } }];
        regions[2].mmap_fd = Some(self.shared_file.as_raw_fd());
        regions[7].region_info = region(7, 256, rw);
        let irq = |index, count| IrqInfo { index, flags: VFIO_IRQ_INFO_EVENTFD, count };
        (regions, vec![irq(0, 1), irq(1, 1), irq(2, MSIX_VECTORS)])
    }

    fn reg(&self, offset: u64) -> u32 {
        self.regs.get(offset as usize / 4).copied().unwrap_or(0)
    }

    fn addr(&self, at: u64) -> u64 {
        u64::from(self.reg(at)) | u64::from(self.reg(at + 4)) << 32
    }

    /// Guest memory `[iova, iova + len)`, if one DMA region holds all of it.
    fn guest(&self, iova: u64, len: u64) -> Option<*mut u8> {
        let end = iova.checked_add(len)?;
        let r = self.dma.iter().find(|r| iova >= r.iova && end <= r.iova + r.size)?;
        // SAFETY: the offset lies inside the region's mapping.
        Some(unsafe { r.host.add((iova - r.iova) as usize) })
    }

    fn run(&mut self, command: u32) -> bool {
        let len = u64::from(self.reg(reg::LEN));
        if len > MAX_TRANSFER {
            return false;
        }
        let checksum = |p: *const u8| {
            // SAFETY: `p` starts `len` readable bytes (checked by the caller's lookup); they
            // are read one at a time through the raw pointer, never as a reference, since the
            // guest may write them meanwhile.
            fnv1a((0..len as usize).map(|i| unsafe { p.add(i).read_volatile() }))
        };
        match command {
            CMD_COPY => {
                let (Some(src), Some(dst)) =
                    (self.guest(self.addr(reg::SRC), len), self.guest(self.addr(reg::DST), len))
                else {
                    return false;
                };
                // SAFETY: both ranges are inside live DMA mappings; copy handles overlap.
                unsafe { std::ptr::copy(src, dst, len as usize) };
                true
            }
            CMD_CHECKSUM => match self.guest(self.addr(reg::SRC), len) {
                Some(src) => {
                    self.regs[reg::RESULT as usize / 4] = checksum(src);
                    true
                }
                None => false,
            },
            CMD_CHECKSUM_SHARED if len <= self.shared_size => {
                self.regs[reg::RESULT as usize / 4] = checksum(self.shared);
                true
            }
            _ => false,
        }
    }

    fn signal(&mut self) {
        use std::io::Write;
        let signalled = [(2usize, 3u32), (1, 2), (0, 1)].into_iter().find_map(|(index, mode)| {
            let mut fd: &File = self.irqs[index].first()?.as_ref()?;
            fd.write_all(&1u64.to_ne_bytes()).is_ok().then_some(mode)
        });
        self.regs[reg::SIGNALLED as usize / 4] = signalled.unwrap_or(0);
    }
}

impl Drop for TestDevice {
    fn drop(&mut self) {
        // SAFETY: each pointer is a mapping this device made and nothing uses after drop.
        unsafe {
            libc::munmap(self.shared.cast(), self.shared_size as usize);
            for r in &self.dma {
                libc::munmap(r.host.cast(), r.size as usize);
            }
        }
    }
}

fn invalid(what: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, what.to_string())
}

impl ServerBackend for TestDevice {
    fn region_read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), std::io::Error> {
        let source: Vec<u8> = match region {
            0 => {
                let mut regs = self.regs;
                regs[0] = ID;
                regs.iter().flat_map(|r| r.to_le_bytes()).collect()
            }
            7 => self.config.to_vec(),
            2 => {
                let end = offset
                    .checked_add(data.len() as u64)
                    .filter(|&e| e <= self.shared_size)
                    .ok_or(invalid("past BAR 2"))?;
                // SAFETY: [offset, end) lies inside the shared mapping; read byte by byte.
                (offset..end).map(|i| unsafe { self.shared.add(i as usize).read_volatile() }).collect()
            }
            _ => Vec::new(),
        };
        let start = if region == 2 { 0 } else { offset as usize };
        for (i, out) in data.iter_mut().enumerate() {
            *out = source.get(start + i).copied().unwrap_or(0);
        }
        Ok(())
    }

    fn region_write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), std::io::Error> {
        match region {
            0 if data.len() == 4 && offset.is_multiple_of(4) => {
                let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
                match offset {
                    reg::SCRATCH | reg::SRC | 0x0c | reg::DST | 0x14 | reg::LEN => {
                        self.regs[offset as usize / 4] = value
                    }
                    reg::STATUS => self.regs[reg::STATUS as usize / 4] &= !value,
                    reg::CMD => {
                        let ok = self.run(value);
                        self.regs[reg::STATUS as usize / 4] = if ok { STATUS_DONE } else { STATUS_DONE | STATUS_ERROR };
                        let completed = &mut self.regs[reg::COMPLETED as usize / 4];
                        *completed = completed.wrapping_add(1);
                        self.signal();
                    }
                    _ => {}
                }
            }
            2 => {
                let end = offset
                    .checked_add(data.len() as u64)
                    .filter(|&e| e <= self.shared_size)
                    .ok_or(invalid("past BAR 2"))?;
                for (i, &b) in (offset..end).zip(data) {
                    // SAFETY: inside the shared mapping.
                    unsafe { self.shared.add(i as usize).write_volatile(b) };
                }
            }
            // Configuration space: only the command register is the device's to keep.
            7 if offset == 4 && data.len() >= 2 => self.config[4..6].copy_from_slice(&data[..2]),
            _ => {}
        }
        Ok(())
    }

    fn dma_map(
        &mut self,
        _flags: DmaMapFlags,
        offset: u64,
        address: u64,
        size: u64,
        fd: Option<File>,
    ) -> Result<(), std::io::Error> {
        let fd = fd.ok_or(invalid("a DMA region without a file"))?;
        if self.dma.len() >= MAX_DMA_MAPS || size == 0 || address.checked_add(size).is_none() {
            return Err(invalid("a DMA region this device cannot take"));
        }
        let host = map_shared(fd.as_raw_fd(), offset, size)?;
        self.dma.push(DmaRegion { iova: address, size, host });
        Ok(())
    }

    fn dma_unmap(&mut self, _flags: DmaUnmapFlags, address: u64, size: u64) -> Result<(), std::io::Error> {
        let Some(i) = self.dma.iter().position(|r| r.iova == address && r.size == size) else {
            return Err(invalid("no such DMA region"));
        };
        let r = self.dma.remove(i);
        // SAFETY: the mapping was made by dma_map and is no longer listed.
        unsafe { libc::munmap(r.host.cast(), r.size as usize) };
        Ok(())
    }

    fn reset(&mut self) -> Result<(), std::io::Error> {
        self.regs = [0; 12];
        self.irqs[2].clear();
        self.irqs[1].clear();
        Ok(())
    }

    fn set_irqs(
        &mut self,
        index: u32,
        flags: u32,
        start: u32,
        count: u32,
        fds: Vec<File>,
    ) -> Result<(), std::io::Error> {
        let slots = self.irqs.get_mut(index as usize).ok_or(invalid("no such interrupt index"))?;
        if flags & VFIO_IRQ_SET_ACTION_TRIGGER == 0 {
            return Ok(()); // unmask and mask: this device keeps no INTx level
        }
        if flags & VFIO_IRQ_SET_DATA_EVENTFD == 0 || count == 0 {
            slots.clear();
            return Ok(());
        }
        let (start, count) = (start as usize, count as usize);
        if start + count > MSIX_VECTORS as usize || fds.len() != count {
            return Err(invalid("interrupts this device does not have"));
        }
        if slots.len() < start + count {
            slots.resize_with(start + count, || None);
        }
        for (slot, fd) in slots[start..].iter_mut().zip(fds) {
            *slot = Some(fd);
        }
        Ok(())
    }
}

/// Serves the test device at `socket`, one VMM after another, until killed; `confine` runs
/// once the device and its socket exist (to put the process under its seccomp filter).
pub fn serve(socket: &Path, shared_size: u64, confine: impl FnOnce() -> Result<(), String>) -> Result<(), String> {
    let mut device = TestDevice::new(shared_size).map_err(|e| format!("the test device cannot be made ({e})"))?;
    let (regions, irqs) = device.layout();
    let server = Server::new(socket, true, irqs, regions).map_err(|e| {
        format!("cannot serve at {} ({e}); remove a stale socket or pick another path", socket.display())
    })?;
    confine()?;
    tracing::info!("test DMA engine served at {}", socket.display());
    loop {
        server.run(&mut device).map_err(|e| format!("the vfio-user connection failed ({e})"))?;
        tracing::info!("the VMM disconnected; waiting for the next");
        device.reset().ok();
        for r in device.dma.drain(..) {
            // SAFETY: the mapping was made by dma_map and is no longer listed.
            unsafe { libc::munmap(r.host.cast(), r.size as usize) };
        }
    }
}

/// The test device behind [`crate::Backend`] in this process, with nothing mapped (every
/// access is a call): for unit tests and fuzzing of the VMM's side without a socket.
pub struct InProcess {
    device: TestDevice,
    info: crate::DeviceInfo,
}

impl InProcess {
    pub fn new() -> std::io::Result<InProcess> {
        let device = TestDevice::new(SHARED_SIZE)?;
        let (regions, irqs) = device.layout();
        let regions = regions
            .iter()
            .map(|r| crate::Region {
                index: r.region_info.index,
                size: r.region_info.size,
                readable: r.region_info.flags & VFIO_REGION_INFO_FLAG_READ != 0,
                writable: r.region_info.flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
                mmap: None,
            })
            .collect();
        let info = crate::DeviceInfo { regions, irq_counts: irqs.iter().map(|i| i.count).collect() };
        Ok(InProcess { device, info })
    }
}

impl crate::Backend for InProcess {
    fn describe(&self) -> String {
        "the in-process test device".into()
    }
    fn info(&self) -> &crate::DeviceInfo {
        &self.info
    }
    fn resettable(&self) -> bool {
        true
    }
    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), crate::Error> {
        Ok(self.device.region_read(region, offset, data)?)
    }
    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), crate::Error> {
        Ok(self.device.region_write(region, offset, data)?)
    }
    fn set_irqs(&mut self, index: u32, fds: &[&vmm_sys_util::eventfd::EventFd]) -> Result<(), crate::Error> {
        use vfio_bindings::bindings::vfio::VFIO_IRQ_SET_DATA_NONE;
        let files = fds
            .iter()
            .map(|f| {
                // SAFETY: into_raw_fd hands over the clone's fd, which the File owns from here on.
                f.try_clone().map(|e| unsafe { File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(e)) })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let data = if files.is_empty() { VFIO_IRQ_SET_DATA_NONE } else { VFIO_IRQ_SET_DATA_EVENTFD };
        let count = files.len() as u32;
        Ok(self.device.set_irqs(index, data | VFIO_IRQ_SET_ACTION_TRIGGER, 0, count, files)?)
    }
    fn set_intx_unmask(&mut self, _fd: &vmm_sys_util::eventfd::EventFd) -> Result<(), crate::Error> {
        Ok(())
    }
    fn reset(&mut self) -> Result<(), crate::Error> {
        Ok(self.device.reset()?)
    }
    fn dma_map(&mut self, map: &crate::DmaMapping) -> Result<(), crate::Error> {
        let Some((fd, offset)) = map.file else {
            return Err(crate::Error::Unsupported("memory without a file".into()));
        };
        // SAFETY: F_DUPFD_CLOEXEC on the caller's live fd returns a new fd or -1.
        let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
        if dup < 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        // SAFETY: `dup` is new and owned by the File from here on.
        let file = unsafe { File::from_raw_fd(dup) };
        Ok(self.device.dma_map(DmaMapFlags::READ_WRITE, offset, map.iova, map.size, Some(file))?)
    }
    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), crate::Error> {
        Ok(self.device.dma_unmap(DmaUnmapFlags::empty(), iova, size)?)
    }
}

/// A device that is only what a test or the fuzzer says: a configuration space of these bytes
/// (writes kept; other regions read as zeros) and regions of these sizes, to build hostile
/// devices from.
#[doc(hidden)]
pub struct ConfigOnly {
    pub config: [u8; 256],
    pub info: crate::DeviceInfo,
    pub resettable: bool,
}

impl crate::Backend for ConfigOnly {
    fn describe(&self) -> String {
        "a configuration-space-only device".into()
    }
    fn info(&self) -> &crate::DeviceInfo {
        &self.info
    }
    fn resettable(&self) -> bool {
        self.resettable
    }
    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), crate::Error> {
        for (i, out) in data.iter_mut().enumerate() {
            *out = match region {
                crate::CONFIG_REGION => self.config.get(offset as usize + i).copied().unwrap_or(0),
                _ => 0,
            };
        }
        Ok(())
    }
    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), crate::Error> {
        if region == crate::CONFIG_REGION {
            for (i, &b) in data.iter().enumerate() {
                if let Some(slot) = self.config.get_mut(offset as usize + i) {
                    *slot = b;
                }
            }
        }
        Ok(())
    }
    fn set_irqs(&mut self, _index: u32, _fds: &[&vmm_sys_util::eventfd::EventFd]) -> Result<(), crate::Error> {
        Ok(())
    }
    fn set_intx_unmask(&mut self, _fd: &vmm_sys_util::eventfd::EventFd) -> Result<(), crate::Error> {
        Ok(())
    }
    fn reset(&mut self) -> Result<(), crate::Error> {
        Ok(())
    }
    fn dma_map(&mut self, _map: &crate::DmaMapping) -> Result<(), crate::Error> {
        Ok(())
    }
    fn dma_unmap(&mut self, _iova: u64, _size: u64) -> Result<(), crate::Error> {
        Ok(())
    }
}
