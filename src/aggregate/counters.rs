//! Per-shard, per-minute delta counters, in memory that follows the traffic.
//!
//! Counters are grouped in regions, one per (tenant, mp, device, login,
//! minute) touched: all of an event's contributions share its mp, tags and
//! minute, so one region lookup serves the whole event (the last region is
//! cached). A region's counters live in cells, one per variation touched: 7
//! `i64` in a visit region (the 4 visit counts and the 3 value sums), 2 of
//! them used in the no-mp region (the session kinds). All cells of a shard
//! sit in one open-addressing table keyed by (region, variation), a cache
//! line each, so memory is proportional to the (region, variation) pairs the
//! traffic touched since the last drain, never to the size of the catalog,
//! and no memory is zeroed that is not then used.
//!
//! Counters hold deltas since the last drain. A drain hands out every non-zero
//! counter, in the order the cells were first touched, then empties the table
//! and the region index in place: they keep their allocations, so a steady
//! stream stops allocating once the table fits one trigger interval.
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

/// `region` of a free cell.
const FREE: u32 = u32::MAX;

/// The counters of one variation in one region: one cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Cell {
    /// Index into `MinuteCounters::regions`, or [`FREE`].
    region: u32,
    variation: u32,
    counts: [i64; VISIT_KINDS],
}

const FREE_CELL: Cell = Cell { region: FREE, variation: 0, counts: [0; VISIT_KINDS] };

/// Open addressing with linear probing over a power-of-two array, at most
/// half full; `used` lists the occupied positions in insertion order, so a
/// drain visits only those.
struct CellTable {
    cells: Vec<Cell>,
    /// `64 - log2(cells.len())`: a Fibonacci hash's top bits index the array.
    shift: u32,
    used: Vec<u32>,
    /// One bit per counter of each position touched since the drain (only
    /// while tracking, else empty): a change that cancels out within one
    /// flush is still reported as a zero delta (see `crate::checkpoint`).
    touched: Vec<u8>,
}

const FIRST_CAPACITY: usize = 1024;

/// Where `(region, variation)` starts probing in an array of `64 - shift` bits.
#[inline]
fn home(shift: u32, region: u32, variation: u32) -> usize {
    let h = ((region as u64) << 32 | variation as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> shift) as usize
}

impl CellTable {
    fn new() -> CellTable {
        CellTable { cells: Vec::new(), shift: 64, used: Vec::new(), touched: Vec::new() }
    }


    /// The position of the cell of `(region, variation)`, taken if new.
    #[inline]
    fn position(&mut self, region: u32, variation: u32, tracking: bool) -> usize {
        if (self.used.len() + 1) * 2 > self.cells.len() {
            self.grow(tracking);
        }
        let mask = self.cells.len() - 1;
        let mut i = home(self.shift, region, variation);
        loop {
            let c = &mut self.cells[i];
            if c.region == region && c.variation == variation {
                return i;
            }
            if c.region == FREE {
                c.region = region;
                c.variation = variation;
                self.used.push(i as u32);
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    /// Doubles the array and moves every cell (its counts and touched bits).
    #[cold]
    fn grow(&mut self, tracking: bool) {
        let capacity = (self.cells.len() * 2).max(FIRST_CAPACITY);
        let old = std::mem::replace(&mut self.cells, vec![FREE_CELL; capacity]);
        let old_touched = std::mem::replace(&mut self.touched, if tracking { vec![0; capacity] } else { Vec::new() });
        self.shift = 64 - capacity.trailing_zeros();
        let mask = capacity - 1;
        let shift = self.shift;
        for p in self.used.iter_mut() {
            let c = old[*p as usize];
            let mut i = home(shift, c.region, c.variation);
            while self.cells[i].region != FREE {
                i = (i + 1) & mask;
            }
            self.cells[i] = c;
            if tracking {
                self.touched[i] = old_touched.get(*p as usize).copied().unwrap_or(0);
            }
            *p = i as u32;
        }
    }

    /// Adds `delta` to counter `o` of the cell at `pos`; if the sum would
    /// leave `i64`, restarts the counter at `delta` and returns the count it
    /// held (to be handed out on its own).
    #[inline]
    fn add(&mut self, pos: usize, o: usize, delta: i64, tracking: bool) -> Option<i64> {
        if tracking {
            self.touched[pos] |= 1 << o;
        }
        let c = &mut self.cells[pos].counts[o];
        match c.checked_add(delta) {
            Some(v) => {
                *c = v;
                None
            }
            None => Some(std::mem::replace(c, delta)),
        }
    }
}

pub struct MinuteCounters {
    catalog: Arc<Catalog>,
    /// (region key, minute) → index into `regions`.
    index: AHashMap<(u64, i64), u32>,
    /// Per region: its key and minute.
    regions: Vec<(u64, i64)>,
    /// The last region used: (region key, minute, index).
    last: Option<(u64, i64, u32)>,
    cells: CellTable,
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
            cells: CellTable::new(),
            track_touched: false,
            spilled: Vec::new(),
        }
    }

    /// After a restore: report every touched counter, even at net zero.
    pub fn set_track_touched(&mut self, on: bool) {
        self.track_touched = on;
        self.cells.touched = if on { vec![0; self.cells.cells.len()] } else { Vec::new() };
    }

    pub fn tracks_touched(&self) -> bool {
        self.track_touched
    }

    #[inline]
    fn region(&mut self, tenant: u16, key: SeriesKey, minute: i64) -> u32 {
        let rkey = region_key(tenant, key);
        if let Some((k, m, i)) = self.last {
            if k == rkey && m == minute {
                return i;
            }
        }
        let next = self.regions.len() as u32;
        let i = *self.index.entry((rkey, minute)).or_insert(next);
        if i == next {
            self.regions.push((rkey, minute));
        }
        self.last = Some((rkey, minute, i));
        i
    }

    #[inline]
    fn add(&mut self, tenant: u16, key: SeriesKey, minute: i64, delta: i64) {
        let region = self.region(tenant, key, minute);
        let tracking = self.track_touched;
        let pos = self.cells.position(region, key.variation(), tracking);
        if let Some(full) = self.cells.add(pos, offset(key.kind()), delta, tracking) {
            self.spilled.push(Delta { key, minute, delta: full });
        }
    }

    /// Adds `delta` to the session-kind point `(key, minute(ts))`.
    #[inline]
    pub fn add_session(&mut self, key: SeriesKey, ts: i64, delta: i64) {
        debug_assert_eq!(key.mp(), NO_MP);
        let tenant = self.catalog.variations[key.variation() as usize].tenant;
        self.add(tenant, key, minute_of(ts), delta);
    }

    /// Adds `delta` to the visit-kind point `(key, minute(ts))`. The slot is
    /// the caller's proof that the variation reports the mp; cells are keyed
    /// by the variation itself.
    #[inline]
    pub fn add_visit(&mut self, key: SeriesKey, _slot: VisitSlot, ts: i64, delta: i64) {
        let tenant = self.catalog.variations[key.variation() as usize].tenant;
        self.add(tenant, key, minute_of(ts), delta);
    }

    /// Appends every non-zero delta since the last drain to `out` and empties
    /// the counters, keeping their memory for the next interval.
    pub fn drain(&mut self, out: &mut Vec<Delta>) {
        out.append(&mut self.spilled);
        let t = &mut self.cells;
        for &p in &t.used {
            let p = p as usize;
            let c = &mut t.cells[p];
            let (rkey, minute) = self.regions[c.region as usize];
            let (mp, device, login) = (((rkey >> 24) & 0xFFFF) as u16, ((rkey >> 12) & 0xFFF) as u16, (rkey & 0xFFF) as u16);
            let session = mp == NO_MP;
            let per = if session { SESSION_KINDS } else { VISIT_KINDS };
            let touched = t.touched.get(p).copied().unwrap_or(0);
            for (o, &d) in c.counts[..per].iter().enumerate() {
                if d != 0 || touched & (1 << o) != 0 {
                    let key = SeriesKey::new(kind_at(session, o), c.variation, mp, device, login);
                    out.push(Delta { key, minute, delta: d });
                }
            }
            *c = FREE_CELL;
            if let Some(b) = t.touched.get_mut(p) {
                *b = 0;
            }
        }
        t.used.clear();
        self.regions.clear();
        self.index.clear();
        self.last = None;
    }

    /// Regions held (one per tenant, mp, device, login and minute touched
    /// since the last drain).
    pub fn regions(&self) -> usize {
        self.regions.len()
    }

    /// Cells held (one per region and variation touched since the last drain).
    pub fn cells(&self) -> usize {
        self.cells.used.len()
    }

    /// Cells the table has room for (kept across drains).
    pub fn cell_capacity(&self) -> usize {
        self.cells.cells.len()
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

    #[test]
    fn cells_follow_what_is_touched_and_a_drain_keeps_their_memory() {
        let mut c = MinuteCounters::new(catalog());
        let k = SeriesKey::new(MetricKind::VisitFm, 1, 0, 3, 4);
        let kv = SeriesKey::new(MetricKind::ValueFm, 1, 0, 3, 4);
        add(&mut c, k, 60_000, 1);
        add(&mut c, kv, 60_000, 5);
        assert_eq!((c.regions(), c.cells()), (1, 1), "one variation's kinds share a cell");
        let capacity = c.cell_capacity();
        // Many regions (devices), one variation each: the table grows by what
        // is touched and moves every count.
        let n = 3 * FIRST_CAPACITY as u16;
        for device in 0..n {
            add(&mut c, SeriesKey::new(MetricKind::VisitAssigned, 3, 9, device, 1), 60_000, device as i64 + 1);
        }
        assert_eq!(c.cells(), 1 + n as usize);
        assert!(c.cell_capacity() > capacity);
        let mut out = Vec::new();
        c.drain(&mut out);
        assert_eq!(out.len(), 2 + n as usize);
        assert_eq!(&out[..2], &[Delta { key: k, minute: 60_000, delta: 1 }, Delta { key: kv, minute: 60_000, delta: 5 }]);
        for (device, d) in (0..n).zip(&out[2..]) {
            assert_eq!(d.key, SeriesKey::new(MetricKind::VisitAssigned, 3, 9, device, 1));
            assert_eq!(d.delta, device as i64 + 1);
        }
        let capacity = c.cell_capacity();
        assert_eq!((c.regions(), c.cells()), (0, 0));
        // The next interval reuses the table: no growth, nothing left over.
        add(&mut c, k, 120_000, 2);
        assert_eq!(c.cell_capacity(), capacity);
        out.clear();
        c.drain(&mut out);
        assert_eq!(out, vec![Delta { key: k, minute: 120_000, delta: 2 }]);
    }

    #[test]
    fn touched_counters_survive_the_table_growing() {
        let mut c = MinuteCounters::new(catalog());
        c.set_track_touched(true);
        let k = SeriesKey::new(MetricKind::VisitFmBeta, 0, 1, 0, 0);
        add(&mut c, k, 0, 1);
        add(&mut c, k, 0, -1);
        for device in 0..2 * FIRST_CAPACITY as u16 {
            add(&mut c, SeriesKey::new(MetricKind::SessionAssigned, 2, NO_MP, device, 0), 0, 1);
        }
        let mut out = Vec::new();
        c.drain(&mut out);
        assert_eq!(out[0], Delta { key: k, minute: 0, delta: 0 }, "cancelled out, still reported");
        assert_eq!(out.len(), 1 + 2 * FIRST_CAPACITY);
        // Touched bits are cleared by the drain.
        add(&mut c, SeriesKey::new(MetricKind::VisitAssigned, 0, 1, 0, 0), 0, 1);
        out.clear();
        c.drain(&mut out);
        assert_eq!(out, vec![Delta { key: SeriesKey::new(MetricKind::VisitAssigned, 0, 1, 0, 0), minute: 0, delta: 1 }]);
    }
}
