//! A shard worker: owns a [`SessionTable`] and [`MinuteCounters`] outright,
//! built on its own (pinned) thread. It applies event batches; on a flush marker
//! it expires sessions, drains its deltas, and reports to the writer.

use crossbeam_channel::{Receiver, Sender};
use std::sync::Arc;

use super::batch::{EventBatch, ShardMsg, ShardReport};
use crate::aggregate::{minute_of, Delta, DeltaSums, MinuteCounters, SumsBuilder};
use crate::config::Catalog;
use crate::health::ShardStats;
use crate::session::SessionTable;

/// The first minute that is not final at watermark `wm` (SPEC §4).
pub fn final_before(wm: i64) -> i64 {
    if wm == i64::MIN {
        i64::MIN
    } else {
        minute_of(wm)
    }
}

pub struct Worker {
    shard: usize,
    sessions: SessionTable,
    counters: MinuteCounters,
    /// Sums the drain adds to, kept from one drain to the next.
    sums: SumsBuilder,
    /// Delta vectors the writer is done with, to drain into.
    spent_deltas: Option<Receiver<Vec<Delta>>>,
    events: u64,
}

impl Worker {
    pub fn new(shard: usize, catalog: Arc<Catalog>) -> Worker {
        Worker {
            shard,
            sessions: SessionTable::new(catalog.clone()),
            counters: MinuteCounters::new(catalog),
            sums: SumsBuilder::default(),
            spent_deltas: None,
            events: 0,
        }
    }

    /// Adds sessions restored from a checkpoint (encoded by `SessionTable::encode`).
    pub fn restore(&mut self, sessions: &[(crate::session::SessionKey, Vec<u8>)]) {
        for (key, bytes) in sessions {
            // Checked when the checkpoint was loaded.
            self.sessions.restore(*key, bytes).expect("restored session decodes");
        }
        self.counters.set_track_touched(true);
    }

    /// Reports counters touched at net zero too, so that their points are
    /// rewritten: a sink may hold a stale value of them (a restore does this
    /// by itself).
    pub fn rewrite_zero_totals(&mut self) {
        self.counters.set_track_touched(true);
    }

    /// Drains into the delta vectors `spent` hands back (the writer's,
    /// once merged) instead of new ones.
    pub fn reuse_deltas_from(&mut self, spent: Receiver<Vec<Delta>>) {
        self.spent_deltas = Some(spent);
    }

    pub fn apply(&mut self, batch: &EventBatch) {
        // Session state is mostly out of cache; looking the sessions of a
        // stretch of events up first, with nothing depending on the loads, lets
        // the CPU overlap those misses instead of taking them one by one.
        const AHEAD: usize = 64;
        for (i, e) in batch.events.iter().enumerate() {
            if i % AHEAD == 0 {
                for f in batch.events[i..].iter().take(AHEAD) {
                    self.sessions.touch(&f.key);
                }
            }
            self.sessions.add(e, &batch.assigns, &batch.attrs, &mut self.counters);
        }
        self.events += batch.events.len() as u64;
    }

    /// Expires sessions at `watermark`, and returns the deltas since the last
    /// drain (the counters are then empty).
    pub fn drain_deltas(&mut self, watermark: i64) -> Vec<Delta> {
        self.drain(watermark, Vec::new()).0
    }

    /// [`Worker::drain_deltas`] into `deltas` (emptied first, its memory
    /// reused), with their [`DeltaSums`].
    pub fn drain(&mut self, watermark: i64, mut deltas: Vec<Delta>) -> (Vec<Delta>, DeltaSums) {
        self.sessions.expire(watermark);
        deltas.clear();
        self.counters.drain_summed(&mut deltas, &mut self.sums);
        (deltas, self.sums.take())
    }

    /// Runs until the last flush marker: batches in, reports out, emptied
    /// batches back to the router for reuse.
    pub fn run(mut self, rx: Receiver<ShardMsg>, reports: Sender<ShardReport>, recycle: Sender<EventBatch>) {
        for msg in rx {
            match msg {
                ShardMsg::Events(mut batch) => {
                    self.apply(&batch);
                    batch.clear();
                    let _ = recycle.try_send(batch);
                }
                ShardMsg::Flush(marker) => {
                    crate::failures::failpoint("shard.flush");
                    // State size before this flush's expiry: at the end of a
                    // replay that is the whole state, just before it is freed.
                    let (held_sessions, state_bytes) = (self.sessions.len() as u64, self.sessions.state_bytes() as u64);
                    let spare = self.spent_deltas.as_ref().and_then(|r| r.try_recv().ok()).unwrap_or_default();
                    let (deltas, sums) = self.drain(marker.watermark, spare);
                    let s = self.sessions.stats();
                    let stats = ShardStats {
                        events: self.events,
                        active_sessions: self.sessions.len() as u64,
                        sessions_started: s.started,
                        sessions_evicted: s.evicted,
                        conflicts: s.conflicts,
                        overflow_dropped: s.overflow_dropped,
                        held_sessions,
                        state_bytes,
                    };
                    let snapshot = marker.snapshot.then(|| {
                        let started = std::time::Instant::now();
                        let mut e = crate::codec::Enc::default();
                        self.sessions.encode(&mut e);
                        (e.buf, started.elapsed())
                    });
                    let last = marker.last;
                    let conflicts = self.sessions.take_conflicts();
                    // A reload takes effect after this drain: the counters are empty.
                    if let Some(c) = &marker.catalog {
                        self.sessions.set_catalog(c.clone());
                        let track = self.counters.tracks_touched();
                        self.counters = MinuteCounters::new(c.clone());
                        self.counters.set_track_touched(track);
                    }
                    let report = ShardReport { shard: self.shard, marker, deltas, sums, stats, conflicts, snapshot };
                    if reports.send(report).is_err() || last {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The worker on its own thread, fed and read over the channels `run`
    //! gives it: batches routed by a real [`crate::shard::Router`] in, reports out.

    use super::*;
    use crate::aggregate::Namer;
    use crate::config::Config;
    use crate::names::Names;
    use crate::session::SessionKey;
    use crate::shard::{FlushMarker, Router};
    use crossbeam_channel::bounded;
    use std::collections::BTreeMap;
    use std::thread::JoinHandle;

    /// A minute-aligned time (2026-01-01 00:00 UTC).
    const T0: i64 = 1_767_225_600_000;
    const MIN: i64 = 60_000;

    /// The demo config: session gap 30 minutes; experiment 123 (variations
    /// 1231, 1232) reports home_page, qualified by a home_page visit.
    fn demo() -> Arc<Catalog> {
        Arc::new(Catalog::build(&Config::demo(), Arc::new(Names::default())).unwrap())
    }

    /// An event of `session` at `T0 + at`, on `mp`, with the `assign` members given.
    fn line(session: &str, at: i64, mp: &str, assign: &str) -> Vec<u8> {
        let assign = if assign.is_empty() { String::new() } else { format!(r#","assign":{{{assign}}}"#) };
        format!(r#"{{"ts":{},"tenant":"uswm","session":"{session}","mp":"{mp}"{assign}}}"#, T0 + at).into_bytes()
    }

    /// `lines` routed to a one-shard router's batch.
    fn batch(router: &mut Router, lines: &[Vec<u8>]) -> EventBatch {
        for l in lines {
            router.route(l, 0, None).expect("valid event");
        }
        router.take_batch(0, None)
    }

    fn marker(epoch: u64, watermark: i64) -> FlushMarker {
        FlushMarker { epoch, watermark, last: false, snapshot: false, catalog: None, health: false }
    }

    /// A worker running on its own thread, as `run` starts it.
    struct Running {
        tx: Sender<ShardMsg>,
        reports: Receiver<ShardReport>,
        recycled: Receiver<EventBatch>,
        thread: JoinHandle<()>,
    }

    /// The demo catalog, a one-shard router for it, and worker `shard` running.
    fn start(shard: usize) -> (Arc<Catalog>, Router, Running) {
        let catalog = demo();
        let (tx, rx) = bounded(4);
        let (report_tx, reports) = bounded(4);
        let (recycle_tx, recycled) = bounded(4);
        let worker = Worker::new(shard, catalog.clone());
        let thread = std::thread::spawn(move || worker.run(rx, report_tx, recycle_tx));
        (catalog.clone(), Router::new(catalog, 1), Running { tx, reports, recycled, thread })
    }

    impl Running {
        fn send(&self, batch: EventBatch) {
            self.tx.send(ShardMsg::Events(batch)).unwrap();
        }
        fn flush(&self, marker: FlushMarker) -> ShardReport {
            self.tx.send(ShardMsg::Flush(marker)).unwrap();
            self.reports.recv().expect("a report for the marker")
        }
    }

    /// A report's deltas by (point name, minute), summed.
    fn named(report: &ShardReport, catalog: &Catalog) -> BTreeMap<(String, i64), i64> {
        let namer = Namer::new(catalog);
        let mut out = BTreeMap::new();
        for d in report.deltas() {
            *out.entry((namer.name(d.key), d.minute)).or_default() += d.delta;
        }
        out
    }

    fn total(points: &BTreeMap<(String, i64), i64>, name: &str, minute: i64) -> i64 {
        points.get(&(name.to_string(), T0 + minute * MIN)).copied().unwrap_or(0)
    }

    #[test]
    fn a_marker_drains_the_deltas_of_the_batches_before_it_and_reports_stats() {
        let (catalog, mut router, w) = start(3);
        w.send(batch(&mut router, &[line("a", 0, "home_page", r#""123":1231"#), line("a", MIN, "home_page", "")]));
        w.send(batch(&mut router, &[line("b", 2 * MIN, "item_page", r#""123":1232"#)]));
        let report = w.flush(marker(0, i64::MIN));
        assert_eq!((report.shard, report.marker.epoch), (3, 0));
        let points = named(&report, &catalog);
        assert_eq!(total(&points, "uswm.session.assigned.1231", 0), 1);
        assert_eq!(total(&points, "uswm.visit.assigned.1231.home_page", 0), 1);
        assert_eq!(total(&points, "uswm.visit.assigned.1231.home_page", 1), 1);
        assert_eq!(total(&points, "uswm.session.fm.1231", 0), 1);
        assert_eq!(total(&points, "uswm.session.assigned.1232", 2), 1);
        assert_eq!(total(&points, "uswm.visit.assigned.1232.item_page", 2), 1);
        assert_eq!(total(&points, "uswm.session.fm.1232", 2), 0, "b never visited home_page");
        let s = report.stats;
        assert_eq!((s.events, s.sessions_started, s.active_sessions, s.held_sessions), (3, 2, 2, 2));
        assert!(s.state_bytes > 0);
        assert!(report.snapshot.is_none(), "no snapshot unless the marker asks");
        // Each applied batch came back emptied, for the router to reuse.
        for _ in 0..2 {
            let b = w.recycled.recv().unwrap();
            assert!(b.events.is_empty() && b.assigns.is_empty() && b.attrs.is_empty());
        }
        // The counters were emptied by the drain: a marker with nothing new reports nothing.
        let report = w.flush(marker(1, i64::MIN));
        assert!(report.deltas().is_empty(), "{:?}", report.deltas());
        assert_eq!(report.stats.events, 3);
        let report = w.flush(FlushMarker { last: true, ..marker(2, i64::MIN) });
        assert!(report.marker.last);
        w.thread.join().expect("the worker exits after the last marker");
    }

    #[test]
    fn a_marker_expires_the_sessions_gone_at_its_watermark() {
        let (catalog, mut router, w) = start(0);
        w.send(batch(
            &mut router,
            &[line("old", 0, "home_page", r#""123":1231"#), line("new", 10 * MIN, "home_page", r#""123":1231"#)],
        ));
        // 30 minutes after "old" is still within the gap; 30 minutes and 1 ms is not.
        let report = w.flush(marker(0, T0 + 30 * MIN));
        assert_eq!((report.stats.sessions_evicted, report.stats.active_sessions), (0, 2));
        let report = w.flush(marker(1, T0 + 30 * MIN + 1));
        let s = report.stats;
        assert_eq!((s.sessions_evicted, s.active_sessions, s.held_sessions), (1, 1, 2));
        // The expired session's contributions stay; a later event of its id starts a new session.
        w.send(batch(&mut router, &[line("old", 41 * MIN, "home_page", r#""123":1231"#)]));
        let report = w.flush(marker(2, T0 + 30 * MIN + 1));
        let points = named(&report, &catalog);
        assert_eq!(total(&points, "uswm.session.assigned.1231", 41), 1);
        assert_eq!(total(&points, "uswm.session.assigned.1231", 0), 0, "nothing is taken back");
        assert_eq!((report.stats.sessions_started, report.stats.active_sessions), (3, 2));
    }

    #[test]
    fn a_checkpoint_marker_reports_the_sessions_encoded() {
        let (catalog, mut router, w) = start(0);
        w.send(batch(&mut router, &[line("a", 0, "home_page", r#""123":1231"#), line("b", MIN, "item_page", "")]));
        let report = w.flush(FlushMarker { snapshot: true, ..marker(0, i64::MIN) });
        let (bytes, _pause) = report.snapshot.expect("a snapshot at a checkpoint marker");
        let mut keys = Vec::new();
        let mut sessions = Vec::new();
        crate::session::SessionTable::decode_each(&mut crate::codec::Dec::new(&bytes), |key, s| {
            keys.push(key);
            sessions.push((key, s.to_vec()));
        })
        .expect("the snapshot decodes");
        let tenant = catalog.tenant("uswm").unwrap();
        keys.sort_by_key(|k| k.0);
        let mut want = vec![SessionKey::new(tenant, "a"), SessionKey::new(tenant, "b")];
        want.sort_by_key(|k| k.0);
        assert_eq!(keys, want);
        // Restored elsewhere, the sessions continue: a's assignment is not counted again.
        let mut restored = Worker::new(0, catalog.clone());
        restored.restore(&sessions);
        restored.apply(&batch(&mut router, &[line("a", 2 * MIN, "home_page", r#""123":1231"#)]));
        let deltas = restored.drain_deltas(i64::MIN);
        let namer = Namer::new(&catalog);
        let names: Vec<String> = deltas.iter().filter(|d| d.delta != 0).map(|d| namer.name(d.key)).collect();
        assert!(names.contains(&"uswm.visit.assigned.1231.home_page".to_string()), "{names:?}");
        assert!(!names.contains(&"uswm.session.assigned.1231".to_string()), "{names:?}");
    }

    #[test]
    fn a_reload_marker_swaps_the_catalog_after_its_drain() {
        let (catalog, mut router, w) = start(0);
        w.send(batch(&mut router, &[line("a", 0, "home_page", r#""123":1231"#)]));
        let mut config = Config::demo();
        let mut x = config.experiments[0].clone();
        (x.id, x.variations) = (999_001, vec![999_011]);
        config.experiments.push(x);
        let (reloaded, _) = catalog.reload(&config).unwrap();
        let reloaded = Arc::new(reloaded);
        let report = w.flush(FlushMarker { catalog: Some(reloaded.clone()), ..marker(0, i64::MIN) });
        // The drain covers what came before, counted under the old catalog.
        let points = named(&report, &catalog);
        assert_eq!(total(&points, "uswm.session.assigned.1231", 0), 1);
        assert_eq!(points.keys().filter(|(n, _)| n.contains("999011")).count(), 0);
        // From the marker on, the new experiment is known to the shard.
        router.set_catalog(reloaded.clone());
        w.send(batch(&mut router, &[line("a", MIN, "home_page", r#""123":1231,"999001":999011"#)]));
        let report = w.flush(marker(1, i64::MIN));
        let points = named(&report, &reloaded);
        assert_eq!(total(&points, "uswm.session.assigned.999011", 1), 1);
        assert_eq!(total(&points, "uswm.visit.assigned.999011.home_page", 1), 1);
        assert_eq!(total(&points, "uswm.visit.assigned.1231.home_page", 1), 1);
        assert_eq!(total(&points, "uswm.session.assigned.1231", 1), 0, "a keeps its assignment at 0");
    }
}
