//! The engine's own figures (SPEC §6): counted in plain per-stage fields on the
//! hot path, published in batches into [`Live`] atomics for the status line,
//! and summed into a [`Summary`] at the end of a run.
//!
//! Rooms: this file (the per-stage counts and [`Live`]), `points` (the
//! figures as `expmon.*` health points), `writes` (which are due when),
//! `experiments` (SRM and lift per experiment), [`prometheus`] (`/metrics`
//! text), `summary` (the end-of-run report) and `status` (the live panel).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};

use crate::event::Reject;

mod experiments;
mod points;
pub mod prometheus;
mod status;
mod summary;
mod writes;

pub use experiments::{chi_square_sf, lift_arms, lift_state, srm_pvalue, srm_state, ExperimentHealth, LIFT_METRICS};
pub use points::{default_instance, health_points, resident_bytes, HealthInputs};
pub use status::spawn_status;
pub use summary::Summary;
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

/// Peak resident set size of this process, from /proc/self/status.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
