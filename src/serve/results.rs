//! The engine's recent results in memory, for the results page: per
//! experiment and minute, per variation, the assigned and factor-matched
//! sessions and each measurement point's factor-matched "beta" visits,
//! `value.fm` and `value_sq.fm`, summed over devices and logins. Fed by the
//! writer from the sums the shards made of each flush's deltas (one lock per flush, never per
//! event); minutes older than [`KEEP_MINUTES`] before the newest are folded
//! into one sum of everything before them (so the lift figures stay
//! cumulative since the experiment started in this process) and dropped.
//!
//! The lift figures (`stats` in the JSON) are those of experiment health
//! ([`crate::stats::compare_all`] of each treatment against the control, per
//! mp, for conversion and revenue per qualified session), at the totals and,
//! for the plot of the interval narrowing, at the end of every kept minute
//! (event time: the sums of all minutes up to it).

use std::collections::BTreeMap;
use std::sync::Arc;

use crate::aggregate::{Delta, DeltaSums, MINUTE_MS, SEEN_BETA, SEEN_VALUE, SEEN_VALUE_SQ};
use crate::config::Catalog;
use crate::health::{lift_arms, LIFT_METRICS};
use crate::stats::{compare_all, Comparison, SequentialConfig, Verdict};

/// Minutes of history kept for the page.
pub const KEEP_MINUTES: i64 = 120;

/// One experiment's figures in one minute, by variation slot.
#[derive(Debug, Default, Clone)]
struct Minute {
    assigned: Vec<i64>,
    fm: Vec<i64>,
    /// Factor-matched beta visits per mp id.
    visits: BTreeMap<u16, Vec<i64>>,
    /// `value.fm` and `value_sq.fm` per mp id.
    values: BTreeMap<u16, Vec<i128>>,
    values_sq: BTreeMap<u16, Vec<i128>>,
}

impl Minute {
    fn new(n: usize) -> Minute {
        Minute { assigned: vec![0; n], fm: vec![0; n], ..Minute::default() }
    }

    /// Adds another minute's figures (same variations).
    fn add(&mut self, o: &Minute) {
        let n = self.fm.len();
        for s in 0..n {
            self.assigned[s] += o.assigned[s];
            self.fm[s] += o.fm[s];
        }
        for (&mp, v) in &o.visits {
            let mine = self.visits.entry(mp).or_insert_with(|| vec![0; n]);
            mine.iter_mut().zip(v).for_each(|(a, b)| *a += b);
        }
        for (mine, theirs) in [(&mut self.values, &o.values), (&mut self.values_sq, &o.values_sq)] {
            for (&mp, v) in theirs {
                let mine = mine.entry(mp).or_insert_with(|| vec![0; n]);
                mine.iter_mut().zip(v).for_each(|(a, b)| *a += b);
            }
        }
    }

    /// The conversion and revenue comparisons of one mp.
    fn compare(&self, mp: u16, cfg: &SequentialConfig) -> [Vec<Comparison>; 2] {
        let n = self.fm.len();
        let zeros = vec![0; n];
        let zeros128 = vec![0; n];
        let beta = self.visits.get(&mp).unwrap_or(&zeros);
        let value = self.values.get(&mp).unwrap_or(&zeros128);
        let value_sq = self.values_sq.get(&mp).unwrap_or(&zeros128);
        lift_arms(&self.fm, beta, value, value_sq).map(|arms| compare_all(&arms, cfg))
    }
}

/// A comparison for the page: verdict, relative lift and its interval (an
/// unbounded end is `null`).
fn lift_json(c: &Comparison) -> serde_json::Value {
    let verdict = match c.verdict {
        Verdict::NotEnoughData => "not enough data",
        Verdict::NoDetectableDifference => "no detectable difference",
        Verdict::Better => "better",
        Verdict::Worse => "worse",
    };
    let finite = |x: f64| x.is_finite().then_some(x);
    match &c.lift {
        None => serde_json::json!({ "verdict": verdict }),
        Some(l) => serde_json::json!({
            "verdict": verdict,
            "estimate": l.relative.and_then(finite),
            "low": finite(l.relative_ci.low),
            "high": finite(l.relative_ci.high),
        }),
    }
}

impl std::fmt::Debug for Results {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Results({} experiments)", self.by_experiment.len())
    }
}

pub struct Results {
    catalog: Arc<Catalog>,
    by_experiment: Vec<BTreeMap<i64, Minute>>,
    /// Per experiment, the sum of the minutes trimmed off.
    before: Vec<Option<Minute>>,
    newest: i64,
}

impl Results {
    pub fn new(catalog: Arc<Catalog>) -> Results {
        let by_experiment = vec![BTreeMap::new(); catalog.experiments.len()];
        let before = vec![None; catalog.experiments.len()];
        Results { catalog, by_experiment, before, newest: i64::MIN }
    }

    /// Uses a reloaded catalog (indices only grow).
    pub fn set_catalog(&mut self, catalog: Arc<Catalog>) {
        self.by_experiment.resize(catalog.experiments.len(), BTreeMap::new());
        self.before.resize(catalog.experiments.len(), None);
        self.catalog = catalog;
    }

    /// Adds one flush's deltas.
    pub fn observe(&mut self, deltas: &[Delta]) {
        self.observe_sums(&DeltaSums::from_deltas(deltas));
    }

    /// Adds one shard report's sums of its deltas.
    pub fn observe_sums(&mut self, sums: &DeltaSums) {
        let catalog = &self.catalog;
        let at = |v: u32| {
            let info = &catalog.variations[v as usize];
            (
                info.experiment as usize,
                info.slot as usize,
                catalog.experiments[info.experiment as usize].variations.len(),
            )
        };
        for s in &sums.sessions {
            let (x, slot, n) = at(s.variation);
            let m = self.by_experiment[x].entry(s.minute).or_insert_with(|| Minute::new(n));
            m.assigned[slot] += s.assigned;
            m.fm[slot] += s.fm;
            self.newest = self.newest.max(s.minute);
        }
        for s in &sums.visits {
            let (x, slot, n) = at(s.variation);
            let m = self.by_experiment[x].entry(s.minute).or_insert_with(|| Minute::new(n));
            if s.seen & SEEN_BETA != 0 {
                m.visits.entry(s.mp).or_insert_with(|| vec![0; n])[slot] += s.beta;
            }
            if s.seen & SEEN_VALUE != 0 {
                m.values.entry(s.mp).or_insert_with(|| vec![0; n])[slot] += s.value;
            }
            if s.seen & SEEN_VALUE_SQ != 0 {
                m.values_sq.entry(s.mp).or_insert_with(|| vec![0; n])[slot] += s.value_sq;
            }
            self.newest = self.newest.max(s.minute);
        }
    }

    /// Folds minutes too old to show into the sum before them. A late
    /// correction to such a minute lands on a new entry of its own, which the
    /// next trim folds in too.
    pub fn trim(&mut self) {
        let keep_from = self.newest.saturating_sub(KEEP_MINUTES * MINUTE_MS);
        for (minutes, before) in self.by_experiment.iter_mut().zip(self.before.iter_mut()) {
            let kept = minutes.split_off(&keep_from);
            for old in std::mem::replace(minutes, kept).into_values() {
                match before {
                    Some(b) => b.add(&old),
                    None => *before = Some(old),
                }
            }
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
        let before = self.before[x].iter();
        let mut mps: Vec<u16> = minutes.values().flat_map(|m| m.visits.keys().copied()).collect();
        mps.sort_unstable();
        mps.dedup();
        let mut lift_mps: Vec<u16> = (minutes.values().chain(before.clone()))
            .flat_map(|m| m.visits.keys().chain(m.values.keys()).copied())
            .collect();
        lift_mps.sort_unstable();
        lift_mps.dedup();
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
        // The lift figures at the end of each kept minute, and at the totals.
        let cfg = SequentialConfig::default();
        let mut running = self.before[x].clone().unwrap_or_else(|| Minute::new(variations.len()));
        let mut history: Vec<(i64, Vec<[Vec<Comparison>; 2]>)> = Vec::new();
        for (&t, m) in minutes {
            running.add(m);
            history.push((t, lift_mps.iter().map(|&mp| running.compare(mp, &cfg)).collect()));
        }
        let mut per_mp = serde_json::Map::new();
        for (k, &mp) in lift_mps.iter().enumerate() {
            let now = running.compare(mp, &cfg);
            let n = variations.len();
            let zeros = vec![0; n];
            let zeros128 = vec![0; n];
            let beta = running.visits.get(&mp).unwrap_or(&zeros);
            let value = running.values.get(&mp).unwrap_or(&zeros128);
            let value_sq = running.values_sq.get(&mp).unwrap_or(&zeros128);
            let arms = lift_arms(&running.fm, beta, value, value_sq);
            let mut metrics = serde_json::Map::new();
            for (j, metric) in LIFT_METRICS.iter().enumerate() {
                let means: Vec<Option<f64>> = arms[j].iter().map(|a| (a.n > 0).then(|| a.mean())).collect();
                let lifts: Vec<serde_json::Value> =
                    std::iter::once(serde_json::Value::Null).chain(now[j].iter().map(lift_json)).collect();
                let bounds: Vec<serde_json::Value> = history
                    .iter()
                    .map(|(t, h)| {
                        let per_variation: Vec<serde_json::Value> = std::iter::once(serde_json::Value::Null)
                            .chain(h[k][j].iter().map(|c| match &c.lift {
                                Some(l) => serde_json::json!([
                                    l.relative_ci.low.is_finite().then_some(l.relative_ci.low),
                                    l.relative,
                                    l.relative_ci.high.is_finite().then_some(l.relative_ci.high)
                                ]),
                                None => serde_json::Value::Null,
                            }))
                            .collect();
                        serde_json::json!([t, per_variation])
                    })
                    .collect();
                metrics
                    .insert(metric.to_string(), serde_json::json!({ "mean": means, "lift": lifts, "history": bounds }));
            }
            per_mp.insert(names.mp.get(mp).to_string(), metrics.into());
        }
        let json = serde_json::json!({
            "tenant": tenant,
            "id": id,
            "variations": variations,
            "assigned": series(&|m: &Minute| m.assigned.clone()),
            "fm": series(&|m: &Minute| m.fm.clone()),
            "visits_fm_beta": visits,
            "stats": { "sessions": running.fm, "mps": per_mp },
        });
        Some(json.to_string())
    }
}

/// Shared between the writer (which feeds it) and the HTTP server.
pub type SharedResults = Arc<std::sync::Mutex<Results>>;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{MetricKind, SeriesKey, NO_MP};
    use crate::config::Config;

    /// Minutes trimmed off the curves still count in the lift figures, and a
    /// retraction (a negative delta) takes its sessions back out.
    #[test]
    fn trimmed_minutes_stay_in_the_cumulative_lift_sums() {
        let config = Config::parse(crate::config::DEMO_CONFIG, "demo.toml").unwrap();
        let catalog = Arc::new(Catalog::build(&config, Arc::new(crate::names::Names::default())).unwrap());
        let x = catalog.experiments.iter().position(|e| e.id == 123).unwrap();
        let v = catalog.experiments[x].variations.clone();
        let mut r = Results::new(catalog);
        let d = |slot: usize, minute: i64, delta: i64| Delta {
            key: SeriesKey::new(MetricKind::SessionFm, v[slot], NO_MP, 0, 0),
            minute: minute * MINUTE_MS,
            delta,
        };
        r.observe(&[d(0, 0, 7), d(1, 0, 5)]);
        r.observe(&[d(0, KEEP_MINUTES + 5, 3), d(1, KEEP_MINUTES + 5, 4), d(1, KEEP_MINUTES + 5, -1)]);
        r.trim();
        let tenant = r.catalog.tenants[r.catalog.experiments[x].tenant as usize].clone();
        let json: serde_json::Value = serde_json::from_str(&r.experiment_json(&tenant, 123).unwrap()).unwrap();
        assert_eq!(json["fm"].as_array().unwrap().len(), 1, "minute 0 is off the curves");
        assert_eq!(json["stats"]["sessions"], serde_json::json!([10, 8]), "but in the sums");
    }
}
