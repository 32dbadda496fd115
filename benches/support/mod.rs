//! What the benchmarks share: medians and the VMM's own memory.

#![allow(dead_code)]

pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn kib(value: &str) -> u64 {
    value.trim().trim_end_matches("kB").trim().parse().unwrap_or_else(|_| panic!("not a size in kB: {value:?}"))
}

/// The VMM's own memory: its RSS less the resident part of the guest RAM mapping (mappings of
/// 64 MiB or more). Panics when the process cannot be read, so that a crashed VMM never shows
/// up as a VMM that costs nothing.
pub fn overhead_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("the VMM (pid {pid}) cannot be read ({e}); did it crash?"));
    let rss = kib(status.lines().find_map(|l| l.strip_prefix("VmRSS:")).expect("VmRSS in /proc/PID/status"));
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .unwrap_or_else(|e| panic!("the VMM (pid {pid}) cannot be read ({e}); did it crash?"));
    let (mut size, mut guest) = (0u64, 0u64);
    for line in smaps.lines() {
        if let Some(v) = line.strip_prefix("Size:") {
            size = kib(v);
        } else if let Some(v) = line.strip_prefix("Rss:")
            && size >= 64 * 1024
        {
            guest += kib(v);
        }
    }
    rss - guest
}
