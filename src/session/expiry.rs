//! Which sessions can have expired by a watermark, without a pass over them
//! all: the keys of a shard's sessions bucketed by the minute of their
//! greatest event ts (SPEC §4: a session expires when the watermark passes
//! that ts plus the gap).
//!
//! A session is (re)listed when its greatest ts moves into a later minute, so
//! a key may sit in several buckets; only the bucket of its current greatest
//! ts speaks for it, the others are stale and dropped when reached. An expiry
//! at watermark `W` visits only the buckets that can hold a session expired at
//! `W` (those whose minute starts before `W − gap`): every one wholly past it
//! is emptied and freed, the one `W` falls into keeps its live keys. The set
//! of sessions freed is exactly that of a full pass.

use super::{expired, Session, SessionKey};
use ahash::AHashMap;
use std::collections::BTreeMap;

/// Width of a bucket, in ms of event time.
const BUCKET_MS: i64 = 60_000;

/// The bucket of a session whose greatest event ts is `max_ts`.
#[inline]
pub(super) fn bucket(max_ts: i64) -> i64 {
    max_ts.div_euclid(BUCKET_MS)
}

/// Session keys by the bucket of their greatest event ts.
#[derive(Debug, Default)]
pub(super) struct ExpiryIndex {
    buckets: BTreeMap<i64, Vec<SessionKey>>,
    /// Emptied bucket lists, kept for their memory.
    spare: Vec<Vec<SessionKey>>,
}

impl ExpiryIndex {
    /// Lists `key` under bucket `b` (its session's greatest ts moved there).
    #[inline]
    pub fn list(&mut self, key: SessionKey, b: i64) {
        let spare = &mut self.spare;
        self.buckets.entry(b).or_insert_with(|| spare.pop().unwrap_or_default()).push(key);
    }

    /// Removes from `sessions` every session expired at watermark `wm`
    /// (greatest ts + `gap` < `wm`); how many it removed, and the sum of their
    /// [`Session::heap_bytes`].
    pub fn expire(&mut self, sessions: &mut AHashMap<SessionKey, Session>, gap: i64, wm: i64) -> (usize, usize) {
        let (mut freed, mut bytes) = (0, 0);
        while let Some(mut entry) = self.buckets.first_entry() {
            let b = *entry.key();
            // Its sessions' greatest ts lie in [b·W, (b+1)·W − 1].
            if !expired(b * BUCKET_MS, gap, wm) {
                break;
            }
            entry.get_mut().retain(|k| {
                let std::collections::hash_map::Entry::Occupied(o) = sessions.entry(*k) else {
                    return false;
                };
                let s = o.get();
                if bucket(s.max_ts()) != b {
                    return false; // listed again in a later bucket
                }
                if expired(s.max_ts(), gap, wm) {
                    bytes += s.heap_bytes();
                    o.remove();
                    freed += 1;
                    return false;
                }
                true
            });
            if !entry.get().is_empty() {
                // The bucket `wm` falls into: the later ones hold no expired session.
                debug_assert!(!expired((b + 1) * BUCKET_MS - 1, gap, wm));
                break;
            }
            self.spare.push(entry.remove());
        }
        if self.spare.len() > 4 {
            self.spare.truncate(4);
        }
        (freed, bytes)
    }

    /// Heap bytes held (bucket lists and the spare ones).
    pub fn heap_bytes(&self) -> usize {
        let lists = self.buckets.values().chain(&self.spare);
        lists.map(|v| 24 + v.capacity() * size_of::<SessionKey>()).sum()
    }
}
