//! vhost-user for Ferrovisor, both ways: front-ends, virtio devices whose queues another
//! process serves (virtiofsd, qemu-storage-daemon, Ferrovisor's own back-ends), and back-ends,
//! Ferrovisor's devices served to other VMMs.

pub mod frontend;

pub use frontend::{Kind, LinkError, VhostUserDevice};
pub mod backend;
