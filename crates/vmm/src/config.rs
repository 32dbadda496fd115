//! What a VM is made of, and the checks that turn bad user input into one clear sentence.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use arch::boot::{KernelFormat, detect_kernel_format};
use arch::layout::CMDLINE_MAX_SIZE;
use arch::memory::MIN_MEMORY;
use arch::mptable;

/// The command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SerialConfig {
    Stdio,
    /// `--serial file:PATH`: a regular file, created or truncated.
    File(PathBuf),
    /// Firecracker's `serial_out_path`: a regular file (appended to) or a FIFO, never waited on.
    Path(PathBuf),
    None,
}

impl FromStr for SerialConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "none" => Ok(Self::None),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::File(path.into())),
                _ => Err("use stdio, file:PATH or none".to_string()),
            },
        }
    }
}

/// A virtio-blk disk: `--disk path=PATH[,readonly=on][,id=NAME]`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// What the device's GET_ID answers (at most 20 bytes).
    pub id: String,
    /// Firecracker's `rate_limiter` (set through the API or a config file).
    #[serde(default)]
    pub rate_limit: Option<virtio::rate_limiter::RateLimit>,
    /// How long the device's worker polls after work, in µs (None: the default; 0: never).
    #[serde(default)]
    pub poll_us: Option<u32>,
    /// The host's page cache for the image, or O_DIRECT (`cache=writeback|none`).
    #[serde(default)]
    pub cache: virtio::blk::CacheMode,
    /// One system call per request, or io_uring (`io_engine=sync|async`).
    #[serde(default)]
    pub io_engine: virtio::blk::IoEngine,
}

/// Splits `key=value,key=value` option lists; an error names the option.
fn key_values<'a>(option: &str, text: &'a str) -> Result<Vec<(&'a str, &'a str)>, String> {
    text.split(',')
        .map(|kv| {
            kv.split_once('=').ok_or_else(|| format!("{option} takes key=value pairs separated by commas, not '{kv}'"))
        })
        .collect()
}

fn on_off(option: &str, key: &str, value: &str) -> Result<bool, String> {
    match value {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{option} {key}= takes on or off, not '{value}'")),
    }
}

impl FromStr for DiskConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut path, mut readonly, mut id, mut poll_us) = (None, false, None, None);
        let (mut cache, mut io_engine) = (virtio::blk::CacheMode::Writeback, virtio::blk::IoEngine::Sync);
        for (key, value) in key_values("--disk", s)? {
            match key {
                "path" if !value.is_empty() => path = Some(PathBuf::from(value)),
                "readonly" => readonly = on_off("--disk", key, value)?,
                "id" if value.len() <= 20 => id = Some(value.to_string()),
                "id" => return Err(format!("--disk id= is at most 20 bytes, not {}", value.len())),
                "poll_us" => poll_us = Some(parse_poll_us("--disk", value)?),
                "cache" => {
                    cache = match value {
                        "writeback" => virtio::blk::CacheMode::Writeback,
                        "none" => virtio::blk::CacheMode::None,
                        _ => return Err(format!("--disk cache= takes writeback or none, not '{value}'")),
                    }
                }
                "io_engine" => {
                    io_engine = match value {
                        "sync" => virtio::blk::IoEngine::Sync,
                        "async" => virtio::blk::IoEngine::Async,
                        _ => return Err(format!("--disk io_engine= takes sync or async (io_uring), not '{value}'")),
                    }
                }
                _ => {
                    return Err(format!(
                        "--disk has no option '{key}'; use path=, readonly=, id=, poll_us=, cache= and io_engine="
                    ));
                }
            }
        }
        let path = path.ok_or("--disk needs path=IMAGE")?;
        let id = id.unwrap_or_else(|| {
            path.file_name().map(|n| n.to_string_lossy().chars().take(20).collect()).unwrap_or_default()
        });
        Ok(DiskConfig { path, readonly, id, rate_limit: None, poll_us, cache, io_engine })
    }
}

/// How long a disk's or network interface's worker polls after work unless told otherwise:
/// not at all, since a polling worker takes CPU that the guest's vCPUs need on a host with no
/// core to spare (`poll_us=50` where one is).
pub const DEFAULT_POLL_US: u32 = 0;

/// The most a worker may poll: beyond a millisecond polling costs more than a wake-up saves.
pub const MAX_POLL_US: u32 = 1000;

fn parse_poll_us(option: &str, value: &str) -> Result<u32, String> {
    match value.parse::<u32>() {
        Ok(n) if n <= MAX_POLL_US => Ok(n),
        _ => Err(format!("{option} poll_us= takes microseconds from 0 (no polling) to {MAX_POLL_US}, not '{value}'")),
    }
}

/// Where a virtio-net interface is plugged on the host.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum NetAttachment {
    /// A TAP device, created if absent.
    Tap(String),
    /// A port on `ferrovisor switch PATH`, in a VLAN.
    Switch { path: PathBuf, vlan: u16 },
    /// A TAP the VMM creates on a managed network's bridge; `isolated` ports cannot reach
    /// each other.
    Network { name: String, isolated: bool },
    /// User-mode networking through host sockets, with TCP ports forwarded into the guest.
    User { forwards: Vec<net::usernet::HostForward> },
}

/// A virtio-net interface: `--net tap=NAME[,mac=..]` or `--net switch=PATH[,vlan=N][,mac=..]`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetConfig {
    pub attachment: NetAttachment,
    pub mac: Option<[u8; 6]>,
    /// Firecracker's `rx_rate_limiter` and `tx_rate_limiter`.
    #[serde(default)]
    pub rx_rate_limit: Option<virtio::rate_limiter::RateLimit>,
    #[serde(default)]
    pub tx_rate_limit: Option<virtio::rate_limiter::RateLimit>,
    /// MMDS's address, when MMDS answers on this interface.
    #[serde(default)]
    pub mmds: Option<std::net::Ipv4Addr>,
    /// The API's `iface_id` (`net<N>` when there is none).
    #[serde(default)]
    pub id: Option<String>,
    /// The MTU the guest is told (VIRTIO_NET_F_MTU); none: the guest picks its own.
    #[serde(default)]
    pub mtu: Option<u16>,
    /// The port's firewall rules (`firewall=FILE|@NAME`).
    #[serde(default)]
    pub firewall: Option<net::firewall::RuleSetSpec>,
    /// The VM's address on this port, for anti-spoofing before (or without) a DHCP lease.
    #[serde(default)]
    pub ip: Option<std::net::Ipv4Addr>,
    /// How long the device's worker polls after work, in µs (None: the default; 0: never).
    #[serde(default)]
    pub poll_us: Option<u32>,
    /// Queue pairs (`queues=N`) on a TAP; None: one per vCPU, where the interface allows.
    #[serde(default)]
    pub queues: Option<u16>,
}

/// The most queue pairs a virtio-net interface offers.
pub const MAX_QUEUE_PAIRS: u16 = 16;

impl NetConfig {
    /// Whether the host side is a TAP, which alone has several queues.
    fn on_tap(&self) -> bool {
        matches!(self.attachment, NetAttachment::Tap(_) | NetAttachment::Network { .. })
    }

    /// Whether something must see the whole interface in one worker: MMDS or a rate limit.
    fn needs_one_worker(&self) -> bool {
        self.mmds.is_some() || self.rx_rate_limit.is_some() || self.tx_rate_limit.is_some()
    }

    /// The queue pairs this interface offers on a VM of `cpus` vCPUs: `queues=` or one per
    /// vCPU on a TAP; one where the interface cannot spread (a switch port, the user network,
    /// and MMDS or rate limits, which see the whole interface).
    pub fn queue_pairs(&self, cpus: u32) -> u16 {
        match self.queues {
            Some(n) => n,
            None if self.on_tap() && !self.needs_one_worker() => cpus.clamp(1, u32::from(MAX_QUEUE_PAIRS)) as u16,
            None => 1,
        }
    }

    /// What `queues=` asks that the interface cannot give, as an error naming the fix.
    pub fn check_queues(&self, index: usize) -> Result<(), String> {
        let Some(n) = self.queues.filter(|&n| n > 1) else { return Ok(()) };
        if !self.on_tap() {
            return Err(format!("net{index}: queues={n} needs a TAP (tap= or network=); use queues=1 here"));
        }
        if self.needs_one_worker() {
            return Err(format!(
                "net{index}: queues={n} cannot be combined with MMDS or rate limits, which see the whole interface; use queues=1"
            ));
        }
        Ok(())
    }

    /// The id the API knows interface `index` by: its own, or `net<index>`.
    pub fn api_id(&self, index: usize) -> String {
        self.id.clone().unwrap_or_else(|| format!("net{index}"))
    }
}

fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A unicast MAC address like 02:00:00:00:00:01; the error completes "mac= ...".
pub fn parse_unicast_mac(text: &str) -> Result<[u8; 6], String> {
    match parse_mac(text) {
        Some(m) if m[0] & 1 == 0 => Ok(m),
        Some(_) => Err(format!("{text} is a multicast address; use a unicast one")),
        None => Err(format!("takes six hex bytes like 02:00:00:00:00:01, not '{text}'")),
    }
}

/// `--net user[,hostfwd=tcp:ADDR:HPORT-:GPORT]...[,mac=..]`.
/// The options every `--net` port takes: `firewall=FILE|@NAME`, `ip=A.B.C.D` and
/// `poll_us=N`.
#[derive(Default)]
struct PortOptions {
    firewall: Option<net::firewall::RuleSetSpec>,
    ip: Option<std::net::Ipv4Addr>,
    poll_us: Option<u32>,
    queues: Option<u16>,
}

/// Takes `key` into `options` when it is one of theirs: Some(()) then.
fn port_option(key: &str, value: &str, options: &mut PortOptions) -> Result<Option<()>, String> {
    match key {
        "firewall" => options.firewall = Some(net::firewall::load(value).map_err(|e| format!("--net firewall=: {e}"))?),
        "ip" => {
            options.ip =
                Some(value.parse().map_err(|_| format!("--net ip= takes the VM's IPv4 address, not '{value}'"))?)
        }
        "poll_us" => options.poll_us = Some(parse_poll_us("--net", value)?),
        "queues" => match value.parse::<u16>() {
            Ok(n @ 1..=MAX_QUEUE_PAIRS) => options.queues = Some(n),
            _ => return Err(format!("--net queues= takes queue pairs from 1 to {MAX_QUEUE_PAIRS}, not '{value}'")),
        },
        _ => return Ok(None),
    }
    Ok(Some(()))
}

fn parse_user_net(rest: &str) -> Result<NetConfig, String> {
    let (mut forwards, mut mac, mut port) = (Vec::new(), None, PortOptions::default());
    if !rest.is_empty() {
        for (key, value) in key_values("--net user", rest)? {
            if let Some(()) = port_option(key, value, &mut port)? {
                continue;
            }
            match key {
                "hostfwd" => forwards.push(value.parse().map_err(|e| format!("--net user,{e}"))?),
                "mac" => mac = Some(parse_unicast_mac(value).map_err(|e| format!("--net mac= {e}"))?),
                _ => {
                    return Err(format!(
                        "--net user has no option '{key}'; use hostfwd=, mac=, firewall=, ip=, poll_us= and queues="
                    ));
                }
            }
        }
    }
    Ok(NetConfig {
        attachment: NetAttachment::User { forwards },
        mac,
        rx_rate_limit: None,
        tx_rate_limit: None,
        mmds: None,
        id: None,
        mtu: None,
        firewall: port.firewall,
        ip: port.ip,
        poll_us: port.poll_us,
        queues: port.queues,
    })
}

impl FromStr for NetConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(rest) = s.strip_prefix("user").filter(|r| r.is_empty() || r.starts_with(',')) {
            return parse_user_net(rest.trim_start_matches(','));
        }
        let (mut tap, mut switch, mut network, mut vlan, mut isolated, mut mac) = (None, None, None, None, None, None);
        let mut port = PortOptions::default();
        for (key, value) in key_values("--net", s)? {
            if let Some(()) = port_option(key, value, &mut port)? {
                continue;
            }
            match key {
                "tap" if !value.is_empty() && value.len() < 16 => tap = Some(value.to_string()),
                "tap" => return Err(format!("--net tap= takes an interface name of 1 to 15 bytes, not '{value}'")),
                "switch" if !value.is_empty() => switch = Some(PathBuf::from(value)),
                "network" if !value.is_empty() => network = Some(value.to_string()),
                "vlan" => match value.parse::<u16>() {
                    Ok(v) if v < 4095 => vlan = Some(v),
                    _ => return Err(format!("--net vlan= takes a VLAN number from 0 to 4094, not '{value}'")),
                },
                "isolated" => isolated = Some(on_off("--net", key, value)?),
                "mac" => mac = Some(parse_unicast_mac(value).map_err(|e| format!("--net mac= {e}"))?),
                _ => {
                    return Err(format!(
                        "--net has no option '{key}'; use tap=, switch=, vlan=, network=, isolated=, mac=, firewall=, \
                         ip=, poll_us= and queues="
                    ));
                }
            }
        }
        if vlan.is_some() && switch.is_none() {
            return Err("--net vlan= goes with switch=".into());
        }
        if isolated.is_some() && network.is_none() {
            return Err("--net isolated= goes with network=".into());
        }
        let attachment = match (tap, switch, network) {
            (Some(tap), None, None) => NetAttachment::Tap(tap),
            (None, Some(path), None) => NetAttachment::Switch { path, vlan: vlan.unwrap_or(0) },
            (None, None, Some(name)) => {
                net::network::check_name(&name).map_err(|e| format!("--net network=: {e}"))?;
                NetAttachment::Network { name, isolated: isolated.unwrap_or(false) }
            }
            (None, None, None) => return Err("--net needs tap=NAME, switch=PATH or network=NAME".into()),
            _ => return Err("--net takes one of tap=, switch= and network=".into()),
        };
        Ok(NetConfig {
            attachment,
            mac,
            rx_rate_limit: None,
            tx_rate_limit: None,
            mmds: None,
            id: None,
            mtu: None,
            firewall: port.firewall,
            ip: port.ip,
            poll_us: port.poll_us,
            queues: port.queues,
        })
    }
}

/// `--balloon size=MiB[,deflate_on_oom=on][,stats=on|off|SECONDS][,free_page_reporting=on]
/// [,free_page_hinting=on]`.
pub fn parse_balloon(s: &str) -> Result<virtio::balloon::BalloonOptions, String> {
    let mut options = virtio::balloon::BalloonOptions::default();
    let mut size = None;
    for (key, value) in key_values("--balloon", s)? {
        match key {
            "size" => {
                size = Some(
                    value
                        .parse::<u32>()
                        .map_err(|_| format!("--balloon size= takes MiB as a number, not '{value}'"))?,
                )
            }
            "deflate_on_oom" => options.deflate_on_oom = on_off("--balloon", key, value)?,
            "stats" => {
                options.stats_interval_s = match value {
                    "on" => 1,
                    "off" => 0,
                    _ => value.parse().map_err(|_| {
                        format!("--balloon stats= takes on, off or a polling interval in seconds, not '{value}'")
                    })?,
                }
            }
            "free_page_reporting" => options.free_page_reporting = on_off("--balloon", key, value)?,
            "free_page_hinting" => options.free_page_hinting = on_off("--balloon", key, value)?,
            _ => {
                return Err(format!(
                    "--balloon has no option '{key}'; use size=, deflate_on_oom=, stats=, free_page_reporting= and \
                     free_page_hinting="
                ));
            }
        }
    }
    options.target_mib = size.ok_or("--balloon needs size=MiB (0 for an empty balloon)")?;
    Ok(options)
}

/// `--vsock cid=N,uds=PATH`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockConfig {
    pub cid: u64,
    pub uds: PathBuf,
}

impl FromStr for VsockConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut cid, mut uds) = (None, None);
        for (key, value) in key_values("--vsock", s)? {
            match key {
                "cid" => match value.parse::<u64>() {
                    Ok(n) if (3..=u64::from(u32::MAX)).contains(&n) => cid = Some(n),
                    _ => return Err(format!("--vsock cid= takes a number from 3 to 4294967295, not '{value}'")),
                },
                "uds" if !value.is_empty() => uds = Some(PathBuf::from(value)),
                _ => return Err(format!("--vsock has no option '{key}'; use cid= and uds=")),
            }
        }
        Ok(VsockConfig { cid: cid.ok_or("--vsock needs cid=N")?, uds: uds.ok_or("--vsock needs uds=PATH")? })
    }
}

/// `--pmem path=FILE[,readonly=on]`: a file as persistent memory (virtio-pmem).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PmemConfig {
    pub path: PathBuf,
    pub readonly: bool,
    /// The API's id for it (`pmem<N>` from the command line).
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub rate_limit: Option<virtio::rate_limiter::RateLimit>,
}

impl PmemConfig {
    /// The id the API knows device `index` by: its own, or `pmem<index>`.
    pub fn api_id(&self, index: usize) -> String {
        match self.id.is_empty() {
            true => format!("pmem{index}"),
            false => self.id.clone(),
        }
    }
}

impl FromStr for PmemConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut path, mut readonly) = (None, false);
        for (key, value) in key_values("--pmem", s)? {
            match key {
                "path" if !value.is_empty() => path = Some(PathBuf::from(value)),
                "readonly" => readonly = on_off("--pmem", key, value)?,
                _ => return Err(format!("--pmem has no option '{key}'; use path= and readonly=")),
            }
        }
        Ok(PmemConfig { path: path.ok_or("--pmem needs path=FILE")?, readonly, id: String::new(), rate_limit: None })
    }
}

/// An assigned PCI device: `--device vfio=/sys/bus/pci/devices/DDDD:BB:DD.F[,id=ID]` (kernel
/// VFIO) or `--device vfio-user=SOCKET[,id=ID]` (a device served by another process).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PassthroughConfig {
    /// The API's id for it (`dev<N>` from the command line).
    #[serde(default)]
    pub id: String,
    pub backend: PassthroughBackend,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PassthroughBackend {
    /// A host device bound to vfio-pci, by its sysfs directory.
    Vfio(PathBuf),
    /// A vfio-user server's socket.
    VfioUser(PathBuf),
}

impl PassthroughConfig {
    /// The id the API knows device `index` by: its own, or `dev<index>`.
    pub fn api_id(&self, index: usize) -> String {
        match self.id.is_empty() {
            true => format!("dev{index}"),
            false => self.id.clone(),
        }
    }
}

impl FromStr for PassthroughConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut backend, mut id) = (None, String::new());
        for (key, value) in key_values("--device", s)? {
            match key {
                "vfio" if !value.is_empty() => backend = Some(PassthroughBackend::Vfio(PathBuf::from(value))),
                "vfio-user" if !value.is_empty() => backend = Some(PassthroughBackend::VfioUser(PathBuf::from(value))),
                "id" if !value.is_empty() => id = value.to_string(),
                _ => {
                    return Err(format!(
                        "--device has no option '{key}' (or it is empty); use vfio=, vfio-user= and id="
                    ));
                }
            }
        }
        let backend = backend.ok_or("--device needs vfio=/sys/bus/pci/devices/DDDD:BB:DD.F or vfio-user=SOCKET")?;
        Ok(PassthroughConfig { id, backend })
    }
}

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

/// `--memory MiB` or `--memory size=MiB[,hugepages=off|on|thp][,mergeable=on][,shared=on][,prefault=on]`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MemoryOptions {
    pub hugepages: HugePages,
    /// MADV_MERGEABLE: KSM may merge identical pages.
    pub mergeable: bool,
    /// Backed by a memfd mapped shared, rather than private anonymous memory.
    pub shared: bool,
    /// Touched at start, so that the guest never waits for a page fault.
    pub prefault: bool,
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
                _ => {
                    return Err(format!(
                        "--memory has no option '{key}'; use size=, hugepages=, mergeable=, shared= and prefault="
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

/// How virtio devices reach the guest: `--virtio-transport mmio|pci`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum VirtioTransport {
    /// virtio-mmio windows announced on the kernel command line.
    #[default]
    Mmio,
    /// virtio-pci functions on a PCI root, with MSI-X.
    Pci,
}

impl FromStr for VirtioTransport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mmio" => Ok(Self::Mmio),
            "pci" => Ok(Self::Pci),
            _ => Err("use mmio or pci".to_string()),
        }
    }
}

/// Where the virtio console goes: `--console stdio|file:PATH|pty`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum ConsoleConfig {
    Stdio,
    File(PathBuf),
    Pty,
}

impl FromStr for ConsoleConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(Self::Stdio),
            "pty" => Ok(Self::Pty),
            _ => match s.strip_prefix("file:") {
                Some(path) if !path.is_empty() => Ok(Self::File(path.into())),
                _ => Err("use stdio, file:PATH or pty".to_string()),
            },
        }
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

/// A custom CPU template in arch's terms; the error names the field and the fix.
pub fn cpu_template(c: &api::models::CpuConfig) -> Result<arch::cpu_template::CpuTemplate, String> {
    use arch::cpu_template::{Bitmap, CpuTemplate, CpuidModifier, MsrModifier, Register, parse_number};
    if !c.vcpu_features.is_empty() || !c.reg_modifiers.is_empty() {
        return Err("cpu-config vcpu_features and reg_modifiers are for aarch64 hosts; this one is x86_64".into());
    }
    let number32 = |field: &str, text: &str| {
        parse_number(text)
            .and_then(|n| u32::try_from(n).map_err(|_| format!("{text} is more than 32 bits")))
            .map_err(|e| format!("cpu-config {field}: {e}"))
    };
    let mut template = CpuTemplate::default();
    for leaf in &c.cpuid_modifiers {
        let (number, subleaf) =
            (number32("cpuid_modifiers leaf", &leaf.leaf)?, number32("cpuid_modifiers subleaf", &leaf.subleaf)?);
        for m in &leaf.modifiers {
            template.cpuid.push(CpuidModifier {
                leaf: number,
                subleaf,
                register: Register::parse(&m.register).map_err(|e| format!("cpu-config cpuid_modifiers: {e}"))?,
                bitmap: Bitmap::parse(&m.bitmap, 32).map_err(|e| format!("cpu-config cpuid_modifiers: {e}"))?,
            });
        }
    }
    for m in &c.msr_modifiers {
        template.msrs.push(MsrModifier {
            addr: number32("msr_modifiers addr", &m.addr)?,
            bitmap: Bitmap::parse(&m.bitmap, 64).map_err(|e| format!("cpu-config msr_modifiers: {e}"))?,
        });
    }
    for cap in &c.kvm_capabilities {
        // "!N" removes capability N from the checks; Ferrovisor checks none by default.
        if let Some(removed) = cap.strip_prefix('!') {
            number32("kvm_capabilities", removed)?;
        } else {
            template.required_capabilities.push(number32("kvm_capabilities", cap)?);
        }
    }
    Ok(template)
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
    #[error("--disk {path} cannot be opened{mode} ({reason}); check the path and its permissions.")]
    DiskUnusable { path: PathBuf, mode: &'static str, reason: String },
    #[error("--disk {path} is {size} bytes, not a whole number of 512-byte sectors; resize the image.")]
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
        let min = MIN_MEMORY >> 20;
        if self.memory_mib < min {
            return Err(ConfigError::MemoryTooSmall { given: self.memory_mib, min });
        }
        if self.memory_mib > limits.ram_mib {
            return Err(ConfigError::MemoryTooLarge { given: self.memory_mib, host: limits.ram_mib });
        }
        if let Some(h) = &self.memory_hotplug {
            h.check().map_err(|(field, problem)| ConfigError::Hotplug(format!("{}= {problem}", field.key())))?;
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
        if self.cpus == 0 || self.cpus > limits.max_cpus() {
            return Err(ConfigError::Cpus { given: self.cpus, max: limits.max_cpus() });
        }
        for disk in &self.disks {
            check_disk(disk)?;
        }
        for (i, nic) in self.nets.iter().enumerate() {
            nic.check_queues(i).map_err(ConfigError::Queues)?;
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

fn check_disk(disk: &DiskConfig) -> Result<(), ConfigError> {
    sandbox::files::check_drive(&disk.path, "--disk path").map_err(ConfigError::DiskKind)?;
    let open = std::fs::OpenOptions::new().read(true).write(!disk.readonly).open(&disk.path);
    let file = open.map_err(|e| ConfigError::DiskUnusable {
        path: disk.path.clone(),
        mode: if disk.readonly { "" } else { " for writing (or pass readonly=on)" },
        reason: e.to_string(),
    })?;
    let size = file.metadata().map(|m| m.len()).unwrap_or(0);
    if !size.is_multiple_of(512) {
        return Err(ConfigError::DiskSize { path: disk.path.clone(), size });
    }
    Ok(())
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
        let c = VmConfig { initrd: Some("/nonexistent/initrd".into()), ..ok };
        assert!(matches!(c.validate(&LIMITS), Err(ConfigError::InitrdMissing(_))));

        let message = ConfigError::Cpus { given: 0, max: 254 }.to_string();
        assert!(message.starts_with("--cpus") && message.ends_with('.'), "{message}");
        std::fs::remove_file(elf).unwrap();
        std::fs::remove_file(text).unwrap();
    }

    #[test]
    fn disk_option_parses_and_names_its_mistakes() {
        let d: DiskConfig = "path=/tmp/a.img,readonly=on,id=root".parse().unwrap();
        assert_eq!(
            d,
            DiskConfig {
                path: "/tmp/a.img".into(),
                readonly: true,
                id: "root".into(),
                rate_limit: None,
                poll_us: None,
                cache: virtio::blk::CacheMode::Writeback,
                io_engine: virtio::blk::IoEngine::Sync,
            }
        );
        let d: DiskConfig = "path=/images/rootfs.ext4".parse().unwrap();
        assert_eq!((d.readonly, d.id.as_str()), (false, "rootfs.ext4"));
        assert_eq!("readonly=on".parse::<DiskConfig>().unwrap_err(), "--disk needs path=IMAGE");
        assert!("path=/x,readonly=yes".parse::<DiskConfig>().unwrap_err().contains("readonly= takes on or off"));
        assert!("path=/x,cache=off".parse::<DiskConfig>().unwrap_err().contains("cache= takes writeback or none"));
        assert!(
            "path=/x,io_engine=uring".parse::<DiskConfig>().unwrap_err().contains("io_engine= takes sync or async")
        );
        assert!("path=/x,aio=native".parse::<DiskConfig>().unwrap_err().contains("no option 'aio'"));
        let d: DiskConfig = "path=/x,cache=none,io_engine=async".parse().unwrap();
        assert_eq!((d.cache, d.io_engine), (virtio::blk::CacheMode::None, virtio::blk::IoEngine::Async));
        assert!("/x".parse::<DiskConfig>().unwrap_err().contains("key=value"));
        assert!("path=/x,id=123456789012345678901".parse::<DiskConfig>().unwrap_err().contains("at most 20"));
        assert_eq!("path=/x,poll_us=0".parse::<DiskConfig>().unwrap().poll_us, Some(0));
        for bad in ["path=/x,poll_us=1001", "path=/x,poll_us=-1", "path=/x,poll_us=fast"] {
            assert!(bad.parse::<DiskConfig>().unwrap_err().contains("poll_us= takes microseconds from 0"), "{bad}");
        }
        assert!("tap=fv0,poll_us=x".parse::<NetConfig>().unwrap_err().contains("--net poll_us= takes microseconds"));
        assert_eq!("user,poll_us=20".parse::<NetConfig>().unwrap().poll_us, Some(20));
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
    fn net_option_parses_and_names_its_mistakes() {
        let n: NetConfig = "tap=fv0,mac=02:00:00:aa:bb:cc".parse().unwrap();
        assert_eq!(
            n,
            NetConfig {
                attachment: NetAttachment::Tap("fv0".into()),
                mac: Some([2, 0, 0, 0xaa, 0xbb, 0xcc]),
                rx_rate_limit: None,
                tx_rate_limit: None,
                mmds: None,
                id: None,
                mtu: None,
                firewall: None,
                ip: None,
                poll_us: None,
                queues: None,
            }
        );
        assert_eq!("tap=fv0".parse::<NetConfig>().unwrap().mac, None);
        assert_eq!(
            "mac=02:00:00:00:00:01".parse::<NetConfig>().unwrap_err(),
            "--net needs tap=NAME, switch=PATH or network=NAME"
        );
        let n: NetConfig = "network=lab,isolated=on".parse().unwrap();
        assert_eq!(n.attachment, NetAttachment::Network { name: "lab".into(), isolated: true });
        assert!("tap=x,isolated=on".parse::<NetConfig>().unwrap_err().contains("isolated= goes with network="));
        let u: NetConfig = "user,hostfwd=tcp:127.0.0.1:2222-:22".parse().unwrap();
        assert!(matches!(&u.attachment, NetAttachment::User { forwards } if forwards[0].guest_port == 22));
        assert!("user,hostfwd=tcp:1".parse::<NetConfig>().unwrap_err().starts_with("--net user,hostfwd takes"));
        assert!(matches!("user".parse::<NetConfig>().unwrap().attachment, NetAttachment::User { .. }));
        let sw: NetConfig = "switch=/tmp/sw.sock,vlan=7".parse().unwrap();
        assert_eq!(sw.attachment, NetAttachment::Switch { path: "/tmp/sw.sock".into(), vlan: 7 });
        assert!("tap=a,switch=/x".parse::<NetConfig>().unwrap_err().contains("one of tap=, switch= and network="));
        assert!("tap=a,vlan=3".parse::<NetConfig>().unwrap_err().contains("goes with switch="));
        assert!("switch=/x,vlan=5000".parse::<NetConfig>().unwrap_err().contains("0 to 4094"));
        assert!("tap=fv0,mac=01:00:00:00:00:01".parse::<NetConfig>().unwrap_err().contains("multicast"));
        assert!("tap=fv0,mac=02:00:00:00:00".parse::<NetConfig>().unwrap_err().contains("six hex bytes"));
        assert!("tap=fv0,mac=02:00:00:00:00:01:02".parse::<NetConfig>().unwrap_err().contains("six hex bytes"));
        assert!("tap=a-very-long-tap-name".parse::<NetConfig>().unwrap_err().contains("1 to 15 bytes"));
        assert!("tap=fv0,vhost=on".parse::<NetConfig>().unwrap_err().contains("no option 'vhost'"));
        assert_eq!("tap=fv0,queues=4".parse::<NetConfig>().unwrap().queues, Some(4));
        for bad in ["tap=fv0,queues=0", "tap=fv0,queues=17", "tap=fv0,queues=many"] {
            assert!(bad.parse::<NetConfig>().unwrap_err().contains("queues= takes queue pairs from 1 to 16"), "{bad}");
        }
    }

    #[test]
    fn queue_pairs_follow_the_vcpus_where_the_interface_can_spread() {
        let tap: NetConfig = "tap=fv0".parse().unwrap();
        assert_eq!((tap.queue_pairs(1), tap.queue_pairs(4), tap.queue_pairs(64)), (1, 4, MAX_QUEUE_PAIRS));
        let mmds = NetConfig { mmds: Some(net::mmds::DEFAULT_IPV4), ..tap.clone() };
        assert_eq!(mmds.queue_pairs(4), 1, "MMDS answers one interface-wide stack");
        let switch: NetConfig = "switch=/x".parse().unwrap();
        assert_eq!(switch.queue_pairs(4), 1);
        let asked: NetConfig = "tap=fv0,queues=3".parse().unwrap();
        assert_eq!(asked.queue_pairs(1), 3);
        assert!(asked.check_queues(0).is_ok());
        let limited = NetConfig { mmds: Some(net::mmds::DEFAULT_IPV4), ..asked };
        assert!(limited.check_queues(2).unwrap_err().starts_with("net2: queues=3 cannot be combined with MMDS"));
        let on_switch: NetConfig = "switch=/x,queues=2".parse().unwrap();
        assert!(on_switch.check_queues(0).unwrap_err().contains("needs a TAP"));
    }

    #[test]
    fn balloon_option_parses_and_is_checked_against_memory() {
        let b = parse_balloon("size=64,stats=on,free_page_reporting=on").unwrap();
        assert_eq!((b.target_mib, b.stats_interval_s, b.free_page_reporting, b.deflate_on_oom), (64, 1, true, false));
        assert!(parse_balloon("stats=on").unwrap_err().contains("needs size="));
        assert!(parse_balloon("size=lots").unwrap_err().contains("number"));
        assert!(parse_balloon("size=1,hints=on").unwrap_err().contains("no option 'hints'"));
        let elf = temp_file("elf-balloon", b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        let c = VmConfig { balloon: Some(parse_balloon("size=129").unwrap()), ..config(elf.clone()) };
        assert_eq!(c.validate(&LIMITS), Err(ConfigError::BalloonTooLarge { target: 129, memory: 128 }));
        std::fs::remove_file(elf).unwrap();
    }

    #[test]
    fn vsock_option_parses() {
        assert_eq!("cid=3,uds=/tmp/v.sock".parse(), Ok(VsockConfig { cid: 3, uds: "/tmp/v.sock".into() }));
        assert!("cid=2,uds=/x".parse::<VsockConfig>().unwrap_err().contains("from 3"));
        assert!("uds=/x".parse::<VsockConfig>().unwrap_err().contains("needs cid="));
        assert!("cid=9".parse::<VsockConfig>().unwrap_err().contains("needs uds="));
    }

    #[test]
    fn memory_option_takes_a_size_or_a_list() {
        assert_eq!("256".parse(), Ok(MemorySpec { size_mib: 256, options: MemoryOptions::default() }));
        let m: MemorySpec = "size=128,hugepages=thp,mergeable=on,shared=on,prefault=on".parse().unwrap();
        assert_eq!(m.size_mib, 128);
        assert_eq!(
            m.options,
            MemoryOptions { hugepages: HugePages::Thp, mergeable: true, shared: true, prefault: true }
        );
        assert!("size=1,hugepages=1g".parse::<MemorySpec>().unwrap_err().contains("off, on or thp"));
        assert!("mergeable=on".parse::<MemorySpec>().unwrap_err().contains("needs a size"));
        assert!("size=1,balloon=on".parse::<MemorySpec>().unwrap_err().contains("no option 'balloon'"));
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
    fn console_option_parses() {
        assert_eq!("pty".parse(), Ok(ConsoleConfig::Pty));
        assert_eq!("stdio".parse(), Ok(ConsoleConfig::Stdio));
        assert_eq!("file:/tmp/c".parse(), Ok(ConsoleConfig::File("/tmp/c".into())));
        assert!("tty".parse::<ConsoleConfig>().unwrap_err().contains("pty"));
    }

    #[test]
    fn serial_option_parses() {
        assert_eq!("stdio".parse(), Ok(SerialConfig::Stdio));
        assert_eq!("none".parse(), Ok(SerialConfig::None));
        assert_eq!("file:/tmp/x".parse(), Ok(SerialConfig::File("/tmp/x".into())));
        assert!("file:".parse::<SerialConfig>().is_err());
        assert!("tcp:1234".parse::<SerialConfig>().unwrap_err().contains("file:PATH"));
    }

    #[test]
    fn host_ram_is_read() {
        assert!(HostLimits::host_ram_mib() > 0);
    }
}
