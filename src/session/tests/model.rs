//! An independent model of SPEC §3–4 at the level of one [`SessionTable`], and
//! the property test that holds the table to it.
//!
//! The model keeps, per session id, its incarnations (a new one when an event
//! finds the last one expired, SPEC §4), each a plain list of the events it
//! kept (at most [`MAX_EVENTS_PER_SESSION`]), and recomputes every point from
//! scratch by the definitions of SPEC §3, in strings: no ids, no deltas, no
//! incremental state. The property test feeds random events of a few sessions
//! in random arrival orders to a table and the model alike, and after *every*
//! event compares the sum of all deltas drained so far with the model's
//! totals, so a failure names the first event whose deltas are wrong.

use super::{Ev, Harness, Points};
use crate::config::{Condition, Experiment};
use crate::session::MAX_EVENTS_PER_SESSION;
use proptest::prelude::*;
use std::collections::BTreeMap;

/// SPEC §3 event order: ts, then device, then login, strings bytewise.
fn order(e: &Ev) -> (i64, &[u8], &[u8]) {
    (e.ts, e.device.as_bytes(), e.login.as_bytes())
}

fn first<'a>(events: impl Iterator<Item = &'a Ev>) -> Option<&'a Ev> {
    events.min_by(|a, b| order(a).cmp(&order(b)))
}

fn minute(ts: i64) -> i64 {
    ts - ts.rem_euclid(60_000)
}

/// A condition is a conjunction of equalities on one event.
fn meets(c: &Condition, e: &Ev) -> bool {
    c.mp.as_deref().is_none_or(|m| m == e.mp)
        && c.device.as_deref().is_none_or(|d| d == e.device)
        && c.login.as_deref().is_none_or(|l| l == e.login)
        && c.attrs.iter().all(|(k, v)| e.attrs.iter().any(|(ek, ev)| ek == k && ev == v))
}

/// The variation `e` carries for `x`, if it is one of `x`'s (others are ignored).
fn carried(x: &Experiment, e: &Ev) -> Option<i64> {
    e.assign.iter().find(|a| a.0 == x.id).map(|a| a.1).filter(|v| x.variations.contains(v))
}

/// Adds every contribution of one session (its kept events) to `out`.
fn contributions(tenant: &str, experiments: &[Experiment], events: &[Ev], out: &mut Points) {
    let mut add = |name: String, e: &Ev, amount: i128| {
        if amount != 0 {
            *out.entry((name, e.device.to_string(), e.login.to_string(), minute(e.ts))).or_default() += amount;
        }
    };
    for x in experiments.iter().filter(|x| x.tenant == tenant) {
        // Assignment: the variation of the first carrying event, ties to the smaller id.
        let carrying: Vec<(&Ev, i64)> = events.iter().filter_map(|e| carried(x, e).map(|v| (e, v))).collect();
        let Some(least) = carrying.iter().map(|(e, _)| order(e)).min() else { continue };
        let v = carrying.iter().filter(|(e, _)| order(e) == least).map(|&(_, v)| v).min().unwrap();
        let a_event = first(carrying.iter().filter(|c| c.1 == v).map(|c| c.0)).unwrap();
        let a = a_event.ts;
        add(format!("{tenant}.session.assigned.{v}"), a_event, 1);
        // Qualification: F = max(A, first_c for every condition c).
        let f = x
            .qualify
            .iter()
            .try_fold(a, |f, c| events.iter().filter(|e| meets(c, e)).map(|e| e.ts).min().map(|t| f.max(t)));
        if let Some(f) = f {
            if let Some(e) = first(events.iter().filter(|e| e.ts >= f)) {
                add(format!("{tenant}.session.fm.{v}"), e, 1);
            }
        }
        let mut mps: Vec<&str> = events.iter().map(|e| e.mp).collect();
        mps.sort_unstable();
        mps.dedup();
        mps.retain(|m| x.mps.as_ref().is_none_or(|l| l.iter().any(|n| n == m)));
        for m in mps {
            let since = |bound: i64| {
                let mut visits: Vec<&Ev> = events.iter().filter(|e| e.mp == m && e.ts >= bound).collect();
                visits.sort_by(|a, b| order(a).cmp(&order(b)));
                visits
            };
            let assigned = since(a);
            for e in &assigned {
                add(format!("{tenant}.visit.assigned.{v}.{m}"), e, 1);
                add(format!("{tenant}.value.assigned.{v}.{m}"), e, e.value as i128);
            }
            if let Some(e) = assigned.first() {
                add(format!("{tenant}.visit.assigned.{v}.{m}.beta"), e, 1);
            }
            let Some(f) = f else { continue };
            let fm = since(f);
            let mut y: i128 = 0;
            for e in &fm {
                add(format!("{tenant}.visit.fm.{v}.{m}"), e, 1);
                add(format!("{tenant}.value.fm.{v}.{m}"), e, e.value as i128);
                let next = y + e.value as i128;
                add(format!("{tenant}.value_sq.fm.{v}.{m}"), e, next * next - y * y);
                y = next;
            }
            if let Some(e) = fm.first() {
                add(format!("{tenant}.visit.fm.{v}.{m}.beta"), e, 1);
            }
        }
    }
}

/// Sessions as lists of kept events, by id and incarnation.
pub(super) struct Model {
    pub tenant: String,
    pub experiments: Vec<Experiment>,
    pub gap_ms: i64,
    pub sessions: BTreeMap<u32, Vec<Vec<Ev>>>,
    /// Events not kept because their incarnation held the most it may.
    pub overflow: u64,
}

impl Model {
    pub fn new(tenant: &str, experiments: Vec<Experiment>, gap_ms: i64) -> Model {
        Model { tenant: tenant.into(), experiments, gap_ms, sessions: BTreeMap::new(), overflow: 0 }
    }

    fn expired(&self, events: &[Ev], watermark: i64) -> bool {
        let max_ts = events.iter().map(|e| e.ts).max().expect("an incarnation has an event");
        watermark > max_ts + self.gap_ms
    }

    /// An event arriving when the watermark is `watermark`.
    pub fn add(&mut self, e: &Ev, watermark: i64) {
        let last = self.sessions.get(&e.session).and_then(|i| i.last());
        let new = last.is_none_or(|events| self.expired(events, watermark));
        let incarnations = self.sessions.entry(e.session).or_default();
        if new {
            incarnations.push(Vec::new());
        }
        let events = incarnations.last_mut().unwrap();
        if events.len() == MAX_EVENTS_PER_SESSION {
            self.overflow += 1;
        } else {
            events.push(e.clone());
        }
    }

    /// Sessions not expired at `watermark`.
    pub fn live(&self, watermark: i64) -> usize {
        self.sessions.values().filter(|i| !self.expired(i.last().unwrap(), watermark)).count()
    }

    pub fn started(&self) -> u64 {
        self.sessions.values().map(|i| i.len() as u64).sum()
    }

    /// (session, experiment) pairs whose events disagree on the variation.
    pub fn conflicts(&self) -> u64 {
        let mut n = 0;
        for events in self.sessions.values().flatten() {
            for x in self.experiments.iter().filter(|x| x.tenant == self.tenant) {
                let mut vs: Vec<i64> = events.iter().filter_map(|e| carried(x, e)).collect();
                vs.sort_unstable();
                vs.dedup();
                n += (vs.len() > 1) as u64;
            }
        }
        n
    }

    pub fn totals(&self) -> Points {
        let mut out = Points::new();
        for events in self.sessions.values().flatten() {
            contributions(&self.tenant, &self.experiments, events, &mut out);
        }
        out
    }
}

const MPS: [&str; 3] = ["home", "item", "checkout"];
/// Interned in this order, so that id order is not byte order.
const DEVICES: [&str; 3] = ["mobile", "desktop", "app"];
const LOGINS: [&str; 3] = ["out", "in", "unknown"];
const PAY: [&str; 2] = ["paypal", "card"];
const LATENESS: i64 = 10 * 60_000;

fn condition() -> impl Strategy<Value = Condition> {
    (
        prop::option::of(prop::sample::select(MPS.to_vec())),
        prop::option::of(prop::sample::select(DEVICES.to_vec())),
        prop::option::of(prop::sample::select(LOGINS.to_vec())),
        prop::option::of(prop::sample::select(PAY.to_vec())),
    )
        .prop_map(|(mp, device, login, pay)| Condition {
            mp: mp.map(str::to_string),
            device: device.map(str::to_string),
            login: login.map(str::to_string),
            attrs: pay.map(|p| vec![("pay".to_string(), p.to_string())]).unwrap_or_default(),
        })
}

fn experiments() -> impl Strategy<Value = Vec<Experiment>> {
    let experiment = (
        2..4usize,
        prop::option::of(prop::sample::subsequence(MPS.to_vec(), 1..3)),
        prop::collection::vec(condition(), 0..3),
    );
    prop::collection::vec(experiment, 1..4).prop_map(|xs| {
        xs.into_iter()
            .enumerate()
            .map(|(i, (n, mps, qualify))| Experiment {
                id: 1 + i as u64,
                tenant: "t".into(),
                variations: (0..n as i64).map(|k| 10 * (1 + i as i64) + k).collect(),
                mps: mps.map(|m| m.into_iter().map(str::to_string).collect()),
                qualify,
                weights: vec![1; n],
            })
            .collect()
    })
}

/// An event and its arrival time.
fn event() -> impl Strategy<Value = (Ev, i64)> {
    (
        0..3u32,
        // Seconds over two hours, in steps that make ties in ts common.
        (0..480i64).prop_map(|q| q * 15_000),
        prop::sample::select(MPS.to_vec()),
        prop::sample::select(DEVICES.to_vec()),
        prop::sample::select(LOGINS.to_vec()),
        prop_oneof![3 => Just(0), 2 => -3000..10_000i32, 1 => 9_999_000..=10_000_000i32, 1 => Just(-10_000_000)],
        // (experiment, variation slot); slot 3 is not configured.
        prop::collection::vec((1..4u64, 0..4usize), 0..3),
        prop::option::of(prop::sample::select(PAY.to_vec())),
        // Delay: none, within the lateness, or far beyond it (dropped as late).
        prop_oneof![4 => Just(0i64), 4 => 0..LATENESS, 1 => (3 * LATENESS)..(4 * LATENESS)],
    )
        .prop_map(|(session, ts, mp, device, login, value, assign, pay, delay)| {
            let mut a: Vec<(u64, i64)> = Vec::new();
            for (x, slot) in assign {
                if a.iter().all(|p| p.0 != x) {
                    a.push((x, 10 * x as i64 + slot as i64));
                }
            }
            let attrs = pay.map(|p| vec![("pay", p)]).unwrap_or_default();
            (Ev { session, ts: super::T0 + ts, mp, device, login, value, assign: a, attrs }, delay)
        })
}

/// What differs between the model's points and the table's. A point whose
/// total is 0 equals one that is absent: a visit of value 0 gives the model a
/// zero entry, and the table reports no delta for it (nothing to correct).
fn diff(want: &Points, got: &Points) -> Vec<String> {
    let mut out = Vec::new();
    for (k, &w) in want {
        let g = got.get(k).copied().unwrap_or(0);
        if g != w {
            out.push(format!("{k:?}: model {w}, table {g}"));
        }
    }
    for (k, &g) in got {
        if !want.contains_key(k) && g != 0 {
            out.push(format!("{k:?}: model none, table {g}"));
        }
    }
    out
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn drained_deltas_sum_to_the_model_after_every_event(
        experiments in experiments(),
        mut events in prop::collection::vec(event(), 1..60),
        sweeps in prop::collection::vec(any::<bool>(), 60),
    ) {
        let mut h = Harness::new(experiments.clone(), DEVICES.to_vec());
        let mut model = Model::new("t", experiments, h.gap_ms());
        events.sort_by_key(|(e, delay)| e.ts + delay);
        let mut max_ts = i64::MIN;
        for (step, (e, _)) in events.iter().enumerate() {
            // The watermark before the event is included; a late event is dropped upstream.
            let watermark = max_ts.saturating_sub(LATENESS);
            max_ts = max_ts.max(e.ts);
            if e.ts < watermark {
                continue;
            }
            h.add(e, watermark);
            model.add(e, watermark);
            let (want, got) = (model.totals(), h.points());
            let d = diff(&want, &got);
            prop_assert!(d.is_empty(), "step {step}: after {e:?} (watermark {watermark}), session {}: {:#?}\n{d:#?}",
                e.session, model.sessions[&e.session]);
            if sweeps[step] {
                let now = max_ts - LATENESS;
                h.table.expire(now);
                prop_assert_eq!(h.table.len(), model.live(now), "step {}: sessions live after a sweep at {}", step, now);
            }
            let stats = h.table.stats();
            prop_assert_eq!(stats.started, model.started(), "step {}: sessions started", step);
            prop_assert_eq!(stats.started - stats.evicted, h.table.len() as u64, "step {}: started − evicted", step);
            prop_assert_eq!(stats.conflicts, model.conflicts(), "step {}: conflicts", step);
            prop_assert_eq!(stats.overflow_dropped, model.overflow, "step {}: overflow", step);
            // Checks, in a debug build, the running sum of session heap bytes against a full pass.
            let _ = h.table.state_bytes();
        }
    }
}
