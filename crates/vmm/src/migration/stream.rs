//! The migration stream: frames of a kind byte, three zero bytes, a little-endian u32 length and
//! the payload. Every kind has a size bound, checked before anything is allocated, so that a
//! hostile peer cannot make the other side allocate more than the bound.
//!
//! The source sends `Hello`, `Config`, then `Pages` (round after round), `State` and `End`; the
//! destination answers `Ack` once the VM runs there, or `Error` with a sentence.

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// Bumped whenever the stream changes; a destination refuses a version it does not know.
pub const VERSION: u32 = 2;
const MAGIC: &str = "ferrovisor-migration";
pub const PAGE: usize = 4096;
/// The most page data in one `Pages` frame.
pub const MAX_PAGES_BYTES: usize = 1 << 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Hello = 1,
    Config = 2,
    /// A guest address (u64), then whole pages from there.
    Pages = 3,
    /// A snapshot's state file (`snapshot::signed`).
    State = 4,
    End = 5,
    Ack = 6,
    /// A sentence.
    Error = 7,
    /// A local migration's handover ([`Handover`]); guest memory's file and the TAPs' queues
    /// come with it as file descriptors over the Unix socket.
    Memory = 8,
    /// Post-copy: a bitmap of the pages the source still owes (over the memory regions in
    /// order), sent with the state; the destination runs the VM without them.
    Dirty = 9,
    /// Post-copy: the state is sent, the VM may run; owed pages follow until `End`.
    Postcopy = 10,
    /// Post-copy, from the destination: the guest touched the page at this address (u64).
    Request = 11,
    /// Local migration, from the destination: the VM is built around the memory handed over
    /// but its state; the source may pause the guest.
    Ready = 12,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        Some(match byte {
            1 => Kind::Hello,
            2 => Kind::Config,
            3 => Kind::Pages,
            4 => Kind::State,
            5 => Kind::End,
            6 => Kind::Ack,
            7 => Kind::Error,
            8 => Kind::Memory,
            9 => Kind::Dirty,
            10 => Kind::Postcopy,
            11 => Kind::Request,
            12 => Kind::Ready,
            _ => return None,
        })
    }

    /// The largest payload a frame of this kind may carry.
    fn max_len(self) -> usize {
        match self {
            Kind::Hello | Kind::Error => 4096,
            Kind::Memory => 64 << 10,
            // A bit per page: 2 TiB of guest memory.
            Kind::Dirty => 64 << 20,
            Kind::Request => 8,
            Kind::Config => 1 << 20,
            Kind::Pages => 8 + MAX_PAGES_BYTES,
            Kind::State => crate::snapshot::MAX_STATE_FILE as usize,
            Kind::End | Kind::Ack | Kind::Postcopy | Kind::Ready => 0,
        }
    }
}

/// The first frame's payload.
#[derive(Serialize, Deserialize)]
pub struct Hello {
    pub magic: String,
    pub version: u32,
    pub vmm_version: String,
    /// How many connections the stream comes over: this one, then the lanes
    /// ([`super::lanes`]), each of which begins with the same hello.
    #[serde(default = "one")]
    pub connections: u32,
}

fn one() -> u32 {
    1
}

impl Hello {
    pub fn ours(connections: u32) -> Hello {
        Hello { magic: MAGIC.into(), version: VERSION, vmm_version: env!("CARGO_PKG_VERSION").into(), connections }
    }

    /// The frame that opens each connection of a stream over `connections`.
    pub fn frame(connections: u32) -> Vec<u8> {
        serde_json::to_vec(&Hello::ours(connections)).expect("strings and numbers encode")
    }

    /// Checks a peer's hello; the error says what to do.
    pub fn check(payload: &[u8]) -> Result<Hello, String> {
        let hello: Hello =
            serde_json::from_slice(payload).map_err(|_| "the peer does not speak Ferrovisor's migration stream")?;
        if hello.magic != MAGIC {
            return Err("the peer does not speak Ferrovisor's migration stream".into());
        }
        if hello.version != VERSION {
            return Err(format!(
                "the source sends stream version {} (Ferrovisor {}), and this Ferrovisor {} reads only version {VERSION}; \
                 migrate between versions that share a stream version",
                hello.version,
                hello.vmm_version,
                env!("CARGO_PKG_VERSION")
            ));
        }
        if !(1..=super::lanes::MAX_CONNECTIONS).contains(&hello.connections) {
            return Err(format!(
                "the stream asks for {} connections, where a migration uses 1 to {}",
                hello.connections,
                super::lanes::MAX_CONNECTIONS
            ));
        }
        Ok(hello)
    }
}

/// What a local migration hands over with its `Memory` frame: the file descriptors are guest
/// memory's file, then each TAP's queues in this order.
#[derive(Serialize, Deserialize)]
pub struct Handover {
    /// Each TAP's name and how many of its queues follow.
    pub taps: Vec<(String, usize)>,
}

/// The most descriptors a stream may pass (guest memory and 16 queues of 16 TAPs).
pub const MAX_FDS: usize = 1 + 16 * 16;

fn header(kind: Kind, len: usize) -> [u8; 8] {
    let mut header = [0u8; 8];
    header[0] = kind as u8;
    header[4..].copy_from_slice(&(len as u32).to_le_bytes());
    header
}

pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8]) -> std::io::Result<()> {
    debug_assert!(payload.len() <= kind.max_len());
    w.write_all(&header(kind, payload.len()))?;
    w.write_all(payload)
}

/// A frame with `fds` passed alongside over the Unix socket `socket` (the caller flushed
/// whatever was buffered before it).
pub fn write_frame_with_fds(
    socket: std::os::fd::RawFd,
    kind: Kind,
    payload: &[u8],
    fds: &[std::os::fd::RawFd],
) -> std::io::Result<()> {
    use std::os::fd::FromRawFd;
    use vmm_sys_util::sock_ctrl_msg::ScmSocket;
    let whole = [&header(kind, payload.len())[..], payload].concat();
    // SAFETY: a second handle on the caller's open socket, never closed (ManuallyDrop).
    let mut sock = std::mem::ManuallyDrop::new(unsafe { std::os::unix::net::UnixStream::from_raw_fd(socket) });
    let sent = sock.send_with_fds(&[&whole[..]], fds).map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
    sock.write_all(&whole[sent..])
}

/// A `Pages` frame for the pages at `gpa`.
pub fn write_pages(w: &mut impl Write, gpa: u64, pages: &[u8]) -> std::io::Result<()> {
    let mut header = [0u8; 16];
    header[0] = Kind::Pages as u8;
    header[4..8].copy_from_slice(&((8 + pages.len()) as u32).to_le_bytes());
    header[8..].copy_from_slice(&gpa.to_le_bytes());
    w.write_all(&header)?;
    w.write_all(pages)
}

/// Reads one frame into `buf` (reused across frames); the payload is `buf[..len]`.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Kind, String> {
    let mut header = [0u8; 8];
    r.read_exact(&mut header).map_err(|e| format!("the stream ended or failed ({e})"))?;
    read_payload(r, header, buf)
}

/// A stream's frames with the file descriptors that came alongside them over a Unix socket
/// (`unix`), which a plain read would drop; at most [`MAX_FDS`] are kept.
pub struct Frames<R> {
    r: R,
    unix: Option<std::os::fd::RawFd>,
    fds: Vec<std::os::fd::OwnedFd>,
}

impl<R: Read> Frames<R> {
    pub fn new(r: R, unix: Option<std::os::fd::RawFd>) -> Frames<R> {
        Frames { r, unix, fds: Vec::new() }
    }

    pub fn next(&mut self, buf: &mut Vec<u8>) -> Result<Kind, String> {
        let mut header = [0u8; 8];
        match self.unix {
            Some(socket) => self.receive_header(socket, &mut header)?,
            None => self.r.read_exact(&mut header).map_err(|e| format!("the stream ended or failed ({e})"))?,
        }
        read_payload(&mut self.r, header, buf)
    }

    /// The descriptors received so far, taken.
    pub fn take_fds(&mut self) -> Vec<std::os::fd::OwnedFd> {
        std::mem::take(&mut self.fds)
    }

    fn receive_header(&mut self, socket: std::os::fd::RawFd, header: &mut [u8; 8]) -> Result<(), String> {
        use std::os::fd::FromRawFd;
        use vmm_sys_util::sock_ctrl_msg::ScmSocket;
        // SAFETY: a second handle on the caller's open socket, never closed (ManuallyDrop).
        let sock = std::mem::ManuallyDrop::new(unsafe { std::os::unix::net::UnixStream::from_raw_fd(socket) });
        let mut got = 0;
        while got < header.len() {
            let mut raw = [-1; 16];
            let rest = &mut header[got..];
            let mut iov = [libc::iovec { iov_base: rest.as_mut_ptr().cast(), iov_len: rest.len() }];
            // SAFETY: the iovec points at the unread part of `header`, which outlives the call.
            let (n, count) = unsafe { sock.recv_with_fds(&mut iov, &mut raw) }
                .map_err(|e| format!("the stream ended or failed ({e})"))?;
            for &fd in &raw[..count] {
                // SAFETY: recvmsg gave this process the descriptor; it is owned once, here.
                let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
                if self.fds.len() < MAX_FDS {
                    self.fds.push(owned);
                }
            }
            if n == 0 {
                return Err("the stream ended".into());
            }
            got += n;
        }
        Ok(())
    }
}

fn read_payload(r: &mut impl Read, header: [u8; 8], buf: &mut Vec<u8>) -> Result<Kind, String> {
    let kind = Kind::from_byte(header[0]).ok_or(format!("the stream holds an unknown frame kind {}", header[0]))?;
    if header[1..4] != [0, 0, 0] {
        return Err("the stream holds a damaged frame header".into());
    }
    let len = u32::from_le_bytes(header[4..].try_into().expect("four bytes")) as usize;
    if len > kind.max_len() {
        return Err(format!("a {kind:?} frame of {len} bytes is larger than the {} allowed", kind.max_len()));
    }
    buf.clear();
    buf.resize(len, 0);
    r.read_exact(buf).map_err(|e| format!("the stream ended inside a {kind:?} frame ({e})"))?;
    Ok(kind)
}

/// The page a `Request` payload asks for (its address, aligned down).
pub fn requested_page(payload: &[u8]) -> Result<u64, String> {
    let gpa = payload
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map(u64::from_le_bytes)
        .ok_or("a Request frame has no address")?;
    Ok(gpa & !(PAGE as u64 - 1))
}

/// Splits a `Pages` payload into its guest address and whole pages.
pub fn pages(payload: &[u8]) -> Result<(u64, &[u8]), String> {
    let (gpa, data) = payload.split_at_checked(8).ok_or("a Pages frame has no address")?;
    let gpa = u64::from_le_bytes(gpa.try_into().expect("eight bytes"));
    if data.is_empty() || !data.len().is_multiple_of(PAGE) || !gpa.is_multiple_of(PAGE as u64) {
        return Err(format!("a Pages frame at {gpa:#x} is not whole, aligned pages"));
    }
    Ok((gpa, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversized_or_unknown_ones_are_refused_unread() {
        let mut out = Vec::new();
        write_frame(&mut out, Kind::Hello, &Hello::frame(3)).unwrap();
        write_pages(&mut out, 0x2000, &[7u8; 8192]).unwrap();
        write_frame(&mut out, Kind::End, &[]).unwrap();
        let mut r = out.as_slice();
        let mut buf = Vec::new();
        assert_eq!(read_frame(&mut r, &mut buf), Ok(Kind::Hello));
        assert_eq!(Hello::check(&buf).unwrap().connections, 3);
        assert_eq!(read_frame(&mut r, &mut buf), Ok(Kind::Pages));
        let (gpa, data) = pages(&buf).unwrap();
        assert_eq!((gpa, data.len()), (0x2000, 8192));
        assert_eq!(read_frame(&mut r, &mut buf), Ok(Kind::End));
        assert!(read_frame(&mut r, &mut buf).unwrap_err().contains("ended"));

        let huge = [Kind::Hello as u8, 0, 0, 0, 0xff, 0xff, 0xff, 0x7f];
        assert!(read_frame(&mut huge.as_slice(), &mut buf).unwrap_err().contains("larger than"));
        assert!(buf.capacity() < 1 << 20, "nothing was allocated for it");
        assert!(read_frame(&mut [99u8, 0, 0, 0, 0, 0, 0, 0].as_slice(), &mut buf).unwrap_err().contains("unknown"));
        assert!(pages(&[0u8; 8 + 100]).is_err());
        assert!(pages(&[1u8; 8 + 4096]).is_err(), "misaligned");
    }

    #[test]
    fn another_stream_version_is_refused_with_both_versions_named() {
        let hello = Hello { version: VERSION + 1, ..Hello::ours(1) };
        let e = Hello::check(&serde_json::to_vec(&hello).unwrap()).err().unwrap();
        assert!(e.contains(&format!("version {}", VERSION + 1)) && e.contains("reads only version"), "{e}");
        assert!(Hello::check(b"{}").is_err());
        let e = Hello::check(&Hello::frame(17)).err().unwrap();
        assert!(e.contains("17 connections, where a migration uses 1 to 16"), "{e}");
    }
}
