//! How guest RAM is backed (`--memory`), and hotpluggable memory (`--memory-hotplug`).

use std::str::FromStr;

use super::{key_values, on_off};

/// Hotpluggable memory (virtio-mem), in MiB: `--memory-hotplug total=N[,block=N][,slot=N]
/// [,requested=N]` or `PUT /hotplug/memory`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryHotplugConfig {
    pub total_mib: u64,
    pub block_mib: u64,
    pub slot_mib: u64,
    /// What the guest is asked to plug from the start.
    #[serde(default)]
    pub requested_mib: u64,
}

/// A field of [`MemoryHotplugConfig`], for errors that name it as the user spelled it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HotplugField {
    Total,
    Block,
    Slot,
    Requested,
}

impl HotplugField {
    /// The field's key on the command line.
    pub fn key(self) -> &'static str {
        match self {
            HotplugField::Total => "total",
            HotplugField::Block => "block",
            HotplugField::Slot => "slot",
            HotplugField::Requested => "requested",
        }
    }
}

impl MemoryHotplugConfig {
    pub const DEFAULT_BLOCK_MIB: u64 = 2;
    pub const DEFAULT_SLOT_MIB: u64 = 128;
    /// 1 TiB: far above what a guest on one host plugs, and within any guest's physical
    /// address width.
    pub const MAX_TOTAL_MIB: u64 = 1 << 20;
    /// Each block is a KVM memory slot once plugged: KVM's 32,764 slots on x86 less 256 kept
    /// for RAM, pmem and assigned devices.
    pub const MAX_BLOCKS: u64 = 32_764 - 256;

    /// Checks the sizes; the error names the field and the fix.
    pub fn check(&self) -> Result<(), (HotplugField, String)> {
        use HotplugField::*;
        if self.block_mib < 2 || !self.block_mib.is_power_of_two() {
            return Err((Block, format!("is {}; give a power of two of at least 2", self.block_mib)));
        }
        if self.slot_mib < 128 || !self.slot_mib.is_multiple_of(self.block_mib) {
            return Err((Slot, format!("is {}; give at least 128, a multiple of the block size", self.slot_mib)));
        }
        if self.total_mib == 0 || !self.total_mib.is_multiple_of(self.slot_mib) || self.total_mib > Self::MAX_TOTAL_MIB
        {
            return Err((
                Total,
                format!(
                    "is {}; give a multiple of the {} MiB slot size, at most {}",
                    self.total_mib,
                    self.slot_mib,
                    Self::MAX_TOTAL_MIB
                ),
            ));
        }
        if self.total_mib / self.block_mib > Self::MAX_BLOCKS {
            let least = (self.total_mib.div_ceil(Self::MAX_BLOCKS)).next_power_of_two();
            return Err((
                Block,
                format!(
                    "is {}, which cuts {} MiB into {} blocks, each a KVM memory slot, where at most {} fit; give at least {least}",
                    self.block_mib,
                    self.total_mib,
                    self.total_mib / self.block_mib,
                    Self::MAX_BLOCKS
                ),
            ));
        }
        if self.requested_mib > self.total_mib || !self.requested_mib.is_multiple_of(self.block_mib) {
            return Err((
                Requested,
                format!(
                    "is {}; give a multiple of the {} MiB block size, at most the total {}",
                    self.requested_mib, self.block_mib, self.total_mib
                ),
            ));
        }
        Ok(())
    }
}

impl FromStr for MemoryHotplugConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut c = MemoryHotplugConfig {
            total_mib: 0,
            block_mib: Self::DEFAULT_BLOCK_MIB,
            slot_mib: Self::DEFAULT_SLOT_MIB,
            requested_mib: 0,
        };
        for (key, value) in key_values("--memory-hotplug", s)? {
            let field = match key {
                "total" => &mut c.total_mib,
                "block" => &mut c.block_mib,
                "slot" => &mut c.slot_mib,
                "requested" => &mut c.requested_mib,
                _ => {
                    return Err(format!(
                        "--memory-hotplug has no option '{key}'; use total=, block=, slot= and requested= (MiB)"
                    ));
                }
            };
            *field =
                value.parse().map_err(|_| format!("--memory-hotplug {key}= takes MiB as a number, not '{value}'"))?;
        }
        c.check().map_err(|(field, problem)| format!("--memory-hotplug {}= {problem}", field.key()))?;
        Ok(c)
    }
}

/// How guest RAM is backed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HugePages {
    /// 4 KiB pages.
    #[default]
    Off,
    /// 2 MiB hugetlbfs pages, reserved in /proc/sys/vm/nr_hugepages.
    On,
    /// Transparent huge pages: MADV_HUGEPAGE on 2 MiB-aligned memory.
    Thp,
}

/// `--memory MiB` or
/// `--memory size=MiB[,hugepages=off|on|thp][,mergeable=on][,shared=on][,prefault=on][,dirty_ring=N]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryOptions {
    pub hugepages: HugePages,
    /// MADV_MERGEABLE: KSM may merge identical pages.
    pub mergeable: bool,
    /// Backed by a memfd mapped shared, rather than private anonymous memory.
    pub shared: bool,
    /// Touched at start, so that the guest never waits for a page fault.
    pub prefault: bool,
    /// KVM's dirty rings of this many pages a vCPU log the vCPUs' writes (0: its bitmap).
    #[serde(default)]
    pub dirty_ring: u32,
}

/// A dirty ring size for `option`: 0 (none) or a power of two from 256 to 65536 pages.
pub fn parse_dirty_ring(option: &str, value: &str) -> Result<u32, String> {
    match value.parse::<u32>() {
        Ok(0) => Ok(0),
        Ok(n) if n.is_power_of_two() && (256..=65536).contains(&n) => Ok(n),
        _ => Err(format!(
            "{option} dirty_ring= takes 0 (KVM's dirty bitmap) or pages a vCPU as a power of two from 256 to 65536, not '{value}'"
        )),
    }
}

/// What `--memory` says: the size and the backing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MemorySpec {
    pub size_mib: u64,
    pub options: MemoryOptions,
}

impl FromStr for MemorySpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Ok(size_mib) = s.parse::<u64>() {
            return Ok(MemorySpec { size_mib, options: MemoryOptions::default() });
        }
        let mut size = None;
        let mut options = MemoryOptions::default();
        for (key, value) in key_values("--memory", s)? {
            match key {
                "size" => {
                    size = Some(
                        value.parse().map_err(|_| format!("--memory size= takes MiB as a number, not '{value}'"))?,
                    )
                }
                "hugepages" => {
                    options.hugepages = match value {
                        "off" => HugePages::Off,
                        "on" => HugePages::On,
                        "thp" => HugePages::Thp,
                        _ => return Err(format!("--memory hugepages= takes off, on or thp, not '{value}'")),
                    }
                }
                "mergeable" => options.mergeable = on_off("--memory", key, value)?,
                "shared" => options.shared = on_off("--memory", key, value)?,
                "prefault" => options.prefault = on_off("--memory", key, value)?,
                "dirty_ring" => options.dirty_ring = parse_dirty_ring("--memory", value)?,
                _ => {
                    return Err(format!(
                        "--memory has no option '{key}'; use size=, hugepages=, mergeable=, shared=, prefault= and dirty_ring="
                    ));
                }
            }
        }
        Ok(MemorySpec {
            size_mib: size.ok_or("--memory needs a size: --memory 256 or --memory size=256,...")?,
            options,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_option_takes_a_size_or_a_list() {
        assert_eq!("256".parse(), Ok(MemorySpec { size_mib: 256, options: MemoryOptions::default() }));
        let m: MemorySpec =
            "size=128,hugepages=thp,mergeable=on,shared=on,prefault=on,dirty_ring=4096".parse().unwrap();
        assert_eq!(m.size_mib, 128);
        assert_eq!(
            m.options,
            MemoryOptions {
                hugepages: HugePages::Thp,
                mergeable: true,
                shared: true,
                prefault: true,
                dirty_ring: 4096
            }
        );
        for wrong in ["100", "128", "131072", "x"] {
            let e = format!("size=1,dirty_ring={wrong}").parse::<MemorySpec>().unwrap_err();
            assert!(e.contains("dirty_ring= takes 0") && e.contains(wrong), "{e}");
        }
        assert!("size=1,hugepages=1g".parse::<MemorySpec>().unwrap_err().contains("off, on or thp"));
        assert!("mergeable=on".parse::<MemorySpec>().unwrap_err().contains("needs a size"));
        assert!("size=1,balloon=on".parse::<MemorySpec>().unwrap_err().contains("no option 'balloon'"));
    }
}
