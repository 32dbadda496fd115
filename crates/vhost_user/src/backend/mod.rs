//! Ferrovisor's devices as vhost-user back-ends: each in a process of its own, under its own
//! seccomp filter, serving one front-end at a time and the next one after it goes.

pub mod blk;
mod memory;

use std::path::Path;

use vhost_user_backend::{VhostUserBackend, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};

/// Serves `backend` at `socket`, one front-end after another, until a serve fails.
pub fn serve<T>(name: &str, socket: &Path, backend: T) -> Result<(), String>
where
    T: VhostUserBackend<Bitmap = ()> + Clone + 'static,
    T::Vring: Clone + Send + Sync,
{
    loop {
        let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
        let mut daemon = VhostUserDaemon::new(name.into(), backend.clone(), mem)
            .map_err(|e| format!("the {name} back-end cannot start ({e})"))?;
        tracing::info!("{name}: waiting for a front-end at {}", socket.display());
        match daemon.serve(socket) {
            Ok(()) => tracing::info!("{name}: the front-end went; waiting for the next"),
            Err(e) => tracing::warn!("{name}: the front-end's connection ended ({e}); waiting for the next"),
        }
    }
}
