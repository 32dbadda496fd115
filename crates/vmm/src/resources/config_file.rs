//! Firecracker's configuration file: `--config-file` read as the requests it stands for, and
//! `GET /vm/config` written from the resources or a command-line VM's configuration.

use api::Request;
use api::models::{self, ActionType, VmConfigFile};

use super::Resources;
use crate::config::VmConfig;

/// The requests that `file` stands for, in the order Firecracker applies them, ending with
/// `InstanceStart`.
pub fn requests(file: VmConfigFile) -> Result<Vec<Request>, String> {
    let mut requests = Vec::new();
    requests.extend(file.logger.map(Request::PutLogger));
    requests.extend(file.metrics.map(Request::PutMetrics));
    requests.extend(file.machine_config.map(Request::PutMachineConfig));
    requests.extend(file.memory.map(Request::PutMemory));
    match file.boot_source {
        Some(b) => requests.push(Request::PutBootSource(b)),
        None => return Err("The config file has no boot-source; add one with kernel_image_path.".into()),
    }
    requests.extend(file.drives.into_iter().map(Request::PutDrive));
    requests.extend(file.pmem.into_iter().map(Request::PutPmem));
    requests.extend(file.memory_hotplug.map(Request::PutMemoryHotplug));
    requests.extend(file.network_interfaces.into_iter().map(Request::PutNetworkInterface));
    requests.extend(file.firewall.into_iter().map(|(iface, rules)| Request::PutFirewall(iface, rules)));
    requests.extend(file.devices.into_iter().map(Request::PutDevice));
    requests.extend(file.fs.into_iter().map(Request::PutFs));
    requests.extend(file.mmds_config.map(Request::PutMmdsConfig));
    requests.extend(file.vsock.map(Request::PutVsock));
    requests.extend(file.balloon.map(Request::PutBalloon));
    requests.extend(file.entropy.map(Request::PutEntropy));
    requests.extend(file.serial.map(Request::PutSerial));
    requests.push(Request::Action(ActionType::InstanceStart));
    Ok(requests)
}

/// `GET /vm/config`: the API resources, or what a command-line VM was started with.
pub fn export(r: &Resources, running: Option<&VmConfig>) -> VmConfigFile {
    if let Some(c) = running
        && r.boot.is_none()
    {
        return config_file_of(c);
    }
    VmConfigFile {
        boot_source: r.boot.clone(),
        machine_config: Some(r.machine.clone()),
        drives: r.drives.clone(),
        network_interfaces: r.nets.clone(),
        pmem: r.pmem.clone(),
        memory_hotplug: r.memory_hotplug.clone(),
        vsock: r.vsock.clone(),
        balloon: r.balloon.clone(),
        entropy: r.entropy.clone(),
        serial: r.serial.clone(),
        mmds_config: r.mmds.clone(),
        memory: Some(r.memory.clone()),
        firewall: r.firewalls.clone(),
        devices: r.devices.clone(),
        fs: r.fs.clone(),
        ..Default::default()
    }
}

/// A command-line VM's configuration in the configuration file's terms.
fn config_file_of(c: &VmConfig) -> VmConfigFile {
    VmConfigFile {
        boot_source: Some(models::BootSource {
            kernel_image_path: c.kernel.display().to_string(),
            boot_args: Some(c.cmdline.clone()),
            initrd_path: c.initrd.as_ref().map(|p| p.display().to_string()),
        }),
        machine_config: Some(models::MachineConfig {
            vcpu_count: c.cpus.min(255) as u8,
            mem_size_mib: c.memory_mib as u32,
            ..Default::default()
        }),
        drives: c.disks.iter().map(super::drive::drive_of).collect(),
        network_interfaces: c.nets.iter().enumerate().filter_map(|(i, n)| super::net::interface_of(i, n)).collect(),
        vsock: c.vsock.as_ref().map(super::vsock::vsock_of),
        balloon: c.balloon.as_ref().map(super::balloon::balloon_of),
        entropy: c.rng.then(models::Entropy::default),
        devices: c.passthrough.iter().enumerate().map(|(i, d)| super::devices::device_of(i, d)).collect(),
        memory_hotplug: c.memory_hotplug.as_ref().map(super::memory_hotplug::hotplug_of),
        memory: Some(super::memory::options_of(&c.memory)),
        firewall: c.nets.iter().enumerate().filter_map(|(i, n)| Some((n.api_id(i), n.firewall.clone()?))).collect(),
        fs: c.fs.iter().map(super::fs::fs_device_of).collect(),
        ..Default::default()
    }
}
