//! The virtual firewall: rules files (JSON and TOML) and frames both ways through a port with
//! rules, anti-spoofing and storm control.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else { return };
    match mode % 3 {
        0 => net::firewall::fuzz_frames(rest),
        _ => {
            let text = String::from_utf8_lossy(rest);
            if let Ok(spec) = net::firewall::RuleSetSpec::from_file_text(&text, mode % 3 == 2) {
                let _ = spec.check();
            }
        }
    }
});
