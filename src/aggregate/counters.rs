//! Per-shard, per-minute delta counters in dense regions.
//!
//! A region holds the counters of one (tenant, mp, device, login, minute):
//! - a visit region has 7 `i64` (the 4 visit counts and the 3 value sums) for
//!   each variation that reports the mp, at its [`VisitSlot`] (experiments
//!   listing the mp first, then those reporting every mp);
//! - the no-mp region has 2 (the session kinds) for each variation of the
//!   tenant, at its `tenant_slot`.
//!
//! All of an event's visit contributions share its mp, tags and minute, so they
//! land in one small region: one lookup per event (the last region is cached)
//! and plain array increments, in memory that popular pages keep hot.
//!
//! Counters hold deltas since the last drain. A drain hands out every non-zero
//! counter and then frees all regions — they are all zero — so memory follows
//! the traffic of one trigger interval, not the run.
//!
//! Value sums (`value_sq` above all: one session's square may reach ~6.5·10¹⁸)
//! can leave the `i64` range within one interval. A counter never wraps: when
//! an addition would overflow, its current count is set aside as a delta of
//! its own (the writer sums deltas in `i128`) and the counter restarts from the
//! addition, so the deltas handed out always add up to the exact change.

use ahash::AHashMap;
use std::sync::Arc;

use super::{minute_of, MetricKind, SeriesKey, NO_MP};
use crate::config::{Catalog, VisitSlot};

/// A change of one point, as sent from a shard to the writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Delta {
    pub key: SeriesKey,
    pub minute: i64,
    pub delta: i64,
}

const VISIT_KINDS: usize = 7;
const SESSION_KINDS: usize = 2;

/// Offset of a kind among its variation's counters.
#[inline]
fn offset(kind: MetricKind) -> usize {
    match kind {
        MetricKind::SessionAssigned | MetricKind::VisitAssigned => 0,
        MetricKind::SessionFm | MetricKind::VisitAssignedBeta => 1,
        MetricKind::VisitFm => 2,
        MetricKind::VisitFmBeta => 3,
        MetricKind::ValueAssigned => 4,
        MetricKind::ValueFm => 5,
        MetricKind::ValueSqFm => 6,
    }
}

/// The kind at `offset` of a region (session regions have no mp).
fn kind_at(session: bool, offset: usize) -> MetricKind {
    match (session, offset) {
        (true, 0) => MetricKind::SessionAssigned,
        (true, _) => MetricKind::SessionFm,
        (false, 0) => MetricKind::VisitAssigned,
        (false, 1) => MetricKind::VisitAssignedBeta,
        (false, 2) => MetricKind::VisitFm,
        (false, 3) => MetricKind::VisitFmBeta,
        (false, 4) => MetricKind::ValueAssigned,
        (false, 5) => MetricKind::ValueFm,
        (false, _) => MetricKind::ValueSqFm,
    }
}

/// (tenant, mp, device, login) packed: 16 + 16 + 12 + 12 bits (logins use 11).
#[inline]
fn region_key(tenant: u16, key: SeriesKey) -> u64 {
    (tenant as u64) << 40 | (key.mp() as u64) << 24 | (key.device() as u64) << 12 | key.login() as u64
}

struct Region {
    key: u64,
    minute: i64,
    /// Size of the listed part (visit regions).
    listed: u32,
    counts: Box<[i64]>,
    /// After a restore: one bit per counter touched since the drain, so that
    /// a change that cancels out within one flush is still reported (as a
    /// zero delta) and its point rewritten (see `crate::checkpoint`).
    touched: Option<Box<[u64]>>,
}

impl Region {
    /// Adds `delta`; if the sum would leave `i64`, restarts the counter at
    /// `delta` and returns the count it held (to be handed out on its own).
    #[inline]
    fn add(&mut self, cell: usize, delta: i64) -> Option<i64> {
        if let Some(t) = &mut self.touched {
            t[cell / 64] |= 1 << (cell % 64);
        }
        let c = &mut self.counts[cell];
        match c.checked_add(delta) {
            Some(v) => {
                *c = v;
                None
            }
            None => Some(std::mem::replace(c, delta)),
        }
    }

    #[inline]
    fn touched(&self, cell: usize) -> bool {
        self.touched.as_ref().is_some_and(|t| t[cell / 64] & (1 << (cell % 64)) != 0)
    }
}

pub struct MinuteCounters {
    catalog: Arc<Catalog>,
    /// (region key, minute) → index into `regions`.
    index: AHashMap<(u64, i64), u32>,
    regions: Vec<Region>,
    /// The last region used: (region key, minute, index).
    last: Option<(u64, i64, u32)>,
    /// Report touched counters even when their net change is zero.
    track_touched: bool,
    /// Counts set aside because adding to them would have overflowed.
    spilled: Vec<Delta>,
}

impl MinuteCounters {
    pub fn new(catalog: Arc<Catalog>) -> MinuteCounters {
        MinuteCounters {
            catalog,
            index: AHashMap::new(),
            regions: Vec::new(),
            last: None,
            track_touched: false,
            spilled: Vec::new(),
        }
    }

    /// After a restore: report every touched counter, even at net zero.
    pub fn set_track_touched(&mut self, on: bool) {
        self.track_touched = on;
    }

    pub fn tracks_touched(&self) -> bool {
        self.track_touched
    }

    #[inline]
    fn region(&mut self, tenant: u16, key: SeriesKey, minute: i64) -> usize {
        let rkey = region_key(tenant, key);
        if let Some((k, m, i)) = self.last {
            if k == rkey && m == minute {
                return i as usize;
            }
        }
        let next = self.regions.len() as u32;
        let i = *self.index.entry((rkey, minute)).or_insert(next);
        if i == next {
            let (listed, len) = if key.mp() == NO_MP {
                (0, self.catalog.tenant_variations[tenant as usize].len() * SESSION_KINDS)
            } else {
                let (listed, every) = self.catalog.visit_region(tenant, key.mp());
                (listed.len() as u32, (listed.len() + every.len()) * VISIT_KINDS)
            };
            let touched = self.track_touched.then(|| vec![0u64; len.div_ceil(64)].into_boxed_slice());
            self.regions.push(Region { key: rkey, minute, listed, counts: vec![0; len].into_boxed_slice(), touched });
        }
        self.last = Some((rkey, minute, i));
        i as usize
    }

    /// Adds `delta` to the session-kind point `(key, minute(ts))`.
    #[inline]
    pub fn add_session(&mut self, key: SeriesKey, ts: i64, delta: i64) {
        debug_assert_eq!(key.mp(), NO_MP);
        let var = self.catalog.variations[key.variation() as usize];
        let minute = minute_of(ts);
        let r = self.region(var.tenant, key, minute);
        if let Some(full) = self.regions[r].add(var.tenant_slot as usize * SESSION_KINDS + offset(key.kind()), delta) {
            self.spilled.push(Delta { key, minute, delta: full });
        }
    }

    /// Adds `delta` to the visit-kind point `(key, minute(ts))`, whose
    /// variation sits at `slot` of its mp's region.
    #[inline]
    pub fn add_visit(&mut self, key: SeriesKey, slot: VisitSlot, ts: i64, delta: i64) {
        let tenant = self.catalog.variations[key.variation() as usize].tenant;
        let minute = minute_of(ts);
        let i = self.region(tenant, key, minute);
        let r = &mut self.regions[i];
        let s = match slot {
            VisitSlot::Listed(s) => s,
            VisitSlot::Every(s) => r.listed + s,
        };
        if let Some(full) = r.add(s as usize * VISIT_KINDS + offset(key.kind()), delta) {
            self.spilled.push(Delta { key, minute, delta: full });
        }
    }

    /// Appends every non-zero delta since the last drain to `out` and frees
    /// all counters (they are zero again).
    pub fn drain(&mut self, out: &mut Vec<Delta>) {
        out.append(&mut self.spilled);
        for r in &self.regions {
            let tenant = (r.key >> 40) as u16;
            let (mp, device, login) =
                (((r.key >> 24) & 0xFFFF) as u16, ((r.key >> 12) & 0xFFF) as u16, (r.key & 0xFFF) as u16);
            let session = mp == NO_MP;
            let (first, second) = if session {
                (&self.catalog.tenant_variations[tenant as usize][..], &[][..])
            } else {
                self.catalog.visit_region(tenant, mp)
            };
            let per = if session { SESSION_KINDS } else { VISIT_KINDS };
            for (slot, c) in r.counts.chunks_exact(per).enumerate() {
                for (o, &d) in c.iter().enumerate() {
                    if d != 0 || r.touched(slot * per + o) {
                        let var = if slot < first.len() { first[slot] } else { second[slot - first.len()] };
                        let key = SeriesKey::new(kind_at(session, o), var, mp, device, login);
                        out.push(Delta { key, minute: r.minute, delta: d });
                    }
                }
            }
        }
        self.regions.clear();
        self.index.clear();
        self.last = None;
    }

    /// Regions held (one per tenant, mp, device, login and minute touched
    /// since the last drain).
    pub fn regions(&self) -> usize {
        self.regions.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::names::Names;

    fn catalog() -> Arc<Catalog> {
        let c = Config::parse(
            "[[experiment]]\nid = 1\ntenant = \"a\"\nvariations = [11, 12]\nmps = [\"m2\", \"m7\"]\n\
             [[experiment]]\nid = 2\ntenant = \"b\"\nvariations = [21]\n\
             [[experiment]]\nid = 3\ntenant = \"a\"\nvariations = [31, 32]\n",
            "t",
        )
        .unwrap();
        Arc::new(Catalog::build(&c, Arc::new(Names::default())).unwrap())
    }

    fn add(c: &mut MinuteCounters, key: SeriesKey, ts: i64, delta: i64) {
        if key.mp() == NO_MP {
            c.add_session(key, ts, delta);
        } else {
            let cat = c.catalog.clone();
            let x = &cat.experiments[cat.variations[key.variation() as usize].experiment as usize];
            c.add_visit(key, x.visit_slot(key.mp(), key.variation()).unwrap(), ts, delta);
        }
    }

    #[test]
    fn after_a_restore_a_change_that_cancels_out_is_still_reported() {
        let k = SeriesKey::new(MetricKind::SessionFm, 2, NO_MP, 3, 4);
        for (track, want) in [(false, vec![]), (true, vec![Delta { key: k, minute: 660_000, delta: 0 }])] {
            let mut c = MinuteCounters::new(catalog());
            c.set_track_touched(track);
            add(&mut c, k, 60_000 * 11, 1);
            add(&mut c, k, 60_000 * 11, -1);
            let mut out = Vec::new();
            c.drain(&mut out);
            assert_eq!(out, want, "tracking {track}");
        }
    }

    #[test]
    fn add_drain_and_free() {
        let mut c = MinuteCounters::new(catalog());
        let k = SeriesKey::new(MetricKind::VisitAssigned, 1, 0, 3, 4);
        let kb = SeriesKey::new(MetricKind::VisitFmBeta, 1, 0, 3, 4);
        let k2 = SeriesKey::new(MetricKind::SessionFm, 2, NO_MP, 3, 4);
        add(&mut c, k, 60_000 * 10 + 5, 1);
        add(&mut c, kb, 60_000 * 10 + 5, 1);
        add(&mut c, k, 60_000 * 10 + 6, 1);
        add(&mut c, k2, 60_000 * 11, 1);
        add(&mut c, k2, 60_000 * 11, -1);
        assert_eq!(c.regions(), 2);
        let mut out = Vec::new();
        c.drain(&mut out);
        out.sort_by_key(|d| d.key);
        let mut want = vec![Delta { key: k, minute: 600_000, delta: 2 }, Delta { key: kb, minute: 600_000, delta: 1 }];
        want.sort_by_key(|d| d.key);
        assert_eq!(out, want);
        assert_eq!(c.regions(), 0);
        out.clear();
        c.drain(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn a_sum_beyond_i64_is_handed_out_in_parts_never_wrapped() {
        let mut c = MinuteCounters::new(catalog());
        let k = SeriesKey::new(MetricKind::ValueSqFm, 1, 0, 3, 4);
        for _ in 0..3 {
            add(&mut c, k, 60_000, 6_000_000_000_000_000_000);
        }
        add(&mut c, k, 60_000, -1);
        let mut out = Vec::new();
        c.drain(&mut out);
        assert!(out.iter().all(|d| d.key == k && d.minute == 60_000));
        assert_eq!(out.iter().map(|d| d.delta as i128).sum::<i128>(), 18_000_000_000_000_000_000 - 1);
        out.clear();
        c.drain(&mut out);
        assert!(out.is_empty());
    }

    #[test]
    fn every_kind_round_trips_through_its_region() {
        let cat = catalog();
        for kind in [
            MetricKind::SessionAssigned,
            MetricKind::SessionFm,
            MetricKind::VisitAssigned,
            MetricKind::VisitAssignedBeta,
            MetricKind::VisitFm,
            MetricKind::VisitFmBeta,
            MetricKind::ValueAssigned,
            MetricKind::ValueFm,
            MetricKind::ValueSqFm,
        ] {
            let session = matches!(kind, MetricKind::SessionAssigned | MetricKind::SessionFm);
            // Variations 0, 1 list mps 0 and 1; 3, 4 report every mp (e.g. 9).
            for (v, mp) in [(0, 0), (1, 1), (3, 9), (4, 0)] {
                let mp = if session { NO_MP } else { mp };
                let mut c = MinuteCounters::new(cat.clone());
                let key = SeriesKey::new(kind, v, mp, 1, 2);
                add(&mut c, key, 120_000, 3);
                let mut out = Vec::new();
                c.drain(&mut out);
                assert_eq!(out, vec![Delta { key, minute: 120_000, delta: 3 }]);
            }
        }
    }
}
