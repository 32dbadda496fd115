//! The jailer: starts a VMM the way Firecracker's jailer does, so that tools written for
//! Firecracker (Kata Containers, firecracker-containerd) can start Ferrovisor unchanged.
//!
//! In order: check the arguments; close inherited fds and clear the environment; make the
//! chroot `<base>/<exec name>/<id>/root` and copy the VMM (and, for a dynamically linked one,
//! its loader and libraries) into it; join the network namespace;
//! set resource limits; put the process in its cgroups; make a mount namespace and pivot_root
//! into the chroot; create the device nodes the VMM needs; daemonize and start a PID namespace
//! on request; write the pid file; drop to the uid and gid; exec the VMM.

mod cgroup;
mod jail;
pub mod libraries;

use std::ffi::OsString;
use std::path::PathBuf;

pub use cgroup::{CgroupSetting, CgroupVersion};

/// Firecracker's jailer's argument list.
#[derive(clap::Parser, Debug)]
#[command(name = "jailer", version, about = "Starts a VMM in a jail, as Firecracker's jailer does.")]
pub struct Args {
    /// The VM's id: 1 to 64 letters, digits and dashes.
    #[arg(long)]
    pub id: String,
    /// The VMM binary; it is copied into the jail.
    #[arg(long)]
    pub exec_file: PathBuf,
    /// The user the VMM runs as.
    #[arg(long)]
    pub uid: u32,
    /// The group the VMM runs as.
    #[arg(long)]
    pub gid: u32,
    /// Where jails are made: `<base>/<exec name>/<id>/root`.
    #[arg(long, default_value = "/srv/jailer")]
    pub chroot_base_dir: PathBuf,
    /// A network namespace to join (a path such as /var/run/netns/NAME).
    #[arg(long)]
    pub netns: Option<PathBuf>,
    /// Detach from the terminal and the caller's session; stdio goes to /dev/null.
    #[arg(long)]
    pub daemonize: bool,
    /// Run the VMM as PID 1 of a new PID namespace.
    #[arg(long)]
    pub new_pid_ns: bool,
    /// A cgroup setting FILE=VALUE, e.g. cpuset.cpus=0 or memory.limit_in_bytes=268435456.
    #[arg(long = "cgroup", value_parser = cgroup::parse_setting)]
    pub cgroups: Vec<CgroupSetting>,
    /// The cgroup hierarchy: 1 or 2.
    #[arg(long, default_value = "1", value_parser = cgroup::parse_version)]
    pub cgroup_version: CgroupVersion,
    /// The cgroup the VM's cgroup is made in (default: the exec file's name).
    #[arg(long)]
    pub parent_cgroup: Option<String>,
    /// A resource limit: fsize=BYTES or no-file=COUNT (default no-file=2048).
    #[arg(long = "resource-limit", value_parser = parse_limit)]
    pub resource_limits: Vec<ResourceLimit>,
    /// The VMM's own arguments, after `--`.
    #[arg(last = true)]
    pub vmm_args: Vec<OsString>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceLimit {
    FileSize(u64),
    OpenFiles(u64),
}

fn parse_limit(text: &str) -> Result<ResourceLimit, String> {
    let (name, value) = text.split_once('=').ok_or("give NAME=VALUE, e.g. no-file=1024")?;
    let value: u64 = value.parse().map_err(|_| format!("{value} is not a whole number"))?;
    match name {
        "fsize" => Ok(ResourceLimit::FileSize(value)),
        "no-file" => Ok(ResourceLimit::OpenFiles(value)),
        _ => Err(format!("'{name}' is no resource limit the jailer sets; use fsize or no-file")),
    }
}

/// The default limit on open files, as Firecracker's jailer sets it.
pub const DEFAULT_OPEN_FILES: u64 = 2048;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--id '{0}' must be 1 to 64 letters, digits and dashes; give such an id.")]
    Id(String),
    #[error("--exec-file {path} cannot be used ({reason}); give the path of the VMM binary.")]
    ExecFile { path: String, reason: String },
    #[error("{what} failed: {source}.")]
    Os { what: String, source: std::io::Error },
    #[error("{0}")]
    Cgroup(String),
}

impl Error {
    pub(crate) fn os(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> Error {
        let what = what.into();
        move |source| Error::Os { what, source }
    }
}

/// Checks `args` and jails the calling process; on success it becomes the VMM and never
/// returns.
pub fn run(args: Args) -> Result<std::convert::Infallible, Error> {
    jail::run(args)
}

/// Checks an instance id as Firecracker does.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn firecrackers_argument_list_parses() {
        let args = Args::try_parse_from([
            "jailer",
            "--id",
            "vm-1",
            "--exec-file",
            "/usr/bin/firecracker",
            "--uid",
            "123",
            "--gid",
            "100",
            "--cgroup",
            "cpuset.cpus=0",
            "--cgroup",
            "memory.limit_in_bytes=1048576",
            "--resource-limit",
            "no-file=1024",
            "--daemonize",
            "--",
            "--config-file",
            "/fc.json",
        ])
        .unwrap();
        assert_eq!(args.chroot_base_dir, PathBuf::from("/srv/jailer"));
        assert_eq!(args.cgroups.len(), 2);
        assert_eq!(args.resource_limits, [ResourceLimit::OpenFiles(1024)]);
        assert_eq!(args.vmm_args, [OsString::from("--config-file"), OsString::from("/fc.json")]);
        assert!(args.daemonize && !args.new_pid_ns);
    }

    #[test]
    fn ids_are_checked() {
        assert!(valid_id("a-1"));
        assert!(!valid_id(""));
        assert!(!valid_id("../x"));
        assert!(!valid_id(&"a".repeat(65)));
        assert!(parse_limit("nproc=3").unwrap_err().contains("fsize or no-file"));
    }
}
