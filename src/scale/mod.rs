//! Scale-out (`expmon run --scale-out`, SPEC §8, `docs/scale-out.md`): N
//! instances in one group compute exactly the totals of one instance, through
//! Kafka only. Every instance runs both stages, each in its own thread with
//! its own consumer group:
//!
//! - [`stage1`] (group `<group>.s1`, the input topic): a task per input
//!   partition sessionizes it with the engine's own `Router` (one partition,
//!   one clock: late drop and expiry follow the partition's own watermark)
//!   and `SessionTable`, and at each trigger publishes, in one transaction,
//!   the partition's absolute contribution to every point it touched (keyed
//!   to the point's delta partition), its watermark mark, its input offset,
//!   and every `--snapshot-every` triggers a snapshot of its whole state.
//! - [`stage2`] (group `<group>.s2`, `<group>.deltas`): a task per delta
//!   partition keeps, per point and input partition, the latest contribution;
//!   their sum is the point's total, written as an absolute upsert by the one
//!   task that owns the point. Its state is a changelog in `<group>.totals`,
//!   written in a transaction with its delta offsets, before the sink.
//!
//! Why it is exact, step by step (the records carry their input offset):
//! 1. A stage-1 task's output is a function of its input: restored from the
//!    snapshot taken at its committed offset, it replays the partition's
//!    events in offset order, and decides late and expired from that
//!    partition's clock only; so the contribution `c_p(x, o)` of partition
//!    `p` to point `x` after offset `o` is the same whoever computes it.
//! 2. Every trigger emits, stamped `o`, `c_p(x, o)` for each point the trigger
//!    touched (also at a net zero), and the mark `W_p(o)`.
//! 3. Stage 2 keeps, per `(x, p)`, the entry with the greatest `o`. A record
//!    of an aborted transaction, a zombie's, or one read twice carries a true
//!    `c_p(x, o)` too (1), so it can only be replaced by a later one; the last
//!    touch of `x` in `p` is emitted by whichever run passes it (2), with an
//!    `o` past every value before it, and nothing touches `x` after it.
//!    This holds without `read_committed` (the test broker, Tansu 0.6, returns
//!    aborted records to read_committed readers).
//! 4. Total of `x` = sum over `p` of its entries. A minute is final once every
//!    input partition's mark passed it: no partition emits for it again.
//! 5. Stage 2 writes its changed entries and marks to the changelog and its
//!    delta offsets in one transaction, and only after the commit writes the
//!    changed totals to the sink (absolute: a repeat is harmless). Final
//!    entries are tombstoned one trigger after their last write reached the
//!    sink, so a restore from the changelog rewrites every point whose final
//!    value may not have arrived.
//! 6. Fencing: a task's producer has `transactional.id =
//!    <group>.s1-<input partition>` (stage 1) or `<group>.s2-<delta
//!    partition>` (stage 2): per task, the pre-KIP-447 way. The new owner's
//!    `init_transactions` fences the old one, whose commit then fails (so a
//!    stage-2 zombie never writes the sink again), and ends its open
//!    transaction, which would hold `read_committed` readers until it ends. A stage-2 task also skips its sink write
//!    (and stops) when its commit returned after the session timeout or
//!    later: the process may have been paused and replaced meanwhile.
//! 7. Snapshots every N triggers: a complete snapshot at offset `s` is the
//!    state at `s` whoever wrote it (1). A new owner restores the newest one
//!    at `s <= o` (`o` its committed offset) and replays `s..o` silently:
//!    every record those offsets produced was in a transaction committed no
//!    later than `o`'s, so stage 2 has it; the owner's first trigger then
//!    publishes, stamped past `o`, the points touched after `o`, as the old
//!    owner would have (2, 3).

pub mod stage1;
pub mod stage2;
pub mod wire;

use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::{ClientConfig, ClientContext, Message, Offset, TopicPartitionList};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::Config;
use crate::kafka::KafkaSpec;

/// Why a scale-out instance stopped: one line naming the topic, partition or
/// step.
#[derive(Debug, thiserror::Error)]
pub enum ScaleError {
    /// A client that cannot be made, a topic missing or not creatable.
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaError),
    /// A broker request that failed: `what` names it, its topic and partition.
    #[error("{what}: {error}")]
    Broker { what: String, error: rdkafka::error::KafkaError },
    /// A step of a stage's transaction failed (or the producer was fenced);
    /// `of` names the task's partition (input for stage 1, delta for stage 2).
    #[error("stage {stage} transaction{of} ({step}): {error}")]
    Transaction { stage: u8, of: String, step: &'static str, error: rdkafka::error::KafkaError },
    #[error("stage {0}: no consumer group metadata")]
    NoGroupMetadata(u8),
    #[error("producing a record to {topic}: {error}")]
    Produce { topic: String, error: rdkafka::error::KafkaError },
    #[error("reading {topic}/{partition} to {} took over 60 s", end.map_or("its end".to_string(), |e| format!("offset {e}")))]
    ReadTimeout { topic: String, partition: i32, end: Option<i64> },
    /// Bytes of an internal topic that end early or hold a bad count.
    #[error(transparent)]
    Decode(#[from] crate::codec::DecodeError),
    /// A record of an internal topic that is not one this build reads.
    #[error("{0}")]
    Wire(String),
    /// A record that does not decode, at `topic/partition[@offset]`.
    #[error("{at}: {source}")]
    Record { at: String, source: Box<ScaleError> },
    /// A stage-1 snapshot (`topic/partition@offset`) that does not restore.
    #[error("snapshot {at}: {source}")]
    Snapshot { at: String, source: Box<ScaleError> },
    #[error(
        "input partition {input}/{partition} is committed at offset {offset} but {state} has no snapshot at or before that offset"
    )]
    NoSnapshot { input: String, partition: i32, offset: i64, state: String },
    /// A snapshot built under other engine settings or experiments.
    #[error(
        "it was built under another config (engine settings or experiments) than this instance's: every instance \
         of a group runs the same config; to change it, start a new group (docs/scale-out.md §6)"
    )]
    OtherConfig,
    #[error(transparent)]
    Session(#[from] crate::session::SessionDecodeError),
    #[error(transparent)]
    Names(#[from] crate::checkpoint::Unusable),
    #[error(transparent)]
    Catalog(#[from] crate::config::CatalogError),
    #[error(transparent)]
    Sink(#[from] crate::sink::SinkError),
    #[error("{0} upserts could not be delivered")]
    Undelivered(u64),
    /// A stage-2 commit that returned after the session timeout.
    #[error(
        "stage 2: the commit of {task} returned after {took_ms} ms (the session timeout is {timeout_ms} ms): this \
         instance may have been paused and replaced; stopping without writing"
    )]
    Paused { task: String, took_ms: u128, timeout_ms: u128 },
    #[error("starting the {0} thread: {1}")]
    Spawn(&'static str, std::io::Error),
    #[error("{0} panicked")]
    Panicked(&'static str),
    #[error("thread {thread} panicked: {message}")]
    ThreadPanicked { thread: String, message: String },
}

impl ScaleError {
    /// `error` of the broker request `what`.
    pub fn broker(what: impl Into<String>) -> impl FnOnce(rdkafka::error::KafkaError) -> ScaleError {
        let what = what.into();
        move |error| ScaleError::Broker { what, error }
    }

    /// `self`, found in the record at `at`.
    pub fn at(self, at: impl Into<String>) -> ScaleError {
        ScaleError::Record { at: at.into(), source: Box::new(self) }
    }
}

/// How an instance takes part in a scale-out group.
#[derive(Debug, Clone)]
pub struct ScaleOptions {
    /// The input topic, brokers, group and librdkafka settings.
    pub spec: KafkaSpec,
    /// The config file's `[kafka]` settings.
    pub base: Vec<(String, String)>,
    /// Partitions of `<group>.deltas` and `<group>.totals` when this instance creates them.
    pub delta_partitions: i32,
    /// A stage-1 task writes its snapshot every this many triggers (and a
    /// restore replays the input since the last one).
    pub snapshot_every: u32,
    /// This instance's name (the `instance` tag of its health points).
    pub instance: String,
    pub trigger: Duration,
    pub stop: Arc<AtomicBool>,
    /// Stop after this long.
    pub max_duration: Option<Duration>,
    /// The sink's threads: one that dies stops the run.
    pub failures: crate::failures::Failures,
    /// Where stage 2 publishes the health figures for `/metrics`.
    pub published: Option<Arc<crate::serve::Published>>,
    /// `dc` tag of the health points.
    pub dc: String,
    /// `--status`: each stage logs its figures and lag every 10 s.
    pub status: bool,
    /// The config file and the SIGHUP flag: a reload is refused (see
    /// [`ReloadRefusal`]).
    pub reload: Option<crate::config::ReloadOptions>,
}

/// The scale-out mode does not reload its experiments: every instance would
/// have to switch at the same input offset of every partition, or stage 1's
/// output would depend on who ran a partition when (step 1 of the argument
/// at the top of this file), and the
/// mode has no way to agree on one. On SIGHUP, or when the config file
/// changes, stage 1 says so in one line and the running config stays.
pub struct ReloadRefusal {
    options: Option<crate::config::ReloadOptions>,
    modified: Option<std::time::SystemTime>,
}

/// The line logged when a reload is asked for in scale-out mode.
pub const RELOAD_REFUSED: &str = "config reload refused in --scale-out mode (every instance would have to switch at \
     the same offset of every input partition): the running config stays; to change the experiments, stop every \
     instance and start them all with the new config (docs/scale-out.md §6)";

impl ReloadRefusal {
    pub fn new(options: Option<crate::config::ReloadOptions>) -> ReloadRefusal {
        let modified = options.as_ref().and_then(|o| std::fs::metadata(&o.path).and_then(|m| m.modified()).ok());
        ReloadRefusal { options, modified }
    }

    /// Logs the refusal once per SIGHUP or change of the file; whether it did.
    pub fn check(&mut self) -> bool {
        let Some(o) = &self.options else { return false };
        let modified = std::fs::metadata(&o.path).and_then(|m| m.modified()).ok();
        let requested = o.requested.swap(false, Relaxed);
        if !requested && (modified.is_none() || modified == self.modified) {
            return false;
        }
        self.modified = modified;
        tracing::error!("{}: {RELOAD_REFUSED}", o.path.display());
        true
    }
}

impl ScaleOptions {
    pub fn topic(&self, what: &str) -> String {
        format!("{}.{what}", self.spec.group)
    }

    /// A client of the cluster with the user's settings.
    pub fn client(&self) -> ClientConfig {
        self.spec.client_config(&self.base)
    }

    /// The librdkafka `session.timeout.ms` in effect (librdkafka's default 45 s).
    pub fn session_timeout(&self) -> Duration {
        let set = self.base.iter().chain(&self.spec.settings).rev().find(|(k, _)| k == "session.timeout.ms");
        Duration::from_millis(set.and_then(|(_, v)| v.parse().ok()).unwrap_or(45_000))
    }

    fn stopping(&self, started: Instant) -> bool {
        self.stop.load(Relaxed) || self.failures.failed() || self.max_duration.is_some_and(|d| started.elapsed() >= d)
    }
}

/// Counts rebalances (eager: every one revokes all partitions first).
#[derive(Default)]
pub struct Rebalances {
    pub revoked: AtomicU64,
    pub assigned: AtomicU64,
}

impl ClientContext for Rebalances {}

impl ConsumerContext for Rebalances {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Revoke(_) = r {
            self.revoked.fetch_add(1, Relaxed);
        }
    }
    fn post_rebalance(&self, _: &BaseConsumer<Self>, r: &Rebalance<'_>) {
        if let Rebalance::Assign(_) = r {
            self.assigned.fetch_add(1, Relaxed);
        }
    }
}

/// Follows a stage's group assignment: on a revoke since `seen`, drops every
/// task (eager rebalancing hands all partitions back); returns the assigned
/// partitions that have no task yet, for the stage to restore.
pub(crate) fn unowned_assigned<T>(
    consumer: &BaseConsumer<Rebalances>,
    seen: &mut (u64, u64),
    tasks: &mut std::collections::BTreeMap<i32, T>,
    stage: &str,
) -> Result<Vec<i32>, ScaleError> {
    let ctx = consumer.context();
    let now = (ctx.revoked.load(Relaxed), ctx.assigned.load(Relaxed));
    if now == *seen {
        return Ok(Vec::new());
    }
    if now.0 != seen.0 {
        if !tasks.is_empty() {
            tracing::info!("{stage}: partitions revoked, {} tasks dropped", tasks.len());
        }
        tasks.clear();
    }
    *seen = now;
    let assignment = consumer.assignment().map_err(ScaleError::broker(format!("{stage} assignment")))?;
    Ok(assignment.elements().iter().map(|e| e.partition()).filter(|p| !tasks.contains_key(p)).collect())
}

/// Leaves a stage's group, once any rebalance in progress has ended (at most
/// twice the session timeout, 30 s at most): a member that leaves while its
/// group is rebalancing — revoked and not yet assigned again, or before its
/// first assignment — leaves the group stuck on Tansu 0.6.0, whose other
/// members then never get an assignment (the three-instance test's zombie,
/// stopped just after it woke, found it; a probe with bare consumers
/// confirmed it). Messages polled meanwhile are not read: nothing past the
/// committed offsets is, once a stage stops.
pub fn leave(consumer: &BaseConsumer<Rebalances>, o: &ScaleOptions, stage: &str) {
    let ctx = consumer.context();
    let joining = || ctx.assigned.load(Relaxed) <= ctx.revoked.load(Relaxed);
    if joining() {
        let limit = (o.session_timeout() * 2).min(Duration::from_secs(30));
        tracing::info!("{stage}: waiting for the group's rebalance to end before leaving (at most {limit:?})");
        let deadline = Instant::now() + limit;
        while joining() && Instant::now() < deadline {
            let _ = consumer.poll(Duration::from_millis(50));
        }
    }
    consumer.unsubscribe();
}

/// Partitions a stage restores at once (each opens a producer and a reader
/// or two on the broker).
const RESTORE_PARALLEL: usize = 8;

/// `f(p)` for every partition in `partitions`, [`RESTORE_PARALLEL`] at a
/// time on scoped threads; the results in the order of `partitions`. A
/// panicking `f` panics the caller (and so stops the stage loudly).
pub(crate) fn in_parallel<T: Send>(partitions: &[i32], f: impl Fn(i32) -> T + Sync) -> Vec<(i32, T)> {
    let mut out = Vec::with_capacity(partitions.len());
    for chunk in partitions.chunks(RESTORE_PARALLEL) {
        std::thread::scope(|s| {
            let f = &f;
            let running: Vec<_> = chunk.iter().map(|&p| (p, s.spawn(move || f(p)))).collect();
            for (p, h) in running {
                out.push((p, h.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))));
            }
        });
    }
    out
}

/// A group member of a stage: eager assignment (every rebalance hands all
/// tasks back, and each task is rebuilt from Kafka), offsets committed only
/// through transactions.
pub fn stage_consumer(o: &ScaleOptions, group: &str, topic: &str) -> Result<BaseConsumer<Rebalances>, ScaleError> {
    let mut c = o.client();
    c.set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("partition.assignment.strategy", "range");
    let consumer: BaseConsumer<Rebalances> =
        c.create_with_context(Rebalances::default()).map_err(|e| o.spec.client_error(&o.base, "kafka consumer", e))?;
    consumer.subscribe(&[topic]).map_err(ScaleError::broker(format!("subscribing to {topic:?}")))?;
    Ok(consumer)
}

/// A transactional producer, initialised (which fences any earlier producer
/// of the same `transactional.id` and ends its open transaction).
pub fn transactional_producer(o: &ScaleOptions, id: &str) -> Result<rdkafka::producer::BaseProducer, ScaleError> {
    use rdkafka::producer::Producer;
    let mut c = o.client();
    c.set("transactional.id", id).set("transaction.timeout.ms", "30000").set("linger.ms", "5");
    // The internal records repeat names and small numbers: lz4 (built into
    // librdkafka) shrinks them for little CPU (docs/scale-out.md,
    // "Measured"). A `compression.type` the user set wins.
    if c.get("compression.type").is_none() {
        c.set("compression.type", "lz4");
    }
    // Settings meant for consumers only make librdkafka warn; producers skip them.
    for k in ["session.timeout.ms", "group.id", "auto.offset.reset", "statistics.interval.ms"] {
        c.remove(k);
    }
    let p: rdkafka::producer::BaseProducer =
        c.create().map_err(|e| o.spec.client_error(&o.base, "kafka producer", e))?;
    p.init_transactions(Duration::from_secs(30))
        .map_err(ScaleError::broker(format!("transactional producer {id:?}")))?;
    Ok(p)
}

/// Creates the internal topics if missing; returns the partitions of
/// `<group>.deltas` and of the input topic.
pub fn ensure_topics(o: &ScaleOptions) -> Result<(usize, usize), ScaleError> {
    let input = crate::kafka::ensure_topic(&o.spec, &o.base)?;
    let internal = |name: String, partitions: i32| KafkaSpec { topic: name, partitions, ..o.spec.clone() };
    crate::kafka::ensure_topic(&internal(o.topic("state"), input as i32), &o.base)?;
    let deltas = crate::kafka::ensure_topic(&internal(o.topic("deltas"), o.delta_partitions), &o.base)?;
    crate::kafka::ensure_topic(&internal(o.topic("totals"), deltas as i32), &o.base)?;
    if let Some(topic) = &o.spec.dead_letter {
        crate::kafka::ensure_topic(&internal(topic.clone(), 1), &o.base)?;
    }
    Ok((deltas, input))
}

/// What a restore reads of a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    /// Committed records, to the last stable offset: the input (a replay
    /// reads what stage 1's consumer read) and `<group>.totals` (a stage-2
    /// task's changelog; its previous owner's open transaction, just fenced,
    /// holds nothing it needs).
    Committed,
    /// Every record, to the high watermark: `<group>.state`. Any complete
    /// snapshot there is a true state at its offset, whoever wrote it and
    /// whatever became of its transaction (step 7 above), so an open
    /// transaction on the partition must not hide one.
    Everything,
}

/// A consumer outside any group that reads partitions by offset.
pub fn reader(o: &ScaleOptions, isolation: Isolation) -> Result<BaseConsumer, ScaleError> {
    let mut c = o.client();
    let level = match isolation {
        Isolation::Committed => "read_committed",
        Isolation::Everything => "read_uncommitted",
    };
    c.set("group.id", format!("{}.restore", o.spec.group))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("isolation.level", level);
    c.create().map_err(|e| o.spec.client_error(&o.base, "kafka reader", e).into())
}

/// Reads partition `partition` of `topic` from `from` to its end (as seen
/// under `isolation`), calling `each(offset, key, payload)` (payload `None`:
/// a tombstone).
pub fn read_partition(
    o: &ScaleOptions,
    topic: &str,
    partition: i32,
    from: Offset,
    isolation: Isolation,
    mut each: impl FnMut(i64, Option<&[u8]>, Option<&[u8]>) -> Result<(), ScaleError>,
) -> Result<(), ScaleError> {
    read_range(o, topic, partition, from, None, isolation, |m| each(m.offset(), m.key(), m.payload()))
}

/// [`read_partition`], stopping before offset `end` when given (the
/// records at and past it are not passed to `each`), `each` given the message.
pub fn read_range(
    o: &ScaleOptions,
    topic: &str,
    partition: i32,
    from: Offset,
    end: Option<i64>,
    isolation: Isolation,
    mut each: impl FnMut(&rdkafka::message::BorrowedMessage<'_>) -> Result<(), ScaleError>,
) -> Result<(), ScaleError> {
    let reader = reader(o, isolation)?;
    // To the end of file, not to an end asked for first: under
    // `read_committed` Tansu 0.6.0 answers 0 for the end of a partition a
    // transaction is open on, while its fetches stop at the right place.
    let mut tpl = TopicPartitionList::new();
    let reading = || format!("reading {topic}/{partition}");
    tpl.add_partition_offset(topic, partition, from).map_err(ScaleError::broker(reading()))?;
    reader.assign(&tpl).map_err(ScaleError::broker(reading()))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(m)) => {
                if end.is_some_and(|e| m.offset() >= e) {
                    return Ok(());
                }
                each(&m)?;
                if end.is_some_and(|e| m.offset() + 1 >= e) {
                    return Ok(());
                }
            }
            Some(Err(rdkafka::error::KafkaError::PartitionEOF(_))) => return Ok(()),
            Some(Err(e)) => tracing::warn!("reading {topic}/{partition}: {e}"),
            None => {}
        }
        if Instant::now() > deadline {
            return Err(ScaleError::ReadTimeout { topic: topic.to_string(), partition, end });
        }
    }
}

/// The committed offset of `group` for `topic/partition` (`None`: none yet).
pub fn committed(consumer: &BaseConsumer<Rebalances>, topic: &str, partition: i32) -> Result<Option<i64>, ScaleError> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let got = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .map_err(ScaleError::broker(format!("reading the committed offset of {topic}/{partition}")))?;
    Ok(got.elements().first().and_then(|e| match e.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }))
}

/// How often each stage logs its figures and lag.
pub const STATUS_EVERY: Duration = Duration::from_secs(10);

/// Records of `topic` not yet read by the tasks `(partition, next offset)`:
/// the lag of one stage of this instance (a partition never read counts
/// from its start).
pub fn lag(consumer: &BaseConsumer<Rebalances>, topic: &str, tasks: impl Iterator<Item = (i32, Option<i64>)>) -> i64 {
    let mut lag = 0;
    for (p, next) in tasks {
        if let Ok((low, high)) = consumer.fetch_watermarks(topic, p, Duration::from_secs(1)) {
            lag += (high - next.unwrap_or(low).max(low)).max(0);
        }
    }
    lag
}

/// The health points of a scale-out instance (SPEC §6): the engine's input
/// counts as stage 1's routers made them (rejections by reason, late, unknown
/// names, names replaced by `_other`), and per stage its tasks, lag,
/// transactions and restores, and the bytes it wrote to each internal topic.
pub fn health_points(
    s1: &stage1::Stage1Stats,
    s2: &stage2::Stage2Stats,
    dc: &str,
    instance: &str,
) -> Vec<crate::metrics::HealthPoint> {
    use crate::metrics::HealthPoint;
    let tags = |extra: Option<(&'static str, &str)>| {
        let mut t = vec![("dc", dc.to_string()), ("instance", instance.to_string())];
        t.extend(extra.map(|(k, v)| (k, v.to_string())));
        t
    };
    let point = |name: &str, extra, v: u64| HealthPoint {
        name: format!("expmon.{name}"),
        tags: tags(extra),
        value: (v.min(i64::MAX as u64) as i64).into(),
    };
    let r = &s1.router;
    let mut out = vec![
        point("events_in", None, r.events_in),
        point("events_rejected", None, r.rejected_total()),
        point("late_dropped", None, r.late_dropped),
        point("unknown_tenant", None, r.unknown_tenant),
        point("unknown_experiment", None, r.unknown_experiment),
        point("unknown_variation", None, r.unknown_variation),
        point("upserts_written", None, s2.upserts),
        point("scale_out.dead_lettered", None, s1.dead_lettered),
    ];
    for reason in crate::event::Reject::ALL {
        out.push(point("events_rejected_by_reason", Some(("reason", reason.as_str())), r.rejected[reason.index()]));
    }
    for kind in crate::names::NameKind::ALL {
        out.push(point("names_replaced_other", Some(("table", kind.as_str())), r.names_replaced[kind.index()]));
    }
    for (stage, tasks, lag, txns, restores) in
        [("1", s1.tasks, s1.lag, s1.transactions, s1.restores), ("2", s2.tasks, s2.lag, s2.transactions, s2.restores)]
    {
        out.push(point("scale_out.tasks", Some(("stage", stage)), tasks));
        out.push(point("scale_out.lag", Some(("stage", stage)), lag));
        out.push(point("scale_out.transactions", Some(("stage", stage)), txns));
        out.push(point("scale_out.restores", Some(("stage", stage)), restores));
    }
    for (topic, bytes) in [("deltas", s1.delta_bytes), ("state", s1.snapshot_bytes), ("totals", s2.changelog_bytes)] {
        out.push(point("scale_out.internal_bytes", Some(("topic", topic)), bytes));
    }
    out
}

/// What a scale-out instance did, for its last line.
#[derive(Debug, Default, Clone)]
pub struct ScaleSummary {
    pub stage1: stage1::Stage1Stats,
    pub stage2: stage2::Stage2Stats,
}

impl std::fmt::Display for ScaleSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (a, b) = (&self.stage1, &self.stage2);
        write!(
            f,
            "scale-out: stage 1 read {} events ({} rejected, {} of them dead-lettered, {} late) in {} transactions, \
             {} delta bytes, {} snapshot bytes, {} restores ({} messages replayed); stage 2 applied {} delta records in {} transactions, {} \
             changelog bytes, {} upserts, {} restores",
            a.router.events_in,
            a.router.rejected_total(),
            a.dead_lettered,
            a.router.late_dropped,
            a.transactions,
            a.delta_bytes,
            a.snapshot_bytes,
            a.restores,
            a.replayed,
            b.records,
            b.transactions,
            b.changelog_bytes,
            b.upserts,
            b.restores
        )
    }
}

/// Runs both stages until stopped; each stage's first error ends the run.
/// `catalog` is the sink's: the names of the points it writes.
pub fn run(
    config: Config,
    catalog: Arc<crate::config::Catalog>,
    sink: Box<dyn crate::sink::Sink>,
    o: ScaleOptions,
) -> Result<ScaleSummary, ScaleError> {
    let (deltas, inputs) = ensure_topics(&o)?;
    tracing::info!(
        "scale-out: {} ({inputs} partitions) → {} ({deltas} partitions) → sink; instance {}",
        o.spec.topic,
        o.topic("deltas"),
        o.instance
    );
    let figures = Arc::new(std::sync::Mutex::new(stage1::Stage1Stats::default()));
    let s1 = {
        let (config, o, figures) = (config.clone(), o.clone(), figures.clone());
        std::thread::Builder::new()
            .name("expmon-stage1".into())
            .spawn(move || {
                stage1::Stage1::new(config, o.clone(), deltas, figures)
                    .and_then(|s| s.run())
                    .inspect_err(|_| o.stop.store(true, Relaxed))
            })
            .map_err(|e| ScaleError::Spawn("stage 1", e))?
    };
    let s2 = {
        let o2 = o.clone();
        let stop = o.stop.clone();
        std::thread::Builder::new()
            .name("expmon-stage2".into())
            .spawn(move || {
                stage2::Stage2::new(catalog, o2, sink, inputs, figures)
                    .and_then(|s| s.run())
                    .inspect_err(|_| stop.store(true, Relaxed))
            })
            .map_err(|e| ScaleError::Spawn("stage 2", e))?
    };
    let r1 = s1.join().map_err(|_| ScaleError::Panicked("stage 1"))?;
    let r2 = s2.join().map_err(|_| ScaleError::Panicked("stage 2"))?;
    if let Some(f) = o.failures.first() {
        return Err(ScaleError::ThreadPanicked { thread: f.thread.to_string(), message: f.message.to_string() });
    }
    Ok(ScaleSummary { stage1: r1?, stage2: r2? })
}

#[cfg(test)]
mod tests {
    use crate::health::prometheus::FAMILIES;

    /// Every point scale-out writes has its Prometheus family, and every
    /// `expmon.scale_out.*` family is one of its points.
    #[test]
    fn every_scale_out_health_point_has_a_family() {
        let points = super::health_points(&Default::default(), &Default::default(), "dc1", "h");
        for p in &points {
            assert!(FAMILIES.iter().any(|f| f.point == p.name), "{} has no Prometheus family", p.name);
        }
        for f in FAMILIES.iter().filter(|f| f.point.starts_with("expmon.scale_out.")) {
            assert!(points.iter().any(|p| p.name == f.point), "{} is not a point scale-out makes", f.point);
        }
    }
}
