//! Builds a VM from a [`VmConfig`], runs it until it stops, and tears it down.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use arch::boot::{self, KernelFormat};
use arch::layout::*;
use arch::{GuestMemory, memory, mptable, vcpu as arch_vcpu};
use devices::boot_timer::BootTimer;
use devices::cmos::Cmos;
use devices::i8042::I8042;
use devices::serial::{self, SerialDevice};
use devices::{Bus, SharedDevice};

use crate::config::{SerialConfig, VmConfig};
use crate::dirty::KvmDirtyLog;
pub use crate::error::Error;
use crate::error::{host_err, kvm_err};
use crate::exit::{ExitLatch, VmExit};
use crate::snapshot;
use crate::vcpu::{self, SharedVcpu, VcpuShared};
use crate::virtio_devices::AttachedDevices;
use virtio::rate_limiter::RateLimit;

/// Opens KVM; separate so that callers can read its limits before validating a config.
pub fn open_kvm() -> Result<Kvm, Error> {
    Kvm::new().map_err(Error::OpenKvm)
}

/// A VM whose vCPUs run; its devices serve on their own threads.
pub struct RunningVm {
    vm: Arc<VmFd>,
    shared: Arc<VcpuShared>,
    vcpus: Vec<SharedVcpu>,
    threads: Vec<sandbox::Thread<()>>,
    devices: AttachedDevices,
    legacy: LegacyDevices,
    paused: bool,
    /// Memory mapped from a snapshot's file rather than anonymous.
    restored: bool,
    /// KVM's record of the pages the vCPUs write.
    kvm_log: Arc<KvmDirtyLog>,
}

/// The legacy devices whose state a snapshot keeps.
struct LegacyDevices {
    serial: Arc<Mutex<SerialDevice>>,
    cmos: Arc<Mutex<Cmos>>,
    i8042: Arc<Mutex<I8042>>,
}

/// The virtio devices' saved states: MMIO transports, then PCI functions.
type SavedVirtio = (Vec<virtio::transport::SavedTransport>, Vec<virtio::pci::SavedPciTransport>);

/// What a snapshot wrote.
pub struct SnapshotWritten {
    pub memory_pages: u64,
    pub memory_bytes: u64,
}

impl RunningVm {
    pub fn balloon(&self) -> Option<&Arc<virtio::balloon::BalloonControl>> {
        self.devices.balloon.as_ref()
    }

    /// Hands `rules` to the kernel's copy of interface `id`'s firewall, if it has one (ports
    /// of managed networks).
    pub fn update_port_rules(&self, id: &str, rules: &net::firewall::RuleSet) -> Option<Result<(), String>> {
        let (_, tap, kernel) = self.devices.port_rules.iter().find(|(i, _, _)| i == id)?;
        Some(kernel.lock().unwrap_or_else(|p| p.into_inner()).update(tap, rules))
    }

    /// The firewall of network interface `id`.
    pub fn firewall(&self, id: &str) -> Option<&Arc<net::firewall::Firewall>> {
        self.devices.firewalls.iter().find(|(i, _)| i == id).map(|(_, f)| f)
    }

    pub fn memory_hotplug(&self) -> Option<&Arc<virtio::mem::MemControl>> {
        self.devices.memory_hotplug.as_ref().map(|(control, _)| control)
    }

    pub fn memory(&self) -> &GuestMemory {
        &self.shared.mem
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }

    /// Stops every vCPU in place; devices keep serving what the guest already queued.
    pub fn pause(&mut self) -> Result<(), Error> {
        if !self.paused {
            vcpu::pause_all(&self.shared, &self.threads).map_err(Error::Pause)?;
            self.paused = true;
            tracing::info!("the VM is paused");
        }
        Ok(())
    }

    pub fn resume(&mut self) {
        if self.paused {
            vcpu::resume_all(&self.shared);
            self.paused = false;
            tracing::info!("the VM resumed");
        }
    }

    /// Changes disk `id` while the guest runs: another image (its driver is told of the change
    /// and of a new size) or another rate limit.
    pub fn update_disk(&self, id: &str, change: crate::virtio_devices::DeviceChange) -> Result<(), String> {
        let (_, update) =
            self.devices.disks.iter().find(|(disk, _)| disk == id).ok_or_else(|| format!("there is no drive {id}"))?;
        update(change)
    }

    /// Announces the guest's MACs on their new ports after a migration: RARP frames now and
    /// twice more over the next 300 ms (as QEMU's self-announce), from a thread of their own,
    /// and each driver that negotiated VIRTIO_NET_F_GUEST_ANNOUNCE is asked to announce its
    /// addresses itself (gratuitous ARP, unsolicited neighbour advertisements).
    pub fn announce_moved(&mut self) {
        let mmio =
            self.devices.mmio.iter().filter(|t| t.lock().unwrap_or_else(|p| p.into_inner()).virtio_state().announce());
        let pci =
            self.devices.pci.iter().filter(|t| t.lock().unwrap_or_else(|p| p.into_inner()).virtio_state().announce());
        let asked = mmio.count() + pci.count();
        if asked > 0 {
            tracing::info!("asked the guest to announce {asked} interface(s) itself (VIRTIO_NET_F_GUEST_ANNOUNCE)");
        }
        let mut announcers = std::mem::take(&mut self.devices.announcers);
        if announcers.is_empty() {
            return;
        }
        let spawned = sandbox::spawn(sandbox::ThreadKind::Net, "announce", move || {
            for (round, wait) in [0u64, 100, 200].into_iter().enumerate() {
                std::thread::sleep(std::time::Duration::from_millis(wait));
                for a in &mut announcers {
                    if let Err(e) = a.announce() {
                        tracing::warn!("the guest's MAC {:02x?} could not be announced ({e})", a.mac());
                    }
                }
                if round == 0 {
                    tracing::info!("announced the guest's {} interface(s) on their new ports (RARP)", announcers.len());
                }
            }
        });
        if let Err(e) = spawned {
            tracing::warn!("the guest's interfaces cannot be announced ({e})");
        }
    }

    /// Changes pmem device `id` while the guest runs (its rate limit).
    pub fn update_pmem(&self, id: &str, change: crate::virtio_devices::DeviceChange) -> Result<(), String> {
        let (_, update) =
            self.devices.pmem.iter().find(|(p, _)| p == id).ok_or_else(|| format!("there is no pmem device {id}"))?;
        update(change)
    }

    /// Changes the rate limits of network interface `index` (in configuration order) while the
    /// guest runs; a direction given as None stays as it is.
    pub fn update_net_rate_limits(
        &self,
        index: usize,
        rx: Option<Option<RateLimit>>,
        tx: Option<Option<RateLimit>>,
    ) -> Result<(), String> {
        let update = self.devices.nets.get(index).ok_or_else(|| format!("there is no network interface {index}"))?;
        update(crate::virtio_devices::DeviceChange::NetRateLimits { rx, tx })
    }

    /// Presses Ctrl-Alt-Del on the i8042 keyboard (a Linux guest reboots).
    pub fn send_ctrl_alt_del(&self) {
        self.legacy.i8042.lock().unwrap_or_else(|p| p.into_inner()).ctrl_alt_del();
    }

    /// Stops the vCPU threads and drops the devices.
    pub fn stop(self) {
        vcpu::stop_all(&self.shared, self.threads);
    }

    /// Writes the state of this paused VM to `state_path` and its memory to `mem_path`: all of
    /// it, or with `diff` only the pages written since the last snapshot (or the start).
    pub fn snapshot(
        &mut self,
        kvm: &Kvm,
        config: &VmConfig,
        state_path: &Path,
        mem_path: &Path,
        diff: bool,
    ) -> Result<SnapshotWritten, String> {
        if !self.paused {
            return Err("the VM is running; pause it first (PATCH /vm with state Paused)".into());
        }
        self.check_movable()?;
        if diff && !config.track_dirty_pages {
            return Err("a diff snapshot needs dirty page tracking; set track_dirty_pages in machine-config".into());
        }
        let result = self.capture_state(kvm, config).and_then(|state| self.write_snapshot(state, mem_path, diff));
        // The devices serve again whatever happened: the VM goes on.
        self.resume_devices();
        let state = result?;
        state.0.write(state_path)?;
        Ok(state.1)
    }

    /// Refuses a VM whose state a snapshot or a migration cannot hold.
    pub fn check_movable(&self) -> Result<(), String> {
        if !self.devices.passthrough.functions.is_empty() {
            return Err(
                "the VM has assigned PCI devices, whose state lives outside the VMM; a snapshot cannot hold them"
                    .into(),
            );
        }
        Ok(())
    }

    /// Quiesces the devices of this paused VM and captures everything but its memory. The
    /// devices stay quiesced until [`Self::resume_devices`].
    pub fn capture_state(&self, kvm: &Kvm, config: &VmConfig) -> Result<snapshot::Snapshot, String> {
        if !self.paused {
            return Err("the VM is running; pause it first".into());
        }
        let (virtio, virtio_pci) = self.save_devices()?;
        let msrs = snapshot::msr_list(kvm)?;
        let mut vcpus = Vec::new();
        for vcpu in &self.vcpus {
            vcpus.push(snapshot::save_vcpu(&vcpu.lock().unwrap_or_else(|p| p.into_inner()), kvm, &msrs)?);
        }
        let (cmos_index, cmos_nvram) = self.legacy.cmos.lock().unwrap_or_else(|p| p.into_inner()).save();
        let devices = snapshot::DeviceStates {
            serial: self.legacy.serial.lock().unwrap_or_else(|p| p.into_inner()).save(),
            cmos_index,
            cmos_nvram,
            i8042_ctr: Some(self.legacy.i8042.lock().unwrap_or_else(|p| p.into_inner()).ctr()),
            virtio,
            virtio_pci,
            pci_address: self
                .devices
                .pci_root
                .as_ref()
                .map_or(0, |r| r.lock().unwrap_or_else(|p| p.into_inner()).address()),
        };
        Ok(snapshot::Snapshot {
            config: config.clone(),
            regions: self.shared.mem.iter().map(|r| (r.start_addr().raw_value(), r.len())).collect(),
            vm: snapshot::save_vm(&self.vm)?,
            vcpus,
            devices,
            mmds_data: config.mmds.map(|_| net::mmds::with_store(|s| s.data().clone())),
        })
    }

    /// Lets the virtio devices serve again after [`Self::capture_state`].
    pub fn resume_devices(&self) {
        for transport in &self.devices.mmio {
            transport.lock().unwrap_or_else(|p| p.into_inner()).resume();
        }
        for transport in &self.devices.pci {
            transport.lock().unwrap_or_else(|p| p.into_inner()).resume();
        }
    }

    /// Turns KVM's dirty log on for all guest memory, whatever the configuration said, and the
    /// host's write tracking where it has it (`migration::written`), and returns what reads
    /// them (with the devices' writes) round after round.
    pub fn track_dirty_pages(&mut self, config: &VmConfig) -> Result<crate::migration::DirtyPages, String> {
        self.kvm_log.prepare(true)?;
        register_memory(&self.vm, &self.shared.mem, config, true).map_err(|e| e.to_string())?;
        let hotplug = self.devices.memory_hotplug.as_ref().map(|(_, blocks)| blocks.clone());
        if let Some(blocks) = &hotplug {
            blocks.log_dirty_pages()?;
        }
        let dirty = crate::migration::DirtyPages::new(self.kvm_log.clone(), self.shared.mem.clone(), hotplug);
        // The bitmap starts all set under manual protection: this read protects every page, and
        // the copy that follows reads all of memory anyway.
        dirty.take()?;
        Ok(dirty)
    }

    /// The guest-address runs of hotpluggable memory the guest has not plugged: they hold
    /// nothing of its own.
    pub fn unplugged_ranges(&self) -> Vec<(u64, u64)> {
        self.devices.memory_hotplug.as_ref().map(|(control, _)| control.unplugged_ranges()).unwrap_or_default()
    }

    /// Whether guest memory is mapped from a snapshot's file (a page not resident still holds
    /// data).
    /// What a migration's auto-converge holds back.
    pub fn vcpus(&self) -> Arc<VcpuShared> {
        self.shared.clone()
    }

    pub fn is_restored(&self) -> bool {
        self.restored
    }

    /// Quiesces every virtio device and returns its state, MMIO and PCI alike.
    fn save_devices(&self) -> Result<SavedVirtio, String> {
        let mmio: Result<Vec<_>, String> =
            self.devices.mmio.iter().map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).save()).collect();
        let pci: Result<Vec<_>, String> =
            self.devices.pci.iter().map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).save()).collect();
        Ok((mmio?, pci?))
    }

    /// Writes the memory of this paused VM, whose `state` was captured; returns them both.
    fn write_snapshot(
        &self,
        state: snapshot::Snapshot,
        mem_path: &Path,
        diff: bool,
    ) -> Result<(snapshot::Snapshot, SnapshotWritten), String> {
        let config = &state.config;
        let mem = &self.shared.mem;
        let hotplug = self.devices.memory_hotplug.as_ref().map(|(_, blocks)| &**blocks);
        if diff && self.kvm_log.overran() {
            return Err("KVM overran a vCPU's dirty ring, so the pages written since the last snapshot are not \
                        all known; take a Full snapshot"
                .into());
        }
        // Reading KVM's dirty log also clears it: every snapshot starts the next diff.
        let logs = match config.track_dirty_pages {
            true => crate::dirty::take_all(&self.kvm_log, mem, hotplug)?,
            false => Vec::new(),
        };
        // Unplugged blocks are written as zeroes: their mapping is the sink, not guest memory.
        let unplugged = self.unplugged_ranges();
        let pages = match (diff, self.restored) {
            (true, _) => snapshot::Pages::Dirty(&logs),
            // A restored VM's absent pages are the old memory file's, not zeroes.
            (false, true) => snapshot::Pages::All,
            (false, false) => snapshot::Pages::AllResident,
        };
        let written = snapshot::write_memory(mem, mem_path, pages, &unplugged)?;
        Ok((state, SnapshotWritten { memory_pages: written.pages, memory_bytes: written.bytes }))
    }
}

/// A VM with no memory and no irqchip yet, and its dirty log (with rings if `config` asks and
/// KVM has them, which must be chosen before the VM has vCPUs), ready if `config` logs from the
/// start.
fn create_vm(kvm: &Kvm, config: &VmConfig) -> Result<(Arc<VmFd>, Arc<KvmDirtyLog>), Error> {
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create a VM"))?);
    vm.set_tss_address(KVM_TSS_START as usize).map_err(kvm_err("set the TSS address"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_START).map_err(kvm_err("set the identity map address"))?;
    let kvm_log = Arc::new(KvmDirtyLog::new(vm.clone(), config.memory.dirty_ring));
    if config.track_dirty_pages {
        kvm_log.prepare(false).map_err(Error::Device)?;
    }
    Ok((vm, kvm_log))
}

/// Registers guest RAM, then creates the irqchip and PIT. In this order on purpose: once a VM
/// has an irqchip, every memory-slot change waits for an SRCU grace period (5-10 ms measured
/// on this host, about half the launch), while before it the same call takes 0.1 ms.
fn add_memory_and_irqchip(vm: &VmFd, mem: &GuestMemory, config: &VmConfig) -> Result<(), Error> {
    register_memory(vm, mem, config, config.track_dirty_pages)?;
    vm.create_irq_chip().map_err(kvm_err("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm_err("create the in-kernel PIT"))?;
    Ok(())
}

/// Builds the VM of `config` and starts its vCPUs; stop reasons arrive through `latch`.
pub fn start(
    kvm: &Kvm,
    config: &VmConfig,
    format: KernelFormat,
    launched: Instant,
    latch: &Arc<ExitLatch>,
) -> Result<RunningVm, Error> {
    let (vm, kvm_log) = create_vm(kvm, config)?;
    let mem_size = config.memory_bytes();
    let ram = memory::ram_regions(mem_size).len();
    let mut memory_options = config.memory;
    // vhost-user back-ends and vfio-user servers reach guest memory by mapping its file.
    memory_options.shared |= config.needs_shared_memory();
    let mem = crate::memory::create(&config.memory_regions(), ram, &memory_options)
        .map_err(|e| Error::Memory { mib: mem_size >> 20, reason: e.to_string() })?;
    add_memory_and_irqchip(&vm, &mem, config)?;
    let (mut pio, mut mmio, legacy) = create_devices(&vm, config, launched, latch, None)?;
    let mut cmdline = boot::cmdline(&config.cmdline)?;
    let devices = crate::virtio_devices::attach_all(&vm, &mem, config, &mut pio, &mut mmio, &mut cmdline)?;
    devices.sync_hotplug()?;
    let kernel = load_guest(&mem, config, format, mem_size, &cmdline)?;

    let vcpus = create_vcpus(kvm, &vm, &kvm_log, config)?;
    arch_vcpu::configure_boot_vcpu(&vcpus[0], &mem, kernel.mode, kernel.entry)?;
    tracing::info!(
        "booting {} with {} vCPU(s) and {} MiB ({:?} entry at {:#x})",
        config.kernel.display(),
        config.cpus,
        config.memory_mib,
        kernel.mode,
        kernel.entry
    );
    launch(kvm, vm, kvm_log, vcpus, VcpuParts { pio, mmio, mem, devices, legacy }, latch, false)
}

/// How a snapshot comes back.
#[derive(Clone, Copy, Debug, Default)]
pub struct Restore {
    /// Run at once rather than paused.
    pub resume: bool,
    /// Advance kvmclock by the wall-clock time since the snapshot.
    pub clock_realtime: bool,
}

/// Rebuilds a snapshotted VM around the memory file `mem_file` (mapped, not copied) and starts
/// its vCPUs, paused unless `how` says to resume.
pub fn restore(
    kvm: &Kvm,
    saved: snapshot::Snapshot,
    mem_file: &Path,
    launched: Instant,
    latch: &Arc<ExitLatch>,
    how: Restore,
) -> Result<(RunningVm, VmConfig), Error> {
    let restore_err = |e: String| Error::Device(format!("the snapshot cannot be restored: {e}"));
    check_restorable(&saved).map_err(restore_err)?;
    // The memory file must be a regular file (not a FIFO to hang on), as long as the regions.
    let file = sandbox::files::open_regular(mem_file, "mem_file_path").map_err(restore_err)?;
    let total: u64 = saved.regions.iter().map(|r| r.1).sum();
    let file_len = file.metadata().map_err(host_err("memory file"))?.len();
    if file_len < total {
        return Err(restore_err(format!(
            "the memory file holds {file_len} bytes where the guest has {total}; give the snapshot's own memory file"
        )));
    }
    let mem = crate::memory::restore(&saved.regions, &file, &saved.config.memory)
        .map_err(|e| Error::Memory { mib: total >> 20, reason: e.to_string() })?;
    let (mut vm, config) = restore_with_memory(kvm, saved, mem, None, launched, latch, how)?;
    vm.restored = true;
    tracing::info!("the VM's memory is mapped from {}", mem_file.display());
    Ok((vm, config))
}

/// The checks of an untrusted snapshot before anything is built for it: its regions must be
/// the ones its memory size lays out (no overlaps, no wrap), and it has no assigned devices.
pub fn check_restorable(saved: &snapshot::Snapshot) -> Result<(), String> {
    if !saved.config.passthrough.is_empty() {
        return Err("it names assigned PCI devices, which snapshots cannot hold".into());
    }
    if saved.regions != saved.config.memory_regions() {
        return Err(format!(
            "its memory regions do not match its {} MiB of memory; take the snapshot again",
            saved.config.memory_mib
        ));
    }
    Ok(())
}

/// What of a VM its configuration and memory alone decide: the VM with its memory and
/// irqchip, and its vCPUs. A migration's destination makes it while pages still arrive, so that
/// the pause is only the state's restore.
pub struct Shell {
    vm: Arc<VmFd>,
    kvm_log: Arc<KvmDirtyLog>,
    vcpus: Vec<VcpuFd>,
    /// The memory KVM maps: kept mapped as long as the VM may run.
    mem: GuestMemory,
}

impl Shell {
    pub fn new(kvm: &Kvm, config: &VmConfig, mem: &GuestMemory) -> Result<Shell, Error> {
        let (vm, kvm_log) = create_vm(kvm, config)?;
        add_memory_and_irqchip(&vm, mem, config)?;
        let vcpus = create_vcpus(kvm, &vm, &kvm_log, config)?;
        Ok(Shell { vm, kvm_log, vcpus, mem: mem.clone() })
    }

    /// Whether this shell maps `mem` (the same mappings, not a copy).
    fn maps(&self, mem: &GuestMemory) -> bool {
        let hosts = |m: &GuestMemory| m.iter().map(|r| (r.start_addr(), r.as_ptr(), r.len())).collect::<Vec<_>>();
        hosts(&self.mem) == hosts(mem)
    }
}

/// Rebuilds the VM of `saved` around `mem`, which already holds its memory (mapped from a
/// memory file, or received from a migration), in `shell` if one was made for that memory,
/// and starts its vCPUs, paused unless `how` says to resume. [`check_restorable`] must have
/// accepted `saved`.
pub fn restore_with_memory(
    kvm: &Kvm,
    saved: snapshot::Snapshot,
    mem: GuestMemory,
    shell: Option<Shell>,
    launched: Instant,
    latch: &Arc<ExitLatch>,
    how: Restore,
) -> Result<(RunningVm, VmConfig), Error> {
    let config = saved.config;
    let restore_err = |e: String| Error::Device(format!("the snapshot cannot be restored: {e}"));
    if saved.vcpus.len() != config.cpus as usize {
        return Err(restore_err("its vCPU count differs from its configuration".into()));
    }
    let Shell { vm, kvm_log, vcpus, .. } = match shell {
        Some(shell) if shell.maps(&mem) && shell.vcpus.len() == config.cpus as usize => shell,
        _ => Shell::new(kvm, &config, &mem)?,
    };
    snapshot::restore_vm(&vm, &saved.vm, how.clock_realtime).map_err(restore_err)?;
    let (mut pio, mut mmio, legacy) = create_devices(&vm, &config, launched, latch, Some(&saved.devices))?;
    let mut cmdline = boot::cmdline(&config.cmdline)?;
    let devices = crate::virtio_devices::attach_all(&vm, &mem, &config, &mut pio, &mut mmio, &mut cmdline)?;
    if devices.mmio.len() != saved.devices.virtio.len() || devices.pci.len() != saved.devices.virtio_pci.len() {
        return Err(restore_err("its virtio devices differ from its configuration".into()));
    }
    for (transport, state) in devices.mmio.iter().zip(&saved.devices.virtio) {
        transport.lock().unwrap_or_else(|p| p.into_inner()).restore(state).map_err(restore_err)?;
    }
    for (transport, state) in devices.pci.iter().zip(&saved.devices.virtio_pci) {
        transport.lock().unwrap_or_else(|p| p.into_inner()).restore(state).map_err(restore_err)?;
    }
    if let Some(root) = &devices.pci_root {
        root.lock().unwrap_or_else(|p| p.into_inner()).set_address(saved.devices.pci_address);
    }
    devices.sync_hotplug()?;
    for (vcpu, state) in vcpus.iter().zip(&saved.vcpus) {
        snapshot::restore_vcpu(vcpu, state).map_err(restore_err)?;
    }
    if let Some(drift) = vcpus.first().zip(saved.vcpus.first()).and_then(|(v, s)| snapshot::tsc_drift_seconds(v, s))
        && drift.abs() > 1.0
    {
        tracing::warn!(
            "KVM did not give the vCPUs the snapshot's TSC: it reads {drift:.1} s from it, so a guest clocked by \
             its TSC sees its time jump by as much (this host's KVM cannot offset a guest's TSC)"
        );
    }
    tracing::info!("restored a VM with {} vCPU(s) and {} MiB", config.cpus, config.memory_mib);
    let vm = launch(kvm, vm, kvm_log, vcpus, VcpuParts { pio, mmio, mem, devices, legacy }, latch, !how.resume)?;
    Ok((vm, config))
}

/// What the vCPU threads and the VM handle are made of.
struct VcpuParts {
    pio: Bus,
    mmio: Bus,
    mem: GuestMemory,
    devices: AttachedDevices,
    legacy: LegacyDevices,
}

fn create_vcpus(kvm: &Kvm, vm: &VmFd, kvm_log: &KvmDirtyLog, config: &VmConfig) -> Result<Vec<VcpuFd>, Error> {
    let mut supported_cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("report its CPUID"))?;
    if let Some(name) = &config.static_cpu_template
        && let Some(t) = arch::cpu_template::StaticTemplate::parse(name).map_err(Error::CpuTemplate)?
    {
        let hidden = t.apply(&mut supported_cpuid);
        tracing::info!("CPU template {name}: hides {hidden} CPUID features this host has");
    }
    let template =
        config.cpu_template.as_ref().map(crate::config::cpu_template).transpose().map_err(Error::CpuTemplate)?;
    for &cap in template.iter().flat_map(|t| &t.required_capabilities) {
        if kvm.check_extension_raw(u64::from(cap)) <= 0 {
            return Err(Error::CpuTemplate(format!(
                "this host's KVM lacks capability {cap} that kvm_capabilities requires; remove it or use another host"
            )));
        }
    }
    if let Some(t) = &template {
        tracing::info!("CPU template: {} CPUID and {} MSR modifiers", t.cpuid.len(), t.msrs.len());
    }
    let mut vcpus = Vec::new();
    for index in 0..config.cpus {
        let vcpu = vm.create_vcpu(u64::from(index)).map_err(kvm_err("create a vCPU"))?;
        kvm_log.attach(&vcpu).map_err(Error::Device)?;
        arch_vcpu::configure_vcpu(&vcpu, index, config.cpus, &supported_cpuid, template.as_ref())?;
        vcpus.push(vcpu);
    }
    Ok(vcpus)
}

/// Starts a thread per vCPU, parked at once when `paused`.
fn launch(
    kvm: &Kvm,
    vm: Arc<VmFd>,
    kvm_log: Arc<KvmDirtyLog>,
    vcpus: Vec<VcpuFd>,
    parts: VcpuParts,
    latch: &Arc<ExitLatch>,
    paused: bool,
) -> Result<RunningVm, Error> {
    vcpu::install_kick_handler().map_err(host_err("vCPU kick signal"))?;
    let run_mmap_size = kvm.get_vcpu_mmap_size().map_err(kvm_err("report the kvm_run size"))?;
    let VcpuParts { pio, mmio, mem, devices, legacy } = parts;
    let shared = Arc::new(VcpuShared {
        pio,
        mmio,
        mem,
        kvm_log: kvm_log.clone(),
        latch: latch.clone(),
        stop: AtomicBool::new(false),
        run_mmap_size,
        pause: Default::default(),
        running: Default::default(),
    });
    if paused {
        shared.pause.request(true);
    }
    let vcpus: Vec<SharedVcpu> = vcpus.into_iter().map(|v| Arc::new(Mutex::new(v))).collect();
    let threads = spawn_vcpus(&vcpus, &shared)?;
    Ok(RunningVm { vm, shared, vcpus, threads, devices, legacy, paused, restored: false, kvm_log })
}

fn spawn_vcpus(vcpus: &[SharedVcpu], shared: &Arc<VcpuShared>) -> Result<Vec<sandbox::Thread<()>>, Error> {
    let mut threads = Vec::new();
    for (index, vcpu) in vcpus.iter().enumerate() {
        match vcpu::spawn(index as u32, vcpu.clone(), shared.clone()) {
            Ok(t) => threads.push(t),
            Err(e) => {
                vcpu::stop_all(shared, threads);
                return Err(Error::Host { what: "vCPU thread", source: e });
            }
        }
    }
    Ok(threads)
}

fn open(path: &std::path::Path, what: &'static str) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::Open { what, path: path.display().to_string(), source })
}

/// Hands guest RAM to KVM, one slot per region, logging dirty pages when asked. Hotpluggable
/// memory gets its slots block by block as the guest plugs them (see `hotplug`).
fn register_memory(vm: &VmFd, mem: &GuestMemory, config: &VmConfig, log_dirty: bool) -> Result<(), Error> {
    let flags = if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 };
    let hotplug_start = config.hotplug_region().map(|(start, _)| start);
    for (slot, region) in mem.iter().enumerate() {
        if Some(region.start_addr().raw_value()) == hotplug_start {
            continue;
        }
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Memory { mib: region.len() >> 20, reason: e.to_string() })?;
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range is a live mapping owned by `mem`, which the vCPU threads hold
        // until they have all stopped, so KVM never sees it unmapped while the guest runs.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(kvm_err("map guest memory"))?;
    }
    Ok(())
}

/// Writes everything the kernel finds at entry except the vCPU state.
fn load_guest(
    mem: &GuestMemory,
    config: &VmConfig,
    format: KernelFormat,
    mem_size: u64,
    cmdline: &linux_loader::cmdline::Cmdline,
) -> Result<boot::LoadedKernel, Error> {
    let kernel = boot::load_kernel(mem, &mut open(&config.kernel, "kernel")?, format)?;
    let initrd = match &config.initrd {
        Some(path) => Some(boot::load_initrd(mem, &mut open(path, "initrd")?, kernel.end, mem_size)?),
        None => None,
    };
    boot::write_boot_info(mem, &kernel, cmdline, initrd, mem_size)?;
    mptable::write_mptable(mem, config.cpus)?;
    Ok(kernel)
}

fn create_devices(
    vm: &VmFd,
    config: &VmConfig,
    launched: Instant,
    latch: &Arc<ExitLatch>,
    saved: Option<&snapshot::DeviceStates>,
) -> Result<(Bus, Bus, LegacyDevices), Error> {
    let mut pio = Bus::new();
    let mut mmio = Bus::new();

    let sink = match &config.serial {
        SerialConfig::Stdio => serial::stdout_sink(),
        SerialConfig::File(path) => serial::file_sink(path, config.output_limit).map_err(|source| Error::Open {
            what: "serial output file",
            path: path.display().to_string(),
            source,
        })?,
        SerialConfig::Path(path) => serial::path_sink(path).map_err(|source| Error::Open {
            what: "serial_out_path",
            path: path.display().to_string(),
            source,
        })?,
        SerialConfig::None => serial::null_sink(),
    };
    let sink: serial::SerialSink = match config.serial_rate_limit {
        Some(bucket) => {
            let mut bucket = virtio::rate_limiter::DroppingBucket::new(bucket);
            Box::new(serial::Limited { inner: sink, allow: Box::new(move |n| bucket.take(n as u64) as usize) })
        }
        None => sink,
    };
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(host_err("serial interrupt"))?;
    vm.register_irqfd(&serial_irq, COM1_IRQ).map_err(kvm_err("route the serial interrupt"))?;
    let serial = match saved {
        Some(saved) => SerialDevice::restored(serial_irq, sink, &saved.serial).map_err(host_err("serial port"))?,
        None => SerialDevice::new(serial_irq, sink),
    };
    let serial = Arc::new(Mutex::new(serial));
    // The virtio console takes stdin when it is on stdio.
    if config.serial == SerialConfig::Stdio && config.console != Some(crate::config::ConsoleConfig::Stdio) {
        serial::spawn_input_thread(serial.clone(), std::io::stdin()).map_err(host_err("serial input thread"))?;
    }
    let reset_latch = latch.clone();
    let keyboard_irq = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC).map_err(host_err("keyboard interrupt"))?;
    vm.register_irqfd(&keyboard_irq, I8042_IRQ).map_err(kvm_err("route the keyboard interrupt"))?;
    let mut i8042 = I8042::new(Box::new(move || reset_latch.set(VmExit::Reset))).with_irq(keyboard_irq);
    if let Some(ctr) = saved.and_then(|s| s.i8042_ctr) {
        i8042.set_ctr(ctr);
    }
    let i8042 = Arc::new(Mutex::new(i8042));

    let mut cmos = Cmos::with_host_clock();
    if let Some(saved) = saved {
        cmos.restore(saved.cmos_index, &saved.cmos_nvram);
    }
    let cmos = Arc::new(Mutex::new(cmos));
    let port_devices: [(u16, u64, SharedDevice); 3] =
        [(COM1_PORT, 8, serial.clone()), (I8042_PORT, 5, i8042.clone()), (CMOS_PORT, 2, cmos.clone())];
    for (port, len, device) in port_devices {
        pio.insert(u64::from(port), len, device).expect("legacy port ranges are disjoint");
    }
    let timer = Arc::new(Mutex::new(BootTimer::new(launched, BOOT_TIMER_MAGIC)));
    mmio.insert(BOOT_TIMER_START, BOOT_TIMER_SIZE, timer).expect("the MMIO bus starts empty");
    Ok((pio, mmio, LegacyDevices { serial, cmos, i8042 }))
}
