//! `ferrovisor ctl SOCKET migrate URL` and `ctl SOCKET receive URL`: start a migration through
//! the API and follow it: a progress line on a terminal, one line a second otherwise.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use super::failure;

/// One request; the body, or the VMM's sentence.
fn call(socket: &Path, method: &str, path: &str, body: Option<&str>) -> Result<String, String> {
    match api::client::request(socket, method, path, body) {
        Ok((status, body)) if status < 300 => Ok(body),
        Ok((status, body)) => Err(serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v["fault_message"].as_str().map(str::to_string))
            .unwrap_or(format!("{method} {path} answered {status}: {body}"))),
        Err(e) => Err(format!("cannot reach the VMM at {} ({e})", socket.display())),
    }
}

fn progress(s: &serde_json::Value) -> String {
    let mib = |key: &str| s[key].as_u64().unwrap_or(0) as f64 / 1048576.0;
    format!(
        "{:<10} round {:>3}  {:>8.1} MiB sent  {:>7.1} MiB dirty  {:>7.1} MiB/s  expected downtime {:.0} ms",
        s["phase"].as_str().unwrap_or("?"),
        s["round"],
        mib("bytes"),
        mib("bytes_left"),
        s["bandwidth_mib_s"].as_f64().unwrap_or(0.0),
        s["expected_downtime_ms"].as_f64().unwrap_or(0.0)
    )
}

/// Sends the VM at `socket` where `body` (`PUT /ferrovisor/migration/send`'s) says and follows the migration until the VM runs there (the
/// source VMM then exits) or the migration fails.
pub fn send(socket: &Path, body: &serde_json::Value) -> ExitCode {
    if let Err(e) = call(socket, "PUT", "/ferrovisor/migration/send", Some(&body.to_string())) {
        return failure(e);
    }
    follow(socket, true)
}

/// Has the VMM at `socket` wait for a VM on `url`, and follows until it runs there.
pub fn receive(socket: &Path, url: &str) -> ExitCode {
    let body = serde_json::json!({ "receiver_url": url });
    if let Err(e) = call(socket, "PUT", "/ferrovisor/migration/receive", Some(&body.to_string())) {
        return failure(e);
    }
    follow(socket, false)
}

fn follow(socket: &Path, source: bool) -> ExitCode {
    let terminal = std::io::stdout().is_terminal();
    let mut last: Option<serde_json::Value> = None;
    let mut printed = Instant::now() - Duration::from_secs(1);
    loop {
        let status = match call(socket, "GET", "/ferrovisor/migration", None) {
            Ok(body) => serde_json::from_str::<serde_json::Value>(&body).unwrap_or_default(),
            // The source's VMM exits once the VM runs on the destination (a failure leaves it
            // running), sometimes before a poll saw the switch-over.
            // A local migration can be over before the first poll: the VMM says it is
            // shutting down.
            Err(e)
                if source
                    && (last
                        .as_ref()
                        .is_some_and(|s| ["switchover", "precopy", "postcopy"].iter().any(|p| s["phase"] == *p))
                        || (last.is_none() && e.contains("shutting down"))) =>
            {
                let newline = if terminal { "\n" } else { "" };
                println!("{newline}the source VMM has exited, as it does once the VM runs on the destination");
                return ExitCode::SUCCESS;
            }
            Err(e) => return failure(e),
        };
        match status["phase"].as_str() {
            Some("completed") => {
                let downtime = status["downtime_ms"].as_f64().map_or(String::new(), |d| format!(", {d:.1} ms paused"));
                let total = status["total_ms"].as_f64().unwrap_or(0.0);
                println!("{}migration completed in {total:.0} ms{downtime}", if terminal { "\n" } else { "" });
                return ExitCode::SUCCESS;
            }
            Some("failed") | Some("cancelled") => {
                let why = status["error"].as_str().unwrap_or("it was cancelled");
                return failure(format!("the migration ended without moving the VM: {why}"));
            }
            _ => {}
        }
        if terminal {
            print!("\r{}", progress(&status));
            let _ = std::io::stdout().flush();
        } else if printed.elapsed() >= Duration::from_secs(1) {
            println!("{}", progress(&status));
            printed = Instant::now();
        }
        last = Some(status);
        std::thread::sleep(Duration::from_millis(100));
    }
}
