//! Aggregation: metric keys, per-minute counters in each shard, and the merged
//! running totals that decide what is written.
//!
//! - [`SeriesKey`] packs a metric (kind, variation, mp) and its tags (device,
//!   login) into one `u64`; rendering to a name happens only at output.
//! - [`MinuteCounters`] (one per shard) counts deltas per (tenant, mp,
//!   device, login, minute) region in one cell per variation touched; a
//!   drain hands out the non-zero deltas and empties the cells for reuse.
//! - [`DeltaSums`]: what experiment health and the results page read of a
//!   drain's deltas, summed by the shard once per cell for the writer.
//! - [`Totals`] (the writer stage) adds the shards' deltas into absolute totals
//!   and yields each point whose total changed since it was last written
//!   (SPEC §5), then forgets points of final minutes.

mod counters;
mod sums;
mod totals;

pub use counters::{CellAdd, Delta, MinuteCounters};
pub use sums::{DeltaSums, SegmentSum, SessionSum, SumsBuilder, VisitSum};
pub use sums::{SEEN_ASSIGNED, SEEN_BETA, SEEN_FM, SEEN_VALUE, SEEN_VALUE_SQ};
pub use totals::{Point, TotalRecord, Totals};

use std::fmt;

pub const MINUTE_MS: i64 = 60_000;

/// Asks for the cache line of `p` (a hint: no effect on results).
#[inline(always)]
pub(crate) fn prefetch<T>(p: &T) {
    // SAFETY: the intrinsic only needs SSE, which this build enables (the
    // cfg); a prefetch never faults and reads nothing back, and `p` is a
    // valid reference anyway.
    #[cfg(all(target_arch = "x86_64", target_feature = "sse"))]
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>((p as *const T).cast())
    };
    #[cfg(not(all(target_arch = "x86_64", target_feature = "sse")))]
    let _ = p;
}

/// `minute(t) = t - t mod 60000`.
#[inline]
pub fn minute_of(ts: i64) -> i64 {
    ts - ts.rem_euclid(MINUTE_MS)
}

/// The nine metrics of SPEC §3: six counts and three value sums.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum MetricKind {
    SessionAssigned = 0,
    SessionFm = 1,
    VisitAssigned = 2,
    VisitAssignedBeta = 3,
    VisitFm = 4,
    VisitFmBeta = 5,
    /// `T.value.assigned.v.m`: the values of visits at `ts >= A`.
    ValueAssigned = 6,
    /// `T.value.fm.v.m`: the values of visits at `ts >= F`.
    ValueFm = 7,
    /// `T.value_sq.fm.v.m`: the increments `y_k² − y_{k−1}²` of the running
    /// value total of visits at `ts >= F`.
    ValueSqFm = 8,
}

impl MetricKind {
    /// Every kind, in discriminant order (`ALL[k as usize] == k`).
    pub const ALL: [MetricKind; 9] = [
        MetricKind::SessionAssigned,
        MetricKind::SessionFm,
        MetricKind::VisitAssigned,
        MetricKind::VisitAssignedBeta,
        MetricKind::VisitFm,
        MetricKind::VisitFmBeta,
        MetricKind::ValueAssigned,
        MetricKind::ValueFm,
        MetricKind::ValueSqFm,
    ];

    fn from_bits(b: u64) -> MetricKind {
        match b {
            0 => MetricKind::SessionAssigned,
            1 => MetricKind::SessionFm,
            2 => MetricKind::VisitAssigned,
            3 => MetricKind::VisitAssignedBeta,
            4 => MetricKind::VisitFm,
            5 => MetricKind::VisitFmBeta,
            6 => MetricKind::ValueAssigned,
            7 => MetricKind::ValueFm,
            _ => MetricKind::ValueSqFm,
        }
    }

    /// Whether the metric sums event values (the others count).
    pub fn is_value(self) -> bool {
        matches!(self, MetricKind::ValueAssigned | MetricKind::ValueFm | MetricKind::ValueSqFm)
    }
}

/// `mp` field of session-level metrics.
pub const NO_MP: u16 = u16::MAX;

/// A metric and its tags, packed: kind 4 bits, variation index 21, mp 16,
/// device 12, login 11 (login ids stay below 2⁴, [`crate::names::LOGIN_CAPACITY`]).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SeriesKey(pub u64);

impl SeriesKey {
    #[inline]
    pub fn new(kind: MetricKind, variation: u32, mp: u16, device: u16, login: u16) -> SeriesKey {
        debug_assert!(variation < 1 << 21 && device < 1 << 12 && login < 1 << 11);
        SeriesKey(
            (kind as u64) << 60 | (variation as u64) << 39 | (mp as u64) << 23 | (device as u64) << 11 | login as u64,
        )
    }
    pub fn kind(self) -> MetricKind {
        MetricKind::from_bits(self.0 >> 60)
    }
    pub fn variation(self) -> u32 {
        ((self.0 >> 39) & ((1 << 21) - 1)) as u32
    }
    pub fn mp(self) -> u16 {
        (self.0 >> 23) as u16
    }
    pub fn device(self) -> u16 {
        ((self.0 >> 11) & 0xFFF) as u16
    }
    pub fn login(self) -> u16 {
        (self.0 & 0x7FF) as u16
    }
}

impl fmt::Debug for SeriesKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}(v{} mp{} d{} l{})", self.kind(), self.variation(), self.mp(), self.device(), self.login())
    }
}

/// Renders series keys into KairosDB metric names and tag values.
pub struct Namer<'a> {
    catalog: &'a crate::config::Catalog,
    mps: std::sync::RwLockReadGuard<'a, Vec<std::sync::Arc<str>>>,
    devices: std::sync::RwLockReadGuard<'a, Vec<std::sync::Arc<str>>>,
    logins: std::sync::RwLockReadGuard<'a, Vec<std::sync::Arc<str>>>,
}

impl<'a> Namer<'a> {
    /// Holds read locks on the name tables until dropped: make one per batch.
    pub fn new(catalog: &'a crate::config::Catalog) -> Namer<'a> {
        Namer {
            catalog,
            mps: catalog.names.mp.read(),
            devices: catalog.names.device.read(),
            logins: catalog.names.login.read(),
        }
    }

    /// Appends the metric name of `key` to `out`, e.g. `uswm.visit.fm.1231.item_page.beta`
    /// or `uswm.value_sq.fm.1231.checkout`.
    pub fn write_name(&self, key: SeriesKey, out: &mut String) {
        use std::fmt::Write;
        let var = self.catalog.variations[key.variation() as usize];
        let x = &self.catalog.experiments[var.experiment as usize];
        let tenant = &self.catalog.tenants[x.tenant as usize];
        let (family, beta) = match key.kind() {
            MetricKind::SessionAssigned => ("session.assigned", false),
            MetricKind::SessionFm => ("session.fm", false),
            MetricKind::VisitAssigned => ("visit.assigned", false),
            MetricKind::VisitAssignedBeta => ("visit.assigned", true),
            MetricKind::VisitFm => ("visit.fm", false),
            MetricKind::VisitFmBeta => ("visit.fm", true),
            MetricKind::ValueAssigned => ("value.assigned", false),
            MetricKind::ValueFm => ("value.fm", false),
            MetricKind::ValueSqFm => ("value_sq.fm", false),
        };
        let _ = write!(out, "{tenant}.{family}.{}", var.id);
        if key.mp() != NO_MP {
            out.push('.');
            out.push_str(&self.mps[key.mp() as usize]);
        }
        if beta {
            out.push_str(".beta");
        }
    }

    pub fn name(&self, key: SeriesKey) -> String {
        let mut s = String::with_capacity(48);
        self.write_name(key, &mut s);
        s
    }

    pub fn device(&self, key: SeriesKey) -> &str {
        &self.devices[key.device() as usize]
    }

    pub fn login(&self, key: SeriesKey) -> &str {
        &self.logins[key.login() as usize]
    }

    pub fn dc(&self) -> &str {
        &self.catalog.engine.dc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_key_round_trips() {
        for kind in [MetricKind::VisitFmBeta, MetricKind::ValueSqFm] {
            let k = SeriesKey::new(kind, (1 << 21) - 1, 65534, 4095, 2047);
            assert_eq!(k.kind(), kind);
            assert_eq!(k.variation(), (1 << 21) - 1);
            assert_eq!(k.mp(), 65534);
            assert_eq!(k.device(), 4095);
            assert_eq!(k.login(), 2047);
        }
        let s = SeriesKey::new(MetricKind::SessionAssigned, 3, NO_MP, 0, 0);
        assert_eq!(s.mp(), NO_MP);
        assert_eq!(s.kind(), MetricKind::SessionAssigned);
    }

    #[test]
    fn minutes() {
        assert_eq!(minute_of(1525356185123), 1525356180000);
        assert_eq!(minute_of(1525356180000), 1525356180000);
    }
}
