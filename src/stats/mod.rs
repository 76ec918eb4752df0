//! Always-valid statistics over running sums (issue 15): the lift of each
//! treatment over the control for a conversion rate or a revenue per qualified
//! session, and a sequential sample-ratio-mismatch (SRM) test.
//!
//! Everything here is a pure function of totals the engine already keeps (SPEC
//! §3): per variation `n` = `session.fm.v`, and for a measurement point `m`
//! either `x` = `visit.fm.v.m.beta` (conversion, 0/1 per session) or
//! `s` = `value.fm.v.m` and `q` = `value_sq.fm.v.m` (revenue). Sums, not
//! per-session rows, so a late-event correction that retracts a contribution
//! changes the inputs and nothing else; no state is carried between looks
//! except the SRM p-value's running minimum ([`srm::SrmMonitor`]).
//!
//! Why "always valid": the monitor is read every few minutes and an experiment
//! is stopped as soon as it looks significant. A fixed-horizon 95% interval
//! read that way declares a difference far more often than 5% of the time when
//! there is none (pinned by `sequence::tests::naive_z_test_peeked_at_every_look_is_not_valid`).
//! The intervals here are confidence *sequences*: the chance that they ever
//! exclude the truth, at any look, is at most α (asymptotically).
//!
//! - [`sequence`]: the asymptotic confidence sequence on the difference of
//!   means, the relative-lift interval (Fieller) and the [`sequence::Verdict`].
//! - [`srm`]: the Dirichlet-multinomial sequential SRM test and its
//!   anytime-valid p-value.

pub mod sequence; // confidence sequences on lift, verdicts
pub mod srm; // sequential sample-ratio-mismatch test

#[cfg(test)]
mod sim; // seeded simulators shared by the statistical tests

pub use sequence::{compare, compare_all, ArmSums, Comparison, Interval, Lift, SequentialConfig, Verdict};
pub use srm::{srm_log_bayes_factor, srm_p_value, SrmMonitor, SrmPrior};

/// Invalid inputs to a statistics function (configuration mistakes, never data).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum StatsError {
    #[error("{counts} counts for {weights} configured weights")]
    LengthMismatch { counts: usize, weights: usize },
    #[error("at least two variations are needed, got {0}")]
    TooFewVariations(usize),
    #[error("weight {index} is {weight}; every weight must be finite and > 0")]
    BadWeight { index: usize, weight: f64 },
    #[error("the prior concentration must be finite and > 0, got {0}")]
    BadConcentration(f64),
}
