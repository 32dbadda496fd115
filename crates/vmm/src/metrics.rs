//! The metrics: devices' counters, vCPU exits by reason, API requests by route, the VMM's
//! memory. As one JSON object (Firecracker's metrics-file contract: one object per line per
//! flush) or as Prometheus text.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

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
    Value::Object(all)
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
/// every minute and on `FlushMetrics`.
#[derive(Clone)]
pub struct MetricsSink {
    file: Arc<Mutex<File>>,
}

const FLUSH_EVERY: Duration = Duration::from_secs(60);

impl MetricsSink {
    /// Opens `path` for appending (a FIFO blocks until a reader opens it, as in Firecracker).
    pub fn open(path: &Path) -> std::io::Result<MetricsSink> {
        let file = std::fs::OpenOptions::new().append(true).create(true).open(path)?;
        let sink = MetricsSink { file: Arc::new(Mutex::new(file)) };
        let periodic = sink.clone();
        std::thread::Builder::new().name("metrics".into()).stack_size(256 << 10).spawn(move || {
            loop {
                std::thread::sleep(FLUSH_EVERY);
                if let Err(e) = periodic.flush() {
                    tracing::warn!("metrics could not be written: {e}");
                }
            }
        })?;
        Ok(sink)
    }

    pub fn flush(&self) -> std::io::Result<()> {
        let mut line = json().to_string();
        line.push('\n');
        self.file.lock().unwrap_or_else(|p| p.into_inner()).write_all(line.as_bytes())
    }
}
