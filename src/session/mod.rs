//! Per-session state, expiry, and out-of-order correction (SPEC §3–4).
//!
//! A [`SessionTable`] belongs to one shard: every session key lives on exactly
//! one shard, so no state here is shared. For each session it keeps the events
//! (ts, mp, device, login, and the few attributes conditions look at) and, per
//! assigned experiment, the winning assignment and the first time each
//! qualification condition was met. From that state the six metrics of SPEC §3
//! follow.
//!
//! Correction protocol, for an arriving event `e` with timestamp `t`:
//! 1. Note each experiment's view (variation, assignment key, F) before `e`.
//! 2. Add `e`: update assignments (earliest wins) and condition first-times.
//! 3. For each experiment, emit the contributions located at times `>= t`
//!    of the old state with sign −1, and of the new state with sign +1.
//!
//! Step 3 is exact because adding an event at `t` never changes a contribution
//! located before `t` (SPEC §3, key property): the deltas at `>= t` are all
//! that differ. A fast path skips the −1/+1 work when the experiment's view is
//! unchanged and `e` is later than every event seen, which is the common case.

use ahash::AHashMap;
use smallvec::SmallVec;
use std::cmp::Ordering;
use std::sync::Arc;

use crate::aggregate::{MetricKind, MinuteCounters, SeriesKey, NO_MP};
use crate::config::{Catalog, CompiledExperiment};

/// Identity of a session: tenant index and a 128-bit hash of the session id
/// (xxh3). Two distinct ids of one tenant collide with probability ~n²/2¹²⁹ —
/// about 10⁻²¹ for a billion live sessions — which we accept to keep the id
/// bytes off the hot path and out of memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionKey {
    pub tenant: u16,
    pub id: u128,
}

impl SessionKey {
    pub fn new(tenant: u16, session: &str) -> SessionKey {
        SessionKey {
            tenant,
            id: xxhash_rust::xxh3::xxh3_128(session.as_bytes()),
        }
    }
}

/// One routed, resolved event, as a worker sees it.
#[derive(Debug, Clone, Copy)]
pub struct SessionEvent<'a> {
    pub key: SessionKey,
    pub ts: i64,
    /// The watermark before this event was included (SPEC §4).
    pub watermark: i64,
    pub mp: u16,
    pub device: u16,
    pub login: u16,
    /// (experiment index, variation index), experiments unique.
    pub assigns: &'a [(u32, u32)],
    /// (attribute name id, value id) of attributes some condition mentions.
    pub attrs: &'a [(u32, u32)],
}

/// Most events kept for one session; later events of such a session (a bot, in
/// practice) are dropped and counted.
pub const MAX_EVENTS_PER_SESSION: usize = 4096;

/// Event order of SPEC §3: by ts, then device, then login, strings bytewise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct OrderKey {
    ts: i64,
    device: u16,
    login: u16,
}

#[derive(Debug, Clone, Copy)]
struct EvRec {
    ts: i64,
    mp: u16,
    device: u16,
    login: u16,
}

impl EvRec {
    fn key(&self) -> OrderKey {
        OrderKey {
            ts: self.ts,
            device: self.device,
            login: self.login,
        }
    }
}

const NEVER: i64 = i64::MAX;

#[derive(Debug, Clone)]
struct ExpState {
    experiment: u32,
    variation: u32,
    /// Order key of the least event carrying this experiment's assignment.
    assigned_at: OrderKey,
    conflict: bool,
    /// Per condition, ts of the first event meeting it, or NEVER.
    first_met: SmallVec<[i64; 2]>,
}

/// What the contributions of one experiment depend on, besides the events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct View {
    variation: u32,
    assigned_at: OrderKey,
    /// F: qualification time, if qualified.
    fm_at: Option<i64>,
}

impl ExpState {
    fn view(&self) -> View {
        let a = self.assigned_at.ts;
        let fm_at = if self.first_met.contains(&NEVER) {
            None
        } else {
            Some(self.first_met.iter().copied().fold(a, i64::max))
        };
        View {
            variation: self.variation,
            assigned_at: self.assigned_at,
            fm_at,
        }
    }
}

#[derive(Debug, Default)]
struct Session {
    max_ts: i64,
    events: SmallVec<[EvRec; 4]>,
    experiments: SmallVec<[ExpState; 2]>,
    /// (event index, attribute name id, value id): the attributes conditions
    /// look at, kept to evaluate experiments assigned later.
    attrs: Vec<(u16, u32, u32)>,
}

impl Session {
    fn attr_of(&self, event: usize, name: u32) -> Option<u32> {
        self.attrs
            .iter()
            .find(|a| a.0 as usize == event && a.1 == name)
            .map(|a| a.2)
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
    /// Events dropped because their session reached [`MAX_EVENTS_PER_SESSION`].
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
            t[a.device as usize]
                .as_bytes()
                .cmp(t[b.device as usize].as_bytes())
        };
        dev.then_with(|| {
            if a.login == b.login {
                Ordering::Equal
            } else {
                let t = names.login.read();
                t[a.login as usize]
                    .as_bytes()
                    .cmp(t[b.login as usize].as_bytes())
            }
        })
    }

    /// Whether `events[i]` is the first of those with its mp and `ts >= bound`
    /// (ties of equal keys go to the lower index, consistently).
    fn is_first_visit(&self, events: &[EvRec], i: usize, bound: i64) -> bool {
        let e = events[i];
        events.iter().enumerate().all(|(j, g)| {
            j == i
                || g.mp != e.mp
                || g.ts < bound
                || match self.cmp(g.key(), e.key()) {
                    Ordering::Less => false,
                    Ordering::Equal => j > i,
                    Ordering::Greater => true,
                }
        })
    }

    /// The least event with `ts >= bound`.
    fn first_from(&self, events: &[EvRec], bound: i64) -> Option<EvRec> {
        let mut best: Option<EvRec> = None;
        for e in events.iter().filter(|e| e.ts >= bound) {
            if best.is_none_or(|b| self.cmp(e.key(), b.key()) == Ordering::Less) {
                best = Some(*e);
            }
        }
        best
    }
}

/// Emits the contributions of one experiment located at times `>= from`.
fn emit_from(
    ord: &Order,
    x: &CompiledExperiment,
    view: View,
    events: &[EvRec],
    from: i64,
    sign: i64,
    out: &mut MinuteCounters,
) {
    let v = view.variation;
    let a = view.assigned_at;
    if a.ts >= from {
        out.add(
            SeriesKey::new(MetricKind::SessionAssigned, v, NO_MP, a.device, a.login),
            a.ts,
            sign,
        );
    }
    if let Some(f) = view.fm_at {
        if let Some(first) = ord.first_from(events, f) {
            if first.ts >= from {
                out.add(
                    SeriesKey::new(MetricKind::SessionFm, v, NO_MP, first.device, first.login),
                    first.ts,
                    sign,
                );
            }
        }
    }
    for (i, e) in events.iter().enumerate() {
        if e.ts < from || e.ts < a.ts || !x.reports(e.mp) {
            continue;
        }
        out.add(
            SeriesKey::new(MetricKind::VisitAssigned, v, e.mp, e.device, e.login),
            e.ts,
            sign,
        );
        if ord.is_first_visit(events, i, a.ts) {
            out.add(
                SeriesKey::new(MetricKind::VisitAssignedBeta, v, e.mp, e.device, e.login),
                e.ts,
                sign,
            );
        }
        if let Some(f) = view.fm_at.filter(|&f| e.ts >= f) {
            out.add(
                SeriesKey::new(MetricKind::VisitFm, v, e.mp, e.device, e.login),
                e.ts,
                sign,
            );
            if ord.is_first_visit(events, i, f) {
                out.add(
                    SeriesKey::new(MetricKind::VisitFmBeta, v, e.mp, e.device, e.login),
                    e.ts,
                    sign,
                );
            }
        }
    }
}

/// The sessions of one shard.
pub struct SessionTable {
    sessions: AHashMap<SessionKey, Session>,
    catalog: Arc<Catalog>,
    gap_ms: i64,
    stats: SessionStats,
    before: Vec<Option<View>>,
}

impl SessionTable {
    pub fn new(catalog: Arc<Catalog>) -> SessionTable {
        let gap_ms = catalog.engine.session_gap_ms;
        SessionTable {
            sessions: AHashMap::new(),
            catalog,
            gap_ms,
            stats: SessionStats::default(),
            before: Vec::new(),
        }
    }

    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// Sessions held now.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// Frees every session that has expired at watermark `wm`.
    pub fn expire(&mut self, wm: i64) {
        let gap = self.gap_ms;
        let before = self.sessions.len();
        self.sessions.retain(|_, s| !expired(s.max_ts, gap, wm));
        self.stats.evicted += (before - self.sessions.len()) as u64;
    }

    /// Adds one event, emitting the resulting metric deltas into `out`.
    pub fn add(&mut self, ev: &SessionEvent, out: &mut MinuteCounters) {
        let gap = self.gap_ms;
        let session = match self.sessions.entry(ev.key) {
            std::collections::hash_map::Entry::Occupied(o) => {
                let s = o.into_mut();
                if expired(s.max_ts, gap, ev.watermark) {
                    // The old session's contributions stay; its state goes.
                    *s = Session::default();
                    self.stats.evicted += 1;
                    self.stats.started += 1;
                }
                s
            }
            std::collections::hash_map::Entry::Vacant(v) => {
                self.stats.started += 1;
                v.insert(Session::default())
            }
        };
        if session.events.len() >= MAX_EVENTS_PER_SESSION {
            self.stats.overflow_dropped += 1;
            return;
        }
        let fresh = session.events.is_empty();
        let in_order = fresh || ev.ts > session.max_ts;
        session.max_ts = if fresh {
            ev.ts
        } else {
            session.max_ts.max(ev.ts)
        };

        let catalog = &*self.catalog;
        let ord = Order { catalog };
        let idx = session.events.len();
        let rec = EvRec {
            ts: ev.ts,
            mp: ev.mp,
            device: ev.device,
            login: ev.login,
        };
        session.events.push(rec);
        for &(name, value) in ev.attrs {
            session.attrs.push((idx as u16, name, value));
        }

        // 1. Views before the event.
        self.before.clear();
        self.before
            .extend(session.experiments.iter().map(|s| Some(s.view())));

        // 2a. Assignments: the least (order key, variation id) wins.
        let key = rec.key();
        for &(experiment, variation) in ev.assigns {
            match session
                .experiments
                .iter_mut()
                .find(|s| s.experiment == experiment)
            {
                Some(s) => {
                    if s.variation != variation && !s.conflict {
                        s.conflict = true;
                        self.stats.conflicts += 1;
                    }
                    let wins = match ord.cmp(key, s.assigned_at) {
                        Ordering::Less => true,
                        Ordering::Equal => {
                            catalog.variations[variation as usize].id
                                < catalog.variations[s.variation as usize].id
                        }
                        Ordering::Greater => false,
                    };
                    if wins {
                        s.variation = variation;
                        s.assigned_at = key;
                    }
                }
                None => {
                    // Newly assigned: conditions over every event so far.
                    let x = &catalog.experiments[experiment as usize];
                    let first_met = x
                        .conditions
                        .iter()
                        .map(|c| {
                            session
                                .events
                                .iter()
                                .enumerate()
                                .filter(|(i, e)| {
                                    c.matches(e.mp, e.device, e.login, |k| session.attr_of(*i, k))
                                })
                                .map(|(_, e)| e.ts)
                                .min()
                                .unwrap_or(NEVER)
                        })
                        .collect();
                    session.experiments.push(ExpState {
                        experiment,
                        variation,
                        assigned_at: key,
                        conflict: false,
                        first_met,
                    });
                    self.before.push(None);
                }
            }
        }
        // 2b. Conditions met by this event, for experiments assigned before it.
        let attrs = ev.attrs;
        let lookup = |k: u32| attrs.iter().find(|a| a.0 == k).map(|a| a.1);
        let known = self.before.iter().take_while(|b| b.is_some()).count();
        for s in session.experiments[..known].iter_mut() {
            let x = &catalog.experiments[s.experiment as usize];
            for (c, first) in x.conditions.iter().zip(s.first_met.iter_mut()) {
                if ev.ts < *first && c.matches(ev.mp, ev.device, ev.login, lookup) {
                    *first = ev.ts;
                }
            }
        }

        // 3. Deltas at >= t.
        let events = &session.events[..];
        for (s, before) in session.experiments.iter().zip(self.before.iter()) {
            let x = &catalog.experiments[s.experiment as usize];
            let after = s.view();
            if in_order && *before == Some(after) {
                fast_in_order(x, after, events, out);
                continue;
            }
            if let Some(b) = *before {
                emit_from(&ord, x, b, &events[..idx], ev.ts, -1, out);
            }
            emit_from(&ord, x, after, events, ev.ts, 1, out);
        }
    }
}

/// Deltas of an event later than every other event of its session, for an
/// experiment whose view it did not change. Nothing was located at `>= t`
/// before, and F is the ts of an earlier event, so `session.fm` cannot move:
/// only the event's own visits (and betas, if first) are new.
#[inline]
fn fast_in_order(x: &CompiledExperiment, view: View, events: &[EvRec], out: &mut MinuteCounters) {
    let i = events.len() - 1;
    let e = events[i];
    let a = view.assigned_at.ts;
    if e.ts < a || !x.reports(e.mp) {
        return;
    }
    let v = view.variation;
    out.add(
        SeriesKey::new(MetricKind::VisitAssigned, v, e.mp, e.device, e.login),
        e.ts,
        1,
    );
    // In order, e is the greatest event: it is first iff no other visit of its mp counts.
    let prior_since = |bound: i64| events[..i].iter().any(|g| g.mp == e.mp && g.ts >= bound);
    if !prior_since(a) {
        out.add(
            SeriesKey::new(MetricKind::VisitAssignedBeta, v, e.mp, e.device, e.login),
            e.ts,
            1,
        );
    }
    if let Some(f) = view.fm_at.filter(|&f| e.ts >= f) {
        out.add(
            SeriesKey::new(MetricKind::VisitFm, v, e.mp, e.device, e.login),
            e.ts,
            1,
        );
        if !prior_since(f) {
            out.add(
                SeriesKey::new(MetricKind::VisitFmBeta, v, e.mp, e.device, e.login),
                e.ts,
                1,
            );
        }
    }
}

#[inline]
fn expired(max_ts: i64, gap_ms: i64, wm: i64) -> bool {
    wm > max_ts.saturating_add(gap_ms)
}
