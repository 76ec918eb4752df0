//! The production input: a consumer-group member reading one Kafka topic.
//!
//! - Messages are read in batches of lines; each line carries its partition, so
//!   the router keeps one watermark clock per partition and combines them by
//!   min. A partition at its end (EOF) or silent for `idle_timeout` stops
//!   counting in the min, so a quiet partition cannot hold the watermark back.
//! - Offsets are never committed automatically. The engine calls
//!   [`Source::commit`] with the positions of a flush once the sink has
//!   acknowledged that flush's totals (at-least-once in, absolute totals out).
//! - Rebalancing is cooperative-sticky by default (a kept partition is never
//!   interrupted). On revoke, the acknowledged positions of the revoked
//!   partitions are committed synchronously before they go; what was read past
//!   them is read again by the new owner.
//! - Bad messages are counted by the router; with `dead_letter=TOPIC` each one
//!   is also copied there with headers naming its topic, partition, offset and
//!   reason.
//! - Consumer lag per partition comes from librdkafka's statistics.

use ahash::{AHashMap, AHashSet};
use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use rdkafka::statistics::Statistics;
use rdkafka::types::{RDKafkaErrorCode, RDKafkaRespErr};
use rdkafka::{Offset, TopicPartitionList};
use std::io;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Fill, LineBatch, Offsets, PartitionState, Source, MAX_LINE_BYTES};
use crate::event::Reject;
use crate::failures::lock;
use crate::kafka::{topic_partitions, KafkaSpec};

/// Lines per fill, and the bytes after which a fill stops early.
const FILL_LINES: usize = 16 * 1024;
const FILL_BYTES: usize = 8 << 20;
/// Longest wait for the first message of a fill.
const FILL_WAIT: Duration = Duration::from_millis(100);

/// What the librdkafka callbacks (run inside `poll`) hand to the source.
#[derive(Default)]
struct Shared {
    topic: String,
    /// Assignment changes not yet applied by the source: `(partition, assigned)`.
    changes: Vec<(i32, bool)>,
    /// The positions last acknowledged by the sink, per partition.
    acked: AHashMap<i32, i64>,
    lag: Vec<(i32, i64)>,
    last_error: Option<(Instant, String)>,
    /// Set once connected: errors before that end the start-up in one line.
    connected: bool,
    /// Where the engine's state stands for partitions not assigned now (from
    /// a checkpoint, or read before a revoke): where to start each when it is
    /// assigned, instead of the group's committed offset, which can lag.
    resume: AHashMap<i32, i64>,
    /// Resume positions applied to an assignment, for the source's own
    /// position of a partition before its first message.
    resumed: AHashMap<i32, i64>,
}

struct Ctx {
    shared: Arc<Mutex<Shared>>,
    /// Set when `shared.changes` has entries (checked after every poll).
    changed: Arc<AtomicBool>,
    /// librdkafka's `debug` setting was given: show its debug log.
    verbose: bool,
}

impl Ctx {
    fn lock(&self) -> std::sync::MutexGuard<'_, Shared> {
        lock(&self.shared)
    }
}

impl ClientContext for Ctx {
    /// librdkafka's own log, with its `debug` setting; its errors also reach
    /// [`ClientContext::error`], which reports them (rate-limited).
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if self.verbose {
            tracing::info!("librdkafka {level:?} {fac}: {message}");
        }
    }

    fn stats(&self, stats: Statistics) {
        let mut g = self.lock();
        let Some(t) = stats.topics.get(&g.topic) else { return };
        let mut lag: Vec<(i32, i64)> = t
            .partitions
            .iter()
            .filter(|(p, s)| **p >= 0 && s.consumer_lag >= 0)
            .map(|(p, s)| (*p, s.consumer_lag))
            .collect();
        lag.sort_unstable();
        g.lag = lag;
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::PartitionEOF) {
            return;
        }
        // librdkafka retries on its own; say so at most every 10 s.
        let mut g = self.lock();
        if g.connected && g.last_error.as_ref().is_none_or(|(t, _)| t.elapsed() >= Duration::from_secs(10)) {
            tracing::warn!("kafka: {error}: {reason} (retrying; said at most every 10 s)");
            g.last_error = Some((Instant::now(), reason.to_string()));
        }
    }
}

impl ConsumerContext for Ctx {
    /// The default strategy, plus starting partitions at a checkpoint's
    /// positions: the committed offsets may lag a published checkpoint (the
    /// process can die between publishing it and committing).
    fn rebalance(&self, consumer: &BaseConsumer<Self>, err: RDKafkaRespErr, tpl: &mut TopicPartitionList) {
        let cooperative = matches!(consumer.rebalance_protocol(), RebalanceProtocol::Cooperative);
        let result = match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                {
                    let mut g = self.lock();
                    let topic = g.topic.clone();
                    for p in tpl.elements().iter().map(|e| e.partition()).collect::<Vec<_>>() {
                        if let Some(at) = g.resume.remove(&p) {
                            let _ = tpl.set_partition_offset(&topic, p, Offset::Offset(at));
                            g.resumed.insert(p, at);
                        }
                    }
                }
                self.pre_rebalance(consumer, &Rebalance::Assign(tpl));
                if cooperative {
                    consumer.incremental_assign(tpl)
                } else {
                    consumer.assign(tpl)
                }
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.pre_rebalance(consumer, &Rebalance::Revoke(tpl));
                if cooperative {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                }
            }
            other => {
                tracing::error!("kafka: rebalance error: {}", RDKafkaErrorCode::from(other));
                consumer.unassign()
            }
        };
        if let Err(e) = result {
            tracing::error!("kafka: applying a rebalance failed: {e}");
        }
    }

    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Revoke(tpl) => {
                let mut commit = TopicPartitionList::new();
                let mut g = self.lock();
                self.changed.store(true, Relaxed);
                for e in tpl.elements() {
                    g.changes.push((e.partition(), false));
                    if let Some(&next) = g.acked.get(&e.partition()) {
                        let _ = commit.add_partition_offset(e.topic(), e.partition(), Offset::Offset(next));
                    }
                }
                drop(g);
                if commit.count() > 0 {
                    if let Err(e) = consumer.commit(&commit, CommitMode::Sync) {
                        tracing::warn!("kafka: commit on revoke failed: {e}");
                    }
                }
            }
            Rebalance::Assign(tpl) => {
                let mut g = self.lock();
                self.changed.store(true, Relaxed);
                for e in tpl.elements() {
                    g.changes.push((e.partition(), true));
                }
            }
            Rebalance::Error(e) => tracing::error!("kafka: rebalance error: {e}"),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        if let Err(e) = result {
            tracing::warn!("kafka: offset commit failed (the next one covers it): {e}");
        }
    }
}

/// Where the source stands on one assigned partition.
#[derive(Debug, Clone, Copy)]
struct Part {
    /// Offset after the last message returned; `None` before the first.
    next: Option<i64>,
    last_message: Instant,
    at_eof: bool,
}

pub struct KafkaSource {
    consumer: BaseConsumer<Ctx>,
    shared: Arc<Mutex<Shared>>,
    changed: Arc<AtomicBool>,
    spec: KafkaSpec,
    parts: AHashMap<i32, Part>,
    /// `(partition, offset)` of each line of the last fill, for dead letters.
    origins: Vec<(i32, i64)>,
    dead_letter: Option<ThreadedProducer<DefaultProducerContext>>,
    dead_lettered: u64,
    /// Partitions of the topic (for `until_end`).
    topic_partitions: usize,
}

impl KafkaSource {
    /// Joins the group and subscribes. Fails with one line if the brokers do
    /// not answer or the topic does not exist.
    /// `resume`: positions from a checkpoint, used when a partition is first
    /// assigned.
    pub fn connect(
        spec: KafkaSpec,
        base: &[(String, String)],
        resume: &Offsets,
    ) -> Result<KafkaSource, crate::kafka::KafkaError> {
        let shared = Arc::new(Mutex::new(Shared {
            topic: spec.topic.clone(),
            resume: resume.iter().copied().collect(),
            ..Shared::default()
        }));
        let changed = Arc::new(AtomicBool::new(false));
        let mut cfg = spec.client_config(&[]);
        for (k, v) in [
            ("group.id", spec.group.as_str()),
            ("enable.auto.commit", "false"),
            ("enable.auto.offset.store", "false"),
            ("auto.offset.reset", "earliest"),
            ("enable.partition.eof", "true"),
            ("partition.assignment.strategy", "cooperative-sticky"),
            ("statistics.interval.ms", "5000"),
            // Refetch as soon as a partition's prefetch queue drains (the
            // default waits a second, which starves a fast replay).
            ("fetch.queue.backoff.ms", "10"),
            ("client.id", "expmon"),
        ] {
            cfg.set(k, v);
        }
        // The config file's and the address's settings win over the defaults.
        for (k, v) in base.iter().chain(&spec.settings) {
            cfg.set(k, v);
        }
        let consumer: BaseConsumer<Ctx> = cfg
            .create_with_context(Ctx {
                shared: shared.clone(),
                changed: changed.clone(),
                verbose: base.iter().chain(&spec.settings).any(|(k, _)| k == "debug"),
            })
            .map_err(|e| spec.client_error(base, "kafka consumer", e))?;
        let topic_partitions = topic_partitions(&consumer, &spec, Duration::from_secs(10))?;
        lock(&shared).connected = true;
        let dead_letter = match &spec.dead_letter {
            Some(_) => Some(
                spec.client_config(base)
                    .set("linger.ms", "20")
                    .create()
                    .map_err(|e| spec.client_error(base, "kafka dead-letter producer", e))?,
            ),
            None => None,
        };
        consumer
            .subscribe(&[&spec.topic])
            .map_err(|error| crate::kafka::KafkaError::Subscribe { topic: spec.topic.clone(), error })?;
        Ok(KafkaSource {
            consumer,
            shared,
            changed,
            spec,
            parts: AHashMap::new(),
            origins: Vec::new(),
            dead_letter,
            dead_lettered: 0,
            topic_partitions,
        })
    }

    fn send_dead_letter(&mut self, partition: i32, offset: i64, payload: &[u8], reason: &str) {
        let Some(producer) = &self.dead_letter else { return };
        let topic = self.spec.dead_letter.as_deref().unwrap_or_default();
        let (p, o) = (partition.to_string(), offset.to_string());
        let headers = OwnedHeaders::new()
            .insert(Header { key: "expmon.topic", value: Some(self.spec.topic.as_str()) })
            .insert(Header { key: "expmon.partition", value: Some(p.as_str()) })
            .insert(Header { key: "expmon.offset", value: Some(o.as_str()) })
            .insert(Header { key: "expmon.reason", value: Some(reason) });
        let mut record = BaseRecord::<(), [u8]>::to(topic).payload(payload).headers(headers);
        // A full producer queue pushes back here rather than dropping.
        loop {
            match producer.send(record) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    record = r;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err((e, _)) => {
                    tracing::error!("kafka: cannot copy a bad message to {topic}: {e}");
                    break;
                }
            }
        }
        self.dead_lettered += 1;
    }
}

/// Applies assignment changes recorded by the rebalance callback (which runs
/// inside `poll`: this is called right after every poll, before the next
/// message can touch a partition's position). Returns whether there were any.
fn apply_changes(changed: &AtomicBool, shared: &Mutex<Shared>, parts: &mut AHashMap<i32, Part>, topic: &str) -> bool {
    if !changed.swap(false, Relaxed) {
        return false;
    }
    let mut g = lock(shared);
    let changes = std::mem::take(&mut g.changes);
    for &(p, assigned) in &changes {
        if assigned {
            let next = g.resumed.remove(&p);
            parts.insert(p, Part { next, last_message: Instant::now(), at_eof: false });
        } else {
            // Our state covers this partition up to where we read it: if it
            // comes back (an eager rebalance revokes everything), resume there,
            // not at the committed offset, which lags what the state holds.
            if let Some(next) = parts.remove(&p).and_then(|part| part.next) {
                g.resume.insert(p, next);
            }
            g.acked.remove(&p);
        }
        let what = if assigned { "assigned" } else { "revoked" };
        tracing::info!("kafka: partition {topic}/{p} {what}");
    }
    !changes.is_empty()
}

impl Source for KafkaSource {
    fn fill(&mut self, batch: &mut LineBatch) -> io::Result<Fill> {
        batch.clear();
        self.origins.clear();
        let started = Instant::now();
        let mut rebalanced = false;
        while batch.len() < FILL_LINES && batch.buf.len() < FILL_BYTES {
            let wait = if batch.is_empty() { FILL_WAIT.saturating_sub(started.elapsed()) } else { Duration::ZERO };
            let polled = self.consumer.poll(wait);
            rebalanced |= apply_changes(&self.changed, &self.shared, &mut self.parts, &self.spec.topic);
            let Some(polled) = polled else {
                if !batch.is_empty() || started.elapsed() >= FILL_WAIT {
                    break;
                }
                continue;
            };
            match polled {
                Ok(m) => {
                    let (p, offset) = (m.partition(), m.offset());
                    let part =
                        self.parts.entry(p).or_insert(Part { next: None, last_message: Instant::now(), at_eof: false });
                    part.next = Some(offset + 1);
                    part.last_message = Instant::now();
                    part.at_eof = false;
                    let payload = m.payload().unwrap_or_default();
                    if payload.len() > MAX_LINE_BYTES {
                        batch.overlong += 1;
                        let payload = payload.to_vec();
                        drop(m);
                        self.send_dead_letter(p, offset, &payload, Reject::TooLong.as_str());
                        continue;
                    }
                    batch.push_line(payload);
                    batch.part.push(p as u16);
                    self.origins.push((p, offset));
                }
                Err(KafkaError::PartitionEOF(p)) => {
                    if let Some(part) = self.parts.get_mut(&p) {
                        part.at_eof = true;
                    }
                }
                Err(e) => {
                    // Transient (librdkafka reconnects by itself); counted in its
                    // own logs, reported here at most every 10 s by the context.
                    let ctx = self.consumer.context();
                    ctx.error(e, "consumer poll");
                }
            }
        }
        batch.rebalanced = rebalanced;
        let max_p = self.parts.keys().copied().max().unwrap_or(0).max(0) as usize;
        batch.partitions.clear();
        batch.partitions.resize(max_p + 1, PartitionState::Gone);
        for (&p, part) in &self.parts {
            let quiet = part.at_eof || part.last_message.elapsed() >= self.spec.idle_timeout;
            batch.partitions[p as usize] = if quiet { PartitionState::Idle } else { PartitionState::Active };
        }
        // A bounded replay ends when this consumer holds every partition of the
        // topic (a member that died may still hold some for a while) and has
        // read each to its end.
        let at_end = self.parts.len() >= self.topic_partitions && self.parts.values().all(|p| p.at_eof);
        Ok(if self.spec.until_end && at_end { Fill::End } else { Fill::Lines })
    }

    fn is_live(&self) -> bool {
        true
    }

    fn describe(&self) -> String {
        format!("kafka://{}/{} (group {})", self.spec.brokers, self.spec.topic, self.spec.group)
    }

    /// The topic and the group (not the brokers: one cluster has many
    /// addresses).
    fn identity(&self) -> super::SourceId {
        super::SourceId {
            kind: super::SourceKind::Kafka,
            name: self.spec.topic.clone(),
            group: self.spec.group.clone(),
            file: None,
        }
    }

    /// Positions of the partitions read, plus the checkpoint positions of
    /// partitions not assigned yet: the restored state covers them, so a
    /// checkpoint taken before (or during) the group join must carry them on.
    fn position(&self) -> Option<Offsets> {
        let mut pos: Offsets = self.parts.iter().filter_map(|(&p, part)| part.next.map(|n| (p, n))).collect();
        let g = lock(&self.shared);
        pos.extend(g.resume.iter().filter(|(p, _)| !self.parts.contains_key(p)).map(|(&p, &n)| (p, n)));
        pos.sort_unstable();
        Some(pos)
    }

    fn commit(&mut self, pos: &Offsets, wait: bool) {
        if let Some(p) = &self.dead_letter {
            // Copies of bad messages go out before their offsets are committed.
            let _ = p.flush(Duration::from_secs(30));
        }
        let assigned: AHashSet<i32> = self.parts.keys().copied().collect();
        let mut tpl = TopicPartitionList::new();
        {
            let mut g = lock(&self.shared);
            for &(p, next) in pos.iter().filter(|(p, _)| assigned.contains(p)) {
                g.acked.insert(p, next);
                let _ = tpl.add_partition_offset(&self.spec.topic, p, Offset::Offset(next));
            }
        }
        if tpl.count() == 0 {
            return;
        }
        let mode = if wait { CommitMode::Sync } else { CommitMode::Async };
        if let Err(e) = self.consumer.commit(&tpl, mode) {
            tracing::warn!("kafka: offset commit failed (the next one covers it): {e}");
        }
    }

    fn reject(&mut self, batch: &LineBatch, line: usize, reason: Reject) {
        if self.dead_letter.is_some() {
            let (p, o) = self.origins[line];
            let payload = batch.line(line).to_vec();
            self.send_dead_letter(p, o, &payload, reason.as_str());
        }
    }

    fn hold(&mut self, part: usize, held: bool) {
        if !self.parts.contains_key(&(part as i32)) {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&self.spec.topic, part as i32);
        // Pausing drops what was prefetched; resuming fetches from the position
        // after the last message returned, so nothing is skipped.
        let r = if held { self.consumer.pause(&tpl) } else { self.consumer.resume(&tpl) };
        if let Err(e) = r {
            tracing::warn!("kafka: cannot {} partition {part}: {e}", if held { "pause" } else { "resume" });
        }
    }

    fn lag(&self) -> Vec<(i32, i64)> {
        lock(&self.shared).lag.clone()
    }

    fn close(&mut self) -> String {
        if let Some(p) = &self.dead_letter {
            if p.flush(Duration::from_secs(30)).is_err() {
                tracing::error!("kafka: dead-letter copies still unsent after 30 s");
            }
        }
        self.consumer.unsubscribe();
        if self.dead_letter.is_some() {
            format!("{} bad messages copied to {}", self.dead_lettered, self.spec.dead_letter.as_deref().unwrap_or(""))
        } else {
            String::new()
        }
    }
}
