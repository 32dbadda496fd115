//! `PUT /ferrovisor/fs/{tag}`: directories shared through virtio-fs, served by vhost-user
//! back-ends such as virtiofsd.

use std::path::PathBuf;

use api::models;

use super::{Resources, put_by_id};
use crate::config::{FsConfig, VhostUserOptions};

pub fn put(r: &mut Resources, f: models::FsDevice) -> Result<(), String> {
    fs_config(&f)?;
    put_by_id(&mut r.fs, f, |a, b| a.tag == b.tag);
    Ok(())
}

/// The share in the VMM's terms; each error names the field.
pub fn fs_config(f: &models::FsDevice) -> Result<FsConfig, String> {
    FsConfig::check_tag(&f.tag)?;
    let mut parsed = Some(VhostUserOptions::new(PathBuf::from(&f.socket)));
    let what = format!("fs {}:", f.tag);
    if let Some(n) = f.num_queues {
        VhostUserOptions::parse_key(&mut parsed, &what, "num_queues", &n.to_string())?;
    }
    if let Some(n) = f.queue_size {
        VhostUserOptions::parse_key(&mut parsed, &what, "queue_size", &n.to_string())?;
    }
    if f.socket.is_empty() {
        return Err(format!("fs {}: socket is empty; give the path where virtiofsd listens.", f.tag));
    }
    let vhost_user = parsed.unwrap_or_else(|| VhostUserOptions::new(PathBuf::from(&f.socket)));
    Ok(FsConfig { tag: f.tag.clone(), vhost_user })
}

/// A command-line VM's share in the API's terms.
pub fn fs_device_of(f: &FsConfig) -> models::FsDevice {
    models::FsDevice {
        tag: f.tag.clone(),
        socket: f.vhost_user.socket.display().to_string(),
        num_queues: Some(f.vhost_user.num_queues),
        queue_size: Some(f.vhost_user.queue_size),
    }
}
