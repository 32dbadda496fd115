//! KVM's record of the guest pages the vCPUs wrote, read and cleared slot by slot: from the
//! vCPUs' dirty rings when the VM asks for them (`dirty_ring`) and KVM offers them (`ring`),
//! otherwise from each slot's dirty bitmap, under KVM's manual protection where it has it. Diff
//! snapshots and migrations read it alike.

mod ring;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use kvm_ioctls::{VcpuFd, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use arch::GuestMemory;

const PAGE: usize = 4096;

/// How often the rings are emptied while pages are logged: at once again after a pass that
/// found pages, less and less often while passes find none.
const REAP_EVERY: (Duration, Duration) = (Duration::from_millis(1), Duration::from_millis(16));

vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, kvm_bindings::KVMIO, 0xc0, kvm_bindings::kvm_clear_dirty_log);

/// Which pages a VM's vCPUs wrote, as KVM tells them.
pub struct KvmDirtyLog {
    vm: Arc<VmFd>,
    rings: Option<ring::Rings>,
    /// Bitmap mode only: KVM's manual protection is on.
    manual: AtomicBool,
    /// Ring mode only: the thread that empties the rings runs.
    reaping: AtomicBool,
}

impl KvmDirtyLog {
    /// The log of `vm`, which has no vCPU yet: its dirty rings are turned on now, with
    /// `ring_entries` pages a vCPU, if KVM offers them (0 asks for the bitmap).
    pub fn new(vm: Arc<VmFd>, ring_entries: u32) -> KvmDirtyLog {
        let rings = (ring_entries > 0).then(|| ring::Rings::enable(&vm, ring_entries)).flatten();
        if ring_entries > 0 && rings.is_none() {
            tracing::warn!(
                "dirty_ring={ring_entries} asks for KVM's dirty rings, which this KVM lacks: its bitmap logs"
            );
        }
        KvmDirtyLog { vm, rings, manual: AtomicBool::new(false), reaping: AtomicBool::new(false) }
    }

    pub fn uses_rings(&self) -> bool {
        self.rings.is_some()
    }

    /// Whether the log may miss pages: KVM once filled a ring before it was read.
    pub fn overran(&self) -> bool {
        self.rings.as_ref().is_some_and(|r| r.overran())
    }

    /// Maps `vcpu`'s ring, if the log has rings; call it for each vCPU as it is created.
    pub fn attach(&self, vcpu: &VcpuFd) -> Result<(), String> {
        match &self.rings {
            Some(rings) => rings.attach(vcpu),
            None => Ok(()),
        }
    }

    /// Readies the log before KVM starts logging a slot. With rings: starts the thread that
    /// keeps them from filling (a vCPU stops when its ring is full, and a KVM that emulates
    /// guest code may overrun a full ring rather than stop: this host's does). With the bitmap
    /// and `manual_protect`: KVM's manual protection, as QEMU does, where KVM offers it (turning
    /// the log on then protects nothing at once, the log starts all set, and each read clears,
    /// and so protects again, exactly the pages read).
    pub fn prepare(self: &Arc<Self>, manual_protect: bool) -> Result<(), String> {
        if self.rings.is_some() {
            if !self.reaping.swap(true, Ordering::Relaxed) {
                let log = Arc::downgrade(self);
                sandbox::spawn(sandbox::ThreadKind::DirtyLog, "dirty_log", move || reap(log))
                    .map_err(|e| format!("the thread that reads KVM's dirty rings cannot start ({e})"))?;
            }
        } else if manual_protect && !self.manual.load(Ordering::Relaxed) {
            self.manual.store(enable_manual_protect(&self.vm), Ordering::Relaxed);
        }
        Ok(())
    }

    /// Empties the rings into the log (for a vCPU that KVM stopped because its ring is full);
    /// returns how many pages they held.
    pub fn collect(&self) -> Result<usize, String> {
        match &self.rings {
            Some(rings) => rings.collect(&self.vm),
            None => Ok(0),
        }
    }

    /// Slot `slot`'s pages written since the last read (`len` bytes of memory, one bit per page,
    /// in u64 words); they are logged again from here on.
    pub fn take(&self, slot: u32, len: usize) -> Result<Vec<u64>, String> {
        match &self.rings {
            Some(rings) => rings.take(&self.vm, slot, len.div_ceil(PAGE)),
            None => take_bitmap(&self.vm, slot, len, self.manual.load(Ordering::Relaxed)),
        }
    }
}

/// Empties the rings of `log` while it lives, as often as [`REAP_EVERY`] says.
fn reap(log: Weak<KvmDirtyLog>) {
    let (fastest, slowest) = REAP_EVERY;
    let mut every = fastest;
    loop {
        std::thread::sleep(every);
        let Some(log) = log.upgrade() else { return };
        match log.collect() {
            Ok(0) => every = (every * 2).min(slowest),
            Ok(_) => every = fastest,
            Err(e) => {
                tracing::error!("KVM's dirty rings are no longer read: {e}");
                return;
            }
        }
    }
}

/// Turns on KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with the log initially set; false where KVM lacks
/// it, and reads then clear the log themselves.
fn enable_manual_protect(vm: &VmFd) -> bool {
    use kvm_bindings::{
        KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET, KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE,
    };
    let wanted = u64::from(KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | KVM_DIRTY_LOG_INITIALLY_SET);
    let offered = vm.check_extension_raw(u64::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    if offered < 0 || offered as u64 & wanted != wanted {
        return false;
    }
    let cap = kvm_bindings::kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        args: [wanted, 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).is_ok()
}

/// Reads slot `slot`'s dirty bitmap and, with manual protection, clears what it read.
fn take_bitmap(vm: &VmFd, slot: u32, len: usize, manual: bool) -> Result<Vec<u64>, String> {
    let log = vm.get_dirty_log(slot, len).map_err(|e| format!("KVM refused to report dirty pages: {e}"))?;
    if manual {
        let mut clear = kvm_bindings::kvm_clear_dirty_log {
            slot,
            num_pages: len.div_ceil(PAGE) as u32,
            first_page: 0,
            ..Default::default()
        };
        clear.__bindgen_anon_1.dirty_bitmap = log.as_ptr() as *mut libc::c_void;
        // SAFETY: the bitmap has a bit for each of the slot's pages and outlives the call, which
        // only reads it.
        let rc = unsafe { vmm_sys_util::ioctl::ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &clear) };
        if rc < 0 {
            return Err(format!("KVM refused to clear dirty pages: {}", std::io::Error::last_os_error()));
        }
    }
    Ok(log)
}

/// The log of every region of `mem` (one bit per page, per region), read and cleared: one slot
/// per region, but the hotpluggable region, always the last, is its blocks' slots.
pub(crate) fn take_all(
    log: &KvmDirtyLog,
    mem: &GuestMemory,
    hotplug: Option<&crate::hotplug::PluggableMemory>,
) -> Result<Vec<Vec<u64>>, String> {
    let regions = mem.num_regions();
    mem.iter()
        .enumerate()
        .map(|(slot, region)| match hotplug {
            Some(blocks) if slot + 1 == regions => blocks.dirty_log(log),
            _ => log.take(slot as u32, region.len() as usize),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::{KVM_MEM_LOG_DIRTY_PAGES, kvm_segment, kvm_userspace_memory_region};
    use kvm_ioctls::{Kvm, VcpuExit};

    const MEM: usize = 8 << 20;
    const FIRST: u64 = 1 << 20;

    /// Flat 32-bit code that writes a byte to each of `pages` pages from 1 MiB on, spinning
    /// `delay` times after each and, with `tick`, leaving through port 0x11 every 16 pages;
    /// then it leaves through port 0x10.
    fn program(pages: u32, delay: u32, tick: bool) -> Vec<u8> {
        let mut body = vec![0xc6, 0x07, 0x01, 0x81, 0xc7, 0x00, 0x10, 0x00, 0x00]; // mov [edi], 1; add edi, 4096
        if delay > 0 {
            body.push(0xb8); // mov eax, delay
            body.extend(delay.to_le_bytes());
            body.extend([0x48, 0x75, 0xfd]); // dec eax; jnz -3
        }
        if tick {
            body.extend([0xf6, 0xc1, 0x0f, 0x75, 0x02, 0xe6, 0x11]); // test cl, 15; jnz +2; out 0x11, al
        }
        body.push(0x49); // dec ecx
        body.extend([0x75, (-(body.len() as i32 + 2)) as u8]); // jnz loop
        let mut code = vec![0xbf, 0x00, 0x00, 0x10, 0x00, 0xb9]; // mov edi, 1 MiB; mov ecx, pages
        code.extend(pages.to_le_bytes());
        code.extend(body);
        code.extend([0xe6, 0x10, 0xf4]); // out 0x10, al; hlt
        code
    }

    /// A VM whose one vCPU runs `code` at 4 KiB, with all memory logged; `prepared` as the VMM
    /// prepares its log (rings emptied by a thread), or not.
    fn vm_running(code: &[u8], ring_entries: u32, prepared: bool) -> (Arc<VmFd>, VcpuFd, Arc<KvmDirtyLog>) {
        let kvm = Kvm::new().expect("/dev/kvm opens");
        let vm = Arc::new(kvm.create_vm().unwrap());
        let log = Arc::new(KvmDirtyLog::new(vm.clone(), ring_entries));
        // SAFETY: a new private anonymous mapping; it is never unmapped (a test's leak).
        let host = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                MEM,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(host, libc::MAP_FAILED);
        // SAFETY: the code fits in the fresh mapping, at 4 KiB.
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), host.cast::<u8>().add(0x1000), code.len()) };
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: KVM_MEM_LOG_DIRTY_PAGES,
            guest_phys_addr: 0,
            memory_size: MEM as u64,
            userspace_addr: host as u64,
        };
        if prepared {
            log.prepare(true).unwrap();
        }
        // SAFETY: the mapping lives as long as the process.
        unsafe { vm.set_user_memory_region(region) }.unwrap();
        let vcpu = vm.create_vcpu(0).unwrap();
        log.attach(&vcpu).unwrap();
        let mut sregs = vcpu.get_sregs().unwrap();
        let flat = |type_, selector| kvm_segment {
            limit: 0xffff_ffff,
            selector,
            type_,
            present: 1,
            db: 1,
            s: 1,
            g: 1,
            ..Default::default()
        };
        sregs.cs = flat(11, 8);
        for seg in [&mut sregs.ds, &mut sregs.es, &mut sregs.ss, &mut sregs.fs, &mut sregs.gs] {
            *seg = flat(3, 16);
        }
        sregs.cr0 |= 1;
        vcpu.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.set_regs(&regs).unwrap();
        (vm, vcpu, log)
    }

    /// Runs the vCPU to its exit through port 0x10, emptying the rings when KVM says one is
    /// full; returns how often it did.
    fn run(vcpu: &mut VcpuFd, log: &KvmDirtyLog) -> u32 {
        let mut full = 0;
        loop {
            match vcpu.run().unwrap() {
                VcpuExit::IoOut(0x10, _) => return full,
                VcpuExit::IoOut(0x11, _) => {}
                VcpuExit::Unsupported(kvm_bindings::KVM_EXIT_DIRTY_RING_FULL) => {
                    full += 1;
                    log.collect().unwrap();
                }
                other => panic!("unexpected exit {other:?}"),
            }
        }
    }

    fn written(bits: &[u64]) -> Vec<u64> {
        (0..bits.len() as u64 * 64).filter(|p| bits[(p / 64) as usize] & (1 << (p % 64)) != 0).collect()
    }

    fn pages_from_first(count: u32) -> Vec<u64> {
        let first = FIRST / PAGE as u64;
        (first..first + u64::from(count)).collect()
    }

    #[test]
    fn a_full_ring_stops_the_vcpu_and_every_page_it_wrote_is_reported() {
        let (_vm, mut vcpu, log) = vm_running(&program(1000, 0, true), 256, false);
        if !log.uses_rings() {
            eprintln!("skipped: this host's KVM offers no dirty ring");
            return;
        }
        let full = run(&mut vcpu, &log);
        assert!(full >= 1, "1000 pages through a 256-entry ring must fill it");
        assert_eq!(written(&log.take(0, MEM).unwrap()), pages_from_first(1000));
        assert_eq!(written(&log.take(0, MEM).unwrap()), Vec::<u64>::new(), "a read clears");
    }

    #[test]
    fn the_rings_are_emptied_while_pages_are_logged_without_anyone_asking() {
        // A KVM that emulates guest code (as this host's does) may overrun a full ring rather
        // than stop the vCPU: the rings must not wait for a reader to fill.
        let (_vm, mut vcpu, log) = vm_running(&program(100, 0, false), 256, true);
        let Some(rings) = &log.rings else {
            eprintln!("skipped: this host's KVM offers no dirty ring");
            return;
        };
        assert_eq!(run(&mut vcpu, &log), 0, "100 pages fit a 256-entry ring");
        let waited = std::time::Instant::now();
        while rings.unread() > 0 {
            assert!(waited.elapsed() < Duration::from_secs(2), "{} pages still in the ring after 2 s", rings.unread());
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(written(&log.take(0, MEM).unwrap()), pages_from_first(100));
    }

    #[test]
    fn the_bitmap_reports_exactly_the_pages_a_vcpu_wrote() {
        let (_vm, mut vcpu, log) = vm_running(&program(1000, 0, false), 0, true);
        assert!(!log.uses_rings());
        // Under manual protection the log starts all set: the first read protects everything.
        log.take(0, MEM).unwrap();
        assert_eq!(run(&mut vcpu, &log), 0);
        assert_eq!(written(&log.take(0, MEM).unwrap()), pages_from_first(1000));
    }
}
