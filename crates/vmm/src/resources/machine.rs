//! `PUT` and `PATCH /machine-config`: vCPUs, memory size, SMT, dirty page tracking, huge pages
//! and a static CPU template.

use api::models;

use super::Resources;

/// `PUT /machine-config` on a host that runs at most `max_cpus` vCPUs a VM.
pub fn put(r: &mut Resources, m: models::MachineConfig, max_cpus: u32) -> Result<(), String> {
    if m.vcpu_count == 0 || u32::from(m.vcpu_count) > max_cpus {
        return Err(format!("machine-config vcpu_count {} is out of range; use 1 to {max_cpus}.", m.vcpu_count));
    }
    let min_mib = arch::memory::MIN_MEMORY >> 20;
    if u64::from(m.mem_size_mib) < min_mib {
        return Err(format!("machine-config mem_size_mib {} is too small; use at least {min_mib}.", m.mem_size_mib));
    }
    if m.smt {
        return Err("machine-config smt is not supported; set it to false.".into());
    }
    static_template(&m)?;
    r.machine = m;
    Ok(())
}

/// `PATCH /machine-config`: the fields given replace the current ones, checked as a PUT.
pub fn patch(r: &mut Resources, u: models::MachineConfigUpdate, max_cpus: u32) -> Result<(), String> {
    let mut m = r.machine.clone();
    m.vcpu_count = u.vcpu_count.unwrap_or(m.vcpu_count);
    m.mem_size_mib = u.mem_size_mib.unwrap_or(m.mem_size_mib);
    m.smt = u.smt.unwrap_or(m.smt);
    m.track_dirty_pages = u.track_dirty_pages.unwrap_or(m.track_dirty_pages);
    m.huge_pages = u.huge_pages.unwrap_or(m.huge_pages);
    if u.cpu_template.is_some() {
        m.cpu_template = u.cpu_template;
    }
    put(r, m, max_cpus)
}

/// machine-config's `cpu_template`: a static template's name, or none for "None" or null.
pub fn static_template(m: &models::MachineConfig) -> Result<Option<String>, String> {
    let name = match &m.cpu_template {
        None | Some(serde_json::Value::Null) => return Ok(None),
        Some(serde_json::Value::String(name)) => name,
        Some(other) => {
            return Err(format!(
                "machine-config cpu_template {other} is not a template name; give one such as \"T2\"."
            ));
        }
    };
    arch::cpu_template::StaticTemplate::parse(name)
        .map(|t| t.map(|_| name.clone()))
        .map_err(|e| format!("machine-config cpu_template {e}; leave it out or give a template this host can run."))
}
