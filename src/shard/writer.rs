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
                    self.experiments.observe(r.deltas(), &r.conflicts);
                    last_stats[r.shard] = r.stats;
                }
                if let Some(results) = &self.results {
                    let mut res = lock(results);
                    for r in &group {
                        res.observe(r.deltas());
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
