//! The VMM's main thread: it owns the VM, serves API requests one at a time, and waits for the
//! reason the VM stops. Before `InstanceStart` it gathers the configuration, as Firecracker does.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use api::models::{self, ActionType, VmConfigFile, VmStateChange};
use api::{ApiCall, Request, Response};
use kvm_ioctls::Kvm;

use crate::config::{
    DiskConfig, HugePages, MemoryOptions, MmdsSettings, NetAttachment, NetConfig, SerialConfig, VmConfig,
};
use crate::exit::{ExitLatch, VmExit, Wake};
use crate::metrics::MetricsSink;
use crate::virtio_devices::DeviceChange;
use crate::vm::RunningVm;
use crate::{HostLimits, VirtioTransport, VsockConfig};
use virtio::balloon::BalloonControl;
use virtio::rate_limiter::{BucketConfig, RateLimit};

/// Applies a `PUT /logger` body: level, file; provided by the binary, which owns the logger.
pub type LoggerHook = Box<dyn Fn(&models::Logger) -> Result<(), String>>;

/// The id of a VM started without `--id`, as Firecracker names it.
pub const DEFAULT_ID: &str = "anonymous-instance";

/// `PUT /hotplug/memory` in the VMM's terms, asking for `requested_mib` from the start; the
/// error names the field and the fix.
fn hotplug_config(
    h: &models::MemoryHotplugConfig,
    requested_mib: u64,
) -> Result<crate::config::MemoryHotplugConfig, String> {
    use crate::config::HotplugField;
    let config = crate::config::MemoryHotplugConfig {
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

/// machine-config's `cpu_template`: a static template's name, or none for "None" or null.
fn static_template(m: &models::MachineConfig) -> Result<Option<String>, String> {
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

/// `network_overrides` and `vsock_override` of `PUT /snapshot/load`: other host ends for the
/// snapshot's devices. The error names the override and the fix.
fn apply_overrides(config: &mut VmConfig, params: &models::SnapshotLoad) -> Result<(), String> {
    for o in &params.network_overrides {
        let ids: Vec<String> = config.nets.iter().enumerate().map(|(i, n)| n.api_id(i)).collect();
        let Some(index) = ids.iter().position(|id| *id == o.iface_id) else {
            return Err(format!(
                "network_overrides: the snapshot has no interface {}; name one of [{}].",
                o.iface_id,
                ids.join(", ")
            ));
        };
        if o.host_dev_name.is_empty() || o.host_dev_name.len() > 15 {
            return Err(format!("network_overrides {}: host_dev_name must be 1 to 15 bytes.", o.iface_id));
        }
        match &mut config.nets[index].attachment {
            NetAttachment::Tap(tap) => *tap = o.host_dev_name.clone(),
            _ => {
                return Err(format!("network_overrides {}: that interface is not on a TAP; leave it out.", o.iface_id));
            }
        }
    }
    if let Some(v) = &params.vsock_override {
        let Some(vsock) = &mut config.vsock else {
            return Err("vsock_override: the snapshot has no vsock device; leave it out.".into());
        };
        if v.uds_path.is_empty() {
            return Err("vsock_override uds_path is empty; give a socket path.".into());
        }
        vsock.uds = PathBuf::from(&v.uds_path);
    }
    Ok(())
}

/// What Firecracker answers for a pre-boot-only request after the start.
fn after_start(what: &str) -> Response {
    Response::error(400, format!("{what} is only possible before InstanceStart; the VM is already running."))
}

fn before_start(what: &str) -> Response {
    Response::error(400, format!("{what} needs a running VM; send InstanceStart first."))
}

/// The configuration gathered through the API, in its own terms.
#[derive(Default)]
struct Resources {
    boot: Option<models::BootSource>,
    machine: models::MachineConfig,
    drives: Vec<models::Drive>,
    nets: Vec<models::NetworkInterface>,
    vsock: Option<models::Vsock>,
    balloon: Option<models::Balloon>,
    entropy: Option<models::Entropy>,
    serial: Option<models::Serial>,
    cpu_config: Option<models::CpuConfig>,
    mmds: Option<models::MmdsConfig>,
    pmem: Vec<models::Pmem>,
    memory_hotplug: Option<models::MemoryHotplugConfig>,
    memory: models::MemoryOptions,
    /// Assigned PCI devices (`PUT /ferrovisor/devices/{id}`).
    devices: Vec<models::PassthroughDevice>,
    /// Firewall rules per interface (`PUT /ferrovisor/firewall/{iface_id}`).
    firewalls: std::collections::BTreeMap<String, net::firewall::RuleSetSpec>,
}

pub struct Controller {
    kvm: Kvm,
    launched: Instant,
    latch: Arc<ExitLatch>,
    resources: Resources,
    /// The running VM and the configuration it was built from.
    vm: Option<(RunningVm, VmConfig)>,
    metrics: Option<MetricsSink>,
    logger: Option<LoggerHook>,
    /// The instance id (`--id`), shown by `GET /`.
    id: String,
    transport: VirtioTransport,
}

impl Controller {
    pub fn new(kvm: Kvm, launched: Instant, latch: Arc<ExitLatch>) -> Controller {
        Controller {
            kvm,
            launched,
            latch,
            resources: Resources::default(),
            vm: None,
            metrics: None,
            logger: None,
            id: DEFAULT_ID.into(),
            transport: VirtioTransport::Mmio,
        }
    }

    pub fn set_id(&mut self, id: String) {
        self.id = id;
    }

    /// How virtio devices of a VM configured through the API attach (`--enable-pci`).
    pub fn set_transport(&mut self, transport: VirtioTransport) {
        self.transport = transport;
    }

    /// Writes metrics to `path` from now on (`PUT /metrics`, `--metrics-path`); once only.
    pub fn open_metrics(&mut self, path: &Path) -> Result<(), String> {
        if self.metrics.is_some() {
            return Err("The metrics file is already set; it can be set once.".into());
        }
        self.metrics = Some(MetricsSink::open(path)?);
        Ok(())
    }

    pub fn set_logger_hook(&mut self, hook: LoggerHook) {
        self.logger = Some(hook);
    }

    pub fn host_limits(&self) -> HostLimits {
        HostLimits {
            kvm_max_vcpus: self.kvm.get_max_vcpus() as u32,
            ram_mib: HostLimits::host_ram_mib(),
            free_huge_pages: HostLimits::free_huge_pages(),
        }
    }

    /// Validates and boots `config`. Errors are sentences for the user.
    pub fn start(&mut self, config: VmConfig) -> Result<(), String> {
        let format = config.validate(&self.host_limits()).map_err(|e| e.to_string())?;
        self.boot(config, format)
    }

    /// Boots `config`, which [`VmConfig::validate`] already accepted as a `format` kernel.
    pub fn boot(&mut self, mut config: VmConfig, format: arch::boot::KernelFormat) -> Result<(), String> {
        // Each interface's queue pairs are fixed now, so that a snapshot restores as many.
        for nic in &mut config.nets {
            nic.queues = Some(nic.queue_pairs(config.cpus));
        }
        let vm = crate::vm::start(&self.kvm, &config, format, self.launched, &self.latch).map_err(|e| e.to_string())?;
        self.vm = Some((vm, config));
        self.sandbox()
    }

    /// Serves API calls and waits until the VM stops (or, before a start, a stop signal).
    pub fn run(mut self, calls: Option<Receiver<ApiCall>>) -> VmExit {
        let exit = loop {
            match self.latch.wait(self.metrics.as_ref().map(MetricsSink::due)) {
                Wake::Exit(exit) => break exit,
                Wake::Stats => match &self.vm {
                    Some((vm, _)) => eprintln!("{}", crate::memory::stats(vm.memory())),
                    None => eprintln!("memory: no VM is running yet"),
                },
                Wake::Timeout => {
                    if let Some(Err(e)) = self.metrics.as_ref().map(MetricsSink::flush) {
                        tracing::warn!("metrics could not be written: {e}");
                    }
                }
                Wake::Poke => {
                    while let Some(call) = calls.as_ref().and_then(|c| c.try_recv().ok()) {
                        let response = self.handle(call.request);
                        let _ = call.reply.send(response);
                    }
                }
            }
        };
        if let Some((vm, config)) = self.vm.take() {
            if config.stats_on_exit {
                eprintln!("{}", crate::memory::stats(vm.memory()));
            }
            vm.stop();
        }
        if let Some(sink) = &self.metrics {
            let _ = sink.flush();
        }
        exit
    }

    /// Puts the main thread under its filter once the VM is built, as Firecracker does: from
    /// here on it serves requests for a running guest.
    fn sandbox(&self) -> Result<(), String> {
        sandbox::apply(sandbox::ThreadKind::Vmm).map_err(|e| e.to_string())
    }

    fn running(&self) -> bool {
        self.vm.is_some()
    }

    fn state_name(&self) -> &'static str {
        match &self.vm {
            None => "Not started",
            Some((vm, _)) if vm.is_paused() => "Paused",
            Some(_) => "Running",
        }
    }

    /// Serves one request.
    pub fn handle(&mut self, request: Request) -> Response {
        match request {
            Request::GetInfo => Response::json(&models::InstanceInfo {
                id: self.id.clone(),
                state: self.state_name().into(),
                vmm_version: env!("CARGO_PKG_VERSION").into(),
                app_name: "Ferrovisor".into(),
            }),
            Request::GetVersion => Response::json(&serde_json::json!({
                "firecracker_version": env!("CARGO_PKG_VERSION"),
                "ferrovisor_version": env!("CARGO_PKG_VERSION"),
            })),
            Request::GetVmConfig => Response::json(&self.config_file()),
            Request::GetMachineConfig => Response::json(&self.resources.machine),
            Request::PutMachineConfig(m) => self.pre_boot("PUT /machine-config", |c| c.set_machine(m)),
            Request::PatchMachineConfig(u) => self.pre_boot("PATCH /machine-config", |c| {
                let mut m = c.resources.machine.clone();
                m.vcpu_count = u.vcpu_count.unwrap_or(m.vcpu_count);
                m.mem_size_mib = u.mem_size_mib.unwrap_or(m.mem_size_mib);
                m.smt = u.smt.unwrap_or(m.smt);
                m.track_dirty_pages = u.track_dirty_pages.unwrap_or(m.track_dirty_pages);
                m.huge_pages = u.huge_pages.unwrap_or(m.huge_pages);
                if u.cpu_template.is_some() {
                    m.cpu_template = u.cpu_template;
                }
                c.set_machine(m)
            }),
            Request::PutBootSource(b) => self.pre_boot("PUT /boot-source", |c| {
                must_exist("boot-source", "kernel_image_path", &b.kernel_image_path)?;
                if let Some(initrd) = &b.initrd_path {
                    must_exist("boot-source", "initrd_path", initrd)?;
                }
                c.resources.boot = Some(b);
                Ok(())
            }),
            Request::PutDrive(d) => self.pre_boot("PUT /drives", |c| c.set_drive(d)),
            Request::PatchDrive(d) => self.patch_drive(d),
            Request::PatchNetworkInterface(n) => self.patch_network_interface(n),
            Request::PutNetworkInterface(n) => self.pre_boot("PUT /network-interfaces", |c| c.set_net(n)),
            Request::PutVsock(v) => self.pre_boot("PUT /vsock", |c| {
                // 0 is accepted as Firecracker accepts it (firecracker-containerd sends it); 1 and
                // 2 name the local host and the host.
                if v.guest_cid == 1 || v.guest_cid == 2 {
                    return Err(format!("vsock guest_cid {} is reserved; use 3 or more.", v.guest_cid));
                }
                sandbox::files::check_socket_path(Path::new(&v.uds_path), "vsock uds_path")?;
                c.resources.vsock = Some(v);
                Ok(())
            }),
            Request::PutEntropy(e) => self.pre_boot("PUT /entropy", |c| {
                rate_limit("entropy", &e.rate_limiter)?;
                c.resources.entropy = Some(e);
                Ok(())
            }),
            Request::GetMmds => Response::json(&net::mmds::with_store(|s| s.data().clone())),
            Request::PutMmds(data) => match net::mmds::with_store(|s| s.put(data)) {
                Ok(()) => Response::no_content(),
                Err(e) => Response::error(400, format!("PUT /mmds: {e}.")),
            },
            Request::PatchMmds(patch) => match net::mmds::with_store(|s| s.patch(&patch)) {
                Ok(()) => Response::no_content(),
                Err(e) => Response::error(400, format!("PATCH /mmds: {e}.")),
            },
            Request::PutMmdsConfig(m) => self.pre_boot("PUT /mmds/config", |c| {
                mmds_address(&m)?;
                for id in &m.network_interfaces {
                    if !c.resources.nets.iter().any(|n| &n.iface_id == id) {
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
                c.resources.mmds = Some(m);
                Ok(())
            }),
            Request::PutPmem(p) => self.pre_boot("PUT /pmem", |c| {
                let what = format!("pmem {}", p.id);
                must_exist(&what, "path_on_host", &p.path_on_host)?;
                let len = std::fs::metadata(&p.path_on_host).map(|m| m.len()).unwrap_or(0);
                if len == 0 || !len.is_multiple_of(virtio::pmem::ALIGNMENT) {
                    return Err(format!(
                        "{what} path_on_host is {len} bytes; its size must be a non-zero multiple of 2 MiB (truncate -s)."
                    ));
                }
                rate_limit(&what, &p.rate_limiter)?;
                if p.root_device && c.resources.pmem.iter().any(|o| o.root_device && o.id != p.id) {
                    return Err(format!("{what}: another pmem device is the root already; only one can be."));
                }
                match c.resources.pmem.iter_mut().find(|o| o.id == p.id) {
                    Some(old) => *old = p,
                    None => c.resources.pmem.push(p),
                }
                Ok(())
            }),
            Request::PatchPmem(p) => self.patch_pmem(p),
            Request::PutDevice(d) => self.pre_boot("PUT /ferrovisor/devices", |c| {
                passthrough_config(&d)?;
                match c.resources.devices.iter_mut().find(|o| o.id == d.id) {
                    Some(old) => *old = d,
                    None => c.resources.devices.push(d),
                }
                Ok(())
            }),
            Request::PutFirewall(iface, rules) => self.put_firewall(iface, rules),
            Request::GetFirewall(iface) => self.get_firewall(&iface),
            Request::PutMemoryHotplug(h) => self.pre_boot("PUT /hotplug/memory", |c| {
                hotplug_config(&h, 0)?;
                c.resources.memory_hotplug = Some(h);
                Ok(())
            }),
            Request::PatchMemoryHotplug(u) => self.patch_memory_hotplug(u.requested_size_mib),
            Request::GetMemoryHotplug => self.memory_hotplug_status(),
            Request::PutCpuConfig(t) => self.pre_boot("PUT /cpu-config", |c| {
                crate::config::cpu_template(&t).map_err(|e| format!("{e}."))?;
                c.resources.cpu_config = Some(t);
                Ok(())
            }),
            Request::PutSerial(s) => self.pre_boot("PUT /serial", |c| {
                serial_config(&s)?;
                c.resources.serial = Some(s);
                Ok(())
            }),
            Request::PutMemory(m) => self.pre_boot("PUT /ferrovisor/memory", |c| {
                memory_options(&m)?;
                c.resources.memory = m;
                Ok(())
            }),
            Request::PutBalloon(b) => self.pre_boot("PUT /balloon", |c| {
                c.resources.balloon = Some(b);
                Ok(())
            }),
            Request::GetBalloon => self.get_balloon(),
            Request::PatchBalloon(u) => self.patch_balloon(u.amount_mib),
            Request::GetBalloonStats => self.balloon_stats(),
            Request::PatchBalloonStats(u) => self.patch_balloon_stats(u.stats_polling_interval_s),
            Request::StartBalloonHinting(s) => {
                self.balloon_hinting(Some(|c: &BalloonControl| c.start_hinting(s.acknowledge_on_stop)))
            }
            Request::StopBalloonHinting => self.balloon_hinting(Some(|c: &BalloonControl| c.stop_hinting())),
            Request::GetBalloonHinting => self.balloon_hinting(None::<fn(&BalloonControl)>),
            Request::Action(ActionType::InstanceStart) => self.instance_start(),
            Request::Action(ActionType::FlushMetrics) => match &self.metrics {
                Some(sink) => match sink.flush() {
                    Ok(()) => Response::no_content(),
                    Err(e) => {
                        Response::error(400, format!("The metrics could not be written ({e}); check metrics_path."))
                    }
                },
                None => {
                    Response::error(400, "FlushMetrics needs a metrics file; PUT /metrics with metrics_path first.")
                }
            },
            Request::Action(ActionType::SendCtrlAltDel) => match &self.vm {
                Some((vm, _)) => {
                    vm.send_ctrl_alt_del();
                    Response::no_content()
                }
                None => before_start("SendCtrlAltDel"),
            },
            Request::PatchVm(state) => self.patch_vm(state),
            Request::CreateSnapshot(params) => self.create_snapshot(params),
            Request::LoadSnapshot(params) => self.load_snapshot(params),
            Request::PutLogger(l) => match &self.logger {
                Some(hook) => match hook(&l) {
                    Ok(()) => Response::no_content(),
                    Err(e) => Response::error(400, e),
                },
                None => Response::error(400, "This VMM has no configurable logger."),
            },
            Request::PutMetrics(m) => match self.open_metrics(Path::new(&m.metrics_path)) {
                Ok(()) => Response::no_content(),
                Err(e) => Response::error(400, e),
            },
            Request::GetStats => match &self.vm {
                Some((vm, _)) => Response::json(&stats_json(vm)),
                None => before_start("GET /ferrovisor/stats"),
            },
            Request::GetMetrics { prometheus: false } => Response::json(&crate::metrics::json()),
            Request::GetMetrics { prometheus: true } => Response::text(crate::metrics::prometheus()),
            Request::Stop => {
                self.latch.set(VmExit::Requested);
                Response::no_content()
            }
        }
    }

    /// Runs `change` if the VM has not started; answers 204 or 400 with its message.
    fn pre_boot(&mut self, what: &str, change: impl FnOnce(&mut Self) -> Result<(), String>) -> Response {
        if self.running() {
            return after_start(what);
        }
        match change(self) {
            Ok(()) => Response::no_content(),
            Err(e) => Response::error(400, e),
        }
    }

    fn set_machine(&mut self, m: models::MachineConfig) -> Result<(), String> {
        let max = self.host_limits().max_cpus();
        if m.vcpu_count == 0 || u32::from(m.vcpu_count) > max {
            return Err(format!("machine-config vcpu_count {} is out of range; use 1 to {max}.", m.vcpu_count));
        }
        let min_mib = arch::memory::MIN_MEMORY >> 20;
        if u64::from(m.mem_size_mib) < min_mib {
            return Err(format!(
                "machine-config mem_size_mib {} is too small; use at least {min_mib}.",
                m.mem_size_mib
            ));
        }
        if m.smt {
            return Err("machine-config smt is not supported; set it to false.".into());
        }
        static_template(&m)?;
        self.resources.machine = m;
        Ok(())
    }

    fn set_drive(&mut self, d: models::Drive) -> Result<(), String> {
        let Some(path) = &d.path_on_host else {
            return Err(format!("drive {}: path_on_host is missing; give the disk image's path.", d.drive_id));
        };
        must_exist(&format!("drive {}", d.drive_id), "path_on_host", path)?;
        sandbox::files::check_drive(Path::new(path), &format!("drive {}: path_on_host", d.drive_id))?;
        if d.drive_id.is_empty() || d.drive_id.len() > 20 {
            return Err("drive_id must be 1 to 20 bytes (it is the disk's serial); shorten it.".into());
        }
        if d.socket.is_some() {
            return Err(format!("drive {}: vhost-user (socket) is not supported; give path_on_host.", d.drive_id));
        }
        if d.io_engine.as_deref().is_some_and(|e| e != "Sync" && e != "Async") {
            return Err(format!("drive {}: io_engine is Sync or Async.", d.drive_id));
        }
        if d.cache_type.as_deref().is_some_and(|c| c != "Unsafe" && c != "Writeback") {
            return Err(format!("drive {}: cache_type is Unsafe or Writeback.", d.drive_id));
        }
        rate_limit(&format!("drive {}", d.drive_id), &d.rate_limiter)?;
        if d.is_root_device && self.resources.drives.iter().any(|o| o.is_root_device && o.drive_id != d.drive_id) {
            return Err(format!("drive {}: another drive is already the root device; only one can be.", d.drive_id));
        }
        match self.resources.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
            Some(old) => *old = d,
            None => self.resources.drives.push(d),
        }
        Ok(())
    }

    fn set_net(&mut self, n: models::NetworkInterface) -> Result<(), String> {
        if n.host_dev_name.is_empty() || n.host_dev_name.len() > 15 {
            return Err(format!("network interface {}: host_dev_name must be 1 to 15 bytes.", n.iface_id));
        }
        if let Some(mac) = &n.guest_mac {
            crate::config::parse_unicast_mac(mac)
                .map_err(|e| format!("network interface {}: guest_mac {e}.", n.iface_id))?;
        }
        rate_limit(&format!("network interface {} rx", n.iface_id), &n.rx_rate_limiter)?;
        rate_limit(&format!("network interface {} tx", n.iface_id), &n.tx_rate_limiter)?;
        if let Some(mtu) = n.mtu.filter(|m| !(68..=65535).contains(m)) {
            return Err(format!("network interface {}: mtu {mtu} is out of range; give 68 to 65535.", n.iface_id));
        }
        match self.resources.nets.iter_mut().find(|o| o.iface_id == n.iface_id) {
            Some(old) => *old = n,
            None => self.resources.nets.push(n),
        }
        Ok(())
    }

    fn patch_drive(&mut self, d: models::PartialDrive) -> Response {
        let Some((vm, config)) = &mut self.vm else { return before_start("PATCH /drives") };
        let Some(disk) = config.disks.iter_mut().find(|o| o.id == d.drive_id) else {
            return Response::error(400, format!("There is no drive {}; PATCH an existing drive_id.", d.drive_id));
        };
        let limit = match rate_limit(&format!("drive {}", d.drive_id), &d.rate_limiter) {
            Ok(limit) => limit,
            Err(e) => return Response::error(400, e),
        };
        if d.rate_limiter.is_some() {
            if let Err(e) = vm.update_disk(&d.drive_id, DeviceChange::RateLimit(limit)) {
                return Response::error(400, format!("drive {}: the rate limiter cannot change ({e}).", d.drive_id));
            }
            disk.rate_limit = limit;
        }
        let Some(path) = d.path_on_host.filter(|p| Path::new(p) != disk.path) else { return Response::no_content() };
        if let Err(e) = sandbox::files::check_drive(Path::new(&path), &format!("drive {}: path_on_host", d.drive_id)) {
            return Response::error(400, e);
        }
        match vm.update_disk(&d.drive_id, DeviceChange::Backing(Path::new(&path))) {
            Ok(()) => {
                disk.path = PathBuf::from(&path);
                if let Some(drive) = self.resources.drives.iter_mut().find(|o| o.drive_id == d.drive_id) {
                    drive.path_on_host = Some(path);
                }
                Response::no_content()
            }
            Err(e) => Response::error(
                400,
                format!("drive {}: the new path_on_host cannot be used ({e}); give a readable disk image.", d.drive_id),
            ),
        }
    }

    /// `PATCH /network-interfaces/{id}`: new rate limiters for a running VM's interface.
    fn patch_network_interface(&mut self, n: models::PartialNetworkInterface) -> Response {
        let Some((vm, config)) = &mut self.vm else { return before_start("PATCH /network-interfaces") };
        let Some(index) = self.resources.nets.iter().position(|o| o.iface_id == n.iface_id) else {
            return Response::error(
                400,
                format!("There is no network interface {}; PATCH an iface_id the VM was started with.", n.iface_id),
            );
        };
        let limits = (
            rate_limit(&format!("network interface {} rx", n.iface_id), &n.rx_rate_limiter),
            rate_limit(&format!("network interface {} tx", n.iface_id), &n.tx_rate_limiter),
        );
        let (rx, tx) = match limits {
            (Ok(rx), Ok(tx)) => (n.rx_rate_limiter.is_some().then_some(rx), n.tx_rate_limiter.is_some().then_some(tx)),
            (Err(e), _) | (_, Err(e)) => return Response::error(400, e),
        };
        if let Err(e) = vm.update_net_rate_limits(index, rx, tx) {
            return Response::error(
                400,
                format!("network interface {}: the rate limiters cannot change ({e}).", n.iface_id),
            );
        }
        let (nic, iface) = (&mut config.nets[index], &mut self.resources.nets[index]);
        if let Some(rx) = rx {
            nic.rx_rate_limit = rx;
            iface.rx_rate_limiter = n.rx_rate_limiter;
        }
        if let Some(tx) = tx {
            nic.tx_rate_limit = tx;
            iface.tx_rate_limiter = n.tx_rate_limiter;
        }
        Response::no_content()
    }

    fn instance_start(&mut self) -> Response {
        if self.running() {
            return Response::error(400, "InstanceStart was already done; the VM is running.");
        }
        let config = match self.vm_config() {
            Ok(c) => c,
            Err(e) => return Response::error(400, e),
        };
        match self.start(config) {
            Ok(()) => Response::no_content(),
            Err(e) => Response::error(400, format!("The VM could not start: {e}")),
        }
    }

    /// The VM configuration the API resources describe.
    fn vm_config(&self) -> Result<VmConfig, String> {
        let r = &self.resources;
        let Some(boot) = &r.boot else {
            return Err("InstanceStart needs a kernel; PUT /boot-source with kernel_image_path first.".into());
        };
        let mut cmdline = boot.boot_args.clone().unwrap_or_else(|| crate::config::DEFAULT_CMDLINE.to_string());
        // The root drive is the first disk (vda); Firecracker names it on the command line.
        let mut drives: Vec<&models::Drive> = r.drives.iter().filter(|d| d.is_root_device).collect();
        drives.extend(r.drives.iter().filter(|d| !d.is_root_device));
        if let Some(root) = drives.first().filter(|d| d.is_root_device) {
            let device = match &root.partuuid {
                Some(uuid) => format!("PARTUUID={uuid}"),
                None => "/dev/vda".into(),
            };
            cmdline.push_str(&format!(" root={device} {}", if root.is_read_only { "ro" } else { "rw" }));
        }
        // A root pmem device is the first (pmem0), when no drive is the root.
        let mut pmem: Vec<&models::Pmem> = r.pmem.iter().filter(|p| p.root_device).collect();
        pmem.extend(r.pmem.iter().filter(|p| !p.root_device));
        if let Some(root) = pmem.first().filter(|p| p.root_device)
            && !drives.first().is_some_and(|d| d.is_root_device)
        {
            cmdline.push_str(&format!(" root=/dev/pmem0 {}", if root.read_only { "ro" } else { "rw" }));
        }
        let mut memory = memory_options(&r.memory)?;
        if r.machine.huge_pages == models::HugePages::TwoMiB {
            memory.hugepages = HugePages::On;
        }
        let (serial, serial_rate_limit) = match &r.serial {
            Some(s) => serial_config(s)?,
            None => (SerialConfig::Stdio, None),
        };
        let nets = r
            .nets
            .iter()
            .map(|n| {
                let mac = n.guest_mac.as_deref().map(crate::config::parse_unicast_mac).transpose()?;
                let mmds = match &r.mmds {
                    Some(m) if m.network_interfaces.contains(&n.iface_id) => Some(mmds_address(m)?),
                    _ => None,
                };
                Ok(NetConfig {
                    attachment: NetAttachment::Tap(n.host_dev_name.clone()),
                    mac,
                    mmds,
                    rx_rate_limit: rate_limit("rx_rate_limiter", &n.rx_rate_limiter)?,
                    tx_rate_limit: rate_limit("tx_rate_limiter", &n.tx_rate_limiter)?,
                    id: Some(n.iface_id.clone()),
                    mtu: n.mtu.and_then(|m| u16::try_from(m).ok()),
                    firewall: r.firewalls.get(&n.iface_id).cloned(),
                    ip: None,
                    poll_us: None,
                    queues: None,
                })
            })
            .collect::<Result<Vec<_>, String>>()?;
        Ok(VmConfig {
            kernel: PathBuf::from(&boot.kernel_image_path),
            initrd: boot.initrd_path.as_ref().map(PathBuf::from),
            cmdline,
            cpus: u32::from(r.machine.vcpu_count),
            memory_mib: u64::from(r.machine.mem_size_mib),
            serial,
            disks: drives
                .iter()
                .map(|d| {
                    Ok(DiskConfig {
                        path: PathBuf::from(d.path_on_host.as_deref().unwrap_or_default()),
                        readonly: d.is_read_only,
                        id: d.drive_id.clone(),
                        rate_limit: rate_limit(&format!("drive {}", d.drive_id), &d.rate_limiter)?,
                        poll_us: None,
                        cache: virtio::blk::CacheMode::Writeback,
                        io_engine: match d.io_engine.as_deref() {
                            Some("Async") => virtio::blk::IoEngine::Async,
                            _ => virtio::blk::IoEngine::Sync,
                        },
                    })
                })
                .collect::<Result<Vec<_>, String>>()?,
            rng: r.entropy.is_some(),
            rng_rate_limit: match &r.entropy {
                Some(e) => rate_limit("entropy", &e.rate_limiter)?,
                None => None,
            },
            console: None,
            nets,
            balloon: r.balloon.as_ref().map(|b| virtio::balloon::BalloonOptions {
                target_mib: b.amount_mib,
                deflate_on_oom: b.deflate_on_oom,
                stats_interval_s: b.stats_polling_interval_s,
                free_page_reporting: b.free_page_reporting,
                free_page_hinting: b.free_page_hinting,
            }),
            pmem: pmem
                .iter()
                .map(|p| {
                    Ok(crate::config::PmemConfig {
                        path: PathBuf::from(&p.path_on_host),
                        readonly: p.read_only,
                        id: p.id.clone(),
                        rate_limit: rate_limit(&format!("pmem {}", p.id), &p.rate_limiter)?,
                    })
                })
                .collect::<Result<Vec<_>, String>>()?,
            memory_hotplug: r.memory_hotplug.as_ref().map(|h| hotplug_config(h, 0)).transpose()?,
            passthrough: r.devices.iter().map(passthrough_config).collect::<Result<Vec<_>, String>>()?,
            vsock: r
                .vsock
                .as_ref()
                .map(|v| VsockConfig { cid: u64::from(v.guest_cid), uds: PathBuf::from(&v.uds_path) }),
            transport: self.transport,
            memory,
            stats_on_exit: false,
            track_dirty_pages: r.machine.track_dirty_pages,
            id: (self.id != DEFAULT_ID).then(|| self.id.clone()),
            output_limit: None,
            serial_rate_limit,
            cpu_template: r.cpu_config.clone(),
            static_cpu_template: match (static_template(&r.machine)?, &r.cpu_config) {
                (Some(_), Some(_)) => {
                    return Err(
                        "machine-config cpu_template and PUT /cpu-config both give a CPU template; keep one.".into()
                    );
                }
                (t, _) => t,
            },
            mmds: r
                .mmds
                .as_ref()
                .map(|_| net::mmds::with_store(|s| MmdsSettings { version: s.version, imds_compat: s.imds_compat })),
        })
    }

    /// `GET /vm/config`: the API resources, or what a command-line VM was started with.
    fn config_file(&self) -> VmConfigFile {
        let r = &self.resources;
        if let Some((_, c)) = &self.vm
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
            ..Default::default()
        }
    }

    fn patch_pmem(&mut self, p: models::PartialPmem) -> Response {
        let Some((vm, config)) = &mut self.vm else { return before_start("PATCH /pmem") };
        let Some(index) = config.pmem.iter().enumerate().position(|(i, o)| o.api_id(i) == p.id) else {
            return Response::error(400, format!("There is no pmem device {}; PATCH an existing id.", p.id));
        };
        let limit = match rate_limit(&format!("pmem {}", p.id), &p.rate_limiter) {
            Ok(limit) => limit,
            Err(e) => return Response::error(400, e),
        };
        if p.rate_limiter.is_some() {
            if let Err(e) = vm.update_pmem(&p.id, DeviceChange::RateLimit(limit)) {
                return Response::error(400, format!("pmem {}: the rate limiter cannot change ({e}).", p.id));
            }
            config.pmem[index].rate_limit = limit;
        }
        Response::no_content()
    }

    /// `PUT /ferrovisor/firewall/{iface_id}`: rules for an interface; on a running VM they
    /// apply at once (the body was checked whole before anything changed).
    fn put_firewall(&mut self, iface: String, rules: net::firewall::RuleSetSpec) -> Response {
        let Some((vm, config)) = &mut self.vm else {
            if !self.resources.nets.iter().any(|n| n.iface_id == iface) {
                return Response::error(
                    400,
                    format!("There is no network interface {iface}; PUT /network-interfaces/{iface} first."),
                );
            }
            self.resources.firewalls.insert(iface, rules);
            return Response::no_content();
        };
        let Some(firewall) = vm.firewall(&iface) else {
            return Response::error(400, format!("The VM has no network interface {iface}; name one it has."));
        };
        let checked = match rules.check() {
            Ok(checked) => checked,
            Err(e) => return Response::error(400, format!("firewall {iface}: {e}.")),
        };
        if let Some(Err(e)) = vm.update_port_rules(&iface, &checked) {
            tracing::warn!("firewall {iface}: the kernel's copy of the rules was not updated ({e})");
        }
        firewall.replace(checked);
        tracing::info!("firewall {iface}: {} rules now", rules.rules.len());
        if let Some(index) = config.nets.iter().enumerate().position(|(i, n)| n.api_id(i) == iface) {
            config.nets[index].firewall = Some(rules.clone());
        }
        self.resources.firewalls.insert(iface, rules);
        Response::no_content()
    }

    fn get_firewall(&self, iface: &str) -> Response {
        match &self.vm {
            Some((vm, _)) => match vm.firewall(iface) {
                Some(firewall) => Response::json(&firewall.report()),
                None => Response::error(400, format!("The VM has no network interface {iface}; name one it has.")),
            },
            None => match self.resources.firewalls.get(iface) {
                Some(rules) => Response::json(rules),
                None => Response::error(400, format!("Interface {iface} has no firewall rules yet; PUT them first.")),
            },
        }
    }

    fn memory_hotplug_control(&self) -> Result<&Arc<virtio::mem::MemControl>, Response> {
        match &self.vm {
            None => Err(before_start("This hotplug memory request")),
            Some((vm, _)) => vm.memory_hotplug().ok_or_else(|| {
                Response::error(400, "The VM has no hotpluggable memory; PUT /hotplug/memory before InstanceStart.")
            }),
        }
    }

    fn patch_memory_hotplug(&mut self, requested_mib: u64) -> Response {
        let control = match self.memory_hotplug_control() {
            Ok(c) => c,
            Err(response) => return response,
        };
        match requested_mib
            .checked_mul(1 << 20)
            .ok_or_else(|| "is too large".to_string())
            .and_then(|bytes| control.set_requested(bytes))
        {
            Ok(()) => Response::no_content(),
            Err(e) => Response::error(400, format!("memory-hotplug requested_size_mib {requested_mib}: {e}.")),
        }
    }

    fn memory_hotplug_status(&self) -> Response {
        let Some((vm, _)) = &self.vm else {
            return match &self.resources.memory_hotplug {
                Some(h) => Response::json(&models::MemoryHotplugStatus {
                    total_size_mib: h.total_size_mib,
                    slot_size_mib: h.slot_size_mib,
                    block_size_mib: h.block_size_mib,
                    plugged_size_mib: 0,
                    requested_size_mib: 0,
                }),
                None => Response::error(400, "No hotpluggable memory is configured; PUT /hotplug/memory first."),
            };
        };
        let (Some(control), Some(h)) = (vm.memory_hotplug(), self.vm.as_ref().and_then(|(_, c)| c.memory_hotplug))
        else {
            return Response::error(
                400,
                "The VM has no hotpluggable memory; PUT /hotplug/memory before InstanceStart.",
            );
        };
        let status = control.status();
        Response::json(&models::MemoryHotplugStatus {
            total_size_mib: h.total_mib,
            slot_size_mib: h.slot_mib,
            block_size_mib: h.block_mib,
            plugged_size_mib: status.plugged_bytes >> 20,
            requested_size_mib: status.requested_bytes >> 20,
        })
    }

    fn balloon_control(&self) -> Result<&Arc<virtio::balloon::BalloonControl>, Response> {
        match &self.vm {
            None => Err(before_start("This balloon request")),
            Some((vm, _)) => vm
                .balloon()
                .ok_or_else(|| Response::error(400, "The VM has no balloon; PUT /balloon before InstanceStart.")),
        }
    }

    /// Free page hinting: `act` on the balloon (start or stop a run), or with none the status.
    fn balloon_hinting(&self, act: Option<impl FnOnce(&BalloonControl)>) -> Response {
        let control = match self.balloon_control() {
            Ok(c) => c,
            Err(r) => return r,
        };
        if !self.vm.as_ref().and_then(|(_, c)| c.balloon).is_some_and(|b| b.free_page_hinting) {
            return Response::error(
                400,
                "Free page hinting is off; PUT /balloon with free_page_hinting: true before InstanceStart.",
            );
        }
        match act {
            Some(act) => {
                act(control);
                Response::no_content()
            }
            None => {
                let h = control.hinting();
                Response::json(&models::BalloonHintingStatus { host_cmd: h.host_cmd, guest_cmd: h.guest_cmd })
            }
        }
    }

    fn get_balloon(&self) -> Response {
        if !self.running() {
            return match &self.resources.balloon {
                Some(b) => Response::json(b),
                None => Response::error(400, "No balloon is configured; PUT /balloon first."),
            };
        }
        let control = match self.balloon_control() {
            Ok(c) => c,
            Err(r) => return r,
        };
        let options = self.vm.as_ref().and_then(|(_, c)| c.balloon).unwrap_or_default();
        Response::json(&models::Balloon {
            amount_mib: control.target_mib(),
            deflate_on_oom: options.deflate_on_oom,
            stats_polling_interval_s: control.stats_interval_s(),
            free_page_reporting: options.free_page_reporting,
            free_page_hinting: options.free_page_hinting,
        })
    }

    fn patch_balloon(&mut self, amount_mib: u32) -> Response {
        let memory_mib = self.vm.as_ref().map_or(0, |(_, c)| c.memory_mib);
        match self.balloon_control() {
            Ok(_) if u64::from(amount_mib) > memory_mib => Response::error(
                400,
                format!("balloon amount_mib {amount_mib} exceeds the guest's {memory_mib} MiB; give a smaller target."),
            ),
            Ok(control) => {
                control.set_target_mib(amount_mib);
                Response::no_content()
            }
            Err(r) => r,
        }
    }

    fn balloon_stats(&self) -> Response {
        let control = match self.balloon_control() {
            Ok(c) => c,
            Err(r) => return r,
        };
        if control.stats_interval_s() == 0 {
            return Response::error(
                400,
                "Balloon statistics are off; PUT /balloon with stats_polling_interval_s above 0 before InstanceStart.",
            );
        }
        let state = control.state();
        let target_mib = control.target_mib();
        let mut stats = models::BalloonStats {
            target_pages: target_mib * 256,
            actual_pages: state.actual_pages,
            target_mib,
            actual_mib: state.actual_pages / 256,
            ..Default::default()
        };
        for (tag, value) in state.stats {
            stats.set_tag(tag, value);
        }
        Response::json(&stats)
    }

    fn patch_balloon_stats(&mut self, seconds: u32) -> Response {
        match self.balloon_control() {
            Ok(c) if c.stats_interval_s() == 0 || seconds == 0 => Response::error(
                400,
                "Balloon statistics can only be turned on or off before InstanceStart; give an interval above 0.",
            ),
            Ok(c) => {
                c.set_stats_interval_s(seconds);
                Response::no_content()
            }
            Err(r) => r,
        }
    }

    fn patch_vm(&mut self, state: VmStateChange) -> Response {
        let Some((vm, _)) = &mut self.vm else { return before_start("PATCH /vm") };
        match state {
            VmStateChange::Paused => match vm.pause() {
                Ok(()) => Response::no_content(),
                Err(e) => Response::error(400, e.to_string()),
            },
            VmStateChange::Resumed => {
                vm.resume();
                Response::no_content()
            }
        }
    }

    fn create_snapshot(&mut self, params: models::SnapshotCreate) -> Response {
        let Some((vm, config)) = &mut self.vm else { return before_start("PUT /snapshot/create") };
        for (field, path) in [("snapshot_path", &params.snapshot_path), ("mem_file_path", &params.mem_file_path)] {
            if path.is_empty() {
                return Response::error(400, format!("PUT /snapshot/create: {field} is empty; give a path."));
            }
        }
        let diff = params.snapshot_type == models::SnapshotType::Diff;
        let started = Instant::now();
        let result =
            vm.snapshot(&self.kvm, config, Path::new(&params.snapshot_path), Path::new(&params.mem_file_path), diff);
        match result {
            Ok(written) => {
                tracing::info!(
                    "{} snapshot written to {} and {} in {:.1} ms ({} pages, {} MiB of memory)",
                    if diff { "diff" } else { "full" },
                    params.snapshot_path,
                    params.mem_file_path,
                    started.elapsed().as_secs_f64() * 1000.0,
                    written.memory_pages,
                    written.memory_bytes >> 20
                );
                Response::no_content()
            }
            Err(e) => Response::error(400, format!("The snapshot was not taken: {}.", e.trim_end_matches('.'))),
        }
    }

    fn load_snapshot(&mut self, params: models::SnapshotLoad) -> Response {
        if self.running() {
            return after_start("PUT /snapshot/load");
        }
        if self.resources.boot.is_some() || !self.resources.drives.is_empty() || !self.resources.nets.is_empty() {
            return Response::error(
                400,
                "PUT /snapshot/load takes the VM's configuration from the snapshot; load it before configuring anything.",
            );
        }
        let mem_path = match (&params.mem_backend, &params.mem_file_path) {
            (Some(models::MemBackend { backend_type: models::MemBackendType::File, backend_path }), None) => {
                backend_path.clone()
            }
            (Some(models::MemBackend { backend_type: models::MemBackendType::Uffd, .. }), None) => {
                return Response::error(400, "mem_backend Uffd is not supported; use backend_type File.");
            }
            (None, Some(path)) => path.clone(),
            (Some(_), Some(_)) => {
                return Response::error(400, "Give mem_backend or mem_file_path, not both; mem_backend is preferred.");
            }
            (None, None) => return Response::error(400, "PUT /snapshot/load needs mem_backend (or mem_file_path)."),
        };
        for (field, path) in [("snapshot_path", &params.snapshot_path), ("memory backend path", &mem_path)] {
            if path.is_empty() {
                return Response::error(400, format!("PUT /snapshot/load: {field} is empty; give a path."));
            }
        }
        let started = Instant::now();
        let mut saved = match crate::snapshot::Snapshot::read(Path::new(&params.snapshot_path)) {
            Ok(s) => s,
            Err(e) => return Response::error(400, format!("The snapshot cannot be loaded: {e}.")),
        };
        if let Err(e) = saved.config.validate_machine(&self.host_limits()) {
            return Response::error(400, format!("The snapshot cannot be loaded: its configuration is refused: {e}"));
        }
        // The new process's serial output goes to its own stdout.
        saved.config.serial = SerialConfig::Stdio;
        // MMDS answers as before the snapshot; its contents are the new process's to fill.
        if let Some(m) = saved.config.mmds {
            let restored = net::mmds::with_store(|s| {
                s.version = m.version;
                s.imds_compat = m.imds_compat;
                saved.mmds_data.take().map_or(Ok(()), |data| s.put(data))
            });
            if let Err(e) = restored {
                return Response::error(
                    400,
                    format!("The snapshot's MMDS contents cannot be restored ({e}); raise --mmds-size-limit."),
                );
            }
        }
        saved.config.track_dirty_pages |= params.enable_diff_snapshots || params.track_dirty_pages;
        if let Err(e) = apply_overrides(&mut saved.config, &params) {
            return Response::error(400, e);
        }
        let restore = crate::vm::Restore { resume: params.resume_vm, clock_realtime: params.clock_realtime };
        match crate::vm::restore(&self.kvm, saved, Path::new(&mem_path), self.launched, &self.latch, restore) {
            Ok((vm, config)) => {
                tracing::info!(
                    "snapshot {} loaded in {:.1} ms ({})",
                    params.snapshot_path,
                    started.elapsed().as_secs_f64() * 1000.0,
                    if params.resume_vm { "running" } else { "paused" }
                );
                self.vm = Some((vm, config));
                match self.sandbox() {
                    Ok(()) => Response::no_content(),
                    Err(e) => {
                        self.latch.set(VmExit::Sandbox(e.clone()));
                        Response::error(500, e)
                    }
                }
            }
            Err(e) => Response::error(400, format!("The snapshot cannot be loaded: {e}")),
        }
    }

    /// Applies a Firecracker configuration file (`--config-file`) and starts the VM.
    pub fn apply_config_file(&mut self, file: VmConfigFile) -> Result<(), String> {
        let mut requests = Vec::new();
        if let Some(l) = file.logger {
            requests.push(Request::PutLogger(l));
        }
        if let Some(m) = file.metrics {
            requests.push(Request::PutMetrics(m));
        }
        if let Some(m) = file.machine_config {
            requests.push(Request::PutMachineConfig(m));
        }
        if let Some(m) = file.memory {
            requests.push(Request::PutMemory(m));
        }
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
        requests.extend(file.mmds_config.map(Request::PutMmdsConfig));
        requests.extend(file.vsock.map(Request::PutVsock));
        requests.extend(file.balloon.map(Request::PutBalloon));
        requests.extend(file.entropy.map(Request::PutEntropy));
        requests.extend(file.serial.map(Request::PutSerial));
        requests.push(Request::Action(ActionType::InstanceStart));
        for request in requests {
            let response = self.handle(request);
            if response.status >= 300 {
                return Err(response.fault_message().unwrap_or(response.body));
            }
        }
        Ok(())
    }
}

/// An assigned device in the VMM's terms: exactly one back-end, named by a path that exists.
fn passthrough_config(d: &models::PassthroughDevice) -> Result<crate::config::PassthroughConfig, String> {
    use crate::config::{PassthroughBackend, PassthroughConfig};
    let what = format!("device {}", d.id);
    let backend = match (&d.vfio, &d.vfio_user) {
        (Some(path), None) => {
            must_exist(&what, "vfio", path)?;
            PassthroughBackend::Vfio(PathBuf::from(path))
        }
        (None, Some(path)) => {
            must_exist(&what, "vfio_user", path)?;
            PassthroughBackend::VfioUser(PathBuf::from(path))
        }
        _ => {
            return Err(format!(
                "{what}: give exactly one of vfio (a sysfs device directory) and vfio_user (a socket)."
            ));
        }
    };
    Ok(PassthroughConfig { id: d.id.clone(), backend })
}

fn must_exist(what: &str, field: &str, path: &str) -> Result<(), String> {
    sandbox::files::not_empty(Path::new(path), &format!("{what} {field}")).map_err(|e| format!("{e}."))?;
    match std::fs::metadata(path) {
        Ok(_) => Ok(()),
        Err(e) => Err(format!("{what} {field} {path} cannot be read ({e}); give an existing file.")),
    }
}

/// A `rate_limiter` in the device's terms; the error names the object and the fix.
fn rate_limit(what: &str, limiter: &Option<models::RateLimiter>) -> Result<Option<RateLimit>, String> {
    let Some(l) = limiter else { return Ok(None) };
    let bucket = |b: models::TokenBucket| BucketConfig {
        size: b.size,
        one_time_burst: b.one_time_burst.unwrap_or(0),
        refill_time: b.refill_time,
    };
    let limit = RateLimit { bandwidth: l.bandwidth.map(bucket), ops: l.ops.map(bucket) };
    limit.check().map_err(|e| format!("{what}: {e}."))?;
    Ok((limit.bandwidth.is_some() || limit.ops.is_some()).then_some(limit))
}

/// The address MMDS answers at: `ipv4_address`, or 169.254.169.254.
fn mmds_address(m: &models::MmdsConfig) -> Result<std::net::Ipv4Addr, String> {
    let Some(text) = &m.ipv4_address else { return Ok(net::mmds::DEFAULT_IPV4) };
    match text.parse::<std::net::Ipv4Addr>() {
        Ok(ip) if !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast()) => Ok(ip),
        _ => Err(format!(
            "mmds-config ipv4_address '{text}' is not a unicast IPv4 address; give one like 169.254.169.254."
        )),
    }
}

/// Where `PUT /serial` sends the output, and its byte budget.
fn serial_config(s: &models::Serial) -> Result<(SerialConfig, Option<BucketConfig>), String> {
    let out = match s.serial_out_path.as_deref() {
        None => SerialConfig::Stdio,
        Some("") => {
            return Err("serial serial_out_path is empty; give a file or FIFO path, or leave it out for stdout.".into());
        }
        Some(path) => SerialConfig::Path(PathBuf::from(path)),
    };
    let limit = match s.rate_limiter {
        Some(b) if b.size == 0 || b.refill_time == 0 => {
            return Err("serial rate_limiter needs a size and a refill_time above 0.".into());
        }
        Some(b) => Some(BucketConfig {
            size: b.size,
            one_time_burst: b.one_time_burst.unwrap_or(0),
            refill_time: b.refill_time,
        }),
        None => None,
    };
    Ok((out, limit))
}

fn memory_options(m: &models::MemoryOptions) -> Result<MemoryOptions, String> {
    let hugepages = match m.hugepages.as_deref() {
        None | Some("off") => HugePages::Off,
        Some("on") => HugePages::On,
        Some("thp") => HugePages::Thp,
        Some(other) => return Err(format!("ferrovisor/memory hugepages is off, on or thp, not '{other}'.")),
    };
    Ok(MemoryOptions { hugepages, mergeable: m.mergeable, shared: m.shared, prefault: m.prefault })
}

/// A command-line VM's configuration in the configuration file's terms.
fn config_file_of(c: &VmConfig) -> VmConfigFile {
    let hugepages = match c.memory.hugepages {
        HugePages::Off => "off",
        HugePages::On => "on",
        HugePages::Thp => "thp",
    };
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
        drives: c
            .disks
            .iter()
            .map(|d| models::Drive {
                drive_id: d.id.clone(),
                is_root_device: false,
                path_on_host: Some(d.path.display().to_string()),
                is_read_only: d.readonly,
                partuuid: None,
                cache_type: None,
                io_engine: (d.io_engine == virtio::blk::IoEngine::Async).then(|| "Async".into()),
                rate_limiter: None,
                socket: None,
            })
            .collect(),
        network_interfaces: c
            .nets
            .iter()
            .enumerate()
            .filter_map(|(i, n)| match &n.attachment {
                NetAttachment::Tap(tap) => Some(models::NetworkInterface {
                    iface_id: n.api_id(i),
                    mtu: n.mtu.map(u32::from),
                    host_dev_name: tap.clone(),
                    guest_mac: n.mac.map(|m| m.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":")),
                    rx_rate_limiter: None,
                    tx_rate_limiter: None,
                }),
                NetAttachment::Switch { .. } | NetAttachment::Network { .. } | NetAttachment::User { .. } => None,
            })
            .collect(),
        vsock: c.vsock.as_ref().map(|v| models::Vsock {
            guest_cid: v.cid as u32,
            uds_path: v.uds.display().to_string(),
            vsock_id: None,
        }),
        balloon: c.balloon.map(|b| models::Balloon {
            amount_mib: b.target_mib,
            deflate_on_oom: b.deflate_on_oom,
            stats_polling_interval_s: b.stats_interval_s,
            free_page_reporting: b.free_page_reporting,
            free_page_hinting: b.free_page_hinting,
        }),
        entropy: c.rng.then(models::Entropy::default),
        devices: c
            .passthrough
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let (vfio, vfio_user) = match &d.backend {
                    crate::config::PassthroughBackend::Vfio(p) => (Some(p.display().to_string()), None),
                    crate::config::PassthroughBackend::VfioUser(p) => (None, Some(p.display().to_string())),
                };
                models::PassthroughDevice { id: d.api_id(i), vfio, vfio_user }
            })
            .collect(),
        memory_hotplug: c.memory_hotplug.map(|h| models::MemoryHotplugConfig {
            total_size_mib: h.total_mib,
            slot_size_mib: h.slot_mib,
            block_size_mib: h.block_mib,
        }),
        memory: Some(models::MemoryOptions {
            hugepages: Some(hugepages.into()),
            mergeable: c.memory.mergeable,
            shared: c.memory.shared,
            prefault: c.memory.prefault,
        }),
        firewall: c.nets.iter().enumerate().filter_map(|(i, n)| Some((n.api_id(i), n.firewall.clone()?))).collect(),
        ..Default::default()
    }
}

fn stats_json(vm: &RunningVm) -> serde_json::Value {
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
