//! `PUT /ferrovisor/devices/{id}`: assigned PCI devices (kernel VFIO or a vfio-user server).

use std::path::{Path, PathBuf};

use api::models;

use super::{Resources, put_by_id};
use crate::config::{PassthroughBackend, PassthroughConfig, paths};

pub fn put(r: &mut Resources, d: models::PassthroughDevice) -> Result<(), String> {
    config(&d)?;
    put_by_id(&mut r.devices, d, |a, b| a.id == b.id);
    Ok(())
}

/// The device in the VMM's terms: exactly one back-end, named by a path that exists.
pub fn config(d: &models::PassthroughDevice) -> Result<PassthroughConfig, String> {
    let what = format!("device {}", d.id);
    let backend = match (&d.vfio, &d.vfio_user) {
        (Some(path), None) => {
            let fix = "give a device's directory under /sys/bus/pci/devices, bound to vfio-pci";
            paths::existing_directory(Path::new(path), &format!("{what} vfio "), fix)?;
            PassthroughBackend::Vfio(PathBuf::from(path))
        }
        (None, Some(path)) => {
            let fix = "start the device's vfio-user server first (such as `ferrovisor device-server PATH`)";
            paths::socket_to_connect(Path::new(path), &format!("{what} vfio_user "), fix)?;
            PassthroughBackend::VfioUser(PathBuf::from(path))
        }
        _ => {
            return Err(format!(
                "{what}: give exactly one of vfio (a sysfs device directory) and vfio_user (a socket)."
            ));
        }
    };
    Ok(PassthroughConfig { id: d.id.clone(), backend })
}

/// A command-line VM's device `index` in the API's terms.
pub fn device_of(index: usize, d: &PassthroughConfig) -> models::PassthroughDevice {
    let (vfio, vfio_user) = match &d.backend {
        PassthroughBackend::Vfio(p) => (Some(p.display().to_string()), None),
        PassthroughBackend::VfioUser(p) => (None, Some(p.display().to_string())),
    };
    models::PassthroughDevice { id: d.api_id(index), vfio, vfio_user }
}
