//! Crash safety: a run killed at any moment and restarted from its checkpoint
//! ends with exactly the totals of an uninterrupted run (the reference of
//! SPEC §3), whatever the thread count of each restart.
//!
//! - Failpoints (`EXPMON_FAILPOINT`) abort the process at precise moments: a
//!   checkpoint written but not published, published but its offsets not
//!   committed, points handed to the sink but not flushed.
//! - Random SIGKILLs against a real Kafka-protocol broker while events flow in.
//!
//! The sink is a file per run; the final value of a point is its last line
//! over the runs in order (what a KairosDB overwrite gives).

mod common;

use common::broker::Broker;
use common::*;
use rand::{Rng, SeedableRng};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// Totals over the runs' outputs, later runs overwriting earlier ones.
fn totals_of_runs(dir: &Expmon, outs: &[String], dc: &str) -> Totals {
    let mut text = String::new();
    for o in outs {
        text.push_str(&std::fs::read_to_string(dir.path(o)).unwrap_or_default());
    }
    totals_from_jsonl(&text, dc)
}

fn run_file(dir: &Expmon, args: &[&str], failpoint: Option<&str>) -> Output {
    run_source(dir, "file:events.jsonl", args, failpoint)
}

fn run_source(dir: &Expmon, source: &str, args: &[&str], failpoint: Option<&str>) -> Output {
    let mut c = dir
        .run()
        .config("demo.toml")
        .source(source)
        .args(["--checkpoint", "ck", "--trigger", "1ms", "--checkpoint-interval", "2ms"])
        .args(args);
    if let Some(f) = failpoint {
        c = c.env("EXPMON_FAILPOINT", f);
    }
    c.output()
}

fn write_events(dir: &Expmon, lines: &[Vec<u8>]) {
    dir.write("events.jsonl", jsonl(lines));
}

#[test]
fn a_crash_at_each_failpoint_then_a_restore_at_other_thread_counts_is_exact() {
    let dir = Expmon::with_demo_config();
    // Enough input for many checkpoints even on a fast machine: the failpoints
    // count them (the third one written, the second published).
    let lines = dir.events(5, 200_000);
    write_events(&dir, &lines);
    let config = dir.config();
    let expected = reference(&config, &lines);
    for (failpoint, threads) in
        [("checkpoint.written@3", ["1", "3"]), ("checkpoint.published@2", ["2", "1"]), ("sink.written@4", ["3", "2"])]
    {
        let _ = std::fs::remove_dir_all(dir.path("ck"));
        // A restored run appends to its sink file: start each round with none.
        let _ = std::fs::remove_file(dir.path("a.jsonl"));
        let _ = std::fs::remove_file(dir.path("b.jsonl"));
        let first = run_file(&dir, &["--threads", threads[0], "--sink", "file:a.jsonl"], Some(failpoint));
        let err = String::from_utf8_lossy(&first.stderr);
        assert!(!first.status.success() && err.contains("aborting"), "{failpoint}: {err}");
        let second = run_file(&dir, &["--threads", threads[1], "--sink", "file:b.jsonl"], None);
        let err = String::from_utf8_lossy(&second.stderr);
        assert!(second.status.success(), "{err}");
        assert!(err.contains("restoring the checkpoint"), "{failpoint}: {err}");
        let got = totals_of_runs(&dir, &["a.jsonl".into(), "b.jsonl".into()], &config.engine.dc);
        let d = diff(&expected, &got);
        assert!(d.is_empty(), "{failpoint}: {d:#?}");
    }
}

#[test]
fn a_graceful_stop_keeps_open_sessions_for_the_next_run() {
    let dir = Expmon::with_demo_config();
    let lines = dir.events(6, 30_000);
    let config = dir.config();
    // Half the input, stopped (not ended): the open state goes into the checkpoint.
    let (first, _) = lines.split_at(15_000);
    write_events(&dir, first);
    let mut run =
        dir.run().config("demo.toml").source("file:-").sink("file:a.jsonl").args(["--checkpoint", "ck"]).spawn();
    run.send(std::fs::read(dir.path("events.jsonl")).unwrap());
    // Keep stdin open: the run is stopped by a signal, not by the end of input.
    std::thread::sleep(Duration::from_millis(1500));
    let out = run.stop();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("stopped: drained, flushed and closed in"), "{err}");
    // The rest from stdin, restored (stdin has no position: the second run
    // reads a stream holding only the second half; a checkpoint of stdin is
    // refused for a file, see below).
    let (_, second) = lines.split_at(15_000);
    let ck = expmon::checkpoint::load(&dir.path("ck"), expmon::checkpoint::fingerprint(&config)).unwrap().unwrap();
    assert!(ck.router.positions.is_empty(), "stdin has no position");
    let out = run_stdin(&dir, &jsonl(second), &["--sink", "file:b.jsonl", "--threads", "3"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let got = totals_of_runs(&dir, &["a.jsonl".into(), "b.jsonl".into()], &config.engine.dc);
    let d = diff(&reference(&config, &lines), &got);
    assert!(d.is_empty(), "{d:#?}");
}

#[test]
fn an_unusable_checkpoint_is_refused_and_reset_on_request() {
    let dir = Expmon::with_demo_config();
    let lines = dir.events(7, 5_000);
    write_events(&dir, &lines);
    let out = run_file(&dir, &["--sink", "null"], None);
    assert!(out.status.success());
    let path = dir.path("ck/checkpoint.bin");
    let good = std::fs::read(&path).unwrap();
    std::fs::write(&path, &good[..good.len() / 2]).unwrap();
    let out = run_file(&dir, &["--sink", "null"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("is unusable: checksum mismatch") && err.contains("--checkpoint-reset"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    let out = run_file(&dir, &["--sink", "null", "--checkpoint-reset"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("set aside"), "{err}");
    let aside = std::fs::read_dir(dir.path("ck"))
        .unwrap()
        .filter_map(|e| e.ok())
        .any(|e| e.file_name().to_string_lossy().starts_with("checkpoint.bin.discarded-"));
    assert!(aside, "the old checkpoint is kept aside, not deleted");
}

/// `expmon run --source file:-` fed `input`, then end of input.
fn run_stdin(dir: &Expmon, input: &[u8], args: &[&str]) -> Output {
    dir.run().config("demo.toml").source("file:-").args(["--checkpoint", "ck"]).args(args).input(input).output()
}

/// Asserts a run was refused with one line naming both inputs.
fn assert_refused(out: &Output, taken: &str, reads: &str) {
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("expmon: error: checkpoint in ck was taken reading "), "{err}");
    assert!(
        err.contains(&format!("taken reading {taken}")) && err.contains(&format!("this run reads {reads}")),
        "{err}"
    );
    assert!(err.contains("use --checkpoint-reset to start fresh"), "{err}");
}

/// Broke: the checkpoint did not record its input, so one of file A restored
/// with file B started B at A's byte offset, mid-line, and exited 0.
#[test]
fn a_checkpoint_of_one_file_is_refused_for_another_file() {
    let dir = Expmon::with_demo_config();
    let config = dir.config();
    write_events(&dir, &dir.events(11, 5_000));
    let other = dir.events(12, 5_000);
    std::fs::write(dir.path("other.jsonl"), jsonl(&other)).unwrap();
    let first = run_file(&dir, &["--sink", "null"], None);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let out = run_source(&dir, "file:other.jsonl", &["--sink", "file:b.jsonl"], None);
    assert_refused(&out, "file:", "file:");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("events.jsonl (") && err.contains("other.jsonl (") && err.contains("another input"), "{err}");
    assert!(!dir.path("b.jsonl").exists(), "refused before the sink was opened");
    // Same path, other content (and shorter): refused as well.
    std::fs::write(dir.path("events.jsonl"), jsonl(&other[..100])).unwrap();
    let out = run_file(&dir, &["--sink", "null"], None);
    assert_refused(&out, "file:", "file:");
    assert!(String::from_utf8_lossy(&out.stderr).contains("shorter than when the checkpoint was taken"));
    // --checkpoint-reset starts fresh: the new file alone, from its start.
    let out = run_source(&dir, "file:other.jsonl", &["--sink", "file:b.jsonl", "--checkpoint-reset"], None);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.contains("set aside") && !err.contains("restoring"), "{err}");
    let got = totals_of_runs(&dir, &["b.jsonl".into()], &config.engine.dc);
    let d = diff(&reference(&config, &other), &got);
    assert!(d.is_empty(), "{d:#?}");
}

/// Broke: a checkpoint of a stdin run restored with a file re-read the file
/// on top of the restored state (over-counted, exit 0).
#[test]
fn a_stdin_checkpoint_is_refused_for_a_file() {
    let dir = Expmon::with_demo_config();
    let lines = dir.events(13, 5_000);
    write_events(&dir, &lines);
    let first = run_stdin(&dir, &jsonl(&lines), &["--sink", "null"]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let out = run_file(&dir, &["--sink", "null"], None);
    assert_refused(&out, "stdin;", "file:");
    // And a file's checkpoint for stdin (no byte offset to resume at).
    let out = run_file(&dir, &["--sink", "null", "--checkpoint-reset"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = run_stdin(&dir, &jsonl(&lines), &["--sink", "null"]);
    assert_refused(&out, "file:", "stdin (");
}

/// A log file appended to after a crash is the same input: the restore
/// resumes at the checkpoint's offset and ends exact.
#[test]
fn a_checkpoint_of_a_file_resumes_the_same_file_grown_since() {
    let dir = Expmon::with_demo_config();
    let config = dir.config();
    let lines = dir.events(14, 200_000);
    write_events(&dir, &lines[..150_000]);
    let first = run_file(&dir, &["--sink", "file:a.jsonl"], Some("checkpoint.published@2"));
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(!first.status.success() && err.contains("aborting"), "{err}");
    let mut f = std::fs::OpenOptions::new().append(true).open(dir.path("events.jsonl")).unwrap();
    std::io::Write::write_all(&mut f, &jsonl(&lines[150_000..])).unwrap();
    drop(f);
    let second = run_file(&dir, &["--sink", "file:b.jsonl", "--threads", "2"], None);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success() && err.contains("restoring the checkpoint"), "{err}");
    let got = totals_of_runs(&dir, &["a.jsonl".into(), "b.jsonl".into()], &config.engine.dc);
    let d = diff(&reference(&config, &lines), &got);
    assert!(d.is_empty(), "{d:#?}");
}

/// Broke: the file sink truncated its file on restart, so after a restore the
/// file alone lacked every point the new run did not touch.
#[test]
fn a_restored_run_appends_to_its_file_sink_so_the_file_alone_holds_every_point() {
    let dir = Expmon::with_demo_config();
    let config = dir.config();
    let lines = dir.events(15, 200_000);
    write_events(&dir, &lines);
    let first = run_file(&dir, &["--sink", "file:points.jsonl"], Some("checkpoint.published@2"));
    let err = String::from_utf8_lossy(&first.stderr);
    assert!(!first.status.success() && err.contains("aborting"), "{err}");
    let second = run_file(&dir, &["--sink", "file:points.jsonl", "--threads", "3"], None);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success() && err.contains("restoring the checkpoint"), "{err}");
    assert!(!err.contains("torn"), "{err}");
    let got = totals_of_runs(&dir, &["points.jsonl".into()], &config.engine.dc);
    let d = diff(&reference(&config, &lines), &got);
    assert!(d.is_empty(), "{d:#?}");
}

/// Broke: a kill mid-write left a torn last line (a record cut short) that
/// the next run wrote after, so the file was no longer JSON Lines.
#[test]
fn a_torn_last_line_of_the_file_sink_is_cut_back_before_a_restored_run_appends() {
    let dir = Expmon::with_demo_config();
    let config = dir.config();
    let lines = dir.events(16, 200_000);
    write_events(&dir, &lines);
    let first = run_file(&dir, &["--sink", "file:points.jsonl"], Some("checkpoint.published@2"));
    assert!(!first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    // What SIGKILL in the middle of a write leaves: the start of a record.
    let torn = br#"{"name":"uswm.visit.fm.1231.item_page.beta","tags":{"dc":"#;
    let mut f = std::fs::OpenOptions::new().append(true).open(dir.path("points.jsonl")).unwrap();
    std::io::Write::write_all(&mut f, torn).unwrap();
    drop(f);
    let second = run_file(&dir, &["--sink", "file:points.jsonl"], None);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{err}");
    assert!(err.contains(&format!("cut {} bytes back to the last whole line", torn.len())), "{err}");
    let text = std::fs::read_to_string(dir.path("points.jsonl")).unwrap();
    for (i, line) in text.lines().enumerate() {
        assert!(serde_json::from_str::<serde_json::Value>(line).is_ok(), "line {}: {line}", i + 1);
    }
    let got = totals_of_runs(&dir, &["points.jsonl".into()], &config.engine.dc);
    let d = diff(&reference(&config, &lines), &got);
    assert!(d.is_empty(), "{d:#?}");
}

/// Kills `expmon run` with SIGKILL at random moments while events flow into
/// the topic; set `EXPMON_CRASH_KILLS` for more than the default 10.
#[test]
fn random_sigkills_against_kafka_end_exactly_like_an_uninterrupted_run() {
    let kills: usize = std::env::var("EXPMON_CRASH_KILLS").ok().and_then(|v| v.parse().ok()).unwrap_or(10);
    let seed: u64 = match std::env::var("EXPMON_TEST_SEED") {
        Ok(v) => v.parse().unwrap_or_else(|_| panic!("EXPMON_TEST_SEED={v:?} is not a u64")),
        Err(_) => std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64,
    };
    eprintln!("crash test seed {seed} (EXPMON_TEST_SEED={seed} to rerun it)");
    let mut rng = rand_pcg::Pcg64Mcg::seed_from_u64(seed);
    let (broker, dir) = (Broker::start(), Expmon::with_demo_config());
    let lines = dir.events(8, 40_000);
    let config = dir.config();
    dir.produce(&broker, "events", &[]); // creates the topic
    let mut producer = dir.produce_paced(&broker, "events", &lines, (lines.len() / (kills * 3).max(1)) as u32);
    let options = "group=crash&session.timeout.ms=2000&heartbeat.interval.ms=300";
    let mut outs = Vec::new();
    let mut killed = 0;
    while killed < kills {
        let out = format!("run-{}.jsonl", outs.len());
        let threads = rng.gen_range(1..=3).to_string();
        let args = ["--threads", threads.as_str(), "--checkpoint", "ck", "--checkpoint-interval", "300ms"];
        let mut run = dir.consume_args(&broker, "events", options, &out, &args);
        outs.push(out);
        if killed % 3 == 2 {
            // Early: often while joining the group, when the checkpoints it
            // takes hold the restored state but no partition yet.
            std::thread::sleep(Duration::from_millis(rng.gen_range(200..1500)));
        } else {
            // After it joined: while reading, writing a checkpoint, flushing.
            let deadline = Instant::now() + Duration::from_secs(30);
            while !run.log().contains(" assigned") {
                assert!(Instant::now() < deadline, "seed {seed}: no assignment in 30 s: {}", run.log());
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(rng.gen_range(100..2000)));
        }
        run.kill();
        killed += 1;
    }
    assert!(producer.wait().status.success(), "seed {seed}: the producer failed");
    // The last run reads to the end of the topic and stops by itself.
    let out = format!("run-{}.jsonl", outs.len());
    let options_end = format!("{options}&until_end=true");
    let mut last = dir.consume_args(&broker, "events", &options_end, &out, &["--checkpoint", "ck"]);
    outs.push(out);
    let status = last.run.wait().status;
    assert!(status.success(), "seed {seed}: {}", last.log());
    assert!(last.log().contains("restoring the checkpoint"), "seed {seed}: {}", last.log());
    let got = totals_of_runs(&dir, &outs, &config.engine.dc);
    let d = diff(&reference(&config, &lines), &got);
    if !d.is_empty() {
        if let Ok(keep) = std::env::var("EXPMON_CRASH_KEEP") {
            let _ = Command::new("cp").arg("-r").arg(dir.path("")).arg(format!("{keep}-{seed}")).status();
        }
    }
    assert!(d.is_empty(), "seed {seed}, {killed} kills: {} differences: {d:#?}", d.len());
}

/// Broke: the end of a finite input finalized everything before its last
/// checkpoint, which then held no sessions and no open totals; a file grown
/// since (an appended log) resumed at its saved offset and rebuilt the open
/// minutes from zero, overwriting their totals with smaller ones, exit 0.
#[test]
fn a_file_that_grows_after_its_run_ended_resumes_exactly() {
    let dir = Expmon::with_demo_config();
    let config = dir.config();
    let lines = dir.events(17, 200_000);
    write_events(&dir, &lines[..120_000]);
    let first = run_file(&dir, &["--sink", "file:points.jsonl"], None);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    let mut f = std::fs::OpenOptions::new().append(true).open(dir.path("events.jsonl")).unwrap();
    std::io::Write::write_all(&mut f, &jsonl(&lines[120_000..])).unwrap();
    drop(f);
    let second = run_file(&dir, &["--sink", "file:points.jsonl", "--threads", "3"], None);
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success() && err.contains("restoring the checkpoint"), "{err}");
    let got = totals_of_runs(&dir, &["points.jsonl".into()], &config.engine.dc);
    let d = diff(&reference(&config, &lines), &got);
    assert!(d.is_empty(), "{} wrong, e.g. {:#?}", d.len(), &d[..d.len().min(5)]);
}

/// Broke: a run that crashed before its first checkpoint left a value in
/// KairosDB; the fresh run after it never wrote that point, because its
/// deltas cancelled within one flush (an assignment moved a minute earlier),
/// so the stale value stayed. Under `--checkpoint` a fresh run writes points
/// touched at net zero too.
#[test]
fn a_fresh_run_under_checkpoints_overwrites_what_a_crashed_run_left_in_kairosdb() {
    use common::kairos_server::KairosServer;
    let dir = Expmon::with_demo_config();
    let t: i64 = 1_767_225_600_000; // a minute boundary
    let ev = |ts: i64, mp: &str| {
        format!(
            r#"{{"ts":{ts},"tenant":"uswm","session":"s","mp":"{mp}","device":"desktop","login":"in","assign":{{"123":1231}}}}"#
        )
    };
    // The first event assigns at minute t; the second, earlier, moves the
    // assignment to the minute before: minute t nets zero in one flush.
    std::fs::write(
        dir.path("events.jsonl"),
        format!("{}\n{}\n", ev(t + 30_000, "home_page"), ev(t - 10_000, "item_page")),
    )
    .unwrap();
    let server = KairosServer::start();
    let tags: std::collections::BTreeMap<String, String> = [("dc", "dc1"), ("device", "desktop"), ("login", "in")]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let stale = ("uswm.session.assigned.1231".to_string(), tags, t);
    server.state().points.insert(stale.clone(), 1); // what the crashed run wrote
    let sink = format!("kairosdb:{}?linger=5ms", server.url());
    let out = run_file(&dir, &["--sink", &sink], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(server.state().points.get(&stale), Some(&0), "the stale value was overwritten with the true total");
    let before = (stale.0.clone(), stale.1.clone(), t - 60_000);
    assert_eq!(server.state().points.get(&before), Some(&1));
}

/// Broke: two runs on one checkpoint directory overwrote each other's
/// checkpoints (one died publishing, and their shared file sink got torn
/// lines in the middle). The second is refused while the first runs.
#[test]
fn a_second_run_on_a_checkpoint_directory_in_use_is_refused() {
    let dir = Expmon::with_demo_config();
    let mut first =
        dir.run().source("file:-").sink("null").args(["--checkpoint", "ck", "--metrics-addr", "off"]).spawn();
    // The lock is taken before the run logs that it started.
    first.wait_for_log("Ctrl-C to stop");
    let second = run_file(&dir, &["--sink", "null", "--metrics-addr", "off"], None);
    let text = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{text}");
    assert_eq!(text.trim_end().lines().count(), 1, "{text}");
    assert!(text.contains("is in use by another expmon run"), "{text}");
    // End of input: the first run ends and lets go.
    assert!(first.finish().status.success());
    write_events(&dir, &dir.events(18, 1_000));
    let third = run_file(&dir, &["--sink", "null", "--metrics-addr", "off", "--checkpoint-reset"], None);
    assert!(third.status.success(), "{}", String::from_utf8_lossy(&third.stderr));
}
