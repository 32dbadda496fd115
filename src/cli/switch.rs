//! `ferrovisor switch PATH`: a user-space L2 switch that VMs plug into without root.

use std::path::PathBuf;
use std::process::ExitCode;

use super::{EXIT_FAILURE, usage};

#[derive(clap::Args)]
pub struct SwitchArgs {
    path: PathBuf,
    /// A MAC stays with the port that first sent from it until that port leaves (no aging, no
    /// moving).
    #[arg(long)]
    sticky_macs: bool,
}

pub fn switch(args: SwitchArgs, policy: &sandbox::Policy) -> ExitCode {
    let (path, sticky_macs) = (args.path.as_path(), args.sticky_macs);
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
