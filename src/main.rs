//! The `expmon` command line: parse flags, load config, start the engine,
//! print errors as one clear line.

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use expmon::config::{parse_duration_ms, Catalog, Config};
use expmon::names::Names;
use expmon::shard::{self, RunOptions};
use expmon::source::{FileSource, KafkaSource, Source};

/// mimalloc: faster than glibc malloc on the peak replay (see README,
/// "Allocator"); `--no-default-features` builds with the system allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "expmon", version, about = "Real-time A/B-experiment monitoring engine")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log lines as text or JSON (one object per line), on stderr.
    #[arg(long, global = true, value_enum, default_value = "text")]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Logs go to stderr through `tracing`: text (time, level, message) or JSON.
/// librdkafka's own log shows with its `debug` setting.
fn init_logging(format: LogFormat) {
    let builder = tracing_subscriber::fmt().with_writer(std::io::stderr).with_target(false).with_ansi(false);
    let builder = builder.with_max_level(tracing::Level::INFO);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

#[derive(Subcommand)]
enum Command {
    /// Run the engine. With no flags: the embedded demo (built-in config,
    /// generator source, file sink under ./expmon-out/, live status).
    Run(RunArgs),
    /// Generate events (seeded, reproducible).
    Gen(GenArgs),
    /// Check a config file and print what it holds, or the error.
    CheckConfig { file: PathBuf },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Config file (TOML); default: the embedded demo config.
    #[arg(long)]
    config: Option<PathBuf>,
    /// file:PATH (`-` = stdin), kafka://HOST:PORT[,…]/TOPIC[?group=G&dead_letter=T&idle_timeout=D&librdkafka.key=V],
    /// gen:PROFILE[?rate=EPS&events=N&seed=S].
    #[arg(long, default_value = "gen:demo?rate=2000")]
    source: String,
    /// file:PATH, kairosdb:http[s]://[USER:PASS@]HOST:PORT[?batch=N&linger=D&inflight=N&timeout=D&queue=N&drain=D&dead_letter=PATH&ca=PEM], or null.
    #[arg(long, default_value = "file:expmon-out/points.jsonl")]
    sink: String,
    /// Shard worker threads (default: available cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Pin shard workers to cores.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pin: bool,
    /// Stop after this long (e.g. 30s, 5m); default: until the source ends or Ctrl-C.
    #[arg(long)]
    duration: Option<String>,
    /// Override the config's trigger interval (e.g. 5s).
    #[arg(long)]
    trigger: Option<String>,
    /// Checkpoint directory: snapshots of all state and the source position;
    /// an existing checkpoint there is restored at start.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Time between checkpoints (e.g. 30s).
    #[arg(long, default_value = "30s")]
    checkpoint_interval: String,
    /// Set an existing checkpoint aside (renamed, not deleted) and start fresh.
    #[arg(long)]
    checkpoint_reset: bool,
    /// Live status: a refreshed panel on a terminal (with a progress bar for a
    /// file replay), a log line every 10 s otherwise (default true).
    #[arg(long)]
    status: Option<bool>,
    /// `instance` tag of the health metrics (default: the host name).
    #[arg(long)]
    instance: Option<String>,
    /// Address of /metrics (Prometheus) and the results page; `off` for none.
    /// If the default cannot be bound (another instance), the run goes on
    /// without it and says so.
    #[arg(long, default_value = DEFAULT_METRICS_ADDR)]
    metrics_addr: String,
}

const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

#[derive(clap::Args)]
struct GenArgs {
    /// demo or peak.
    #[arg(long, default_value = "demo")]
    profile: String,
    /// Number of lines to write (with --replay: at most this many).
    #[arg(long, required_unless_present = "replay")]
    events: Option<u64>,
    /// Send the lines of this JSON Lines file instead of generated ones (for
    /// example captured logs into a Kafka topic).
    #[arg(long)]
    replay: Option<PathBuf>,
    /// Events per second, open loop (timestamps follow the wall clock); default: as fast as possible.
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// file:PATH, `-`, or kafka://HOST:PORT/TOPIC[?partitions=N&…] (keyed by
    /// session id; the topic is created if missing).
    #[arg(long)]
    out: String,
    /// Also write the profile's experiment config (TOML) here.
    #[arg(long)]
    write_config: Option<PathBuf>,
}

fn main() {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(a) => cmd_run(a, matches!(cli.log_format, LogFormat::Json)),
        Command::Gen(a) => expmon::gen::cli::run_gen(&expmon::gen::cli::GenOptions {
            profile: a.profile,
            events: a.events,
            rate: a.rate,
            seed: a.seed,
            out: a.out,
            write_config: a.write_config,
            replay: a.replay,
        }),
        Command::CheckConfig { file } => cmd_check(&file),
    };
    if let Err(e) = result {
        eprintln!("expmon: error: {e:#}");
        std::process::exit(1);
    }
}

fn cmd_check(file: &std::path::Path) -> Result<()> {
    let config = Config::load(file)?;
    print!("{}: ok\n{}", file.display(), config.summary());
    Ok(())
}

fn cmd_run(a: RunArgs, json_logs: bool) -> Result<()> {
    let config = match &a.config {
        Some(path) => Config::load(path)?,
        None => Config::demo(),
    };
    let (checkpoint, restore) = match &a.checkpoint {
        Some(dir) => open_checkpoint(dir, &a, &config)?,
        None if a.checkpoint_reset => bail!("--checkpoint-reset needs --checkpoint DIR"),
        None => (None, None),
    };
    let catalog = match &restore {
        // The checkpoint's experiments (its state refers to their indices),
        // then the file's applied to them as a reload.
        Some(snap) => {
            let names = Arc::new(snap.router.names());
            let saved = Catalog::build_defs(&config.engine, snap.defs.clone(), names).map_err(anyhow::Error::msg)?;
            let (catalog, summary) = saved.reload(&config).map_err(anyhow::Error::msg)?;
            tracing::info!("experiments of the checkpoint against the config file: {summary}");
            catalog
        }
        None => Catalog::build(&config, Arc::new(Names::default())).map_err(anyhow::Error::msg)?,
    };
    let catalog = Arc::new(catalog);
    let resume = restore.as_ref().map(|s| s.router.positions.clone()).unwrap_or_default();
    let source = open_source(&a.source, &config, &resume)?;
    let sink = expmon::sink::open(&a.sink, &catalog)?;
    let mut opts = RunOptions::new(&catalog, a.threads.unwrap_or_else(shard::default_threads));
    opts.checkpoint = checkpoint;
    opts.restore = restore.map(Arc::new);
    if a.metrics_addr != "off" {
        let addr: std::net::SocketAddr = a
            .metrics_addr
            .parse()
            .with_context(|| format!("--metrics-addr {:?}: expected HOST:PORT or off", a.metrics_addr))?;
        let published = Arc::new(expmon::serve::Published::default());
        let results = Arc::new(std::sync::Mutex::new(expmon::serve::Results::new(catalog.clone())));
        match expmon::serve::spawn(addr, published.clone(), results.clone()) {
            Ok(http) => {
                let bound = http.addr;
                tracing::info!("results page http://{bound}/ · metrics http://{bound}/metrics");
                opts.published = Some(published);
                opts.results = Some(results);
            }
            Err(e) if a.metrics_addr == DEFAULT_METRICS_ADDR => tracing::warn!("{e}; running without it"),
            Err(e) => bail!(e),
        }
    }
    opts.pin = a.pin;
    if let Some(i) = a.instance.filter(|i| !i.is_empty()) {
        opts.instance = i;
    }
    if let Some(t) = &a.trigger {
        opts.trigger =
            Duration::from_millis(parse_duration_ms(t).map_err(anyhow::Error::msg).context("--trigger")? as u64);
    }
    if let Some(d) = &a.duration {
        opts.max_duration =
            Some(Duration::from_millis(parse_duration_ms(d).map_err(anyhow::Error::msg).context("--duration")? as u64));
    }
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, opts.stop.clone()).context("installing signal handler")?;
    }
    if let Some(path) = &a.config {
        // Hot reload: SIGHUP, or the file changing, applies it at the next trigger.
        let requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGHUP, requested.clone()).context("installing SIGHUP")?;
        opts.reload = Some(shard::ReloadOptions { path: path.clone(), requested });
    }
    let show_status = a.status.unwrap_or(true);
    tracing::info!(
        "{} → {} shard threads → {} (trigger {:?}); Ctrl-C to stop",
        source.describe(),
        opts.threads,
        sink.describe(),
        opts.trigger
    );
    let status_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let status = show_status.then(|| expmon::health::spawn_status(opts.live.clone(), status_stop.clone()));
    let result = shard::run(catalog, source, sink, opts);
    status_stop.store(true, std::sync::atomic::Ordering::Relaxed);
    if let Some(h) = status {
        let _ = h.join();
    }
    let summary = result?;
    if json_logs {
        tracing::info!(events_in = summary.router.events_in, elapsed_s = summary.elapsed.as_secs_f64(), "{summary}");
    } else {
        eprintln!("{summary}");
    }
    if summary.sink.undelivered > 0 {
        bail!("{} upserts could not be delivered to {} before the drain deadline", summary.sink.undelivered, a.sink);
    }
    Ok(())
}

/// Prepares `--checkpoint DIR`: creates it, sets an old checkpoint aside on
/// request, and loads the one there (refusing an unusable one).
fn open_checkpoint(
    dir: &std::path::Path,
    a: &RunArgs,
    config: &Config,
) -> Result<(Option<shard::CheckpointOptions>, Option<expmon::checkpoint::Snapshot>)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating checkpoint directory {}", dir.display()))?;
    if a.checkpoint_reset {
        if let Some(aside) = expmon::checkpoint::set_aside(dir)? {
            tracing::warn!("checkpoint set aside as {}; starting fresh", aside.display());
        }
    }
    let interval =
        parse_duration_ms(&a.checkpoint_interval).map_err(anyhow::Error::msg).context("--checkpoint-interval")?;
    let fingerprint = expmon::checkpoint::fingerprint(config);
    let snapshot = expmon::checkpoint::load(dir, fingerprint).map_err(anyhow::Error::msg)?;
    if let Some(s) = &snapshot {
        let sessions: usize = s.shards.iter().map(Vec::len).sum();
        tracing::info!(
            "restoring the checkpoint written {:.1}s ago ({} points, {} KiB of sessions, {} positions)",
            (expmon::health::now_ms() - s.created_ms) as f64 / 1000.0,
            s.totals.len(),
            sessions / 1024,
            s.router.positions.len()
        );
    }
    let opts = shard::CheckpointOptions {
        dir: dir.to_path_buf(),
        interval: Duration::from_millis(interval.max(1) as u64),
        fingerprint,
    };
    Ok((Some(opts), snapshot))
}

fn open_source(spec: &str, config: &Config, resume: &expmon::source::Offsets) -> Result<Box<dyn Source>> {
    if let Some(path) = spec.strip_prefix("file:") {
        let offset = resume.iter().find(|(p, _)| *p == 0).map_or(0, |&(_, o)| o.max(0) as u64);
        return Ok(Box::new(FileSource::open_at(path, offset)?));
    }
    if let Some(rest) = spec.strip_prefix("gen:") {
        return Ok(Box::new(expmon::gen::GenSource::from_spec(rest, config).map_err(anyhow::Error::msg)?));
    }
    if spec.starts_with("kafka://") {
        let kafka = expmon::kafka::KafkaSpec::parse(spec).map_err(anyhow::Error::msg)?;
        return Ok(Box::new(KafkaSource::connect(kafka, &config.kafka, resume).map_err(anyhow::Error::msg)?));
    }
    bail!("bad source {spec:?}: expected file:PATH, kafka://HOST:PORT/TOPIC, gen:PROFILE[?rate=EPS&events=N&seed=S]")
}
