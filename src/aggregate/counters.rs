//! Per-shard, per-minute delta counters.
//!
//! Series keys are interned to dense `u32` ids on first use; each live minute
//! holds an `i64` per id. Adding is an array increment; `drain` walks only the
//! ids touched since the last drain. Minutes older than the final-minute bound
//! given to `drain` are freed after their last deltas are handed out.

use ahash::AHashMap;

use super::{minute_of, SeriesKey};

/// A change of one point, as sent from a shard to the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delta {
    pub key: SeriesKey,
    pub minute: i64,
    pub delta: i64,
}

struct MinuteBucket {
    minute: i64,
    counts: Vec<i64>,
    /// Ids whose count became non-zero since the last drain (may repeat).
    touched: Vec<u32>,
}

#[derive(Default)]
pub struct MinuteCounters {
    ids: AHashMap<SeriesKey, u32>,
    keys: Vec<SeriesKey>,
    /// Live minutes, few (lateness window / 1 minute + 1), in no fixed order.
    buckets: Vec<MinuteBucket>,
}

impl MinuteCounters {
    pub fn new() -> MinuteCounters {
        MinuteCounters::default()
    }

    #[inline]
    fn id(&mut self, key: SeriesKey) -> u32 {
        let next = self.keys.len() as u32;
        let id = *self.ids.entry(key).or_insert(next);
        if id == next {
            self.keys.push(key);
        }
        id
    }

    /// Adds `delta` to the point `(key, minute(ts))`.
    #[inline]
    pub fn add(&mut self, key: SeriesKey, ts: i64, delta: i64) {
        let id = self.id(key) as usize;
        let minute = minute_of(ts);
        let bi = match self.buckets.iter().rposition(|b| b.minute == minute) {
            Some(i) => i,
            None => {
                self.buckets.push(MinuteBucket {
                    minute,
                    counts: Vec::new(),
                    touched: Vec::new(),
                });
                self.buckets.len() - 1
            }
        };
        let b = &mut self.buckets[bi];
        if b.counts.len() <= id {
            b.counts.resize(self.keys.len().max(id + 1), 0);
        }
        let c = &mut b.counts[id];
        if *c == 0 {
            b.touched.push(id as u32);
        }
        *c += delta;
    }

    /// Appends every non-zero delta since the last drain to `out`, resetting
    /// them, and frees minutes older than `final_before` (they can no longer
    /// change).
    pub fn drain(&mut self, final_before: i64, out: &mut Vec<Delta>) {
        for b in &mut self.buckets {
            for &id in &b.touched {
                let c = &mut b.counts[id as usize];
                if *c != 0 {
                    out.push(Delta {
                        key: self.keys[id as usize],
                        minute: b.minute,
                        delta: *c,
                    });
                    *c = 0;
                }
            }
            b.touched.clear();
        }
        self.buckets.retain(|b| b.minute >= final_before);
    }

    /// Live minutes held.
    pub fn live_minutes(&self) -> usize {
        self.buckets.len()
    }

    /// Distinct series interned so far.
    pub fn series(&self) -> usize {
        self.keys.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::MetricKind;

    #[test]
    fn add_drain_and_free() {
        let mut c = MinuteCounters::new();
        let k = SeriesKey::new(MetricKind::VisitAssigned, 1, 2, 3, 4);
        let k2 = SeriesKey::new(MetricKind::SessionFm, 1, 2, 3, 4);
        c.add(k, 60_000 * 10 + 5, 1);
        c.add(k, 60_000 * 10 + 6, 1);
        c.add(k2, 60_000 * 11, 1);
        c.add(k2, 60_000 * 11, -1);
        c.add(k2, 60_000 * 11, 1);
        c.add(k2, 60_000 * 11, -1);
        let mut out = Vec::new();
        c.drain(0, &mut out);
        assert_eq!(
            out,
            vec![Delta {
                key: k,
                minute: 600_000,
                delta: 2
            }]
        );
        out.clear();
        c.drain(0, &mut out);
        assert!(out.is_empty());
        assert_eq!(c.live_minutes(), 2);
        c.drain(660_000, &mut out);
        assert_eq!(c.live_minutes(), 1);
    }
}
