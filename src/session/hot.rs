//! The catalog facts the session hot path reads, packed: one 24-byte entry
//! per experiment and 8 bytes per condition, in two flat arrays.
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

/// A condition's tags packed: mp, device, login and which of them (and
/// whether attributes) constrain it.
#[derive(Debug, Clone, Copy)]
pub(super) struct HotCond {
    mp: u16,
    device: u16,
    login: u16,
    flags: u16,
}

const ANY_MP: u16 = 1;
const ANY_DEVICE: u16 = 2;
const ANY_LOGIN: u16 = 4;
const ATTRS: u16 = 8;

impl HotCond {
    fn of(c: &CompiledCondition) -> HotCond {
        let flags = if c.mp.is_none() { ANY_MP } else { 0 }
            | if c.device.is_none() { ANY_DEVICE } else { 0 }
            | if c.login.is_none() { ANY_LOGIN } else { 0 }
            | if c.attrs.is_empty() { 0 } else { ATTRS };
        HotCond { mp: c.mp.unwrap_or(0), device: c.device.unwrap_or(0), login: c.login.unwrap_or(0), flags }
    }

    /// Whether it names attributes (then the catalog's condition decides).
    #[inline]
    pub fn has_attrs(&self) -> bool {
        self.flags & ATTRS != 0
    }

    /// The tag part of [`CompiledCondition::matches`].
    #[inline]
    pub fn tags_match(&self, mp: u16, device: u16, login: u16) -> bool {
        let f = self.flags;
        (f & ANY_MP != 0 || self.mp == mp)
            && (f & ANY_DEVICE != 0 || self.device == device)
            && (f & ANY_LOGIN != 0 || self.login == login)
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
