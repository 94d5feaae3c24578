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

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

/// What the set keeps of an id: a 128-bit keyed hash, never the id itself.
///
/// The two halves are SipHash (std's [`RandomState`]: SipHash-1-3, random keys drawn
/// when the set is created) of the id under two domain tags, so they behave as one
/// 128-bit pseudo-random function of the id that a client cannot steer without the
/// key. Two different ids share a key with probability 2⁻¹²⁸. With `n` ids held, a
/// new id is falsely taken for a held one with probability `n / 2¹²⁸` (≈ 3·10⁻³³
/// at 1,000,000 ids), and any two of the `n` collide with probability
/// `n² / 2¹²⁹` (≈ 1.5·10⁻²⁷ at 1,000,000): a false `duplicate` is not a practical
/// concern, and a false one would drop one event, never store one twice.
type Key = [u64; 2];

/// Seconds are counted in 30 bits (34 years of uptime); the top two bits of
/// [`Entry::at`] are flags.
const MAX_TICKS: u32 = (1 << 30) - 1;
/// The record of this id was acknowledged by the broker; until then the id is only
/// reserved by an attempt in flight.
const DURABLE: u32 = 1 << 30;
/// The entry was released, expired or evicted out of turn: no longer in the index,
/// skipped when it reaches the front of the ring.
const DEAD: u32 = 1 << 31;
/// An empty index slot.
const EMPTY: u32 = u32::MAX;

/// One sighting, 24 bytes: the id's key, the whole second of the first sighting and
/// the attempt's generation. The ring position is the expiry order, so nothing else
/// is stored per id but its 4-byte index slot.
#[derive(Debug, Clone, Copy)]
struct Entry {
    key: Key,
    /// Seconds since the set's epoch (bits 0–29) | [`DURABLE`] | [`DEAD`].
    at: u32,
    /// Which attempt reserved it (a released old reservation must not release a newer
    /// attempt of the same id). Wraps after 2³² claims.
    generation: u32,
}

impl Entry {
    fn ticks(&self) -> u32 {
        self.at & MAX_TICKS
    }
    fn durable(&self) -> bool {
        self.at & DURABLE != 0
    }
    fn dead(&self) -> bool {
        self.at & DEAD != 0
    }
}

/// The ids of the set, in one structure: a ring of entries in insertion order (the
/// expiry and eviction order) and an open-addressing index (linear probing, deletion
/// by backward shift) whose slots hold only the 32-bit sequence number of an entry —
/// the key is stored once, in the ring.
#[derive(Debug, Default)]
struct Inner {
    /// Insertion order. Entries marked [`DEAD`] are not in the index and are dropped
    /// when they reach the front, or by [`Inner::compact`].
    ring: VecDeque<Entry>,
    /// Sequence number of `ring[0]`; `ring[i]` has `head + i`. Kept below
    /// `u32::MAX - ring.len()` (rebased by [`Inner::compact`]), so no slot is [`EMPTY`].
    head: u32,
    /// Sequence numbers of the live entries; a power of two long (or empty), at most
    /// three quarters full.
    slots: Vec<u32>,
    /// One byte of each indexed entry's key ([`tag`]), beside its slot (meaningless for
    /// an empty slot): a probe compares it before reading the ring, so a lookup passes
    /// the other entries of its probe run without a (cache-missing) ring read each.
    tags: Vec<u8>,
    /// Live (indexed) entries.
    live: usize,
    next_generation: u32,
    evicted_early: u64,
}

/// The byte of `key` kept beside its index slot: from the half the home slot does not use.
fn tag(key: &Key) -> u8 {
    (key[1] >> 56) as u8
}

impl Inner {
    fn mask(&self) -> usize {
        self.slots.len().wrapping_sub(1)
    }

    fn home(&self, key: &Key) -> usize {
        (key[0] as usize) & self.mask()
    }

    fn position(&self, seq: u32) -> usize {
        seq.wrapping_sub(self.head) as usize
    }

    /// The index slot and ring position of the live entry of `key`.
    fn find(&self, key: &Key) -> Option<(usize, usize)> {
        if self.slots.is_empty() {
            return None;
        }
        let mask = self.mask();
        let tag = tag(key);
        let mut slot = self.home(key);
        loop {
            let seq = self.slots[slot];
            if seq == EMPTY {
                return None;
            }
            if self.tags[slot] == tag {
                let pos = self.position(seq);
                if self.ring.get(pos).is_some_and(|e| e.key == *key) {
                    return Some((slot, pos));
                }
            }
            slot = (slot + 1) & mask;
        }
    }

    /// Indexes the entry at ring position `pos` (its key is not indexed yet).
    fn index(&mut self, pos: usize) {
        let mask = self.mask();
        let key = self.ring[pos].key;
        let mut slot = self.home(&key);
        while self.slots[slot] != EMPTY {
            slot = (slot + 1) & mask;
        }
        self.slots[slot] = self.head.wrapping_add(pos as u32);
        self.tags[slot] = tag(&key);
    }

    /// Empties index slot `hole`, shifting later entries of its probe run back.
    fn unindex(&mut self, mut hole: usize) {
        let mask = self.mask();
        let mut slot = hole;
        loop {
            slot = (slot + 1) & mask;
            let seq = self.slots[slot];
            if seq == EMPTY {
                break;
            }
            let home = self.home(&self.ring[self.position(seq)].key);
            // The entry may move into the hole when the hole lies between its home and
            // its slot (cyclically).
            if slot.wrapping_sub(home) & mask >= slot.wrapping_sub(hole) & mask {
                self.slots[hole] = seq;
                self.tags[hole] = self.tags[slot];
                hole = slot;
            }
        }
        self.slots[hole] = EMPTY;
    }

    /// Takes the live entry at (`slot`, `pos`) out of the set; it stays in the ring,
    /// dead, until it reaches the front (or is the newest: then it goes now).
    fn kill(&mut self, slot: usize, pos: usize) {
        self.unindex(slot);
        self.ring[pos].at |= DEAD;
        self.live -= 1;
        if pos + 1 == self.ring.len() {
            // The common case (releasing the latest insert) frees its slot now.
            self.ring.pop_back();
        }
    }

    /// Removes the front entry; returns it if it was live.
    fn pop_front(&mut self) -> Option<Entry> {
        let entry = *self.ring.front()?;
        let live = !entry.dead();
        if live && let Some((slot, _)) = self.find(&entry.key) {
            self.unindex(slot);
            self.live -= 1;
        }
        self.ring.pop_front();
        self.head = self.head.wrapping_add(1);
        live.then_some(entry)
    }

    /// Drops expired entries (and dead ones) from the front of the ring.
    fn purge_expired(&mut self, now: u32, window: u32) {
        while let Some(front) = self.ring.front() {
            if !front.dead() && now.saturating_sub(front.ticks()) < window {
                break;
            }
            self.pop_front();
        }
    }

    /// Pops the oldest ring entry; returns whether a live entry was evicted (counted
    /// in `evicted_early` if its window had not ended).
    fn evict_oldest(&mut self, now: u32, window: u32) -> bool {
        let Some(evicted) = self.pop_front() else {
            return false;
        };
        if now.saturating_sub(evicted.ticks()) < window {
            self.evicted_early = self.evicted_early.saturating_add(1);
        }
        true
    }

    /// Drops the dead entries, renumbers the ring from 0 and rebuilds the index.
    fn compact(&mut self) {
        self.ring.retain(|e| !e.dead());
        self.head = 0;
        self.reindex(self.slots.len());
    }

    /// Rebuilds the index with `slots` slots (a power of two above the live count).
    fn reindex(&mut self, slots: usize) {
        self.slots.clear();
        self.slots.resize(slots, EMPTY);
        self.tags.clear();
        self.tags.resize(slots, 0);
        for pos in 0..self.ring.len() {
            if !self.ring[pos].dead() {
                self.index(pos);
            }
        }
    }

    /// Appends a live entry and indexes it; returns its sequence number.
    fn push(&mut self, entry: Entry, capacity: usize) -> u32 {
        let dead = self.ring.len() - self.live;
        // Dead entries make up at least half of a ring twice the capacity (as before:
        // the ring stays within `2 * capacity`), or a quarter of a ring about to grow
        // (its allocation then follows the live count): drop them, at amortized O(1).
        if self.ring.len() >= capacity.saturating_mul(2)
            || (self.ring.len() == self.ring.capacity() && dead > 0 && dead * 4 >= self.ring.len())
            || u64::from(self.head) + self.ring.len() as u64 + 1 >= u64::from(u32::MAX)
        {
            self.compact();
        }
        if (self.live + 1) * 4 > self.slots.len() * 3 {
            let slots = (self.slots.len() * 2).max(16);
            self.reindex(slots);
        }
        self.ring.push_back(entry);
        let pos = self.ring.len() - 1;
        self.index(pos);
        self.live += 1;
        self.head.wrapping_add(pos as u32)
    }

    fn clear(&mut self) {
        self.ring.clear();
        self.slots.iter_mut().for_each(|s| *s = EMPTY);
        self.live = 0;
        self.head = 0;
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
/// Memory is bounded by `capacity` live entries (plus at most `capacity` dead
/// bookkeeping entries left by released reservations): when full, the oldest
/// entries are evicted first, even if still within the window, and counted in
/// [`evicted_early`](Self::evicted_early). Capacity 0 disables deduplication
/// (every id is new, nothing is stored); a zero window does the same.
///
/// An id costs 24 bytes in the ring (its 128-bit keyed hash, see [`Key`], the
/// second of its first sighting and its attempt's generation) and one 4-byte index
/// slot with its 1-byte tag; with the growth of both (doubling) that is 29–58 bytes,
/// ≈ 36 bytes per id with 1,000,000 ids (34 MiB; [`allocated_bytes`](Self::allocated_bytes)).
///
/// Time is kept in whole seconds since the set was created: an id sighted in second
/// `s` is remembered until second `s + window` begins (for between `window − 1 s` and
/// `window`; a window is rounded up to whole seconds).
#[derive(Debug)]
pub struct DedupSet {
    capacity: usize,
    /// The window in whole seconds (rounded up; 0 disables).
    window: u32,
    epoch: Instant,
    hasher: RandomState,
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
    key: Key,
    generation: u32,
    /// The entry's sequence number when it was pushed: where [`DedupSet::resolve`] looks
    /// first (stale after a compaction, then the index is searched).
    seq: u32,
}

impl Reservation {
    /// The id is durably stored: later sightings within the window are duplicates.
    pub fn confirm(mut self) {
        if let Some(set) = self.set.take() {
            set.resolve(&self.key, self.generation, self.seq, true);
        }
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if let Some(set) = self.set.take() {
            set.resolve(&self.key, self.generation, self.seq, false);
        }
    }
}

impl DedupSet {
    /// A set holding at most `capacity` ids, each for `window`.
    pub fn new(capacity: usize, window: Duration) -> Self {
        let secs = window
            .as_secs()
            .saturating_add(u64::from(window.subsec_nanos() > 0));
        Self {
            // Sequence numbers are 32-bit and the ring holds up to twice the capacity.
            capacity: capacity.min(1 << 30),
            window: secs.min(u64::from(MAX_TICKS)) as u32,
            epoch: Instant::now(),
            hasher: RandomState::new(),
            inner: Mutex::new(Inner::default()),
            settled: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn key(&self, id: &str) -> Key {
        [
            self.hasher.hash_one((0u8, id)),
            self.hasher.hash_one((1u8, id)),
        ]
    }

    /// Whole seconds from the set's epoch to `now` (0 for an earlier instant).
    fn ticks(&self, now: Instant) -> u32 {
        now.saturating_duration_since(self.epoch)
            .as_secs()
            .min(u64::from(MAX_TICKS)) as u32
    }

    /// Claims `id` at `now`: [`Claim::New`] with a reservation if it was not seen
    /// within the window, [`Claim::Duplicate`] if it was stored durably,
    /// [`Claim::InFlight`] if another attempt holds it. Expired entries are purged
    /// lazily from the front of the insertion-ordered ring (amortized O(1)).
    pub fn claim(self: &Arc<Self>, id: &str, now: Instant) -> Claim {
        let key = self.key(id);
        match self.reserve(key, now) {
            Ok(Some((generation, seq))) => Claim::New(Reservation {
                set: Some(Arc::clone(self)),
                key,
                generation,
                seq,
            }),
            // Deduplication is disabled: nothing to confirm or release.
            Ok(None) => Claim::New(Reservation {
                set: None,
                key,
                generation: 0,
                seq: 0,
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
        let key = self.key(id);
        match self.reserve(key, now) {
            Ok(Some((generation, seq))) => {
                self.resolve(&key, generation, seq, true);
                true
            }
            Ok(None) => true,
            Err(_) => false,
        }
    }

    /// Waits until no attempt of `id` is in flight (it was confirmed or released),
    /// at most `timeout`. Returns false on timeout.
    pub async fn settled(&self, id: &str, timeout: Duration) -> bool {
        let key = self.key(id);
        let wait = async {
            loop {
                let notified = self.settled.notified();
                tokio::pin!(notified);
                // Registered before the check, so a resolution in between is not missed.
                notified.as_mut().enable();
                let in_flight = {
                    let inner = self.lock();
                    inner
                        .find(&key)
                        .is_some_and(|(_, pos)| !inner.ring[pos].durable())
                };
                if !in_flight {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Reserves `key`: `Ok(Some((generation, sequence number)))` for a first sighting,
    /// `Ok(None)` when deduplication is disabled, `Err(durable)` when the id is already
    /// present.
    fn reserve(&self, key: Key, now: Instant) -> Result<Option<(u32, u32)>, bool> {
        if self.capacity == 0 || self.window == 0 {
            return Ok(None);
        }
        let now = self.ticks(now);
        let mut inner = self.lock();
        inner.purge_expired(now, self.window);
        if let Some((slot, pos)) = inner.find(&key) {
            let seen = inner.ring[pos];
            if now.saturating_sub(seen.ticks()) < self.window || !seen.durable() {
                return Err(seen.durable());
            }
            // Expired but not yet purged (callers' instants can arrive slightly
            // out of order, and the ring is in insertion order).
            inner.kill(slot, pos);
        }
        while inner.live >= self.capacity {
            if inner.ring.is_empty() {
                // Unreachable while the invariant holds; never loop forever.
                inner.clear();
                break;
            }
            inner.evict_oldest(now, self.window);
        }
        let generation = inner.next_generation;
        inner.next_generation = generation.wrapping_add(1);
        let seq = inner.push(
            Entry {
                key,
                at: now,
                generation,
            },
            self.capacity,
        );
        Ok(Some((generation, seq)))
    }

    /// Ends the attempt `generation` of `key`, pushed as sequence number `seq`: durable,
    /// or released (forgotten). A newer attempt of the same id (after eviction) is left
    /// alone.
    fn resolve(&self, key: &Key, generation: u32, seq: u32, durable: bool) {
        {
            let mut inner = self.lock();
            // The entry is where it was pushed unless the ring was compacted since (then
            // `seq` names another entry or none, and the index finds it). Key and
            // generation together name one attempt; a dead one was released already.
            let pos = inner.position(seq);
            let at_seq = inner
                .ring
                .get(pos)
                .filter(|e| e.key == *key && e.generation == generation)
                .copied();
            match at_seq {
                Some(seen) if seen.dead() || seen.durable() => {}
                Some(_) if durable => inner.ring[pos].at |= DURABLE,
                // Released: the index slot is needed to take it out.
                _ => {
                    if let Some((slot, pos)) = inner.find(key) {
                        let seen = inner.ring[pos];
                        if seen.generation == generation && !seen.durable() {
                            if durable {
                                inner.ring[pos].at |= DURABLE;
                            } else {
                                inner.kill(slot, pos);
                            }
                        }
                    }
                }
            }
        }
        self.settled.notify_waiters();
    }

    /// Forgets `id` outright (tests: releasing is a dropped [`Reservation`]).
    #[cfg(test)]
    pub fn forget(&self, id: &str) {
        let key = self.key(id);
        {
            let mut inner = self.lock();
            if let Some((slot, pos)) = inner.find(&key) {
                inner.kill(slot, pos);
            }
        }
        self.settled.notify_waiters();
    }

    /// Number of ids currently remembered (possibly including expired ones not
    /// yet purged).
    pub fn len(&self) -> usize {
        self.lock().live
    }

    /// True when no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.lock().live == 0
    }

    /// Entries evicted because the set was full before their window ended (a
    /// metric: dedup misses are possible when this grows).
    pub fn evicted_early(&self) -> u64 {
        self.lock().evicted_early
    }

    /// Heap bytes the set holds (ring and index allocations): what its ids cost.
    pub fn allocated_bytes(&self) -> usize {
        let inner = self.lock();
        inner.ring.capacity() * std::mem::size_of::<Entry>()
            + inner.slots.capacity() * std::mem::size_of::<u32>()
            + inner.tags.capacity()
    }

    #[cfg(test)]
    fn check_invariants(&self) {
        let inner = self.lock();
        assert!(inner.live <= self.capacity, "over capacity");
        assert!(
            inner.ring.len() <= self.capacity.saturating_mul(2),
            "ring over 2x capacity: {}",
            inner.ring.len()
        );
        let live: Vec<usize> = (0..inner.ring.len())
            .filter(|&p| !inner.ring[p].dead())
            .collect();
        assert_eq!(live.len(), inner.live, "live count");
        assert!(inner.slots.is_empty() || inner.slots.len().is_power_of_two());
        assert!(
            inner.live * 4 <= inner.slots.len() * 3,
            "index over 3/4 full"
        );
        let indexed = inner.slots.iter().filter(|&&s| s != EMPTY).count();
        assert_eq!(indexed, inner.live, "each live entry has one slot");
        for pos in live {
            let key = inner.ring[pos].key;
            assert_eq!(
                inner.find(&key).map(|(_, p)| p),
                Some(pos),
                "live entry {pos} is found"
            );
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

    #[test]
    fn an_id_costs_at_most_40_bytes_at_the_default_capacity() {
        // Deterministic: the set's own allocations (ring and index), not RSS. Before the
        // compact layout (`Arc<str>` keys in a `HashMap` plus a `VecDeque` of copies) an
        // id cost 162 bytes of RSS (`bench-memory`).
        const IDS: usize = 1_000_000;
        let set = Arc::new(DedupSet::new(IDS, WINDOW));
        let t0 = Instant::now();
        for i in 0..IDS {
            let id = format!("lg-7-{i}");
            match set.claim(&id, t0) {
                Claim::New(r) => r.confirm(),
                other => panic!("{id}: {other:?}"),
            }
        }
        assert_eq!(set.len(), IDS);
        let per_id = set.allocated_bytes() as f64 / IDS as f64;
        println!(
            "dedup set: {IDS} ids in {} bytes, {per_id:.1} bytes per id",
            set.allocated_bytes()
        );
        assert!(per_id <= 40.0, "{per_id:.1} bytes per id");
        assert!(matches!(set.claim("lg-7-0", t0), Claim::Duplicate));
        assert!(matches!(set.claim("lg-7-999999", t0), Claim::Duplicate));
        assert_eq!(set.evicted_early(), 0);
        // Full: a new id evicts the oldest within its window, counted.
        claimed(&set, "lg-7-1000000", t0).confirm();
        assert_eq!((set.len(), set.evicted_early()), (IDS, 1));
    }

    #[test]
    fn released_reservations_do_not_grow_the_ring_past_twice_the_capacity() {
        let set = Arc::new(DedupSet::new(100, WINDOW));
        let t0 = Instant::now();
        let held: Vec<Reservation> = (0..50)
            .map(|i| claimed(&set, &format!("h{i}"), t0))
            .collect();
        for round in 0..10_000 {
            // Released out of order: the dead entries stay in the ring until compacted.
            let a = claimed(&set, &format!("a{round}"), t0);
            let b = claimed(&set, &format!("b{round}"), t0);
            drop(a);
            b.confirm();
        }
        set.check_invariants();
        assert!(
            set.allocated_bytes() < 200 * 24 * 2 + 1024 * 4,
            "{}",
            set.allocated_bytes()
        );
        drop(held);
        set.check_invariants();
    }

    /// The set before its compact layout (ids in a `HashMap` plus an insertion-ordered
    /// `VecDeque`), kept as the reference the compact set must agree with, at the same
    /// whole-second clock.
    mod reference {
        use std::collections::{HashMap, VecDeque};

        #[derive(Debug, Clone, Copy)]
        struct Seen {
            at: u32,
            generation: u64,
            durable: bool,
        }

        #[derive(Debug, Default)]
        pub struct RefSet {
            pub capacity: usize,
            pub window: u32,
            map: HashMap<String, Seen>,
            order: VecDeque<(Seen, String)>,
            next_generation: u64,
            pub evicted_early: u64,
        }

        impl RefSet {
            pub fn new(capacity: usize, window: u32) -> Self {
                Self {
                    capacity,
                    window,
                    ..Default::default()
                }
            }

            fn is_live(&self, seen: Seen, id: &str) -> bool {
                self.map
                    .get(id)
                    .is_some_and(|l| l.generation == seen.generation)
            }

            /// `Ok(generation)`, or `Err(durable)`.
            pub fn reserve(&mut self, id: &str, now: u32) -> Result<u64, bool> {
                while let Some((seen, front)) = self.order.front() {
                    if now.saturating_sub(seen.at) < self.window {
                        break;
                    }
                    let (seen, front) = (*seen, front.clone());
                    self.order.pop_front();
                    if self.is_live(seen, &front) {
                        self.map.remove(&front);
                    }
                }
                if let Some(seen) = self.map.get(id) {
                    if now.saturating_sub(seen.at) < self.window || !seen.durable {
                        return Err(seen.durable);
                    }
                    self.map.remove(id);
                }
                while self.map.len() >= self.capacity {
                    let (seen, old) = self.order.pop_front().expect("live ids are in order");
                    if self.is_live(seen, &old) {
                        self.map.remove(&old);
                        if now.saturating_sub(seen.at) < self.window {
                            self.evicted_early += 1;
                        }
                    }
                }
                let seen = Seen {
                    at: now,
                    generation: self.next_generation,
                    durable: false,
                };
                self.next_generation += 1;
                self.map.insert(id.to_owned(), seen);
                self.order.push_back((seen, id.to_owned()));
                Ok(seen.generation)
            }

            pub fn resolve(&mut self, id: &str, generation: u64, durable: bool) {
                if let Some(s) = self.map.get_mut(id)
                    && s.generation == generation
                    && !s.durable
                {
                    if durable {
                        s.durable = true;
                    } else {
                        self.map.remove(id);
                    }
                }
            }

            pub fn len(&self) -> usize {
                self.map.len()
            }
        }
    }

    #[derive(Debug, Clone)]
    enum ModelOp {
        Claim(u8),
        Confirm(usize),
        Release(usize),
        Advance(u32),
    }

    fn model_op() -> impl Strategy<Value = ModelOp> {
        prop_oneof![
            6 => (0u8..12).prop_map(ModelOp::Claim),
            2 => any::<usize>().prop_map(ModelOp::Confirm),
            2 => any::<usize>().prop_map(ModelOp::Release),
            1 => (0u32..8).prop_map(ModelOp::Advance),
        ]
    }

    proptest! {
        #[test]
        fn agrees_with_the_reference_set(
            capacity in 1usize..7,
            ops in proptest::collection::vec(model_op(), 0..400),
        ) {
            let window = 10u32;
            let set = Arc::new(DedupSet::new(capacity, Duration::from_secs(window.into())));
            let mut reference = reference::RefSet::new(capacity, window);
            let t0 = Instant::now();
            let mut now = 0u32;
            // Open attempts: (id, the set's reservation, the reference's generation).
            let mut open: Vec<(String, Reservation, u64)> = Vec::new();
            for op in ops {
                let at = t0 + Duration::from_secs(now.into());
                match op {
                    ModelOp::Claim(id) => {
                        let id = format!("e{id}");
                        let expected = reference.reserve(&id, now);
                        match (set.claim(&id, at), expected) {
                            (Claim::New(r), Ok(generation)) => open.push((id, r, generation)),
                            (Claim::Duplicate, Err(true)) | (Claim::InFlight, Err(false)) => {}
                            (got, expected) => prop_assert!(false, "{id} at {now}: {got:?}, reference {expected:?}"),
                        }
                    }
                    ModelOp::Confirm(i) | ModelOp::Release(i) if !open.is_empty() => {
                        let durable = matches!(op, ModelOp::Confirm(_));
                        let (id, r, generation) = open.swap_remove(i % open.len());
                        reference.resolve(&id, generation, durable);
                        if durable { r.confirm() } else { drop(r) }
                    }
                    ModelOp::Confirm(_) | ModelOp::Release(_) => {}
                    ModelOp::Advance(secs) => now += secs,
                }
                prop_assert_eq!(set.len(), reference.len());
                prop_assert_eq!(set.evicted_early(), reference.evicted_early);
                set.check_invariants();
            }
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
