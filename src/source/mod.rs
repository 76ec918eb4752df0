//! Where events come from: a JSON Lines file (or stdin), a Kafka topic, or the
//! built-in generator.
//!
//! A source fills a [`LineBatch`]: one contiguous buffer of raw lines plus their
//! ranges, so the router reads many events per call and no line is allocated
//! on its own. Sources do not parse; the router does.
//!
//! Every source names what it reads with a [`SourceId`]; a checkpoint records
//! it, and a restore is refused unless the new source continues that input
//! ([`Source::continues`]): a checkpoint's position means nothing elsewhere.

mod file;
mod kafka;

pub use file::FileSource;
pub use kafka::KafkaSource;

use crate::event::Reject;

use std::io;
use std::ops::Range;

/// Lines longer than this are rejected as `too_long` without being buffered.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Raw lines, in arrival order.
#[derive(Debug, Default)]
pub struct LineBatch {
    /// The bytes the lines are ranges of (a source reading in place may
    /// leave other bytes between and after them).
    pub buf: Vec<u8>,
    pub lines: Vec<Range<u32>>,
    /// Lines dropped by the source for being over [`MAX_LINE_BYTES`].
    pub overlong: u64,
    /// The partition of each line, for sources with several (Kafka); empty
    /// means every line is from partition 0.
    pub part: Vec<u16>,
    /// The state of each partition (indexed by partition) after this fill;
    /// empty means one partition, always active.
    pub partitions: Vec<PartitionState>,
    /// The set of partitions changed (a consumer-group rebalance).
    pub rebalanced: bool,
}

/// Whether a partition's clock counts in the combined watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionState {
    /// Delivering events: it counts.
    Active,
    /// At its end or silent for the idle timeout: it does not count.
    Idle,
    /// Not assigned to this instance.
    Gone,
}

/// Positions in the input: for each partition, the offset just past the last
/// line returned.
pub type Offsets = Vec<(i32, i64)>;

impl LineBatch {
    pub fn clear(&mut self) {
        self.buf.clear();
        self.clear_keeping_buffer();
    }

    /// Clears everything but `buf`'s bytes, for a source that reads into
    /// `buf` in place and cuts it into `lines` (the file source).
    pub fn clear_keeping_buffer(&mut self) {
        self.lines.clear();
        self.overlong = 0;
        self.part.clear();
        self.rebalanced = false;
    }

    pub fn push_line(&mut self, line: &[u8]) {
        let start = self.buf.len() as u32;
        self.buf.extend_from_slice(line);
        self.lines.push(start..self.buf.len() as u32);
    }

    pub fn line(&self, i: usize) -> &[u8] {
        let r = &self.lines[i];
        &self.buf[r.start as usize..r.end as usize]
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }
}

/// What a source reads, as recorded in a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceId {
    pub kind: SourceKind,
    /// File: its canonical path; Kafka: the topic; generator: its spec;
    /// stdin: `-` (another stream: its description).
    pub name: String,
    /// Kafka: the consumer group; empty otherwise.
    pub group: String,
    /// A regular file: enough to recognise it (and to accept it grown).
    pub file: Option<FileMark>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceKind {
    File,
    Stdin,
    Kafka,
    Gen,
}

/// A regular file's size and the xxh3-64 of its first `head_len` bytes
/// (`min(size, HEAD_BYTES)`), when it was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileMark {
    pub len: u64,
    pub head_len: u32,
    pub head_hash: u64,
}

/// How much of a file's start identifies it.
pub const HEAD_BYTES: usize = 4096;

impl SourceKind {
    pub fn code(self) -> u8 {
        match self {
            SourceKind::File => 1,
            SourceKind::Stdin => 2,
            SourceKind::Kafka => 3,
            SourceKind::Gen => 4,
        }
    }

    pub fn from_code(c: u8) -> Option<SourceKind> {
        [SourceKind::File, SourceKind::Stdin, SourceKind::Kafka, SourceKind::Gen].into_iter().find(|k| k.code() == c)
    }
}

impl std::fmt::Display for SourceId {
    /// E.g. `file:/data/a.jsonl (52000 bytes, first 4096 xxh3 0x1f…)`,
    /// `stdin`, `kafka topic events (group g1)`, `gen:demo?rate=2000`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind {
            SourceKind::File => write!(f, "file:{}", self.name)?,
            SourceKind::Stdin if self.name == "-" => write!(f, "stdin")?,
            SourceKind::Stdin => write!(f, "{}", self.name)?,
            SourceKind::Kafka => write!(f, "kafka topic {} (group {})", self.name, self.group)?,
            SourceKind::Gen => write!(f, "{}", self.name)?,
        }
        if let Some(m) = &self.file {
            write!(f, " ({} bytes, first {} xxh3 {:#018x})", m.len, m.head_len, m.head_hash)?;
        }
        Ok(())
    }
}

/// Why a source does not continue the input a checkpoint was taken reading
/// ([`Source::continues`]): the run refuses that checkpoint, saying why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Discontinuity {
    #[error("another input")]
    AnotherInput,
    #[error("the file is shorter than when the checkpoint was taken")]
    Shorter,
    #[error("the file's first bytes differ")]
    FirstBytes,
    #[error("a generator replay without rate= has no position to resume from")]
    NoPosition,
}

/// What a call to [`Source::fill`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Some lines (possibly none, for a live source with nothing new yet).
    Lines,
    /// The input has ended; the batch may still hold its last lines.
    End,
}

pub trait Source: Send {
    /// Clears `batch` and fills it with the next lines.
    fn fill(&mut self, batch: &mut LineBatch) -> io::Result<Fill>;

    /// Whether events arrive as they happen (rather than a replay). Every
    /// source's events are refused past the wall clock plus `max_future`.
    fn is_live(&self) -> bool;

    /// Short description for logs, e.g. `file:events.jsonl`.
    fn describe(&self) -> String;

    /// What this source reads, for checkpoints.
    fn identity(&self) -> SourceId;

    /// Whether this source continues the input a checkpoint was taken
    /// reading (`saved`), so that its position applies here: `Err` says why
    /// not. By default the identities must be equal.
    fn continues(&self, saved: &SourceId) -> Result<(), Discontinuity> {
        if self.identity() == *saved {
            Ok(())
        } else {
            Err(Discontinuity::AnotherInput)
        }
    }

    /// Where the input stands: just past every line returned so far. `None`
    /// for a source that cannot resume.
    fn position(&self) -> Option<Offsets> {
        None
    }

    /// Everything before `pos` has reached the sink and been acknowledged:
    /// record it (Kafka commits the offsets). `wait`: synchronously.
    fn commit(&mut self, pos: &Offsets, wait: bool) {
        let _ = (pos, wait);
    }

    /// Line `line` of the last fill was refused for `reason` (Kafka copies it
    /// to a dead-letter topic if configured).
    fn reject(&mut self, batch: &LineBatch, line: usize, reason: Reject) {
        let _ = (batch, line, reason);
    }

    /// Stops (`true`) or resumes reading partition `part` (watermark
    /// alignment); a source with one partition ignores it.
    fn hold(&mut self, part: usize, held: bool) {
        let _ = (part, held);
    }

    /// A finite input's progress: `(bytes read, total bytes)`.
    fn progress(&self) -> Option<(u64, u64)> {
        None
    }

    /// Consumer lag per partition, if known.
    fn lag(&self) -> Vec<(i32, i64)> {
        Vec::new()
    }

    /// End of the run; returns a line for the summary (empty for none).
    fn close(&mut self) -> String {
        String::new()
    }
}
