//! The DHCP server's socket: UDP port 67 on one interface, able to broadcast.

use std::net::UdpSocket;
use std::os::fd::FromRawFd;
use std::time::Duration;

fn check(rc: libc::c_int) -> std::io::Result<()> {
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// Binds 0.0.0.0:67 on `interface` only (several networks' servers share the port).
pub fn bind(interface: &str) -> std::io::Result<UdpSocket> {
    // SAFETY: socket(2) with constant arguments; the fd is owned by the UdpSocket below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    check(fd)?;
    // SAFETY: `fd` is a fresh socket nothing else owns.
    let socket = unsafe { UdpSocket::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    for option in [libc::SO_REUSEADDR, libc::SO_BROADCAST] {
        // SAFETY: setsockopt reads one c_int from a live local.
        check(unsafe {
            libc::setsockopt(fd, libc::SOL_SOCKET, option, (&raw const one).cast(), size_of::<libc::c_int>() as u32)
        })?;
    }
    // SAFETY: setsockopt reads `interface.len()` bytes of the name.
    check(unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            interface.as_ptr().cast(),
            interface.len() as libc::socklen_t,
        )
    })?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 67u16.to_be(),
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    // SAFETY: bind reads a sockaddr_in of the size given.
    check(unsafe { libc::bind(fd, (&raw const addr).cast(), size_of::<libc::sockaddr_in>() as libc::socklen_t) })?;
    // The server checks for a stop request between packets.
    socket.set_read_timeout(Some(Duration::from_millis(500)))?;
    Ok(socket)
}
