//! Points per second through the KairosDB writer — coalescing queue, JSON
//! encoding grouped by series, gzip, HTTP POST — to a local server that
//! accepts without decoding (`tests/common/kairos_server.rs`, `sink_only`).
//! One sender thread (`inflight=1`), so the figure is one core's worth.
//!
//! Run: `cargo bench --bench kairos`

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use std::sync::Arc;
use std::time::{Duration, Instant};

use expmon::aggregate::{MetricKind, Namer, Point, SeriesKey};
use expmon::config::Catalog;
use expmon::gen::Profile;
use expmon::names::Names;
use expmon::sink::{KairosOptions, KairosSink, Sink};

#[path = "../tests/common/kairos_server.rs"]
mod kairos_server;

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const POINTS: usize = 200_000;

fn writer(c: &mut Criterion) {
    let catalog = Arc::new(Catalog::build(&Profile::peak().config, Arc::new(Names::default())).unwrap());
    // Distinct points: every variation of the peak config, visits of 20 mps
    // (the config's mp ids 0..20) and four minutes. Device and login ids 0 are
    // names the config interned for its conditions.
    let variations = catalog.variations.len();
    assert!(catalog.names.mp.len() >= 20 && !catalog.names.device.is_empty() && !catalog.names.login.is_empty());
    let points: Vec<Point> = (0..POINTS)
        .map(|i| {
            let (v, rest) = ((i % variations) as u32, i / variations);
            let key = SeriesKey::new(MetricKind::VisitAssigned, v, (rest % 20) as u16, 0, 0);
            Point { key, minute: 1_767_225_600_000 + (rest / 20) as i64 * 60_000, value: i as i64 }
        })
        .collect();
    let distinct: std::collections::HashSet<(SeriesKey, i64)> = points.iter().map(|p| (p.key, p.minute)).collect();
    assert_eq!(distinct.len(), POINTS);

    let server = kairos_server::KairosServer::start();
    server.state().sink_only = true;
    let mut g = c.benchmark_group("kairosdb");
    g.throughput(Throughput::Elements(POINTS as u64));
    g.sample_size(10);
    g.bench_function("put_encode_gzip_post_1_sender", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let opts =
                    KairosOptions::parse(&format!("{}?batch=5000&linger=1ms&inflight=1&queue=1000000", server.url()))
                        .unwrap();
                let mut sink = KairosSink::connect(opts, catalog.clone(), &Default::default()).unwrap();
                let namer = Namer::new(&catalog);
                let start = Instant::now();
                for chunk in points.chunks(10_000) {
                    sink.write(chunk, &namer).unwrap();
                }
                drop(namer);
                let report = sink.close().unwrap();
                total += start.elapsed();
                assert_eq!(report.undelivered, 0);
                assert_eq!(sink.stats().points_delivered.load(std::sync::atomic::Ordering::Relaxed), POINTS as u64);
            }
            total
        });
    });
    g.finish();
}

criterion_group!(benches, writer);
criterion_main!(benches);
