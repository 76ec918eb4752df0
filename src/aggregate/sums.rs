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
//! The builder finds a session cell's entries without hashing: per minute of
//! the drain and per (device, login) segment, the entry of each variation in
//! a dense vector over the catalog's variations (a drain's session regions
//! share one minute and segment, and their cells differ in variation only);
//! the vectors are kept and reset entry by entry after each drain.
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

/// Sums being gathered: one entry per key, found by index; the indexes keep
/// their memory from one drain to the next.
#[derive(Default)]
pub struct SumsBuilder {
    sums: DeltaSums,
    /// The minutes of this drain's session sums, each with its entries.
    minutes: Vec<(i64, ByVariation)>,
    /// Indexes of minutes of earlier drains, reset, to reuse.
    spare: Vec<ByVariation>,
    /// Every segment seen, with this drain's entries, and where each is.
    segments: Vec<((u16, u16), ByVariation)>,
    segment_index: AHashMap<(u16, u16), usize>,
    /// Where the last session cell's minute and segment are.
    last_minute: usize,
    last_segment: usize,
    visits: AHashMap<(u32, u16, i64), u32>,
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
            let g = self.segment((device, login));
            let at = self.segments[g].1.at(variation);
            if *at == NONE {
                *at = self.sums.segments.len() as u32;
                self.sums.segments.push(SegmentSum { variation, device, login, assigned: 0 });
            }
            self.sums.segments[*at as usize].assigned += a;
        }
        let m = self.minute(minute);
        let at = self.minutes[m].1.at(variation);
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

    /// Where `minute`'s index is in `minutes`, added if new.
    #[inline]
    fn minute(&mut self, minute: i64) -> usize {
        if self.minutes.get(self.last_minute).is_some_and(|m| m.0 == minute) {
            return self.last_minute;
        }
        // A drain holds the few minutes of one interval (and late ones).
        self.last_minute = match self.minutes.iter().position(|m| m.0 == minute) {
            Some(i) => i,
            None => {
                self.minutes.push((minute, self.spare.pop().unwrap_or_default()));
                self.minutes.len() - 1
            }
        };
        self.last_minute
    }

    /// Where `segment`'s index is in `segments`, added if new.
    #[inline]
    fn segment(&mut self, segment: (u16, u16)) -> usize {
        if self.segments.get(self.last_segment).is_some_and(|g| g.0 == segment) {
            return self.last_segment;
        }
        let next = self.segments.len();
        self.last_segment = *self.segment_index.entry(segment).or_insert(next);
        if self.last_segment == next {
            self.segments.push((segment, ByVariation::default()));
        }
        self.last_segment
    }

    /// Adds one visit cell's fm beta visits, `value.fm` and `value_sq.fm`
    /// deltas (`None`: that kind had none).
    #[inline]
    pub fn add_visit_cell(&mut self, variation: u32, mp: u16, minute: i64, deltas: [Option<i64>; 3]) {
        if deltas.iter().all(Option::is_none) {
            return;
        }
        let next = self.sums.visits.len() as u32;
        let i = *self.visits.entry((variation, mp, minute)).or_insert(next);
        if i == next {
            self.sums.visits.push(VisitSum { variation, mp, minute, beta: 0, value: 0, value_sq: 0, seen: 0 });
        }
        let s = &mut self.sums.visits[i as usize];
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
        for s in &sums.sessions {
            let m = self.minute(s.minute);
            *self.minutes[m].1.at(s.variation) = NONE;
        }
        for g in &sums.segments {
            let i = self.segment((g.device, g.login));
            *self.segments[i].1.at(g.variation) = NONE;
        }
        self.spare.extend(self.minutes.drain(..).map(|(_, index)| index));
        self.visits.clear();
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
        let first = [
            d(MetricKind::SessionAssigned, 9, 0, 1, 0, 2),
            d(MetricKind::SessionAssigned, 2, 1, 1, 60_000, 1),
            d(MetricKind::SessionFm, 2, 1, 1, 0, 1),
        ];
        // The same keys again and new ones: new minutes, segments, variations.
        let second = [
            d(MetricKind::SessionAssigned, 2, 1, 1, 60_000, 4),
            d(MetricKind::SessionFm, 700, 1, 1, 120_000, 1),
            d(MetricKind::SessionAssigned, 9, 0, 1, 120_000, 3),
            d(MetricKind::SessionAssigned, 9, 2, 0, 0, 1),
            d(MetricKind::SessionAssigned, 2, 1, 1, 0, 1),
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
    }
}
