//! `expmon gen`: write generated events to a file, stdout or a Kafka topic.

use anyhow::{bail, Context, Result};
use std::io::{BufWriter, Write};
use std::path::Path;
use std::time::Instant;

use super::kafka::KafkaOut;
use super::{Generator, Pacer, Profile, REPLAY_START_MS};
use crate::health::now_ms;

pub fn run_gen(
    profile: &str,
    events: u64,
    rate: Option<f64>,
    seed: u64,
    out: &str,
    write_config: Option<&Path>,
) -> Result<()> {
    let mut profile = Profile::by_name(profile).map_err(anyhow::Error::msg)?;
    if let Some(path) = write_config {
        std::fs::write(path, profile.config_toml()).with_context(|| format!("writing {}", path.display()))?;
    }
    let mut kafka = None;
    let sink: Box<dyn Write> = if out == "-" {
        Box::new(std::io::stdout().lock())
    } else if let Some(path) = out.strip_prefix("file:") {
        Box::new(std::fs::File::create(path).with_context(|| format!("creating {path}"))?)
    } else if out.starts_with("kafka://") {
        kafka = Some(KafkaOut::open(out).map_err(anyhow::Error::msg)?);
        Box::new(std::io::sink())
    } else {
        bail!("bad --out {out:?}: expected file:PATH, - or kafka://HOST:PORT/TOPIC");
    };
    let mut w = BufWriter::with_capacity(1 << 20, sink);
    let start = match rate {
        Some(r) => {
            profile.event_time_rate = r;
            now_ms()
        }
        None => REPLAY_START_MS,
    };
    let mut g = Generator::new(profile, seed, start);
    let mut pacer = rate.map(Pacer::new);
    let began = Instant::now();
    let mut line = Vec::with_capacity(512);
    let mut last_report = Instant::now();
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    for i in 0..events {
        if let Some(p) = &mut pacer {
            let due = p.intended(i);
            let now = Instant::now();
            if due > now {
                w.flush()?;
                std::thread::sleep(due - now);
            }
            g.set_clock(now_ms());
            p.sent(i);
        }
        line.clear();
        g.next_line(&mut line);
        if let Some(k) = &kafka {
            k.send(&line).map_err(anyhow::Error::msg)?;
        } else {
            line.push(b'\n');
            w.write_all(&line)?;
        }
        if progress && last_report.elapsed().as_secs_f64() >= 0.5 {
            last_report = Instant::now();
            let pct = 100.0 * i as f64 / events as f64;
            let bar = "#".repeat((pct / 5.0) as usize);
            eprint!("\r[{bar:<20}] {pct:5.1}%  {i}/{events} events");
        }
    }
    w.flush()?;
    if let Some(k) = kafka {
        let delivered = k.finish().map_err(anyhow::Error::msg)?;
        eprintln!("expmon gen: {delivered} events acknowledged by Kafka");
    }
    let secs = began.elapsed().as_secs_f64();
    if progress {
        eprintln!();
    }
    eprint!("expmon gen: wrote {events} events in {secs:.2}s ({:.0} events/s)", events as f64 / secs.max(1e-9));
    if let Some(p) = pacer {
        eprint!("; max behind schedule {:.1} ms", p.max_behind.as_secs_f64() * 1000.0);
    }
    eprintln!();
    Ok(())
}
