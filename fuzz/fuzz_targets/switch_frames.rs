//! The switch's learning and forwarding: frames from four ports on two VLANs.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    net::switch::fuzz_frames(data);
});
