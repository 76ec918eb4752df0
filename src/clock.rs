//! The wall clock, in the units the engine speaks (ms since the Unix epoch):
//! processing time for triggers, health points, the status line, the
//! generator's live mode and the names of checkpoint files set aside. Event
//! time never comes from here.

/// Wall-clock now, in ms since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}
