//! What the VMM tells the probe through the PVH `hvm_start_info`.

const MAGIC: u32 = 0x336e_c578;
const RAM: u32 = 1;
/// The probe keeps its own copy: the VMM's page holding the command line is ordinary RAM.
const CMDLINE_MAX: usize = 4096;

pub struct StartInfo {
    cmdline: [u8; CMDLINE_MAX],
    cmdline_len: usize,
    /// Bytes of RAM the memory map reports.
    pub ram_bytes: u64,
    /// The first address past the RAM that starts at 1 MiB.
    pub low_ram_end: u64,
}

fn read<T: Copy>(addr: u64) -> T {
    // SAFETY: the VMM placed the start info and what it points to in RAM, which the first
    // 4 GiB identity map covers; read_unaligned has no alignment requirement.
    unsafe { core::ptr::read_unaligned(addr as *const T) }
}

impl StartInfo {
    pub fn read(addr: u64) -> Option<StartInfo> {
        if read::<u32>(addr) != MAGIC {
            return None;
        }
        let mut info = StartInfo { cmdline: [0; CMDLINE_MAX], cmdline_len: 0, ram_bytes: 0, low_ram_end: 0 };
        let cmdline = read::<u64>(addr + 24);
        if cmdline != 0 {
            while info.cmdline_len < CMDLINE_MAX {
                let byte = read::<u8>(cmdline + info.cmdline_len as u64);
                if byte == 0 {
                    break;
                }
                info.cmdline[info.cmdline_len] = byte;
                info.cmdline_len += 1;
            }
        }
        let version = read::<u32>(addr + 4);
        let (memmap, entries) = (read::<u64>(addr + 40), read::<u32>(addr + 48));
        if version >= 1 && memmap != 0 {
            for i in 0..u64::from(entries.min(128)) {
                let entry = memmap + i * 24;
                let (start, size, kind) = (read::<u64>(entry), read::<u64>(entry + 8), read::<u32>(entry + 16));
                if kind == RAM {
                    info.ram_bytes += size;
                    if start <= 0x10_0000 && start + size > 0x10_0000 {
                        info.low_ram_end = start + size;
                    }
                }
            }
        }
        Some(info)
    }

    pub fn cmdline(&self) -> &str {
        core::str::from_utf8(&self.cmdline[..self.cmdline_len]).unwrap_or("")
    }
}
