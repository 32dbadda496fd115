//! User-mode networking: guest frames (ARP, DHCP, UDP, TCP and the rest) into its stack.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    net::usernet::fuzz_guest_frames(data);
});
