//! The logger: `tracing` to stderr, or to the file `PUT /logger` names; its level can change
//! while the VMM runs.

use std::io::{IsTerminal, Write};
use std::sync::{Arc, Mutex};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, reload};

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

/// The handles that change the logger after start.
pub struct Logger {
    filter: reload::Handle<EnvFilter, Registry>,
    sink: Sink,
}

/// virtio-queue logs each malformed ring it meets at ERROR, with no limit: a guest could flood
/// the log through it. Ferrovisor reports the same faults itself, rate-limited.
const QUIET: &str = "virtio_queue=off";

/// Logs to stderr at `level` (RUST_LOG overrides it), with each line's source file and line
/// when `show_origin`.
pub fn init(level: &str, show_origin: bool) -> Result<Logger, String> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(format!("{level},{QUIET}")))
        .map_err(|_| format!("--log-level must be error, warn, info, debug or trace, not '{level}'."))?;
    let (filter, handle) = reload::Layer::new(filter);
    let sink = Sink(Arc::new(Mutex::new(Box::new(Stderr))));
    let writer = sink.clone();
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_writer(move || writer.clone())
                .with_target(false)
                .with_file(show_origin)
                .with_line_number(show_origin)
                .with_ansi(std::io::stderr().is_terminal()),
        )
        .init();
    Ok(Logger { filter: handle, sink })
}

impl Logger {
    /// Applies `PUT /logger`: the file (appended to), the level and an optional module filter.
    pub fn apply(&self, config: &api::models::Logger) -> Result<(), String> {
        if let Some(path) = &config.log_path {
            // A FIFO is never waited on: lines a full one cannot take are dropped.
            let file = sandbox::files::open_output(std::path::Path::new(path), "logger log_path")?;
            // The report of a forbidden system call goes to the log too; the fd stays open for
            // the life of the process (a logger is set once or twice).
            if let Ok(copy) = file.try_clone() {
                sandbox::report_to(std::os::fd::IntoRawFd::into_raw_fd(copy));
            }
            *self.sink.0.lock().unwrap_or_else(|p| p.into_inner()) = Box::new(file);
        }
        if config.level.is_some() || config.module.is_some() {
            let level = config.level.map_or("info", |l| l.filter());
            let directive = match &config.module {
                Some(module) => format!("warn,{QUIET},{module}={level}"),
                None => format!("{level},{QUIET}"),
            };
            let filter = EnvFilter::try_new(&directive)
                .map_err(|e| format!("logger module '{directive}' is not a valid filter ({e}); give a crate name."))?;
            self.filter.reload(filter).map_err(|e| format!("The log level cannot change now ({e})."))?;
        }
        Ok(())
    }
}
