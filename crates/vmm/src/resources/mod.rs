//! The API's resources, one module each, as Firecracker's `vmm_config/`: each owns its body's
//! checks, its error sentences, its translation into the VM's configuration and, where the
//! resource can change on a running VM, that change. The controller keeps the lifecycle and
//! dispatches to them. Every error is a sentence for the client (a 400).

pub mod balloon;
pub mod boot;
pub mod config_file;
pub mod cpu_config;
pub mod devices;
pub mod drive;
pub mod entropy;
pub mod firewall;
pub mod fs;
pub mod machine;
pub mod memory;
pub mod memory_hotplug;
pub mod mmds;
pub mod net;
pub mod pmem;
pub mod serial;
pub mod snapshot;
pub mod stats;
pub mod vsock;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use api::models;
use virtio::rate_limiter::{BucketConfig, RateLimit};

use crate::config::{VirtioTransport, VmConfig};
use crate::vm::RunningVm;

/// The configuration gathered through the API before `InstanceStart`, in its own terms.
#[derive(Default)]
pub struct Resources {
    pub boot: Option<models::BootSource>,
    pub machine: models::MachineConfig,
    pub drives: Vec<models::Drive>,
    pub nets: Vec<models::NetworkInterface>,
    pub vsock: Option<models::Vsock>,
    pub balloon: Option<models::Balloon>,
    pub entropy: Option<models::Entropy>,
    pub serial: Option<models::Serial>,
    pub cpu_config: Option<models::CpuConfig>,
    pub mmds: Option<models::MmdsConfig>,
    pub pmem: Vec<models::Pmem>,
    pub memory_hotplug: Option<models::MemoryHotplugConfig>,
    pub memory: models::MemoryOptions,
    /// Assigned PCI devices (`PUT /ferrovisor/devices/{id}`).
    pub devices: Vec<models::PassthroughDevice>,
    /// virtio-fs shares (`PUT /ferrovisor/fs/{tag}`).
    pub fs: Vec<models::FsDevice>,
    /// Firewall rules per interface (`PUT /ferrovisor/firewall/{iface_id}`).
    pub firewalls: BTreeMap<String, ::net::firewall::RuleSetSpec>,
}

/// A running VM and the configuration it was built from (which changes with it).
pub type Running = (RunningVm, VmConfig);

impl Resources {
    /// The VM configuration the resources describe, for the VM `id` (None: the default id).
    pub fn vm_config(&self, id: Option<String>, transport: VirtioTransport) -> Result<VmConfig, String> {
        let Some(boot) = &self.boot else {
            return Err("InstanceStart needs a kernel; PUT /boot-source with kernel_image_path first.".into());
        };
        // The guest names the root device first: vda, or pmem0.
        let drives = root_first(&self.drives, |d| d.is_root_device);
        let pmem = root_first(&self.pmem, |p| p.root_device);
        let cmdline = boot::cmdline(boot, drives.first().copied(), pmem.first().copied());
        let (serial, serial_rate_limit) = serial::serial_config(self.serial.as_ref())?;
        Ok(VmConfig {
            kernel: PathBuf::from(&boot.kernel_image_path),
            initrd: boot.initrd_path.as_ref().map(PathBuf::from),
            cmdline,
            cpus: u32::from(self.machine.vcpu_count),
            memory_mib: u64::from(self.machine.mem_size_mib),
            serial,
            disks: drives.iter().map(|d| drive::disk_config(d)).collect::<Result<Vec<_>, String>>()?,
            rng: self.entropy.is_some(),
            rng_rate_limit: entropy::rate_limit_of(self.entropy.as_ref())?,
            console: None,
            nets: self.nets.iter().map(|n| net::net_config(n, self)).collect::<Result<Vec<_>, String>>()?,
            balloon: self.balloon.as_ref().map(balloon::options),
            pmem: pmem.iter().map(|p| pmem::pmem_config(p)).collect::<Result<Vec<_>, String>>()?,
            fs: self.fs.iter().map(fs::fs_config).collect::<Result<Vec<_>, String>>()?,
            memory_hotplug: self.memory_hotplug.as_ref().map(|h| memory_hotplug::config(h, 0)).transpose()?,
            passthrough: self.devices.iter().map(devices::config).collect::<Result<Vec<_>, String>>()?,
            vsock: self.vsock.as_ref().map(vsock::config),
            transport,
            memory: memory::backing(&self.memory, &self.machine)?,
            stats_on_exit: false,
            track_dirty_pages: self.machine.track_dirty_pages,
            id,
            output_limit: None,
            serial_rate_limit,
            cpu_template: self.cpu_config.clone(),
            static_cpu_template: cpu_config::static_template_of(&self.machine, self.cpu_config.as_ref())?,
            mmds: self.mmds.as_ref().map(|_| mmds::settings()),
        })
    }
}

/// What a pre-boot-only request gets after the start, as Firecracker answers.
pub fn after_start(what: &str) -> String {
    format!("{what} is only possible before InstanceStart; the VM is already running.")
}

/// What a request that needs a running VM gets before the start.
pub fn before_start(what: &str) -> String {
    format!("{what} needs a running VM; send InstanceStart first.")
}

/// `running`, or the sentence that `what` needs a running VM.
fn started<'a>(running: Option<&'a Running>, what: &str) -> Result<&'a Running, String> {
    running.ok_or_else(|| before_start(what))
}

/// `items` with the root device first, as the guest numbers them.
fn root_first<T>(items: &[T], is_root: impl Fn(&T) -> bool) -> Vec<&T> {
    let mut ordered: Vec<&T> = items.iter().filter(|i| is_root(i)).collect();
    ordered.extend(items.iter().filter(|i| !is_root(i)));
    ordered
}

/// Inserts `item` into `list`, replacing the one with the same id, as a second PUT does.
fn put_by_id<T>(list: &mut Vec<T>, item: T, same: impl Fn(&T, &T) -> bool) {
    match list.iter_mut().find(|old| same(old, &item)) {
        Some(old) => *old = item,
        None => list.push(item),
    }
}

/// That `path` names something that can be read; the error names the object and field.
fn must_exist(what: &str, field: &str, path: &str) -> Result<(), String> {
    sandbox::files::not_empty(Path::new(path), &format!("{what} {field}")).map_err(|e| format!("{e}."))?;
    match std::fs::metadata(path) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{what} {field} {path} cannot be read ({e}); give an existing file.")),
    }
}

fn bucket(b: models::TokenBucket) -> BucketConfig {
    BucketConfig { size: b.size, one_time_burst: b.one_time_burst.unwrap_or(0), refill_time: b.refill_time }
}

/// A `rate_limiter` in the device's terms; the error names the object and the fix.
fn rate_limit(what: &str, limiter: &Option<models::RateLimiter>) -> Result<Option<RateLimit>, String> {
    let Some(l) = limiter else { return Ok(None) };
    let limit = RateLimit { bandwidth: l.bandwidth.map(bucket), ops: l.ops.map(bucket) };
    limit.check().map_err(|e| format!("{what}: {e}."))?;
    Ok((limit.bandwidth.is_some() || limit.ops.is_some()).then_some(limit))
}
