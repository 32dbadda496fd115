//! Emulated legacy devices and the buses that route guest port and MMIO accesses to them.

pub mod boot_timer;
pub mod bus;
pub mod cmos;
pub mod guest_log;
pub mod i8042;
pub mod pci;
pub mod serial;

pub use bus::{Bus, BusDevice, SharedDevice};
