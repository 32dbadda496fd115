//! `PUT /boot-source`: the kernel, the initramfs and the command line.

use api::models;

use super::{Resources, must_exist};

pub fn put(r: &mut Resources, b: models::BootSource) -> Result<(), String> {
    must_exist("boot-source", "kernel_image_path", &b.kernel_image_path)?;
    if let Some(initrd) = &b.initrd_path {
        must_exist("boot-source", "initrd_path", initrd)?;
    }
    r.boot = Some(b);
    Ok(())
}

/// `boot_args` (or the default) with the root device Firecracker names on the command line: the
/// root drive, which is the first disk (vda), or else a root pmem device, the first (pmem0).
pub fn cmdline(
    b: &models::BootSource,
    first_drive: Option<&models::Drive>,
    first_pmem: Option<&models::Pmem>,
) -> String {
    let mut cmdline = b.boot_args.clone().unwrap_or_else(|| crate::config::DEFAULT_CMDLINE.to_string());
    let mode = |read_only| if read_only { "ro" } else { "rw" };
    if let Some(root) = first_drive.filter(|d| d.is_root_device) {
        let device = match &root.partuuid {
            Some(uuid) => format!("PARTUUID={uuid}"),
            None => "/dev/vda".into(),
        };
        cmdline.push_str(&format!(" root={device} {}", mode(root.is_read_only)));
    } else if let Some(root) = first_pmem.filter(|p| p.root_device) {
        cmdline.push_str(&format!(" root=/dev/pmem0 {}", mode(root.read_only)));
    }
    cmdline
}
