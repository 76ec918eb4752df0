//! Per-stage benchmarks on `peak`-profile data: parse, route (parse + resolve +
//! watermark + batch), sessionize (session state + per-minute counters), merge
//! (writer totals) and encode (file-sink JSON). Throughput is in events (or
//! points) per second.
//!
//! Run: `cargo bench --bench stages` (add `-- --quick` for a short run).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use std::sync::Arc;

use expmon::aggregate::{Delta, Namer, Point, Totals};
use expmon::config::Catalog;
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

fn peak_lines() -> (Profile, Vec<Vec<u8>>) {
    let profile = Profile::peak();
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

fn stages(c: &mut Criterion) {
    let (profile, lines) = peak_lines();
    let catalog = catalog(&profile);

    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(lines.len() as u64));
    g.bench_function("parse_event", |b| {
        let mut scratch = ParseScratch::default();
        b.iter(|| lines.iter().filter(|l| parse_event(l, None, &mut scratch).is_ok()).count());
    });
    g.finish();

    let mut g = c.benchmark_group("route");
    g.throughput(Throughput::Elements(lines.len() as u64));
    g.bench_function("parse_resolve_batch", |b| {
        b.iter_batched(
            || Router::new(catalog.clone(), 4),
            |mut router| {
                for l in &lines {
                    if let Ok(Some(s)) = router.route(l, 0, None) {
                        let batch = router.take_batch(s, None);
                        std::hint::black_box(&batch);
                    }
                }
                router
            },
            BatchSize::LargeInput,
        );
    });
    g.finish();

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
    g.finish();

    // Deltas as one flush of a shard produces them.
    let mut w = Worker::new(0, catalog.clone());
    for batch in &batches {
        w.apply(batch);
    }
    let deltas: Vec<Delta> = w.drain_deltas(i64::MIN);
    let mut g = c.benchmark_group("merge");
    g.throughput(Throughput::Elements(deltas.len() as u64));
    g.bench_function("totals_apply_take_due", |b| {
        b.iter(|| {
            let mut t = Totals::new();
            t.apply(&deltas);
            let mut out = Vec::new();
            t.take_due(i64::MIN, &mut out);
            out.len()
        });
    });
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
    name = benches;
    config = Criterion::default().sample_size(10);
    targets = stages
}
criterion_main!(benches);
