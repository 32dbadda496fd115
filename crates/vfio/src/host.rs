//! What must hold on the host before kernel VFIO can assign a device: an IOMMU, the vfio-pci
//! driver bound to the device (a physical function or an SR-IOV virtual function alike), and
//! an IOMMU group every member of which is given up to VFIO. Each failure names its fix.

use std::path::{Path, PathBuf};

/// Where the checks look: the real host, or a made-up tree in tests.
pub struct HostPaths {
    pub sysfs: PathBuf,
    pub dev_vfio: PathBuf,
}

impl Default for HostPaths {
    fn default() -> Self {
        HostPaths { sysfs: "/sys".into(), dev_vfio: "/dev/vfio".into() }
    }
}

fn driver_of(device: &Path) -> Option<String> {
    let link = std::fs::read_link(device.join("driver")).ok()?;
    Some(link.file_name()?.to_string_lossy().into_owned())
}

/// Drivers that may hold other members of a group without making it unsafe to assign.
const HARMLESS_DRIVERS: [&str; 3] = ["vfio-pci", "pci-stub", "pcieport"];

/// Checks that `device` (a `/sys/bus/pci/devices/DDDD:BB:DD.F` directory) can be assigned;
/// returns its IOMMU group.
pub fn check_assignable(device: &Path, host: &HostPaths) -> Result<u32, String> {
    let shown = device.display();
    let bdf = device.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    if !device.join("vendor").is_file() || !device.join("config").exists() {
        return Err(format!(
            "vfio={shown} is not a PCI device; give its directory under /sys/bus/pci/devices (`lspci -D` lists them)"
        ));
    }
    let iommus = std::fs::read_dir(host.sysfs.join("class/iommu")).map(|d| d.count()).unwrap_or(0);
    if !host.dev_vfio.join("vfio").exists() {
        let iommu = if iommus == 0 {
            "no IOMMU is active (turn on VT-d or AMD-Vi in the firmware and boot with intel_iommu=on or amd_iommu=on)"
        } else {
            "an IOMMU is active"
        };
        return Err(format!(
            "this host has no {}: kernel VFIO needs an IOMMU and the vfio-pci driver, and {iommu}; load vfio-pci \
             (`modprobe vfio-pci`) and bind {bdf} to it as the README's device assignment section shows",
            host.dev_vfio.join("vfio").display()
        ));
    }
    match driver_of(device) {
        Some(driver) if driver == "vfio-pci" => {}
        other => {
            return Err(format!(
                "{bdf} is bound to {}, not vfio-pci; bind it with `echo vfio-pci > {shown}/driver_override`, \
                 `echo {bdf} > {shown}/driver/unbind` and `echo {bdf} > /sys/bus/pci/drivers_probe`",
                other.map_or("no driver".to_string(), |d| format!("the {d} driver"))
            ));
        }
    }
    let group_link = std::fs::read_link(device.join("iommu_group")).map_err(|_| {
        format!("{bdf} has no IOMMU group, so no IOMMU protects it; turn the IOMMU on (intel_iommu=on or amd_iommu=on)")
    })?;
    let group: u32 = group_link
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| format!("{bdf}'s IOMMU group link {} is not a group number", group_link.display()))?;
    if !host.dev_vfio.join(group.to_string()).exists() {
        return Err(format!(
            "{} is missing although {bdf} is bound to vfio-pci; check that vfio-pci took IOMMU group {group}",
            host.dev_vfio.join(group.to_string()).display()
        ));
    }
    let members = std::fs::read_dir(device.join("iommu_group/devices"))
        .map_err(|e| format!("cannot list IOMMU group {group} ({e})"))?;
    for member in members.flatten() {
        let path = member.path();
        if let Some(driver) = driver_of(&path).filter(|d| !HARMLESS_DRIVERS.contains(&d.as_str())) {
            return Err(format!(
                "IOMMU group {group} is not viable: it also holds {} bound to {driver}; bind every device of the \
                 group to vfio-pci (or unbind it) before assigning any of them",
                member.file_name().to_string_lossy()
            ));
        }
    }
    Ok(group)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    struct FakeHost {
        root: PathBuf,
    }

    impl FakeHost {
        fn new(tag: &str) -> FakeHost {
            let root = std::env::temp_dir().join(format!("fv-vfio-host-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&root);
            for dir in [
                "sys/bus/pci/devices",
                "sys/bus/pci/drivers/vfio-pci",
                "sys/bus/pci/drivers/e1000e",
                "sys/class/iommu",
                "sys/kernel/iommu_groups/7/devices",
                "dev/vfio",
            ] {
                std::fs::create_dir_all(root.join(dir)).unwrap();
            }
            FakeHost { root }
        }

        fn paths(&self) -> HostPaths {
            HostPaths { sysfs: self.root.join("sys"), dev_vfio: self.root.join("dev/vfio") }
        }

        fn device(&self, bdf: &str, driver: Option<&str>, group: Option<u32>) -> PathBuf {
            let dev = self.root.join("sys/bus/pci/devices").join(bdf);
            std::fs::create_dir_all(&dev).unwrap();
            std::fs::write(dev.join("vendor"), "0x8086\n").unwrap();
            std::fs::write(dev.join("config"), [0u8; 64]).unwrap();
            if let Some(driver) = driver {
                symlink(self.root.join("sys/bus/pci/drivers").join(driver), dev.join("driver")).unwrap();
            }
            if let Some(group) = group {
                let g = self.root.join("sys/kernel/iommu_groups").join(group.to_string());
                std::fs::create_dir_all(g.join("devices")).unwrap();
                symlink(&g, dev.join("iommu_group")).unwrap();
                symlink(&dev, g.join("devices").join(bdf)).unwrap();
            }
            dev
        }
    }

    impl Drop for FakeHost {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }

    #[test]
    fn a_host_without_dev_vfio_names_the_iommu_and_vfio_pci() {
        let host = FakeHost::new("novfio");
        let dev = host.device("0000:01:00.0", Some("e1000e"), None);
        let err = check_assignable(&dev, &host.paths()).unwrap_err();
        assert!(
            err.contains("no IOMMU is active") && err.contains("vfio-pci") && err.contains("intel_iommu=on"),
            "{err}"
        );
        let err = check_assignable(&host.root.join("nothing"), &host.paths()).unwrap_err();
        assert!(err.contains("is not a PCI device"), "{err}");
    }

    #[test]
    fn a_device_on_another_driver_or_in_a_shared_group_is_refused_with_the_fix() {
        let host = FakeHost::new("groups");
        std::fs::write(host.root.join("dev/vfio/vfio"), "").unwrap();
        std::fs::create_dir_all(host.root.join("dev/vfio/7")).unwrap();
        let nic = host.device("0000:01:00.0", Some("e1000e"), Some(7));
        let err = check_assignable(&nic, &host.paths()).unwrap_err();
        assert!(err.contains("bound to the e1000e driver") && err.contains("driver_override"), "{err}");

        // An SR-IOV virtual function on vfio-pci, sharing its group with a function on a host driver.
        let vf = host.device("0000:01:10.1", Some("vfio-pci"), Some(7));
        let err = check_assignable(&vf, &host.paths()).unwrap_err();
        assert!(err.contains("group 7 is not viable") && err.contains("0000:01:00.0"), "{err}");

        std::fs::remove_file(nic.join("driver")).unwrap();
        assert_eq!(check_assignable(&vf, &host.paths()), Ok(7), "an unbound neighbour is harmless");
    }
}
