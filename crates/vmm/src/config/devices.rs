//! The other devices' options: serial port, console, balloon, vsock, pmem, assigned PCI
//! devices, and the virtio transport.

use std::path::PathBuf;
use std::str::FromStr;

use super::{key_values, on_off};

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balloon_option_parses() {
        let b = parse_balloon("size=64,stats=on,free_page_reporting=on").unwrap();
        assert_eq!((b.target_mib, b.stats_interval_s, b.free_page_reporting, b.deflate_on_oom), (64, 1, true, false));
        assert!(parse_balloon("stats=on").unwrap_err().contains("needs size="));
        assert!(parse_balloon("size=lots").unwrap_err().contains("number"));
        assert!(parse_balloon("size=1,hints=on").unwrap_err().contains("no option 'hints'"));
    }

    #[test]
    fn vsock_option_parses() {
        assert_eq!("cid=3,uds=/tmp/v.sock".parse(), Ok(VsockConfig { cid: 3, uds: "/tmp/v.sock".into() }));
        assert!("cid=2,uds=/x".parse::<VsockConfig>().unwrap_err().contains("from 3"));
        assert!("uds=/x".parse::<VsockConfig>().unwrap_err().contains("needs cid="));
        assert!("cid=9".parse::<VsockConfig>().unwrap_err().contains("needs uds="));
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
}
