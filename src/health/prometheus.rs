//! `/metrics`: the health points of the last trigger (the `expmon.*` points
//! written to the sink) and the sink's write-latency buckets, encoded in the
//! Prometheus text format (0.0.4) by the `prometheus-client` crate.
//!
//! [`FAMILIES`] is the one place that maps each KairosDB point name to its
//! Prometheus family: name, type, help and unit conversion. Counters are the
//! engine's cumulative counts (they only grow over the process life) and come
//! out as `…_total`; units are base units in the name (`_seconds`, `_bytes`);
//! the write latency is a histogram. A point whose name is not in the table
//! is not exposed (a unit test checks that every point the engine makes is).

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::{Registry, Unit};

use crate::metrics::{HealthPoint, HealthValue, LatencyBuckets, WRITE_LATENCY_BOUNDS_US};

/// The Prometheus type of a family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    /// Fed by the sink's [`LatencyBuckets`], not by points.
    Histogram,
}

/// One Prometheus family and the health points it is made of.
#[derive(Debug)]
pub struct Family {
    /// The KairosDB point name (`expmon.events_in`).
    pub point: &'static str,
    /// Only the points with this tag value, the tag dropped (the `max` of
    /// `expmon.write_latency_us{quantile}`).
    pub only: Option<(&'static str, &'static str)>,
    /// The name before unit and `_total` suffixes (`expmon_events_in`).
    pub name: &'static str,
    pub unit: Option<Unit>,
    /// The point's units in one base unit (ms per s: 1000; 1 if the same).
    pub per_base: f64,
    pub kind: Kind,
    pub help: &'static str,
}

impl Family {
    /// The family name as Prometheus shows it (`expmon_events_in_total`,
    /// `expmon_write_latency_seconds`).
    pub fn exposed(&self) -> String {
        let mut n = self.name.to_string();
        if let Some(u) = &self.unit {
            n = format!("{n}_{}", u.as_str());
        }
        if self.kind == Kind::Counter {
            n += "_total";
        }
        n
    }

    /// The series names a query can use (a histogram's `_bucket`, `_sum`,
    /// `_count`; otherwise the family name).
    pub fn series(&self) -> Vec<String> {
        let n = self.exposed();
        match self.kind {
            Kind::Histogram => vec![format!("{n}_bucket"), format!("{n}_sum"), format!("{n}_count")],
            _ => vec![n],
        }
    }

    fn metric_type(&self) -> MetricType {
        match self.kind {
            Kind::Counter => MetricType::Counter,
            Kind::Gauge => MetricType::Gauge,
            Kind::Histogram => MetricType::Histogram,
        }
    }

    fn takes(&self, p: &HealthPoint) -> bool {
        p.name == self.point && self.only.is_none_or(|(k, v)| p.tags.iter().any(|(pk, pv)| *pk == k && pv == v))
    }
}

const fn counter(point: &'static str, name: &'static str, help: &'static str) -> Family {
    Family { point, only: None, name, unit: None, per_base: 1.0, kind: Kind::Counter, help }
}

const fn gauge(point: &'static str, name: &'static str, help: &'static str) -> Family {
    Family { point, only: None, name, unit: None, per_base: 1.0, kind: Kind::Gauge, help }
}

/// Every `expmon.*` health point and its Prometheus family, in `/metrics`
/// order.
pub static FAMILIES: [Family; 39] = [
    counter("expmon.events_in", "expmon_events_in", "Non-blank input lines read."),
    counter("expmon.events_rejected", "expmon_events_rejected", "Input lines rejected, all reasons."),
    counter("expmon.events_rejected_by_reason", "expmon_events_rejected_by_reason", "Input lines rejected, by reason."),
    counter("expmon.late_dropped", "expmon_late_dropped", "Events dropped as later than the allowed lateness."),
    counter("expmon.unknown_tenant", "expmon_unknown_tenant", "Events of tenants not configured."),
    counter(
        "expmon.unknown_experiment",
        "expmon_unknown_experiment",
        "Assignments to experiments not configured for the tenant.",
    ),
    counter(
        "expmon.unknown_variation",
        "expmon_unknown_variation",
        "Assignments to variations not configured for the experiment.",
    ),
    counter(
        "expmon.names_replaced_other",
        "expmon_names_replaced_other",
        "Names replaced by _other because their table was full, by table.",
    ),
    counter(
        "expmon.totals_clamped",
        "expmon_totals_clamped",
        "Writes of a total beyond 64 bits, clamped to the nearest 64-bit value.",
    ),
    counter(
        "expmon.assignment_conflicts",
        "expmon_assignment_conflicts",
        "Sessions seen with conflicting assignments.",
    ),
    gauge("expmon.sessions_active", "expmon_sessions_active", "Sessions held by the shards."),
    counter("expmon.sessions_evicted", "expmon_sessions_evicted", "Sessions evicted to bound memory."),
    counter(
        "expmon.session_overflow_dropped",
        "expmon_session_overflow_dropped",
        "Events dropped because their session was over the per-session event cap.",
    ),
    gauge("expmon.points_active", "expmon_points_active", "Metric points held by the writer."),
    counter("expmon.upserts_written", "expmon_upserts_written", "Metric point upserts written to the sink."),
    counter("expmon.write_requests", "expmon_write_requests", "Write requests sent by the sink."),
    counter("expmon.write_errors", "expmon_write_errors", "Points the sink's destination refused for good."),
    counter("expmon.write_retries", "expmon_write_retries", "Failed sink writes that are retried."),
    gauge("expmon.write_queue_points", "expmon_write_queue_points", "Points queued in the sink, not yet delivered."),
    Family {
        point: "expmon.write_latency_us",
        only: None,
        name: "expmon_write_latency",
        unit: Some(Unit::Seconds),
        per_base: 1e6,
        kind: Kind::Histogram,
        help: "Latency of the sink's write requests.",
    },
    Family {
        point: "expmon.write_latency_us",
        only: Some(("quantile", "max")),
        name: "expmon_write_latency_max",
        unit: Some(Unit::Seconds),
        per_base: 1e6,
        kind: Kind::Gauge,
        help: "Longest write request of the sink so far.",
    },
    Family {
        point: "expmon.trigger_duration_ms",
        only: None,
        name: "expmon_trigger_duration",
        unit: Some(Unit::Seconds),
        per_base: 1e3,
        kind: Kind::Gauge,
        help: "Duration of the last trigger (flush) of the writer.",
    },
    Family {
        point: "expmon.watermark_lag_ms",
        only: None,
        name: "expmon_watermark_lag",
        unit: Some(Unit::Seconds),
        per_base: 1e3,
        kind: Kind::Gauge,
        help: "Processing time minus the watermark (event time).",
    },
    gauge("expmon.kafka_consumer_lag", "expmon_kafka_consumer_lag", "Messages behind the end of each input partition."),
    gauge("expmon.scale_out.tasks", "expmon_scale_out_tasks", "Scale-out tasks this instance holds, per stage."),
    gauge(
        "expmon.scale_out.lag",
        "expmon_scale_out_lag",
        "Scale-out: records behind the end of this instance's partitions, per stage (1: input, 2: deltas).",
    ),
    counter(
        "expmon.scale_out.transactions",
        "expmon_scale_out_transactions",
        "Scale-out transactions committed, per stage.",
    ),
    counter(
        "expmon.scale_out.dead_lettered",
        "expmon_scale_out_dead_lettered",
        "Scale-out: refused input messages copied to the source's dead-letter topic.",
    ),
    counter(
        "expmon.scale_out.restores",
        "expmon_scale_out_restores",
        "Scale-out tasks rebuilt from Kafka after an assignment, per stage.",
    ),
    Family {
        point: "expmon.scale_out.internal_bytes",
        only: None,
        name: "expmon_scale_out_internal",
        unit: Some(Unit::Bytes),
        per_base: 1.0,
        kind: Kind::Counter,
        help: "Scale-out: bytes (keys and payloads) written to each internal topic.",
    },
    Family {
        point: "expmon.resident_memory_bytes",
        only: None,
        name: "expmon_resident_memory",
        unit: Some(Unit::Bytes),
        per_base: 1.0,
        kind: Kind::Gauge,
        help: "Resident memory of the process.",
    },
    gauge(
        "expmon.experiment.assigned_sessions",
        "expmon_experiment_assigned_sessions",
        "Sessions assigned to the experiment since this process started it.",
    ),
    gauge(
        "expmon.experiment.crossover_rate",
        "expmon_experiment_crossover_rate",
        "Share of the experiment's sessions seen with conflicting assignments.",
    ),
    gauge(
        "expmon.experiment.stall",
        "expmon_experiment_stall",
        "1 when the experiment's assigned or factor-matched sessions stalled in the last final minute.",
    ),
    gauge(
        "expmon.experiment.srm_pvalue",
        "expmon_experiment_srm_pvalue",
        "Sample ratio mismatch: anytime-valid sequential p-value of the split against the weights.",
    ),
    gauge(
        "expmon.experiment.srm_state",
        "expmon_experiment_srm_state",
        "Sample ratio mismatch: 0 ok, 1 warning (p < 0.01), 2 alarm (p < 0.001).",
    ),
    gauge(
        "expmon.experiment.mean",
        "expmon_experiment_mean",
        "Conversion rate or revenue per qualified session of a variation at a measurement point.",
    ),
    gauge(
        "expmon.experiment.lift",
        "expmon_experiment_lift",
        "Relative lift of a treatment over the control and the ends of its always-valid 95% interval.",
    ),
    gauge(
        "expmon.experiment.lift_state",
        "expmon_experiment_lift_state",
        "Lift verdict: 0 not enough data, 1 no detectable difference, 2 better, 3 worse.",
    ),
];

/// What one scrape encodes.
#[derive(Debug)]
struct Snapshot {
    points: Vec<HealthPoint>,
    latency: LatencyBuckets,
}

impl Collector for Snapshot {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // The labels every point carries (`dc`, `instance`), for the histogram.
        let base: Vec<(&str, String)> = self.points.first().map_or_else(Vec::new, |p| {
            p.tags.iter().filter(|(k, _)| matches!(*k, "dc" | "instance")).cloned().collect()
        });
        for f in FAMILIES.iter() {
            if f.kind == Kind::Histogram {
                let mut m = encoder.encode_descriptor(f.name, f.help, f.unit.as_ref(), f.metric_type())?;
                let mut m = m.encode_family(&base)?;
                let bounds = WRITE_LATENCY_BOUNDS_US.iter().map(|&b| b as f64 / f.per_base).chain([f64::INFINITY]);
                let buckets: Vec<(f64, u64)> = bounds.zip(self.latency.counts).collect();
                let sum = self.latency.sum_us as f64 / f.per_base;
                m.encode_histogram::<Vec<(String, String)>>(sum, self.latency.count(), &buckets, None)?;
                continue;
            }
            let points: Vec<&HealthPoint> = self.points.iter().filter(|p| f.takes(p)).collect();
            if points.is_empty() {
                continue;
            }
            let mut m = encoder.encode_descriptor(f.name, f.help, f.unit.as_ref(), f.metric_type())?;
            for p in points {
                let labels: Vec<(&str, &str)> = p
                    .tags
                    .iter()
                    .filter(|(k, _)| f.only.is_none_or(|(only, _)| only != *k))
                    .map(|(k, v)| (*k, v.as_str()))
                    .collect();
                let m = m.encode_family(&labels)?;
                match (f.kind, p.value) {
                    (Kind::Counter, HealthValue::Int(v)) => ConstCounter::new(v.max(0) as u64).encode(m)?,
                    (Kind::Counter, HealthValue::Float(v)) => ConstCounter::new(v.max(0.0)).encode(m)?,
                    (_, HealthValue::Int(v)) if f.per_base == 1.0 => ConstGauge::new(v).encode(m)?,
                    (_, HealthValue::Int(v)) => ConstGauge::new(v as f64 / f.per_base).encode(m)?,
                    (_, HealthValue::Float(v)) => ConstGauge::new(v / f.per_base).encode(m)?,
                }
            }
        }
        Ok(())
    }
}

/// `/metrics`' body: the last trigger's health points and the sink's latency
/// buckets; empty before the first trigger.
pub fn prometheus_text(points: &[HealthPoint], latency: &LatencyBuckets) -> String {
    if points.is_empty() {
        return String::new();
    }
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Snapshot { points: points.to_vec(), latency: *latency }));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry).expect("writing to a String");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::{health_points, HealthInputs, Live, ShardStats, WriterStats};
    use crate::metrics::SinkHealth;

    fn p(name: &str, tags: &[(&'static str, &str)], value: HealthValue) -> HealthPoint {
        HealthPoint { name: name.into(), tags: tags.iter().map(|&(k, v)| (k, v.to_string())).collect(), value }
    }

    #[test]
    fn counters_gauges_units_and_the_latency_histogram_by_the_book() {
        let dc = [("dc", "dc1"), ("instance", "h")];
        let mut latency = LatencyBuckets::default();
        for us in [80, 100, 101, 2_000_000, 40_000_000] {
            latency.record(us);
        }
        let text = prometheus_text(
            &[
                p("expmon.events_in", &dc, HealthValue::Int(5)),
                p("expmon.trigger_duration_ms", &dc, HealthValue::Int(250)),
                p("expmon.write_latency_us", &[("dc", "dc1"), ("instance", "h"), ("quantile", "p50")], 7.into()),
                p("expmon.write_latency_us", &[("dc", "dc1"), ("instance", "h"), ("quantile", "max")], 2_000.into()),
                p("expmon.experiment.srm_pvalue", &[("tenant", "a\"b")], HealthValue::Float(0.25)),
            ],
            &latency,
        );
        let mut want = String::from(
            "# HELP expmon_events_in_total Non-blank input lines read.\n\
             # TYPE expmon_events_in_total counter\n\
             expmon_events_in_total{dc=\"dc1\",instance=\"h\"} 5\n\
             # HELP expmon_write_latency_seconds Latency of the sink's write requests.\n\
             # TYPE expmon_write_latency_seconds histogram\n",
        );
        let le = [
            "0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5",
            "1", "2.5", "5", "10", "30",
        ];
        let cumulative = [2, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 4, 4, 4, 4];
        for (le, n) in le.iter().zip(cumulative) {
            want += &format!("expmon_write_latency_seconds_bucket{{dc=\"dc1\",instance=\"h\",le=\"{le}\"}} {n}\n");
        }
        want += "expmon_write_latency_seconds_bucket{dc=\"dc1\",instance=\"h\",le=\"+Inf\"} 5\n\
                 expmon_write_latency_seconds_sum{dc=\"dc1\",instance=\"h\"} 42.000281\n\
                 expmon_write_latency_seconds_count{dc=\"dc1\",instance=\"h\"} 5\n\
                 # HELP expmon_write_latency_max_seconds Longest write request of the sink so far.\n\
                 # TYPE expmon_write_latency_max_seconds gauge\n\
                 expmon_write_latency_max_seconds{dc=\"dc1\",instance=\"h\"} 0.002\n\
                 # HELP expmon_trigger_duration_seconds Duration of the last trigger (flush) of the writer.\n\
                 # TYPE expmon_trigger_duration_seconds gauge\n\
                 expmon_trigger_duration_seconds{dc=\"dc1\",instance=\"h\"} 0.25\n\
                 # HELP expmon_experiment_srm_pvalue Sample ratio mismatch: anytime-valid sequential p-value \
                 of the split against the weights.\n\
                 # TYPE expmon_experiment_srm_pvalue gauge\n\
                 expmon_experiment_srm_pvalue{tenant=\"a\\\"b\"} 0.25\n";
        assert_eq!(text, want);
        assert_eq!(prometheus_text(&[], &latency), "", "nothing before the first trigger");
    }

    /// Every name the engine writes has its family; a new point without one
    /// would silently miss `/metrics`.
    #[test]
    fn every_health_point_the_engine_makes_has_a_family() {
        let live = Live::default();
        live.watermark.store(1, std::sync::atomic::Ordering::Relaxed);
        live.kafka_lag.lock().unwrap().push((0, 3));
        let inputs = HealthInputs {
            live: &live,
            shards: &ShardStats::default(),
            writer: &WriterStats::default(),
            sink: &SinkHealth::default(),
            trigger_ms: 1,
            now_ms: 2,
            dc: "dc1",
            instance: "h",
        };
        let mut names: Vec<String> = health_points(&inputs).into_iter().map(|p| p.name).collect();
        // Experiment health names its points `point("NAME", …)`.
        let src = include_str!("experiments.rs");
        names
            .extend(src.split("point(\"").skip(1).map(|r| format!("expmon.experiment.{}", &r[..r.find('"').unwrap()])));
        assert!(names.len() > 25, "{names:?}");
        for n in &names {
            assert!(FAMILIES.iter().any(|f| f.point == n), "{n} has no Prometheus family");
        }
        for f in FAMILIES.iter() {
            // Scale-out's own points are checked in `crate::scale` (a layer above).
            let scale_out = f.point.starts_with("expmon.scale_out.");
            assert!(scale_out || names.iter().any(|n| *n == f.point), "{} is not a point the engine makes", f.point);
        }
    }

    #[test]
    fn family_names_are_unique_and_follow_the_conventions() {
        let mut seen = std::collections::BTreeSet::new();
        for f in FAMILIES.iter() {
            let n = f.exposed();
            assert!(seen.insert(n.clone()), "{n} twice");
            assert!(n.starts_with("expmon_") && !n.contains(['.', ':']), "{n}");
            assert_eq!(f.kind == Kind::Counter, n.ends_with("_total"), "{n}");
            assert!(!n.ends_with("_ms") && !n.ends_with("_us"), "{n}");
            assert!(f.help.ends_with('.'), "{n}");
        }
    }
}
