//! Ferrovisor's devices as vhost-user back-ends: each in a process of its own, under its own
//! seccomp filter, serving one front-end at a time and the next one after it goes.

pub mod blk;
mod memory;
pub mod net;
mod relay;

use std::os::fd::RawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::path::Path;

use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

/// Serves `backend` at `socket`, one front-end after another, until the socket fails. The
/// back-end's `host_fds` (a TAP) are waited on too, edge-triggered, as events from
/// `first_host_event` on. Each front-end talks to the request handler through the relay.
pub fn serve<T>(name: &str, socket: &Path, backend: T, host_fds: &[RawFd], first_host_event: u16) -> Result<(), String>
where
    T: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    T::Vring: Clone + Send + Sync,
{
    let _ = std::fs::remove_file(socket);
    let public = UnixListener::bind(socket).map_err(|e| format!("cannot listen at {} ({e})", socket.display()))?;
    for connection in 0u64.. {
        tracing::info!("{name}: waiting for a front-end at {}", socket.display());
        let (front, _) = public.accept().map_err(|e| format!("cannot accept a front-end ({e})"))?;
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new(name.into(), backend.clone(), mem)
            .map_err(|e| format!("the {name} back-end cannot start ({e})"))?;
        let handlers = daemon.get_epoll_handlers();
        for (i, &fd) in host_fds.iter().enumerate() {
            let handler = handlers.first().ok_or_else(|| format!("the {name} back-end has no worker"))?;
            let event = u64::from(first_host_event) + i as u64;
            handler
                .register_listener(fd, EventSet::IN | EventSet::EDGE_TRIGGERED, event)
                .map_err(|e| format!("the {name} back-end cannot wait on its host side ({e})"))?;
        }
        // The handler takes its side of the relay from a listener of its own, which only this
        // process can reach (an abstract socket).
        let inner = format!("ferrovisor-{name}-{}-{connection}", std::process::id());
        let address = SocketAddr::from_abstract_name(inner.as_bytes()).map_err(|e| e.to_string())?;
        let listener = UnixListener::bind_addr(&address).map_err(|e| format!("cannot start the relay ({e})"))?;
        let back = UnixStream::connect_addr(&address).map_err(|e| format!("cannot start the relay ({e})"))?;
        daemon
            .start(&mut vhost::vhost_user::Listener::from(listener))
            .map_err(|e| format!("the {name} back-end cannot start ({e})"))?;
        let relay = std::thread::Builder::new()
            .name(format!("{name}-relay"))
            .spawn(move || relay::run(front, back))
            .map_err(|e| format!("cannot start the relay ({e})"))?;
        match daemon.wait() {
            Ok(())
            | Err(vhost_user_backend::Error::HandleRequest(
                vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
            )) => tracing::info!("{name}: the front-end went; waiting for the next"),
            Err(e) => tracing::warn!("{name}: the front-end's connection ended ({e}); waiting for the next"),
        }
        // Dropping the daemon stops its workers.
        drop(daemon);
        let _ = relay.join();
    }
    Ok(())
}

/// The relay's reading of a front-end's messages, for the fuzzer: `data` is all a front-end
/// says; what reaches the request handler's side is read and dropped.
#[doc(hidden)]
pub fn fuzz_relay(data: &[u8]) {
    use std::io::{Read, Write};
    let (Ok((mut frontend, front)), Ok((back, mut handler))) = (UnixStream::pair(), UnixStream::pair()) else {
        return;
    };
    let _ = frontend.set_nonblocking(true);
    let _ = frontend.write_all(&data[..data.len().min(64 << 10)]);
    let _ = frontend.shutdown(std::net::Shutdown::Write);
    let drain = std::thread::spawn(move || {
        let mut sink = [0u8; 4096];
        while matches!(handler.read(&mut sink), Ok(n) if n > 0) {}
    });
    relay::run(front, back);
    let _ = drain.join();
}

/// Interrupts the front-end through `call`, a copy of a queue's call eventfd (the queue itself
/// stays borrowed while a back-end polls it).
fn interrupt(call: Option<&vmm_sys_util::event::EventNotifier>) {
    if let Some(call) = call
        && let Err(e) = call.notify()
    {
        tracing::warn!("vhost-user: the front-end cannot be interrupted ({e})");
    }
}
