//! Generator profiles: the experiments (as a [`Config`]) plus the traffic shape.
//!
//! - `demo`: the embedded demo config (3 tenants, 5 experiments), light traffic.
//! - `peak`: modeled on a large e-commerce A/B platform: 8 tenants, 1,000
//!   experiments, ~20 assignments per session, 2–3 variations, 20 measurement
//!   points per tenant with Zipf-like popularity, 0–3 qualification conditions.
//!   Its config is derived from a fixed seed, so every `--seed` of events fits
//!   the same config (`expmon gen --profile peak --write-config FILE`).

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use std::fmt::Write;

use crate::config::{Condition, Config, EngineConfig, Experiment};

#[derive(Debug, Clone)]
pub struct ExpGen {
    pub id: u64,
    pub variations: Vec<i64>,
}

#[derive(Debug, Clone)]
pub struct TenantGen {
    pub name: String,
    pub weight: f64,
    /// (mp, popularity weight); the first is the usual landing page.
    pub mps: Vec<(String, f64)>,
    pub experiments: Vec<ExpGen>,
}

#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    pub config: Config,
    pub tenants: Vec<TenantGen>,
    /// Events per second of event time (replays).
    pub event_time_rate: f64,
    pub concurrent_sessions: usize,
    pub mean_session_events: f64,
    pub assign_probability: f64,
    /// Share of later events that repeat the session's assignments.
    pub assign_repeat_fraction: f64,
    pub conflict_fraction: f64,
    pub resume_fraction: f64,
    pub login_switch_fraction: f64,
    pub out_of_order_fraction: f64,
    pub late_fraction: f64,
    pub malformed_fraction: f64,
    pub unknown_tenant_fraction: f64,
    pub lateness_ms: i64,
    pub session_gap_ms: i64,
}

const PEAK_MPS: [&str; 20] = [
    "home_page",
    "search",
    "item_page",
    "cart",
    "checkout",
    "category",
    "account",
    "deals",
    "reviews",
    "recommendations",
    "wishlist",
    "orders",
    "store_locator",
    "login",
    "signup",
    "registry",
    "returns",
    "help",
    "pharmacy",
    "payment",
];

fn zipf(names: &[&str]) -> Vec<(String, f64)> {
    names.iter().enumerate().map(|(i, n)| (n.to_string(), 1.0 / (i as f64 + 1.0))).collect()
}

impl Profile {
    pub fn by_name(name: &str) -> Result<Profile, super::GenError> {
        match name {
            "demo" => Ok(Profile::demo()),
            "peak" => Ok(Profile::peak()),
            _ => Err(super::GenError::UnknownProfile(name.to_string())),
        }
    }

    fn from_config(name: &str, config: Config, weights: &[(&str, f64, &[&str])]) -> Profile {
        let tenants = weights
            .iter()
            .map(|(t, w, mps)| TenantGen {
                name: t.to_string(),
                weight: *w,
                mps: zipf(mps),
                experiments: config
                    .experiments
                    .iter()
                    .filter(|x| x.tenant == *t)
                    .map(|x| ExpGen { id: x.id, variations: x.variations.clone() })
                    .collect(),
            })
            .collect();
        let e = &config.engine;
        Profile {
            name: name.to_string(),
            lateness_ms: e.allowed_lateness_ms,
            session_gap_ms: e.session_gap_ms,
            tenants,
            config,
            event_time_rate: 1000.0,
            concurrent_sessions: 300,
            mean_session_events: 8.0,
            assign_probability: 0.8,
            assign_repeat_fraction: 0.25,
            conflict_fraction: 0.005,
            resume_fraction: 0.02,
            login_switch_fraction: 0.05,
            out_of_order_fraction: 0.02,
            late_fraction: 0.002,
            malformed_fraction: 0.001,
            unknown_tenant_fraction: 0.005,
        }
    }

    pub fn demo() -> Profile {
        let web: &[&str] = &["home_page", "item_page", "search", "cart", "checkout", "account"];
        let grocery: &[&str] = &["home_page", "search", "item_page", "cart", "checkout", "substitutions"];
        let app: &[&str] = &["home_page", "item_page", "search", "checkout"];
        Profile::from_config(
            "demo",
            Config::demo(),
            &[("uswm", 0.6, web), ("grocery", 0.25, grocery), ("app_ios", 0.15, app)],
        )
    }

    pub fn peak() -> Profile {
        let mut rng = Pcg64Mcg::seed_from_u64(20180503);
        let tenants = [
            ("uswm", 0.35),
            ("grocery", 0.15),
            ("app_ios", 0.14),
            ("app_android", 0.14),
            ("mx", 0.08),
            ("ca", 0.07),
            ("b2b", 0.04),
            ("pharmacy", 0.03),
        ];
        let mut experiments = Vec::new();
        let mut next_id = 1000u64;
        for (t, _) in tenants {
            for _ in 0..125 {
                next_id += 1 + rng.gen_range(0..3);
                let nv = rng.gen_range(2..=3);
                let variations: Vec<i64> = (1..=nv).map(|k| (next_id * 10 + k) as i64).collect();
                let mps = if rng.gen_bool(0.1) {
                    None
                } else {
                    let n = rng.gen_range(2..=5);
                    let mut picked: Vec<String> = Vec::new();
                    while picked.len() < n {
                        // Popular pages are tested more.
                        let i = (rng.gen::<f64>().powi(2) * PEAK_MPS.len() as f64) as usize;
                        let m = PEAK_MPS[i.min(PEAK_MPS.len() - 1)].to_string();
                        if !picked.contains(&m) {
                            picked.push(m);
                        }
                    }
                    Some(picked)
                };
                let nconds = [1, 1, 1, 2, 2, 3][rng.gen_range(0..6)];
                let mut qualify = Vec::new();
                for _ in 0..nconds {
                    let page = PEAK_MPS[(rng.gen::<f64>().powi(2) * 10.0) as usize].to_string();
                    qualify.push(match rng.gen_range(0..5) {
                        0 => Condition { device: Some("mobile".into()), ..Condition::default() },
                        1 => Condition { login: Some("in".into()), ..Condition::default() },
                        2 => Condition {
                            mp: Some("checkout".into()),
                            attrs: vec![(
                                "payment".into(),
                                ["paypal", "card"].choose(&mut rng).expect("non-empty").to_string(),
                            )],
                            ..Condition::default()
                        },
                        3 => Condition { mp: Some(page), device: Some("desktop".into()), ..Condition::default() },
                        _ => Condition { mp: Some(page), ..Condition::default() },
                    });
                }
                let weights = vec![1; variations.len()];
                experiments.push(Experiment { id: next_id, tenant: t.to_string(), variations, mps, qualify, weights });
            }
        }
        let config = Config { engine: EngineConfig::default(), experiments, kafka: Vec::new() };
        let weights: Vec<(&str, f64, &[&str])> = tenants.iter().map(|(t, w)| (*t, *w, &PEAK_MPS[..])).collect();
        let mut p = Profile::from_config("peak", config, &weights);
        p.event_time_rate = 60_000.0;
        p.concurrent_sessions = 100_000;
        p.assign_probability = 20.0 / 125.0;
        p
    }

    /// The profile's config as TOML that `Config::parse` accepts.
    pub fn config_toml(&self) -> String {
        let mut s = String::new();
        let e = &self.config.engine;
        let _ = writeln!(s, "# generated by `expmon gen --profile {} --write-config`", self.name);
        let _ = writeln!(
            s,
            "[engine]\ndc = {:?}\nallowed_lateness = \"{}ms\"\nsession_gap = \"{}ms\"\ntrigger = \"{}ms\"\nttl = \"{}s\"\n",
            e.dc, e.allowed_lateness_ms, e.session_gap_ms, e.trigger_ms, e.ttl_s
        );
        for x in &self.config.experiments {
            let _ =
                writeln!(s, "[[experiment]]\nid = {}\ntenant = {:?}\nvariations = {:?}", x.id, x.tenant, x.variations);
            if let Some(mps) = &x.mps {
                let _ = writeln!(s, "mps = {mps:?}");
            }
            let conds: Vec<String> = x
                .qualify
                .iter()
                .map(|c| {
                    let mut parts = Vec::new();
                    for (k, v) in [("mp", &c.mp), ("device", &c.device), ("login", &c.login)] {
                        if let Some(v) = v {
                            parts.push(format!("{k} = {v:?}"));
                        }
                    }
                    if !c.attrs.is_empty() {
                        let a: Vec<String> = c.attrs.iter().map(|(k, v)| format!("{k} = {v:?}")).collect();
                        parts.push(format!("attrs = {{ {} }}", a.join(", ")));
                    }
                    format!("{{ {} }}", parts.join(", "))
                })
                .collect();
            if !conds.is_empty() {
                let _ = writeln!(s, "qualify = [{}]", conds.join(", "));
            }
            s.push('\n');
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_config_round_trips_through_toml() {
        let p = Profile::peak();
        assert_eq!(p.config.experiments.len(), 1000);
        let back = Config::parse(&p.config_toml(), "peak.toml").unwrap();
        assert_eq!(back, p.config);
    }

    #[test]
    fn demo_matches_embedded_config() {
        let p = Profile::demo();
        assert_eq!(p.config, Config::demo());
        assert_eq!(p.tenants.iter().map(|t| t.experiments.len()).sum::<usize>(), p.config.experiments.len());
    }
}
