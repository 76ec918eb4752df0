//! The sharded runtime: source → router → N pinned shard workers → writer → sink.
//!
//! Rooms: `runtime` (spawn, restore, shutdown: [`run`]), `drive` (the
//! router's loop: fill, route, markers), [`router`] (parse, watermark,
//! batches), [`worker`] (a shard) and `writer` (totals, sink, health);
//! thread deaths are [`crate::failures`]'s. The checkpointer lives next to the format it
//! writes, in [`crate::checkpoint`]; reloading next to the config, in
//! [`crate::config::Reloader`].
//!
//! Threads and what they own:
//! - the calling thread runs the [`Router`]: it reads the source, parses,
//!   keeps the watermark and routes events in batches over bounded crossbeam
//!   channels (a full channel blocks the router: backpressure, not loss);
//! - each worker owns the sessions and minute counters of its shard;
//! - the writer owns the merged [`crate::aggregate::Totals`] and the sink.
//!
//! Flush protocol (at every `trigger`, processing time; after a fill that
//! moves `minute(W)` past the last marker's, event time; and once at the end):
//! 1. The router sends each shard its pending batch, then a [`FlushMarker`]
//!    carrying an epoch number and the current watermark. Every marker takes
//!    the next epoch; only trigger markers may ask for a checkpoint, carry a
//!    reloaded config, or ask for health points.
//! 2. Each shard, on the marker, expires sessions at that watermark (their
//!    state is freed), drains every non-zero delta its counters gathered since
//!    the last marker (the counters are then empty), and sends a
//!    [`ShardReport`]; at a checkpoint marker the report carries its sessions.
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
//! Failure: every thread runs under [`crate::failures::Failures`]; one that panics stops the
//! run (the router stops reading, the others drain as on a stop, no final
//! checkpoint or commit), and `run` returns [`RunError::Panicked`] naming it.
//!
//! Acknowledgement: the router remembers the source's position at each
//! marker. Once the sink has acknowledged every flush up to that epoch (the
//! writer publishes the count), the source commits that position (Kafka
//! offsets), so a restart never skips input whose totals were not delivered.

pub mod batch;
mod drive;
pub mod router;
mod runtime;
pub mod worker;
mod writer;

pub use batch::{EventBatch, FlushMarker, ShardMsg, ShardReport};
pub use router::{shard_of, Router};
pub use runtime::{default_threads, run, RunError, RunOptions};
pub use worker::{final_before, Worker};
