//! A shard worker: owns a [`SessionTable`] and [`MinuteCounters`] outright,
//! built on its own (pinned) thread. It applies event batches; on a flush marker
//! it expires sessions, drains its deltas, and reports to the writer.

use crossbeam_channel::{Receiver, Sender};
use std::sync::Arc;

use super::batch::{EventBatch, ShardMsg, ShardReport};
use crate::aggregate::{minute_of, MinuteCounters};
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
    events: u64,
}

impl Worker {
    pub fn new(shard: usize, catalog: Arc<Catalog>) -> Worker {
        Worker {
            shard,
            sessions: SessionTable::new(catalog.clone()),
            counters: MinuteCounters::new(catalog),
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
            self.sessions.add(&batch.session_event(e), &mut self.counters);
        }
        self.events += batch.events.len() as u64;
    }

    /// Expires sessions at `watermark`, and returns the deltas since the last
    /// drain (the counters are then empty).
    pub fn drain_deltas(&mut self, watermark: i64) -> Vec<crate::aggregate::Delta> {
        self.sessions.expire(watermark);
        let mut deltas = Vec::new();
        self.counters.drain(&mut deltas);
        deltas
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
                    let deltas = self.drain_deltas(marker.watermark);
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
                    let report = ShardReport { shard: self.shard, marker, deltas, stats, conflicts, snapshot };
                    if reports.send(report).is_err() || last {
                        return;
                    }
                }
            }
        }
    }
}
