//! Ferrovisor's devices as vhost-user back-ends: each in a process of its own, under its own
//! seccomp filter, serving one front-end at a time and the next one after it goes.

pub mod blk;
mod memory;
pub mod net;

use std::os::fd::RawFd;
use std::path::Path;

use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;

/// Serves `backend` at `socket`, one front-end after another, until a serve fails. The
/// back-end's `host_fds` (a TAP) are waited on too, edge-triggered, as events from
/// `first_host_event` on.
pub fn serve<T>(name: &str, socket: &Path, backend: T, host_fds: &[RawFd], first_host_event: u16) -> Result<(), String>
where
    T: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    T::Vring: Clone + Send + Sync,
{
    loop {
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
        tracing::info!("{name}: waiting for a front-end at {}", socket.display());
        match daemon.serve(socket) {
            Ok(()) => tracing::info!("{name}: the front-end went; waiting for the next"),
            Err(e) => tracing::warn!("{name}: the front-end's connection ended ({e}); waiting for the next"),
        }
    }
}
