//! Reloading the experiments while running: on SIGHUP or when the config file
//! changes, checked at each processing-time trigger by the router's drive loop
//! (`crate::shard::drive`). A new catalog reaches every stage in one flush
//! marker; an invalid file or an impossible change is refused and the running
//! configuration stays.

use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;

use super::{Catalog, Config};

/// Reloading the experiments config while running.
#[derive(Debug, Clone)]
pub struct ReloadOptions {
    /// The config file, watched for changes.
    pub path: std::path::PathBuf,
    /// Set by SIGHUP.
    pub requested: Arc<AtomicBool>,
}

/// Decides at each trigger whether to reload, and does it: an invalid file or
/// an impossible change is refused with the same message as at start, and the
/// running configuration stays.
pub struct Reloader {
    options: Option<ReloadOptions>,
    modified: Option<std::time::SystemTime>,
}

impl Reloader {
    pub fn new(options: Option<ReloadOptions>) -> Reloader {
        let modified = options.as_ref().and_then(|o| std::fs::metadata(&o.path).and_then(|m| m.modified()).ok());
        Reloader { options, modified }
    }

    pub fn check(&mut self, current: &Arc<Catalog>) -> Option<Arc<Catalog>> {
        let o = self.options.as_ref()?;
        let modified = std::fs::metadata(&o.path).and_then(|m| m.modified()).ok();
        let requested = o.requested.swap(false, Relaxed);
        if !requested && (modified.is_none() || modified == self.modified) {
            return None;
        }
        self.modified = modified;
        let config = match Config::load(&o.path) {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("config reload refused, the running config stays: {e}");
                return None;
            }
        };
        match current.reload(&config) {
            Ok((catalog, summary)) => {
                tracing::info!("config reloaded from {}: {summary}", o.path.display());
                Some(Arc::new(catalog))
            }
            Err(e) => {
                tracing::error!("config reload refused, the running config stays: {}: {e}", o.path.display());
                None
            }
        }
    }
}
