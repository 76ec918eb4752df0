//! KairosDB sink (`kairosdb:http[s]://[user:pass@]HOST:PORT[?options]`):
//! batch → encode (JSON, gzip) → send (HTTP POST) → retry.
//!
//! Data path: the writer stage `put`s changed totals into a bounded
//! [`CoalescingQueue`]; `inflight` sender threads take batches (by points,
//! bytes and linger time), encode them grouped by series, and POST them to
//! `/api/v1/datapoints`. Health points take the same batching (`batch`,
//! `batch_bytes`) from their own slot, where a newer snapshot replaces one
//! not yet sent. Protocol facts respected (from KairosDB's docs):
//! `204` means queued; `400` returns `{"errors":[…]}` and may have stored the
//! valid part, so it is never retried (the points are counted, logged at most
//! every 10 s, written to a dead-letter file with the error text once per
//! request, as `refuse` describes, and reported at the end as a loss); `5xx`,
//! `429`, timeouts and transport errors are retried with exponential backoff
//! and full jitter. Writing the same
//! metric, tags and timestamp again overwrites, so re-sending is harmless.
//!
//! The catalog that names points travels with the queue: a reload replaces it
//! there before the first point that needs it is put, and a sender names a
//! batch with the queue's catalog read after taking it (indices only grow, so
//! a newer catalog names older points too).
//!
//! A sender that panics puts its batch back for the others, then dies under
//! the run's [`Failures`] guard (which stops the run); once no sender is left,
//! nothing waits for them any more (see [`CoalescingQueue`]).
//!
//! Shutdown protocol:
//! 1. `close` marks the queue closing: senders stop lingering and drain.
//! 2. It waits until nothing is outstanding, the drain deadline passes, or
//!    no sender is left.
//! 3. Senders are told to stop; what was not delivered, and what was refused,
//!    is reported.

mod encode;
mod queue;

pub use encode::{encode_batch, encode_health};
pub use queue::CoalescingQueue;

use hdrhistogram::Histogram;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::json::{format_health, format_point};
use super::{Sink, SinkError};
use crate::address::{positive, split_query, Keys, OptionError, Options};
use crate::aggregate::{Namer, Point};
use crate::config::{parse_duration_ms, Catalog};
use crate::failures::lock;
use crate::failures::Failures;
use crate::metrics::{HealthPoint, LatencyBuckets, SinkHealth, SinkReport};

/// Options of the KairosDB sink, from the query string of its spec.
#[derive(Debug, Clone)]
pub struct KairosOptions {
    /// Base URL without credentials, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    pub user: Option<(String, String)>,
    /// Most points in one request (`batch`).
    pub batch_points: usize,
    /// Most uncompressed JSON bytes in one request (`batch_bytes`).
    pub batch_bytes: usize,
    /// How long a point may wait for a fuller batch (`linger`).
    pub linger: Duration,
    /// Requests in flight at once (`inflight`).
    pub in_flight: usize,
    /// Request timeout (`timeout`).
    pub timeout: Duration,
    /// Most points waiting before the engine is held back (`queue`).
    pub queue_points: usize,
    /// Backoff bounds (`backoff`, `backoff_max`).
    pub backoff: Duration,
    pub backoff_max: Duration,
    /// How long shutdown may spend delivering what is left (`drain`).
    pub drain: Duration,
    /// Where rejected points are written (`dead_letter`).
    pub dead_letter: String,
    /// Extra trusted CA certificate (PEM file) for `https` (`ca`).
    pub ca: Option<String>,
}

impl KairosOptions {
    /// Parses `http[s]://[user:pass@]host:port[?k=v&…]`.
    pub fn parse(spec: &str) -> Result<KairosOptions, SinkError> {
        let shown = crate::redact::redact(&format!("kairosdb:{spec}"));
        let bad = |why: String| SinkError::BadOption { sink: shown.clone(), why };
        let (base, query) = split_query(spec);
        let (scheme, rest) = base.split_once("://").ok_or_else(|| bad("expected http://HOST:PORT".into()))?;
        if scheme != "http" && scheme != "https" {
            return Err(bad(format!("scheme {scheme:?} is not http or https")));
        }
        let (user, host) = match rest.rsplit_once('@') {
            Some((cred, host)) => {
                let (u, p) = cred.split_once(':').unwrap_or((cred, ""));
                (Some((u.to_string(), p.to_string())), host)
            }
            None => (None, rest),
        };
        let host = host.trim_end_matches('/');
        check_host_port(host).map_err(|why| bad(why.into()))?;
        let options = || -> Result<KairosOptions, OptionError> {
            let o = Options::parse(query, &KEYS)?;
            let dur = |key| {
                o.value(key, |v| {
                    parse_duration_ms(v).map(|ms| Duration::from_millis(ms as u64)).map_err(|e| e.to_string())
                })
            };
            let timeout = o.value("timeout", |v| match parse_duration_ms(v).map_err(|e| e.to_string())? {
                0 => Err("must be more than 0".to_string()),
                ms => Ok(Duration::from_millis(ms as u64)),
            })?;
            let text = |key| o.get(key).map(str::to_string);
            Ok(KairosOptions {
                url: format!("{scheme}://{host}"),
                user,
                batch_points: o.value("batch", positive)?.unwrap_or(5_000),
                batch_bytes: o.value("batch_bytes", positive)?.unwrap_or(4 << 20),
                linger: dur("linger")?.unwrap_or(Duration::from_millis(100)),
                in_flight: o.value("inflight", positive)?.unwrap_or(4),
                timeout: timeout.unwrap_or(Duration::from_secs(10)),
                queue_points: o.value("queue", positive)?.unwrap_or(2_000_000),
                backoff: dur("backoff")?.unwrap_or(Duration::from_millis(100)),
                backoff_max: dur("backoff_max")?.unwrap_or(Duration::from_secs(30)),
                drain: dur("drain")?.unwrap_or(Duration::from_secs(30)),
                dead_letter: text("dead_letter").unwrap_or_else(|| "expmon-out/kairosdb-rejected.jsonl".into()),
                ca: text("ca"),
            })
        };
        options().map_err(|e| bad(e.to_string()))
    }
}

/// The options of a `kairosdb:` address (see [`KairosOptions`]).
static KEYS: Keys = Keys {
    known: &[
        "batch",
        "batch_bytes",
        "linger",
        "inflight",
        "timeout",
        "queue",
        "backoff",
        "backoff_max",
        "drain",
        "dead_letter",
        "ca",
    ],
    passed_on: None,
};

/// `HOST[:PORT]` with a non-empty host (a name, an IPv4 address or `[IPv6]`)
/// and, if given, a port number: what an HTTP client can connect to.
fn check_host_port(authority: &str) -> Result<(), &'static str> {
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => {
            let (h, rest) = v6.split_once(']').ok_or("an IPv6 host is written [ADDR]:PORT")?;
            (h, rest.strip_prefix(':'))
        }
        None => match authority.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (authority, None),
        },
    };
    if host.is_empty() {
        return Err("no host before the port (expected http://HOST:PORT)");
    }
    if host.contains(['/', '?', '#', ' ']) {
        return Err("the host has a character a host name cannot have");
    }
    match port {
        Some(p) if p.parse::<u16>().ok().filter(|p| *p > 0).is_none() => {
            Err("the port is not a number from 1 to 65535")
        }
        _ => Ok(()),
    }
}

/// Counters of the sink, shared by its threads; updated per request.
#[derive(Debug, Default)]
pub struct KairosStats {
    pub requests: AtomicU64,
    pub points_delivered: AtomicU64,
    pub points_rejected: AtomicU64,
    /// Failed attempts that will be retried.
    pub retries: AtomicU64,
}

struct Shared {
    opts: KairosOptions,
    queue: CoalescingQueue,
    client: reqwest::blocking::Client,
    stats: KairosStats,
    latency_us: Mutex<Histogram<u64>>,
    /// The same latencies in `/metrics`' fixed buckets.
    latency_buckets: Mutex<LatencyBuckets>,
    stop: AtomicBool,
    refusals: Mutex<Refusals>,
    /// The newest health snapshot not yet sent (a newer one replaces it).
    health: Mutex<Option<(i64, Vec<HealthPoint>)>>,
    /// When a retry was last logged, by any sender: at most one line every
    /// [`RETRY_LOG_EVERY`] for all of them together.
    retry_logged: Mutex<Option<Instant>>,
}

/// How often a failing, retried write is logged.
const RETRY_LOG_EVERY: Duration = Duration::from_secs(10);

pub struct KairosSink {
    shared: Arc<Shared>,
    senders: Vec<JoinHandle<Option<()>>>,
}

impl KairosSink {
    /// Checks that `opts.url` answers as KairosDB, then starts the senders
    /// (whose death is recorded in `failures`).
    pub fn connect(opts: KairosOptions, catalog: Arc<Catalog>, failures: &Failures) -> Result<KairosSink, SinkError> {
        let mut builder =
            reqwest::blocking::Client::builder().timeout(opts.timeout).pool_max_idle_per_host(opts.in_flight);
        if let Some(path) = &opts.ca {
            let pem = std::fs::read(path).map_err(|error| SinkError::KairosCa { path: path.clone(), error })?;
            let cert = reqwest::Certificate::from_pem(&pem)
                .map_err(|error| SinkError::KairosCert { path: path.clone(), error })?;
            builder = builder.add_root_certificate(cert);
        }
        let client = builder.build().map_err(SinkError::KairosClient)?;
        check_version(&client, &opts)?;
        let shared = Arc::new(Shared {
            queue: CoalescingQueue::new(opts.queue_points, catalog),
            client,
            stats: KairosStats::default(),
            latency_us: Mutex::new(Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")),
            latency_buckets: Mutex::default(),
            stop: AtomicBool::new(false),
            refusals: Mutex::default(),
            health: Mutex::new(None),
            retry_logged: Mutex::new(None),
            opts,
        });
        let senders = (0..shared.opts.in_flight)
            .map(|i| {
                let s = shared.clone();
                s.queue.sender_joined();
                failures
                    .spawn(format!("expmon-kairos-{i}"), move || {
                        // Leaves the queue however the thread ends (panics included).
                        let _left = SenderLeaves(&s.queue);
                        send_loop(&s, crate::clock::now_ms() as u64 ^ i as u64)
                    })
                    .expect("spawn kairosdb sender")
            })
            .collect();
        Ok(KairosSink { shared, senders })
    }

    pub fn stats(&self) -> &KairosStats {
        &self.shared.stats
    }
}

/// Tells the queue a sender is gone when dropped.
struct SenderLeaves<'a>(&'a CoalescingQueue);

impl Drop for SenderLeaves<'_> {
    fn drop(&mut self) {
        self.0.sender_left();
    }
}

/// `GET /api/v1/version` must answer `{"version":"KairosDB …"}`.
fn check_version(client: &reqwest::blocking::Client, opts: &KairosOptions) -> Result<(), SinkError> {
    let url = format!("{}/api/v1/version", opts.url);
    let mut req = client.get(&url);
    if let Some((u, p)) = &opts.user {
        req = req.basic_auth(u, Some(p));
    }
    let resp = req.send().map_err(|error| SinkError::KairosUnreachable { url: opts.url.clone(), error })?;
    let status = resp.status();
    let body = resp.text().unwrap_or_default();
    let version = serde_json::from_str::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v.get("version").and_then(|v| v.as_str()).map(str::to_string));
    match version {
        Some(v) if status.is_success() && v.starts_with("KairosDB") => Ok(()),
        _ => Err(SinkError::NotKairos { url: opts.url.clone(), status, body: body.chars().take(120).collect() }),
    }
}

/// Most bytes of a server's error text kept in the dead-letter file (per
/// refused request).
const ERROR_TEXT_MAX: usize = 1024;
/// Most bytes of a server's error text in a log line.
const LOG_TEXT_MAX: usize = 300;

/// What became of one request.
enum Outcome {
    Delivered,
    /// A 4xx other than 429: the server refused the points; never retried.
    /// The error text is cut to [`ERROR_TEXT_MAX`].
    Rejected {
        status: u16,
        error: String,
    },
    /// Worth retrying: transport error, timeout, 5xx, 429 (cut to [`LOG_TEXT_MAX`]).
    Retry(String),
}

/// `text` cut to at most `max` bytes at a char boundary; a cut text ends
/// with `…` and its full length.
fn clip(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}… ({} bytes)", &text[..end], text.len())
}

fn post(s: &Shared, body: Vec<u8>) -> Outcome {
    let mut req = s
        .client
        .post(format!("{}/api/v1/datapoints", s.opts.url))
        .header("Content-Type", "application/json")
        .header("Content-Encoding", "gzip")
        .body(body);
    if let Some((u, p)) = &s.opts.user {
        req = req.basic_auth(u, Some(p));
    }
    match req.send() {
        Err(e) => Outcome::Retry(clip(&e.to_string(), LOG_TEXT_MAX)),
        Ok(resp) => {
            let status = resp.status();
            if status.is_success() {
                return Outcome::Delivered;
            }
            let text = resp.text().unwrap_or_default();
            if status.as_u16() == 429 || status.is_server_error() {
                Outcome::Retry(clip(format!("{status} {text}").trim_end(), LOG_TEXT_MAX))
            } else {
                Outcome::Rejected { status: status.as_u16(), error: clip(&text, ERROR_TEXT_MAX) }
            }
        }
    }
}

fn send_loop(s: &Shared, seed: u64) {
    let mut rng = Pcg64Mcg::seed_from_u64(seed);
    let mut failures = 0u32;
    while !s.stop.load(Relaxed) {
        let mut failed = send_health(s);
        match s.queue.take(s.opts.batch_points, s.opts.linger) {
            None => {
                send_health(s);
                return;
            }
            Some(batch) if batch.is_empty() => {}
            Some(batch) => {
                // Read after the take: at least as new as every point in the batch.
                let catalog = s.queue.catalog();
                let ttl_s = catalog.engine.ttl_s;
                // The namer holds read locks on the name tables: never across a
                // request or a backoff, or a new name would stall the router.
                let sent = send_parts(
                    s,
                    batch,
                    |part| {
                        crate::failures::failpoint("kairos.send");
                        encode_batch(part, &Namer::new(&catalog), ttl_s)
                    },
                    |part, status, error| {
                        let namer = Namer::new(&catalog);
                        refuse(s, status, error, part.len(), |out| {
                            part.iter().for_each(|p| format_point(out, p, &namer))
                        })
                    },
                    // Failed points go back to the queue, where a newer total
                    // may replace them meanwhile.
                    |part, done| s.queue.finish(part, done),
                );
                failed = failed.or(sent);
            }
        }
        let Some(why) = failed else {
            failures = 0;
            continue;
        };
        {
            let mut logged = lock(&s.retry_logged);
            if logged.is_none_or(|t| t.elapsed() >= RETRY_LOG_EVERY) {
                tracing::warn!("kairosdb write failed, retrying with backoff (said at most every 10 s): {why}");
                *logged = Some(Instant::now());
            }
        }
        // Full jitter: sleep uniformly in [0, min(max, base·2ⁿ)].
        let cap = s.opts.backoff.saturating_mul(1 << failures.min(20)).min(s.opts.backoff_max);
        failures += 1;
        let sleep = cap.mul_f64(rng.gen::<f64>());
        sleep_unless_stopped(s, sleep);
    }
}

/// Sends one batch (at most `batch` points) in requests of at most
/// `batch_bytes` JSON bytes: a part that encodes bigger is halved. The same
/// path serves experiment points and health points, so both respect both
/// limits. A part delivered, or refused for good (then `refused` counts and
/// dead-letters it), ends with `finish(part, true)`. At the first retryable failure that
/// part and the parts not yet sent end with `finish(part, false)`, and the
/// error is returned.
fn send_parts<T>(
    s: &Shared,
    batch: Vec<T>,
    encode: impl Fn(&[T]) -> (Vec<u8>, usize),
    refused: impl Fn(&[T], u16, &str),
    mut finish: impl FnMut(&[T], bool),
) -> Option<String> {
    let mut parts = vec![batch];
    while let Some(part) = parts.pop() {
        let encoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| encode(&part)));
        let (body, raw_len) = match encoded {
            Ok(encoded) => encoded,
            Err(panic) => {
                // Its points go back for the other senders; then this thread
                // dies under the run's guard, loudly.
                finish(&part, false);
                for rest in parts.drain(..) {
                    finish(&rest, false);
                }
                std::panic::resume_unwind(panic);
            }
        };
        if raw_len > s.opts.batch_bytes && part.len() > 1 {
            let mut a = part;
            let b = a.split_off(a.len() / 2);
            parts.push(a);
            parts.push(b);
            continue;
        }
        let started = Instant::now();
        let outcome = post(s, body);
        s.stats.requests.fetch_add(1, Relaxed);
        let us = started.elapsed().as_micros().max(1) as u64;
        let _ = s.latency_us.lock().map(|mut h| h.saturating_record(us));
        lock(&s.latency_buckets).record(us);
        match outcome {
            Outcome::Delivered => {
                s.stats.points_delivered.fetch_add(part.len() as u64, Relaxed);
                finish(&part, true);
            }
            Outcome::Rejected { status, error } => {
                s.stats.points_rejected.fetch_add(part.len() as u64, Relaxed);
                refused(&part, status, &error);
                finish(&part, true);
            }
            Outcome::Retry(why) => {
                s.stats.retries.fetch_add(1, Relaxed);
                finish(&part, false);
                for rest in parts.drain(..) {
                    finish(&rest, false);
                }
                return Some(why);
            }
        }
    }
    None
}

/// Sends the pending health snapshot, if any, in batches like experiment
/// points; what a retryable failure left unsent goes back unless a newer
/// snapshot arrived. Returns that failure.
fn send_health(s: &Shared) -> Option<String> {
    let (ts, points) = lock(&s.health).take()?;
    let ttl_s = s.queue.catalog().engine.ttl_s;
    let mut unsent = Vec::new();
    let mut failed = None;
    let mut points = points.into_iter().peekable();
    while points.peek().is_some() {
        let batch: Vec<HealthPoint> = points.by_ref().take(s.opts.batch_points).collect();
        if failed.is_some() {
            unsent.extend(batch);
            continue;
        }
        failed = send_parts(
            s,
            batch,
            |part| encode_health(part, ts, ttl_s),
            |part, status, error| {
                refuse(s, status, error, part.len(), |out| part.iter().for_each(|p| format_health(out, p, ts)))
            },
            |part, done| {
                if !done {
                    unsent.extend_from_slice(part);
                }
            },
        );
    }
    if !unsent.is_empty() {
        lock(&s.health).get_or_insert((ts, unsent));
    }
    failed
}

fn sleep_unless_stopped(s: &Shared, d: Duration) {
    let end = Instant::now() + d;
    while !s.stop.load(Relaxed) {
        let now = Instant::now();
        if now >= end {
            return;
        }
        std::thread::sleep((end - now).min(Duration::from_millis(20)));
    }
}

/// Points refused for good: what the dead-letter file holds, what the end
/// of the run reports, and the rate limit of the log.
#[derive(Default)]
struct Refusals {
    file: Option<BufWriter<File>>,
    /// Refused requests (numbering their dead-letter lines).
    requests: u64,
    /// HTTP statuses of the refusals.
    statuses: std::collections::BTreeSet<u16>,
    /// Refused points that could not be written to the dead-letter file, and why.
    lost: u64,
    lost_why: String,
    /// When a refusal was last logged, and the refusals not logged since.
    logged: Option<Instant>,
    quiet_requests: u64,
    quiet_points: u64,
}

/// Records one refused request: its line and its points in the dead-letter
/// file (appended), then at most one log line every 10 s.
///
/// Dead-letter format: one line per refused request,
/// `{"request":N,"status":400,"error":"…","points":M,"at":MS}` (N counts from 1
/// in each run; the error text cut to [`ERROR_TEXT_MAX`] bytes; `at` is the
/// wall clock), followed by its M points in the file sink's format
/// ([`crate::sink::json`]), each with `"request":N` added last.
fn refuse(s: &Shared, status: u16, error: &str, points: usize, lines: impl FnOnce(&mut String)) {
    use std::fmt::Write as _;
    let points = points as u64;
    let mut g = lock(&s.refusals);
    g.requests += 1;
    g.statuses.insert(status);
    let request = g.requests;
    let mut text = serde_json::json!({
        "request": request, "status": status, "error": error, "points": points, "at": crate::clock::now_ms(),
    })
    .to_string();
    text.push('\n');
    let mut file_lines = String::new();
    lines(&mut file_lines);
    for line in file_lines.lines() {
        // The file sink's line with `"request":N` last.
        let open = line.strip_suffix('}').expect("a JSON object");
        let _ = writeln!(text, "{open},\"request\":{request}}}");
    }
    let kept = match write_dead_letter(&mut g.file, &s.opts.dead_letter, &text) {
        Ok(()) => format!("dead-lettered to {}", s.opts.dead_letter),
        Err(e) => {
            g.lost += points;
            g.lost_why = e.to_string();
            format!("NOT kept: {e}")
        }
    };
    if g.logged.is_some_and(|t| t.elapsed() < Duration::from_secs(10)) {
        g.quiet_requests += 1;
        g.quiet_points += points;
        return;
    }
    let quiet = match g.quiet_requests {
        0 => String::new(),
        n => format!(" ({n} more requests, {} points, refused since last said)", g.quiet_points),
    };
    tracing::error!(
        "kairosdb refused {points} points with HTTP {status} (not retried, {kept}; said at most every 10 s){quiet}: {}",
        clip(error, LOG_TEXT_MAX)
    );
    (g.logged, g.quiet_requests, g.quiet_points) = (Some(Instant::now()), 0, 0);
}

/// Appends `text` to the dead-letter file, opening it on first use.
fn write_dead_letter(file: &mut Option<BufWriter<File>>, path: &str, text: &str) -> Result<(), SinkError> {
    if file.is_none() {
        let p = std::path::Path::new(path);
        if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let f = File::options()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|error| SinkError::DeadLetterOpen { path: path.to_string(), error })?;
        *file = Some(BufWriter::new(f));
    }
    let w = file.as_mut().expect("opened above");
    w.write_all(text.as_bytes())
        .and_then(|()| w.flush())
        .map_err(|error| SinkError::DeadLetterWrite { path: path.to_string(), error })
}

impl Sink for KairosSink {
    fn write(&mut self, points: &[Point], _: &Namer) -> Result<(), SinkError> {
        self.shared.queue.put(points);
        Ok(())
    }

    fn set_catalog(&mut self, catalog: &Arc<Catalog>) {
        self.shared.queue.set_catalog(catalog.clone());
    }

    /// Delivery is asynchronous (the queue bound is the backpressure); a
    /// flush only seals what it covers, for acknowledgement.
    fn flush(&mut self) -> Result<(), SinkError> {
        self.shared.queue.seal();
        Ok(())
    }

    fn unacknowledged_flushes(&self) -> u64 {
        self.shared.queue.unacknowledged()
    }

    fn write_health(&mut self, ts_ms: i64, points: &[HealthPoint]) -> Result<(), SinkError> {
        *lock(&self.shared.health) = Some((ts_ms, points.to_vec()));
        Ok(())
    }

    fn health(&self) -> SinkHealth {
        let s = &self.shared;
        let h = lock(&s.latency_us);
        SinkHealth {
            requests: s.stats.requests.load(Relaxed),
            rejected_points: s.stats.points_rejected.load(Relaxed),
            retries: s.stats.retries.load(Relaxed),
            queued_points: s.queue.outstanding() as u64,
            latency_p50_us: h.value_at_quantile(0.5),
            latency_p99_us: h.value_at_quantile(0.99),
            latency_max_us: h.max(),
            latency: *lock(&s.latency_buckets),
        }
    }

    fn close(&mut self) -> Result<SinkReport, SinkError> {
        let s = &self.shared;
        s.queue.close();
        let left = s.queue.wait_drained(Instant::now() + s.opts.drain);
        s.stop.store(true, Relaxed);
        for h in self.senders.drain(..) {
            let _ = h.join();
        }
        let h = lock(&s.latency_us);
        let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
        let st = &s.stats;
        let refused = st.points_rejected.load(Relaxed);
        let r = lock(&s.refusals);
        let statuses: Vec<String> = r.statuses.iter().map(u16::to_string).collect();
        let mut refused_detail = format!("refused by KairosDB (HTTP {})", statuses.join(", "));
        match r.lost {
            0 => refused_detail += &format!(", kept in {}", s.opts.dead_letter),
            n if n == refused => refused_detail += &format!(", lost: {}", r.lost_why),
            n => refused_detail += &format!(", kept in {} but {n} of them lost: {}", s.opts.dead_letter, r.lost_why),
        }
        Ok(SinkReport {
            undelivered: left as u64,
            refused,
            refused_detail,
            summary: format!(
                "kairosdb {}: {} points delivered in {} requests, {} rejected, {} retries, {} undelivered; \
                 write latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
                s.opts.url,
                st.points_delivered.load(Relaxed),
                st.requests.load(Relaxed),
                st.points_rejected.load(Relaxed),
                st.retries.load(Relaxed),
                left,
                ms(0.5),
                ms(0.99),
                h.max() as f64 / 1000.0
            ),
        })
    }

    fn describe(&self) -> String {
        format!("kairosdb:{}", self.shared.opts.url)
    }
}

impl Drop for KairosSink {
    fn drop(&mut self) {
        self.shared.stop.store(true, Relaxed);
        self.shared.queue.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_cuts_long_error_text_at_a_char_boundary() {
        assert_eq!(clip("short", 300), "short");
        let text = "é".repeat(400); // 800 bytes
        let cut = clip(&text, 301);
        assert!(cut.starts_with(&"é".repeat(150)) && cut.ends_with("… (800 bytes)"), "{cut}");
        assert!(cut.len() < 320);
    }

    #[test]
    fn options_parse_with_defaults_credentials_and_refusals() {
        let o = KairosOptions::parse("https://u:p@kairos-1:8080/?batch=100&linger=5ms&inflight=2&drain=1m").unwrap();
        assert_eq!(o.url, "https://kairos-1:8080");
        assert_eq!(o.user, Some(("u".into(), "p".into())));
        assert_eq!(
            (o.batch_points, o.linger, o.in_flight, o.drain),
            (100, Duration::from_millis(5), 2, Duration::from_secs(60))
        );
        assert_eq!(KairosOptions::parse("http://h:1").unwrap().batch_points, 5_000);
        for bad in [
            "h:1",
            "ftp://h:1",
            "http://",
            "http://h:1?batch=0",
            "http://h:1?nope=1",
            "http://h:1?linger=soon",
            "http://h:1?timeout=0s",
            "http://h:1?batch=1&batch=2",
            "http://h:1?batch",
        ] {
            assert!(KairosOptions::parse(bad).is_err(), "{bad}");
        }
        let why = |spec| match KairosOptions::parse(spec) {
            Err(SinkError::BadOption { why, .. }) => why,
            other => panic!("{spec}: {other:?}"),
        };
        assert_eq!(why("http://h:1?batch=0"), "batch: \"0\" is not a positive number");
        assert_eq!(why("http://h:1?timeout=0s"), "timeout: must be more than 0");
        assert_eq!(why("http://h:1?drain=1s&drain=2s"), "option \"drain\" is given twice");
        assert!(why("http://h:1?nope=1").starts_with("unknown option \"nope\" (expected batch, batch_bytes, linger,"));
    }
}
