//! virtio-vsock: the guest's packets (headers and payloads) against the connection muxer.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    virtio::vsock::fuzz_guest_packets(data);
});
