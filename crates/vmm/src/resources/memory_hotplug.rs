//! `/hotplug/memory`: hotpluggable memory (virtio-mem), its size and what the guest is asked
//! to plug.

use api::models;

use super::{Resources, Running, started};
use crate::config::{HotplugField, MemoryHotplugConfig};

pub fn put(r: &mut Resources, h: models::MemoryHotplugConfig) -> Result<(), String> {
    config(&h, 0)?;
    r.memory_hotplug = Some(h);
    Ok(())
}

/// The body in the VMM's terms, asking for `requested_mib` from the start; the error names the
/// field and the fix.
pub fn config(h: &models::MemoryHotplugConfig, requested_mib: u64) -> Result<MemoryHotplugConfig, String> {
    let config = MemoryHotplugConfig {
        total_mib: h.total_size_mib,
        block_mib: h.block_size_mib,
        slot_mib: h.slot_size_mib,
        requested_mib,
    };
    config.check().map_err(|(field, problem)| {
        let name = match field {
            HotplugField::Total => "total_size_mib",
            HotplugField::Block => "block_size_mib",
            HotplugField::Slot => "slot_size_mib",
            HotplugField::Requested => "requested_size_mib",
        };
        format!("memory-hotplug {name} {problem}.")
    })?;
    Ok(config)
}

/// A command-line VM's hotpluggable memory in the API's terms.
pub fn hotplug_of(h: &MemoryHotplugConfig) -> models::MemoryHotplugConfig {
    models::MemoryHotplugConfig { total_size_mib: h.total_mib, slot_size_mib: h.slot_mib, block_size_mib: h.block_mib }
}

const NONE_ON_VM: &str = "The VM has no hotpluggable memory; PUT /hotplug/memory before InstanceStart.";

/// `PATCH /hotplug/memory`: ask the guest for a new plugged size.
pub fn set_requested(running: Option<&Running>, requested_mib: u64) -> Result<(), String> {
    let (vm, _) = started(running, "This hotplug memory request")?;
    let control = vm.memory_hotplug().ok_or(NONE_ON_VM)?;
    requested_mib
        .checked_mul(1 << 20)
        .ok_or_else(|| "is too large".to_string())
        .and_then(|bytes| control.set_requested(bytes))
        .map_err(|e| format!("memory-hotplug requested_size_mib {requested_mib}: {e}."))
}

/// `GET /hotplug/memory`: as configured, or on a running VM what is plugged and requested.
pub fn status(running: Option<&Running>, r: &Resources) -> Result<models::MemoryHotplugStatus, String> {
    let Some((vm, config)) = running else {
        let h = r.memory_hotplug.as_ref().ok_or("No hotpluggable memory is configured; PUT /hotplug/memory first.")?;
        return Ok(models::MemoryHotplugStatus {
            total_size_mib: h.total_size_mib,
            slot_size_mib: h.slot_size_mib,
            block_size_mib: h.block_size_mib,
            plugged_size_mib: 0,
            requested_size_mib: 0,
        });
    };
    let (Some(control), Some(h)) = (vm.memory_hotplug(), config.memory_hotplug) else { return Err(NONE_ON_VM.into()) };
    let status = control.status();
    Ok(models::MemoryHotplugStatus {
        total_size_mib: h.total_mib,
        slot_size_mib: h.slot_mib,
        block_size_mib: h.block_mib,
        plugged_size_mib: status.plugged_bytes >> 20,
        requested_size_mib: status.requested_bytes >> 20,
    })
}
