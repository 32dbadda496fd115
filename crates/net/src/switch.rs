//! A user-space L2 switch on a Unix socket, and the port a VMM plugs into it: no root, no TAP.
//!
//! Each port is a SOCK_SEQPACKET connection; its first message is `PORT vlan=<n>`, every later
//! message one Ethernet frame. The switch learns source MACs per VLAN, forwards known unicast to
//! its port and floods the rest, only ever within the ingress port's VLAN.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;

const MAX_FRAME: usize = 65536;
const HELLO: &str = "PORT vlan=";
const MAX_PORTS: usize = 256;
const MAX_MACS: usize = 4096;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 { Err(io::Error::last_os_error()) } else { Ok(ret) }
}

fn sockaddr(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    // SAFETY: a zeroed sockaddr_un is valid; sun_path is filled below.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let bytes = path.as_os_str().as_encoded_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "socket path too long"));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = *src as libc::c_char;
    }
    Ok((addr, std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t))
}

fn seqpacket() -> io::Result<OwnedFd> {
    // SAFETY: socket(2) returns a new fd or -1.
    let fd = cvt(unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd is new and owned from here on.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn send(fd: RawFd, data: &[u8]) -> io::Result<usize> {
    // SAFETY: sending from a live slice; MSG_NOSIGNAL so a closed peer is an error, not SIGPIPE.
    let n = unsafe { libc::send(fd, data.as_ptr().cast(), data.len(), libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    // SAFETY: receiving into a live buffer of its length.
    let n = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
    if n < 0 { Err(io::Error::last_os_error()) } else { Ok(n as usize) }
}

/// A VM's port on a switch: whole frames, no virtio-net header.
pub struct SwitchPort {
    fd: OwnedFd,
}

impl SwitchPort {
    pub fn connect(path: &Path, vlan: u16) -> io::Result<SwitchPort> {
        let fd = seqpacket()?;
        let (addr, len) = sockaddr(path)?;
        // SAFETY: connecting our socket to a valid sockaddr_un of `len` bytes.
        cvt(unsafe { libc::connect(fd.as_raw_fd(), (&raw const addr).cast(), len) })?;
        send(fd.as_raw_fd(), format!("{HELLO}{vlan}").as_bytes())?;
        Ok(SwitchPort { fd })
    }

    /// Two connected ports, for a back-end in this process (the user-mode network).
    pub fn pair() -> io::Result<(SwitchPort, SwitchPort)> {
        let mut fds = [0; 2];
        // SAFETY: socketpair writes two fds into the array, which we own from then on.
        cvt(unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        })?;
        // SAFETY: both fds are fresh and owned by nothing else.
        let (a, b) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
        Ok((SwitchPort { fd: a }, SwitchPort { fd: b }))
    }

    pub fn send_frame(&self, frame: &[u8]) -> io::Result<usize> {
        send(self.fd.as_raw_fd(), frame)
    }

    pub fn recv_frame(&self, buf: &mut [u8]) -> io::Result<usize> {
        recv(self.fd.as_raw_fd(), buf)
    }

    pub fn try_clone(&self) -> io::Result<SwitchPort> {
        Ok(SwitchPort { fd: self.fd.try_clone()? })
    }
}

impl AsRawFd for SwitchPort {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

/// Frames one port moved, as the switch counts them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortCounters {
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub dropped: u64,
}

struct Port {
    /// Held so that the connection lives as long as the port.
    _fd: OwnedFd,
    /// None until the port said hello.
    vlan: Option<u16>,
    counters: PortCounters,
}

/// The switch: ports by fd, learned MACs by (MAC, VLAN).
pub struct Switch {
    listener: OwnedFd,
    ports: HashMap<RawFd, Port>,
    macs: HashMap<([u8; 6], u16), RawFd>,
}

impl Switch {
    /// Listens on `path` (a stale socket file is replaced).
    pub fn bind(path: &Path) -> io::Result<Switch> {
        let _ = std::fs::remove_file(path);
        let listener = seqpacket()?;
        let (addr, len) = sockaddr(path)?;
        // SAFETY: binding our socket to a valid sockaddr_un of `len` bytes, then listening.
        unsafe {
            cvt(libc::bind(listener.as_raw_fd(), (&raw const addr).cast(), len))?;
            cvt(libc::listen(listener.as_raw_fd(), 64))?;
        }
        Ok(Switch { listener, ports: HashMap::new(), macs: HashMap::new() })
    }

    /// Runs until `stop()` says so, logging each port's counters when it leaves.
    pub fn run(&mut self, stop: &dyn Fn() -> bool) -> io::Result<()> {
        let mut buf = vec![0u8; MAX_FRAME];
        while !stop() {
            let mut fds = vec![libc::pollfd { fd: self.listener.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
            fds.extend(self.ports.keys().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }));
            // SAFETY: poll on a live array of pollfd of its length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 200) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            for p in &fds {
                if p.revents == 0 {
                    continue;
                }
                if p.fd == self.listener.as_raw_fd() {
                    self.accept();
                } else {
                    self.port_ready(p.fd, &mut buf);
                }
            }
        }
        for fd in self.ports.keys().copied().collect::<Vec<_>>() {
            self.close(fd);
        }
        Ok(())
    }

    fn accept(&mut self) {
        // SAFETY: accept4 on our listener; returns a new fd or -1.
        let fd = unsafe {
            libc::accept4(self.listener.as_raw_fd(), std::ptr::null_mut(), std::ptr::null_mut(), libc::SOCK_CLOEXEC)
        };
        if fd < 0 {
            return;
        }
        // SAFETY: fd is new and owned from here on.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        if self.ports.len() >= MAX_PORTS {
            tracing::warn!("switch: a port was refused: {MAX_PORTS} ports are connected");
            return;
        }
        self.ports.insert(fd.as_raw_fd(), Port { _fd: fd, vlan: None, counters: PortCounters::default() });
    }

    fn close(&mut self, fd: RawFd) {
        if let Some(port) = self.ports.remove(&fd) {
            let c = port.counters;
            eprintln!(
                "switch: port vlan={} left: rx_frames={} tx_frames={} dropped={}",
                port.vlan.map_or("-".to_string(), |v| v.to_string()),
                c.rx_frames,
                c.tx_frames,
                c.dropped
            );
        }
        self.macs.retain(|_, &mut p| p != fd);
    }

    fn port_ready(&mut self, fd: RawFd, buf: &mut [u8]) {
        let n = match recv(fd, buf) {
            Ok(0) => return self.close(fd),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(_) => return self.close(fd),
        };
        let Some(port) = self.ports.get_mut(&fd) else { return };
        let Some(vlan) = port.vlan else {
            match std::str::from_utf8(&buf[..n]).ok().and_then(|s| s.strip_prefix(HELLO)).and_then(|v| v.parse().ok()) {
                Some(vlan) => {
                    port.vlan = Some(vlan);
                    eprintln!("switch: port joined vlan={vlan}");
                }
                None => self.close(fd),
            }
            return;
        };
        port.counters.rx_frames += 1;
        if n < 14 {
            port.counters.dropped += 1;
            return;
        }
        let dst: [u8; 6] = buf[0..6].try_into().expect("6 bytes");
        let src: [u8; 6] = buf[6..12].try_into().expect("6 bytes");
        if src[0] & 1 == 0 && (self.macs.len() < MAX_MACS || self.macs.contains_key(&(src, vlan))) {
            self.macs.insert((src, vlan), fd);
        }
        let targets: Vec<RawFd> = match self.macs.get(&(dst, vlan)) {
            Some(&out) if dst[0] & 1 == 0 => vec![out],
            _ => self.ports.iter().filter(|(p, port)| **p != fd && port.vlan == Some(vlan)).map(|(p, _)| *p).collect(),
        };
        for out in targets {
            if out == fd {
                continue;
            }
            let ok = send(out, &buf[..n]).is_ok();
            if let Some(port) = self.ports.get_mut(&out) {
                if ok { port.counters.tx_frames += 1 } else { port.counters.dropped += 1 }
            }
        }
    }
}
