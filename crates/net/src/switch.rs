//! A user-space L2 switch on a Unix socket, and the port a VMM plugs into it: no root, no TAP.
//!
//! Each port is a SOCK_SEQPACKET connection; its first message is `PORT vlan=<n>`, every later
//! message one Ethernet frame. The switch learns source MACs per VLAN, forwards known unicast to
//! its port and floods the rest, only ever within the ingress port's VLAN.
//!
//! Port security: a port may hold at most MACS_PER_PORT source MACs (frames from more are
//! dropped), may not send from a MAC that another port holds (no stealing a neighbour's
//! traffic), and learned MACs age out after MAC_AGE of silence, or, in sticky mode, stay with
//! their port until it leaves.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::Path;
use std::time::{Duration, Instant};

const MAX_FRAME: usize = 65536;
const HELLO: &str = "PORT vlan=";
const MAX_PORTS: usize = 256;
/// Source MACs one port may hold: a VM has one per interface, a nested bridge a few.
pub const MACS_PER_PORT: usize = 8;
/// A learned MAC that sent nothing for this long is forgotten (as Linux bridges do).
pub const MAC_AGE: Duration = Duration::from_secs(300);

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
    /// Source MACs learned on this port.
    macs: usize,
}

/// Where a MAC was last seen.
struct Learned {
    port: RawFd,
    seen: Instant,
}

/// The switch: ports by fd, learned MACs by (MAC, VLAN).
pub struct Switch {
    listener: OwnedFd,
    ports: HashMap<RawFd, Port>,
    macs: HashMap<([u8; 6], u16), Learned>,
    /// Learned MACs never age and never move while their port is connected.
    sticky: bool,
    mac_age: Duration,
    last_sweep: Instant,
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
        Ok(Switch {
            listener,
            ports: HashMap::new(),
            macs: HashMap::new(),
            sticky: false,
            mac_age: MAC_AGE,
            last_sweep: Instant::now(),
        })
    }

    /// How long a silent MAC stays learned (MAC_AGE unless told).
    pub fn with_mac_age(mut self, age: Duration) -> Switch {
        self.mac_age = age;
        self
    }

    /// Sticky MACs: a MAC stays with the port that first sent from it until that port leaves.
    pub fn with_sticky_macs(mut self, sticky: bool) -> Switch {
        self.sticky = sticky;
        self
    }

    /// Forgets MACs silent for MAC_AGE (not in sticky mode).
    fn age_out(&mut self) {
        let sweep_every = self.mac_age.min(Duration::from_secs(1));
        if self.sticky || self.last_sweep.elapsed() < sweep_every {
            return;
        }
        self.last_sweep = Instant::now();
        let (ports, age) = (&mut self.ports, self.mac_age);
        self.macs.retain(|_, learned| {
            let keep = learned.seen.elapsed() < age;
            if !keep && let Some(port) = ports.get_mut(&learned.port) {
                port.macs -= 1;
            }
            keep
        });
    }

    /// Learns `src` on `port`; false when the frame must be dropped: the MAC is held by
    /// another port, or this port holds as many MACs as it may.
    fn learn(&mut self, src: [u8; 6], vlan: u16, port: RawFd) -> bool {
        let now = Instant::now();
        match self.macs.get_mut(&(src, vlan)) {
            Some(learned) if learned.port == port => {
                learned.seen = now;
                return true;
            }
            Some(learned) if self.sticky || learned.seen.elapsed() < self.mac_age => {
                devices::guest_fault!(
                    "switch: a port sent from {}, which another port holds; the frame was dropped",
                    crate::dhcp::mac_text(&src)
                );
                return false;
            }
            // Held by a port that went silent long ago: it may move.
            Some(learned) => {
                let previous = learned.port;
                if let Some(p) = self.ports.get_mut(&previous) {
                    p.macs -= 1;
                }
            }
            None => {}
        }
        let Some(p) = self.ports.get_mut(&port) else { return false };
        if p.macs >= MACS_PER_PORT {
            self.macs.remove(&(src, vlan));
            devices::guest_fault!(
                "switch: a port sent from a {}th source MAC ({}); the frame was dropped",
                MACS_PER_PORT + 1,
                crate::dhcp::mac_text(&src)
            );
            return false;
        }
        p.macs += 1;
        self.macs.insert((src, vlan), Learned { port, seen: now });
        true
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
            self.age_out();
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
        self.ports.insert(fd.as_raw_fd(), Port { _fd: fd, vlan: None, counters: PortCounters::default(), macs: 0 });
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
        self.macs.retain(|_, learned| learned.port != fd);
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
        for out in self.targets(fd, vlan, &buf[..n]) {
            let ok = send(out, &buf[..n]).is_ok();
            if let Some(port) = self.ports.get_mut(&out) {
                if ok { port.counters.tx_frames += 1 } else { port.counters.dropped += 1 }
            }
        }
    }

    /// Where `frame`, from port `fd` on `vlan`, goes: learns its source first; none when it is
    /// dropped. Pure switching logic, no I/O.
    fn targets(&mut self, fd: RawFd, vlan: u16, frame: &[u8]) -> Vec<RawFd> {
        let (Some(dst), Some(src)) = (frame.get(0..6), frame.get(6..12)) else { return self.drop_from(fd) };
        if frame.len() < 14 {
            return self.drop_from(fd);
        }
        let (dst, src): ([u8; 6], [u8; 6]) = (dst.try_into().expect("6 bytes"), src.try_into().expect("6 bytes"));
        // A multicast source is no station's address.
        if src[0] & 1 != 0 || !self.learn(src, vlan, fd) {
            return self.drop_from(fd);
        }
        match self.macs.get(&(dst, vlan)) {
            Some(learned) if dst[0] & 1 == 0 => vec![learned.port].into_iter().filter(|p| *p != fd).collect(),
            _ => self.ports.iter().filter(|(p, port)| **p != fd && port.vlan == Some(vlan)).map(|(p, _)| *p).collect(),
        }
    }

    fn drop_from(&mut self, fd: RawFd) -> Vec<RawFd> {
        if let Some(port) = self.ports.get_mut(&fd) {
            port.counters.dropped += 1;
        }
        Vec::new()
    }
}

/// Frames from the fuzzer through the switching logic of a switch with four ports on two
/// VLANs: each frame is a port byte, a length byte and that many bytes of frame.
#[doc(hidden)]
pub fn fuzz_frames(data: &[u8]) {
    let Ok(listener) = seqpacket() else { return };
    let mut switch = Switch {
        listener,
        ports: HashMap::new(),
        macs: HashMap::new(),
        sticky: data.first().is_some_and(|b| b & 1 != 0),
        mac_age: MAC_AGE,
        last_sweep: Instant::now(),
    };
    let mut fds = Vec::new();
    for vlan in [1u16, 1, 2, 2] {
        let Ok(fd) = seqpacket() else { return };
        fds.push((fd.as_raw_fd(), vlan));
        switch
            .ports
            .insert(fd.as_raw_fd(), Port { _fd: fd, vlan: Some(vlan), counters: PortCounters::default(), macs: 0 });
    }
    let mut rest = data.get(1..).unwrap_or_default();
    while let [port, len, tail @ ..] = rest {
        let len = usize::from(*len).min(tail.len());
        let (fd, vlan) = fds[usize::from(*port) % fds.len()];
        for out in switch.targets(fd, vlan, &tail[..len]) {
            assert_ne!(out, fd, "a frame never goes back out of its port");
            assert_eq!(switch.ports[&out].vlan, Some(vlan), "a frame never leaves its VLAN");
        }
        assert!(switch.macs.len() <= fds.len() * MACS_PER_PORT);
        rest = &tail[len..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Running {
        path: std::path::PathBuf,
        stop: Arc<AtomicBool>,
        thread: Option<std::thread::JoinHandle<()>>,
    }

    impl Drop for Running {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            if let Some(t) = self.thread.take() {
                let _ = t.join();
            }
            let _ = std::fs::remove_file(&self.path);
        }
    }

    fn start(name: &str, configure: impl FnOnce(Switch) -> Switch + Send + 'static) -> Running {
        let path = std::env::temp_dir().join(format!("fv-switch-{name}-{}.sock", std::process::id()));
        let switch = configure(Switch::bind(&path).unwrap());
        let stop = Arc::new(AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut switch = switch;
            switch.run(&|| stopped.load(Ordering::SeqCst)).unwrap();
        });
        Running { path, stop, thread: Some(thread) }
    }

    fn port(switch: &Running) -> SwitchPort {
        let port = SwitchPort::connect(&switch.path, 0).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        port
    }

    fn frame(dst: [u8; 6], src: [u8; 6]) -> Vec<u8> {
        [&dst[..], &src[..], &[0x88, 0xb5], &[0u8; 46][..]].concat()
    }

    const BROADCAST: [u8; 6] = [0xff; 6];

    /// Lets the switch take what was sent before anything else is.
    fn settle() {
        std::thread::sleep(Duration::from_millis(40));
    }

    fn mac(n: u8) -> [u8; 6] {
        [0x02, 0, 0, 0, 0, n]
    }

    /// The frames `port` received in the next 100 ms, by destination.
    fn received(port: &SwitchPort) -> Vec<[u8; 6]> {
        std::thread::sleep(Duration::from_millis(100));
        let mut buf = [0u8; 2048];
        let mut dsts = Vec::new();
        while let Ok(n) = port.recv_frame(&mut buf) {
            if n >= 12 {
                dsts.push(buf[0..6].try_into().unwrap());
            }
        }
        dsts
    }

    #[test]
    fn a_port_cannot_take_a_mac_another_port_holds() {
        let switch = start("spoof", |s| s);
        let (a, b, c) = (port(&switch), port(&switch), port(&switch));
        // Frames from different ports reach the switch in no set order: one at a time.
        a.send_frame(&frame(BROADCAST, mac(1))).unwrap();
        settle();
        b.send_frame(&frame(BROADCAST, mac(2))).unwrap();
        settle();
        // C claims B's address; before port security this moved B's traffic to C.
        c.send_frame(&frame(BROADCAST, mac(2))).unwrap();
        settle();
        let _ = (received(&a), received(&b), received(&c));
        a.send_frame(&frame(mac(2), mac(1))).unwrap();
        assert_eq!(received(&b), [mac(2)], "B still gets its traffic");
        assert!(received(&c).is_empty(), "C gets none of B's traffic");
    }

    #[test]
    fn a_port_with_too_many_source_macs_cannot_fill_the_table() {
        let switch = start("flood", |s| s);
        let (a, d) = (port(&switch), port(&switch));
        for n in 0..200u8 {
            d.send_frame(&frame(BROADCAST, [0x02, 0xdd, 0, 0, 0, n])).unwrap();
        }
        assert_eq!(received(&a).len(), MACS_PER_PORT, "frames from MACs past the limit are dropped");
        // A newcomer is still learned: its traffic is not flooded to the port that flooded.
        let e = port(&switch);
        e.send_frame(&frame(BROADCAST, mac(5))).unwrap();
        settle();
        let _ = (received(&a), received(&d), received(&e));
        a.send_frame(&frame(mac(5), mac(1))).unwrap();
        assert_eq!(received(&e), [mac(5)]);
        assert!(received(&d).is_empty());
    }

    #[test]
    fn silent_macs_age_out_unless_sticky() {
        for sticky in [false, true] {
            let switch = start(if sticky { "sticky" } else { "age" }, move |s| {
                s.with_mac_age(Duration::from_millis(400)).with_sticky_macs(sticky)
            });
            let (a, b, c) = (port(&switch), port(&switch), port(&switch));
            b.send_frame(&frame(BROADCAST, mac(2))).unwrap();
            std::thread::sleep(Duration::from_millis(900));
            // B fell silent: its MAC may move to C, unless MACs are sticky.
            c.send_frame(&frame(BROADCAST, mac(2))).unwrap();
            settle();
            a.send_frame(&frame(mac(2), mac(1))).unwrap();
            let to = |p: &SwitchPort| received(p).iter().filter(|d| **d == mac(2)).count();
            let (to_b, to_c) = (to(&b), to(&c));
            if sticky {
                assert_eq!((to_b, to_c), (1, 0), "sticky: the MAC stays with B");
            } else {
                assert_eq!((to_b, to_c), (0, 1), "aged: the MAC moved to C");
            }
        }
    }
}
