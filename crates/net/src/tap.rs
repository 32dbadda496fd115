//! TAP devices: the host end of a VM's virtio-net, exchanging frames with virtio-net headers.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
const IFF_MULTI_QUEUE: libc::c_short = 0x0100;
const IFF_ATTACH_QUEUE: libc::c_short = 0x0200;
const IFF_DETACH_QUEUE: libc::c_short = 0x0400;
// _IOW('T', n, int)
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETQUEUE: libc::c_ulong = 0x4004_54d9;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// The kernel may hand over packets whose checksum the receiver completes.
pub const TUN_F_CSUM: u32 = 0x01;

/// struct ifreq, as far as the TUN and interface-flag ioctls use it.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("TAP name '{0}' is empty or longer than 15 bytes")]
    Name(String),
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(io::Error),
    #[error(
        "cannot create or attach TAP device {name}: permission denied; run as root, give ferrovisor CAP_NET_ADMIN, or create it for your user first (ip tuntap add {name} mode tap user $USER)"
    )]
    Permission { name: String },
    #[error("cannot create or attach TAP device {name}: {source}")]
    Attach { name: String, source: io::Error },
    #[error("TAP device {name} refused virtio-net headers: {source}")]
    VnetHeader { name: String, source: io::Error },
}

/// An open TAP device, non-blocking, that reads and writes frames prefixed by a virtio-net
/// header of `vnet_hdr_len` bytes.
pub struct Tap {
    file: File,
    name: String,
}

/// Every TAP queue a device of this process holds open, by TAP name (the queue leaves the list
/// when it is dropped, so that the list never keeps a TAP attached).
static OPENED: std::sync::Mutex<Vec<(String, RawFd)>> = std::sync::Mutex::new(Vec::new());
/// TAP queues another process handed over, by name, until a device opens them.
static INHERITED: std::sync::Mutex<Vec<(String, Vec<File>)>> = std::sync::Mutex::new(Vec::new());

/// The TAP queues this process holds, by name: what a local migration hands to the next VMM.
pub fn opened() -> Vec<(String, Vec<std::os::fd::RawFd>)> {
    let opened = OPENED.lock().unwrap_or_else(|p| p.into_inner());
    let mut by_name: Vec<(String, Vec<std::os::fd::RawFd>)> = Vec::new();
    for (name, fd) in opened.iter() {
        match by_name.iter_mut().find(|(n, _)| n == name) {
            Some((_, fds)) => fds.push(*fd),
            None => by_name.push((name.clone(), vec![*fd])),
        }
    }
    by_name
}

/// Queues of TAP `name` that another process handed over: the next open of `name` takes them.
pub fn inherit(name: &str, files: Vec<File>) {
    INHERITED.lock().unwrap_or_else(|p| p.into_inner()).push((name.into(), files));
}

fn take_inherited(name: &str) -> Option<Vec<File>> {
    let mut inherited = INHERITED.lock().unwrap_or_else(|p| p.into_inner());
    let index = inherited.iter().position(|(n, _)| n == name)?;
    Some(inherited.remove(index).1)
}

fn name_bytes(name: &str) -> Result<[u8; libc::IFNAMSIZ], TapError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains('\0') {
        return Err(TapError::Name(name.into()));
    }
    let mut bytes = [0u8; libc::IFNAMSIZ];
    bytes[..name.len()].copy_from_slice(name.as_bytes());
    Ok(bytes)
}

impl Tap {
    /// Attaches to TAP `name`, creating it if absent (a TAP the VMM creates disappears with
    /// it), with virtio-net headers of `vnet_hdr_len` bytes, and brings its link up.
    pub fn open(name: &str, vnet_hdr_len: i32) -> Result<Tap, TapError> {
        Tap::open_with(name, vnet_hdr_len, 0)
    }

    /// Up to `queues` queues of TAP `name` (IFF_MULTI_QUEUE), each its own fd, all attached.
    /// A TAP that exists without multi-queue support gives one queue, and says so. Queues that
    /// another process handed over ([`inherit`]) are taken first, as they are.
    pub fn open_queues(name: &str, vnet_hdr_len: i32, queues: usize) -> Result<Vec<Tap>, TapError> {
        if let Some(files) = take_inherited(name) {
            tracing::info!("TAP {name}: {} queue(s) handed over by the VMM before this one", files.len());
            let taps: Vec<Tap> = files.into_iter().map(|file| Tap { file, name: name.into() }).collect();
            for tap in &taps {
                tap.remember();
            }
            return Ok(taps);
        }
        let taps = Self::open_new_queues(name, vnet_hdr_len, queues)?;
        for tap in &taps {
            tap.remember();
        }
        Ok(taps)
    }

    /// Lists this queue, to hand over in a local migration ([`opened`]), until it is dropped.
    fn remember(&self) {
        OPENED.lock().unwrap_or_else(|p| p.into_inner()).push((self.name.clone(), self.file.as_raw_fd()));
    }

    fn open_new_queues(name: &str, vnet_hdr_len: i32, queues: usize) -> Result<Vec<Tap>, TapError> {
        let refused =
            |e: &TapError| matches!(e, TapError::Attach { source, .. } if source.raw_os_error() == Some(libc::EINVAL));
        if queues <= 1 {
            // A TAP made with multi_queue takes only multi-queue opens: one queue of it, then.
            return match Tap::open(name, vnet_hdr_len) {
                Err(e) if refused(&e) => Ok(vec![Tap::open_with(name, vnet_hdr_len, IFF_MULTI_QUEUE)?]),
                other => Ok(vec![other?]),
            };
        }
        let first = match Tap::open_with(name, vnet_hdr_len, IFF_MULTI_QUEUE) {
            Ok(tap) => tap,
            Err(e) if refused(&e) => {
                tracing::info!(
                    "TAP device {name} was created without multi-queue support: it gets one queue pair \
                     (create it with `ip tuntap add {name} mode tap multi_queue` for {queues})"
                );
                return Ok(vec![Tap::open(name, vnet_hdr_len)?]);
            }
            Err(e) => return Err(e),
        };
        let mut taps = vec![first];
        for _ in 1..queues {
            taps.push(Tap::open_with(name, vnet_hdr_len, IFF_MULTI_QUEUE)?);
        }
        Ok(taps)
    }

    fn open_with(name: &str, vnet_hdr_len: i32, extra_flags: libc::c_short) -> Result<Tap, TapError> {
        let ifname = name_bytes(name)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | extra_flags;
        let mut req = IfReq { name: ifname, flags, _pad: [0; 22] };
        // SAFETY: TUNSETIFF reads and writes an ifreq, which `req` is laid out as.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            let source = io::Error::last_os_error();
            return Err(match source.raw_os_error() {
                Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission { name: name.into() },
                _ => TapError::Attach { name: name.into(), source },
            });
        }
        // SAFETY: TUNSETVNETHDRSZ reads an int from the pointer.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ, &vnet_hdr_len) } < 0 {
            return Err(TapError::VnetHeader { name: name.into(), source: io::Error::last_os_error() });
        }
        let tap = Tap { file, name: name.into() };
        if let Err(e) = tap.set_link_up() {
            tracing::warn!("TAP device {name} stays down ({e}); bring it up with: ip link set {name} up");
        }
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the kernel which offloads the reader handles (TUN_F_* bits).
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Attaches this queue to its multi-queue TAP, or detaches it: the kernel steers received
    /// packets only to attached queues, and drops what a detached queue held.
    pub fn set_queue_attached(&self, attached: bool) -> io::Result<()> {
        let flags = if attached { IFF_ATTACH_QUEUE } else { IFF_DETACH_QUEUE };
        let mut req = IfReq { name: [0; libc::IFNAMSIZ], flags, _pad: [0; 22] };
        // SAFETY: TUNSETQUEUE reads an ifreq's flags, which `req` is laid out as.
        if unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETQUEUE, &mut req) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn set_link_up(&self) -> io::Result<()> {
        // SAFETY: a plain datagram socket, used only for interface-flag ioctls, closed below.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut req = IfReq { name: name_bytes(&self.name).expect("checked at open"), flags: 0, _pad: [0; 22] };
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write an ifreq.
        let result = unsafe {
            if libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) < 0 {
                Err(io::Error::last_os_error())
            } else {
                req.flags |= libc::IFF_UP as libc::c_short;
                if libc::ioctl(sock, libc::SIOCSIFFLAGS, &req) < 0 { Err(io::Error::last_os_error()) } else { Ok(()) }
            }
        };
        // SAFETY: closing the socket opened above.
        unsafe { libc::close(sock) };
        result
    }

    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap { file: self.file.try_clone()?, name: self.name.clone() })
    }
}

impl Drop for Tap {
    /// Off the list of open queues before the fd closes (a clone was never on it).
    fn drop(&mut self) {
        let fd = self.file.as_raw_fd();
        OPENED.lock().unwrap_or_else(|p| p.into_inner()).retain(|(_, open)| *open != fd);
    }
}

impl Read for Tap {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.file.read(buf)
    }
}

impl Write for Tap {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        assert!(matches!(name_bytes(""), Err(TapError::Name(_))));
        assert!(matches!(name_bytes("a-name-that-is-too-long"), Err(TapError::Name(_))));
        assert_eq!(&name_bytes("tap0").unwrap()[..5], b"tap0\0");
    }

    #[test]
    fn ifreq_has_the_kernels_size() {
        assert_eq!(std::mem::size_of::<IfReq>(), 40);
    }
}
