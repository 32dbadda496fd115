//! Guest physical addresses of everything the VMM places before the kernel runs.
//!
//! Low memory (below 1 MiB) holds the boot tables; the kernel loads at 1 MiB; the 32-bit MMIO
//! hole sits at [3 GiB, 4 GiB) and RAM that does not fit below it continues at 4 GiB.

/// The GDT the vCPUs start with (4 entries).
pub const BOOT_GDT_START: u64 = 0x500;
/// An empty IDT: any exception before the kernel installs its own is a triple fault.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info` (56 bytes), its module list (one 32-byte entry: the initramfs) and
/// its memory map.
pub const PVH_INFO_START: u64 = 0x6000;
pub const PVH_MODLIST_START: u64 = 0x6040;
pub const PVH_MEMMAP_START: u64 = 0x6060;
/// Room for the PVH memory map, up to the zero page.
pub const PVH_MEMMAP_MAX_ENTRIES: usize = ((ZERO_PAGE_START - PVH_MEMMAP_START) / 24) as usize;
/// Linux `boot_params` (the zero page) for the 64-bit boot protocol.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot vCPU in 64-bit mode.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity-mapping page tables: PML4, one PDPT and four page directories (4 GiB, 2 MiB pages).
pub const PML4_START: u64 = 0x9000;
pub const PDPT_START: u64 = 0xa000;
pub const PD_START: u64 = 0xb000;
pub const IDENTITY_MAPPED_GIB: u64 = 4;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Linux 6.x on x86 accepts 2048 bytes including the terminating NUL.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// End of conventional RAM: the EBDA starts here.
pub const EBDA_START: u64 = 0x9fc00;
/// MP floating pointer and configuration table, in the BIOS area Linux scans (0xf0000..1 MiB).
pub const MPTABLE_START: u64 = 0xf0000;
pub const MPTABLE_MAX_SIZE: u64 = 0x10000;
/// Kernel images load at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO hole: no RAM here.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Firecracker-style boot timer: the guest writes [`BOOT_TIMER_MAGIC`] here once booted.
pub const BOOT_TIMER_START: u64 = MMIO_HOLE_START;
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
pub const BOOT_TIMER_MAGIC: u8 = 123;
/// virtio-mmio windows, one page each, announced on the kernel command line.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// virtio-pmem regions go here while they fit (below the virtio-mmio window), else above RAM.
pub const PMEM_WINDOW_START: u64 = 0xc020_0000;
pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;
/// virtio-mmio devices take IOAPIC pins from here up (COM1 has 4).
pub const VIRTIO_FIRST_IRQ: u32 = 5;
pub const VIRTIO_MAX_DEVICES: u32 = IOAPIC_PINS as u32 - VIRTIO_FIRST_IRQ;
/// BAR 0 of each virtio-pci function, 64 KiB apart (assigned here, as firmware would).
pub const PCI_BAR_START: u64 = 0xe000_0000;
pub const PCI_BAR_STRIDE: u64 = 0x1_0000;
/// The BARs of assigned devices (VFIO, vfio-user), each naturally aligned, below the IOAPIC.
pub const PASSTHROUGH_MMIO_START: u64 = 0xe100_0000;
pub const PASSTHROUGH_MMIO_END: u64 = 0xfe00_0000;
/// KVM's real-mode TSS (three pages) and identity-map page, at the top of the hole.
pub const KVM_TSS_START: u64 = 0xfffb_d000;
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const LAPIC_START: u64 = 0xfee0_0000;

/// Legacy I/O ports and interrupt lines.
pub const COM1_PORT: u16 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
/// The i8042's keyboard interrupt.
pub const I8042_IRQ: u32 = 1;
pub const I8042_PORT: u16 = 0x60;
pub const CMOS_PORT: u16 = 0x70;
/// IOAPIC pins (and so GSIs) the MP table routes ISA IRQs to.
pub const IOAPIC_PINS: u8 = 24;
