//! Messages that cross threads: event batches to shards, flush markers, and
//! shard reports to the writer. Always batches, never one message per event.

use crate::aggregate::{Delta, DeltaSums};
use crate::health::ShardStats;
use crate::session::SessionEvent;

/// Routed events for one shard. Each event's assignments and attributes live
/// in the flat side arrays as `(start, len)` ranges (see [`SessionEvent`]), so
/// a batch is three allocations, reused once the shard has applied it.
#[derive(Debug, Default)]
pub struct EventBatch {
    pub events: Vec<SessionEvent>,
    pub assigns: Vec<(u32, u32)>,
    pub attrs: Vec<(u32, u32)>,
}

impl EventBatch {
    pub fn with_capacity(n: usize) -> EventBatch {
        EventBatch { events: Vec::with_capacity(n), assigns: Vec::with_capacity(n), attrs: Vec::new() }
    }

    pub fn clear(&mut self) {
        self.events.clear();
        self.assigns.clear();
        self.attrs.clear();
    }
}

/// A consistent cut: every event routed before the marker is in the shards'
/// state when they report for it.
#[derive(Debug, Clone)]
pub struct FlushMarker {
    pub epoch: u64,
    pub watermark: i64,
    /// The last marker: shards exit after it.
    pub last: bool,
    /// Take a checkpoint at this marker: each shard encodes its sessions.
    pub snapshot: bool,
    /// A reloaded configuration, used from this marker on (after the drain).
    pub catalog: Option<std::sync::Arc<crate::config::Catalog>>,
    /// Write health points at this flush: set at processing-time triggers
    /// and on the last marker, not at event-time flushes.
    pub health: bool,
}

pub enum ShardMsg {
    Events(EventBatch),
    Flush(FlushMarker),
}

/// A shard's answer to a flush marker.
pub struct ShardReport {
    pub shard: usize,
    pub marker: FlushMarker,
    pub deltas: Vec<crate::aggregate::Delta>,
    /// What experiment health and the results page read of `deltas`, summed
    /// by the shard (exactly [`DeltaSums::from_deltas`] of them).
    pub sums: DeltaSums,
    pub stats: ShardStats,
    /// Sessions that became conflicting since the last report, per experiment.
    pub conflicts: Vec<(u32, u64)>,
    /// The shard's encoded sessions, when the marker asked for a snapshot,
    /// and how long encoding them took (the shard's pause).
    pub snapshot: Option<(Vec<u8>, std::time::Duration)>,
}

impl ShardReport {
    pub fn deltas(&self) -> &[Delta] {
        &self.deltas
    }
}
