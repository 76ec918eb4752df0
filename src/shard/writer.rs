//! The writer stage: merges the shards' reports epoch by epoch into the
//! [`Totals`], writes every changed total to the sink, writes the health
//! points that are due, and hands checkpoints to the [`Checkpointer`] (steps 3
//! and 4 of the flush protocol in [`crate::shard`]).

use crossbeam_channel::Receiver;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Instant;

use super::batch::ShardReport;
use super::runtime::RunError;
use super::worker::final_before;
use crate::aggregate::{Namer, Totals};
use crate::checkpoint::{Checkpointer, ShardPart};
use crate::clock::now_ms;
use crate::config::Catalog;
use crate::failures::lock;
use crate::health::{health_points, ExperimentHealth, HealthInputs, HealthWrites, Live, ShardStats, WriterStats};
use crate::metrics::SinkReport;
use crate::sink::Sink;

/// The writer stage: merges shard reports epoch by epoch, writes changed
/// totals, and writes checkpoints.
pub(super) struct Writer<'a> {
    pub(super) catalog: Arc<Catalog>,
    pub(super) sink: Box<dyn Sink>,
    pub(super) totals: Totals,
    pub(super) live: &'a Live,
    pub(super) instance: &'a str,
    pub(super) ckpt: Checkpointer,
    pub(super) experiments: ExperimentHealth,
    /// Which health points each trigger writes (all of them go to `/metrics`).
    pub(super) health_writes: HealthWrites,
    pub(super) published: Option<Arc<crate::serve::Published>>,
    pub(super) results: Option<crate::serve::SharedResults>,
    /// Merged reports' delta vectors go back to the shards here (if there is
    /// room), so that a drain reuses their memory.
    pub(super) spent_deltas: Option<crossbeam_channel::Sender<Vec<crate::aggregate::Delta>>>,
}

impl Writer<'_> {
    /// A reload reaches every stage after the writer in one step: what names
    /// or indexes points (the sink, experiment health, results) takes the new
    /// catalog before the first point built with it. Indices only grow, so
    /// what is held or still queued stays valid under it.
    fn set_catalog(&mut self, c: &Arc<Catalog>) {
        self.catalog = c.clone();
        self.sink.set_catalog(c);
        self.experiments.set_catalog(c.clone());
        if let Some(results) = &self.results {
            lock(results).set_catalog(c.clone());
        }
    }

    /// Returns its own figures, the shards' last figures summed, and the sink's report.
    pub(super) fn run(
        &mut self,
        reports: Receiver<ShardReport>,
        shards: usize,
        acked: &AtomicU64,
    ) -> Result<(WriterStats, ShardStats, SinkReport), RunError> {
        let mut pending: BTreeMap<u64, Vec<ShardReport>> = BTreeMap::new();
        let mut last_stats = vec![ShardStats::default(); shards];
        let mut stats = WriterStats::default();
        let mut points = Vec::new();
        for report in reports {
            let epoch = report.marker.epoch;
            pending.entry(epoch).or_default().push(report);
            while let Some(entry) = pending.first_entry() {
                if entry.get().len() < shards {
                    break;
                }
                let group = entry.remove();
                let marker = group[0].marker.clone();
                let started = Instant::now();
                for r in &group {
                    self.totals.apply(r.deltas());
                    self.experiments.observe_sums(&r.sums, &r.conflicts);
                    last_stats[r.shard] = r.stats;
                }
                if let Some(results) = &self.results {
                    let mut res = lock(results);
                    for r in &group {
                        res.observe_sums(&r.sums);
                    }
                    res.trim();
                }
                points.clear();
                stats.peak_points = stats.peak_points.max(self.totals.len() as u64);
                self.totals.take_due(final_before(marker.watermark), &mut points);
                crate::failures::failpoint("writer.flush");
                if !points.is_empty() {
                    let namer = Namer::new(&self.catalog);
                    self.sink.write(&points, &namer)?;
                    crate::failures::failpoint("sink.written");
                }
                stats.upserts_written += points.len() as u64;
                stats.totals_clamped = self.totals.clamped();
                stats.flushes += 1;
                stats.active_points = self.totals.len() as u64;
                let mut sum = ShardStats::default();
                for s in &last_stats {
                    sum += *s;
                }
                if sum.state_bytes > stats.peak_state_bytes {
                    stats.peak_state_bytes = sum.state_bytes;
                    stats.peak_state_sessions = sum.held_sessions;
                }
                let live = self.live;
                let sink_health = self.sink.health();
                live.state_bytes.store(sum.state_bytes, Relaxed);
                live.sink_latency_p99_us.store(sink_health.latency_p99_us, Relaxed);
                live.sink_errors.store(sink_health.rejected_points, Relaxed);
                live.sink_retries.store(sink_health.retries, Relaxed);
                live.sink_queued.store(sink_health.queued_points, Relaxed);
                live.active_sessions.store(sum.active_sessions, Relaxed);
                live.active_points.store(stats.active_points, Relaxed);
                live.upserts_written.store(stats.upserts_written, Relaxed);
                let final_at = final_before(marker.watermark);
                self.experiments.judge_stalls(final_at);
                if marker.health {
                    let mut health = health_points(&HealthInputs {
                        live,
                        shards: &sum,
                        writer: &stats,
                        sink: &sink_health,
                        trigger_ms: started.elapsed().as_millis() as u64,
                        now_ms: now_ms(),
                        dc: &self.catalog.engine.dc,
                        instance: self.instance,
                    });
                    health.extend(self.experiments.points(final_at, &self.catalog.engine.dc, self.instance));
                    let due = self.health_writes.due(&health);
                    stats.health_points_written += due.len() as u64;
                    stats.health_writes += 1;
                    self.sink.write_health(now_ms(), &due)?;
                    if let Some(p) = &self.published {
                        let snapshot = crate::serve::Snapshot { points: health, write_latency: sink_health.latency };
                        *lock(&p.health) = snapshot;
                    }
                }
                self.sink.flush()?;
                if marker.snapshot {
                    let parts: Vec<ShardPart<'_>> =
                        group.iter().map(|r| ShardPart { shard: r.shard, sessions: r.snapshot.as_ref() }).collect();
                    let epoch = marker.epoch;
                    if let Some(w) = self.ckpt.write(&parts, &self.catalog.defs, &self.totals, epoch, stats.flushes)? {
                        stats.checkpoints_written += 1;
                        stats.checkpoint_pause_max_us = stats.checkpoint_pause_max_us.max(w.pause.as_micros() as u64);
                        stats.checkpoint_bytes = stats.checkpoint_bytes.max(w.bytes);
                    }
                }
                if let Some(spent) = &self.spent_deltas {
                    for r in group {
                        let _ = spent.try_send(r.deltas);
                    }
                }
                // Epochs run 0, 1, 2, …: flush k (1-based) ends epoch k - 1.
                let acked_flushes = stats.flushes.saturating_sub(self.sink.unacknowledged_flushes());
                acked.store(acked_flushes, Relaxed);
                if self.ckpt.publish_if_acknowledged(acked_flushes)? {
                    stats.checkpoints_published += 1;
                }
                if let Some(c) = &marker.catalog {
                    self.set_catalog(c);
                }
                if marker.last {
                    let report = self.sink.close()?;
                    if report.undelivered == 0 && self.ckpt.publish_if_acknowledged(stats.flushes)? {
                        stats.checkpoints_published += 1;
                    }
                    return Ok((stats, sum, report));
                }
            }
        }
        // The shards stopped without a last marker (one of them failed).
        let mut sum = ShardStats::default();
        for s in &last_stats {
            sum += *s;
        }
        let report = self.sink.close()?;
        Ok((stats, sum, report))
    }
}

#[cfg(test)]
mod tests {
    //! The writer driven over its report channel with reports whose deltas
    //! real workers drained, writing to a sink that records every call.

    use super::*;
    use crate::aggregate::Delta;
    use crate::checkpoint::CheckpointOptions;
    use crate::config::Config;
    use crate::metrics::HealthPoint;
    use crate::names::Names;
    use crate::shard::{EventBatch, FlushMarker, Router, Worker};
    use crate::sink::SinkError;
    use crate::source::{SourceId, SourceKind};
    use std::path::PathBuf;
    use std::sync::Mutex;
    use std::time::Duration;

    /// A minute-aligned time (2026-01-01 00:00 UTC).
    const T0: i64 = 1_767_225_600_000;
    const MIN: i64 = 60_000;

    /// What the writer asked of the sink, in order; points as (name, minute
    /// after `T0`, value).
    #[derive(Debug, Clone, PartialEq, Eq)]
    enum Call {
        Write(Vec<(String, i64, i64)>),
        Health,
        /// `published`: whether a checkpoint had been published when the flush came.
        Flush {
            published: bool,
        },
        Close,
    }

    struct Recorder {
        calls: Arc<Mutex<Vec<Call>>>,
        /// What `unacknowledged_flushes` answers after flush `i + 1`; 0 beyond.
        unacked: Vec<u64>,
        flushes: usize,
        /// The checkpoint directory, if any.
        dir: Option<PathBuf>,
    }

    impl Recorder {
        fn new(calls: &Arc<Mutex<Vec<Call>>>) -> Recorder {
            Recorder { calls: calls.clone(), unacked: Vec::new(), flushes: 0, dir: None }
        }
        fn record(&self, c: Call) {
            lock(&self.calls).push(c);
        }
    }

    impl Sink for Recorder {
        fn write(&mut self, points: &[crate::aggregate::Point], namer: &Namer) -> Result<(), SinkError> {
            self.record(Call::Write(
                points.iter().map(|p| (namer.name(p.key), (p.minute - T0) / MIN, p.value)).collect(),
            ));
            Ok(())
        }
        fn write_health(&mut self, _: i64, _: &[HealthPoint]) -> Result<(), SinkError> {
            self.record(Call::Health);
            Ok(())
        }
        fn flush(&mut self) -> Result<(), SinkError> {
            self.flushes += 1;
            let published = self.dir.as_ref().is_some_and(|d| d.join(crate::checkpoint::FILE).exists());
            self.record(Call::Flush { published });
            Ok(())
        }
        fn unacknowledged_flushes(&self) -> u64 {
            self.unacked.get(self.flushes.wrapping_sub(1)).copied().unwrap_or(0)
        }
        fn close(&mut self) -> Result<SinkReport, SinkError> {
            self.record(Call::Close);
            Ok(SinkReport::default())
        }
        fn describe(&self) -> String {
            "recorder".into()
        }
    }

    fn demo() -> Arc<Catalog> {
        Arc::new(Catalog::build(&Config::demo(), Arc::new(Names::default())).unwrap())
    }

    /// The deltas a worker drains after `events`: (session, minute after `T0`, mp), each assigned to 1231.
    fn deltas(catalog: &Arc<Catalog>, events: &[(&str, i64, &str)]) -> Vec<Delta> {
        let mut router = Router::new(catalog.clone(), 1);
        for (session, minute, mp) in events {
            let line = format!(
                r#"{{"ts":{},"tenant":"uswm","session":"{session}","mp":"{mp}","assign":{{"123":1231}}}}"#,
                T0 + minute * MIN
            );
            router.route(line.as_bytes(), 0, None).expect("valid event");
        }
        let batch: EventBatch = router.take_batch(0, None);
        let mut worker = Worker::new(0, catalog.clone());
        worker.apply(&batch);
        worker.drain_deltas(i64::MIN)
    }

    fn marker(epoch: u64, watermark: i64) -> FlushMarker {
        FlushMarker { epoch, watermark, last: false, snapshot: false, catalog: None, health: false }
    }

    fn report(shard: usize, marker: FlushMarker, deltas: Vec<Delta>) -> ShardReport {
        let snapshot = marker.snapshot.then(|| {
            let mut e = crate::codec::Enc::default();
            crate::session::SessionTable::new(demo()).encode(&mut e);
            (e.buf, Duration::ZERO)
        });
        let sums = crate::aggregate::DeltaSums::from_deltas(&deltas);
        ShardReport { shard, marker, deltas, sums, stats: ShardStats::default(), conflicts: Vec::new(), snapshot }
    }

    /// Runs a writer over `reports` (in that order) for `shards` shards.
    fn run(
        catalog: &Arc<Catalog>,
        shards: usize,
        reports: Vec<ShardReport>,
        sink: Recorder,
        ckpt: Checkpointer,
    ) -> WriterStats {
        let (tx, rx) = crossbeam_channel::unbounded();
        for r in reports {
            tx.send(r).unwrap();
        }
        drop(tx);
        let live = Live::default();
        let mut writer = Writer {
            catalog: catalog.clone(),
            sink: Box::new(sink),
            totals: Totals::default(),
            live: &live,
            instance: "test",
            ckpt,
            experiments: ExperimentHealth::new(catalog.clone()),
            health_writes: HealthWrites::new(),
            published: None,
            results: None,
            spent_deltas: None,
        };
        let acked = AtomicU64::new(0);
        writer.run(rx, shards, &acked).expect("the writer runs").0
    }

    fn no_checkpoints() -> Checkpointer {
        Checkpointer::new(None, crossbeam_channel::never())
    }

    fn writes(calls: &[Call]) -> Vec<Vec<(String, i64, i64)>> {
        calls.iter().filter_map(|c| if let Call::Write(p) = c { Some(p.clone()) } else { None }).collect()
    }

    #[test]
    fn an_epoch_is_merged_once_every_shard_reported_and_a_shared_point_written_once_with_the_sum() {
        let catalog = demo();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let a = deltas(&catalog, &[("a", 0, "home_page")]);
        let b = deltas(&catalog, &[("b", 0, "home_page"), ("b", 1, "item_page")]);
        let last = FlushMarker { last: true, health: true, ..marker(1, i64::MIN) };
        // Shard 0 reports both epochs before shard 1 reports the first.
        let reports = vec![
            report(0, marker(0, i64::MIN), a.clone()),
            report(0, last.clone(), Vec::new()),
            report(1, marker(0, i64::MIN), b.clone()),
            report(1, last, Vec::new()),
        ];
        let stats = run(&catalog, 2, reports, Recorder::new(&calls), no_checkpoints());
        let calls = lock(&calls).clone();
        let written = writes(&calls);
        assert_eq!(written.len(), 1, "{calls:?}");
        assert!(matches!(calls[0], Call::Write(_)), "epoch 0 is written as one, before any flush: {calls:?}");
        let points = &written[0];
        let mut names: Vec<_> = points.iter().map(|p| (&p.0, p.1)).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), points.len(), "each point once: {points:?}");
        let get = |name: &str, minute: i64| points.iter().find(|p| p.0 == name && p.1 == minute).map(|p| p.2);
        assert_eq!(get("uswm.session.assigned.1231", 0), Some(2));
        assert_eq!(get("uswm.visit.assigned.1231.home_page", 0), Some(2));
        assert_eq!(get("uswm.visit.assigned.1231.item_page", 1), Some(1));
        assert_eq!(stats.upserts_written, points.len() as u64);
        assert_eq!(stats.flushes, 2);
    }

    #[test]
    fn the_points_of_final_minutes_are_forgotten_after_their_last_write() {
        let catalog = demo();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let first = deltas(&catalog, &[("a", 0, "home_page"), ("a", 5, "home_page")]);
        let late = deltas(&catalog, &[("c", 0, "home_page")]);
        let reports = vec![
            report(0, marker(0, i64::MIN), first),
            // Minute 0 (and 1, 2) final: written already, then forgotten.
            report(0, marker(1, T0 + 3 * MIN), Vec::new()),
            report(0, FlushMarker { last: true, ..marker(2, T0 + 3 * MIN) }, late),
        ];
        let stats = run(&catalog, 1, reports, Recorder::new(&calls), no_checkpoints());
        let written = writes(&lock(&calls));
        assert_eq!(written.len(), 2, "{written:?}");
        let held_after = written[0].iter().filter(|p| p.1 >= 3).count() as u64;
        assert!(held_after > 0 && held_after < written[0].len() as u64, "{:?}", written[0]);
        assert_eq!(stats.peak_points, written[0].len() as u64);
        // A forgotten point starts again from nothing: it is not added to the total written before.
        assert!(written[1].contains(&("uswm.session.assigned.1231".to_string(), 0, 1)), "{:?}", written[1]);
        assert!(written[0].contains(&("uswm.session.assigned.1231".to_string(), 0, 1)));
        assert_eq!(stats.active_points, held_after, "minutes 0 to 2 are forgotten again");
    }

    #[test]
    fn health_points_are_written_at_trigger_markers_only() {
        let catalog = demo();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let trigger = |epoch| FlushMarker { health: true, ..marker(epoch, i64::MIN) };
        let reports = vec![
            report(0, marker(0, i64::MIN), deltas(&catalog, &[("a", 0, "home_page")])),
            report(0, trigger(1), Vec::new()),
            report(0, marker(2, i64::MIN), deltas(&catalog, &[("b", 0, "home_page")])),
            report(0, FlushMarker { last: true, ..trigger(3) }, Vec::new()),
        ];
        let stats = run(&catalog, 1, reports, Recorder::new(&calls), no_checkpoints());
        let calls: Vec<Call> = lock(&calls).iter().filter(|c| !matches!(c, Call::Write(_))).cloned().collect();
        let flush = Call::Flush { published: false };
        assert_eq!(
            calls,
            [flush.clone(), Call::Health, flush.clone(), flush.clone(), Call::Health, flush, Call::Close],
            "health before the flush of epochs 1 and 3 only"
        );
        assert_eq!(stats.health_writes, 2);
    }

    #[test]
    fn a_checkpoint_written_at_a_snapshot_marker_is_published_once_the_sink_acknowledged_it() {
        let catalog = demo();
        let dir = tempfile::tempdir().unwrap();
        let calls = Arc::new(Mutex::new(Vec::new()));
        let options = CheckpointOptions {
            dir: dir.path().to_path_buf(),
            interval: Duration::from_secs(60),
            fingerprint: 7,
            source: SourceId { kind: SourceKind::Gen, name: "test".into(), group: String::new(), file: None },
        };
        let (router_tx, router_rx) = crossbeam_channel::unbounded();
        router_tx.send(Router::new(catalog.clone(), 1).checkpoint_state(vec![(0, 42)])).unwrap();
        let ckpt = Checkpointer::new(Some(options), router_rx);
        let committable = ckpt.committable();
        // Flushes 1 and 2 still have points on their way; from flush 3 on all arrived.
        let sink = Recorder { unacked: vec![1, 2], dir: Some(dir.path().to_path_buf()), ..Recorder::new(&calls) };
        let reports = vec![
            report(
                0,
                FlushMarker { snapshot: true, ..marker(0, i64::MIN) },
                deltas(&catalog, &[("a", 0, "home_page")]),
            ),
            report(0, marker(1, i64::MIN), Vec::new()),
            report(0, marker(2, i64::MIN), Vec::new()),
            report(0, FlushMarker { last: true, ..marker(3, i64::MIN) }, Vec::new()),
        ];
        let stats = run(&catalog, 1, reports, sink, ckpt);
        let flushes: Vec<bool> = lock(&calls)
            .iter()
            .filter_map(|c| if let Call::Flush { published } = c { Some(*published) } else { None })
            .collect();
        assert_eq!(flushes, [false, false, false, true], "published during epoch 2, after its flush");
        assert_eq!((stats.checkpoints_written, stats.checkpoints_published), (1, 1));
        assert_eq!(*lock(&committable), Some(vec![(0, 42)]), "the checkpoint's positions may be committed");
        let snap = crate::checkpoint::load(dir.path(), 7).expect("loads").expect("a checkpoint");
        assert_eq!(snap.epoch, 0);
        assert_eq!(snap.shards.len(), 1);
        let written = &writes(&lock(&calls))[0];
        assert_eq!(snap.totals.len(), written.len(), "the totals as of epoch 0");
        assert!(snap.totals.iter().all(|t| t.3 == Some(t.2 as i64)), "each written as it is");
    }
}
