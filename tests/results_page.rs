//! The results page in a real headless browser (Debian's chromium): a run
//! fed a fixed input serves the page; chromium loads it, runs its script, and
//! the rendered table and curve points must carry the numbers of the
//! reference computation — the lift table's conversion and revenue per
//! session, and each treatment's always-valid lift, as `expmon::stats`
//! computes them from the reference totals — and the plot of the interval
//! narrowing must be there. Also `/metrics` in Prometheus text.
//!
//! With `EXPMON_SCREENSHOT=PATH` set (e.g. `docs/results-page.png`, relative
//! to the package) it also saves chromium's screenshot of the page there.
//!
//! Chromium is installed by `.ci/run`; on a machine without it this test
//! installs it (`apt-get install chromium`) the first time.

mod common;

use common::*;
use expmon::config::Config;
use expmon::stats::{compare, ArmSums, SequentialConfig, Verdict};
use std::collections::BTreeMap;
use std::process::Command;
use std::time::{Duration, Instant};

const T0: i64 = 1_767_225_600_000;

fn chromium() -> &'static str {
    let bin = "/usr/bin/chromium";
    if !std::path::Path::new(bin).exists() {
        let ok = Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends", "chromium"])
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "chromium is needed for this test: apt-get install chromium");
    }
    bin
}

/// The DOM after the page's script ran, from headless chromium.
fn rendered_dom(url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--virtual-time-budget=4000", "--dump-dom", url])
        .output()
        .unwrap();
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// Saves chromium's screenshot of `url` (1200×1600) to `path`.
fn screenshot(url: &str, path: &std::path::Path) {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new(chromium())
        .args(["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"])
        .args(["--disable-background-networking", "--disable-component-update", "--disable-sync"])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(["--virtual-time-budget=4000", "--hide-scrollbars", "--window-size=1200,1600"])
        .arg(format!("--screenshot={}", path.display()))
        .arg(url)
        .output()
        .unwrap();
    assert!(out.status.success(), "chromium failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(std::fs::metadata(path).unwrap().len() > 10_000, "no screenshot at {}", path.display());
}

/// A relative lift as the page writes it: "+12.3%", an unbounded end `end`.
fn signed(r: Option<f64>, end: &str) -> String {
    match r {
        None => end.to_string(),
        Some(r) => format!("{}{:.1}%", if r >= 0.0 { "+" } else { "" }, 100.0 * r),
    }
}

/// The text of the element with `id`.
fn text_of(dom: &str, id: &str) -> Option<String> {
    let start = dom.find(&format!("id=\"{id}\""))?;
    let open = start + dom[start..].find('>')? + 1;
    let close = open + dom[open..].find('<')?;
    Some(dom[open..close].to_string())
}

#[test]
fn the_results_page_renders_the_reference_numbers_in_a_browser() {
    let dir = Expmon::new();
    let config_text = expmon::config::DEMO_CONFIG;
    dir.write("demo.toml", config_text);
    let config = Config::parse(config_text, "demo.toml").unwrap();
    // Five minutes of experiment 123, 100 sessions per variation a minute:
    // variation 1231 converts better (50% against 25%), each checkout an
    // order of 10.00 to 19.00.
    let mut lines = Vec::new();
    for m in 0..5i64 {
        for i in 0..200i64 {
            let (v, s) = (if i % 2 == 0 { 1231 } else { 1232 }, format!("m{m}-s{i}"));
            let ts = T0 + m * 60_000 + i * 250;
            lines.push(ev(ts, &s, "home_page", "desktop", "in", &[(123, v)]));
            if i % 4 == 0 || (v == 1232 && i % 8 == 1) {
                let value = 1000 + (i + m) % 7 * 150;
                lines.push(with_value(ev(ts + 100, &s, "checkout", "desktop", "in", &[]), value));
            }
        }
    }
    let expected = reference(&config, &lines);
    let port = free_port();
    let mut run = dir
        .run()
        .config("demo.toml")
        .source("file:-")
        .sink("file:out.jsonl")
        .args(["--metrics-addr", &format!("127.0.0.1:{port}"), "--trigger", "100ms"])
        .spawn();
    run.send_lines(&lines);
    // Wait until every event went through a flush.
    let deadline = Instant::now() + Duration::from_secs(30);
    let want = "expmon_events_in_total{dc=\"dc1\",instance=";
    loop {
        let metrics = http_get(port, "/metrics");
        let n = metrics.lines().find(|l| l.starts_with(want)).and_then(|l| l.rsplit(' ').next()?.parse::<usize>().ok());
        if n == Some(lines.len()) {
            assert!(metrics.contains("# TYPE expmon_sessions_active gauge"), "{metrics}");
            break;
        }
        assert!(Instant::now() < deadline, "events not flushed: {metrics}");
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_millis(300));

    let url = format!("http://127.0.0.1:{port}/?tenant=uswm&id=123");
    let dom = rendered_dom(&url);
    if let Some(path) = std::env::var_os("EXPMON_SCREENSHOT") {
        screenshot(&url, &std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(path));
    }
    let _ = run.stop();
    assert!(dom.contains("data-rendered=\"uswm/123\""), "the script did not render: {dom}");

    // Sum the reference over devices and logins, per minute and overall.
    let mut per_minute: BTreeMap<(String, i64), i64> = BTreeMap::new();
    for ((name, _, _, ts), v) in &expected {
        *per_minute.entry((name.clone(), *ts)).or_default() += v;
    }
    let total = |name: &str| per_minute.iter().filter(|((n, _), _)| n == name).map(|(_, v)| *v).sum::<i64>();
    for v in ["1231", "1232"] {
        let assigned = total(&format!("uswm.session.assigned.{v}"));
        let fm = total(&format!("uswm.session.fm.{v}"));
        let visits = total(&format!("uswm.visit.fm.{v}.checkout.beta"));
        assert!(assigned > 0 && fm > 0 && visits > 0);
        assert_eq!(text_of(&dom, &format!("v{v}-assigned")), Some(assigned.to_string()), "variation {v}");
        assert_eq!(text_of(&dom, &format!("v{v}-fm")), Some(fm.to_string()));
        assert_eq!(text_of(&dom, &format!("v{v}-checkout-visits")), Some(visits.to_string()));
        let conversion = format!("{:.2}%", 100.0 * visits as f64 / fm as f64);
        assert_eq!(text_of(&dom, &format!("v{v}-checkout-conversion")), Some(conversion));
        // Each minute of the assigned-sessions curve is a point with its value.
        let name = format!("uswm.session.assigned.{v}");
        for ((_, ts), n) in per_minute.iter().filter(|((n, _), _)| *n == name) {
            let circle = format!("data-variation=\"{v}\" data-minute=\"{ts}\" data-value=\"{n}\"");
            assert!(dom.contains(&circle), "no curve point {circle}");
        }
    }
    assert!(dom.matches("<path class=\"line\"").count() >= 2 * 5, "two variations, five charts");

    // The lift table: conversion and revenue per qualified session per
    // variation, and the treatment's always-valid lift, from the reference.
    let arms: Vec<[ArmSums; 2]> = ["1231", "1232"]
        .iter()
        .map(|v| {
            let fm = total(&format!("uswm.session.fm.{v}")) as u64;
            let visits = total(&format!("uswm.visit.fm.{v}.checkout.beta")) as u64;
            let value = total(&format!("uswm.value.fm.{v}.checkout")) as f64;
            let value_sq = total(&format!("uswm.value_sq.fm.{v}.checkout")) as f64;
            [ArmSums::bernoulli(fm, visits), ArmSums::new(fm, value, value_sq)]
        })
        .collect();
    for (k, v) in ["1231", "1232"].iter().enumerate() {
        let [conversion, revenue] = &arms[k];
        assert_eq!(text_of(&dom, &format!("v{v}-sessions")), Some(conversion.n.to_string()));
        assert_eq!(text_of(&dom, &format!("v{v}-checkout-cr")), Some(format!("{:.2}%", 100.0 * conversion.mean())));
        assert_eq!(text_of(&dom, &format!("v{v}-checkout-revenue")), Some(format!("{:.2}", revenue.mean())));
    }
    for (j, (metric, id)) in [("conversion", "cr"), ("revenue", "revenue")].into_iter().enumerate() {
        assert_eq!(text_of(&dom, &format!("v1231-checkout-{id}-lift")).as_deref(), Some("control"));
        let c = compare(&arms[0][j], &arms[1][j], &SequentialConfig::default());
        assert_eq!(c.verdict, Verdict::Worse, "{metric}: 1232 converts at half the rate");
        let l = c.lift.unwrap();
        let finite = |x: f64| x.is_finite().then_some(x);
        let want = format!(
            "{} [{}, {}] worse",
            signed(l.relative, "–"),
            signed(finite(l.relative_ci.low), "-∞"),
            signed(finite(l.relative_ci.high), "+∞")
        );
        assert_eq!(text_of(&dom, &format!("v1232-checkout-{id}-lift")), Some(want), "{metric}");
        // The interval plot: one point per minute, narrowing.
        let plot = format!("id=\"interval-checkout-{metric}\"");
        let start = dom.find(&plot).unwrap_or_else(|| panic!("no {plot}"));
        let svg = &dom[start..start + dom[start..].find("</svg>").unwrap()];
        assert_eq!(svg.matches("<polygon class=\"band\"").count(), 1, "{metric}: one treatment, one band");
        let width = |p: &str| {
            let attr = |a: &str| {
                let from = p.find(&format!("{a}=\"")).unwrap() + a.len() + 2;
                p[from..from + p[from..].find('%').unwrap()].parse::<f64>().unwrap()
            };
            attr("data-high") - attr("data-low")
        };
        let widths: Vec<f64> = svg.split("class=\"interval-point\"").skip(1).map(width).collect();
        assert_eq!(widths.len(), 5, "{metric}: a point per minute: {svg}");
        assert!(widths[4] < widths[0] * 0.7, "{metric}: the interval narrows: {widths:?}");
    }
}
