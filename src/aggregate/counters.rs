//! Per-shard, per-minute delta counters.
//!
//! Series are interned in blocks: a block is a variation's metrics for one
//! (mp, device, login) — the 4 visit kinds — or for no mp — the 2 session
//! kinds. An event's contributions to one experiment land in one block, so they
//! cost one interner lookup (the last block is cached) and touch one cache line
//! of the minute's counter array, instead of one random access per metric.
//!
//! Each live minute holds an `i64` per series id (`block * 4 + kind offset`);
//! `drain` walks only the blocks touched since the last drain. Minutes older
//! than the final-minute bound given to `drain` are freed after their last
//! deltas are handed out.

use ahash::AHashMap;

use super::{minute_of, MetricKind, SeriesKey, NO_MP};

/// A change of one point, as sent from a shard to the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delta {
    pub key: SeriesKey,
    pub minute: i64,
    pub delta: i64,
}

const BLOCK: usize = 4;
const KIND_MASK: u64 = 0b111 << 61;

/// Offset of a kind inside its block.
#[inline]
fn offset(kind: MetricKind) -> usize {
    match kind {
        MetricKind::SessionAssigned | MetricKind::VisitAssigned => 0,
        MetricKind::SessionFm | MetricKind::VisitAssignedBeta => 1,
        MetricKind::VisitFm => 2,
        MetricKind::VisitFmBeta => 3,
    }
}

/// The series key at `offset` of a block whose key (kind bits clear) is `block`.
fn series_at(block: u64, offset: usize) -> SeriesKey {
    let session = SeriesKey(block).mp() == NO_MP;
    let kind = match (session, offset) {
        (true, 0) => MetricKind::SessionAssigned,
        (true, _) => MetricKind::SessionFm,
        (false, 0) => MetricKind::VisitAssigned,
        (false, 1) => MetricKind::VisitAssignedBeta,
        (false, 2) => MetricKind::VisitFm,
        (false, _) => MetricKind::VisitFmBeta,
    };
    SeriesKey(block | (kind as u64) << 61)
}

struct MinuteBucket {
    minute: i64,
    counts: Vec<i64>,
    /// Blocks touched since the last drain (may repeat).
    touched: Vec<u32>,
    /// Per block: touched since the last drain.
    marked: Vec<bool>,
}

#[derive(Default)]
pub struct MinuteCounters {
    blocks: AHashMap<u64, u32>,
    block_keys: Vec<u64>,
    /// Live minutes, few (lateness window / 1 minute + 1), in no fixed order.
    buckets: Vec<MinuteBucket>,
    /// Last block looked up: (block key, id).
    last_block: Option<(u64, u32)>,
    /// Index into `buckets` of the last minute used.
    last_bucket: usize,
}

impl MinuteCounters {
    pub fn new() -> MinuteCounters {
        MinuteCounters::default()
    }

    #[inline]
    fn block(&mut self, block_key: u64) -> u32 {
        if let Some((k, id)) = self.last_block {
            if k == block_key {
                return id;
            }
        }
        let next = self.block_keys.len() as u32;
        let id = *self.blocks.entry(block_key).or_insert(next);
        if id == next {
            self.block_keys.push(block_key);
        }
        self.last_block = Some((block_key, id));
        id
    }

    #[inline]
    fn bucket(&mut self, minute: i64) -> usize {
        if self.buckets.get(self.last_bucket).is_some_and(|b| b.minute == minute) {
            return self.last_bucket;
        }
        let i = match self.buckets.iter().rposition(|b| b.minute == minute) {
            Some(i) => i,
            None => {
                self.buckets.push(MinuteBucket { minute, counts: Vec::new(), touched: Vec::new(), marked: Vec::new() });
                self.buckets.len() - 1
            }
        };
        self.last_bucket = i;
        i
    }

    /// Adds `delta` to the point `(key, minute(ts))`.
    #[inline]
    pub fn add(&mut self, key: SeriesKey, ts: i64, delta: i64) {
        let block = self.block(key.0 & !KIND_MASK) as usize;
        let bi = self.bucket(minute_of(ts));
        let blocks = self.block_keys.len();
        let b = &mut self.buckets[bi];
        if b.marked.len() <= block {
            b.marked.resize(blocks.max(block + 1), false);
            b.counts.resize(b.marked.len() * BLOCK, 0);
        }
        if !b.marked[block] {
            b.marked[block] = true;
            b.touched.push(block as u32);
        }
        b.counts[block * BLOCK + offset(key.kind())] += delta;
    }

    /// Appends every non-zero delta since the last drain to `out`, resetting
    /// them, and frees minutes older than `final_before` (they can no longer
    /// change).
    pub fn drain(&mut self, final_before: i64, out: &mut Vec<Delta>) {
        for b in &mut self.buckets {
            for &block in &b.touched {
                let block = block as usize;
                b.marked[block] = false;
                for (o, c) in b.counts[block * BLOCK..(block + 1) * BLOCK].iter_mut().enumerate() {
                    if *c != 0 {
                        out.push(Delta { key: series_at(self.block_keys[block], o), minute: b.minute, delta: *c });
                        *c = 0;
                    }
                }
            }
            b.touched.clear();
        }
        self.buckets.retain(|b| b.minute >= final_before);
        self.last_bucket = usize::MAX;
    }

    /// Live minutes held.
    pub fn live_minutes(&self) -> usize {
        self.buckets.len()
    }

    /// Distinct series blocks interned so far.
    pub fn series(&self) -> usize {
        self.block_keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_drain_and_free() {
        let mut c = MinuteCounters::new();
        let k = SeriesKey::new(MetricKind::VisitAssigned, 1, 2, 3, 4);
        let kb = SeriesKey::new(MetricKind::VisitFmBeta, 1, 2, 3, 4);
        let k2 = SeriesKey::new(MetricKind::SessionFm, 1, NO_MP, 3, 4);
        c.add(k, 60_000 * 10 + 5, 1);
        c.add(kb, 60_000 * 10 + 5, 1);
        c.add(k, 60_000 * 10 + 6, 1);
        c.add(k2, 60_000 * 11, 1);
        c.add(k2, 60_000 * 11, -1);
        c.add(k2, 60_000 * 11, 1);
        c.add(k2, 60_000 * 11, -1);
        let mut out = Vec::new();
        c.drain(0, &mut out);
        out.sort_by_key(|d| d.key);
        let mut want = vec![Delta { key: k, minute: 600_000, delta: 2 }, Delta { key: kb, minute: 600_000, delta: 1 }];
        want.sort_by_key(|d| d.key);
        assert_eq!(out, want);
        assert_eq!(c.series(), 2, "one visit block, one session block");
        out.clear();
        c.drain(0, &mut out);
        assert!(out.is_empty());
        assert_eq!(c.live_minutes(), 2);
        c.drain(660_000, &mut out);
        assert_eq!(c.live_minutes(), 1);
    }

    #[test]
    fn every_kind_round_trips_through_its_block() {
        for kind in [
            MetricKind::SessionAssigned,
            MetricKind::SessionFm,
            MetricKind::VisitAssigned,
            MetricKind::VisitAssignedBeta,
            MetricKind::VisitFm,
            MetricKind::VisitFmBeta,
        ] {
            let mp = if matches!(kind, MetricKind::SessionAssigned | MetricKind::SessionFm) { NO_MP } else { 7 };
            let key = SeriesKey::new(kind, 9, mp, 1, 2);
            assert_eq!(series_at(key.0 & !KIND_MASK, offset(kind)), key);
        }
    }
}
