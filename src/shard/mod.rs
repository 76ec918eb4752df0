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
//!
//! Acknowledgement: the router remembers the source's position at each
//! marker. Once the sink has acknowledged every flush up to that epoch (the
//! writer publishes the count), the source commits that position (Kafka
//! offsets), so a restart never skips input whose totals were not delivered.

pub mod batch;
pub mod router;
pub mod worker;

pub use batch::{EventBatch, FlushMarker, ShardMsg, ShardReport};
pub use router::Router;
pub use worker::{final_before, Worker};

use crossbeam_channel::{bounded, Receiver, Sender};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::aggregate::{Namer, Totals};
use crate::config::Catalog;
use crate::health::{health_points, now_ms, HealthInputs, Live, ShardStats, Summary, WriterStats};
use crate::sink::{Sink, SinkError, SinkReport};
use crate::source::{Fill, LineBatch, Offsets, Source};

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

    // Epochs whose flushes the sink has acknowledged: [0, acked).
    let acked = Arc::new(AtomicU64::new(0));
    let writer = {
        let (catalog, live, instance, acked) =
            (catalog.clone(), opts.live.clone(), opts.instance.clone(), acked.clone());
        std::thread::Builder::new()
            .name("expmon-writer".into())
            .spawn(move || write_loop(&catalog, sink, report_rx, n, &live, &instance, &acked))
            .expect("spawn writer thread")
    };

    let mut router = Router::new(catalog, n);
    let mut first_line = None;
    let source_result =
        route_loop(&mut router, source.as_mut(), &shard_txs, &recycle_rx, &opts, &acked, &mut first_line);

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
    let (writer_stats, shard_stats, mut sink_report) = writer.join().map_err(|_| RunError::Panicked("writer"))??;
    source_result?;
    // Everything read was flushed by the last marker; commit it if all arrived.
    if sink_report.undelivered == 0 {
        if let Some(pos) = source.position() {
            source.commit(&pos, true);
        }
    }
    let source_line = source.close();
    if !source_line.is_empty() {
        sink_report.summary = [sink_report.summary, source_line].join("; ").trim_start_matches("; ").to_string();
    }
    opts.live.publish_router(&router.stats, i64::MAX, 0);
    Ok(Summary {
        router: router.stats.clone(),
        shards: shard_stats,
        writer: writer_stats,
        threads: n,
        elapsed: started.elapsed(),
        first_line: first_line.map(|t| t.duration_since(started)),
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
    acked: &AtomicU64,
    first_line: &mut Option<Instant>,
) -> Result<(), RunError> {
    let live_source = source.is_live();
    let mut lines = LineBatch::default();
    let mut next_flush = Instant::now() + opts.trigger;
    let deadline = opts.max_duration.map(|d| Instant::now() + d);
    let mut epoch = 0u64;
    // Source positions at each marker not yet acknowledged, oldest first.
    let mut unacked: VecDeque<(u64, Offsets)> = VecDeque::new();
    // Watermark alignment across input partitions: none may run more than
    // the lateness ahead of the slowest, so late events stay late in a replay.
    let align_window = router.lateness_ms().max(1000);
    let (mut ahead, mut held) = (Vec::new(), Vec::<bool>::new());
    loop {
        if opts.stop.load(Relaxed) || deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(());
        }
        let fill =
            source.fill(&mut lines).map_err(|error| RunError::Source { source_name: source.describe(), error })?;
        router.count_overlong(lines.overlong);
        if first_line.is_none() && !lines.is_empty() {
            *first_line = Some(Instant::now());
        }
        let now = live_source.then(now_ms);
        let one_partition = lines.part.is_empty();
        for i in 0..lines.len() {
            let part = if one_partition { 0 } else { lines.part[i] as usize };
            match router.route(lines.line(i), part, now) {
                Ok(Some(full)) => {
                    let batch = router.take_batch(full, recycle.try_recv().ok());
                    if shard_txs[full].send(ShardMsg::Events(batch)).is_err() {
                        return Ok(()); // the shard is gone; the writer's error says why
                    }
                }
                Ok(None) => {}
                Err(reason) => source.reject(&lines, i, reason),
            }
        }
        router.set_partitions(&lines.partitions);
        if !lines.partitions.is_empty() {
            router.partitions_ahead(align_window, &mut ahead);
            held.resize(held.len().max(ahead.len()), false);
            for (p, h) in held.iter_mut().enumerate() {
                let want = ahead.get(p).copied().unwrap_or(false);
                if *h != want {
                    source.hold(p, want);
                    *h = want;
                }
            }
        }
        let wm = router.watermark();
        opts.live.publish_router(&router.stats, wm, router.max_ts().unwrap_or(0));
        let done = acked.load(Relaxed);
        let mut newest = None;
        while unacked.front().is_some_and(|(e, _)| *e < done) {
            newest = unacked.pop_front().map(|(_, pos)| pos);
        }
        if let Some(pos) = newest {
            source.commit(&pos, false);
        }
        if fill == Fill::End {
            return Ok(());
        }
        if lines.rebalanced || Instant::now() >= next_flush {
            next_flush = Instant::now() + opts.trigger;
            if let Some(pos) = source.position() {
                unacked.push_back((epoch, pos));
            }
            *opts.live.kafka_lag.lock().unwrap_or_else(|e| e.into_inner()) = source.lag();
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
    acked: &AtomicU64,
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
            // Epochs run 0, 1, 2, …: flush k (1-based) ends epoch k - 1.
            acked.store(stats.flushes.saturating_sub(sink.unacknowledged_flushes()), Relaxed);
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
