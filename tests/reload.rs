//! Hot reload of the experiments config while `expmon run` reads stdin:
//! experiments added, stopped and changed take effect at the next trigger; a
//! broken file is refused with its usual message and the running config
//! stays; a checkpoint taken after a reload restores under the new file.
//! The same scenario runs against every sink that names points: the file
//! sink, and the KairosDB sink against the strict server.

mod common;

use common::kairos_server::{KairosServer, State};
use common::runs::last_health;
use common::*;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const T0: i64 = 1_767_225_600_000;
const MIN: i64 = 60_000;

const BEFORE: &str = r#"
[engine]
trigger = "100ms"
[[experiment]]
id = 1
tenant = "uswm"
variations = [11, 12]
[[experiment]]
id = 2
tenant = "uswm"
variations = [21, 22]
"#;

/// Experiment 1 stopped, 2 changed (a third variation), 3 added.
const AFTER: &str = r#"
[engine]
trigger = "100ms"
[[experiment]]
id = 2
tenant = "uswm"
variations = [21, 22, 23]
[[experiment]]
id = 3
tenant = "uswm"
variations = [31, 32]
"#;

/// Where a run writes.
#[derive(Clone)]
enum Target {
    /// The file sink, into this file of the run's directory.
    File,
    /// The KairosDB sink, to the strict server with this URL and state.
    Kairos(String, Arc<Mutex<State>>),
}

impl Target {
    fn kairos(server: &KairosServer) -> Target {
        Target::Kairos(server.url(), server.state.clone())
    }
}

struct Run {
    run: Running,
    dir: std::path::PathBuf,
    out: String,
    target: Target,
}

impl Run {
    /// `expmon run` of `cfg.toml` in `x`, from stdin, into `out` of `target`;
    /// its log is `OUT.log`.
    fn start(x: &Expmon, out: &str, target: &Target) -> Run {
        let sink = match target {
            Target::File => format!("file:{out}"),
            Target::Kairos(url, _) => {
                format!("kairosdb:{url}?linger=5ms&backoff=5ms&backoff_max=100ms&timeout=2s&drain=20s")
            }
        };
        let run = x
            .run()
            .config("cfg.toml")
            .source("file:-")
            .sink(&sink)
            .args(["--checkpoint", "ck", "--metrics-addr", "off"])
            .named(out)
            .spawn();
        Run { run, dir: x.path(""), out: out.to_string(), target: target.clone() }
    }

    fn send(&mut self, lines: &[Vec<u8>]) {
        self.run.send_lines(lines);
    }

    fn log(&self) -> String {
        self.run.log()
    }

    /// The last `expmon.events_in` the sink received (0 if none).
    fn events_in(&self) -> i64 {
        match &self.target {
            Target::File => {
                let out = std::fs::read_to_string(self.dir.join(&self.out)).unwrap_or_default();
                last_health(&out, "events_in").0
            }
            Target::Kairos(_, state) => {
                let st = state.lock().unwrap();
                let newest = st.points.iter().filter(|(k, _)| k.0 == "expmon.events_in").max_by_key(|(k, _)| k.2);
                newest.map_or(0, |(_, v)| *v)
            }
        }
    }

    /// Final non-zero totals the sink holds (health points apart).
    fn totals(&self) -> Totals {
        match &self.target {
            Target::File => {
                totals_from_jsonl(&std::fs::read_to_string(self.dir.join(&self.out)).unwrap_or_default(), "dc1")
            }
            Target::Kairos(_, state) => {
                let mut out = Totals::new();
                for ((name, tags, ts), v) in state.lock().unwrap().points.iter() {
                    if name.starts_with("expmon.") || *v == 0 {
                        continue;
                    }
                    assert_eq!(tags["dc"], "dc1", "every point carries the dc tag");
                    out.insert((name.clone(), tags["device"].clone(), tags["login"].clone(), *ts), *v);
                }
                out
            }
        }
    }

    /// Waits until the last `expmon.events_in` written is `n`.
    fn wait_events(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let last = self.events_in();
            if last == n as i64 {
                return;
            }
            assert!(Instant::now() < deadline, "events_in {last:?}, want {n}: {}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn wait_log(&self, what: &str) {
        self.run.wait_for_log(what);
    }

    fn stop(mut self) -> Totals {
        let out = self.run.stop();
        assert!(out.status.success(), "{}", self.log());
        self.totals()
    }
}

fn sessions(prefix: &str, minute: i64, assign: &[(u64, i64)], n: usize) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| ev(T0 + minute * MIN + i as i64 * 100, &format!("{prefix}{i}"), "home_page", "desktop", "in", assign))
        .collect()
}

/// Final value of `name` at `minute` (device desktop, login in).
fn value(out: &Totals, name: &str, minute: i64) -> i64 {
    let key = (name.to_string(), "desktop".to_string(), "in".to_string(), T0 + minute * MIN);
    out.get(&key).copied().unwrap_or(0)
}

#[test]
fn experiments_added_stopped_and_changed_take_effect_and_a_bad_file_is_refused() {
    reload_scenario(&Target::File);
}

/// The KairosDB senders named points with the catalog the sink was opened
/// with: the first point of an added experiment panicked every sender and
/// nothing was delivered any more.
#[test]
fn reload_with_kairosdb_sink_keeps_delivering() {
    let server = KairosServer::start();
    reload_scenario(&Target::kairos(&server));
    assert!(server.state().refused.is_empty(), "{:?}", server.state().refused);
}

fn reload_scenario(target: &Target) {
    let x = Expmon::new();
    let cfg = x.path("cfg.toml");
    std::fs::write(&cfg, BEFORE).unwrap();
    let mut run = Run::start(&x, "a.jsonl", target);
    // Minute 0: 40 sessions in experiments 1 and 2.
    run.send(&sessions("old", 0, &[(1, 11), (2, 21)], 40));
    run.wait_events(40);

    std::fs::write(&cfg, AFTER).unwrap();
    run.run.signal("HUP");
    run.wait_log("config reloaded from");
    assert!(run.log().contains("0 kept, 1 added, 1 changed, 1 stopped"), "{}", run.log());

    // Minute 1: new sessions carry all three; the old ones come back.
    let mut lines = sessions("new", 1, &[(1, 11), (2, 23), (3, 31)], 30);
    lines.extend(sessions("old", 1, &[(2, 22)], 10));
    run.send(&lines);
    run.wait_events(80);

    // A broken file is refused with its usual message; the config in force stays.
    std::fs::write(&cfg, "[[experiment]]\nid = 0\ntenant = \"uswm\"\nvariations = [1]\n").unwrap();
    run.run.signal("HUP");
    run.wait_log("config reload refused, the running config stays");
    assert!(run.log().contains("cfg.toml:2: experiment[0].id"), "{}", run.log());
    run.send(&sessions("late", 2, &[(3, 32)], 20));
    run.wait_events(100);
    let out = run.stop();

    // Stopped: no new sessions, but the old sessions go on counting visits.
    assert_eq!(value(&out, "uswm.session.assigned.11", 0), 40);
    assert_eq!(value(&out, "uswm.session.assigned.11", 1), 0, "experiment 1 was stopped");
    assert_eq!(value(&out, "uswm.visit.assigned.11.home_page", 1), 10, "its sessions still count");
    // Changed: new sessions take the new version; a session holding the old
    // version keeps it (its later assignment under the new one is ignored).
    assert_eq!(value(&out, "uswm.session.assigned.23", 1), 30);
    assert_eq!(value(&out, "uswm.session.assigned.21", 0), 40);
    assert_eq!(value(&out, "uswm.session.assigned.22", 1), 0);
    // Added, and still in force after the refused file.
    assert_eq!(value(&out, "uswm.session.assigned.31", 1), 30);
    assert_eq!(value(&out, "uswm.session.assigned.32", 2), 20);

    // The checkpoint of the reloaded run restores under the new file.
    std::fs::write(&cfg, AFTER).unwrap();
    let mut again = Run::start(&x, "b.jsonl", target);
    again.wait_log("experiments of the checkpoint against the config file: 2 kept, 0 added, 0 changed, 0 stopped");
    again.send(&sessions("next", 3, &[(3, 32)], 5));
    again.wait_events(5);
    let out = again.stop();
    assert_eq!(value(&out, "uswm.session.assigned.32", 3), 5);
}
