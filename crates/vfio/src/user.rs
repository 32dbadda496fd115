//! The vfio-user client: the VFIO model carried over a Unix socket to a device server (the
//! protocol of QEMU's and libvfio-user's servers and of rust-vmm's `vfio_user::Server`).
//!
//! Our own rather than `vfio_user::Client`, because the server is not trusted: that client
//! panics on some malformed replies (a short version reply, a capability size mismatch), sizes
//! buffers from the server's word, reads an error reply as a good one, and waits for ever on a
//! server that stops answering; its socket is private, so none of that can be fixed from
//! outside. Here every reply is checked against the request it answers and bounded, every wait
//! has a deadline, and the first broken exchange marks the device gone: later calls fail at
//! once, and the VMM answers the guest with all-ones.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::{Backend, DmaMapping, Error, Region, RegionMmap};

const HEADER_LEN: usize = 16;
const FLAG_REPLY: u32 = 1;
const FLAG_ERROR: u32 = 1 << 5;
/// The longest a server may take over one answer before its device counts as gone.
pub const REPLY_DEADLINE: Duration = Duration::from_secs(2);
/// Bounds on what a server may describe: PCI has 9 regions and 5 interrupt indices.
const MAX_REGIONS: u32 = 16;
const MAX_IRQ_INDICES: u32 = 8;
const MAX_VECTORS: u32 = 2048;
const MAX_CAPABILITY_BYTES: u32 = 4096;
const MAX_SPARSE_AREAS: usize = 64;
const DEFAULT_MAX_TRANSFER: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
enum Command {
    Version = 1,
    DmaMap = 2,
    DmaUnmap = 3,
    DeviceGetInfo = 4,
    DeviceGetRegionInfo = 5,
    GetIrqInfo = 7,
    SetIrqs = 8,
    RegionRead = 9,
    RegionWrite = 10,
    DeviceReset = 13,
}

impl Command {
    fn what(self) -> &'static str {
        match self {
            Command::Version => "version negotiation",
            Command::DmaMap => "a DMA map",
            Command::DmaUnmap => "a DMA unmap",
            Command::DeviceGetInfo => "the device information request",
            Command::DeviceGetRegionInfo => "a region information request",
            Command::GetIrqInfo => "an interrupt information request",
            Command::SetIrqs => "an interrupt set-up",
            Command::RegionRead => "a region read",
            Command::RegionWrite => "a region write",
            Command::DeviceReset => "a reset",
        }
    }
}

/// A message header as the wire carries it (little-endian).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub message_id: u16,
    pub command: u16,
    pub message_size: u32,
    pub flags: u32,
    pub error: u32,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..2].copy_from_slice(&self.message_id.to_le_bytes());
        b[2..4].copy_from_slice(&self.command.to_le_bytes());
        b[4..8].copy_from_slice(&self.message_size.to_le_bytes());
        b[8..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.error.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; HEADER_LEN]) -> Header {
        Header {
            message_id: u16::from_le_bytes([b[0], b[1]]),
            command: u16::from_le_bytes([b[2], b[3]]),
            message_size: u32::from_le_bytes([b[4], b[5], b[6], b[7]]),
            flags: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            error: u32::from_le_bytes([b[12], b[13], b[14], b[15]]),
        }
    }
}

/// What a reply header says, checked against the request (`id`, `command`) and the most
/// payload that request can be answered with: the payload length, or why it is no answer.
pub fn check_reply(header: &Header, id: u16, command: u16, max_payload: usize) -> Result<usize, Error> {
    if header.flags & FLAG_REPLY == 0 || header.message_id != id || header.command != command {
        return Err(Error::Protocol(format!(
            "expected the reply to message {id} (command {command}), got message {} (command {}, flags {:#x})",
            header.message_id, header.command, header.flags
        )));
    }
    let size = header.message_size as usize;
    if !(HEADER_LEN..=HEADER_LEN + max_payload).contains(&size) {
        return Err(Error::Protocol(format!(
            "a reply of {size} bytes to command {command}, where {HEADER_LEN} to {} fit",
            HEADER_LEN + max_payload
        )));
    }
    Ok(size - HEADER_LEN)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4).map_or(0, |s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from(u32_at(b, at)) | u64::from(u32_at(b, at + 4)) << 32
}

const REGION_INFO_LEN: usize = 32;
const CAP_SPARSE_MMAP: u32 = vfio_bindings::bindings::vfio::VFIO_REGION_INFO_CAP_SPARSE_MMAP;

/// The sparse mmap areas (offset, length) listed in a region's capability chain. `caps` is what
/// follows the 32-byte region information, whose offsets count from the start of that
/// information. Areas outside the region, and chains that loop or overrun, are refused.
pub fn parse_sparse_areas(caps: &[u8], first: u32, region_size: u64) -> Result<Vec<(u64, u64)>, String> {
    let mut areas = Vec::new();
    let mut next = first as usize;
    let mut previous = 0;
    while next != 0 {
        if next <= previous {
            return Err(format!("capability offset {next} does not advance"));
        }
        previous = next;
        let at = next
            .checked_sub(REGION_INFO_LEN)
            .filter(|at| at + 8 <= caps.len())
            .ok_or_else(|| format!("capability offset {next} is outside the reply"))?;
        let id = u32::from(u16::from_le_bytes([caps[at], caps[at + 1]]));
        next = u32_at(caps, at + 4) as usize;
        if id != CAP_SPARSE_MMAP {
            continue;
        }
        let count = u32_at(caps, at + 8) as usize;
        if at + 16 + count.saturating_mul(16) > caps.len() || areas.len() + count > MAX_SPARSE_AREAS {
            return Err(format!("a sparse mmap capability claims {count} areas that do not fit"));
        }
        for i in 0..count {
            let (offset, len) = (u64_at(caps, at + 16 + i * 16), u64_at(caps, at + 24 + i * 16));
            if len == 0 || offset.checked_add(len).is_none_or(|end| end > region_size) {
                return Err(format!("sparse area {offset:#x}+{len:#x} lies outside the {region_size:#x}-byte region"));
            }
            areas.push((offset, len));
        }
    }
    Ok(areas)
}

/// A connection to a vfio-user device server.
pub struct UserDevice {
    path: PathBuf,
    stream: UnixStream,
    next_id: u16,
    max_fds: usize,
    max_transfer: usize,
    info: crate::DeviceInfo,
    resettable: bool,
    gone: bool,
}

impl UserDevice {
    /// Connects, negotiates the protocol and reads the device's regions and interrupts.
    pub fn connect(path: &Path) -> Result<UserDevice, Error> {
        let stream = UnixStream::connect(path).map_err(|e| {
            Error::Unsupported(format!(
                "cannot connect to the vfio-user socket {} ({e}); is its device server running?",
                path.display()
            ))
        })?;
        UserDevice::over(stream, path)
    }

    /// Speaks vfio-user over `stream`, already connected to the server at `path`.
    pub fn over(stream: UnixStream, path: &Path) -> Result<UserDevice, Error> {
        stream.set_read_timeout(Some(REPLY_DEADLINE))?;
        stream.set_write_timeout(Some(REPLY_DEADLINE))?;
        let mut device = UserDevice {
            path: path.to_path_buf(),
            stream,
            next_id: 0,
            max_fds: 1,
            max_transfer: DEFAULT_MAX_TRANSFER,
            info: crate::DeviceInfo::default(),
            resettable: false,
            gone: false,
        };
        device.negotiate().map_err(|e| {
            Error::Unsupported(format!(
                "{} does not speak vfio-user ({e}); give the socket of a vfio-user device server",
                path.display()
            ))
        })?;
        device.describe_device()?;
        Ok(device)
    }

    fn negotiate(&mut self) -> Result<(), Error> {
        let caps = format!(
            r#"{{"capabilities":{{"max_msg_fds":16,"max_data_xfer_size":{DEFAULT_MAX_TRANSFER},"migration":{{"pgsize":4096}}}}}}"#
        );
        let mut body = vec![0, 0, 1, 0]; // major 0, minor 1
        body.extend_from_slice(caps.as_bytes());
        body.push(0);
        let (reply, _) = self.call(Command::Version, &body, &[], 4 + 4096)?;
        if reply.len() < 4 || u16::from_le_bytes([reply[0], reply[1]]) != 0 {
            return Err(Error::Protocol("the server offers a major version other than 0".into()));
        }
        let json = reply[4..].split(|&b| b == 0).next().unwrap_or_default();
        // A server that names no capabilities gets the protocol's defaults.
        if let Ok(value) = serde_json::from_slice::<serde_json::Value>(json) {
            let caps = &value["capabilities"];
            if let Some(n) = caps["max_msg_fds"].as_u64() {
                self.max_fds = n.clamp(1, 16) as usize;
            }
            if let Some(n) = caps["max_data_xfer_size"].as_u64() {
                self.max_transfer = n.clamp(4, DEFAULT_MAX_TRANSFER as u64) as usize;
            }
        }
        Ok(())
    }

    fn describe_device(&mut self) -> Result<(), Error> {
        let mut body = Vec::new();
        for v in [16u32, 0, 0, 0] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        let (reply, _) = self.call(Command::DeviceGetInfo, &body, &[], 16)?;
        let (flags, regions, irqs) = (u32_at(&reply, 4), u32_at(&reply, 8), u32_at(&reply, 12));
        if flags & vfio_bindings::bindings::vfio::VFIO_DEVICE_FLAGS_PCI == 0 {
            return Err(Error::Unsupported(format!("the device at {} is not a PCI device", self.path.display())));
        }
        if regions > MAX_REGIONS || irqs > MAX_IRQ_INDICES {
            return Err(Error::Protocol(format!("the device claims {regions} regions and {irqs} interrupt indices")));
        }
        self.resettable = flags & vfio_bindings::bindings::vfio::VFIO_DEVICE_FLAGS_RESET != 0;
        for index in 0..regions {
            let region = self.region_info(index)?;
            self.info.regions.push(region);
        }
        for index in 0..irqs {
            let mut body = Vec::new();
            for v in [16u32, 0, index, 0] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            let (reply, _) = self.call(Command::GetIrqInfo, &body, &[], 16)?;
            self.info.irq_counts.push(u32_at(&reply, 12).min(MAX_VECTORS));
        }
        Ok(())
    }

    fn region_info(&mut self, index: u32) -> Result<Region, Error> {
        let request = |argsz: u32| {
            let mut body = Vec::new();
            for v in [argsz, 0, index, 0, 0, 0, 0, 0] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            body
        };
        let max = REGION_INFO_LEN + MAX_CAPABILITY_BYTES as usize;
        let (mut reply, mut fds) =
            self.call(Command::DeviceGetRegionInfo, &request(REGION_INFO_LEN as u32), &[], max)?;
        let wanted = u32_at(&reply, 0);
        if wanted > REGION_INFO_LEN as u32 && reply.len() == REGION_INFO_LEN {
            // The capabilities (and with them the mmap fd) come when asked with room for them.
            let argsz = wanted.min(REGION_INFO_LEN as u32 + MAX_CAPABILITY_BYTES);
            (reply, fds) = self.call(Command::DeviceGetRegionInfo, &request(argsz), &[], max)?;
        }
        if reply.len() < REGION_INFO_LEN {
            return Err(Error::Protocol(format!("region {index}'s information is {} bytes long", reply.len())));
        }
        use vfio_bindings::bindings::vfio::{
            VFIO_REGION_INFO_FLAG_CAPS, VFIO_REGION_INFO_FLAG_MMAP, VFIO_REGION_INFO_FLAG_READ,
            VFIO_REGION_INFO_FLAG_WRITE,
        };
        let (flags, cap_offset, size, file_offset) =
            (u32_at(&reply, 4), u32_at(&reply, 12), u64_at(&reply, 16), u64_at(&reply, 24));
        let mmap = match fds.pop() {
            Some(fd) if flags & VFIO_REGION_INFO_FLAG_MMAP != 0 && size > 0 => {
                let areas = if flags & VFIO_REGION_INFO_FLAG_CAPS != 0 {
                    parse_sparse_areas(&reply[REGION_INFO_LEN..], cap_offset, size).map_err(Error::Protocol)?
                } else {
                    vec![(0, size)]
                };
                Some(RegionMmap { fd: Arc::new(fd), file_offset, areas })
            }
            _ => None,
        };
        Ok(Region {
            index,
            size,
            readable: flags & VFIO_REGION_INFO_FLAG_READ != 0,
            writable: flags & VFIO_REGION_INFO_FLAG_WRITE != 0,
            mmap,
        })
    }

    /// Sends one command and returns its reply's payload and any fds that came with it. A
    /// broken exchange (socket error, deadline, malformed reply) marks the device gone.
    fn call(
        &mut self,
        command: Command,
        body: &[u8],
        fds: &[RawFd],
        max_payload: usize,
    ) -> Result<(Vec<u8>, Vec<OwnedFd>), Error> {
        if self.gone {
            return Err(Error::Gone);
        }
        match self.exchange(command, body, fds, max_payload) {
            Err(e) if !matches!(e, Error::Refused { .. }) => Err(self.broken(e)),
            result => result,
        }
    }

    /// Marks the device gone after `e` broke an exchange, and says so once.
    fn broken(&mut self, e: Error) -> Error {
        self.gone = true;
        tracing::error!(
            "the vfio-user device at {} is gone ({e}); its accesses now read all ones",
            self.path.display()
        );
        e
    }

    fn exchange(
        &mut self,
        command: Command,
        body: &[u8],
        fds: &[RawFd],
        max_payload: usize,
    ) -> Result<(Vec<u8>, Vec<OwnedFd>), Error> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        let header = Header {
            message_id: id,
            command: command as u16,
            message_size: (HEADER_LEN + body.len()) as u32,
            flags: 0,
            error: 0,
        };
        let mut message = header.encode().to_vec();
        message.extend_from_slice(body);
        if fds.is_empty() {
            self.stream.write_all(&message)?;
        } else {
            let sent = self.stream.send_with_fds(&[&message[..]], fds).map_err(std::io::Error::from)?;
            if sent < message.len() {
                self.stream.write_all(&message[sent..])?;
            }
        }
        let mut raw = [0u8; HEADER_LEN];
        let (got, fd) = self.stream.recv_with_fd(&mut raw).map_err(std::io::Error::from)?;
        if got == 0 {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "the server closed the socket").into());
        }
        self.stream.read_exact(&mut raw[got..])?;
        let reply = Header::decode(&raw);
        let payload = check_reply(&reply, id, command as u16, max_payload)?;
        let mut data = vec![0u8; payload];
        self.stream.read_exact(&mut data)?;
        if reply.flags & FLAG_ERROR != 0 {
            return Err(Error::Refused { what: command.what(), errno: reply.error });
        }
        Ok((data, fd.map(OwnedFd::from).into_iter().collect()))
    }

    fn access_body(region: u32, offset: u64, count: usize) -> Vec<u8> {
        let mut body = offset.to_le_bytes().to_vec();
        body.extend_from_slice(&region.to_le_bytes());
        body.extend_from_slice(&(count as u32).to_le_bytes());
        body
    }

    fn set_irq_action(&mut self, index: u32, action: u32, fds: &[RawFd]) -> Result<(), Error> {
        use vfio_bindings::bindings::vfio::{VFIO_IRQ_SET_DATA_EVENTFD, VFIO_IRQ_SET_DATA_NONE};
        let message = |flags: u32, start: u32, count: u32| {
            let mut body = Vec::new();
            for v in [20u32, flags, index, start, count] {
                body.extend_from_slice(&v.to_le_bytes());
            }
            body
        };
        if fds.is_empty() {
            self.call(Command::SetIrqs, &message(VFIO_IRQ_SET_DATA_NONE | action, 0, 0), &[], 0)?;
            return Ok(());
        }
        // As many fds per message as the server takes.
        for (chunk, fds) in fds.chunks(self.max_fds).enumerate() {
            let start = (chunk * self.max_fds) as u32;
            let body = message(VFIO_IRQ_SET_DATA_EVENTFD | action, start, fds.len() as u32);
            self.call(Command::SetIrqs, &body, fds, 0)?;
        }
        Ok(())
    }
}

impl Backend for UserDevice {
    fn describe(&self) -> String {
        format!("vfio-user device at {}", self.path.display())
    }

    fn info(&self) -> &crate::DeviceInfo {
        &self.info
    }

    fn resettable(&self) -> bool {
        self.resettable
    }

    fn read(&mut self, region: u32, offset: u64, data: &mut [u8]) -> Result<(), Error> {
        let step = self.max_transfer;
        for (i, chunk) in data.chunks_mut(step).enumerate() {
            let at = offset + (i * step) as u64;
            let (reply, _) =
                self.call(Command::RegionRead, &Self::access_body(region, at, chunk.len()), &[], 16 + chunk.len())?;
            match reply.get(16..).filter(|b| b.len() == chunk.len()) {
                Some(bytes) => chunk.copy_from_slice(bytes),
                None => {
                    let e =
                        Error::Protocol(format!("a read of {} bytes was answered with {}", chunk.len(), reply.len()));
                    return Err(self.broken(e));
                }
            }
        }
        Ok(())
    }

    fn write(&mut self, region: u32, offset: u64, data: &[u8]) -> Result<(), Error> {
        let step = self.max_transfer;
        for (i, chunk) in data.chunks(step).enumerate() {
            let mut body = Self::access_body(region, offset + (i * step) as u64, chunk.len());
            body.extend_from_slice(chunk);
            self.call(Command::RegionWrite, &body, &[], 16)?;
        }
        Ok(())
    }

    fn set_irqs(&mut self, index: u32, fds: &[&EventFd]) -> Result<(), Error> {
        let raw: Vec<RawFd> = fds.iter().map(|f| f.as_raw_fd()).collect();
        self.set_irq_action(index, vfio_bindings::bindings::vfio::VFIO_IRQ_SET_ACTION_TRIGGER, &raw)
    }

    fn set_intx_unmask(&mut self, fd: &EventFd) -> Result<(), Error> {
        let action = vfio_bindings::bindings::vfio::VFIO_IRQ_SET_ACTION_UNMASK;
        self.set_irq_action(crate::INTX_IRQ, action, &[fd.as_raw_fd()])
    }

    fn reset(&mut self) -> Result<(), Error> {
        self.call(Command::DeviceReset, &[], &[], 0).map(drop)
    }

    fn dma_map(&mut self, map: &DmaMapping) -> Result<(), Error> {
        let Some((fd, offset)) = map.file else {
            return Err(Error::Unsupported(
                "guest memory without a file cannot be shared with a vfio-user server".into(),
            ));
        };
        let mut body = Vec::new();
        body.extend_from_slice(&32u32.to_le_bytes());
        body.extend_from_slice(&3u32.to_le_bytes()); // read and write
        for v in [offset, map.iova, map.size] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        self.call(Command::DmaMap, &body, &[fd], 32).map(drop)
    }

    fn dma_unmap(&mut self, iova: u64, size: u64) -> Result<(), Error> {
        let mut body = Vec::new();
        body.extend_from_slice(&24u32.to_le_bytes());
        body.extend_from_slice(&0u32.to_le_bytes());
        for v in [iova, size] {
            body.extend_from_slice(&v.to_le_bytes());
        }
        self.call(Command::DmaUnmap, &body, &[], 24).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sparse_cap(next: u32, areas: &[(u64, u64)]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(CAP_SPARSE_MMAP as u16).to_le_bytes());
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&next.to_le_bytes());
        b.extend_from_slice(&(areas.len() as u32).to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        for (o, l) in areas {
            b.extend_from_slice(&o.to_le_bytes());
            b.extend_from_slice(&l.to_le_bytes());
        }
        b
    }

    #[test]
    fn sparse_areas_are_read_from_the_capability_chain() {
        let caps = sparse_cap(0, &[(0, 0x1000), (0x3000, 0x1000)]);
        assert_eq!(parse_sparse_areas(&caps, 32, 0x4000).unwrap(), [(0, 0x1000), (0x3000, 0x1000)]);
    }

    #[test]
    fn malformed_capability_chains_are_refused() {
        // An area past the region, a count past the data, a chain pointing back at itself, an
        // offset before the capabilities.
        assert!(parse_sparse_areas(&sparse_cap(0, &[(0x3000, 0x2000)]), 32, 0x4000).is_err());
        let mut short = sparse_cap(0, &[(0, 0x1000)]);
        short[8] = 200;
        assert!(parse_sparse_areas(&short, 32, 0x4000).is_err());
        assert!(parse_sparse_areas(&sparse_cap(32, &[]), 32, 0x4000).is_err());
        assert!(parse_sparse_areas(&sparse_cap(0, &[]), 8, 0x4000).is_err());
        assert!(parse_sparse_areas(&[], 0, 0x4000).unwrap().is_empty());
    }

    #[test]
    fn replies_must_answer_the_request_and_fit() {
        let reply = |id, command, size, flags| Header { message_id: id, command, message_size: size, flags, error: 0 };
        assert_eq!(check_reply(&reply(7, 9, 16 + 20, FLAG_REPLY), 7, 9, 20).unwrap(), 20);
        assert!(check_reply(&reply(8, 9, 16, FLAG_REPLY), 7, 9, 20).is_err(), "another message's reply");
        assert!(check_reply(&reply(7, 10, 16, FLAG_REPLY), 7, 9, 20).is_err(), "another command");
        assert!(check_reply(&reply(7, 9, 16, 0), 7, 9, 20).is_err(), "a command, not a reply");
        assert!(check_reply(&reply(7, 9, 8, FLAG_REPLY), 7, 9, 20).is_err(), "shorter than a header");
        assert!(check_reply(&reply(7, 9, u32::MAX, FLAG_REPLY), 7, 9, 20).is_err(), "longer than asked");
    }

    #[test]
    fn a_socket_that_is_not_vfio_user_is_named_as_such() {
        let dir = std::env::temp_dir().join(format!("fv-vfio-user-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join("echo.sock");
        let _ = std::fs::remove_file(&path);
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            let _ = s.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n");
            let mut sink = [0u8; 256];
            let _ = s.read(&mut sink);
        });
        let err = UserDevice::connect(&path).err().expect("an HTTP server is no vfio-user server").to_string();
        assert!(err.contains("does not speak vfio-user"), "{err}");
        server.join().unwrap();
        let missing = UserDevice::connect(&dir.join("missing.sock")).err().unwrap().to_string();
        assert!(missing.contains("is its device server running?"), "{missing}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
