//! The engine's recent results in memory, for the results page: per
//! experiment and minute, per variation, the assigned and factor-matched
//! sessions and each measurement point's factor-matched "beta" visits, summed
//! over devices and logins. Fed by the writer from the deltas of each flush
//! (one lock per flush, never per event); minutes older than [`KEEP_MINUTES`]
//! before the newest are dropped.

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::aggregate::{Delta, MetricKind, MINUTE_MS};
use crate::config::Catalog;

/// Minutes of history kept for the page.
pub const KEEP_MINUTES: i64 = 120;

/// One experiment's figures in one minute, by variation slot.
#[derive(Debug, Default, Clone)]
struct Minute {
    assigned: Vec<i64>,
    fm: Vec<i64>,
    /// Factor-matched beta visits per mp id.
    visits: BTreeMap<u16, Vec<i64>>,
}

impl std::fmt::Debug for Results {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Results({} experiments)", self.by_experiment.len())
    }
}

pub struct Results {
    catalog: Arc<Catalog>,
    by_experiment: Vec<BTreeMap<i64, Minute>>,
    newest: i64,
}

impl Results {
    pub fn new(catalog: Arc<Catalog>) -> Results {
        let by_experiment = vec![BTreeMap::new(); catalog.experiments.len()];
        Results { catalog, by_experiment, newest: i64::MIN }
    }

    /// Uses a reloaded catalog (indices only grow).
    pub fn set_catalog(&mut self, catalog: Arc<Catalog>) {
        self.by_experiment.resize(catalog.experiments.len(), BTreeMap::new());
        self.catalog = catalog;
    }

    /// Adds one flush's deltas.
    pub fn observe(&mut self, deltas: &[Delta]) {
        for d in deltas {
            let kind = d.key.kind();
            if !matches!(kind, MetricKind::SessionAssigned | MetricKind::SessionFm | MetricKind::VisitFmBeta) {
                continue;
            }
            let v = d.key.variation() as usize;
            let x = self.catalog.variations[v].experiment as usize;
            let n = self.catalog.experiments[x].variations.len();
            let slot = self.catalog.variations[v].slot as usize;
            let m = self.by_experiment[x].entry(d.minute).or_insert_with(|| Minute {
                assigned: vec![0; n],
                fm: vec![0; n],
                visits: BTreeMap::new(),
            });
            match kind {
                MetricKind::SessionAssigned => m.assigned[slot] += d.delta,
                MetricKind::SessionFm => m.fm[slot] += d.delta,
                _ => m.visits.entry(d.key.mp()).or_insert_with(|| vec![0; n])[slot] += d.delta,
            }
            self.newest = self.newest.max(d.minute);
        }
    }

    /// Forgets minutes too old to show.
    pub fn trim(&mut self) {
        let keep_from = self.newest.saturating_sub(KEEP_MINUTES * MINUTE_MS);
        for m in self.by_experiment.iter_mut() {
            m.retain(|&minute, _| minute >= keep_from);
        }
    }

    /// `[{"tenant":…,"id":…,"variations":[…],"minutes":N}, …]`
    pub fn experiments_json(&self) -> String {
        let list: Vec<serde_json::Value> = self
            .catalog
            .experiments
            .iter()
            .enumerate()
            .map(|(x, e)| {
                serde_json::json!({
                    "tenant": self.catalog.tenants[e.tenant as usize],
                    "id": e.id,
                    "variations": e.variations.iter().map(|&v| self.catalog.variations[v as usize].id).collect::<Vec<_>>(),
                    "minutes": self.by_experiment[x].len(),
                    "active": e.active,
                })
            })
            .collect();
        serde_json::Value::Array(list).to_string()
    }

    /// One experiment's curves, or `None` if there is no such experiment.
    pub fn experiment_json(&self, tenant: &str, id: u64) -> Option<String> {
        let t = self.catalog.tenant(tenant)?;
        // The newest version of the experiment.
        let x = self.catalog.experiments.iter().rposition(|e| e.tenant == t && e.id == id)?;
        let e = &self.catalog.experiments[x];
        let variations: Vec<i64> = e.variations.iter().map(|&v| self.catalog.variations[v as usize].id).collect();
        let minutes = &self.by_experiment[x];
        let mut mps: Vec<u16> = minutes.values().flat_map(|m| m.visits.keys().copied()).collect();
        mps.sort_unstable();
        mps.dedup();
        let names = &self.catalog.names;
        let series = |f: &dyn Fn(&Minute) -> Vec<i64>| -> Vec<serde_json::Value> {
            minutes.iter().map(|(&t, m)| serde_json::json!([t, f(m)])).collect()
        };
        let mut visits = serde_json::Map::new();
        for &mp in &mps {
            let name = names.mp.get(mp).to_string();
            let n = variations.len();
            visits.insert(name, series(&|m: &Minute| m.visits.get(&mp).cloned().unwrap_or_else(|| vec![0; n])).into());
        }
        let json = serde_json::json!({
            "tenant": tenant,
            "id": id,
            "variations": variations,
            "assigned": series(&|m: &Minute| m.assigned.clone()),
            "fm": series(&|m: &Minute| m.fm.clone()),
            "visits_fm_beta": visits,
        });
        Some(json.to_string())
    }
}

/// Shared between the writer (which feeds it) and the HTTP server.
pub type SharedResults = Arc<std::sync::Mutex<Results>>;
