//! The figures that cross between stages, as plain types that need nothing
//! of the engine: a [`HealthPoint`] (what `health` computes and every sink
//! writes), a sink's own [`SinkHealth`] with its write-latency
//! [`LatencyBuckets`] (what sinks count and `health` and `/metrics` publish),
//! and the [`SinkReport`] a sink gives when closed (what the run summary
//! prints). Keeping them here lets `health` and `sink` each use them without
//! using each other.

/// One health figure with its tags, sorted by tag name (`dc`, `instance`,
/// then e.g. `reason`).
#[derive(Debug, Clone, PartialEq)]
pub struct HealthPoint {
    pub name: String,
    pub tags: Vec<(&'static str, String)>,
    pub value: HealthValue,
}

/// A health figure: a count, or a rate or probability.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum HealthValue {
    Int(i64),
    /// Always finite.
    Float(f64),
}

impl HealthValue {
    /// KairosDB's data point type.
    pub fn kairos_type(self) -> &'static str {
        match self {
            HealthValue::Int(_) => "long",
            HealthValue::Float(_) => "double",
        }
    }
}

impl std::fmt::Display for HealthValue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            HealthValue::Int(v) => write!(f, "{v}"),
            HealthValue::Float(v) if v.is_finite() => write!(f, "{v}"),
            HealthValue::Float(_) => write!(f, "0"),
        }
    }
}

impl From<i64> for HealthValue {
    fn from(v: i64) -> HealthValue {
        HealthValue::Int(v)
    }
}

/// A sink's own figures, for the health metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct SinkHealth {
    pub requests: u64,
    pub rejected_points: u64,
    pub retries: u64,
    pub queued_points: u64,
    pub latency_p50_us: u64,
    pub latency_p99_us: u64,
    pub latency_max_us: u64,
    /// Every write's latency, counted into fixed buckets (for `/metrics`).
    pub latency: LatencyBuckets,
}

/// Upper bounds (µs, inclusive) of the write-latency buckets that `/metrics`
/// exposes as the `expmon_write_latency_seconds` histogram: 100 µs to 30 s.
pub const WRITE_LATENCY_BOUNDS_US: [u64; 17] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000, 1_000_000, 2_500_000,
    5_000_000, 10_000_000, 30_000_000,
];

/// Write latencies counted by bucket since the sink started: `counts[i]` is
/// the writes in `(bound[i-1], bound[i]]`, the last slot those above every
/// bound; `sum_us` their exact sum. Only ever grows (a Prometheus histogram).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct LatencyBuckets {
    pub counts: [u64; WRITE_LATENCY_BOUNDS_US.len() + 1],
    pub sum_us: u64,
}

impl LatencyBuckets {
    pub fn record(&mut self, us: u64) {
        let slot = WRITE_LATENCY_BOUNDS_US.partition_point(|&b| b < us);
        self.counts[slot] += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// Writes recorded.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }
}

/// What a sink reports when it is closed.
#[derive(Debug, Default, Clone)]
pub struct SinkReport {
    /// Upserts that could not be delivered before the drain deadline.
    pub undelivered: u64,
    /// Upserts the destination refused for good (never retried): a loss the
    /// run's exit status reports.
    pub refused: u64,
    /// Who refused them and where they are kept, e.g.
    /// `refused by KairosDB (HTTP 400), kept in PATH`.
    pub refused_detail: String,
    /// One line for the run summary; empty if the sink has nothing to add.
    pub summary: String,
}
