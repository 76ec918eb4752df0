//! The sharded runtime: source → router → N pinned shard workers → writer → sink.
//!
//! Threads and what they own:
//! - the calling thread runs the [`Router`]: it reads the source, parses,
//!   keeps the watermark and routes events in batches over bounded crossbeam
//!   channels (a full channel blocks the router: backpressure, not loss);
//! - each worker owns the sessions and minute counters of its shard;
//! - the writer owns the merged [`Totals`] and the sink.
//!
//! Flush protocol (at every `trigger`, processing time; after a fill that
//! moves `minute(W)` past the last marker's, event time; and once at the end):
//! 1. The router sends each shard its pending batch, then a [`FlushMarker`]
//!    carrying an epoch number and the current watermark. Every marker takes
//!    the next epoch; only trigger markers may ask for a checkpoint, carry a
//!    reloaded config, or ask for health points.
//! 2. Each shard, on the marker, expires sessions at that watermark, drains its
//!    non-zero deltas and frees final minutes, and sends a [`ShardReport`].
//! 3. The writer waits for all shards' reports of an epoch, adds the deltas to
//!    the totals, writes every changed total, forgets the points of final
//!    minutes, and (trigger markers only) writes the health points that are
//!    due (see [`crate::health::HealthWrites`]); then it flushes the sink.
//!    Since minutes are final by event time, a replay far faster than real
//!    time holds the lateness window's state, not everything it has read.
//! 4. At end of input (or on stop) one last marker; then all threads exit.
//!    Without checkpoints its watermark is `i64::MAX`: every session expires
//!    and every minute becomes final. With checkpoints it is the current
//!    watermark and the open state goes into the last checkpoint instead, so
//!    a restart (or a file grown since) continues exactly.
//!
//! Failure: every thread runs under [`Failures`]; one that panics stops the
//! run (the router stops reading, the others drain as on a stop, no final
//! checkpoint or commit), and `run` returns [`RunError::Panicked`] naming it.
//!
//! Acknowledgement: the router remembers the source's position at each
//! marker. Once the sink has acknowledged every flush up to that epoch (the
//! writer publishes the count), the source commits that position (Kafka
//! offsets), so a restart never skips input whose totals were not delivered.

pub mod batch;
pub mod failures;
pub mod router;
pub mod worker;

pub use batch::{EventBatch, FlushMarker, ShardMsg, ShardReport};
pub use failures::{Failures, ThreadFailure};
pub use router::{shard_of, Router};
pub use worker::{final_before, Worker};

use crossbeam_channel::{bounded, Receiver, Sender};
use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::aggregate::{Namer, Totals};
use crate::config::Catalog;
use crate::health::{
    health_points, now_ms, ExperimentHealth, HealthInputs, HealthWrites, Live, ShardStats, Summary, WriterStats,
};
use crate::shard::failures::lock;
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
    #[error("thread {thread} panicked: {message}")]
    Panicked { thread: String, message: String },
    #[error("{0}")]
    Checkpoint(String),
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
    /// Take checkpoints (see [`crate::checkpoint`]).
    pub checkpoint: Option<CheckpointOptions>,
    /// Continue from this checkpoint.
    pub restore: Option<Arc<crate::checkpoint::Snapshot>>,
    /// Where the writer publishes the last health figures (for `/metrics`).
    pub published: Option<Arc<crate::serve::Published>>,
    /// Recent results for the results page.
    pub results: Option<crate::serve::SharedResults>,
    /// Reload the experiments on SIGHUP or when the file changes.
    pub reload: Option<ReloadOptions>,
    /// Threads that died; give the same to the sink (`sink::open`) and any
    /// other thread of the run, so that its death stops the run too.
    pub failures: Failures,
}

/// Reloading the experiments config while running.
#[derive(Debug, Clone)]
pub struct ReloadOptions {
    /// The config file, watched for changes.
    pub path: std::path::PathBuf,
    /// Set by SIGHUP.
    pub requested: Arc<AtomicBool>,
}

/// Decides at each trigger whether to reload, and does it: an invalid file or
/// an impossible change is refused with the same message as at start, and the
/// running configuration stays.
struct Reloader {
    options: Option<ReloadOptions>,
    modified: Option<std::time::SystemTime>,
}

impl Reloader {
    fn new(options: Option<ReloadOptions>) -> Reloader {
        let modified = options.as_ref().and_then(|o| std::fs::metadata(&o.path).and_then(|m| m.modified()).ok());
        Reloader { options, modified }
    }

    fn check(&mut self, current: &Arc<Catalog>) -> Option<Arc<Catalog>> {
        let o = self.options.as_ref()?;
        let modified = std::fs::metadata(&o.path).and_then(|m| m.modified()).ok();
        let requested = o.requested.swap(false, Relaxed);
        if !requested && (modified.is_none() || modified == self.modified) {
            return None;
        }
        self.modified = modified;
        let config = match crate::config::Config::load(&o.path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("config reload refused, the running config stays: {e}");
                return None;
            }
        };
        match current.reload(&config) {
            Ok((catalog, summary)) => {
                tracing::info!("config reloaded from {}: {summary}", o.path.display());
                Some(Arc::new(catalog))
            }
            Err(e) => {
                tracing::error!("config reload refused, the running config stays: {}: {e}", o.path.display());
                None
            }
        }
    }
}

/// Where and how often to checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointOptions {
    pub dir: std::path::PathBuf,
    pub interval: Duration,
    /// Of the configuration (see [`crate::checkpoint::fingerprint`]).
    pub fingerprint: u64,
    /// What this run reads, recorded in each checkpoint.
    pub source: crate::source::SourceId,
}

/// Why the router stopped reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The input ended (a file, a bounded replay): flush everything.
    Input,
    /// Stopped (signal, duration, failure): with checkpoints, keep the open
    /// state for the next run instead of finalizing it.
    Stopped,
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
            checkpoint: None,
            restore: None,
            published: None,
            results: None,
            reload: None,
            failures: Failures::default(),
        }
    }
}

/// The default number of shard threads: one per available core.
pub fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// Runs the engine until the source ends, `opts.stop` is set, or a thread
/// dies (then [`RunError::Panicked`] names it).
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

    // Restored sessions go to the shard that owns them at this run's `threads`.
    let mut restored: Vec<Vec<(crate::session::SessionKey, Vec<u8>)>> = vec![Vec::new(); n];
    if let Some(snap) = &opts.restore {
        for blob in &snap.shards {
            let mut d = crate::checkpoint::Dec::new(blob);
            crate::session::SessionTable::decode_each(&mut d, |key, bytes| {
                restored[shard_of(&key, n)].push((key, bytes.to_vec()));
            })
            .map_err(|e| RunError::Checkpoint(format!("checkpoint sessions: {e}")))?;
        }
    }

    let restoring = opts.restore.is_some();
    let checkpointing = opts.checkpoint.is_some();
    let mut shard_txs: Vec<Sender<ShardMsg>> = Vec::with_capacity(n);
    let mut workers = Vec::with_capacity(n);
    for (shard, sessions) in restored.into_iter().enumerate() {
        let (tx, rx) = bounded::<ShardMsg>(SHARD_QUEUE);
        shard_txs.push(tx);
        let (catalog, reports, recycle) = (catalog.clone(), report_tx.clone(), recycle_tx.clone());
        let core = (!cores.is_empty()).then(|| cores[shard % cores.len()]);
        workers.push(
            opts.failures
                .spawn(format!("expmon-shard-{shard}"), move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    // Built on its own thread: its memory is first touched here.
                    let mut worker = Worker::new(shard, catalog);
                    if restoring {
                        worker.restore(&sessions);
                    } else if checkpointing {
                        // A run before this one may have crashed before its
                        // first checkpoint, leaving values in the sink: points
                        // touched at net zero are written (as 0) too.
                        worker.rewrite_zero_totals();
                    }
                    drop(sessions);
                    worker.run(rx, reports, recycle);
                })
                .expect("spawn shard thread"),
        );
    }
    drop(report_tx);
    drop(recycle_tx);

    // Epochs whose flushes the sink has acknowledged: [0, acked).
    let acked = Arc::new(AtomicU64::new(0));
    let (snap_tx, snap_rx) = crossbeam_channel::unbounded::<crate::checkpoint::RouterState>();
    let ckpt = Checkpointer {
        options: opts.checkpoint.clone(),
        router_parts: snap_rx,
        pending: None,
        in_flight: Arc::new(AtomicBool::new(false)),
        committable: Arc::new(std::sync::Mutex::new(None)),
    };
    let (in_flight, committable) = (ckpt.in_flight.clone(), ckpt.committable.clone());
    let writer = {
        let (catalog, live, instance, acked) =
            (catalog.clone(), opts.live.clone(), opts.instance.clone(), acked.clone());
        let totals = match &opts.restore {
            Some(s) => Totals::restore(&s.totals),
            None if checkpointing => Totals::rewriting_touched(),
            None => Totals::default(),
        };
        let (published, results) = (opts.published.clone(), opts.results.clone());
        let failures = opts.failures.clone();
        opts.failures
            .spawn("expmon-writer".into(), move || {
                let experiments = ExperimentHealth::new(catalog.clone());
                let mut w = Writer {
                    catalog: catalog.clone(),
                    sink,
                    totals,
                    live: &live,
                    instance: &instance,
                    ckpt,
                    experiments,
                    health_writes: HealthWrites::new(),
                    published,
                    results,
                };
                let result = w.run(report_rx, n, &acked);
                if result.is_err() {
                    failures.halt(); // stop reading: nobody writes any more
                }
                result
            })
            .expect("spawn writer thread")
    };

    let mut router = Router::new(catalog, n);
    if let Some(snap) = &opts.restore {
        router.restore(&snap.router);
    }
    let mut first_line = None;
    let links = Links {
        shard_txs: &shard_txs,
        recycle: &recycle_rx,
        acked: &acked,
        snap_tx: &snap_tx,
        in_flight: &in_flight,
        committable: &committable,
    };
    let routed = opts
        .failures
        .guard("expmon-router", || route_loop(&mut router, source.as_mut(), &links, &opts, &mut first_line));
    // A router that panicked is a failure like any other: drain and stop.
    let source_result = routed.unwrap_or(Ok(Ended::Stopped));
    let stopped_at = matches!(source_result, Ok(Ended::Stopped)).then(Instant::now);

    // End: pending batches, then the last marker. Without checkpoints its
    // watermark is past everything: every session expires and every minute is
    // final. With checkpoints the open state is kept for the next run (and
    // checkpointed) instead, at the end of the input too: a file that grows
    // after it (an appended log) resumes exactly where it ended, with its
    // watermark, its open sessions and its open totals — finalizing would
    // start those minutes again from zero and overwrite their totals with
    // smaller ones. Every changed total is written either way. After a thread
    // failure nothing new is checkpointed: the last published checkpoint
    // (covering only acknowledged points) is where a restart begins.
    let failed = opts.failures.failed();
    let keep_state = opts.checkpoint.is_some();
    let snapshot = opts.checkpoint.is_some() && source_result.is_ok() && !failed;
    if snapshot {
        let _ = snap_tx.send(router.checkpoint_state(source.position().unwrap_or_default()));
    }
    let watermark = if keep_state { router.watermark() } else { i64::MAX };
    for (i, tx) in shard_txs.iter().enumerate() {
        let batch = router.take_batch(i, None);
        let _ = tx.send(ShardMsg::Events(batch));
        let marker = FlushMarker { epoch: u64::MAX, watermark, last: true, snapshot, catalog: None, health: true };
        let _ = tx.send(ShardMsg::Flush(marker));
    }
    drop(shard_txs);
    let mut writer_result = None;
    for w in workers {
        let _ = w.join(); // a panic was recorded by its guard
    }
    if let Ok(Some(result)) = writer.join() {
        writer_result = Some(result);
    }
    if let Some(f) = opts.failures.first() {
        if let Some(Ok((_, _, report))) = &writer_result {
            if report.undelivered > 0 {
                tracing::error!("{} upserts could not be delivered before the run stopped", report.undelivered);
            }
        }
        // Nothing is committed: the input since the last acknowledged
        // position is read again by the next run.
        let _ = source.close();
        return Err(RunError::Panicked { thread: f.thread, message: f.message });
    }
    let Some(writer_result) = writer_result else {
        return Err(RunError::Panicked { thread: "expmon-writer".into(), message: "(no message)".into() });
    };
    let (writer_stats, shard_stats, mut sink_report) = writer_result?;
    source_result?;
    if opts.checkpoint.is_some() {
        // Only positions covered by a published checkpoint are committed.
        if let Some(pos) = lock(&committable).take() {
            source.commit(&pos, true);
        }
    } else if sink_report.undelivered == 0 {
        // Everything read was flushed by the last marker; commit it if all arrived.
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
        stop_took: stopped_at.map(|t| t.elapsed()),
        peak_rss_bytes: crate::health::peak_rss_bytes(),
        sink: sink_report,
    })
}

/// What the router shares with the other stages.
struct Links<'a> {
    shard_txs: &'a [Sender<ShardMsg>],
    recycle: &'a Receiver<EventBatch>,
    /// Epochs the sink has acknowledged: `[0, acked)`.
    acked: &'a AtomicU64,
    /// The router's part of each checkpoint, to the writer.
    snap_tx: &'a Sender<crate::checkpoint::RouterState>,
    /// A checkpoint is being written or awaits acknowledgement.
    in_flight: &'a AtomicBool,
    /// Positions of the last published checkpoint, not yet committed.
    committable: &'a std::sync::Mutex<Option<Offsets>>,
}

fn route_loop(
    router: &mut Router,
    source: &mut dyn Source,
    links: &Links<'_>,
    opts: &RunOptions,
    first_line: &mut Option<Instant>,
) -> Result<Ended, RunError> {
    let (shard_txs, recycle, acked) = (links.shard_txs, links.recycle, links.acked);
    let mut next_snapshot = opts.checkpoint.as_ref().map(|c| Instant::now() + c.interval);
    let mut reload = Reloader::new(opts.reload.clone());
    let mut lines = LineBatch::default();
    let mut next_flush = Instant::now() + opts.trigger;
    let deadline = opts.max_duration.map(|d| Instant::now() + d);
    let mut epoch = 0u64;
    // The final bound of the last marker's watermark: a marker goes out as
    // soon as `minute(W)` passes it (event time), besides every trigger.
    let mut flushed_before = i64::MIN;
    // Source positions at each marker not yet acknowledged, oldest first.
    let mut unacked: VecDeque<(u64, Offsets)> = VecDeque::new();
    // Watermark alignment across input partitions: none may run more than a
    // quarter of the lateness ahead of the slowest. Then the watermark of any
    // moment (the min of the clocks, or their max when all are idle) stays
    // within that of a single ordered stream, and on-time events stay on time
    // (the crash test caught events dropped with a whole lateness of skew).
    let align_window = (router.lateness_ms() / 4).max(1000);
    let (mut ahead, mut held) = (Vec::new(), Vec::<bool>::new());
    loop {
        if opts.stop.load(Relaxed) || opts.failures.failed() || deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(Ended::Stopped);
        }
        let fill =
            source.fill(&mut lines).map_err(|error| RunError::Source { source_name: source.describe(), error })?;
        router.count_overlong(lines.overlong);
        if first_line.is_none() && !lines.is_empty() {
            *first_line = Some(Instant::now());
        }
        // The wall clock once per fill: events past it by more than
        // `max_future` are refused, in replays too.
        let now = Some(now_ms());
        let one_partition = lines.part.is_empty();
        for i in 0..lines.len() {
            let part = if one_partition { 0 } else { lines.part[i] as usize };
            match router.route(lines.line(i), part, now) {
                Ok(Some(full)) => {
                    let batch = router.take_batch(full, recycle.try_recv().ok());
                    if shard_txs[full].send(ShardMsg::Events(batch)).is_err() {
                        return Ok(Ended::Stopped); // the shard is gone; its guard or the writer's error says why
                    }
                }
                Ok(None) => {}
                Err(reason) => source.reject(&lines, i, reason),
            }
        }
        router.set_partitions(&lines.partitions);
        if let Some((done, total)) = source.progress() {
            opts.live.progress_done.store(done, Relaxed);
            opts.live.progress_total.store(total, Relaxed);
        }
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
        if opts.checkpoint.is_some() {
            let published = lock(links.committable).take();
            if let Some(pos) = published {
                source.commit(&pos, false);
            }
        } else {
            let done = acked.load(Relaxed);
            let mut newest = None;
            while unacked.front().is_some_and(|(e, _)| *e < done) {
                newest = unacked.pop_front().map(|(_, pos)| pos);
            }
            if let Some(pos) = newest {
                source.commit(&pos, false);
            }
        }
        if fill == Fill::End {
            return Ok(Ended::Input);
        }
        if lines.rebalanced || Instant::now() >= next_flush {
            crate::checkpoint::failpoint("router.flush");
            next_flush = Instant::now() + opts.trigger;
            let reloaded = reload.check(router.catalog());
            let mut snapshot = false;
            if let (Some(at), Some(c)) = (next_snapshot, &opts.checkpoint) {
                if Instant::now() >= at && !links.in_flight.swap(true, Relaxed) {
                    next_snapshot = Some(Instant::now() + c.interval);
                    snapshot = true;
                    let _ = links.snap_tx.send(router.checkpoint_state(source.position().unwrap_or_default()));
                }
            }
            if opts.checkpoint.is_none() {
                if let Some(pos) = source.position() {
                    unacked.push_back((epoch, pos));
                }
            }
            *lock(&opts.live.kafka_lag) = source.lag();
            let marker =
                FlushMarker { epoch, watermark: wm, last: false, snapshot, catalog: reloaded.clone(), health: true };
            if !send_flush(router, links, marker) {
                return Ok(Ended::Stopped);
            }
            if let Some(c) = reloaded {
                router.set_catalog(c);
            }
            epoch += 1;
            flushed_before = final_before(wm);
        } else if final_before(wm) > flushed_before {
            // Event time passed a minute since the last marker: the same step
            // (no checkpoint, reload or health), so that final minutes are
            // written and freed however fast the input is replayed.
            if opts.checkpoint.is_none() {
                if let Some(pos) = source.position() {
                    unacked.push_back((epoch, pos));
                }
            }
            let marker =
                FlushMarker { epoch, watermark: wm, last: false, snapshot: false, catalog: None, health: false };
            if !send_flush(router, links, marker) {
                return Ok(Ended::Stopped);
            }
            epoch += 1;
            flushed_before = final_before(wm);
        }
    }
}

/// Step 1 of the flush protocol: each shard's pending batch, then `marker`.
/// `false` if a shard is gone (its guard or the writer's error says why).
fn send_flush(router: &mut Router, links: &Links<'_>, marker: FlushMarker) -> bool {
    for (i, tx) in links.shard_txs.iter().enumerate() {
        if router.pending(i) > 0 {
            let batch = router.take_batch(i, links.recycle.try_recv().ok());
            if tx.send(ShardMsg::Events(batch)).is_err() {
                return false;
            }
        }
        if tx.send(ShardMsg::Flush(marker.clone())).is_err() {
            return false;
        }
    }
    true
}

/// The writer's side of checkpointing (see [`crate::checkpoint`]).
struct Checkpointer {
    options: Option<CheckpointOptions>,
    router_parts: Receiver<crate::checkpoint::RouterState>,
    /// Written, waiting for the sink to acknowledge flush number `.0`.
    pending: Option<(u64, std::path::PathBuf, Offsets)>,
    in_flight: Arc<AtomicBool>,
    committable: Arc<std::sync::Mutex<Option<Offsets>>>,
}

impl Checkpointer {
    /// Writes the snapshot of the epoch just flushed (flush number `flush_no`).
    fn write(
        &mut self,
        group: &[ShardReport],
        defs: &[crate::config::ExperimentDef],
        totals: &Totals,
        flush_no: u64,
        stats: &mut WriterStats,
    ) -> Result<(), RunError> {
        let Some(opts) = &self.options else { return Ok(()) };
        let io =
            |e: std::io::Error| RunError::Checkpoint(format!("writing a checkpoint in {}: {e}", opts.dir.display()));
        let router = self.router_parts.recv().map_err(|_| RunError::Checkpoint("router part missing".into()))?;
        let mut r = crate::checkpoint::Enc::default();
        crate::checkpoint::encode_defs(defs, &mut r);
        router.encode(&mut r);
        let mut t = crate::checkpoint::Enc::default();
        crate::checkpoint::encode_totals(&totals.export(), &mut t);
        let mut shards: Vec<&ShardReport> = group.iter().collect();
        shards.sort_by_key(|r| r.shard);
        let mut head = crate::checkpoint::Enc::default();
        head.u64(shards.len() as u64);
        let mut sections: Vec<&[u8]> = vec![&r.buf, &t.buf, &head.buf];
        let mut lens = Vec::new();
        let mut pause = Duration::ZERO;
        for s in &shards {
            let (bytes, took) = s.snapshot.as_ref().ok_or_else(|| RunError::Checkpoint("shard part missing".into()))?;
            pause = pause.max(*took);
            let mut len = crate::checkpoint::Enc::default();
            len.u32(bytes.len() as u32);
            lens.push((len, bytes));
        }
        for (len, bytes) in &lens {
            sections.push(&len.buf);
            sections.push(bytes);
        }
        let epoch = group[0].marker.epoch;
        let tmp = crate::checkpoint::write_tmp(&opts.dir, opts.fingerprint, epoch, now_ms(), &opts.source, &sections)
            .map_err(io)?;
        crate::checkpoint::failpoint("checkpoint.written");
        stats.checkpoints_written += 1;
        stats.checkpoint_pause_max_us = stats.checkpoint_pause_max_us.max(pause.as_micros() as u64);
        stats.checkpoint_bytes = stats.checkpoint_bytes.max(sections.iter().map(|s| s.len() as u64).sum());
        self.pending = Some((flush_no, tmp, router.positions));
        Ok(())
    }

    /// Publishes the pending snapshot once flush `acked_flushes` covers it.
    fn publish_if_acknowledged(&mut self, acked_flushes: u64, stats: &mut WriterStats) -> Result<(), RunError> {
        let (Some(opts), Some((flush_no, _, _))) = (&self.options, &self.pending) else { return Ok(()) };
        if acked_flushes < *flush_no {
            return Ok(());
        }
        let (_, tmp, positions) = self.pending.take().expect("checked above");
        crate::checkpoint::publish(&opts.dir, &tmp)
            .map_err(|e| RunError::Checkpoint(format!("publishing a checkpoint in {}: {e}", opts.dir.display())))?;
        crate::checkpoint::failpoint("checkpoint.published");
        stats.checkpoints_published += 1;
        *lock(&self.committable) = Some(positions);
        self.in_flight.store(false, Relaxed);
        Ok(())
    }
}

/// The writer stage: merges shard reports epoch by epoch, writes changed
/// totals, and writes checkpoints.
struct Writer<'a> {
    catalog: Arc<Catalog>,
    sink: Box<dyn Sink>,
    totals: Totals,
    live: &'a Live,
    instance: &'a str,
    ckpt: Checkpointer,
    experiments: ExperimentHealth,
    /// Which health points each trigger writes (all of them go to `/metrics`).
    health_writes: HealthWrites,
    published: Option<Arc<crate::serve::Published>>,
    results: Option<crate::serve::SharedResults>,
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
    fn run(
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
                crate::checkpoint::failpoint("writer.flush");
                if !points.is_empty() {
                    let namer = Namer::new(&self.catalog);
                    self.sink.write(&points, &namer)?;
                    crate::checkpoint::failpoint("sink.written");
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
                    self.ckpt.write(&group, &self.catalog.defs, &self.totals, stats.flushes, &mut stats)?;
                }
                // Epochs run 0, 1, 2, …: flush k (1-based) ends epoch k - 1.
                let acked_flushes = stats.flushes.saturating_sub(self.sink.unacknowledged_flushes());
                acked.store(acked_flushes, Relaxed);
                self.ckpt.publish_if_acknowledged(acked_flushes, &mut stats)?;
                if let Some(c) = &marker.catalog {
                    self.set_catalog(c);
                }
                if marker.last {
                    let report = self.sink.close()?;
                    if report.undelivered == 0 {
                        self.ckpt.publish_if_acknowledged(stats.flushes, &mut stats)?;
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
