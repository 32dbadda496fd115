//! The logger: `tracing` events (and the `log` records of rust-vmm crates) as one line each, to
//! stderr or to the file `PUT /logger` names; its level can change while the VMM runs.
//!
//! A subscriber of its own rather than tracing-subscriber's: Ferrovisor has no spans and filters
//! by target and level alone, and tracing-subscriber's registry and regex-based filter cost every
//! VMM process about 320 KiB of code and 30 KiB of heap (`cargo bench --bench overhead`).
//! Lines look as tracing-subscriber wrote them: `2026-12-07T09:33:40.093010Z  INFO message`.

use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

use tracing::field::{Field, Visit};
use tracing::level_filters::LevelFilter;
use tracing::span::{Attributes, Id, Record};
use tracing::subscriber::Interest;
use tracing::{Event, Level, Metadata};

/// Where log lines go now.
#[derive(Clone)]
struct Sink(Arc<Mutex<Box<dyn Write + Send>>>);

/// stderr that never makes the writer wait: a pipe nobody reads (a supervisor that stopped
/// reading) must not stall a vCPU or an API thread that logs. With no room for a line now,
/// the write fails with WouldBlock and the line is dropped. Lines are written under the sink's
/// lock, so no other thread of ours takes the room between the check and the write.
struct Stderr;

impl Write for Stderr {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let mut fd = libc::pollfd { fd: 2, events: libc::POLLOUT, revents: 0 };
        // SAFETY: poll on one live pollfd, without waiting.
        let ready = unsafe { libc::poll(&mut fd, 1, 0) };
        if ready == 0 {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        // A pipe that polls writable has a free 4 KiB slot: a line up to that long goes in
        // without waiting.
        let n = buf.len().min(4096);
        std::io::stderr().write(&buf[..n])
    }
    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl Write for Sink {
    /// A full log FIFO or stderr pipe drops the line (counted in the metrics) rather than wait.
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self.0.lock().unwrap_or_else(|p| p.into_inner()).write(buf) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                vmm::metrics::MISSED_LOG_LINES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                Ok(buf.len())
            }
            other => other,
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).flush()
    }
}

/// Which events pass: RUST_LOG's syntax without spans or fields, `LEVEL` and `TARGET=LEVEL`
/// separated by commas. The longest target that prefixes an event's target decides.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Filter {
    default: LevelFilter,
    /// (target, level), longest target first.
    targets: Vec<(String, LevelFilter)>,
}

fn parse_level(text: &str) -> Option<LevelFilter> {
    match text.to_ascii_lowercase().as_str() {
        "off" => Some(LevelFilter::OFF),
        "error" => Some(LevelFilter::ERROR),
        "warn" | "warning" => Some(LevelFilter::WARN),
        "info" => Some(LevelFilter::INFO),
        "debug" => Some(LevelFilter::DEBUG),
        "trace" => Some(LevelFilter::TRACE),
        _ => None,
    }
}

impl Filter {
    fn parse(text: &str) -> Result<Filter, String> {
        let mut filter = Filter { default: LevelFilter::ERROR, targets: Vec::new() };
        for directive in text.split(',').map(str::trim).filter(|d| !d.is_empty()) {
            let bad = || format!("'{directive}' is neither a level nor TARGET=LEVEL");
            match directive.split_once('=') {
                Some((target, level)) if !target.is_empty() && target.chars().all(is_target_char) => {
                    filter.targets.push((target.to_string(), parse_level(level).ok_or_else(bad)?));
                }
                Some(_) => return Err(bad()),
                // A bare target enables all of it, as in RUST_LOG.
                None => match parse_level(directive) {
                    Some(level) => filter.default = level,
                    None if directive.chars().all(is_target_char) => {
                        filter.targets.push((directive.to_string(), LevelFilter::TRACE))
                    }
                    None => return Err(bad()),
                },
            }
        }
        filter.targets.sort_by_key(|(target, _)| std::cmp::Reverse(target.len()));
        Ok(filter)
    }

    fn level_of(&self, target: &str) -> LevelFilter {
        self.targets.iter().find(|(t, _)| target.starts_with(t.as_str())).map_or(self.default, |(_, level)| *level)
    }

    fn enabled(&self, target: &str, level: &Level) -> bool {
        self.level_of(target) >= *level
    }

    /// The most verbose level any target passes.
    fn max(&self) -> LevelFilter {
        self.targets.iter().map(|(_, level)| *level).fold(self.default, std::cmp::max)
    }
}

fn is_target_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':' || c == '-'
}

/// The logger's state, shared by the `tracing` subscriber and the `log` logger.
struct Shared {
    filter: RwLock<Filter>,
    sink: Sink,
    show_origin: bool,
    ansi: bool,
}

static SHARED: OnceLock<Shared> = OnceLock::new();

impl Shared {
    fn enabled(&self, target: &str, level: &Level) -> bool {
        self.filter.read().unwrap_or_else(|p| p.into_inner()).enabled(target, level)
    }

    /// Writes one line: time, level, origin when asked, then the message and fields.
    fn write(&self, level: &Level, origin: Option<(&str, u32)>, message: &str) {
        let mut line = String::with_capacity(64 + message.len());
        push_timestamp(&mut line, SystemTime::now());
        let (color, reset) = match (self.ansi, *level) {
            (false, _) => ("", ""),
            (true, Level::ERROR) => ("\x1b[31m", "\x1b[0m"),
            (true, Level::WARN) => ("\x1b[33m", "\x1b[0m"),
            (true, Level::INFO) => ("\x1b[32m", "\x1b[0m"),
            (true, Level::DEBUG) => ("\x1b[34m", "\x1b[0m"),
            (true, _) => ("\x1b[35m", "\x1b[0m"),
        };
        let _ = write!(line, " {color}{:>5}{reset} ", level.as_str());
        if let Some((file, number)) = origin.filter(|_| self.show_origin) {
            let _ = write!(line, "{file}:{number}: ");
        }
        line.push_str(message);
        line.push('\n');
        let _ = self.sink.clone().write_all(line.as_bytes());
    }
}

/// `2026-12-07T09:33:40.093010Z`: UTC with microseconds, as tracing-subscriber wrote it.
fn push_timestamp(line: &mut String, now: SystemTime) {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let t = devices::cmos::DateTime::from_unix(since.as_secs() as i64);
    let _ = write!(
        line,
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        t.year,
        t.month,
        t.day,
        t.hour,
        t.minute,
        t.second,
        since.subsec_micros()
    );
}

/// An event's message first, then its other fields as ` name=value`.
#[derive(Default)]
struct Message {
    text: String,
    fields: String,
}

impl Visit for Message {
    fn record_str(&mut self, field: &Field, value: &str) {
        match field.name() {
            "message" => self.text.push_str(value),
            name => {
                let _ = write!(self.fields, " {name}={value:?}");
            }
        }
    }

    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        match field.name() {
            "message" => {
                let _ = write!(self.text, "{value:?}");
            }
            name => {
                let _ = write!(self.fields, " {name}={value:?}");
            }
        }
    }
}

/// The `tracing` subscriber: no spans (Ferrovisor makes none), events filtered and written.
struct Subscriber;

/// Span ids handed out, should a dependency make spans: they are not tracked.
static NEXT_SPAN: AtomicU64 = AtomicU64::new(1);

impl tracing::Subscriber for Subscriber {
    fn register_callsite(&self, metadata: &'static Metadata<'static>) -> Interest {
        match self.enabled(metadata) {
            true => Interest::always(),
            false => Interest::never(),
        }
    }

    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        SHARED.get().is_some_and(|s| s.enabled(metadata.target(), metadata.level()))
    }

    fn max_level_hint(&self) -> Option<LevelFilter> {
        SHARED.get().map(|s| s.filter.read().unwrap_or_else(|p| p.into_inner()).max())
    }

    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(NEXT_SPAN.fetch_add(1, Ordering::Relaxed).max(1))
    }

    fn record(&self, _: &Id, _: &Record<'_>) {}

    fn record_follows_from(&self, _: &Id, _: &Id) {}

    fn event(&self, event: &Event<'_>) {
        let Some(shared) = SHARED.get() else { return };
        let metadata = event.metadata();
        let mut message = Message::default();
        event.record(&mut message);
        message.text.push_str(&message.fields);
        let origin = metadata.file().zip(metadata.line());
        shared.write(metadata.level(), origin, &message.text);
    }

    fn enter(&self, _: &Id) {}

    fn exit(&self, _: &Id) {}
}

/// The `log` crate's records (virtio-queue, vfio-ioctls, vfio_user), through the same filter.
struct LogBridge;

fn level_of_record(level: log::Level) -> Level {
    match level {
        log::Level::Error => Level::ERROR,
        log::Level::Warn => Level::WARN,
        log::Level::Info => Level::INFO,
        log::Level::Debug => Level::DEBUG,
        log::Level::Trace => Level::TRACE,
    }
}

fn log_max(level: LevelFilter) -> log::LevelFilter {
    match level.into_level() {
        None => log::LevelFilter::Off,
        Some(Level::ERROR) => log::LevelFilter::Error,
        Some(Level::WARN) => log::LevelFilter::Warn,
        Some(Level::INFO) => log::LevelFilter::Info,
        Some(Level::DEBUG) => log::LevelFilter::Debug,
        Some(_) => log::LevelFilter::Trace,
    }
}

impl log::Log for LogBridge {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        SHARED.get().is_some_and(|s| s.enabled(metadata.target(), &level_of_record(metadata.level())))
    }

    fn log(&self, record: &log::Record<'_>) {
        if let Some(shared) = SHARED.get().filter(|_| self.enabled(record.metadata())) {
            let origin = record.file().zip(record.line());
            shared.write(&level_of_record(record.level()), origin, &record.args().to_string());
        }
    }

    fn flush(&self) {}
}

static LOG_BRIDGE: LogBridge = LogBridge;

/// virtio-queue logs each malformed ring it meets at ERROR, with no limit: a guest could flood
/// the log through it. Ferrovisor reports the same faults itself, rate-limited.
const QUIET: &str = "virtio_queue=off";

/// The handle that changes the logger after start.
pub struct Logger;

/// Logs to stderr at `level` (RUST_LOG overrides it), with each line's source file and line
/// when `show_origin`.
pub fn init(level: &str, show_origin: bool) -> Result<Logger, String> {
    let from_env = std::env::var("RUST_LOG").ok().and_then(|text| Filter::parse(&text).ok());
    let filter = match from_env {
        Some(filter) => filter,
        None => Filter::parse(&format!("{level},{QUIET}"))
            .ok()
            .filter(|_| parse_level(level).is_some())
            .ok_or_else(|| format!("--log-level must be error, warn, info, debug or trace, not '{level}'."))?,
    };
    let max = filter.max();
    let shared = Shared {
        filter: RwLock::new(filter),
        sink: Sink(Arc::new(Mutex::new(Box::new(Stderr)))),
        show_origin,
        ansi: std::io::stderr().is_terminal(),
    };
    if SHARED.set(shared).is_err() {
        return Err("The logger was already set up.".into());
    }
    tracing::subscriber::set_global_default(Subscriber)
        .map_err(|e| format!("The logger cannot be installed ({e})."))?;
    if log::set_logger(&LOG_BRIDGE).is_ok() {
        log::set_max_level(log_max(max));
    }
    Ok(Logger)
}

impl Logger {
    /// Applies `PUT /logger`: the file (appended to), the level and an optional module filter.
    pub fn apply(&self, config: &api::models::Logger) -> Result<(), String> {
        let Some(shared) = SHARED.get() else { return Err("The logger is not set up.".into()) };
        if let Some(path) = &config.log_path {
            // A FIFO is never waited on: lines a full one cannot take are dropped.
            let file = sandbox::files::open_output(std::path::Path::new(path), "logger log_path")?;
            // The report of a forbidden system call goes to the log too; the fd stays open for
            // the life of the process (a logger is set once or twice).
            if let Ok(copy) = file.try_clone() {
                sandbox::report_to(std::os::fd::IntoRawFd::into_raw_fd(copy));
            }
            *shared.sink.0.lock().unwrap_or_else(|p| p.into_inner()) = Box::new(file);
        }
        if config.level.is_some() || config.module.is_some() {
            let level = config.level.map_or("info", |l| l.filter());
            let directive = match &config.module {
                Some(module) => format!("warn,{QUIET},{module}={level}"),
                None => format!("{level},{QUIET}"),
            };
            let filter = Filter::parse(&directive)
                .map_err(|e| format!("logger module '{directive}' is not a valid filter ({e}); give a crate name."))?;
            let max = filter.max();
            *shared.filter.write().unwrap_or_else(|p| p.into_inner()) = filter;
            log::set_max_level(log_max(max));
            // Callsites cached their interest under the old filter.
            tracing::callsite::rebuild_interest_cache();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_parse_as_rust_log_does() {
        let f = Filter::parse("info,virtio_queue=off,vmm::controller=debug,vmm=warn").unwrap();
        assert!(f.enabled("ferrovisor::cli", &Level::INFO));
        assert!(!f.enabled("ferrovisor::cli", &Level::DEBUG));
        assert!(!f.enabled("virtio_queue::queue", &Level::ERROR));
        assert!(f.enabled("vmm::controller", &Level::DEBUG), "the longest target decides");
        assert!(!f.enabled("vmm::vm", &Level::INFO));
        assert_eq!(f.max(), LevelFilter::DEBUG);
        assert_eq!(Filter::parse("Warning").unwrap().default, LevelFilter::WARN);
        assert!(Filter::parse("vmm").unwrap().enabled("vmm::vm", &Level::TRACE), "a bare target is all of it");
        assert_eq!(Filter::parse("").unwrap(), Filter { default: LevelFilter::ERROR, targets: Vec::new() });
        for bad in ["vmm=loud", "=info", "a b=info", "vmm=info=debug"] {
            assert!(Filter::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn timestamps_are_utc_with_microseconds() {
        let mut line = String::new();
        push_timestamp(&mut line, UNIX_EPOCH + std::time::Duration::from_micros(1_764_495_220_093_010));
        assert_eq!(line, "2025-11-30T09:33:40.093010Z");
        line.clear();
        push_timestamp(&mut line, UNIX_EPOCH + std::time::Duration::from_secs(951_782_400));
        assert_eq!(line, "2000-02-29T00:00:00.000000Z", "a leap day");
        line.clear();
        push_timestamp(&mut line, UNIX_EPOCH);
        assert_eq!(line, "1970-01-01T00:00:00.000000Z");
    }
}
