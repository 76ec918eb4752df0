//! The engine's own metrics as points (SPEC §6), written through the sink every
//! processing-time trigger under `expmon.*`, tagged with `dc` and `instance`.

use std::sync::atomic::Ordering::Relaxed;

use super::{Live, ShardStats, WriterStats};
use crate::event::Reject;
use crate::failures::lock;
use crate::metrics::{HealthPoint, HealthValue, SinkHealth};
use crate::names::NameKind;

/// Everything the writer knows at the end of a trigger.
pub struct HealthInputs<'a> {
    pub live: &'a Live,
    pub shards: &'a ShardStats,
    pub writer: &'a WriterStats,
    pub sink: &'a SinkHealth,
    pub trigger_ms: u64,
    pub now_ms: i64,
    pub dc: &'a str,
    pub instance: &'a str,
}

pub fn health_points(h: &HealthInputs) -> Vec<HealthPoint> {
    let tags = |extra: Option<(&'static str, String)>| {
        let mut t = vec![("dc", h.dc.to_string()), ("instance", h.instance.to_string())];
        t.extend(extra);
        t
    };
    let point = |name: &str, value: u64| HealthPoint {
        name: format!("expmon.{name}"),
        tags: tags(None),
        value: HealthValue::Int(value.min(i64::MAX as u64) as i64),
    };
    let l = h.live;
    let mut out = vec![
        point("events_in", l.events_in.load(Relaxed)),
        point("events_rejected", l.rejected.load(Relaxed)),
        point("late_dropped", l.late_dropped.load(Relaxed)),
        point("unknown_tenant", l.unknown_tenant.load(Relaxed)),
        point("unknown_experiment", l.unknown_experiment.load(Relaxed)),
        point("unknown_variation", l.unknown_variation.load(Relaxed)),
        point("assignment_conflicts", h.shards.conflicts),
        point("sessions_active", h.shards.active_sessions),
        point("sessions_evicted", h.shards.sessions_evicted),
        point("session_overflow_dropped", h.shards.overflow_dropped),
        point("points_active", h.writer.active_points),
        point("upserts_written", h.writer.upserts_written),
        point("totals_clamped", h.writer.totals_clamped),
        point("write_requests", h.sink.requests),
        point("write_errors", h.sink.rejected_points),
        point("write_retries", h.sink.retries),
        point("write_queue_points", h.sink.queued_points),
        point("trigger_duration_ms", h.trigger_ms),
    ];
    for r in Reject::ALL {
        let n = l.rejected_by_reason[r.index()].load(Relaxed);
        let name = "expmon.events_rejected_by_reason".into();
        out.push(HealthPoint { name, tags: tags(Some(("reason", r.as_str().into()))), value: (n as i64).into() });
    }
    for kind in NameKind::ALL {
        let n = l.names_replaced[kind.index()].load(Relaxed);
        let name = "expmon.names_replaced_other".into();
        out.push(HealthPoint { name, tags: tags(Some(("table", kind.as_str().into()))), value: (n as i64).into() });
    }
    for (q, us) in [("p50", h.sink.latency_p50_us), ("p99", h.sink.latency_p99_us), ("max", h.sink.latency_max_us)] {
        let name = "expmon.write_latency_us".into();
        out.push(HealthPoint { name, tags: tags(Some(("quantile", q.into()))), value: (us as i64).into() });
    }
    for &(partition, lag) in lock(&l.kafka_lag).iter() {
        let name = "expmon.kafka_consumer_lag".into();
        out.push(HealthPoint { name, tags: tags(Some(("partition", partition.to_string()))), value: lag.into() });
    }
    let wm = l.watermark.load(Relaxed);
    if wm > 0 {
        out.push(point("watermark_lag_ms", (h.now_ms - wm).max(0) as u64));
    }
    if let Some(rss) = resident_bytes() {
        out.push(point("resident_memory_bytes", rss));
    }
    out
}

/// Current resident set size, from /proc/self/statm.
pub fn resident_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

/// This machine's name, the default `instance` tag.
pub fn default_instance() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".to_string())
}
