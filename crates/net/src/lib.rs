//! Host networking for VMs.

pub mod dhcp;
mod dhcp_socket;
pub mod firewall;
pub mod mmds;
pub mod network;
pub mod port_rules;
pub mod switch;
pub mod tap;
pub mod usernet;

pub use tap::{Tap, TapError};

/// A frame smoltcp takes from a guest (user-mode networking, MMDS).
struct RxFrame(Vec<u8>);

impl smoltcp::phy::RxToken for RxFrame {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        f(&self.0)
    }
}

/// What smoltcp sees of a guest's Ethernet link: frames of at most `mtu` bytes.
fn ethernet_capabilities(mtu: usize) -> smoltcp::phy::DeviceCapabilities {
    let mut caps = smoltcp::phy::DeviceCapabilities::default();
    caps.medium = smoltcp::phy::Medium::Ethernet;
    caps.max_transmission_unit = mtu;
    caps
}
