//! expmon: a real-time monitoring engine for A/B experiments.
//!
//! The data path, one module per stage:
//! source → event (parse) → shard (route, workers) → session (sessionize,
//! correct) → aggregate (per-minute counters, totals) → sink.

pub mod aggregate; // metric keys, per-minute counters, merged totals
pub mod checkpoint; // snapshots of all state + source position, restore
pub mod config; // TOML → checked Config → compiled Catalog
pub mod event; // the input event and its parsing
pub mod gen; // the seeded load generator and its profiles
pub mod health; // the engine's own figures, status line, summary
pub mod kafka; // kafka:// addresses, client settings, topic creation
pub mod names; // interned mp/device/login names shared across stages
pub mod redact; // credentials hidden from every message that names an address
pub mod scale; // scale-out: two stages through Kafka transactions (docs/scale-out.md)
pub mod serve; // HTTP: Prometheus /metrics, results page and its JSON API
pub mod session; // per-session state, expiry, out-of-order correction
pub mod shard; // router, pinned shard workers, writer: the runtime
pub mod sink; // file, KairosDB, null and memory sinks
pub mod source; // file, Kafka and generator sources
pub mod stats; // always-valid lift intervals and sequential SRM over running sums
