//! A snapshot's state: the fuzzer writes the body and the target signs it, as an attacker
//! with a valid checksum would; then the checks a restore makes before it builds anything.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|body: &[u8]| {
    let file = vmm::snapshot::signed(body);
    let Ok(saved) = vmm::snapshot::Snapshot::parse(&file, "fuzz") else { return };
    let limits = vmm::HostLimits { kvm_max_vcpus: 1024, ram_mib: 24 << 10, free_huge_pages: 0 };
    if saved.config.validate_machine(&limits).is_ok() {
        let _ = saved.regions == arch::memory::ram_regions(saved.config.memory_bytes());
    }
    let mut cmos = devices::cmos::Cmos::new(Box::new(|| 0));
    cmos.restore(saved.devices.cmos_index, &saved.devices.cmos_nvram);
    devices::BusDevice::write(&mut cmos, 1, &[0x42]);
});
