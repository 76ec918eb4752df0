//! What experiment health and the results page take from a flush's deltas,
//! summed by the shard that made them ([`DeltaSums`]), so that the writer
//! adds a few sums per (variation, minute) instead of walking every delta.
//!
//! Both consumers only read five kinds (SPEC §3): `session.assigned` and
//! `session.fm` by variation and minute (and `session.assigned` by (device,
//! login) segment, all minutes together), and the fm beta visits, `value.fm`
//! and `value_sq.fm` by variation, mp and minute, all over devices and
//! logins. The shard's drain adds each region's cells once
//! ([`SumsBuilder::add_session_cell`], [`SumsBuilder::add_visit_cell`]);
//! [`DeltaSums::from_deltas`] sums any list of deltas the same way (tests,
//! and callers that hold deltas only).
//!
//! The builder finds a cell's entries without hashing it: per minute, per
//! (device, login) segment and per (mp, minute) of the drain, the entry of
//! each variation in a dense vector over the catalog's variations (the cells
//! of a region share its minute, segment and mp, and differ in variation
//! only: one map lookup per region at most); the vectors are kept and reset
//! entry by entry after each drain (~4 bytes × variations × keys of a drain).
//!
//! Invariant: the sums of a drain are exactly what summing its deltas gives,
//! and each entry records which kinds had a delta (`seen`, one bit per kind,
//! a zero delta included), since the consumers make an entry (a tenant's
//! minute, an mp's lift) as soon as a delta of its kind arrives.

use ahash::AHashMap;

use super::{Delta, MetricKind, NO_MP};

/// `seen` bits of a [`SessionSum`].
pub const SEEN_ASSIGNED: u8 = 1;
pub const SEEN_FM: u8 = 2;
/// `seen` bits of a [`VisitSum`].
pub const SEEN_BETA: u8 = 1;
pub const SEEN_VALUE: u8 = 2;
pub const SEEN_VALUE_SQ: u8 = 4;

/// `session.assigned` and `session.fm` of one variation in one minute, over
/// every device and login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SessionSum {
    pub variation: u32,
    pub minute: i64,
    pub assigned: i64,
    pub fm: i64,
    pub seen: u8,
}

/// `session.assigned` of one variation in one (device, login) segment, over
/// every minute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentSum {
    pub variation: u32,
    pub device: u16,
    pub login: u16,
    pub assigned: i64,
}

/// `visit.fm…beta`, `value.fm` and `value_sq.fm` of one variation and mp in
/// one minute, over every device and login.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VisitSum {
    pub variation: u32,
    pub mp: u16,
    pub minute: i64,
    pub beta: i64,
    pub value: i128,
    pub value_sq: i128,
    pub seen: u8,
}

/// One flush's sums, as carried in a shard report.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeltaSums {
    pub sessions: Vec<SessionSum>,
    pub segments: Vec<SegmentSum>,
    pub visits: Vec<VisitSum>,
}

impl DeltaSums {
    /// The sums of `deltas`, as a drain that handed them out makes them.
    pub fn from_deltas(deltas: &[Delta]) -> DeltaSums {
        let mut b = SumsBuilder::default();
        for d in deltas {
            b.add_delta(d);
        }
        b.take()
    }

    /// Entries in all (what the writer adds).
    pub fn len(&self) -> usize {
        self.sessions.len() + self.segments.len() + self.visits.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// No entry yet.
const NONE: u32 = u32::MAX;

/// The entry of each variation (by catalog index) for one key, or [`NONE`];
/// as long as the largest variation seen.
#[derive(Default)]
struct ByVariation(Vec<u32>);

impl ByVariation {
    #[inline]
    fn at(&mut self, variation: u32) -> &mut u32 {
        let v = variation as usize;
        if v >= self.0.len() {
            self.0.resize(v + 1, NONE);
        }
        &mut self.0[v]
    }
}

/// Entry numbers by (key, variation): per key of a drain (a minute, a
/// segment, an (mp, minute)) a dense index by variation, found through the
/// last key used, else a map. Emptied after each drain, its indexes kept.
struct Entries<K> {
    keys: Vec<(K, ByVariation)>,
    index: AHashMap<K, usize>,
    last: usize,
}

impl<K> Default for Entries<K> {
    fn default() -> Self {
        Entries { keys: Vec::new(), index: AHashMap::new(), last: 0 }
    }
}

impl<K: Copy + Eq + std::hash::Hash> Entries<K> {
    /// The entry of `(key, variation)`, [`NONE`] if it has none yet; a new
    /// key takes an index from `spare`.
    #[inline]
    fn at(&mut self, key: K, variation: u32, spare: &mut Vec<ByVariation>) -> &mut u32 {
        if self.keys.get(self.last).is_none_or(|k| k.0 != key) {
            let next = self.keys.len();
            self.last = *self.index.entry(key).or_insert(next);
            if self.last == next {
                self.keys.push((key, spare.pop().unwrap_or_default()));
            }
        }
        self.keys[self.last].1.at(variation)
    }

    /// Forgets every entry (`made`: each one's key and variation) and key;
    /// the indexes, all [`NONE`] again, go to `spare`.
    fn clear(&mut self, made: impl Iterator<Item = (K, u32)>, spare: &mut Vec<ByVariation>) {
        for (key, variation) in made {
            *self.at(key, variation, spare) = NONE;
        }
        spare.extend(self.keys.drain(..).map(|(_, index)| index));
        self.index.clear();
    }
}

/// Sums being gathered: one entry per key, found by index; the indexes keep
/// their memory from one drain to the next.
#[derive(Default)]
pub struct SumsBuilder {
    sums: DeltaSums,
    /// By minute, by (device, login) segment, by (mp, minute).
    sessions: Entries<i64>,
    segments: Entries<(u16, u16)>,
    visits: Entries<(u16, i64)>,
    /// Indexes of earlier drains' keys, all [`NONE`], to reuse.
    spare: Vec<ByVariation>,
}

impl SumsBuilder {
    /// Adds one session cell's deltas (`None`: that kind had none).
    #[inline]
    pub fn add_session_cell(
        &mut self,
        variation: u32,
        minute: i64,
        device: u16,
        login: u16,
        assigned: Option<i64>,
        fm: Option<i64>,
    ) {
        if assigned.is_none() && fm.is_none() {
            return;
        }
        if let Some(a) = assigned {
            let at = self.segments.at((device, login), variation, &mut self.spare);
            if *at == NONE {
                *at = self.sums.segments.len() as u32;
                self.sums.segments.push(SegmentSum { variation, device, login, assigned: 0 });
            }
            self.sums.segments[*at as usize].assigned += a;
        }
        let at = self.sessions.at(minute, variation, &mut self.spare);
        if *at == NONE {
            *at = self.sums.sessions.len() as u32;
            self.sums.sessions.push(SessionSum { variation, minute, assigned: 0, fm: 0, seen: 0 });
        }
        let s = &mut self.sums.sessions[*at as usize];
        if let Some(a) = assigned {
            s.assigned += a;
            s.seen |= SEEN_ASSIGNED;
        }
        if let Some(f) = fm {
            s.fm += f;
            s.seen |= SEEN_FM;
        }
    }

    /// Adds one visit cell's fm beta visits, `value.fm` and `value_sq.fm`
    /// deltas (`None`: that kind had none).
    #[inline]
    pub fn add_visit_cell(&mut self, variation: u32, mp: u16, minute: i64, deltas: [Option<i64>; 3]) {
        if deltas.iter().all(Option::is_none) {
            return;
        }
        let at = self.visits.at((mp, minute), variation, &mut self.spare);
        if *at == NONE {
            *at = self.sums.visits.len() as u32;
            self.sums.visits.push(VisitSum { variation, mp, minute, beta: 0, value: 0, value_sq: 0, seen: 0 });
        }
        let s = &mut self.sums.visits[*at as usize];
        let [beta, value, value_sq] = deltas;
        if let Some(b) = beta {
            s.beta += b;
            s.seen |= SEEN_BETA;
        }
        if let Some(v) = value {
            s.value += v as i128;
            s.seen |= SEEN_VALUE;
        }
        if let Some(v) = value_sq {
            s.value_sq += v as i128;
            s.seen |= SEEN_VALUE_SQ;
        }
    }

    /// Adds one delta (kinds the consumers do not read are ignored).
    pub fn add_delta(&mut self, d: &Delta) {
        let (v, minute, k) = (d.key.variation(), d.minute, d.key);
        match k.kind() {
            MetricKind::SessionAssigned => self.add_session_cell(v, minute, k.device(), k.login(), Some(d.delta), None),
            MetricKind::SessionFm => self.add_session_cell(v, minute, k.device(), k.login(), None, Some(d.delta)),
            MetricKind::VisitFmBeta => self.add_visit_cell(v, k.mp(), minute, [Some(d.delta), None, None]),
            MetricKind::ValueFm => self.add_visit_cell(v, k.mp(), minute, [None, Some(d.delta), None]),
            MetricKind::ValueSqFm => self.add_visit_cell(v, k.mp(), minute, [None, None, Some(d.delta)]),
            _ => {}
        }
        debug_assert!(!matches!(k.kind(), MetricKind::SessionAssigned | MetricKind::SessionFm) || k.mp() == NO_MP);
    }

    /// The sums gathered since the last take; the builder is empty again.
    pub fn take(&mut self) -> DeltaSums {
        let sums = std::mem::take(&mut self.sums);
        let spare = &mut self.spare;
        self.sessions.clear(sums.sessions.iter().map(|s| (s.minute, s.variation)), spare);
        self.segments.clear(sums.segments.iter().map(|g| ((g.device, g.login), g.variation)), spare);
        self.visits.clear(sums.visits.iter().map(|s| ((s.mp, s.minute), s.variation)), spare);
        sums
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::SeriesKey;

    #[test]
    fn deltas_sum_by_variation_and_minute_and_segment_and_record_what_was_seen() {
        let d =
            |kind, v, mp, device, minute, delta| Delta { key: SeriesKey::new(kind, v, mp, device, 1), minute, delta };
        let sums = DeltaSums::from_deltas(&[
            d(MetricKind::SessionAssigned, 3, NO_MP, 0, 0, 2),
            d(MetricKind::SessionAssigned, 3, NO_MP, 1, 0, 5),
            d(MetricKind::SessionAssigned, 3, NO_MP, 1, 60_000, 1),
            d(MetricKind::SessionFm, 3, NO_MP, 2, 120_000, 0),
            d(MetricKind::VisitAssigned, 3, 7, 0, 0, 9),
            d(MetricKind::ValueFm, 3, 7, 0, 0, i64::MAX),
            d(MetricKind::ValueFm, 3, 7, 1, 0, i64::MAX),
            d(MetricKind::VisitFmBeta, 3, 7, 1, 0, 1),
        ]);
        let s = |minute, assigned, fm, seen| SessionSum { variation: 3, minute, assigned, fm, seen };
        assert_eq!(
            sums.sessions,
            [s(0, 7, 0, SEEN_ASSIGNED), s(60_000, 1, 0, SEEN_ASSIGNED), s(120_000, 0, 0, SEEN_FM)],
            "a zero delta is still seen"
        );
        let g = |device, assigned| SegmentSum { variation: 3, device, login: 1, assigned };
        assert_eq!(sums.segments, [g(0, 2), g(1, 6)], "segments over every minute");
        let value = 2 * i64::MAX as i128;
        let want =
            VisitSum { variation: 3, mp: 7, minute: 0, beta: 1, value, value_sq: 0, seen: SEEN_BETA | SEEN_VALUE };
        assert_eq!(sums.visits, [want], "over devices, exact beyond i64; other kinds ignored");
    }

    #[test]
    fn a_builder_starts_every_drain_afresh_whatever_the_last_one_held() {
        let d = |kind, v, device, login, minute, delta| Delta {
            key: SeriesKey::new(kind, v, NO_MP, device, login),
            minute,
            delta,
        };
        let visit = |kind, v, mp, minute, delta| Delta { key: SeriesKey::new(kind, v, mp, 1, 1), minute, delta };
        let first = [
            d(MetricKind::SessionAssigned, 9, 0, 1, 0, 2),
            d(MetricKind::SessionAssigned, 2, 1, 1, 60_000, 1),
            d(MetricKind::SessionFm, 2, 1, 1, 0, 1),
            visit(MetricKind::ValueFm, 2, 4, 0, 7),
            visit(MetricKind::VisitFmBeta, 9, 4, 0, 1),
        ];
        // The same keys again and new ones: new minutes, segments, mps, variations.
        let second = [
            d(MetricKind::SessionAssigned, 2, 1, 1, 60_000, 4),
            d(MetricKind::SessionFm, 700, 1, 1, 120_000, 1),
            d(MetricKind::SessionAssigned, 9, 0, 1, 120_000, 3),
            d(MetricKind::SessionAssigned, 9, 2, 0, 0, 1),
            d(MetricKind::SessionAssigned, 2, 1, 1, 0, 1),
            visit(MetricKind::ValueSqFm, 2, 4, 0, 5),
            visit(MetricKind::VisitFmBeta, 2, 5, 0, 1),
            visit(MetricKind::ValueFm, 9, 4, 60_000, 3),
        ];
        let mut b = SumsBuilder::default();
        for round in 0..3 {
            for delta in &first {
                b.add_delta(delta);
            }
            assert_eq!(b.take(), DeltaSums::from_deltas(&first), "round {round}");
            for delta in &second {
                b.add_delta(delta);
            }
            assert_eq!(b.take(), DeltaSums::from_deltas(&second), "round {round}");
        }
        assert_eq!(DeltaSums::from_deltas(&second).sessions.len(), 5);
        assert_eq!(DeltaSums::from_deltas(&second).segments.len(), 3);
        assert_eq!(DeltaSums::from_deltas(&second).visits.len(), 3);
    }
}
