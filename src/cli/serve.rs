//! Firecracker's command line (`ferrovisor` without a subcommand): serve the REST API and start
//! the VM when told to, or at once from a configuration file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use api::models::VmConfigFile;
use vmm::VirtioTransport;

use super::{api_server, check_id, controller, finish, usage};
use crate::logging;

/// Firecracker's default API socket.
const DEFAULT_API_SOCK: &str = "/run/firecracker.socket";

/// The options of Firecracker's command line that serving the API takes.
#[derive(clap::Args)]
pub struct ServeArgs {
    /// Serve the REST API (Firecracker's) on this Unix socket [default: /run/firecracker.socket].
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Start the VM from this Firecracker-format JSON configuration.
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// Serve no API (needs --config-file).
    #[arg(long)]
    no_api: bool,
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
}

/// `ferrovisor [--api-sock PATH] [--config-file FILE] [--no-api] ...`: Firecracker's command line.
pub fn serve(cli: ServeArgs, id: String, launched: Instant, logger: logging::Logger) -> ExitCode {
    if let Err(e) = check_id(&id) {
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
    controller.set_id(id);
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
