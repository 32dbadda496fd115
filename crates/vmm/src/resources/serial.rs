//! `PUT /serial`: where the serial port's output goes, and its byte budget.

use std::path::PathBuf;

use api::models;
use virtio::rate_limiter::BucketConfig;

use super::Resources;
use crate::config::SerialConfig;

pub fn put(r: &mut Resources, s: models::Serial) -> Result<(), String> {
    if let (SerialConfig::Path(path), _) = serial_config(Some(&s))? {
        crate::config::paths::output_file(&path, "serial serial_out_path ")?;
    }
    r.serial = Some(s);
    Ok(())
}

/// Where the output goes (stdout without a `PUT /serial`), and its byte budget.
pub fn serial_config(s: Option<&models::Serial>) -> Result<(SerialConfig, Option<BucketConfig>), String> {
    let Some(s) = s else { return Ok((SerialConfig::Stdio, None)) };
    let out = match s.serial_out_path.as_deref() {
        None => SerialConfig::Stdio,
        Some("") => {
            return Err("serial serial_out_path is empty; give a file or FIFO path, or leave it out for stdout.".into());
        }
        Some(path) => SerialConfig::Path(PathBuf::from(path)),
    };
    let limit = match s.rate_limiter {
        Some(b) if b.size == 0 || b.refill_time == 0 => {
            return Err("serial rate_limiter needs a size and a refill_time above 0.".into());
        }
        Some(b) => Some(super::bucket(b)),
        None => None,
    };
    Ok((out, limit))
}
