//! Experiment health signals through the whole engine: data built to trigger
//! each signal, and data that must not. The signals are read from the
//! `expmon.experiment.*` points of a file sink (their last values).

mod common;

use common::*;
use expmon::config::{Catalog, Config};
use expmon::names::Names;
use expmon::shard::{run, RunOptions};
use expmon::sink::FileSink;
use expmon::source::FileSource;
use std::collections::BTreeMap;
use std::sync::Arc;

const CONFIG: &str = r#"
[engine]
allowed_lateness = "2m"
session_gap = "30m"

[[experiment]]   # fair 50/50
id = 1
tenant = "uswm"
variations = [11, 12]

[[experiment]]   # 60/40 against an equal split
id = 2
tenant = "uswm"
variations = [21, 22]

[[experiment]]   # 70/30 on mobile, 30/70 on desktop: fair overall
id = 3
tenant = "uswm"
variations = [31, 32]

[[experiment]]   # 90/10 as configured
id = 4
tenant = "uswm"
variations = [41, 42]
weights = [90, 10]

[[experiment]]   # assignments stop after minute 14 while the others go on
id = 5
tenant = "uswm"
variations = [51, 52]
qualify = [ { mp = "cart" } ]
"#;

const T0: i64 = 1_767_225_600_000;
const MIN: i64 = 60_000;

/// Last value of each `expmon.experiment.*` point: (name, sorted tags) → value.
type Signals = BTreeMap<(String, Vec<(String, String)>), f64>;

fn run_signals(lines: &[Vec<u8>]) -> Signals {
    let config = Config::parse(CONFIG, "test.toml").unwrap();
    let catalog = Arc::new(Catalog::build(&config, Arc::new(Names::default())).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let text = jsonl(lines);
    let source = FileSource::from_reader(Box::new(std::io::Cursor::new(text)), "test".into());
    let sink = FileSink::create(out.to_str().unwrap()).unwrap();
    let opts = RunOptions::new(&catalog, 2);
    run(catalog, Box::new(source), Box::new(sink), opts).unwrap();
    let mut signals = Signals::new();
    for l in std::fs::read_to_string(&out).unwrap().lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let name = v["name"].as_str().unwrap();
        if let Some(short) = name.strip_prefix("expmon.experiment.") {
            let tags = v["tags"]
                .as_object()
                .unwrap()
                .iter()
                .filter(|(k, _)| *k != "instance" && *k != "dc" && *k != "tenant")
                .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
                .collect();
            signals.insert((short.to_string(), tags), v["value"].as_f64().unwrap());
        }
    }
    signals
}

fn get(s: &Signals, name: &str, tags: &[(&str, &str)]) -> Option<f64> {
    let mut t: Vec<(String, String)> = tags.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    t.sort();
    s.get(&(name.to_string(), t)).copied()
}

fn srm_state(s: &Signals, x: &str, device: &str, login: &str) -> Option<f64> {
    get(s, "srm_state", &[("experiment", x), ("device", device), ("login", login)])
}

/// 20 minutes of sessions, `per_minute` new ones each minute; `assign`
/// chooses the assignments of session `i` of minute `m` on `device`.
fn traffic(per_minute: usize, assign: impl Fn(i64, usize, &str) -> Vec<(u64, i64)>) -> Vec<Vec<u8>> {
    let mut lines = Vec::new();
    for m in 0..20 {
        for i in 0..per_minute {
            let device = if i % 2 == 0 { "mobile" } else { "desktop" };
            let ts = T0 + m * MIN + (i as i64 * 50_000 / per_minute as i64);
            let session = format!("s{m}-{i}");
            let a = assign(m, i, device);
            lines.push(ev(ts, &session, "home_page", device, "in", &a));
            lines.push(ev(ts + 1000, &session, "cart", device, "in", &[]));
        }
    }
    lines
}

#[test]
fn each_signal_fires_on_data_built_for_it_and_not_on_fair_data() {
    let lines = traffic(200, |m, i, device| {
        let mut a = vec![(1, if i % 4 < 2 { 11 } else { 12 })]; // fair, and fair per device
        a.push((2, if i % 10 < 6 { 21 } else { 22 }));
        let mobile = device == "mobile";
        let k = (i / 2) % 10;
        a.push((3, if (k < 7) == mobile { 31 } else { 32 }));
        a.push((4, if (i / 2) % 10 == 9 { 42 } else { 41 }));
        if m < 15 {
            a.push((5, if i % 4 < 2 { 51 } else { 52 }));
        }
        a
    });
    let s = run_signals(&lines);
    // Fair and as-configured splits: no SRM, overall or per segment.
    for x in ["1", "4"] {
        assert_eq!(srm_state(&s, x, "all", "all"), Some(0.0), "experiment {x}: {s:#?}");
        assert_eq!(srm_state(&s, x, "mobile", "in"), Some(0.0));
        assert_eq!(srm_state(&s, x, "desktop", "in"), Some(0.0));
    }
    // 60/40: alarm everywhere.
    assert_eq!(srm_state(&s, "2", "all", "all"), Some(2.0));
    assert!(get(&s, "srm_pvalue", &[("experiment", "2"), ("device", "all"), ("login", "all")]).unwrap() < 1e-6);
    // Confined to segments: fine overall, alarms in each device.
    assert_eq!(srm_state(&s, "3", "all", "all"), Some(0.0));
    assert_eq!(srm_state(&s, "3", "mobile", "in"), Some(2.0));
    assert_eq!(srm_state(&s, "3", "desktop", "in"), Some(2.0));
    // Stall: experiment 5 stopped assigning while the tenant's traffic went on.
    assert_eq!(get(&s, "stall", &[("experiment", "5"), ("kind", "assigned")]), Some(1.0));
    assert_eq!(get(&s, "stall", &[("experiment", "5"), ("kind", "fm")]), Some(1.0));
    for x in ["1", "2", "3", "4"] {
        assert_eq!(get(&s, "stall", &[("experiment", x), ("kind", "assigned")]), Some(0.0), "experiment {x}");
    }
    // No conflicts: no crossover.
    assert_eq!(get(&s, "crossover_rate", &[("experiment", "1")]), Some(0.0));
    assert_eq!(get(&s, "assigned_sessions", &[("experiment", "1")]), Some(4000.0));
}

#[test]
fn crossover_is_the_share_of_sessions_with_conflicting_assignments() {
    let mut lines = traffic(100, |_, i, _| vec![(1, if i % 2 == 0 { 11 } else { 12 })]);
    // One session in 20 later shows the other variation.
    let mut extra = Vec::new();
    for m in 0..20 {
        for i in (0..100).step_by(20) {
            let ts = T0 + m * MIN + i as i64 * 500 + 2000;
            let other = if i % 2 == 0 { 12 } else { 11 };
            extra.push(ev(ts, &format!("s{m}-{i}"), "search", "mobile", "in", &[(1, other)]));
        }
    }
    lines.extend(extra);
    lines.sort_by_key(|l| serde_json::from_slice::<serde_json::Value>(l).unwrap()["ts"].as_i64().unwrap());
    let s = run_signals(&lines);
    let rate = get(&s, "crossover_rate", &[("experiment", "1")]).unwrap();
    assert!((rate - 0.05).abs() < 1e-9, "crossover {rate}");
    assert_eq!(srm_state(&s, "1", "all", "all"), Some(0.0));
}

#[test]
fn a_tenant_wide_pause_is_not_a_stall() {
    // Every experiment stops together after minute 14: no traffic, no stall.
    let lines = traffic(200, |m, i, _| if m < 15 { vec![(1, 11 + (i % 2) as i64), (5, 51)] } else { vec![] });
    let s = run_signals(&lines);
    for x in ["1", "5"] {
        assert_eq!(get(&s, "stall", &[("experiment", x), ("kind", "assigned")]), Some(0.0), "experiment {x}");
    }
}
