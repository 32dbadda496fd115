//! `ferrovisor network`: managed networks (nat, routed, isolated, bridge) and their DHCP server.

use std::process::ExitCode;

use clap::Subcommand;

use super::{failure, usage};

#[derive(Subcommand)]
pub enum NetworkAction {
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

/// `ferrovisor network ...`.
pub fn network(action: NetworkAction, policy: &sandbox::Policy) -> ExitCode {
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
