//! MMDS's HTTP handling of guest requests (tokens, paths, formats), versions 1 and 2: requests
//! separated by NUL bytes, the first byte choosing the version.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    net::mmds::fuzz_requests(data);
});
