//! The live status: a panel redrawn every second on a terminal, or a log
//! line every 10 s otherwise, read from the [`Live`] atomics the stages
//! publish into (nothing here touches the hot path).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Live;
use crate::clock::now_ms;
use crate::failures::lock;

/// Prints a one-line status every second until `stop`: refreshed in place on a
/// terminal, plain lines otherwise.
pub fn spawn_status(live: Arc<Live>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name("expmon-status".into())
        .spawn(move || {
            let tty = std::io::stderr().is_terminal();
            // A panel redrawn every second on a terminal; a log line every 10 s otherwise.
            let every = if tty { Duration::from_secs(1) } else { Duration::from_secs(10) };
            let start = Instant::now();
            let mut last = (0u64, 0u64, Instant::now());
            let mut drawn = 0;
            while !stop.load(Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
                if last.2.elapsed() < every {
                    continue;
                }
                let (n, upserts) = (live.events_in.load(Relaxed), live.upserts_written.load(Relaxed));
                let secs = last.2.elapsed().as_secs_f64();
                let rate = (n - last.0) as f64 / secs;
                let points_per_min = (upserts - last.1) as f64 / secs * 60.0;
                last = (n, upserts, Instant::now());
                let s = Status::read(&live, rate, points_per_min, start.elapsed());
                if tty {
                    let panel = s.panel();
                    let mut err = std::io::stderr().lock();
                    // Move up over the previous panel and redraw it.
                    let _ = write!(err, "{}{panel}", "\x1b[1A\x1b[2K".repeat(drawn));
                    let _ = err.flush();
                    drawn = panel.lines().count();
                } else {
                    tracing::info!("{}", s.line());
                }
            }
        })
        .expect("spawn status thread")
}

/// One reading of the live figures.
struct Status {
    elapsed: Duration,
    rate: f64,
    events_in: u64,
    rejected: u64,
    late: u64,
    kafka_lag: Option<i64>,
    event_time_lag_s: f64,
    watermark_delay_s: f64,
    sessions: u64,
    state_bytes: u64,
    points: u64,
    points_per_min: f64,
    sink_p99_ms: f64,
    sink_errors: u64,
    sink_retries: u64,
    sink_queued: u64,
    progress: Option<(u64, u64)>,
}

impl Status {
    fn read(live: &Live, rate: f64, points_per_min: f64, elapsed: Duration) -> Status {
        let now = now_ms();
        let (max_ts, wm) = (live.max_ts.load(Relaxed), live.watermark.load(Relaxed));
        let lag = lock(&live.kafka_lag);
        let total = live.progress_total.load(Relaxed);
        Status {
            elapsed,
            rate,
            events_in: live.events_in.load(Relaxed),
            rejected: live.rejected.load(Relaxed),
            late: live.late_dropped.load(Relaxed),
            kafka_lag: (!lag.is_empty()).then(|| lag.iter().map(|(_, l)| l).sum()),
            event_time_lag_s: if max_ts > 0 { (now - max_ts) as f64 / 1000.0 } else { 0.0 },
            watermark_delay_s: if wm > 0 && wm < i64::MAX { (now - wm) as f64 / 1000.0 } else { 0.0 },
            sessions: live.active_sessions.load(Relaxed),
            state_bytes: live.state_bytes.load(Relaxed),
            points: live.active_points.load(Relaxed),
            points_per_min,
            sink_p99_ms: live.sink_latency_p99_us.load(Relaxed) as f64 / 1000.0,
            sink_errors: live.sink_errors.load(Relaxed),
            sink_retries: live.sink_retries.load(Relaxed),
            sink_queued: live.sink_queued.load(Relaxed),
            progress: (total > 0).then(|| (live.progress_done.load(Relaxed).min(total), total)),
        }
    }

    /// The terminal panel (ends with a newline).
    fn panel(&self) -> String {
        let mib = |b: u64| b as f64 / (1 << 20) as f64;
        let mut p = format!(
            "expmon {:>7.0}s │ {:>10.0} events/s │ in {} · rejected {} · late {}\n",
            self.elapsed.as_secs_f64(),
            self.rate,
            self.events_in,
            self.rejected,
            self.late
        );
        let lag = self.kafka_lag.map_or("–".to_string(), |l| l.to_string());
        p += &format!(
            "  input    │ kafka lag {lag} · event-time lag {:.1}s · watermark delay {:.1}s\n",
            self.event_time_lag_s, self.watermark_delay_s
        );
        p += &format!(
            "  state    │ {} sessions · {:.1} MiB · {} live points · {:.0} points/min written\n",
            self.sessions,
            mib(self.state_bytes),
            self.points,
            self.points_per_min
        );
        p += &format!(
            "  sink     │ p99 {:.1} ms · errors {} · retries {} · queued {}\n",
            self.sink_p99_ms, self.sink_errors, self.sink_retries, self.sink_queued
        );
        if let Some((done, total)) = self.progress {
            let frac = done as f64 / total as f64;
            let eta = if frac > 0.0 { self.elapsed.as_secs_f64() * (1.0 - frac) / frac } else { 0.0 };
            p += &format!(
                "  replay   │ [{:<30}] {:5.1}% · {:.0}/{:.0} MiB · ~{:.0}s left\n",
                "#".repeat((frac * 30.0) as usize),
                frac * 100.0,
                mib(done),
                mib(total),
                eta
            );
        }
        p
    }

    /// One plain line for logs.
    fn line(&self) -> String {
        let mut l = format!(
            "status: {:.0} events/s, in {}, rejected {}, late {}, sessions {}, points {} ({:.0}/min), \
             watermark delay {:.1}s, sink p99 {:.1} ms, errors {}, retries {}",
            self.rate,
            self.events_in,
            self.rejected,
            self.late,
            self.sessions,
            self.points,
            self.points_per_min,
            self.watermark_delay_s,
            self.sink_p99_ms,
            self.sink_errors,
            self.sink_retries
        );
        if let Some(lag) = self.kafka_lag {
            l += &format!(", kafka lag {lag}");
        }
        if let Some((done, total)) = self.progress {
            l += &format!(", replay {:.1}%", 100.0 * done as f64 / total as f64);
        }
        l
    }
}
