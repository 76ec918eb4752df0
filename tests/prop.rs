//! Property tests: random experiments and sessions, delivered in random orders
//! within the lateness (plus some events far beyond it), must give final totals
//! identical to the reference at 1, 2 and 4 shard threads. Events carry values
//! (refunds included, and some malformed ones that must be rejected) so that
//! the value metrics, `value_sq`'s order-dependent increments above all, are
//! held to the reference too. And the parser must never panic, whatever the bytes.

mod common;

use common::*;
use expmon::config::{Condition, Config, EngineConfig, Experiment};
use proptest::prelude::*;

const T0: i64 = 1_525_341_600_000;
const SEC: i64 = 1_000;
const MIN: i64 = 60 * SEC;
const LATENESS: i64 = 10 * MIN;
const GAP: i64 = 30 * MIN;

const MPS: [&str; 4] = ["a", "b", "c", "d"];
const DEVICES: [&str; 2] = ["d1", "d2"];
const LOGINS: [Option<&str>; 3] = [Some("in"), Some("out"), None];

fn condition() -> impl Strategy<Value = Condition> {
    (prop::option::of(0..4usize), prop::option::of(0..2usize), prop::option::of(0..2usize), prop::option::of(0..2usize))
        .prop_map(|(mp, dev, login, pay)| Condition {
            mp: mp.map(|i| MPS[i].to_string()),
            device: dev.map(|i| DEVICES[i].to_string()),
            login: login.map(|i| ["in", "out"][i].to_string()),
            attrs: pay.map(|i| vec![("pay".to_string(), ["x", "y"][i].to_string())]).unwrap_or_default(),
        })
}

fn experiments() -> impl Strategy<Value = Vec<Experiment>> {
    prop::collection::vec(
        (
            0..2usize,
            2..4usize,
            prop::option::of(prop::sample::subsequence(MPS.to_vec(), 1..4)),
            prop::collection::vec(condition(), 0..3),
        ),
        1..5,
    )
    .prop_map(|xs| {
        xs.into_iter()
            .enumerate()
            .map(|(i, (tenant, nv, mps, qualify))| Experiment {
                id: 10 + i as u64,
                tenant: ["t1", "t2"][tenant].to_string(),
                variations: (0..nv as i64).map(|k| (10 + i as i64) * 10 + k).collect(),
                mps: mps.map(|m| m.into_iter().map(str::to_string).collect()),
                qualify,
                weights: vec![1; nv],
            })
            .collect()
    })
}

#[derive(Debug, Clone)]
struct GenEvent {
    offset_s: i64,
    mp: usize,
    device: usize,
    login: usize,
    /// (experiment slot, variation slot); slot 3 is an unconfigured variation.
    assign: Vec<(usize, usize)>,
    pay: Option<usize>,
    /// Delay in seconds: within half the lateness, or (rarely) far beyond it.
    delay_s: i64,
    /// The `value` field, if any: mostly integers (negative: refunds), a few
    /// malformed (a float, a string, out of range) and nulls.
    value: Option<serde_json::Value>,
}

fn value() -> impl Strategy<Value = Option<serde_json::Value>> {
    prop_oneof![
        6 => Just(None),
        4 => (-3000..10_000i64).prop_map(|v| Some(v.into())),
        1 => (9_999_990..=10_000_000i64).prop_map(|v| Some(v.into())),
        1 => prop::sample::select(vec![
            serde_json::json!(12.5),
            serde_json::json!("12"),
            serde_json::json!(20_000_000),
            serde_json::json!(-10_000_001),
            serde_json::Value::Null,
            serde_json::json!(0),
        ])
        .prop_map(Some),
    ]
}

fn event() -> impl Strategy<Value = GenEvent> {
    (
        0..240i64,
        0..4usize,
        0..2usize,
        0..3usize,
        prop::collection::vec((0..5usize, 0..4usize), 0..3),
        prop::option::of(0..2usize),
        prop_oneof![8 => Just(0i64), 8 => 0..(LATENESS / SEC / 2 - 1), 1 => (3 * LATENESS / SEC)..(4 * LATENESS / SEC)],
        value(),
    )
        .prop_map(|(offset_s, mp, device, login, assign, pay, delay_s, value)| GenEvent {
            offset_s,
            mp,
            device,
            login,
            assign,
            pay,
            delay_s,
            value,
        })
}

#[derive(Debug, Clone)]
struct GenSession {
    tenant: usize,
    id: usize,
    start_s: i64,
    bursts: Vec<Vec<GenEvent>>,
}

fn session() -> impl Strategy<Value = GenSession> {
    (0..2usize, 0..4usize, 0..600i64, prop::collection::vec(prop::collection::vec(event(), 1..7), 1..3))
        .prop_map(|(tenant, id, start_s, bursts)| GenSession { tenant, id, start_s, bursts })
}

/// Builds the arrival-ordered lines of a world.
fn world_lines(experiments: &[Experiment], sessions: &[GenSession]) -> Vec<Vec<u8>> {
    let mut timed: Vec<(i64, usize, Vec<u8>)> = Vec::new();
    // Bursts of one id are > 2 × gap + lateness apart (SPEC §4 test data).
    let burst_spacing = 2 * GAP + LATENESS + 10 * MIN;
    let mut seq = 0;
    let mut max_arrival = T0;
    // Ids are scoped by tenant; the same id's sessions are placed in distinct
    // time slots so that they never overlap.
    let mut slots: std::collections::HashMap<(usize, usize), i64> = Default::default();
    for s in sessions {
        let tenant = ["t1", "t2"][s.tenant];
        let slot = slots.entry((s.tenant, s.id)).or_default();
        let base = T0 + s.start_s * SEC + *slot * 3 * burst_spacing;
        *slot += 1;
        for (b, burst) in s.bursts.iter().enumerate() {
            for e in burst {
                let ts = base + b as i64 * burst_spacing + e.offset_s * SEC;
                let mut o = serde_json::json!({
                    "ts": ts, "tenant": tenant, "session": format!("s{}", s.id),
                    "mp": MPS[e.mp], "device": DEVICES[e.device],
                });
                if let Some(l) = LOGINS[e.login] {
                    o["login"] = l.into();
                }
                let mine: Vec<&Experiment> = experiments.iter().filter(|x| x.tenant == tenant).collect();
                let mut assign = serde_json::Map::new();
                for &(xs, vs) in &e.assign {
                    match mine.get(xs) {
                        Some(x) => {
                            let v = x.variations.get(vs).copied().unwrap_or(999_999);
                            assign.insert(x.id.to_string(), v.into());
                        }
                        None => {
                            assign.insert("424242".into(), 1.into());
                        }
                    }
                }
                if !assign.is_empty() {
                    o["assign"] = assign.into();
                }
                if let Some(v) = &e.value {
                    o["value"] = v.clone();
                }
                if let Some(p) = e.pay {
                    let pay = ["x", "y"][p];
                    o["attrs"] = serde_json::json!({ "pay": pay });
                }
                let arrival = ts + e.delay_s * SEC;
                max_arrival = max_arrival.max(arrival);
                timed.push((arrival, seq, serde_json::to_vec(&o).unwrap()));
                seq += 1;
            }
        }
    }
    // A steady clock of other traffic moves the watermark (unknown tenant).
    let mut t = T0;
    while t <= max_arrival + MIN {
        timed.push((t, seq, format!(r#"{{"ts":{t},"tenant":"zz","session":"tick","mp":"a"}}"#).into_bytes()));
        seq += 1;
        t += 30 * SEC;
    }
    timed.sort_by_key(|(arrival, seq, _)| (*arrival, *seq));
    timed.into_iter().map(|(_, _, l)| l).collect()
}

fn config(experiments: Vec<Experiment>) -> Config {
    Config {
        engine: EngineConfig {
            dc: "dc1".into(),
            allowed_lateness_ms: LATENESS,
            session_gap_ms: GAP,
            trigger_ms: 60_000,
            ttl_s: 86_400,
            stall_factor: 10,
            max_future_ms: 5 * 60_000,
        },
        experiments,
        kafka: Vec::new(),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 160, ..ProptestConfig::default() })]

    #[test]
    fn engine_matches_reference_in_any_arrival_order(
        experiments in experiments(),
        sessions in prop::collection::vec(session(), 1..8),
    ) {
        let c = config(experiments);
        let lines = world_lines(&c.experiments, &sessions);
        let expected = reference(&c, &lines);
        for threads in [1, 2, 4] {
            let got = engine_totals(&c, &lines, threads);
            let d = diff(&expected, &got);
            prop_assert!(d.is_empty(), "threads={}: {:#?}", threads, d);
        }
    }

    #[test]
    fn arrival_order_within_lateness_does_not_change_totals(
        experiments in experiments(),
        sessions in prop::collection::vec(session(), 1..6),
        seed in any::<u64>(),
    ) {
        // Same events, two different random delays within the lateness.
        let c = config(experiments);
        let mut in_order = sessions.clone();
        for s in &mut in_order {
            for b in &mut s.bursts {
                for e in b.iter_mut() {
                    e.delay_s = if e.delay_s >= 3 * LATENESS / SEC { e.delay_s } else { 0 };
                }
            }
        }
        let mut shuffled = sessions;
        let mut x = seed | 1;
        for s in &mut shuffled {
            for b in &mut s.bursts {
                for e in b.iter_mut() {
                    if e.delay_s < 3 * LATENESS / SEC {
                        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                        e.delay_s = (x % (LATENESS as u64 / SEC as u64 / 2 - 1)) as i64;
                    }
                }
            }
        }
        let a = engine_totals(&c, &world_lines(&c.experiments, &in_order), 2);
        let b = engine_totals(&c, &world_lines(&c.experiments, &shuffled), 2);
        prop_assert!(diff(&a, &b).is_empty(), "{:#?}", diff(&a, &b));
    }

    #[test]
    fn parser_never_panics_on_bytes(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = expmon::event::parse_event(&bytes, None, &mut Default::default());
        let _ = expmon::event::parse_event(&bytes, Some(T0), &mut Default::default());
    }

    #[test]
    fn parser_never_panics_on_json_like_text(
        s in r#"\{("(ts|tenant|session|mp|device|login|assign|attrs|x)":(-?[0-9]{1,20}|"[a-z0-9\\"]{0,5}"|null|true|\{("[0-9a-z]{0,3}":(-?[0-9]{1,20}|"[a-z]{0,3}"|null|1\.5),?){0,3}\}|\[\]),?){0,9}\}"#
    ) {
        let _ = expmon::event::parse_event(s.as_bytes(), None, &mut Default::default());
    }
}
