//! Host networking for VMs.

pub mod tap;

pub use tap::{Tap, TapError};
