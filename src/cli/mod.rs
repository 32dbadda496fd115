//! The subcommands, one module each; `main` parses the command line and hands off to them.
//! Here are what several share: exit statuses, the controller and the API server.

pub mod ctl;
pub mod device_server;
pub mod firewall;
pub mod ksm;
pub mod migrate;
pub mod network;
pub mod run;
pub mod serve;
pub mod snapshot;
pub mod switch;
pub mod vhost_user;

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, channel};
use std::time::Instant;

use api::{ApiCall, Server};
use vmm::VmExit;
use vmm::controller::Controller;
use vmm::exit::ExitLatch;

use crate::logging;

/// Exit status for bad user input, as clap uses for bad arguments.
pub const EXIT_USAGE: u8 = 2;
pub const EXIT_FAILURE: u8 = 1;

pub fn usage(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_USAGE)
}

pub fn failure(message: impl std::fmt::Display) -> ExitCode {
    eprintln!("error: {message}");
    ExitCode::from(EXIT_FAILURE)
}

/// A Firecracker instance id: 1 to 64 letters, digits and dashes.
pub fn check_id(id: &str) -> Result<(), String> {
    if !jailer::valid_id(id) {
        return Err(format!("--id '{id}' must be 1 to 64 letters, digits and dashes; give such an id."));
    }
    Ok(())
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

/// The exit status for why the VM stopped, with a log line saying it.
fn finish(exit: VmExit) -> ExitCode {
    let code = exit.exit_code();
    if code == 0 {
        tracing::info!("{exit}");
    } else {
        tracing::error!("{exit}");
    }
    ExitCode::from(code as u8)
}
