//! `PUT /vsock`: the virtio-vsock device and its host socket.

use std::path::{Path, PathBuf};

use api::models;

use super::Resources;
use crate::config::VsockConfig;

pub fn put(r: &mut Resources, v: models::Vsock) -> Result<(), String> {
    // 0 is accepted as Firecracker accepts it (firecracker-containerd sends it); 1 and 2 name
    // the local host and the host.
    if v.guest_cid == 1 || v.guest_cid == 2 {
        return Err(format!("vsock guest_cid {} is reserved; use 3 or more.", v.guest_cid));
    }
    crate::config::paths::socket_to_create(Path::new(&v.uds_path), "vsock uds_path ")?;
    r.vsock = Some(v);
    Ok(())
}

pub fn config(v: &models::Vsock) -> VsockConfig {
    VsockConfig { cid: u64::from(v.guest_cid), uds: PathBuf::from(&v.uds_path) }
}

/// A command-line VM's vsock device in the API's terms.
pub fn vsock_of(v: &VsockConfig) -> models::Vsock {
    models::Vsock { guest_cid: v.cid as u32, uds_path: v.uds.display().to_string(), vsock_id: None }
}
