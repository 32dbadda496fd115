//! Starting threads under the filters. A new thread inherits its creator's filter beneath its
//! own, so filtered threads never start threads themselves: they ask the launcher, a thread
//! filtered to little more than starting threads, and each new thread installs its own filter
//! first thing.

use std::any::Any;
use std::io;
use std::marker::PhantomData;
use std::os::unix::thread::JoinHandleExt;
use std::sync::OnceLock;
use std::sync::mpsc::{Sender, sync_channel};
use std::thread::JoinHandle;

use crate::ThreadKind;

type Body = Box<dyn FnOnce() -> Box<dyn Any + Send> + Send>;
type Handle = JoinHandle<Box<dyn Any + Send>>;

struct Request {
    kind: ThreadKind,
    name: String,
    stack: Option<usize>,
    body: Body,
    reply: std::sync::mpsc::SyncSender<io::Result<Handle>>,
}

static LAUNCHER: OnceLock<Sender<Request>> = OnceLock::new();

/// A thread started by [`spawn`], joined for its result like a `JoinHandle`.
pub struct Thread<T> {
    handle: Handle,
    result: PhantomData<fn() -> T>,
}

impl<T: 'static> Thread<T> {
    /// Waits for the thread; Err if it panicked.
    pub fn join(self) -> std::thread::Result<T> {
        self.handle.join().map(|any| match any.downcast::<T>() {
            Ok(value) => *value,
            // `start` boxes exactly a T.
            Err(_) => unreachable!("a thread's result has the type it was spawned with"),
        })
    }

    pub fn is_finished(&self) -> bool {
        self.handle.is_finished()
    }

    pub fn thread(&self) -> &std::thread::Thread {
        self.handle.thread()
    }
}

// SAFETY: the pthread_t is the live thread's (the JoinHandle keeps it joinable, so it is not
// reused) for as long as this Thread exists.
unsafe impl<T> vmm_sys_util::signal::Killable for Thread<T> {
    fn pthread_handle(&self) -> libc::pthread_t {
        self.handle.as_pthread_t()
    }
}

/// Starts `body` on a new thread named `name` under `kind`'s filter.
pub fn spawn<T: Send + 'static>(
    kind: ThreadKind,
    name: impl Into<String>,
    body: impl FnOnce() -> T + Send + 'static,
) -> io::Result<Thread<T>> {
    spawn_with_stack(kind, name, None, body)
}

/// [`spawn`] with a stack of `stack` bytes (the default otherwise).
pub fn spawn_with_stack<T: Send + 'static>(
    kind: ThreadKind,
    name: impl Into<String>,
    stack: Option<usize>,
    body: impl FnOnce() -> T + Send + 'static,
) -> io::Result<Thread<T>> {
    let body: Body = Box::new(move || Box::new(body()) as Box<dyn Any + Send>);
    let name = name.into();
    let handle = match LAUNCHER.get() {
        Some(launcher) => {
            let (reply, answer) = sync_channel(1);
            launcher
                .send(Request { kind, name, stack, body, reply })
                .map_err(|_| io::Error::other("the thread launcher has stopped"))?;
            answer.recv().map_err(|_| io::Error::other("the thread launcher has stopped"))??
        }
        None => start(kind, name, stack, body)?,
    };
    Ok(Thread { handle, result: PhantomData })
}

fn start(kind: ThreadKind, name: String, stack: Option<usize>, body: Body) -> io::Result<Handle> {
    let mut builder = std::thread::Builder::new().name(name);
    if let Some(stack) = stack {
        builder = builder.stack_size(stack);
    }
    // Wait until the thread has its name and filter, so whoever looks at /proc once spawn
    // returns (Kata finds vCPU threads by name right after InstanceStart) sees them.
    let (started, wait_started) = sync_channel(1);
    let handle = builder.spawn(move || {
        crate::policy::apply_or_exit(kind);
        let _ = started.send(());
        body()
    })?;
    let _ = wait_started.recv();
    Ok(handle)
}

/// Starts the launcher, which then applies its own filter. Called once, before any thread has
/// a filter.
pub(crate) fn run() -> io::Result<()> {
    let (requests, received) = std::sync::mpsc::channel::<Request>();
    std::thread::Builder::new().name("launcher".into()).spawn(move || {
        crate::policy::apply_or_exit(ThreadKind::Launcher);
        for request in received {
            let Request { kind, name, stack, body, reply } = request;
            let _ = reply.send(start(kind, name, stack, body));
        }
    })?;
    LAUNCHER.set(requests).map_err(|_| io::Error::other("the thread launcher runs already"))
}
