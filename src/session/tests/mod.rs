//! Unit tests of the session table: a [`Harness`] that feeds events written
//! with strings to a [`SessionTable`] and reads the drained deltas back as
//! points an operator would see; focused tests of each SPEC §3–4 rule; and
//! (in `model.rs`) the property test against an independent model.

use super::*;
use crate::aggregate::{Delta, Namer};
use crate::config::{Config, EngineConfig, Experiment};
use crate::names::{Interner, NameKind, Names};
use std::collections::BTreeMap;

mod model;

/// A minute-aligned time (2018-05-03 10:00 UTC).
const T0: i64 = 1_525_341_600_000;

/// `T0` + `m` minutes + `s` seconds.
fn at(m: i64, s: i64) -> i64 {
    T0 + m * 60_000 + s * 1_000
}

/// A point as written: (name, device, login, minute).
type Point = (String, String, String, i64);
type Points = BTreeMap<Point, i128>;

/// An event as a test writes it: every tag given, assignments by experiment
/// and variation id.
#[derive(Debug, Clone)]
struct Ev {
    session: u32,
    ts: i64,
    mp: &'static str,
    device: &'static str,
    login: &'static str,
    value: i32,
    assign: Vec<(u64, i64)>,
    attrs: Vec<(&'static str, &'static str)>,
}

/// A desktop, logged-in event of session 1, without assignments.
fn ev(ts: i64, mp: &'static str) -> Ev {
    Ev { session: 1, ts, mp, device: "desktop", login: "in", value: 0, assign: Vec::new(), attrs: Vec::new() }
}

impl Ev {
    fn assign(mut self, experiment: u64, variation: i64) -> Ev {
        self.assign.push((experiment, variation));
        self
    }
    fn device(mut self, device: &'static str) -> Ev {
        self.device = device;
        self
    }
    fn value(mut self, value: i32) -> Ev {
        self.value = value;
        self
    }
    fn session(mut self, session: u32) -> Ev {
        self.session = session;
        self
    }
}

/// One tenant `t`: a table, its counters, and the sum of every delta drained.
struct Harness {
    catalog: Arc<Catalog>,
    table: SessionTable,
    counters: MinuteCounters,
    names: [Interner; 3],
    drained: BTreeMap<(SeriesKey, i64), i128>,
    scratch: Vec<Delta>,
}

impl Harness {
    /// A harness for `experiments`, with `devices` interned first, in order.
    fn new(experiments: Vec<Experiment>, devices: Vec<&str>) -> Harness {
        let engine = EngineConfig { session_gap_ms: 30 * 60_000, ..EngineConfig::default() };
        let config = Config { engine, experiments, kafka: Vec::new() };
        let shared = Arc::new(Names::default());
        let catalog = Arc::new(Catalog::build(&config, shared.clone()).expect("catalog"));
        let names = NameKind::ALL.map(|k| Interner::new(shared.clone(), k, k.capacity()));
        let mut h = Harness {
            table: SessionTable::new(catalog.clone()),
            counters: MinuteCounters::new(catalog.clone()),
            catalog,
            names,
            drained: BTreeMap::new(),
            scratch: Vec::new(),
        };
        for d in devices {
            h.names[NameKind::Device.index()].resolve(d);
        }
        h
    }

    /// A harness for the experiments of a config text.
    fn parse(toml: &str) -> Harness {
        let config = Config::parse(toml, "test.toml").expect("config");
        Harness::new(config.experiments, vec!["mobile", "desktop"])
    }

    fn gap_ms(&self) -> i64 {
        self.catalog.engine.session_gap_ms
    }

    /// Resolves `e` as the router does and adds it at `watermark`.
    fn add(&mut self, e: &Ev, watermark: i64) {
        let tenant = self.catalog.tenant("t").expect("tenant t");
        let mut assigns = Vec::new();
        for &(x, v) in &e.assign {
            if let crate::config::AssignLookup::Known { experiment, variation } = self.catalog.assignment(tenant, x, v)
            {
                assigns.push((experiment, variation));
            }
        }
        let attrs: Vec<(u32, u32)> = e.attrs.iter().filter_map(|(k, v)| self.catalog.attribute(k, v)).collect();
        let [mp, device, login] = &mut self.names;
        let ev = SessionEvent {
            key: SessionKey::new(tenant, &format!("s{}", e.session)),
            ts: e.ts,
            watermark,
            mp: mp.resolve(e.mp).0,
            device: device.resolve(e.device).0,
            login: login.resolve(e.login).0,
            value: e.value,
            assigns: (0, assigns.len() as u16),
            attrs: (0, attrs.len() as u16),
        };
        self.table.add(&ev, &assigns, &attrs, &mut self.counters);
    }

    /// Adds each event at a watermark that expires nothing.
    fn add_all(&mut self, events: &[Ev]) {
        for e in events {
            self.add(e, i64::MIN);
        }
    }

    /// Drains the counters and returns every point's total so far (zeros left out).
    fn points(&mut self) -> Points {
        self.counters.drain(&mut self.scratch);
        for d in self.scratch.drain(..) {
            *self.drained.entry((d.key, d.minute)).or_default() += d.delta as i128;
        }
        let namer = Namer::new(&self.catalog);
        self.drained
            .iter()
            .filter(|(_, &v)| v != 0)
            .map(|(&(k, minute), &v)| {
                ((namer.name(k), namer.device(k).to_string(), namer.login(k).to_string(), minute), v)
            })
            .collect()
    }

    /// The total of one point (0 if it has none).
    fn total(&mut self, name: &str, device: &str, minute: i64) -> i128 {
        let key = (name.to_string(), device.to_string(), "in".to_string(), minute);
        self.points().get(&key).copied().unwrap_or(0)
    }

    /// The sum of a metric's points over every minute and tag.
    fn sum(&mut self, name: &str) -> i128 {
        self.points().iter().filter(|(k, _)| k.0 == name).map(|(_, v)| v).sum()
    }
}

/// Experiment 1: variations 11 and 12, reporting home and item, qualified by
/// a home visit.
const ONE: &str = r#"
[[experiment]]
id = 1
tenant = "t"
variations = [11, 12]
mps = ["home", "item"]
qualify = [{ mp = "home" }]
"#;

#[test]
fn compact_sizes() {
    assert_eq!(size_of::<SessionKey>(), 16);
    assert!(size_of::<Session>() <= 48, "{}", size_of::<Session>());
}

#[test]
fn an_earlier_assignment_arriving_late_takes_the_session_over() {
    let mut h = Harness::parse(ONE);
    h.add_all(&[ev(at(5, 0), "home").assign(1, 12), ev(at(7, 0), "item")]);
    assert_eq!(h.total("t.session.assigned.12", "desktop", at(5, 0)), 1);
    assert_eq!(h.sum("t.visit.assigned.12.item"), 1);
    // Earlier, and carrying the other variation: everything moves to 11.
    h.add_all(&[ev(at(1, 0), "item").assign(1, 11)]);
    assert_eq!(h.sum("t.session.assigned.12"), 0);
    assert_eq!(h.sum("t.visit.assigned.12.item"), 0);
    assert_eq!(h.sum("t.session.fm.12"), 0);
    assert_eq!(h.total("t.session.assigned.11", "desktop", at(1, 0)), 1);
    assert_eq!(h.total("t.visit.assigned.11.item", "desktop", at(1, 0)), 1);
    assert_eq!(h.total("t.visit.assigned.11.item", "desktop", at(7, 0)), 1);
    assert_eq!(h.total("t.visit.assigned.11.home", "desktop", at(5, 0)), 1);
    // Qualified by the home visit at 10:05: only what is at or after it counts as fm.
    assert_eq!(h.total("t.session.fm.11", "desktop", at(5, 0)), 1);
    assert_eq!(h.sum("t.visit.fm.11.item"), 1);
    assert_eq!(h.table.stats().conflicts, 1, "the session carried both variations");
}

#[test]
fn a_tie_in_ts_goes_to_the_smaller_variation_id() {
    let mut h = Harness::parse(ONE);
    h.add_all(&[ev(at(2, 0), "home").assign(1, 12), ev(at(2, 0), "item").assign(1, 11)]);
    assert_eq!(h.sum("t.session.assigned.12"), 0);
    assert_eq!(h.sum("t.session.assigned.11"), 1);
    assert_eq!(h.sum("t.visit.assigned.11.home") + h.sum("t.visit.assigned.11.item"), 2);
}

#[test]
fn beta_counts_once_per_session_at_the_first_visit_in_event_order() {
    let mut h = Harness::parse(ONE);
    h.add_all(&[ev(at(0, 0), "item").assign(1, 11), ev(at(5, 0), "home"), ev(at(7, 0), "home")]);
    assert_eq!(h.total("t.visit.assigned.11.home.beta", "desktop", at(5, 0)), 1);
    // A late first visit takes the beta over.
    h.add_all(&[ev(at(3, 0), "home")]);
    assert_eq!(h.total("t.visit.assigned.11.home.beta", "desktop", at(5, 0)), 0);
    assert_eq!(h.total("t.visit.assigned.11.home.beta", "desktop", at(3, 0)), 1);
    assert_eq!(h.sum("t.visit.assigned.11.home.beta"), 1);
    assert_eq!(h.sum("t.visit.assigned.11.home"), 3);
    // At the same ts, "desktop" < "mobile" bytewise, though mobile's id is smaller.
    h.add_all(&[ev(at(2, 0), "home").device("mobile"), ev(at(2, 0), "home")]);
    assert_eq!(h.total("t.visit.assigned.11.home.beta", "desktop", at(2, 0)), 1);
    assert_eq!(h.sum("t.visit.assigned.11.home.beta"), 1);
    assert_eq!(h.sum("t.visit.fm.11.home.beta"), 1);
}

#[test]
fn fm_starts_at_the_latest_first_time_of_its_conditions() {
    let two = r#"
[[experiment]]
id = 1
tenant = "t"
variations = [11, 12]
qualify = [{ mp = "home" }, { device = "mobile" }]
"#;
    let mut h = Harness::parse(two);
    h.add_all(&[ev(at(0, 0), "item").assign(1, 11), ev(at(2, 0), "home"), ev(at(4, 0), "item")]);
    assert_eq!(h.sum("t.session.fm.11"), 0, "no mobile event yet");
    h.add_all(&[ev(at(6, 0), "item").device("mobile")]);
    // F = max(A = 10:00, home 10:02, mobile 10:06) = 10:06.
    assert_eq!(h.total("t.session.fm.11", "mobile", at(6, 0)), 1);
    assert_eq!(h.sum("t.visit.fm.11.item"), 1);
    assert_eq!(h.sum("t.visit.fm.11.home"), 0);
    // A late mobile home visit meets both conditions at 10:01: F moves there.
    h.add_all(&[ev(at(1, 0), "home").device("mobile")]);
    assert_eq!(h.total("t.session.fm.11", "mobile", at(6, 0)), 0);
    assert_eq!(h.total("t.session.fm.11", "mobile", at(1, 0)), 1);
    assert_eq!(h.sum("t.visit.fm.11.item"), 2);
    assert_eq!(h.sum("t.visit.fm.11.home"), 2);
    assert_eq!(h.total("t.visit.fm.11.home.beta", "mobile", at(1, 0)), 1);
    assert_eq!(h.sum("t.visit.fm.11.item.beta"), 1);
    assert_eq!(h.total("t.visit.fm.11.item.beta", "desktop", at(4, 0)), 1);
}

#[test]
fn value_sums_and_value_sq_follow_event_order_whatever_the_arrival() {
    let mut h = Harness::parse(ONE);
    h.add_all(&[ev(at(0, 0), "home").assign(1, 11), ev(at(1, 0), "item").value(100), ev(at(3, 0), "item").value(250)]);
    h.add_all(&[ev(at(2, 0), "item").value(-50)]);
    assert_eq!(h.sum("t.value.assigned.11.item"), 300);
    assert_eq!(h.sum("t.value.fm.11.item"), 300);
    // y: 100, 50, 300 in event order; increments y_k² − y_{k−1}².
    assert_eq!(h.total("t.value_sq.fm.11.item", "desktop", at(1, 0)), 10_000);
    assert_eq!(h.total("t.value_sq.fm.11.item", "desktop", at(2, 0)), 2_500 - 10_000);
    assert_eq!(h.total("t.value_sq.fm.11.item", "desktop", at(3, 0)), 90_000 - 2_500);
    assert_eq!(h.sum("t.value_sq.fm.11.item"), 300 * 300, "the square of the session's total");
    // The largest values: the square of 254 · 10⁷ is exact.
    let mut h = Harness::parse(ONE);
    h.add_all(&[ev(at(0, 0), "home").assign(1, 11)]);
    for i in 0..253 {
        h.add_all(&[ev(at(1, i), "item").value(10_000_000)]);
    }
    assert_eq!(h.sum("t.value_sq.fm.11.item"), (253i128 * 10_000_000).pow(2));
}

#[test]
fn an_expired_session_keeps_its_totals_and_its_id_starts_afresh() {
    let mut h = Harness::parse(ONE);
    let gap = h.gap_ms();
    h.add(&ev(at(0, 0), "home").assign(1, 11), i64::MIN);
    h.add(&ev(at(10, 0), "item").session(2), i64::MIN);
    // Session 1's last event is at 10:00: at a watermark one ms past 10:00 + gap it has expired.
    let wm = at(0, 0) + gap + 1;
    h.add(&ev(wm, "home"), wm);
    assert_eq!(h.sum("t.session.assigned.11"), 1, "the old session's contributions stay");
    assert_eq!(h.sum("t.visit.assigned.11.home"), 1, "the new session is not assigned");
    assert_eq!((h.table.stats().started, h.table.stats().evicted, h.table.len()), (3, 1, 2));
    // A sweep frees session 2 (last event 10:10) once the watermark passes 10:10 + gap.
    h.table.expire(at(10, 0) + gap);
    assert_eq!(h.table.len(), 2, "not yet: expired means W > max ts + gap");
    h.table.expire(at(10, 0) + gap + 1);
    assert_eq!((h.table.len(), h.table.stats().evicted), (1, 2));
}

#[test]
fn expiry_frees_by_the_latest_event_not_where_the_session_was_listed_first() {
    let mut h = Harness::parse(ONE);
    let gap = h.gap_ms();
    // Session 1 is listed at minute 0, then again at minute 30 (a later event);
    // session 2 at minute 5 only; an out-of-order event of session 1 lists nothing.
    h.add_all(&[ev(at(0, 0), "home").assign(1, 11), ev(at(5, 0), "item").session(2)]);
    h.add_all(&[ev(at(30, 0), "item"), ev(at(1, 0), "item")]);
    // Past minute 0 + gap and minute 5 + gap: only session 2 has expired.
    h.table.expire(at(5, 0) + gap + 1);
    assert_eq!((h.table.len(), h.table.stats().evicted), (1, 1));
    // A watermark inside minute 30's bucket, short of the session's ts + gap: kept.
    h.table.expire(at(30, 0) + gap);
    assert_eq!(h.table.len(), 1);
    h.table.expire(at(30, 0) + gap + 1);
    assert_eq!((h.table.len(), h.table.stats().evicted), (0, 2));
    // Its id starts afresh, and a restored table expires its sessions too.
    h.add_all(&[ev(at(40, 0), "home")]);
    let mut e = crate::codec::Enc::default();
    h.table.encode(&mut e);
    let mut back = SessionTable::new(h.catalog.clone());
    SessionTable::decode_each(&mut crate::codec::Dec::new(&e.buf), |k, b| back.restore(k, b).unwrap()).unwrap();
    assert_eq!(back.len(), 1);
    back.expire(at(40, 0) + gap + 1);
    assert_eq!(back.len(), 0);
}

#[test]
fn a_session_keeps_at_most_254_events_and_counts_the_rest() {
    let mut h = Harness::parse(ONE);
    h.add_all(&[ev(at(0, 0), "home").assign(1, 11)]);
    for i in 1..MAX_EVENTS_PER_SESSION as i64 + 2 {
        h.add_all(&[ev(at(1, i), "item")]);
    }
    // An earlier assignment to the other variation, beyond the cap, changes nothing.
    h.add_all(&[ev(at(0, 0) - 1, "item").assign(1, 12)]);
    assert_eq!(h.sum("t.visit.assigned.11.item"), MAX_EVENTS_PER_SESSION as i128 - 1);
    assert_eq!(h.sum("t.session.assigned.11"), 1);
    assert_eq!(h.sum("t.session.assigned.12"), 0);
    assert_eq!(h.table.stats().overflow_dropped, 3);
    assert_eq!(h.table.stats().conflicts, 0);
}
