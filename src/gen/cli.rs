//! `expmon gen`: write generated (or replayed) events to a file, stdout or a
//! Kafka topic.

use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use super::kafka::KafkaOut;
use super::{GenError, Generator, Pacer, Profile, REPLAY_START_MS};
use crate::clock::now_ms;

/// What `expmon gen` was asked to do.
#[derive(Debug, Clone)]
pub struct GenOptions {
    pub profile: String,
    /// Lines to write; with `replay`, at most this many (`None`: all).
    pub events: Option<u64>,
    pub rate: Option<f64>,
    /// Events per second of event time (a replay's density; with `events`
    /// it sets the span: 2M events at 550/s are one hour). Not with `rate`,
    /// whose events are stamped with the wall clock.
    pub event_rate: Option<f64>,
    /// Share of a session's later events that carry its full assignment map
    /// (its first event always does): 1 = every event, as real beacons do.
    pub assign_every: Option<f64>,
    pub seed: u64,
    pub out: String,
    pub write_config: Option<PathBuf>,
    /// Send this file's lines instead of generated ones.
    pub replay: Option<PathBuf>,
}

/// Where lines go.
enum Out {
    Stream(BufWriter<Box<dyn Write>>),
    Kafka(KafkaOut),
}

impl Out {
    fn open(out: &str) -> Result<Out, GenError> {
        let stream: Box<dyn Write> = if out == "-" {
            Box::new(std::io::stdout().lock())
        } else if let Some(path) = out.strip_prefix("file:") {
            Box::new(
                std::fs::File::create(path)
                    .map_err(|error| GenError::File { what: format!("creating {path}"), error })?,
            )
        } else if out.starts_with("kafka://") {
            return Ok(Out::Kafka(KafkaOut::open(out)?));
        } else {
            let shown = crate::redact::redact(out);
            return Err(GenError::BadOut(shown));
        };
        Ok(Out::Stream(BufWriter::with_capacity(1 << 20, stream)))
    }

    fn send(&mut self, line: &mut Vec<u8>) -> Result<(), GenError> {
        match self {
            Out::Stream(w) => {
                line.push(b'\n');
                Ok(w.write_all(line)?)
            }
            Out::Kafka(k) => k.send(line),
        }
    }

    /// Flushes; returns a note for the summary.
    fn finish(self) -> Result<String, GenError> {
        match self {
            Out::Stream(mut w) => {
                w.flush()?;
                Ok(String::new())
            }
            Out::Kafka(k) => {
                let n = k.finish()?;
                Ok(format!("; {n} acknowledged by Kafka"))
            }
        }
    }
}

pub fn run_gen(o: &GenOptions) -> Result<(), GenError> {
    let mut profile = Profile::by_name(&o.profile)?;
    if let Some(path) = &o.write_config {
        std::fs::write(path, profile.config_toml())
            .map_err(|error| GenError::File { what: format!("writing {}", path.display()), error })?;
    }
    if let Some(r) = o.event_rate {
        profile.event_time_rate = r;
    }
    if let Some(f) = o.assign_every {
        profile.assign_repeat_fraction = f;
    }
    let mut out = Out::open(&o.out)?;
    let start = match o.rate {
        Some(r) => {
            profile.event_time_rate = r;
            now_ms()
        }
        None => REPLAY_START_MS,
    };
    let mut replay = match &o.replay {
        Some(p) => Some(BufReader::with_capacity(
            1 << 20,
            std::fs::File::open(p)
                .map_err(|error| GenError::File { what: format!("opening {}", p.display()), error })?,
        )),
        None => None,
    };
    let limit = o.events.unwrap_or(u64::MAX);
    let mut g = Generator::new(profile, o.seed, start);
    let mut pacer = o.rate.map(Pacer::new);
    let began = Instant::now();
    let mut line = Vec::with_capacity(512);
    let mut last_report = Instant::now();
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut sent = 0u64;
    while sent < limit {
        if let Some(p) = &mut pacer {
            let due = p.intended(sent);
            let now = Instant::now();
            if due > now {
                if let Out::Stream(w) = &mut out {
                    w.flush()?;
                }
                std::thread::sleep(due - now);
            }
            g.set_clock(now_ms());
            p.sent(sent);
        }
        line.clear();
        match &mut replay {
            Some(r) => {
                if r.read_until(b'\n', &mut line)? == 0 {
                    break;
                }
                while line.last().is_some_and(|c| *c == b'\n' || *c == b'\r') {
                    line.pop();
                }
                if line.is_empty() {
                    continue;
                }
            }
            None => g.next_line(&mut line),
        }
        out.send(&mut line)?;
        sent += 1;
        if progress && last_report.elapsed().as_secs_f64() >= 0.5 {
            last_report = Instant::now();
            match o.events {
                Some(n) if replay.is_none() => {
                    let pct = 100.0 * sent as f64 / n.max(1) as f64;
                    let bar = "#".repeat((pct / 5.0) as usize);
                    eprint!("\r[{bar:<20}] {pct:5.1}%  {sent}/{n} events");
                }
                _ => eprint!("\r{sent} events"),
            }
        }
    }
    let note = out.finish()?;
    let secs = began.elapsed().as_secs_f64();
    if progress {
        eprintln!();
    }
    eprint!("expmon gen: wrote {sent} events in {secs:.2}s ({:.0} events/s){note}", sent as f64 / secs.max(1e-9));
    if let Some(p) = pacer {
        eprint!("; max behind schedule {:.1} ms", p.max_behind.as_secs_f64() * 1000.0);
    }
    eprintln!();
    Ok(())
}
