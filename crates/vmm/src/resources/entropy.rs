//! `PUT /entropy`: the virtio-rng device and its rate limit.

use api::models;

use super::{Resources, rate_limit};
use virtio::rate_limiter::RateLimit;

pub fn put(r: &mut Resources, e: models::Entropy) -> Result<(), String> {
    rate_limit("entropy", &e.rate_limiter)?;
    r.entropy = Some(e);
    Ok(())
}

pub fn rate_limit_of(e: Option<&models::Entropy>) -> Result<Option<RateLimit>, String> {
    e.map_or(Ok(None), |e| rate_limit("entropy", &e.rate_limiter))
}
