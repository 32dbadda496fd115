//! virtio-blk disks: `--disk` and what a drive becomes.

use std::path::PathBuf;
use std::str::FromStr;

use super::{ConfigError, key_values, on_off};

/// A virtio-blk disk: `--disk path=PATH[,readonly=on][,id=NAME]`, or one a vhost-user back-end
/// serves: `--disk vhost_user=SOCKET[,num_queues=N][,queue_size=N][,id=NAME]`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DiskConfig {
    /// The image (empty for a vhost-user disk).
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
    /// Served by a vhost-user back-end rather than from an image.
    #[serde(default)]
    pub vhost_user: Option<VhostUserOptions>,
}

/// A device a vhost-user back-end serves: its socket and the queues the VMM sets up.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VhostUserOptions {
    pub socket: PathBuf,
    /// Request queues (a disk's or a file system's); the back-end may serve fewer.
    pub num_queues: u16,
    pub queue_size: u16,
}

impl VhostUserOptions {
    pub const DEFAULT_QUEUE_SIZE: u16 = 256;
    pub const MAX_QUEUES: u16 = 16;

    pub fn new(socket: PathBuf) -> Self {
        VhostUserOptions { socket, num_queues: 1, queue_size: Self::DEFAULT_QUEUE_SIZE }
    }

    /// Takes `num_queues=` or `queue_size=` of option `option`; false for another key.
    pub(crate) fn parse_key(
        options: &mut Option<VhostUserOptions>,
        option: &str,
        key: &str,
        value: &str,
    ) -> Result<bool, String> {
        if key != "num_queues" && key != "queue_size" {
            return Ok(false);
        }
        let target = options.get_or_insert_with(|| VhostUserOptions::new(PathBuf::new()));
        match key {
            "num_queues" => match value.parse::<u16>() {
                Ok(n) if (1..=Self::MAX_QUEUES).contains(&n) => target.num_queues = n,
                _ => return Err(format!("{option} num_queues= takes 1 to {}, not '{value}'", Self::MAX_QUEUES)),
            },
            "queue_size" => match value.parse::<u16>() {
                Ok(n) if n.is_power_of_two() && (2..=32768).contains(&n) => target.queue_size = n,
                _ => {
                    return Err(format!("{option} queue_size= takes a power of two from 2 to 32768, not '{value}'"));
                }
            },
            _ => return Ok(false),
        }
        Ok(true)
    }
}

impl FromStr for DiskConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut path, mut readonly, mut id, mut poll_us) = (None, false, None, None);
        let (mut cache, mut io_engine) = (virtio::blk::CacheMode::Writeback, virtio::blk::IoEngine::Sync);
        let (mut vhost_user, mut socket) = (None, None);
        for (key, value) in key_values("--disk", s)? {
            if VhostUserOptions::parse_key(&mut vhost_user, "--disk", key, value)? {
                continue;
            }
            match key {
                "path" if !value.is_empty() => path = Some(PathBuf::from(value)),
                "vhost_user" if !value.is_empty() => socket = Some(PathBuf::from(value)),
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
                        "--disk has no option '{key}'; use path=, readonly=, id=, poll_us=, cache=, io_engine=, or vhost_user= with num_queues= and queue_size="
                    ));
                }
            }
        }
        let vhost_user = match (socket, vhost_user) {
            (Some(socket), options) => {
                Some(VhostUserOptions { socket, ..options.unwrap_or(VhostUserOptions::new(PathBuf::new())) })
            }
            (None, Some(_)) => return Err("--disk num_queues= and queue_size= go with vhost_user=SOCKET".into()),
            (None, None) => None,
        };
        let path = match (&vhost_user, path) {
            (Some(_), Some(_)) => return Err("--disk takes path=IMAGE or vhost_user=SOCKET, not both".into()),
            (Some(_), None) => PathBuf::new(),
            (None, path) => path.ok_or("--disk needs path=IMAGE (or vhost_user=SOCKET)")?,
        };
        let named = vhost_user.as_ref().map_or(&path, |v| &v.socket);
        let id = id.unwrap_or_else(|| {
            named.file_name().map(|n| n.to_string_lossy().chars().take(20).collect()).unwrap_or_default()
        });
        Ok(DiskConfig { path, readonly, id, rate_limit: None, poll_us, cache, io_engine, vhost_user })
    }
}

/// How long a disk's or network interface's worker polls after work unless told otherwise:
/// not at all, since a polling worker takes CPU that the guest's vCPUs need on a host with no
/// core to spare (`poll_us=50` where one is).
pub const DEFAULT_POLL_US: u32 = 0;

/// The most a worker may poll: beyond a millisecond polling costs more than a wake-up saves.
pub const MAX_POLL_US: u32 = 1000;

pub(crate) fn parse_poll_us(option: &str, value: &str) -> Result<u32, String> {
    match value.parse::<u32>() {
        Ok(n) if n <= MAX_POLL_US => Ok(n),
        _ => Err(format!("{option} poll_us= takes microseconds from 0 (no polling) to {MAX_POLL_US}, not '{value}'")),
    }
}

/// Whether the image can be used as configured: openable, and whole sectors.
pub(super) fn check(disk: &DiskConfig) -> Result<(), ConfigError> {
    if let Some(vhost_user) = &disk.vhost_user {
        return super::check_socket(&vhost_user.socket, "--disk vhost_user");
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
                vhost_user: None,
            }
        );
        let d: DiskConfig = "path=/images/rootfs.ext4".parse().unwrap();
        assert_eq!((d.readonly, d.id.as_str()), (false, "rootfs.ext4"));
        assert_eq!("readonly=on".parse::<DiskConfig>().unwrap_err(), "--disk needs path=IMAGE (or vhost_user=SOCKET)");
        let v: DiskConfig = "vhost_user=/run/blk.sock,num_queues=2,queue_size=128".parse().unwrap();
        assert_eq!(
            v.vhost_user,
            Some(VhostUserOptions { socket: "/run/blk.sock".into(), num_queues: 2, queue_size: 128 })
        );
        assert_eq!(v.id, "blk.sock");
        assert!("path=/x,vhost_user=/s".parse::<DiskConfig>().unwrap_err().contains("not both"));
        assert!("path=/x,num_queues=2".parse::<DiskConfig>().unwrap_err().contains("go with vhost_user"));
        assert!("vhost_user=/s,queue_size=100".parse::<DiskConfig>().unwrap_err().contains("power of two"));
        assert!("vhost_user=/s,num_queues=0".parse::<DiskConfig>().unwrap_err().contains("takes 1 to 16"));
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
    }
}
