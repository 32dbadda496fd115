//! Why a VM could not be built, started or paused: one type that every part of the build
//! (memory, devices, vCPUs) returns, so that none of them depends on the others for it.

/// Failures while building or starting a VM; each message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot open /dev/kvm ({0}); check that the kvm module is loaded and that you may use /dev/kvm.")]
    OpenKvm(kvm_ioctls::Error),
    #[error("KVM refused to {what}: {source}.")]
    Kvm { what: &'static str, source: kvm_ioctls::Error },
    #[error("Cannot allocate {mib} MiB of guest memory: {reason}.")]
    Memory { mib: u64, reason: String },
    #[error("Cannot open {what} {path}: {source}.")]
    Open { what: &'static str, path: String, source: std::io::Error },
    #[error("{0}")]
    Boot(#[from] arch::Error),
    #[error("Cannot set up the {what}: {source}.")]
    Host { what: &'static str, source: std::io::Error },
    #[error("Cannot set up a virtio device: {0}.")]
    Device(String),
    #[error("Cannot set up an assigned device: {0}.")]
    Passthrough(String),
    #[error("Cannot pause the VM: {0}.")]
    Pause(String),
    #[error("The CPU template cannot be applied: {0}.")]
    CpuTemplate(String),
    #[error("The kernel command line has no room for the virtio devices ({0}); shorten --cmdline.")]
    Cmdline(#[from] linux_loader::cmdline::Error),
}

pub(crate) fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { what, source }
}

pub(crate) fn host_err(what: &'static str) -> impl FnOnce(std::io::Error) -> Error {
    move |source| Error::Host { what, source }
}
