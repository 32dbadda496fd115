//! `ferrovisor vhost-user-blk`: one of Ferrovisor's devices as a vhost-user back-end, in a
//! process of its own under its own filter, for Ferrovisor, QEMU or any other front-end.

use std::path::PathBuf;
use std::process::ExitCode;

use super::EXIT_FAILURE;

#[derive(clap::Args)]
pub struct BlkArgs {
    /// Where to listen for the front-end (the VMM).
    #[arg(long)]
    socket: PathBuf,
    /// The disk: path=IMAGE[,readonly=on][,id=NAME][,cache=none][,io_engine=async][,poll_us=N], as
    /// `run --disk`.
    #[arg(long)]
    disk: vmm::config::DiskConfig,
}

pub fn blk(args: BlkArgs, policy: &sandbox::Policy) -> ExitCode {
    let disk = args.disk;
    if disk.vhost_user.is_some() {
        return fail("--disk here takes path=IMAGE: this process is the vhost-user back-end".into());
    }
    let block = match virtio::blk::Block::open_cached(&disk.path, disk.readonly, &disk.id, disk.cache) {
        Ok(block) => {
            block.with_engine(disk.io_engine).with_polling(disk.poll_us.unwrap_or(vmm::config::DEFAULT_POLL_US))
        }
        Err(e) => return fail(format!("--disk: {e}")),
    };
    let backend = match vhost_user::backend::blk::BlkBackend::new(block) {
        Ok(backend) => backend.shared(),
        Err(e) => return fail(format!("the disk cannot be served ({e})")),
    };
    // The filter goes on before the first front-end's message: everything after handles
    // what a front-end (and through it a guest) controls.
    let confine = sandbox::init(policy).and_then(|()| sandbox::apply(sandbox::ThreadKind::VhostUserBackend));
    if let Err(e) = confine {
        return fail(e.to_string());
    }
    match vhost_user::backend::serve("vhost-user-blk", &args.socket, backend, &[], 0) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

#[derive(clap::Args)]
pub struct NetArgs {
    /// Where to listen for the front-end (the VMM).
    #[arg(long)]
    socket: PathBuf,
    /// The TAP the interface's frames go to (created if absent).
    #[arg(long, conflicts_with = "switch", required_unless_present = "switch")]
    tap: Option<String>,
    /// A port on `ferrovisor switch PATH` instead of a TAP.
    #[arg(long)]
    switch: Option<PathBuf>,
    /// The port's firewall and addresses, as `run --net` takes them: firewall=FILE|@NAME,
    /// mac=.., ip=.., ip6=.., poll_us=N (comma-separated).
    #[arg(long, default_value = "")]
    port: String,
}

pub fn net(args: NetArgs, policy: &sandbox::Policy) -> ExitCode {
    let host = match (&args.tap, &args.switch) {
        (Some(tap), _) => format!("tap={tap}"),
        (None, Some(switch)) => format!("switch={}", switch.display()),
        (None, None) => return fail("give --tap NAME or --switch PATH".into()),
    };
    let spec = if args.port.is_empty() { host } else { format!("{host},{}", args.port) };
    let nic: vmm::config::NetConfig = match spec.parse() {
        Ok(nic) => nic,
        Err(e) => return fail(format!("--port: {e}")),
    };
    let device = match vmm::backend_net(&nic) {
        Ok(device) => device,
        Err(e) => return fail(e.to_string()),
    };
    let backend = vhost_user::backend::net::NetBackend::new(device);
    let host_fds: Vec<_> = backend.host_fd().into_iter().collect();
    let confine = sandbox::init(policy).and_then(|()| sandbox::apply(sandbox::ThreadKind::VhostUserBackend));
    if let Err(e) = confine {
        return fail(e.to_string());
    }
    let served = vhost_user::backend::serve(
        "vhost-user-net",
        &args.socket,
        backend.shared(),
        &host_fds,
        vhost_user::backend::net::HOST_EVENT,
    );
    match served {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}

fn fail(message: String) -> ExitCode {
    eprintln!("error: {message}.");
    ExitCode::from(EXIT_FAILURE)
}
