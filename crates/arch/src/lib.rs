//! The x86_64 boot protocol: where things live in guest memory and the tables a kernel expects
//! to find there when its first instruction runs.
//!
//! Everything here is a pure function of guest memory and the machine's shape, except
//! [`vcpu`], which applies the results to a KVM vCPU.

pub mod boot;
pub mod cpu_template;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod paging;
pub mod vcpu;

use vm_memory::GuestMemoryMmap;

/// Guest RAM as the rest of Ferrovisor sees it.
pub type GuestMemory = GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;

/// Failures while laying out the boot state in guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("The kernel command line does not fit: {0}.")]
    Cmdline(#[from] linux_loader::cmdline::Error),
    #[error("Loading the kernel image failed: {0}.")]
    Loader(#[from] linux_loader::loader::Error),
    #[error("Guest memory is too small for the boot tables: writing {what} at {addr:#x} failed.")]
    GuestWrite { what: &'static str, addr: u64 },
    #[error("The initramfs ({size} bytes) does not fit in guest RAM below {limit:#x}; give the VM more --memory.")]
    InitrdTooLarge { size: u64, limit: u64 },
    #[error("{count} vCPUs need more room than the MP table area has; use at most {max}.")]
    TooManyCpus { count: u32, max: u32 },
    #[error("KVM refused boot MSR {msr:#x} on vCPU {index}.")]
    MsrRefused { index: u32, msr: u32 },
    #[error("The CPU template cannot be applied: {0}.")]
    Template(String),
    #[error("Setting up vCPU {index} failed: {what}: {source}.")]
    Vcpu { index: u32, what: &'static str, source: kvm_ioctls::Error },
}

pub type Result<T> = std::result::Result<T, Error>;
