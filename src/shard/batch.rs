//! Messages that cross threads: event batches to shards, flush markers, and
//! shard reports to the writer. Always batches, never one message per event.

use crate::aggregate::Delta;
use crate::health::ShardStats;
use crate::session::{SessionEvent, SessionKey};

/// One routed event; its assignments and attributes live in the batch's flat
/// side arrays as `(start, len)` ranges, so a batch is three allocations.
#[derive(Debug, Clone, Copy)]
pub struct BatchEvent {
    pub key: SessionKey,
    pub ts: i64,
    pub watermark: i64,
    pub mp: u16,
    pub device: u16,
    pub login: u16,
    /// The event's `value` (0 when absent).
    pub value: i32,
    pub assigns: (u32, u16),
    pub attrs: (u32, u16),
}

#[derive(Debug, Default)]
pub struct EventBatch {
    pub events: Vec<BatchEvent>,
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

    pub fn session_event(&self, e: &BatchEvent) -> SessionEvent<'_> {
        let (a0, an) = e.assigns;
        let (t0, tn) = e.attrs;
        SessionEvent {
            key: e.key,
            ts: e.ts,
            watermark: e.watermark,
            mp: e.mp,
            device: e.device,
            login: e.login,
            value: e.value,
            assigns: &self.assigns[a0 as usize..a0 as usize + an as usize],
            attrs: &self.attrs[t0 as usize..t0 as usize + tn as usize],
        }
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
