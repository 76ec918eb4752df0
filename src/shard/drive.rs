//! The router's drive loop, on the calling thread: fill a batch of lines from
//! the source, route each event to its shard, keep the watermark, hold input
//! partitions that run ahead, commit acknowledged source positions, and send
//! the flush markers (step 1 of the flush protocol in [`crate::shard`]): at
//! every processing-time trigger, and whenever event time passes a minute.

use crossbeam_channel::{Receiver, Sender};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use super::batch::{EventBatch, FlushMarker, ShardMsg};
use super::router::Router;
use super::runtime::{RunError, RunOptions};
use super::worker::final_before;
use crate::clock::now_ms;
use crate::config::Reloader;
use crate::failures::lock;
use crate::source::{Fill, LineBatch, Offsets, Source};

/// Why the router stopped reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Ended {
    /// The input ended (a file, a bounded replay): flush everything.
    Input,
    /// Stopped (signal, duration, failure): with checkpoints, keep the open
    /// state for the next run instead of finalizing it.
    Stopped,
}

/// What the router shares with the other stages.
pub(super) struct Links<'a> {
    pub(super) shard_txs: &'a [Sender<ShardMsg>],
    pub(super) recycle: &'a Receiver<EventBatch>,
    /// Epochs the sink has acknowledged: `[0, acked)`.
    pub(super) acked: &'a AtomicU64,
    /// The router's part of each checkpoint, to the writer.
    pub(super) snap_tx: &'a Sender<crate::checkpoint::RouterState>,
    /// A checkpoint is being written or awaits acknowledgement.
    pub(super) in_flight: &'a AtomicBool,
    /// Positions of the last published checkpoint, not yet committed.
    pub(super) committable: &'a std::sync::Mutex<Option<Offsets>>,
}

pub(super) fn route_loop(
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
            crate::failures::failpoint("router.flush");
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
