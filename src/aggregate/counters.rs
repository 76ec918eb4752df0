//! Per-shard, per-minute delta counters, in memory that follows the traffic.
//!
//! Counters are grouped in regions, one per (tenant, mp, device, login,
//! minute) touched: all of an event's contributions share its mp, tags and
//! minute, so one region lookup serves the whole event (the last region is
//! cached). The session code hands in an event's changes summed per
//! variation ([`CellAdd`], [`MinuteCounters::add_cells`]): one probe per
//! (event, variation), all the event's cell lines requested before the first
//! probe waits for one. A region is a small open-addressing table of cells, one per
//! variation touched, a cache line each: 7 `i64` in a visit region (the 4
//! visit counts and the 3 value sums), 2 of them used in the no-mp region
//! (the session kinds). A region starts with room for the mean region of
//! the last drain (at least 4 cells, at most 64) and doubles as it fills,
//! so memory is proportional to the (region, variation) pairs the traffic
//! touched since the last drain, never to the size of the catalog, and an
//! event's cells stay together, in tables that popular pages keep hot.
//!
//! Counters hold deltas since the last drain. A drain hands out every non-zero
//! counter, region by region (asking for the cells of the region two ahead
//! while it reads one), then keeps every emptied table for reuse (by size): a
//! steady stream stops allocating once the tables fit one interval.
//!
//! Value sums (`value_sq` above all: one session's square may reach ~6.5·10¹⁸)
//! can leave the `i64` range within one interval. A counter never wraps: when
//! an addition would overflow, its current count is set aside as a delta of
//! its own (the writer sums deltas in `i128`) and the counter restarts from the
//! addition, so the deltas handed out always add up to the exact change.

use ahash::AHashMap;
use std::sync::Arc;

use super::sums::SumsBuilder;
use super::{minute_of, prefetch, MetricKind, SeriesKey, NO_MP};
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
fn region_key(tenant: u16, mp: u16, device: u16, login: u16) -> u64 {
    (tenant as u64) << 40 | (mp as u64) << 24 | (device as u64) << 12 | login as u64
}

/// `variation` of a free cell.
const FREE: u32 = u32::MAX;

/// The counters of one variation in one region: one cache line.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Cell {
    /// The variation, or [`FREE`].
    variation: u32,
    /// One bit per counter touched since the drain (only while tracking): a
    /// change that cancels out within one flush is still reported as a zero
    /// delta (see `crate::checkpoint`).
    touched: u8,
    counts: [i64; VISIT_KINDS],
}

const FREE_CELL: Cell = Cell { variation: FREE, touched: 0, counts: [0; VISIT_KINDS] };

/// What one event changes in one variation's cell of a region, summed by kind
/// before it is added: [`MinuteCounters::add_cells`] probes a cell once per
/// (event, variation), not once per counter.
#[derive(Debug, Clone, Copy)]
pub struct CellAdd {
    variation: u32,
    /// One bit per counter changed (an addition of 0 changes it too: it is
    /// touched, as by [`MinuteCounters::add_visit`] with 0).
    kinds: u8,
    counts: [i64; VISIT_KINDS],
}

impl CellAdd {
    /// No change yet to `variation`'s cell.
    #[inline]
    pub fn new(variation: u32) -> CellAdd {
        CellAdd { variation, kinds: 0, counts: [0; VISIT_KINDS] }
    }

    pub fn variation(&self) -> u32 {
        self.variation
    }

    /// Adds `delta` to this variation's counter of `kind`. One event's
    /// changes to one counter are a few at most, each far inside `i64`
    /// (see `crate::session`), so their sum cannot overflow.
    #[inline]
    pub fn add(&mut self, kind: MetricKind, delta: i64) {
        let o = offset(kind);
        self.kinds |= 1 << o;
        self.counts[o] += delta;
    }

    /// Adds the changes of `other` (the same variation's).
    #[inline]
    pub fn merge(&mut self, other: &CellAdd) {
        debug_assert_eq!(self.variation, other.variation);
        self.kinds |= other.kinds;
        for (c, d) in self.counts.iter_mut().zip(&other.counts) {
            *c += d;
        }
    }
}

/// How many regions ahead a drain asks for a region's cells.
const DRAIN_AHEAD: usize = 2;

/// Cells of the smallest region table.
const FIRST_CELLS: usize = 4;
/// The most cells a region starts with (4 KiB).
const MAX_START_CELLS: usize = 64;

/// The counters of one (tenant, mp, device, login, minute): an open-addressing
/// table by variation (linear probing, power-of-two size, at most half full:
/// a cell is a cache line, so every extra probe is one more line to wait for).
struct Region {
    key: u64,
    minute: i64,
    cells: Vec<Cell>,
    len: usize,
}

/// Where `variation` starts probing in a table of `cells` (a power of two).
#[inline]
fn home(variation: u32, cells: usize) -> usize {
    let h = (variation as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> (64 - cells.trailing_zeros())) as usize
}

/// Empty tables kept by drains, by size class (`log2(len / FIRST_CELLS)`).
#[derive(Default)]
struct Spare {
    by_class: Vec<Vec<Vec<Cell>>>,
}

impl Spare {
    /// An all-free table of `cells` cells.
    fn take(&mut self, cells: usize) -> Vec<Cell> {
        let class = (cells / FIRST_CELLS).trailing_zeros() as usize;
        self.by_class.get_mut(class).and_then(Vec::pop).unwrap_or_else(|| vec![FREE_CELL; cells])
    }

    /// Keeps `table`, whose cells must all be free again.
    fn give(&mut self, table: Vec<Cell>) {
        let class = (table.len() / FIRST_CELLS).trailing_zeros() as usize;
        if self.by_class.len() <= class {
            self.by_class.resize_with(class + 1, Vec::new);
        }
        self.by_class[class].push(table);
    }

    fn cells(&self) -> usize {
        self.by_class.iter().flatten().map(Vec::len).sum()
    }
}

impl Region {
    /// The position of `variation`'s cell, taken if new.
    #[inline]
    fn position(&mut self, variation: u32, spare: &mut Spare) -> usize {
        if (self.len + 1) * 2 > self.cells.len() {
            self.grow(spare);
        }
        let mask = self.cells.len() - 1;
        let mut i = home(variation, self.cells.len());
        loop {
            let c = &mut self.cells[i];
            if c.variation == variation {
                return i;
            }
            if c.variation == FREE {
                c.variation = variation;
                self.len += 1;
                return i;
            }
            i = (i + 1) & mask;
        }
    }

    /// Loads the line where `variation` starts probing, so that the probes of
    /// one event's cells, issued together, wait for memory together.
    #[inline]
    fn touch(&self, variation: u32) -> u32 {
        self.cells[home(variation, self.cells.len())].variation
    }

    /// Moves the cells to a table twice the size; the old one, freed, goes
    /// back to `spare`.
    #[cold]
    fn grow(&mut self, spare: &mut Spare) {
        let bigger = spare.take(self.cells.len() * 2);
        let mut old = std::mem::replace(&mut self.cells, bigger);
        let mask = self.cells.len() - 1;
        for c in old.iter_mut().filter(|c| c.variation != FREE) {
            let mut i = home(c.variation, self.cells.len());
            while self.cells[i].variation != FREE {
                i = (i + 1) & mask;
            }
            self.cells[i] = std::mem::replace(c, FREE_CELL);
        }
        spare.give(old);
    }

    /// Adds `delta` to counter `o` of the cell at `pos`; if the sum would
    /// leave `i64`, restarts the counter at `delta` and returns the count it
    /// held (to be handed out on its own).
    #[inline]
    fn add(&mut self, pos: usize, o: usize, delta: i64, tracking: bool) -> Option<i64> {
        let cell = &mut self.cells[pos];
        if tracking {
            cell.touched |= 1 << o;
        }
        let c = &mut cell.counts[o];
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
    regions: Vec<Region>,
    /// The last region used: (region key, minute, index).
    last: Option<(u64, i64, u32)>,
    spare: Spare,
    /// Cells a new region starts with: enough for the mean region of the
    /// last drain, so that most never grow.
    start_cells: usize,
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
            spare: Spare::default(),
            start_cells: FIRST_CELLS,
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
        self.region_at(region_key(tenant, key.mp(), key.device(), key.login()), minute)
    }

    #[inline]
    fn region_at(&mut self, rkey: u64, minute: i64) -> usize {
        if let Some((k, m, i)) = self.last {
            if k == rkey && m == minute {
                return i as usize;
            }
        }
        let next = self.regions.len() as u32;
        let i = *self.index.entry((rkey, minute)).or_insert(next);
        if i == next {
            let cells = self.spare.take(self.start_cells);
            self.regions.push(Region { key: rkey, minute, cells, len: 0 });
        }
        self.last = Some((rkey, minute, i));
        i as usize
    }

    #[inline]
    fn add(&mut self, tenant: u16, key: SeriesKey, minute: i64, delta: i64) {
        let r = self.region(tenant, key, minute);
        let region = &mut self.regions[r];
        let pos = region.position(key.variation(), &mut self.spare);
        if let Some(full) = region.add(pos, offset(key.kind()), delta, self.track_touched) {
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

    /// Requests the lines where the cells of `variations` start probing in
    /// the region `(tenant, mp, device, login, minute(ts))`, if it exists,
    /// and remembers that region as the last one used. The session code calls
    /// it as an event starts, so that the lines arrive while it works out the
    /// event's changes (a hint: no effect on results, nothing is created).
    #[inline]
    pub fn prefetch_cells(
        &mut self,
        tenant: u16,
        mp: u16,
        device: u16,
        login: u16,
        ts: i64,
        variations: impl Iterator<Item = u32>,
    ) {
        let (rkey, minute) = (region_key(tenant, mp, device, login), minute_of(ts));
        let i = match self.last {
            Some((k, m, i)) if k == rkey && m == minute => i,
            _ => match self.index.get(&(rkey, minute)) {
                Some(&i) => {
                    self.last = Some((rkey, minute, i));
                    i
                }
                None => return,
            },
        };
        let cells = &self.regions[i as usize].cells;
        for v in variations {
            prefetch(&cells[home(v, cells.len())]);
        }
    }

    /// Adds one event's changes `cells` (variations of `tenant`, each at most
    /// once) to the region `(tenant, mp, device, login, minute(ts))`: the
    /// region is found once, and every cell's line is requested before the
    /// first is probed. Session kinds go to the region of mp [`NO_MP`].
    #[inline]
    pub fn add_cells(&mut self, tenant: u16, mp: u16, device: u16, login: u16, ts: i64, cells: &[CellAdd]) {
        let minute = minute_of(ts);
        let r = self.region_at(region_key(tenant, mp, device, login), minute);
        let region = &mut self.regions[r];
        if cells.len() > 1 {
            let mut seen = 0;
            for c in cells {
                seen ^= region.touch(c.variation);
            }
            std::hint::black_box(seen);
        }
        for c in cells {
            if c.kinds == 0 {
                continue;
            }
            debug_assert_eq!(self.catalog.variations[c.variation as usize].tenant, tenant);
            let pos = region.position(c.variation, &mut self.spare);
            let cell = &mut region.cells[pos];
            if self.track_touched {
                cell.touched |= c.kinds;
            }
            // Only the counters the event changed (a count whose bit is
            // clear is 0): on sparse traffic a cell changes by one or two.
            let mut kinds = c.kinds;
            while kinds != 0 {
                let o = kinds.trailing_zeros() as usize;
                kinds &= kinds - 1;
                let (count, d) = (&mut cell.counts[o], c.counts[o]);
                match count.checked_add(d) {
                    Some(v) => *count = v,
                    None => {
                        let key = SeriesKey::new(kind_at(mp == NO_MP, o), c.variation, mp, device, login);
                        self.spilled.push(Delta { key, minute, delta: std::mem::replace(count, d) });
                    }
                }
            }
        }
    }

    /// Appends every non-zero delta since the last drain to `out` and empties
    /// the counters, keeping their tables for the next interval.
    pub fn drain(&mut self, out: &mut Vec<Delta>) {
        self.drain_into(out, None);
    }

    /// [`MinuteCounters::drain`], also adding what experiment health and the
    /// results page read of those deltas to `sums`, once per cell.
    pub fn drain_summed(&mut self, out: &mut Vec<Delta>, sums: &mut SumsBuilder) {
        self.drain_into(out, Some(sums));
    }

    fn drain_into(&mut self, out: &mut Vec<Delta>, mut sums: Option<&mut SumsBuilder>) {
        if let Some(sums) = sums.as_deref_mut() {
            self.spilled.iter().for_each(|d| sums.add_delta(d));
        }
        out.append(&mut self.spilled);
        if !self.regions.is_empty() {
            let cells = self.cells();
            // About one delta per cell (sparse traffic changes one or two
            // of a cell's counters): one allocation, not a doubling series.
            out.reserve(cells + cells / 4);
            let mean = cells.div_ceil(self.regions.len());
            self.start_cells = (mean * 2).next_power_of_two().clamp(FIRST_CELLS, MAX_START_CELLS);
        }
        let mut regions = std::mem::take(&mut self.regions);
        for i in 0..regions.len() {
            // Each region's table is an allocation of its own, out of cache
            // by now on sparse traffic: its lines are asked for two regions
            // ahead (the first 16; the hardware follows a longer one).
            if let Some(ahead) = regions.get(i + DRAIN_AHEAD) {
                ahead.cells.iter().take(16).for_each(prefetch);
            }
            let r = &mut regions[i];
            let (mp, device, login) =
                (((r.key >> 24) & 0xFFFF) as u16, ((r.key >> 12) & 0xFFF) as u16, (r.key & 0xFFF) as u16);
            let session = mp == NO_MP;
            let per = if session { SESSION_KINDS } else { VISIT_KINDS };
            for c in r.cells.iter_mut().filter(|c| c.variation != FREE) {
                for (o, &d) in c.counts[..per].iter().enumerate() {
                    if d != 0 || c.touched & (1 << o) != 0 {
                        let key = SeriesKey::new(kind_at(session, o), c.variation, mp, device, login);
                        out.push(Delta { key, minute: r.minute, delta: d });
                    }
                }
                if let Some(sums) = sums.as_deref_mut() {
                    // The same deltas as just handed out, of the kinds the sums read.
                    let handed = |o: usize| (c.counts[o] != 0 || c.touched & (1 << o) != 0).then_some(c.counts[o]);
                    if session {
                        sums.add_session_cell(c.variation, r.minute, device, login, handed(0), handed(1));
                    } else {
                        let fm = [
                            offset(MetricKind::VisitFmBeta),
                            offset(MetricKind::ValueFm),
                            offset(MetricKind::ValueSqFm),
                        ];
                        sums.add_visit_cell(c.variation, mp, r.minute, fm.map(handed));
                    }
                }
                *c = FREE_CELL;
            }
            self.spare.give(std::mem::take(&mut r.cells));
        }
        regions.clear();
        self.regions = regions;
        self.index.clear();
        self.last = None;
    }

    /// Regions held (one per tenant, mp, device, login and minute touched
    /// since the last drain).
    pub fn regions(&self) -> usize {
        self.regions.len()
    }

    /// Cells in use (one per region and variation touched since the last drain).
    pub fn cells(&self) -> usize {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Cells of the empty tables kept for reuse.
    pub fn spare_cells(&self) -> usize {
        self.spare.cells()
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
        for kind in MetricKind::ALL {
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
        // Every variation reporting mp 0 (0, 1 list it; 3, 4 report every
        // mp): the region's table grows and keeps every count.
        for v in [0, 3, 4] {
            add(&mut c, SeriesKey::new(MetricKind::VisitAssigned, v, 0, 3, 4), 60_000, v as i64 + 1);
        }
        assert_eq!((c.regions(), c.cells()), (1, 4));
        // Many regions (devices), one variation each.
        let n = 3000;
        for device in 0..n {
            add(&mut c, SeriesKey::new(MetricKind::VisitAssigned, 3, 9, device, 1), 60_000, device as i64 + 1);
        }
        assert_eq!((c.regions(), c.cells()), (1 + n as usize, 4 + n as usize));
        let mut out = Vec::new();
        c.drain(&mut out);
        out.sort_by_key(|d| (d.key.device(), d.key));
        let mut want = vec![k, kv]
            .into_iter()
            .zip([1, 5])
            .chain([0, 3, 4].map(|v| (SeriesKey::new(MetricKind::VisitAssigned, v, 0, 3, 4), v as i64 + 1)))
            .chain((0..n).map(|d| (SeriesKey::new(MetricKind::VisitAssigned, 3, 9, d, 1), d as i64 + 1)))
            .map(|(key, delta)| Delta { key, minute: 60_000, delta })
            .collect::<Vec<_>>();
        want.sort_by_key(|d| (d.key.device(), d.key));
        assert_eq!(out, want);
        assert_eq!((c.regions(), c.cells()), (0, 0));
        // Every table is kept: 3000 of 4 cells and the grown one of 8 (the 4
        // it grew from went to the next new region).
        let spare = c.spare_cells();
        assert_eq!(spare, n as usize * FIRST_CELLS + 2 * FIRST_CELLS);
        // The next interval takes tables from the spare ones, all empty.
        add(&mut c, k, 120_000, 2);
        assert_eq!(c.spare_cells(), spare - FIRST_CELLS);
        out.clear();
        c.drain(&mut out);
        assert_eq!(out, vec![Delta { key: k, minute: 120_000, delta: 2 }]);
        assert_eq!(c.spare_cells(), spare);
    }

    #[test]
    fn touched_counters_survive_a_region_growing() {
        let mut c = MinuteCounters::new(catalog());
        c.set_track_touched(true);
        let k = SeriesKey::new(MetricKind::VisitFmBeta, 0, 0, 0, 0);
        add(&mut c, k, 0, 1);
        add(&mut c, k, 0, -1);
        for v in [1, 3, 4] {
            add(&mut c, SeriesKey::new(MetricKind::VisitAssigned, v, 0, 0, 0), 0, 1);
        }
        assert_eq!(c.cells(), 4, "grew past its first 4 cells");
        let mut out = Vec::new();
        c.drain(&mut out);
        assert!(out.contains(&Delta { key: k, minute: 0, delta: 0 }), "cancelled out, still reported");
        assert_eq!(out.len(), 4);
        // Touched bits are cleared by the drain, tables reused.
        add(&mut c, SeriesKey::new(MetricKind::VisitAssigned, 0, 0, 0, 0), 0, 1);
        add(&mut c, k, 0, 1);
        add(&mut c, k, 0, -1);
        c.set_track_touched(false);
        add(&mut c, SeriesKey::new(MetricKind::VisitFm, 1, 0, 0, 0), 0, 1);
        add(&mut c, SeriesKey::new(MetricKind::VisitFm, 1, 0, 0, 0), 0, -1);
        out.clear();
        c.drain(&mut out);
        out.sort_by_key(|d| d.key);
        let mut want = vec![
            Delta { key: SeriesKey::new(MetricKind::VisitAssigned, 0, 0, 0, 0), minute: 0, delta: 1 },
            Delta { key: k, minute: 0, delta: 0 },
        ];
        want.sort_by_key(|d| d.key);
        assert_eq!(out, want);
    }

    /// Drained deltas, sorted, summed per point (spilled parts joined).
    fn drained(c: &mut MinuteCounters) -> Vec<Delta> {
        let mut out = Vec::new();
        c.drain(&mut out);
        out.sort_by_key(|d| (d.key, d.minute));
        out.dedup_by(|b, a| {
            let same = (a.key, a.minute) == (b.key, b.minute);
            if same {
                a.delta += b.delta;
            }
            same
        });
        out
    }

    #[test]
    fn cells_added_per_event_drain_as_the_same_adds_one_by_one() {
        let cat = catalog();
        // Variations 0, 1 (tenant a, mp 0 listed), 3, 4 (tenant a, every mp).
        let visit = [MetricKind::VisitAssigned, MetricKind::VisitFmBeta, MetricKind::ValueFm, MetricKind::ValueSqFm];
        for track in [false, true] {
            let (mut one, mut cells) = (MinuteCounters::new(cat.clone()), MinuteCounters::new(cat.clone()));
            one.set_track_touched(track);
            cells.set_track_touched(track);
            for event in 0..40i64 {
                let (device, ts) = ((event % 3) as u16, 60_000 * (event % 2) + event);
                let mut adds = Vec::new();
                for v in [0, 1, 3, 4] {
                    let mut a = CellAdd::new(v);
                    for (k, &kind) in visit.iter().enumerate() {
                        if (event + v as i64 + k as i64) % 3 != 0 {
                            // A change that cancels out within the event, now and then.
                            let d = if (event + k as i64) % 5 == 0 { 0 } else { event * 7 - 100 + k as i64 };
                            a.add(kind, d);
                            add(&mut one, SeriesKey::new(kind, v, 0, device, 1), ts, d);
                        }
                    }
                    adds.push(a);
                }
                cells.add_cells(0, 0, device, 1, ts, &adds);
                let mut s = CellAdd::new(4);
                s.add(MetricKind::SessionAssigned, 1);
                s.add(MetricKind::SessionFm, -1);
                cells.add_cells(0, NO_MP, device, 1, ts, &[s]);
                add(&mut one, SeriesKey::new(MetricKind::SessionAssigned, 4, NO_MP, device, 1), ts, 1);
                add(&mut one, SeriesKey::new(MetricKind::SessionFm, 4, NO_MP, device, 1), ts, -1);
            }
            let mut z = CellAdd::new(1);
            z.add(MetricKind::VisitFm, 0);
            cells.add_cells(0, 0, 7, 1, 0, &[z]);
            add(&mut one, SeriesKey::new(MetricKind::VisitFm, 1, 0, 7, 1), 0, 0);
            assert_eq!((cells.regions(), cells.cells()), (one.regions(), one.cells()));
            let want = drained(&mut one);
            assert!(want.iter().any(|d| d.delta == 0) == track, "zero deltas only while tracking");
            assert_eq!(drained(&mut cells), want, "tracking {track}");
        }
    }

    #[test]
    fn cells_added_per_event_spill_a_sum_beyond_i64() {
        let mut c = MinuteCounters::new(catalog());
        let k = SeriesKey::new(MetricKind::ValueSqFm, 3, 9, 1, 2);
        let mut a = CellAdd::new(3);
        a.add(MetricKind::ValueSqFm, 6_000_000_000_000_000_000);
        a.add(MetricKind::VisitAssigned, 1);
        for _ in 0..3 {
            c.add_cells(0, 9, 1, 2, 60_000, &[a]);
        }
        let mut out = Vec::new();
        c.drain(&mut out);
        let sum =
            |key| out.iter().filter(|d| d.key == key && d.minute == 60_000).map(|d| d.delta as i128).sum::<i128>();
        assert_eq!(sum(k), 18_000_000_000_000_000_000);
        assert_eq!(sum(SeriesKey::new(MetricKind::VisitAssigned, 3, 9, 1, 2)), 3);
        assert!(out.len() >= 3, "the square sum in parts: {out:?}");
    }

    #[test]
    fn new_regions_start_with_room_for_the_last_drains_mean_region() {
        let mut c = MinuteCounters::new(catalog());
        let mut out = Vec::new();
        for v in [0, 1, 3, 4] {
            add(&mut c, SeriesKey::new(MetricKind::VisitAssigned, v, 0, 0, 0), 0, 1);
        }
        c.drain(&mut out);
        // A mean of 4 cells needs 8 at ¾: the next region takes the table
        // of 8 the first one grew into, and never grows.
        let spare = c.spare_cells();
        for v in [0, 1, 3, 4] {
            add(&mut c, SeriesKey::new(MetricKind::VisitFm, v, 0, 1, 0), 60_000, 1);
        }
        assert_eq!(c.spare_cells(), spare - 2 * FIRST_CELLS);
        out.clear();
        c.drain(&mut out);
        assert_eq!(out.len(), 4);
    }

    /// The sums a drain makes are exactly those of the deltas it hands out:
    /// every kind, several regions and minutes, a spilled value sum, and
    /// (tracking) a cancelled-out count that is still handed out.
    #[test]
    fn a_drains_sums_are_the_sums_of_its_deltas() {
        let cat = catalog();
        for track in [false, true] {
            let mut c = MinuteCounters::new(cat.clone());
            c.set_track_touched(track);
            for kind in MetricKind::ALL {
                let session = matches!(kind, MetricKind::SessionAssigned | MetricKind::SessionFm);
                for (v, mp, device, minute) in [(0, 0, 1, 0), (1, 1, 1, 0), (3, 9, 2, 60_000), (4, 0, 1, 60_000)] {
                    let mp = if session { NO_MP } else { mp };
                    add(&mut c, SeriesKey::new(kind, v, mp, device, 2), minute, v as i64 + 1);
                }
            }
            let cancelled = SeriesKey::new(MetricKind::SessionAssigned, 3, NO_MP, 3, 0);
            add(&mut c, cancelled, 120_000, 1);
            add(&mut c, cancelled, 120_000, -1);
            let big = SeriesKey::new(MetricKind::ValueSqFm, 1, 1, 1, 2);
            for _ in 0..3 {
                add(&mut c, big, 0, 6_000_000_000_000_000_000);
            }
            let (mut out, mut sums) = (Vec::new(), SumsBuilder::default());
            c.drain_summed(&mut out, &mut sums);
            let sums = sums.take();
            assert_eq!(sums, crate::aggregate::DeltaSums::from_deltas(&out), "tracking {track}");
            assert_eq!(sums.sessions.len(), 4 + track as usize, "(variation, minute) pairs; tracking {track}");
            assert_eq!(
                sums.visits.iter().map(|v| v.value_sq).sum::<i128>(),
                18_000_000_000_000_000_000 + 1 + 2 + 4 + 5
            );
        }
    }
}
