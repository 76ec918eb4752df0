//! The `expmon` command line: parse flags, load config, start the engine,
//! print errors as one clear line.

use anyhow::{bail, Context, Result};
use clap::{CommandFactory, Parser, Subcommand};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use expmon::config::{parse_duration_ms, Catalog, Config, DurationError};
use expmon::gen::GenError;
use expmon::kafka::KafkaError;
use expmon::names::Names;
use expmon::shard::{self, RunOptions};
use expmon::sink::SinkError;
use expmon::source::{FileSource, KafkaSource, Source};

/// mimalloc: faster than glibc malloc on the peak replay (see README,
/// "Allocator"); `--no-default-features` builds with the system allocator.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option (v3: `mi_option_purge_delay`).
#[cfg(feature = "mimalloc")]
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How long mimalloc keeps freed memory before it gives it back to the OS.
/// Its default, 10 ms, made the engine fault in (and the kernel zero) the
/// same memory again and again: per-minute tables and session memory freed
/// at one flush are wanted again at the next. 1 s cut the CPU per event of a
/// sparse replay by ~10%; 10 s cut the page faults of a 4-hour sparse replay
/// from ~1,500–2,700 to ~500 (README, "Allocator"). `MIMALLOC_PURGE_DELAY` in
/// the environment still wins.
#[cfg(feature = "mimalloc")]
fn set_allocator_options() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
        // SAFETY: `mi_option_set` only stores an option value (an atomic
        // store in mimalloc); 15 is `mi_option_purge_delay` in the bundled
        // mimalloc v3 header, and any value is valid for it.
        unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, 10_000) };
    }
}

#[cfg(not(feature = "mimalloc"))]
fn set_allocator_options() {}

#[derive(Parser)]
#[command(
    name = "expmon",
    version = VERSION,
    about = "Real-time A/B-experiment monitoring engine",
    long_about = "Real-time A/B-experiment monitoring engine: reads web and app events (JSON Lines from \
                  Kafka, a file or its generator), sessionizes them, corrects out-of-order data and \
                  writes exact per-minute metrics per experiment and variation to KairosDB or a file.",
    after_help = "Examples:\n  expmon run                                   # the embedded demo\n  \
                  expmon run --config /etc/expmon/expmon.toml --source kafka://k1:9092/events?group=expmon \\\n  \
                  \x20         --sink kairosdb:http://kairos:8080 --checkpoint /var/lib/expmon/checkpoint\n  \
                  expmon check-config /etc/expmon/expmon.toml\n\n\
                  Exit status: 0 done, 1 a run or start failure, 2 a bad flag."
)]
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

/// `expmon --version`: the package version and the commit it was built from.
const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("EXPMON_COMMIT"), ")");

#[derive(Subcommand)]
enum Command {
    /// Run the engine. With no flags: the embedded demo (built-in config,
    /// generator source, file sink under ./expmon-out/, live status).
    #[command(after_help = "Examples:\n  \
        expmon run\n  \
        expmon run --config exp.toml --source file:events.jsonl --sink file:points.jsonl --threads 2\n  \
        expmon run --config exp.toml --source 'kafka://k1:9092,k2:9092/events?group=expmon&dead_letter=events-bad' \\\n  \
        \x20         --sink 'kairosdb:http://kairos:8080?batch=5000' --checkpoint /var/lib/expmon/checkpoint")]
    Run(RunArgs),
    /// Generate events (seeded, reproducible).
    #[command(after_help = "Examples:\n  \
        expmon gen --profile peak --events 1000000 --seed 1 --out file:peak.jsonl --write-config peak.toml\n  \
        expmon gen --profile demo --events 100000 --rate 2000 --out kafka://localhost:9092/events?partitions=8")]
    Gen(GenArgs),
    /// Check a config file and print what it holds, or the error.
    #[command(after_help = "Example:\n  expmon check-config /etc/expmon/expmon.toml")]
    CheckConfig { file: PathBuf },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell) to stdout.
    #[command(after_help = "Example:\n  expmon completions bash > /usr/share/bash-completion/completions/expmon")]
    Completions { shell: clap_complete::Shell },
    /// Print the man page (roff) to stdout, or write the pages of expmon and
    /// of each subcommand (expmon.1, expmon-run.1, …) into DIR.
    #[command(after_help = "Examples:\n  expmon man | man -l -\n  expmon man /usr/share/man/man1")]
    Man { dir: Option<PathBuf> },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Config file (TOML) [default: the embedded demo config].
    #[arg(long)]
    config: Option<PathBuf>,
    /// file:PATH (`-` = stdin), kafka://HOST:PORT[,…]/TOPIC[?group=G&dead_letter=T&idle_timeout=D&librdkafka.key=V],
    /// gen:PROFILE[?rate=EPS&events=N&seed=S].
    #[arg(long, default_value = "gen:demo?rate=2000")]
    source: String,
    /// file:PATH, kairosdb:http[s]://[USER:PASS@]HOST:PORT[?batch=N&linger=D&inflight=N&timeout=D&queue=N&drain=D&dead_letter=PATH&ca=PEM], or null.
    #[arg(long, default_value = "file:expmon-out/points.jsonl")]
    sink: String,
    /// Shard worker threads, 1 to 1024 [default: one per available core].
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=MAX_THREADS as i64))]
    threads: Option<u16>,
    /// Pin shard workers to cores [default: true].
    #[arg(long, action = clap::ArgAction::Set)]
    pin: Option<bool>,
    /// Stop after this long (e.g. 30s, 5m) [default: until the source ends or Ctrl-C].
    #[arg(long, value_parser = positive_duration)]
    duration: Option<Duration>,
    /// How often changed totals are written (e.g. 5s) [default: the config's `trigger`].
    #[arg(long, value_parser = positive_duration)]
    trigger: Option<Duration>,
    /// Checkpoint directory: snapshots of all state and the source position;
    /// an existing checkpoint there is restored at start.
    #[arg(long)]
    checkpoint: Option<PathBuf>,
    /// Time between checkpoints (e.g. 30s) [default: 30s].
    #[arg(long, value_parser = positive_duration)]
    checkpoint_interval: Option<Duration>,
    /// Set an existing checkpoint aside (renamed, not deleted) and start fresh.
    #[arg(long)]
    checkpoint_reset: bool,
    /// Live status: a refreshed panel on a terminal (with a progress bar for a
    /// file replay), a log line every 10 s otherwise [default: true].
    #[arg(long, action = clap::ArgAction::Set)]
    status: Option<bool>,
    /// `instance` tag of the health metrics [default: the host name].
    #[arg(long, value_parser = tag_value)]
    instance: Option<String>,
    /// Address of /metrics (Prometheus) and the results page, HOST:PORT or
    /// `off` [default: 127.0.0.1:9464]. If the default cannot be bound (another
    /// instance), the run goes on without it and says so; an address given
    /// here that cannot be bound is an error.
    #[arg(long, value_parser = metrics_addr)]
    metrics_addr: Option<MetricsAddr>,
    /// Run as one of N instances of a Kafka group that together write one
    /// instance's exact totals (two stages through Kafka; docs/scale-out.md).
    /// Needs a kafka:// source; every instance needs its own --instance.
    #[arg(long)]
    scale_out: bool,
    /// With --scale-out: partitions of the internal topics `<group>.deltas`
    /// and `<group>.totals` when this instance creates them [default: 8].
    #[arg(long, value_parser = clap::value_parser!(i32).range(1..=1024))]
    delta_partitions: Option<i32>,
    /// With --scale-out: a stage-1 task snapshots its state to `<group>.state`
    /// every N triggers; a new owner restores the last snapshot and replays
    /// the input since it silently (docs/scale-out.md §2).
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    snapshot_every: u32,
}

const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";

/// Most shard threads: far more than any machine's cores, and few enough that
/// their queues and threads can always be made.
const MAX_THREADS: u16 = 1024;

/// `--metrics-addr`: an address, or `off`.
#[derive(Clone, Copy, Debug)]
enum MetricsAddr {
    Off,
    At(std::net::SocketAddr),
}

/// A flag value that does not parse; clap prints it after the flag's name.
#[derive(Debug, thiserror::Error)]
enum FlagError {
    #[error("expected HOST:PORT (an IP address and a port) or off")]
    MetricsAddr,
    #[error(transparent)]
    Duration(#[from] DurationError),
    #[error("must be more than 0")]
    Zero,
    #[error("expected 1 to 64 of [A-Za-z0-9._/-]")]
    Tag,
    #[error("expected events per second, a number above 0")]
    Rate,
    #[error("expected a share, a number from 0 to 1")]
    Share,
}

fn metrics_addr(s: &str) -> Result<MetricsAddr, FlagError> {
    if s == "off" {
        return Ok(MetricsAddr::Off);
    }
    s.parse().map(MetricsAddr::At).map_err(|_| FlagError::MetricsAddr)
}

/// A duration flag: `parse_duration_ms`'s syntax, more than zero.
fn positive_duration(s: &str) -> Result<Duration, FlagError> {
    match parse_duration_ms(s)? {
        0 => Err(FlagError::Zero),
        ms => Ok(Duration::from_millis(ms as u64)),
    }
}

/// A tag value as KairosDB accepts it: 1 to 64 of `[A-Za-z0-9._/-]`.
fn tag_value(s: &str) -> Result<String, FlagError> {
    let ok = |c: u8| c.is_ascii_alphanumeric() || b"._/-".contains(&c);
    if s.is_empty() || s.len() > 64 || !s.bytes().all(ok) {
        return Err(FlagError::Tag);
    }
    Ok(s.to_string())
}

/// Events per second for `gen --rate`: a finite number above zero.
fn positive_rate(s: &str) -> Result<f64, FlagError> {
    match s.parse::<f64>() {
        Ok(r) if r.is_finite() && r > 0.0 => Ok(r),
        _ => Err(FlagError::Rate),
    }
}

/// A share for `gen --assign-every`: a number from 0 to 1.
fn share(s: &str) -> Result<f64, FlagError> {
    match s.parse::<f64>() {
        Ok(f) if (0.0..=1.0).contains(&f) => Ok(f),
        _ => Err(FlagError::Share),
    }
}

/// A flag that is wrong in itself: one line, exit status 2 (as clap's own).
#[derive(Debug, thiserror::Error)]
enum UsageError {
    #[error("--checkpoint-reset needs --checkpoint DIR")]
    ResetWithoutCheckpoint,
    /// The `--source` value, its secrets hidden.
    #[error("bad source {0:?}: expected file:PATH, kafka://HOST:PORT/TOPIC, gen:PROFILE[?rate=EPS&events=N&seed=S]")]
    Source(String),
    #[error(transparent)]
    Gen(#[from] GenError),
    #[error(transparent)]
    Kafka(#[from] KafkaError),
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error("--scale-out keeps its state in Kafka: drop --checkpoint")]
    ScaleOutCheckpoint,
    #[error("--scale-out needs a kafka:// source")]
    ScaleOutSource,
    /// A `run` flag that the scale-out mode cannot honour, and why.
    #[error("--scale-out {0}")]
    ScaleOutFlag(&'static str),
    #[error("--delta-partitions needs --scale-out (it sizes the scale-out mode's internal topics)")]
    DeltaPartitionsWithoutScaleOut,
}

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
    #[arg(long, value_parser = positive_rate)]
    rate: Option<f64>,
    /// Events per second of event time, for replays (the profile's own by
    /// default: peak 60000, demo 1000); with --events it sets the span, e.g.
    /// --events 1980000 --event-rate 550 is one hour.
    #[arg(long, value_parser = positive_rate, conflicts_with = "rate")]
    event_rate: Option<f64>,
    /// Share (0 to 1) of a session's later events that carry its full
    /// assignment map; its first event always does. 1: every event, as real
    /// beacons carry the assignment cookie (default: the profile's, 0.25).
    #[arg(long, value_parser = share)]
    assign_every: Option<f64>,
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
    set_allocator_options();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if !e.use_stderr() => e.exit(), // --help, --version
        Err(e) => {
            // clap's first line names the problem; its tips and usage follow
            // on more lines, which `--help` shows anyway.
            let text = e.render().to_string();
            let first = text.lines().next().unwrap_or("bad command line");
            let words: Vec<String> =
                first.trim_start_matches("error: ").split(' ').map(expmon::redact::redact).collect();
            eprintln!("expmon: error: {}", words.join(" "));
            std::process::exit(2);
        }
    };
    init_logging(cli.log_format);
    let result = match cli.command {
        Command::Run(a) => cmd_run(a, matches!(cli.log_format, LogFormat::Json)),
        Command::Gen(a) => expmon::gen::cli::run_gen(&expmon::gen::cli::GenOptions {
            profile: a.profile,
            events: a.events,
            rate: a.rate,
            event_rate: a.event_rate,
            assign_every: a.assign_every,
            seed: a.seed,
            out: a.out,
            write_config: a.write_config,
            replay: a.replay,
        })
        .map_err(anyhow::Error::from),
        Command::CheckConfig { file } => cmd_check(&file),
        Command::Completions { shell } => {
            let mut out = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "expmon", &mut out);
            print_out(&out)
        }
        Command::Man { dir: Some(dir) } => std::fs::create_dir_all(&dir)
            .and_then(|()| clap_mangen::generate_to(Cli::command(), &dir))
            .with_context(|| format!("writing man pages into {}", dir.display())),
        Command::Man { dir: None } => {
            let mut out = Vec::new();
            match clap_mangen::Man::new(Cli::command()).render(&mut out) {
                Ok(()) => print_out(&out),
                Err(e) => Err(e).context("rendering the man page"),
            }
        }
    };
    if let Err(e) = result {
        eprintln!("expmon: error: {e:#}");
        std::process::exit(if e.is::<UsageError>() { 2 } else { 1 });
    }
}

fn cmd_check(file: &std::path::Path) -> Result<()> {
    let config = Config::load(file)?;
    print_out(format!("{}: ok\n{}", file.display(), config.summary()).as_bytes())
}

/// Writes a command's output to stdout; a reader that went away (`| head`)
/// is not an error.
fn print_out(bytes: &[u8]) -> Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e).context("writing to stdout"),
        _ => Ok(()),
    }
}

fn cmd_run(a: RunArgs, json_logs: bool) -> Result<()> {
    let config = match &a.config {
        Some(path) => Config::load(path)?,
        None => Config::demo(),
    };
    if a.scale_out {
        return cmd_scale_out(a, config, json_logs);
    }
    if a.delta_partitions.is_some() {
        return Err(UsageError::DeltaPartitionsWithoutScaleOut.into());
    }
    // `_lock` is held until the run ends: one run per checkpoint directory.
    let (checkpoint, restore, _lock) = match &a.checkpoint {
        Some(dir) => {
            let (interval, fingerprint, snapshot, lock) = open_checkpoint(dir, &a, &config)?;
            (Some((dir, interval, fingerprint)), snapshot, Some(lock))
        }
        None if a.checkpoint_reset => return Err(UsageError::ResetWithoutCheckpoint.into()),
        None => (None, None, None),
    };
    let resume = restore.as_ref().map(|s| s.router.positions.clone()).unwrap_or_default();
    let source = open_source(&a.source, &config, &resume)?;
    if let (Some(snap), Some((dir, _, _))) = (&restore, &checkpoint) {
        if let Err(why) = source.continues(&snap.source) {
            bail!(
                "checkpoint in {} was taken reading {}; this run reads {} ({why}); use --checkpoint-reset to start fresh",
                dir.display(),
                snap.source,
                source.identity()
            );
        }
        let sessions: usize = snap.shards.iter().map(Vec::len).sum();
        tracing::info!(
            "restoring the checkpoint written {:.1}s ago ({} points, {} KiB of sessions, {} positions)",
            (expmon::clock::now_ms() - snap.created_ms) as f64 / 1000.0,
            snap.totals.len(),
            sessions / 1024,
            snap.router.positions.len()
        );
    }
    let catalog = match &restore {
        // The checkpoint's experiments (its state refers to their indices),
        // then the file's applied to them as a reload.
        Some(snap) => {
            let names = Arc::new(snap.router.names());
            let saved = Catalog::build_defs(&config.engine, snap.defs.clone(), names)?;
            let (catalog, summary) = saved.reload(&config)?;
            tracing::info!("experiments of the checkpoint against the config file: {summary}");
            catalog
        }
        None => Catalog::build(&config, Arc::new(Names::default()))?,
    };
    let catalog = Arc::new(catalog);
    let checkpoint = checkpoint.map(|(dir, interval, fingerprint)| expmon::checkpoint::CheckpointOptions {
        dir: dir.clone(),
        interval,
        fingerprint,
        source: source.identity(),
    });
    let threads = a.threads.map_or_else(shard::default_threads, usize::from);
    let mut opts = RunOptions::new(&catalog, threads.min(MAX_THREADS as usize));
    // A restored run continues the output of the runs before it.
    let sink = match expmon::sink::open(&a.sink, &catalog, &opts.failures, restore.is_some()) {
        Ok(sink) => sink,
        Err(e @ (SinkError::BadSpec(_) | SinkError::BadOption { .. })) => return Err(UsageError::Sink(e).into()),
        Err(e) => return Err(e.into()),
    };
    opts.checkpoint = checkpoint;
    opts.restore = restore.map(Arc::new);
    let (addr, explicit) = match a.metrics_addr {
        Some(MetricsAddr::Off) => (None, true),
        Some(MetricsAddr::At(addr)) => (Some(addr), true),
        None => (Some(DEFAULT_METRICS_ADDR.parse().expect("a socket address")), false),
    };
    if let Some(addr) = addr {
        let published = Arc::new(expmon::serve::Published::default());
        let results = Arc::new(std::sync::Mutex::new(expmon::serve::Results::new(catalog.clone())));
        match expmon::serve::spawn(addr, published.clone(), Some(results.clone()), &opts.failures) {
            Ok(http) => {
                let bound = http.addr;
                tracing::info!("results page http://{bound}/ · metrics http://{bound}/metrics");
                opts.published = Some(published);
                opts.results = Some(results);
            }
            Err(e) if !explicit => tracing::warn!("{e}; running without it"),
            Err(e) => return Err(e.into()), // names the flag and the address
        }
    }
    opts.pin = a.pin.unwrap_or(true);
    if let Some(i) = a.instance {
        opts.instance = i;
    }
    if let Some(t) = a.trigger {
        opts.trigger = t;
    }
    opts.max_duration = a.duration;
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, opts.stop.clone()).context("installing signal handler")?;
    }
    if let Some(path) = &a.config {
        // Hot reload: SIGHUP, or the file changing, applies it at the next trigger.
        let requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
        signal_hook::flag::register(signal_hook::consts::SIGHUP, requested.clone()).context("installing SIGHUP")?;
        opts.reload = Some(expmon::config::ReloadOptions { path: path.clone(), requested });
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
    let mut lost = Vec::new();
    if summary.sink.undelivered > 0 {
        lost.push(format!(
            "{} upserts could not be delivered to {} before the drain deadline",
            summary.sink.undelivered,
            expmon::redact::redact(&a.sink)
        ));
    }
    if summary.sink.refused > 0 {
        lost.push(format!("{} upserts {}", summary.sink.refused, summary.sink.refused_detail));
    }
    if !lost.is_empty() {
        bail!("{}", lost.join("; "));
    }
    Ok(())
}

/// Prepares `--checkpoint DIR`: creates it, sets an old checkpoint aside on
/// request, and loads the one there (refusing an unusable one). Returns the
/// interval, the config's fingerprint and the snapshot; whether the snapshot
/// fits the source is checked once the source is open.
fn open_checkpoint(
    dir: &std::path::Path,
    a: &RunArgs,
    config: &Config,
) -> Result<(Duration, u64, Option<expmon::checkpoint::Snapshot>, std::fs::File)> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating checkpoint directory {}", dir.display()))?;
    let lock = expmon::checkpoint::lock_dir(dir)?;
    if a.checkpoint_reset {
        if let Some(aside) = expmon::checkpoint::set_aside(dir)? {
            tracing::warn!("checkpoint set aside as {}; starting fresh", aside.display());
        }
    }
    let fingerprint = expmon::checkpoint::fingerprint(config);
    let snapshot = expmon::checkpoint::load(dir, fingerprint)?;
    Ok((a.checkpoint_interval.unwrap_or(Duration::from_secs(30)), fingerprint, snapshot, lock))
}

/// `run --scale-out`: this instance's share of both stages until stopped.
fn cmd_scale_out(a: RunArgs, config: Config, json_logs: bool) -> Result<()> {
    if a.checkpoint.is_some() {
        return Err(UsageError::ScaleOutCheckpoint.into());
    }
    if !a.source.starts_with("kafka://") {
        return Err(UsageError::ScaleOutSource.into());
    }
    let spec = expmon::kafka::KafkaSpec::parse(&a.source).map_err(UsageError::Kafka)?;
    // What the single path has and this mode does not (docs/scale-out.md §6):
    // refused in one line rather than ignored.
    let source_has = |key: &str| {
        let query = a.source.split_once('?').map_or("", |(_, q)| q);
        query.split('&').any(|kv| kv.split('=').next() == Some(key))
    };
    for (given, why) in [
        (a.checkpoint_reset, "keeps its state in Kafka: drop --checkpoint-reset"),
        (a.checkpoint_interval.is_some(), "keeps its state in Kafka: drop --checkpoint-interval"),
        (a.threads.is_some(), "runs one thread per stage (add instances to add cores): drop --threads"),
        (a.pin.is_some(), "has no shard workers to pin: drop --pin"),
        (
            source_has("idle_timeout"),
            "does not take the source option idle_timeout (a minute is final only once every input partition \
             passed it, quiet or not): drop it",
        ),
        (
            source_has("until_end"),
            "does not take the source option until_end (the group runs until each instance is stopped; use \
             --duration): drop it",
        ),
    ] {
        if given {
            return Err(UsageError::ScaleOutFlag(why).into());
        }
    }
    let catalog = Arc::new(Catalog::build(&config, Arc::new(Names::default())).map_err(anyhow::Error::msg)?);
    let failures = expmon::failures::Failures::default();
    let sink = match expmon::sink::open(&a.sink, &catalog, &failures, false) {
        Ok(sink) => sink,
        Err(e @ (SinkError::BadSpec(_) | SinkError::BadOption { .. })) => return Err(UsageError::Sink(e).into()),
        Err(e) => return Err(e.into()),
    };
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, stop.clone()).context("installing signal handler")?;
    }
    // `/metrics` serves the scale-out health figures; no results page (serve::NO_RESULTS).
    let mut published = None;
    let (addr, explicit) = match a.metrics_addr {
        Some(MetricsAddr::Off) => (None, true),
        Some(MetricsAddr::At(addr)) => (Some(addr), true),
        None => (Some(DEFAULT_METRICS_ADDR.parse().expect("a socket address")), false),
    };
    if let Some(addr) = addr {
        let p = Arc::new(expmon::serve::Published::default());
        match expmon::serve::spawn(addr, p.clone(), None, &failures) {
            Ok(http) => {
                tracing::info!("metrics http://{}/metrics", http.addr);
                published = Some(p);
            }
            Err(e) if !explicit => tracing::warn!("{e}; running without it"),
            Err(e) => bail!(e),
        }
    }
    let options = expmon::scale::ScaleOptions {
        spec,
        base: config.kafka.clone(),
        delta_partitions: a.delta_partitions.unwrap_or(8),
        snapshot_every: a.snapshot_every,
        instance: a.instance.clone().unwrap_or_else(expmon::health::default_instance),
        trigger: a.trigger.unwrap_or(Duration::from_millis(config.engine.trigger_ms)),
        stop,
        max_duration: a.duration,
        failures,
        published,
        dc: config.engine.dc.clone(),
        status: a.status.unwrap_or(true),
        reload: match &a.config {
            // SIGHUP or a change of the file: refused in one line (scale::ReloadRefusal).
            Some(path) => {
                let requested = Arc::new(std::sync::atomic::AtomicBool::new(false));
                signal_hook::flag::register(signal_hook::consts::SIGHUP, requested.clone())
                    .context("installing SIGHUP")?;
                Some(expmon::config::ReloadOptions { path: path.clone(), requested })
            }
            None => None,
        },
    };
    let summary = expmon::scale::run(config, catalog, sink, options).map_err(anyhow::Error::msg)?;
    if json_logs {
        tracing::info!(events_in = summary.stage1.router.events_in, "{summary}");
    } else {
        eprintln!("{summary}");
    }
    Ok(())
}

fn open_source(spec: &str, config: &Config, resume: &expmon::source::Offsets) -> Result<Box<dyn Source>> {
    if let Some(path) = spec.strip_prefix("file:") {
        // Stdin has no position: a checkpoint of another input is refused by
        // its identity after this.
        let offset = resume.iter().find(|(p, _)| *p == 0 && path != "-").map_or(0, |&(_, o)| o.max(0) as u64);
        return Ok(Box::new(FileSource::open_at(path, offset)?));
    }
    if let Some(rest) = spec.strip_prefix("gen:") {
        return Ok(Box::new(expmon::gen::GenSource::from_spec(rest).map_err(UsageError::Gen)?));
    }
    if spec.starts_with("kafka://") {
        let kafka = expmon::kafka::KafkaSpec::parse(spec).map_err(UsageError::Kafka)?;
        return Ok(Box::new(KafkaSource::connect(kafka, &config.kafka, resume)?));
    }
    let shown = expmon::redact::redact(spec);
    Err(UsageError::Source(shown).into())
}
