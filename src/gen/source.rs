//! The generator as an in-process source (`--source gen:PROFILE?...`), and the
//! open-loop [`Pacer`] shared with `expmon gen --rate`.

use std::io;
use std::time::{Duration, Instant};

use super::{GenError, Generator, Profile, REPLAY_START_MS};
use crate::address::{positive, split_query, Keys, OptionError, Options};
use crate::clock::now_ms;
use crate::source::{Discontinuity, Fill, LineBatch, Source};

/// The options of a `gen:` source.
static KEYS: Keys = Keys { known: &["rate", "events", "seed"], passed_on: None };

/// Lines per batch handed to the router.
const LINES_PER_FILL: u64 = 4096;

/// Open-loop schedule: event `i` is due at `start + i / rate`, whatever
/// happened before, so a stalled consumer shows up as time behind schedule
/// instead of a silently lower rate.
#[derive(Debug)]
pub struct Pacer {
    start: Instant,
    rate: f64,
    /// Greatest lateness of a send against its intended time.
    pub max_behind: Duration,
}

impl Pacer {
    pub fn new(rate: f64) -> Pacer {
        Pacer { start: Instant::now(), rate, max_behind: Duration::ZERO }
    }

    /// How many of the first `total` events are due by now.
    pub fn due(&self, total: u64) -> u64 {
        ((self.start.elapsed().as_secs_f64() * self.rate) as u64).min(total)
    }

    /// Intended send time of event `i`.
    pub fn intended(&self, i: u64) -> Instant {
        self.start + Duration::from_secs_f64(i as f64 / self.rate)
    }

    /// Notes that event `i` is being sent now.
    pub fn sent(&mut self, i: u64) {
        let behind = Instant::now().saturating_duration_since(self.intended(i));
        self.max_behind = self.max_behind.max(behind);
    }
}

pub struct GenSource {
    generator: Generator,
    limit: Option<u64>,
    produced: u64,
    pacer: Option<Pacer>,
    line: Vec<u8>,
    spec: String,
}

impl GenSource {
    /// Parses `PROFILE[?rate=EPS&events=N&seed=S]`. The profile's own
    /// experiments shape the traffic, whatever config the engine runs with.
    pub fn from_spec(spec: &str) -> Result<GenSource, GenError> {
        let (name, query) = split_query(spec);
        let profile = Profile::by_name(name)?;
        let options = || -> Result<_, OptionError> {
            let o = Options::parse(query, &KEYS)?;
            let rate = o.value("rate", positive::<f64>)?;
            let events = o.value("events", |v| v.parse::<u64>().map_err(|_| format!("{v:?} is not a count")))?;
            let seed = o.value("seed", |v| v.parse::<u64>().map_err(|_| format!("{v:?} is not a number")))?;
            Ok((rate, events, seed.unwrap_or(1)))
        };
        let (rate, events, seed) =
            options().map_err(|error| GenError::BadSource { spec: format!("gen:{spec}"), error })?;
        Ok(GenSource::new(profile, rate, events, seed, format!("gen:{spec}")))
    }

    pub fn new(mut profile: Profile, rate: Option<f64>, events: Option<u64>, seed: u64, spec: String) -> GenSource {
        let start = if let Some(r) = rate {
            profile.event_time_rate = r;
            now_ms()
        } else {
            REPLAY_START_MS
        };
        GenSource {
            generator: Generator::new(profile, seed, start),
            limit: events,
            produced: 0,
            pacer: rate.map(Pacer::new),
            line: Vec::with_capacity(512),
            spec,
        }
    }
}

impl Source for GenSource {
    fn fill(&mut self, batch: &mut LineBatch) -> io::Result<Fill> {
        batch.clear();
        let limit = self.limit.unwrap_or(u64::MAX);
        let mut n = (limit - self.produced).min(LINES_PER_FILL);
        if let Some(p) = &self.pacer {
            let due = p.due(limit).saturating_sub(self.produced);
            if due == 0 {
                let next = p.intended(self.produced + 1);
                std::thread::sleep(next.saturating_duration_since(Instant::now()).min(Duration::from_millis(5)));
                return Ok(Fill::Lines);
            }
            n = n.min(due);
            self.generator.set_clock(now_ms().max(0));
        }
        for _ in 0..n {
            if let Some(p) = &mut self.pacer {
                p.sent(self.produced);
            }
            self.line.clear();
            self.generator.next_line(&mut self.line);
            batch.push_line(&self.line);
            self.produced += 1;
        }
        Ok(if self.produced >= limit { Fill::End } else { Fill::Lines })
    }

    fn is_live(&self) -> bool {
        self.pacer.is_some()
    }

    fn describe(&self) -> String {
        self.spec.clone()
    }

    fn identity(&self) -> crate::source::SourceId {
        let (kind, name) = (crate::source::SourceKind::Gen, self.spec.clone());
        crate::source::SourceId { kind, name, group: String::new(), file: None }
    }

    /// A simulated-clock replay has no position: resumed, it would generate
    /// and count its events again. A live generator makes new events, so it
    /// continues a checkpoint of the same spec.
    fn continues(&self, saved: &crate::source::SourceId) -> Result<(), Discontinuity> {
        if !self.is_live() {
            return Err(Discontinuity::NoPosition);
        }
        if self.identity() != *saved {
            return Err(Discontinuity::AnotherInput);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_read_and_refused_naming_the_source_and_the_key() {
        let g = GenSource::from_spec("demo?events=5&seed=3").unwrap();
        assert_eq!((g.limit, g.pacer.is_some(), g.spec.as_str()), (Some(5), false, "gen:demo?events=5&seed=3"));
        assert!(GenSource::from_spec("peak?rate=100").unwrap().pacer.is_some());
        let err = |spec| GenSource::from_spec(spec).err().expect(spec).to_string();
        assert_eq!(err("demo?rate=0"), r#"bad generator source "gen:demo?rate=0": rate: "0" is not a positive number"#);
        assert_eq!(err("demo?events=-1"), r#"bad generator source "gen:demo?events=-1": events: "-1" is not a count"#);
        assert_eq!(
            err("demo?seed=1&seed=2"),
            r#"bad generator source "gen:demo?seed=1&seed=2": option "seed" is given twice"#
        );
        assert_eq!(
            err("demo?speed=2"),
            r#"bad generator source "gen:demo?speed=2": unknown option "speed" (expected rate, events, seed)"#
        );
        assert!(err("nosuch?events=1").starts_with("unknown generator profile"));
    }
}
