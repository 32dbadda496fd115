//! `PUT /snapshot/create` and `PUT /snapshot/load`: a paused VM written to files, and a VM
//! restored from them in this process, with other host ends for its devices where asked.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use api::models;
use kvm_ioctls::Kvm;

use super::{Resources, Running};
use crate::config::{HostLimits, NetAttachment, SerialConfig, VmConfig};
use crate::exit::ExitLatch;

pub fn create(running: &mut Running, kvm: &Kvm, params: &models::SnapshotCreate) -> Result<(), String> {
    for (field, path) in [("snapshot_path", &params.snapshot_path), ("mem_file_path", &params.mem_file_path)] {
        if path.is_empty() {
            return Err(format!("PUT /snapshot/create: {field} is empty; give a path."));
        }
    }
    let (vm, config) = running;
    let diff = params.snapshot_type == models::SnapshotType::Diff;
    let started = Instant::now();
    let written = vm
        .snapshot(kvm, config, Path::new(&params.snapshot_path), Path::new(&params.mem_file_path), diff)
        .map_err(|e| format!("The snapshot was not taken: {}.", e.trim_end_matches('.')))?;
    tracing::info!(
        "{} snapshot written to {} and {} in {:.1} ms ({} pages, {} MiB of memory)",
        if diff { "diff" } else { "full" },
        params.snapshot_path,
        params.mem_file_path,
        started.elapsed().as_secs_f64() * 1000.0,
        written.memory_pages,
        written.memory_bytes >> 20
    );
    Ok(())
}

/// What a restore needs of the process: KVM, its limits, when it was launched, and the latch
/// its VM reports its stop through.
pub struct Host<'a> {
    pub kvm: &'a Kvm,
    pub limits: HostLimits,
    pub launched: Instant,
    pub latch: &'a Arc<ExitLatch>,
}

/// Restores the snapshot `params` names; the VM runs or waits paused as they ask.
pub fn load(host: Host, r: &Resources, params: &models::SnapshotLoad) -> Result<Running, String> {
    if r.boot.is_some() || !r.drives.is_empty() || !r.nets.is_empty() {
        return Err(
            "PUT /snapshot/load takes the VM's configuration from the snapshot; load it before configuring anything."
                .into(),
        );
    }
    let mem_path = memory_file(params)?;
    for (field, path) in [("snapshot_path", &params.snapshot_path), ("memory backend path", &mem_path)] {
        if path.is_empty() {
            return Err(format!("PUT /snapshot/load: {field} is empty; give a path."));
        }
    }
    let started = Instant::now();
    let mut saved = crate::snapshot::Snapshot::read(Path::new(&params.snapshot_path))
        .map_err(|e| format!("The snapshot cannot be loaded: {e}."))?;
    saved
        .config
        .validate_machine(&host.limits)
        .map_err(|e| format!("The snapshot cannot be loaded: its configuration is refused: {e}"))?;
    // The new process's serial output goes to its own stdout.
    saved.config.serial = SerialConfig::Stdio;
    // MMDS answers as before the snapshot; its contents are the new process's to fill.
    if let Some(m) = saved.config.mmds {
        super::mmds::restore(m, saved.mmds_data.take())?;
    }
    saved.config.track_dirty_pages |= params.enable_diff_snapshots || params.track_dirty_pages;
    apply_overrides(&mut saved.config, &params.network_overrides, params.vsock_override.as_ref(), "snapshot")?;
    let restore = crate::vm::Restore { resume: params.resume_vm, clock_realtime: params.clock_realtime };
    let running = crate::vm::restore(host.kvm, saved, Path::new(&mem_path), host.launched, host.latch, restore)
        .map_err(|e| format!("The snapshot cannot be loaded: {e}"))?;
    tracing::info!(
        "snapshot {} loaded in {:.1} ms ({})",
        params.snapshot_path,
        started.elapsed().as_secs_f64() * 1000.0,
        if params.resume_vm { "running" } else { "paused" }
    );
    Ok(running)
}

/// The memory file: `mem_backend` of type File, or the older `mem_file_path`.
fn memory_file(params: &models::SnapshotLoad) -> Result<String, String> {
    match (&params.mem_backend, &params.mem_file_path) {
        (Some(models::MemBackend { backend_type: models::MemBackendType::File, backend_path }), None) => {
            Ok(backend_path.clone())
        }
        (Some(models::MemBackend { backend_type: models::MemBackendType::Uffd, .. }), None) => {
            Err("mem_backend Uffd is not supported; use backend_type File.".into())
        }
        (None, Some(path)) => Ok(path.clone()),
        (Some(_), Some(_)) => Err("Give mem_backend or mem_file_path, not both; mem_backend is preferred.".into()),
        (None, None) => Err("PUT /snapshot/load needs mem_backend (or mem_file_path).".into()),
    }
}

/// `network_overrides` and `vsock_override`: other host ends for the devices of a VM that
/// comes from elsewhere (`what`: a snapshot, a migrated VM). The error names the override and
/// the fix.
pub(crate) fn apply_overrides(
    config: &mut VmConfig,
    network: &[models::NetworkOverride],
    vsock_override: Option<&models::VsockOverride>,
    what: &str,
) -> Result<(), String> {
    for o in network {
        let ids: Vec<String> = config.nets.iter().enumerate().map(|(i, n)| n.api_id(i)).collect();
        let Some(index) = ids.iter().position(|id| *id == o.iface_id) else {
            return Err(format!(
                "network_overrides: the {what} has no interface {}; name one of [{}].",
                o.iface_id,
                ids.join(", ")
            ));
        };
        if o.host_dev_name.is_empty() || o.host_dev_name.len() > 15 {
            return Err(format!("network_overrides {}: host_dev_name must be 1 to 15 bytes.", o.iface_id));
        }
        match &mut config.nets[index].attachment {
            NetAttachment::Tap(tap) => *tap = o.host_dev_name.clone(),
            _ => {
                return Err(format!("network_overrides {}: that interface is not on a TAP; leave it out.", o.iface_id));
            }
        }
    }
    if let Some(v) = vsock_override {
        let Some(vsock) = &mut config.vsock else {
            return Err(format!("vsock_override: the {what} has no vsock device; leave it out."));
        };
        if v.uds_path.is_empty() {
            return Err("vsock_override uds_path is empty; give a socket path.".into());
        }
        vsock.uds = PathBuf::from(&v.uds_path);
    }
    Ok(())
}
