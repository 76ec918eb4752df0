//! The end-of-run report: what a run did, summed from every stage's figures
//! ([`Summary`]), printed by the command line as a few lines after the run.

use std::fmt;
use std::time::Duration;

use super::{RouterStats, ShardStats, WriterStats};
use crate::event::Reject;

/// What a run did, printed at its end.
#[derive(Debug, Default, Clone)]
pub struct Summary {
    pub router: RouterStats,
    pub shards: ShardStats,
    pub writer: WriterStats,
    pub threads: usize,
    pub elapsed: Duration,
    /// When the first line arrived, from the start (a Kafka group join can
    /// take seconds).
    pub first_line: Option<Duration>,
    /// Peak resident memory of the process (VmHWM), if known.
    pub peak_rss_bytes: Option<u64>,
    /// What the sink reported when closed.
    pub sink: crate::metrics::SinkReport,
    /// From noticing a stop to the end of the run (drain, flush, checkpoint).
    pub stop_took: Option<Duration>,
}

impl Summary {
    pub fn events_per_sec(&self) -> f64 {
        self.router.events_in as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = &self.router;
        writeln!(
            f,
            "expmon: {} events in {:.3}s ({:.0} events/s, {} shard threads)",
            r.events_in,
            self.elapsed.as_secs_f64(),
            self.events_per_sec(),
            self.threads
        )?;
        if let Some(first) = self.first_line.filter(|d| d.as_secs_f64() >= 1.0) {
            let busy = (self.elapsed.saturating_sub(first)).as_secs_f64().max(1e-9);
            writeln!(
                f,
                "  first event after {:.3}s; {:.0} events/s from then on",
                first.as_secs_f64(),
                r.events_in as f64 / busy
            )?;
        }
        write!(f, "  rejected {}", r.rejected_total())?;
        write_nonzero(f, Reject::ALL.iter().map(|x| (x.as_str(), r.rejected[x.index()])))?;
        writeln!(
            f,
            ", late dropped {}, unknown tenant {}, unknown experiment {}, unknown variation {}",
            r.late_dropped, r.unknown_tenant, r.unknown_experiment, r.unknown_variation
        )?;
        let s = &self.shards;
        writeln!(
            f,
            "  sessions started {}, evicted {}, assignment conflicts {}, dropped (session over {} events) {}",
            s.sessions_started,
            s.sessions_evicted,
            s.conflicts,
            crate::session::MAX_EVENTS_PER_SESSION,
            s.overflow_dropped
        )?;
        write!(f, "  names replaced by _other (table full) {}", r.names_replaced.iter().sum::<u64>())?;
        write_nonzero(f, crate::names::NameKind::ALL.iter().map(|k| (k.as_str(), r.names_replaced[k.index()])))?;
        writeln!(f)?;
        let w = &self.writer;
        write!(
            f,
            "  upserts written {} in {} flushes, peak points held {}; health points written {} at {} triggers",
            w.upserts_written, w.flushes, w.peak_points, w.health_points_written, w.health_writes
        )?;
        if w.totals_clamped > 0 {
            write!(f, "\n  totals clamped to 64 bits {}", w.totals_clamped)?;
        }
        if w.peak_state_sessions > 0 {
            write!(
                f,
                "\n  peak session state {:.1} MiB for {} sessions ({} bytes/session)",
                w.peak_state_bytes as f64 / (1 << 20) as f64,
                w.peak_state_sessions,
                w.peak_state_bytes / w.peak_state_sessions
            )?;
        }
        if let Some(rss) = self.peak_rss_bytes {
            write!(f, "\n  peak RSS {:.1} MiB", rss as f64 / (1 << 20) as f64)?;
        }
        if w.checkpoints_written > 0 {
            write!(
                f,
                "\n  checkpoints: {} written, {} published; longest pause {:.1} ms; largest {:.1} KiB",
                w.checkpoints_written,
                w.checkpoints_published,
                w.checkpoint_pause_max_us as f64 / 1000.0,
                w.checkpoint_bytes as f64 / 1024.0
            )?;
        }
        if let Some(t) = self.stop_took {
            let ms = t.as_secs_f64() * 1000.0;
            if self.sink.undelivered == 0 {
                write!(f, "\n  stopped: drained, flushed and closed in {ms:.0} ms")?;
            } else {
                // The error line that follows says how many were not delivered.
                write!(f, "\n  stopped in {ms:.0} ms, not everything delivered")?;
            }
        }
        if !self.sink.summary.is_empty() {
            write!(f, "\n  {}", self.sink.summary)?;
        }
        Ok(())
    }
}

/// Writes ` (name=count, …)` of the non-zero `counts`, nothing if all are zero.
fn write_nonzero<'a>(f: &mut fmt::Formatter<'_>, counts: impl Iterator<Item = (&'a str, u64)>) -> fmt::Result {
    let shown: Vec<String> = counts.filter(|(_, n)| *n > 0).map(|(name, n)| format!("{name}={n}")).collect();
    if shown.is_empty() {
        return Ok(());
    }
    write!(f, " ({})", shown.join(", "))
}
