//! Where points go: KairosDB, a JSON Lines file, nowhere (`null`), or memory
//! (for embedding and tests).
//!
//! Every sink receives absolute totals (upserts, SPEC §5): writing a point again
//! with the same value is harmless, which is what makes retries exact.
//!
//! A sink names points with the catalog of the run, and a reload hands it the
//! new one ([`Sink::set_catalog`]) before any point that needs it is written;
//! a sink that names later (KairosDB's senders) carries it along with the
//! points.

mod file;
mod json;
pub mod kairosdb;

pub use file::FileSink;
pub use json::{format_health, format_point, push_json_str};
pub use kairosdb::{KairosOptions, KairosSink};

use std::sync::{Arc, Mutex};

use crate::aggregate::{Namer, Point};
use crate::health::HealthPoint;
use crate::shard::failures::lock;

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The I/O error is the source: printed after this by the `{:#}` chain.
    #[error("sink {sink}")]
    Io { sink: String, source: std::io::Error },
    /// Not a kind of sink expmon has (the spec is shown with its secrets hidden).
    #[error("bad sink {0:?}: expected file:PATH, kairosdb:http[s]://HOST:PORT or null")]
    BadSpec(String),
    /// A known kind of sink with a bad address or option.
    #[error("bad sink {sink:?}: {why}")]
    BadOption { sink: String, why: String },
    #[error("kairosdb sink: {0}")]
    Kairos(String),
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

/// A destination of upserts, driven by the writer stage.
pub trait Sink: Send {
    /// Writes one batch of changed totals.
    fn write(&mut self, points: &[Point], namer: &Namer) -> Result<(), SinkError>;

    /// A reload: points written from now on may refer to experiments and
    /// variations only `catalog` knows (indices only grow, so it also names
    /// every point written before). A sink that names points only inside
    /// [`Sink::write`], with the namer it is given, needs nothing here.
    fn set_catalog(&mut self, catalog: &Arc<crate::config::Catalog>) {
        let _ = catalog;
    }

    /// Makes everything written so far durable (end of a trigger).
    fn flush(&mut self) -> Result<(), SinkError>;

    /// Writes the engine's health figures, stamped `ts_ms` (processing time).
    fn write_health(&mut self, ts_ms: i64, points: &[HealthPoint]) -> Result<(), SinkError> {
        let _ = (ts_ms, points);
        Ok(())
    }

    /// How many of the most recent flushes still have points on their way:
    /// `0` once the sink has acknowledged everything flushed (a synchronous
    /// sink always returns 0).
    fn unacknowledged_flushes(&self) -> u64 {
        0
    }

    /// The sink's own figures (requests, retries, latency).
    fn health(&self) -> SinkHealth {
        SinkHealth::default()
    }

    /// End of the run: deliver what is left (within the sink's deadline) and
    /// report.
    fn close(&mut self) -> Result<SinkReport, SinkError> {
        self.flush().map(|()| SinkReport::default())
    }

    fn describe(&self) -> String;
}

/// Parses `file:PATH`, `kairosdb:URL` or `null`; a KairosDB sink checks its
/// server before returning, and its threads report a death to `failures`
/// (the run's, [`crate::shard::RunOptions::failures`]). `continuing`: the run
/// continues from a restored checkpoint, so a file sink appends to what the
/// runs before it wrote (otherwise it starts a fresh file).
pub fn open(
    spec: &str,
    catalog: &Arc<crate::config::Catalog>,
    failures: &crate::shard::Failures,
    continuing: bool,
) -> Result<Box<dyn Sink>, SinkError> {
    if let Some(url) = spec.strip_prefix("kairosdb:") {
        return Ok(Box::new(KairosSink::connect(KairosOptions::parse(url)?, catalog.clone(), failures)?));
    }
    if spec == "null" {
        return Ok(Box::new(NullSink::default()));
    }
    if let Some(path) = spec.strip_prefix("file:") {
        if path.is_empty() {
            return Err(SinkError::BadOption { sink: spec.to_string(), why: "no PATH after file:".into() });
        }
        return Ok(Box::new(if continuing { FileSink::append(path)? } else { FileSink::create(path)? }));
    }
    Err(SinkError::BadSpec(crate::redact::redact(spec)))
}

/// Discards points, counting them.
#[derive(Debug, Default)]
pub struct NullSink {
    pub points: u64,
}

impl Sink for NullSink {
    fn write(&mut self, points: &[Point], _: &Namer) -> Result<(), SinkError> {
        self.points += points.len() as u64;
        Ok(())
    }
    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
    fn describe(&self) -> String {
        "null".into()
    }
}

/// An upsert with its name and tags rendered.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RenderedPoint {
    pub name: String,
    pub dc: String,
    pub device: String,
    pub login: String,
    pub timestamp: i64,
    pub value: i64,
}

impl RenderedPoint {
    pub fn render(p: &Point, namer: &Namer) -> RenderedPoint {
        RenderedPoint {
            name: namer.name(p.key),
            dc: namer.dc().to_string(),
            device: namer.device(p.key).to_string(),
            login: namer.login(p.key).to_string(),
            timestamp: p.minute,
            value: p.value,
        }
    }
}

/// Keeps every upsert in memory, in write order, for a library user (or a test)
/// that wants the output without a file.
#[derive(Debug, Default, Clone)]
pub struct MemorySink {
    pub points: Arc<Mutex<Vec<RenderedPoint>>>,
}

impl Sink for MemorySink {
    fn write(&mut self, points: &[Point], namer: &Namer) -> Result<(), SinkError> {
        let mut out = lock(&self.points);
        out.extend(points.iter().map(|p| RenderedPoint::render(p, namer)));
        Ok(())
    }
    fn flush(&mut self) -> Result<(), SinkError> {
        Ok(())
    }
    fn describe(&self) -> String {
        "memory".into()
    }
}
