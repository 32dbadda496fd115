//! `PUT /cpu-config`: a custom CPU template (CPUID and MSR modifiers).

use api::models;

use super::Resources;

pub fn put(r: &mut Resources, t: models::CpuConfig) -> Result<(), String> {
    crate::config::cpu_template(&t).map_err(|e| format!("{e}."))?;
    r.cpu_config = Some(t);
    Ok(())
}

/// The static template machine-config names, which cannot go with a custom one.
pub fn static_template_of(
    machine: &models::MachineConfig,
    custom: Option<&models::CpuConfig>,
) -> Result<Option<String>, String> {
    match (super::machine::static_template(machine)?, custom) {
        (Some(_), Some(_)) => {
            Err("machine-config cpu_template and PUT /cpu-config both give a CPU template; keep one.".into())
        }
        (t, _) => Ok(t),
    }
}
