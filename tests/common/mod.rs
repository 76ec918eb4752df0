//! Shared test support: the reference computation of SPEC §3 and helpers that
//! run the engine in-process or as the real binary.
//!
//! The reference is deliberately plain: parse every line with `serde_json::Value`,
//! replay the watermark in arrival order to drop late events, group the kept
//! events by (tenant, session), split a session where two consecutive events are
//! more than `session_gap` apart (test data keeps gaps far from that bound, SPEC
//! §4), and evaluate each metric's definition directly. No streaming, no
//! retractions, no code shared with the engine beyond the `Config` type.
//! Totals are summed in `i128` and clamped to `i64` at the end (SPEC §3).

#![allow(dead_code)]

pub mod broker;
pub mod harness;
pub mod kairos_server;
pub mod runs;

#[allow(unused_imports)]
pub use harness::{free_port, lines_of, send_signal, Cmd, Expmon, Running, BIN};

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use expmon::config::{Catalog, Condition, Config};
use expmon::names::Names;
use expmon::shard::{run, RunOptions};
use expmon::sink::{MemorySink, RenderedPoint};
use expmon::source::FileSource;

/// A point's identity: (metric name, device, login, minute timestamp).
pub type PointId = (String, String, String, i64);

/// Final non-zero totals.
pub type Totals = BTreeMap<PointId, i64>;

#[derive(Debug, Clone)]
struct RefEvent {
    ts: i64,
    tenant: String,
    session: String,
    mp: String,
    device: String,
    login: String,
    assign: BTreeMap<u64, i64>,
    attrs: BTreeMap<String, String>,
    value: i64,
}

/// Validity per SPEC §1, written independently of the engine's parser.
fn ref_parse(line: &[u8]) -> Option<RefEvent> {
    let text = std::str::from_utf8(line).ok()?;
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    let o = v.as_object()?;
    let get = |k: &str| o.get(k).filter(|v| !v.is_null());
    let s = |k: &str, max: usize, default: Option<&str>| -> Option<Option<String>> {
        match get(k) {
            None => Some(default.map(str::to_string)),
            Some(v) => {
                let s = v.as_str()?;
                if s.is_empty() || s.len() > max {
                    return None;
                }
                Some(Some(s.to_string()))
            }
        }
    };
    let ts = get("ts")?.as_i64()?;
    if get("ts")?.is_f64() || ts < 946_684_800_000 {
        return None;
    }
    let tenant = s("tenant", 64, None)??;
    let session = s("session", 256, None)??;
    let mp = s("mp", 64, None)??;
    let device = s("device", 64, Some("unknown"))??;
    let login = s("login", 64, Some("unknown"))??;
    let mut assign = BTreeMap::new();
    if let Some(a) = get("assign") {
        let a = a.as_object()?;
        for (k, v) in a {
            if k.is_empty() || !k.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            if v.is_null() {
                continue;
            }
            if v.is_f64() {
                return None;
            }
            let var = v.as_i64().or_else(|| v.as_u64().map(|_| i64::MIN))?;
            assign.insert(k.parse::<u64>().unwrap_or(u64::MAX), var);
        }
        if assign.len() > 64 {
            return None;
        }
    }
    let mut attrs = BTreeMap::new();
    if let Some(a) = get("attrs") {
        for (k, v) in a.as_object()? {
            if v.is_null() {
                continue;
            }
            attrs.insert(k.clone(), v.as_str()?.to_string());
        }
        if attrs.len() > 64 {
            return None;
        }
    }
    // SPEC §1: an integer (no fraction, no exponent) with abs <= 10^7; absent/null = 0.
    let value = match get("value") {
        None => 0,
        Some(v) if v.is_i64() || v.is_u64() => v.as_i64().filter(|x| x.abs() <= 10_000_000)?,
        Some(_) => return None,
    };
    Some(RefEvent { ts, tenant, session, mp, device, login, assign, attrs, value })
}

fn minute(ts: i64) -> i64 {
    ts - ts.rem_euclid(60_000)
}

fn key(e: &RefEvent) -> (i64, &[u8], &[u8]) {
    (e.ts, e.device.as_bytes(), e.login.as_bytes())
}

fn meets(c: &Condition, e: &RefEvent) -> bool {
    c.mp.as_ref().is_none_or(|m| *m == e.mp)
        && c.device.as_ref().is_none_or(|d| *d == e.device)
        && c.login.as_ref().is_none_or(|l| *l == e.login)
        && c.attrs.iter().all(|(k, v)| e.attrs.get(k) == Some(v))
}

/// The least event of `events` by SPEC order.
fn first<'a>(events: impl Iterator<Item = &'a RefEvent>) -> Option<&'a RefEvent> {
    events.min_by(|a, b| key(a).cmp(&key(b)))
}

/// Final totals per SPEC §3–4 for `lines` in arrival order.
pub fn reference(config: &Config, lines: &[Vec<u8>]) -> Totals {
    let lateness = config.engine.allowed_lateness_ms;
    let gap = config.engine.session_gap_ms;
    // 1. Parse and drop late events, in arrival order.
    let mut max_ts: Option<i64> = None;
    let mut kept = Vec::new();
    // SPEC §1: a ts after the wall clock + max_future is invalid (replays too).
    let latest = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
        + config.engine.max_future_ms;
    for line in lines {
        let Some(e) = ref_parse(line).filter(|e| e.ts <= latest) else { continue };
        if let Some(m) = max_ts {
            if e.ts < m - lateness {
                continue;
            }
        }
        max_ts = Some(max_ts.map_or(e.ts, |m| m.max(e.ts)));
        kept.push(e);
    }
    // 2. Sessions: by (tenant, session), split on gaps over session_gap.
    let tenants: BTreeSet<&str> = config.experiments.iter().map(|x| x.tenant.as_str()).collect();
    let mut by_id: BTreeMap<(String, String), Vec<RefEvent>> = BTreeMap::new();
    for e in kept.into_iter().filter(|e| tenants.contains(e.tenant.as_str())) {
        by_id.entry((e.tenant.clone(), e.session.clone())).or_default().push(e);
    }
    let mut out = BTreeMap::new();
    for ((tenant, _), mut events) in by_id {
        events.sort_by_key(|e| e.ts);
        let mut start = 0;
        for i in 1..=events.len() {
            if i == events.len() || events[i].ts - events[i - 1].ts > gap {
                session_contributions(config, &tenant, &events[start..i], &mut out);
                start = i;
            }
        }
    }
    out.into_iter()
        .filter(|(_, v)| *v != 0)
        .map(|(k, v)| (k, v.clamp(i64::MIN as i128, i64::MAX as i128) as i64))
        .collect()
}

fn session_contributions(config: &Config, tenant: &str, s: &[RefEvent], out: &mut BTreeMap<PointId, i128>) {
    let dc = &config.engine.dc;
    let _ = dc;
    // A contribution of `amount` at e's minute and tags (counts add 1).
    let mut add = |name: String, e: &RefEvent, amount: i128| {
        *out.entry((name, e.device.clone(), e.login.clone(), minute(e.ts))).or_default() += amount;
    };
    for x in config.experiments.iter().filter(|x| x.tenant == tenant) {
        let carriers: Vec<(&RefEvent, i64)> = s
            .iter()
            .filter_map(|e| e.assign.get(&x.id).filter(|v| x.variations.contains(v)).map(|v| (e, *v)))
            .collect();
        let Some(&(_, v)) = carriers.iter().min_by(|a, b| key(a.0).cmp(&key(b.0)).then(a.1.cmp(&b.1))) else {
            continue;
        };
        let a_ev = first(carriers.iter().filter(|c| c.1 == v).map(|c| c.0)).unwrap();
        let a = a_ev.ts;
        add(format!("{tenant}.session.assigned.{v}"), a_ev, 1);
        let firsts: Option<Vec<i64>> =
            x.qualify.iter().map(|c| s.iter().filter(|e| meets(c, e)).map(|e| e.ts).min()).collect();
        let f = firsts.map(|fs| fs.into_iter().fold(a, i64::max));
        if let Some(f) = f {
            add(format!("{tenant}.session.fm.{v}"), first(s.iter().filter(|e| e.ts >= f)).unwrap(), 1);
        }
        let mps: BTreeSet<String> = match &x.mps {
            Some(list) => list.iter().cloned().collect(),
            None => s.iter().map(|e| e.mp.clone()).collect(),
        };
        for m in &mps {
            let visits_a: Vec<&RefEvent> = s.iter().filter(|e| e.mp == *m && e.ts >= a).collect();
            for e in &visits_a {
                add(format!("{tenant}.visit.assigned.{v}.{m}"), e, 1);
                add(format!("{tenant}.value.assigned.{v}.{m}"), e, e.value as i128);
            }
            if let Some(b) = first(visits_a.iter().copied()) {
                add(format!("{tenant}.visit.assigned.{v}.{m}.beta"), b, 1);
            }
            if let Some(f) = f {
                let mut visits_f: Vec<&RefEvent> = s.iter().filter(|e| e.mp == *m && e.ts >= f).collect();
                for e in &visits_f {
                    add(format!("{tenant}.visit.fm.{v}.{m}"), e, 1);
                    add(format!("{tenant}.value.fm.{v}.{m}"), e, e.value as i128);
                }
                // value_sq: y_k = value(e1) + … + value(e_k) in event order; e_k adds y_k² − y_{k−1}².
                visits_f.sort_by(|a, b| key(a).cmp(&key(b)));
                let mut y: i128 = 0;
                for e in &visits_f {
                    let next = y + e.value as i128;
                    add(format!("{tenant}.value_sq.fm.{v}.{m}"), e, next * next - y * y);
                    y = next;
                }
                if let Some(b) = first(visits_f.iter().copied()) {
                    add(format!("{tenant}.visit.fm.{v}.{m}.beta"), b, 1);
                }
            }
        }
    }
}

/// Final totals from a stream of upserts: the last value of each point, zeros
/// removed. Also checks every upsert carries the config's dc.
pub fn final_totals(points: &[RenderedPoint], dc: &str) -> Totals {
    let mut out = Totals::new();
    for p in points {
        assert_eq!(p.dc, dc, "every point carries the dc tag");
        out.insert((p.name.clone(), p.device.clone(), p.login.clone(), p.timestamp), p.value);
    }
    out.retain(|_, v| *v != 0);
    out
}

/// Runs the engine in-process over `lines` (arrival order) and returns every
/// upsert it wrote, in order.
pub fn run_engine(config: &Config, lines: &[Vec<u8>], threads: usize) -> (Vec<RenderedPoint>, expmon::health::Summary) {
    let mut data = Vec::new();
    for l in lines {
        data.extend_from_slice(l);
        data.push(b'\n');
    }
    let catalog = Arc::new(Catalog::build(config, Arc::new(Names::default())).unwrap());
    let source = FileSource::from_reader(Box::new(std::io::Cursor::new(data)), "test".into());
    let sink = MemorySink::default();
    let points = sink.points.clone();
    let opts = RunOptions::new(&catalog, threads);
    let summary = run(catalog, Box::new(source), Box::new(sink), opts).unwrap();
    let points = points.lock().unwrap().clone();
    (points, summary)
}

/// Final non-zero totals of an in-process run.
pub fn engine_totals(config: &Config, lines: &[Vec<u8>], threads: usize) -> Totals {
    final_totals(&run_engine(config, lines, threads).0, &config.engine.dc)
}

/// Reads a file sink's output into final totals.
pub fn totals_from_jsonl(text: &str, dc: &str) -> Totals {
    let points: Vec<RenderedPoint> = text
        .lines()
        .filter(|l| !l.starts_with(r#"{"name":"expmon."#))
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            RenderedPoint {
                name: v["name"].as_str().unwrap().to_string(),
                dc: v["tags"]["dc"].as_str().unwrap().to_string(),
                device: v["tags"]["device"].as_str().unwrap().to_string(),
                login: v["tags"]["login"].as_str().unwrap().to_string(),
                timestamp: v["timestamp"].as_i64().unwrap(),
                value: v["value"].as_i64().unwrap(),
            }
        })
        .collect();
    final_totals(&points, dc)
}

/// Differences between two totals, for readable assertion messages.
pub fn diff(expected: &Totals, actual: &Totals) -> Vec<String> {
    let mut out = Vec::new();
    for (k, v) in expected {
        match actual.get(k) {
            Some(a) if a == v => {}
            a => out.push(format!("{k:?}: expected {v}, got {a:?}")),
        }
    }
    for (k, a) in actual {
        if !expected.contains_key(k) {
            out.push(format!("{k:?}: expected nothing, got {a}"));
        }
    }
    out.truncate(20);
    out
}

/// Lines joined as a JSON Lines text (each followed by a newline).
pub fn jsonl(lines: &[Vec<u8>]) -> Vec<u8> {
    lines.iter().flat_map(|l| l.iter().copied().chain([b'\n'])).collect()
}

/// Builds one event line.
pub fn ev(ts: i64, session: &str, mp: &str, device: &str, login: &str, assign: &[(u64, i64)]) -> Vec<u8> {
    let mut o =
        serde_json::json!({"ts": ts, "tenant": "uswm", "session": session, "mp": mp, "device": device, "login": login});
    if !assign.is_empty() {
        let a: serde_json::Map<String, serde_json::Value> =
            assign.iter().map(|(x, v)| (x.to_string(), (*v).into())).collect();
        o["assign"] = a.into();
    }
    serde_json::to_vec(&o).unwrap()
}

/// Adds a `value` to an event line.
pub fn with_value(line: Vec<u8>, value: i64) -> Vec<u8> {
    let mut o: serde_json::Value = serde_json::from_slice(&line).unwrap();
    o["value"] = value.into();
    serde_json::to_vec(&o).unwrap()
}

/// Adds attributes to an event line.
pub fn with_attrs(line: Vec<u8>, attrs: &[(&str, &str)]) -> Vec<u8> {
    let mut o: serde_json::Value = serde_json::from_slice(&line).unwrap();
    o["attrs"] = attrs
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect::<serde_json::Map<_, _>>()
        .into();
    serde_json::to_vec(&o).unwrap()
}

/// The whole answer (status line, headers, body) to `GET path` on a loopback
/// port, or "" if nothing listens there (yet).
pub fn http_get(port: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else { return String::new() };
    let _ = write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}
