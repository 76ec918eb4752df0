//! Which health points a trigger writes to the sink (SPEC §6: figures that did
//! not change need not be written again, and their volume stays small next to
//! the metrics).
//!
//! - The engine's `expmon.*` figures are written once per processing-time
//!   trigger (and at the end), never at the event-time flushes between them.
//! - An `expmon.experiment.*` point is written when its value differs from the
//!   one last written for its name and tags, and every point again at every
//!   [`REWRITE_TRIGGERS`]-th trigger, so that a dashboard's window always holds
//!   a recent value of each.
//!
//! `/metrics` is not filtered: it shows the full set of the last trigger.

use ahash::AHashMap;

use crate::metrics::{HealthPoint, HealthValue};

/// Every this many triggers, all experiment health points are written again.
pub const REWRITE_TRIGGERS: u64 = 10;

const EXPERIMENT_PREFIX: &str = "expmon.experiment.";

#[derive(Default)]
pub struct HealthWrites {
    /// Hash of (name, tags) → the value last written.
    written: AHashMap<u64, HealthValue>,
    /// Triggers seen so far.
    triggers: u64,
}

impl HealthWrites {
    pub fn new() -> HealthWrites {
        HealthWrites::default()
    }

    /// The points of `all` (one trigger's full set) to write now.
    pub fn due(&mut self, all: &[HealthPoint]) -> Vec<HealthPoint> {
        let rewrite = self.triggers.is_multiple_of(REWRITE_TRIGGERS);
        self.triggers += 1;
        let mut out = Vec::new();
        for p in all {
            if !p.name.starts_with(EXPERIMENT_PREFIX) {
                out.push(p.clone());
                continue;
            }
            let last = self.written.insert(key(p), p.value);
            if rewrite || !last.is_some_and(|v| same(v, p.value)) {
                out.push(p.clone());
            }
        }
        out
    }
}

/// A hash of a point's identity (name, then each tag's key and value; a 0xFF
/// byte, which UTF-8 never holds, ends each part). xxh3, because a trigger
/// hashes every experiment's points: ~25 per experiment.
fn key(p: &HealthPoint) -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(p.name.as_bytes());
    h.update(&[0xFF]);
    for (k, v) in &p.tags {
        h.update(k.as_bytes());
        h.update(&[0xFF]);
        h.update(v.as_bytes());
        h.update(&[0xFF]);
    }
    h.digest()
}

fn same(a: HealthValue, b: HealthValue) -> bool {
    match (a, b) {
        (HealthValue::Int(a), HealthValue::Int(b)) => a == b,
        (HealthValue::Float(a), HealthValue::Float(b)) => a.to_bits() == b.to_bits(),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(name: &str, experiment: &str, value: i64) -> HealthPoint {
        HealthPoint {
            name: name.to_string(),
            tags: vec![("dc", "dc1".into()), ("experiment", experiment.into())],
            value: HealthValue::Int(value),
        }
    }

    fn names(points: &[HealthPoint]) -> Vec<(String, i64)> {
        points
            .iter()
            .map(|p| {
                let HealthValue::Int(v) = p.value else { panic!("int") };
                (format!("{}/{}", p.name, p.tags[1].1), v)
            })
            .collect()
    }

    #[test]
    fn experiment_points_are_written_when_changed_and_at_the_rewrite_interval() {
        let mut w = HealthWrites::new();
        let all = |a: i64| {
            vec![
                p("expmon.events_in", "-", 7),
                p("expmon.experiment.assigned_sessions", "1", a),
                p("expmon.experiment.assigned_sessions", "2", 5),
            ]
        };
        assert_eq!(w.due(&all(3)).len(), 3, "the first trigger writes everything");
        assert_eq!(names(&w.due(&all(3))), vec![("expmon.events_in/-".into(), 7)], "unchanged: engine figures only");
        assert_eq!(
            names(&w.due(&all(4))),
            vec![("expmon.events_in/-".into(), 7), ("expmon.experiment.assigned_sessions/1".into(), 4)],
            "a change is written"
        );
        for _ in 3..REWRITE_TRIGGERS {
            assert_eq!(w.due(&all(4)).len(), 1);
        }
        assert_eq!(w.due(&all(4)).len(), 3, "every REWRITE_TRIGGERS-th trigger writes everything again");
        assert_eq!(w.due(&all(4)).len(), 1);
    }
}
