//! userfaultfd as migrations use it (include/uapi/linux/userfaultfd.h): opening one with the
//! features asked for, and registering guest memory with it.

use std::os::fd::{FromRawFd, OwnedFd};

const UFFD_API: u64 = 0xaa;
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_API, 0xaa, 0x3f, UffdioApi);
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_REGISTER, 0xaa, 0x00, UffdioRegister);

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
pub struct UffdioRange {
    pub start: u64,
    pub len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// A userfaultfd (non-blocking) with `features`.
pub fn open(features: u64) -> Result<OwnedFd, String> {
    // SAFETY: the userfaultfd system call with flags only; it returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(format!("userfaultfd: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: a fresh fd, owned from here on.
    let uffd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    let mut api = UffdioApi { api: UFFD_API, features, ioctls: 0 };
    ioctl(&uffd, UFFDIO_API(), &mut api, "UFFDIO_API")?;
    Ok(uffd)
}

/// Registers [start, start + len) of this process's memory with `uffd` in `mode`.
pub fn register(uffd: &OwnedFd, start: u64, len: u64, mode: u64) -> Result<(), String> {
    let mut register = UffdioRegister { range: UffdioRange { start, len }, mode, ioctls: 0 };
    ioctl(uffd, UFFDIO_REGISTER(), &mut register, "UFFDIO_REGISTER")
}

/// An ioctl on `fd` with the structure `request` takes; the error names it.
pub fn ioctl<T>(
    fd: &impl std::os::fd::AsRawFd,
    request: std::os::raw::c_ulong,
    arg: &mut T,
    what: &str,
) -> Result<(), String> {
    ioctl_raw(fd, request, arg).map_err(|e| format!("{what}: {e}"))
}

/// [`ioctl`] with the OS error as it came.
pub fn ioctl_raw<T>(
    fd: &impl std::os::fd::AsRawFd,
    request: std::os::raw::c_ulong,
    arg: &mut T,
) -> std::io::Result<()> {
    // SAFETY: `arg` is the structure `request` takes, alive for the call.
    let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_mut_ref(fd, request, arg) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}
