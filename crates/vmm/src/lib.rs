//! The VM lifecycle: guest memory, kernel loading, device wiring, vCPU threads, and the reason
//! the VM stopped.

pub mod config;
pub mod controller;
mod dirty;
mod error;
pub mod exit;
pub mod fault;
mod footprint;
mod gsi;
mod hotplug;
pub mod memory;
pub mod metrics;
pub mod migration;
mod passthrough;
mod resources;
pub mod snapshot;
mod vcpu;
mod virtio_devices;
pub mod vm;

pub use config::{
    ConfigError, ConsoleConfig, DiskConfig, HostLimits, HugePages, MemoryOptions, MemorySpec, NetConfig, SerialConfig,
    VirtioTransport, VmConfig, VsockConfig,
};
pub use error::Error;
pub use exit::VmExit;
pub use virtio_devices::backend_net;
pub use vm::{RunningVm, start};
