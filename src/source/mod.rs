//! Where events come from: a JSON Lines file (or stdin), or the built-in
//! generator. Kafka arrives with its own issue.
//!
//! A source fills a [`LineBatch`]: one contiguous buffer of raw lines plus their
//! ranges, so the router reads many events per call and no line is allocated
//! on its own. Sources do not parse; the router does.

mod file;

pub use file::FileSource;

use std::io;
use std::ops::Range;

/// Lines longer than this are rejected as `too_long` without being buffered.
pub const MAX_LINE_BYTES: usize = 1 << 20;

/// Raw lines, in arrival order.
#[derive(Debug, Default)]
pub struct LineBatch {
    pub buf: Vec<u8>,
    pub lines: Vec<Range<u32>>,
    /// Lines dropped by the source for being over [`MAX_LINE_BYTES`].
    pub overlong: u64,
}

impl LineBatch {
    pub fn clear(&mut self) {
        self.buf.clear();
        self.lines.clear();
        self.overlong = 0;
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

    /// Live sources refuse events more than a day ahead of the wall clock.
    fn is_live(&self) -> bool;

    /// Short description for logs, e.g. `file:events.jsonl`.
    fn describe(&self) -> String;
}
