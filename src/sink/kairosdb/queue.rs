//! The writer's bounded, coalescing queue between the engine and the senders.
//!
//! Invariants:
//! - a point (series, minute) is at most once in `pending`, with its newest
//!   total: a newer total replaces a waiting one (only the latest absolute total
//!   needs to go out);
//! - a point is in at most one request at a time (`in_flight`), so requests
//!   for one point are never reordered and an old total can never overwrite a
//!   newer one;
//! - `pending` holds at most `bound` points: `put` blocks beyond that, which is
//!   how a slow or absent KairosDB pushes back on the engine;
//! - acknowledgement: every waiting or in-flight point carries the number of
//!   the oldest flush whose value it stands for (a newer total replacing a
//!   waiting one keeps the older number). Flush `k` is acknowledged once no
//!   point carries a number `<= k`: every total written up to it, or a newer
//!   one, has been delivered (or refused for good and dead-lettered);
//! - it holds the catalog that names its points: a reload replaces it before
//!   the first point that needs the new one is put, so a catalog read after a
//!   `take` names every point taken;
//! - once every sender that joined has left (they all died), nothing waits for
//!   them: `put` no longer blocks at the bound and `wait_drained` returns what
//!   is left at once, counted as undelivered.

use ahash::AHashMap;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::aggregate::{Point, SeriesKey};
use crate::config::Catalog;
use crate::failures::lock;

type PointId = (SeriesKey, i64);

/// The number of a flush (1-based).
type FlushNo = u64;

struct Inner {
    /// Newest total of each waiting point, with its flush number.
    pending: AHashMap<PointId, (i64, FlushNo)>,
    /// Waiting points in arrival order (may hold stale ids, skipped on take).
    order: VecDeque<PointId>,
    in_flight: AHashMap<PointId, FlushNo>,
    /// Points waiting or in flight per flush number.
    open: BTreeMap<FlushNo, usize>,
    /// Flushes sealed so far; points put now belong to flush `sealed + 1`.
    sealed: FlushNo,
    /// When the oldest waiting point arrived (for the linger time).
    oldest: Option<Instant>,
    closing: bool,
    /// Names the points (the newest catalog of the run).
    catalog: Arc<Catalog>,
    /// Senders running, and whether some joined and all have left since.
    senders: usize,
    orphaned: bool,
}

impl Inner {
    fn close_one(&mut self, flush: FlushNo) {
        if let Some(n) = self.open.get_mut(&flush) {
            *n -= 1;
            if *n == 0 {
                self.open.remove(&flush);
            }
        }
    }
}

pub struct CoalescingQueue {
    inner: Mutex<Inner>,
    /// Signalled when points arrive or the queue closes.
    has_work: Condvar,
    /// Signalled when points leave `pending` or a request ends.
    has_room: Condvar,
    bound: usize,
}

impl CoalescingQueue {
    pub fn new(bound: usize, catalog: Arc<Catalog>) -> CoalescingQueue {
        let inner = Inner {
            pending: AHashMap::default(),
            order: VecDeque::new(),
            in_flight: AHashMap::default(),
            open: BTreeMap::new(),
            sealed: 0,
            oldest: None,
            closing: false,
            catalog,
            senders: 0,
            orphaned: false,
        };
        CoalescingQueue { inner: Mutex::new(inner), has_work: Condvar::new(), has_room: Condvar::new(), bound }
    }

    /// The catalog naming the points (read it after a `take`).
    pub fn catalog(&self) -> Arc<Catalog> {
        self.lock().catalog.clone()
    }

    /// A reload: points put from now on may need `catalog`.
    pub fn set_catalog(&self, catalog: Arc<Catalog>) {
        self.lock().catalog = catalog;
    }

    /// A sender starts taking from this queue.
    pub fn sender_joined(&self) {
        self.lock().senders += 1;
    }

    /// A sender is gone (it ended, or died); after the last one nothing waits.
    pub fn sender_left(&self) {
        let mut g = self.lock();
        g.senders = g.senders.saturating_sub(1);
        g.orphaned |= g.senders == 0;
        drop(g);
        self.has_room.notify_all();
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        lock(&self.inner)
    }

    /// Ends a flush: points put from now on belong to the next one.
    pub fn seal(&self) {
        self.lock().sealed += 1;
    }

    /// How many of the sealed flushes are not yet acknowledged.
    pub fn unacknowledged(&self) -> u64 {
        let g = self.lock();
        match g.open.first_key_value() {
            Some((&oldest, _)) if oldest <= g.sealed => g.sealed - oldest + 1,
            _ => 0,
        }
    }

    /// Adds points (newest totals), blocking while the queue is full.
    pub fn put(&self, points: &[Point]) {
        let mut g = self.lock();
        for p in points {
            let id = (p.key, p.minute);
            if let Some(v) = g.pending.get_mut(&id) {
                v.0 = p.value; // keeps its (older) flush number
                continue;
            }
            while g.pending.len() >= self.bound && !g.orphaned {
                g = self.has_room.wait(g).unwrap_or_else(|e| e.into_inner());
            }
            let flush = g.sealed + 1;
            *g.open.entry(flush).or_default() += 1;
            g.pending.insert(id, (p.value, flush));
            g.order.push_back(id);
            g.oldest.get_or_insert_with(Instant::now);
        }
        drop(g);
        self.has_work.notify_all();
    }

    /// Takes up to `max` waiting points that are not in flight, once `max` are
    /// waiting or the oldest has waited `linger` (or the queue is closing).
    /// Returns an empty batch after an idle wait (so the caller can do other
    /// work), and `None` when closing and nothing is left to send.
    pub fn take(&self, max: usize, linger: Duration) -> Option<Vec<Point>> {
        let mut g = self.lock();
        loop {
            let ready = g.pending.len() >= max || g.closing || g.oldest.is_some_and(|t| t.elapsed() >= linger);
            if ready && !g.pending.is_empty() {
                let mut batch = Vec::with_capacity(max.min(g.pending.len()));
                let mut skipped = Vec::new();
                while batch.len() < max {
                    let Some(id) = g.order.pop_front() else { break };
                    if g.in_flight.contains_key(&id) {
                        skipped.push(id);
                        continue;
                    }
                    if let Some((value, flush)) = g.pending.remove(&id) {
                        g.in_flight.insert(id, flush);
                        batch.push(Point { key: id.0, minute: id.1, value });
                    }
                }
                for id in skipped.into_iter().rev() {
                    g.order.push_front(id);
                }
                g.oldest = if g.pending.is_empty() { None } else { Some(Instant::now()) };
                if !batch.is_empty() {
                    drop(g);
                    self.has_room.notify_all();
                    return Some(batch);
                }
            }
            if g.closing && g.pending.is_empty() {
                return None;
            }
            let wait = match g.oldest {
                Some(t) => linger.saturating_sub(t.elapsed()).max(Duration::from_millis(1)),
                None => Duration::from_millis(100),
            };
            g = self.has_work.wait_timeout(g, wait).unwrap_or_else(|e| e.into_inner()).0;
            if g.pending.is_empty() && !g.closing {
                return Some(Vec::new());
            }
        }
    }

    /// Ends a request. Delivered points leave; undelivered ones (to retry) go
    /// back unless a newer total is already waiting.
    pub fn finish(&self, batch: &[Point], delivered: bool) {
        let mut g = self.lock();
        for p in batch {
            let id = (p.key, p.minute);
            let Some(flush) = g.in_flight.remove(&id) else { continue };
            if delivered {
                g.close_one(flush);
            } else if let Some(&(value, newer)) = g.pending.get(&id) {
                // A newer total waits: it now stands for this older flush too.
                let older = flush.min(newer);
                g.pending.insert(id, (value, older));
                g.close_one(flush.max(newer));
            } else {
                g.pending.insert(id, (p.value, flush));
                g.order.push_front(id);
                g.oldest.get_or_insert_with(Instant::now);
            }
        }
        drop(g);
        self.has_room.notify_all();
        self.has_work.notify_all();
    }

    /// Points waiting or in flight.
    pub fn outstanding(&self) -> usize {
        let g = self.lock();
        g.pending.len() + g.in_flight.len()
    }

    /// Stops waiting for linger: senders drain what is left, then stop.
    pub fn close(&self) {
        self.lock().closing = true;
        self.has_work.notify_all();
    }

    /// Waits until nothing is outstanding or `deadline` passes; returns what is
    /// still outstanding.
    pub fn wait_drained(&self, deadline: Instant) -> usize {
        let mut g = self.lock();
        loop {
            let left = g.pending.len() + g.in_flight.len();
            let now = Instant::now();
            if left == 0 || now >= deadline || g.orphaned {
                return left;
            }
            g = self.has_room.wait_timeout(g, deadline - now).unwrap_or_else(|e| e.into_inner()).0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::MetricKind;

    fn queue(bound: usize) -> CoalescingQueue {
        let config = crate::config::Config::demo();
        CoalescingQueue::new(bound, Arc::new(Catalog::build(&config, Default::default()).unwrap()))
    }

    fn p(v: u32, value: i64) -> Point {
        Point { key: SeriesKey::new(MetricKind::VisitFm, v, 1, 1, 1), minute: 0, value }
    }

    #[test]
    fn coalesces_and_never_sends_a_point_twice_at_once() {
        let q = queue(100);
        q.put(&[p(1, 1), p(2, 1), p(1, 5)]);
        let b = q.take(10, Duration::ZERO).unwrap();
        assert_eq!(b, vec![p(1, 5), p(2, 1)], "newest total only");
        q.put(&[p(1, 6)]);
        // Point 1 is in flight: it waits.
        q.close();
        assert_eq!(q.outstanding(), 3);
        q.finish(&b, false);
        // Retry keeps the newer 6 for point 1 and requeues point 2's 1.
        let b2 = q.take(10, Duration::ZERO).unwrap();
        let mut vals: Vec<i64> = b2.iter().map(|x| x.value).collect();
        vals.sort();
        assert_eq!(vals, vec![1, 6]);
        q.finish(&b2, true);
        assert_eq!(q.take(10, Duration::ZERO), None);
        assert_eq!(q.outstanding(), 0);
    }

    #[test]
    fn a_flush_is_acknowledged_once_its_totals_or_newer_ones_are_delivered() {
        let q = queue(100);
        q.put(&[p(1, 1), p(2, 1)]);
        q.seal(); // flush 1
        assert_eq!(q.unacknowledged(), 1);
        let b = q.take(1, Duration::ZERO).unwrap(); // point 1 in flight
        q.put(&[p(1, 2), p(2, 2)]); // point 2 keeps flush 1; point 1's new total is flush 2
        q.seal(); // flush 2
        assert_eq!(q.unacknowledged(), 2);
        q.finish(&b, false); // failed: the waiting newer total now stands for flush 1
        assert_eq!(q.unacknowledged(), 2);
        let b = q.take(10, Duration::ZERO).unwrap();
        assert_eq!(b.len(), 2);
        q.finish(&b, true);
        assert_eq!(q.unacknowledged(), 0);
        q.put(&[p(3, 1)]);
        assert_eq!(q.unacknowledged(), 0, "points of the open flush do not hold sealed ones");
    }

    #[test]
    fn put_blocks_at_the_bound_until_room() {
        let q = std::sync::Arc::new(queue(2));
        q.put(&[p(1, 1), p(2, 1)]);
        let (q2, started) = (q.clone(), std::sync::Arc::new(std::sync::Barrier::new(2)));
        let started2 = started.clone();
        let t = std::thread::spawn(move || {
            started2.wait();
            q2.put(&[p(3, 1)]);
        });
        started.wait(); // the thread runs and is about to put
        std::thread::sleep(Duration::from_millis(50));
        assert!(!t.is_finished(), "blocked while full");
        assert_eq!(q.outstanding(), 2, "point 3 is not in while full");
        let b = q.take(1, Duration::ZERO).unwrap();
        t.join().unwrap();
        q.finish(&b, true);
        assert_eq!(q.outstanding(), 2, "points 2 and 3: the put went through once there was room");
    }

    #[test]
    fn once_every_sender_has_left_nothing_waits_for_them() {
        let q = queue(1);
        q.sender_joined();
        q.sender_joined();
        q.put(&[p(1, 1)]);
        q.sender_left();
        let far = Instant::now() + Duration::from_secs(3600);
        q.sender_left(); // the last one: from now on nobody delivers
        q.put(&[p(2, 1), p(3, 1)]); // beyond the bound, without blocking
        assert_eq!(q.wait_drained(far), 3, "what is left is returned at once, as undelivered");
    }
}
