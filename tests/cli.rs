//! Whole-binary tests: the `expmon` executable, run the way an operator runs it,
//! through the one harness (`common::harness`).

mod common;

use common::*;
use expmon::config::Config;

#[test]
fn generated_replay_equals_reference_at_every_width() {
    let x = Expmon::new();
    let events = x.path("events.jsonl");
    x.ok(&[
        "gen",
        "--profile",
        "demo",
        "--events",
        "60000",
        "--seed",
        "7",
        "--out",
        &format!("file:{}", events.display()),
    ]);
    let config = Config::demo();
    let expected = reference(&config, &lines_of(&events));
    assert!(expected.len() > 500, "a meaningful amount of output: {}", expected.len());
    let mut summaries = Vec::new();
    for threads in ["1", "2", "4", "8"] {
        let out = x.path(&format!("out-{threads}.jsonl"));
        let err = x.ok(&[
            "run",
            "--source",
            &format!("file:{}", events.display()),
            "--sink",
            &format!("file:{}", out.display()),
            "--threads",
            threads,
        ]);
        let got = totals_from_jsonl(&std::fs::read_to_string(&out).unwrap(), "dc1");
        let d = diff(&expected, &got);
        assert!(d.is_empty(), "threads={threads}: {d:#?}");
        // The summary's counter lines (the first summary line has the timing).
        let counters = err.lines().skip_while(|l| !l.starts_with("  rejected")).take(2);
        summaries.push(counters.map(str::to_string).collect::<Vec<_>>());
    }
    // The data exercises late drops, and counters other than timing agree.
    assert!(!summaries[0][0].contains("late dropped 0,"), "{:?}", summaries[0]);
    assert!(summaries.windows(2).all(|w| w[0] == w[1]), "{summaries:#?}");
}

#[test]
fn file_sink_lines_have_the_spec_shape() {
    let x = Expmon::new();
    let events = x.path("e.jsonl");
    std::fs::write(
        &events,
        "{\"ts\":1525356185123,\"tenant\":\"uswm\",\"session\":\"s-9f2c\",\"mp\":\"home_page\",\"device\":\"desktop\",\"login\":\"in\",\"assign\":{\"123\":1231,\"77\":771}}\n",
    )
    .unwrap();
    x.ok(&["run", "--source", "file:e.jsonl", "--sink", "file:o.jsonl", "--instance", "node7"]);
    let text = std::fs::read_to_string(x.path("o.jsonl")).unwrap();
    // Health metrics go to the same sink, tagged dc and instance (SPEC §6).
    let health =
        text.lines().find(|l| l.starts_with(r#"{"name":"expmon.events_in","tags":{"dc":"dc1","instance":"node7"}"#));
    assert!(health.is_some_and(|l| l.ends_with(r#""value":1}"#)), "{text}");
    assert!(
        text.lines().any(|l| l
            == r#"{"name":"uswm.session.assigned.1231","tags":{"dc":"dc1","device":"desktop","login":"in"},"timestamp":1525356180000,"value":1}"#),
        "{text}"
    );
}

#[test]
fn embedded_demo_runs_and_writes_points() {
    let x = Expmon::new();
    let err = x.ok(&["run", "--duration", "3s", "--trigger", "1s"]);
    let text = std::fs::read_to_string(x.path("expmon-out/points.jsonl")).unwrap();
    assert!(text.lines().count() > 10, "points written: {err}");
    assert!(text.contains("uswm.session.assigned.123"), "{text}");
    assert!(err.contains("events in"), "{err}");
}

#[test]
fn stdin_source_and_null_sink() {
    let x = Expmon::new();
    let mut run = x.cmd(&["run", "--source", "file:-", "--sink", "null"]).spawn();
    run.send("{\"ts\":1525356185123,\"tenant\":\"uswm\",\"session\":\"a\",\"mp\":\"home_page\"}\ngarbage\n");
    let out = run.finish();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("2 events in") && err.contains("not_json=1"), "{err}");
}

#[test]
fn check_config_prints_summary_or_a_located_error() {
    let x = Expmon::new();
    std::fs::write(x.path("good.toml"), expmon::config::DEMO_CONFIG).unwrap();
    let out = x.output(&["check-config", "good.toml"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("5 experiments, 12 variations, 3 tenants"));

    std::fs::write(x.path("bad.toml"), "[[experiment]]\nid = 1\ntenant = \"a\"\nvariations = [5]\n\n[[experiment]]\nid = 2\ntenant = \"a\"\nvariations = [5]\n").unwrap();
    let err = x.fails(&["check-config", "bad.toml"]);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.contains("bad.toml:9: experiment[1].variations: variation id 5 is already used by experiment 1"),
        "{err}"
    );

    let err = x.fails(&["run", "--config", "bad.toml", "--source", "file:x"]);
    assert!(err.contains("bad.toml:9:"), "{err}");
}

#[test]
fn bad_flags_give_one_clear_line() {
    let x = Expmon::new();
    for (args, needle) in [
        (vec!["run", "--source", "nope:x"], "bad source"),
        (vec!["run", "--source", "file:/does/not/exist.jsonl", "--sink", "null"], "cannot open /does/not/exist.jsonl"),
        (vec!["run", "--source", "gen:demo?events=10", "--sink", "carrier-pigeon"], "bad sink"),
        (vec!["run", "--source", "gen:nosuch?events=10"], "unknown generator profile"),
        (vec!["check-config", "/does/not/exist.toml"], "cannot read config file"),
    ] {
        let err = x.fails(&args);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// `expmon gen --event-rate` sets the span of event time of a replay and
/// `--assign-every 1` puts the assignment map on every event (SPEC §1 lines).
#[test]
fn gen_shape_knobs_set_the_event_time_density_and_the_assigned_share() {
    let x = Expmon::new();
    let shape = |profile: &str, out: &str, extra: &[&str]| {
        let mut args = vec!["gen", "--profile", profile, "--events", "5500", "--seed", "2", "--out", out];
        args.extend_from_slice(extra);
        x.ok(&args);
        let mut span = (i64::MAX, i64::MIN);
        let (mut valid, mut assigned) = (0u64, 0u64);
        // The generator's malformed lines include invalid UTF-8: read bytes.
        for l in std::fs::read(x.path(out.trim_start_matches("file:"))).unwrap().split(|&b| b == b'\n') {
            let Ok(v) = serde_json::from_slice::<serde_json::Value>(l) else { continue };
            let (Some(ts), Some(tenant)) = (v["ts"].as_i64(), v["tenant"].as_str()) else { continue };
            if tenant == "unknown_site" || v["session"] == "x" {
                continue;
            }
            span = (span.0.min(ts), span.1.max(ts));
            valid += 1;
            assigned += v.get("assign").is_some() as u64;
        }
        (span.1 - span.0, assigned as f64 / valid as f64)
    };
    let (span, share) = shape("peak", "file:every.jsonl", &["--event-rate", "550", "--assign-every", "1"]);
    // 5,500 events at 550/s: 10 s, plus the late ones' lateness (10 min) at most.
    assert!((9_900..=10_000 + 4 * 600_000).contains(&span), "{span} ms");
    assert_eq!(share, 1.0, "every event carries the assignments");
    let (span, _) = shape("peak", "file:default.jsonl", &[]);
    assert!(span < 4 * 600_000 + 1_000, "peak's own 60,000/s: {span} ms");
    // demo's sessions are few enough that most events are not their first.
    let (_, share) = shape("demo", "file:demo.jsonl", &[]);
    assert!(share < 0.5, "by default later events carry them a quarter of the time: {share}");
    let (_, share) = shape("demo", "file:demo-every.jsonl", &["--assign-every", "1"]);
    assert!(share > 0.75, "with 1, every event of an assigned session: {share}");
}

#[test]
fn generator_is_reproducible_and_in_process_source_matches_it() {
    let x = Expmon::new();
    x.ok(&["gen", "--profile", "demo", "--events", "5000", "--seed", "3", "--out", "file:a.jsonl"]);
    x.ok(&["gen", "--profile", "demo", "--events", "5000", "--seed", "3", "--out", "file:b.jsonl"]);
    assert_eq!(std::fs::read(x.path("a.jsonl")).unwrap(), std::fs::read(x.path("b.jsonl")).unwrap());
    x.ok(&["run", "--source", "file:a.jsonl", "--sink", "file:from-file.jsonl"]);
    x.ok(&["run", "--source", "gen:demo?events=5000&seed=3", "--sink", "file:from-gen.jsonl"]);
    let a = totals_from_jsonl(&std::fs::read_to_string(x.path("from-file.jsonl")).unwrap(), "dc1");
    let b = totals_from_jsonl(&std::fs::read_to_string(x.path("from-gen.jsonl")).unwrap(), "dc1");
    assert!(!a.is_empty());
    assert!(diff(&a, &b).is_empty());
}

#[test]
fn sigterm_drains_flushes_and_exits_zero_even_with_a_quiet_stdin() {
    let x = Expmon::new();
    let mut run = x.cmd(&["run", "--source", "file:-", "--sink", "file:o.jsonl", "--trigger", "1h"]).spawn();
    run.send(concat!(
        r#"{"ts":1525356185123,"tenant":"uswm","session":"a","mp":"home_page","assign":{"123":1231}}"#,
        "\n"
    ));
    std::thread::sleep(std::time::Duration::from_millis(500));
    let started = std::time::Instant::now();
    // SIGTERM with stdin still open.
    let out = run.stop();
    assert!(started.elapsed() < std::time::Duration::from_secs(5), "stopped promptly");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(x.path("o.jsonl")).unwrap();
    assert!(text.contains(r#""name":"uswm.session.assigned.1231""#), "the pending minute was flushed: {text}");
}

/// Runs and asserts failure with exit status `code` and exactly one stderr
/// line that starts `expmon: error:`; returns that line.
fn one_line_failure(x: &Expmon, args: &[&str], code: i32) -> String {
    let out = x.output(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(code), "expmon {args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "expmon {args:?}: one line: {err}");
    assert!(err.starts_with("expmon: error: "), "expmon {args:?}: {err}");
    err
}

#[test]
fn every_bad_flag_is_refused_in_one_line_with_exit_2() {
    let x = Expmon::new();
    let run = |extra: &[&'static str]| {
        let mut a = vec!["run", "--source", "file:/dev/null", "--sink", "null", "--metrics-addr", "off"];
        a.extend_from_slice(extra);
        a
    };
    for (args, needle) in [
        // Was a panic (exit 134) for 100000 and a silent 1 for 0.
        (run(&["--threads", "100000"]), "--threads"),
        (run(&["--threads", "0"]), "--threads"),
        (run(&["--threads", "many"]), "--threads"),
        // Was accepted although the config refuses a zero trigger.
        (run(&["--trigger", "0s"]), "--trigger"),
        (run(&["--trigger", "5 minutes"]), "--trigger"),
        (run(&["--duration", "0ms"]), "--duration"),
        (run(&["--checkpoint-interval", "0s", "--checkpoint", "ck"]), "--checkpoint-interval"),
        (vec!["run", "--metrics-addr", "localhost"], "--metrics-addr"),
        (run(&["--instance", "two words"]), "--instance"),
        (run(&["--instance", ""]), "--instance"),
        (run(&["--pin", "maybe"]), "--pin"),
        (run(&["--checkpoint-reset"]), "--checkpoint-reset needs --checkpoint"),
        (run(&["--no-such-flag"]), "--no-such-flag"),
        (vec!["gen", "--events", "10", "--rate", "0", "--out", "-"], "--rate"),
        (vec!["gen", "--events", "10", "--rate=-5", "--out", "-"], "--rate"),
        (vec!["gen", "--events", "10", "--rate", "NaN", "--out", "-"], "--rate"),
        (vec!["gen", "--events", "ten", "--out", "-"], "--events"),
        (vec!["gen", "--events", "10", "--event-rate", "0", "--out", "-"], "--event-rate"),
        (vec!["gen", "--events", "10", "--assign-every", "1.5", "--out", "-"], "--assign-every"),
        (vec!["gen", "--events", "10", "--rate", "5", "--event-rate", "5", "--out", "-"], "--event-rate"),
    ] {
        let err = one_line_failure(&x, &args, 2);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
}

/// What `--scale-out` cannot honour is refused before it connects, in one
/// line naming the flag or source option (docs/scale-out.md §6); and the
/// scale-out flag is refused without the mode.
#[test]
fn scale_out_refuses_the_flags_it_cannot_honour_in_one_line() {
    let x = Expmon::new();
    let kafka = "kafka://127.0.0.1:1/events?group=g";
    let run = |source: &str, extra: &[&str]| -> Vec<String> {
        let a = ["run", "--scale-out", "--source", source, "--sink", "null", "--metrics-addr", "off"];
        a.iter().chain(extra).map(|s| s.to_string()).collect()
    };
    let (idle, until) = (format!("{kafka}&idle_timeout=2s"), format!("{kafka}&until_end=true"));
    let single = ["run", "--source", "file:/dev/null", "--sink", "null", "--delta-partitions", "4"];
    for (args, needle) in [
        (run(kafka, &["--threads", "2"]), "drop --threads"),
        (run(kafka, &["--pin", "false"]), "drop --pin"),
        (run(kafka, &["--checkpoint", "ck"]), "drop --checkpoint"),
        (run(kafka, &["--checkpoint-reset"]), "drop --checkpoint-reset"),
        (run(kafka, &["--checkpoint-interval", "10s"]), "drop --checkpoint-interval"),
        (run(&idle, &[]), "source option idle_timeout"),
        (run(&until, &[]), "source option until_end"),
        (run("file:/dev/null", &[]), "--scale-out needs a kafka:// source"),
        (run("gen:demo", &[]), "--scale-out needs a kafka:// source"),
        (single.map(String::from).to_vec(), "--delta-partitions needs --scale-out"),
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = one_line_failure(&x, &args, 2);
        assert!(err.contains(needle), "{args:?}: {err}");
    }
    assert!(!x.path("ck").exists(), "refused before anything was made");
}

#[test]
fn an_explicit_metrics_addr_that_is_taken_is_an_error() {
    let x = Expmon::new();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let err =
        one_line_failure(&x, &["run", "--source", "file:/dev/null", "--sink", "null", "--metrics-addr", &addr], 1);
    assert!(err.contains("--metrics-addr") && err.contains(&addr), "{err}");
}

/// A secret planted in every address and config that can fail must not be in
/// any output: credentials in URLs and secret librdkafka settings are hidden.
#[test]
fn secrets_never_appear_in_error_messages() {
    const SECRET: &str = "s3cr3tPW";
    let x = Expmon::new();
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    std::fs::write(
        x.path("kafka.toml"),
        format!("{}\n[kafka]\n\"sasl.password\" = \"{SECRET}\"\n", expmon::config::DEMO_CONFIG),
    )
    .unwrap();
    // librdkafka echoes an unknown property with its value in its error.
    std::fs::write(
        x.path("token.toml"),
        format!("{}\n[kafka]\n\"api.token\" = \"{SECRET}\"\n", expmon::config::DEMO_CONFIG),
    )
    .unwrap();
    std::fs::write(
        x.path("bad-kafka.toml"),
        format!("[kafka]\n\"sasl.password\" = \"{SECRET}\"\n\n[engine]\ntrigger = \"0s\"\n"),
    )
    .unwrap();
    let kairos = |rest: &str| format!("kairosdb:http://admin:{SECRET}@{rest}");
    let file =
        |sink: String| vec!["run".to_string(), "--source".into(), "file:/dev/null".into(), "--sink".into(), sink];
    let source = |src: String| vec!["run".to_string(), "--source".into(), src, "--sink".into(), "null".into()];
    let cases: Vec<Vec<String>> = vec![
        file(kairos(&format!("127.0.0.1:{closed}"))), // unreachable
        file(kairos("127.0.0.1:8080?no_such_option=1")),
        file(kairos("127.0.0.1:8080?batch=lots")),
        file(kairos(":8080")),
        file(kairos("127.0.0.1:99999")),
        file(format!("kairosdb:ftp://admin:{SECRET}@127.0.0.1:8080")),
        file(format!("carrier:pigeon://admin:{SECRET}@roof")),
        source(format!("kafka://127.0.0.1:9092/t?sasl.password={SECRET}&no_such_option=1")),
        source(format!("kafka://127.0.0.1:9092/t?sasl.password={SECRET}&group=")),
        source(format!("kafka://127.0.0.1:9092/t?sasl.password={SECRET}&idle_timeout=soon")),
        source(format!("kafka://127.0.0.1:9092/bad topic?sasl.password={SECRET}")),
        source(format!("kafka://127.0.0.1:9092/t?ssl.key.password={SECRET}&sasl.jaas.config={SECRET}&until_end=x")),
        source(format!("nope://admin:{SECRET}@x")),
        source(format!("kafka://u:{SECRET}@127.0.0.1:{closed}/t")),
        {
            let mut a = source(format!("kafka://127.0.0.1:{closed}/t?sasl.oauthbearer.client.secret={SECRET}&x.y=1"));
            a.extend(["--config".to_string(), "token.toml".into()]);
            a
        },
        vec!["run".into(), "--config".into(), "bad-kafka.toml".into(), "--source".into(), "file:/dev/null".into()],
        vec![
            "gen".into(),
            "--events".into(),
            "1".into(),
            "--out".into(),
            format!("kafka://h:1/t?sasl.password={SECRET}&x=1"),
        ],
        vec!["gen".into(), "--events".into(), "1".into(), "--out".into(), format!("ftp://u:{SECRET}@h")],
        // A positional value where a flag was meant: clap echoes it.
        vec!["run".into(), format!("kafka://127.0.0.1:9092/t?sasl.password={SECRET}")],
    ];
    for args in &cases {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = x.output(&args);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(!out.status.success(), "{args:?} should fail: {text}");
        assert!(!text.contains(SECRET), "the secret leaked: {args:?}: {text}");
        assert!(text.contains("expmon: error: "), "{args:?}: {text}");
    }
    // An unreachable broker with the secret in the config file's [kafka] table
    // and in the address (waits for the 10 s connection deadline).
    let mut args = source(format!("kafka://127.0.0.1:{closed}/t?sasl.password={SECRET}&sasl.username=u"));
    args.extend(["--config".to_string(), "kafka.toml".into(), "--metrics-addr".into(), "off".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = x.output(&args);
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(!out.status.success(), "{text}");
    assert!(!text.contains(SECRET), "the secret leaked: {text}");
}

#[test]
fn messages_name_the_problem_once_in_one_line() {
    let x = Expmon::new();
    // Invalid TOML: toml's two-line message on one line.
    std::fs::write(x.path("broken.toml"), "[engine]\nx = [\n").unwrap();
    let err = one_line_failure(&x, &["check-config", "broken.toml"], 1);
    assert!(err.contains("broken.toml:"), "{err}");
    // An empty file is refused, not read as "no experiments".
    std::fs::write(x.path("empty.toml"), "\n# nothing\n").unwrap();
    let err = one_line_failure(&x, &["check-config", "empty.toml"], 1);
    assert!(err.contains("empty.toml: the file is empty"), "{err}");
    // A malformed address is a bad flag (exit 2).
    // `group=` is a known option with an empty value, not "unknown option group".
    let err = one_line_failure(&x, &["run", "--source", "kafka://127.0.0.1:9/t?group=", "--sink", "null"], 2);
    assert!(err.contains("group: empty") && !err.contains("unknown option"), "{err}");
    let err = one_line_failure(&x, &["run", "--source", "kafka://:9092/t", "--sink", "null"], 2);
    assert!(err.contains("brokers must be HOST:PORT"), "{err}");
    let err = one_line_failure(&x, &["run", "--source", "kafka://127.0.0.1:9/t?dead_letter=a b", "--sink", "null"], 2);
    assert!(err.contains("dead_letter") && !err.contains("unknown option"), "{err}");
    // A URL without a host says so (was reqwest's "builder error").
    let err = one_line_failure(&x, &["run", "--source", "file:/dev/null", "--sink", "kairosdb:http://:8080"], 2);
    assert!(err.contains("no host") && !err.contains("builder error"), "{err}");
    // The OS error text once (was "Is a directory (os error 21): Is a directory (os error 21)").
    std::fs::create_dir(x.path("adir")).unwrap();
    let err = one_line_failure(&x, &["run", "--source", "file:/dev/null", "--sink", "file:adir"], 1);
    assert_eq!(err.matches("os error").count(), 1, "{err}");
    let err = one_line_failure(&x, &["check-config", "adir"], 1);
    assert_eq!(err.matches("os error").count(), 1, "{err}");
    // A sink's own option error names the sink and the option once.
    let err = one_line_failure(&x, &["run", "--source", "file:/dev/null", "--sink", "kairosdb:http://h:1?bogus=1"], 2);
    assert_eq!(err.matches("unknown option").count(), 1, "{err}");
    assert!(!err.contains("expected file:PATH"), "{err}");
}

/// An emptied config file on a reload is refused as empty (it was reported
/// as "allowed_lateness changed") and the running config stays.
#[test]
fn an_emptied_config_on_reload_is_refused_as_empty() {
    let x = Expmon::new();
    std::fs::write(x.path("c.toml"), expmon::config::DEMO_CONFIG).unwrap();
    let mut run = x
        .cmd(&["run", "--config", "c.toml", "--source", "file:-", "--sink", "null", "--trigger", "50ms"])
        .args(["--metrics-addr", "off", "--status", "false"])
        .spawn();
    run.send(concat!(r#"{"ts":1525356185123,"tenant":"uswm","session":"a","mp":"home_page"}"#, "\n"));
    run.wait_for_log("Ctrl-C to stop");
    std::fs::write(x.path("c.toml"), "").unwrap();
    // The change may land before the run first looks at the file: SIGHUP
    // asks for the reload whatever the file's time says (checked at every 50 ms trigger).
    run.signal("HUP");
    let refused = run.wait_for_log("reload refused");
    run.kill();
    assert!(refused.contains("the file is empty"), "{refused}");
    assert!(!refused.contains("allowed_lateness"), "{refused}");
}

/// A stop that could not deliver everything does not first claim it did.
#[test]
fn a_stop_with_undelivered_points_does_not_claim_everything_was_flushed() {
    let x = Expmon::new();
    let server = common::kairos_server::KairosServer::start();
    server.state().faults.push_back(common::kairos_server::Fault::Down(std::time::Duration::from_secs(3600)));
    let sink = format!("kairosdb:{}?linger=5ms&backoff=5ms&backoff_max=50ms&timeout=200ms&drain=1s", server.url());
    let out = x.output(&[
        "run",
        "--source",
        "gen:demo?rate=2000",
        "--sink",
        &sink,
        "--duration",
        "1s",
        "--trigger",
        "100ms",
        "--metrics-addr",
        "off",
        "--status",
        "false",
    ]);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("could not be delivered"), "{err}");
    assert!(!err.contains("drained, flushed and closed"), "{err}");
}
