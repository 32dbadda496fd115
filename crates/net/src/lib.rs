//! Host networking for VMs.

pub mod switch;
pub mod tap;

pub use tap::{Tap, TapError};
