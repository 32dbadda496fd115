//! `/mmds` and `/mmds/config`: the metadata store's contents, and how and where it answers.

use std::net::Ipv4Addr;

use api::models;

use super::Resources;
use crate::config::MmdsSettings;

/// `GET /mmds`.
pub fn get() -> serde_json::Value {
    net::mmds::with_store(|s| s.data().clone())
}

/// `PUT /mmds`: new contents.
pub fn put_data(data: serde_json::Value) -> Result<(), String> {
    net::mmds::with_store(|s| s.put(data)).map_err(|e| format!("PUT /mmds: {e}."))
}

/// `PATCH /mmds`: a JSON merge patch onto the contents.
pub fn patch_data(patch: &serde_json::Value) -> Result<(), String> {
    net::mmds::with_store(|s| s.patch(patch)).map_err(|e| format!("PATCH /mmds: {e}."))
}

/// `PUT /mmds/config`: the version, the address and the interfaces MMDS answers on, which must
/// have been configured.
pub fn put_config(r: &mut Resources, m: models::MmdsConfig) -> Result<(), String> {
    address(&m)?;
    for id in &m.network_interfaces {
        if !r.nets.iter().any(|n| &n.iface_id == id) {
            return Err(format!(
                "mmds-config network_interfaces names {id}, which is no network interface; PUT \
                 /network-interfaces/{id} first."
            ));
        }
    }
    if m.network_interfaces.is_empty() {
        return Err("mmds-config network_interfaces is empty; name the interfaces MMDS answers on.".into());
    }
    net::mmds::with_store(|s| {
        s.version = match m.version {
            Some(models::MmdsVersion::V2) => net::mmds::Version::V2,
            _ => net::mmds::Version::V1,
        };
        s.imds_compat = m.imds_compat;
    });
    r.mmds = Some(m);
    Ok(())
}

/// The address MMDS answers at: `ipv4_address`, or 169.254.169.254.
pub fn address(m: &models::MmdsConfig) -> Result<Ipv4Addr, String> {
    let Some(text) = &m.ipv4_address else { return Ok(net::mmds::DEFAULT_IPV4) };
    match text.parse::<Ipv4Addr>() {
        Ok(ip) if !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast()) => Ok(ip),
        _ => Err(format!(
            "mmds-config ipv4_address '{text}' is not a unicast IPv4 address; give one like 169.254.169.254."
        )),
    }
}

/// How the store answers now, kept in a VM's configuration.
pub fn settings() -> MmdsSettings {
    net::mmds::with_store(|s| MmdsSettings { version: s.version, imds_compat: s.imds_compat })
}

/// A restored VM's MMDS: as it answered before the snapshot, with the contents it had.
pub fn restore(settings: MmdsSettings, data: Option<serde_json::Value>) -> Result<(), String> {
    net::mmds::with_store(|s| {
        s.version = settings.version;
        s.imds_compat = settings.imds_compat;
        data.map_or(Ok(()), |data| s.put(data))
    })
    .map_err(|e| format!("The snapshot's MMDS contents cannot be restored ({e}); raise --mmds-size-limit."))
}
