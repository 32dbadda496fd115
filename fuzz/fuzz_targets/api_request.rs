//! The API's routing and request bodies: a method, a target and a body, split at the first two
//! NUL bytes of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0);
    let (Some(method), Some(target), body) = (parts.next(), parts.next(), parts.next().unwrap_or_default()) else {
        return;
    };
    let (Ok(method), Ok(target)) = (std::str::from_utf8(method), std::str::from_utf8(target)) else { return };
    if let Err(response) = api::routes::parse(method, target, body) {
        assert!((400..500).contains(&response.status), "{}", response.status);
    }
});
