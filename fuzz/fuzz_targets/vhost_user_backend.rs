//! A hostile vhost-user back-end: the input is everything the back-end says, fed to the VMM's
//! front-end through a socket pair, while the front-end runs the handshake, reads a disk's
//! configuration, hands over memory and a ring, and stops it. Nothing it says may panic the
//! front-end, make it allocate without bound, map anything, or hang it.
#![no_main]

use std::io::Write;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;

use libfuzzer_sys::fuzz_target;
use vhost_user::frontend::{Link, Ring, Rings};
use vm_memory::{FileOffset, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

/// 64 KiB of guest memory behind a memfd, as the VMM shares it.
fn shared_memory() -> Option<virtio::GuestMemory> {
    // SAFETY: memfd_create with a NUL-terminated name returns a new fd or -1.
    let fd = unsafe { libc::memfd_create(c"fuzz-guest".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return None;
    }
    // SAFETY: fd is new and owned by the File from here on.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(64 << 10).ok()?;
    virtio::GuestMemory::from_ranges_with_files([(GuestAddress(0), 64 << 10, Some(FileOffset::new(file, 0)))]).ok()
}

fuzz_target!(|data: &[u8]| {
    let Ok((front, mut back)) = UnixStream::pair() else { return };
    // The whole answer is queued before the front-end speaks; a short answer ends in EOF.
    let _ = back.set_nonblocking(true);
    let _ = back.write_all(&data[..data.len().min(64 << 10)]);
    let _ = back.shutdown(std::net::Shutdown::Write);
    let Ok(mut link) = Link::handshake(front, 4) else { return };
    let _ = link.config(vhost_user::frontend::BLK_CONFIG_LEN);
    let (Some(mem), Ok(kick), Ok(call)) = (shared_memory(), EventFd::new(0), EventFd::new(0)) else { return };
    let ring = Ring { index: 0, size: 8, desc: 0, avail: 0x1000, used: 0x2000, next_avail: 0 };
    let rings = Rings { mem, rings: vec![ring], kicks: vec![kick], calls: vec![call], acked_features: 1 << 32 };
    let _ = link.start(&rings, &[0]);
    link.stop(&rings, "fuzz");
});
