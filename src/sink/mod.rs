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
use crate::failures::lock;
use crate::metrics::{HealthPoint, SinkHealth, SinkReport};

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
    #[error("kairosdb sink: cannot read CA file {path}: {error}")]
    KairosCa { path: String, error: std::io::Error },
    #[error("kairosdb sink: CA file {path} is not a PEM certificate: {error}")]
    KairosCert { path: String, error: reqwest::Error },
    #[error("kairosdb sink: cannot build an HTTP client: {0}")]
    KairosClient(reqwest::Error),
    #[error("kairosdb sink: cannot reach KairosDB at {url}: {error}")]
    KairosUnreachable { url: String, error: reqwest::Error },
    /// `body`: the first 120 characters of the answer.
    #[error("kairosdb sink: {url} is not KairosDB: GET /api/v1/version answered {status} {body:?}")]
    NotKairos { url: String, status: reqwest::StatusCode, body: String },
    /// The file refused points are kept in (KairosDB's `dead_letter`).
    #[error("cannot open dead-letter file {path}: {error}")]
    DeadLetterOpen { path: String, error: std::io::Error },
    #[error("cannot write dead-letter file {path}: {error}")]
    DeadLetterWrite { path: String, error: std::io::Error },
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
    failures: &crate::failures::Failures,
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
