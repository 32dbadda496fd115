//! `ferrovisor`: the command line of the Ferrovisor VMM.

mod logging;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};
use std::time::Instant;

use api::models::VmConfigFile;
use api::{ApiCall, Server};
use clap::{Parser, Subcommand};
use vmm::controller::Controller;
use vmm::exit::ExitLatch;
use vmm::{
    ConsoleConfig, DiskConfig, MemorySpec, NetConfig, SerialConfig, VirtioTransport, VmConfig, VmExit, VsockConfig,
    config::DEFAULT_CMDLINE,
};

/// Exit status for bad user input, as clap uses for bad arguments.
const EXIT_USAGE: u8 = 2;
const EXIT_FAILURE: u8 = 1;

#[derive(Parser)]
#[command(
    name = "ferrovisor",
    version,
    about = "A virtual machine monitor on Linux KVM.",
    after_help = "Without a subcommand, Ferrovisor serves Firecracker's API on --api-sock and starts the VM when \
                  told to (InstanceStart), or at once from --config-file. It takes Firecracker's command line, so \
                  that it can be installed as `firecracker` (and its jailer as `jailer`)."
)]
struct Cli {
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides it).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    /// Firecracker's log level: Error, Warning, Info, Debug, Trace or Off (overrides --log-level).
    #[arg(long)]
    level: Option<String>,
    /// Append the log to this file or FIFO instead of stderr.
    #[arg(long)]
    log_path: Option<PathBuf>,
    /// Only log this module (crate) at --level, the rest at warn.
    #[arg(long)]
    module: Option<String>,
    /// Show each line's level (it always is).
    #[arg(long)]
    show_level: bool,
    /// Show the file and line each log line comes from.
    #[arg(long)]
    show_log_origin: bool,
    /// Serve the REST API (Firecracker's) on this Unix socket [default: /run/firecracker.socket].
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// The VM's id (1 to 64 letters, digits and dashes), shown by GET /; default MACs derive
    /// from it, so that a relaunched VM keeps its addresses.
    #[arg(long, global = true, default_value = vmm::controller::DEFAULT_ID)]
    id: String,
    /// Start the VM from this Firecracker-format JSON configuration.
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// Serve no API (needs --config-file).
    #[arg(long)]
    no_api: bool,
    /// Run every thread without its seccomp filter.
    #[arg(long, global = true)]
    no_seccomp: bool,
    /// seccomp filters from FILE (seccompiler's JSON, or Firecracker's compiled BPF) instead of
    /// Ferrovisor's own; thread kinds the file does not name keep theirs.
    #[arg(long, global = true, conflicts_with = "no_seccomp")]
    seccomp_filter: Option<PathBuf>,
    /// Write metrics (JSON lines) to this file or FIFO, as PUT /metrics does.
    #[arg(long)]
    metrics_path: Option<PathBuf>,
    /// The boot timer device (Ferrovisor always has one, at port 0x440 as in Firecracker).
    #[arg(long)]
    boot_timer: bool,
    /// The largest API request body, in bytes.
    #[arg(long, default_value_t = api::http::DEFAULT_MAX_BODY)]
    http_api_max_payload_size: usize,
    /// The most bytes of JSON the MMDS store holds.
    #[arg(long)]
    mmds_size_limit: Option<usize>,
    /// A JSON file: the MMDS contents at start-up.
    #[arg(long)]
    metadata: Option<PathBuf>,
    /// When the jailer started, in microseconds of wall-clock time (set by the jailer).
    #[arg(long)]
    start_time_us: Option<u64>,
    /// The jailer's process CPU time at that moment, in microseconds.
    #[arg(long)]
    start_time_cpu_us: Option<u64>,
    /// The jailer's parent's CPU time, in microseconds.
    #[arg(long)]
    parent_cpu_time_us: Option<u64>,
    /// Attach virtio devices over PCI (MSI-X) instead of MMIO.
    #[arg(long)]
    enable_pci: bool,
    /// Print the format version of the snapshot state FILE and exit.
    #[arg(long, value_name = "FILE")]
    describe_snapshot: Option<PathBuf>,
    /// Print the snapshot format version this Ferrovisor writes and exit.
    #[arg(long)]
    snapshot_version: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

/// Firecracker's default API socket.
const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel in a new VM and run it until it stops.
    Run(Box<RunArgs>),
    /// Run a user-space L2 switch on the Unix socket PATH (no root needed); VMs plug in with
    /// --net switch=PATH[,vlan=N]. Runs until SIGINT or SIGTERM.
    Switch {
        path: PathBuf,
        /// A MAC stays with the port that first sent from it until that port leaves (no
        /// aging, no moving).
        #[arg(long)]
        sticky_macs: bool,
    },
    /// Serve the test DMA engine, a small PCI device, over vfio-user on the Unix socket PATH,
    /// for VMs started with --device vfio-user=PATH. Runs until killed.
    DeviceServer {
        socket: PathBuf,
        /// The size of BAR 2, the memory the VMM maps into the guest: a power of two, in KiB.
        #[arg(long, default_value_t = 64)]
        shared_bar_kib: u64,
    },
    /// Managed networks (nat, routed, isolated, bridge) that VMs join with --net network=NAME.
    Network {
        #[command(subcommand)]
        action: NetworkAction,
    },
    /// Firewall rule sets: store named ones for `--net ...,firewall=@NAME`, show a running
    /// VM's rules with their counters and flows, or put new rules on it.
    Firewall {
        #[command(subcommand)]
        action: FirewallAction,
    },
    /// Turn the host's KSM daemon on or off, or show what it shares (root for on and off).
    Ksm {
        #[arg(value_parser = ["on", "off", "status"])]
        action: String,
    },
    /// Control a running VMM through its API socket.
    Ctl {
        /// The VMM's --api-sock.
        socket: PathBuf,
        #[command(subcommand)]
        action: CtlAction,
    },
    /// Apply a diff snapshot's memory file onto a base memory file (in place), so that the
    /// diff's state file loads with it.
    SnapshotMerge {
        /// The full snapshot's memory file; it is overwritten with the diff's pages.
        #[arg(long)]
        base: PathBuf,
        /// The diff snapshot's memory file.
        #[arg(long)]
        diff: PathBuf,
    },
    /// Show a running VM's memory statistics (RSS split, huge pages, KSM, balloon).
    Stats {
        /// The VMM's --api-sock.
        socket: PathBuf,
    },
}

#[derive(Subcommand)]
enum NetworkAction {
    /// Define a network and realize it: a bridge, its address, nftables rules, a DHCP server.
    Create {
        name: String,
        /// nat (private subnet masqueraded out of the uplink), routed, isolated (no uplink) or
        /// bridge (join the uplink's segment).
        #[arg(long, value_parser = clap::value_parser!(net::network::Mode))]
        mode: net::network::Mode,
        /// The VMs' IPv4 network, e.g. 10.0.5.0/24 (default: a free /24 in 10.210.0.0/16).
        #[arg(long)]
        subnet: Option<net::network::Subnet>,
        /// The host interface traffic leaves by (default: the default route's); in bridge mode
        /// an existing bridge, or an interface to make a bridge around.
        #[arg(long)]
        uplink: Option<String>,
        /// The built-in DHCP server (default: on, off in bridge mode).
        #[arg(long, value_parser = ["on", "off"])]
        dhcp: Option<String>,
    },
    /// The networks, one per line.
    List,
    /// One network's definition, health and attached VMs, as JSON.
    Show { name: String },
    /// Take a network off the host (its VMs must be stopped).
    Delete { name: String },
    /// Realize a defined network again where it is missing (after a reboot): bridge, rules,
    /// DHCP server.
    Start { name: String },
    /// Serve DHCP for a network (started by `network create`).
    #[command(hide = true)]
    Dhcp { name: String },
}

#[derive(Subcommand)]
enum FirewallAction {
    /// Check a rules file (JSON, or TOML by its .toml name) and store it as NAME.
    Create { name: String, file: PathBuf },
    /// The stored rule sets, one per line.
    List,
    /// Remove a stored rule set (VMs started with it keep their copy).
    Delete { name: String },
    /// A running VM's rules with hit counters, its drops and its tracked flows: SOCKET is the
    /// VMM's --api-sock, IFACE the interface (net0 for the first --net).
    Show {
        socket: PathBuf,
        #[arg(default_value = "net0")]
        iface: String,
    },
    /// Put the rules of FILE (or @NAME) on a running VM's interface; they apply at once.
    Set { socket: PathBuf, iface: String, rules: String },
}

#[derive(Subcommand)]
enum CtlAction {
    /// The VM's state and version.
    Info,
    /// Stop the vCPUs.
    Pause,
    /// Run the vCPUs again.
    Resume,
    /// Stop the VM and its VMM (exit status 0).
    Stop,
    /// Pause, write a full snapshot to PATH and the memory to PATH.mem, resume.
    Snapshot { path: PathBuf },
    /// Set the balloon's target size in MiB.
    Balloon { mib: u32 },
    /// The metrics as JSON, or Prometheus text with --prometheus.
    Metrics {
        #[arg(long)]
        prometheus: bool,
    },
    /// The memory statistics.
    Stats,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Kernel image: an ELF vmlinux (PVH or 64-bit entry) or a bzImage.
    #[arg(long)]
    kernel: PathBuf,
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
    /// A virtio-blk disk: path=IMAGE[,readonly=on][,id=NAME]; repeat for more disks.
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
    /// on a TAP [,queues=N] queue pairs (default: one per vCPU).
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

fn main() -> ExitCode {
    let launched = Instant::now();
    let cli = Cli::parse();
    if cli.snapshot_version {
        println!("v{}.0.0", vmm::snapshot::FORMAT_VERSION);
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &cli.describe_snapshot {
        return match vmm::snapshot::describe(path) {
            Ok(version) => {
                println!("{version}");
                ExitCode::SUCCESS
            }
            Err(e) => failure(format!("--describe-snapshot: {e}.")),
        };
    }
    let level = match cli.level.as_deref().map(firecracker_level).transpose() {
        Ok(level) => level.unwrap_or(&cli.log_level).to_string(),
        Err(e) => return usage(e),
    };
    let logger = match logging::init(&level, cli.show_log_origin) {
        Ok(l) => l,
        Err(e) => return usage(e),
    };
    if cli.log_path.is_some() || cli.module.is_some() {
        let config = api::models::Logger {
            log_path: cli.log_path.as_ref().map(|p| p.display().to_string()),
            module: cli.module.clone(),
            ..Default::default()
        };
        if let Err(e) = logger.apply(&config) {
            return usage(e.replace("logger log_path", "--log-path").replace("logger module", "--module"));
        }
    }
    let policy = if cli.no_seccomp {
        sandbox::Policy::Disabled
    } else if let Some(path) = &cli.seccomp_filter {
        sandbox::Policy::File(path.clone())
    } else {
        sandbox::Policy::Default
    };
    match cli.command {
        Some(Command::Run(args)) => {
            match check_id(&cli.id).and_then(|()| sandbox::init(&policy).map_err(|e| e.to_string())) {
                Ok(()) => run(*args, cli.id, launched, logger),
                Err(e) => usage(e),
            }
        }
        Some(Command::Ksm { action }) => ksm(&action),
        Some(Command::Firewall { action }) => firewall(action),
        Some(Command::Network { action }) => network(action, &policy),
        Some(Command::Switch { path, sticky_macs }) => switch(&path, sticky_macs, &policy),
        Some(Command::DeviceServer { socket, shared_bar_kib }) => {
            let confine = || {
                sandbox::init(&policy)
                    .and_then(|()| sandbox::apply(sandbox::ThreadKind::DeviceServer))
                    .map_err(|e| e.to_string())
            };
            match vfio::test_device::serve(&socket, shared_bar_kib.saturating_mul(1024), confine) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}.");
                    ExitCode::from(EXIT_FAILURE)
                }
            }
        }
        Some(Command::Ctl { socket, action }) => ctl(&socket, action),
        Some(Command::Stats { socket }) => ctl(&socket, CtlAction::Stats),
        Some(Command::SnapshotMerge { base, diff }) => match vmm::snapshot::merge_memory(&base, &diff) {
            Ok(bytes) => {
                println!("merged {} pages of {} into {}", bytes / 4096, diff.display(), base.display());
                ExitCode::SUCCESS
            }
            Err(e) => failure(format!("{e}.")),
        },
        None => match sandbox::init(&policy) {
            Ok(()) => serve(cli, launched, logger),
            Err(e) => usage(e),
        },
    }
}

/// Firecracker's `--level` names, as tracing's.
fn firecracker_level(level: &str) -> Result<&'static str, String> {
    match level.to_ascii_lowercase().as_str() {
        "error" => Ok("error"),
        "warning" | "warn" => Ok("warn"),
        "info" => Ok("info"),
        "debug" => Ok("debug"),
        "trace" => Ok("trace"),
        "off" => Ok("off"),
        _ => Err(format!("--level must be Error, Warning, Info, Debug, Trace or Off, not '{level}'.")),
    }
}

/// A Firecracker instance id: 1 to 64 letters, digits and dashes.
fn check_id(id: &str) -> Result<(), String> {
    if !jailer::valid_id(id) {
        return Err(format!("--id '{id}' must be 1 to 64 letters, digits and dashes; give such an id."));
    }
    Ok(())
}

fn usage(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_USAGE)
}

fn failure(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_FAILURE)
}

/// A controller with KVM open and the stop signals handled.
fn controller(launched: Instant, logger: logging::Logger) -> Result<(Controller, Arc<ExitLatch>), ExitCode> {
    let kvm = vmm::vm::open_kvm().map_err(failure)?;
    vmm::exit::install_stop_signal_handlers()
        .map_err(|e| failure(format!("cannot install the SIGINT/SIGTERM handlers: {e}.")))?;
    let latch = Arc::new(ExitLatch::new().map_err(|e| failure(format!("cannot create an eventfd: {e}.")))?);
    let mut controller = Controller::new(kvm, launched, latch.clone());
    controller.set_logger_hook(Box::new(move |l| logger.apply(l)));
    Ok((controller, latch))
}

/// Serves the API on `path`; requests reach `controller.run` through the returned receiver.
fn api_server(path: &Path, latch: &Arc<ExitLatch>) -> Result<(Server, Receiver<ApiCall>), ExitCode> {
    let (calls, received) = channel();
    let poke_latch = latch.clone();
    let server = Server::spawn(path, calls, Box::new(move || poke_latch.poke())).map_err(|e| {
        failure(format!(
            "cannot serve the API on {} ({e}); remove a stale socket or pick another path.",
            path.display()
        ))
    })?;
    tracing::info!("API listening on {}", path.display());
    Ok((server, received))
}

fn finish(exit: VmExit) -> ExitCode {
    let code = exit.exit_code();
    if code == 0 {
        tracing::info!("{exit}");
    } else {
        tracing::error!("{exit}");
    }
    ExitCode::from(code as u8)
}

/// `ferrovisor [--api-sock PATH] [--config-file FILE] [--no-api] ...`: Firecracker's command line.
fn serve(cli: Cli, launched: Instant, logger: logging::Logger) -> ExitCode {
    if let Err(e) = check_id(&cli.id) {
        return usage(e);
    }
    if let Some(limit) = cli.mmds_size_limit {
        net::mmds::with_store(|s| s.set_limit(limit));
    }
    if let Some(path) = &cli.metadata
        && let Err(e) = load_metadata(path)
    {
        return usage(e);
    }
    let api_sock = match (cli.api_sock, cli.no_api, &cli.config_file) {
        (_, true, None) => return usage("--no-api needs --config-file, or the VM could never start."),
        (Some(_), true, _) => return usage("--api-sock and --no-api contradict each other; drop one."),
        (_, true, _) => None,
        (sock, false, _) => Some(sock.unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCK))),
    };
    if let (Some(start_us), Some(cpu_us)) = (cli.start_time_us, cli.start_time_cpu_us) {
        tracing::debug!("jailed: the jailer started at {start_us} us (process CPU {cpu_us} us)");
    }
    api::http::set_max_body(cli.http_api_max_payload_size);
    let file = match cli.config_file.as_deref().map(read_config_file).transpose() {
        Ok(file) => file,
        Err(e) => return usage(e),
    };
    let (mut controller, latch) = match controller(launched, logger) {
        Ok(c) => c,
        Err(code) => return code,
    };
    controller.set_id(cli.id);
    if cli.enable_pci {
        controller.set_transport(VirtioTransport::Pci);
    }
    if let Some(path) = &cli.metrics_path
        && let Err(e) = controller.open_metrics(path)
    {
        return usage(e.replace("metrics_path", "--metrics-path"));
    }
    let server = match api_sock.as_deref().map(|p| api_server(p, &latch)).transpose() {
        Ok(s) => s,
        Err(code) => return code,
    };
    if let Some(file) = file
        && let Err(e) = controller.apply_config_file(file)
    {
        return usage(format!("--config-file: {e}"));
    }
    let (server, calls) = server.unzip();
    let exit = controller.run(calls);
    drop(server);
    finish(exit)
}

/// `--metadata FILE`: the MMDS store's first contents.
fn load_metadata(path: &Path) -> Result<(), String> {
    let limit = net::mmds::with_store(|s| s.limit()) as u64;
    let text = sandbox::files::read_regular(path, "--metadata", limit.max(1 << 20)).map_err(|e| format!("{e}."))?;
    let data: serde_json::Value = serde_json::from_slice(&text)
        .map_err(|e| format!("--metadata {} is not JSON ({e}); give a JSON file.", path.display()))?;
    net::mmds::with_store(|s| s.put(data)).map_err(|e| format!("--metadata {}: {e}.", path.display()))
}

fn read_config_file(path: &Path) -> Result<VmConfigFile, String> {
    // A FIFO or a device named here must not hang or flood the VMM: a regular file, bounded.
    let text = sandbox::files::read_regular(path, "--config-file", 1 << 20).map_err(|e| format!("{e}."))?;
    api::routes::body_of("--config-file", &text).map_err(|r| r.fault_message().unwrap_or(r.body))
}

fn run(args: RunArgs, id: String, launched: Instant, logger: logging::Logger) -> ExitCode {
    let config = VmConfig {
        kernel: args.kernel,
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

/// `ferrovisor ctl SOCKET ACTION`: one or a few API requests, the answer printed.
fn firewall(action: FirewallAction) -> ExitCode {
    use net::firewall;
    match action {
        FirewallAction::Create { name, file } => {
            let spec = match firewall::load(&file.display().to_string()) {
                Ok(spec) => spec,
                Err(e) => return failure(format!("{e}.")),
            };
            match firewall::save(&name, &spec) {
                Ok(path) => {
                    println!("rule set {name} created ({} rules) in {}", spec.rules.len(), path.display());
                    ExitCode::SUCCESS
                }
                Err(e) => failure(format!("{e}.")),
            }
        }
        FirewallAction::List => {
            let mut names: Vec<String> = std::fs::read_dir(firewall::sets_dir())
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.strip_suffix(".json").map(str::to_string))
                .filter(|n| !n.starts_with('.'))
                .collect();
            names.sort();
            for name in names {
                let rules = firewall::load(&format!("@{name}")).map(|s| s.rules.len().to_string());
                println!("{name:<20} rules={}", rules.unwrap_or_else(|e| format!("? ({e})")));
            }
            ExitCode::SUCCESS
        }
        FirewallAction::Delete { name } => {
            if let Err(e) = firewall::check_name(&name) {
                return failure(format!("{e}."));
            }
            match std::fs::remove_file(firewall::sets_dir().join(format!("{name}.json"))) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    failure(format!("rule set {name} cannot be removed ({e}); `ferrovisor firewall list` shows them."))
                }
            }
        }
        FirewallAction::Show { socket, iface } => show_firewall(&socket, &iface),
        FirewallAction::Set { socket, iface, rules } => {
            let spec = match firewall::load(&rules) {
                Ok(spec) => spec,
                Err(e) => return failure(format!("{e}.")),
            };
            let body = serde_json::to_string(&spec).unwrap_or_default();
            match api::client::request(&socket, "PUT", &format!("/ferrovisor/firewall/{iface}"), Some(&body)) {
                Ok((status, _)) if status < 300 => ExitCode::SUCCESS,
                Ok((status, body)) => failure(format!("the VMM answered {status}: {}", body.trim())),
                Err(e) => failure(format!(
                    "cannot reach the VMM at {} ({e}); is it running with --api-sock?",
                    socket.display()
                )),
            }
        }
    }
}

/// Prints a running VM's firewall: its rules with hit counters, its drops and its flows.
fn show_firewall(socket: &Path, iface: &str) -> ExitCode {
    let report = match api::client::request(socket, "GET", &format!("/ferrovisor/firewall/{iface}"), None) {
        Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default(),
        Ok((status, body)) => return failure(format!("the VMM answered {status}: {}", body.trim())),
        Err(e) => {
            return failure(format!(
                "cannot reach the VMM at {} ({e}); is it running with --api-sock?",
                socket.display()
            ));
        }
    };
    let text = |v: &serde_json::Value| v.as_str().map(str::to_string).unwrap_or_else(|| "-".into());
    println!(
        "interface {iface}: default in {} ({} packets), out {} ({} packets); anti-spoofing {}; storm control {} pps; address {}",
        text(&report["default_in"]),
        report["default_in_counters"]["packets"],
        text(&report["default_out"]),
        report["default_out_counters"]["packets"],
        if report["anti_spoofing"] == true { "on" } else { "off" },
        report["storm_pps"],
        text(&report["ip"]),
    );
    println!(
        "{:<16} {:<4} {:<5} {:<12} {:<18} {:<6} {:>10} {:>12}",
        "rule", "dir", "proto", "ports", "peer", "action", "packets", "bytes"
    );
    for r in report["rules"].as_array().into_iter().flatten() {
        println!(
            "{:<16} {:<4} {:<5} {:<12} {:<18} {:<6} {:>10} {:>12}",
            text(&r["name"]),
            text(&r["direction"]),
            text(&r["protocol"]),
            text(&r["ports"]),
            text(&r["peer"]),
            text(&r["action"]),
            r["packets"],
            r["bytes"]
        );
    }
    let drops: Vec<String> = report["drops"]
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(_, n)| n.as_u64().unwrap_or(0) > 0)
        .map(|(k, n)| format!("{k}={n}"))
        .collect();
    println!("drops: {}", if drops.is_empty() { "none".into() } else { drops.join(" ") });
    let flows = report["flows"].as_array().cloned().unwrap_or_default();
    println!("{} flows", flows.len());
    for f in flows {
        println!(
            "  proto {:<3} {} <-> {} opened {} by {} ({} packets, {} s left)",
            f["protocol"],
            text(&f["vm"]),
            text(&f["remote"]),
            text(&f["origin"]),
            text(&f["rule"]),
            f["packets"],
            f["expires_in_s"]
        );
    }
    ExitCode::SUCCESS
}

fn ctl(socket: &Path, action: CtlAction) -> ExitCode {
    let state = |s: &str| format!(r#"{{"state": "{s}"}}"#);
    let steps: Vec<(&str, String, Option<String>)> = match &action {
        CtlAction::Info => vec![("GET", "/".into(), None)],
        CtlAction::Pause => vec![("PATCH", "/vm".into(), Some(state("Paused")))],
        CtlAction::Resume => vec![("PATCH", "/vm".into(), Some(state("Resumed")))],
        CtlAction::Stop => vec![("PUT", "/ferrovisor/stop".into(), None)],
        CtlAction::Snapshot { path } => {
            let body = serde_json::json!({
                "snapshot_type": "Full",
                "snapshot_path": path,
                "mem_file_path": format!("{}.mem", path.display()),
            });
            vec![
                ("PATCH", "/vm".into(), Some(state("Paused"))),
                ("PUT", "/snapshot/create".into(), Some(body.to_string())),
                ("PATCH", "/vm".into(), Some(state("Resumed"))),
            ]
        }
        CtlAction::Balloon { mib } => vec![("PATCH", "/balloon".into(), Some(format!(r#"{{"amount_mib": {mib}}}"#)))],
        CtlAction::Metrics { prometheus } => {
            let format = if *prometheus { "prometheus" } else { "json" };
            vec![("GET", format!("/ferrovisor/metrics?format={format}"), None)]
        }
        CtlAction::Stats => vec![("GET", "/ferrovisor/stats".into(), None)],
    };
    for (method, path, body) in steps {
        match api::client::request(socket, method, &path, body.as_deref()) {
            Ok((status, body)) if status < 300 => {
                if !body.is_empty() {
                    println!("{}", body.trim_end());
                }
            }
            Ok((status, body)) => {
                let message = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("fault_message").and_then(|m| m.as_str()).map(str::to_string))
                    .unwrap_or(body);
                return failure(format!("{method} {path} answered {status}: {message}"));
            }
            Err(e) => {
                return failure(format!(
                    "cannot reach the VMM at {} ({e}); is `ferrovisor --api-sock {}` running?",
                    socket.display(),
                    socket.display()
                ));
            }
        }
    }
    ExitCode::SUCCESS
}

/// `ferrovisor network ...`.
fn network(action: NetworkAction, policy: &sandbox::Policy) -> ExitCode {
    use net::network;
    match action {
        NetworkAction::Create { name, mode, subnet, uplink, dhcp } => {
            let options = network::CreateOptions { name, mode, subnet, uplink, dhcp: dhcp.map(|d| d == "on") };
            match network::create(options, spawn_dhcp_server) {
                Ok(n) => {
                    let subnet = n.subnet.map_or("the uplink's".to_string(), |s| s.to_string());
                    println!("network {} created: {:?} on bridge {}, subnet {subnet}", n.name, n.mode, n.bridge);
                    ExitCode::SUCCESS
                }
                Err(e) => failure(format!("{e}.")),
            }
        }
        NetworkAction::List => {
            for n in network::list() {
                let problems = network::health(&n);
                println!(
                    "{:<12} {:<8} {:<18} bridge={} uplink={} dhcp={} vms={} {}",
                    n.name,
                    format!("{:?}", n.mode).to_lowercase(),
                    n.subnet.map_or("-".into(), |s| s.to_string()),
                    n.bridge,
                    n.uplink.as_deref().unwrap_or("-"),
                    if n.dhcp { "on" } else { "off" },
                    network::ports(&n).len(),
                    if problems.is_empty() { "ok".to_string() } else { problems.join("; ") }
                );
            }
            ExitCode::SUCCESS
        }
        NetworkAction::Show { name } => match network::load(&name) {
            Ok(n) => {
                let mut value = serde_json::to_value(&n).unwrap_or_default();
                value["ports"] = serde_json::json!(network::ports(&n));
                value["problems"] = serde_json::json!(network::health(&n));
                if let Some(subnet) = n.subnet {
                    value["gateway"] = serde_json::json!(subnet.gateway().to_string());
                }
                println!("{}", serde_json::to_string_pretty(&value).unwrap_or_default());
                ExitCode::SUCCESS
            }
            Err(e) => failure(format!("{e}.")),
        },
        NetworkAction::Delete { name } => match network::delete(&name) {
            Ok(()) => {
                println!("network {name} deleted");
                ExitCode::SUCCESS
            }
            Err(e) => failure(format!("{e}.")),
        },
        NetworkAction::Start { name } => match network::start(&name, spawn_dhcp_server) {
            Ok(n) => {
                println!("network {} is up on bridge {}", n.name, n.bridge);
                ExitCode::SUCCESS
            }
            Err(e) => failure(format!("{e}.")),
        },
        NetworkAction::Dhcp { name } => {
            let n = match network::load(&name) {
                Ok(n) => n,
                Err(e) => return failure(format!("{e}.")),
            };
            if let Err(e) = vmm::exit::install_stop_signal_handlers() {
                return failure(format!("cannot install the SIGTERM handler: {e}."));
            }
            if let Err(e) = sandbox::init(policy) {
                return usage(e);
            }
            match network::serve_dhcp(&n, &vmm::exit::stop_requested) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => failure(format!("{e}.")),
            }
        }
    }
}

/// Starts `ferrovisor network dhcp NAME` in its own session, logging beside the definition.
fn spawn_dhcp_server(n: &net::network::Network) -> Result<u32, String> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe().map_err(|e| format!("the ferrovisor binary cannot be found ({e})"))?;
    let log_path = net::network::state_dir().join("networks").join(format!("{}.dhcp.log", n.name));
    let log =
        std::fs::File::create(&log_path).map_err(|e| format!("{} cannot be written ({e})", log_path.display()))?;
    let mut cmd = sandbox::helper_command(exe);
    cmd.args(["network", "dhcp", &n.name])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: setsid is async-signal-safe; the child leaves our session, so that it outlives us.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|e| format!("the DHCP server cannot start ({e})"))?;
    // Give it a moment to bind its port, and report it if it could not.
    std::thread::sleep(std::time::Duration::from_millis(200));
    if let Ok(Some(status)) = child.try_wait() {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        return Err(format!("the DHCP server stopped at once ({status}): {}", log.trim().trim_end_matches('.')));
    }
    Ok(child.id())
}

const KSM: &str = "/sys/kernel/mm/ksm";

fn ksm_value(name: &str) -> Option<i64> {
    std::fs::read_to_string(format!("{KSM}/{name}")).ok()?.trim().parse().ok()
}

/// `ferrovisor ksm on|off|status`.
fn ksm(action: &str) -> ExitCode {
    if !std::path::Path::new(KSM).exists() {
        eprintln!("error: this host's kernel has no KSM ({KSM} is missing); build it with CONFIG_KSM.");
        return ExitCode::from(EXIT_FAILURE);
    }
    if action != "status" {
        let value = if action == "on" { "1" } else { "0" };
        if let Err(e) = std::fs::write(format!("{KSM}/run"), value) {
            eprintln!("error: cannot turn KSM {action} ({e}); run as root.");
            return ExitCode::from(EXIT_FAILURE);
        }
    }
    let page_kib = 4;
    let sharing = ksm_value("pages_sharing").unwrap_or(0);
    println!(
        "ksm: run={} pages_shared={} pages_sharing={} saved_mib={} full_scans={} general_profit_mib={}",
        ksm_value("run").unwrap_or(0),
        ksm_value("pages_shared").unwrap_or(0),
        sharing,
        sharing * page_kib / 1024,
        ksm_value("full_scans").unwrap_or(0),
        ksm_value("general_profit").unwrap_or(0) >> 20,
    );
    ExitCode::SUCCESS
}

/// `ferrovisor switch PATH`.
fn switch(path: &std::path::Path, sticky_macs: bool, policy: &sandbox::Policy) -> ExitCode {
    let mut switch = match net::switch::Switch::bind(path) {
        Ok(s) => s.with_sticky_macs(sticky_macs),
        Err(e) => {
            eprintln!("error: cannot listen on {} ({e}); check the directory and its permissions.", path.display());
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    if let Err(e) = vmm::exit::install_stop_signal_handlers() {
        eprintln!("error: cannot install the SIGINT/SIGTERM handlers: {e}.");
        return ExitCode::from(EXIT_FAILURE);
    }
    if let Err(e) = sandbox::init(policy).and_then(|()| sandbox::apply(sandbox::ThreadKind::Switch)) {
        return usage(e);
    }
    tracing::info!("switch listening on {}", path.display());
    let result = switch.run(&vmm::exit::stop_requested);
    let _ = std::fs::remove_file(path);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: the switch stopped: {e}.");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
