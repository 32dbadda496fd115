//! Post-copy: the destination runs the VM before all of its memory has arrived. Pages the
//! source still owed are marked missing and registered with userfaultfd; the first touch of one
//! (by a vCPU through KVM, or by a device) asks the source for it, while the source pushes the
//! rest in the background. Missing pages the source never held (all zero) are filled with
//! zeroes at once. If either side dies before the last page, the VM is lost.

use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::mpsc::{Receiver, TryRecvError};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use arch::GuestMemory;

use super::stream::{self, Kind, PAGE};
use super::transport::Stream;
use super::uffd::{self, UffdioRange};

// userfaultfd's missing-page mode (include/uapi/linux/userfaultfd.h).
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_COPY, 0xaa, 0x03, UffdioCopy);
vmm_sys_util::ioctl_iowr_nr!(UFFDIO_ZEROPAGE, 0xaa, 0x04, UffdioZeropage);

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// One guest memory region: where it is for the guest and for this process, its pages, and
/// the index of its first page.
#[derive(Clone, Copy)]
struct Span {
    gpa: u64,
    host: u64,
    pages: u64,
    first: u64,
}

impl Span {
    fn len(&self) -> u64 {
        self.pages * PAGE as u64
    }
}

/// Pages by index over the guest memory regions in order (a page's bit in the `Dirty` frame).
pub struct PageIndex {
    spans: Vec<Span>,
}

impl PageIndex {
    pub fn new(mem: &GuestMemory) -> PageIndex {
        let mut first = 0;
        let spans = mem
            .iter()
            .map(|r| {
                let pages = r.len() / PAGE as u64;
                let span = Span { gpa: r.start_addr().0, host: r.as_ptr() as u64, pages, first };
                first += pages;
                span
            })
            .collect();
        PageIndex { spans }
    }

    pub fn pages(&self) -> u64 {
        self.spans.last().map_or(0, |s| s.first + s.pages)
    }

    /// The bytes of a bitmap of every page.
    pub fn bitmap_len(&self) -> usize {
        self.pages().div_ceil(8) as usize
    }

    /// The region holding page `index`, and the page's offset in it.
    fn page(&self, index: u64) -> Option<(Span, u64)> {
        let span = *self.spans.iter().find(|s| (s.first..s.first + s.pages).contains(&index))?;
        Some((span, (index - span.first) * PAGE as u64))
    }

    pub fn index_of_gpa(&self, gpa: u64) -> Option<u64> {
        let span = self.spans.iter().find(|s| (s.gpa..s.gpa + s.len()).contains(&gpa))?;
        Some(span.first + (gpa - span.gpa) / PAGE as u64)
    }

    pub fn gpa_of_index(&self, index: u64) -> Option<u64> {
        self.page(index).map(|(span, offset)| span.gpa + offset)
    }

    fn host_of_index(&self, index: u64) -> Option<u64> {
        self.page(index).map(|(span, offset)| span.host + offset)
    }

    /// The page index and page-aligned host address of host address `addr`.
    fn of_host(&self, addr: u64) -> Option<(u64, u64)> {
        let span = self.spans.iter().find(|s| (s.host..s.host + s.len()).contains(&addr))?;
        let page = (addr - span.host) / PAGE as u64;
        Some((span.first + page, span.host + page * PAGE as u64))
    }
}

fn bit(bitmap: &[u8], index: u64) -> bool {
    bitmap.get((index / 8) as usize).is_some_and(|b| b >> (index % 8) & 1 != 0)
}

fn clear(bitmap: &mut [u8], index: u64) {
    if let Some(b) = bitmap.get_mut((index / 8) as usize) {
        *b &= !(1 << (index % 8));
    }
}

/// The bitmap of `gpas` (the pages the source still owes).
pub fn bitmap_of(index: &PageIndex, gpas: &[u64]) -> Vec<u8> {
    let mut bitmap = vec![0u8; index.bitmap_len()];
    for i in gpas.iter().filter_map(|&gpa| index.index_of_gpa(gpa)) {
        bitmap[(i / 8) as usize] |= 1 << (i % 8);
    }
    bitmap
}

/// The destination's missing memory: what it still needs, registered with userfaultfd.
pub struct Missing {
    index: PageIndex,
    needed: Vec<u8>,
    uffd: OwnedFd,
}

impl Missing {
    /// Drops the pages of `needed` (stale copies from earlier rounds) and registers all of
    /// `mem` for missing-page faults.
    pub fn start(mem: &GuestMemory, needed: Vec<u8>) -> Result<Missing, String> {
        let index = PageIndex::new(mem);
        if needed.len() != index.bitmap_len() {
            return Err(format!(
                "the post-copy page list has {} bytes where the VM's memory needs {}",
                needed.len(),
                index.bitmap_len()
            ));
        }
        for (region, span) in mem.iter().zip(&index.spans) {
            let shared = region.file_offset().is_some();
            for page in 0..span.pages {
                if bit(&needed, span.first + page) {
                    let addr = (span.host + page * PAGE as u64) as *mut libc::c_void;
                    // A stale copy goes; the page is missing until it arrives.
                    let advice = if shared { libc::MADV_REMOVE } else { libc::MADV_DONTNEED };
                    // SAFETY: a page of guest memory this process mapped; its content is dropped.
                    if unsafe { libc::madvise(addr, PAGE, advice) } != 0 {
                        return Err(format!("a stale page cannot be dropped ({})", std::io::Error::last_os_error()));
                    }
                }
            }
        }
        let uffd = uffd::open(UFFD_FEATURE_MISSING_SHMEM)?;
        for span in &index.spans {
            uffd::register(&uffd, span.host, span.len(), UFFDIO_REGISTER_MODE_MISSING)?;
        }
        Ok(Missing { index, needed, uffd })
    }

    /// Pages still owed.
    pub fn left(&self) -> u64 {
        self.needed.iter().map(|b| u64::from(b.count_ones())).sum()
    }

    /// Puts a page that arrived in place (and wakes whoever waits for it), if it is still owed.
    fn fill(&mut self, gpa: u64, data: &[u8]) -> Result<(), String> {
        let Some(index) = self.index.index_of_gpa(gpa) else {
            return Err(format!("the source sent a page at {gpa:#x} outside the VM's memory"));
        };
        if !bit(&self.needed, index) {
            return Ok(());
        }
        let host = self.index.host_of_index(index).ok_or("a page outside the VM's memory")?;
        // UFFDIO_COPY reads one page from `data` (PAGE bytes, live for the call); a page that
        // is there already (EEXIST) is fine.
        let mut copy = UffdioCopy { dst: host, src: data.as_ptr() as u64, len: PAGE as u64, mode: 0, copy: 0 };
        if let Err(e) = uffd::ioctl_raw(&self.uffd, UFFDIO_COPY(), &mut copy)
            && e.raw_os_error() != Some(libc::EEXIST)
        {
            return Err(format!("a page cannot be put in place ({e})"));
        }
        clear(&mut self.needed, index);
        Ok(())
    }

    /// A page nobody owes (never written on the source): zeroes, at once.
    fn zero(&self, host: u64) -> Result<(), String> {
        let mut zero = UffdioZeropage { range: UffdioRange { start: host, len: PAGE as u64 }, mode: 0, zeropage: 0 };
        if let Err(e) = uffd::ioctl_raw(&self.uffd, UFFDIO_ZEROPAGE(), &mut zero)
            && e.raw_os_error() != Some(libc::EEXIST)
        {
            return Err(format!("a zero page cannot be put in place ({e})"));
        }
        Ok(())
    }

    /// The faults waiting: each either asks the source (`ask`) or gets zeroes.
    fn serve_faults(&self, ask: &mut dyn FnMut(u64) -> Result<(), String>) -> Result<(), String> {
        let mut msg = [0u8; 32];
        loop {
            // SAFETY: reading uffd_msg records into a buffer of one record's size.
            let n = unsafe { libc::read(self.uffd.as_raw_fd(), msg.as_mut_ptr().cast(), msg.len()) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                return match e.kind() {
                    std::io::ErrorKind::WouldBlock => Ok(()),
                    _ => Err(format!("the page faults cannot be read ({e})")),
                };
            }
            if n as usize != msg.len() || msg[0] != UFFD_EVENT_PAGEFAULT {
                continue;
            }
            let addr = u64::from_le_bytes(msg[16..24].try_into().expect("eight bytes"));
            let Some((index, host)) = self.index.of_host(addr) else { continue };
            match bit(&self.needed, index) {
                true => ask(self.index.gpa_of_index(index).ok_or("a fault outside the VM's memory")?)?,
                false => self.zero(host)?,
            }
        }
    }
}

/// The destination after the VM's state: serves page faults and puts in place what the source
/// sends until its `End`; tells the source the VM runs (or not) when `built` says so. Ends when
/// every page is here.
pub fn serve_destination(
    mut connection: Box<dyn Stream>,
    mut missing: Missing,
    built: Receiver<Result<(), String>>,
) -> Result<(), String> {
    let socket = connection.as_raw_fd();
    let mut asked = std::collections::HashSet::new();
    let mut answered = false;
    let mut buf = Vec::new();
    tracing::info!("migration: post-copy, {} pages to come", missing.left());
    loop {
        if !answered {
            match built.try_recv() {
                Ok(result) => {
                    answered = true;
                    let frame = match &result {
                        Ok(()) => stream::write_frame(&mut connection, Kind::Ack, &[]),
                        Err(e) => stream::write_frame(&mut connection, Kind::Error, &e.as_bytes()[..e.len().min(4000)]),
                    };
                    frame.map_err(|e| format!("the source is gone ({e}); the VM is lost"))?;
                    result?;
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => return Err("the VM was never built".into()),
            }
        }
        // TLS may hold frames it already read: then the socket has nothing to say, and the
        // faults are only looked at.
        let buffered = connection.buffered_input();
        let mut polled = [
            libc::pollfd { fd: missing.uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: socket, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: poll reads and writes the two entries of the array it is given.
        if unsafe { libc::poll(polled.as_mut_ptr(), 2, if buffered { 0 } else { 10 }) } < 0 {
            continue;
        }
        if polled[0].revents != 0 {
            missing.serve_faults(&mut |gpa| {
                if asked.insert(gpa) {
                    stream::write_frame(&mut connection, Kind::Request, &gpa.to_le_bytes())
                        .map_err(|e| format!("the source is gone ({e}); the VM is lost"))?;
                }
                Ok(())
            })?;
        }
        if buffered || polled[1].revents != 0 {
            match stream::read_frame(&mut connection, &mut buf) {
                Ok(Kind::Pages) => {
                    let (gpa, data) = stream::pages(&buf)?;
                    for (i, page) in data.chunks_exact(PAGE).enumerate() {
                        missing.fill(gpa + (i * PAGE) as u64, page)?;
                    }
                }
                Ok(Kind::End) if missing.left() == 0 && answered => {
                    stream::write_frame(&mut connection, Kind::Ack, &[]).map_err(|e| e.to_string())?;
                    tracing::info!("migration: post-copy done, every page is here");
                    return Ok(());
                }
                Ok(Kind::End) => {
                    return Err(format!("the source ended with {} pages owed; the VM is lost", missing.left()));
                }
                Ok(other) => return Err(format!("the source sent a {other:?} frame in post-copy")),
                Err(e) => return Err(format!("{e}; the VM is lost")),
            }
        }
    }
}

/// The source's end of the stream in post-copy: pages go out and requests come in on the same
/// stream (which may be TLS, and so cannot be read from another handle).
pub trait SourceLink {
    /// Sends the page at `gpa` (Some), or flushes what was sent (None).
    fn send(&mut self, page: Option<u64>) -> Result<(), String>;
    /// The stream, to read the destination's requests from.
    fn stream(&mut self) -> &mut dyn Stream;
}

/// The source after the destination runs the VM: answers its requests first and pushes the
/// other owed pages (`owed`, in address order) meanwhile, then ends and waits for its word.
pub fn serve_source(link: &mut dyn SourceLink, owed: Vec<u64>) -> Result<(), String> {
    let mut owed = owed.into_iter().peekable();
    let mut buf = Vec::new();
    loop {
        if super::transport::readable(link.stream(), 0) {
            match stream::read_frame(&mut ReadOnly(link.stream()), &mut buf)? {
                Kind::Request => {
                    link.send(Some(stream::requested_page(&buf)?))?;
                    link.send(None)?;
                }
                Kind::Error => return Err(format!("the destination failed: {}", String::from_utf8_lossy(&buf))),
                other => return Err(format!("the destination sent a {other:?} frame in post-copy")),
            }
            continue;
        }
        // A few pages at a time, so that a request waits little.
        let mut sent = 0;
        while sent < 64 {
            let Some(gpa) = owed.next() else { break };
            link.send(Some(gpa))?;
            sent += 1;
        }
        link.send(None)?;
        if sent == 0 && owed.peek().is_none() {
            return Ok(());
        }
    }
}

/// A stream read through `Read` alone.
struct ReadOnly<'a>(&'a mut dyn Stream);

impl Read for ReadOnly<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    #[test]
    fn pages_are_numbered_across_regions_in_order() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x3000), (GuestAddress(0x10_0000), 0x2000)]).unwrap();
        let index = PageIndex::new(&mem);
        assert_eq!((index.pages(), index.bitmap_len()), (5, 1));
        assert_eq!(index.index_of_gpa(0x10_1000), Some(4));
        assert_eq!(index.index_of_gpa(0x3000), None);
        assert_eq!(index.gpa_of_index(3), Some(0x10_0000));
        assert_eq!(index.gpa_of_index(5), None);
        let host = mem.iter().nth(1).unwrap().as_ptr() as u64;
        assert_eq!(index.host_of_index(4), Some(host + 0x1000));
        assert_eq!(index.of_host(host + 0x1234), Some((4, host + 0x1000)));
        let bitmap = bitmap_of(&index, &[0x1000, 0x10_1000, 0x20_0000]);
        assert_eq!(bitmap, vec![0b1_0010]);
    }
}
