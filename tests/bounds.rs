//! Bounds that must never lose a valid event silently (SPEC §1): a `ts` from a
//! broken clock is rejected by reason instead of dragging the watermark past
//! everything after it; names beyond a table's bound become `_other`, counted
//! in the run summary, the `expmon.*` health points and `/metrics`.

mod common;

use common::runs::assert_totals;
use common::*;
use expmon::config::Config;

/// `expmon run` of the embedded demo config on `lines` to a file sink:
/// (stderr, the sink's text).
fn replay(x: &Expmon, name: &str, lines: &[Vec<u8>]) -> (String, String) {
    let input = format!("{name}.jsonl");
    x.write(&input, jsonl(lines));
    let out = format!("{name}-out.jsonl");
    let err = x
        .run()
        .source(&format!("file:{input}"))
        .sink(&format!("file:{out}"))
        .args(["--threads", "2", "--metrics-addr", "off"])
        .ok();
    (err, x.read(&out))
}

/// The last value of health point `expmon.NAME` whose tag `tag` is `value`.
fn last_tagged_health(text: &str, name: &str, tag: &str, value: &str) -> Option<i64> {
    let needle = format!(r#"{{"name":"expmon.{name}","#);
    text.lines()
        .rev()
        .filter(|l| l.starts_with(&needle))
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .find(|v| v["tags"][tag] == value)
        .map(|v| v["value"].as_i64().unwrap())
}

/// The summary's number after `label` (e.g. "late dropped ").
fn summary_number(err: &str, label: &str) -> u64 {
    let at = err.find(label).unwrap_or_else(|| panic!("no {label:?} in the summary: {err}")) + label.len();
    err[at..].split(|c: char| !c.is_ascii_digit()).next().unwrap().parse().unwrap()
}

/// What broke: one line with `ts = i64::MAX` early in a replay moved the
/// watermark to the end of time, and 19,878 of the next 20,000 events were
/// dropped as late. Now such lines are rejected (`ts_future`) and the rest of
/// the file counts as if they were not there.
#[test]
fn a_far_future_ts_early_in_a_replay_is_rejected_and_drops_nothing_as_late() {
    let d = Expmon::new();
    d.ok(&["gen", "--profile", "demo", "--events", "20000", "--seed", "11", "--out", "file:valid.jsonl"]);
    let valid = lines_of(&d.path("valid.jsonl"));
    assert_eq!(valid.len(), 20_000);
    // i64::MAX (19 digits: the serde path) and the year 2100 (the fast path).
    let broken = [
        br#"{"ts":9223372036854775807,"tenant":"uswm","session":"clock","mp":"home_page","assign":{"123":1231}}"#
            .to_vec(),
        br#"{"ts":4102444800000,"tenant":"uswm","session":"clock2","mp":"home_page","assign":{"123":1231}}"#.to_vec(),
    ];
    let mut lines = valid[..3].to_vec();
    lines.push(broken[0].clone());
    lines.extend_from_slice(&valid[3..10]);
    lines.push(broken[1].clone());
    lines.extend_from_slice(&valid[10..]);

    let (clean_err, _) = replay(&d, "clean", &valid);
    let (err, text) = replay(&d, "broken", &lines);
    assert_eq!(summary_number(&err, "ts_future="), 2, "{err}");
    assert_eq!(summary_number(&err, "rejected "), summary_number(&clean_err, "rejected ") + 2, "{err}");
    assert_eq!(
        summary_number(&err, "late dropped "),
        summary_number(&clean_err, "late dropped "),
        "the broken clock made on-time events late: {err}"
    );
    assert_eq!(last_tagged_health(&text, "events_rejected_by_reason", "reason", "ts_future"), Some(2));
    assert_totals(&reference(&Config::demo(), &lines), &totals_from_jsonl(&text, "dc1"));
}

const T0: i64 = 1_767_225_600_000;

/// The value of the `/metrics` series `name…{…label…}` (a `_total` suffix allowed).
fn metric(text: &str, name: &str, label: &str) -> Option<i64> {
    text.lines()
        .filter(|l| l.starts_with(name) && (label.is_empty() || l.contains(label)))
        .find(|l| l[name.len()..].starts_with(['{', ' ', '_']))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// Totals summed over the device and login tags: what stays exact when names
/// become `_other`.
fn over_tags(t: &Totals) -> std::collections::BTreeMap<(String, i64), i64> {
    let mut out = std::collections::BTreeMap::new();
    for ((name, _, _, ts), v) in t {
        *out.entry((name.clone(), *ts)).or_insert(0) += v;
    }
    out.retain(|_, v| *v != 0);
    out
}

/// What broke: 300 events with 300 distinct devices gave `sessions started
/// 254` and totals short by 46, with nothing in the summary, the health points
/// or `/metrics` (a full name table dropped valid events). Now a name beyond a
/// table's bound becomes `_other`: every total summed over tags is exact, and
/// the replacements are counted in all three places. Also: a bot session over
/// the per-session event cap is counted there too.
#[test]
fn names_beyond_a_full_table_become_other_and_every_total_stays_exact() {
    let d = Expmon::new();
    let config = Config::demo();
    // Devices the demo config itself names take ids first.
    let names = std::sync::Arc::new(expmon::names::Names::default());
    expmon::config::Catalog::build(&config, names.clone()).unwrap();
    let (config_devices, config_logins) = (names.device.len(), names.login.len());
    let n = expmon::names::DEVICE_CAPACITY + 405;
    let mut lines = Vec::new();
    for i in 0..n {
        let ts = T0 + i as i64 * 10;
        let (session, device, login) = (format!("s{i}"), format!("dev-{i}"), format!("login-{}", i % 40));
        let variation = if i % 3 == 0 { 1232 } else { 1231 };
        lines.push(ev(ts, &session, "home_page", &device, &login, &[(123, variation)]));
        if i % 2 == 0 {
            lines.push(ev(ts + 5, &session, "checkout", &device, &login, &[]));
        }
    }
    // A bot: one session of 300 events, 46 over the cap (no experiment: it
    // changes no total).
    let cap = expmon::session::MAX_EVENTS_PER_SESSION;
    for i in 0..300 {
        lines.push(ev(T0 + n as i64 * 10 + i, "bot", "item_page", "dev-0", "login-0", &[]));
    }
    let device_replaced = n - (expmon::names::DEVICE_CAPACITY - config_devices);
    let login_own = expmon::names::LOGIN_CAPACITY - config_logins;
    let login_replaced = (0..n).filter(|i| i % 40 >= login_own).map(|i| 1 + (i % 2 == 0) as usize).sum::<usize>();
    // A login replaced on the checkout line of the same event counts again,
    // and so does a device.
    let device_replaced = device_replaced + (n - device_replaced..n).filter(|i| i % 2 == 0).count();

    let port = free_port();
    let mut run = d
        .run()
        .source("file:-")
        .sink("file:out.jsonl")
        .args(["--threads", "2", "--metrics-addr", &format!("127.0.0.1:{port}"), "--trigger", "100ms"])
        .spawn();
    run.send(jsonl(&lines));
    // Every event read and counted in a trigger's health points, then /metrics.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let metrics = loop {
        let m = http_get(port, "/metrics");
        if metric(&m, "expmon_events_in_total", "").is_some_and(|v| v == lines.len() as i64)
            && metric(&m, "expmon_session_overflow_dropped_total", "").is_some_and(|v| v > 0)
        {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "events not counted in 60 s: {m}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    let out = run.finish();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{err}");
    let text = std::fs::read_to_string(d.path("out.jsonl")).unwrap();

    // /metrics, the health points and the summary agree.
    let device_label = r#"table="device""#;
    assert_eq!(
        metric(&metrics, "expmon_names_replaced_other_total", device_label),
        Some(device_replaced as i64),
        "{metrics}"
    );
    let login_label = r#"table="login""#;
    assert_eq!(
        metric(&metrics, "expmon_names_replaced_other_total", login_label),
        Some(login_replaced as i64),
        "{metrics}"
    );
    assert_eq!(metric(&metrics, "expmon_names_replaced_other_total", r#"table="mp""#), Some(0), "{metrics}");
    assert_eq!(metric(&metrics, "expmon_session_overflow_dropped_total", ""), Some(300 - cap as i64), "{metrics}");
    let health = |table| last_tagged_health(&text, "names_replaced_other", "table", table);
    assert_eq!(health("device"), Some(device_replaced as i64));
    assert_eq!(health("login"), Some(login_replaced as i64));
    assert_eq!(common::runs::last_health(&text, "session_overflow_dropped").0, 300 - cap as i64);
    assert!(
        err.contains(&format!(
            "names replaced by _other (table full) {} (device={device_replaced}, login={login_replaced})",
            device_replaced + login_replaced
        )),
        "{err}"
    );
    assert!(err.contains(&format!("sessions started {}", n + 1)), "{err}");
    assert!(err.contains(&format!("dropped (session over {cap} events) {}", 300 - cap)), "{err}");

    // Nothing lost: summed over tags, every total is the reference's.
    let got = totals_from_jsonl(&text, "dc1");
    assert!(got.keys().any(|(_, device, login, _)| device == "_other" && login == "_other"), "no _other point");
    let expected = reference(&config, &lines);
    assert!(!expected.is_empty());
    assert_eq!(over_tags(&expected), over_tags(&got));
}
