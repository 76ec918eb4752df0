//! Merged absolute totals in the writer stage, kept per minute.
//!
//! Invariant: for every live point, its total is the exact sum (`i128`: value
//! sums may leave the 64-bit range) of all deltas received for it, and
//! `written` the last value handed to the sink: the total clamped to `i64`
//! (SPEC §3), each clamped write counted in [`Totals::clamped`]. A point is
//! due when its clamped total differs from `written`; a never-written point
//! whose total is 0 is not due (nothing to correct). Points of minutes before
//! the final bound are written one last time if due, then forgotten: memory
//! follows the lateness window, not the run.
//!
//! Layout: one open-addressing table per live minute, of 24-byte slots (the
//! key, an `i64` total, the value written) and a byte of flags per slot
//! aside (a quarter megabyte for a quarter million slots, which stays in
//! cache); the rare total beyond 64 bits is kept exact aside in `i128`. A
//! free slot is all zeros, so a new array is zeroed memory, not filled.
//! [`Totals::apply`] looks each delta's point up once, adds the delta, and
//! lists the point (flag [`LISTED`]) the first time a flush touches it, with
//! where its slot is; it reads nothing else. [`Totals::take_due`] then reads
//! each listed slot once, in the order listed (prefetched ahead), and writes
//! its final value if due, without a second lookup, however many shards
//! touched it. Forgetting a final minute empties its whole table, which is
//! kept for a later minute, and a new table starts as large as the largest
//! one: a steady stream stops growing (and rehashing) tables. On sparse
//! traffic the tables outgrow the caches; [`Totals::apply`] prefetches each
//! delta's slot ahead of its turn.

use ahash::AHashMap;
use std::collections::BTreeMap;

use super::{prefetch, Delta, SeriesKey};

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

/// `written` holds a value handed to the sink (else it is 0, never written).
const WRITTEN: u8 = 1;
/// The point is in `Totals::pending` (touched since the last flush).
const LISTED: u8 = 2;
/// The exact total is in the table's `wide` map; `total` is unused.
const WIDE: u8 = 8;

/// One point of a minute, 24 bytes: `[!key, total, written]`, where
/// `written` is the value last handed to the sink (0 if never, flag
/// [`WRITTEN`] clear). The key is kept inverted so that a free slot is all
/// zeros: `!0` would be kind bits 15, which no [`super::MetricKind`] has.
/// (Plain `u64` words, so that `vec![FREE_SLOT; n]` allocates zeroed
/// memory.)
type Slot = [u64; 3];

const FREE_SLOT: Slot = [0; 3];
const KEY: usize = 0;
const TOTAL: usize = 1;
const WRITTEN_AT: usize = 2;

/// A point touched since the last flush: where its slot is (its key, to find
/// it again when its table grows).
struct Pending {
    key: SeriesKey,
    table: u32,
    pos: u32,
}

/// Slots of a new table.
const FIRST_SLOTS: usize = 1024;

/// How many deltas ahead [`Totals::apply`] prefetches a slot, and how many
/// listed points ahead [`Totals::take_due`] does.
const AHEAD: usize = 16;

/// Where `key` starts probing in a table of `slots` (a power of two).
#[inline]
fn home(key: u64, slots: usize) -> usize {
    let h = (key ^ key >> 29).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> (64 - slots.trailing_zeros())) as usize
}

/// The points of one minute: open addressing with linear probing over a
/// power-of-two array, at most three quarters full.
#[derive(Default)]
struct MinuteTable {
    minute: i64,
    slots: Vec<Slot>,
    /// Per slot: [`WRITTEN`], [`LISTED`], [`WIDE`].
    flags: Vec<u8>,
    len: usize,
    /// Exact totals of the slots flagged [`WIDE`].
    wide: AHashMap<u64, i128>,
}

impl MinuteTable {
    /// An empty table of `n` slots (0 or a power of two).
    fn with_slots(n: usize) -> MinuteTable {
        MinuteTable { slots: vec![FREE_SLOT; n], flags: vec![0; n], ..MinuteTable::default() }
    }

    fn total(&self, pos: usize) -> i128 {
        if self.flags[pos] & WIDE == 0 {
            self.slots[pos][TOTAL] as i64 as i128
        } else {
            self.wide[&!self.slots[pos][KEY]]
        }
    }

    /// The position of `key`'s slot, taken (zero, never written) if new;
    /// `true` if the table grew, which moves every slot.
    #[inline]
    fn position(&mut self, key: u64) -> (usize, bool) {
        let grew = (self.len + 1) * 4 > self.slots.len() * 3;
        if grew {
            self.grow();
        }
        let (mask, stored) = (self.slots.len() - 1, !key);
        let mut i = home(key, self.slots.len());
        loop {
            let s = &mut self.slots[i];
            if s[KEY] == stored {
                return (i, grew);
            }
            if s[KEY] == 0 {
                s[KEY] = stored;
                self.len += 1;
                return (i, grew);
            }
            i = (i + 1) & mask;
        }
    }

    /// The position of `key`, which is held.
    fn find(&self, key: u64) -> usize {
        let mask = self.slots.len() - 1;
        let mut i = home(key, self.slots.len());
        while self.slots[i][KEY] != !key {
            i = (i + 1) & mask;
        }
        i
    }

    #[cold]
    fn grow(&mut self) {
        let n = (self.slots.len() * 2).max(FIRST_SLOTS);
        let old = std::mem::replace(&mut self.slots, vec![FREE_SLOT; n]);
        let old_flags = std::mem::replace(&mut self.flags, vec![0; n]);
        for (s, f) in old.into_iter().zip(old_flags).filter(|(s, _)| s[KEY] != 0) {
            let mut i = home(!s[KEY], n);
            while self.slots[i][KEY] != 0 {
                i = (i + 1) & (n - 1);
            }
            self.slots[i] = s;
            self.flags[i] = f;
        }
    }

    /// Forgets every point, keeping the arrays.
    fn clear(&mut self) {
        self.slots.fill(FREE_SLOT);
        self.flags.fill(0);
        self.len = 0;
        self.wide.clear();
    }
}

#[derive(Default)]
pub struct Totals {
    /// Live minute → its table in `tables`.
    minutes: BTreeMap<i64, u32>,
    tables: Vec<MinuteTable>,
    /// Tables of forgotten minutes, emptied, to reuse.
    free: Vec<u32>,
    /// The table of the last delta's minute: (minute, table).
    last: Option<(i64, u32)>,
    /// Points touched since the last flush, once each.
    pending: Vec<Pending>,
    /// Points held.
    points: usize,
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

    /// The table of `minute`, taken from the free ones if new. Deltas come
    /// minute by minute: the last one's table, else [`Totals::other_table`]
    /// (kept out of line, so that this check inlines into every delta's
    /// lookup).
    #[inline(always)]
    fn table(&mut self, minute: i64) -> u32 {
        match self.last {
            Some((m, t)) if m == minute => t,
            _ => self.other_table(minute),
        }
    }

    #[inline(never)]
    fn other_table(&mut self, minute: i64) -> u32 {
        let t = match self.minutes.entry(minute) {
            std::collections::btree_map::Entry::Occupied(o) => *o.get(),
            std::collections::btree_map::Entry::Vacant(v) => {
                let t = self.free.pop().unwrap_or_else(|| {
                    // As large as the largest table so far (the last minutes'
                    // size), so that a steady stream's new tables never grow.
                    let slots = self.tables.iter().map(|t| t.slots.len()).max().unwrap_or(0);
                    self.tables.push(MinuteTable::with_slots(slots));
                    self.tables.len() as u32 - 1
                });
                self.tables[t as usize].minute = minute;
                *v.insert(t)
            }
        };
        self.last = Some((minute, t));
        t
    }

    /// The slot of `(key, minute)`, added if new, listed in `pending` if it
    /// is not yet.
    #[inline]
    fn touch(&mut self, key: SeriesKey, minute: i64) -> (u32, usize) {
        let t = self.table(minute);
        let table = &mut self.tables[t as usize];
        let before = table.len;
        let (pos, grew) = table.position(key.0);
        self.points += table.len - before;
        if grew {
            // Every slot of the table moved: find its listed ones again.
            for p in self.pending.iter_mut().filter(|p| p.table == t) {
                p.pos = table.find(p.key.0) as u32;
            }
        }
        let f = &mut table.flags[pos];
        if *f & LISTED == 0 {
            *f |= LISTED;
            self.pending.push(Pending { key, table: t, pos: pos as u32 });
        }
        (t, pos)
    }

    /// Adds `deltas` to their points. The tables are larger than the caches
    /// on sparse traffic, so each delta's slot is prefetched [`AHEAD`] deltas
    /// before its turn (from its home position, and the slot after it, which
    /// a probe reads next and may be on the next cache line, in the table of
    /// the minute being applied).
    pub fn apply(&mut self, deltas: &[Delta]) {
        for (i, d) in deltas.iter().enumerate() {
            if let Some(next) = deltas.get(i + AHEAD) {
                self.prefetch_slot(next);
            }
            let (t, pos) = self.touch(d.key, d.minute);
            let table = &mut self.tables[t as usize];
            let (total, f) = (&mut table.slots[pos][TOTAL], &mut table.flags[pos]);
            match (*total as i64).checked_add(d.delta) {
                Some(v) if *f & WIDE == 0 => *total = v as u64,
                _ => {
                    *table.wide.entry(d.key.0).or_insert(*total as i64 as i128) += d.delta as i128;
                    *f |= WIDE;
                }
            }
        }
    }

    #[inline]
    fn prefetch_slot(&self, d: &Delta) {
        let Some((m, t)) = self.last else { return };
        let table = &self.tables[t as usize];
        let n = table.slots.len();
        if m == d.minute && n > 0 {
            let h = home(d.key.0, n);
            prefetch(&table.slots[h]);
            prefetch(&table.slots[(h + 1) & (n - 1)]);
            prefetch(&table.flags[h]);
        }
    }

    /// Moves every due point into `out` (marking it written), then forgets the
    /// points of minutes before `final_before`. A listed point is due when
    /// its clamped total differs from what was written (0 if never), or, if
    /// `rewrite_touched`, always.
    pub fn take_due(&mut self, final_before: i64, out: &mut Vec<Point>) {
        for i in 0..self.pending.len() {
            if let Some(next) = self.pending.get(i + AHEAD) {
                if let Some(s) = self.tables[next.table as usize].slots.get(next.pos as usize) {
                    prefetch(s);
                }
            }
            let p = &self.pending[i];
            let table = &mut self.tables[p.table as usize];
            let (s, f) = (&mut table.slots[p.pos as usize], &mut table.flags[p.pos as usize]);
            *f &= !LISTED;
            let (value, clamped) = if *f & WIDE == 0 {
                (s[TOTAL] as i64, false)
            } else {
                let exact = table.wide[&p.key.0];
                (clamp(exact), clamp(exact) as i128 != exact)
            };
            if value != s[WRITTEN_AT] as i64 || self.rewrite_touched {
                s[WRITTEN_AT] = value as u64;
                *f |= WRITTEN;
                self.clamped += clamped as u64;
                out.push(Point { key: p.key, minute: table.minute, value });
            }
        }
        self.pending.clear();
        while let Some(first) = self.minutes.first_entry() {
            if *first.key() >= final_before {
                break;
            }
            let t = first.remove();
            let table = &mut self.tables[t as usize];
            self.points -= table.len;
            table.clear();
            self.free.push(t);
            self.last = None;
        }
    }

    /// Writes so far whose total was beyond 64 bits and written clamped.
    pub fn clamped(&self) -> u64 {
        self.clamped
    }

    /// Points held (live minutes only).
    pub fn len(&self) -> usize {
        self.points
    }

    /// Minutes held.
    pub fn minutes(&self) -> usize {
        self.minutes.len()
    }

    /// Every held point, for a checkpoint. Call it right after `take_due`:
    /// while a flush is open, `written` is not yet what the flush will leave.
    pub fn export(&self) -> Vec<TotalRecord> {
        let mut out = Vec::with_capacity(self.points);
        for (&minute, &t) in &self.minutes {
            let table = &self.tables[t as usize];
            for (pos, s) in table.slots.iter().enumerate().filter(|(_, s)| s[KEY] != 0) {
                let written = (table.flags[pos] & WRITTEN != 0).then_some(s[WRITTEN_AT] as i64);
                out.push((!s[KEY], minute, table.total(pos), written));
            }
        }
        out
    }

    /// Totals restored from a checkpoint; from now on every touched point is
    /// rewritten.
    pub fn restore(records: &[TotalRecord]) -> Totals {
        let mut totals = Totals { rewrite_touched: true, ..Totals::default() };
        for &(key, minute, total, written) in records {
            let t = totals.table(minute);
            let table = &mut totals.tables[t as usize];
            let before = table.len;
            let (pos, _) = table.position(key);
            totals.points += table.len - before;
            let (s, f) = (&mut table.slots[pos], &mut table.flags[pos]);
            s[WRITTEN_AT] = written.unwrap_or(0) as u64;
            *f = if written.is_some() { WRITTEN } else { 0 };
            match i64::try_from(total) {
                Ok(v) => s[TOTAL] = v as u64,
                Err(_) => {
                    *f |= WIDE;
                    table.wide.insert(key, total);
                }
            }
        }
        totals
    }

    /// Empty totals that rewrite every point touched, even at a net zero: for
    /// a fresh run where the sink may hold values of a run that crashed.
    pub fn rewriting_touched() -> Totals {
        Totals { rewrite_touched: true, ..Totals::default() }
    }

    pub fn is_empty(&self) -> bool {
        self.points == 0
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

    #[test]
    fn a_point_two_shards_touch_in_one_flush_is_written_once_with_the_sum() {
        let k = SeriesKey::new(MetricKind::VisitAssigned, 1, 1, 1, 1);
        let other = SeriesKey::new(MetricKind::VisitFm, 1, 1, 1, 1);
        let mut t = Totals::new();
        let mut out = Vec::new();
        t.apply(&[d(k, 0, 2), d(other, 0, 1)]);
        t.apply(&[d(k, 0, 3), d(k, 60_000, 1)]);
        t.take_due(i64::MIN, &mut out);
        assert_eq!(
            out,
            vec![
                Point { key: k, minute: 0, value: 5 },
                Point { key: other, minute: 0, value: 1 },
                Point { key: k, minute: 60_000, value: 1 },
            ]
        );
        // Two shards whose changes cancel out: not due, and stays clean.
        out.clear();
        t.apply(&[d(k, 0, 4)]);
        t.apply(&[d(k, 0, -4)]);
        t.take_due(i64::MIN, &mut out);
        assert!(out.is_empty());
        t.apply(&[d(k, 0, 1)]);
        t.take_due(i64::MIN, &mut out);
        assert_eq!(out, vec![Point { key: k, minute: 0, value: 6 }]);
    }

    #[test]
    fn final_minutes_are_forgotten_whole_and_their_tables_reused() {
        let k = SeriesKey::new(MetricKind::SessionFm, 1, crate::aggregate::NO_MP, 1, 1);
        let mut t = Totals::new();
        let mut out = Vec::new();
        for m in 0..5 {
            t.apply(&[d(k, m * 60_000, 1), d(SeriesKey(k.0 + 1), m * 60_000, 1)]);
        }
        t.take_due(i64::MIN, &mut out);
        assert_eq!((t.len(), t.minutes(), out.len()), (10, 5, 10));
        t.take_due(3 * 60_000, &mut out);
        assert_eq!((t.len(), t.minutes()), (4, 2), "minutes 0, 1, 2 are final");
        // A late delta to a forgotten minute starts it again from zero (as
        // before: the shards never send one, their minutes are final too).
        t.apply(&[d(k, 60_000, 7), d(k, 5 * 60_000, 1)]);
        assert_eq!(t.tables.len(), 5, "the new minutes took freed tables");
        out.clear();
        t.take_due(4 * 60_000, &mut out);
        assert_eq!(out, vec![Point { key: k, minute: 60_000, value: 7 }, Point { key: k, minute: 300_000, value: 1 }]);
        assert_eq!((t.len(), t.minutes()), (3, 2));
        t.take_due(i64::MAX, &mut out);
        assert!(t.is_empty());
    }

    #[test]
    fn export_and_restore_keep_exact_totals_and_what_was_written() {
        let (a, b, c) = (
            SeriesKey::new(MetricKind::ValueSqFm, 1, 1, 1, 1),
            SeriesKey::new(MetricKind::VisitFm, 1, 1, 1, 1),
            SeriesKey::new(MetricKind::VisitFm, 2, 1, 1, 1),
        );
        let big = 6_000_000_000_000_000_000;
        let mut t = Totals::new();
        let mut out = Vec::new();
        t.apply(&[d(a, 0, big), d(a, 0, big), d(b, 0, 1), d(b, 0, -1), d(c, 60_000, 3)]);
        t.take_due(i64::MIN, &mut out);
        let mut records = t.export();
        records.sort();
        let want = vec![(b.0, 0, 0, None), (c.0, 60_000, 3, Some(3)), (a.0, 0, 2 * big as i128, Some(i64::MAX))];
        let mut want = want;
        want.sort();
        assert_eq!(records, want);
        let mut r = Totals::restore(&records);
        assert_eq!(r.len(), 3);
        out.clear();
        // Rewrites what is touched, even unchanged; the exact total survives.
        r.apply(&[d(a, 0, -big), d(b, 0, 0)]);
        r.take_due(i64::MIN, &mut out);
        assert_eq!(out, vec![Point { key: a, minute: 0, value: big }, Point { key: b, minute: 0, value: 0 }]);
    }

    #[test]
    fn a_table_growing_within_a_flush_keeps_every_listed_point() {
        let key = |i: u64| SeriesKey::new(MetricKind::VisitFm, i as u32, 1, 1, 1);
        let mut t = Totals::new();
        let n = 3 * FIRST_SLOTS as u64;
        let first: Vec<Delta> = (0..n).map(|i| d(key(i), 0, i as i64 + 1)).collect();
        t.apply(&first);
        // Touched again after the table moved: still one point each.
        t.apply(&[d(key(0), 0, 10), d(key(n - 1), 0, 10)]);
        let mut out = Vec::new();
        t.take_due(i64::MIN, &mut out);
        assert_eq!(out.len(), n as usize);
        for (i, p) in out.iter().enumerate() {
            let extra = if i == 0 || i as u64 == n - 1 { 10 } else { 0 };
            assert_eq!(*p, Point { key: key(i as u64), minute: 0, value: i as i64 + 1 + extra });
        }
        assert_eq!(t.len(), n as usize);
        out.clear();
        t.take_due(i64::MIN, &mut out);
        assert!(out.is_empty(), "all written");
    }
}
