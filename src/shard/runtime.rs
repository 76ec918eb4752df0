//! The runtime: [`run`] spawns the shard workers (pinned when asked) and the
//! writer, restores a checkpoint into them, drives the router on the calling
//! thread until the input ends or a stop, sends the last marker, joins every
//! thread and returns the run's [`Summary`] — or the first failure.

use crossbeam_channel::{bounded, Sender};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::batch::{EventBatch, FlushMarker, ShardMsg, ShardReport};
use super::drive::{route_loop, Ended, Links};
use super::router::{shard_of, Router};
use super::worker::Worker;
use super::writer::Writer;
use crate::aggregate::Totals;
use crate::checkpoint::{CheckpointOptions, CheckpointWriteError, Checkpointer};
use crate::config::{Catalog, ReloadOptions};
use crate::failures::{lock, Failures};
use crate::health::{ExperimentHealth, HealthWrites, Live, Summary};
use crate::sink::{Sink, SinkError};
use crate::source::Source;

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
    /// A restored checkpoint's sessions do not decode.
    #[error("checkpoint sessions: {0}")]
    CheckpointSessions(crate::session::SessionDecodeError),
    #[error(transparent)]
    CheckpointWrite(#[from] CheckpointWriteError),
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
    // Delta vectors the writer has merged, back to the shards to drain into.
    let (spent_tx, spent_rx) = bounded::<Vec<crate::aggregate::Delta>>(n * 4);
    let cores = if opts.pin { core_affinity::get_core_ids().unwrap_or_default() } else { Vec::new() };

    // Restored sessions go to the shard that owns them at this run's `threads`.
    let mut restored: Vec<Vec<(crate::session::SessionKey, Vec<u8>)>> = vec![Vec::new(); n];
    if let Some(snap) = &opts.restore {
        for blob in &snap.shards {
            let mut d = crate::codec::Dec::new(blob);
            crate::session::SessionTable::decode_each(&mut d, |key, bytes| {
                restored[shard_of(&key, n)].push((key, bytes.to_vec()));
            })
            .map_err(RunError::CheckpointSessions)?;
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
        let spent = spent_rx.clone();
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
                    worker.reuse_deltas_from(spent);
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
    let ckpt = Checkpointer::new(opts.checkpoint.clone(), snap_rx);
    let (in_flight, committable) = (ckpt.in_flight(), ckpt.committable());
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
                    spent_deltas: Some(spent_tx),
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
