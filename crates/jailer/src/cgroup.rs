//! Putting the jailed process in its cgroups, in the v1 hierarchies (one per controller) or
//! the v2 unified one, at `<mount>/<parent>/<id>` as Firecracker's jailer does.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use crate::Error;

/// `--cgroup FILE=VALUE`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CgroupSetting {
    pub file: String,
    pub value: String,
}

impl CgroupSetting {
    /// The controller a file belongs to: `memory` for `memory.limit_in_bytes`.
    pub fn controller(&self) -> &str {
        self.file.split('.').next().unwrap_or_default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupVersion {
    V1,
    V2,
}

pub(crate) fn parse_setting(text: &str) -> Result<CgroupSetting, String> {
    let (file, value) = text.split_once('=').ok_or("give FILE=VALUE, e.g. cpuset.cpus=0")?;
    let well_formed = file.split_once('.').is_some_and(|(c, rest)| !c.is_empty() && !rest.is_empty())
        && file.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
    if !well_formed {
        return Err(format!("'{file}' is not a cgroup file name such as memory.limit_in_bytes"));
    }
    if value.contains('\n') {
        return Err("the value must be one line".into());
    }
    Ok(CgroupSetting { file: file.into(), value: value.into() })
}

pub(crate) fn parse_version(text: &str) -> Result<CgroupVersion, String> {
    match text {
        "1" => Ok(CgroupVersion::V1),
        "2" => Ok(CgroupVersion::V2),
        _ => Err(format!("'{text}' is no cgroup version; give 1 or 2")),
    }
}

/// Checks `--parent-cgroup`: a relative path inside the hierarchy.
pub(crate) fn check_parent(parent: &str) -> Result<(), Error> {
    let ok = !parent.is_empty() && Path::new(parent).components().all(|c| matches!(c, std::path::Component::Normal(_)));
    if ok {
        Ok(())
    } else {
        Err(Error::Cgroup(format!("--parent-cgroup '{parent}' must be a relative path without '..'; give a name.")))
    }
}

/// The mount point of the v1 hierarchy that carries `controller`, from /proc/mounts' text.
pub fn v1_mount(mounts: &str, controller: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, dir, "cgroup", options, ..] if options.split(',').any(|o| o == controller) => Some(PathBuf::from(dir)),
            _ => None,
        }
    })
}

/// The mount point of the v2 unified hierarchy, from /proc/mounts' text.
pub fn v2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields.as_slice() {
            [_, dir, "cgroup2", ..] => Some(PathBuf::from(dir)),
            _ => None,
        }
    })
}

fn write(path: &Path, value: &str) -> Result<(), Error> {
    std::fs::write(path, value)
        .map_err(|e| Error::Cgroup(format!("cgroup file {} cannot be written ({e}); check --cgroup.", path.display())))
}

fn make_dir(path: &Path) -> Result<(), Error> {
    std::fs::create_dir_all(path).map_err(|e| {
        Error::Cgroup(format!("cgroup {} cannot be made ({e}); is the hierarchy mounted?", path.display()))
    })
}

/// Puts `pid` in `<mount>/<parent>/<id>` of each hierarchy `settings` name, writes the
/// settings there, and returns the cgroups made.
pub fn apply(
    mounts: &str,
    version: CgroupVersion,
    settings: &[CgroupSetting],
    parent: &str,
    id: &str,
    pid: u32,
) -> Result<Vec<PathBuf>, Error> {
    check_parent(parent)?;
    let controllers: BTreeSet<&str> = settings.iter().map(CgroupSetting::controller).collect();
    match version {
        CgroupVersion::V1 => controllers
            .into_iter()
            .map(|controller| {
                let mount = v1_mount(mounts, controller).ok_or_else(|| {
                    Error::Cgroup(format!(
                        "no cgroup v1 hierarchy has the {controller} controller; mount one or use --cgroup-version 2."
                    ))
                })?;
                let dir = mount.join(parent).join(id);
                make_dir(&dir)?;
                if controller == "cpuset" {
                    inherit_cpuset(&mount, &dir)?;
                }
                for s in settings.iter().filter(|s| s.controller() == controller) {
                    write(&dir.join(&s.file), &s.value)?;
                }
                write(&dir.join("tasks"), &pid.to_string())?;
                Ok(dir)
            })
            .collect(),
        CgroupVersion::V2 => {
            let mount = v2_mount(mounts).ok_or_else(|| {
                Error::Cgroup("no cgroup v2 hierarchy is mounted; mount one or use --cgroup-version 1.".into())
            })?;
            let dir = mount.join(parent).join(id);
            make_dir(&dir)?;
            // Each level above the VM's cgroup hands the controllers down.
            let enable: String = controllers.iter().map(|c| format!("+{c} ")).collect();
            let mut level = mount.clone();
            for component in Path::new(parent).components() {
                if !enable.is_empty() {
                    write(&level.join("cgroup.subtree_control"), enable.trim_end())?;
                }
                level.push(component);
            }
            if !enable.is_empty() {
                write(&level.join("cgroup.subtree_control"), enable.trim_end())?;
            }
            for s in settings {
                write(&dir.join(&s.file), &s.value)?;
            }
            write(&dir.join("cgroup.procs"), &pid.to_string())?;
            Ok(vec![dir])
        }
    }
}

/// A new cpuset cgroup has no CPUs or memory nodes: copy them down from the nearest level
/// that has them, as Firecracker's jailer does.
fn inherit_cpuset(mount: &Path, dir: &Path) -> Result<(), Error> {
    let Ok(below) = dir.strip_prefix(mount) else { return Ok(()) };
    for file in ["cpuset.cpus", "cpuset.mems"] {
        let mut level = mount.to_path_buf();
        let mut value = std::fs::read_to_string(level.join(file)).unwrap_or_default();
        for component in below.components() {
            level.push(component);
            let here = std::fs::read_to_string(level.join(file)).unwrap_or_default();
            if here.trim().is_empty() {
                write(&level.join(file), value.trim())?;
            } else {
                value = here;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\n\
        cgroup /sys/fs/cgroup/memory cgroup rw,relatime,memory 0 0\n\
        cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0\n\
        cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0\n";

    fn setting(text: &str) -> CgroupSetting {
        parse_setting(text).unwrap()
    }

    #[test]
    fn hierarchies_are_found_by_controller() {
        assert_eq!(v1_mount(MOUNTS, "memory"), Some("/sys/fs/cgroup/memory".into()));
        assert_eq!(v1_mount(MOUNTS, "cpuacct"), Some("/sys/fs/cgroup/cpu,cpuacct".into()));
        assert_eq!(v1_mount(MOUNTS, "pids"), None);
        assert_eq!(v2_mount(MOUNTS), Some("/sys/fs/cgroup/unified".into()));
        assert_eq!(setting("memory.limit_in_bytes=1").controller(), "memory");
        assert!(parse_setting("../x=1").is_err());
        assert!(parse_setting("memory=1").is_err());
        assert!(check_parent("../up").is_err());
        assert!(check_parent("/abs").is_err());
    }

    /// The v2 steps for memory and pids, on a directory that stands in for the hierarchy.
    #[test]
    fn v2_enables_controllers_down_the_tree_and_moves_the_process() {
        let root = std::env::temp_dir().join(format!("fv-jailer-cg2-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        let mounts = format!("cgroup2 {} cgroup2 rw 0 0\n", root.display());
        let settings = [setting("memory.max=268435456"), setting("pids.max=64")];
        let made = apply(&mounts, CgroupVersion::V2, &settings, "firecracker/vms", "vm-1", 4242).unwrap();
        let leaf = root.join("firecracker/vms/vm-1");
        assert_eq!(made, std::slice::from_ref(&leaf));
        for level in [root.clone(), root.join("firecracker"), root.join("firecracker/vms")] {
            let text = std::fs::read_to_string(level.join("cgroup.subtree_control")).unwrap();
            assert_eq!(text, "+memory +pids", "{}", level.display());
        }
        assert!(!leaf.join("cgroup.subtree_control").exists());
        assert_eq!(std::fs::read_to_string(leaf.join("memory.max")).unwrap(), "268435456");
        assert_eq!(std::fs::read_to_string(leaf.join("pids.max")).unwrap(), "64");
        assert_eq!(std::fs::read_to_string(leaf.join("cgroup.procs")).unwrap(), "4242");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn v1_cpuset_inherits_cpus_and_mems() {
        let root = std::env::temp_dir().join(format!("fv-jailer-cg1-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("cpuset.cpus"), "0-1\n").unwrap();
        std::fs::write(root.join("cpuset.mems"), "0\n").unwrap();
        let mounts = format!("cgroup {} cgroup rw,cpuset 0 0\n", root.display());
        apply(&mounts, CgroupVersion::V1, &[setting("cpuset.cpus=1")], "fc", "vm", 7).unwrap();
        assert_eq!(std::fs::read_to_string(root.join("fc/cpuset.cpus")).unwrap(), "0-1");
        assert_eq!(std::fs::read_to_string(root.join("fc/vm/cpuset.mems")).unwrap(), "0");
        assert_eq!(std::fs::read_to_string(root.join("fc/vm/cpuset.cpus")).unwrap(), "1");
        assert_eq!(std::fs::read_to_string(root.join("fc/vm/tasks")).unwrap(), "7");
        std::fs::remove_dir_all(&root).unwrap();
    }
}
