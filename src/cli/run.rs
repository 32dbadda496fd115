//! `ferrovisor run`: boot a kernel in a new VM, configured on the command line, and run it until
//! it stops.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use vmm::config::DEFAULT_CMDLINE;
use vmm::{ConsoleConfig, DiskConfig, MemorySpec, NetConfig, SerialConfig, VirtioTransport, VmConfig, VsockConfig};

use super::{EXIT_FAILURE, api_server, controller, finish, usage};
use crate::logging;

#[derive(clap::Args)]
pub struct RunArgs {
    /// Kernel image: an ELF vmlinux (PVH or 64-bit entry) or a bzImage.
    #[arg(long, required_unless_present = "incoming")]
    kernel: Option<PathBuf>,
    /// Wait at URL (unix:PATH or tcp:HOST:PORT) for a VM migrating here, as QEMU's -incoming;
    /// its configuration comes with it, so no other VM option is given.
    #[arg(long, value_name = "URL", conflicts_with = "kernel")]
    incoming: Option<String>,
    /// An initramfs to load beside the kernel.
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE)]
    cmdline: String,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    cpus: u32,
    /// Guest RAM: MiB, or size=MiB[,hugepages=off|on|thp][,mergeable=on][,shared=on][,prefault=on].
    #[arg(long, default_value = "128")]
    memory: MemorySpec,
    /// Print the memory statistics (RSS, guest share, huge pages, KSM) when the VM stops;
    /// SIGUSR1 prints them at any time.
    #[arg(long)]
    stats_on_exit: bool,
    /// Where COM1 goes: stdio, file:PATH or none.
    #[arg(long, default_value = "stdio")]
    serial: SerialConfig,
    /// A virtio-blk disk: path=IMAGE[,readonly=on][,id=NAME], or one a vhost-user back-end
    /// serves: vhost_user=SOCKET[,num_queues=N][,queue_size=N]; repeat for more disks.
    #[arg(long = "disk")]
    disks: Vec<DiskConfig>,
    /// A virtio-rng device fed by the host's getrandom.
    #[arg(long)]
    rng: bool,
    /// A virtio console (hvc0): stdio, file:PATH or pty.
    #[arg(long)]
    console: Option<ConsoleConfig>,
    /// A virtio-net interface: tap=NAME (created if absent), switch=PATH[,vlan=N],
    /// network=NAME[,isolated=on] or user[,hostfwd=tcp:127.0.0.1:HPORT-:GPORT]; [,mac=02:..];
    /// on a TAP [,queues=N] queue pairs (default: one per vCPU); or vhost_user=SOCKET[,queue_size=N]
    /// (a vhost-user back-end serves it).
    #[arg(long = "net")]
    nets: Vec<NetConfig>,
    /// A virtio-balloon: size=MiB (the target)[,deflate_on_oom=on][,stats=on][,free_page_reporting=on].
    #[arg(long, value_parser = vmm::config::parse_balloon)]
    balloon: Option<virtio::balloon::BalloonOptions>,
    /// A virtio-vsock device: cid=N,uds=PATH (host connections through the Unix socket PATH).
    #[arg(long)]
    vsock: Option<VsockConfig>,
    /// A file as persistent memory (virtio-pmem): path=FILE[,readonly=on]; repeatable. Its size
    /// must be a multiple of 2 MiB.
    #[arg(long)]
    pmem: Vec<vmm::config::PmemConfig>,
    /// A directory shared through virtio-fs, served by a vhost-user back-end such as virtiofsd:
    /// tag=TAG,socket=PATH[,num_queues=N][,queue_size=N]; repeatable. The guest mounts TAG.
    #[arg(long)]
    fs: Vec<vmm::config::FsConfig>,
    /// An assigned PCI device: vfio=/sys/bus/pci/devices/DDDD:BB:DD.F (kernel VFIO) or
    /// vfio-user=SOCKET (a device served by another process), with an optional id=; repeatable.
    #[arg(long = "device")]
    devices: Vec<vmm::config::PassthroughConfig>,
    /// Hotpluggable memory (virtio-mem), in MiB: total=N[,block=2][,slot=128][,requested=0].
    /// It lies above RAM; the guest plugs blocks of it as `PATCH /hotplug/memory` asks.
    #[arg(long)]
    memory_hotplug: Option<vmm::config::MemoryHotplugConfig>,
    /// The most bytes the guest may write to a --serial or --console output file; the rest is
    /// dropped (no limit by default).
    #[arg(long, value_name = "BYTES")]
    output_limit: Option<u64>,
    /// How virtio devices attach: mmio (announced on the command line) or pci (MSI-X).
    #[arg(long, default_value = "mmio")]
    virtio_transport: VirtioTransport,
    /// Also serve the REST API on this Unix socket (pause, balloon, stats, metrics).
    #[arg(long)]
    api_sock: Option<PathBuf>,
}

pub fn run(args: RunArgs, id: String, launched: Instant, logger: logging::Logger) -> ExitCode {
    if let Some(url) = &args.incoming {
        return incoming(url, args.api_sock.as_deref(), launched, logger);
    }
    let config = VmConfig {
        kernel: args.kernel.unwrap_or_default(),
        initrd: args.initrd,
        cmdline: args.cmdline,
        cpus: args.cpus,
        memory_mib: args.memory.size_mib,
        serial: args.serial,
        disks: args.disks,
        rng: args.rng,
        rng_rate_limit: None,
        console: args.console,
        nets: args.nets,
        balloon: args.balloon,
        vsock: args.vsock,
        pmem: args.pmem,
        fs: args.fs,
        memory_hotplug: args.memory_hotplug,
        passthrough: args.devices,
        transport: args.virtio_transport,
        memory: args.memory.options,
        stats_on_exit: args.stats_on_exit,
        track_dirty_pages: false,
        id: (id != vmm::controller::DEFAULT_ID).then_some(id),
        output_limit: args.output_limit,
        serial_rate_limit: None,
        cpu_template: None,
        static_cpu_template: None,
        mmds: None,
    };
    let (mut controller, latch) = match controller(launched, logger) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let format = match config.validate(&controller.host_limits()) {
        Ok(format) => format,
        Err(e) => return usage(e),
    };
    let server = match args.api_sock.as_deref().map(|p| api_server(p, &latch)).transpose() {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Err(e) = controller.boot(config, format) {
        tracing::error!("{e}");
        return ExitCode::from(EXIT_FAILURE);
    }
    let (server, calls) = server.unzip();
    let exit = controller.run(calls);
    drop(server);
    finish(exit)
}

/// `run --incoming URL`: no VM until one migrates here; it then runs as if started here.
fn incoming(url: &str, api_sock: Option<&std::path::Path>, launched: Instant, logger: logging::Logger) -> ExitCode {
    let (mut controller, latch) = match controller(launched, logger) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let server = match api_sock.map(|p| api_server(p, &latch)).transpose() {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Err(e) = controller.receive_at_start(url) {
        return usage(e);
    }
    let (server, calls) = server.unzip();
    let exit = controller.run(calls);
    drop(server);
    finish(exit)
}
