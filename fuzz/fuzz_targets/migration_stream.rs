//! A migration stream as the destination reads it from an untrusted source: frames, the hello,
//! the configuration (checked as a snapshot's, against a host of 64 MiB), pages into the
//! memory it lays out, and the state.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    vmm::migration::receive::fuzz_stream(data);
});
