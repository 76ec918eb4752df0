//! [`Catalog`]: the checked [`Config`] compiled into dense ids for the hot path.
//!
//! Tenants, experiments and variations get dense indices; condition and `mps`
//! strings are interned into the shared [`Names`] tables so that workers compare
//! small integers, never strings. Attribute names and values are interned into
//! catalog-private maps; an event attribute the catalog does not mention can never
//! meet a condition and is dropped at routing.

use ahash::AHashMap;
use smallvec::SmallVec;
use std::sync::Arc;

use super::{Config, EngineConfig, Experiment};
use crate::names::{NameKind, Names};

/// Most experiments in one config (session state stores a `u16` index).
pub const EXPERIMENT_CAPACITY: usize = 0xFFFF;
/// Most variations of one experiment (session state stores a 7-bit slot).
pub const VARIATIONS_PER_EXPERIMENT: usize = 0x7F;
/// Most variations in one config (21 bits of a series key).
pub const VARIATION_CAPACITY: usize = 1 << 21;

/// A qualification condition over ids. `None` fields are unconstrained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CompiledCondition {
    pub mp: Option<u16>,
    pub device: Option<u16>,
    pub login: Option<u16>,
    /// (attribute name id, value id), all of which must be present.
    pub attrs: SmallVec<[(u32, u32); 1]>,
}

impl CompiledCondition {
    /// Whether an event with these ids and attributes meets the condition.
    #[inline]
    pub fn matches(&self, mp: u16, device: u16, login: u16, attrs: impl Fn(u32) -> Option<u32>) -> bool {
        self.mp.is_none_or(|m| m == mp)
            && self.device.is_none_or(|d| d == device)
            && self.login.is_none_or(|l| l == login)
            && self.attrs.iter().all(|&(k, v)| attrs(k) == Some(v))
    }
}

#[derive(Debug, Clone)]
pub struct CompiledExperiment {
    pub id: u64,
    pub tenant: u16,
    /// Variation indices into [`Catalog::variations`].
    pub variations: Vec<u32>,
    /// Sorted mp ids reported; `None` = every mp.
    pub mps: Option<Vec<u16>>,
    pub conditions: Vec<CompiledCondition>,
    /// Where its variations' visit counters sit in a per-mp counter region.
    pub visit_layout: VisitLayout,
    /// Configured split, one weight per variation.
    pub weights: Vec<u32>,
    /// Takes new assignments. A stopped experiment (or the old version of a
    /// changed one, after a reload) keeps its index and counters so that the
    /// sessions already assigned to it go on counting until they expire.
    pub active: bool,
    /// The older version (index) this one replaced in a reload.
    pub supersedes: Option<u32>,
}

/// Layout of an experiment's visit counters in the per-(tenant, mp) regions of
/// [`crate::aggregate::MinuteCounters`]: a region holds first the variations of
/// experiments that list the mp, then those of experiments reporting every mp.
#[derive(Debug, Clone)]
pub enum VisitLayout {
    /// Parallel to `mps`: the slot of the first variation in that mp's region.
    Listed(Vec<u32>),
    /// Reports every mp: the first variation's slot after the listed part.
    Every(u32),
}

/// Where one visit counter lives in its region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VisitSlot {
    /// Slot in the listed part.
    Listed(u32),
    /// Slot after the listed part.
    Every(u32),
}

impl CompiledExperiment {
    #[inline]
    pub fn reports(&self, mp: u16) -> bool {
        match &self.mps {
            None => true,
            Some(list) => list.binary_search(&mp).is_ok(),
        }
    }

    /// Where the visit counters of variation `variation` (a catalog index of
    /// this experiment) for `mp` live, if `mp` is reported.
    #[inline]
    pub fn visit_slot(&self, mp: u16, variation: u32) -> Option<VisitSlot> {
        let k = variation - self.variations[0];
        match (&self.mps, &self.visit_layout) {
            (Some(list), VisitLayout::Listed(bases)) => {
                list.binary_search(&mp).ok().map(|i| VisitSlot::Listed(bases[i] + k))
            }
            (_, VisitLayout::Every(base)) => Some(VisitSlot::Every(base + k)),
            (None, VisitLayout::Listed(_)) => None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct VariationInfo {
    pub id: i64,
    pub experiment: u32,
    pub tenant: u16,
    /// Position among the tenant's variations (see [`Catalog::tenant_variations`]).
    pub tenant_slot: u32,
    /// Position in its experiment's variation list.
    pub slot: u8,
}

/// One experiment as the catalog holds it: its definition, whether it takes
/// new assignments, and which older version it replaced. Indices are
/// append-only across reloads, so state that refers to them stays valid.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ExperimentDef {
    pub experiment: Experiment,
    pub active: bool,
    pub supersedes: Option<u32>,
}

/// The compiled configuration, shared read-only by every stage.
#[derive(Debug)]
pub struct Catalog {
    pub engine: EngineConfig,
    /// Every experiment ever loaded in this run, by index.
    pub defs: Vec<ExperimentDef>,
    pub tenants: Vec<String>,
    pub experiments: Vec<CompiledExperiment>,
    pub variations: Vec<VariationInfo>,
    /// Per tenant, its variations' indices, in `tenant_slot` order.
    pub tenant_variations: Vec<Vec<u32>>,
    /// Per (tenant, mp): variations of the experiments that list the mp, in
    /// slot order ([`VisitSlot::Listed`]).
    listed_variations: AHashMap<(u16, u16), Vec<u32>>,
    /// Per tenant: variations of experiments reporting every mp, in slot order
    /// ([`VisitSlot::Every`]).
    every_mp_variations: Vec<Vec<u32>>,
    pub names: Arc<Names>,
    tenant_index: AHashMap<String, u16>,
    experiment_index: AHashMap<(u16, u64), u32>,
    variation_index: AHashMap<i64, u32>,
    attr_name_index: AHashMap<String, u32>,
    attr_value_index: AHashMap<String, u32>,
}

/// What became of one `(experiment, variation)` pair of an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssignLookup {
    Known { experiment: u32, variation: u32 },
    UnknownExperiment,
    UnknownVariation,
}

/// Why a config (or a checkpoint's experiments with a reloaded config) does
/// not compile into a catalog.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CatalogError {
    /// `.0`: "variations" or "experiments".
    #[error("config names more than the supported number of {0}")]
    Full(&'static str),
    #[error("experiment {0} has more than {VARIATIONS_PER_EXPERIMENT} variations")]
    TooManyVariations(u64),
    /// `.0`: the `[engine]` field, which a reload cannot change.
    #[error("engine.{0} changed: engine settings need a restart")]
    EngineChanged(&'static str),
}

impl Catalog {
    /// Compiles `config`, interning its names into `names`.
    pub fn build(config: &Config, names: Arc<Names>) -> Result<Catalog, CatalogError> {
        let defs = config
            .experiments
            .iter()
            .map(|x| ExperimentDef { experiment: x.clone(), active: true, supersedes: None })
            .collect();
        Catalog::build_defs(&config.engine, defs, names)
    }

    /// The catalog after a reload to `new`: experiments kept as they were stay
    /// at their index; removed ones stop; changed ones stop and their new
    /// version is appended; new ones are appended. Engine settings cannot
    /// change without a restart. Returns the catalog and a summary line.
    pub fn reload(&self, new: &Config) -> Result<(Catalog, String), CatalogError> {
        let (a, b) = (&self.engine, &new.engine);
        for (field, same) in [
            ("dc", a.dc == b.dc),
            ("allowed_lateness", a.allowed_lateness_ms == b.allowed_lateness_ms),
            ("session_gap", a.session_gap_ms == b.session_gap_ms),
            ("trigger", a.trigger_ms == b.trigger_ms),
            ("ttl", a.ttl_s == b.ttl_s),
            ("stall_factor", a.stall_factor == b.stall_factor),
            ("max_future", a.max_future_ms == b.max_future_ms),
        ] {
            if !same {
                return Err(CatalogError::EngineChanged(field));
            }
        }
        let mut defs: Vec<ExperimentDef> =
            self.defs.iter().map(|d| ExperimentDef { active: false, ..d.clone() }).collect();
        let (mut added, mut changed, mut kept) = (0, 0, 0);
        for x in &new.experiments {
            // The newest version of this (tenant, id), if any.
            let latest = defs.iter().rposition(|d| d.experiment.tenant == x.tenant && d.experiment.id == x.id);
            match latest {
                Some(i) if defs[i].experiment == *x => {
                    defs[i].active = true;
                    kept += 1;
                }
                Some(i) => {
                    defs.push(ExperimentDef { experiment: x.clone(), active: true, supersedes: Some(i as u32) });
                    changed += 1;
                }
                None => {
                    defs.push(ExperimentDef { experiment: x.clone(), active: true, supersedes: None });
                    added += 1;
                }
            }
        }
        let was_active = self.defs.iter().filter(|d| d.active).count();
        let stopped = was_active - kept - changed;
        let catalog = Catalog::build_defs(&self.engine, defs, self.names.clone())?;
        Ok((catalog, format!("{kept} kept, {added} added, {changed} changed, {stopped} stopped")))
    }

    /// Compiles experiment definitions (in index order).
    pub fn build_defs(
        engine: &EngineConfig,
        defs: Vec<ExperimentDef>,
        names: Arc<Names>,
    ) -> Result<Catalog, CatalogError> {
        let config = Config {
            engine: engine.clone(),
            experiments: defs.iter().map(|d| d.experiment.clone()).collect(),
            kafka: Vec::new(),
        };
        let interner = |kind: NameKind| crate::names::Interner::new(names.clone(), kind, kind.capacity());
        let (mut mp, mut device, mut login) =
            (interner(NameKind::Mp), interner(NameKind::Device), interner(NameKind::Login));
        let mut cat = Catalog {
            engine: config.engine.clone(),
            defs: defs.clone(),
            tenants: Vec::new(),
            experiments: Vec::new(),
            variations: Vec::new(),
            tenant_variations: Vec::new(),
            listed_variations: AHashMap::new(),
            every_mp_variations: Vec::new(),
            names: names.clone(),
            tenant_index: AHashMap::new(),
            experiment_index: AHashMap::new(),
            variation_index: AHashMap::new(),
            attr_name_index: AHashMap::new(),
            attr_value_index: AHashMap::new(),
        };
        let total_variations: usize = config.experiments.iter().map(|x| x.variations.len()).sum();
        if total_variations > VARIATION_CAPACITY {
            return Err(CatalogError::Full("variations"));
        }
        if config.experiments.len() > EXPERIMENT_CAPACITY {
            return Err(CatalogError::Full("experiments"));
        }
        if let Some(x) = config.experiments.iter().find(|x| x.variations.len() > VARIATIONS_PER_EXPERIMENT) {
            return Err(CatalogError::TooManyVariations(x.id));
        }
        for (x, def) in config.experiments.iter().zip(&defs) {
            let n = cat.tenant_index.len() as u16;
            let tenant = *cat.tenant_index.entry(x.tenant.clone()).or_insert(n);
            if tenant == n {
                cat.tenants.push(x.tenant.clone());
                cat.tenant_variations.push(Vec::new());
                cat.every_mp_variations.push(Vec::new());
            }
            let xi = cat.experiments.len() as u32;
            if def.active {
                cat.experiment_index.insert((tenant, x.id), xi);
            }
            let mut variations = Vec::new();
            for (slot, &v) in x.variations.iter().enumerate() {
                let vi = cat.variations.len() as u32;
                let tenant_slot = cat.tenant_variations[tenant as usize].len() as u32;
                cat.tenant_variations[tenant as usize].push(vi);
                cat.variations.push(VariationInfo { id: v, experiment: xi, tenant, tenant_slot, slot: slot as u8 });
                if def.active {
                    cat.variation_index.insert(v, vi);
                }
                variations.push(vi);
            }
            let mps = match &x.mps {
                None => None,
                Some(list) => {
                    let mut ids = Vec::new();
                    for m in list {
                        ids.push(mp.intern(m).ok_or(CatalogError::Full("measurement points"))?);
                    }
                    ids.sort_unstable();
                    Some(ids)
                }
            };
            let mut conditions = Vec::new();
            for c in &x.qualify {
                let mut attrs = SmallVec::new();
                for (k, v) in &c.attrs {
                    let nk = cat.attr_name_index.len() as u32;
                    let k = *cat.attr_name_index.entry(k.clone()).or_insert(nk);
                    let nv = cat.attr_value_index.len() as u32;
                    let v = *cat.attr_value_index.entry(v.clone()).or_insert(nv);
                    attrs.push((k, v));
                }
                conditions.push(CompiledCondition {
                    mp: c
                        .mp
                        .as_deref()
                        .map(|s| mp.intern(s).ok_or(CatalogError::Full("measurement points")))
                        .transpose()?,
                    device: c
                        .device
                        .as_deref()
                        .map(|s| device.intern(s).ok_or(CatalogError::Full("devices")))
                        .transpose()?,
                    login: c
                        .login
                        .as_deref()
                        .map(|s| login.intern(s).ok_or(CatalogError::Full("logins")))
                        .transpose()?,
                    attrs,
                });
            }
            let visit_layout = match &mps {
                Some(list) => VisitLayout::Listed(
                    list.iter()
                        .map(|&mp| {
                            let region = cat.listed_variations.entry((tenant, mp)).or_default();
                            let base = region.len() as u32;
                            region.extend(&variations);
                            base
                        })
                        .collect(),
                ),
                None => {
                    let region = &mut cat.every_mp_variations[tenant as usize];
                    let base = region.len() as u32;
                    region.extend(&variations);
                    VisitLayout::Every(base)
                }
            };
            let weights = x.weights.clone();
            cat.experiments.push(CompiledExperiment {
                id: x.id,
                tenant,
                variations,
                mps,
                conditions,
                visit_layout,
                weights,
                active: def.active,
                supersedes: def.supersedes,
            });
        }
        Ok(cat)
    }

    /// The variations of the visit region of (tenant, mp), in slot order: the
    /// listed part, then the every-mp part.
    pub fn visit_region(&self, tenant: u16, mp: u16) -> (&[u32], &[u32]) {
        let listed = self.listed_variations.get(&(tenant, mp)).map_or(&[][..], Vec::as_slice);
        (listed, &self.every_mp_variations[tenant as usize])
    }

    pub fn tenant(&self, name: &str) -> Option<u16> {
        self.tenant_index.get(name).copied()
    }

    /// Resolves one assignment of an event of `tenant`. Variation ids are
    /// globally unique, so the common case is one lookup.
    #[inline]
    pub fn assignment(&self, tenant: u16, experiment_id: u64, variation_id: i64) -> AssignLookup {
        if let Some(&v) = self.variation_index.get(&variation_id) {
            let x = self.variations[v as usize].experiment;
            let e = &self.experiments[x as usize];
            if e.id == experiment_id && e.tenant == tenant {
                return AssignLookup::Known { experiment: x, variation: v };
            }
        }
        if self.experiment_index.contains_key(&(tenant, experiment_id)) {
            AssignLookup::UnknownVariation
        } else {
            AssignLookup::UnknownExperiment
        }
    }

    /// The attribute (name id, value id) of an event attribute, if any condition
    /// mentions that name; a value no condition mentions gets `u32::MAX`.
    #[inline]
    pub fn attribute(&self, name: &str, value: &str) -> Option<(u32, u32)> {
        let k = *self.attr_name_index.get(name)?;
        Some((k, self.attr_value_index.get(value).copied().unwrap_or(u32::MAX)))
    }

    /// Whether experiments `a` and `b` are versions of one (tenant, id).
    #[inline]
    pub fn same_experiment(&self, a: u32, b: u32) -> bool {
        let (a, b) = (&self.experiments[a as usize], &self.experiments[b as usize]);
        a.id == b.id && a.tenant == b.tenant
    }

    /// Whether any condition uses attributes (if not, routing skips them).
    pub fn uses_attributes(&self) -> bool {
        !self.attr_name_index.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, "t.toml").unwrap()
    }

    #[test]
    fn a_reload_keeps_indices_stops_changes_and_adds() {
        let old = Catalog::build(
            &config("[[experiment]]\nid = 1\ntenant = \"a\"\nvariations = [11, 12]\n[[experiment]]\nid = 2\ntenant = \"a\"\nvariations = [21]\n"),
            Arc::new(Names::default()),
        )
        .unwrap();
        let new = config(
            "[[experiment]]\nid = 2\ntenant = \"a\"\nvariations = [21, 22]\n[[experiment]]\nid = 3\ntenant = \"b\"\nvariations = [31]\n",
        );
        let (cat, summary) = old.reload(&new).unwrap();
        assert_eq!(summary, "0 kept, 1 added, 1 changed, 1 stopped");
        let ids: Vec<(u64, bool, Option<u32>)> =
            cat.experiments.iter().map(|x| (x.id, x.active, x.supersedes)).collect();
        assert_eq!(ids, vec![(1, false, None), (2, false, None), (2, true, Some(1)), (3, true, None)]);
        // Variation indices of the old experiments are where they were.
        assert_eq!(cat.variations[0].id, 11);
        assert_eq!(cat.variations[2].id, 21);
        assert_eq!(cat.assignment(0, 1, 11), AssignLookup::UnknownExperiment, "stopped");
        assert_eq!(cat.assignment(0, 2, 21), AssignLookup::Known { experiment: 2, variation: 3 }, "the new version");
        assert!(cat.same_experiment(1, 2));
        // Reloading the same file again keeps everything.
        let (again, summary) = cat.reload(&new).unwrap();
        assert_eq!(summary, "2 kept, 0 added, 0 changed, 0 stopped");
        assert_eq!(again.experiments.len(), 4);
        // Engine settings need a restart.
        let mut other = new.clone();
        other.engine.allowed_lateness_ms += 1;
        assert_eq!(
            cat.reload(&other).unwrap_err().to_string(),
            "engine.allowed_lateness changed: engine settings need a restart"
        );
    }
}
