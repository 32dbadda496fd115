//! The API's routing and request bodies (and a CPU template's bitmaps): a method, a target and a
//! body, split at the first two NUL bytes of the input.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |&b| b == 0);
    let (Some(method), Some(target), body) = (parts.next(), parts.next(), parts.next().unwrap_or_default()) else {
        return;
    };
    let (Ok(method), Ok(target)) = (std::str::from_utf8(method), std::str::from_utf8(target)) else { return };
    match api::routes::parse(method, target, body) {
        Err(response) => assert!((400..500).contains(&response.status), "{}", response.status),
        // A CPU template's strings (numbers, registers, bitmaps) are parsed once more.
        Ok(api::Request::PutCpuConfig(config)) => {
            let _ = vmm::config::cpu_template(&config);
        }
        Ok(_) => {}
    }
});
