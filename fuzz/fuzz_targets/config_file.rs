//! Firecracker's configuration file, as `--config-file` reads it.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = api::routes::body_of::<api::models::VmConfigFile>("--config-file", data);
});
