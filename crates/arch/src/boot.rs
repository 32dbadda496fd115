//! Loading the kernel and initramfs, and the boot information the kernel reads at entry: the
//! command line plus either PVH `hvm_start_info` or the Linux zero page.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};

use linux_loader::cmdline::Cmdline;
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend};

use crate::layout::*;
use crate::memory::{E820Entry, e820_map, low_ram_end};
use crate::{Error, GuestMemory, Result};

/// What a kernel image file holds, judged by its magic numbers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF vmlinux: PVH entry when it carries the note, else the 64-bit entry.
    Elf,
    /// A bzImage: the 64-bit entry of its decompressor.
    BzImage,
}

/// Looks at the first bytes of a kernel image; `None` when it is neither ELF nor bzImage.
pub fn detect_kernel_format(image: &mut (impl Read + Seek)) -> Option<KernelFormat> {
    let mut head = [0u8; 0x206];
    image.seek(SeekFrom::Start(0)).ok()?;
    let len = read_up_to(image, &mut head).ok()?;
    if len >= 4 && head[..4] == *b"\x7fELF" {
        return Some(KernelFormat::Elf);
    }
    // "HdrS" at 0x202 marks the Linux boot protocol header of a bzImage.
    if len >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Some(KernelFormat::BzImage);
    }
    None
}

fn read_up_to(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match r.read(&mut buf[filled..])? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh,
    /// 64-bit long mode on identity page tables, RSI = zero page.
    Linux64,
}

/// A kernel placed in guest memory.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    pub entry: u64,
    pub mode: EntryMode,
    /// First address past the kernel image.
    pub end: u64,
    /// The bzImage's setup header, copied into the zero page.
    pub setup_header: Option<setup_header>,
}

/// The Linux boot protocol's 64-bit entry sits 0x200 bytes into the protected-mode kernel.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// Loads `image` into guest memory.
pub fn load_kernel(mem: &GuestMemory, image: &mut File, format: KernelFormat) -> Result<LoadedKernel> {
    let himem = Some(GuestAddress(HIMEM_START));
    match format {
        KernelFormat::Elf => {
            let loaded = Elf::load(mem, None, image, himem)?;
            let (entry, mode) = match loaded.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(addr) => (addr.raw_value(), EntryMode::Pvh),
                _ => (loaded.kernel_load.raw_value(), EntryMode::Linux64),
            };
            Ok(LoadedKernel { entry, mode, end: loaded.kernel_end, setup_header: None })
        }
        KernelFormat::BzImage => {
            let loaded = BzImage::load(mem, None, image, himem)?;
            Ok(LoadedKernel {
                entry: loaded.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET,
                mode: EntryMode::Linux64,
                end: loaded.kernel_end,
                setup_header: loaded.setup_header,
            })
        }
    }
}

/// Where the initramfs was placed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Initrd {
    pub addr: u64,
    pub size: u64,
}

/// The highest page-aligned address below `limit` where `size` bytes fit above `kernel_end`.
pub fn initrd_address(size: u64, kernel_end: u64, limit: u64) -> Option<u64> {
    let start = limit.checked_sub(size)? & !0xfff;
    (start >= kernel_end).then_some(start)
}

/// Copies the initramfs to the top of RAM below the MMIO hole (and below 2 GiB, the highest
/// address every 64-bit kernel accepts without `xloadflags`).
pub fn load_initrd(mem: &GuestMemory, image: &mut File, kernel_end: u64, mem_size: u64) -> Result<Initrd> {
    let size = image.metadata().map(|m| m.len()).unwrap_or(0);
    let limit = low_ram_end(mem_size).min(0x8000_0000);
    let addr = initrd_address(size, kernel_end, limit).ok_or(Error::InitrdTooLarge { size, limit })?;
    image.seek(SeekFrom::Start(0)).map_err(|_| Error::GuestWrite { what: "initramfs", addr })?;
    mem.read_exact_volatile_from(GuestAddress(addr), image, size as usize)
        .map_err(|_| Error::GuestWrite { what: "initramfs", addr })?;
    Ok(Initrd { addr, size })
}

/// Builds a command line, enforcing the kernel's size limit.
pub fn cmdline(text: &str) -> Result<Cmdline> {
    Ok(Cmdline::try_from(text, CMDLINE_MAX_SIZE)?)
}

/// Writes the command line and the entry mode's boot information.
pub fn write_boot_info(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<Initrd>,
    mem_size: u64,
) -> Result<()> {
    let text = cmdline.as_cstring().map_err(Error::Cmdline)?;
    let bytes = text.as_bytes_with_nul();
    write(mem, bytes, CMDLINE_START, "kernel command line")?;
    let map = e820_map(mem_size);
    match kernel.mode {
        EntryMode::Pvh => write_pvh_info(mem, &map, bytes.len(), initrd),
        EntryMode::Linux64 => write_zero_page(mem, kernel.setup_header, &map, bytes.len(), initrd),
    }
}

fn write(mem: &GuestMemory, bytes: &[u8], addr: u64, what: &'static str) -> Result<()> {
    mem.write_slice(bytes, GuestAddress(addr)).map_err(|_| Error::GuestWrite { what, addr })
}

/// `boot_params` as guest-memory bytes.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ZeroPage(boot_params);
// SAFETY: boot_params is a repr(C) struct of integers and arrays of integers: every bit
// pattern is a valid value and it has no references.
unsafe impl ByteValued for ZeroPage {}

const KERNEL_LOADER_OTHER: u8 = 0xff;
const BOOT_FLAG_MAGIC: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
const KERNEL_MIN_ALIGNMENT: u32 = 0x100_0000;

/// The Linux zero page for the 64-bit boot protocol.
pub fn zero_page(
    header: Option<setup_header>,
    map: &[E820Entry],
    cmdline_len: usize,
    initrd: Option<Initrd>,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(hdr) = header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = BOOT_FLAG_MAGIC;
    params.hdr.header = HDRS_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some(initrd) = initrd {
        params.hdr.ramdisk_image = initrd.addr as u32;
        params.hdr.ramdisk_size = initrd.size as u32;
    }
    let count = map.len().min(params.e820_table.len());
    for (slot, e) in params.e820_table.iter_mut().zip(map) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, r#type: e.kind as u32 };
    }
    params.e820_entries = count as u8;
    params
}

fn write_zero_page(
    mem: &GuestMemory,
    header: Option<setup_header>,
    map: &[E820Entry],
    cmdline_len: usize,
    initrd: Option<Initrd>,
) -> Result<()> {
    let params = ZeroPage(zero_page(header, map, cmdline_len, initrd));
    mem.write_obj(params, GuestAddress(ZERO_PAGE_START))
        .map_err(|_| Error::GuestWrite { what: "zero page", addr: ZERO_PAGE_START })
}

#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: a repr(C) struct of integers; every bit pattern is valid.
unsafe impl ByteValued for StartInfo {}
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: a repr(C) struct of integers; every bit pattern is valid.
unsafe impl ByteValued for MemmapEntry {}
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: a repr(C) struct of integers; every bit pattern is valid.
unsafe impl ByteValued for ModlistEntry {}

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;

/// The PVH start info, pointing at the memory map and module list written beside it.
pub fn pvh_start_info(map_len: usize, initrd: Option<Initrd>) -> hvm_start_info {
    hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: u32::from(initrd.is_some()),
        modlist_paddr: if initrd.is_some() { PVH_MODLIST_START } else { 0 },
        cmdline_paddr: CMDLINE_START,
        memmap_paddr: PVH_MEMMAP_START,
        memmap_entries: map_len as u32,
        ..Default::default()
    }
}

fn write_pvh_info(mem: &GuestMemory, map: &[E820Entry], _cmdline_len: usize, initrd: Option<Initrd>) -> Result<()> {
    let map = &map[..map.len().min(PVH_MEMMAP_MAX_ENTRIES)];
    for (i, e) in map.iter().enumerate() {
        let entry =
            MemmapEntry(hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind as u32, reserved: 0 });
        let at = PVH_MEMMAP_START + (i * std::mem::size_of::<MemmapEntry>()) as u64;
        mem.write_obj(entry, GuestAddress(at)).map_err(|_| Error::GuestWrite { what: "PVH memory map", addr: at })?;
    }
    if let Some(initrd) = initrd {
        let module = ModlistEntry(hvm_modlist_entry { paddr: initrd.addr, size: initrd.size, ..Default::default() });
        mem.write_obj(module, GuestAddress(PVH_MODLIST_START))
            .map_err(|_| Error::GuestWrite { what: "PVH module list", addr: PVH_MODLIST_START })?;
    }
    mem.write_obj(StartInfo(pvh_start_info(map.len(), initrd)), GuestAddress(PVH_INFO_START))
        .map_err(|_| Error::GuestWrite { what: "PVH start info", addr: PVH_INFO_START })?;
    debug_assert!(mem.address_in_range(GuestAddress(PVH_INFO_START)));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    #[test]
    fn detects_elf_and_bzimage_and_rejects_the_rest() {
        let mut elf = b"\x7fELF\x02\x01\x01".to_vec();
        elf.resize(64, 0);
        assert_eq!(detect_kernel_format(&mut Cursor::new(elf)), Some(KernelFormat::Elf));
        let mut bz = vec![0u8; 0x400];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect_kernel_format(&mut Cursor::new(bz)), Some(KernelFormat::BzImage));
        assert_eq!(detect_kernel_format(&mut Cursor::new(b"#!/bin/sh\necho hi\n".to_vec())), None);
        assert_eq!(detect_kernel_format(&mut Cursor::new(Vec::new())), None);
    }

    #[test]
    fn zero_page_carries_cmdline_initrd_and_e820() {
        let map = e820_map(64 << 20);
        let initrd = Initrd { addr: 0x300_0000, size: 0x1234 };
        let p = zero_page(None, &map, 42, Some(initrd));
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, 0x5372_6448);
        assert_eq!(hdr.type_of_loader, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, CMDLINE_START as u32);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!(({ hdr.ramdisk_image }, { hdr.ramdisk_size }), (0x300_0000, 0x1234));
        assert_eq!(p.e820_entries as usize, map.len());
        let last = p.e820_table[map.len() - 1];
        assert_eq!(({ last.addr }, { last.size }, { last.r#type }), (HIMEM_START, (64 << 20) - HIMEM_START, 1));
    }

    #[test]
    fn zero_page_keeps_the_bzimage_header() {
        let hdr = setup_header { setup_sects: 27, version: 0x20f, kernel_alignment: 0x20_0000, ..Default::default() };
        let p = zero_page(Some(hdr), &e820_map(64 << 20), 1, None);
        let out = p.hdr;
        assert_eq!(({ out.setup_sects }, { out.version }, { out.kernel_alignment }), (27, 0x20f, 0x20_0000));
        assert_eq!(out.type_of_loader, 0xff);
    }

    #[test]
    fn pvh_info_is_written_where_the_kernel_looks() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let kernel = LoadedKernel { entry: 0x100_0000, mode: EntryMode::Pvh, end: 0x200_0000, setup_header: None };
        let initrd = Initrd { addr: 0x3f0_0000, size: 4096 };
        write_boot_info(&mem, &kernel, &cmdline("console=ttyS0").unwrap(), Some(initrd), 64 << 20).unwrap();
        let info: StartInfo = mem.read_obj(GuestAddress(PVH_INFO_START)).unwrap();
        assert_eq!(info.0.magic, XEN_HVM_START_MAGIC);
        assert_eq!(info.0.memmap_entries, 3);
        assert_eq!(info.0.nr_modules, 1);
        let module: ModlistEntry = mem.read_obj(GuestAddress(info.0.modlist_paddr)).unwrap();
        assert_eq!((module.0.paddr, module.0.size), (initrd.addr, initrd.size));
        let ram: MemmapEntry = mem.read_obj(GuestAddress(PVH_MEMMAP_START + 2 * 24)).unwrap();
        assert_eq!((ram.0.addr, ram.0.size, ram.0.type_), (HIMEM_START, (64 << 20) - HIMEM_START, 1));
        let mut text = [0u8; 14];
        mem.read_slice(&mut text, GuestAddress(info.0.cmdline_paddr)).unwrap();
        assert_eq!(&text, b"console=ttyS0\0");
        assert!(PVH_MEMMAP_START + 24 * PVH_MEMMAP_MAX_ENTRIES as u64 <= ZERO_PAGE_START);
    }

    #[test]
    fn initrd_goes_to_the_top_page_and_never_over_the_kernel() {
        assert_eq!(initrd_address(0x1800, 0x20_0000, 0x400_0000), Some(0x3ff_e000));
        assert_eq!(initrd_address(0x400_0000, 0x20_0000, 0x400_0000), None);
        assert_eq!(initrd_address(u64::MAX, 0, 0x400_0000), None);
    }

    #[test]
    fn cmdline_limit_is_the_kernels() {
        assert!(cmdline(&"a".repeat(CMDLINE_MAX_SIZE - 1)).is_ok());
        assert!(matches!(cmdline(&"a".repeat(CMDLINE_MAX_SIZE)), Err(Error::Cmdline(_))));
    }
}
