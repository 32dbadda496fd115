//! The metrics: devices' counters, vCPU exits by reason, API requests by route, the VMM's
//! memory. As one JSON object (Firecracker's metrics-file contract: one object per line per
//! flush) or as Prometheus text.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use crate::vcpu::{EXIT_REASONS, EXITS};

fn vmm_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")).map_or(0, |v| crate::memory::kib(v) << 10)
}

/// All metrics as one JSON object.
pub fn json() -> Value {
    let mut devices = Map::new();
    let mut by_kind: Map<String, Value> = Map::new();
    virtio::metrics::for_each(|d| {
        let mut fields = Map::new();
        fields.insert("kind".into(), json!(d.kind));
        let kind = by_kind.entry(d.kind).or_insert_with(|| json!({}));
        for (name, value) in d.metrics.snapshot() {
            fields.insert(name.into(), json!(value));
            let total = kind.get(name).and_then(Value::as_u64).unwrap_or(0);
            kind[name] = json!(total + value);
        }
        devices.insert(d.name.clone(), Value::Object(fields));
    });
    let exits: Map<String, Value> =
        EXIT_REASONS.iter().zip(&EXITS).map(|(name, c)| ((*name).into(), json!(c.load(Ordering::Relaxed)))).collect();
    let api: Map<String, Value> = api::http::request_counts().into_iter().map(|(k, v)| (k, json!(v))).collect();
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut all = Map::new();
    all.insert("utc_timestamp_ms".into(), json!(now.as_millis() as u64));
    all.insert("api_server".into(), json!({ "requests": api }));
    all.insert("vcpu".into(), json!({ "exits": exits }));
    all.insert("devices".into(), Value::Object(devices));
    // Firecracker groups devices by kind at the top level; tools reading those keys find them.
    for (kind, totals) in by_kind {
        all.insert(kind, totals);
    }
    all.insert("vmm".into(), json!({ "rss_bytes": vmm_rss_bytes() }));
    {
        use crate::migration::counters::*;
        all.insert(
            "migration".into(),
            json!({
                "started": STARTED.load(Ordering::Relaxed),
                "completed": COMPLETED.load(Ordering::Relaxed),
                "failed": FAILED.load(Ordering::Relaxed),
                "bytes_sent": BYTES_SENT.load(Ordering::Relaxed),
                "bytes_received": BYTES_RECEIVED.load(Ordering::Relaxed),
                "last_downtime_us": LAST_DOWNTIME_US.load(Ordering::Relaxed),
            }),
        );
    }
    // Firecracker's per-method request counts, keyed by route.
    for (method, key) in [("GET", "get_api_requests"), ("PUT", "put_api_requests"), ("PATCH", "patch_api_requests")] {
        let routes: Map<String, Value> = api::http::request_counts()
            .into_iter()
            .filter_map(|(k, v)| k.strip_prefix(method).map(|route| (route.trim().to_string(), json!(v))))
            .collect();
        all.insert(key.into(), Value::Object(routes));
    }
    all.insert(
        "logger".into(),
        json!({ "missed_metrics_count": MISSED_LINES.load(Ordering::Relaxed), "missed_log_count": missed_log_lines() }),
    );
    // A forbidden system call ends the process, so a running VMM has had none.
    all.insert("seccomp".into(), json!({ "num_faults": 0 }));
    // The rest of Firecracker's top-level keys, so that its users find every one of them.
    for key in ["block", "net", "vsock", "i8042", "rtc", "uart", "mmds", "latencies_us", "signals"] {
        all.entry(key).or_insert_with(|| json!({}));
    }
    Value::Object(all)
}

/// Metrics lines a full FIFO could not take.
static MISSED_LINES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Log lines a full log FIFO could not take (counted by the binary's logger).
pub static MISSED_LOG_LINES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn missed_log_lines() -> u64 {
    MISSED_LOG_LINES.load(Ordering::Relaxed)
}

/// Escapes a Prometheus label value.
fn label(value: &str) -> String {
    value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// All metrics in the Prometheus text exposition format.
pub fn prometheus() -> String {
    let mut out = String::from(
        "# HELP ferrovisor_vmm_rss_bytes Resident memory of the VMM process, guest RAM included.\n\
         # TYPE ferrovisor_vmm_rss_bytes gauge\n",
    );
    out.push_str(&format!("ferrovisor_vmm_rss_bytes {}\n", vmm_rss_bytes()));
    let mut device_families: Vec<(String, Vec<String>)> = Vec::new();
    virtio::metrics::for_each(|d| {
        for (name, value) in d.metrics.snapshot() {
            let metric = format!("ferrovisor_device_{name}_total");
            let line = format!("{metric}{{device=\"{}\",kind=\"{}\"}} {value}", label(&d.name), d.kind);
            match device_families.iter_mut().find(|(m, _)| *m == metric) {
                Some((_, ls)) => ls.push(line),
                None => device_families.push((metric, vec![line])),
            }
        }
    });
    for (metric, ls) in device_families {
        out.push_str(&format!("# HELP {metric} Per-device counter.\n# TYPE {metric} counter\n"));
        for l in ls {
            out.push_str(&l);
            out.push('\n');
        }
    }
    out.push_str(
        "# HELP ferrovisor_vcpu_exits_total vCPU exits by reason.\n# TYPE ferrovisor_vcpu_exits_total counter\n",
    );
    for (name, c) in EXIT_REASONS.iter().zip(&EXITS) {
        out.push_str(&format!("ferrovisor_vcpu_exits_total{{reason=\"{name}\"}} {}\n", c.load(Ordering::Relaxed)));
    }
    out.push_str(
        "# HELP ferrovisor_api_requests_total API requests by route.\n# TYPE ferrovisor_api_requests_total counter\n",
    );
    for (route, n) in api::http::request_counts() {
        out.push_str(&format!("ferrovisor_api_requests_total{{route=\"{}\"}} {n}\n", label(&route)));
    }
    out
}

/// Where metrics are flushed: a file or FIFO given by `PUT /metrics`, one JSON line per flush,
/// every minute (the main thread asks [`MetricsSink::due`]) and on `FlushMetrics`.
pub struct MetricsSink {
    file: Mutex<File>,
    next: Mutex<Instant>,
}

const FLUSH_EVERY: Duration = Duration::from_secs(60);

impl MetricsSink {
    /// Opens `path`, a regular file (appended to) or a FIFO (never waited on: lines a full
    /// FIFO cannot take are dropped). Errors are sentences.
    pub fn open(path: &Path) -> Result<MetricsSink, String> {
        let file = sandbox::files::open_output(path, "metrics_path")?;
        Ok(MetricsSink { file: Mutex::new(file), next: Mutex::new(Instant::now() + FLUSH_EVERY) })
    }

    /// When the next periodic flush is due.
    pub fn due(&self) -> Instant {
        *self.next.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes one line; a FIFO without room drops it (counted in `logger.missed_metrics_count`).
    pub fn flush(&self) -> std::io::Result<()> {
        *self.next.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now() + FLUSH_EVERY;
        let mut line = json().to_string();
        line.push('\n');
        match self.file.lock().unwrap_or_else(|p| p.into_inner()).write_all(line.as_bytes()) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                MISSED_LINES.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            other => other,
        }
    }
}
