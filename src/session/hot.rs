//! The catalog facts the session hot path reads, packed: one 24-byte entry
//! per experiment and 16 bytes per condition, in two flat arrays.
//!
//! An event touches every experiment of its session (~20), and the
//! [`CompiledExperiment`] behind each spreads what the hot path reads over
//! several cache lines and heap blocks (`variations`, `mps`, `conditions`,
//! `visit_layout`). Here an experiment's variations, tenant, reported mps and
//! condition count share one entry, and its conditions sit next to those of
//! its neighbours, so the whole table of 1,000 experiments stays in a few
//! dozen KiB of cache. It is derived from the catalog (rebuilt at a reload)
//! and answers exactly as the catalog does; what it cannot pack (mp ids
//! ≥ 64, attribute conditions) it leaves to the catalog.

use crate::config::{Catalog, CompiledCondition, CompiledExperiment, VisitLayout};

/// Which mps an experiment reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reports {
    /// Every mp.
    Every,
    /// The mps whose bits are set in [`HotExp::mps`] (all listed ids < 64).
    Listed,
    /// Ask the catalog (a listed id ≥ 64).
    Catalog,
}

/// One experiment's hot facts.
#[derive(Debug, Clone, Copy)]
pub(super) struct HotExp {
    /// Catalog index of its first variation (an experiment's are consecutive).
    pub first_variation: u32,
    /// Its first condition in [`HotCatalog::conds`].
    pub cond_start: u32,
    /// Bit `m` for each listed mp `m` (with [`Reports::Listed`]).
    mps: u64,
    pub tenant: u16,
    pub n_conds: u16,
    pub n_variations: u8,
    /// It replaced an older version in a reload.
    pub supersedes: bool,
    reports: Reports,
}

impl HotExp {
    /// The variation at `slot` of its list.
    #[inline]
    pub fn variation(&self, slot: u8) -> u32 {
        self.first_variation + slot as u32
    }

    /// The slot of `variation`, which must be one of its own.
    #[inline]
    pub fn slot_of(&self, variation: u32) -> u8 {
        let k = variation.wrapping_sub(self.first_variation);
        assert!(k < self.n_variations as u32, "variation of its experiment");
        k as u8
    }

    /// Whether it reports visits to `mp` (as `x.visit_slot(mp, _).is_some()`).
    #[inline]
    pub fn reports(&self, mp: u16, x: &CompiledExperiment) -> bool {
        match self.reports {
            Reports::Every => true,
            Reports::Listed => mp < 64 && self.mps & 1 << mp != 0,
            Reports::Catalog => x.visit_slot(mp, self.first_variation).is_some(),
        }
    }
}

/// A condition's tags packed into one word as [`tag_word`] packs an event's,
/// with a mask of the tags it names: a match is one xor, one and.
#[derive(Debug, Clone, Copy)]
pub(super) struct HotCond {
    /// The tags it names, as [`tag_word`]; bit [`ATTRS`] if it names attributes.
    tags: u64,
    /// The bits of the tags it names (never [`ATTRS`]).
    mask: u64,
}

/// Set in [`HotCond::tags`] of a condition naming attributes.
const ATTRS: u64 = 1 << 48;

/// An event's (mp, device, login), packed for [`HotCond::tags_match`].
#[inline]
pub(super) fn tag_word(mp: u16, device: u16, login: u16) -> u64 {
    mp as u64 | (device as u64) << 16 | (login as u64) << 32
}

impl HotCond {
    fn of(c: &CompiledCondition) -> HotCond {
        let named = |tag: Option<u16>, shift: u32| tag.map_or((0, 0), |t| ((t as u64) << shift, 0xFFFF << shift));
        let (mp, device, login) = (named(c.mp, 0), named(c.device, 16), named(c.login, 32));
        let attrs = if c.attrs.is_empty() { 0 } else { ATTRS };
        HotCond { tags: mp.0 | device.0 | login.0 | attrs, mask: mp.1 | device.1 | login.1 }
    }

    /// Whether it names attributes (then the catalog's condition decides).
    #[inline]
    pub fn has_attrs(&self) -> bool {
        self.tags & ATTRS != 0
    }

    /// The tag part of [`CompiledCondition::matches`], for an event's
    /// [`tag_word`] (without branches: which tags differ is unpredictable from
    /// one condition to the next).
    #[inline]
    pub fn tags_match(&self, event: u64) -> bool {
        (event ^ self.tags) & self.mask == 0
    }
}

/// The packed facts of every experiment of a catalog, by experiment index.
#[derive(Debug, Default)]
pub(super) struct HotCatalog {
    pub exps: Vec<HotExp>,
    pub conds: Vec<HotCond>,
}

impl HotCatalog {
    pub fn of(catalog: &Catalog) -> HotCatalog {
        let mut hot = HotCatalog::default();
        for x in &catalog.experiments {
            let reports = match (&x.mps, &x.visit_layout) {
                (_, VisitLayout::Every(_)) => Reports::Every,
                (Some(list), VisitLayout::Listed(_)) if list.iter().all(|&m| m < 64) => Reports::Listed,
                _ => Reports::Catalog,
            };
            let mps = x.mps.iter().flatten().filter(|&&m| m < 64).fold(0u64, |b, &m| b | 1 << m);
            debug_assert!(x.variations.windows(2).all(|w| w[1] == w[0] + 1), "consecutive variations");
            hot.exps.push(HotExp {
                first_variation: x.variations.first().copied().unwrap_or(0),
                cond_start: hot.conds.len() as u32,
                mps,
                tenant: x.tenant,
                n_conds: x.conditions.len() as u16,
                n_variations: x.variations.len() as u8,
                supersedes: x.supersedes.is_some(),
                reports,
            });
            hot.conds.extend(x.conditions.iter().map(HotCond::of));
        }
        hot
    }

    /// The conditions of `h`.
    #[inline]
    pub fn conds(&self, h: &HotExp) -> &[HotCond] {
        &self.conds[h.cond_start as usize..h.cond_start as usize + h.n_conds as usize]
    }
}
