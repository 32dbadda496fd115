//! `ferrovisor ctl SOCKET ACTION` (and `ferrovisor stats SOCKET`): one or a few API requests to a
//! running VMM, the answers printed.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;

use super::failure;

#[derive(Subcommand)]
pub enum CtlAction {
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
    /// Move the running VM to a VMM waiting at URL (unix:PATH or tcp:HOST:PORT), following the
    /// migration until the VM runs there.
    Migrate {
        url: String,
        /// The pause the guest may see at the switch-over (default 300).
        #[arg(long)]
        downtime_ms: Option<u64>,
        /// Give up after this many seconds.
        #[arg(long)]
        timeout_s: Option<u64>,
        /// Same host (a unix: URL): hand guest memory and the TAPs over instead of copying,
        /// as for an upgrade of the VMM in place; the VM needs --memory shared=on.
        #[arg(long)]
        local: bool,
        /// Switch over after the first pass (or --max-rounds) without the last pages: the
        /// destination runs the VM and fetches them on first touch.
        #[arg(long)]
        postcopy: bool,
        /// Copy pages over this many connections at once (1 to 16).
        #[arg(long)]
        connections: Option<u32>,
    },
    /// Wait at URL (unix:PATH or tcp:HOST:PORT) for a VM migrating here (a VMM with nothing
    /// configured), following until it runs here.
    Receive { url: String },
}

pub fn ctl(socket: &Path, action: CtlAction) -> ExitCode {
    match &action {
        CtlAction::Migrate { url, downtime_ms, timeout_s, local, postcopy, connections } => {
            let mut body = serde_json::json!({ "destination_url": url, "local": local, "postcopy": postcopy });
            if *postcopy {
                body["max_rounds"] = 1.into();
            }
            if let Some(ms) = downtime_ms {
                body["downtime_ms"] = (*ms).into();
            }
            if let Some(s) = timeout_s {
                body["timeout_s"] = (*s).into();
            }
            if let Some(n) = connections {
                body["connections"] = (*n).into();
            }
            return super::migrate::send(socket, &body);
        }
        CtlAction::Receive { url } => return super::migrate::receive(socket, url),
        _ => {}
    }
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
        CtlAction::Migrate { .. } | CtlAction::Receive { .. } => unreachable!("followed above"),
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
