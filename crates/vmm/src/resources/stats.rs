//! `GET /ferrovisor/stats`: the VM's memory split (guest, VMM, huge pages, KSM), its hotplugged
//! memory and its balloon.

use crate::vm::RunningVm;

pub fn stats(vm: &RunningVm) -> serde_json::Value {
    let s = crate::memory::stats(vm.memory());
    let mut value = serde_json::json!({
        "guest_ram_kib": s.guest_ram_kib,
        "rss_kib": s.rss_kib,
        "guest_rss_kib": s.guest_rss_kib,
        "vmm_overhead_kib": s.vmm_overhead_kib(),
        "huge_kib": s.huge_kib,
        "ksm_merging_pages": s.ksm_merging_pages,
        "ksm_saved_bytes": s.ksm_merging_pages * 4096,
        "ksm_profit_bytes": s.ksm_profit_bytes,
    });
    if let Some(h) = vm.memory_hotplug() {
        let status = h.status();
        value["memory_hotplug"] = serde_json::json!({
            "plugged_mib": status.plugged_bytes >> 20,
            "requested_mib": status.requested_bytes >> 20,
            "unplugged_accesses": status.unplugged_accesses,
        });
    }
    if let Some(b) = vm.balloon() {
        let state = b.state();
        value["balloon"] = serde_json::json!({
            "target_mib": b.target_mib(),
            "actual_mib": state.actual_pages / 256,
            "released_pages": state.released_pages,
        });
    }
    value
}
