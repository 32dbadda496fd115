//! `ferrovisor`: the command line of the Ferrovisor VMM.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use vmm::{
    ConsoleConfig, DiskConfig, HostLimits, MemorySpec, NetConfig, SerialConfig, VirtioTransport, VmConfig, VsockConfig,
    config::DEFAULT_CMDLINE,
};

/// Exit status for bad user input, as clap uses for bad arguments.
const EXIT_USAGE: u8 = 2;
const EXIT_FAILURE: u8 = 1;

#[derive(Parser)]
#[command(name = "ferrovisor", version, about = "A virtual machine monitor on Linux KVM.")]
struct Cli {
    /// Log level: error, warn, info, debug or trace (RUST_LOG overrides it).
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel in a new VM and run it until it stops.
    Run(Box<RunArgs>),
    /// Run a user-space L2 switch on the Unix socket PATH (no root needed); VMs plug in with
    /// --net switch=PATH[,vlan=N]. Runs until SIGINT or SIGTERM.
    Switch { path: PathBuf },
    /// Turn the host's KSM daemon on or off, or show what it shares (root for on and off).
    Ksm {
        #[arg(value_parser = ["on", "off", "status"])]
        action: String,
    },
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
    /// A virtio-net interface: tap=NAME[,mac=02:..]; the TAP is created if absent.
    #[arg(long = "net")]
    nets: Vec<NetConfig>,
    /// A virtio-balloon: size=MiB (the target)[,deflate_on_oom=on][,stats=on][,free_page_reporting=on].
    #[arg(long, value_parser = vmm::config::parse_balloon)]
    balloon: Option<virtio::balloon::BalloonOptions>,
    /// A virtio-vsock device: cid=N,uds=PATH (host connections through the Unix socket PATH).
    #[arg(long)]
    vsock: Option<VsockConfig>,
    /// How virtio devices attach: mmio (announced on the command line) or pci (MSI-X).
    #[arg(long, default_value = "mmio")]
    virtio_transport: VirtioTransport,
}

fn main() -> ExitCode {
    let launched = Instant::now();
    let cli = Cli::parse();
    let filter = EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(&cli.log_level));
    let filter = match filter {
        Ok(f) => f,
        Err(_) => {
            eprintln!("error: --log-level must be error, warn, info, debug or trace, not '{}'.", cli.log_level);
            return ExitCode::from(EXIT_USAGE);
        }
    };
    tracing_subscriber::fmt().with_writer(std::io::stderr).with_env_filter(filter).with_target(false).init();
    match cli.command {
        Command::Run(args) => run(*args, launched),
        Command::Ksm { action } => ksm(&action),
        Command::Switch { path } => switch(&path),
    }
}

fn run(args: RunArgs, launched: Instant) -> ExitCode {
    let config = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        cpus: args.cpus,
        memory_mib: args.memory.size_mib,
        serial: args.serial,
        disks: args.disks,
        rng: args.rng,
        console: args.console,
        nets: args.nets,
        balloon: args.balloon,
        vsock: args.vsock,
        transport: args.virtio_transport,
        memory: args.memory.options,
        stats_on_exit: args.stats_on_exit,
    };
    let kvm = match vmm::vm::open_kvm() {
        Ok(kvm) => kvm,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    let limits = HostLimits {
        kvm_max_vcpus: kvm.get_max_vcpus() as u32,
        ram_mib: HostLimits::host_ram_mib(),
        free_huge_pages: HostLimits::free_huge_pages(),
    };
    let format = match config.validate(&limits) {
        Ok(format) => format,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = vmm::exit::install_stop_signal_handlers() {
        eprintln!("error: cannot install the SIGINT/SIGTERM handlers: {e}.");
        return ExitCode::from(EXIT_FAILURE);
    }
    match vmm::run(&kvm, &config, format, launched) {
        Ok(exit) => {
            let code = exit.exit_code();
            if code == 0 {
                tracing::info!("{exit}");
            } else {
                tracing::error!("{exit}");
            }
            ExitCode::from(code as u8)
        }
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
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
fn switch(path: &std::path::Path) -> ExitCode {
    let mut switch = match net::switch::Switch::bind(path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: cannot listen on {} ({e}); check the directory and its permissions.", path.display());
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    if let Err(e) = vmm::exit::install_stop_signal_handlers() {
        eprintln!("error: cannot install the SIGINT/SIGTERM handlers: {e}.");
        return ExitCode::from(EXIT_FAILURE);
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
