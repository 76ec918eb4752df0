//! Thread failures of a run: every thread the engine spawns (shard workers,
//! the writer, the KairosDB senders, and whoever else takes a [`Failures`])
//! runs its body under [`Failures::spawn`], and the router under
//! [`Failures::guard`], so that a thread that dies stops the whole run loudly
//! instead of leaving a half-working engine.
//!
//! Protocol, when a guarded thread panics:
//! 1. the panic hook installed by the first guarded spawn keeps the message and
//!    its location for that thread and prints nothing (the run prints it once);
//! 2. the guard records `(thread name, message)`; the first failure of a run
//!    wins, later ones are only logged;
//! 3. [`Failures::failed`] turns true: the router stops reading, the other
//!    stages drain and close as on a stop, and no checkpoint or source position
//!    is published past what the sink acknowledged;
//! 4. `run` returns `RunError::Panicked { thread, message }`, which the
//!    command line prints as one line (`expmon: error: thread … panicked: …`)
//!    before exiting 1.
//!
//! A thread that ends with an error instead of a panic calls
//! [`Failures::halt`]: the run stops the same way, and its own error is the
//! one returned.
//!
//! Also here, because every stage needs them and they need nothing of the
//! engine: [`lock`] (a mutex taken over even when poisoned, since a panic
//! already stops the run) and [`failpoint`] (crash testing: abort or panic at
//! a named point).

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex, MutexGuard, Once, OnceLock};
use std::thread::JoinHandle;

/// Locks `m`, taking a poisoned lock over as it is.
// A lock is poisoned only by a thread that panicked holding it, and every
// thread of a run is guarded here: the panic already stops the run, so the
// others only read or finish what the mutex holds, and may do so.
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The first thread that died in a run, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ThreadFailure {
    pub thread: String,
    pub message: String,
}

/// Shared by all threads of a run (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct Failures {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Set by the first failure or halt; the router watches it.
    failed: AtomicBool,
    first: Mutex<Option<ThreadFailure>>,
}

thread_local! {
    /// Set on a guarded thread: its panics are reported by the run, not the hook.
    static GUARDED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The last panic of this thread, with its location, kept by the hook.
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// Installs (once per process) a panic hook that keeps the message of a panic
/// on a guarded thread for its guard and prints nothing; panics elsewhere, and
/// every panic when `RUST_BACKTRACE` is set, go to the previous hook as before.
fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = std::panic::take_hook();
        let backtrace = std::env::var_os("RUST_BACKTRACE").is_some_and(|v| v != "0");
        std::panic::set_hook(Box::new(move |info| {
            if !GUARDED.with(|g| g.get()) || backtrace {
                previous(info);
            }
            if GUARDED.with(|g| g.get()) {
                let mut message = payload_text(info.payload());
                if let Some(at) = info.location() {
                    message = format!("{message} (at {}:{})", at.file(), at.line());
                }
                LAST_PANIC.with(|p| *p.borrow_mut() = Some(message));
            }
        }));
    });
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}

impl Failures {
    /// Records that `thread` died of `message` and stops the run. The first
    /// failure is the one the run reports; later ones are logged.
    pub fn record(&self, thread: &str, message: &str) {
        let message = message.replace('\n', " ");
        let mut first = lock(&self.inner.first);
        if first.is_none() {
            *first = Some(ThreadFailure { thread: thread.to_string(), message });
        } else {
            tracing::error!("thread {thread} panicked too: {message}");
        }
        self.inner.failed.store(true, Relaxed);
    }

    /// Stops the run without a failure of its own (a thread that returns an
    /// error reports it itself).
    pub fn halt(&self) {
        self.inner.failed.store(true, Relaxed);
    }

    /// A thread died or halted: stop reading and drain.
    pub fn failed(&self) -> bool {
        self.inner.failed.load(Relaxed)
    }

    /// The first thread that died, if any.
    pub fn first(&self) -> Option<ThreadFailure> {
        lock(&self.inner.first).clone()
    }

    /// Runs `body` on this thread under the guard, as the thread (or stage)
    /// `name`: a panic is recorded here (and stops the run) and gives `None`.
    pub fn guard<T>(&self, name: &str, body: impl FnOnce() -> T) -> Option<T> {
        install_hook();
        let was = GUARDED.with(|g| g.replace(true));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(body));
        GUARDED.with(|g| g.set(was));
        match result {
            Ok(v) => Some(v),
            Err(payload) => {
                let message = LAST_PANIC.with(|p| p.borrow_mut().take()).unwrap_or_else(|| payload_text(&*payload));
                self.record(name, &message);
                None
            }
        }
    }

    /// Spawns a thread named `name` whose body runs under [`Failures::guard`].
    /// Joining it gives `None` if it panicked.
    pub fn spawn<T, F>(&self, name: String, body: F) -> std::io::Result<JoinHandle<Option<T>>>
    where
        F: FnOnce() -> T + Send + 'static,
        T: Send + 'static,
    {
        let failures = self.clone();
        std::thread::Builder::new().name(name.clone()).spawn(move || failures.guard(&name, body))
    }
}

/// Crash testing: `EXPMON_FAILPOINT=NAME` (or `NAME@N`, the Nth time) aborts
/// the process at the named point, as a power cut would;
/// `EXPMON_FAILPOINT=panic:NAME[@N]` panics the thread that reaches it instead
/// (a bug in that thread), which must stop the run with one error line.
#[track_caller]
pub fn failpoint(name: &str) {
    static SPEC: OnceLock<Option<(bool, String, u64)>> = OnceLock::new();
    static HITS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let spec = SPEC.get_or_init(|| {
        let v = std::env::var("EXPMON_FAILPOINT").ok()?;
        let (panics, v) = match v.strip_prefix("panic:") {
            Some(rest) => (true, rest),
            None => (false, v.as_str()),
        };
        let (n, at) = v.split_once('@').unwrap_or((v, "1"));
        Some((panics, n.to_string(), at.parse().unwrap_or(1)))
    });
    if let Some((panics, n, at)) = spec {
        if n == name && HITS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1 == *at {
            if *panics {
                panic!("failpoint {name}");
            }
            tracing::error!("failpoint {name}: aborting");
            std::process::abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_is_recorded_once_with_the_thread_name_and_stops_the_run() {
        let f = Failures::default();
        assert!(!f.failed());
        let ok = f.spawn("expmon-test-ok".into(), || 7).unwrap();
        assert_eq!(ok.join().unwrap(), Some(7));
        assert!(!f.failed());
        let bad = f.spawn("expmon-test-0".into(), || -> u8 { panic!("boom {}", 1) }).unwrap();
        assert_eq!(bad.join().unwrap(), None);
        assert!(f.failed());
        let first = f.first().unwrap();
        assert_eq!(first.thread, "expmon-test-0");
        assert!(first.message.starts_with("boom 1 (at src/failures.rs:"), "{}", first.message);
        let later = f.spawn("expmon-test-1".into(), || panic!("again")).unwrap();
        assert_eq!(later.join().unwrap(), None::<()>);
        assert_eq!(f.first().unwrap().thread, "expmon-test-0", "the first failure is the one reported");
    }
}
