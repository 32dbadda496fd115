//! `ferrovisor`: the command line of the Ferrovisor VMM. `main` parses it and hands off to the
//! subcommand's module under `cli/`.

mod cli;
mod logging;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Parser, Subcommand};

use cli::ctl::CtlAction;
use cli::firewall::FirewallAction;
use cli::network::NetworkAction;
use cli::{check_id, usage};

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
    /// The VM's id (1 to 64 letters, digits and dashes), shown by GET /; default MACs derive
    /// from it, so that a relaunched VM keeps its addresses.
    #[arg(long, global = true, default_value = vmm::controller::DEFAULT_ID)]
    id: String,
    /// Run every thread without its seccomp filter.
    #[arg(long, global = true)]
    no_seccomp: bool,
    /// seccomp filters from FILE (seccompiler's JSON, or Firecracker's compiled BPF) instead of
    /// Ferrovisor's own; thread kinds the file does not name keep theirs.
    #[arg(long, global = true, conflicts_with = "no_seccomp")]
    seccomp_filter: Option<PathBuf>,
    #[command(flatten)]
    serve: cli::serve::ServeArgs,
    /// Print the format version of the snapshot state FILE and exit.
    #[arg(long, value_name = "FILE")]
    describe_snapshot: Option<PathBuf>,
    /// Print the snapshot format version this Ferrovisor writes and exit.
    #[arg(long)]
    snapshot_version: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a kernel in a new VM and run it until it stops.
    Run(Box<cli::run::RunArgs>),
    /// Run a user-space L2 switch on the Unix socket PATH (no root needed); VMs plug in with
    /// --net switch=PATH[,vlan=N]. Runs until SIGINT or SIGTERM.
    Switch(cli::switch::SwitchArgs),
    /// Serve the test DMA engine, a small PCI device, over vfio-user on the Unix socket PATH,
    /// for VMs started with --device vfio-user=PATH. Runs until killed.
    DeviceServer(cli::device_server::DeviceServerArgs),
    /// Serve a disk as a vhost-user-blk back-end on the Unix socket --socket, for Ferrovisor
    /// (--disk vhost_user=PATH), QEMU or another front-end; one front-end at a time. Runs until
    /// killed.
    VhostUserBlk(cli::vhost_user::BlkArgs),
    /// Serve a network port (a TAP or a switch port, with the firewall) as a vhost-user-net
    /// back-end on the Unix socket --socket, for Ferrovisor (--net vhost_user=PATH), QEMU or
    /// another front-end; one front-end at a time. Runs until killed.
    VhostUserNet(cli::vhost_user::NetArgs),
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
    Ksm(cli::ksm::KsmArgs),
    /// Control a running VMM through its API socket.
    Ctl {
        /// The VMM's --api-sock.
        socket: PathBuf,
        #[command(subcommand)]
        action: CtlAction,
    },
    /// Apply a diff snapshot's memory file onto a base memory file (in place), so that the
    /// diff's state file loads with it.
    SnapshotMerge(cli::snapshot::MergeArgs),
    /// Show a running VM's memory statistics (RSS split, huge pages, KSM, balloon).
    Stats {
        /// The VMM's --api-sock.
        socket: PathBuf,
    },
}

fn main() -> ExitCode {
    let launched = Instant::now();
    let cli = Cli::parse();
    if cli.snapshot_version {
        return cli::snapshot::version();
    }
    if let Some(path) = &cli.describe_snapshot {
        return cli::snapshot::describe(path);
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
                Ok(()) => cli::run::run(*args, cli.id, launched, logger),
                Err(e) => usage(e),
            }
        }
        Some(Command::Ksm(args)) => cli::ksm::ksm(args),
        Some(Command::Firewall { action }) => cli::firewall::firewall(action),
        Some(Command::Network { action }) => cli::network::network(action, &policy),
        Some(Command::Switch(args)) => cli::switch::switch(args, &policy),
        Some(Command::DeviceServer(args)) => cli::device_server::device_server(args, &policy),
        Some(Command::VhostUserBlk(args)) => cli::vhost_user::blk(args, &policy),
        Some(Command::VhostUserNet(args)) => cli::vhost_user::net(args, &policy),
        Some(Command::Ctl { socket, action }) => cli::ctl::ctl(&socket, action),
        Some(Command::Stats { socket }) => cli::ctl::ctl(&socket, CtlAction::Stats),
        Some(Command::SnapshotMerge(args)) => cli::snapshot::merge(args),
        None => match sandbox::init(&policy) {
            Ok(()) => cli::serve::serve(cli.serve, cli.id, launched, logger),
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
