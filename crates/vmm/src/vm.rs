//! Builds a VM from a [`VmConfig`], runs it until it stops, and tears it down.

use std::fs::File;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_bindings::{KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};
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
use crate::exit::{ExitLatch, VmExit, Wake};
use crate::vcpu::{self, VcpuShared};
use crate::virtio_devices::AttachedDevices;

/// Failures while building or starting a VM; each message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open /dev/kvm ({0}); check that the kvm module is loaded and that you may use /dev/kvm.")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM refused to {what}: {source}.")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("Cannot allocate {mib} MiB of guest memory: {reason}.")]
    Memory { mib: u64, reason: String },
    #[error("Cannot open {what} {path}: {source}.")]
    Open { what: &'static str, path: String, source: std::io::Error },
    #[error("{0}")]
    Boot(#[from] arch::Error),
    #[error("Cannot set up the {what}: {source}.")]
    Host { what: &'static str, source: std::io::Error },
    #[error("Cannot set up a virtio device: {0}.")]
    Device(String),
    #[error("Cannot pause the VM: {0}.")]
    Pause(String),
    #[error("The kernel command line has no room for the virtio devices ({0}); shorten --cmdline.")]
    Cmdline(#[from] linux_loader::cmdline::Error),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

fn host_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Host { what, source }
}

/// Opens KVM; separate so that callers can read its limits before validating a config.
pub fn open_kvm() -> Result<Kvm, Error> {
    Kvm::new().map_err(Error::OpenKvm)
}

/// A VM whose vCPUs run; its devices serve on their own threads.
pub struct RunningVm {
    shared: Arc<VcpuShared>,
    threads: Vec<JoinHandle<()>>,
    devices: AttachedDevices,
    paused: bool,
}

impl RunningVm {
    pub fn balloon(&self) -> Option<&Arc<virtio::balloon::BalloonControl>> {
        self.devices.balloon.as_ref()
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

    /// Stops the vCPU threads and drops the devices.
    pub fn stop(self) {
        vcpu::stop_all(&self.shared, self.threads);
    }
}

/// Boots `config` and blocks until the VM stops. `launched` is when the VMM started, for the
/// boot timer.
pub fn run(kvm: &Kvm, config: &VmConfig, format: KernelFormat, launched: Instant) -> Result<VmExit, Error> {
    let latch = Arc::new(ExitLatch::new().map_err(host_err("exit event"))?);
    let vm = start(kvm, config, format, launched, &latch)?;
    let exit = loop {
        match latch.wait() {
            Wake::Exit(exit) => break exit,
            Wake::Stats => eprintln!("{}", crate::memory::stats(vm.memory())),
            Wake::Poke => {}
        }
    };
    if config.stats_on_exit {
        eprintln!("{}", crate::memory::stats(vm.memory()));
    }
    vm.stop();
    Ok(exit)
}

/// Builds the VM of `config` and starts its vCPUs; stop reasons arrive through `latch`.
pub fn start(
    kvm: &Kvm,
    config: &VmConfig,
    format: KernelFormat,
    launched: Instant,
    latch: &Arc<ExitLatch>,
) -> Result<RunningVm, Error> {
    let vm = Arc::new(kvm.create_vm().map_err(kvm_err("create a VM"))?);
    vm.set_tss_address(KVM_TSS_START as usize).map_err(kvm_err("set the TSS address"))?;
    vm.set_identity_map_address(KVM_IDENTITY_MAP_START).map_err(kvm_err("set the identity map address"))?;
    vm.create_irq_chip().map_err(kvm_err("create the in-kernel irqchip"))?;
    let pit = kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() };
    vm.create_pit2(pit).map_err(kvm_err("create the in-kernel PIT"))?;

    let mem_size = config.memory_bytes();
    let mem = create_memory(&vm, mem_size, &config.memory)?;
    let (mut pio, mut mmio) = create_devices(&vm, config, launched, latch)?;
    let mut cmdline = boot::cmdline(&config.cmdline)?;
    let devices = crate::virtio_devices::attach_all(&vm, &mem, config, &mut pio, &mut mmio, &mut cmdline)?;
    let kernel = load_guest(&mem, config, format, mem_size, &cmdline)?;

    let supported_cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("report its CPUID"))?;
    let mut vcpus = Vec::new();
    for index in 0..config.cpus {
        let vcpu = vm.create_vcpu(u64::from(index)).map_err(kvm_err("create a vCPU"))?;
        arch_vcpu::configure_vcpu(&vcpu, index, config.cpus, &supported_cpuid)?;
        vcpus.push(vcpu);
    }
    arch_vcpu::configure_boot_vcpu(&vcpus[0], &mem, kernel.mode, kernel.entry)?;
    tracing::info!(
        "booting {} with {} vCPU(s) and {} MiB ({:?} entry at {:#x})",
        config.kernel.display(),
        config.cpus,
        config.memory_mib,
        kernel.mode,
        kernel.entry
    );

    vcpu::install_kick_handler().map_err(host_err("vCPU kick signal"))?;
    let run_mmap_size = kvm.get_vcpu_mmap_size().map_err(kvm_err("report the kvm_run size"))?;
    let shared = Arc::new(VcpuShared {
        pio,
        mmio,
        mem,
        latch: latch.clone(),
        stop: AtomicBool::new(false),
        run_mmap_size,
        pause: Default::default(),
    });
    let mut threads = Vec::new();
    for (index, vcpu) in vcpus.into_iter().enumerate() {
        match vcpu::spawn(index as u32, vcpu, shared.clone()) {
            Ok(t) => threads.push(t),
            Err(e) => {
                vcpu::stop_all(&shared, threads);
                return Err(Error::Host { what: "vCPU thread", source: e });
            }
        }
    }
    Ok(RunningVm { shared, threads, devices, paused: false })
}

fn open(path: &std::path::Path, what: &'static str) -> Result<File, Error> {
    File::open(path).map_err(|source| Error::Open { what, path: path.display().to_string(), source })
}

fn create_memory(vm: &VmFd, size: u64, options: &crate::config::MemoryOptions) -> Result<GuestMemory, Error> {
    let mem = crate::memory::create(&memory::ram_regions(size), options)
        .map_err(|e| Error::Memory { mib: size >> 20, reason: e.to_string() })?;
    for (slot, region) in mem.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| Error::Memory { mib: size >> 20, reason: e.to_string() })?;
        let region_desc = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the host range is a live mapping owned by `mem`, which the vCPU threads hold
        // until they have all stopped, so KVM never sees it unmapped while the guest runs.
        unsafe { vm.set_user_memory_region(region_desc) }.map_err(kvm_err("map guest memory"))?;
    }
    Ok(mem)
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
) -> Result<(Bus, Bus), Error> {
    let mut pio = Bus::new();
    let mut mmio = Bus::new();

    let sink = match &config.serial {
        SerialConfig::Stdio => serial::stdout_sink(),
        SerialConfig::File(path) => serial::file_sink(path).map_err(|source| Error::Open {
            what: "serial output file",
            path: path.display().to_string(),
            source,
        })?,
        SerialConfig::None => serial::null_sink(),
    };
    let serial_irq = EventFd::new(libc::EFD_NONBLOCK).map_err(host_err("serial interrupt"))?;
    vm.register_irqfd(&serial_irq, COM1_IRQ).map_err(kvm_err("route the serial interrupt"))?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(serial_irq, sink)));
    // The virtio console takes stdin when it is on stdio.
    if config.serial == SerialConfig::Stdio && config.console != Some(crate::config::ConsoleConfig::Stdio) {
        serial::spawn_input_thread(serial.clone(), std::io::stdin()).map_err(host_err("serial input thread"))?;
    }
    let reset_latch = latch.clone();
    let i8042 = I8042::new(Box::new(move || reset_latch.set(VmExit::Reset)));

    let port_devices: [(u16, u64, SharedDevice); 3] = [
        (COM1_PORT, 8, serial),
        (I8042_PORT, 5, Arc::new(Mutex::new(i8042))),
        (CMOS_PORT, 2, Arc::new(Mutex::new(Cmos::with_host_clock()))),
    ];
    for (port, len, device) in port_devices {
        pio.insert(u64::from(port), len, device).expect("legacy port ranges are disjoint");
    }
    let timer = Arc::new(Mutex::new(BootTimer::new(launched, BOOT_TIMER_MAGIC)));
    mmio.insert(BOOT_TIMER_START, BOOT_TIMER_SIZE, timer).expect("the MMIO bus starts empty");
    Ok((pio, mmio))
}
