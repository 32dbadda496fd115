//! `/balloon`: the virtio-balloon's target, statistics and free page hinting.

use std::sync::Arc;

use api::models;
use virtio::balloon::{BalloonControl, BalloonOptions};

use super::{Resources, Running, started};

pub fn put(r: &mut Resources, b: models::Balloon) -> Result<(), String> {
    r.balloon = Some(b);
    Ok(())
}

pub fn options(b: &models::Balloon) -> BalloonOptions {
    BalloonOptions {
        target_mib: b.amount_mib,
        deflate_on_oom: b.deflate_on_oom,
        stats_interval_s: b.stats_polling_interval_s,
        free_page_reporting: b.free_page_reporting,
        free_page_hinting: b.free_page_hinting,
    }
}

/// The balloon in the API's terms, as configured (`target_mib` and the interval may have
/// changed since).
pub fn balloon_of(b: &BalloonOptions) -> models::Balloon {
    models::Balloon {
        amount_mib: b.target_mib,
        deflate_on_oom: b.deflate_on_oom,
        stats_polling_interval_s: b.stats_interval_s,
        free_page_reporting: b.free_page_reporting,
        free_page_hinting: b.free_page_hinting,
    }
}

fn control(running: Option<&Running>) -> Result<(&Arc<BalloonControl>, &Running), String> {
    let running = started(running, "This balloon request")?;
    let control = running.0.balloon().ok_or("The VM has no balloon; PUT /balloon before InstanceStart.".to_string())?;
    Ok((control, running))
}

/// `GET /balloon`: what was configured, or on a running VM what the balloon is now.
pub fn get(running: Option<&Running>, r: &Resources) -> Result<models::Balloon, String> {
    if running.is_none() {
        return r.balloon.clone().ok_or_else(|| "No balloon is configured; PUT /balloon first.".into());
    }
    let (control, (_, config)) = control(running)?;
    let options = config.balloon.unwrap_or_default();
    Ok(models::Balloon {
        amount_mib: control.target_mib(),
        stats_polling_interval_s: control.stats_interval_s(),
        ..balloon_of(&options)
    })
}

/// `PATCH /balloon`: a new target, at most the guest's memory.
pub fn set_target(running: Option<&Running>, amount_mib: u32) -> Result<(), String> {
    let (control, (_, config)) = control(running)?;
    if u64::from(amount_mib) > config.memory_mib {
        return Err(format!(
            "balloon amount_mib {amount_mib} exceeds the guest's {} MiB; give a smaller target.",
            config.memory_mib
        ));
    }
    control.set_target_mib(amount_mib);
    Ok(())
}

/// `GET /balloon/statistics`.
pub fn stats(running: Option<&Running>) -> Result<models::BalloonStats, String> {
    let (control, _) = control(running)?;
    if control.stats_interval_s() == 0 {
        return Err(
            "Balloon statistics are off; PUT /balloon with stats_polling_interval_s above 0 before InstanceStart."
                .into(),
        );
    }
    let state = control.state();
    let target_mib = control.target_mib();
    let mut stats = models::BalloonStats {
        target_pages: target_mib * 256,
        actual_pages: state.actual_pages,
        target_mib,
        actual_mib: state.actual_pages / 256,
        ..Default::default()
    };
    for (tag, value) in state.stats {
        stats.set_tag(tag, value);
    }
    Ok(stats)
}

/// `PATCH /balloon/statistics`: a new polling interval, while statistics are on.
pub fn set_stats_interval(running: Option<&Running>, seconds: u32) -> Result<(), String> {
    let (control, _) = control(running)?;
    if control.stats_interval_s() == 0 || seconds == 0 {
        return Err(
            "Balloon statistics can only be turned on or off before InstanceStart; give an interval above 0.".into()
        );
    }
    control.set_stats_interval_s(seconds);
    Ok(())
}

/// Free page hinting: `act` on the balloon (start or stop a run); the status after it.
pub fn hinting(
    running: Option<&Running>,
    act: impl FnOnce(&BalloonControl),
) -> Result<models::BalloonHintingStatus, String> {
    let (control, (_, config)) = control(running)?;
    if !config.balloon.is_some_and(|b| b.free_page_hinting) {
        return Err("Free page hinting is off; PUT /balloon with free_page_hinting: true before InstanceStart.".into());
    }
    act(control);
    let h = control.hinting();
    Ok(models::BalloonHintingStatus { host_cmd: h.host_cmd, guest_cmd: h.guest_cmd })
}
