//! The Kafka source end to end, against a real Kafka-protocol broker (Tansu,
//! `tests/common/broker.rs`): `expmon gen` produces to an 8-partition topic,
//! `expmon run` consumes it in a consumer group into a file sink, and the
//! final totals are compared with the reference computation of SPEC §3.
//!
//! A Kafka source never ends, so each run is stopped with SIGTERM once its
//! health points (written every trigger) show that it has read every event.

mod common;

use common::broker::Broker;
use common::runs::*;
use common::*;
use std::time::{Duration, Instant};

#[test]
fn replay_through_an_8_partition_topic_equals_the_reference() {
    let (broker, dir) = (Broker::start(), Expmon::with_demo_config());
    let lines = dir.events(11, 40_000);
    dir.produce(&broker, "events", &lines);
    let options = "group=g1&dead_letter=bad-events&statistics.interval.ms=500";
    let mut run = dir.consume_with(&broker, "events", options, "out.jsonl");
    run.wait_for_events(lines.len() as i64);
    let log = run.stop();
    let config = dir.config();
    assert_totals(&reference(&config, &lines), &run.totals(&config.engine.dc));
    for p in 0..8 {
        assert!(log.contains(&format!("partition events/{p} assigned")), "{log}");
    }
    assert!(run.health("late_dropped").0 > 0, "the data has late events");
    let text = std::fs::read_to_string(&run.out).unwrap();
    assert!(text.contains(r#""name":"expmon.kafka_consumer_lag","tags":{"dc":"dc1","instance":"#), "lag is reported");

    // Every refused message is in the dead-letter topic, with its origin.
    let rejected = run.health("events_rejected").0;
    assert!(rejected > 0, "the data has malformed lines");
    let copies = broker.read_topic("bad-events", rejected as usize);
    assert_eq!(copies.len() as i64, rejected);
    for (payload, headers) in &copies {
        let origin = headers.get("expmon.offset").and_then(|o| o.parse::<usize>().ok());
        assert!(origin.is_some() && headers.contains_key("expmon.partition"), "{headers:?}");
        assert!(headers.get("expmon.topic").is_some_and(|t| t == "events"), "{headers:?}");
        assert!(headers.get("expmon.reason").is_some_and(|r| !r.is_empty()), "{headers:?}");
        assert!(lines.contains(payload), "a copy is the original message");
    }
}

#[test]
fn a_killed_consumer_resumes_from_committed_offsets() {
    let (broker, dir) = (Broker::start(), Expmon::with_demo_config());
    // Two batches a day apart: no session or minute spans them, so a restart
    // with empty state (no checkpoint) is exact.
    let first = dir.events(21, 15_000);
    let second = shifted(&dir.events(22, 15_000), 86_400_000);
    dir.produce(&broker, "events", &first);
    let mut run1 = dir.consume(&broker, "events", "g1", "out1.jsonl");
    run1.wait_for_events(first.len() as i64);
    run1.kill();
    dir.produce(&broker, "events", &second);
    let mut run2 = dir.consume(&broker, "events", "g1", "out2.jsonl");
    run2.wait_for_events(second.len() as i64);
    run2.stop();
    // Run 2 read exactly the second batch: nothing skipped, nothing re-read.
    assert_eq!(run2.health("events_in").0, second.len() as i64);
    let config = dir.config();
    let all: Vec<Vec<u8>> = first.iter().chain(&second).cloned().collect();
    let mut got = run1.totals(&config.engine.dc);
    got.extend(run2.totals(&config.engine.dc));
    assert_totals(&reference(&config, &all), &got);

    // A third run in the group, after a graceful stop, has nothing to read:
    // once it holds every partition (so it could read), and has had time to
    // fetch from the committed offsets, it has read nothing.
    let mut run3 = dir.consume(&broker, "events", "g1", "out3.jsonl");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(0..8).all(|p| run3.log().contains(&format!("partition events/{p} assigned"))) {
        assert!(Instant::now() < deadline, "run 3 was not assigned every partition in 60 s:\n{}", run3.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(3));
    run3.stop();
    assert_eq!(run3.health("events_in").0, 0, "run 2:\n{}\nrun 3:\n{}", run2.log(), run3.log());
}

#[test]
fn two_instances_in_one_group_split_the_partitions() {
    let (broker, dir) = (Broker::start(), Expmon::with_demo_config());
    dir.produce(&broker, "events", &[]); // creates the topic
    let mut a = dir.consume(&broker, "events", "g1", "a.jsonl");
    let mut b = dir.consume(&broker, "events", "g1", "b.jsonl");
    // Wait until the group has settled with both members.
    let deadline = Instant::now() + Duration::from_secs(60);
    let held = |c: &Consumer| {
        let log = c.log();
        (0..8)
            .filter(|p| {
                let (on, off) = (format!("events/{p} assigned"), format!("events/{p} revoked"));
                log.matches(&on).count() > log.matches(&off).count()
            })
            .count()
    };
    while !(held(&a) > 0 && held(&b) > 0 && held(&a) + held(&b) == 8) {
        assert!(Instant::now() < deadline, "no split in 60 s:\n{}\n{}", a.log(), b.log());
        std::thread::sleep(Duration::from_millis(200));
    }
    let lines = dir.events(31, 30_000);
    dir.produce(&broker, "events", &lines);
    let deadline = Instant::now() + Duration::from_secs(90);
    while a.health("events_in").0 + b.health("events_in").0 < lines.len() as i64 {
        assert!(Instant::now() < deadline, "the two instances did not read every event");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (na, nb) = (a.health("events_in").0, b.health("events_in").0);
    assert!(na > 0 && nb > 0, "both instances read: {na} and {nb}");
    assert_eq!(na + nb, lines.len() as i64, "each event read once");
    a.wait_for_events(na);
    b.wait_for_events(nb);
    a.stop();
    b.stop();
    // Sessions are keyed to partitions, so each instance holds whole sessions:
    // summing the two instances' totals (as a UI summing over an instance
    // tag would) gives the reference.
    let config = dir.config();
    let mut sum = a.totals(&config.engine.dc);
    for (k, v) in b.totals(&config.engine.dc) {
        *sum.entry(k).or_default() += v;
    }
    sum.retain(|_, v| *v != 0);
    assert_totals(&reference(&config, &lines), &sum);
}

#[test]
fn the_broker_going_away_mid_run_is_survived() {
    let (broker, dir) = (Broker::start(), Expmon::with_demo_config());
    let lines = dir.events(41, 30_000);
    let (first, second) = lines.split_at(15_000);
    dir.produce(&broker, "events", first);
    let mut run = dir.consume(&broker, "events", "g1", "out.jsonl");
    run.wait_for_events(first.len() as i64);
    broker.cut();
    std::thread::sleep(Duration::from_secs(3));
    broker.restore();
    dir.produce(&broker, "events", second);
    run.wait_for_events(lines.len() as i64);
    run.stop();
    let config = dir.config();
    assert_totals(&reference(&config, &lines), &run.totals(&config.engine.dc));
}

#[test]
fn an_unreachable_broker_or_missing_topic_is_one_clear_line() {
    let dir = Expmon::with_demo_config();
    // `expmon run` on `source` fails with one line, returned.
    let fails = |source: &str| {
        let out = dir.output(&["run", "--config", "demo.toml", "--source", source, "--sink", "null"]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert!(!out.status.success());
        assert_eq!(err.trim().lines().count(), 1, "{err}");
        err
    };
    let port = free_port();
    let err = fails(&format!("kafka://127.0.0.1:{port}/events"));
    assert!(err.contains(&format!("cannot reach Kafka at 127.0.0.1:{port}")), "{err}");

    let broker = Broker::start();
    let err = fails(&format!("kafka://{}/nope", broker.addr()));
    assert!(err.contains("no topic \"nope\"") || err.contains("no usable topic \"nope\""), "{err}");
}
