//! Request and response bodies, with Firecracker's field names (its swagger definition is the
//! interface). Unknown fields are refused: a typo must not be silently ignored.

use serde::{Deserialize, Serialize};

/// One token bucket of a `rate_limiter`: `size` tokens (bytes or operations) refilled every
/// `refill_time` milliseconds, `one_time_burst` extra at first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    pub refill_time: u64,
}

/// Firecracker's `rate_limiter`: a bandwidth bucket (bytes) and an ops bucket, each optional.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// `PUT /boot-source`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    #[default]
    None,
    #[serde(rename = "2M")]
    TwoMiB,
}

/// `PUT|GET /machine-config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    pub vcpu_count: u8,
    pub mem_size_mib: u32,
    #[serde(default)]
    pub smt: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub huge_pages: HugePages,
    /// Accepted only as null or absent: Ferrovisor has no CPU templates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<serde_json::Value>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
            cpu_template: None,
        }
    }
}

/// `PATCH /machine-config`: any subset.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    pub vcpu_count: Option<u8>,
    pub mem_size_mib: Option<u32>,
    pub smt: Option<bool>,
    pub track_dirty_pages: Option<bool>,
    pub huge_pages: Option<HugePages>,
    pub cpu_template: Option<serde_json::Value>,
}

/// `PUT /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    pub drive_id: String,
    pub is_root_device: bool,
    pub path_on_host: Option<String>,
    #[serde(default)]
    pub is_read_only: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PATCH /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    pub drive_id: String,
    pub path_on_host: Option<String>,
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Told to the guest (VIRTIO_NET_F_MTU), 68 to 65535.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
    /// Ferrovisor's extra: a vhost-user back-end's socket serves the interface (host_dev_name
    /// is then left empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vhost_user_socket: Option<String>,
}

/// `PUT /ferrovisor/fs/{tag}`: a directory shared with the guest through virtio-fs, served by
/// a vhost-user back-end such as virtiofsd.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FsDevice {
    /// What the guest mounts (`mount -t virtiofs TAG`), 1 to 36 bytes.
    pub tag: String,
    /// Where the back-end listens.
    pub socket: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
}

/// `PATCH /network-interfaces/{iface_id}`: the rate limiters of a running VM's interface; a
/// limiter left out stays as it is.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    pub iface_id: String,
    pub rx_rate_limiter: Option<RateLimiter>,
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /serial`: where the serial console's output goes (default: the VMM's stdout) and a
/// byte budget for it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Serial {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<TokenBucket>,
}

/// `PUT /cpu-config`: a custom CPU template in Firecracker's format. `vcpu_features` and
/// `reg_modifiers` are for aarch64 hosts.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuConfig {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kvm_capabilities: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub msr_modifiers: Vec<MsrModifier>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpu_features: Vec<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reg_modifiers: Vec<serde_json::Value>,
}

/// One CPUID leaf and subleaf of a custom CPU template, with its register modifiers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidLeafModifier {
    pub leaf: String,
    pub subleaf: String,
    #[serde(default)]
    pub flags: u32,
    pub modifiers: Vec<CpuidRegisterModifier>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidRegisterModifier {
    pub register: String,
    pub bitmap: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrModifier {
    pub addr: String,
    pub bitmap: String,
}

/// `PUT /mmds/config`: which interfaces reach MMDS, at which address, in which version.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmdsConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<MmdsVersion>,
    pub network_interfaces: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ipv4_address: Option<String>,
    #[serde(default)]
    pub imds_compat: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MmdsVersion {
    V1,
    V2,
}

/// `PUT /pmem/{id}`: a host file as persistent memory (virtio-pmem).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pmem {
    pub id: String,
    pub path_on_host: String,
    #[serde(default)]
    pub root_device: bool,
    #[serde(default)]
    pub read_only: bool,
    /// Paces flush requests (one op each; flushes carry no bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /ferrovisor/devices/{id}` (Ferrovisor's extra): an assigned PCI device, given by
/// exactly one of `vfio` (a host device's sysfs directory) and `vfio_user` (a server's socket).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassthroughDevice {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfio: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vfio_user: Option<String>,
}

/// `PATCH /pmem/{id}`: the rate limiter of a running VM's pmem device; left out, it stays.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialPmem {
    pub id: String,
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /hotplug/memory`: hotpluggable memory (virtio-mem), in MiB.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugConfig {
    pub total_size_mib: u64,
    #[serde(default = "default_slot_size_mib")]
    pub slot_size_mib: u64,
    #[serde(default = "default_block_size_mib")]
    pub block_size_mib: u64,
}

fn default_slot_size_mib() -> u64 {
    128
}

fn default_block_size_mib() -> u64 {
    2
}

/// `PATCH /hotplug/memory`: how much of it the guest should plug.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryHotplugSizeUpdate {
    pub requested_size_mib: u64,
}

/// `GET /hotplug/memory`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryHotplugStatus {
    pub total_size_mib: u64,
    pub slot_size_mib: u64,
    pub block_size_mib: u64,
    pub plugged_size_mib: u64,
    pub requested_size_mib: u64,
}

/// `PUT /vsock`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT|GET /balloon`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    pub amount_mib: u32,
    pub deflate_on_oom: bool,
    #[serde(default)]
    pub stats_polling_interval_s: u32,
    #[serde(default)]
    pub free_page_reporting: bool,
    #[serde(default)]
    pub free_page_hinting: bool,
}

/// `PATCH /balloon/hinting/start`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonHintingStart {
    /// Answer the guest's end of a run with DONE at once (default), so it reuses its pages.
    #[serde(default = "yes")]
    pub acknowledge_on_stop: bool,
}

fn yes() -> bool {
    true
}

/// A body that may only be `{}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NoFields {}

/// `GET /balloon/hinting/status`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct BalloonHintingStatus {
    pub host_cmd: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guest_cmd: Option<u32>,
}

/// `PATCH /balloon`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    pub stats_polling_interval_s: u32,
}

/// `GET /balloon/statistics`: the guest's latest numbers (absent until it sent them).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    pub target_pages: u32,
    pub actual_pages: u32,
    pub target_mib: u32,
    pub actual_mib: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_in: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_out: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub major_faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minor_faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub free_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub available_memory: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disk_caches: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_allocations: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hugetlb_failures: Option<u64>,
}

impl BalloonStats {
    /// Files one (tag, value) pair of the virtio-balloon statistics (virtio 1.2, 5.5.6.3).
    pub fn set_tag(&mut self, tag: u16, value: u64) {
        let slot = match tag {
            0 => &mut self.swap_in,
            1 => &mut self.swap_out,
            2 => &mut self.major_faults,
            3 => &mut self.minor_faults,
            4 => &mut self.free_memory,
            5 => &mut self.total_memory,
            6 => &mut self.available_memory,
            7 => &mut self.disk_caches,
            8 => &mut self.hugetlb_allocations,
            9 => &mut self.hugetlb_failures,
            _ => return,
        };
        *slot = Some(value);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PUT /actions`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceAction {
    pub action_type: ActionType,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStateChange {
    Paused,
    Resumed,
}

/// `PATCH /vm`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    pub state: VmStateChange,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    #[default]
    Full,
    Diff,
}

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    pub snapshot_path: String,
    pub mem_file_path: String,
    #[serde(default)]
    pub snapshot_type: SnapshotType,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum MemBackendType {
    File,
    Uffd,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    pub backend_type: MemBackendType,
    pub backend_path: String,
}

/// `PUT /ferrovisor/migration/receive`: wait for a VM on `receiver_url` (`unix:PATH`,
/// `tcp:HOST:PORT` or `tls:HOST:PORT`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationReceive {
    pub receiver_url: String,
    /// For a `tls:` URL: this VMM's certificate and key, and the CA the source's certificate
    /// must chain to (PEM files).
    #[serde(default)]
    pub tls_cert: Option<String>,
    #[serde(default)]
    pub tls_key: Option<String>,
    #[serde(default)]
    pub tls_ca: Option<String>,
    /// Other TAPs for the arriving VM's interfaces, as `/snapshot/load` takes them.
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// Another socket for the arriving VM's vsock device.
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    /// Other images for the arriving VM's drives (the same disk's content, seen from here).
    #[serde(default)]
    pub drive_overrides: Vec<DriveOverride>,
}

/// A drive of a VM arriving from a migration, on another path here.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    pub drive_id: String,
    pub path_on_host: String,
}

/// `PUT /ferrovisor/migration/send`: move the running VM to `destination_url`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrationSend {
    pub destination_url: String,
    /// The pause the guest may see at the switch-over (default 300).
    pub downtime_ms: Option<u64>,
    /// Give up (or, with `timeout_action` "switch", switch over at once) after this long.
    pub timeout_s: Option<u64>,
    /// "cancel" (default) or "switch".
    pub timeout_action: Option<String>,
    /// The most rounds of dirty pages before the switch-over (default 30).
    pub max_rounds: Option<u32>,
    /// Same host, over a Unix socket: hand over guest memory's file and the TAPs' fds rather
    /// than copy pages (Cloud Hypervisor's `local`); needs shared guest memory.
    #[serde(default)]
    pub local: bool,
    /// Switch over once `max_rounds` are done (or the target is met) without the last pages:
    /// the destination runs the VM and fetches them as it touches them.
    #[serde(default)]
    pub postcopy: bool,
    /// Pages go over this many connections at once (1 to 16, default 1; Cloud Hypervisor's
    /// `connections`).
    #[serde(default)]
    pub connections: Option<u32>,
    /// For a `tls:` URL: this VMM's certificate and key, and the CA the destination's
    /// certificate must chain to (PEM files).
    #[serde(default)]
    pub tls_cert: Option<String>,
    #[serde(default)]
    pub tls_key: Option<String>,
    #[serde(default)]
    pub tls_ca: Option<String>,
}

/// `PUT /snapshot/load`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoad {
    pub snapshot_path: String,
    pub mem_file_path: Option<String>,
    pub mem_backend: Option<MemBackend>,
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    #[serde(default)]
    pub track_dirty_pages: bool,
    #[serde(default)]
    pub resume_vm: bool,
    /// Other TAPs for the snapshot's interfaces.
    #[serde(default)]
    pub network_overrides: Vec<NetworkOverride>,
    /// Another socket for the snapshot's vsock device.
    #[serde(default)]
    pub vsock_override: Option<VsockOverride>,
    /// Advance the guest's kvmclock by the wall-clock time since the snapshot.
    #[serde(default)]
    pub clock_realtime: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    pub uds_path: String,
}

/// `PUT /logger`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    pub log_path: Option<String>,
    pub level: Option<LogLevel>,
    pub show_level: Option<bool>,
    pub show_log_origin: Option<bool>,
    pub module: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum LogLevel {
    Off,
    Error,
    Warning,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The level's name in `tracing`'s filter syntax.
    pub fn filter(self) -> &'static str {
        match self {
            LogLevel::Off => "off",
            LogLevel::Error => "error",
            LogLevel::Warning => "warn",
            LogLevel::Info => "info",
            LogLevel::Debug => "debug",
            LogLevel::Trace => "trace",
        }
    }
}

/// `PUT /metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    pub metrics_path: String,
}

/// `PUT /entropy`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entropy {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /ferrovisor/memory`: Ferrovisor's memory options beyond `machine-config`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryOptions {
    /// "off", "on" (hugetlbfs) or "thp".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hugepages: Option<String>,
    #[serde(default)]
    pub mergeable: bool,
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub prefault: bool,
    /// Pages a vCPU in KVM's dirty rings; 0 for its dirty bitmap.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dirty_ring: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// `GET /`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    /// "Not started", "Running" or "Paused".
    pub state: String,
    pub vmm_version: String,
    pub app_name: String,
}

/// A Firecracker configuration file (`--config-file`), also what `GET /vm/config` returns.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfigFile {
    #[serde(rename = "boot-source", default, skip_serializing_if = "Option::is_none")]
    pub boot_source: Option<BootSource>,
    #[serde(rename = "machine-config", default, skip_serializing_if = "Option::is_none")]
    pub machine_config: Option<MachineConfig>,
    #[serde(default)]
    pub drives: Vec<Drive>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pmem: Vec<Pmem>,
    #[serde(rename = "memory-hotplug", default, skip_serializing_if = "Option::is_none")]
    pub memory_hotplug: Option<MemoryHotplugConfig>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<Balloon>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<Entropy>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<Serial>,
    #[serde(default, skip_serializing)]
    pub logger: Option<Logger>,
    #[serde(default, skip_serializing)]
    pub metrics: Option<Metrics>,
    #[serde(rename = "mmds-config", default, skip_serializing_if = "Option::is_none")]
    pub mmds_config: Option<MmdsConfig>,
    /// Ferrovisor's extra: memory options.
    #[serde(rename = "ferrovisor-memory", default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<MemoryOptions>,
    /// Ferrovisor's extra: assigned PCI devices.
    #[serde(rename = "ferrovisor-devices", default, skip_serializing_if = "Vec::is_empty")]
    pub devices: Vec<PassthroughDevice>,
    /// Ferrovisor's extra: virtio-fs shares.
    #[serde(rename = "ferrovisor-fs", default, skip_serializing_if = "Vec::is_empty")]
    pub fs: Vec<FsDevice>,
    /// Ferrovisor's extra: firewall rules by interface ID.
    #[serde(rename = "ferrovisor-firewall", default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub firewall: std::collections::BTreeMap<String, net::firewall::RuleSetSpec>,
}
