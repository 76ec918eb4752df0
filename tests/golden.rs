//! Golden tests: the SPEC's worked example and one test per rule of SPEC §3–4,
//! each with hand-computed expected totals, also checked against the reference.

mod common;

use common::*;
use expmon::config::Config;
use expmon::event::Reject;

/// SPEC §2's example config, verbatim (its one copy in the repository; see
/// `src/config/mod.rs`'s tests for how to check it against the SPEC).
const SPEC_CONFIG: &str = include_str!("../src/config/spec_example.toml");

/// 2018-05-03T10:00:00Z.
const T0: i64 = 1_525_341_600_000;
const MIN: i64 = 60_000;
const SEC: i64 = 1_000;

fn config() -> Config {
    Config::parse(SPEC_CONFIG, "spec.toml").unwrap()
}

fn p(name: &str, device: &str, login: &str, minute: i64, value: i64) -> (PointId, i64) {
    ((name.to_string(), device.to_string(), login.to_string(), T0 + minute * MIN), value)
}

/// Runs at 1 and 3 threads; both must equal `expected` and the reference.
fn check(lines: &[Vec<u8>], expected: &[(PointId, i64)]) {
    let c = config();
    let expected: Totals = expected.iter().cloned().collect();
    let reference = reference(&c, lines);
    assert!(
        diff(&expected, &reference).is_empty(),
        "reference disagrees with the hand-computed totals: {:#?}",
        diff(&expected, &reference)
    );
    for threads in [1, 3] {
        let got = engine_totals(&c, lines, threads);
        assert!(diff(&expected, &got).is_empty(), "threads={threads}: {:#?}", diff(&expected, &got));
    }
}

#[test]
fn spec_worked_example() {
    let lines = vec![
        ev(T0 + 5 * SEC, "s1", "home_page", "desktop", "in", &[(123, 1231)]),
        ev(T0 + 2 * MIN + 30 * SEC, "s1", "item_page", "desktop", "in", &[]),
        ev(T0 + 4 * MIN + 10 * SEC, "s1", "item_page", "desktop", "in", &[]),
    ];
    let d = "desktop";
    check(
        &lines,
        &[
            p("uswm.session.assigned.1231", d, "in", 0, 1),
            p("uswm.session.fm.1231", d, "in", 0, 1),
            p("uswm.visit.assigned.1231.home_page", d, "in", 0, 1),
            p("uswm.visit.assigned.1231.home_page.beta", d, "in", 0, 1),
            p("uswm.visit.fm.1231.home_page", d, "in", 0, 1),
            p("uswm.visit.fm.1231.home_page.beta", d, "in", 0, 1),
            p("uswm.visit.assigned.1231.item_page", d, "in", 2, 1),
            p("uswm.visit.assigned.1231.item_page", d, "in", 4, 1),
            p("uswm.visit.assigned.1231.item_page.beta", d, "in", 2, 1),
            p("uswm.visit.fm.1231.item_page", d, "in", 2, 1),
            p("uswm.visit.fm.1231.item_page", d, "in", 4, 1),
            p("uswm.visit.fm.1231.item_page.beta", d, "in", 2, 1),
        ],
    );
}

#[test]
fn session_without_exposure_counts_only_assigned_forms() {
    let lines = vec![
        ev(T0, "s1", "item_page", "desktop", "in", &[(123, 1232)]),
        ev(T0 + MIN, "s1", "checkout", "desktop", "in", &[]),
    ];
    let d = "desktop";
    check(
        &lines,
        &[
            p("uswm.session.assigned.1232", d, "in", 0, 1),
            p("uswm.visit.assigned.1232.item_page", d, "in", 0, 1),
            p("uswm.visit.assigned.1232.item_page.beta", d, "in", 0, 1),
            p("uswm.visit.assigned.1232.checkout", d, "in", 1, 1),
            p("uswm.visit.assigned.1232.checkout.beta", d, "in", 1, 1),
        ],
    );
}

#[test]
fn visits_before_assignment_do_not_count() {
    let lines = vec![
        ev(T0, "s1", "item_page", "mobile", "out", &[]),
        ev(T0 + MIN, "s1", "checkout", "mobile", "out", &[(123, 1231)]),
        ev(T0 + 2 * MIN, "s1", "item_page", "mobile", "out", &[]),
    ];
    let m = "mobile";
    check(
        &lines,
        &[
            p("uswm.session.assigned.1231", m, "out", 1, 1),
            p("uswm.visit.assigned.1231.checkout", m, "out", 1, 1),
            p("uswm.visit.assigned.1231.checkout.beta", m, "out", 1, 1),
            p("uswm.visit.assigned.1231.item_page", m, "out", 2, 1),
            p("uswm.visit.assigned.1231.item_page.beta", m, "out", 2, 1),
        ],
    );
}

#[test]
fn qualification_completed_by_a_later_condition() {
    // 456 needs a mobile event and a PayPal checkout; the second comes later.
    let lines = vec![
        ev(T0, "s1", "home_page", "mobile", "in", &[(456, 4562)]),
        ev(T0 + 2 * MIN, "s1", "cart", "mobile", "in", &[]),
        with_attrs(ev(T0 + 5 * MIN, "s1", "checkout", "mobile", "in", &[]), &[("payment", "paypal")]),
        ev(T0 + 6 * MIN, "s1", "cart", "mobile", "in", &[]),
    ];
    let m = "mobile";
    check(
        &lines,
        &[
            p("uswm.session.assigned.4562", m, "in", 0, 1),
            p("uswm.session.fm.4562", m, "in", 5, 1),
            p("uswm.visit.assigned.4562.home_page", m, "in", 0, 1),
            p("uswm.visit.assigned.4562.home_page.beta", m, "in", 0, 1),
            p("uswm.visit.assigned.4562.cart", m, "in", 2, 1),
            p("uswm.visit.assigned.4562.cart.beta", m, "in", 2, 1),
            p("uswm.visit.assigned.4562.cart", m, "in", 6, 1),
            p("uswm.visit.assigned.4562.checkout", m, "in", 5, 1),
            p("uswm.visit.assigned.4562.checkout.beta", m, "in", 5, 1),
            p("uswm.visit.fm.4562.checkout", m, "in", 5, 1),
            p("uswm.visit.fm.4562.checkout.beta", m, "in", 5, 1),
            p("uswm.visit.fm.4562.cart", m, "in", 6, 1),
            p("uswm.visit.fm.4562.cart.beta", m, "in", 6, 1),
        ],
    );
}

#[test]
fn earlier_exposure_arriving_late_is_retracted_and_recounted() {
    // Exposure at 10:04 arrives first; the real first exposure (10:02) arrives late.
    let lines = vec![
        ev(T0 + MIN, "s1", "item_page", "desktop", "in", &[(123, 1231)]),
        ev(T0 + 3 * MIN, "s1", "item_page", "desktop", "in", &[]),
        ev(T0 + 4 * MIN, "s1", "home_page", "desktop", "in", &[]),
        ev(T0 + 5 * MIN, "s1", "item_page", "desktop", "in", &[]),
        ev(T0 + 2 * MIN, "s1", "home_page", "desktop", "in", &[]),
    ];
    let d = "desktop";
    let expected = [
        p("uswm.session.assigned.1231", d, "in", 1, 1),
        p("uswm.session.fm.1231", d, "in", 2, 1),
        p("uswm.visit.assigned.1231.item_page", d, "in", 1, 1),
        p("uswm.visit.assigned.1231.item_page.beta", d, "in", 1, 1),
        p("uswm.visit.assigned.1231.item_page", d, "in", 3, 1),
        p("uswm.visit.assigned.1231.item_page", d, "in", 5, 1),
        p("uswm.visit.assigned.1231.home_page", d, "in", 2, 1),
        p("uswm.visit.assigned.1231.home_page", d, "in", 4, 1),
        p("uswm.visit.assigned.1231.home_page.beta", d, "in", 2, 1),
        p("uswm.visit.fm.1231.home_page", d, "in", 2, 1),
        p("uswm.visit.fm.1231.home_page", d, "in", 4, 1),
        p("uswm.visit.fm.1231.home_page.beta", d, "in", 2, 1),
        p("uswm.visit.fm.1231.item_page", d, "in", 3, 1),
        p("uswm.visit.fm.1231.item_page.beta", d, "in", 3, 1),
        p("uswm.visit.fm.1231.item_page", d, "in", 5, 1),
    ];
    check(&lines, &expected);
}

#[test]
fn retraction_is_written_as_zero() {
    // With a trigger between the two halves, the old fm point is first written
    // as 1, then corrected to 0 (SPEC §5: a total that falls back to 0 is written).
    let c = config();
    let first = vec![
        ev(T0 + MIN, "s1", "item_page", "desktop", "in", &[(123, 1231)]),
        ev(T0 + 4 * MIN, "s1", "home_page", "desktop", "in", &[]),
    ];
    let late = ev(T0 + 2 * MIN, "s1", "home_page", "desktop", "in", &[]);
    let (points, _) = run_in_two_epochs(&c, &first, &[late]);
    let fm_at_4: Vec<i64> = points
        .iter()
        .filter(|p| p.name == "uswm.session.fm.1231" && p.timestamp == T0 + 4 * MIN)
        .map(|p| p.value)
        .collect();
    assert_eq!(fm_at_4, vec![1, 0]);
}

/// Runs `a`, forces a flush, then runs `b`, all in one engine.
fn run_in_two_epochs(
    c: &Config,
    a: &[Vec<u8>],
    b: &[Vec<u8>],
) -> (Vec<expmon::sink::RenderedPoint>, expmon::health::Summary) {
    use std::sync::Arc;
    // A trigger of zero flushes after every source read; a pipe delivers the
    // two halves in two reads.
    let catalog = Arc::new(expmon::config::Catalog::build(c, Arc::new(expmon::names::Names::default())).unwrap());
    let (r, mut w) = std::io::pipe().unwrap();
    let mut opts = expmon::shard::RunOptions::new(&catalog, 2);
    opts.trigger = std::time::Duration::ZERO;
    let sink = expmon::sink::MemorySink::default();
    let points = sink.points.clone();
    let src = expmon::source::FileSource::from_reader(Box::new(r), "pipe".into());
    let engine = std::thread::spawn(move || expmon::shard::run(catalog, Box::new(src), Box::new(sink), opts).unwrap());
    use std::io::Write;
    w.write_all(&jsonl(a)).unwrap();
    // Wait until the first half has been written out.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while points.lock().unwrap().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    w.write_all(&jsonl(b)).unwrap();
    drop(w);
    let summary = engine.join().unwrap();
    let out = points.lock().unwrap().clone();
    (out, summary)
}

#[test]
fn conflicting_assignments_first_event_wins_and_is_counted() {
    // The 10:01 event (variation 1231) arrives first; the 10:00 one (1232) wins.
    let lines = vec![
        ev(T0 + MIN, "s1", "item_page", "desktop", "out", &[(123, 1231)]),
        ev(T0, "s1", "item_page", "desktop", "out", &[(123, 1232)]),
    ];
    let d = "desktop";
    check(
        &lines,
        &[
            p("uswm.session.assigned.1232", d, "out", 0, 1),
            p("uswm.visit.assigned.1232.item_page", d, "out", 0, 1),
            p("uswm.visit.assigned.1232.item_page", d, "out", 1, 1),
            p("uswm.visit.assigned.1232.item_page.beta", d, "out", 0, 1),
        ],
    );
    let (_, summary) = run_engine(&config(), &lines, 2);
    assert_eq!(summary.shards.conflicts, 1);
}

#[test]
fn tie_at_one_timestamp_goes_to_smaller_variation_and_first_tags() {
    // Same ts: device "desktop" < "mobile" bytewise, so the desktop event is
    // first; between equal keys the smaller variation id wins.
    let lines = vec![
        ev(T0, "s1", "item_page", "mobile", "in", &[(123, 1231)]),
        ev(T0, "s1", "item_page", "desktop", "in", &[(123, 1232)]),
        ev(T0, "s1", "item_page", "desktop", "in", &[(123, 1231)]),
    ];
    check(
        &lines,
        &[
            p("uswm.session.assigned.1231", "desktop", "in", 0, 1),
            p("uswm.visit.assigned.1231.item_page", "desktop", "in", 0, 2),
            p("uswm.visit.assigned.1231.item_page", "mobile", "in", 0, 1),
            p("uswm.visit.assigned.1231.item_page.beta", "desktop", "in", 0, 1),
        ],
    );
}

#[test]
fn mps_filter_and_every_mp_when_omitted() {
    let lines = vec![
        ev(T0, "s1", "cart", "mobile", "in", &[(123, 1231), (456, 4561)]),
        with_attrs(ev(T0 + MIN, "s1", "checkout", "mobile", "in", &[]), &[("payment", "card")]),
    ];
    let m = "mobile";
    check(
        &lines,
        &[
            p("uswm.session.assigned.1231", m, "in", 0, 1),
            p("uswm.visit.assigned.1231.checkout", m, "in", 1, 1),
            p("uswm.visit.assigned.1231.checkout.beta", m, "in", 1, 1),
            p("uswm.session.assigned.4561", m, "in", 0, 1),
            p("uswm.visit.assigned.4561.cart", m, "in", 0, 1),
            p("uswm.visit.assigned.4561.cart.beta", m, "in", 0, 1),
            p("uswm.visit.assigned.4561.checkout", m, "in", 1, 1),
            p("uswm.visit.assigned.4561.checkout.beta", m, "in", 1, 1),
        ],
    );
}

#[test]
fn unknown_experiment_and_variation_are_ignored_and_counted() {
    let lines = vec![
        ev(T0, "s1", "home_page", "desktop", "in", &[(999, 1), (123, 4561)]),
        ev(T0 + MIN, "s1", "home_page", "desktop", "in", &[]),
    ];
    check(&lines, &[]);
    let (_, s) = run_engine(&config(), &lines, 1);
    assert_eq!((s.router.unknown_experiment, s.router.unknown_variation), (1, 1));
}

#[test]
fn event_beyond_the_lateness_is_dropped() {
    let lines = vec![
        ev(T0 + 40 * MIN, "s1", "home_page", "desktop", "in", &[(123, 1231)]),
        // 40 minutes late with 10 minutes allowed: dropped.
        ev(T0, "s2", "home_page", "desktop", "in", &[(123, 1232)]),
    ];
    let d = "desktop";
    check(
        &lines,
        &[
            p("uswm.session.assigned.1231", d, "in", 40, 1),
            p("uswm.session.fm.1231", d, "in", 40, 1),
            p("uswm.visit.assigned.1231.home_page", d, "in", 40, 1),
            p("uswm.visit.assigned.1231.home_page.beta", d, "in", 40, 1),
            p("uswm.visit.fm.1231.home_page", d, "in", 40, 1),
            p("uswm.visit.fm.1231.home_page.beta", d, "in", 40, 1),
        ],
    );
    let (_, s) = run_engine(&config(), &lines, 1);
    assert_eq!(s.router.late_dropped, 1);
}

#[test]
fn session_resumed_after_a_long_gap_counts_beta_again() {
    let mut lines = vec![ev(T0, "s1", "home_page", "desktop", "in", &[(123, 1231)])];
    // Other traffic moves the watermark on (an unknown tenant counts too).
    for m in (5..=90).step_by(5) {
        let mut tick = ev(T0 + m * MIN, "t", "home_page", "desktop", "in", &[]);
        tick = String::from_utf8(tick).unwrap().replace("\"uswm\"", "\"other_site\"").into_bytes();
        lines.push(tick);
    }
    // 90 minutes later: > 2 × 30m + 10m, so the first session has expired.
    lines.push(ev(T0 + 90 * MIN, "s1", "home_page", "desktop", "in", &[]));
    lines.push(ev(T0 + 91 * MIN, "s1", "home_page", "desktop", "in", &[(123, 1231)]));
    let d = "desktop";
    check(
        &lines,
        &[
            p("uswm.session.assigned.1231", d, "in", 0, 1),
            p("uswm.session.fm.1231", d, "in", 0, 1),
            p("uswm.visit.assigned.1231.home_page", d, "in", 0, 1),
            p("uswm.visit.assigned.1231.home_page.beta", d, "in", 0, 1),
            p("uswm.visit.fm.1231.home_page", d, "in", 0, 1),
            p("uswm.visit.fm.1231.home_page.beta", d, "in", 0, 1),
            // The resumed session: assigned at 91, its 90 visit predates that.
            p("uswm.session.assigned.1231", d, "in", 91, 1),
            p("uswm.session.fm.1231", d, "in", 91, 1),
            p("uswm.visit.assigned.1231.home_page", d, "in", 91, 1),
            p("uswm.visit.assigned.1231.home_page.beta", d, "in", 91, 1),
            p("uswm.visit.fm.1231.home_page", d, "in", 91, 1),
            p("uswm.visit.fm.1231.home_page.beta", d, "in", 91, 1),
        ],
    );
    let (_, s) = run_engine(&config(), &lines, 1);
    assert_eq!(s.shards.sessions_started, 2);
}

#[test]
fn malformed_lines_of_every_reason_are_counted_and_skipped() {
    let good = ev(T0, "s1", "home_page", "desktop", "in", &[(123, 1231)]);
    let base = |rest: &str| format!(r#"{{"ts":{T0},"tenant":"uswm","session":"s","mp":"m"{rest}}}"#).into_bytes();
    let bad: Vec<(Reject, Vec<u8>)> = vec![
        (Reject::NotUtf8, b"{\"ts\":1525341600000,\"tenant\":\"\xff\"}".to_vec()),
        (Reject::NotJson, b"{\"ts\": 15".to_vec()),
        (Reject::NotObject, b"[\"ts\"]".to_vec()),
        (Reject::MissingField, br#"{"ts":1525341600000,"tenant":"uswm","mp":"m"}"#.to_vec()),
        (Reject::WrongType, base(r#","login":true"#)),
        (Reject::BadAssignKey, base(r#","assign":{"-1":3}"#)),
        (Reject::TsOutOfRange, br#"{"ts":5,"tenant":"uswm","session":"s","mp":"m"}"#.to_vec()),
        // Year 2100: a broken clock, refused in a replay too (else it drags W past the last line).
        (Reject::TsFuture, br#"{"ts":4102444800000,"tenant":"uswm","session":"s","mp":"m"}"#.to_vec()),
        (Reject::TooLong, base(&format!(r#","session":"{}""#, "s".repeat(300)))),
        (
            Reject::TooMany,
            base(&format!(
                r#","attrs":{{{}}}"#,
                (0..70).map(|i| format!("\"k{i}\":\"v\"")).collect::<Vec<_>>().join(",")
            )),
        ),
        (Reject::EmptyField, base(r#","device":"""#)),
        (Reject::BadValue, base(r#","value":12.5"#)),
    ];
    assert_eq!(bad.len(), Reject::ALL.len(), "one line per reason");
    let mut lines = vec![good.clone()];
    lines.extend(bad.iter().map(|(_, l)| l.clone()));
    lines.push(ev(T0 + MIN, "s1", "item_page", "desktop", "in", &[]));
    let (_, s) = run_engine(&config(), &lines, 2);
    for (reason, _) in &bad {
        assert_eq!(s.router.rejected[reason.index()], 1, "{reason}");
    }
    assert_eq!(s.router.events_in, lines.len() as u64);
    assert_eq!(s.router.routed, 2);
    let d = "desktop";
    check(
        &lines,
        &[
            p("uswm.session.assigned.1231", d, "in", 0, 1),
            p("uswm.session.fm.1231", d, "in", 0, 1),
            p("uswm.visit.assigned.1231.home_page", d, "in", 0, 1),
            p("uswm.visit.assigned.1231.home_page.beta", d, "in", 0, 1),
            p("uswm.visit.fm.1231.home_page", d, "in", 0, 1),
            p("uswm.visit.fm.1231.home_page.beta", d, "in", 0, 1),
            p("uswm.visit.assigned.1231.item_page", d, "in", 1, 1),
            p("uswm.visit.assigned.1231.item_page.beta", d, "in", 1, 1),
            p("uswm.visit.fm.1231.item_page", d, "in", 1, 1),
            p("uswm.visit.fm.1231.item_page.beta", d, "in", 1, 1),
        ],
    );
}

#[test]
fn value_of_a_purchase_and_its_refund() {
    // Qualified at 10:00; a 50.00 order at 10:02, a 20.00 refund at 10:05.
    let lines = vec![
        ev(T0, "s1", "home_page", "desktop", "in", &[(123, 1231)]),
        with_value(ev(T0 + 2 * MIN, "s1", "checkout", "desktop", "in", &[]), 5000),
        with_value(ev(T0 + 5 * MIN, "s1", "checkout", "desktop", "in", &[]), -2000),
    ];
    let d = "desktop";
    check(
        &lines,
        &[
            p("uswm.session.assigned.1231", d, "in", 0, 1),
            p("uswm.session.fm.1231", d, "in", 0, 1),
            p("uswm.visit.assigned.1231.home_page", d, "in", 0, 1),
            p("uswm.visit.assigned.1231.home_page.beta", d, "in", 0, 1),
            p("uswm.visit.fm.1231.home_page", d, "in", 0, 1),
            p("uswm.visit.fm.1231.home_page.beta", d, "in", 0, 1),
            p("uswm.visit.assigned.1231.checkout", d, "in", 2, 1),
            p("uswm.visit.assigned.1231.checkout", d, "in", 5, 1),
            p("uswm.visit.assigned.1231.checkout.beta", d, "in", 2, 1),
            p("uswm.visit.fm.1231.checkout", d, "in", 2, 1),
            p("uswm.visit.fm.1231.checkout", d, "in", 5, 1),
            p("uswm.visit.fm.1231.checkout.beta", d, "in", 2, 1),
            p("uswm.value.assigned.1231.checkout", d, "in", 2, 5000),
            p("uswm.value.assigned.1231.checkout", d, "in", 5, -2000),
            p("uswm.value.fm.1231.checkout", d, "in", 2, 5000),
            p("uswm.value.fm.1231.checkout", d, "in", 5, -2000),
            // y = 5000, then 3000: 5000² and 3000² − 5000²; they add up to 3000².
            p("uswm.value_sq.fm.1231.checkout", d, "in", 2, 25_000_000),
            p("uswm.value_sq.fm.1231.checkout", d, "in", 5, -16_000_000),
        ],
    );
}

#[test]
fn late_earlier_exposure_moves_f_and_brings_a_purchase_into_the_fm_values() {
    // F is 10:04 until the 10:02 exposure arrives late: the 10:03 purchase then
    // counts for fm, and the 10:05 one's value_sq increment changes from 2000²
    // to 3000² − 1000².
    let lines = vec![
        ev(T0, "s1", "item_page", "desktop", "in", &[(123, 1231)]),
        with_value(ev(T0 + 3 * MIN, "s1", "checkout", "desktop", "in", &[]), 1000),
        ev(T0 + 4 * MIN, "s1", "home_page", "desktop", "in", &[]),
        with_value(ev(T0 + 5 * MIN, "s1", "checkout", "desktop", "in", &[]), 2000),
        ev(T0 + 2 * MIN, "s1", "home_page", "desktop", "in", &[]),
    ];
    let d = "desktop";
    check(
        &lines,
        &[
            p("uswm.session.assigned.1231", d, "in", 0, 1),
            p("uswm.session.fm.1231", d, "in", 2, 1),
            p("uswm.visit.assigned.1231.item_page", d, "in", 0, 1),
            p("uswm.visit.assigned.1231.item_page.beta", d, "in", 0, 1),
            p("uswm.visit.assigned.1231.home_page", d, "in", 2, 1),
            p("uswm.visit.assigned.1231.home_page", d, "in", 4, 1),
            p("uswm.visit.assigned.1231.home_page.beta", d, "in", 2, 1),
            p("uswm.visit.assigned.1231.checkout", d, "in", 3, 1),
            p("uswm.visit.assigned.1231.checkout", d, "in", 5, 1),
            p("uswm.visit.assigned.1231.checkout.beta", d, "in", 3, 1),
            p("uswm.visit.fm.1231.home_page", d, "in", 2, 1),
            p("uswm.visit.fm.1231.home_page", d, "in", 4, 1),
            p("uswm.visit.fm.1231.home_page.beta", d, "in", 2, 1),
            p("uswm.visit.fm.1231.checkout", d, "in", 3, 1),
            p("uswm.visit.fm.1231.checkout", d, "in", 5, 1),
            p("uswm.visit.fm.1231.checkout.beta", d, "in", 3, 1),
            p("uswm.value.assigned.1231.checkout", d, "in", 3, 1000),
            p("uswm.value.assigned.1231.checkout", d, "in", 5, 2000),
            p("uswm.value.fm.1231.checkout", d, "in", 3, 1000),
            p("uswm.value.fm.1231.checkout", d, "in", 5, 2000),
            p("uswm.value_sq.fm.1231.checkout", d, "in", 3, 1_000_000),
            p("uswm.value_sq.fm.1231.checkout", d, "in", 5, 8_000_000),
        ],
    );
}

#[test]
fn late_purchase_in_the_middle_corrects_the_value_sq_increments_after_it() {
    // Purchases of 1.00 at 10:02 and 3.00 at 10:06 arrive; 2.00 at 10:04 (on
    // mobile) arrives late. Running totals 100, 300, 600: the 10:06 increment
    // goes from 400² − 100² to 600² − 300².
    let lines = vec![
        ev(T0, "s1", "home_page", "desktop", "in", &[(123, 1232)]),
        with_value(ev(T0 + 2 * MIN, "s1", "checkout", "desktop", "in", &[]), 100),
        with_value(ev(T0 + 6 * MIN, "s1", "checkout", "desktop", "in", &[]), 300),
        with_value(ev(T0 + 4 * MIN, "s1", "checkout", "mobile", "in", &[]), 200),
    ];
    let (d, m) = ("desktop", "mobile");
    check(
        &lines,
        &[
            p("uswm.session.assigned.1232", d, "in", 0, 1),
            p("uswm.session.fm.1232", d, "in", 0, 1),
            p("uswm.visit.assigned.1232.home_page", d, "in", 0, 1),
            p("uswm.visit.assigned.1232.home_page.beta", d, "in", 0, 1),
            p("uswm.visit.fm.1232.home_page", d, "in", 0, 1),
            p("uswm.visit.fm.1232.home_page.beta", d, "in", 0, 1),
            p("uswm.visit.assigned.1232.checkout", d, "in", 2, 1),
            p("uswm.visit.assigned.1232.checkout", m, "in", 4, 1),
            p("uswm.visit.assigned.1232.checkout", d, "in", 6, 1),
            p("uswm.visit.assigned.1232.checkout.beta", d, "in", 2, 1),
            p("uswm.visit.fm.1232.checkout", d, "in", 2, 1),
            p("uswm.visit.fm.1232.checkout", m, "in", 4, 1),
            p("uswm.visit.fm.1232.checkout", d, "in", 6, 1),
            p("uswm.visit.fm.1232.checkout.beta", d, "in", 2, 1),
            p("uswm.value.assigned.1232.checkout", d, "in", 2, 100),
            p("uswm.value.assigned.1232.checkout", m, "in", 4, 200),
            p("uswm.value.assigned.1232.checkout", d, "in", 6, 300),
            p("uswm.value.fm.1232.checkout", d, "in", 2, 100),
            p("uswm.value.fm.1232.checkout", m, "in", 4, 200),
            p("uswm.value.fm.1232.checkout", d, "in", 6, 300),
            p("uswm.value_sq.fm.1232.checkout", d, "in", 2, 10_000),
            p("uswm.value_sq.fm.1232.checkout", m, "in", 4, 80_000),
            p("uswm.value_sq.fm.1232.checkout", d, "in", 6, 270_000),
        ],
    );
}

#[test]
fn a_contribution_of_zero_creates_no_point_and_bad_values_are_rejected() {
    // A checkout without a value, one with 0 and one with null: counted
    // visits, but no value point is ever written, not even a 0.
    let lines = vec![
        ev(T0, "s1", "home_page", "desktop", "in", &[(123, 1231)]),
        ev(T0 + MIN, "s1", "checkout", "desktop", "in", &[]),
        with_value(ev(T0 + 2 * MIN, "s1", "checkout", "desktop", "in", &[]), 0),
        String::from_utf8(ev(T0 + 3 * MIN, "s1", "checkout", "desktop", "in", &[]))
            .unwrap()
            .replace('}', r#","value":null}"#)
            .into_bytes(),
        // Malformed values: the whole event is rejected by reason.
        String::from_utf8(ev(T0 + 4 * MIN, "s1", "checkout", "desktop", "in", &[]))
            .unwrap()
            .replace('}', r#","value":"12"}"#)
            .into_bytes(),
        with_value(ev(T0 + 4 * MIN, "s1", "checkout", "desktop", "in", &[]), 20_000_000),
    ];
    let (points, s) = run_engine(&config(), &lines, 2);
    assert!(points.iter().all(|p| !p.name.contains(".value")), "no value point at all");
    assert_eq!(s.router.rejected[Reject::BadValue.index()], 2);
    let visits = final_totals(&points, "dc1");
    let checkout_visits: i64 =
        visits.iter().filter(|(k, _)| k.0 == "uswm.visit.assigned.1231.checkout").map(|(_, v)| v).sum();
    assert_eq!(checkout_visits, 3);
    assert!(diff(&reference(&config(), &lines), &visits).is_empty());
}

#[test]
fn value_sq_total_beyond_64_bits_is_clamped_when_written_and_counted() {
    // Two sessions, each 250 purchases of 100,000.00 in one minute: each adds
    // (2.5·10⁹)² = 6.25·10¹⁸ to one point, whose total (1.25·10¹⁹) is beyond
    // i64: written as i64::MAX, never wrapped; value.fm stays exact.
    let mut lines = Vec::new();
    for s in ["s1", "s2"] {
        lines.push(ev(T0, s, "home_page", "desktop", "in", &[(123, 1231)]));
        for i in 0..250 {
            lines.push(with_value(ev(T0 + MIN + i * 100, s, "checkout", "desktop", "in", &[]), 10_000_000));
        }
    }
    let c = config();
    let expected = reference(&c, &lines);
    let key = |name: &str| (name.to_string(), "desktop".to_string(), "in".to_string(), T0 + MIN);
    assert_eq!(expected[&key("uswm.value_sq.fm.1231.checkout")], i64::MAX);
    assert_eq!(expected[&key("uswm.value.fm.1231.checkout")], 5_000_000_000);
    for threads in [1, 3] {
        let (points, s) = run_engine(&c, &lines, threads);
        let got = final_totals(&points, "dc1");
        assert!(diff(&expected, &got).is_empty(), "threads={threads}: {:#?}", diff(&expected, &got));
        assert!(s.writer.totals_clamped >= 1, "threads={threads}");
    }
}
