//! Memory that start-up leaves behind and a running VM never touches again, given back to the
//! host: each VMM process pays for its own anonymous pages, so what thousands of VMs cost
//! depends on them (`cargo bench --bench overhead` measures it).

/// Gives back, once the VM is built: the heap's free pages (command-line parsing, the
/// configuration, KVM's CPUID tables and the seccomp programs are freed by now, but glibc keeps
/// freed memory for later allocations), and the main thread's stack pages below where it
/// stands (start-up runs deeper than serving requests ever does).
pub fn release_startup_memory() {
    // SAFETY: malloc_trim only returns free heap memory to the kernel.
    unsafe { libc::malloc_trim(0) };
    release_stack_below_here();
}

/// MADV_DONTNEED on the calling thread's stack below its current frame, less a margin: those
/// pages hold nothing live (the stack grows down), and read back as zeroes when used again.
#[inline(never)]
fn release_stack_below_here() {
    const MARGIN: usize = 16 << 10;
    let here = &0u8 as *const u8 as usize;
    let Some((low, _)) = stack_of_this_thread() else { return };
    let page = 4096;
    let end = here.saturating_sub(MARGIN) & !(page - 1);
    let start = (low + page - 1) & !(page - 1);
    if end <= start {
        return;
    }
    // SAFETY: [start, end) lies in this thread's stack, below its current frame and the margin,
    // where nothing live is stored; MADV_DONTNEED on anonymous memory only zeroes those pages.
    // Parts of the range the stack never grew into are not mapped, and madvise skips them.
    unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_DONTNEED) };
}

/// The calling thread's stack: its lowest address and its size.
fn stack_of_this_thread() -> Option<(usize, usize)> {
    let mut attr = std::mem::MaybeUninit::<libc::pthread_attr_t>::uninit();
    // SAFETY: pthread_getattr_np fills `attr` for the calling thread; it is destroyed below.
    if unsafe { libc::pthread_getattr_np(libc::pthread_self(), attr.as_mut_ptr()) } != 0 {
        return None;
    }
    let (mut addr, mut size) = (std::ptr::null_mut(), 0usize);
    // SAFETY: `attr` was initialised above; the out-pointers are live locals.
    let ok = unsafe { libc::pthread_attr_getstack(attr.as_ptr(), &mut addr, &mut size) } == 0;
    // SAFETY: `attr` was initialised by pthread_getattr_np and is not used after this.
    unsafe { libc::pthread_attr_destroy(attr.as_mut_ptr()) };
    ok.then_some((addr as usize, size))
}
