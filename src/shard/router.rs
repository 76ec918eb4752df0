//! The router stage: parse raw lines, resolve names against the catalog, keep
//! the watermark, drop late events, and route each event to the shard that owns
//! its session, in batches.
//!
//! Invariants:
//! - each session key maps to exactly one shard (a hash of the key);
//! - the watermark `W = max ts seen - allowed_lateness` is decided before each
//!   event is included, in arrival order, so late-drop decisions are the same
//!   at any number of shards;
//! - nothing is logged, locked or allocated per event (a new name takes the
//!   name table's lock once, when first seen).

use std::sync::Arc;

use super::batch::{BatchEvent, EventBatch};
use crate::config::{AssignLookup, Catalog, MP_CAPACITY, TAG_CAPACITY};
use crate::event::{parse_event, Event, ParseScratch, Reject};
use crate::health::RouterStats;
use crate::names::{Interner, NameKind};
use crate::session::SessionKey;

/// Events per batch sent to a shard.
pub const BATCH_EVENTS: usize = 1024;

pub struct Router {
    catalog: Arc<Catalog>,
    mp: Interner,
    device: Interner,
    login: Interner,
    lateness_ms: i64,
    max_ts: Option<i64>,
    shards: usize,
    batches: Vec<EventBatch>,
    scratch: ParseScratch,
    pub stats: RouterStats,
}

/// Where an event goes: the shard owning `key`, by multiply-shift of its hash.
#[inline]
pub fn shard_of(key: &SessionKey, shards: usize) -> usize {
    ((key.0[0] as u128 * shards as u128) >> 64) as usize
}

impl Router {
    pub fn new(catalog: Arc<Catalog>, shards: usize) -> Router {
        let names = catalog.names.clone();
        Router {
            mp: Interner::new(names.clone(), NameKind::Mp, MP_CAPACITY),
            device: Interner::new(names.clone(), NameKind::Device, TAG_CAPACITY),
            login: Interner::new(names, NameKind::Login, TAG_CAPACITY),
            lateness_ms: catalog.engine.allowed_lateness_ms,
            catalog,
            max_ts: None,
            shards,
            batches: (0..shards).map(|_| EventBatch::with_capacity(BATCH_EVENTS)).collect(),
            scratch: ParseScratch::default(),
            stats: RouterStats::default(),
        }
    }

    /// The current watermark; `i64::MIN` before any event.
    pub fn watermark(&self) -> i64 {
        self.max_ts.map_or(i64::MIN, |m| m.saturating_sub(self.lateness_ms))
    }

    /// Routes one line. Returns the shard whose batch just became full, if any;
    /// the caller must then [`Router::take_batch`] it.
    pub fn route(&mut self, line: &[u8], now_ms: Option<i64>) -> Option<usize> {
        self.stats.events_in += 1;
        let mut scratch = std::mem::take(&mut self.scratch);
        let full = match parse_event(line, now_ms, &mut scratch) {
            Ok(ev) => self.route_event(ev),
            Err(r) => {
                self.stats.rejected[r.index()] += 1;
                None
            }
        };
        self.scratch = scratch;
        full
    }

    fn route_event(&mut self, ev: Event<'_>) -> Option<usize> {
        let wm = self.watermark();
        if ev.ts < wm {
            self.stats.late_dropped += 1;
            return None;
        }
        self.max_ts = Some(self.max_ts.map_or(ev.ts, |m| m.max(ev.ts)));
        let Some(tenant) = self.catalog.tenant(&ev.tenant) else {
            self.stats.unknown_tenant += 1;
            return None;
        };
        let (Some(mp), Some(device), Some(login)) =
            (self.mp.intern(&ev.mp), self.device.intern(&ev.device), self.login.intern(&ev.login))
        else {
            self.stats.name_capacity_dropped += 1;
            return None;
        };
        let key = SessionKey::new(tenant, &ev.session);
        let shard = shard_of(&key, self.shards);
        let batch = &mut self.batches[shard];
        let assign_start = batch.assigns.len() as u32;
        for &(x, v) in ev.assign {
            match self.catalog.assignment(tenant, x, v) {
                AssignLookup::Known { experiment, variation } => batch.assigns.push((experiment, variation)),
                AssignLookup::UnknownExperiment => self.stats.unknown_experiment += 1,
                AssignLookup::UnknownVariation => self.stats.unknown_variation += 1,
            }
        }
        let attr_start = batch.attrs.len() as u32;
        if !ev.attrs.is_empty() && self.catalog.uses_attributes() {
            for (k, v) in &ev.attrs {
                if let Some(pair) = self.catalog.attribute(k, v) {
                    batch.attrs.push(pair);
                }
            }
        }
        batch.events.push(BatchEvent {
            key,
            ts: ev.ts,
            watermark: wm,
            mp,
            device,
            login,
            assigns: (assign_start, (batch.assigns.len() as u32 - assign_start) as u16),
            attrs: (attr_start, (batch.attrs.len() as u32 - attr_start) as u16),
        });
        self.stats.routed += 1;
        (batch.events.len() >= BATCH_EVENTS).then_some(shard)
    }

    /// Takes shard `i`'s batch, leaving an empty one (reusing `spare` if given).
    pub fn take_batch(&mut self, i: usize, spare: Option<EventBatch>) -> EventBatch {
        let fresh = spare.unwrap_or_else(|| EventBatch::with_capacity(BATCH_EVENTS));
        std::mem::replace(&mut self.batches[i], fresh)
    }

    /// The greatest event ts seen, if any.
    pub fn max_ts(&self) -> Option<i64> {
        self.max_ts
    }

    pub fn count_overlong(&mut self, n: u64) {
        self.stats.events_in += n;
        self.stats.rejected[Reject::TooLong.index()] += n;
    }

    pub fn pending(&self, i: usize) -> usize {
        self.batches[i].events.len()
    }
}
