//! `PUT` and `PATCH /network-interfaces/{id}`: virtio-net interfaces on a TAP.

use api::models;

use super::{Resources, Running, put_by_id, rate_limit};
use crate::config::{NetAttachment, NetConfig, parse_unicast_mac};

pub fn put(r: &mut Resources, n: models::NetworkInterface) -> Result<(), String> {
    match &n.vhost_user_socket {
        Some(socket) => {
            if !n.host_dev_name.is_empty() {
                return Err(format!(
                    "network interface {}: give host_dev_name or vhost_user_socket, not both.",
                    n.iface_id
                ));
            }
            super::must_exist(&format!("network interface {}", n.iface_id), "vhost_user_socket", socket)?;
            if r.firewalls.contains_key(&n.iface_id) {
                return Err(format!(
                    "network interface {}: a vhost-user interface's frames never pass through the VMM, so it \
                     takes no firewall; give the rules to the back-end.",
                    n.iface_id
                ));
            }
        }
        None if n.host_dev_name.is_empty() || n.host_dev_name.len() > 15 => {
            return Err(format!("network interface {}: host_dev_name must be 1 to 15 bytes.", n.iface_id));
        }
        None => {}
    }
    if let Some(mac) = &n.guest_mac {
        parse_unicast_mac(mac).map_err(|e| format!("network interface {}: guest_mac {e}.", n.iface_id))?;
    }
    rate_limit(&format!("network interface {} rx", n.iface_id), &n.rx_rate_limiter)?;
    rate_limit(&format!("network interface {} tx", n.iface_id), &n.tx_rate_limiter)?;
    if let Some(mtu) = n.mtu.filter(|m| !(68..=65535).contains(m)) {
        return Err(format!("network interface {}: mtu {mtu} is out of range; give 68 to 65535.", n.iface_id));
    }
    put_by_id(&mut r.nets, n, |a, b| a.iface_id == b.iface_id);
    Ok(())
}

/// The interface in the VMM's terms, with the MMDS and firewall settings that name it.
pub fn net_config(n: &models::NetworkInterface, r: &Resources) -> Result<NetConfig, String> {
    let mac = n.guest_mac.as_deref().map(parse_unicast_mac).transpose()?;
    let mmds = match &r.mmds {
        Some(m) if m.network_interfaces.contains(&n.iface_id) => Some(super::mmds::address(m)?),
        _ => None,
    };
    let attachment = match &n.vhost_user_socket {
        Some(socket) => NetAttachment::VhostUser(crate::config::VhostUserOptions::new(socket.into())),
        None => NetAttachment::Tap(n.host_dev_name.clone()),
    };
    Ok(NetConfig {
        attachment,
        mac,
        mmds,
        rx_rate_limit: rate_limit("rx_rate_limiter", &n.rx_rate_limiter)?,
        tx_rate_limit: rate_limit("tx_rate_limiter", &n.tx_rate_limiter)?,
        id: Some(n.iface_id.clone()),
        mtu: n.mtu.and_then(|m| u16::try_from(m).ok()),
        firewall: r.firewalls.get(&n.iface_id).cloned(),
        ip: None,
        ip6: None,
        poll_us: None,
        queues: None,
    })
}

/// A command-line VM's interface `index` in the API's terms, when it is on a TAP or a
/// vhost-user back-end (the API has no words for the others).
pub fn interface_of(index: usize, n: &NetConfig) -> Option<models::NetworkInterface> {
    let (host_dev_name, vhost_user_socket) = match &n.attachment {
        NetAttachment::Tap(tap) => (tap.clone(), None),
        NetAttachment::VhostUser(options) => (String::new(), Some(options.socket.display().to_string())),
        _ => return None,
    };
    Some(models::NetworkInterface {
        iface_id: n.api_id(index),
        mtu: n.mtu.map(u32::from),
        host_dev_name,
        vhost_user_socket,
        guest_mac: n.mac.map(|m| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")),
        rx_rate_limiter: None,
        tx_rate_limiter: None,
    })
}

/// `PATCH /network-interfaces/{id}`: new rate limiters for a running VM's interface.
pub fn patch(running: &mut Running, r: &mut Resources, n: models::PartialNetworkInterface) -> Result<(), String> {
    let (vm, config) = running;
    let Some(index) = r.nets.iter().position(|o| o.iface_id == n.iface_id) else {
        return Err(format!(
            "There is no network interface {}; PATCH an iface_id the VM was started with.",
            n.iface_id
        ));
    };
    let rx = rate_limit(&format!("network interface {} rx", n.iface_id), &n.rx_rate_limiter)?;
    let tx = rate_limit(&format!("network interface {} tx", n.iface_id), &n.tx_rate_limiter)?;
    let (rx, tx) = (n.rx_rate_limiter.is_some().then_some(rx), n.tx_rate_limiter.is_some().then_some(tx));
    vm.update_net_rate_limits(index, rx, tx)
        .map_err(|e| format!("network interface {}: the rate limiters cannot change ({e}).", n.iface_id))?;
    let (nic, iface) = (&mut config.nets[index], &mut r.nets[index]);
    if let Some(rx) = rx {
        nic.rx_rate_limit = rx;
        iface.rx_rate_limiter = n.rx_rate_limiter;
    }
    if let Some(tx) = tx {
        nic.tx_rate_limit = tx;
        iface.tx_rate_limiter = n.tx_rate_limiter;
    }
    Ok(())
}
