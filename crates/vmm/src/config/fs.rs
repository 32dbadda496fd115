//! virtio-fs: `--fs`, a directory a vhost-user back-end (virtiofsd) shares with the guest.

use std::path::PathBuf;
use std::str::FromStr;

use super::disk::VhostUserOptions;
use super::key_values;

/// `--fs tag=TAG,socket=PATH[,num_queues=N][,queue_size=N]`: the guest mounts TAG.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FsConfig {
    pub tag: String,
    pub vhost_user: VhostUserOptions,
}

impl FsConfig {
    /// A tag as virtio-fs carries it: 1 to 36 bytes.
    pub fn check_tag(tag: &str) -> Result<(), String> {
        match tag.len() {
            1..=36 if !tag.contains('\0') => Ok(()),
            _ => Err(format!("the virtio-fs tag '{tag}' must be 1 to 36 bytes; shorten it")),
        }
    }
}

impl FromStr for FsConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (mut tag, mut socket, mut options) = (None, None, None);
        for (key, value) in key_values("--fs", s)? {
            if VhostUserOptions::parse_key(&mut options, "--fs", key, value)? {
                continue;
            }
            match key {
                "tag" => {
                    Self::check_tag(value).map_err(|e| format!("--fs tag=: {e}"))?;
                    tag = Some(value.to_string());
                }
                "socket" if !value.is_empty() => socket = Some(PathBuf::from(value)),
                _ => return Err(format!("--fs has no option '{key}'; use tag=, socket=, num_queues= and queue_size=")),
            }
        }
        let tag = tag.ok_or("--fs needs tag=TAG, the name the guest mounts")?;
        let socket = socket.ok_or("--fs needs socket=PATH, where virtiofsd listens")?;
        let options = options.unwrap_or(VhostUserOptions::new(PathBuf::new()));
        Ok(FsConfig { tag, vhost_user: VhostUserOptions { socket, ..options } })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fs_option_parses_and_names_its_mistakes() {
        let fs: FsConfig = "tag=root,socket=/run/fs.sock,num_queues=2".parse().unwrap();
        assert_eq!(fs.tag, "root");
        assert_eq!(fs.vhost_user, VhostUserOptions { socket: "/run/fs.sock".into(), num_queues: 2, queue_size: 256 });
        assert!("socket=/s".parse::<FsConfig>().unwrap_err().contains("needs tag="));
        assert!("tag=a".parse::<FsConfig>().unwrap_err().contains("needs socket="));
        assert!("tag=,socket=/s".parse::<FsConfig>().unwrap_err().contains("1 to 36 bytes"));
        let long = format!("tag={},socket=/s", "x".repeat(37));
        assert!(long.parse::<FsConfig>().unwrap_err().contains("1 to 36 bytes"));
        assert!("tag=a,socket=/s,dax=on".parse::<FsConfig>().unwrap_err().contains("no option 'dax'"));
    }
}
