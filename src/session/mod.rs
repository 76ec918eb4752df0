//! Per-session state, expiry, and out-of-order correction (SPEC §3–4).
//!
//! A [`SessionTable`] belongs to one shard: every session key lives on exactly
//! one shard, so no state here is shared. For each session it keeps its events
//! (8 bytes each: ts offset, mp, device, login; plus the few attributes that
//! conditions look at, and 12 bytes for each event with a non-zero `value`)
//! and, per assigned experiment, 4 bytes: the winning variation and *which
//! event* carries it, and per qualification condition one byte: the event that
//! first met it. Times and tags are read from the events, so a session assigned
//! to 20 experiments costs about 320 bytes, table slot included (see
//! `state.rs`). From that state the nine metrics of SPEC §3 follow. The hot
//! path reads the catalog from a packed copy (`hot.rs`) and hands an event's
//! deltas to the counters summed per (region, variation) ([`CellAdd`]).
//!
//! Correction protocol, for an arriving event `e` with timestamp `t`:
//! 1. Note each experiment's view (variation, assignment key, F) before `e`.
//! 2. Add `e`: update assignments (earliest wins) and condition first-times.
//! 3. For each experiment, emit the contributions located at times `>= t`
//!    of the old state with sign −1, and of the new state with sign +1.
//!
//! Step 3 is exact because adding an event at `t` never changes a contribution
//! located before `t` (SPEC §3, key property): the deltas at `>= t` are all
//! that differ. That holds for `value_sq` too: the increment `y_k² − y_{k−1}²`
//! of an event depends on the events before it in order, so an event at `t`
//! changes the increments of the later events of its mp (by `2·value(e)·value(g)`
//! each), all located at `>= t`. A fast path skips the −1/+1 work when the
//! experiment's view is unchanged and `e` is later than every event seen, which
//! is the common case; another (`same_view_out_of_order`) emits only what a
//! late event changes when the view stays.
//!
//! Events tied in order `(ts, device, login)` are ordered by index (arrival)
//! among themselves, the same way before and after an event is added; they
//! share a minute and tags, so that choice cannot change a total.

use ahash::AHashMap;
use std::cmp::Ordering;
use std::sync::Arc;

mod expiry;
mod hot;
mod state;

pub use state::{SessionDecodeError, MAX_EVENTS_PER_SESSION, MAX_SESSION_SPAN_MS};

use crate::aggregate::{minute_of, CellAdd, MetricKind, MinuteCounters, SeriesKey, NO_MP};
use crate::config::{Catalog, CompiledExperiment};
use expiry::{bucket, ExpiryIndex};
use hot::{tag_word, HotCatalog, HotCond, HotExp};
use state::{EvRec, ExpState, Extra, OrderKey, Session, NONE, VALUE_KEY};

/// Identity of a session: a 128-bit hash (xxh3) of the session id, seeded by
/// the tenant index so that ids are scoped by tenant. Two distinct ids collide
/// with probability ~n²/2¹²⁹ — about 10⁻²¹ for a billion live sessions — which
/// we accept to keep the id bytes off the hot path and out of memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionKey(pub [u64; 2]);

impl SessionKey {
    pub fn new(tenant: u16, session: &str) -> SessionKey {
        let h = xxhash_rust::xxh3::xxh3_128_with_seed(session.as_bytes(), tenant as u64);
        SessionKey([h as u64, (h >> 64) as u64])
    }
}

/// One routed, resolved event, as the router batches it and the session
/// table reads it. Its assignments and attributes live outside it, in the two
/// flat side arrays of its batch (`shard::EventBatch`), as `(start, len)`
/// ranges: a batch of any size is three reusable allocations, and the table
/// borrows the event's part of them ([`SessionTable::add`]).
#[derive(Debug, Clone, Copy)]
pub struct SessionEvent {
    pub key: SessionKey,
    pub ts: i64,
    /// The watermark before this event was included (SPEC §4).
    pub watermark: i64,
    pub mp: u16,
    pub device: u16,
    pub login: u16,
    /// The event's `value` (0 when absent).
    pub value: i32,
    /// Its (experiment index, variation index) pairs, experiments unique.
    pub assigns: (u32, u16),
    /// Its (attribute name id, value id) pairs, of attributes some condition mentions.
    pub attrs: (u32, u16),
}

/// The part `(start, len)` of a side array.
#[inline]
fn part(all: &[(u32, u32)], (start, len): (u32, u16)) -> &[(u32, u32)] {
    &all[start as usize..start as usize + len as usize]
}

/// What the contributions of one experiment depend on, besides the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct View {
    variation: u32,
    assigned_at: OrderKey,
    /// F: qualification time, if qualified.
    fm_at: Option<i64>,
}

impl Session {
    /// Where experiment `i`'s conditions start: after those of the ones before it.
    fn cond_start(&self, i: usize, hot: &HotCatalog) -> usize {
        (0..i).map(|j| hot.exps[self.exp(j).experiment as usize].n_conds as usize).sum()
    }

    /// The view of experiment `s`, whose conditions start at `cond_start`.
    fn view(&self, s: &ExpState, x: Exp, cond_start: usize) -> View {
        let assigned_at = self.key(s.assigned);
        let mut fm_at = Some(assigned_at.ts);
        for j in 0..x.n_conds() {
            let e = self.first_met(cond_start + j);
            if e == NONE {
                fm_at = None;
                break;
            }
            fm_at = fm_at.map(|f| f.max(self.ts(e)));
        }
        View { variation: x.variation(s.slot), assigned_at, fm_at }
    }
}

/// Counts kept by a session table, published by its shard.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionStats {
    /// Sessions started (new ids, and ids resumed after expiry).
    pub started: u64,
    /// Sessions freed because they expired.
    pub evicted: u64,
    /// (session, experiment) pairs seen with conflicting variations.
    pub conflicts: u64,
    /// Events dropped because their session was full (see [`MAX_EVENTS_PER_SESSION`]).
    pub overflow_dropped: u64,
}

/// Compares event order keys; strings are consulted only on a ts tie.
struct Order<'a> {
    catalog: &'a Catalog,
}

impl Order<'_> {
    #[inline]
    fn cmp(&self, a: OrderKey, b: OrderKey) -> Ordering {
        a.ts.cmp(&b.ts).then_with(|| self.cmp_tags(a, b))
    }

    #[cold]
    fn cmp_tags(&self, a: OrderKey, b: OrderKey) -> Ordering {
        let names = &self.catalog.names;
        let dev = if a.device == b.device {
            Ordering::Equal
        } else {
            let t = names.device.read();
            t[a.device as usize].as_bytes().cmp(t[b.device as usize].as_bytes())
        };
        dev.then_with(|| {
            if a.login == b.login {
                Ordering::Equal
            } else {
                let t = names.login.read();
                t[a.login as usize].as_bytes().cmp(t[b.login as usize].as_bytes())
            }
        })
    }
}

/// The events of a session (or a prefix of them) as [`emit_from`] reads them.
struct Events<'a> {
    base: i64,
    cells: &'a [u64],
    /// The session's extras; entries of events beyond `cells` are ignored.
    extras: &'a [Extra],
}

impl Events<'_> {
    #[inline]
    fn get(&self, i: usize) -> EvRec {
        EvRec::from_cell(self.cells[i])
    }

    #[inline]
    fn iter(&self) -> impl Iterator<Item = EvRec> + '_ {
        self.cells.iter().map(|&c| EvRec::from_cell(c))
    }

    #[inline]
    fn ts(&self, e: &EvRec) -> i64 {
        self.base + e.off as i64
    }

    #[inline]
    fn key(&self, e: &EvRec) -> OrderKey {
        OrderKey { ts: self.ts(e), device: e.device, login: e.login as u16 }
    }

    /// `(event index, value)` of every event with a non-zero value.
    #[inline]
    fn values(&self) -> impl Iterator<Item = (usize, i64)> + '_ {
        let n = self.cells.len();
        self.extras
            .iter()
            .filter(move |x| x.1 == VALUE_KEY && (x.0 as usize) < n)
            .map(|x| (x.0 as usize, x.2 as i32 as i64))
    }

    /// The value of event `i` (0 if it carries none).
    #[inline]
    fn value(&self, i: usize) -> i64 {
        self.values().find(|&(j, _)| j == i).map_or(0, |(_, v)| v)
    }

    /// `y_{k−1}` of event `i`: the sum of the values of the events with its mp
    /// and `ts >= bound` that precede it in order (ties: the lower index first).
    fn value_before(&self, ord: &Order, i: usize, bound: i64) -> i64 {
        let e = self.get(i);
        let ek = self.key(&e);
        self.values()
            .filter(|&(j, _)| {
                let g = self.get(j);
                j != i
                    && g.mp == e.mp
                    && self.ts(&g) >= bound
                    && match ord.cmp(self.key(&g), ek) {
                        Ordering::Less => true,
                        Ordering::Equal => j < i,
                        Ordering::Greater => false,
                    }
            })
            .map(|(_, v)| v)
            .sum()
    }

    /// Whether event `i` is the first of those with its mp and `ts >= bound`
    /// (ties of equal keys go to the lower index, consistently).
    fn is_first_visit(&self, ord: &Order, i: usize, bound: i64) -> bool {
        let e = self.get(i);
        let ek = self.key(&e);
        self.iter().enumerate().all(|(j, g)| {
            j == i
                || g.mp != e.mp
                || self.ts(&g) < bound
                || match ord.cmp(self.key(&g), ek) {
                    Ordering::Less => false,
                    Ordering::Equal => j > i,
                    Ordering::Greater => true,
                }
        })
    }

    /// The least event with mp `mp` and `ts >= bound` (ties: the lower index).
    fn first_visit_from(&self, ord: &Order, mp: u16, bound: i64) -> Option<OrderKey> {
        let mut best: Option<OrderKey> = None;
        for e in self.iter().filter(|e| e.mp == mp) {
            let k = self.key(&e);
            if k.ts >= bound && best.is_none_or(|b| ord.cmp(k, b) == Ordering::Less) {
                best = Some(k);
            }
        }
        best
    }

    /// The least event with `ts >= bound`.
    fn first_from(&self, ord: &Order, bound: i64) -> Option<OrderKey> {
        let mut best: Option<OrderKey> = None;
        for e in self.iter() {
            let k = self.key(&e);
            if k.ts >= bound && best.is_none_or(|b| ord.cmp(k, b) == Ordering::Less) {
                best = Some(k);
            }
        }
        best
    }
}

/// Emits the contributions of one experiment located at times `>= from`.
fn emit_from(ord: &Order, x: Exp, view: View, events: &Events, from: i64, sign: i64, out: &mut Emit) {
    let v = view.variation;
    let a = view.assigned_at;
    if a.ts >= from {
        let mut cell = CellAdd::new(v);
        cell.add(MetricKind::SessionAssigned, sign);
        out.session_cell(x.tenant(), a, cell);
    }
    if let Some(f) = view.fm_at {
        if let Some(first) = events.first_from(ord, f) {
            if first.ts >= from {
                let mut cell = CellAdd::new(v);
                cell.add(MetricKind::SessionFm, sign);
                out.session_cell(x.tenant(), first, cell);
            }
        }
    }
    for (i, e) in events.iter().enumerate() {
        let ts = events.ts(&e);
        if ts < from || ts < a.ts {
            continue;
        }
        if !x.reports(e.mp) {
            continue;
        }
        // The event's changes share its region and this variation: one cell.
        let mut cell = CellAdd::new(v);
        cell.add(MetricKind::VisitAssigned, sign);
        if events.is_first_visit(ord, i, a.ts) {
            cell.add(MetricKind::VisitAssignedBeta, sign);
        }
        // An amount of 0 creates no point (as [`Emit::amount`]).
        let value = events.value(i);
        if value != 0 {
            cell.add(MetricKind::ValueAssigned, sign * value);
        }
        if let Some(f) = view.fm_at.filter(|&f| ts >= f) {
            cell.add(MetricKind::VisitFm, sign);
            if events.is_first_visit(ord, i, f) {
                cell.add(MetricKind::VisitFmBeta, sign);
            }
            if value != 0 {
                cell.add(MetricKind::ValueFm, sign * value);
                let sq = sign * square_step(events.value_before(ord, i, f), value);
                if sq != 0 {
                    cell.add(MetricKind::ValueSqFm, sq);
                }
            }
        }
        out.visit_cell(x.tenant(), e.mp, e.device, e.login as u16, ts, cell);
    }
}

/// `(y + value)² − y²`: the `value_sq` increment of an event whose running
/// total before it is `y`. |y| ≤ 254 · 10⁷, so it stays far inside `i64`.
#[inline]
fn square_step(y: i64, value: i64) -> i64 {
    value * (2 * y + value)
}

/// The catalog and its packed hot facts, as the hot path reads them.
#[derive(Clone, Copy)]
struct Cat<'a> {
    catalog: &'a Catalog,
    hot: &'a HotCatalog,
}

impl<'a> Cat<'a> {
    #[inline]
    fn exp(self, experiment: u32) -> Exp<'a> {
        let hot = &self.hot.exps[experiment as usize];
        Exp { hot, conds: self.hot.conds(hot), def: &self.catalog.experiments[experiment as usize] }
    }
}

/// One experiment: its packed facts, its conditions' packed tags, and the
/// catalog's definition for what they leave out (read only then).
#[derive(Clone, Copy)]
struct Exp<'a> {
    hot: &'a HotExp,
    conds: &'a [HotCond],
    def: &'a CompiledExperiment,
}

impl Exp<'_> {
    #[inline]
    fn tenant(self) -> u16 {
        self.hot.tenant
    }

    #[inline]
    fn n_conds(self) -> usize {
        self.hot.n_conds as usize
    }

    #[inline]
    fn variation(self, slot: u8) -> u32 {
        self.hot.variation(slot)
    }

    /// Whether its variations report visits to `mp`.
    #[inline]
    fn reports(self, mp: u16) -> bool {
        self.hot.reports(mp, self.def)
    }
}

/// Where [`SessionTable::add`] sends an event's deltas: gathered by region
/// and variation (visit kinds and session kinds apart, since an event's visits
/// share one region and the session kinds of the experiments it assigns
/// another), each group handed to [`MinuteCounters::add_cells`] as a whole.
struct Emit<'a> {
    counters: &'a mut MinuteCounters,
    gather: &'a mut Gather,
}

/// The groups being gathered (kept between events for their memory).
#[derive(Default)]
struct Gather {
    visits: Group,
    sessions: Group,
}

/// Changes to cells of one region: (tenant, mp, device, login, minute).
#[derive(Default)]
struct Group {
    region: (u16, u16, u16, u16, i64),
    cells: Vec<CellAdd>,
}

impl Group {
    /// Adds `delta` to point `(key, minute(ts))` of `tenant`, handing the
    /// group gathered so far to `counters` first if it is another region's.
    #[inline]
    fn add(&mut self, counters: &mut MinuteCounters, tenant: u16, key: SeriesKey, ts: i64, delta: i64) {
        let region = (tenant, key.mp(), key.device(), key.login(), minute_of(ts));
        if region != self.region {
            self.flush(counters);
            self.region = region;
        }
        let v = key.variation();
        match self.cells.last_mut() {
            Some(c) if c.variation() == v => c.add(key.kind(), delta),
            _ => {
                let mut c = CellAdd::new(v);
                c.add(key.kind(), delta);
                self.cells.push(c);
            }
        }
    }

    /// Adds the changes `cell` to region `(tenant, mp, device, login,
    /// minute(ts))`, as [`Group::add`] of each of them would.
    #[inline]
    fn add_cell(&mut self, counters: &mut MinuteCounters, region: (u16, u16, u16, u16, i64), cell: CellAdd) {
        if region != self.region {
            self.flush(counters);
            self.region = region;
        }
        match self.cells.last_mut() {
            Some(c) if c.variation() == cell.variation() => c.merge(&cell),
            _ => self.cells.push(cell),
        }
    }

    fn flush(&mut self, counters: &mut MinuteCounters) {
        if !self.cells.is_empty() {
            let (tenant, mp, device, login, minute) = self.region;
            counters.add_cells(tenant, mp, device, login, minute, &self.cells);
            self.cells.clear();
        }
    }
}

impl Emit<'_> {
    /// A visit-kind delta of `tenant`'s variation `key.variation()`, which
    /// reports `key.mp()`.
    #[inline]
    fn visit(&mut self, tenant: u16, key: SeriesKey, ts: i64, delta: i64) {
        self.gather.visits.add(self.counters, tenant, key, ts, delta);
    }

    /// Visit-kind changes of one variation of `tenant` (which reports `mp`)
    /// at `(mp, device, login, minute(ts))`, summed in `cell`.
    #[inline]
    fn visit_cell(&mut self, tenant: u16, mp: u16, device: u16, login: u16, ts: i64, cell: CellAdd) {
        self.gather.visits.add_cell(self.counters, (tenant, mp, device, login, minute_of(ts)), cell);
    }

    /// Session-kind changes of one variation of `tenant`, located at the event `at`.
    #[inline]
    fn session_cell(&mut self, tenant: u16, at: OrderKey, cell: CellAdd) {
        let region = (tenant, NO_MP, at.device, at.login, minute_of(at.ts));
        self.gather.sessions.add_cell(self.counters, region, cell);
    }

    /// A session-kind delta (`key.mp()` is [`NO_MP`]).
    #[inline]
    fn session(&mut self, tenant: u16, key: SeriesKey, ts: i64, delta: i64) {
        debug_assert_eq!(key.mp(), NO_MP);
        self.gather.sessions.add(self.counters, tenant, key, ts, delta);
    }

    /// An amount of a value metric; a contribution of 0 creates no point.
    #[inline]
    fn amount(&mut self, tenant: u16, key: SeriesKey, ts: i64, amount: i64) {
        if amount != 0 {
            self.visit(tenant, key, ts, amount);
        }
    }

    /// Hands every group still gathered to the counters.
    fn finish(self) {
        self.gather.visits.flush(self.counters);
        self.gather.sessions.flush(self.counters);
    }
}

/// The sessions of one shard.
pub struct SessionTable {
    sessions: AHashMap<SessionKey, Session>,
    /// The sessions' keys by when they can expire (a key under the bucket
    /// of its session's greatest ts, at least).
    expiry: ExpiryIndex,
    catalog: Arc<Catalog>,
    gap_ms: i64,
    work: Work,
    gather: Gather,
    /// The catalog's facts that the hot path reads, packed.
    hot: HotCatalog,
}

impl SessionTable {
    /// Uses `catalog` from now on (a reload: indices only ever grow).
    pub fn set_catalog(&mut self, catalog: Arc<Catalog>) {
        self.hot = HotCatalog::of(&catalog);
        self.catalog = catalog;
    }

    pub fn new(catalog: Arc<Catalog>) -> SessionTable {
        let gap_ms = catalog.engine.session_gap_ms;
        let hot = HotCatalog::of(&catalog);
        SessionTable {
            sessions: AHashMap::new(),
            expiry: ExpiryIndex::default(),
            catalog,
            gap_ms,
            work: Work::default(),
            gather: Gather::default(),
            hot,
        }
    }

    /// Sessions that became conflicting per experiment since the last call
    /// (sparse: `(experiment index, count)`).
    pub fn take_conflicts(&mut self) -> Vec<(u32, u64)> {
        let mut out = Vec::new();
        for (x, n) in self.work.conflicts_by_experiment.iter_mut().enumerate() {
            if *n > 0 {
                out.push((x as u32, *n as u64));
                *n = 0;
            }
        }
        out
    }

    pub fn stats(&self) -> SessionStats {
        self.work.stats
    }

    /// Sessions held now.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Bytes held for sessions: the table's slots (key, value, control byte,
    /// at its capacity), each session's heap allocations (a running sum, kept
    /// by `add`, `expire` and `restore`) and the expiry index.
    pub fn state_bytes(&self) -> usize {
        let slot = size_of::<SessionKey>() + size_of::<Session>() + 1;
        debug_assert_eq!(self.work.heap_bytes, self.sessions.values().map(Session::heap_bytes).sum::<usize>());
        self.sessions.capacity() * slot + self.work.heap_bytes + self.expiry.heap_bytes()
    }

    /// Loads the table slot and first state line of a session into cache.
    #[inline]
    pub fn touch(&self, key: &SessionKey) {
        if let Some(s) = self.sessions.get(key) {
            std::hint::black_box(s.first_cell());
        }
    }

    /// Appends every session (key, then state) to a checkpoint.
    pub fn encode(&self, e: &mut crate::codec::Enc) {
        e.u64(self.sessions.len() as u64);
        for (k, s) in &self.sessions {
            e.u64(k.0[0]);
            e.u64(k.0[1]);
            s.encode(e);
        }
    }

    /// Reads sessions written by [`SessionTable::encode`], calling `each` with
    /// every key and its encoded state (so a restore can re-shard them).
    pub fn decode_each(
        d: &mut crate::codec::Dec<'_>,
        mut each: impl FnMut(SessionKey, &[u8]),
    ) -> Result<(), SessionDecodeError> {
        let n = d.count(16 + 24)?;
        for _ in 0..n {
            let key = SessionKey([d.u64()?, d.u64()?]);
            // Decode once to check and to find its extent, then hand on the bytes.
            let rest = d.clone_position();
            Session::decode(d)?;
            each(key, d.since(rest));
        }
        Ok(())
    }

    /// Adds a session from bytes handed out by [`SessionTable::decode_each`].
    pub fn restore(&mut self, key: SessionKey, bytes: &[u8]) -> Result<(), SessionDecodeError> {
        let s = Session::decode(&mut crate::codec::Dec::new(bytes))?;
        self.expiry.list(key, bucket(s.max_ts()));
        self.work.heap_bytes += s.heap_bytes();
        if let Some(old) = self.sessions.insert(key, s) {
            self.work.heap_bytes -= old.heap_bytes();
        }
        Ok(())
    }

    /// Frees every session that has expired at watermark `wm` (visiting only
    /// those the expiry index says can have).
    pub fn expire(&mut self, wm: i64) {
        let (freed, bytes) = self.expiry.expire(&mut self.sessions, self.gap_ms, wm);
        self.work.stats.evicted += freed as u64;
        self.work.heap_bytes -= bytes;
        if self.sessions.capacity() > 4 * self.sessions.len().max(1024) {
            self.sessions.shrink_to_fit();
        }
    }

    /// Adds one event, emitting the resulting metric deltas into `out`, by
    /// the correction protocol at the top of this file. `assigns` and `attrs`
    /// are the side arrays the event's ranges index (its batch's).
    pub fn add(&mut self, ev: &SessionEvent, assigns: &[(u32, u32)], attrs: &[(u32, u32)], out: &mut MinuteCounters) {
        let (assigns, attrs) = (part(assigns, ev.assigns), part(attrs, ev.attrs));
        let cat = Cat { catalog: &self.catalog, hot: &self.hot };
        let work = &mut self.work;
        let session = live_session(&mut self.sessions, work, self.gap_ms, ev);
        let heap_before = session.heap_bytes();
        let listed = (session.n_events() > 0).then(|| bucket(session.max_ts()));
        let in_order = session.n_events() == 0 || ev.ts > session.max_ts();
        let kept = keep_event(session, cat.hot, ev, assigns, attrs);
        // A new session, or one whose greatest ts moved to a later bucket.
        if in_order && listed != Some(bucket(session.max_ts())) {
            self.expiry.list(ev.key, bucket(session.max_ts()));
        }
        let Some(idx) = kept else {
            work.stats.overflow_dropped += 1;
            work.heap_bytes = work.heap_bytes + session.heap_bytes() - heap_before;
            return;
        };
        prefetch_visit_cells(cat, session, ev, out);
        // 1. Until an experiment's state changes, its view before the event is
        //    its view after it; a changed one snapshots its view first.
        let known = session.n_exps();
        work.before.clear();
        work.before.resize(known, Before::Same);
        // 2. The event's assignments, then (per experiment) the conditions
        //    it meets and 3. its deltas at >= t.
        work.assign(cat, session, assigns, idx, in_order);
        let mut out = Emit { counters: out, gather: &mut self.gather };
        work.qualify_and_emit(cat, session, ev, attrs, idx, in_order, known, &mut out);
        out.finish();
        work.heap_bytes = work.heap_bytes + session.heap_bytes() - heap_before;
    }
}

/// A table's counts, and scratch reused per event: what [`SessionTable::add`]
/// works with besides the session (a separate struct, so both can be borrowed).
#[derive(Default)]
struct Work {
    stats: SessionStats,
    /// The sum of the held sessions' [`Session::heap_bytes`].
    heap_bytes: usize,
    /// Per experiment of the session, its view before the event.
    before: Vec<Before>,
    /// The experiments an event assigns first, and their conditions'
    /// first-met events, added to the session together.
    new_exps: Vec<ExpState>,
    first_met: Vec<u8>,
    /// Sessions that became conflicting since the last drain, per experiment.
    conflicts_by_experiment: Vec<u32>,
}

impl Work {
    /// Keeps experiment `i`'s view from before the event, unless kept already.
    #[inline]
    fn snapshot(&mut self, i: usize, view: impl FnOnce() -> View) {
        if let Before::Same = self.before[i] {
            self.before[i] = Before::Was(view());
        }
    }

    /// SPEC §3 Assignment, for each experiment the event at `idx` assigns
    /// (`assigns`): the least (order key, variation id) wins; a disagreement
    /// marks the session conflicting (once); a newly assigned experiment starts
    /// with the first events so far that meet its conditions.
    fn assign(&mut self, cat: Cat, session: &mut Session, assigns: &[(u32, u32)], idx: u8, in_order: bool) {
        let catalog = cat.catalog;
        let ord = Order { catalog };
        let key = session.key(idx);
        // The event's experiments are unique: one it adds is never found again.
        let known = session.n_exps();
        let mut cursor = 0;
        self.new_exps.clear();
        self.first_met.clear();
        for &(experiment, variation) in assigns {
            let x = cat.exp(experiment);
            let slot = x.hot.slot_of(variation);
            let found = find_experiment(session, known, cursor, experiment);
            if found.is_none() && held_by_older_version(cat, session, &self.new_exps, experiment) {
                continue;
            }
            match found {
                Some(i) => {
                    cursor = i + 1;
                    let mut s = session.exp(i);
                    if s.slot != slot && !s.conflict {
                        s.conflict = true;
                        session.set_exp(i, s);
                        self.count_conflict(catalog, experiment);
                    }
                    // In order, the event is later than the assignment held.
                    if !in_order && assignment_wins(&ord, key, variation, session, &s, x) {
                        self.snapshot(i, || session.view(&s, x, session.cond_start(i, cat.hot)));
                        session.set_exp(i, ExpState { slot, assigned: idx, ..s });
                    }
                }
                None => {
                    first_met_so_far(session, x, &mut self.first_met);
                    self.new_exps.push(ExpState {
                        experiment: experiment as u16,
                        slot,
                        assigned: idx,
                        conflict: false,
                    });
                    self.before.push(Before::New);
                }
            }
        }
        session.push_exps(&self.new_exps, &self.first_met);
    }

    /// Counts a session that became conflicting for `experiment`.
    fn count_conflict(&mut self, catalog: &Catalog, experiment: u32) {
        self.stats.conflicts += 1;
        let x = experiment as usize;
        if self.conflicts_by_experiment.len() <= x {
            self.conflicts_by_experiment.resize(catalog.experiments.len().max(x + 1), 0);
        }
        self.conflicts_by_experiment[x] += 1;
    }

    /// SPEC §3 Qualification and §4 correction step 3, one experiment at a
    /// time (what an experiment's conditions and deltas depend on is its own
    /// state and the events). For each of the `known` experiments assigned
    /// before the event at `idx` (with attributes `attrs`), the event becomes
    /// the first to meet each of its conditions that it meets earlier than
    /// the first so far; then every experiment's deltas of the event at times
    /// `>= t`, by the cheapest path exact for how the event changed its view.
    #[allow(clippy::too_many_arguments)]
    fn qualify_and_emit(
        &mut self,
        cat: Cat,
        session: &mut Session,
        ev: &SessionEvent,
        attrs: &[(u32, u32)],
        idx: u8,
        in_order: bool,
        known: usize,
        out: &mut Emit,
    ) {
        let ord = Order { catalog: cat.catalog };
        let prior = if in_order { latest_visit_before(session, idx, ev.mp) } else { None };
        let lookup = |k: u32| attrs.iter().find(|a| a.0 == k).map(|a| a.1);
        let off = session.event(idx as usize).off;
        let tags = tag_word(ev.mp, ev.device, ev.login);
        let mut cond_start = 0;
        for i in 0..self.before.len() {
            let s = session.exp(i);
            let x = cat.exp(s.experiment as u32);
            let cs = cond_start;
            cond_start += x.n_conds();
            if i < known {
                for (j, c) in x.conds.iter().enumerate() {
                    // In order, the event is later than any that met it.
                    let first = session.first_met(cs + j);
                    if (in_order && first != NONE) || !c.tags_match(tags) {
                        continue;
                    }
                    if (first == NONE || (!in_order && off < session.event(first as usize).off))
                        && (!c.has_attrs() || x.def.conditions[j].matches(ev.mp, ev.device, ev.login, lookup))
                    {
                        self.snapshot(i, || session.view(&s, x, cs));
                        session.set_first_met(cs + j, idx);
                    }
                }
            }
            let session = &*session;
            let events = || Events { base: session.base, cells: session.event_cells(), extras: session.extras() };
            let before_events = || Events { cells: &session.event_cells()[..idx as usize], ..events() };
            match self.before[i] {
                Before::Same if in_order => fast_in_order(x, session, &s, cs, prior, ev.value, out),
                Before::Same => {
                    let view = session.view(&s, x, cs);
                    let e = session.event(idx as usize);
                    same_view_out_of_order(&ord, x, view, &before_events(), e, ev.value as i64, out);
                }
                Before::Was(b) => {
                    let after = session.view(&s, x, cs);
                    if in_order && b == after {
                        fast_in_order(x, session, &s, cs, prior, ev.value, out);
                    } else {
                        emit_from(&ord, x, b, &before_events(), ev.ts, -1, out);
                        emit_from(&ord, x, after, &events(), ev.ts, 1, out);
                    }
                }
                Before::New if in_order => assigned_in_order(x, session, &s, cs, prior, ev.value, out),
                Before::New => emit_from(&ord, x, session.view(&s, x, cs), &events(), ev.ts, 1, out),
            }
        }
    }
}

/// The session `ev` belongs to: the live one, or a new one if there is none
/// or the one there is has expired at the event's watermark (SPEC §4: the old
/// session's contributions stay, its state goes).
fn live_session<'s>(
    sessions: &'s mut AHashMap<SessionKey, Session>,
    work: &mut Work,
    gap_ms: i64,
    ev: &SessionEvent,
) -> &'s mut Session {
    let stats = &mut work.stats;
    match sessions.entry(ev.key) {
        std::collections::hash_map::Entry::Occupied(o) => {
            let s = o.into_mut();
            if expired(s.max_ts(), gap_ms, ev.watermark) {
                work.heap_bytes -= s.heap_bytes();
                *s = Session::default();
                stats.evicted += 1;
                stats.started += 1;
            }
            s
        }
        std::collections::hash_map::Entry::Vacant(v) => {
            stats.started += 1;
            v.insert(Session::default())
        }
    }
}

/// Requests the counter cells the event's visits will most likely add to
/// (its own region, one cell per experiment that reports its mp), so that
/// they load while the event's changes are worked out.
#[inline]
fn prefetch_visit_cells(cat: Cat, session: &Session, ev: &SessionEvent, out: &mut MinuteCounters) {
    let n = session.n_exps();
    if n == 0 {
        return;
    }
    let tenant = cat.hot.exps[session.exp(0).experiment as usize].tenant;
    let variations = (0..n).filter_map(|i| {
        let s = session.exp(i);
        let x = cat.exp(s.experiment as u32);
        (x.tenant() == tenant && x.reports(ev.mp)).then(|| x.variation(s.slot))
    });
    out.prefetch_cells(tenant, ev.mp, ev.device, ev.login, ev.ts, variations);
}

/// Records `ev` with the attributes and value it carries; its index, or
/// `None` if it does not fit (the session holds [`MAX_EVENTS_PER_SESSION`]
/// events already, or a tag id or the time span is beyond the layout).
fn keep_event(
    session: &mut Session,
    hot: &HotCatalog,
    ev: &SessionEvent,
    assigns: &[(u32, u32)],
    attrs: &[(u32, u32)],
) -> Option<u8> {
    if session.n_events() == 0 {
        let conditions = assigns.iter().map(|a| hot.exps[a.0 as usize].n_conds as usize).sum();
        session.reserve_first(assigns.len(), conditions);
    }
    let idx = session.push_event(ev.ts, ev.mp, ev.device, ev.login)?;
    for &(name, value) in attrs {
        session.push_attr(idx, name, value);
    }
    session.push_value(idx, ev.value);
    Some(idx)
}

/// The position of `experiment` among the session's first `known`
/// experiments. Producers repeat assignments in the same order, so position
/// `hint` is tried first.
#[inline]
fn find_experiment(session: &Session, known: usize, hint: usize, experiment: u32) -> Option<usize> {
    if hint < known && session.exp(hint).experiment as u32 == experiment {
        Some(hint)
    } else {
        (0..known).find(|&i| session.exp(i).experiment as u32 == experiment)
    }
}

/// After a reload changed an experiment, a session already holding its older
/// version (or about to add it, `adding`) stays with that version: an
/// assignment to the new one is ignored.
fn held_by_older_version(cat: Cat, session: &Session, adding: &[ExpState], experiment: u32) -> bool {
    let same = |s: ExpState| cat.catalog.same_experiment(s.experiment as u32, experiment);
    cat.hot.exps[experiment as usize].supersedes
        && ((0..session.n_exps()).any(|i| same(session.exp(i))) || adding.iter().any(|&s| same(s)))
}

/// Whether the event at `key`, assigning `variation`, takes experiment `x`
/// over from the assignment `s` holds: the least order key wins, a tie going
/// to the smaller variation id (SPEC §3 Assignment).
fn assignment_wins(ord: &Order, key: OrderKey, variation: u32, session: &Session, s: &ExpState, x: Exp) -> bool {
    match ord.cmp(key, session.key(s.assigned)) {
        Ordering::Less => true,
        Ordering::Equal => {
            let ids = &ord.catalog.variations;
            ids[variation as usize].id < ids[x.variation(s.slot) as usize].id
        }
        Ordering::Greater => false,
    }
}

/// For an experiment assigned only now: the first of the session's events
/// that meets each of its conditions ([`NONE`] if none does yet), so that
/// conditions met before the assignment count (SPEC §3 Qualification),
/// appended to `out`.
fn first_met_so_far(session: &Session, x: Exp, out: &mut Vec<u8>) {
    for (j, c) in x.conds.iter().enumerate() {
        let mut first = NONE;
        for i in 0..session.n_events() {
            let e = session.event(i);
            let (mp, device, login) = (e.mp, e.device, e.login as u16);
            if c.tags_match(tag_word(mp, device, login))
                && (!c.has_attrs() || x.def.conditions[j].matches(mp, device, login, |k| session.attr_of(i, k)))
                && (first == NONE || e.off < session.event(first as usize).off)
            {
                first = i as u8;
            }
        }
        out.push(first);
    }
}

/// The ts of the latest event with mp `mp` before the event at `idx` (for the
/// fast path, where `idx` is the latest event of all).
fn latest_visit_before(session: &Session, idx: u8, mp: u16) -> Option<i64> {
    session.event_cells()[..idx as usize]
        .iter()
        .map(|&c| EvRec::from_cell(c))
        .filter(|g| g.mp == mp)
        .map(|g| session.base + g.off as i64)
        .max()
}

/// Deltas of an out-of-order event `e` (value `value`) for an experiment whose
/// view it did not change: its own visits and values, the betas and
/// `session.fm` it takes over by being earlier than the first so far, and the
/// `value_sq` increments of the later events of its mp, which grow by
/// `2·value·value(g)` now that `e` precedes them (`before` holds the other
/// events). The same as emitting everything at `>= t` with −1 and +1, without
/// the work.
fn same_view_out_of_order(ord: &Order, x: Exp, view: View, before: &Events, e: EvRec, value: i64, out: &mut Emit) {
    let (ek, v) = (before.key(&e), view.variation);
    let ts = ek.ts;
    if let Some(f) = view.fm_at.filter(|&f| ts >= f) {
        let old = before.first_from(ord, f);
        if old.is_none_or(|o| ord.cmp(ek, o) == Ordering::Less) {
            if let Some(o) = old {
                out.session(x.tenant(), SeriesKey::new(MetricKind::SessionFm, v, NO_MP, o.device, o.login), o.ts, -1);
            }
            out.session(x.tenant(), SeriesKey::new(MetricKind::SessionFm, v, NO_MP, ek.device, ek.login), ts, 1);
        }
    }
    if !x.reports(e.mp) {
        return;
    }
    let forms = [
        (MetricKind::VisitAssigned, MetricKind::VisitAssignedBeta, Some(view.assigned_at.ts)),
        (MetricKind::VisitFm, MetricKind::VisitFmBeta, view.fm_at),
    ];
    for (visit, beta, bound) in forms {
        let Some(bound) = bound.filter(|&b| ts >= b) else { continue };
        out.visit(x.tenant(), SeriesKey::new(visit, v, e.mp, ek.device, ek.login), ts, 1);
        let old = before.first_visit_from(ord, e.mp, bound);
        if old.is_none_or(|o| ord.cmp(ek, o) == Ordering::Less) {
            if let Some(o) = old {
                out.visit(x.tenant(), SeriesKey::new(beta, v, e.mp, o.device, o.login), o.ts, -1);
            }
            out.visit(x.tenant(), SeriesKey::new(beta, v, e.mp, ek.device, ek.login), ts, 1);
        }
    }
    if value == 0 || ts < view.assigned_at.ts {
        return;
    }
    let (mp, d, l) = (e.mp, ek.device, ek.login);
    out.amount(x.tenant(), SeriesKey::new(MetricKind::ValueAssigned, v, mp, d, l), ts, value);
    let Some(f) = view.fm_at.filter(|&f| ts >= f) else { return };
    out.amount(x.tenant(), SeriesKey::new(MetricKind::ValueFm, v, mp, d, l), ts, value);
    // `e` has the greatest index: of the events tied with it, all precede it.
    let mut y = 0;
    for (j, vg) in before.values() {
        let g = before.get(j);
        if g.mp != mp || before.ts(&g) < f {
            continue;
        }
        let gk = before.key(&g);
        if ord.cmp(gk, ek) == Ordering::Greater {
            let key = SeriesKey::new(MetricKind::ValueSqFm, v, mp, gk.device, gk.login);
            out.amount(x.tenant(), key, gk.ts, 2 * value * vg);
        } else {
            y += vg;
        }
    }
    out.amount(x.tenant(), SeriesKey::new(MetricKind::ValueSqFm, v, mp, d, l), ts, square_step(y, value));
}

/// An experiment's view before the current event, when it differs from after.
#[derive(Debug, Clone, Copy)]
enum Before {
    /// The event did not touch this experiment's state.
    Same,
    /// The event changed it; this was the view before.
    Was(View),
    /// The event assigned it.
    New,
}

/// Deltas of an event later than every other event of its session, for an
/// experiment whose view it did not change. Nothing was located at `>= t`
/// before, and F is the ts of an earlier event, so `session.fm` cannot move:
/// only the event's own visits (and betas, if first) and values are new; its
/// `value_sq` increment is over all the other values of its mp at `>= F`.
#[inline]
fn fast_in_order(
    x: Exp,
    session: &Session,
    s: &ExpState,
    cond_start: usize,
    prior: Option<i64>,
    value: i32,
    out: &mut Emit,
) {
    let events = session.event_cells();
    let e = EvRec::from_cell(events[events.len() - 1]);
    if !x.reports(e.mp) {
        return;
    }
    let ts = session.base + e.off as i64;
    let a = session.ts(s.assigned);
    if ts < a {
        return;
    }
    let view = session.view(s, x, cond_start);
    let (mp, d, l) = (e.mp, e.device, e.login as u16);
    // Every change lands in one cell (this variation, the event's region):
    // summed here, handed on whole.
    let mut cell = CellAdd::new(view.variation);
    cell.add(MetricKind::VisitAssigned, 1);
    // In order, e is the greatest event: it is first iff no other visit of
    // its mp counts, i.e. the latest earlier visit of its mp is before the bound.
    let prior_since = |bound: i64| prior.is_some_and(|p| p >= bound);
    if !prior_since(a) {
        cell.add(MetricKind::VisitAssignedBeta, 1);
    }
    // An amount of 0 creates no point (as [`Emit::amount`]).
    let value = value as i64;
    if value != 0 {
        cell.add(MetricKind::ValueAssigned, value);
    }
    if let Some(f) = view.fm_at.filter(|&f| ts >= f) {
        cell.add(MetricKind::VisitFm, 1);
        if !prior_since(f) {
            cell.add(MetricKind::VisitFmBeta, 1);
        }
        if value != 0 {
            cell.add(MetricKind::ValueFm, value);
            let last = events.len() - 1;
            let events = Events { base: session.base, cells: events, extras: session.extras() };
            let y: i64 = events
                .values()
                .filter(|&(j, _)| {
                    let g = events.get(j);
                    j != last && g.mp == mp && events.ts(&g) >= f
                })
                .map(|(_, v)| v)
                .sum();
            let sq = square_step(y, value);
            if sq != 0 {
                cell.add(MetricKind::ValueSqFm, sq);
            }
        }
    }
    out.visit_cell(x.tenant(), mp, d, l, ts, cell);
}

/// Deltas of an event later than every other event of its session, for an
/// experiment it assigns first (as a session's first event does): the
/// assignment is at the event, so nothing of the experiment was located at
/// `>= t` before, and F, if its conditions are all met, is the event's ts.
/// Then `session.assigned` and `session.fm` are at the event, and its visits
/// are those of [`fast_in_order`] (any earlier visit of its mp is before the
/// assignment, and no other value of its mp is at `>= F`).
#[inline]
fn assigned_in_order(
    x: Exp,
    session: &Session,
    s: &ExpState,
    cond_start: usize,
    prior: Option<i64>,
    value: i32,
    out: &mut Emit,
) {
    let view = session.view(s, x, cond_start);
    debug_assert_eq!(view.assigned_at.ts, session.max_ts());
    let mut cell = CellAdd::new(view.variation);
    cell.add(MetricKind::SessionAssigned, 1);
    if view.fm_at.is_some() {
        cell.add(MetricKind::SessionFm, 1);
    }
    out.session_cell(x.tenant(), view.assigned_at, cell);
    fast_in_order(x, session, s, cond_start, prior, value, out);
}

#[inline]
fn expired(max_ts: i64, gap_ms: i64, wm: i64) -> bool {
    wm > max_ts.saturating_add(gap_ms)
}

#[cfg(test)]
mod tests;
