//! Stage 2 of scale-out: one task per delta partition this instance holds.
//! A task keeps, for each open point and input partition, the latest
//! contribution `(offset, value)` that stage 1 published; the point's total
//! (a `Totals`, as the single-instance writer keeps) is their sum. It also
//! keeps every input partition's latest watermark mark; a minute is final
//! once all of them passed it.
//!
//! Per trigger and task (see `crate::scale` for why this is exact):
//! 1. `begin_transaction` on the task's own producer (`transactional.id =
//!    <group>.s2-<partition>`: a new owner fences the old one);
//! 2. produce the changed entries and marks to `<group>.totals` (partition =
//!    the delta partition), tombstones for entries final since the trigger
//!    before, and send the delta offset;
//! 3. `commit_transaction`; only then write the changed totals to the sink.
//!    A commit that returns after the session timeout or later stops the
//!    instance without writing: it may have been paused and replaced.
//!
//! A task is built when its partition is assigned: producer first (fencing),
//! then the changelog read to its end, then consumption from the committed
//! delta offset; every restored point is written again.

use ahash::AHashMap;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::wire::{self, DeltaRecord, PointId};
use super::ScaleError;
use super::{Isolation, Rebalances, ScaleOptions};
use crate::aggregate::{Delta, MetricKind, Namer, Point, SeriesKey, Totals, NO_MP};
use crate::config::Catalog;
use crate::names::{Interner, NameKind};
use crate::shard::final_before;
use crate::sink::Sink;

#[derive(Debug, Default, Clone)]
pub struct Stage2Stats {
    pub records: u64,
    pub transactions: u64,
    pub changelog_bytes: u64,
    pub upserts: u64,
    pub restores: u64,
    /// Entries of points this build's catalog does not know (another config).
    pub unknown: u64,
    /// Tasks held now.
    pub tasks: u64,
    /// Delta records not read yet by this instance's tasks (every 10 s;
    /// each transaction's commit marker counts one).
    pub lag: u64,
}

/// Turns wire names into this process's series keys.
struct Resolver {
    catalog: Arc<Catalog>,
    variations: AHashMap<i64, u32>,
    mp: Interner,
    device: Interner,
    login: Interner,
}

impl Resolver {
    fn new(catalog: Arc<Catalog>) -> Resolver {
        let names = catalog.names.clone();
        Resolver {
            variations: catalog.variations.iter().enumerate().map(|(i, v)| (v.id, i as u32)).collect(),
            mp: Interner::new(names.clone(), NameKind::Mp, NameKind::Mp.capacity()),
            device: Interner::new(names.clone(), NameKind::Device, NameKind::Device.capacity()),
            login: Interner::new(names, NameKind::Login, NameKind::Login.capacity()),
            catalog,
        }
    }

    fn key(&mut self, id: &PointId) -> Option<SeriesKey> {
        let variation = *self.variations.get(&id.variation_id)?;
        let kind = *MetricKind::ALL.get(id.kind as usize)?;
        let mp = match &id.mp {
            Some(m) => self.mp.resolve(m).0,
            None => NO_MP,
        };
        Some(SeriesKey::new(kind, variation, mp, self.device.resolve(&id.device).0, self.login.resolve(&id.login).0))
    }
}

struct Task {
    producer: BaseProducer,
    state: Contributions,
    next: Option<i64>,
    /// The delta offset of the last commit.
    committed: Option<i64>,
    /// Restored points not yet written again.
    rewrite: bool,
}

/// A stage-2 task's state: the latest contribution of every input partition
/// to every open point, their sums, and the partitions' marks.
struct Contributions {
    /// `(point, minute, input partition)` → latest `(offset, contribution)`.
    entries: AHashMap<(SeriesKey, i64, u32), (i64, i64)>,
    totals: Totals,
    /// Per input partition: latest `(offset, watermark)`.
    marks: Vec<Option<(i64, i64)>>,
    changed: Vec<(SeriesKey, i64, u32)>,
    marks_changed: Vec<u32>,
    /// Entries of minutes before this are forgotten (tombstoned); deltas for them are stale.
    forgotten: i64,
    /// The final bound at the last sink write: forgotten at the next trigger.
    written_final: i64,
}

impl Contributions {
    fn new(inputs: usize) -> Contributions {
        Contributions {
            entries: AHashMap::new(),
            // Every restored or touched point is written again: the sink may
            // hold a value the previous owner wrote after its last commit.
            totals: Totals::rewriting_touched(),
            marks: vec![None; inputs],
            changed: Vec::new(),
            marks_changed: Vec::new(),
            forgotten: i64::MIN,
            written_final: i64::MIN,
        }
    }

    /// Stage 1's contribution `value` of `p` to `key` at `offset`, if newer.
    fn apply(&mut self, key: SeriesKey, minute: i64, p: u32, offset: i64, value: i64) {
        if minute < self.forgotten {
            return;
        }
        let e = self.entries.entry((key, minute, p)).or_insert((i64::MIN, 0));
        if offset <= e.0 && e.0 != i64::MIN {
            return;
        }
        let delta = value.wrapping_sub(e.1);
        *e = (offset, value);
        self.totals.apply(&[Delta { key, minute, delta }]);
        self.changed.push((key, minute, p));
    }

    fn mark(&mut self, p: u32, offset: i64, watermark: i64) {
        let m = &mut self.marks[p as usize];
        if m.is_none_or(|(o, _)| offset > o) {
            *m = Some((offset, m.map_or(watermark, |(_, w)| w.max(watermark))));
            self.marks_changed.push(p);
        }
    }

    /// Minutes before this are final: every input partition passed them.
    fn final_bound(&self) -> i64 {
        let min = self.marks.iter().map(|m| m.map_or(i64::MIN, |(_, w)| w)).min().unwrap_or(i64::MIN);
        final_before(min)
    }
}

pub struct Stage2 {
    o: ScaleOptions,
    consumer: BaseConsumer<Rebalances>,
    sink: Box<dyn Sink>,
    resolver: Resolver,
    inputs: usize,
    tasks: BTreeMap<i32, Task>,
    seen: (u64, u64),
    stats: Stage2Stats,
    figures: Arc<std::sync::Mutex<super::stage1::Stage1Stats>>,
    health_writes: crate::health::HealthWrites,
}

impl Stage2 {
    /// `catalog` is the sink's (it names the points written).
    pub fn new(
        catalog: Arc<Catalog>,
        o: ScaleOptions,
        sink: Box<dyn Sink>,
        inputs: usize,
        figures: Arc<std::sync::Mutex<super::stage1::Stage1Stats>>,
    ) -> Result<Stage2, ScaleError> {
        let consumer = super::stage_consumer(&o, &format!("{}.s2", o.spec.group), &o.topic("deltas"))?;
        Ok(Stage2 {
            o,
            consumer,
            sink,
            resolver: Resolver::new(catalog),
            inputs,
            tasks: BTreeMap::new(),
            seen: (0, 0),
            stats: Stage2Stats::default(),
            figures,
            health_writes: crate::health::HealthWrites::new(),
        })
    }

    fn follow_assignment(&mut self) -> Result<(), ScaleError> {
        let todo = super::unowned_assigned(&self.consumer, &mut self.seen, &mut self.tasks, "stage 2")?;
        // What waits on the broker runs side by side (see stage 1); the
        // names are resolved here, one task after the other.
        let (o, consumer) = (&self.o, &self.consumer);
        let read = super::in_parallel(&todo, |d| {
            let started = Instant::now();
            read_changelog(o, consumer, d).map(|r| (r, started))
        });
        for (d, read) in read {
            let (changelog, started) = read?;
            let task = self.restore(d, changelog)?;
            tracing::info!(
                "stage 2: partition {}/{d} assigned, {} entries restored in {} ms",
                self.o.topic("deltas"),
                task.state.entries.len(),
                started.elapsed().as_millis()
            );
            self.stats.restores += 1;
            self.tasks.insert(d, task);
        }
        Ok(())
    }

    /// Task `d` built from what [`read_changelog`] read.
    fn restore(&mut self, d: i32, (producer, next, latest): Changelog) -> Result<Task, ScaleError> {
        let mut task = Task { producer, state: Contributions::new(self.inputs), next, committed: next, rewrite: true };
        let topic = self.o.topic("totals");
        for (key, value) in latest {
            let Some((offset, value)) = value else { continue };
            let (point, p) = wire::decode_changelog_key(&key).map_err(|e| e.at(format!("{topic}/{d}")))?;
            if p as usize >= self.inputs {
                let why = format!("names input partition {p}; the input has {}", self.inputs);
                return Err(ScaleError::Wire(why).at(format!("{topic}/{d}")));
            }
            match point {
                None => task.state.mark(p, offset, value),
                Some(id) => match self.resolver.key(&id) {
                    Some(k) => task.state.apply(k, id.minute, p, offset, value),
                    None => self.stats.unknown += 1,
                },
            }
        }
        // Restored state is already in the changelog.
        task.state.changed.clear();
        task.state.marks_changed.clear();
        Ok(task)
    }

    pub fn run(mut self) -> Result<Stage2Stats, ScaleError> {
        let started = Instant::now();
        let mut next_trigger = Instant::now() + self.o.trigger;
        let mut next_status = Instant::now() + super::STATUS_EVERY;
        loop {
            if Instant::now() >= next_status {
                next_status = Instant::now() + super::STATUS_EVERY;
                let tasks = self.tasks.iter().map(|(&d, t)| (d, t.next));
                let lag = super::lag(&self.consumer, &self.o.topic("deltas"), tasks);
                self.stats.lag = lag as u64;
                let s = &self.stats;
                if self.o.status {
                    tracing::info!(
                        "stage 2: {} tasks, {} delta records applied, {} transactions, {} upserts, delta lag {lag} \
                         records",
                        self.tasks.len(),
                        s.records,
                        s.transactions,
                        s.upserts
                    );
                }
            }
            let stopping = self.o.stopping(started);
            if stopping || Instant::now() >= next_trigger {
                self.follow_assignment()?;
                self.trigger()?;
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
                    handle(&mut self.tasks, &mut self.resolver, &mut self.stats, self.inputs, &m)?;
                }
                continue;
            }
            match polled {
                Some(Ok(m)) => handle(&mut self.tasks, &mut self.resolver, &mut self.stats, self.inputs, &m)?,
                Some(Err(e)) => tracing::warn!("stage 2: {e}"),
                None => {}
            }
        }
        super::leave(&self.consumer, &self.o, "stage 2");
        let report = self.sink.close()?;
        if report.undelivered > 0 {
            return Err(ScaleError::Undelivered(report.undelivered));
        }
        Ok(self.stats)
    }

    fn rebalanced(&self) -> bool {
        let ctx = self.consumer.context();
        (ctx.revoked.load(Relaxed), ctx.assigned.load(Relaxed)) != self.seen
    }

    fn trigger(&mut self) -> Result<(), ScaleError> {
        let (topic, deltas_topic) = (self.o.topic("totals"), self.o.topic("deltas"));
        let acked = self.sink.unacknowledged_flushes() == 0;
        let session_timeout = self.o.session_timeout();
        let meta = self.consumer.group_metadata().ok_or(ScaleError::NoGroupMetadata(2))?;
        let mut points: Vec<Point> = Vec::new();
        for (&d, task) in self.tasks.iter_mut() {
            let forget = if acked { task.state.written_final } else { task.state.forgotten };
            let idle = task.state.changed.is_empty() && task.state.marks_changed.is_empty();
            if idle && forget <= task.state.forgotten && task.next == task.committed && !task.rewrite {
                continue; // nothing to commit or write
            }
            let fail =
                |step, error| ScaleError::Transaction { stage: 2, of: format!(" of {deltas_topic}/{d}"), step, error };
            task.producer.begin_transaction().map_err(|e| fail("begin", e))?;
            let catalog = &self.resolver.catalog;
            let mut bytes = 0u64;
            // Changed entries (the last value of each), then marks.
            task.state.changed.sort_unstable();
            task.state.changed.dedup();
            for &(k, minute, p) in &task.state.changed {
                let Some(&(offset, value)) = task.state.entries.get(&(k, minute, p)) else { continue };
                let key = wire::changelog_key(Some(&PointId::of(catalog, k, minute)), p);
                let val = wire::changelog_value(offset, value);
                bytes += (key.len() + val.len()) as u64;
                super::stage1::send(
                    &task.producer,
                    BaseRecord::to(&topic).partition(d).key(&key[..]).payload(&val[..]),
                )?;
            }
            task.state.changed.clear();
            task.state.marks_changed.sort_unstable();
            task.state.marks_changed.dedup();
            for &p in &task.state.marks_changed {
                let Some((offset, wm)) = task.state.marks[p as usize] else { continue };
                let (key, val) = (wire::changelog_key(None, p), wire::changelog_value(offset, wm));
                bytes += (key.len() + val.len()) as u64;
                super::stage1::send(
                    &task.producer,
                    BaseRecord::to(&topic).partition(d).key(&key[..]).payload(&val[..]),
                )?;
            }
            task.state.marks_changed.clear();
            // Entries final at the last write, which the sink has acknowledged: tombstones.
            if forget > task.state.forgotten {
                let mut gone = Vec::new();
                task.state.entries.retain(|&(k, m, p), _| {
                    if m < forget {
                        gone.push((k, m, p));
                    }
                    m >= forget
                });
                for (k, m, p) in gone {
                    let key = wire::changelog_key(Some(&PointId::of(catalog, k, m)), p);
                    bytes += key.len() as u64;
                    super::stage1::send(
                        &task.producer,
                        BaseRecord::<[u8], [u8]>::to(&topic).partition(d).key(&key[..]),
                    )?;
                }
                task.state.forgotten = forget;
            }
            points.clear();
            task.state.totals.take_due(task.state.forgotten, &mut points);
            if let Some(next) = task.next {
                let mut offsets = TopicPartitionList::new();
                offsets.add_partition_offset(&deltas_topic, d, Offset::Offset(next)).map_err(|e| fail("offsets", e))?;
                let timeout = Duration::from_secs(30);
                // The changelog reaches the broker before the offset (see stage 1).
                task.producer.flush(timeout).map_err(|e| fail("flush", e))?;
                task.producer.send_offsets_to_transaction(&offsets, &meta, timeout).map_err(|e| fail("offsets", e))?;
            }
            let committing = Instant::now();
            task.producer.commit_transaction(Duration::from_secs(30)).map_err(|e| fail("commit", e))?;
            task.committed = task.next;
            task.rewrite = false;
            // The heartbeat thread keeps the session through a slow commit;
            // only a pause of the whole process as long as the session timeout
            // can have let another instance take the task meanwhile.
            if committing.elapsed() >= session_timeout {
                return Err(ScaleError::Paused {
                    task: format!("{deltas_topic}/{d}"),
                    took_ms: committing.elapsed().as_millis(),
                    timeout_ms: session_timeout.as_millis(),
                });
            }
            self.stats.transactions += 1;
            self.stats.changelog_bytes += bytes;
            if !points.is_empty() {
                let namer = Namer::new(catalog);
                self.sink.write(&points, &namer)?;
                self.stats.upserts += points.len() as u64;
            }
            task.state.written_final = task.state.final_bound();
        }
        self.stats.tasks = self.tasks.len() as u64;
        self.write_health()?;
        self.sink.flush()?;
        Ok(())
    }

    /// Health points through the sink (those due) and to `/metrics` (all).
    fn write_health(&mut self) -> Result<(), ScaleError> {
        let s1 = crate::failures::lock(&self.figures).clone();
        let points = super::health_points(&s1, &self.stats, &self.o.dc, &self.o.instance);
        let due = self.health_writes.due(&points);
        self.sink.write_health(crate::clock::now_ms(), &due)?;
        if let Some(p) = &self.o.published {
            let write_latency = self.sink.health().latency;
            *crate::failures::lock(&p.health) = crate::serve::Snapshot { points, write_latency };
        }
        Ok(())
    }
}

/// What a stage-2 task restores from: its producer, committed delta offset
/// and the last changelog value of every key.
type Changelog = (BaseProducer, Option<i64>, AHashMap<Vec<u8>, Option<(i64, i64)>>);

/// Task `d`'s producer (initialised first: this fences the previous
/// owner, whose open transaction ends and whose commits fail from now
/// on), its committed delta offset, and the last changelog value of
/// every key (`None`: a tombstone).
fn read_changelog(o: &ScaleOptions, consumer: &BaseConsumer<Rebalances>, d: i32) -> Result<Changelog, ScaleError> {
    let producer = super::transactional_producer(o, &format!("{}.s2-{d}", o.spec.group))?;
    let next = super::committed(consumer, &o.topic("deltas"), d)?;
    let topic = o.topic("totals");
    let mut latest: AHashMap<Vec<u8>, Option<(i64, i64)>> = AHashMap::new();
    super::read_partition(o, &topic, d, Offset::Beginning, Isolation::Committed, |_, key, payload| {
        let Some(key) = key else { return Ok(()) };
        let value = payload.map(wire::decode_changelog_value).transpose().map_err(|e| e.at(format!("{topic}/{d}")))?;
        latest.insert(key.to_vec(), value);
        Ok(())
    })?;
    Ok((producer, next, latest))
}

/// One delta record: applied by the task of its partition (none: not ours).
fn handle(
    tasks: &mut BTreeMap<i32, Task>,
    resolver: &mut Resolver,
    stats: &mut Stage2Stats,
    inputs: usize,
    m: &impl Message,
) -> Result<(), ScaleError> {
    let (d, offset) = (m.partition(), m.offset());
    let Some(task) = tasks.get_mut(&d) else { return Ok(()) };
    if task.next.is_some_and(|n| offset < n) {
        return Ok(());
    }
    task.next = Some(offset + 1);
    let at = || format!("{}/{d}@{offset}", m.topic());
    let record = DeltaRecord::decode(m.payload().unwrap_or_default()).map_err(|e| e.at(at()))?;
    if record.partition as usize >= inputs {
        return Err(ScaleError::Wire(format!("input partition {} of {inputs}", record.partition)).at(at()));
    }
    stats.records += 1;
    for (id, value) in &record.entries {
        match resolver.key(id) {
            Some(k) => task.state.apply(k, id.minute, record.partition, record.offset, *value),
            None => stats.unknown += 1,
        }
    }
    task.state.mark(record.partition, record.offset, record.watermark);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: i64 = 1_767_225_600_000;

    fn key(v: u32) -> SeriesKey {
        SeriesKey::new(MetricKind::VisitFm, v, 0, 0, 0)
    }

    fn due(c: &mut Contributions) -> Vec<(SeriesKey, i64, i64)> {
        let mut out = Vec::new();
        c.totals.take_due(i64::MIN, &mut out);
        out.iter().map(|p| (p.key, p.minute, p.value)).collect()
    }

    #[test]
    fn the_latest_offset_of_each_partition_wins_and_repeats_change_nothing() {
        let mut c = Contributions::new(2);
        c.apply(key(1), M, 0, 10, 3);
        c.apply(key(1), M, 1, 7, 4);
        assert_eq!(due(&mut c), [(key(1), M, 7)]);
        // The same record again (read twice), and an older one: no change.
        c.apply(key(1), M, 0, 10, 3);
        c.apply(key(1), M, 0, 9, 100);
        assert_eq!(c.totals.len(), 1);
        let mut out = Vec::new();
        c.totals.take_due(i64::MIN, &mut out);
        assert!(out.iter().all(|p| p.value == 7), "{out:?}");
        // A later contribution of partition 0 replaces its earlier one.
        c.apply(key(1), M, 0, 12, 5);
        assert_eq!(due(&mut c), [(key(1), M, 9)]);
    }

    #[test]
    fn an_aborted_transactions_preview_is_overwritten_by_the_redo() {
        // Partition 0: +1 at offset 4, then -1 at offset 8. A first run cut a
        // trigger at 6 (value 1) and aborted; the redo cut at 10 (value 0,
        // emitted because it was touched). Either order of arrival ends at 0.
        for order in [[(6, 1), (10, 0)], [(10, 0), (6, 1)]] {
            let mut c = Contributions::new(1);
            for (offset, value) in order {
                c.apply(key(2), M, 0, offset, value);
            }
            let mut out = Vec::new();
            c.totals.take_due(i64::MIN, &mut out);
            assert_eq!(out.last().map(|p| p.value), Some(0), "{order:?}");
        }
    }

    #[test]
    fn a_minute_is_final_once_every_partition_passed_it() {
        let mut c = Contributions::new(3);
        assert_eq!(c.final_bound(), i64::MIN);
        c.mark(0, 5, M + 120_000);
        c.mark(1, 5, M + 200_000);
        assert_eq!(c.final_bound(), i64::MIN, "partition 2 has no mark yet");
        c.mark(2, 9, M + 61_000);
        assert_eq!(c.final_bound(), M + 60_000);
        c.mark(2, 3, M + 500_000);
        assert_eq!(c.final_bound(), M + 60_000, "an older mark does not move it");
        // Deltas for forgotten minutes are stale.
        c.forgotten = M + 60_000;
        c.apply(key(3), M, 0, 99, 1);
        assert!(c.totals.is_empty());
    }
}
