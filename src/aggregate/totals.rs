//! Merged absolute totals in the writer stage.
//!
//! Invariant: for every live point, `total` is the exact sum (`i128`: value
//! sums may leave the 64-bit range) of all deltas received for it, and
//! `written` the last value handed to the sink: the total clamped to `i64`
//! (SPEC §3), each clamped write counted in [`Totals::clamped`]. A point is
//! due when its clamped total differs from `written`; a never-written point
//! whose total is 0 is not due (nothing to correct). Points of minutes before
//! the final bound are written one last time if due, then forgotten: memory
//! follows the lateness window, not the run.

use ahash::AHashMap;

use super::{Delta, SeriesKey};

/// One upsert: the absolute total of a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Point {
    pub key: SeriesKey,
    pub minute: i64,
    pub value: i64,
}

/// A held total as a checkpoint saves it: `(series key, minute, exact
/// total, last written, as clamped to i64)` ([`Totals::export`],
/// [`Totals::restore`]).
pub type TotalRecord = (u64, i64, i128, Option<i64>);

#[derive(Clone, Copy)]
struct State {
    total: i128,
    written: Option<i64>,
    /// Write at the next flush even if the total did not change.
    force: bool,
}

#[derive(Default)]
pub struct Totals {
    points: AHashMap<(SeriesKey, i64), State>,
    dirty: Vec<(SeriesKey, i64)>,
    /// After a restore: every point a delta touches is written again, even if
    /// its net change is zero (see `crate::checkpoint`).
    rewrite_touched: bool,
    /// Writes whose total was outside `i64` and was clamped.
    clamped: u64,
}

/// `total` as written: clamped to the `i64` range.
#[inline]
fn clamp(total: i128) -> i64 {
    total.clamp(i64::MIN as i128, i64::MAX as i128) as i64
}

impl Totals {
    pub fn new() -> Totals {
        Totals::default()
    }

    pub fn apply(&mut self, deltas: &[Delta]) {
        for d in deltas {
            let k = (d.key, d.minute);
            let st = self.points.entry(k).or_insert(State { total: 0, written: None, force: false });
            if st.written.unwrap_or(0) == clamp(st.total) && !st.force {
                // Was clean; may repeat in `dirty`, which `take_due` tolerates.
                self.dirty.push(k);
            }
            st.force |= self.rewrite_touched;
            st.total += d.delta as i128;
        }
    }

    /// Moves every due point into `out` (marking it written), then forgets the
    /// points of minutes before `final_before`.
    pub fn take_due(&mut self, final_before: i64, out: &mut Vec<Point>) {
        for k in self.dirty.drain(..) {
            let Some(st) = self.points.get_mut(&k) else {
                continue;
            };
            let value = clamp(st.total);
            if value != st.written.unwrap_or(0) || st.force {
                if value as i128 != st.total {
                    self.clamped += 1;
                }
                out.push(Point { key: k.0, minute: k.1, value });
                st.written = Some(value);
                st.force = false;
            }
        }
        if final_before > i64::MIN {
            self.points.retain(|&(_, m), _| m >= final_before);
        }
    }

    /// Writes so far whose total was beyond 64 bits and written clamped.
    pub fn clamped(&self) -> u64 {
        self.clamped
    }

    /// Points held (live minutes only).
    pub fn len(&self) -> usize {
        self.points.len()
    }

    /// Every held point, for a checkpoint (call right after `take_due`).
    pub fn export(&self) -> Vec<TotalRecord> {
        self.points.iter().map(|(&(k, m), st)| (k.0, m, st.total, st.written)).collect()
    }

    /// Totals restored from a checkpoint; from now on every touched point is
    /// rewritten.
    pub fn restore(records: &[TotalRecord]) -> Totals {
        let points = records
            .iter()
            .map(|&(k, m, total, written)| ((SeriesKey(k), m), State { total, written, force: false }))
            .collect();
        Totals { points, dirty: Vec::new(), rewrite_touched: true, clamped: 0 }
    }

    /// Empty totals that rewrite every point touched, even at a net zero: for
    /// a fresh run where the sink may hold values of a run that crashed.
    pub fn rewriting_touched() -> Totals {
        Totals { rewrite_touched: true, ..Totals::default() }
    }

    pub fn is_empty(&self) -> bool {
        self.points.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::MetricKind;

    fn d(key: SeriesKey, minute: i64, delta: i64) -> Delta {
        Delta { key, minute, delta }
    }

    #[test]
    fn writes_changed_totals_and_zero_after_correction() {
        let k = SeriesKey::new(MetricKind::VisitFm, 1, 1, 1, 1);
        let mut t = Totals::new();
        let mut out = Vec::new();
        t.apply(&[d(k, 0, 2), d(k, 60_000, 1), d(k, 60_000, -1)]);
        t.take_due(i64::MIN, &mut out);
        assert_eq!(out, vec![Point { key: k, minute: 0, value: 2 }]);
        out.clear();
        t.take_due(i64::MIN, &mut out);
        assert!(out.is_empty(), "nothing changed");
        t.apply(&[d(k, 0, -2)]);
        t.take_due(i64::MIN, &mut out);
        assert_eq!(out, vec![Point { key: k, minute: 0, value: 0 }]);
        out.clear();
        t.apply(&[d(k, 0, 1), d(k, 0, -1)]);
        t.take_due(60_000, &mut out);
        assert!(out.is_empty(), "back to the written total");
        assert_eq!(t.len(), 1, "minute 0 is final and forgotten");
        t.take_due(120_000, &mut out);
        assert!(t.is_empty());
    }

    #[test]
    fn a_total_beyond_64_bits_is_clamped_when_written_and_counted_never_wrapped() {
        let k = SeriesKey::new(MetricKind::ValueSqFm, 1, 1, 1, 1);
        let big = 6_000_000_000_000_000_000;
        let mut t = Totals::new();
        let mut out = Vec::new();
        t.apply(&[d(k, 0, big), d(k, 0, big)]);
        t.take_due(i64::MIN, &mut out);
        assert_eq!(out, vec![Point { key: k, minute: 0, value: i64::MAX }]);
        assert_eq!(t.clamped(), 1);
        out.clear();
        t.apply(&[d(k, 0, 1)]);
        t.take_due(i64::MIN, &mut out);
        assert!(out.is_empty(), "still clamped to the value written");
        // Back inside the range: the exact total, as if it had never left it.
        t.apply(&[d(k, 0, -big), d(k, 0, -big), d(k, 0, 41)]);
        t.take_due(i64::MIN, &mut out);
        assert_eq!(out, vec![Point { key: k, minute: 0, value: 42 }]);
        assert_eq!(t.clamped(), 1);
        t.apply(&[d(k, 0, i64::MIN), d(k, 0, i64::MIN)]);
        out.clear();
        t.take_due(i64::MIN, &mut out);
        assert_eq!(out, vec![Point { key: k, minute: 0, value: i64::MIN }]);
        assert_eq!(t.clamped(), 2);
    }
}
