//! `--seccomp-filter` files: seccompiler's JSON and Firecracker's compiled BPF.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sandbox::parse_filter_file(data, "fuzz");
});
