//! Where points go: a JSON Lines file, nowhere (`null`), or memory (for
//! embedding and tests). KairosDB arrives with its own issue.
//!
//! Every sink receives absolute totals (upserts, SPEC §5): writing a point again
//! with the same value is harmless, which is what makes retries exact.

mod file;

pub use file::{format_point, FileSink};

use std::sync::{Arc, Mutex};

use crate::aggregate::{Namer, Point};

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("sink {sink}: {source}")]
    Io { sink: String, source: std::io::Error },
    #[error("bad sink {0:?}: expected file:PATH or null")]
    BadSpec(String),
}

/// A destination of upserts, driven by the writer stage.
pub trait Sink: Send {
    /// Writes one batch of changed totals.
    fn write(&mut self, points: &[Point], namer: &Namer) -> Result<(), SinkError>;

    /// Makes everything written so far durable (end of a trigger, end of run).
    fn flush(&mut self) -> Result<(), SinkError>;

    fn describe(&self) -> String;
}

/// Parses `file:PATH` or `null`.
pub fn open(spec: &str) -> Result<Box<dyn Sink>, SinkError> {
    if spec == "null" {
        return Ok(Box::new(NullSink::default()));
    }
    if let Some(path) = spec.strip_prefix("file:") {
        if path.is_empty() {
            return Err(SinkError::BadSpec(spec.to_string()));
        }
        return Ok(Box::new(FileSink::create(path)?));
    }
    Err(SinkError::BadSpec(spec.to_string()))
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
        let mut out = self.points.lock().unwrap_or_else(|e| e.into_inner());
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
