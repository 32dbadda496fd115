//! The ioctl request numbers Ferrovisor's threads may issue, each named once. The filters allow
//! `ioctl` only with one of these as its request argument.

use kvm_bindings::*;
use vmm_sys_util::ioctl::ioctl_expr;
use vmm_sys_util::ioctl::{_IOC_NONE, _IOC_READ, _IOC_WRITE};

const KVMIO: u32 = 0xAE;
const TUNTAP: u32 = b'T' as u32;
const VFIO: u32 = b';' as u32;
const VFIO_BASE: u32 = 100;

const fn io(ty: u32, nr: u32) -> u64 {
    ioctl_expr(_IOC_NONE, ty, nr, 0) as u64
}
const fn ior<T>(ty: u32, nr: u32) -> u64 {
    ioctl_expr(_IOC_READ, ty, nr, size_of::<T>() as u32) as u64
}
const fn iow<T>(ty: u32, nr: u32) -> u64 {
    ioctl_expr(_IOC_WRITE, ty, nr, size_of::<T>() as u32) as u64
}
const fn iowr<T>(ty: u32, nr: u32) -> u64 {
    ioctl_expr(_IOC_READ | _IOC_WRITE, ty, nr, size_of::<T>() as u32) as u64
}
/// For structures the bindings lack: their size given.
const fn iowr_sized(ty: u32, nr: u32, size: u32) -> u64 {
    ioctl_expr(_IOC_READ | _IOC_WRITE, ty, nr, size) as u64
}

/// An ioctl request a filter allows, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ioctl {
    pub name: &'static str,
    pub request: u64,
}

macro_rules! ioctls {
    ($($name:ident = $value:expr;)*) => {
        $(pub const $name: Ioctl = Ioctl { name: stringify!($name), request: $value };)*
        /// Every request named here, for naming a forbidden one in a report.
        pub const ALL: &[Ioctl] = &[$($name),*];
    };
}

ioctls! {
    // The VM's fd.
    KVM_IRQ_LINE = iow::<kvm_irq_level>(KVMIO, 0x61);
    KVM_GET_IRQCHIP = iowr::<kvm_irqchip>(KVMIO, 0x62);
    KVM_SET_IRQCHIP = ior::<kvm_irqchip>(KVMIO, 0x63);
    KVM_SET_GSI_ROUTING = iow::<kvm_irq_routing>(KVMIO, 0x6a);
    KVM_IRQFD = iow::<kvm_irqfd>(KVMIO, 0x76);
    KVM_IOEVENTFD = iow::<kvm_ioeventfd>(KVMIO, 0x79);
    KVM_SET_CLOCK = iow::<kvm_clock_data>(KVMIO, 0x7b);
    KVM_GET_CLOCK = ior::<kvm_clock_data>(KVMIO, 0x7c);
    KVM_GET_PIT2 = ior::<kvm_pit_state2>(KVMIO, 0x9f);
    KVM_SET_PIT2 = iow::<kvm_pit_state2>(KVMIO, 0xa0);
    KVM_SIGNAL_MSI = iow::<kvm_msi>(KVMIO, 0xa5);
    KVM_GET_DIRTY_LOG = iow::<kvm_dirty_log>(KVMIO, 0x42);
    KVM_CLEAR_DIRTY_LOG = iowr::<kvm_clear_dirty_log>(KVMIO, 0xc0);
    KVM_RESET_DIRTY_RINGS = io(KVMIO, 0xc7);
    KVM_ENABLE_CAP = iow::<kvm_enable_cap>(KVMIO, 0xa3);
    // A migration's write tracking: userfaultfd's asynchronous write protection of guest
    // memory, and the pagemap scan that reports and protects again (uffdio_api 24 bytes,
    // uffdio_register 32, uffdio_writeprotect 24, pm_scan_arg 96).
    UFFDIO_API = iowr_sized(0xaa, 0x3f, 24);
    UFFDIO_REGISTER = iowr_sized(0xaa, 0x00, 32);
    UFFDIO_WRITEPROTECT = iowr_sized(0xaa, 0x06, 24);
    UFFDIO_COPY = iowr_sized(0xaa, 0x03, 40);
    UFFDIO_ZEROPAGE = iowr_sized(0xaa, 0x04, 32);
    PAGEMAP_SCAN = iowr_sized(b'f' as u32, 16, 96);
    KVM_SET_USER_MEMORY_REGION = iow::<kvm_userspace_memory_region>(KVMIO, 0x46);
    KVM_CHECK_EXTENSION = io(KVMIO, 0x03);
    KVM_GET_MSR_INDEX_LIST = iowr::<kvm_msr_list>(KVMIO, 0x02);
    // A vCPU's fd.
    KVM_RUN = io(KVMIO, 0x80);
    KVM_GET_REGS = ior::<kvm_regs>(KVMIO, 0x81);
    KVM_SET_REGS = iow::<kvm_regs>(KVMIO, 0x82);
    KVM_GET_SREGS = ior::<kvm_sregs>(KVMIO, 0x83);
    KVM_SET_SREGS = iow::<kvm_sregs>(KVMIO, 0x84);
    KVM_TRANSLATE = iowr::<kvm_translation>(KVMIO, 0x85);
    KVM_GET_MSRS = iowr::<kvm_msrs>(KVMIO, 0x88);
    KVM_SET_MSRS = iow::<kvm_msrs>(KVMIO, 0x89);
    KVM_GET_FPU = ior::<kvm_fpu>(KVMIO, 0x8c);
    KVM_SET_FPU = iow::<kvm_fpu>(KVMIO, 0x8d);
    KVM_GET_LAPIC = ior::<kvm_lapic_state>(KVMIO, 0x8e);
    KVM_SET_LAPIC = iow::<kvm_lapic_state>(KVMIO, 0x8f);
    KVM_GET_MP_STATE = ior::<kvm_mp_state>(KVMIO, 0x98);
    KVM_SET_MP_STATE = iow::<kvm_mp_state>(KVMIO, 0x99);
    KVM_GET_VCPU_EVENTS = ior::<kvm_vcpu_events>(KVMIO, 0x9f);
    KVM_SET_VCPU_EVENTS = iow::<kvm_vcpu_events>(KVMIO, 0xa0);
    KVM_GET_DEBUGREGS = ior::<kvm_debugregs>(KVMIO, 0xa1);
    KVM_SET_DEBUGREGS = iow::<kvm_debugregs>(KVMIO, 0xa2);
    KVM_GET_XSAVE = ior::<kvm_xsave>(KVMIO, 0xa4);
    KVM_SET_XSAVE = iow::<kvm_xsave>(KVMIO, 0xa5);
    KVM_GET_XCRS = ior::<kvm_xcrs>(KVMIO, 0xa6);
    KVM_SET_XCRS = iow::<kvm_xcrs>(KVMIO, 0xa7);
    KVM_KVMCLOCK_CTRL = io(KVMIO, 0xad);
    KVM_GET_TSC_KHZ = io(KVMIO, 0xa3);
    KVM_GET_XSAVE2 = ior::<kvm_xsave>(KVMIO, 0xcf);
    // TAP devices.
    TUNSETIFF = iow::<libc::c_int>(TUNTAP, 202);
    TUNSETOFFLOAD = iow::<libc::c_uint>(TUNTAP, 208);
    TUNSETQUEUE = iow::<libc::c_int>(TUNTAP, 217);
    // An assigned device under kernel VFIO: its interrupts, reset, and DMA unmapping at detach.
    VFIO_DEVICE_SET_IRQS = io(VFIO, VFIO_BASE + 10);
    VFIO_DEVICE_RESET = io(VFIO, VFIO_BASE + 11);
    VFIO_IOMMU_UNMAP_DMA = io(VFIO, VFIO_BASE + 14);
    TUNSETVNETHDRSZ = iow::<libc::c_int>(TUNTAP, 216);
    TUNGETIFF = ior::<libc::c_uint>(TUNTAP, 210);
    // Interfaces (a datagram socket's SIOC* requests) and terminals.
    SIOCGIFFLAGS = libc::SIOCGIFFLAGS;
    SIOCSIFFLAGS = libc::SIOCSIFFLAGS;
    TCGETS = libc::TCGETS;
    TCSETS = libc::TCSETS;
    TIOCGWINSZ = libc::TIOCGWINSZ;
    TIOCGPTN = libc::TIOCGPTN;
    TIOCSPTLCK = libc::TIOCSPTLCK;
    FIONBIO = libc::FIONBIO;
    FIOCLEX = libc::FIOCLEX;
}

/// The name of ioctl request `request`, if a filter names it.
pub fn name(request: u64) -> Option<&'static str> {
    ALL.iter().find(|i| i.request == request).map(|i| i.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_match_the_kernels_numbers() {
        // Values from Linux's headers (include/uapi/linux/kvm.h, if_tun.h).
        assert_eq!(KVM_RUN.request, 0xae80);
        assert_eq!(KVM_SET_GSI_ROUTING.request, 0x4008_ae6a);
        assert_eq!(KVM_IRQFD.request, 0x4020_ae76);
        assert_eq!(KVM_GET_REGS.request, 0x8090_ae81);
        assert_eq!(KVM_GET_XSAVE.request, 0x9000_aea4);
        assert_eq!(TUNSETIFF.request, 0x4004_54ca);
        assert_eq!(TUNSETOFFLOAD.request, 0x4004_54d0);
        assert_eq!(TUNSETQUEUE.request, 0x4004_54d9);
    }

    #[test]
    fn names_are_unique() {
        for (i, a) in ALL.iter().enumerate() {
            assert!(ALL[i + 1..].iter().all(|b| b.request != a.request), "{} is listed twice", a.name);
        }
    }
}
