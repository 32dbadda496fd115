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
    migration: Option<Migration>,
    /// Started to receive a VM (`run --incoming`): a migration that brings none ends the VMM.
    incoming_only: bool,
}

/// A migration of this VMM's VM, out or in.
enum Migration {
    Out(crate::migration::send::Outgoing),
    In(crate::migration::receive::Incoming),
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

impl Migration {
    fn ended(&self) -> bool {
        let status = match self {
            Migration::Out(out) => out.status(),
            Migration::In(incoming) => incoming.status(),
        };
        matches!(
            status.phase,
            crate::migration::Phase::Completed | crate::migration::Phase::Failed | crate::migration::Phase::Cancelled
        )
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
            migration: None,
            incoming_only: false,
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
            Request::MigrationSend(m) => self.migrate_out(&m),
            Request::MigrationReceive(m) => self.migrate_in(&m),
            Request::MigrationCancel => match &self.migration {
                Some(Migration::Out(out)) => done(out.cancel()),
                Some(Migration::In(incoming)) => done(incoming.cancel()),
                None => Response::error(400, "No migration is under way."),
            },
            Request::GetMigration => match &self.migration {
                Some(Migration::Out(out)) => Response::json(&out.status()),
                Some(Migration::In(incoming)) => Response::json(&incoming.status()),
                None => Response::error(400, "No migration has started; PUT /ferrovisor/migration/send or receive."),
            },
        }
    }

    /// `PUT /ferrovisor/migration/send`: the running VM starts moving.
    fn migrate_out(&mut self, m: &models::MigrationSend) -> Response {
        if self.migration.as_ref().is_some_and(|m| !m.ended()) {
            return Response::error(400, "A migration is under way already; wait for it or cancel it.");
        }
        let Some((vm, config)) = &mut self.vm else {
            return Response::error(400, before_start("PUT /ferrovisor/migration/send"));
        };
        let outgoing = crate::migration::send::SendOptions::from_request(m)
            .and_then(|options| crate::migration::send::Outgoing::start(vm, config, options, &self.latch));
        match outgoing {
            Ok(out) => {
                self.migration = Some(Migration::Out(out));
                Response::no_content()
            }
            Err(e) => Response::error(400, e),
        }
    }

    /// `PUT /ferrovisor/migration/receive`: this VMM, with nothing configured, waits for a VM.
    fn migrate_in(&mut self, m: &models::MigrationReceive) -> Response {
        if self.vm.is_some() || self.migration.as_ref().is_some_and(|m| !m.ended()) || self.resources.boot.is_some() {
            return Response::error(
                400,
                "PUT /ferrovisor/migration/receive takes the VM from the source; send it to a VMM with nothing configured.",
            );
        }
        match crate::migration::receive::Incoming::start(&m.receiver_url, self.host_limits(), &self.latch) {
            Ok(incoming) => {
                self.migration = Some(Migration::In(incoming));
                Response::no_content()
            }
            Err(e) => Response::error(400, e),
        }
    }

    /// Does what a migration thread asked for: capture the VM on the source, build it here on
    /// the destination.
    fn serve_migration(&mut self) {
        match &self.migration {
            Some(Migration::Out(out)) => {
                if let Some((vm, config)) = &mut self.vm
                    && let crate::migration::send::Outcome::Moved(to) = out.poll(vm, &self.kvm, config)
                {
                    self.latch.set(VmExit::Migrated(to));
                }
            }
            Some(Migration::In(incoming)) => {
                if self.vm.is_none()
                    && self.incoming_only
                    && let Some(Err(e)) = incoming.take_finished()
                {
                    self.latch.set(VmExit::NotReceived(e));
                }
                if let Some((saved, mem)) = incoming.take_arrived() {
                    let incoming = self.migration.take();
                    let result = self.adopt(saved, mem);
                    if let Err(e) = &result {
                        tracing::warn!("migration: the VM that arrived cannot run here: {e}");
                    }
                    if let Some(Migration::In(incoming)) = &incoming {
                        incoming.built(result);
                    }
                    self.migration = incoming;
                }
            }
            None => {}
        }
    }

    /// `run --incoming URL`: waits on `url` for a VM, and ends the VMM if none arrives.
    pub fn receive_at_start(&mut self, url: &str) -> Result<(), String> {
        self.incoming_only = true;
        let response = self.migrate_in(&models::MigrationReceive { receiver_url: url.into() });
        match response.status {
            s if s < 300 => Ok(()),
            _ => Err(response.fault_message().unwrap_or(response.body).replace("receiver_url", "--incoming")),
        }
    }

    /// Builds and resumes a VM that migrated here.
    fn adopt(&mut self, mut saved: crate::snapshot::Snapshot, mem: arch::GuestMemory) -> Result<(), String> {
        saved
            .config
            .validate_machine(&self.host_limits())
            .map_err(|e| format!("the migrated configuration is refused: {e}"))?;
        // The guest's serial output goes to this process's stdout.
        saved.config.serial = crate::config::SerialConfig::Stdio;
        if let Some(m) = saved.config.mmds {
            res::mmds::restore(m, saved.mmds_data.take())?;
        }
        let how = crate::vm::Restore { resume: true, clock_realtime: false };
        let (vm, config) = crate::vm::restore_with_memory(&self.kvm, saved, mem, self.launched, &self.latch, how)
            .map_err(|e| e.to_string())?;
        tracing::info!("migration: the VM runs here");
        self.vm = Some((vm, config));
        self.sandbox()
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
