//! Seeded simulators for the statistical tests (test-only).
//!
//! A simulated arm is a stream of independent sessions, each converting with
//! probability `p`; a converting session carries a value (1 for a conversion
//! metric, an order amount for revenue), a non-converting one carries 0. The
//! arm keeps only the running sums the engine keeps ([`ArmSums`]).
//!
//! Sessions are not drawn one by one: the number of non-converting sessions
//! before the next converting one is geometric, so one draw per *converting*
//! session gives exactly the same distribution of sums at a fraction of the
//! cost (most sessions are 0).

use super::ArmSums;
use rand::Rng;

/// One variation's session stream and its running sums.
pub struct SimArm {
    /// ln(1 − p), for the geometric gaps.
    ln_miss: f64,
    /// Non-converting sessions left before the next converting one.
    until_next: u64,
    pub sums: ArmSums,
}

impl SimArm {
    pub fn new<R: Rng>(p: f64, rng: &mut R) -> Self {
        assert!(p > 0.0 && p < 1.0);
        let ln_miss = (1.0 - p).ln();
        SimArm { ln_miss, until_next: geometric(ln_miss, rng), sums: ArmSums::default() }
    }

    /// Add `sessions` sessions; `value` draws the amount of a converting one.
    pub fn advance<R: Rng>(&mut self, sessions: u64, rng: &mut R, value: &mut impl FnMut(&mut R) -> f64) {
        let mut left = sessions;
        while self.until_next < left {
            left -= self.until_next + 1;
            let v = value(rng);
            self.sums.sum += v;
            self.sums.sum_sq += v * v;
            self.until_next = geometric(self.ln_miss, rng);
        }
        self.until_next -= left;
        self.sums.n += sessions;
    }
}

/// Failures before the first success of Bernoulli(p) trials, `ln_miss` = ln(1 − p).
fn geometric<R: Rng>(ln_miss: f64, rng: &mut R) -> u64 {
    let u = 1.0 - rng.gen::<f64>(); // (0, 1]
    (u.ln() / ln_miss).floor() as u64
}

/// A standard normal draw (Box–Muller, one of the pair).
pub fn standard_normal<R: Rng>(rng: &mut R) -> f64 {
    let u1 = 1.0 - rng.gen::<f64>(); // (0, 1]
    let u2 = rng.gen::<f64>();
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

/// A log-normal draw: exp(mu + sigma·Z).
pub fn log_normal<R: Rng>(rng: &mut R, mu: f64, sigma: f64) -> f64 {
    (mu + sigma * standard_normal(rng)).exp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_pcg::Pcg64Mcg;

    #[test]
    fn simulated_arm_has_the_configured_rate_and_moments() {
        let mut rng = Pcg64Mcg::seed_from_u64(7);
        let mut arm = SimArm::new(0.1, &mut rng);
        arm.advance(1_000_000, &mut rng, &mut |_| 1.0);
        // Binomial(1e6, 0.1): sd of the rate is 3e-4; 5 sd.
        assert!((arm.sums.mean() - 0.1).abs() < 1.5e-3, "{}", arm.sums.mean());

        let mut z = SimArm::new(0.5, &mut rng);
        z.advance(400_000, &mut rng, &mut |r| standard_normal(r));
        // Converting half carries N(0,1): mean 0, E[v²] = 0.5 per session.
        assert!(z.sums.mean().abs() < 0.01);
        assert!((z.sums.sum_sq / z.sums.n as f64 - 0.5).abs() < 0.01);
    }
}
