//! Finalization follows event time (SPEC §4): a replay far faster than real
//! time writes and forgets each minute once the watermark passes it, so what
//! it holds follows the lateness window, not the run's length. And health
//! points cost little (SPEC §6): an idle run writes few per trigger, a change
//! is still written, and `/metrics` keeps every figure.

mod common;

use common::*;
use expmon::config::{Catalog, Config};
use expmon::gen::{Generator, Profile, REPLAY_START_MS};
use expmon::names::Names;
use expmon::shard::{run, RunOptions};
use expmon::sink::FileSink;
use expmon::source::{Fill, LineBatch, Source, SourceId, SourceKind};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// `n` events of `profile` traffic at `rate` events per second of event time.
fn replay_lines(mut profile: Profile, rate: f64, n: usize) -> Vec<Vec<u8>> {
    profile.event_time_rate = rate;
    let mut g = Generator::new(profile, 7, REPLAY_START_MS);
    (0..n)
        .map(|_| {
            let mut l = Vec::new();
            g.next_line(&mut l);
            l
        })
        .collect()
}

/// What broke: minutes became final only at the processing-time trigger, so
/// a replay faster than real time held every minute it had read until the end
/// (a replay of an hour held 19.2M points).
#[test]
fn a_replay_of_four_hours_holds_what_one_hour_holds_and_every_total_stays_exact() {
    let config = Config::demo();
    // 5 events per second of event time: 18,000 an hour.
    let hour = replay_lines(Profile::demo(), 5.0, 18_000);
    let four = replay_lines(Profile::demo(), 5.0, 4 * 18_000);
    let (_, one_hour) = run_engine(&config, &hour, 2);
    let expected = reference(&config, &four);
    for threads in [1, 3] {
        let (points, summary) = run_engine(&config, &four, threads);
        let d = diff(&expected, &final_totals(&points, &config.engine.dc));
        assert!(d.is_empty(), "threads={threads}: {d:#?}");
        let w = &summary.writer;
        // The default trigger (60 s) never fires in this replay: the flushes
        // are the event-time ones, at most one per source fill (256 KiB here,
        // ~7 minutes of this sparse traffic).
        assert!(w.flushes >= 20, "threads={threads}: {} flushes", w.flushes);
        assert!(
            w.peak_points <= one_hour.writer.peak_points * 3 / 2,
            "threads={threads}: 4 hours held {} points at once, 1 hour {}",
            w.peak_points,
            one_hour.writer.peak_points
        );
        assert!(
            w.peak_state_sessions <= one_hour.writer.peak_state_sessions * 3 / 2,
            "threads={threads}: 4 hours held {} sessions, 1 hour {}",
            w.peak_state_sessions,
            one_hour.writer.peak_state_sessions
        );
        let distinct: std::collections::BTreeSet<_> =
            points.iter().map(|p| (&p.name, &p.device, &p.login, p.timestamp)).collect();
        assert!(w.peak_points * 4 < distinct.len() as u64, "{} held of {}", w.peak_points, distinct.len());
    }
}

/// Plays a script of fills: `Some(lines)` is one fill, `None` the end.
struct Script {
    fills: std::vec::IntoIter<Vec<Vec<u8>>>,
}

impl Source for Script {
    fn fill(&mut self, batch: &mut LineBatch) -> std::io::Result<Fill> {
        batch.clear();
        let Some(lines) = self.fills.next() else { return Ok(Fill::End) };
        for l in &lines {
            batch.push_line(l);
        }
        Ok(Fill::Lines)
    }
    fn is_live(&self) -> bool {
        false
    }
    fn describe(&self) -> String {
        "script".into()
    }
    fn identity(&self) -> SourceId {
        SourceId { kind: SourceKind::Stdin, name: "script".into(), group: String::new(), file: None }
    }
}

/// What broke: every flush rewrote every experiment's health points (~25
/// each): with 1,000 experiments and a 1 s trigger an idle run's file grew by
/// 1.3 MB/s.
#[test]
fn an_idle_run_of_the_peak_config_writes_few_health_points_per_trigger_and_still_writes_a_change() {
    // The config `expmon gen --profile peak --write-config` writes.
    let profile = Profile::peak();
    let config = Config::parse(&profile.config_toml(), "peak.toml").unwrap();
    let x = config.experiments.iter().find(|x| x.tenant == "uswm").unwrap().clone();
    let busy = replay_lines(profile, 60_000.0, 5_000);
    let change =
        ev(REPLAY_START_MS + 60_000, "a-new-session", "home_page", "desktop", "in", &[(x.id, x.variations[0])]);
    // A trigger of zero flushes after every fill: one busy fill, 30 idle, one
    // that changes experiment x, 5 idle, the end.
    let mut fills = vec![busy];
    fills.extend((0..30).map(|_| Vec::new()));
    fills.push(vec![change]);
    fills.extend((0..5).map(|_| Vec::new()));
    let catalog = Arc::new(Catalog::build(&config, Arc::new(Names::default())).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out.jsonl");
    let sink = FileSink::create(out.to_str().unwrap()).unwrap();
    let mut opts = RunOptions::new(&catalog, 2);
    opts.trigger = Duration::ZERO;
    let published = Arc::new(expmon::serve::Published::default());
    opts.published = Some(published.clone());
    let source = Script { fills: fills.into_iter() };
    let summary = run(catalog, Box::new(source), Box::new(sink), opts).unwrap();

    // Health lines of the file sink, per write (one timestamp each is not
    // guaranteed, so count them in file order against the summary).
    let text = std::fs::read_to_string(&out).unwrap();
    let mut experiment_lines = 0u64;
    let mut engine_lines = 0u64;
    let mut keys = std::collections::BTreeSet::new();
    let mut assigned_x = Vec::new();
    let x_id = x.id.to_string();
    let mut totals_x: BTreeMap<(String, i64, String), i64> = BTreeMap::new();
    for l in text.lines() {
        let v: serde_json::Value = serde_json::from_str(l).unwrap();
        let name = v["name"].as_str().unwrap().to_string();
        if name.starts_with("expmon.experiment.") {
            experiment_lines += 1;
            keys.insert((name.clone(), v["tags"].to_string()));
            if name == "expmon.experiment.assigned_sessions" && v["tags"]["experiment"].as_str() == Some(x_id.as_str())
            {
                assigned_x.push(v["value"].as_i64().unwrap());
            }
        } else if name.starts_with("expmon.") {
            engine_lines += 1;
        } else if x.variations.iter().any(|var| name == format!("uswm.session.assigned.{var}")) {
            let key = (name, v["timestamp"].as_i64().unwrap(), v["tags"].to_string());
            totals_x.insert(key, v["value"].as_i64().unwrap());
        }
    }
    let w = &summary.writer;
    assert_eq!(w.health_points_written, experiment_lines + engine_lines);
    assert!(w.health_writes >= 37, "{} health writes", w.health_writes);
    let full = keys.len() as u64;
    assert!(full >= 1_000, "the busy fill gives most experiments health points: {full}");
    // The first trigger writes every point; after it, only changes and a
    // full rewrite every REWRITE_TRIGGERS triggers (before: `full` each).
    let rewrites = w.health_writes / expmon::health::REWRITE_TRIGGERS + 1;
    assert!(
        experiment_lines <= full * (rewrites + 2),
        "{experiment_lines} experiment health lines in {} writes of {full}",
        w.health_writes
    );
    let per_trigger = (experiment_lines + engine_lines - full) / (w.health_writes - 1);
    assert!(per_trigger * 5 < full, "{per_trigger} health points per trigger after the first, of {full}");
    // The engine's own figures: once per trigger, never more.
    let engine_per_write = engine_lines / w.health_writes;
    assert!(engine_per_write < 100, "{engine_per_write} expmon.* points per trigger");
    // The change is written, and its last value is the sessions assigned.
    let assigned: i64 = totals_x.values().sum();
    assert_eq!(assigned_x.last().copied(), Some(assigned), "{assigned_x:?}");
    assert!(assigned_x.windows(2).any(|w| w[1] == w[0] + 1), "the new session was written: {assigned_x:?}");
    // `/metrics` shows every figure of the last trigger, not only those written.
    let shown = published.health.lock().unwrap();
    let shown_experiment = shown.points.iter().filter(|p| p.name.starts_with("expmon.experiment.")).count() as u64;
    assert_eq!(shown_experiment, full);
}
