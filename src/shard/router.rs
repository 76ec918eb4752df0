//! The router stage: parse raw lines, resolve names against the catalog, keep
//! the watermark, drop late events, and route each event to the shard that owns
//! its session, in batches.
//!
//! Invariants:
//! - each session key maps to exactly one shard (a hash of the key);
//! - the watermark `W = max ts seen - allowed_lateness` is decided before each
//!   event is included, in arrival order, so late-drop decisions are the same
//!   at any number of shards. With several input partitions (Kafka) each has
//!   its own clock and W is their min over the partitions that count (not
//!   idle), never moving backwards (SPEC §4); an event is late if it is
//!   behind W or behind its own partition's watermark;
//! - nothing is logged, locked or allocated per event (a new name takes the
//!   name table's lock once, when first seen);
//! - a valid event is never dropped for a name: beyond a table's bound its
//!   name becomes `_other`, counted in [`RouterStats::names_replaced`];
//! - an assignment resolves as [`Catalog::assignment`] says: the router's
//!   [`AssignTable`] is a flat copy of the catalog's known assignments (one
//!   probe of one cache line instead of three dependent lookups), and
//!   anything it does not hold is asked of the catalog.

use std::sync::Arc;

use super::batch::EventBatch;
use crate::config::{AssignLookup, Catalog};
use crate::event::{parse_event, Event, ParseScratch, Reject};
use crate::health::RouterStats;
use crate::names::{Interner, NameKind};
use crate::session::{SessionEvent, SessionKey};
use crate::source::PartitionState;

/// Events per batch sent to a shard.
pub const BATCH_EVENTS: usize = 1024;

pub struct Router {
    catalog: Arc<Catalog>,
    mp: Interner,
    device: Interner,
    login: Interner,
    lateness_ms: i64,
    /// How far past the wall clock an event's ts may be (`[engine] max_future`).
    max_future_ms: i64,
    max_ts: Option<i64>,
    /// One clock per input partition; a file has one.
    clocks: Vec<Clock>,
    /// The partition whose clock is the min (the one that can move W).
    slowest: usize,
    /// Clocks that count.
    counting: usize,
    watermark: i64,
    shards: usize,
    batches: Vec<EventBatch>,
    scratch: ParseScratch,
    assign: AssignTable,
    pub stats: RouterStats,
}

/// Variation id → its experiment's id, tenant and the catalog's indices, for
/// every assignment the catalog knows (active experiments): open addressing,
/// linear probing, one 24-byte slot per entry. Built with the catalog (at
/// start and on a reload), never on the hot path.
struct AssignTable {
    slots: Vec<AssignSlot>,
    /// `slots.len() - 1` (a power of two less one).
    mask: usize,
}

#[derive(Debug, Clone, Copy)]
struct AssignSlot {
    variation_id: i64,
    experiment_id: u64,
    /// Variation index (bits 0..32), experiment index (32..48), tenant
    /// (48..64); [`AssignSlot::EMPTY`] for a free slot.
    packed: u64,
}

impl AssignSlot {
    const EMPTY: u64 = u64::MAX;
}

impl AssignTable {
    fn new(catalog: &Catalog) -> AssignTable {
        let n = catalog.variations.len();
        let len = (n + n / 3 + 1).next_power_of_two().max(16);
        let free = AssignSlot { variation_id: 0, experiment_id: 0, packed: AssignSlot::EMPTY };
        let mut t = AssignTable { slots: vec![free; len], mask: len - 1 };
        for (vi, v) in catalog.variations.iter().enumerate() {
            let x = &catalog.experiments[v.experiment as usize];
            // Only what the catalog itself answers `Known` for, so the table
            // can never disagree with it.
            let known = AssignLookup::Known { experiment: v.experiment, variation: vi as u32 };
            if x.active && catalog.assignment(v.tenant, x.id, v.id) == known && v.experiment <= u16::MAX as u32 {
                let packed = vi as u64 | (v.experiment as u64) << 32 | (v.tenant as u64) << 48;
                let mut i = t.home(v.id);
                while t.slots[i].packed != AssignSlot::EMPTY {
                    i = (i + 1) & t.mask;
                }
                t.slots[i] = AssignSlot { variation_id: v.id, experiment_id: x.id, packed };
            }
        }
        t
    }

    #[inline]
    fn home(&self, variation_id: i64) -> usize {
        ((variation_id as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32) as usize & self.mask
    }

    /// Asks for the cache line of `variation_id`'s home slot (a hint: no
    /// effect on results), so that an event's ~20 probes overlap their misses.
    #[inline(always)]
    fn prefetch(&self, variation_id: i64) {
        crate::aggregate::prefetch(&self.slots[self.home(variation_id)]);
    }

    /// `(experiment index, variation index)` if the catalog knows this
    /// assignment; `None`: ask the catalog (an unknown one, or not held).
    #[inline]
    fn get(&self, tenant: u16, experiment_id: u64, variation_id: i64) -> Option<(u32, u32)> {
        let mut i = self.home(variation_id);
        loop {
            let s = &self.slots[i];
            if s.packed == AssignSlot::EMPTY {
                return None;
            }
            if s.variation_id == variation_id {
                let ok = s.experiment_id == experiment_id && (s.packed >> 48) as u16 == tenant;
                return ok.then_some(((s.packed >> 32) as u16 as u32, s.packed as u32));
            }
            i = (i + 1) & self.mask;
        }
    }
}

/// The greatest event ts seen on one input partition.
#[derive(Debug, Clone, Copy)]
struct Clock {
    max_ts: Option<i64>,
    counts: bool,
}

/// Where an event goes: the shard owning `key`, by multiply-shift of its hash.
#[inline]
pub fn shard_of(key: &SessionKey, shards: usize) -> usize {
    ((key.0[0] as u128 * shards as u128) >> 64) as usize
}

impl Router {
    pub fn new(catalog: Arc<Catalog>, shards: usize) -> Router {
        let names = catalog.names.clone();
        let assign = AssignTable::new(&catalog);
        Router {
            mp: Interner::new(names.clone(), NameKind::Mp, NameKind::Mp.capacity()),
            device: Interner::new(names.clone(), NameKind::Device, NameKind::Device.capacity()),
            login: Interner::new(names, NameKind::Login, NameKind::Login.capacity()),
            lateness_ms: catalog.engine.allowed_lateness_ms,
            max_future_ms: catalog.engine.max_future_ms,
            catalog,
            max_ts: None,
            clocks: vec![Clock { max_ts: None, counts: true }],
            slowest: 0,
            counting: 1,
            watermark: i64::MIN,
            shards,
            batches: (0..shards).map(|_| EventBatch::with_capacity(BATCH_EVENTS)).collect(),
            scratch: ParseScratch::default(),
            assign,
            stats: RouterStats::default(),
        }
    }

    /// The current watermark; `i64::MIN` before any event.
    pub fn watermark(&self) -> i64 {
        self.watermark
    }

    /// Which input partitions count in the watermark (after a source's fill).
    /// An empty slice means one partition that always counts.
    pub fn set_partitions(&mut self, states: &[PartitionState]) {
        if states.is_empty() {
            return;
        }
        if self.clocks.len() < states.len() {
            self.clocks.resize(states.len(), Clock { max_ts: None, counts: false });
        }
        for (c, s) in self.clocks.iter_mut().zip(states.iter().chain(std::iter::repeat(&PartitionState::Gone))) {
            c.counts = *s == PartitionState::Active;
        }
        self.counting = self.clocks.iter().filter(|c| c.counts).count();
        self.recompute_watermark();
    }

    /// Watermark alignment: which input partitions have read more than
    /// `window` ms of event time past the slowest counting one (`true`: hold
    /// it back) — so that a replay's partitions advance together and W, their
    /// min, stays close to the greatest time seen.
    pub fn partitions_ahead(&self, window: i64, out: &mut Vec<bool>) {
        out.clear();
        let slowest = self.clocks.iter().filter(|c| c.counts).map(|c| c.max_ts.unwrap_or(i64::MIN)).min();
        let Some(slowest) = slowest else { return };
        out.extend(
            self.clocks.iter().map(|c| c.counts && c.max_ts.is_some_and(|m| m > slowest.saturating_add(window))),
        );
    }

    /// `W = max(W, min over counting clocks of max_ts - lateness)`; with no
    /// clock counting (all idle), the greatest clock stands for all.
    fn recompute_watermark(&mut self) {
        let mut min: Option<(i64, usize)> = None;
        for (i, c) in self.clocks.iter().enumerate().filter(|(_, c)| c.counts) {
            let w = c.max_ts.map_or(i64::MIN, |m| m.saturating_sub(self.lateness_ms));
            if min.is_none_or(|(m, _)| w < m) {
                min = Some((w, i));
            }
        }
        let candidate = match min {
            Some((w, i)) => {
                self.slowest = i;
                w
            }
            None => self.max_ts.map_or(i64::MIN, |m| m.saturating_sub(self.lateness_ms)),
        };
        self.watermark = self.watermark.max(candidate);
    }

    /// Routes one line from input partition `part`. `now_ms` is the wall
    /// clock, read by the caller once per batch of lines: an event more than
    /// `max_future` past it is rejected (`ts_future`), live or replayed, so
    /// that one broken clock cannot drag the watermark forward; `None` sets no
    /// bound (tests and benchmarks of fixed data). Returns the shard whose
    /// batch just became full, if any (the caller must then
    /// [`Router::take_batch`] it), or why the line was refused.
    pub fn route(&mut self, line: &[u8], part: usize, now_ms: Option<i64>) -> Result<Option<usize>, Reject> {
        self.stats.events_in += 1;
        let latest_ts = now_ms.map(|now| now.saturating_add(self.max_future_ms));
        let mut scratch = std::mem::take(&mut self.scratch);
        let routed = match parse_event(line, latest_ts, &mut scratch) {
            Ok(ev) => Ok(self.route_event(ev, part)),
            Err(r) => {
                self.stats.rejected[r.index()] += 1;
                Err(r)
            }
        };
        self.scratch = scratch;
        routed
    }

    fn route_event(&mut self, ev: Event<'_>, part: usize) -> Option<usize> {
        if part >= self.clocks.len() {
            self.clocks.resize(part + 1, Clock { max_ts: None, counts: false });
        }
        // Late is judged against the combined W and the event's own partition
        // clock (the same thing with one partition): an event far behind its
        // partition is late even while a slower partition holds W back.
        let own = self.clocks[part].max_ts.map_or(i64::MIN, |m| m.saturating_sub(self.lateness_ms));
        let wm = self.watermark.max(own);
        if ev.ts < wm {
            self.stats.late_dropped += 1;
            return None;
        }
        self.max_ts = Some(self.max_ts.map_or(ev.ts, |m| m.max(ev.ts)));
        let clock = &mut self.clocks[part];
        if clock.max_ts.is_none_or(|m| ev.ts > m) {
            clock.max_ts = Some(ev.ts);
            if part == self.slowest || self.counting == 0 {
                self.recompute_watermark();
            }
        }
        // The event's assignment slots are asked for first: their misses
        // overlap with each other and with the name lookups below.
        for &(_, v) in ev.assign {
            self.assign.prefetch(v);
        }
        let Some(tenant) = self.catalog.tenant(&ev.tenant) else {
            self.stats.unknown_tenant += 1;
            return None;
        };
        // A name beyond its table's bound becomes `_other`: counted, never dropped.
        let (mp, mp_other) = self.mp.resolve(&ev.mp);
        let (device, device_other) = self.device.resolve(&ev.device);
        let (login, login_other) = self.login.resolve(&ev.login);
        if mp_other | device_other | login_other {
            self.stats.names_replaced[NameKind::Mp.index()] += mp_other as u64;
            self.stats.names_replaced[NameKind::Device.index()] += device_other as u64;
            self.stats.names_replaced[NameKind::Login.index()] += login_other as u64;
        }
        let key = SessionKey::new(tenant, &ev.session);
        let shard = shard_of(&key, self.shards);
        let batch = &mut self.batches[shard];
        let assign_start = batch.assigns.len() as u32;
        for &(x, v) in ev.assign {
            if let Some(pair) = self.assign.get(tenant, x, v) {
                batch.assigns.push(pair);
                continue;
            }
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
        batch.events.push(SessionEvent {
            key,
            ts: ev.ts,
            watermark: wm,
            mp,
            device,
            login,
            value: ev.value,
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

    /// The router's part of a checkpoint, with the source position `positions`.
    pub fn checkpoint_state(&self, positions: crate::source::Offsets) -> crate::checkpoint::RouterState {
        crate::checkpoint::RouterState {
            watermark: self.watermark,
            max_ts: self.max_ts,
            clocks: self.clocks.iter().map(|c| (c.max_ts, c.counts)).collect(),
            positions,
            names: self.catalog.names.to_lists(),
        }
    }

    /// Continues from a checkpoint's state (names were restored with the catalog).
    pub fn restore(&mut self, s: &crate::checkpoint::RouterState) {
        self.watermark = s.watermark;
        self.max_ts = s.max_ts;
        self.clocks = s.clocks.iter().map(|&(max_ts, counts)| Clock { max_ts, counts }).collect();
        if self.clocks.is_empty() {
            self.clocks.push(Clock { max_ts: None, counts: true });
        }
        self.counting = self.clocks.iter().filter(|c| c.counts).count();
        self.recompute_watermark();
    }

    pub fn catalog(&self) -> &Arc<Catalog> {
        &self.catalog
    }

    /// Uses a reloaded catalog for the events routed from now on.
    pub fn set_catalog(&mut self, catalog: Arc<Catalog>) {
        self.assign = AssignTable::new(&catalog);
        self.catalog = catalog;
    }

    pub fn lateness_ms(&self) -> i64 {
        self.lateness_ms
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::names::Names;

    fn router() -> Router {
        // The demo config: allowed lateness 2 minutes.
        let catalog = Catalog::build(&Config::demo(), Arc::new(Names::default())).unwrap();
        Router::new(Arc::new(catalog), 1)
    }

    /// An event at `ts` ms after a fixed start.
    fn line(ts: i64) -> Vec<u8> {
        format!(r#"{{"ts":{},"tenant":"uswm","session":"s","mp":"home_page"}}"#, T0 + ts).into_bytes()
    }

    const T0: i64 = 1_767_225_600_000;

    const MIN: i64 = 60_000;

    #[test]
    fn the_watermark_is_the_min_of_counting_partitions_and_never_goes_back() {
        let mut r = router();
        use PartitionState::*;
        r.set_partitions(&[Active, Active]);
        r.route(&line(10 * MIN), 0, None).unwrap();
        assert_eq!(r.watermark(), i64::MIN, "partition 1 has not spoken yet");
        r.route(&line(5 * MIN), 1, None).unwrap();
        assert_eq!(r.watermark(), T0 + 3 * MIN);
        r.route(&line(20 * MIN), 1, None).unwrap();
        assert_eq!(r.watermark(), T0 + 8 * MIN, "partition 0 is now the slowest");
        r.set_partitions(&[Idle, Active]);
        assert_eq!(r.watermark(), T0 + 18 * MIN, "an idle partition stops counting");
        r.set_partitions(&[Active, Active]);
        assert_eq!(r.watermark(), T0 + 18 * MIN, "W never moves back");
        r.set_partitions(&[Idle, Idle]);
        r.route(&line(30 * MIN), 0, None).unwrap();
        assert_eq!(r.watermark(), T0 + 28 * MIN, "all idle: the greatest clock stands for all");
    }

    #[test]
    fn late_is_judged_against_the_events_own_partition_too() {
        let mut r = router();
        use PartitionState::*;
        r.set_partitions(&[Active, Active]);
        r.route(&line(10 * MIN), 0, None).unwrap();
        assert_eq!(r.watermark(), i64::MIN);
        r.route(&line(7 * MIN), 0, None).unwrap(); // 3 minutes behind its own partition
        assert_eq!(r.stats.late_dropped, 1);
        r.route(&line(7 * MIN), 1, None).unwrap(); // on time for partition 1
        assert_eq!(r.stats.late_dropped, 1);
    }

    fn device_line(ts: i64, device: &str) -> Vec<u8> {
        format!(r#"{{"ts":{},"tenant":"uswm","session":"s","mp":"home_page","device":"{device}"}}"#, T0 + ts)
            .into_bytes()
    }

    /// What broke: after a reload whose config named a new device, the
    /// router's interner handed out that device's id again to the next new
    /// name, so events were tagged with another device and never met the
    /// new condition.
    #[test]
    fn a_reload_naming_a_new_device_keeps_every_id_unique() {
        let mut r = router();
        r.route(&device_line(0, "dev-a"), 0, None).unwrap();
        let mut config = Config::demo();
        let mut x = config.experiments[0].clone();
        (x.id, x.variations) = (999_001, vec![999_011]);
        x.qualify = vec![crate::config::Condition { device: Some("tablet-x".into()), ..Default::default() }];
        config.experiments.push(x);
        let (reloaded, _) = r.catalog().reload(&config).unwrap();
        let wanted = reloaded.experiments.last().unwrap().conditions[0].device.unwrap();
        r.set_catalog(Arc::new(reloaded));
        r.route(&device_line(1, "dev-b"), 0, None).unwrap();
        r.route(&device_line(2, "tablet-x"), 0, None).unwrap();
        let batch = r.take_batch(0, None);
        let names = r.catalog().names.clone();
        let tags: Vec<String> = batch.events.iter().map(|e| names.device.get(e.device).to_string()).collect();
        assert_eq!(tags, ["dev-a", "dev-b", "tablet-x"]);
        assert_eq!(batch.events[2].device, wanted, "the event meets the reloaded condition");
    }

    /// A name beyond a full table becomes `_other`, counted; the event is routed.
    #[test]
    fn a_name_beyond_a_full_table_is_routed_as_other_and_counted() {
        let mut r = router();
        r.device = Interner::new(r.catalog().names.clone(), NameKind::Device, r.catalog().names.device.len() + 1);
        r.route(&device_line(0, "dev-a"), 0, None).unwrap();
        r.route(&device_line(1, "dev-b"), 0, None).unwrap();
        r.route(&device_line(2, "dev-c"), 0, None).unwrap();
        assert_eq!(r.stats.routed, 3);
        assert_eq!(r.stats.names_replaced, [0, 2, 0]);
        let batch = r.take_batch(0, None);
        let names = r.catalog().names.clone();
        let tags: Vec<String> = batch.events.iter().map(|e| names.device.get(e.device).to_string()).collect();
        assert_eq!(tags, ["dev-a", crate::names::OTHER, crate::names::OTHER]);
    }

    /// The flat assignment table answers exactly as the catalog, for every
    /// known pair, for pairs crossed with another experiment or tenant, and
    /// after a reload that stops one experiment and changes another.
    #[test]
    fn the_assignment_table_agrees_with_the_catalog_before_and_after_a_reload() {
        let check = |catalog: &Catalog| {
            let table = AssignTable::new(catalog);
            let ids: Vec<u64> = catalog.experiments.iter().map(|x| x.id).chain([0, UNKNOWN]).collect();
            let vars: Vec<i64> = catalog.variations.iter().map(|v| v.id).chain([-1, i64::MIN, i64::MAX]).collect();
            let mut known = 0;
            for tenant in 0..catalog.tenants.len() as u16 + 1 {
                for &x in &ids {
                    for &v in &vars {
                        let want = catalog.assignment(tenant, x, v);
                        let got = table.get(tenant, x, v);
                        match want {
                            AssignLookup::Known { experiment, variation } => {
                                assert_eq!(got, Some((experiment, variation)), "{tenant} {x} {v}");
                                known += 1;
                            }
                            _ => assert_eq!(got, None, "{tenant} {x} {v}"),
                        }
                    }
                }
            }
            known
        };
        const UNKNOWN: u64 = crate::event::UNKNOWN_EXPERIMENT_ID;
        let config = Config::demo();
        let catalog = Catalog::build(&config, Arc::new(Names::default())).unwrap();
        assert!(check(&catalog) >= config.experiments.iter().map(|x| x.variations.len()).sum::<usize>());
        let mut next = config.clone();
        next.experiments.remove(0);
        next.experiments[0].variations.push(999_002);
        let (reloaded, _) = catalog.reload(&next).unwrap();
        assert!(reloaded.experiments.iter().any(|x| !x.active), "the reload stopped an experiment");
        check(&reloaded);
    }

    #[test]
    fn partitions_running_ahead_are_held_back() {
        let mut r = router();
        use PartitionState::*;
        r.set_partitions(&[Active, Active, Active]);
        r.route(&line(10 * MIN), 0, None).unwrap();
        r.route(&line(11 * MIN), 1, None).unwrap();
        r.route(&line(14 * MIN), 2, None).unwrap();
        let mut ahead = Vec::new();
        r.partitions_ahead(2 * MIN, &mut ahead);
        assert_eq!(ahead, vec![false, false, true]);
        r.set_partitions(&[Idle, Active, Active]);
        r.partitions_ahead(2 * MIN, &mut ahead);
        assert_eq!(ahead, vec![false, false, true], "more than 2 minutes past partition 1");
        r.route(&line(13 * MIN), 1, None).unwrap();
        r.partitions_ahead(2 * MIN, &mut ahead);
        assert_eq!(ahead, vec![false, false, false]);
    }
}
