//! Host networking for VMs.

pub mod dhcp;
mod dhcp_socket;
pub mod mmds;
pub mod network;
pub mod switch;
pub mod tap;
pub mod usernet;

pub use tap::{Tap, TapError};
