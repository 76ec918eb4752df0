//! The sharded runtime: source → router → N pinned shard workers → writer → sink.
//!
//! Threads and what they own:
//! - the calling thread runs the [`Router`]: it reads the source, parses,
//!   keeps the watermark and routes events in batches over bounded crossbeam
//!   channels (a full channel blocks the router: backpressure, not loss);
//! - each worker owns the sessions and minute counters of its shard;
//! - the writer owns the merged [`Totals`] and the sink.
//!
//! Flush protocol (every `trigger`, processing time, and once at the end):
//! 1. The router sends each shard its pending batch, then a [`FlushMarker`]
//!    carrying an epoch number and the current watermark.
//! 2. Each shard, on the marker, expires sessions at that watermark, drains its
//!    non-zero deltas and frees final minutes, and sends a [`ShardReport`].
//! 3. The writer waits for all shards' reports of an epoch, adds the deltas to
//!    the totals, writes every changed total, flushes the sink, and forgets the
//!    points of final minutes.
//! 4. At end of input (or on stop) the marker's watermark is `i64::MAX`: every
//!    session expires, every minute becomes final, and all threads exit.

pub mod batch;
pub mod router;
pub mod worker;

pub use batch::{EventBatch, FlushMarker, ShardMsg, ShardReport};
pub use router::Router;
pub use worker::{final_before, Worker};

use crossbeam_channel::{bounded, Receiver, Sender};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::aggregate::{Namer, Totals};
use crate::config::Catalog;
use crate::health::{health_points, now_ms, HealthInputs, Live, ShardStats, Summary, WriterStats};
use crate::sink::{Sink, SinkError, SinkReport};
use crate::source::{Fill, LineBatch, Source};

/// Batches queued per shard before the router blocks.
const SHARD_QUEUE: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("reading {source_name}: {error}")]
    Source { source_name: String, error: std::io::Error },
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("a {0} thread panicked")]
    Panicked(&'static str),
}

/// How to run the engine.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Shard worker threads.
    pub threads: usize,
    /// Pin workers to cores (core_affinity).
    pub pin: bool,
    /// Processing-time interval between flushes.
    pub trigger: Duration,
    /// Set to stop reading, drain, flush and return.
    pub stop: Arc<AtomicBool>,
    /// Stop after this long (for live sources).
    pub max_duration: Option<Duration>,
    /// Figures for a status display.
    pub live: Arc<Live>,
    /// `instance` tag of the health metrics.
    pub instance: String,
}

impl RunOptions {
    pub fn new(catalog: &Catalog, threads: usize) -> RunOptions {
        RunOptions {
            threads: threads.max(1),
            pin: false,
            trigger: Duration::from_millis(catalog.engine.trigger_ms),
            stop: Arc::new(AtomicBool::new(false)),
            max_duration: None,
            live: Arc::new(Live::default()),
            instance: crate::health::default_instance(),
        }
    }
}

/// The default number of shard threads: one per available core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Runs the engine until the source ends or `opts.stop` is set.
pub fn run(
    catalog: Arc<Catalog>,
    mut source: Box<dyn Source>,
    sink: Box<dyn Sink>,
    opts: RunOptions,
) -> Result<Summary, RunError> {
    let started = Instant::now();
    let n = opts.threads;
    let (report_tx, report_rx) = bounded::<ShardReport>(n * 4);
    let (recycle_tx, recycle_rx) = bounded::<EventBatch>(n * (SHARD_QUEUE + 2));
    let cores = if opts.pin { core_affinity::get_core_ids().unwrap_or_default() } else { Vec::new() };

    let mut shard_txs: Vec<Sender<ShardMsg>> = Vec::with_capacity(n);
    let mut workers = Vec::with_capacity(n);
    for shard in 0..n {
        let (tx, rx) = bounded::<ShardMsg>(SHARD_QUEUE);
        shard_txs.push(tx);
        let (catalog, reports, recycle) = (catalog.clone(), report_tx.clone(), recycle_tx.clone());
        let core = (!cores.is_empty()).then(|| cores[shard % cores.len()]);
        workers.push(
            std::thread::Builder::new()
                .name(format!("expmon-shard-{shard}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    // Built on its own thread: its memory is first touched here.
                    Worker::new(shard, catalog).run(rx, reports, recycle);
                })
                .expect("spawn shard thread"),
        );
    }
    drop(report_tx);
    drop(recycle_tx);

    let writer = {
        let (catalog, live, instance) = (catalog.clone(), opts.live.clone(), opts.instance.clone());
        std::thread::Builder::new()
            .name("expmon-writer".into())
            .spawn(move || write_loop(&catalog, sink, report_rx, n, &live, &instance))
            .expect("spawn writer thread")
    };

    let mut router = Router::new(catalog, n);
    let source_result = route_loop(&mut router, source.as_mut(), &shard_txs, &recycle_rx, &opts);

    // End: pending batches, then the last marker with the watermark past everything.
    for (i, tx) in shard_txs.iter().enumerate() {
        let batch = router.take_batch(i, None);
        let _ = tx.send(ShardMsg::Events(batch));
        let _ = tx.send(ShardMsg::Flush(FlushMarker { epoch: u64::MAX, watermark: i64::MAX, last: true }));
    }
    drop(shard_txs);
    for w in workers {
        w.join().map_err(|_| RunError::Panicked("shard"))?;
    }
    let (writer_stats, shard_stats, sink_report) = writer.join().map_err(|_| RunError::Panicked("writer"))??;
    source_result?;
    opts.live.publish_router(&router.stats, i64::MAX, 0);
    Ok(Summary {
        router: router.stats.clone(),
        shards: shard_stats,
        writer: writer_stats,
        threads: n,
        elapsed: started.elapsed(),
        peak_rss_bytes: crate::health::peak_rss_bytes(),
        sink: sink_report,
    })
}

fn route_loop(
    router: &mut Router,
    source: &mut dyn Source,
    shard_txs: &[Sender<ShardMsg>],
    recycle: &Receiver<EventBatch>,
    opts: &RunOptions,
) -> Result<(), RunError> {
    let live_source = source.is_live();
    let mut lines = LineBatch::default();
    let mut next_flush = Instant::now() + opts.trigger;
    let deadline = opts.max_duration.map(|d| Instant::now() + d);
    let mut epoch = 0u64;
    loop {
        if opts.stop.load(Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
        let fill =
            source.fill(&mut lines).map_err(|error| RunError::Source { source_name: source.describe(), error })?;
        router.count_overlong(lines.overlong);
        let now = live_source.then(now_ms);
        for i in 0..lines.len() {
            if let Some(full) = router.route(lines.line(i), now) {
                let batch = router.take_batch(full, recycle.try_recv().ok());
                if shard_txs[full].send(ShardMsg::Events(batch)).is_err() {
                    return Ok(()); // the shard is gone; the writer's error says why
                }
            }
        }
        let wm = router.watermark();
        opts.live.publish_router(&router.stats, wm, router.max_ts().unwrap_or(0));
        if fill == Fill::End {
            return Ok(());
        }
        if Instant::now() >= next_flush {
            next_flush = Instant::now() + opts.trigger;
            for (i, tx) in shard_txs.iter().enumerate() {
                if router.pending(i) > 0 {
                    let batch = router.take_batch(i, recycle.try_recv().ok());
                    if tx.send(ShardMsg::Events(batch)).is_err() {
                        return Ok(());
                    }
                }
                if tx.send(ShardMsg::Flush(FlushMarker { epoch, watermark: wm, last: false })).is_err() {
                    return Ok(());
                }
            }
            epoch += 1;
        }
    }
}

/// The writer stage: merges shard reports epoch by epoch and writes changed
/// totals. Returns its own figures and the shards' last figures, summed.
fn write_loop(
    catalog: &Catalog,
    mut sink: Box<dyn Sink>,
    reports: Receiver<ShardReport>,
    shards: usize,
    live: &Live,
    instance: &str,
) -> Result<(WriterStats, ShardStats, SinkReport), SinkError> {
    let mut totals = Totals::new();
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
            let marker = group[0].marker;
            let started = Instant::now();
            for r in &group {
                totals.apply(r.deltas());
                last_stats[r.shard] = r.stats;
            }
            points.clear();
            stats.peak_points = stats.peak_points.max(totals.len() as u64);
            totals.take_due(final_before(marker.watermark), &mut points);
            if !points.is_empty() {
                let namer = Namer::new(catalog);
                sink.write(&points, &namer)?;
            }
            stats.upserts_written += points.len() as u64;
            stats.flushes += 1;
            stats.active_points = totals.len() as u64;
            let mut sum = ShardStats::default();
            for s in &last_stats {
                sum += *s;
            }
            if sum.state_bytes > stats.peak_state_bytes {
                stats.peak_state_bytes = sum.state_bytes;
                stats.peak_state_sessions = sum.held_sessions;
            }
            live.active_sessions.store(sum.active_sessions, Relaxed);
            live.active_points.store(stats.active_points, Relaxed);
            live.upserts_written.store(stats.upserts_written, Relaxed);
            let health = health_points(&HealthInputs {
                live,
                shards: &sum,
                writer: &stats,
                sink: &sink.health(),
                trigger_ms: started.elapsed().as_millis() as u64,
                now_ms: now_ms(),
                dc: &catalog.engine.dc,
                instance,
            });
            sink.write_health(now_ms(), &health)?;
            sink.flush()?;
            if marker.last {
                let report = sink.close()?;
                return Ok((stats, sum, report));
            }
        }
    }
    // The shards stopped without a last marker (one of them failed).
    let mut sum = ShardStats::default();
    for s in &last_stats {
        sum += *s;
    }
    let report = sink.close()?;
    Ok((stats, sum, report))
}
