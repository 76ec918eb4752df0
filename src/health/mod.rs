//! The engine's own figures (SPEC §6): counted in plain per-stage fields on the
//! hot path, published in batches into [`Live`] atomics for the status line,
//! and summed into a [`Summary`] at the end of a run.

use std::fmt;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::event::Reject;
use crate::shard::failures::lock;

mod experiments;
mod points;
pub mod prometheus;
mod writes;

pub use experiments::{chi_square_sf, lift_arms, lift_state, srm_pvalue, srm_state, ExperimentHealth, LIFT_METRICS};
pub use points::{default_instance, health_points, resident_bytes, HealthInputs, HealthPoint, HealthValue};
pub use writes::{HealthWrites, REWRITE_TRIGGERS};

/// Counted by the router, per event, in plain fields.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RouterStats {
    /// Non-blank input lines.
    pub events_in: u64,
    /// Valid events of known tenants sent to a shard.
    pub routed: u64,
    /// Rejected lines, indexed by [`Reject::index`].
    pub rejected: [u64; Reject::ALL.len()],
    pub late_dropped: u64,
    pub unknown_tenant: u64,
    /// Assignments naming an experiment not configured for the event's tenant.
    pub unknown_experiment: u64,
    /// Assignments naming a variation not configured for their experiment.
    pub unknown_variation: u64,
    /// Names replaced by `_other` because their table was full, by
    /// [`crate::names::NameKind::index`] (the events still count).
    pub names_replaced: [u64; 3],
}

impl RouterStats {
    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }
}

/// Reported by each shard at every flush; summed over shards.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct ShardStats {
    pub events: u64,
    pub active_sessions: u64,
    pub sessions_started: u64,
    pub sessions_evicted: u64,
    pub conflicts: u64,
    pub overflow_dropped: u64,
    /// Sessions held when the flush began (before its expiry).
    pub held_sessions: u64,
    /// Bytes of session state at that moment (table slots and session heap).
    pub state_bytes: u64,
}

impl std::ops::AddAssign for ShardStats {
    fn add_assign(&mut self, o: ShardStats) {
        self.events += o.events;
        self.active_sessions += o.active_sessions;
        self.sessions_started += o.sessions_started;
        self.sessions_evicted += o.sessions_evicted;
        self.conflicts += o.conflicts;
        self.overflow_dropped += o.overflow_dropped;
        self.held_sessions += o.held_sessions;
        self.state_bytes += o.state_bytes;
    }
}

/// Counted by the writer stage.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WriterStats {
    pub upserts_written: u64,
    /// Upserts whose total was beyond 64 bits and written clamped (SPEC §3).
    pub totals_clamped: u64,
    pub active_points: u64,
    pub flushes: u64,
    /// Most session-state bytes seen at a flush, over all shards, and the
    /// sessions held at that moment.
    pub peak_state_bytes: u64,
    pub peak_state_sessions: u64,
    /// Most points held by the writer at once.
    pub peak_points: u64,
    /// Flushes that wrote health points (processing-time triggers and the
    /// last), and the health points they wrote.
    pub health_writes: u64,
    pub health_points_written: u64,
    /// Checkpoints written and published, the longest pause one caused (the
    /// slowest shard's encoding), and the size of the last.
    pub checkpoints_written: u64,
    pub checkpoints_published: u64,
    pub checkpoint_pause_max_us: u64,
    pub checkpoint_bytes: u64,
}

/// Figures published for the status line, a batch at a time.
#[derive(Debug, Default)]
pub struct Live {
    pub events_in: AtomicU64,
    pub rejected: AtomicU64,
    pub late_dropped: AtomicU64,
    pub watermark: AtomicI64,
    pub max_ts: AtomicI64,
    pub active_sessions: AtomicU64,
    pub upserts_written: AtomicU64,
    pub active_points: AtomicU64,
    pub rejected_by_reason: [AtomicU64; Reject::ALL.len()],
    pub unknown_tenant: AtomicU64,
    pub unknown_experiment: AtomicU64,
    pub unknown_variation: AtomicU64,
    /// Names replaced by `_other`, by table (see [`RouterStats::names_replaced`]).
    pub names_replaced: [AtomicU64; 3],
    /// Consumer lag per input partition (Kafka), refreshed every trigger.
    pub kafka_lag: std::sync::Mutex<Vec<(i32, i64)>>,
    /// Session state bytes over all shards, at the last flush.
    pub state_bytes: AtomicU64,
    /// The sink's figures at the last flush.
    pub sink_latency_p99_us: AtomicU64,
    pub sink_errors: AtomicU64,
    pub sink_retries: AtomicU64,
    pub sink_queued: AtomicU64,
    /// A finite input's progress: bytes read and total (0 total: unknown).
    pub progress_done: AtomicU64,
    pub progress_total: AtomicU64,
}

impl Live {
    pub fn publish_router(&self, s: &RouterStats, watermark: i64, max_ts: i64) {
        self.max_ts.store(max_ts, Relaxed);
        self.events_in.store(s.events_in, Relaxed);
        self.rejected.store(s.rejected_total(), Relaxed);
        self.late_dropped.store(s.late_dropped, Relaxed);
        self.watermark.store(watermark, Relaxed);
        for (a, &n) in self.rejected_by_reason.iter().zip(s.rejected.iter()) {
            a.store(n, Relaxed);
        }
        self.unknown_tenant.store(s.unknown_tenant, Relaxed);
        self.unknown_experiment.store(s.unknown_experiment, Relaxed);
        self.unknown_variation.store(s.unknown_variation, Relaxed);
        for (a, &n) in self.names_replaced.iter().zip(s.names_replaced.iter()) {
            a.store(n, Relaxed);
        }
    }
}

/// What a run did, printed at its end.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub router: RouterStats,
    pub shards: ShardStats,
    pub writer: WriterStats,
    pub threads: usize,
    pub elapsed: Duration,
    /// When the first line arrived, from the start (a Kafka group join can
    /// take seconds).
    pub first_line: Option<Duration>,
    /// Peak resident memory of the process (VmHWM), if known.
    pub peak_rss_bytes: Option<u64>,
    /// What the sink reported when closed.
    pub sink: crate::sink::SinkReport,
    /// From noticing a stop to the end of the run (drain, flush, checkpoint).
    pub stop_took: Option<Duration>,
}

/// Peak resident set size of this process, from /proc/self/status.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

impl Summary {
    pub fn events_per_sec(&self) -> f64 {
        self.router.events_in as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.router;
        writeln!(
            f,
            "expmon: {} events in {:.3}s ({:.0} events/s, {} shard threads)",
            r.events_in,
            self.elapsed.as_secs_f64(),
            self.events_per_sec(),
            self.threads
        )?;
        if let Some(first) = self.first_line.filter(|d| d.as_secs_f64() >= 1.0) {
            let busy = (self.elapsed.saturating_sub(first)).as_secs_f64().max(1e-9);
            writeln!(
                f,
                "  first event after {:.3}s; {:.0} events/s from then on",
                first.as_secs_f64(),
                r.events_in as f64 / busy
            )?;
        }
        write!(f, "  rejected {}", r.rejected_total())?;
        let reasons: Vec<String> = Reject::ALL
            .iter()
            .filter(|x| r.rejected[x.index()] > 0)
            .map(|x| format!("{}={}", x.as_str(), r.rejected[x.index()]))
            .collect();
        if !reasons.is_empty() {
            write!(f, " ({})", reasons.join(", "))?;
        }
        writeln!(
            f,
            ", late dropped {}, unknown tenant {}, unknown experiment {}, unknown variation {}",
            r.late_dropped, r.unknown_tenant, r.unknown_experiment, r.unknown_variation
        )?;
        let s = &self.shards;
        writeln!(
            f,
            "  sessions started {}, evicted {}, assignment conflicts {}, dropped (session over {} events) {}",
            s.sessions_started,
            s.sessions_evicted,
            s.conflicts,
            crate::session::MAX_EVENTS_PER_SESSION,
            s.overflow_dropped
        )?;
        write!(f, "  names replaced by _other (table full) {}", r.names_replaced.iter().sum::<u64>())?;
        let tables: Vec<String> = crate::names::NameKind::ALL
            .iter()
            .filter(|k| r.names_replaced[k.index()] > 0)
            .map(|k| format!("{}={}", k.as_str(), r.names_replaced[k.index()]))
            .collect();
        if !tables.is_empty() {
            write!(f, " ({})", tables.join(", "))?;
        }
        writeln!(f)?;
        let w = &self.writer;
        write!(
            f,
            "  upserts written {} in {} flushes, peak points held {}; health points written {} at {} triggers",
            w.upserts_written, w.flushes, w.peak_points, w.health_points_written, w.health_writes
        )?;
        if w.totals_clamped > 0 {
            write!(f, "\n  totals clamped to 64 bits {}", w.totals_clamped)?;
        }
        if w.peak_state_sessions > 0 {
            write!(
                f,
                "\n  peak session state {:.1} MiB for {} sessions ({} bytes/session)",
                w.peak_state_bytes as f64 / (1 << 20) as f64,
                w.peak_state_sessions,
                w.peak_state_bytes / w.peak_state_sessions
            )?;
        }
        if let Some(rss) = self.peak_rss_bytes {
            write!(f, "\n  peak RSS {:.1} MiB", rss as f64 / (1 << 20) as f64)?;
        }
        if w.checkpoints_written > 0 {
            write!(
                f,
                "\n  checkpoints: {} written, {} published; longest pause {:.1} ms; largest {:.1} KiB",
                w.checkpoints_written,
                w.checkpoints_published,
                w.checkpoint_pause_max_us as f64 / 1000.0,
                w.checkpoint_bytes as f64 / 1024.0
            )?;
        }
        if let Some(t) = self.stop_took {
            let ms = t.as_secs_f64() * 1000.0;
            if self.sink.undelivered == 0 {
                write!(f, "\n  stopped: drained, flushed and closed in {ms:.0} ms")?;
            } else {
                // The error line that follows says how many were not delivered.
                write!(f, "\n  stopped in {ms:.0} ms, not everything delivered")?;
            }
        }
        if !self.sink.summary.is_empty() {
            write!(f, "\n  {}", self.sink.summary)?;
        }
        Ok(())
    }
}

/// Prints a one-line status every second until `stop`: refreshed in place on a
/// terminal, plain lines otherwise.
pub fn spawn_status(live: Arc<Live>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("expmon-status".into())
        .spawn(move || {
            let tty = std::io::stderr().is_terminal();
            // A panel redrawn every second on a terminal; a log line every 10 s otherwise.
            let every = if tty { Duration::from_secs(1) } else { Duration::from_secs(10) };
            let start = Instant::now();
            let mut last = (0u64, 0u64, Instant::now());
            let mut drawn = 0;
            while !stop.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if last.2.elapsed() < every {
                    continue;
                }
                let (n, upserts) = (live.events_in.load(Relaxed), live.upserts_written.load(Relaxed));
                let secs = last.2.elapsed().as_secs_f64();
                let rate = (n - last.0) as f64 / secs;
                let points_per_min = (upserts - last.1) as f64 / secs * 60.0;
                last = (n, upserts, Instant::now());
                let s = Status::read(&live, rate, points_per_min, start.elapsed());
                if tty {
                    let panel = s.panel();
                    let mut err = std::io::stderr().lock();
                    // Move up over the previous panel and redraw it.
                    let _ = write!(err, "{}{panel}", "\x1b[1A\x1b[2K".repeat(drawn));
                    let _ = err.flush();
                    drawn = panel.lines().count();
                } else {
                    tracing::info!("{}", s.line());
                }
            }
        })
        .expect("spawn status thread")
}

/// One reading of the live figures.
struct Status {
    elapsed: Duration,
    rate: f64,
    events_in: u64,
    rejected: u64,
    late: u64,
    kafka_lag: Option<i64>,
    event_time_lag_s: f64,
    watermark_delay_s: f64,
    sessions: u64,
    state_bytes: u64,
    points: u64,
    points_per_min: f64,
    sink_p99_ms: f64,
    sink_errors: u64,
    sink_retries: u64,
    sink_queued: u64,
    progress: Option<(u64, u64)>,
}

impl Status {
    fn read(live: &Live, rate: f64, points_per_min: f64, elapsed: Duration) -> Status {
        let now = now_ms();
        let (max_ts, wm) = (live.max_ts.load(Relaxed), live.watermark.load(Relaxed));
        let lag = lock(&live.kafka_lag);
        let total = live.progress_total.load(Relaxed);
        Status {
            elapsed,
            rate,
            events_in: live.events_in.load(Relaxed),
            rejected: live.rejected.load(Relaxed),
            late: live.late_dropped.load(Relaxed),
            kafka_lag: (!lag.is_empty()).then(|| lag.iter().map(|(_, l)| l).sum()),
            event_time_lag_s: if max_ts > 0 { (now - max_ts) as f64 / 1000.0 } else { 0.0 },
            watermark_delay_s: if wm > 0 && wm < i64::MAX { (now - wm) as f64 / 1000.0 } else { 0.0 },
            sessions: live.active_sessions.load(Relaxed),
            state_bytes: live.state_bytes.load(Relaxed),
            points: live.active_points.load(Relaxed),
            points_per_min,
            sink_p99_ms: live.sink_latency_p99_us.load(Relaxed) as f64 / 1000.0,
            sink_errors: live.sink_errors.load(Relaxed),
            sink_retries: live.sink_retries.load(Relaxed),
            sink_queued: live.sink_queued.load(Relaxed),
            progress: (total > 0).then(|| (live.progress_done.load(Relaxed).min(total), total)),
        }
    }

    /// The terminal panel (ends with a newline).
    fn panel(&self) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let mut p = format!(
            "expmon {:>7.0}s │ {:>10.0} events/s │ in {} · rejected {} · late {}\n",
            self.elapsed.as_secs_f64(),
            self.rate,
            self.events_in,
            self.rejected,
            self.late
        );
        let lag = self.kafka_lag.map_or("–".to_string(), |l| l.to_string());
        p += &format!(
            "  input    │ kafka lag {lag} · event-time lag {:.1}s · watermark delay {:.1}s\n",
            self.event_time_lag_s, self.watermark_delay_s
        );
        p += &format!(
            "  state    │ {} sessions · {:.1} MiB · {} live points · {:.0} points/min written\n",
            self.sessions,
            mib(self.state_bytes),
            self.points,
            self.points_per_min
        );
        p += &format!(
            "  sink     │ p99 {:.1} ms · errors {} · retries {} · queued {}\n",
            self.sink_p99_ms, self.sink_errors, self.sink_retries, self.sink_queued
        );
        if let Some((done, total)) = self.progress {
            let frac = done as f64 / total as f64;
            let eta = if frac > 0.0 { self.elapsed.as_secs_f64() * (1.0 - frac) / frac } else { 0.0 };
            p += &format!(
                "  replay   │ [{:<30}] {:5.1}% · {:.0}/{:.0} MiB · ~{:.0}s left\n",
                "#".repeat((frac * 30.0) as usize),
                frac * 100.0,
                mib(done),
                mib(total),
                eta
            );
        }
        p
    }

    /// One plain line for logs.
    fn line(&self) -> String {
        let mut l = format!(
            "status: {:.0} events/s, in {}, rejected {}, late {}, sessions {}, points {} ({:.0}/min), \
             watermark delay {:.1}s, sink p99 {:.1} ms, errors {}, retries {}",
            self.rate,
            self.events_in,
            self.rejected,
            self.late,
            self.sessions,
            self.points,
            self.points_per_min,
            self.watermark_delay_s,
            self.sink_p99_ms,
            self.sink_errors,
            self.sink_retries
        );
        if let Some(lag) = self.kafka_lag {
            l += &format!(", kafka lag {lag}");
        }
        if let Some((done, total)) = self.progress {
            l += &format!(", replay {:.1}%", 100.0 * done as f64 / total as f64);
        }
        l
    }
}

/// Wall-clock now, in ms since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
