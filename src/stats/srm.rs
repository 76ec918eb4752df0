//! Sequential sample-ratio-mismatch (SRM) test over counts per variation.
//!
//! Lindon & Malek, "Anytime-valid inference for multinomial count data"
//! (NeurIPS 2022; Optimizely's `ssrm-test`). Under H0 each session lands in
//! variation i with the configured probability θᵢ (the weights, normalised).
//! The alternative is a Dirichlet(α) mixture over the assignment
//! probabilities, here α = k·θ (centred on H0, concentration k; savvi's
//! default k = 100). With counts x (total n) the mixture likelihood ratio is
//!
//! ```text
//! BF(x) = Γ(Σα)/Γ(Σα + n) · Πᵢ Γ(αᵢ + xᵢ)/Γ(αᵢ) / Πᵢ θᵢ^xᵢ
//! ```
//!
//! (the multinomial coefficient cancels). It depends on the counts only, not
//! on their order, and under H0 it is a nonnegative martingale with mean 1 in
//! the number of sessions, so by Ville's inequality P(ever BF ≥ 1/α) ≤ α:
//! p = min(1, 1/BF), kept as a running minimum over looks
//! ([`SrmMonitor`]), is an anytime-valid p-value — it never increases, and the
//! chance that it ever drops to α or below under a correct split is ≤ α.
//! This is exact (no large-sample approximation), given assumption 1 of
//! [`super::sequence`]: sessions assigned independently.
//!
//! Counts are totals (e.g. `session.assigned.v`); a retraction lowering a
//! count changes the BF, but the monitor's p-value stays at its minimum.

use super::StatsError;
use serde::Serialize;

/// The Dirichlet mixture of the alternative: α = concentration · θ.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct SrmPrior {
    pub concentration: f64,
}

impl Default for SrmPrior {
    fn default() -> Self {
        SrmPrior { concentration: 100.0 }
    }
}

/// ln BF of the counts against the configured weights (any positive
/// numbers; normalised here).
pub fn srm_log_bayes_factor(counts: &[u64], weights: &[f64], prior: SrmPrior) -> Result<f64, StatsError> {
    let theta = normalised(weights)?;
    if counts.len() != theta.len() {
        return Err(StatsError::LengthMismatch { counts: counts.len(), weights: weights.len() });
    }
    let k = prior.concentration;
    if !(k.is_finite() && k > 0.0) {
        return Err(StatsError::BadConcentration(k));
    }
    let n: f64 = counts.iter().map(|&x| x as f64).sum();
    let mut ln_bf = ln_gamma(k) - ln_gamma(k + n);
    for (&x, &t) in counts.iter().zip(&theta) {
        let (x, a) = (x as f64, k * t);
        ln_bf += ln_gamma(a + x) - ln_gamma(a) - x * t.ln();
    }
    Ok(ln_bf)
}

/// min(1, 1/BF) at these counts alone (not yet the running minimum).
pub fn srm_p_value(counts: &[u64], weights: &[f64], prior: SrmPrior) -> Result<f64, StatsError> {
    Ok((-srm_log_bayes_factor(counts, weights, prior)?).exp().min(1.0))
}

/// The anytime-valid p-value across looks: the running minimum of
/// [`srm_p_value`]. Owned by whoever looks (one per experiment).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SrmMonitor {
    weights: Vec<f64>,
    prior: SrmPrior,
    p_value: f64,
}

impl SrmMonitor {
    pub fn new(weights: &[f64], prior: SrmPrior) -> Result<Self, StatsError> {
        normalised(weights)?;
        let k = prior.concentration;
        if !(k.is_finite() && k > 0.0) {
            return Err(StatsError::BadConcentration(k));
        }
        Ok(SrmMonitor { weights: weights.to_vec(), prior, p_value: 1.0 })
    }

    /// Take the current counts; returns the p-value so far (non-increasing).
    pub fn observe(&mut self, counts: &[u64]) -> Result<f64, StatsError> {
        let p = srm_p_value(counts, &self.weights, self.prior)?;
        self.p_value = self.p_value.min(p);
        Ok(self.p_value)
    }

    pub fn p_value(&self) -> f64 {
        self.p_value
    }

    /// True once the p-value has reached `alpha` (e.g. 0.001).
    pub fn alarmed(&self, alpha: f64) -> bool {
        self.p_value <= alpha
    }
}

fn normalised(weights: &[f64]) -> Result<Vec<f64>, StatsError> {
    if weights.len() < 2 {
        return Err(StatsError::TooFewVariations(weights.len()));
    }
    if let Some((index, &weight)) = weights.iter().enumerate().find(|(_, w)| !(w.is_finite() && **w > 0.0)) {
        return Err(StatsError::BadWeight { index, weight });
    }
    let total: f64 = weights.iter().sum();
    Ok(weights.iter().map(|w| w / total).collect())
}

/// ln Γ(x) for x > 0: Lanczos (g = 7, 9 terms, relative error ~1e-15),
/// reflection below 0.5. (std's `ln_gamma` is not stable Rust.)
pub(crate) fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Γ(x)Γ(1−x) = π / sin(πx)
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut a = C[0];
    let t = x + G + 0.5;
    for (i, &c) in C.iter().enumerate().skip(1) {
        a += c / (x + i as f64);
    }
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + a.ln()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_pcg::Pcg64Mcg;

    #[test]
    fn ln_gamma_matches_python() {
        // python3 -c "import math; print([repr(math.lgamma(x)) for x in (0.1, 0.5, 1, 2.5, 10, 123.456, 1e6 + 0.5)])"
        let cases = [
            (0.1, 2.2527126517342055),
            (0.5, 0.5723649429247004),
            (1.0, 0.0),
            (2.5, 0.2846828704729196),
            (10.0, 12.801827480081467),
            (123.456, 469.60554712992956),
            (1e6 + 0.5, 12815511.476902764),
        ];
        for (x, want) in cases {
            let got = ln_gamma(x);
            assert!((got - want).abs() <= 1e-12 * want.abs().max(1.0), "lnΓ({x}) = {got}, want {want}");
        }
    }

    #[test]
    fn bayes_factor_matches_python() {
        // The formula in the module doc, evaluated independently:
        // python3 - <<'EOF'
        // from math import lgamma, log, exp
        // def lnbf(x, w, k=100.0):
        //     t = [v / sum(w) for v in w]; a = [k * v for v in t]; n = sum(x)
        //     return (lgamma(k) - lgamma(k + n) + sum(lgamma(ai + xi) - lgamma(ai) - xi * log(ti)
        //             for xi, ai, ti in zip(x, a, t)))
        // for x, w in (([520, 480], [1, 1]), ([5200, 4800], [1, 1]), ([52000, 48000], [1, 1]),
        //              ([1000, 2100, 1900], [0.2, 0.4, 0.4])):
        //     print(x, repr(lnbf(x, w)), repr(min(1.0, exp(-lnbf(x, w)))))
        // EOF
        let cases: [(&[u64], &[f64], f64); 4] = [
            (&[520, 480], &[1.0, 1.0], LNBF_520_480),
            (&[5200, 4800], &[1.0, 1.0], LNBF_5200_4800),
            (&[52000, 48000], &[1.0, 1.0], LNBF_52000_48000),
            (&[1000, 2100, 1900], &[0.2, 0.4, 0.4], LNBF_3WAY),
        ];
        for (x, w, want) in cases {
            let got = srm_log_bayes_factor(x, w, SrmPrior::default()).unwrap();
            assert!((got - want).abs() < 1e-8 * want.abs().max(1.0), "{x:?}: {got} vs {want}");
        }
        // 52/48 at n = 100,000 is a glaring mismatch; at 1,000 it is noise.
        assert!(srm_p_value(&[52000, 48000], &[1.0, 1.0], SrmPrior::default()).unwrap() < 1e-30);
        assert_eq!(srm_p_value(&[520, 480], &[1.0, 1.0], SrmPrior::default()).unwrap(), 1.0);
    }
    const LNBF_520_480: f64 = -0.4731252336705438;
    const LNBF_5200_4800: f64 = 5.613613411784172;
    const LNBF_52000_48000: f64 = 76.48528717341833;
    const LNBF_3WAY: f64 = 0.9659508058975916;

    #[test]
    fn invalid_configuration_is_an_error() {
        let p = SrmPrior::default();
        assert_eq!(srm_p_value(&[1, 2, 3], &[1.0, 1.0], p), Err(StatsError::LengthMismatch { counts: 3, weights: 2 }));
        assert_eq!(srm_p_value(&[1], &[1.0], p), Err(StatsError::TooFewVariations(1)));
        assert_eq!(srm_p_value(&[1, 2], &[1.0, 0.0], p), Err(StatsError::BadWeight { index: 1, weight: 0.0 }));
        assert!(SrmMonitor::new(&[1.0, 1.0], SrmPrior { concentration: 0.0 }).is_err());
    }

    /// Assigns `per_look` sessions per look with probabilities `true_split`
    /// and reports the monitor's p-value after each look.
    fn run_srm(rng: &mut Pcg64Mcg, true_split: &[f64], weights: &[f64], per_look: u64, looks: usize) -> Vec<f64> {
        let mut monitor = SrmMonitor::new(weights, SrmPrior::default()).unwrap();
        let mut counts = vec![0u64; true_split.len()];
        let total: f64 = true_split.iter().sum();
        let mut ps = Vec::with_capacity(looks);
        for _ in 0..looks {
            for _ in 0..per_look {
                let mut u = rng.gen::<f64>() * total;
                let mut i = 0;
                while i + 1 < true_split.len() && u >= true_split[i] {
                    u -= true_split[i];
                    i += 1;
                }
                counts[i] += 1;
            }
            ps.push(monitor.observe(&counts).unwrap());
        }
        ps
    }

    #[test]
    fn aa_srm_ever_alarms_at_most_alpha() {
        // 2,000 fair experiments (50/50 and 20/40/40), 50 looks of 500 sessions.
        // Ville's inequality bounds the ever-alarm rate by α exactly (no
        // asymptotics), so the limit is α plus 3 binomial sd of the
        // simulation: α = 0.01 → 0.01 + 3·sqrt(0.01·0.99/2000) = 1.67%;
        // α = 0.001 → 0.001 + 3·sqrt(0.001·0.999/2000) = 0.31%.
        let sims = 2_000;
        for (seed, split) in [(1510, &[1.0, 1.0][..]), (1511, &[0.2, 0.4, 0.4][..])] {
            let mut rng = Pcg64Mcg::seed_from_u64(seed);
            let (mut ever_01, mut ever_001) = (0, 0);
            for _ in 0..sims {
                let last = *run_srm(&mut rng, split, split, 500, 50).last().unwrap();
                ever_01 += (last <= 0.01) as usize;
                ever_001 += (last <= 0.001) as usize;
            }
            let (r01, r001) = (ever_01 as f64 / sims as f64, ever_001 as f64 / sims as f64);
            eprintln!(
                "A/A SRM {split:?}: ever p ≤ 0.01 in {:.2}%, ever p ≤ 0.001 in {:.2}%",
                r01 * 100.0,
                r001 * 100.0
            );
            assert!(r01 <= 0.0167, "{r01}");
            assert!(r001 <= 0.0031, "{r001}");
        }
    }

    #[test]
    fn srm_p_value_never_increases_and_a_52_48_split_alarms() {
        // 200 experiments configured 50/50 but actually split 52/48, looked at
        // every 2,000 sessions up to 100,000: all alarm at α = 0.001.
        let mut rng = Pcg64Mcg::seed_from_u64(1512);
        let sims = 200;
        let mut alarm_at: Vec<u64> = Vec::new();
        for _ in 0..sims {
            let ps = run_srm(&mut rng, &[0.52, 0.48], &[1.0, 1.0], 2_000, 50);
            assert!(ps.windows(2).all(|w| w[1] <= w[0]), "p-value increased: {ps:?}");
            let first = ps.iter().position(|&p| p <= 0.001).expect("52/48 at 100,000 sessions must alarm");
            alarm_at.push((first as u64 + 1) * 2_000);
        }
        alarm_at.sort_unstable();
        eprintln!("52/48: alarm (p ≤ 0.001) at median {} sessions, max {}", alarm_at[sims / 2], alarm_at[sims - 1]);
        // A fair split keeps p non-increasing too, and the raw p-value does
        // rise again between looks (so the running minimum does real work).
        let mut rng = Pcg64Mcg::seed_from_u64(1513);
        let ps = run_srm(&mut rng, &[1.0, 1.0], &[1.0, 1.0], 100, 200);
        assert!(ps.windows(2).all(|w| w[1] <= w[0]));
        let raw = [[60, 40], [100, 100]].map(|x| srm_p_value(&x, &[1.0, 1.0], SrmPrior::default()).unwrap());
        assert!(raw[1] > raw[0], "{raw:?}");
    }

    #[test]
    fn retraction_keeps_the_running_minimum() {
        let mut m = SrmMonitor::new(&[1.0, 1.0], SrmPrior::default()).unwrap();
        let low = m.observe(&[5400, 4600]).unwrap();
        assert!(low < 1e-6);
        // A correction brings the counts back to a fair split: p stays.
        assert_eq!(m.observe(&[5000, 5000]).unwrap(), low);
        assert!(m.alarmed(0.001));
    }
}
