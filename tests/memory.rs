//! Guest memory backing and what it costs the host: KSM merging of identical pages across VMs,
//! hugetlbfs and transparent huge pages, each read back from the VMM's /proc files. The tests
//! change host-wide settings (KSM's, nr_hugepages) and put them back when they end.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Running, probe_command_with_memory};

const TIMEOUT: Duration = Duration::from_secs(60);
const KSM: &str = "/sys/kernel/mm/ksm";

/// Sets host files for the test and restores what they held when dropped.
struct HostSettings(Vec<(String, String)>);

impl HostSettings {
    fn set(pairs: &[(&str, &str)]) -> HostSettings {
        let mut saved = Vec::new();
        for (path, value) in pairs {
            let old = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}")).trim().to_string();
            std::fs::write(path, value).unwrap_or_else(|e| panic!("writing {path}: {e}"));
            saved.push((path.to_string(), old));
        }
        HostSettings(saved)
    }
}

impl Drop for HostSettings {
    fn drop(&mut self) {
        for (path, value) in self.0.iter().rev() {
            let _ = std::fs::write(path, value);
        }
    }
}

/// A probe that fills `mib` MiB and idles, with `--memory` as given.
fn idle_probe(memory: &str, mib: u64) -> Running {
    let cmd =
        probe_command_with_memory(1, &format!("probe.test=memfill probe.memfill.mib={mib} probe.idle=on"), memory);
    let mut vm = Running::start(cmd);
    assert!(vm.wait_for_output("PROBE done passed=1", TIMEOUT), "{}\n{}", vm.stdout(), vm.stderr());
    vm
}

/// The VMM's statistics line, asked for with SIGUSR1: `key=value` pairs.
fn stats(vm: &Running) -> Vec<(String, u64)> {
    let before = vm.stderr().matches("memory: ").count();
    // SAFETY: signalling our own child.
    unsafe { libc::kill(vm.child.id() as i32, libc::SIGUSR1) };
    let deadline = Instant::now() + Duration::from_secs(5);
    // Wait for the whole line: the reader thread may have seen only its start.
    let complete = |err: &str| err.matches("memory: ").count() > before && err.ends_with('\n');
    while !complete(&vm.stderr()) {
        assert!(Instant::now() < deadline, "no statistics after SIGUSR1: {}", vm.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    let err = vm.stderr();
    let line = err.lines().rev().find(|l| l.starts_with("memory: ")).unwrap();
    line["memory: ".len()..]
        .split(' ')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.parse().unwrap()))
        .collect()
}

fn stat(stats: &[(String, u64)], key: &str) -> u64 {
    stats.iter().find(|(k, _)| k == key).map(|(_, v)| *v).unwrap_or_else(|| panic!("{key} in {stats:?}"))
}

fn ksm_file(name: &str) -> u64 {
    std::fs::read_to_string(format!("{KSM}/{name}")).unwrap().trim().parse().unwrap()
}

#[test]
fn ksm_merges_identical_guest_pages_and_the_vmm_reports_it() {
    let _ksm = HostSettings::set(&[
        (&format!("{KSM}/run"), "1"),
        (&format!("{KSM}/pages_to_scan"), "5000"),
        (&format!("{KSM}/sleep_millisecs"), "10"),
    ]);
    const FILL_PAGES: u64 = 64 * 256;
    let merged: Vec<Running> = (0..4).map(|_| idle_probe("size=96,mergeable=on", 64)).collect();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let pages: Vec<u64> = merged.iter().map(|vm| stat(&stats(vm), "ksm_merging_pages")).collect();
        if pages.iter().all(|&p| p >= FILL_PAGES * 3 / 4) {
            eprintln!("KSM merged {pages:?} pages of the {FILL_PAGES} each VM filled");
            break;
        }
        assert!(Instant::now() < deadline, "KSM merged only {pages:?} of {FILL_PAGES} pages per VM");
        std::thread::sleep(Duration::from_millis(500));
    }
    let status = Command::new(env!("CARGO_BIN_EXE_ferrovisor")).args(["ksm", "status"]).output().unwrap();
    let status = String::from_utf8_lossy(&status.stdout);
    let saved: u64 = status.split(' ').find_map(|kv| kv.strip_prefix("saved_mib=")).unwrap().parse().unwrap();
    assert!(saved >= 3 * 64 * 3 / 4, "the host shares at least three VMs' fill: {status}");

    // The same memory without mergeable=on: ksmd passes over it. The merged VMs stay up, so
    // that ksmd keeps scanning (it sleeps when nothing is mergeable).
    let plain: Vec<Running> = (0..2).map(|_| idle_probe("size=96", 64)).collect();
    let scans = ksm_file("full_scans");
    let deadline = Instant::now() + TIMEOUT;
    while ksm_file("full_scans") < scans + 3 {
        assert!(Instant::now() < deadline, "ksmd stopped scanning");
        std::thread::sleep(Duration::from_millis(100));
    }
    for vm in &plain {
        assert_eq!(stat(&stats(vm), "ksm_merging_pages"), 0);
    }
    drop(merged);
}

/// Asks for `pages` huge pages until `needed` are free; the kernel may find fewer free 2 MiB
/// blocks than asked for, so memory is compacted between tries.
fn reserve_huge_pages(pages: u64, needed: u64) -> bool {
    for _ in 0..3 {
        if free_huge_pages() >= needed {
            return true;
        }
        let _ = std::fs::write("/proc/sys/vm/compact_memory", "1");
        let _ = std::fs::write("/proc/sys/vm/nr_hugepages", pages.to_string());
    }
    free_huge_pages() >= needed
}

fn free_huge_pages() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    meminfo.lines().find_map(|l| l.strip_prefix("HugePages_Free:")).unwrap().trim().parse().unwrap()
}

/// Sums `key` over the VMM's mappings in /proc/PID/smaps, in KiB.
fn smaps_kib(vm: &Running, key: &str) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{}/smaps", vm.child.id())).unwrap();
    smaps
        .lines()
        .filter_map(|l| l.strip_prefix(key))
        .map(|v| v.trim_start_matches(':').trim().trim_end_matches("kB").trim().parse::<u64>().unwrap_or(0))
        .sum()
}

#[test]
fn hugepages_on_backs_guest_ram_with_hugetlbfs_and_too_few_is_a_clear_error() {
    {
        let _pages = HostSettings::set(&[("/proc/sys/vm/nr_hugepages", "0")]);
        let cmd = probe_command_with_memory(1, "", "size=64,hugepages=on");
        let out = Running::start(cmd).finish(TIMEOUT);
        assert_eq!(out.status.code(), Some(2), "{}", out.describe());
        assert!(out.stderr.contains("needs 32 free 2 MiB huge pages but the host has 0"), "{}", out.describe());
        assert!(out.stderr.contains("/proc/sys/vm/nr_hugepages"), "{}", out.describe());
    }
    let _pages = HostSettings::set(&[("/proc/sys/vm/nr_hugepages", "40")]);
    assert!(reserve_huge_pages(40, 32), "the host could not reserve 32 huge pages for the test");
    let vm = idle_probe("size=64,hugepages=on", 32);
    let hugetlb = smaps_kib(&vm, "Private_Hugetlb");
    assert!(hugetlb >= 32 * 1024, "the probe's 32 MiB fill sits on hugetlbfs pages: {hugetlb} KiB");
    assert!(stat(&stats(&vm), "huge_kib") >= 32 * 1024);
}

#[test]
fn thp_backs_guest_ram_with_transparent_huge_pages() {
    let vm = idle_probe("size=64,hugepages=thp", 32);
    let anon_huge = smaps_kib(&vm, "AnonHugePages");
    assert!(anon_huge >= 16 * 1024, "most of the 32 MiB fill is on 2 MiB pages: {anon_huge} KiB");
    assert_eq!(stat(&stats(&vm), "huge_kib"), anon_huge);
    let plain = idle_probe("64", 32);
    assert_eq!(smaps_kib(&plain, "AnonHugePages"), 0, "no huge pages without hugepages=thp");
}

#[test]
fn prefault_and_shared_memory_are_resident_from_the_start() {
    let vm = idle_probe("size=64,prefault=on,shared=on", 1);
    let s = stats(&vm);
    assert_eq!(stat(&s, "guest_rss_kib"), 64 * 1024, "every page touched at start: {s:?}");
    assert!(stat(&s, "vmm_overhead_kib") < 16 * 1024, "{s:?}");
}

/// Hotpluggable memory (virtio-mem) on every backing: the probe plugs 64 MiB and writes it,
/// then unplugs 48; guest memory resident in the VMM rises and falls with it, whether it is
/// on transparent huge pages, hugetlbfs, a shared memfd (pages punched out of it) or KSM-marked
/// 4 KiB pages. Prefaulting touches RAM only, never the hotpluggable region.
#[test]
fn hotplugged_memory_follows_the_guest_on_every_backing() {
    let dir = common::scratch_dir("memory-hotplug");
    let _pages = HostSettings::set(&[("/proc/sys/vm/nr_hugepages", "100")]);
    let mut backings = vec!["size=64,hugepages=thp", "size=64,shared=on", "size=64,mergeable=on,prefault=on"];
    match reserve_huge_pages(100, 96) {
        true => backings.push("size=64,hugepages=on"),
        false => eprintln!("skipping hugetlbfs: the host could not reserve 96 huge pages"),
    }
    for (i, memory) in backings.into_iter().enumerate() {
        let socket = dir.join(format!("api{i}.sock"));
        let mut cmd = probe_command_with_memory(1, "probe.test=virtio-mem probe.idle=on", memory);
        cmd.args(["--memory-hotplug", "total=128", "--api-sock"]).arg(&socket);
        let mut vm = Running::start(cmd);
        assert!(vm.wait_for_output("PROBE virtio-mem ready", TIMEOUT), "{memory}: {}", vm.stderr());
        let ready = stat(&stats(&vm), "guest_rss_kib");
        common::api_call(&socket, "PATCH", "/hotplug/memory", r#"{"requested_size_mib": 64}"#, 204);
        assert!(vm.wait_for_output("PROBE virtio-mem plugged mib=64", TIMEOUT), "{memory}: {}", vm.stdout());
        let plugged = stat(&stats(&vm), "guest_rss_kib");
        common::api_call(&socket, "PATCH", "/hotplug/memory", r#"{"requested_size_mib": 16}"#, 204);
        assert!(vm.wait_for_output("PROBE virtio-mem ok", TIMEOUT), "{memory}: {}", vm.stdout());
        let unplugged = stat(&stats(&vm), "guest_rss_kib");
        eprintln!("{memory}: guest RSS {ready} KiB ready, {plugged} plugged, {unplugged} unplugged");
        assert!(ready < (64 + 32) * 1024, "{memory}: the region was not faulted in at start ({ready} KiB)");
        assert!(plugged >= ready + 64 * 1024 * 8 / 10, "{memory}: {ready} -> {plugged} KiB");
        assert!(plugged >= unplugged + 48 * 1024 * 8 / 10, "{memory}: {plugged} -> {unplugged} KiB");
    }
}
