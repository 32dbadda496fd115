//! The default seccomp filters: for each kind of thread, the system calls it makes while it
//! runs, and the ioctl requests among them. A system call missing here ends the VMM with a
//! report naming it (see `sigsys`); adding one is a deliberate edit to this file.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter, SeccompRule,
};

use crate::ThreadKind;
use crate::ioctls::{self, Ioctl};

/// What every thread does: memory, locks, time, signals, logging, ending.
const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_tgkill,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_fcntl,
];

/// Waiting on fds: the device workers, the API, the network services.
const EVENTS: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_eventfd2,
    libc::SYS_dup,
    libc::SYS_timerfd_create,
    libc::SYS_timerfd_settime,
    libc::SYS_timerfd_gettime,
];

/// Stream and datagram sockets already opened, and Unix sockets to connect.
const SOCKETS: &[i64] = &[
    libc::SYS_socket,
    libc::SYS_connect,
    libc::SYS_accept4,
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
];

/// Live migration: the destination listens and accepts (a Unix socket path is unlinked when it
/// goes) and makes guest memory (a memfd when it is shared), or checks the size of the memory
/// file a local migration hands over; the source reads which pages are resident.
const MIGRATION: &[i64] = &[
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_unlink,
    libc::SYS_memfd_create,
    libc::SYS_ftruncate,
    libc::SYS_mincore,
    libc::SYS_fstat,
    libc::SYS_statx,
    // A post-copy destination catches the guest's first touch of a missing page.
    libc::SYS_userfaultfd,
];

/// An assigned device: messages to its vfio-user server on the connected socket, or reads and
/// writes of its kernel VFIO regions; from the vCPUs (BARs, configuration space) and from the
/// main thread (detaching it when the VM stops).
const ASSIGNED_DEVICES: &[i64] = &[
    libc::SYS_sendto,
    libc::SYS_recvfrom,
    libc::SYS_sendmsg,
    libc::SYS_recvmsg,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
];

/// The main thread after the VM is built: snapshots, drive swaps, logger and metrics files,
/// pausing vCPUs, stopping.
const VMM: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_ftruncate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_mincore,
    // A migration write-protects guest memory through a userfaultfd.
    libc::SYS_userfaultfd,
    // Stopping the API server: its listening socket is shut down.
    libc::SYS_shutdown,
];

const VMM_IOCTLS: &[Ioctl] = &[
    ioctls::KVM_GET_REGS,
    ioctls::KVM_GET_SREGS,
    ioctls::KVM_GET_XSAVE,
    ioctls::KVM_GET_XSAVE2,
    ioctls::KVM_GET_XCRS,
    ioctls::KVM_GET_DEBUGREGS,
    ioctls::KVM_GET_LAPIC,
    ioctls::KVM_GET_MSRS,
    ioctls::KVM_GET_MP_STATE,
    ioctls::KVM_GET_VCPU_EVENTS,
    ioctls::KVM_GET_IRQCHIP,
    ioctls::KVM_GET_PIT2,
    ioctls::KVM_GET_CLOCK,
    ioctls::KVM_GET_DIRTY_LOG,
    // A migration turns dirty logging on for every memory slot, with KVM's manual protection.
    ioctls::KVM_SET_USER_MEMORY_REGION,
    ioctls::KVM_ENABLE_CAP,
    ioctls::KVM_CLEAR_DIRTY_LOG,
    // Reading the dirty rings frees their entries.
    ioctls::KVM_RESET_DIRTY_RINGS,
    // ...and write-protects guest memory to see every write (`migration::written`).
    ioctls::UFFDIO_API,
    ioctls::UFFDIO_REGISTER,
    ioctls::UFFDIO_WRITEPROTECT,
    ioctls::PAGEMAP_SCAN,
    ioctls::KVM_GET_MSR_INDEX_LIST,
    ioctls::KVM_CHECK_EXTENSION,
    ioctls::KVM_SET_GSI_ROUTING,
    ioctls::KVM_IRQ_LINE,
    ioctls::KVM_SIGNAL_MSI,
    ioctls::TUNSETOFFLOAD,
    // A multi-queue TAP's queues follow the pairs the driver uses.
    ioctls::TUNSETQUEUE,
    ioctls::FIONBIO,
    ioctls::VFIO_DEVICE_SET_IRQS,
    ioctls::VFIO_DEVICE_RESET,
    ioctls::VFIO_IOMMU_UNMAP_DMA,
];

/// A vCPU runs the guest and its port and MMIO accesses; a driver's DRIVER_OK activates a
/// device here (its worker comes from the launcher).
const VCPU_IOCTLS: &[Ioctl] = &[
    ioctls::KVM_RUN,
    ioctls::KVM_GET_REGS,
    ioctls::KVM_GET_SREGS,
    ioctls::KVM_TRANSLATE,
    ioctls::KVM_IRQ_LINE,
    ioctls::KVM_SIGNAL_MSI,
    ioctls::KVM_SET_GSI_ROUTING,
    ioctls::KVM_IRQFD,
    ioctls::KVM_IOEVENTFD,
    ioctls::KVM_KVMCLOCK_CTRL,
    // KVM stops a vCPU whose dirty ring is full until the rings are read and reset.
    ioctls::KVM_RESET_DIRTY_RINGS,
    ioctls::TUNSETOFFLOAD,
    // A multi-queue TAP's queues follow the pairs the driver uses.
    ioctls::TUNSETQUEUE,
    ioctls::FIONBIO,
    ioctls::VFIO_DEVICE_SET_IRQS,
    ioctls::VFIO_DEVICE_RESET,
];

/// The thread that starts every other thread once filters are on.
/// A new thread starts under it and installs its own filter (prctl, seccomp).
const LAUNCHER: &[i64] =
    &[libc::SYS_clone, libc::SYS_clone3, libc::SYS_set_robust_list, libc::SYS_rseq, libc::SYS_prctl, libc::SYS_seccomp];

/// A disk's worker; io_uring for the Async engine (its ring restricted to reads and writes
/// before it is enabled).
const BLOCK: &[i64] = &[
    libc::SYS_io_uring_setup,
    libc::SYS_io_uring_enter,
    libc::SYS_io_uring_register,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fdatasync,
    libc::SYS_fsync,
    libc::SYS_fallocate,
    libc::SYS_lseek,
    libc::SYS_fstat,
];

const TERMINAL_IOCTLS: &[Ioctl] = &[ioctls::TCGETS, ioctls::TCSETS, ioctls::TIOCGWINSZ, ioctls::FIONBIO];

const API: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_poll,
];

/// The files the DHCP server keeps its leases in.
const LEASE_FILES: &[i64] = &[
    libc::SYS_openat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_unlink,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    libc::SYS_fsync,
];

/// Whether the launcher starts threads of `kind` (all but the main thread, the launcher, and
/// the switch and DHCP processes). A thread keeps its creator's filter beneath its own, so the
/// launcher's filter allows all that theirs do (it handles no untrusted input).
fn launched(kind: ThreadKind) -> bool {
    !matches!(
        kind,
        ThreadKind::Vmm
            | ThreadKind::Launcher
            | ThreadKind::Switch
            | ThreadKind::Dhcp
            | ThreadKind::DeviceServer
            | ThreadKind::VhostUserBackend
    )
}

/// The system calls and ioctl requests `kind` may make.
fn allowed(kind: ThreadKind) -> (Vec<i64>, Vec<Ioctl>) {
    if kind == ThreadKind::Launcher {
        let (mut syscalls, mut ioctls) = (LAUNCHER.to_vec(), Vec::new());
        for child in ThreadKind::ALL.into_iter().filter(|k| launched(*k)) {
            let (s, i) = allowed(child);
            syscalls.extend(s);
            ioctls.extend(i.into_iter().filter(|i| !ioctls.contains(i)).collect::<Vec<_>>());
        }
        syscalls.sort_unstable();
        syscalls.dedup();
        return (syscalls, ioctls);
    }
    let groups: &[&[i64]] = match kind {
        ThreadKind::Vmm => &[VMM, EVENTS, ASSIGNED_DEVICES],
        ThreadKind::Vcpu => &[EVENTS, ASSIGNED_DEVICES],
        ThreadKind::Launcher => &[],
        ThreadKind::Api => &[API, EVENTS],
        ThreadKind::Block => &[BLOCK, EVENTS],
        ThreadKind::Pmem => &[EVENTS, &[libc::SYS_fsync]],
        ThreadKind::Net => &[EVENTS, SOCKETS],
        ThreadKind::Rng => &[EVENTS],
        ThreadKind::Console => &[EVENTS],
        ThreadKind::Vsock => &[EVENTS, SOCKETS],
        ThreadKind::Balloon => &[EVENTS],
        // Plugging maps a block's memory again; unplugging punches it out of a shared memfd.
        ThreadKind::Mem => &[EVENTS, &[libc::SYS_fallocate]],
        ThreadKind::Usernet => &[EVENTS, SOCKETS, &[libc::SYS_bind, libc::SYS_listen]],
        ThreadKind::SerialInput => &[EVENTS],
        ThreadKind::Switch => &[EVENTS, SOCKETS, &[libc::SYS_unlink]],
        ThreadKind::Dhcp => &[EVENTS, SOCKETS, LEASE_FILES],
        // Accepting VMMs one after another, mapping the guest memory they share.
        ThreadKind::DeviceServer => &[EVENTS, SOCKETS, &[libc::SYS_unlink, libc::SYS_statx, libc::SYS_newfstatat]],
        ThreadKind::Migration => &[EVENTS, SOCKETS, MIGRATION],
        ThreadKind::VhostUser => &[EVENTS, SOCKETS],
        // The back-end library starts its threads itself (under this filter), listens on a
        // path it replaces, and maps each memory table the front-end sends.
        ThreadKind::VhostUserBackend => {
            &[EVENTS, SOCKETS, BLOCK, LAUNCHER, &[libc::SYS_bind, libc::SYS_listen, libc::SYS_unlink]]
        }
        // Its one log line: the logger looks whether stderr takes a write first.
        ThreadKind::DirtyLog => &[&[libc::SYS_poll]],
    };
    let ioctls: &'static [Ioctl] = match kind {
        ThreadKind::Vmm => VMM_IOCTLS,
        ThreadKind::Vcpu => VCPU_IOCTLS,
        ThreadKind::Console | ThreadKind::SerialInput => TERMINAL_IOCTLS,
        // The driver's control queue attaches and detaches a multi-queue TAP's queues.
        ThreadKind::Net => &[ioctls::FIONBIO, ioctls::TUNSETQUEUE],
        ThreadKind::Vsock | ThreadKind::Usernet | ThreadKind::Switch | ThreadKind::Api => &[ioctls::FIONBIO],
        // A network back-end sets its TAP's offloads to what the driver acknowledged.
        ThreadKind::VhostUserBackend => &[ioctls::FIONBIO, ioctls::TUNSETOFFLOAD],
        // Each plugged block of hotpluggable memory is a KVM memory slot.
        ThreadKind::Mem => &[ioctls::KVM_SET_USER_MEMORY_REGION],
        ThreadKind::DirtyLog => &[ioctls::KVM_RESET_DIRTY_RINGS],
        // The source reads and clears KVM's dirty log round after round; a post-copy destination
        // catches missing pages with userfaultfd and fills them.
        ThreadKind::Migration => &[
            ioctls::KVM_GET_DIRTY_LOG,
            ioctls::KVM_CLEAR_DIRTY_LOG,
            ioctls::KVM_RESET_DIRTY_RINGS,
            ioctls::PAGEMAP_SCAN,
            ioctls::FIONBIO,
            ioctls::UFFDIO_API,
            ioctls::UFFDIO_REGISTER,
            ioctls::UFFDIO_COPY,
            ioctls::UFFDIO_ZEROPAGE,
        ],
        _ => &[],
    };
    let mut syscalls: Vec<i64> = BASE.iter().chain(groups.iter().flat_map(|g| g.iter())).copied().collect();
    syscalls.sort_unstable();
    syscalls.dedup();
    (syscalls, ioctls.to_vec())
}

/// The filter for `kind`, compiled to BPF: anything else traps (SIGSYS).
pub fn default_filter(kind: ThreadKind) -> Result<BpfProgram, seccompiler::BackendError> {
    let (syscalls, allowed_ioctls) = allowed(kind);
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = syscalls.into_iter().map(|nr| (nr, Vec::new())).collect();
    if !allowed_ioctls.is_empty() {
        let by_request = allowed_ioctls
            .iter()
            .map(|ioctl| {
                let condition =
                    SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, ioctl.request & 0xffff_ffff)?;
                SeccompRule::new(vec![condition])
            })
            .collect::<Result<Vec<_>, _>>()?;
        rules.insert(libc::SYS_ioctl, by_request);
    }
    let filter =
        SeccompFilter::new(rules, SeccompAction::Trap, SeccompAction::Allow, std::env::consts::ARCH.try_into()?)?;
    filter.try_into()
}

/// Whether `kind`'s default filter allows system call `nr` (any arguments).
pub fn allows(kind: ThreadKind, nr: i64) -> bool {
    let (syscalls, ioctls) = allowed(kind);
    syscalls.contains(&nr) || (nr == libc::SYS_ioctl && !ioctls.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles() {
        for kind in ThreadKind::ALL {
            let program = default_filter(kind).unwrap();
            assert!(program.len() > 10, "{kind:?}");
        }
    }

    #[test]
    fn vcpus_cannot_open_files_or_start_programs() {
        for nr in [libc::SYS_openat, libc::SYS_execve, libc::SYS_socket, libc::SYS_clone, libc::SYS_unlink] {
            assert!(!allows(ThreadKind::Vcpu, nr), "{nr}");
        }
        assert!(allows(ThreadKind::Launcher, libc::SYS_clone3));
        assert!(!allows(ThreadKind::Api, libc::SYS_openat));
    }
}
