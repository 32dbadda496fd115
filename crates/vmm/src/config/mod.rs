//! What a VM is made of, and the checks that turn bad user input into one clear sentence. Each
//! kind of device's configuration and its command-line option live in a module of their own.

mod cpu;
mod devices;
mod disk;
mod fs;
mod memory;
mod nic;
pub mod paths;

pub use cpu::cpu_template;
pub use devices::{
    ConsoleConfig, PassthroughBackend, PassthroughConfig, PmemConfig, SerialConfig, VirtioTransport, VsockConfig,
    parse_balloon,
};
pub use disk::{DEFAULT_POLL_US, DiskConfig, MAX_POLL_US, VhostUserOptions};
pub use fs::FsConfig;
pub use memory::{HotplugField, HugePages, MemoryHotplugConfig, MemoryOptions, MemorySpec, parse_dirty_ring};
pub use nic::{MAX_QUEUE_PAIRS, NetAttachment, NetConfig, parse_unicast_mac};

use std::fs::File;
use std::path::{Path, PathBuf};

use arch::boot::{KernelFormat, detect_kernel_format};
use arch::layout::CMDLINE_MAX_SIZE;
use arch::memory::MIN_MEMORY;
use arch::mptable;

/// The command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Splits `key=value,key=value` option lists; an error names the option.
pub(crate) fn key_values<'a>(option: &str, text: &'a str) -> Result<Vec<(&'a str, &'a str)>, String> {
    text.split(',')
        .map(|kv| {
            kv.split_once('=').ok_or_else(|| format!("{option} takes key=value pairs separated by commas, not '{kv}'"))
        })
        .collect()
}

pub(crate) fn on_off(option: &str, key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{option} {key}= takes on or off, not '{value}'")),
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
    pub cpus: u32,
    pub memory_mib: u64,
    pub serial: SerialConfig,
    pub disks: Vec<DiskConfig>,
    pub rng: bool,
    #[serde(default)]
    pub rng_rate_limit: Option<virtio::rate_limiter::RateLimit>,
    pub console: Option<ConsoleConfig>,
    pub nets: Vec<NetConfig>,
    pub balloon: Option<virtio::balloon::BalloonOptions>,
    pub vsock: Option<VsockConfig>,
    /// virtio-pmem devices.
    #[serde(default)]
    pub pmem: Vec<PmemConfig>,
    /// virtio-fs shares, served by vhost-user back-ends.
    #[serde(default)]
    pub fs: Vec<FsConfig>,
    /// Hotpluggable memory (virtio-mem).
    #[serde(default)]
    pub memory_hotplug: Option<MemoryHotplugConfig>,
    /// Assigned PCI devices (VFIO, vfio-user).
    #[serde(default)]
    pub passthrough: Vec<PassthroughConfig>,
    pub transport: VirtioTransport,
    pub memory: MemoryOptions,
    /// Print the memory statistics when the VM stops.
    pub stats_on_exit: bool,
    /// Log dirty pages, for diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// The VM's id (`--id`), when it has one: its default MACs derive from it.
    #[serde(default)]
    pub id: Option<String>,
    /// The most bytes written to a serial or console output file (`--output-limit`).
    #[serde(default)]
    pub output_limit: Option<u64>,
    /// Firecracker's serial `rate_limiter`: bytes over it are dropped.
    #[serde(default)]
    pub serial_rate_limit: Option<virtio::rate_limiter::BucketConfig>,
    /// A custom CPU template (`PUT /cpu-config`).
    #[serde(default)]
    pub cpu_template: Option<api::models::CpuConfig>,
    /// A static CPU template's name (machine-config `cpu_template`, such as T2).
    #[serde(default)]
    pub static_cpu_template: Option<String>,
    /// How MMDS answers (kept in snapshots: a restored version-2 VM must still want tokens).
    #[serde(default)]
    pub mmds: Option<MmdsSettings>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmdsSettings {
    pub version: net::mmds::Version,
    pub imds_compat: bool,
}

/// What this host allows.
#[derive(Clone, Copy, Debug)]
pub struct HostLimits {
    /// KVM_CAP_MAX_VCPUS.
    pub kvm_max_vcpus: u32,
    /// Physical RAM, in MiB.
    pub ram_mib: u64,
    /// Free 2 MiB hugetlbfs pages.
    pub free_huge_pages: u64,
}

impl HostLimits {
    /// The most vCPUs a VM can have here: KVM's limit and the MP table's 8-bit APIC IDs.
    pub fn max_cpus(&self) -> u32 {
        self.kvm_max_vcpus.min(mptable::MAX_CPUS)
    }

    fn meminfo(key: &str) -> Option<u64> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }

    /// Host RAM from /proc/meminfo.
    pub fn host_ram_mib() -> u64 {
        Self::meminfo("MemTotal:").map_or(u64::MAX, |kib| kib / 1024)
    }

    /// Free hugetlbfs pages from /proc/meminfo (of the default 2 MiB size).
    pub fn free_huge_pages() -> u64 {
        Self::meminfo("HugePages_Free:").unwrap_or(0)
    }
}

/// A user mistake in the VM's configuration: the message names the option and the fix.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("--kernel {0} does not exist; pass the path of a vmlinux or bzImage.")]
    KernelMissing(PathBuf),
    #[error("--kernel {path} cannot be read ({reason}); check its permissions.")]
    KernelUnreadable { path: PathBuf, reason: String },
    #[error("--kernel {0} is neither an ELF vmlinux nor a bzImage; pass a Linux kernel image.")]
    KernelFormat(PathBuf),
    #[error("--initrd {0} does not exist or cannot be read; pass the path of an initramfs.")]
    InitrdMissing(PathBuf),
    #[error("--memory must be at least {min} MiB, not {given}; give the VM more memory.")]
    MemoryTooSmall { given: u64, min: u64 },
    #[error("--memory {given} MiB is more than this host's {host} MiB of RAM; pass a smaller --memory.")]
    MemoryTooLarge { given: u64, host: u64 },
    #[error("--memory {given} MiB is not a whole number of 2 MiB huge pages; use an even size.")]
    HugePageSize { given: u64 },
    #[error(
        "--memory hugepages=on needs {needed} free 2 MiB huge pages but the host has {free}; reserve them first: echo {needed} > /proc/sys/vm/nr_hugepages"
    )]
    HugePagesShort { needed: u64, free: u64 },
    #[error("--cpus must be between 1 and {max} on this host, not {given}.")]
    Cpus { given: u32, max: u32 },
    #[error("--cmdline is {len} bytes, but the kernel accepts at most {max}; shorten it.")]
    CmdlineTooLong { len: usize, max: usize },
    #[error("--disk path={path} cannot be opened{mode} ({reason}); check the path and its permissions.")]
    DiskUnusable { path: PathBuf, mode: &'static str, reason: String },
    #[error("--disk path={path} is {size} bytes, not a whole number of 512-byte sectors; resize the image.")]
    DiskSize { path: PathBuf, size: u64 },
    #[error("{0}")]
    DiskKind(String),
    #[error("--balloon size={target} MiB is more than the VM's {memory} MiB; pass a smaller size.")]
    BalloonTooLarge { target: u32, memory: u64 },
    #[error("--memory-hotplug {0}.")]
    Hotplug(String),
    #[error("{count} virtio devices are more than the {max} this machine has interrupt lines for; use fewer.")]
    TooManyDevices { count: usize, max: u32 },
    #[error("{0}.")]
    Queues(String),
    #[error("{0}.")]
    DirtyRing(String),
    #[error("{0}")]
    Path(String),
}

impl VmConfig {
    /// Checks everything that does not need KVM.
    pub fn validate(&self, limits: &HostLimits) -> Result<KernelFormat, ConfigError> {
        let format = check_kernel(&self.kernel)?;
        if let Some(initrd) = &self.initrd {
            let readable_file = File::open(initrd).and_then(|f| f.metadata()).is_ok_and(|m| m.is_file());
            if !readable_file {
                return Err(ConfigError::InitrdMissing(initrd.clone()));
            }
        }
        self.validate_machine(limits)?;
        Ok(format)
    }

    /// The checks that hold for a VM restored from a snapshot too, whose kernel was loaded long
    /// ago: a snapshot's configuration is as untrusted as a command line.
    pub fn validate_machine(&self, limits: &HostLimits) -> Result<(), ConfigError> {
        self.validate_shape(limits)?;
        for disk in &self.disks {
            disk::check(disk)?;
        }
        for fs in &self.fs {
            check_socket(&fs.vhost_user.socket, "--fs socket")?;
        }
        for nic in &self.nets {
            if let NetAttachment::VhostUser(options) = &nic.attachment {
                check_socket(&options.socket, "--net vhost_user")?;
            }
        }
        self.check_paths().map_err(ConfigError::Path)
    }

    /// [`Self::validate_machine`] without a look at any file it names: sizes, counts and
    /// limits, for a thread that may not open files.
    pub fn validate_shape(&self, limits: &HostLimits) -> Result<(), ConfigError> {
        let min = MIN_MEMORY >> 20;
        if self.memory_mib < min {
            return Err(ConfigError::MemoryTooSmall { given: self.memory_mib, min });
        }
        if self.memory_mib > limits.ram_mib {
            return Err(ConfigError::MemoryTooLarge { given: self.memory_mib, host: limits.ram_mib });
        }
        if let Some(h) = &self.memory_hotplug {
            h.check().map_err(|(field, problem)| ConfigError::Hotplug(format!("{}= {problem}", field.key())))?;
            if !self.passthrough.is_empty() {
                return Err(ConfigError::Hotplug(
                    "cannot be combined with assigned devices (--device), which reach guest memory where unplugged \
                     blocks cannot be fenced off; drop one of the two"
                        .into(),
                ));
            }
        }
        if self.memory.hugepages == HugePages::On {
            // Plugged memory faults huge pages in as the guest touches it: they must be there.
            let needed = (self.memory_mib + self.memory_hotplug.map_or(0, |h| h.total_mib)).div_ceil(2);
            if !self.memory_mib.is_multiple_of(2) {
                return Err(ConfigError::HugePageSize { given: self.memory_mib });
            }
            if needed > limits.free_huge_pages {
                return Err(ConfigError::HugePagesShort { needed, free: limits.free_huge_pages });
            }
        }
        memory::parse_dirty_ring("--memory", &self.memory.dirty_ring.to_string()).map_err(ConfigError::DirtyRing)?;
        if self.cpus == 0 || self.cpus > limits.max_cpus() {
            return Err(ConfigError::Cpus { given: self.cpus, max: limits.max_cpus() });
        }
        for (i, nic) in self.nets.iter().enumerate() {
            nic.check_queues(i).map_err(ConfigError::Queues)?;
        }
        for fs in &self.fs {
            FsConfig::check_tag(&fs.tag).map_err(ConfigError::Path)?;
        }
        if let Some(balloon) = self.balloon.filter(|b| u64::from(b.target_mib) > self.memory_mib) {
            return Err(ConfigError::BalloonTooLarge { target: balloon.target_mib, memory: self.memory_mib });
        }
        let devices = self.disks.len()
            + self.nets.len()
            + usize::from(self.rng)
            + usize::from(self.console.is_some())
            + usize::from(self.balloon.is_some())
            + usize::from(self.vsock.is_some())
            + self.pmem.len()
            + self.fs.len()
            + usize::from(self.memory_hotplug.is_some());
        if devices > arch::layout::VIRTIO_MAX_DEVICES as usize {
            return Err(ConfigError::TooManyDevices { count: devices, max: arch::layout::VIRTIO_MAX_DEVICES });
        }
        // The terminating NUL counts against the kernel's limit.
        if self.cmdline.len() >= CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong { len: self.cmdline.len(), max: CMDLINE_MAX_SIZE - 1 });
        }
        Ok(())
    }

    pub fn memory_bytes(&self) -> u64 {
        self.memory_mib << 20
    }

    /// Whether another process serves a device (vhost-user, vfio-user): it reaches guest
    /// memory by mapping its file, so the memory must be a shared memfd.
    pub fn needs_shared_memory(&self) -> bool {
        self.disks.iter().any(|d| d.vhost_user.is_some())
            || !self.fs.is_empty()
            || self.nets.iter().any(|n| matches!(n.attachment, NetAttachment::VhostUser(_)))
            || self.passthrough.iter().any(|d| matches!(d.backend, PassthroughBackend::VfioUser(_)))
    }

    /// The devices other processes serve, by what the user named them, for a refusal.
    pub fn vhost_user_devices(&self) -> Vec<String> {
        let disks = self.disks.iter().filter(|d| d.vhost_user.is_some()).map(|d| format!("disk {}", d.id));
        let fs = self.fs.iter().map(|f| format!("file system {}", f.tag));
        let nets = self
            .nets
            .iter()
            .enumerate()
            .filter(|(_, n)| matches!(n.attachment, NetAttachment::VhostUser(_)))
            .map(|(i, n)| format!("interface {}", n.api_id(i)));
        disks.chain(fs).chain(nets).collect()
    }

    /// The hotpluggable memory region (guest address, length), above RAM.
    pub fn hotplug_region(&self) -> Option<(u64, u64)> {
        self.memory_hotplug.map(|h| (arch::memory::hotplug_start(self.memory_bytes()), h.total_mib << 20))
    }

    /// Every guest memory region, in guest address order: RAM, then hotpluggable memory.
    pub fn memory_regions(&self) -> Vec<(u64, u64)> {
        let mut regions = arch::memory::ram_regions(self.memory_bytes());
        regions.extend(self.hotplug_region());
        regions
    }
}

/// Whether a vhost-user back-end listens at `path` (named by `what` in the error).
fn check_socket(path: &Path, what: &str) -> Result<(), ConfigError> {
    use std::os::unix::fs::FileTypeExt;
    match std::fs::metadata(path) {
        Ok(m) if m.file_type().is_socket() => Ok(()),
        Ok(_) => Err(ConfigError::Path(format!(
            "{what}={} is not a socket; give the path where the vhost-user back-end listens.",
            path.display()
        ))),
        Err(e) => Err(ConfigError::Path(format!(
            "{what}={} cannot be reached ({e}); start the vhost-user back-end first.",
            path.display()
        ))),
    }
}

fn check_kernel(path: &Path) -> Result<KernelFormat, ConfigError> {
    if !path.exists() {
        return Err(ConfigError::KernelMissing(path.into()));
    }
    let mut file =
        File::open(path).map_err(|e| ConfigError::KernelUnreadable { path: path.into(), reason: e.to_string() })?;
    detect_kernel_format(&mut file).ok_or_else(|| ConfigError::KernelFormat(path.into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    const LIMITS: HostLimits = HostLimits { kvm_max_vcpus: 1024, ram_mib: 4096, free_huge_pages: 64 };

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let path = std::env::temp_dir().join(format!("ferrovisor-config-{}-{name}", std::process::id()));
        File::create(&path).unwrap().write_all(bytes).unwrap();
        path
    }

    fn config(kernel: PathBuf) -> VmConfig {
        VmConfig {
            kernel,
            initrd: None,
            cmdline: DEFAULT_CMDLINE.into(),
            cpus: 1,
            memory_mib: 128,
            serial: SerialConfig::Stdio,
            disks: Vec::new(),
            rng: false,
            rng_rate_limit: None,
            console: None,
            nets: Vec::new(),
            balloon: None,
            vsock: None,
            pmem: Vec::new(),
            fs: Vec::new(),
            passthrough: Vec::new(),
            memory_hotplug: None,
            transport: VirtioTransport::Mmio,
            memory: MemoryOptions::default(),
            stats_on_exit: false,
            track_dirty_pages: false,
            id: None,
            output_limit: None,
            serial_rate_limit: None,
            cpu_template: None,
            static_cpu_template: None,
            mmds: None,
        }
    }

    #[test]
    fn hotplugged_memory_needs_blocks_kvm_can_slot_and_no_assigned_devices() {
        let elf = temp_file("elf-hotplug", b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        let hotplug = MemoryHotplugConfig { total_mib: 128 << 10, block_mib: 2, slot_mib: 128, requested_mib: 0 };
        let c = VmConfig { memory_hotplug: Some(hotplug), ..config(elf.clone()) };
        let e = c.validate(&LIMITS).unwrap_err().to_string();
        assert!(e.starts_with("--memory-hotplug block= is 2") && e.ends_with("give at least 8."), "{e}");
        let c = VmConfig { memory_hotplug: Some(MemoryHotplugConfig { block_mib: 8, ..hotplug }), ..c };
        assert_eq!(c.validate(&LIMITS), Ok(KernelFormat::Elf));
        let device =
            PassthroughConfig { id: "dev0".into(), backend: PassthroughBackend::VfioUser("/tmp/d.sock".into()) };
        let c = VmConfig { passthrough: vec![device], ..c };
        let e = c.validate(&LIMITS).unwrap_err().to_string();
        assert!(e.contains("cannot be combined with assigned devices (--device)"), "{e}");
        std::fs::remove_file(elf).unwrap();
    }

    #[test]
    fn each_mistake_gets_its_own_sentence() {
        let elf = temp_file("elf", b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        let text = temp_file("text", b"not a kernel at all");
        let ok = config(elf.clone());
        assert_eq!(ok.validate(&LIMITS), Ok(KernelFormat::Elf));

        let missing = config("/nonexistent/vmlinux".into());
        assert_eq!(missing.validate(&LIMITS), Err(ConfigError::KernelMissing("/nonexistent/vmlinux".into())));
        assert_eq!(config(text.clone()).validate(&LIMITS), Err(ConfigError::KernelFormat(text.clone())));

        let c = VmConfig { memory_mib: 0, ..ok.clone() };
        assert_eq!(c.validate(&LIMITS), Err(ConfigError::MemoryTooSmall { given: 0, min: 2 }));
        let c = VmConfig { memory_mib: 4097, ..ok.clone() };
        assert_eq!(c.validate(&LIMITS), Err(ConfigError::MemoryTooLarge { given: 4097, host: 4096 }));
        let c = VmConfig { cpus: 0, ..ok.clone() };
        assert_eq!(c.validate(&LIMITS), Err(ConfigError::Cpus { given: 0, max: 254 }));
        let c = VmConfig { cpus: 3, ..ok.clone() };
        assert!(c.validate(&HostLimits { kvm_max_vcpus: 2, ..LIMITS }).is_err());
        let c = VmConfig { cmdline: "x".repeat(2048), ..ok.clone() };
        assert_eq!(c.validate(&LIMITS), Err(ConfigError::CmdlineTooLong { len: 2048, max: 2047 }));
        // A snapshot's or a migration's configuration is checked as a command line is.
        let c = VmConfig { memory: MemoryOptions { dirty_ring: u32::MAX, ..Default::default() }, ..ok.clone() };
        let e = c.validate(&LIMITS).unwrap_err().to_string();
        assert!(e.starts_with("--memory dirty_ring= takes 0") && e.ends_with("not '4294967295'."), "{e}");
        let c = VmConfig { initrd: Some("/nonexistent/initrd".into()), ..ok };
        assert!(matches!(c.validate(&LIMITS), Err(ConfigError::InitrdMissing(_))));

        let message = ConfigError::Cpus { given: 0, max: 254 }.to_string();
        assert!(message.starts_with("--cpus") && message.ends_with('.'), "{message}");
        std::fs::remove_file(elf).unwrap();
        std::fs::remove_file(text).unwrap();
    }

    #[test]
    fn disks_are_checked_before_boot() {
        let elf = temp_file("elf-disk", b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        let odd = temp_file("odd.img", &[0u8; 1000]);
        let disk = |path: PathBuf, readonly| DiskConfig {
            path,
            readonly,
            id: String::new(),
            rate_limit: None,
            poll_us: None,
            cache: Default::default(),
            io_engine: Default::default(),
            vhost_user: None,
        };
        let c = VmConfig { disks: vec![disk(odd.clone(), false)], ..config(elf.clone()) };
        assert_eq!(c.validate(&LIMITS), Err(ConfigError::DiskSize { path: odd.clone(), size: 1000 }));
        let c = VmConfig { disks: vec![disk("/nonexistent/disk.img".into(), true)], ..config(elf.clone()) };
        assert!(matches!(c.validate(&LIMITS), Err(ConfigError::DiskUnusable { .. })));
        let sector = temp_file("sector.img", &[0u8; 512]);
        let c = VmConfig { disks: vec![disk(sector.clone(), false); 20], ..config(elf.clone()) };
        assert_eq!(c.validate(&LIMITS), Err(ConfigError::TooManyDevices { count: 20, max: 19 }));
        std::fs::remove_file(sector).unwrap();
        std::fs::remove_file(elf).unwrap();
        std::fs::remove_file(odd).unwrap();
    }

    #[test]
    fn balloon_is_checked_against_memory() {
        let elf = temp_file("elf-balloon", b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        let c = VmConfig { balloon: Some(parse_balloon("size=129").unwrap()), ..config(elf.clone()) };
        assert_eq!(c.validate(&LIMITS), Err(ConfigError::BalloonTooLarge { target: 129, memory: 128 }));
        std::fs::remove_file(elf).unwrap();
    }

    #[test]
    fn huge_pages_must_be_reserved_and_whole() {
        let elf = temp_file("elf-huge", b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        let huge = MemoryOptions { hugepages: HugePages::On, ..Default::default() };
        let c = VmConfig { memory: huge, memory_mib: 256, ..config(elf.clone()) };
        assert_eq!(c.validate(&LIMITS), Err(ConfigError::HugePagesShort { needed: 128, free: 64 }));
        assert!(c.validate(&LIMITS).unwrap_err().to_string().contains("/proc/sys/vm/nr_hugepages"));
        let c = VmConfig { memory: huge, memory_mib: 127, ..config(elf.clone()) };
        assert_eq!(c.validate(&LIMITS), Err(ConfigError::HugePageSize { given: 127 }));
        let c = VmConfig { memory: huge, memory_mib: 128, ..config(elf.clone()) };
        assert!(c.validate(&LIMITS).is_ok());
        std::fs::remove_file(elf).unwrap();
    }

    #[test]
    fn host_ram_is_read() {
        assert!(HostLimits::host_ram_mib() > 0);
    }
}
