//! `PUT /ferrovisor/memory`: how guest RAM is backed (huge pages, KSM, shared, prefault).

use api::models;

use super::Resources;
use crate::config::{HugePages, MemoryOptions};

pub fn put(r: &mut Resources, m: models::MemoryOptions) -> Result<(), String> {
    options(&m)?;
    r.memory = m;
    Ok(())
}

fn options(m: &models::MemoryOptions) -> Result<MemoryOptions, String> {
    let hugepages = match m.hugepages.as_deref() {
        None | Some("off") => HugePages::Off,
        Some("on") => HugePages::On,
        Some("thp") => HugePages::Thp,
        Some(other) => return Err(format!("ferrovisor/memory hugepages is off, on or thp, not '{other}'.")),
    };
    let dirty_ring =
        crate::config::parse_dirty_ring("ferrovisor/memory", &m.dirty_ring.to_string()).map_err(|e| format!("{e}."))?;
    Ok(MemoryOptions { hugepages, mergeable: m.mergeable, shared: m.shared, prefault: m.prefault, dirty_ring })
}

/// The backing of guest RAM: these options, with machine-config's `huge_pages` as Firecracker
/// gives it.
pub fn backing(m: &models::MemoryOptions, machine: &models::MachineConfig) -> Result<MemoryOptions, String> {
    let mut memory = options(m)?;
    if machine.huge_pages == models::HugePages::TwoMiB {
        memory.hugepages = HugePages::On;
    }
    Ok(memory)
}

/// A command-line VM's memory backing in the API's terms.
pub fn options_of(m: &MemoryOptions) -> models::MemoryOptions {
    let hugepages = match m.hugepages {
        HugePages::Off => "off",
        HugePages::On => "on",
        HugePages::Thp => "thp",
    };
    models::MemoryOptions {
        hugepages: Some(hugepages.into()),
        mergeable: m.mergeable,
        shared: m.shared,
        prefault: m.prefault,
        dirty_ring: m.dirty_ring,
    }
}
