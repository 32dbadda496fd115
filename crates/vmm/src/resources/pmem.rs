//! `PUT` and `PATCH /pmem/{id}`: files as persistent memory (virtio-pmem).

use std::path::{Path, PathBuf};

use api::models;

use super::{Resources, Running, put_by_id, rate_limit};
use crate::config::PmemConfig;
use crate::virtio_devices::DeviceChange;

pub fn put(r: &mut Resources, p: models::Pmem) -> Result<(), String> {
    let what = format!("pmem {}", p.id);
    crate::config::paths::pmem_file(Path::new(&p.path_on_host), p.read_only, &format!("{what} path_on_host "))?;
    rate_limit(&what, &p.rate_limiter)?;
    if p.root_device && r.pmem.iter().any(|o| o.root_device && o.id != p.id) {
        return Err(format!("{what}: another pmem device is the root already; only one can be."));
    }
    put_by_id(&mut r.pmem, p, |a, b| a.id == b.id);
    Ok(())
}

pub fn pmem_config(p: &models::Pmem) -> Result<PmemConfig, String> {
    Ok(PmemConfig {
        path: PathBuf::from(&p.path_on_host),
        readonly: p.read_only,
        id: p.id.clone(),
        rate_limit: rate_limit(&format!("pmem {}", p.id), &p.rate_limiter)?,
    })
}

/// `PATCH /pmem/{id}`: a new rate limiter for a running VM's device.
pub fn patch(running: &mut Running, p: models::PartialPmem) -> Result<(), String> {
    let (vm, config) = running;
    let Some(index) = config.pmem.iter().enumerate().position(|(i, o)| o.api_id(i) == p.id) else {
        return Err(format!("There is no pmem device {}; PATCH an existing id.", p.id));
    };
    let limit = rate_limit(&format!("pmem {}", p.id), &p.rate_limiter)?;
    if p.rate_limiter.is_some() {
        vm.update_pmem(&p.id, DeviceChange::RateLimit(limit))
            .map_err(|e| format!("pmem {}: the rate limiter cannot change ({e}).", p.id))?;
        config.pmem[index].rate_limit = limit;
    }
    Ok(())
}
