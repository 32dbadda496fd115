//! The VMM's main thread: it owns the VM, serves API requests one at a time, and waits for the
//! reason the VM stops. Before `InstanceStart` it gathers the configuration, as Firecracker does.
//! What each request means for its resource lives in [`crate::resources`]; here is the
//! lifecycle (not started, running, paused, stopped) and the dispatch.

use std::path::Path;
use std::sync::Arc;
use std::sync::mpsc::Receiver;
use std::time::Instant;

use api::models::{self, ActionType, VmConfigFile, VmStateChange};
use api::{ApiCall, Request, Response};
use kvm_ioctls::Kvm;

use crate::config::VmConfig;
use crate::exit::{ExitLatch, VmExit, Wake};
use crate::metrics::MetricsSink;
use crate::migration::control::{Event, Migrations, build};
use crate::resources::{self as res, Resources, Running, after_start, before_start};
use crate::{HostLimits, VirtioTransport};
use virtio::balloon::BalloonControl;

/// Applies a `PUT /logger` body: level, file; provided by the binary, which owns the logger.
pub type LoggerHook = Box<dyn Fn(&models::Logger) -> Result<(), String>>;

/// The id of a VM started without `--id`, as Firecracker names it.
pub const DEFAULT_ID: &str = "anonymous-instance";

pub struct Controller {
    kvm: Kvm,
    launched: Instant,
    latch: Arc<ExitLatch>,
    resources: Resources,
    /// The running VM and the configuration it was built from.
    vm: Option<Running>,
    metrics: Option<MetricsSink>,
    logger: Option<LoggerHook>,
    /// The instance id (`--id`), shown by `GET /`.
    id: String,
    transport: VirtioTransport,
    migrations: Migrations,
}

/// 204 for done, 400 with the sentence otherwise.
fn done(result: Result<(), String>) -> Response {
    match result {
        Ok(()) => Response::no_content(),
        Err(e) => Response::error(400, e),
    }
}

/// 200 with the answer as JSON, 400 with the sentence otherwise.
fn answer(result: Result<impl serde::Serialize, String>) -> Response {
    match result {
        Ok(value) => Response::json(&value),
        Err(e) => Response::error(400, e),
    }
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
            migrations: Migrations::default(),
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
                    self.serve_migration();
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
    /// here on it serves requests for a running guest. What start-up used and freed goes back
    /// to the host first.
    fn sandbox(&self) -> Result<(), String> {
        crate::footprint::release_startup_memory();
        sandbox::apply(sandbox::ThreadKind::Vmm).map_err(|e| e.to_string())
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
        let running = self.vm.as_ref();
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
            Request::GetVmConfig => {
                Response::json(&res::config_file::export(&self.resources, running.map(|(_, config)| config)))
            }
            Request::GetMachineConfig => Response::json(&self.resources.machine),
            Request::PutMachineConfig(m) => {
                let max_cpus = self.host_limits().max_cpus();
                self.pre_boot("PUT /machine-config", |r| res::machine::put(r, m, max_cpus))
            }
            Request::PatchMachineConfig(u) => {
                let max_cpus = self.host_limits().max_cpus();
                self.pre_boot("PATCH /machine-config", |r| res::machine::patch(r, u, max_cpus))
            }
            Request::PutBootSource(b) => self.pre_boot("PUT /boot-source", |r| res::boot::put(r, b)),
            Request::PutDrive(d) => self.pre_boot("PUT /drives", |r| res::drive::put(r, d)),
            Request::PatchDrive(d) => self.on_vm("PATCH /drives", |vm, r| res::drive::patch(vm, r, d)),
            Request::PutNetworkInterface(n) => self.pre_boot("PUT /network-interfaces", |r| res::net::put(r, n)),
            Request::PatchNetworkInterface(n) => {
                self.on_vm("PATCH /network-interfaces", |vm, r| res::net::patch(vm, r, n))
            }
            Request::PutVsock(v) => self.pre_boot("PUT /vsock", |r| res::vsock::put(r, v)),
            Request::PutEntropy(e) => self.pre_boot("PUT /entropy", |r| res::entropy::put(r, e)),
            Request::GetMmds => Response::json(&res::mmds::get()),
            Request::PutMmds(data) => done(res::mmds::put_data(data)),
            Request::PatchMmds(patch) => done(res::mmds::patch_data(&patch)),
            Request::PutMmdsConfig(m) => self.pre_boot("PUT /mmds/config", |r| res::mmds::put_config(r, m)),
            Request::PutPmem(p) => self.pre_boot("PUT /pmem", |r| res::pmem::put(r, p)),
            Request::PutFs(f) => self.pre_boot("PUT /ferrovisor/fs", |r| res::fs::put(r, f)),
            Request::PatchPmem(p) => self.on_vm("PATCH /pmem", |vm, _| res::pmem::patch(vm, p)),
            Request::PutDevice(d) => self.pre_boot("PUT /ferrovisor/devices", |r| res::devices::put(r, d)),
            Request::PutFirewall(iface, rules) => {
                done(res::firewall::put(self.vm.as_mut(), &mut self.resources, iface, rules))
            }
            Request::GetFirewall(iface) => answer(res::firewall::get(running, &self.resources, &iface)),
            Request::PutMemoryHotplug(h) => self.pre_boot("PUT /hotplug/memory", |r| res::memory_hotplug::put(r, h)),
            Request::PatchMemoryHotplug(u) => done(res::memory_hotplug::set_requested(running, u.requested_size_mib)),
            Request::GetMemoryHotplug => answer(res::memory_hotplug::status(running, &self.resources)),
            Request::PutCpuConfig(t) => self.pre_boot("PUT /cpu-config", |r| res::cpu_config::put(r, t)),
            Request::PutSerial(s) => self.pre_boot("PUT /serial", |r| res::serial::put(r, s)),
            Request::PutMemory(m) => self.pre_boot("PUT /ferrovisor/memory", |r| res::memory::put(r, m)),
            Request::PutBalloon(b) => self.pre_boot("PUT /balloon", |r| res::balloon::put(r, b)),
            Request::GetBalloon => answer(res::balloon::get(running, &self.resources)),
            Request::PatchBalloon(u) => done(res::balloon::set_target(running, u.amount_mib)),
            Request::GetBalloonStats => answer(res::balloon::stats(running)),
            Request::PatchBalloonStats(u) => {
                done(res::balloon::set_stats_interval(running, u.stats_polling_interval_s))
            }
            Request::StartBalloonHinting(s) => done(
                res::balloon::hinting(running, |c: &BalloonControl| c.start_hinting(s.acknowledge_on_stop)).map(drop),
            ),
            Request::StopBalloonHinting => {
                done(res::balloon::hinting(running, |c: &BalloonControl| c.stop_hinting()).map(drop))
            }
            Request::GetBalloonHinting => answer(res::balloon::hinting(running, |_| ())),
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
            Request::Action(ActionType::SendCtrlAltDel) => match running {
                Some((vm, _)) => {
                    vm.send_ctrl_alt_del();
                    Response::no_content()
                }
                None => Response::error(400, before_start("SendCtrlAltDel")),
            },
            Request::PatchVm(state) => self.on_vm("PATCH /vm", |(vm, _), _| match state {
                VmStateChange::Paused => vm.pause().map_err(|e| e.to_string()),
                VmStateChange::Resumed => {
                    vm.resume();
                    Ok(())
                }
            }),
            Request::CreateSnapshot(params) => match &mut self.vm {
                Some(running) => done(res::snapshot::create(running, &self.kvm, &params)),
                None => Response::error(400, before_start("PUT /snapshot/create")),
            },
            Request::LoadSnapshot(params) => self.load_snapshot(params),
            Request::PutLogger(l) => match &self.logger {
                Some(hook) => done(hook(&l)),
                None => Response::error(400, "This VMM has no configurable logger."),
            },
            Request::PutMetrics(m) => done(self.open_metrics(Path::new(&m.metrics_path))),
            Request::GetStats => match running {
                Some((vm, _)) => Response::json(&res::stats::stats(vm)),
                None => Response::error(400, before_start("GET /ferrovisor/stats")),
            },
            Request::GetMetrics { prometheus: false } => Response::json(&crate::metrics::json()),
            Request::GetMetrics { prometheus: true } => Response::text(crate::metrics::prometheus()),
            Request::Stop => {
                self.latch.set(VmExit::Requested);
                Response::no_content()
            }
            Request::MigrationSend(m) => match &mut self.vm {
                Some((vm, config)) => done(self.migrations.send(vm, config, &m, &self.latch)),
                None => Response::error(400, before_start("PUT /ferrovisor/migration/send")),
            },
            Request::MigrationReceive(m) => done(self.receive(&m, false)),
            Request::MigrationCancel => done(self.migrations.cancel()),
            Request::GetMigration => answer(self.migrations.status()),
        }
    }

    /// A VMM with nothing configured waits on `url` for a VM (`only`: `run --incoming`, which
    /// ends if none arrives).
    fn receive(&mut self, m: &api::models::MigrationReceive, only: bool) -> Result<(), String> {
        if self.vm.is_some() || self.resources.boot.is_some() {
            return Err(
                "PUT /ferrovisor/migration/receive takes the VM from the source; send it to a VMM with nothing configured."
                    .into(),
            );
        }
        self.migrations.receive(m, self.host_limits(), &self.latch, only)
    }

    /// `run --incoming URL`: waits on `url` for a VM, and ends the VMM if none arrives.
    pub fn receive_at_start(&mut self, url: &str) -> Result<(), String> {
        let m = api::models::MigrationReceive { receiver_url: url.into(), ..Default::default() };
        self.receive(&m, true).map_err(|e| e.replace("receiver_url", "--incoming"))
    }

    /// Does what a migration thread asked for: capture the VM on the source, build it here on
    /// the destination.
    fn serve_migration(&mut self) {
        let vm = self.vm.as_mut().map(|(vm, config)| (vm, &*config));
        match self.migrations.poll(vm, &self.kvm) {
            Event::Nothing => {}
            Event::Moved(to) => self.latch.set(VmExit::Migrated(to)),
            Event::NotReceived(why) => self.latch.set(VmExit::NotReceived(why)),
            Event::Arrived(arrived) => {
                let limits = self.host_limits();
                let overrides = self.migrations.overrides().cloned();
                let shell = self.migrations.take_shell();
                let built = build(&self.kvm, *arrived, shell, overrides.as_ref(), &limits, self.launched, &self.latch);
                let result = built.and_then(|running| {
                    tracing::info!("migration: the VM runs here");
                    self.vm = Some(running);
                    self.sandbox()
                });
                if let Err(e) = &result {
                    tracing::warn!("migration: the VM that arrived cannot run here: {e}");
                }
                self.migrations.built(result);
            }
        }
    }

    /// Runs `change` on the resources if the VM has not started; answers 204 or 400.
    fn pre_boot(&mut self, what: &str, change: impl FnOnce(&mut Resources) -> Result<(), String>) -> Response {
        if self.vm.is_some() {
            return Response::error(400, after_start(what));
        }
        done(change(&mut self.resources))
    }

    /// Runs `change` on the running VM; answers 204 or 400, and 400 before the start.
    fn on_vm(
        &mut self,
        what: &str,
        change: impl FnOnce(&mut Running, &mut Resources) -> Result<(), String>,
    ) -> Response {
        match &mut self.vm {
            Some(running) => done(change(running, &mut self.resources)),
            None => Response::error(400, before_start(what)),
        }
    }

    fn instance_start(&mut self) -> Response {
        if self.vm.is_some() {
            return Response::error(400, "InstanceStart was already done; the VM is running.");
        }
        let id = (self.id != DEFAULT_ID).then(|| self.id.clone());
        let config = match self.resources.vm_config(id, self.transport) {
            Ok(c) => c,
            Err(e) => return Response::error(400, e),
        };
        match self.start(config) {
            Ok(()) => Response::no_content(),
            Err(e) => Response::error(400, format!("The VM could not start: {e}")),
        }
    }

    fn load_snapshot(&mut self, params: models::SnapshotLoad) -> Response {
        if self.vm.is_some() {
            return Response::error(400, after_start("PUT /snapshot/load"));
        }
        let host = res::snapshot::Host {
            kvm: &self.kvm,
            limits: self.host_limits(),
            launched: self.launched,
            latch: &self.latch,
        };
        match res::snapshot::load(host, &self.resources, &params) {
            Ok(running) => {
                self.vm = Some(running);
                match self.sandbox() {
                    Ok(()) => Response::no_content(),
                    Err(e) => {
                        self.latch.set(VmExit::Sandbox(e.clone()));
                        Response::error(500, e)
                    }
                }
            }
            Err(e) => Response::error(400, e),
        }
    }

    /// Applies a Firecracker configuration file (`--config-file`) and starts the VM.
    pub fn apply_config_file(&mut self, file: VmConfigFile) -> Result<(), String> {
        for request in res::config_file::requests(file)? {
            let response = self.handle(request);
            if response.status >= 300 {
                return Err(response.fault_message().unwrap_or(response.body));
            }
        }
        Ok(())
    }
}
