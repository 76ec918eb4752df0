//! Stage 1 of scale-out: one task per input partition this instance holds,
//! each the engine's own pieces restricted to that partition — a `Router`
//! with one clock (parse, resolve, late drop by the partition's watermark),
//! a `SessionTable` and `MinuteCounters` (sessionize, correct), and a
//! `Totals` of the partition's absolute contribution to each open point.
//!
//! At every trigger each task that read input commits one transaction on its
//! own producer (transactional.id `<group>.s1-<partition>`), carrying a
//! [`DeltaRecord`] to each delta partition (the contributions that changed or
//! were touched, and the watermark mark) and the task's input offset; every
//! `snapshot_every` triggers (and at a fresh task's first, after a restore
//! that replayed, and when stopping) also a snapshot of the task's state at
//! that offset to `<group>.state`. A task is built when its partition is
//! assigned: its producer first (which fences the previous owner and ends
//! its open transaction), then from the newest snapshot at or before the
//! group's committed offset, the input from the snapshot to that offset
//! replayed without publishing (`crate::scale`, step 7); or empty. Every
//! rebalance (eager) drops every task; nothing uncommitted survives it.
//!
//! Why a producer per task, not per instance: the open transaction of an
//! instance killed mid-trigger holds every `read_committed` reader of the
//! delta partitions at its first record until the coordinator aborts it —
//! `transaction.timeout.ms` on Kafka, never on Tansu 0.6
//! (tests/scale_out.rs found stage 2 stalled for good after a SIGKILL). The
//! new owner of the partition ends it at once. A zombie (paused past its
//! session timeout while its partitions moved) finds its producer fenced at
//! its next commit and stops in one line, as on any failed transaction.
//!
//! With the source option `dead_letter=T`, a message the router refuses is
//! kept by its task until the trigger and copied to `T` in the same
//! transaction (headers as the single path's: topic, partition, offset,
//! reason): a replay of uncommitted input copies it again only in a new
//! transaction, so a `read_committed` reader of `T` on a real Kafka sees each
//! copy once (Tansu also returns aborted records, see `crate::scale`).

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::wire::{self, DeltaRecord, PointId};
use super::ScaleError;
use super::{Isolation, Rebalances, ScaleOptions};
use crate::aggregate::{MinuteCounters, Point, Totals};
use crate::checkpoint::RouterState;
use crate::codec::{Dec, Enc};
use crate::config::{Catalog, Config};
use crate::health::RouterStats;
use crate::names::Names;
use crate::session::SessionTable;
use crate::shard::{final_before, Router};

/// Stage 1's own figures (over the tasks it ran, including dropped ones).
#[derive(Debug, Default, Clone)]
pub struct Stage1Stats {
    /// What the tasks' routers counted (input, rejected by reason, late,
    /// unknown names), summed over the tasks.
    pub router: RouterStats,
    pub transactions: u64,
    pub delta_records: u64,
    pub delta_bytes: u64,
    pub snapshot_bytes: u64,
    pub restores: u64,
    /// Refused messages copied to the dead-letter topic (committed or not).
    pub dead_lettered: u64,
    /// Input messages replayed silently by restores (not in `router`).
    pub replayed: u64,
    /// Tasks held now.
    pub tasks: u64,
    /// Input messages not read yet by this instance's tasks (every 10 s).
    pub lag: u64,
}

/// A task this instance owns: its state and its transactional producer.
struct Owned {
    task: Task,
    producer: BaseProducer,
}

struct Task {
    router: Router,
    sessions: SessionTable,
    counters: MinuteCounters,
    /// The partition's absolute contribution to each open point.
    contrib: Totals,
    catalog: Arc<Catalog>,
    /// The next input offset to read (`None`: nothing read or committed yet).
    next: Option<i64>,
    /// Router figures at the last trigger (to add only what is new).
    counted: RouterStats,
    /// Read events since the last trigger (an idle task has nothing to commit).
    dirty: bool,
    /// Refused messages since the last trigger, for the dead-letter topic:
    /// `(offset, payload, reason)`.
    refused: Vec<(i64, Vec<u8>, crate::event::Reject)>,
    /// The [`config_hash`] of the config it runs under.
    config_hash: u64,
    /// Committed triggers since the last snapshot of this task.
    since_snapshot: u32,
    /// The next commit carries a snapshot: a fresh task (a committed offset
    /// always has a snapshot at or before it), or one whose restore replayed
    /// input (so replays stay short across rebalances).
    snapshot_due: bool,
}

/// A snapshot's chunks as they arrive (`None`: not yet).
type Chunks = Vec<Option<Vec<u8>>>;

impl Task {
    fn new(config: &Config, names: Names) -> Result<Task, ScaleError> {
        let catalog = Arc::new(Catalog::build(config, Arc::new(names))?);
        let mut counters = MinuteCounters::new(catalog.clone());
        // Touched points are emitted even at a net zero: a replay that cuts
        // its triggers elsewhere must still overwrite every value an earlier
        // run of the same offsets emitted (see `crate::scale`, step 3).
        counters.set_track_touched(true);
        Ok(Task {
            router: Router::new(catalog.clone(), 1),
            sessions: SessionTable::new(catalog.clone()),
            counters,
            contrib: Totals::rewriting_touched(),
            catalog,
            next: None,
            counted: RouterStats::default(),
            dirty: false,
            refused: Vec::new(),
            config_hash: config_hash(config),
            since_snapshot: 0,
            snapshot_due: true,
        })
    }

    /// One input message: parsed, routed, sessionized; a refused one is kept
    /// for the dead-letter topic if `keep_refused`.
    ///
    /// `max_future` is measured from the earlier of the message's Kafka
    /// timestamp and the wall clock: a replay must refuse exactly what the
    /// first read refused (`crate::scale`, step 1), and the timestamp is in
    /// the log. It is the producer's clock when it sent the message (or the
    /// broker's, with `LogAppendTime`), so before the wall clock of any read
    /// unless the producer's clock runs ahead; then the wall clock decides, as
    /// for a message without a timestamp or with one before 2000 (SPEC §1's
    /// earliest `ts`: a producer that sets no real time).
    fn read(&mut self, m: &impl Message, keep_refused: bool) {
        let (offset, payload) = (m.offset(), m.payload().unwrap_or_default());
        if self.next.is_some_and(|n| offset < n) {
            return; // read before the task's restore point
        }
        self.next = Some(offset + 1);
        self.dirty = true;
        let wall = crate::clock::now_ms();
        let sent = m.timestamp().to_millis().filter(|&t| t >= crate::event::MIN_TS_MS);
        let now = Some(sent.map_or(wall, |t| t.min(wall)));
        match self.router.route(payload, 0, now) {
            Ok(Some(_)) => self.apply_pending(),
            Ok(None) => {}
            Err(reason) if keep_refused => self.refused.push((offset, payload.to_vec(), reason)),
            Err(_) => {}
        }
    }

    /// What a trigger computes: the pending events applied, sessions expired
    /// at the partition's watermark, the counters' deltas folded into the
    /// contributions, and `points` the contributions touched since the last
    /// trigger (the final ones forgotten). Returns the watermark.
    fn advance(&mut self, deltas: &mut Vec<crate::aggregate::Delta>, points: &mut Vec<Point>) -> i64 {
        self.apply_pending();
        let wm = self.router.watermark();
        self.sessions.expire(wm);
        deltas.clear();
        self.counters.drain(deltas);
        self.contrib.apply(deltas);
        points.clear();
        self.contrib.take_due(final_before(wm), points);
        wm
    }

    fn apply_pending(&mut self) {
        if self.router.pending(0) > 0 {
            let batch = self.router.take_batch(0, None);
            for e in &batch.events {
                self.sessions.add(e, &batch.assigns, &batch.attrs, &mut self.counters);
            }
        }
    }

    /// The task's whole state: router clocks and names, sessions,
    /// contributions, after the [`config_hash`] it was built under.
    fn snapshot(&self) -> Vec<u8> {
        let mut e = Enc::default();
        e.u64(self.config_hash);
        self.router.checkpoint_state(Vec::new()).encode(&mut e);
        self.sessions.encode(&mut e);
        crate::checkpoint::encode_totals(&self.contrib.export(), &mut e);
        e.buf
    }

    fn restore(config: &Config, bytes: &[u8], next: i64) -> Result<Task, ScaleError> {
        let mut d = Dec::new(bytes);
        if d.u64()? != config_hash(config) {
            return Err(ScaleError::OtherConfig);
        }
        let router_state = RouterState::decode(&mut d)?;
        let mut task = Task::new(config, router_state.names())?;
        task.router.restore(&router_state);
        let mut sessions = Vec::new();
        SessionTable::decode_each(&mut d, |k, b| sessions.push((k, b.to_vec())))?;
        for (k, b) in sessions {
            task.sessions.restore(k, &b)?;
        }
        let mut totals = Vec::new();
        for _ in 0..d.count(8 + 8 + 16 + 9)? {
            totals.push((d.u64()?, d.i64()?, d.i128()?, d.opt_i64()?));
        }
        task.contrib = Totals::restore(&totals);
        task.next = Some(next);
        task.snapshot_due = false;
        Ok(task)
    }
}

/// What a snapshot depends on besides the input: the engine settings that
/// decide late and expired (`crate::checkpoint::fingerprint`) and the
/// experiments, whose indices the sessions hold.
fn config_hash(config: &Config) -> u64 {
    let experiments = serde_json::to_vec(&config.experiments).unwrap_or_default();
    crate::checkpoint::fingerprint(config) ^ xxhash_rust::xxh3::xxh3_64(&experiments)
}

pub struct Stage1 {
    config: Config,
    o: ScaleOptions,
    consumer: BaseConsumer<Rebalances>,
    deltas: usize,
    tasks: BTreeMap<i32, Owned>,
    seen: (u64, u64),
    stats: Stage1Stats,
    /// Published after every trigger, for stage 2's health points.
    figures: Arc<std::sync::Mutex<Stage1Stats>>,
}

impl Stage1 {
    pub fn new(
        config: Config,
        o: ScaleOptions,
        deltas: usize,
        figures: Arc<std::sync::Mutex<Stage1Stats>>,
    ) -> Result<Stage1, ScaleError> {
        let consumer = super::stage_consumer(&o, &format!("{}.s1", o.spec.group), &o.spec.topic)?;
        Ok(Stage1 {
            config,
            o,
            consumer,
            deltas,
            tasks: BTreeMap::new(),
            seen: (0, 0),
            stats: Stage1Stats::default(),
            figures,
        })
    }

    /// Drops every task after a revoke; builds a task for every assigned
    /// partition that has none.
    fn follow_assignment(&mut self) -> Result<(), ScaleError> {
        let todo = super::unowned_assigned(&self.consumer, &mut self.seen, &mut self.tasks, "stage 1")?;
        // The partitions restore side by side: the consumer is not polled
        // meanwhile, and a rebalance waits for it (a restore is mostly
        // waiting on the broker).
        let this = &*self;
        let built = super::in_parallel(&todo, |p| {
            let started = Instant::now();
            // Fence the previous owner first: its open transaction ends (and
            // with it the hold on read_committed readers), its commits fail
            // from now on, and the committed offset read next is final.
            let producer = super::transactional_producer(&this.o, &format!("{}.s1-{p}", this.o.spec.group))?;
            let (task, snapshot, replayed) = this.restore(p)?;
            Ok::<_, ScaleError>((Owned { task, producer }, snapshot, replayed, started.elapsed()))
        });
        for (p, built) in built {
            let (owned, snapshot, replayed, took) = built?;
            tracing::info!(
                "stage 1: partition {}/{p} assigned, restored at offset {:?} in {} ms (snapshot at {snapshot:?}, \
                 {replayed} messages replayed)",
                self.o.spec.topic,
                owned.task.next,
                took.as_millis()
            );
            self.stats.restores += 1;
            self.stats.replayed += replayed;
            self.tasks.insert(p, owned);
        }
        Ok(())
    }

    /// The task of partition `p` as of the group's committed offset `o`: the
    /// newest complete snapshot at an offset `s <= o`, then the input from
    /// `s` to `o` replayed silently (`crate::scale`, step 7). Returns the
    /// task, `s` (`None`: a fresh task) and the messages replayed.
    fn restore(&self, p: i32) -> Result<(Task, Option<i64>, u64), ScaleError> {
        let Some(at) = super::committed(&self.consumer, &self.o.spec.topic, p)? else {
            return Ok((Task::new(&self.config, Names::default())?, None, 0));
        };
        let (s, bytes) = self.find_snapshot(p, at)?;
        let topic = self.o.topic("state");
        let mut task = Task::restore(&self.config, &bytes, s)
            .map_err(|e| ScaleError::Snapshot { at: format!("{topic}/{p}@{s}"), source: Box::new(e) })?;
        let replayed = if s < at { self.replay(&mut task, p, s, at)? } else { 0 };
        Ok((task, Some(s), replayed))
    }

    /// The newest complete snapshot of partition `p` at an offset no later
    /// than `at`, and that offset. Any complete snapshot is a true state at
    /// its offset, whoever wrote it (`crate::scale`, step 1); one past `at`
    /// (an aborted or a zombie's transaction) is not used.
    fn find_snapshot(&self, p: i32, at: i64) -> Result<(i64, Vec<u8>), ScaleError> {
        let topic = self.o.topic("state");
        // The one wanted is among the last ones written: look there first.
        // Read under `Everything`: an open transaction on the partition must
        // not hide a snapshot (`Isolation`).
        let reader = super::reader(&self.o, Isolation::Everything)?;
        for back in [64, i64::MAX] {
            let (low, high) = reader
                .fetch_watermarks(&topic, p, Duration::from_secs(10))
                .map_err(ScaleError::broker(format!("reading the end of {topic}/{p}")))?;
            let from = high.saturating_sub(back).max(low);
            // Snapshots being assembled, by id: (offset, chunks).
            let mut partial: ahash::AHashMap<u64, (i64, Chunks)> = ahash::AHashMap::new();
            let mut best: Option<(i64, Vec<u8>)> = None;
            super::read_range(&self.o, &topic, p, Offset::Offset(from), None, Isolation::Everything, |m| {
                let Some(payload) = m.payload() else { return Ok(()) };
                let c = wire::decode_chunk(payload).map_err(|e| e.at(format!("{topic}/{p}")))?;
                if c.offset > at || c.partition != p as u32 || best.as_ref().is_some_and(|(s, _)| c.offset < *s) {
                    return Ok(());
                }
                let (_, chunks) = partial.entry(c.id).or_insert_with(|| (c.offset, vec![None; c.count as usize]));
                let slot = chunks.get_mut(c.index as usize).ok_or_else(|| {
                    ScaleError::Wire(format!("chunk {} of {}", c.index, c.count)).at(format!("{topic}/{p}"))
                })?;
                *slot = Some(c.bytes.to_vec());
                if chunks.iter().all(Option::is_some) {
                    let (offset, chunks) = partial.remove(&c.id).expect("being assembled");
                    best = Some((offset, chunks.into_iter().flatten().flatten().collect()));
                    partial.retain(|_, (o, _)| *o >= offset);
                }
                Ok(())
            })?;
            if let Some(found) = best {
                return Ok(found);
            }
            if from == low {
                break;
            }
        }
        Err(ScaleError::NoSnapshot { input: self.o.spec.topic.clone(), partition: p, offset: at, state: topic })
    }

    /// Reads input offsets `from..to` of partition `p` into `task` silently:
    /// every record they produced (deltas, dead letters) was committed by the
    /// run that read them first (its commit of offset `to` carried them), and
    /// stage 2 holds it.
    fn replay(&self, task: &mut Task, p: i32, from: i64, to: i64) -> Result<u64, ScaleError> {
        let topic = &self.o.spec.topic;
        let (low, _) = self
            .consumer
            .fetch_watermarks(topic, p, Duration::from_secs(10))
            .map_err(ScaleError::broker(format!("reading the start of {topic}/{p}")))?;
        if low > from {
            return Err(ScaleError::Wire(format!(
                "input partition {topic}/{p}: its snapshot is at offset {from} but the partition now starts at {low} \
                 (retention deleted the input a restore replays)"
            )));
        }
        let mut n = 0u64;
        super::read_range(&self.o, topic, p, Offset::Offset(from), Some(to), Isolation::Committed, |m| {
            task.read(m, false);
            n += 1;
            Ok(())
        })?;
        // The trigger the first run ended these offsets with, unpublished.
        task.advance(&mut Vec::new(), &mut Vec::new());
        task.next = Some(to);
        task.dirty = false;
        task.counted = task.router.stats.clone();
        task.snapshot_due = true;
        Ok(n)
    }

    pub fn run(mut self) -> Result<Stage1Stats, ScaleError> {
        let started = Instant::now();
        let mut next_trigger = Instant::now() + self.o.trigger;
        let mut next_status = Instant::now() + super::STATUS_EVERY;
        let mut reload = super::ReloadRefusal::new(self.o.reload.clone());
        let keep_refused = self.o.spec.dead_letter.is_some();
        loop {
            if Instant::now() >= next_status {
                next_status = Instant::now() + super::STATUS_EVERY;
                let tasks = self.tasks.iter().map(|(&p, t)| (p, t.task.next));
                let lag = super::lag(&self.consumer, &self.o.spec.topic, tasks);
                self.stats.lag = lag as u64;
                let s = &self.stats;
                if self.o.status {
                    tracing::info!(
                        "stage 1: {} tasks, {} events read, {} transactions, input lag {lag} messages",
                        self.tasks.len(),
                        s.router.events_in,
                        s.transactions
                    );
                }
            }
            let stopping = self.o.stopping(started);
            if stopping || Instant::now() >= next_trigger {
                reload.check();
                self.follow_assignment()?;
                self.trigger(stopping)?;
                self.stats.tasks = self.tasks.len() as u64;
                *crate::failures::lock(&self.figures) = self.stats.clone();
                next_trigger = Instant::now() + self.o.trigger;
                if stopping {
                    break;
                }
            }
            let polled = self.consumer.poll(Duration::from_millis(20));
            // A rebalance inside that poll: rebuild the tasks before using
            // its message (rare: the message is copied).
            if self.rebalanced() {
                let owned = polled.map(|r| r.map(|m| m.detach()));
                self.follow_assignment()?;
                if let Some(Ok(m)) = owned {
                    handle(&mut self.tasks, &m, keep_refused);
                }
                continue;
            }
            match polled {
                Some(Ok(m)) => handle(&mut self.tasks, &m, keep_refused),
                Some(Err(e)) => tracing::warn!("stage 1: {e}"),
                None => {}
            }
        }
        super::leave(&self.consumer, &self.o, "stage 1");
        Ok(self.stats)
    }

    fn rebalanced(&self) -> bool {
        let ctx = self.consumer.context();
        (ctx.revoked.load(Relaxed), ctx.assigned.load(Relaxed)) != self.seen
    }

    /// One transaction per task that read input since the last trigger: its
    /// records, its input offset and, every `snapshot_every` triggers (and
    /// when due or stopping), its snapshot. A transaction that fails (a
    /// fenced producer among the causes: the partition's new owner, or on
    /// Kafka a transaction aborted for its timeout) stops the instance in one
    /// line: crash-only, a restart rebuilds every task from Kafka.
    fn trigger(&mut self, stopping: bool) -> Result<(), ScaleError> {
        // Tasks that read nothing since their last trigger have their offset
        // committed already (and a snapshot at or before it): an idle trigger is free.
        let dirty: Vec<i32> = self.tasks.iter().filter(|(_, t)| t.task.dirty).map(|(&p, _)| p).collect();
        if dirty.is_empty() {
            return Ok(());
        }
        let meta = self.consumer.group_metadata().ok_or(ScaleError::NoGroupMetadata(1))?;
        let mut work = Work::default();
        for p in dirty {
            let mut owned = self.tasks.remove(&p).expect("dirty task");
            self.commit(p, &mut owned, &meta, stopping, &mut work)?;
            self.stats.transactions += 1;
            self.tasks.insert(p, owned);
        }
        Ok(())
    }

    /// Task `p`'s transaction of one trigger.
    fn commit(
        &mut self,
        p: i32,
        owned: &mut Owned,
        meta: &rdkafka::consumer::ConsumerGroupMetadata,
        stopping: bool,
        work: &mut Work,
    ) -> Result<(), ScaleError> {
        let (task, producer) = (&mut owned.task, &owned.producer);
        let of = format!(" of {}/{p}", self.o.spec.topic);
        let fail = |step, error| ScaleError::Transaction { stage: 1, of: of.clone(), step, error };
        task.dirty = false;
        let wm = task.advance(&mut work.deltas, &mut work.points);
        let Some(next) = task.next else { return Ok(()) };
        producer.begin_transaction().map_err(|e| fail("begin", e))?;
        let (deltas_topic, state_topic) = (self.o.topic("deltas"), self.o.topic("state"));
        let mut records: Vec<DeltaRecord> = (0..self.deltas)
            .map(|_| DeltaRecord { partition: p as u32, offset: next, watermark: wm, entries: Vec::new() })
            .collect();
        for pt in &work.points {
            let id = PointId::of(&task.catalog, pt.key, pt.minute);
            records[id.partition(self.deltas) as usize].entries.push((id, pt.value));
        }
        if let Some(topic) = &self.o.spec.dead_letter {
            for (offset, payload, reason) in task.refused.drain(..) {
                let (partition, offset) = (p.to_string(), offset.to_string());
                let headers = OwnedHeaders::new()
                    .insert(Header { key: "expmon.topic", value: Some(self.o.spec.topic.as_str()) })
                    .insert(Header { key: "expmon.partition", value: Some(partition.as_str()) })
                    .insert(Header { key: "expmon.offset", value: Some(offset.as_str()) })
                    .insert(Header { key: "expmon.reason", value: Some(reason.as_str()) });
                send(producer, BaseRecord::to(topic).payload(&payload[..]).headers(headers))?;
                self.stats.dead_lettered += 1;
            }
        }
        let key = p.to_le_bytes();
        for (d, r) in records.iter().enumerate() {
            for bytes in r.encode_pieces(wire::CHUNK_BYTES) {
                self.stats.delta_bytes += bytes.len() as u64;
                self.stats.delta_records += 1;
                let record = BaseRecord::to(&deltas_topic).partition(d as i32).key(&key[..]).payload(&bytes[..]);
                send(producer, record)?;
            }
        }
        let mut offsets = TopicPartitionList::new();
        offsets.add_partition_offset(&self.o.spec.topic, p, Offset::Offset(next)).map_err(|e| fail("offsets", e))?;
        let every = self.o.snapshot_every.max(1);
        if task.snapshot_due || stopping || task.since_snapshot + 1 >= every {
            task.since_snapshot = 0;
            task.snapshot_due = false;
            let snap = task.snapshot();
            let id = xxhash_rust::xxh3::xxh3_64(&snap) ^ std::process::id() as u64;
            let count = snap.len().div_ceil(wire::CHUNK_BYTES).max(1) as u32;
            for (i, chunk) in snap.chunks(wire::CHUNK_BYTES).chain((snap.is_empty()).then_some(&[][..])).enumerate() {
                let bytes = wire::encode_chunk(p as u32, next, id, i as u32, count, chunk);
                self.stats.snapshot_bytes += bytes.len() as u64;
                send(producer, BaseRecord::to(&state_topic).partition(p).key(&key[..]).payload(&bytes))?;
            }
        } else {
            task.since_snapshot += 1;
        }
        let timeout = Duration::from_secs(30);
        // The snapshots and records reach the broker before the offsets do: a
        // broker that commits (or does not filter) the offsets of a producer
        // killed mid-transaction then still holds the snapshot they point at
        // (tests/scale_out.rs found Tansu committing such offsets).
        producer.flush(timeout).map_err(|e| fail("flush", e))?;
        producer.send_offsets_to_transaction(&offsets, meta, timeout).map_err(|e| fail("offsets", e))?;
        producer.commit_transaction(timeout).map_err(|e| fail("commit", e))?;
        // Counted once committed: what a failed transaction read, its
        // partition's next owner reads and counts again.
        add_since(&mut self.stats.router, &task.router.stats, &task.counted);
        task.counted = task.router.stats.clone();
        Ok(())
    }
}

/// Buffers one trigger reuses across its tasks.
#[derive(Default)]
struct Work {
    deltas: Vec<crate::aggregate::Delta>,
    points: Vec<Point>,
}

/// Adds to `total` what `now` counted since `before` (one task's router).
fn add_since(total: &mut RouterStats, now: &RouterStats, before: &RouterStats) {
    let new = |n: u64, b: u64| n.saturating_sub(b);
    total.events_in += new(now.events_in, before.events_in);
    total.routed += new(now.routed, before.routed);
    total.late_dropped += new(now.late_dropped, before.late_dropped);
    total.unknown_tenant += new(now.unknown_tenant, before.unknown_tenant);
    total.unknown_experiment += new(now.unknown_experiment, before.unknown_experiment);
    total.unknown_variation += new(now.unknown_variation, before.unknown_variation);
    for (t, (n, b)) in total.rejected.iter_mut().zip(now.rejected.iter().zip(&before.rejected)) {
        *t += new(*n, *b);
    }
    for (t, (n, b)) in total.names_replaced.iter_mut().zip(now.names_replaced.iter().zip(&before.names_replaced)) {
        *t += new(*n, *b);
    }
}

/// One input message: routed by the task of its partition (none: not ours);
/// a refused one is kept for the dead-letter topic if `keep_refused`.
fn handle(tasks: &mut BTreeMap<i32, Owned>, m: &impl Message, keep_refused: bool) {
    if let Some(Owned { task, .. }) = tasks.get_mut(&m.partition()) {
        task.read(m, keep_refused);
    }
}

/// Produces one record, waiting for queue space rather than failing.
pub(super) fn send(producer: &BaseProducer, mut record: BaseRecord<'_, [u8], [u8]>) -> Result<(), ScaleError> {
    loop {
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((rdkafka::error::KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), r)) => {
                record = r;
                producer.poll(Duration::from_millis(10));
            }
            Err((error, r)) => return Err(ScaleError::Produce { topic: r.topic.to_string(), error }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{OwnedMessage, Timestamp};

    fn message(offset: i64, line: &str, sent_ms: i64) -> OwnedMessage {
        let payload = Some(line.as_bytes().to_vec());
        OwnedMessage::new(payload, None, "events".into(), Timestamp::CreateTime(sent_ms), 0, offset, None)
    }

    /// `max_future` counts from the message's timestamp when it is the
    /// earlier, so a replay long after the first read refuses the same events
    /// (a wall clock that has since passed an event's `ts` changes nothing).
    #[test]
    fn max_future_is_measured_from_the_message_timestamp_or_the_wall_clock_if_earlier() {
        let config = Config::demo();
        let future = config.engine.max_future_ms;
        let ts = 1_767_225_600_000; // long before the wall clock of any run
        let line = format!(r#"{{"ts":{ts},"tenant":"uswm","session":"s1","mp":"home_page"}}"#);
        for (sent, refused) in [(ts - future - 1, 1), (ts - future, 0), (ts, 0)] {
            let mut task = Task::new(&config, Names::default()).unwrap();
            task.read(&message(0, &line, sent), false);
            let r = &task.router.stats;
            assert_eq!(r.events_in, 1);
            assert_eq!(r.rejected[crate::event::Reject::TsFuture.index()], refused, "sent at {sent}");
        }
        // The wall clock decides for a message without a timestamp, one
        // before 2000, or one from a producer clock ahead of it: an event
        // stamped past the wall clock's bound is refused even if its message
        // claims to be later still.
        let wall = crate::clock::now_ms();
        let ahead = format!(r#"{{"ts":{},"tenant":"uswm","session":"s1","mp":"home_page"}}"#, wall + 2 * future);
        let cases = [
            (Timestamp::NotAvailable, &line, 0),
            (Timestamp::CreateTime(0), &line, 0),
            (Timestamp::CreateTime(wall + 10 * future), &line, 0),
            (Timestamp::CreateTime(wall + 10 * future), &ahead, 1),
        ];
        for (sent, line, refused) in cases {
            let mut task = Task::new(&config, Names::default()).unwrap();
            let m = OwnedMessage::new(Some(line.as_bytes().to_vec()), None, "events".into(), sent, 0, 0, None);
            task.read(&m, false);
            assert_eq!(task.router.stats.rejected_total(), refused, "{sent:?} {line}");
        }
    }
}
