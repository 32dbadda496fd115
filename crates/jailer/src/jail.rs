//! The jailing steps, in Firecracker's order.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::{Args, DEFAULT_OPEN_FILES, Error, ResourceLimit};

fn cstring(path: &Path) -> Result<CString, Error> {
    CString::new(path.as_os_str().as_bytes()).map_err(|_| Error::Os {
        what: format!("{} has a NUL byte", path.display()),
        source: std::io::Error::other(""),
    })
}

/// Turns -1 into the errno as an error.
fn check(rc: libc::c_int, what: impl Into<String>) -> Result<libc::c_int, Error> {
    if rc < 0 { Err(Error::os(what)(std::io::Error::last_os_error())) } else { Ok(rc) }
}

fn micros(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000 + (ts.tv_nsec as u64) / 1000
}

fn parent_cpu_micros() -> u64 {
    // The parent's CPU time so far: utime + stime of /proc/PPID/stat, in clock ticks.
    // SAFETY: getppid and sysconf have no preconditions.
    let (ppid, hz) = unsafe { (libc::getppid(), libc::sysconf(libc::_SC_CLK_TCK).max(1) as u64) };
    let stat = std::fs::read_to_string(format!("/proc/{ppid}/stat")).unwrap_or_default();
    let after_name = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<u64> = after_name.split_whitespace().map(|f| f.parse().unwrap_or(0)).collect();
    // Fields after the name start at state (3); utime and stime are fields 14 and 15.
    let ticks = fields.get(11).copied().unwrap_or(0) + fields.get(12).copied().unwrap_or(0);
    ticks * 1_000_000 / hz
}

pub(crate) fn run(args: Args) -> Result<std::convert::Infallible, Error> {
    let start_us = micros(libc::CLOCK_REALTIME);
    let start_cpu_us = micros(libc::CLOCK_PROCESS_CPUTIME_ID);
    let parent_cpu_us = parent_cpu_micros();
    if !crate::valid_id(&args.id) {
        return Err(Error::Id(args.id));
    }
    let exec_meta = std::fs::metadata(&args.exec_file)
        .map_err(|e| Error::ExecFile { path: args.exec_file.display().to_string(), reason: e.to_string() })?;
    let exec_name = match args.exec_file.file_name() {
        Some(name) if exec_meta.is_file() => name.to_os_string(),
        _ => {
            return Err(Error::ExecFile {
                path: args.exec_file.display().to_string(),
                reason: "it is not a regular file".into(),
            });
        }
    };
    let parent_cgroup = args.parent_cgroup.clone().unwrap_or_else(|| exec_name.to_string_lossy().into_owned());
    crate::cgroup::check_parent(&parent_cgroup)?;

    close_inherited_fds();
    for (key, _) in std::env::vars_os() {
        // SAFETY: the jailer is single-threaded here; nothing else reads the environment.
        unsafe { std::env::remove_var(key) };
    }

    let jail_dir = args.chroot_base_dir.join(&exec_name).join(&args.id);
    let root = jail_dir.join("root");
    std::fs::create_dir_all(&root).map_err(Error::os(format!("making the jail {}", root.display())))?;
    let jailed_exec = root.join(&exec_name);
    std::fs::copy(&args.exec_file, &jailed_exec)
        .map_err(Error::os(format!("copying {} into the jail", args.exec_file.display())))?;
    std::fs::set_permissions(&jailed_exec, std::fs::Permissions::from_mode(0o755))
        .map_err(Error::os("making the jailed binary executable"))?;
    let libraries = crate::libraries::closure(&args.exec_file)
        .map_err(|reason| Error::ExecFile { path: args.exec_file.display().to_string(), reason })?;
    for library in libraries {
        let inside = root.join(library.strip_prefix("/").unwrap_or(&library));
        if let Some(dir) = inside.parent() {
            std::fs::create_dir_all(dir).map_err(Error::os(format!("making {}", dir.display())))?;
        }
        std::fs::copy(&library, &inside).map_err(Error::os(format!("copying {} into the jail", library.display())))?;
    }

    if let Some(netns) = &args.netns {
        let ns = std::fs::File::open(netns).map_err(Error::os(format!("opening --netns {}", netns.display())))?;
        // SAFETY: setns on an fd we own; CLONE_NEWNET checks that it is a network namespace.
        check(unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&ns), libc::CLONE_NEWNET) }, "joining --netns")?;
    }

    set_limits(&args.resource_limits)?;

    if !args.cgroups.is_empty() {
        let mounts = std::fs::read_to_string("/proc/mounts").map_err(Error::os("reading /proc/mounts"))?;
        crate::cgroup::apply(
            &mounts,
            args.cgroup_version,
            &args.cgroups,
            &parent_cgroup,
            &args.id,
            std::process::id(),
        )?;
    }

    // What the jail needs from the host's /dev and /proc is read before they go out of sight.
    let userfaultfd = userfaultfd_minor();
    let dev_null =
        std::fs::OpenOptions::new().read(true).write(true).open("/dev/null").map_err(Error::os("opening /dev/null"))?;
    enter_root(&root)?;
    make_devices(args.uid, args.gid, userfaultfd)?;
    // The VMM's default API socket lives in /run.
    std::fs::create_dir_all("/run").map_err(Error::os("making /run in the jail"))?;
    chown(Path::new("/run"), args.uid, args.gid)?;

    if args.daemonize {
        daemonize(&dev_null)?;
    }
    let pid_file = PathBuf::from(format!("/{}.pid", exec_name.to_string_lossy()));
    if args.new_pid_ns {
        // SAFETY: unshare affects the children made from here on.
        check(unsafe { libc::unshare(libc::CLONE_NEWPID) }, "making a PID namespace")?;
        // SAFETY: the process is single-threaded, so fork is safe.
        let child = check(unsafe { libc::fork() }, "forking into the PID namespace")?;
        if child > 0 {
            std::fs::write(&pid_file, child.to_string()).map_err(Error::os("writing the pid file"))?;
            // SAFETY: _exit ends this process; the child carries on as the VMM.
            unsafe { libc::_exit(0) };
        }
    } else {
        std::fs::write(&pid_file, std::process::id().to_string()).map_err(Error::os("writing the pid file"))?;
    }

    drop_privileges(args.uid, args.gid)?;

    let mut vmm_args: Vec<OsString> = vec![
        "--id".into(),
        args.id.clone().into(),
        "--start-time-us".into(),
        start_us.to_string().into(),
        "--start-time-cpu-us".into(),
        start_cpu_us.to_string().into(),
        "--parent-cpu-time-us".into(),
        parent_cpu_us.to_string().into(),
    ];
    vmm_args.extend(args.vmm_args);
    let exec_path = PathBuf::from("/").join(&exec_name);
    let program = cstring(&exec_path)?;
    let mut argv: Vec<CString> = vec![program.clone()];
    for arg in &vmm_args {
        argv.push(CString::new(arg.as_bytes()).map_err(|_| Error::Os {
            what: "a VMM argument has a NUL byte".into(),
            source: std::io::Error::other(""),
        })?);
    }
    let mut argv_ptrs: Vec<*const libc::c_char> = argv.iter().map(|a| a.as_ptr()).collect();
    argv_ptrs.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: NUL-terminated argument and (empty) environment arrays of valid C strings.
    unsafe { libc::execve(program.as_ptr(), argv_ptrs.as_ptr(), envp.as_ptr()) };
    Err(Error::os(format!("executing {}", exec_path.display()))(std::io::Error::last_os_error()))
}

/// Closes every fd above stderr, so that nothing the caller held open reaches the VMM.
fn close_inherited_fds() {
    // SAFETY: close_range only closes fds; nothing in this single-threaded process uses them.
    let rc = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if rc != 0 {
        for fd in 3..1024 {
            // SAFETY: as above, one fd at a time on kernels without close_range.
            unsafe { libc::close(fd) };
        }
    }
}

fn set_limits(limits: &[ResourceLimit]) -> Result<(), Error> {
    let mut open_files = DEFAULT_OPEN_FILES;
    for limit in limits {
        match *limit {
            ResourceLimit::FileSize(bytes) => set_limit(libc::RLIMIT_FSIZE, bytes, "fsize")?,
            ResourceLimit::OpenFiles(count) => open_files = count,
        }
    }
    set_limit(libc::RLIMIT_NOFILE, open_files, "no-file")
}

fn set_limit(resource: libc::__rlimit_resource_t, value: u64, name: &str) -> Result<(), Error> {
    let limit = libc::rlimit { rlim_cur: value, rlim_max: value };
    // SAFETY: setrlimit reads the struct it is given.
    check(unsafe { libc::setrlimit(resource, &limit) }, format!("setting --resource-limit {name}={value}")).map(drop)
}

/// A private mount namespace whose root is the jail.
fn enter_root(root: &Path) -> Result<(), Error> {
    let root_c = cstring(root)?;
    // SAFETY: plain mount-namespace system calls on NUL-terminated paths we own.
    unsafe {
        check(libc::unshare(libc::CLONE_NEWNS), "making a mount namespace")?;
        // Mounts made here must not reach the host.
        check(
            libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_SLAVE | libc::MS_REC,
                std::ptr::null(),
            ),
            "making mounts private",
        )?;
        // pivot_root needs the new root to be a mount point.
        check(
            libc::mount(
                root_c.as_ptr(),
                root_c.as_ptr(),
                std::ptr::null(),
                libc::MS_BIND | libc::MS_REC,
                std::ptr::null(),
            ),
            "bind-mounting the jail",
        )?;
        check(libc::chdir(root_c.as_ptr()), "entering the jail")?;
        let _ = std::fs::create_dir("old_root");
        check(libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c"old_root".as_ptr()) as libc::c_int, "pivot_root")?;
        check(libc::chdir(c"/".as_ptr()), "entering the new root")?;
        check(libc::umount2(c"/old_root".as_ptr(), libc::MNT_DETACH), "detaching the host's root")?;
    }
    std::fs::remove_dir("/old_root").map_err(Error::os("removing /old_root"))
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), Error> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid)).map_err(Error::os(format!("chown {}", path.display())))
}

/// The device nodes the VMM opens, owned by its user.
fn make_devices(uid: u32, gid: u32, userfaultfd: Option<u32>) -> Result<(), Error> {
    std::fs::create_dir_all("/dev/net").map_err(Error::os("making /dev/net"))?;
    let mut devices = vec![("/dev/kvm", 10, 232), ("/dev/net/tun", 10, 200), ("/dev/urandom", 1, 9)];
    if let Some(minor) = userfaultfd {
        devices.push(("/dev/userfaultfd", 10, minor));
    }
    for (path, major, minor) in devices {
        let c = cstring(Path::new(path))?;
        let _ = std::fs::remove_file(path);
        // SAFETY: mknod on a NUL-terminated path with a character-device mode.
        check(
            unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(major, minor)) },
            format!("making {path}"),
        )?;
        chown(Path::new(path), uid, gid)?;
    }
    Ok(())
}

/// /dev/userfaultfd's minor (it is dynamic), from the host's /proc/misc, where it has one.
fn userfaultfd_minor() -> Option<u32> {
    let misc = std::fs::read_to_string("/proc/misc").ok()?;
    misc.lines().find_map(|line| {
        let (minor, name) = line.trim().split_once(' ')?;
        (name.trim() == "userfaultfd").then(|| minor.parse().ok()).flatten()
    })
}

/// Leaves the caller: a new session, no terminal, stdio on /dev/null. Two forks, so that the
/// VMM is no session leader and can never acquire a terminal.
fn daemonize(dev_null: &std::fs::File) -> Result<(), Error> {
    use std::os::fd::AsRawFd;
    // SAFETY: the process is single-threaded, so fork is safe; each parent exits at once.
    unsafe {
        if check(libc::fork(), "daemonizing (first fork)")? > 0 {
            libc::_exit(0);
        }
        check(libc::setsid(), "daemonizing (setsid)")?;
        if check(libc::fork(), "daemonizing (second fork)")? > 0 {
            libc::_exit(0);
        }
        for fd in 0..3 {
            check(libc::dup2(dev_null.as_raw_fd(), fd), "pointing stdio at /dev/null")?;
        }
    }
    Ok(())
}

fn drop_privileges(uid: u32, gid: u32) -> Result<(), Error> {
    // SAFETY: credential system calls with plain integer arguments.
    unsafe {
        check(libc::setgroups(0, std::ptr::null()), "dropping supplementary groups")?;
        check(libc::setresgid(gid, gid, gid), format!("switching to --gid {gid}"))?;
        check(libc::setresuid(uid, uid, uid), format!("switching to --uid {uid}"))?;
        // No exec from here on can gain privileges (setuid binaries, file capabilities).
        check(libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "setting no_new_privs")?;
    }
    Ok(())
}
