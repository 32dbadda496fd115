//! Memory that start-up leaves behind and a running VM never touches again, given back to the
//! host: each VMM process pays for its own anonymous pages, so what thousands of VMs cost
//! depends on them (`cargo bench --bench footprint` measures it).

/// Gives back the heap's free pages once the VM is built: command-line parsing, the
/// configuration, KVM's CPUID tables and the kernel's loading are done and freed by now, but
/// glibc keeps freed memory for later allocations (about 30 KiB of an idle VM's heap).
pub fn release_startup_memory() {
    // SAFETY: malloc_trim only returns free heap memory to the kernel.
    unsafe { libc::malloc_trim(0) };
}
