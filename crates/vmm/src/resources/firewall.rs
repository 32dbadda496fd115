//! `/ferrovisor/firewall/{iface_id}`: an interface's firewall rules, put on a running VM at
//! once.

use net::firewall::RuleSetSpec;

use super::{Resources, Running};

/// `PUT`: before the start the rules wait for the VM; on a running VM they replace the
/// interface's rules at once (the body was checked whole before anything changed).
pub fn put(running: Option<&mut Running>, r: &mut Resources, iface: String, rules: RuleSetSpec) -> Result<(), String> {
    let Some((vm, config)) = running else {
        if !r.nets.iter().any(|n| n.iface_id == iface) {
            return Err(format!("There is no network interface {iface}; PUT /network-interfaces/{iface} first."));
        }
        r.firewalls.insert(iface, rules);
        return Ok(());
    };
    let firewall = vm.firewall(&iface).ok_or_else(|| no_interface(&iface))?;
    let checked = rules.check().map_err(|e| format!("firewall {iface}: {e}."))?;
    if let Some(Err(e)) = vm.update_port_rules(&iface, &checked) {
        tracing::warn!("firewall {iface}: the kernel's copy of the rules was not updated ({e})");
    }
    firewall.replace(checked);
    tracing::info!("firewall {iface}: {} rules now", rules.rules.len());
    if let Some(index) = config.nets.iter().enumerate().position(|(i, n)| n.api_id(i) == iface) {
        config.nets[index].firewall = Some(rules.clone());
    }
    r.firewalls.insert(iface, rules);
    Ok(())
}

/// What `GET` shows: a running VM's rules with their counters, or the rules waiting for the start.
#[derive(serde::Serialize)]
#[serde(untagged)]
pub enum Shown<'a> {
    Running(net::firewall::Report),
    Pending(&'a RuleSetSpec),
}

/// `GET`: the rules waiting for the start, or a running VM's rules with their counters.
pub fn get<'a>(running: Option<&Running>, r: &'a Resources, iface: &str) -> Result<Shown<'a>, String> {
    match running {
        Some((vm, _)) => Ok(Shown::Running(vm.firewall(iface).ok_or_else(|| no_interface(iface))?.report())),
        None => match r.firewalls.get(iface) {
            Some(rules) => Ok(Shown::Pending(rules)),
            None => Err(format!("Interface {iface} has no firewall rules yet; PUT them first.")),
        },
    }
}

fn no_interface(iface: &str) -> String {
    format!("The VM has no network interface {iface}; name one it has.")
}
