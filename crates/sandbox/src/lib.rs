//! Ferrovisor's sandbox inside the process: a seccomp filter for every kind of thread, installed
//! by the thread itself before it touches guest- or client-controlled data.
//!
//! seccomp filters stack: a thread keeps its creator's filter beneath its own. So once filters
//! are on, no filtered thread starts another: every thread comes from the launcher, a thread
//! whose own filter allows little besides starting threads ([`spawn`]).

pub mod files;
mod filters;
mod helper;
pub mod ioctls;
mod launcher;
mod policy;
mod sigsys;
pub mod syscalls;

pub use filters::{allows, default_filter};
pub use helper::helper_command;
pub use launcher::{Thread, spawn, spawn_with_stack};
pub use policy::{Error, Policy, apply, parse as parse_filter_file};
pub use sigsys::{EXIT_BAD_SYSCALL, report_to};

/// Chooses the filters and, unless disabled, starts the SIGSYS report and the thread launcher
/// (which needs the filters chosen). Call before any other thread starts.
pub fn init(policy: &Policy) -> Result<(), Error> {
    if policy::choose(policy)? {
        sigsys::install().map_err(|e| Error::Install { kind: "SIGSYS", reason: e.to_string() })?;
        launcher::run().map_err(Error::Launcher)?;
    }
    Ok(())
}

/// The kinds of thread, each with a filter of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ThreadKind {
    /// The main thread once the VM is built: API actions, snapshots, stopping.
    Vmm,
    /// The API server's listener and connections.
    Api,
    Vcpu,
    /// Starts every other thread once filters are on.
    Launcher,
    Block,
    /// virtio-pmem: flushes of a mapped file.
    Pmem,
    Net,
    Rng,
    Console,
    Vsock,
    Balloon,
    /// virtio-mem: plugs and unplugs hotplugged memory.
    Mem,
    /// User-mode networking's NAT.
    Usernet,
    /// Feeds the VMM's stdin to the serial port.
    SerialInput,
    /// `ferrovisor switch`.
    Switch,
    /// `ferrovisor network dhcp`.
    Dhcp,
    /// `ferrovisor device-server`: a vfio-user device in its own process.
    DeviceServer,
    /// Live migration: sends a running VM's memory and state, or receives them.
    Migration,
    /// A vhost-user device's monitor: the back-end's interrupts, its hang-up, reconnection.
    VhostUser,
    /// `ferrovisor vhost-user-blk`: a device served to another VMM, in its own process.
    VhostUserBackend,
    /// Empties KVM's dirty rings while pages are logged, so that none fills.
    DirtyLog,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 21] = [
        ThreadKind::Vmm,
        ThreadKind::Api,
        ThreadKind::Vcpu,
        ThreadKind::Launcher,
        ThreadKind::Block,
        ThreadKind::Pmem,
        ThreadKind::Net,
        ThreadKind::Rng,
        ThreadKind::Console,
        ThreadKind::Vsock,
        ThreadKind::Balloon,
        ThreadKind::Mem,
        ThreadKind::Usernet,
        ThreadKind::SerialInput,
        ThreadKind::Switch,
        ThreadKind::Dhcp,
        ThreadKind::DeviceServer,
        ThreadKind::Migration,
        ThreadKind::VhostUser,
        ThreadKind::VhostUserBackend,
        ThreadKind::DirtyLog,
    ];

    /// The filter's name in a filter file (Firecracker's files name `vmm`, `api` and `vcpu`).
    pub const fn name(self) -> &'static str {
        match self {
            ThreadKind::Vmm => "vmm",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::Launcher => "launcher",
            ThreadKind::Block => "virtio-blk",
            ThreadKind::Pmem => "virtio-pmem",
            ThreadKind::Net => "virtio-net",
            ThreadKind::Rng => "virtio-rng",
            ThreadKind::Console => "virtio-console",
            ThreadKind::Vsock => "virtio-vsock",
            ThreadKind::Balloon => "virtio-balloon",
            ThreadKind::Mem => "virtio-mem",
            ThreadKind::Usernet => "usernet",
            ThreadKind::SerialInput => "serial-input",
            ThreadKind::Switch => "switch",
            ThreadKind::Dhcp => "dhcp",
            ThreadKind::DeviceServer => "device-server",
            ThreadKind::Migration => "migration",
            ThreadKind::VhostUser => "vhost-user",
            ThreadKind::VhostUserBackend => "vhost-user-backend",
            ThreadKind::DirtyLog => "dirty-log",
        }
    }
}
