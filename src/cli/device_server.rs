//! `ferrovisor device-server SOCKET`: the test DMA engine, a small PCI device, served over
//! vfio-user in its own process under its own filter.

use std::path::PathBuf;
use std::process::ExitCode;

use super::EXIT_FAILURE;

#[derive(clap::Args)]
pub struct DeviceServerArgs {
    socket: PathBuf,
    /// The size of BAR 2, the memory the VMM maps into the guest: a power of two, in KiB.
    #[arg(long, default_value_t = 64)]
    shared_bar_kib: u64,
}

pub fn device_server(args: DeviceServerArgs, policy: &sandbox::Policy) -> ExitCode {
    let confine = || {
        sandbox::init(policy)
            .and_then(|()| sandbox::apply(sandbox::ThreadKind::DeviceServer))
            .map_err(|e| e.to_string())
    };
    match vfio::test_device::serve(&args.socket, args.shared_bar_kib.saturating_mul(1024), confine) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}.");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}
