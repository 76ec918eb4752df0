//! Per-stage benchmarks on `peak`-profile data: parse, route (parse + resolve +
//! watermark + batch), sessionize (session state + per-minute counters), merge
//! (writer totals) and encode (file-sink JSON). Parse, route, sessionize,
//! the counters alone (one counter per call, and one event's cells per call)
//! and merge also run on the `sparse` shape of `perf/shapes.sh` (every event
//! carries its assignments, 125 events/s of event time: few events per region
//! and minute). Throughput is in events (or deltas, points) per second.
//!
//! The router's stages (`parse`, `route`) are timed in CPU time of the
//! benchmark thread ([`ThreadCpu`]), not wall time: on a shared machine a
//! thread that waits for a core is not slower. The other stages in wall time.
//!
//! Run: `cargo bench --bench stages` (add `-- --quick` for a short run).

use criterion::measurement::{Measurement, ValueFormatter, WallTime};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::sync::Arc;

use expmon::aggregate::{CellAdd, Delta, MinuteCounters, Namer, Point, SeriesKey, Totals, NO_MP};
use expmon::config::{Catalog, VisitSlot};
use expmon::event::{parse_event, ParseScratch};
use expmon::gen::{Generator, Profile, REPLAY_START_MS};
use expmon::names::Names;
use expmon::shard::{EventBatch, Router, Worker};

/// The binary's allocator, so stage costs match `expmon run`.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Events per iteration: a window of a steady `peak` stream, after a warm-up
/// of the same length. Most sessions of the window start inside it, so the
/// sessionize figure is weighted towards first events (assignment of ~20
/// experiments each), the most expensive kind.
const EVENTS: usize = 50_000;

/// The `sparse` shape: `expmon gen --profile peak --assign-every 1 --event-rate 125`.
fn sparse_profile() -> Profile {
    let mut p = Profile::peak();
    p.assign_repeat_fraction = 1.0;
    p.event_time_rate = 125.0;
    p
}

fn lines_of(profile: Profile) -> (Profile, Vec<Vec<u8>>) {
    let mut g = Generator::new(profile.clone(), 42, REPLAY_START_MS);
    // Skip the warm-up so sessions are mid-life, as in steady state.
    let mut line = Vec::new();
    for _ in 0..EVENTS {
        line.clear();
        g.next_line(&mut line);
    }
    let lines = (0..EVENTS)
        .map(|_| {
            let mut l = Vec::new();
            g.next_line(&mut l);
            l
        })
        .collect();
    (profile, lines)
}

fn catalog(profile: &Profile) -> Arc<Catalog> {
    Arc::new(Catalog::build(&profile.config, Arc::new(Names::default())).unwrap())
}

/// Routes `lines` through a one-shard router and returns its batches.
fn routed(catalog: &Arc<Catalog>, lines: &[Vec<u8>]) -> Vec<EventBatch> {
    let mut router = Router::new(catalog.clone(), 1);
    let mut batches = Vec::new();
    for l in lines {
        if matches!(router.route(l, 0, None), Ok(Some(_))) {
            batches.push(router.take_batch(0, None));
        }
    }
    batches.push(router.take_batch(0, None));
    batches
}

/// The deltas of one shard's flush after `batches`.
fn drained(catalog: &Arc<Catalog>, batches: &[EventBatch]) -> Vec<Delta> {
    let mut w = Worker::new(0, catalog.clone());
    for batch in batches {
        w.apply(batch);
    }
    w.drain_deltas(i64::MIN)
}

/// The writer's merge as at a flush of two shards: both halves of `deltas`
/// applied, every due point taken, every minute final (so the next round
/// reuses what this one held).
fn bench_merge(g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>, name: &str, deltas: &[Delta]) {
    g.throughput(Throughput::Elements(deltas.len() as u64));
    g.bench_function(name, |b| {
        let (a, z) = deltas.split_at(deltas.len() / 2);
        let mut t = Totals::new();
        let mut out = Vec::new();
        b.iter(|| {
            t.apply(a);
            t.apply(z);
            out.clear();
            t.take_due(i64::MAX, &mut out);
            out.len()
        });
    });
}

/// The counters alone: every delta of `deltas` added once (in drain order,
/// which groups a region's variations as an event does), then drained.
fn bench_counters(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    catalog: &Arc<Catalog>,
    deltas: &[Delta],
) {
    let adds: Vec<(SeriesKey, Option<VisitSlot>, i64, i64)> = deltas
        .iter()
        .map(|d| {
            let v = d.key.variation();
            let x = &catalog.experiments[catalog.variations[v as usize].experiment as usize];
            let slot =
                (d.key.mp() != NO_MP).then(|| x.visit_slot(d.key.mp(), v).expect("the variation reports the mp"));
            (d.key, slot, d.minute, d.delta)
        })
        .collect();
    g.throughput(Throughput::Elements(adds.len() as u64));
    g.bench_function(name, |b| {
        let mut c = MinuteCounters::new(catalog.clone());
        let mut out = Vec::new();
        b.iter(|| {
            for &(key, slot, ts, delta) in &adds {
                match slot {
                    Some(s) => c.add_visit(key, s, ts, delta),
                    None => c.add_session(key, ts, delta),
                }
            }
            out.clear();
            c.drain(&mut out);
            out.len()
        });
    });
}

/// The counters fed as the session code feeds them: one `add_cells` per
/// (event, region), with the changes of each variation summed. The deltas of
/// a region's cell, consecutive in drain order, make one [`CellAdd`]; a
/// region's cells go in groups of `PER_EVENT`, about the variations an event
/// of `peak` reports at its mp (~20 experiments, a third of which list it).
fn bench_cells(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    catalog: &Arc<Catalog>,
    deltas: &[Delta],
) {
    const PER_EVENT: usize = 8;
    let region = |d: &Delta| {
        (catalog.variations[d.key.variation() as usize].tenant, d.key.mp(), d.key.device(), d.key.login(), d.minute)
    };
    /// (tenant, mp, device, login, minute) of a region.
    type Region = (u16, u16, u16, u16, i64);
    let mut events: Vec<(Region, Vec<CellAdd>)> = Vec::new();
    for d in deltas {
        let r = region(d);
        let v = d.key.variation();
        match events.last_mut() {
            Some((er, cells)) if *er == r && cells.last().is_some_and(|c| c.variation() == v) => {
                cells.last_mut().unwrap().add(d.key.kind(), d.delta)
            }
            Some((er, cells)) if *er == r && cells.len() < PER_EVENT => {
                let mut c = CellAdd::new(v);
                c.add(d.key.kind(), d.delta);
                cells.push(c);
            }
            _ => {
                let mut c = CellAdd::new(v);
                c.add(d.key.kind(), d.delta);
                events.push((r, vec![c]));
            }
        }
    }
    g.throughput(Throughput::Elements(deltas.len() as u64));
    g.bench_function(name, |b| {
        let mut c = MinuteCounters::new(catalog.clone());
        let mut out = Vec::new();
        b.iter(|| {
            for ((tenant, mp, device, login, minute), cells) in &events {
                c.add_cells(*tenant, *mp, *device, *login, *minute, cells);
            }
            out.clear();
            c.drain(&mut out);
            out.len()
        });
    });
}

/// CPU time of the calling thread, in ns (`CLOCK_THREAD_CPUTIME_ID`): time
/// the thread spent waiting for a core is not counted, so a stage measures
/// the same on an idle and on a loaded machine (less what another thread's
/// use of the caches costs it).
struct ThreadCpu;

fn thread_cpu_ns() -> u64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `t` is a valid, writable timespec for the call's duration;
    // the clock id is a constant the kernel always knows.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64
}

/// Values are ns, as wall time's: its formatter prints them.
static WALL: WallTime = WallTime;

impl Measurement for ThreadCpu {
    type Intermediate = u64;
    type Value = u64;
    fn start(&self) -> u64 {
        thread_cpu_ns()
    }
    fn end(&self, started: u64) -> u64 {
        thread_cpu_ns() - started
    }
    fn add(&self, a: &u64, b: &u64) -> u64 {
        a + b
    }
    fn zero(&self) -> u64 {
        0
    }
    fn to_f64(&self, v: &u64) -> f64 {
        *v as f64
    }
    fn formatter(&self) -> &dyn ValueFormatter {
        WALL.formatter()
    }
}

/// Parsing alone: every line of `lines` through `parse_event`.
fn bench_parse(g: &mut criterion::BenchmarkGroup<'_, ThreadCpu>, name: &str, lines: &[Vec<u8>]) {
    g.throughput(Throughput::Elements(lines.len() as u64));
    g.bench_function(name, |b| {
        let mut scratch = ParseScratch::default();
        b.iter(|| lines.iter().filter(|l| parse_event(l, None, &mut scratch).is_ok()).count());
    });
}

/// The router thread's work per line: parse, resolve, watermark, batch for
/// four shards (full batches taken and recycled, as the drive loop does).
fn bench_route(
    g: &mut criterion::BenchmarkGroup<'_, ThreadCpu>,
    name: &str,
    catalog: &Arc<Catalog>,
    lines: &[Vec<u8>],
) {
    g.throughput(Throughput::Elements(lines.len() as u64));
    g.bench_function(name, |b| {
        b.iter_batched(
            || Router::new(catalog.clone(), 4),
            |mut router| {
                let mut spare = None;
                for l in lines {
                    if let Ok(Some(s)) = router.route(l, 0, None) {
                        let mut batch = router.take_batch(s, spare.take());
                        std::hint::black_box(&batch);
                        batch.clear();
                        spare = Some(batch);
                    }
                }
                router
            },
            BatchSize::LargeInput,
        );
    });
}

/// The router thread's stages, in CPU time.
fn router_stages(c: &mut Criterion<ThreadCpu>) {
    let (profile, lines) = lines_of(Profile::peak());
    let catalog = catalog(&profile);
    let (_, sparse_lines) = lines_of(sparse_profile());

    let mut g = c.benchmark_group("parse");
    bench_parse(&mut g, "parse_event", &lines);
    bench_parse(&mut g, "parse_event_sparse", &sparse_lines);
    g.finish();

    let mut g = c.benchmark_group("route");
    bench_route(&mut g, "parse_resolve_batch", &catalog, &lines);
    bench_route(&mut g, "parse_resolve_batch_sparse", &catalog, &sparse_lines);
    g.finish();
}

fn stages(c: &mut Criterion) {
    let (profile, lines) = lines_of(Profile::peak());
    let catalog = catalog(&profile);
    let (_, sparse_lines) = lines_of(sparse_profile());

    let batches = routed(&catalog, &lines);
    let routed_events: usize = batches.iter().map(|b| b.events.len()).sum();
    let mut g = c.benchmark_group("sessionize");
    g.throughput(Throughput::Elements(routed_events as u64));
    g.bench_function("sessions_and_minute_counters", |b| {
        b.iter_batched(
            || Worker::new(0, catalog.clone()),
            |mut w| {
                for batch in &batches {
                    w.apply(batch);
                }
                w
            },
            BatchSize::LargeInput,
        );
    });
    let sparse_batches = routed(&catalog, &sparse_lines);
    let sparse_events: usize = sparse_batches.iter().map(|b| b.events.len()).sum();
    g.throughput(Throughput::Elements(sparse_events as u64));
    g.bench_function("sessions_and_minute_counters_sparse", |b| {
        b.iter_batched(
            || Worker::new(0, catalog.clone()),
            |mut w| {
                for batch in &sparse_batches {
                    w.apply(batch);
                }
                w
            },
            BatchSize::LargeInput,
        );
    });
    g.finish();

    // Deltas as one flush of a shard produces them.
    let deltas = drained(&catalog, &batches);
    let sparse_deltas = drained(&catalog, &sparse_batches);
    let mut g = c.benchmark_group("counters");
    bench_counters(&mut g, "add_drain_dense", &catalog, &deltas);
    bench_counters(&mut g, "add_drain_sparse", &catalog, &sparse_deltas);
    bench_cells(&mut g, "add_cells_drain_dense", &catalog, &deltas);
    bench_cells(&mut g, "add_cells_drain_sparse", &catalog, &sparse_deltas);
    g.finish();

    let mut g = c.benchmark_group("merge");
    bench_merge(&mut g, "totals_apply_take_due", &deltas);
    bench_merge(&mut g, "totals_apply_take_due_sparse", &sparse_deltas);
    g.finish();

    let points: Vec<Point> = deltas.iter().map(|d| Point { key: d.key, minute: d.minute, value: d.delta }).collect();
    let mut g = c.benchmark_group("encode");
    g.throughput(Throughput::Elements(points.len() as u64));
    g.bench_function("file_sink_json_line", |b| {
        let namer = Namer::new(&catalog);
        let mut buf = String::with_capacity(1 << 20);
        b.iter(|| {
            buf.clear();
            for p in &points {
                expmon::sink::format_point(&mut buf, p, &namer);
            }
            buf.len()
        });
    });
    g.finish();
}

criterion_group! {
    name = router;
    config = Criterion::default().with_measurement(ThreadCpu).sample_size(10);
    targets = router_stages
}
criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = stages
}
criterion_main!(router, benches);
