//! `ferrovisor firewall`: named rule sets on the host, and a running VM's rules with their
//! counters.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;

use super::failure;

#[derive(Subcommand)]
pub enum FirewallAction {
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

/// `ferrovisor firewall ...`.
pub fn firewall(action: FirewallAction) -> ExitCode {
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
