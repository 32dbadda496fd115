//! `PUT` and `PATCH /drives/{id}`: virtio-blk disks.

use std::path::{Path, PathBuf};

use api::models;

use super::{Resources, Running, must_exist, put_by_id, rate_limit};
use crate::config::{DiskConfig, VhostUserOptions};
use crate::virtio_devices::DeviceChange;

pub fn put(r: &mut Resources, d: models::Drive) -> Result<(), String> {
    match (&d.path_on_host, &d.socket) {
        (Some(_), Some(_)) => {
            return Err(format!("drive {}: give path_on_host or socket (vhost-user), not both.", d.drive_id));
        }
        (None, None) => {
            return Err(format!(
                "drive {}: path_on_host is missing; give the disk image's path (or a vhost-user socket).",
                d.drive_id
            ));
        }
        (Some(path), None) => {
            must_exist(&format!("drive {}", d.drive_id), "path_on_host", path)?;
            sandbox::files::check_drive(Path::new(path), &format!("drive {}: path_on_host", d.drive_id))?;
        }
        (None, Some(socket)) => must_exist(&format!("drive {}", d.drive_id), "socket", socket)?,
    }
    if d.drive_id.is_empty() || d.drive_id.len() > 20 {
        return Err("drive_id must be 1 to 20 bytes (it is the disk's serial); shorten it.".into());
    }
    if d.io_engine.as_deref().is_some_and(|e| e != "Sync" && e != "Async") {
        return Err(format!("drive {}: io_engine is Sync or Async.", d.drive_id));
    }
    if d.cache_type.as_deref().is_some_and(|c| c != "Unsafe" && c != "Writeback") {
        return Err(format!("drive {}: cache_type is Unsafe or Writeback.", d.drive_id));
    }
    rate_limit(&format!("drive {}", d.drive_id), &d.rate_limiter)?;
    if d.is_root_device && r.drives.iter().any(|o| o.is_root_device && o.drive_id != d.drive_id) {
        return Err(format!("drive {}: another drive is already the root device; only one can be.", d.drive_id));
    }
    put_by_id(&mut r.drives, d, |a, b| a.drive_id == b.drive_id);
    Ok(())
}

pub fn disk_config(d: &models::Drive) -> Result<DiskConfig, String> {
    Ok(DiskConfig {
        path: PathBuf::from(d.path_on_host.as_deref().unwrap_or_default()),
        readonly: d.is_read_only,
        id: d.drive_id.clone(),
        rate_limit: rate_limit(&format!("drive {}", d.drive_id), &d.rate_limiter)?,
        poll_us: None,
        cache: virtio::blk::CacheMode::Writeback,
        io_engine: match d.io_engine.as_deref() {
            Some("Async") => virtio::blk::IoEngine::Async,
            _ => virtio::blk::IoEngine::Sync,
        },
        vhost_user: d.socket.as_ref().map(|s| VhostUserOptions::new(PathBuf::from(s))),
    })
}

/// A command-line VM's disk in the API's terms.
pub fn drive_of(d: &DiskConfig) -> models::Drive {
    models::Drive {
        drive_id: d.id.clone(),
        is_root_device: false,
        path_on_host: d.vhost_user.is_none().then(|| d.path.display().to_string()),
        is_read_only: d.readonly,
        partuuid: None,
        cache_type: None,
        io_engine: (d.io_engine == virtio::blk::IoEngine::Async).then(|| "Async".into()),
        rate_limiter: None,
        socket: d.vhost_user.as_ref().map(|v| v.socket.display().to_string()),
    }
}

/// `PATCH /drives/{id}` on a running VM: a new rate limiter, a new backing file, or both.
pub fn patch(running: &mut Running, r: &mut Resources, d: models::PartialDrive) -> Result<(), String> {
    let (vm, config) = running;
    let Some(disk) = config.disks.iter_mut().find(|o| o.id == d.drive_id) else {
        return Err(format!("There is no drive {}; PATCH an existing drive_id.", d.drive_id));
    };
    let limit = rate_limit(&format!("drive {}", d.drive_id), &d.rate_limiter)?;
    if d.rate_limiter.is_some() {
        vm.update_disk(&d.drive_id, DeviceChange::RateLimit(limit))
            .map_err(|e| format!("drive {}: the rate limiter cannot change ({e}).", d.drive_id))?;
        disk.rate_limit = limit;
    }
    let Some(path) = d.path_on_host.filter(|p| Path::new(p) != disk.path) else { return Ok(()) };
    if disk.vhost_user.is_some() {
        return Err(format!("drive {}: a vhost-user drive has no path_on_host to change.", d.drive_id));
    }
    sandbox::files::check_drive(Path::new(&path), &format!("drive {}: path_on_host", d.drive_id))?;
    vm.update_disk(&d.drive_id, DeviceChange::Backing(Path::new(&path))).map_err(|e| {
        format!("drive {}: the new path_on_host cannot be used ({e}); give a readable disk image.", d.drive_id)
    })?;
    disk.path = PathBuf::from(&path);
    if let Some(drive) = r.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
        drive.path_on_host = Some(path);
    }
    Ok(())
}
