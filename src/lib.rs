//! expmon: a real-time monitoring engine for A/B experiments.
//!
//! The data path, one module per stage:
//! source → event (parse) → shard (route, workers) → session (sessionize,
//! correct) → aggregate (per-minute counters, totals) → sink.
//!
//! Layers, bottom first: a module uses only modules on lines above its own
//! (no cycles; `tests/layers.rs` checks this list against the code):
//! 1. leaves: `clock`, `codec`, `event`, `failures`, `metrics`, `names`, `redact`, `stats`
//! 2. `address`, `config`
//! 3. `aggregate`, `kafka`
//! 4. `session`, `sink`, `source`
//! 5. `checkpoint`, `gen`, `health`
//! 6. `serve`
//! 7. `shard` (the runtime, which wires them all)
//! 8. `scale` (the scale-out runtime: two stages of the same pieces through Kafka)

pub mod address; // the ?key=value&… options of every address, one parser
pub mod aggregate; // metric keys, per-minute counters, merged totals
pub mod checkpoint; // snapshots of all state + source position, restore
pub mod clock; // wall-clock now in ms (processing time)
pub mod codec; // little-endian Enc/Dec of checkpoint bytes
pub mod config; // TOML → checked Config → compiled Catalog
pub mod event; // the input event and its parsing
pub mod failures; // thread deaths stop the run; lock; failpoints
pub mod gen; // the seeded load generator and its profiles
pub mod health; // the engine's own figures, status line, summary
pub mod kafka; // kafka:// addresses, client settings, topic creation
pub mod metrics; // figures crossing stages: health points, sink health, sink report
pub mod names; // interned mp/device/login names shared across stages
pub mod redact; // credentials hidden from every message that names an address
pub mod scale; // scale-out: two stages through Kafka transactions (docs/scale-out.md)
pub mod serve; // HTTP: Prometheus /metrics, results page and its JSON API
pub mod session; // per-session state, expiry, out-of-order correction
pub mod shard; // router, pinned shard workers, writer: the runtime
pub mod sink; // file, KairosDB, null and memory sinks
pub mod source; // file, Kafka and generator sources
pub mod stats; // always-valid lift intervals and sequential SRM over running sums
