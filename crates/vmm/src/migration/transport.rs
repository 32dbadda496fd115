//! Where a migration goes: `unix:PATH`, `tcp:HOST:PORT` or `tls:HOST:PORT` (TCP with TLS, both
//! sides' certificates checked).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// How long a peer may stay silent once connected before the migration fails.
pub const PEER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Url {
    Unix(PathBuf),
    Tcp(String),
    Tls(String),
}

impl Url {
    /// Parses `field`'s value; the error names the field and the forms it takes.
    pub fn parse(field: &str, text: &str) -> Result<Url, String> {
        let bad = || format!("{field} {text:?} is not unix:PATH, tcp:HOST:PORT or tls:HOST:PORT; give one of those.");
        match text.split_once(':') {
            Some(("unix", path)) if !path.is_empty() => Ok(Url::Unix(path.into())),
            Some((scheme @ ("tcp" | "tls"), address)) => {
                let (host, port) = address.rsplit_once(':').ok_or_else(bad)?;
                if host.is_empty() || port.parse::<u16>().is_err() {
                    return Err(bad());
                }
                Ok(if scheme == "tcp" { Url::Tcp(address.into()) } else { Url::Tls(address.into()) })
            }
            _ => Err(bad()),
        }
    }

    /// The host part of a TCP or TLS address (what the destination's certificate must name).
    pub fn host(&self) -> Option<&str> {
        match self {
            Url::Unix(_) => None,
            Url::Tcp(address) | Url::Tls(address) => address.rsplit_once(':').map(|(host, _)| host),
        }
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Url::Unix(path) => write!(f, "unix:{}", path.display()),
            Url::Tcp(address) => write!(f, "tcp:{address}"),
            Url::Tls(address) => write!(f, "tls:{address}"),
        }
    }
}

/// A connected stream of either kind.
pub trait Stream: Read + Write + AsRawFd + Send {
    /// The socket, when it can carry file descriptors (a Unix socket).
    fn unix_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// Whether bytes already taken off the socket wait to be read (TLS keeps the records it
    /// decrypted), which a poll of the socket does not see.
    fn buffered_input(&mut self) -> bool {
        false
    }
}

/// Whether `stream` has something to read, waiting up to `timeout_ms` for the socket.
pub fn readable(stream: &mut dyn Stream, timeout_ms: i32) -> bool {
    if stream.buffered_input() {
        return true;
    }
    let mut polled = [libc::pollfd { fd: stream.as_raw_fd(), events: libc::POLLIN, revents: 0 }];
    // SAFETY: poll reads and writes the one entry it is given.
    unsafe { libc::poll(polled.as_mut_ptr(), 1, timeout_ms) > 0 && polled[0].revents != 0 }
}
impl Stream for UnixStream {
    fn unix_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.as_raw_fd())
    }
}
impl Stream for TcpStream {}

/// A handle that can cut `stream` off from another thread (a cancel), even mid-write.
pub fn cutter(stream: &dyn Stream) -> Option<OwnedFd> {
    // SAFETY: dup of an fd the stream owns; the copy is owned by the OwnedFd.
    let fd = unsafe { libc::dup(stream.as_raw_fd()) };
    // SAFETY: a fresh fd from dup, owned from here on.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Shuts a stream down through its [`cutter`]: the other thread's reads and writes fail.
pub fn cut(fd: &OwnedFd) {
    // SAFETY: shutdown on an fd this process owns changes only that socket.
    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
}

/// Connects the source to `url`; a `tls:` one with `tls` (the source's side of TLS).
pub fn connect(url: &Url, tls: Option<&Arc<rustls::ClientConfig>>) -> Result<Box<dyn Stream>, String> {
    let failed = |e: std::io::Error| format!("the destination {url} cannot be reached ({e})");
    match url {
        Url::Unix(path) => {
            let s = UnixStream::connect(path).map_err(failed)?;
            s.set_read_timeout(Some(PEER_TIMEOUT)).map_err(failed)?;
            s.set_write_timeout(Some(PEER_TIMEOUT)).map_err(failed)?;
            Ok(Box::new(s))
        }
        Url::Tcp(address) | Url::Tls(address) => {
            let addr = address
                .to_socket_addrs()
                .map_err(failed)?
                .next()
                .ok_or_else(|| format!("the destination {url} names no address"))?;
            let s = TcpStream::connect_timeout(&addr, PEER_TIMEOUT).map_err(failed)?;
            s.set_nodelay(true).map_err(failed)?;
            s.set_read_timeout(Some(PEER_TIMEOUT)).map_err(failed)?;
            s.set_write_timeout(Some(PEER_TIMEOUT)).map_err(failed)?;
            match (url, tls) {
                (Url::Tls(_), Some(config)) => {
                    let host = url.host().unwrap_or_default();
                    let stream = super::tls::connect(config.clone(), host, s)
                        .map_err(|e| format!("the destination {url} was refused: {e}"))?;
                    Ok(Box::new(stream))
                }
                (Url::Tls(_), None) => Err(format!("{url} needs tls_cert, tls_key and tls_ca")),
                _ => Ok(Box::new(s)),
            }
        }
    }
}

/// The destination's listening socket.
pub enum Listener {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
    Tls(TcpListener, Arc<rustls::ServerConfig>),
}

impl Listener {
    /// Listens on `url`; a Unix socket path must not exist yet. A `tls:` one needs `tls`.
    pub fn bind(url: &Url, tls: Option<Arc<rustls::ServerConfig>>) -> Result<Listener, String> {
        let failed = |e: std::io::Error| format!("receiver_url {url} cannot be listened on ({e}); name a free one");
        let listener = match (url, tls) {
            (Url::Unix(path), _) => Listener::Unix(UnixListener::bind(path).map_err(failed)?, path.clone()),
            (Url::Tcp(address), _) => Listener::Tcp(TcpListener::bind(address.as_str()).map_err(failed)?),
            (Url::Tls(address), Some(config)) => {
                Listener::Tls(TcpListener::bind(address.as_str()).map_err(failed)?, config)
            }
            (Url::Tls(_), None) => return Err(format!("receiver_url {url} needs tls_cert, tls_key and tls_ca.")),
        };
        match &listener {
            Listener::Unix(l, _) => l.set_nonblocking(true),
            Listener::Tcp(l) | Listener::Tls(l, _) => l.set_nonblocking(true),
        }
        .map_err(failed)?;
        Ok(listener)
    }

    /// Waits for the source, checking `cancelled` at least every 100 ms. A TLS peer must show a
    /// certificate the CA signed: one that does not is refused (and logged), and the
    /// destination waits on for the source it trusts.
    pub fn accept(&self, cancelled: &AtomicBool, deadline: Option<Instant>) -> Result<Box<dyn Stream>, String> {
        loop {
            if cancelled.load(Ordering::Relaxed) {
                return Err("the migration was cancelled before the source connected".into());
            }
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return Err("the source opened fewer connections than its stream said".into());
            }
            let accepted: std::io::Result<Box<dyn Stream>> = match self {
                Listener::Unix(l, _) => l.accept().and_then(|(s, _)| {
                    s.set_nonblocking(false)?;
                    s.set_read_timeout(Some(PEER_TIMEOUT))?;
                    s.set_write_timeout(Some(PEER_TIMEOUT))?;
                    Ok(Box::new(s) as Box<dyn Stream>)
                }),
                Listener::Tcp(l) => l.accept().and_then(|(s, _)| {
                    tcp_options(&s)?;
                    Ok(Box::new(s) as Box<dyn Stream>)
                }),
                Listener::Tls(l, config) => match l.accept().and_then(|(s, _)| tcp_options(&s).map(|()| s)) {
                    Ok(s) => match super::tls::accept(config.clone(), s) {
                        Ok(stream) => Ok(Box::new(stream) as Box<dyn Stream>),
                        Err(e) => {
                            tracing::warn!("migration: a source was refused ({e}); still waiting");
                            continue;
                        }
                    },
                    Err(e) => Err(e),
                },
            };
            match accepted {
                Ok(stream) => return Ok(stream),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => self.wait_readable(Duration::from_millis(100)),
                Err(e) => return Err(format!("no source could connect ({e})")),
            }
        }
    }

    /// Waits at most `limit` for a source to knock: a local migration's source pauses the VM
    /// once it has connected, so a late accept is downtime.
    fn wait_readable(&self, limit: Duration) {
        let fd = match self {
            Listener::Unix(l, _) => l.as_raw_fd(),
            Listener::Tcp(l) | Listener::Tls(l, _) => l.as_raw_fd(),
        };
        let mut waiting = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
        // SAFETY: one pollfd, valid for the call; the listener outlives it. An interrupted or
        // failed poll only makes the caller try accept again.
        unsafe { libc::poll(&mut waiting, 1, limit.as_millis() as libc::c_int) };
    }
}

/// An accepted TCP stream as the migration wants it: blocking, no delay, bounded silences.
fn tcp_options(s: &TcpStream) -> std::io::Result<()> {
    s.set_nonblocking(false)?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(PEER_TIMEOUT))?;
    s.set_write_timeout(Some(PEER_TIMEOUT))
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_unix_paths_or_tcp_addresses_and_mistakes_name_the_field() {
        assert_eq!(Url::parse("f", "unix:/run/m.sock"), Ok(Url::Unix("/run/m.sock".into())));
        assert_eq!(Url::parse("f", "tcp:127.0.0.1:4444"), Ok(Url::Tcp("127.0.0.1:4444".into())));
        assert_eq!(Url::parse("f", "tcp:[::1]:4444"), Ok(Url::Tcp("[::1]:4444".into())));
        let tls = Url::parse("f", "tls:dst.example:4444").unwrap();
        assert_eq!((tls.host(), tls.to_string().as_str()), (Some("dst.example"), "tls:dst.example:4444"));
        for bad in ["", "unix:", "tcp:host", "tcp::80", "tcp:h:99999", "http://x", "/path"] {
            let e = Url::parse("destination_url", bad).unwrap_err();
            assert!(e.starts_with("destination_url") && e.contains("unix:PATH"), "{bad}: {e}");
        }
    }
}
