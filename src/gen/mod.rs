//! The load generator: seeded, reproducible event streams shaped like an
//! e-commerce A/B platform's logs (SPEC §1), as JSON Lines.
//!
//! A [`Generator`] keeps a pool of concurrent simulated sessions on an
//! event-time clock. Each step advances the clock and emits the next event of a
//! random pooled session; finished sessions are replaced, and a few go dormant
//! to resume after a long gap (a new session under the same id). Events arrive
//! in clock order, but ~2% carry a time up to half the lateness earlier (out of
//! order, kept), ~0.2% a time three to four lateness periods earlier (late,
//! dropped by the engine), and ~0.1% are malformed lines (some of them a
//! checkout whose `value` is a float, a string or out of range).
//!
//! Revenue: events at purchase-like mps ([`is_purchase_mp`]: `checkout`,
//! `payment`) carry a `value`, the order's amount in cents, log-normal around
//! $45 (a few orders in the thousands, never over the 10,000,000 bound); ~5%
//! are refunds, carried as negative values.
//!
//! Timing: replays run on a simulated clock from a fixed start; with a rate the
//! generator is open-loop on the wall clock ([`Pacer`]) and timestamps are now.

pub mod cli;
mod kafka;
mod profile;
mod source;

pub use profile::{Profile, TenantGen};
pub use source::{GenSource, Pacer};

/// Why the generator (a `gen:` source or `expmon gen`) cannot start or stops.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    #[error("unknown generator profile {0:?}: expected demo or peak")]
    UnknownProfile(String),
    /// The options of a `gen:` source (`spec`: the whole source).
    #[error("bad generator source {spec:?}: {error}")]
    BadSource { spec: String, error: crate::address::OptionError },
    /// `shown`: the `--out` value with its secrets hidden.
    #[error("bad --out {0:?}: expected file:PATH, - or kafka://HOST:PORT/TOPIC")]
    BadOut(String),
    #[error(transparent)]
    Kafka(#[from] crate::kafka::KafkaError),
    #[error("sending to {topic}: {error}")]
    Send { topic: String, error: rdkafka::error::KafkaError },
    #[error("flushing to {topic}: {error}")]
    Flush { topic: String, error: rdkafka::error::KafkaError },
    /// `first`: the first delivery error Kafka reported.
    #[error("{failed} events were not delivered to {topic}: {first}")]
    Undelivered { failed: u64, topic: String, first: String },
    /// `what`: "creating PATH", "writing PATH", "opening PATH".
    #[error("{what}: {error}")]
    File { what: String, error: std::io::Error },
    /// Writing the lines out (to stdout or the file) or reading a replay.
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

use rand::{Rng, SeedableRng};
use rand_pcg::Pcg64Mcg;
use std::collections::VecDeque;
use std::fmt::Write;

/// Simulated-clock start for replays: 2026-01-01T00:00:00Z.
pub const REPLAY_START_MS: i64 = 1_767_225_600_000;

#[derive(Debug, Clone)]
struct SimSession {
    id: u64,
    tenant: usize,
    device: &'static str,
    login: Option<&'static str>,
    /// Assignments as `(experiment id, variation id)`.
    assign: Vec<(u64, i64)>,
    remaining: u32,
    emitted: u32,
    /// Conflict: one later event carries this variation for assign[0].
    conflict: Option<i64>,
}

pub struct Generator {
    profile: Profile,
    rng: Pcg64Mcg,
    clock_ms: f64,
    step_ms: f64,
    pool: Vec<SimSession>,
    /// Sessions waiting out a long gap, by wake time (pushed in time order).
    dormant: VecDeque<(i64, SimSession)>,
    next_session: u64,
    seed: u64,
    line: String,
}

impl Generator {
    /// A generator on a simulated clock starting at `start_ms`, at the
    /// profile's event-time rate.
    pub fn new(profile: Profile, seed: u64, start_ms: i64) -> Generator {
        let step_ms = 1000.0 / profile.event_time_rate;
        let mut g = Generator {
            rng: Pcg64Mcg::seed_from_u64(seed ^ 0x9E37_79B9_7F4A_7C15),
            clock_ms: start_ms as f64,
            step_ms,
            pool: Vec::new(),
            dormant: VecDeque::new(),
            next_session: 0,
            seed,
            line: String::with_capacity(512),
            profile,
        };
        for _ in 0..g.profile.concurrent_sessions {
            let s = g.new_session();
            g.pool.push(s);
        }
        g
    }

    /// Sets the event-time clock (live generation stamps events with now).
    pub fn set_clock(&mut self, now_ms: i64) {
        self.clock_ms = now_ms as f64;
    }

    fn new_session(&mut self) -> SimSession {
        let p = &self.profile;
        let tenant = pick_weighted(&mut self.rng, p.tenants.iter().map(|t| t.weight));
        let t = &p.tenants[tenant];
        let device = ["desktop", "mobile", "tablet"][pick_weighted(&mut self.rng, [0.45, 0.45, 0.10].into_iter())];
        let login = [Some("in"), Some("out"), None][pick_weighted(&mut self.rng, [0.3, 0.6, 0.1].into_iter())];
        let mut assign = Vec::new();
        for x in &t.experiments {
            if self.rng.gen_bool(p.assign_probability) {
                let v = x.variations[self.rng.gen_range(0..x.variations.len())];
                assign.push((x.id, v));
            }
        }
        // Geometric length with the profile's mean.
        let q = 1.0 / p.mean_session_events;
        let mut remaining = 1;
        while !self.rng.gen_bool(q) && remaining < 200 {
            remaining += 1;
        }
        let conflict = (!assign.is_empty() && self.rng.gen_bool(p.conflict_fraction)).then(|| {
            let x = t.experiments.iter().find(|x| x.id == assign[0].0).expect("assigned experiment");
            x.variations.iter().copied().find(|&v| v != assign[0].1).unwrap_or(assign[0].1)
        });
        self.next_session += 1;
        SimSession { id: self.next_session, tenant, device, login, assign, remaining, emitted: 0, conflict }
    }

    /// Advances the clock one step and appends the next line (without
    /// newline) to `out`.
    pub fn next_line(&mut self, out: &mut Vec<u8>) {
        self.clock_ms += self.step_ms;
        let now = self.clock_ms as i64;
        // Wake a dormant session whose long gap is over.
        if self.dormant.front().is_some_and(|(wake, _)| *wake <= now) {
            let (_, s) = self.dormant.pop_front().expect("front exists");
            let slot = self.rng.gen_range(0..self.pool.len());
            self.pool[slot] = s;
        }
        let slot = self.rng.gen_range(0..self.pool.len());
        let (malformed, unknown_tenant) = (self.profile.malformed_fraction, self.profile.unknown_tenant_fraction);
        let (late, out_of_order) = (self.profile.late_fraction, self.profile.out_of_order_fraction);
        let lateness = self.profile.lateness_ms as f64;
        let r: f64 = self.rng.gen();
        self.line.clear();
        if r < malformed {
            out.extend_from_slice(&self.malformed(now));
            return;
        }
        if r < malformed + unknown_tenant {
            let _ = write!(
                self.line,
                r#"{{"ts":{now},"tenant":"unknown_site","session":"u-{:x}","mp":"home_page"}}"#,
                self.rng.gen::<u32>()
            );
        } else {
            // An event arriving now may carry an earlier time: within half the
            // lateness (out of order, kept) or beyond three times it (late,
            // dropped), never near the bound (SPEC §4 test data).
            let d: f64 = self.rng.gen();
            let delay = if d < late {
                (lateness * self.rng.gen_range(3.0..4.0)) as i64
            } else if d < late + out_of_order {
                (lateness * self.rng.gen_range(0.0..0.45)) as i64
            } else {
                0
            };
            self.event(slot, now - delay, now);
        }
        out.extend_from_slice(self.line.as_bytes());
    }

    /// Writes the next event of pooled session `slot`, stamped `ts`, to `line`.
    fn event(&mut self, slot: usize, ts: i64, now: i64) {
        let p = &self.profile;
        let s = &mut self.pool[slot];
        let t = &p.tenants[s.tenant];
        let mp = if s.emitted == 0 && self.rng.gen_bool(0.6) {
            &t.mps[0].0
        } else {
            &t.mps[pick_weighted(&mut self.rng, t.mps.iter().map(|m| m.1))].0
        };
        if s.login == Some("out") && s.emitted > 0 && self.rng.gen_bool(p.login_switch_fraction) {
            s.login = Some("in");
        }
        let line = &mut self.line;
        let _ = write!(
            line,
            r#"{{"ts":{ts},"tenant":"{}","session":"{:x}-{:x}","mp":"{mp}","device":"{}""#,
            t.name, self.seed, s.id, s.device
        );
        if let Some(l) = s.login {
            let _ = write!(line, r#","login":"{l}""#);
        }
        let carry = s.emitted == 0 || self.rng.gen_bool(p.assign_repeat_fraction);
        if carry && !s.assign.is_empty() {
            line.push_str(r#","assign":{"#);
            for (i, (x, v)) in s.assign.iter().enumerate() {
                let v = match (i, s.conflict) {
                    (0, Some(c)) if s.emitted > 0 => c,
                    _ => *v,
                };
                let _ = write!(line, "{}\"{x}\":{v}", if i > 0 { "," } else { "" });
            }
            if self.rng.gen_bool(0.01) {
                line.push_str(r#","999999":1"#); // an experiment nobody configured
            }
            line.push('}');
        }
        if mp == "checkout" {
            let pay = ["paypal", "card", "giftcard"][pick_weighted(&mut self.rng, [0.3, 0.6, 0.1].into_iter())];
            let _ = write!(line, r#","attrs":{{"payment":"{pay}"}}"#);
        }
        if is_purchase_mp(mp) {
            let _ = write!(line, r#","value":{}"#, order_value_cents(&mut self.rng));
        }
        line.push('}');
        s.emitted += 1;
        s.remaining -= 1;
        if s.remaining == 0 {
            let resume = self.rng.gen_bool(p.resume_fraction);
            let fresh = self.new_session();
            let old = std::mem::replace(&mut self.pool[slot], fresh);
            if resume {
                let p = &self.profile;
                let wake = now + 2 * p.session_gap_ms + p.lateness_ms + 5 * 60_000;
                let mut again = old;
                again.remaining = 1 + self.rng.gen_range(0..4);
                again.emitted = 1; // betas count again, assignments repeat with prob.
                self.dormant.push_back((wake, again));
            }
        }
    }

    fn malformed(&mut self, now: i64) -> Vec<u8> {
        let kinds = [
            format!(r#"{{"ts":{now},"tenant":"uswm","session":"x""#),
            format!(r#"{{"tenant":"uswm","session":"x","mp":"home_page","ts":"{now}"}}"#),
            r#"{"tenant":"uswm","session":"x","mp":"home_page"}"#.to_string(),
            format!(r#"{{"ts":{now},"tenant":"uswm","session":"x","mp":"home_page","assign":{{"12a":1}}}}"#),
            format!(r#"{{"ts":{now},"tenant":"uswm","session":"x","mp":"home_page","device":"{}"}}"#, "d".repeat(80)),
            // Values that must be rejected (`bad_value`): not integers, or out of range.
            format!(r#"{{"ts":{now},"tenant":"uswm","session":"x","mp":"checkout","value":12.5}}"#),
            format!(r#"{{"ts":{now},"tenant":"uswm","session":"x","mp":"checkout","value":"12"}}"#),
            format!(r#"{{"ts":{now},"tenant":"uswm","session":"x","mp":"checkout","value":20000000}}"#),
            "[1,2,3]".to_string(),
            "GET /index.html HTTP/1.1".to_string(),
        ];
        let k = self.rng.gen_range(0..kinds.len() + 1);
        match kinds.get(k) {
            Some(line) => line.clone().into_bytes(),
            None => {
                let mut b = format!(r#"{{"ts":{now},"tenant":"uswm","session":""#).into_bytes();
                b.extend_from_slice(b"\xff\xfe\",\"mp\":\"home_page\"}");
                b
            }
        }
    }
}

/// Whether events at `mp` are purchases that carry an order value.
pub fn is_purchase_mp(mp: &str) -> bool {
    matches!(mp, "checkout" | "payment")
}

/// An order's value in cents: log-normal (median $45, σ 0.9), a refund (its
/// negative) 5% of the time; always within abs ≤ 10,000,000 (SPEC §1).
fn order_value_cents<R: Rng>(rng: &mut R) -> i64 {
    // Box–Muller: a standard normal from two uniforms.
    let (u1, u2): (f64, f64) = (rng.gen_range(f64::EPSILON..1.0), rng.gen());
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    let cents = (4500.0 * (0.9 * z).exp()).round().clamp(1.0, 10_000_000.0) as i64;
    if rng.gen_bool(0.05) {
        -cents
    } else {
        cents
    }
}

fn pick_weighted<R: Rng>(rng: &mut R, weights: impl Iterator<Item = f64> + Clone) -> usize {
    let total: f64 = weights.clone().sum();
    let mut x = rng.gen::<f64>() * total;
    let mut last = 0;
    for (i, w) in weights.enumerate() {
        if x < w {
            return i;
        }
        x -= w;
        last = i;
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::{parse_event, ParseScratch, Reject, MAX_VALUE};

    #[test]
    fn purchases_carry_order_values_with_some_refunds_and_a_few_bad_values() {
        let mut g = Generator::new(Profile::demo(), 7, REPLAY_START_MS);
        let (mut purchases, mut refunds, mut bad_values, mut valued_elsewhere) = (0, 0, 0, 0);
        let mut scratch = ParseScratch::default();
        let mut line = Vec::new();
        for _ in 0..100_000 {
            line.clear();
            g.next_line(&mut line);
            match parse_event(&line, None, &mut scratch) {
                Ok(e) if is_purchase_mp(&e.mp) && e.tenant != "unknown_site" => {
                    assert!(e.value != 0 && (e.value as i64).abs() <= MAX_VALUE);
                    purchases += 1;
                    refunds += (e.value < 0) as u32;
                }
                Ok(e) => valued_elsewhere += (e.value != 0) as u32,
                Err(Reject::BadValue) => bad_values += 1,
                Err(_) => {}
            }
        }
        assert!(purchases > 1_000, "{purchases}");
        let share = refunds as f64 / purchases as f64;
        assert!((0.03..0.07).contains(&share), "refunds {share}");
        assert!(bad_values > 0);
        assert_eq!(valued_elsewhere, 0, "only purchases carry values");
    }
}
