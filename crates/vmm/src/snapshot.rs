//! Snapshots: the state of a paused VM (vCPUs, irqchip, PIT, clock, devices, virtqueue
//! positions) in a versioned file, and its memory in another. The memory file is sparse (zero
//! pages are holes) and is mapped MAP_PRIVATE on restore, so pages load lazily. A diff snapshot
//! writes only the pages dirtied since the last snapshot: KVM's dirty log for vCPU writes, the
//! guest memory bitmap for device writes.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use kvm_bindings::{
    KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Msrs, kvm_clock_data,
    kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs,
    kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use arch::GuestMemory;

use crate::config::VmConfig;

/// Bumped whenever the layout of [`Snapshot`] changes; other versions are refused.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &str = "ferrovisor-snapshot";
pub const PAGE: usize = 4096;
/// A state file larger than this is refused unread: a VM with the most vCPUs has a few MiB.
pub const MAX_STATE_FILE: u64 = 64 << 20;

#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: Option<kvm_xcrs>,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub mp_state: kvm_mp_state,
    pub events: kvm_vcpu_events,
    pub msrs: Vec<kvm_msr_entry>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct DeviceStates {
    pub serial: devices::serial::SavedSerial,
    pub cmos_index: u8,
    pub cmos_nvram: Vec<u8>,
    /// The i8042's configuration byte (absent in older files: the power-on value).
    #[serde(default)]
    pub i8042_ctr: Option<u8>,
    /// The virtio-mmio transports, in slot order.
    pub virtio: Vec<virtio::transport::SavedTransport>,
    /// The virtio-pci functions, in slot order, and the root's CONFIG_ADDRESS.
    #[serde(default)]
    pub virtio_pci: Vec<virtio::pci::SavedPciTransport>,
    #[serde(default)]
    pub pci_address: u32,
}

/// Everything but the memory.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub config: VmConfig,
    /// Guest RAM regions as (guest address, length); the memory file holds them in order.
    pub regions: Vec<(u64, u64)>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub devices: DeviceStates,
    /// MMDS's contents, when the VM has MMDS.
    #[serde(default)]
    pub mmds_data: Option<serde_json::Value>,
}

/// The first line of a snapshot file; the state follows as JSON.
#[derive(Serialize, Deserialize)]
struct Header {
    magic: String,
    format_version: u32,
    vmm_version: String,
    /// FNV-1a of the state's bytes: a damaged file is refused rather than half-restored.
    checksum: String,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// A state file: the header line, with the checksum of `body`, then `body` (the state as JSON).
pub fn signed(body: &[u8]) -> Vec<u8> {
    let header = Header {
        magic: MAGIC.into(),
        format_version: FORMAT_VERSION,
        vmm_version: env!("CARGO_PKG_VERSION").into(),
        checksum: format!("{:016x}", fnv1a(body)),
    };
    let mut out = serde_json::to_vec(&header).expect("a header of strings and numbers encodes");
    out.push(b'\n');
    out.extend_from_slice(body);
    out
}

impl Snapshot {
    pub fn write(&self, path: &Path) -> Result<(), String> {
        let body = serde_json::to_vec(self).map_err(|e| format!("the snapshot cannot be encoded: {e}"))?;
        let out = signed(&body);
        let mut file = sandbox::files::replace_output(path, "snapshot_path")?;
        std::io::Write::write_all(&mut file, &out)
            .map_err(|e| format!("snapshot_path {} cannot be written ({e})", path.display()))
    }

    pub fn read(path: &Path) -> Result<Snapshot, String> {
        let data = sandbox::files::read_regular(path, "snapshot_path", MAX_STATE_FILE)?;
        Snapshot::parse(&data, &format!("snapshot_path {}", path.display()))
    }

    /// Checks and decodes a state file's bytes; `what` names it in errors. Every field is still
    /// untrusted afterwards (see `VmConfig::validate_machine` and the restore checks).
    pub fn parse(data: &[u8], what: &str) -> Result<Snapshot, String> {
        let split = data.iter().position(|&b| b == b'\n').ok_or(format!("{what} is not a Ferrovisor snapshot"))?;
        let header: Header = serde_json::from_slice(&data[..split])
            .map_err(|_| format!("{what} is not a Ferrovisor snapshot (no header)"))?;
        if header.magic != MAGIC {
            return Err(format!("{what} is not a Ferrovisor snapshot"));
        }
        if header.format_version != FORMAT_VERSION {
            return Err(format!(
                "{what} has snapshot format {} from Ferrovisor {}; this Ferrovisor {} reads format {FORMAT_VERSION} only",
                header.format_version,
                header.vmm_version,
                env!("CARGO_PKG_VERSION")
            ));
        }
        let body = &data[split + 1..];
        if format!("{:016x}", fnv1a(body)) != header.checksum {
            return Err(format!("{what} is corrupt (its checksum does not match); take the snapshot again"));
        }
        let mut snapshot: Snapshot =
            serde_json::from_slice(body).map_err(|e| format!("{what} is corrupt ({e}); take the snapshot again"))?;
        // Written before interfaces could have several queue pairs, when each had one.
        for nic in &mut snapshot.config.nets {
            nic.queues.get_or_insert(1);
        }
        Ok(snapshot)
    }
}

/// `--describe-snapshot`: the format and the Ferrovisor that wrote the state file at `path`.
pub fn describe(path: &Path) -> Result<String, String> {
    use std::io::BufRead;
    let what = format!("{} ", path.display());
    let file = File::open(path).map_err(|e| format!("{what}cannot be read ({e}); give a snapshot state file"))?;
    // The header is one short line: read no more than that.
    let mut line = Vec::new();
    std::io::BufReader::new(std::io::Read::take(file, 4096))
        .read_until(b'\n', &mut line)
        .map_err(|e| format!("{what}cannot be read ({e})"))?;
    let header: Header = serde_json::from_slice(line.strip_suffix(b"\n").unwrap_or(&line))
        .map_err(|_| format!("{what}is not a Ferrovisor snapshot"))?;
    if header.magic != MAGIC {
        return Err(format!("{what}is not a Ferrovisor snapshot"));
    }
    Ok(format!("v{}.0.0 (written by Ferrovisor {})", header.format_version, header.vmm_version))
}

fn kvm_fail(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> String {
    move |e| format!("KVM refused to {what}: {e}")
}

/// The MSRs KVM can save for this host's vCPUs.
pub fn msr_list(kvm: &Kvm) -> Result<Vec<u32>, String> {
    Ok(kvm.get_msr_index_list().map_err(kvm_fail("list its MSRs"))?.as_slice().to_vec())
}

pub fn save_vcpu(vcpu: &VcpuFd, kvm: &Kvm, msr_indices: &[u32]) -> Result<VcpuState, String> {
    // MSRs one by one: KVM stops a batch at the first it cannot read, and some on the list
    // are not readable on every host.
    let mut msrs = Vec::new();
    for &index in msr_indices {
        let mut one =
            Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }]).map_err(|e| e.to_string())?;
        if vcpu.get_msrs(&mut one) == Ok(1) {
            msrs.push(one.as_slice()[0]);
        }
    }
    let xcrs = if kvm.check_extension(kvm_ioctls::Cap::Xcrs) {
        Some(vcpu.get_xcrs().map_err(kvm_fail("read XCRs"))?)
    } else {
        None
    };
    Ok(VcpuState {
        regs: vcpu.get_regs().map_err(kvm_fail("read registers"))?,
        sregs: vcpu.get_sregs().map_err(kvm_fail("read special registers"))?,
        xsave: vcpu.get_xsave().map_err(kvm_fail("read the FPU state"))?,
        xcrs,
        debugregs: vcpu.get_debug_regs().map_err(kvm_fail("read debug registers"))?,
        lapic: vcpu.get_lapic().map_err(kvm_fail("read the local APIC"))?,
        mp_state: vcpu.get_mp_state().map_err(kvm_fail("read the MP state"))?,
        events: vcpu.get_vcpu_events().map_err(kvm_fail("read pending events"))?,
        msrs,
    })
}

/// Restores a vCPU in the order KVM needs: the APIC base (an MSR, in sregs) before the APIC.
pub fn restore_vcpu(vcpu: &VcpuFd, state: &VcpuState) -> Result<(), String> {
    vcpu.set_mp_state(state.mp_state).map_err(kvm_fail("set the MP state"))?;
    vcpu.set_regs(&state.regs).map_err(kvm_fail("set registers"))?;
    vcpu.set_sregs(&state.sregs).map_err(kvm_fail("set special registers"))?;
    // SAFETY: the buffer is a kvm_xsave that KVM itself returned for a vCPU of this host.
    unsafe { vcpu.set_xsave(&state.xsave) }.map_err(kvm_fail("set the FPU state"))?;
    if let Some(xcrs) = &state.xcrs {
        vcpu.set_xcrs(xcrs).map_err(kvm_fail("set XCRs"))?;
    }
    vcpu.set_debug_regs(&state.debugregs).map_err(kvm_fail("set debug registers"))?;
    vcpu.set_lapic(&state.lapic).map_err(kvm_fail("set the local APIC"))?;
    let msrs = Msrs::from_entries(&state.msrs).map_err(|e| e.to_string())?;
    let written = vcpu.set_msrs(&msrs).map_err(kvm_fail("set MSRs"))?;
    if written != state.msrs.len() {
        let failed = state.msrs.get(written).map_or(0, |m| m.index);
        return Err(format!("KVM refused MSR {failed:#x}; the snapshot was taken on a different host"));
    }
    vcpu.set_vcpu_events(&state.events).map_err(kvm_fail("set pending events"))?;
    Ok(())
}

/// How far, in seconds, the restored vCPU's TSC reads from the snapshot's (positive: ahead).
/// KVM sets it by offsetting the host's TSC; a KVM that cannot offset it (nested PVM) leaves
/// the guest on the host's TSC, so a guest clocked by the TSC jumps by the time since the
/// snapshot. None when KVM cannot tell.
pub fn tsc_drift_seconds(vcpu: &VcpuFd, state: &VcpuState) -> Option<f64> {
    use arch::vcpu::MSR_IA32_TSC;
    let saved = state.msrs.iter().find(|m| m.index == MSR_IA32_TSC)?;
    let mut now = Msrs::from_entries(&[kvm_msr_entry { index: MSR_IA32_TSC, ..Default::default() }]).ok()?;
    if vcpu.get_msrs(&mut now) != Ok(1) {
        return None;
    }
    let khz = u64::from(vcpu.get_tsc_khz().ok()?);
    let cycles = now.as_slice()[0].data.wrapping_sub(saved.data) as i64;
    (khz != 0).then(|| cycles as f64 / (khz as f64 * 1000.0))
}

fn irqchip(vm: &VmFd, id: u32) -> Result<kvm_irqchip, String> {
    let mut chip = kvm_irqchip { chip_id: id, ..Default::default() };
    vm.get_irqchip(&mut chip).map_err(kvm_fail("read the irqchip"))?;
    Ok(chip)
}

pub fn save_vm(vm: &VmFd) -> Result<VmState, String> {
    Ok(VmState {
        pic_master: irqchip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_fail("read the PIT"))?,
        clock: vm.get_clock().map_err(kvm_fail("read the clock"))?,
    })
}

pub fn restore_vm(vm: &VmFd, state: &VmState, clock_realtime: bool) -> Result<(), String> {
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        vm.set_irqchip(chip).map_err(kvm_fail("set the irqchip"))?;
    }
    vm.set_pit2(&state.pit).map_err(kvm_fail("set the PIT"))?;
    // Only the time: the flags KVM reported (TSC_STABLE and such) are not the caller's to set.
    let mut clock = kvm_clock_data { clock: state.clock.clock, ..Default::default() };
    if clock_realtime {
        // KVM adds the wall-clock time elapsed since `realtime` to the clock.
        if state.clock.flags & KVM_CLOCK_REALTIME != 0 {
            clock.flags = KVM_CLOCK_REALTIME;
            clock.realtime = state.clock.realtime;
        } else {
            tracing::warn!("clock_realtime: the snapshot's host gave no wall-clock time; the clock resumes as saved");
        }
    }
    vm.set_clock(&clock).map_err(kvm_fail("set the clock"))?;
    Ok(())
}

/// Which pages to write: every non-zero page, or those dirtied since the last snapshot.
pub enum Pages<'a> {
    /// Every non-zero page.
    All,
    /// Every non-zero page among those resident: memory no file backs, whose absent pages
    /// were never written and read as zero (mincore tells them apart without touching them).
    AllResident,
    /// Per region: KVM's dirty log (one bit per page, in u64 words).
    Dirty(&'a [Vec<u64>]),
}

/// What writing the memory file did.
pub struct Written {
    pub pages: u64,
    pub bytes: u64,
}

/// Writes guest RAM to `path` (regions in order, holes for pages not written) and clears the
/// device-write bitmap so that the next diff starts here. The `unplugged` ranges (guest address,
/// length) hold nothing of the guest's: they are holes, or zeroes where a diff must say so.
pub fn write_memory(mem: &GuestMemory, path: &Path, pages: Pages, unplugged: &[(u64, u64)]) -> Result<Written, String> {
    let what = || format!("mem_file_path {}", path.display());
    let file = sandbox::files::replace_output(path, "mem_file_path")?;
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let mut written = Written { pages: 0, bytes: 0 };
    let mut offset = 0u64;
    for (slot, region) in mem.iter().enumerate() {
        let len = region.len() as usize;
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|e| format!("guest memory at {:#x} cannot be read: {e}", region.start_addr().raw_value()))?;
        // SAFETY: [host, host + len) is this region's live mapping; the vCPUs are paused and the
        // devices quiesced, so nothing writes it while it is read.
        let bytes = unsafe { std::slice::from_raw_parts(host as *const u8, len) };
        // The whole region's bitmap: devices' writes through vm-memory mark it.
        let bitmap: &AtomicBitmap = std::ops::Deref::deref(region).bitmap();
        let resident = match pages {
            Pages::AllResident => residency(host, len),
            _ => None,
        };
        // Consecutive pages go out in one write: a run is [run_start, page).
        let mut run_start = None;
        // Pages [from, to) with `data` (the region's own bytes unless given).
        let mut flush_run = |from: usize, to: usize, data: Option<&[u8]>| -> Result<(), String> {
            let data = data.unwrap_or(&bytes[from * PAGE..(to * PAGE).min(len)]);
            file.write_all_at(data, offset + (from * PAGE) as u64)
                .map_err(|e| format!("{} cannot be written ({e})", what()))?;
            written.pages += (to - from) as u64;
            written.bytes += data.len() as u64;
            Ok(())
        };
        let start = region.start_addr().raw_value();
        for (page, data) in bytes.chunks(PAGE).enumerate() {
            let gpa = start + (page * PAGE) as u64;
            let dropped = crate::hotplug::in_ranges(unplugged, gpa);
            let data = if dropped { &ZERO_PAGE[..data.len()] } else { data };
            let take = match &pages {
                Pages::All => data.iter().any(|&b| b != 0),
                Pages::AllResident => {
                    resident.as_ref().is_none_or(|r| r.get(page).is_none_or(|&v| v & 1 != 0))
                        && data.iter().any(|&b| b != 0)
                }
                Pages::Dirty(logs) => {
                    let in_kvm_log =
                        logs.get(slot).and_then(|l| l.get(page / 64)).is_some_and(|w| w >> (page % 64) & 1 != 0);
                    in_kvm_log || bitmap.is_addr_set(page * PAGE)
                }
            };
            if dropped {
                if let Some(from) = run_start.take() {
                    flush_run(from, page, None)?;
                }
                if take {
                    flush_run(page, page + 1, Some(data))?;
                }
                continue;
            }
            match (take, run_start) {
                (true, None) => run_start = Some(page),
                (false, Some(from)) => {
                    flush_run(from, page, None)?;
                    run_start = None;
                }
                _ => {}
            }
        }
        if let Some(from) = run_start {
            flush_run(from, len.div_ceil(PAGE), None)?;
        }
        bitmap.reset();
        offset += len as u64;
    }
    // The file spans all of RAM, holes included, so that it can be mapped as a whole.
    file.set_len(total).map_err(|e| format!("{} cannot be sized ({e})", what()))?;
    Ok(written)
}

static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// One byte per page, bit 0 set when the page is resident; None if mincore fails.
pub(crate) fn residency(host: *mut u8, len: usize) -> Option<Vec<u8>> {
    let mut vector = vec![0u8; len.div_ceil(PAGE)];
    // SAFETY: [host, host + len) is a live mapping of this process (page-aligned: vm-memory
    // maps whole regions) and the vector has one byte per page of it.
    let rc = unsafe { libc::mincore(host.cast(), len, vector.as_mut_ptr()) };
    (rc == 0).then_some(vector)
}

/// Copies the pages a diff memory file holds (its data, not its holes) onto a base memory file.
pub fn merge_memory(base: &Path, diff: &Path) -> Result<u64, String> {
    let diff_file = File::open(diff).map_err(|e| format!("{} cannot be read ({e})", diff.display()))?;
    let base_file = std::fs::OpenOptions::new()
        .write(true)
        .open(base)
        .map_err(|e| format!("{} cannot be written ({e})", base.display()))?;
    let len = diff_file.metadata().map_err(|e| e.to_string())?.len();
    let fd = std::os::fd::AsRawFd::as_raw_fd(&diff_file);
    let mut merged = 0u64;
    let mut at = 0i64;
    let mut page = vec![0u8; PAGE];
    while (at as u64) < len {
        // SAFETY: lseek on our own open file; it only moves the file offset.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < 0 { len as i64 } else { hole };
        let mut pos = data as u64;
        while pos < end as u64 {
            let n = (end as u64 - pos).min(PAGE as u64) as usize;
            diff_file.read_exact_at(&mut page[..n], pos).map_err(|e| e.to_string())?;
            base_file.write_all_at(&page[..n], pos).map_err(|e| e.to_string())?;
            merged += n as u64;
            pos += n as u64;
        }
        at = end;
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_drift_is_how_far_the_vcpus_tsc_reads_past_the_saved_one() {
        let kvm = Kvm::new().expect("/dev/kvm opens");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        let mut state = save_vcpu(&vcpu, &kvm, &msr_list(&kvm).unwrap()).unwrap();
        let khz = u64::from(vcpu.get_tsc_khz().unwrap());
        // A snapshot whose TSC was ten seconds behind this vCPU's.
        let tsc = state.msrs.iter_mut().find(|m| m.index == arch::vcpu::MSR_IA32_TSC).expect("KVM saves the TSC");
        tsc.data = tsc.data.wrapping_sub(10 * khz * 1000);
        let drift = tsc_drift_seconds(&vcpu, &state).unwrap();
        assert!((10.0..10.5).contains(&drift), "{drift}");
        state.msrs.retain(|m| m.index != arch::vcpu::MSR_IA32_TSC);
        assert_eq!(tsc_drift_seconds(&vcpu, &state), None, "no saved TSC, nothing to tell");
    }

    #[test]
    fn unplugged_memory_is_a_hole_in_a_full_file_and_zeroes_in_a_diff() {
        use vm_memory::{Bytes, GuestAddress};
        let mem = crate::memory::create(&[(0, 1 << 20)], 1, &crate::config::MemoryOptions::default()).unwrap();
        // What an unplugged block's mapping holds is not the guest's: it must not be saved.
        for page in 0..4u64 {
            mem.write_obj(0xab_u8, GuestAddress(page * 4096)).unwrap();
        }
        let unplugged = [(4096, 8192)];
        let path = std::env::temp_dir().join(format!("ferrovisor-unplugged-{}", std::process::id()));
        let full = write_memory(&mem, &path, Pages::All, &unplugged).unwrap();
        assert_eq!(full.pages, 2, "pages 0 and 3");
        let file = std::fs::read(&path).unwrap();
        assert_eq!((file[0], file[4096], file[8192], file[3 * 4096]), (0xab, 0, 0, 0xab));
        mem.write_obj(0xcd_u8, GuestAddress(4096)).unwrap();
        let log = vec![vec![0b1010u64]];
        let diff = write_memory(&mem, &path, Pages::Dirty(&log), &unplugged).unwrap();
        assert_eq!(diff.pages, 2, "pages 1 (as zeroes) and 3");
        let file = std::fs::read(&path).unwrap();
        assert_eq!((file[4096], file[3 * 4096]), (0, 0xab));
        std::fs::remove_file(path).unwrap();
    }
}
