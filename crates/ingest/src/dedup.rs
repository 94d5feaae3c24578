//! Best-effort duplicate detection for event ids within one ingest replica.
//!
//! Owns: a bounded, time-windowed set of recently seen event ids, its eviction
//! policy and the count of early evictions.
//!
//! Leaves to others: choosing or deriving the event id, deciding what to do with
//! a duplicate (the pipeline), exporting the counters as metrics, and
//! cross-replica / downstream deduplication (the set is per process and lost on
//! restart).
//!
//! An id is first *claimed* ([`DedupSet::claim`]): the caller holds a
//! [`Reservation`] while its record waits for the broker. Only a confirmed
//! reservation (the broker acknowledged the record) makes later sightings
//! duplicates. A sighting while the first attempt is still in flight is told so
//! ([`Claim::InFlight`]) and can wait for it ([`DedupSet::settled`]); a
//! reservation dropped without confirming — a failed produce, a cancelled
//! request, a disconnected client — releases the id, so a client's retry of an
//! event that was never stored is never answered `duplicate`.
//!
//! Rejected events are deduplicated in the same set under a separate key space
//! ([`dlq_key`]): the id a rejected event claims is reserved while its DLQ record
//! waits for the broker and confirmed once it is acknowledged, so a client's
//! retry of a batch does not write the same rejection to the DLQ twice. Both key
//! spaces share the one capacity bound.
//!
//! The window runs from the first accepted sighting: a duplicate does not
//! extend it. Time is passed in by the caller, so the set is deterministic in
//! tests.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

#[derive(Debug, Clone, Copy)]
struct Seen {
    at: Instant,
    generation: u64,
    /// The record of this id was acknowledged by the broker; until then the id is
    /// only reserved by an attempt in flight.
    durable: bool,
}

#[derive(Debug, Default)]
struct Inner {
    /// Live ids. Invariant: each has exactly one deque entry with the same
    /// generation.
    map: HashMap<Arc<str>, Seen>,
    /// Insertion order; entries whose generation no longer matches the map
    /// (forgotten or re-inserted ids) are stale and skipped.
    order: VecDeque<(Seen, Arc<str>)>,
    next_generation: u64,
    evicted_early: u64,
}

impl Inner {
    fn is_live(&self, seen: Seen, id: &str) -> bool {
        self.map
            .get(id)
            .is_some_and(|live| live.generation == seen.generation)
    }

    /// Drops expired entries from the front of the deque.
    fn purge_expired(&mut self, now: Instant, window: Duration) {
        while let Some((seen, id)) = self.order.front() {
            if now.saturating_duration_since(seen.at) < window {
                break;
            }
            let (seen, id) = (*seen, Arc::clone(id));
            self.order.pop_front();
            if self.is_live(seen, &id) {
                self.map.remove(&id);
            }
        }
    }

    /// Pops the oldest deque entry, removing it from the map if live; returns
    /// whether a live entry was evicted.
    fn evict_oldest(&mut self, now: Instant, window: Duration) -> bool {
        let Some((seen, id)) = self.order.pop_front() else {
            return false;
        };
        if !self.is_live(seen, &id) {
            return false;
        }
        self.map.remove(&id);
        if now.saturating_duration_since(seen.at) < window {
            self.evicted_early = self.evicted_early.saturating_add(1);
        }
        true
    }

    /// Removes `id`; its deque entry becomes stale and is skipped.
    fn forget(&mut self, id: &str) {
        self.map.remove(id);
        if let Some((seen, back)) = self.order.back()
            && seen.generation.wrapping_add(1) == self.next_generation
            && &**back == id
        {
            // The common case (forgetting the latest insert) frees its slot now.
            self.order.pop_back();
        }
    }

    /// Drops stale deque entries once they make up at least half of it, keeping
    /// the deque within `2 * capacity` at amortized O(1) cost per insert.
    fn compact(&mut self, capacity: usize) {
        if self.order.len() < capacity.saturating_mul(2) {
            return;
        }
        let map = &self.map;
        self.order.retain(|(seen, id)| {
            map.get(id)
                .is_some_and(|live| live.generation == seen.generation)
        });
    }
}

/// Most bytes of a rejected event's claimed id kept verbatim in its [`dlq_key`];
/// longer (invalid) ids are kept as their SHA-256, so a key never exceeds ~70 bytes.
const MAX_VERBATIM_DLQ_ID: usize = 128;

/// The dedup key of a rejected event that claims `event_id` (its DLQ record), or
/// `None` when it claims none (an event without a readable string id cannot be
/// deduplicated: a derived id needs a valid event). The key space cannot collide
/// with accepted event ids: `/` and `#` are not in the event id character set
/// (`A-Z a-z 0-9 . _ : -`), and a derived id starts with `d-`.
pub fn dlq_key(event_id: &str) -> Option<String> {
    use sha2::{Digest, Sha256};
    if event_id.is_empty() {
        return None;
    }
    if event_id.len() <= MAX_VERBATIM_DLQ_ID {
        return Some(format!("dlq/{event_id}"));
    }
    let digest = Sha256::digest(event_id.as_bytes());
    let mut key = String::with_capacity(4 + 64);
    key.push_str("dlq#");
    for b in digest {
        use std::fmt::Write;
        let _ = write!(key, "{b:02x}");
    }
    Some(key)
}

/// Whether `key` is a [`dlq_key`] (a rejected event's), not an accepted event's id.
pub fn is_dlq_key(key: &str) -> bool {
    key.starts_with("dlq/") || key.starts_with("dlq#")
}

/// A bounded, time-windowed set of recently seen event ids (one per ingest
/// replica). Thread-safe (interior `Mutex`).
///
/// Memory is bounded by `capacity` live entries (plus at most `capacity` stale
/// bookkeeping entries left by released reservations): when full, the oldest
/// entries are evicted first, even if still within the window, and counted in
/// [`evicted_early`](Self::evicted_early). Capacity 0 disables deduplication
/// (every id is new, nothing is stored); a zero window does the same.
#[derive(Debug)]
pub struct DedupSet {
    capacity: usize,
    window: Duration,
    inner: Mutex<Inner>,
    /// Woken whenever a reservation is confirmed or released.
    settled: Notify,
}

/// What a sighting of an event id means.
#[derive(Debug)]
pub enum Claim {
    /// First sighting within the window: produce the record, then
    /// [`confirm`](Reservation::confirm) once the broker acknowledged it.
    New(Reservation),
    /// Stored durably within the window: a duplicate.
    Duplicate,
    /// An earlier attempt of this id is still waiting for the broker; neither new
    /// nor a duplicate yet. Wait with [`DedupSet::settled`] and claim again.
    InFlight,
}

/// An id reserved by one attempt. Dropping it unconfirmed releases the id (the
/// attempt failed or was cancelled), so the next sighting is new again.
#[derive(Debug)]
pub struct Reservation {
    set: Option<Arc<DedupSet>>,
    id: Arc<str>,
    generation: u64,
}

impl Reservation {
    /// The id is durably stored: later sightings within the window are duplicates.
    pub fn confirm(mut self) {
        if let Some(set) = self.set.take() {
            set.resolve(&self.id, self.generation, true);
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(set) = self.set.take() {
            set.resolve(&self.id, self.generation, false);
        }
    }
}

impl DedupSet {
    /// A set holding at most `capacity` ids, each for `window`.
    pub fn new(capacity: usize, window: Duration) -> Self {
        Self {
            capacity,
            window,
            inner: Mutex::new(Inner::default()),
            settled: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `id` at `now`: [`Claim::New`] with a reservation if it was not seen
    /// within the window, [`Claim::Duplicate`] if it was stored durably,
    /// [`Claim::InFlight`] if another attempt holds it. Expired entries are purged
    /// lazily from the front of the insertion-ordered deque (amortized O(1)).
    pub fn claim(self: &Arc<Self>, id: &str, now: Instant) -> Claim {
        match self.reserve(id, now) {
            Ok(Some(generation)) => Claim::New(Reservation {
                set: Some(Arc::clone(self)),
                id: Arc::from(id),
                generation,
            }),
            // Deduplication is disabled: nothing to confirm or release.
            Ok(None) => Claim::New(Reservation {
                set: None,
                id: Arc::from(id),
                generation: 0,
            }),
            Err(true) => Claim::Duplicate,
            Err(false) => Claim::InFlight,
        }
    }

    /// Records `id` as durably seen at `now` and returns true if it was not seen
    /// within the window (claim and confirm at once); false if it was seen or is in
    /// flight. The tests' shorthand for a claim confirmed at once.
    #[cfg(test)]
    pub fn insert_if_new(&self, id: &str, now: Instant) -> bool {
        match self.reserve(id, now) {
            Ok(Some(generation)) => {
                self.resolve(id, generation, true);
                true
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Waits until no attempt of `id` is in flight (it was confirmed or released),
    /// at most `timeout`. Returns false on timeout.
    pub async fn settled(&self, id: &str, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.settled.notified();
                tokio::pin!(notified);
                // Registered before the check, so a resolution in between is not missed.
                notified.as_mut().enable();
                let in_flight = self.lock().map.get(id).is_some_and(|s| !s.durable);
                if !in_flight {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Reserves `id`: `Ok(Some(generation))` for a first sighting, `Ok(None)` when
    /// deduplication is disabled, `Err(durable)` when the id is already present.
    fn reserve(&self, id: &str, now: Instant) -> Result<Option<u64>, bool> {
        if self.capacity == 0 || self.window.is_zero() {
            return Ok(None);
        }
        let mut inner = self.lock();
        inner.purge_expired(now, self.window);
        if let Some(seen) = inner.map.get(id) {
            if now.saturating_duration_since(seen.at) < self.window || !seen.durable {
                return Err(seen.durable);
            }
            // Expired but not yet purged (callers' instants can arrive slightly
            // out of order); its deque entry becomes stale.
            inner.map.remove(id);
        }
        while inner.map.len() >= self.capacity {
            if inner.order.is_empty() {
                // Unreachable while the invariant holds; never loop forever.
                inner.map.clear();
                break;
            }
            inner.evict_oldest(now, self.window);
        }
        let seen = Seen {
            at: now,
            generation: inner.next_generation,
            durable: false,
        };
        inner.next_generation = inner.next_generation.wrapping_add(1);
        let id: Arc<str> = Arc::from(id);
        inner.map.insert(Arc::clone(&id), seen);
        inner.order.push_back((seen, id));
        inner.compact(self.capacity);
        Ok(Some(seen.generation))
    }

    /// Ends the attempt `generation` of `id`: durable, or released (forgotten).
    /// A newer attempt of the same id (after eviction) is left alone.
    fn resolve(&self, id: &str, generation: u64, durable: bool) {
        {
            let mut inner = self.lock();
            let live = inner
                .map
                .get(id)
                .is_some_and(|s| s.generation == generation && !s.durable);
            if live {
                if durable {
                    if let Some(s) = inner.map.get_mut(id) {
                        s.durable = true;
                    }
                } else {
                    inner.forget(id);
                }
            }
        }
        self.settled.notify_waiters();
    }

    /// Forgets `id` outright (tests: releasing is a dropped [`Reservation`]). Its deque
    /// entry becomes stale and is skipped.
    #[cfg(test)]
    pub fn forget(&self, id: &str) {
        self.lock().forget(id);
        self.settled.notify_waiters();
    }

    /// Number of ids currently remembered (possibly including expired ones not
    /// yet purged).
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.lock().map.is_empty()
    }

    /// Entries evicted because the set was full before their window ended (a
    /// metric: dedup misses are possible when this grows).
    pub fn evicted_early(&self) -> u64 {
        self.lock().evicted_early
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        let inner = self.lock();
        assert!(inner.map.len() <= self.capacity, "map over capacity");
        assert!(
            inner.order.len() <= self.capacity.saturating_mul(2),
            "deque over 2x capacity: {}",
            inner.order.len()
        );
        let live = inner
            .order
            .iter()
            .filter(|(seen, id)| inner.is_live(*seen, id))
            .count();
        assert_eq!(live, inner.map.len(), "each live id has one deque entry");
        for (id, seen) in &inner.map {
            let matching = inner
                .order
                .iter()
                .filter(|(s, i)| i == id && s.generation == seen.generation && s.at == seen.at)
                .count();
            assert_eq!(matching, 1, "id {id} has {matching} deque entries");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const WINDOW: Duration = Duration::from_secs(60);

    #[test]
    fn duplicate_within_window() {
        let set = DedupSet::new(10, WINDOW);
        let t0 = Instant::now();
        assert!(set.insert_if_new("a", t0));
        assert!(!set.insert_if_new("a", t0));
        assert!(!set.insert_if_new("a", t0 + Duration::from_secs(59)));
        assert!(set.insert_if_new("b", t0));
        assert_eq!(set.len(), 2);
        assert!(!set.is_empty());
        set.check_invariants();
    }

    #[test]
    fn same_id_after_window_is_new() {
        let set = DedupSet::new(10, WINDOW);
        let t0 = Instant::now();
        assert!(set.insert_if_new("a", t0));
        // A duplicate does not extend the window.
        assert!(!set.insert_if_new("a", t0 + Duration::from_secs(30)));
        let t1 = t0 + WINDOW;
        assert!(set.insert_if_new("a", t1));
        assert!(!set.insert_if_new("a", t1 + Duration::from_secs(1)));
        assert_eq!(set.len(), 1);
        assert_eq!(set.evicted_early(), 0);
        set.check_invariants();
    }

    #[test]
    fn expired_entries_are_purged() {
        let set = DedupSet::new(10, WINDOW);
        let t0 = Instant::now();
        for id in ["a", "b", "c"] {
            assert!(set.insert_if_new(id, t0));
        }
        assert!(set.insert_if_new("d", t0 + WINDOW));
        assert_eq!(set.len(), 1);
        assert_eq!(set.evicted_early(), 0);
        set.check_invariants();
    }

    #[test]
    fn out_of_order_instants_do_not_panic() {
        let set = DedupSet::new(4, WINDOW);
        let t0 = Instant::now() + Duration::from_secs(3600);
        assert!(set.insert_if_new("a", t0));
        assert!(!set.insert_if_new("a", t0 - Duration::from_secs(10)));
        assert!(set.insert_if_new("b", t0 - Duration::from_secs(3600)));
        set.check_invariants();
    }

    #[test]
    fn capacity_eviction_keeps_newest_and_counts() {
        let set = DedupSet::new(3, WINDOW);
        let t0 = Instant::now();
        for (i, id) in ["a", "b", "c", "d", "e"].into_iter().enumerate() {
            assert!(set.insert_if_new(id, t0 + Duration::from_millis(i as u64)));
        }
        assert_eq!(set.len(), 3);
        assert_eq!(set.evicted_early(), 2);
        let t1 = t0 + Duration::from_secs(1);
        // The newest three are still duplicates (checked before any insert).
        for id in ["c", "d", "e"] {
            assert!(!set.insert_if_new(id, t1), "{id}");
        }
        // The evicted ones are new again (a possible dedup miss).
        assert!(set.insert_if_new("a", t1));
        assert_eq!(set.evicted_early(), 3);
        set.check_invariants();
    }

    #[test]
    fn expired_entries_are_not_counted_as_early_evictions() {
        let set = DedupSet::new(2, WINDOW);
        let t0 = Instant::now();
        assert!(set.insert_if_new("a", t0));
        assert!(set.insert_if_new("b", t0));
        assert!(set.insert_if_new("c", t0 + WINDOW));
        assert_eq!(set.evicted_early(), 0);
        set.check_invariants();
    }

    #[test]
    fn forget_then_reinsert_is_new() {
        let set = DedupSet::new(10, WINDOW);
        let t0 = Instant::now();
        assert!(set.insert_if_new("a", t0));
        set.forget("a");
        assert!(set.is_empty());
        assert!(set.insert_if_new("a", t0));
        assert!(!set.insert_if_new("a", t0));
        set.forget("never-seen");
        set.check_invariants();
    }

    #[test]
    fn stale_deque_entries_do_not_break_reinserted_ids() {
        let set = DedupSet::new(10, WINDOW);
        let t0 = Instant::now();
        assert!(set.insert_if_new("a", t0));
        assert!(set.insert_if_new("b", t0)); // "a" is not at the back: stays stale.
        set.forget("a");
        let t1 = t0 + Duration::from_secs(30);
        assert!(set.insert_if_new("a", t1));
        // The stale entry for "a" (t0) expires at t0 + 60 s; the new one must survive.
        let t2 = t0 + WINDOW + Duration::from_secs(1);
        assert!(set.insert_if_new("c", t2));
        assert!(!set.insert_if_new("a", t2), "re-inserted id lost");
        assert!(set.insert_if_new("b", t2), "b expired");
        set.check_invariants();

        // Same under capacity eviction: the stale front entry must not evict the new one.
        let set = DedupSet::new(2, WINDOW);
        assert!(set.insert_if_new("a", t0));
        assert!(set.insert_if_new("b", t0));
        set.forget("a");
        assert!(set.insert_if_new("a", t0));
        assert!(set.insert_if_new("c", t0)); // evicts "b", the oldest live entry.
        assert!(!set.insert_if_new("a", t0));
        assert!(set.insert_if_new("b", t0));
        set.check_invariants();
    }

    fn claimed(set: &Arc<DedupSet>, id: &str, now: Instant) -> Reservation {
        match set.claim(id, now) {
            Claim::New(r) => r,
            other => panic!("{id}: expected a new claim, got {other:?}"),
        }
    }

    #[test]
    fn an_id_in_flight_is_neither_new_nor_a_duplicate_until_confirmed() {
        let set = Arc::new(DedupSet::new(10, WINDOW));
        let t0 = Instant::now();
        let r = claimed(&set, "a", t0);
        assert!(matches!(set.claim("a", t0), Claim::InFlight));
        assert!(!set.insert_if_new("a", t0), "in flight is not new");
        r.confirm();
        assert!(matches!(set.claim("a", t0), Claim::Duplicate));
        set.check_invariants();
    }

    #[test]
    fn a_dropped_reservation_releases_its_id() {
        let set = Arc::new(DedupSet::new(10, WINDOW));
        let t0 = Instant::now();
        drop(claimed(&set, "a", t0)); // a failed produce or a cancelled request
        let again = claimed(&set, "a", t0);
        again.confirm();
        assert!(matches!(set.claim("a", t0), Claim::Duplicate));
        set.check_invariants();
    }

    #[test]
    fn an_old_reservation_does_not_release_a_newer_attempt() {
        let set = Arc::new(DedupSet::new(1, WINDOW));
        let t0 = Instant::now();
        let old = claimed(&set, "a", t0);
        claimed(&set, "b", t0).confirm(); // capacity 1: evicts the pending "a"
        let newer = claimed(&set, "a", t0); // evicts "b"
        drop(old);
        assert!(matches!(set.claim("a", t0), Claim::InFlight));
        newer.confirm();
        assert!(matches!(set.claim("a", t0), Claim::Duplicate));
        set.check_invariants();
    }

    #[tokio::test]
    async fn a_waiter_learns_when_the_attempt_in_flight_settles() {
        let set = Arc::new(DedupSet::new(10, WINDOW));
        let t0 = Instant::now();
        let r = claimed(&set, "a", t0);
        assert!(
            !set.settled("a", Duration::from_millis(20)).await,
            "still in flight"
        );
        let waiter = {
            let set = Arc::clone(&set);
            tokio::spawn(async move { set.settled("a", Duration::from_secs(10)).await })
        };
        tokio::task::yield_now().await;
        drop(r);
        assert!(waiter.await.unwrap(), "a release wakes the waiter");
        assert!(set.settled("never-seen", Duration::ZERO).await);
    }

    #[test]
    fn dlq_keys_are_bounded_and_never_collide_with_event_ids() {
        assert_eq!(dlq_key(""), None, "no id: nothing to deduplicate");
        assert_eq!(dlq_key("lg-1-1170").as_deref(), Some("dlq/lg-1-1170"));
        // A valid event id may contain ':', so a `dlq:` prefix could collide; `/` cannot.
        let valid_id = "dlq:lg-1";
        assert_ne!(dlq_key("lg-1").as_deref(), Some(valid_id));
        let long = "x".repeat(10_000);
        let key = dlq_key(&long).unwrap();
        assert!(key.starts_with("dlq#") && key.len() == 68, "{key}");
        assert_eq!(dlq_key(&long), Some(key), "stable");
        assert_ne!(dlq_key(&long), dlq_key(&"x".repeat(10_001)));
        let key = dlq_key(&"y".repeat(128)).unwrap();
        assert_eq!(key.len(), 132, "128 bytes are kept verbatim");
        assert!(is_dlq_key(&key) && is_dlq_key(&dlq_key(&long).unwrap()));
        assert!(!is_dlq_key("lg-1-1170") && !is_dlq_key("dlq:lg-1") && !is_dlq_key("d-00"));
    }

    #[test]
    fn a_rejected_id_and_an_accepted_id_are_separate_entries() {
        let set = Arc::new(DedupSet::new(10, WINDOW));
        let t0 = Instant::now();
        let key = dlq_key("a").unwrap();
        claimed(&set, &key, t0).confirm();
        assert!(matches!(set.claim(&key, t0), Claim::Duplicate));
        // The same id as a valid event is still new (a fixed event is stored).
        claimed(&set, "a", t0).confirm();
        assert_eq!(set.len(), 2);
        set.check_invariants();
    }

    #[test]
    fn zero_capacity_or_window_disables() {
        let t0 = Instant::now();
        for set in [DedupSet::new(0, WINDOW), DedupSet::new(10, Duration::ZERO)] {
            assert!(set.insert_if_new("a", t0));
            assert!(set.insert_if_new("a", t0));
            assert!(set.is_empty());
        }
    }

    #[test]
    fn concurrent_inserts_of_same_id_yield_one_true() {
        for _ in 0..20 {
            let set = Arc::new(DedupSet::new(100, WINDOW));
            let now = Instant::now();
            let barrier = Arc::new(std::sync::Barrier::new(8));
            let handles: Vec<_> = (0..8)
                .map(|_| {
                    let (set, barrier) = (Arc::clone(&set), Arc::clone(&barrier));
                    std::thread::spawn(move || {
                        barrier.wait();
                        (0..50).filter(|_| set.insert_if_new("same", now)).count()
                    })
                })
                .collect();
            let trues: usize = handles.into_iter().map(|h| h.join().unwrap()).sum();
            assert_eq!(trues, 1);
            set.check_invariants();
        }
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8),
        Forget(u8),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            5 => (0u8..16).prop_map(Op::Insert),
            2 => (0u8..16).prop_map(Op::Forget),
            1 => (0u64..40_000).prop_map(Op::Advance),
        ]
    }

    proptest! {
        #[test]
        fn memory_bounded_and_consistent(
            capacity in 1usize..8,
            ops in proptest::collection::vec(op(), 0..300),
        ) {
            let window = Duration::from_secs(10);
            let set = DedupSet::new(capacity, window);
            let mut now = Instant::now();
            for op in ops {
                match op {
                    Op::Insert(id) => {
                        let id = id.to_string();
                        let fresh = set.insert_if_new(&id, now);
                        // Whatever was just inserted (or found) is a duplicate now.
                        prop_assert!(!set.insert_if_new(&id, now), "fresh={}", fresh);
                    }
                    Op::Forget(id) => {
                        let id = id.to_string();
                        set.forget(&id);
                        prop_assert!(set.insert_if_new(&id, now));
                        set.forget(&id);
                    }
                    Op::Advance(ms) => now += Duration::from_millis(ms),
                }
                prop_assert!(set.len() <= capacity);
                set.check_invariants();
            }
        }
    }
}
