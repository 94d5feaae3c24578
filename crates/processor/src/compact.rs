//! Compact containers for the per-user state of `window` and `session` (issue #15, bounded
//! memory): most users hold one open window and one open session with a handful of events,
//! so the containers are sized for that — exact-capacity sorted vectors instead of
//! B-tree maps (whose smallest node holds room for 11 entries) and hash sets, shared
//! (`Arc<str>`) user ids, event ids and label values instead of a `String` copy in every
//! structure — and switch to a hash set only when a user's event ids grow large.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// The hasher of the per-user state's maps and sets: foldhash, randomly seeded per map
/// (what hashbrown uses by default), several times faster than std's SipHash on short
/// keys such as user and event ids — an event looks its user up a few times. Its seeds
/// keep client-chosen ids from being crafted into collisions ahead of time.
pub type FastHash = foldhash::fast::RandomState;
/// A hash map with [`FastHash`].
pub type FastMap<K, V> = HashMap<K, V, FastHash>;
/// A hash set with [`FastHash`].
pub type FastSet<T> = HashSet<T, FastHash>;

/// Above this many ids an [`IdSet`] becomes a hash set (a linear scan below).
const SMALL_IDS: usize = 24;

/// How many tables a [`ShardedMap`] splits its entries over.
pub const SHARDS: usize = 64;

/// A hash map over [`SHARDS`] tables, each growing on its own: what holds every user (a
/// million in the 1M-user run). One hashbrown table doubles all at once — at 458,752 and
/// 917,504 users the sessions' table went to 2^20 and 2^21 buckets: ~107 MiB more at one
/// insert the second time, with the old table still held during the move, and the state
/// estimate stepping up between two emission ticks; those were the 1M-user run's only
/// samples over 64 MiB above the estimate (issue #15). A shard doubles at 1/64 of that,
/// and the shards, which fill evenly but not in step, one insert at a time.
///
/// The key is hashed once ([`FastHash`]): bits 51..57 pick the shard, hashbrown's table
/// uses the low bits for the bucket and the top 7 for its control byte, so a shard sees
/// keys as varied as one table would (and a lookup costs what one map's does).
#[derive(Clone)]
pub struct ShardedMap<K, V> {
    shards: Box<[hashbrown::HashTable<(K, V)>]>,
    hasher: FastHash,
}

impl<K, V> std::fmt::Debug for ShardedMap<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedMap")
            .field("len", &self.len())
            .finish_non_exhaustive()
    }
}

impl<K, V> Default for ShardedMap<K, V> {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| hashbrown::HashTable::new()).collect(),
            hasher: FastHash::default(),
        }
    }
}

/// The shard of a key's hash (see [`ShardedMap`]).
fn shard_of(hash: u64) -> usize {
    ((hash >> 51) as usize) % SHARDS
}

impl<K: Eq + std::hash::Hash, V> ShardedMap<K, V> {
    fn hash<Q: std::hash::Hash + ?Sized>(&self, key: &Q) -> u64 {
        use std::hash::BuildHasher;
        self.hasher.hash_one(key)
    }

    pub fn get<Q>(&self, key: &Q) -> Option<&V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.get_key_value(key).map(|(_, v)| v)
    }

    pub fn get_key_value<Q>(&self, key: &Q) -> Option<(&K, &V)>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let h = self.hash(key);
        self.shards[shard_of(h)]
            .find(h, |(k, _)| k.borrow() == key)
            .map(|(k, v)| (k, v))
    }

    pub fn get_mut<Q>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let h = self.hash(key);
        self.shards[shard_of(h)]
            .find_mut(h, |(k, _)| k.borrow() == key)
            .map(|(_, v)| v)
    }

    pub fn remove<Q>(&mut self, key: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let h = self.hash(key);
        self.shards[shard_of(h)]
            .find_entry(h, |(k, _)| k.borrow() == key)
            .ok()
            .map(|e| e.remove().0.1)
    }

    /// The value of `key`, inserted as `V::default()` when it has none.
    pub fn get_or_default(&mut self, key: K) -> &mut V
    where
        V: Default,
    {
        let h = self.hash(&key);
        let hasher = &self.hasher;
        let entry = self.shards[shard_of(h)].entry(
            h,
            |(k, _)| *k == key,
            |(k, _)| std::hash::BuildHasher::hash_one(hasher, k),
        );
        &mut entry.or_insert_with(|| (key, V::default())).into_mut().1
    }

    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        let h = self.hash(&key);
        let hasher = &self.hasher;
        match self.shards[shard_of(h)].entry(
            h,
            |(k, _)| *k == key,
            |(k, _)| std::hash::BuildHasher::hash_one(hasher, k),
        ) {
            hashbrown::hash_table::Entry::Occupied(mut e) => {
                Some(std::mem::replace(&mut e.get_mut().1, value))
            }
            hashbrown::hash_table::Entry::Vacant(e) => {
                e.insert((key, value));
                None
            }
        }
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&K, &mut V) -> bool) {
        for shard in self.shards.iter_mut() {
            shard.retain(|(k, v)| keep(k, v));
        }
    }

    /// Gives back the room of the shards left mostly empty, as [`shrink_map`] does for
    /// one table but without its 64-entry floor (a shard is 1/64 of the map: 64 such
    /// floors would outlive every user).
    pub fn shrink(&mut self) {
        let hasher = &self.hasher;
        for shard in self.shards.iter_mut() {
            if shard.len() * 4 < shard.capacity() {
                shard.shrink_to(shard.len() * 2, |(k, _)| {
                    std::hash::BuildHasher::hash_one(hasher, k)
                });
            }
        }
    }
}

impl<K, V> ShardedMap<K, V> {
    pub fn len(&self) -> usize {
        self.shards.iter().map(hashbrown::HashTable::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.shards.iter().all(hashbrown::HashTable::is_empty)
    }

    pub fn clear(&mut self) {
        for shard in self.shards.iter_mut() {
            shard.clear();
        }
    }

    /// Every entry, shard by shard (in no particular order, as a hash map's).
    pub fn iter(&self) -> impl Iterator<Item = (&K, &V)> {
        self.shards
            .iter()
            .flat_map(|s| s.iter().map(|(k, v)| (k, v)))
    }

    pub fn values(&self) -> impl Iterator<Item = &V> {
        self.iter().map(|(_, v)| v)
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut V> {
        self.shards
            .iter_mut()
            .flat_map(|s| s.iter_mut().map(|(_, v)| v))
    }

    /// Heap bytes of the tables ([`table_bytes`] of each shard's capacity: hashbrown's
    /// tables, laid out as std's).
    pub fn table_bytes(&self) -> usize {
        self.shards
            .iter()
            .map(|s| table_bytes::<(K, V)>(s.capacity()))
            .sum()
    }
}

/// Whether two ids are equal, compared inline as words: lengths, then the first and last
/// 8 (or 4) bytes, which cover an id of up to 16 bytes whole; only a longer id whose ends
/// match is compared byte for byte. The scan of a user's window ids for duplicates called
/// `memcmp` for every id (~12 % of the core's profile, issue #19).
#[inline]
fn same_id(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    if let (Some(ah), Some(at), Some(bh), Some(bt)) = (
        a.first_chunk::<8>(),
        a.last_chunk::<8>(),
        b.first_chunk::<8>(),
        b.last_chunk::<8>(),
    ) {
        return ah == bh && at == bt && (a.len() <= 16 || a == b);
    }
    if let (Some(ah), Some(at), Some(bh), Some(bt)) = (
        a.first_chunk::<4>(),
        a.last_chunk::<4>(),
        b.first_chunk::<4>(),
        b.last_chunk::<4>(),
    ) {
        // 4 to 7 bytes: the two ends cover the id.
        return ah == bh && at == bt;
    }
    a == b
}

/// A 32-bit Bloom filter of the event ids of one open window (two bits per id, see
/// [`id_bits`]): the duplicate check of an event skips the windows whose filter rules its
/// id out instead of scanning their ids (a scan chases a pointer to every id; ~9 % of the
/// core's profile with a few windows of six ids per user, issue #19). Ids are only ever
/// added to a window, so the filter never needs rebuilding; it fits in the window's
/// padding (no memory cost).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdBloom(u32);

impl IdBloom {
    /// Whether an id with [`id_bits`] `bits` may have been added (false: it was not).
    #[inline]
    pub fn may_contain(self, bits: u32) -> bool {
        self.0 & bits == bits
    }

    #[inline]
    pub fn add(&mut self, bits: u32) {
        self.0 |= bits;
    }
}

/// The two bits of an [`IdBloom`] an id sets: from its length and its first and last 8
/// bytes (an id of up to 16 bytes whole), mixed by a multiplication whose top bits depend
/// on every input bit. Ids differing only in the middle share bits: that costs a scan,
/// never an answer.
#[inline]
pub fn id_bits(id: &str) -> u32 {
    let b = id.as_bytes();
    let (head, tail) = match (b.first_chunk::<8>(), b.last_chunk::<8>()) {
        (Some(h), Some(t)) => (u64::from_le_bytes(*h), u64::from_le_bytes(*t)),
        _ => {
            let mut x = [0u8; 8];
            x[..b.len()].copy_from_slice(b);
            (u64::from_le_bytes(x), 0)
        }
    };
    let h = (head ^ tail.rotate_left(29) ^ b.len() as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (1 << (h >> 59)) | (1 << ((h >> 54) & 31))
}

/// The event ids of one user's open window or session (deduplication): inline for one id
/// (most users), a vector for a few, a hash set beyond [`SMALL_IDS`].
#[derive(Debug, Clone, Default)]
pub enum IdSet {
    #[default]
    Empty,
    One(Arc<str>),
    Small(Vec<Arc<str>>),
    Large(Box<FastSet<Arc<str>>>),
}

impl IdSet {
    pub fn contains(&self, id: &str) -> bool {
        match self {
            Self::Empty => false,
            Self::One(x) => same_id(x, id),
            Self::Small(v) => v.iter().any(|x| same_id(x, id)),
            Self::Large(s) => s.contains(id),
        }
    }

    /// Adds `id` (the caller checked it is not there).
    pub fn insert(&mut self, id: Arc<str>) {
        match std::mem::take(self) {
            Self::Empty => *self = Self::One(id),
            Self::One(x) => {
                *self = Self::Small(vec![x, id]);
            }
            Self::Small(mut v) if v.len() < SMALL_IDS => {
                push_exact(&mut v, id);
                *self = Self::Small(v);
            }
            Self::Small(v) => {
                let mut s: FastSet<Arc<str>> = v.into_iter().collect();
                s.insert(id);
                *self = Self::Large(Box::new(s));
            }
            Self::Large(mut s) => {
                s.insert(id);
                *self = Self::Large(s);
            }
        }
    }

    pub fn remove(&mut self, id: &str) {
        match self {
            Self::Empty => {}
            Self::One(x) => {
                if same_id(x, id) {
                    *self = Self::Empty;
                }
            }
            Self::Small(v) => {
                if let Some(i) = v.iter().position(|x| same_id(x, id)) {
                    v.swap_remove(i);
                }
            }
            Self::Large(s) => {
                s.remove(id);
            }
        }
    }

    pub fn len(&self) -> usize {
        match self {
            Self::Empty => 0,
            Self::One(_) => 1,
            Self::Small(v) => v.len(),
            Self::Large(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Estimated heap bytes of the set itself (not of the ids, which are shared).
    pub fn heap_bytes(&self) -> usize {
        match self {
            Self::Empty | Self::One(_) => 0,
            Self::Small(v) => alloc_bytes(v.capacity() * 16),
            Self::Large(s) => {
                alloc_bytes(std::mem::size_of::<FastSet<Arc<str>>>())
                    + table_bytes::<Arc<str>>(s.capacity())
            }
        }
    }
}

/// Pushes with room for one more only while the vector is small (1, 2, 3, 4 elements),
/// then doubling as usual: most vectors here hold one or two elements for their life.
pub fn push_exact<T>(v: &mut Vec<T>, x: T) {
    if v.len() == v.capacity() && v.len() < 4 {
        v.reserve_exact(1);
    }
    v.push(x);
}

/// Inserts at `at` with the growth of [`push_exact`].
pub fn insert_exact<T>(v: &mut Vec<T>, at: usize, x: T) {
    if v.len() == v.capacity() && v.len() < 4 {
        v.reserve_exact(1);
    }
    v.insert(at, x);
}

/// A multiset of (partition, value) — the earliest offset, or the start, each open window
/// or session holds per partition — so the smallest value of a partition is a range lookup
/// instead of a walk over every open aggregate.
pub type PartitionMins = std::collections::BTreeMap<(i32, i64), usize>;

/// Adds one (partition, value) to `set`.
pub fn hold(set: &mut PartitionMins, partition: i32, value: i64) {
    *set.entry((partition, value)).or_insert(0) += 1;
}

/// Removes one (partition, value) from `set`.
pub fn release(set: &mut PartitionMins, partition: i32, value: i64) {
    if let Some(n) = set.get_mut(&(partition, value)) {
        *n = n.saturating_sub(1);
        if *n == 0 {
            set.remove(&(partition, value));
        }
    }
}

/// The smallest value of `partition` in `set`.
pub fn smallest(set: &PartitionMins, partition: i32) -> Option<i64> {
    set.range((partition, i64::MIN)..=(partition, i64::MAX))
        .next()
        .map(|((_, v), _)| *v)
}

/// Per partition, the (min, max) offset folded in: inline for one partition (the normal
/// case: a user's events come from one partition), sorted by partition beyond.
#[derive(Debug, Clone, Default)]
pub enum Offsets {
    #[default]
    Empty,
    One(i32, i64, i64),
    Many(Vec<(i32, i64, i64)>),
}

impl Offsets {
    fn slice(&self) -> &[(i32, i64, i64)] {
        match self {
            Self::Empty => &[],
            Self::One(..) => &[],
            Self::Many(v) => v,
        }
    }

    /// Folds `offset` of `partition` in; returns the previous min of the partition (None
    /// when it is new), so the caller can move what it holds.
    pub fn fold(&mut self, partition: i32, offset: i64) -> Option<i64> {
        match self {
            Self::Empty => {
                *self = Self::One(partition, offset, offset);
                None
            }
            Self::One(p, min, max) if *p == partition => {
                let before = *min;
                *min = (*min).min(offset);
                *max = (*max).max(offset);
                Some(before)
            }
            Self::One(p, min, max) => {
                let mut v = vec![(*p, *min, *max), (partition, offset, offset)];
                v.sort_unstable_by_key(|(p, _, _)| *p);
                *self = Self::Many(v);
                None
            }
            Self::Many(v) => match v.iter_mut().find(|(p, _, _)| *p == partition) {
                Some((_, min, max)) => {
                    let before = *min;
                    *min = (*min).min(offset);
                    *max = (*max).max(offset);
                    Some(before)
                }
                None => {
                    let at = v.partition_point(|(p, _, _)| *p < partition);
                    v.insert(at, (partition, offset, offset));
                    None
                }
            },
        }
    }

    pub fn min(&self, partition: i32) -> Option<i64> {
        self.mins().find(|(p, _)| *p == partition).map(|(_, m)| m)
    }

    pub fn contains(&self, partition: i32) -> bool {
        self.mins().any(|(p, _)| p == partition)
    }

    /// (partition, min) of every partition, ascending.
    pub fn mins(&self) -> impl Iterator<Item = (i32, i64)> + '_ {
        let one = match self {
            Self::One(p, min, _) => Some((*p, *min)),
            _ => None,
        };
        one.into_iter()
            .chain(self.slice().iter().map(|(p, min, _)| (*p, *min)))
    }

    /// The highest partition folded in.
    pub fn last_partition(&self) -> Option<i32> {
        self.mins().last().map(|(p, _)| p)
    }

    pub fn heap_bytes(&self) -> usize {
        match self {
            Self::Many(v) => alloc_bytes(v.capacity() * std::mem::size_of::<(i32, i64, i64)>()),
            _ => 0,
        }
    }
}

/// Counts by label, sorted by label (page, event type, currency): inline for one label
/// (most windows see one page and one event type), a vector beyond. Inline, a window
/// closed frees only its own slot (issue #15: the two 32-byte vectors every window held
/// sat among the sessions' ids in the allocator's pages, so a mass close freed slots but
/// no page).
#[derive(Debug, Clone)]
pub enum Counts<V> {
    One(Arc<str>, V),
    /// Empty (no allocation) or more than one label.
    Many(Vec<(Arc<str>, V)>),
}

impl<V> Default for Counts<V> {
    fn default() -> Self {
        Self::Many(Vec::new())
    }
}

impl<V: Copy + Default> Counts<V> {
    /// The value of `label`, inserted at its default (with `intern`'s shared copy of the
    /// label) when new.
    pub fn entry(&mut self, label: &str, intern: &mut Interner) -> &mut V {
        if let Self::Many(v) = self
            && v.capacity() == 0
        {
            *self = Self::One(intern.get(label), V::default());
        } else if let Self::One(k, v) = self
            && **k != *label
        {
            let mut many = Vec::with_capacity(2);
            many.push((k.clone(), *v));
            *self = Self::Many(many);
        }
        match self {
            Self::One(_, v) => v,
            Self::Many(v) => {
                let i = match v.binary_search_by(|(k, _)| (**k).cmp(label)) {
                    Ok(i) => i,
                    Err(i) => {
                        insert_exact(v, i, (intern.get(label), V::default()));
                        i
                    }
                };
                &mut v[i].1
            }
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, V)> + '_ {
        let (one, many) = match self {
            Self::One(k, v) => (Some((&**k, *v)), &[][..]),
            Self::Many(v) => (None, &v[..]),
        };
        one.into_iter().chain(many.iter().map(|(k, v)| (&**k, *v)))
    }

    pub fn heap_bytes(&self) -> usize {
        match self {
            Self::Many(v) => alloc_bytes(v.capacity() * std::mem::size_of::<(Arc<str>, V)>()),
            Self::One(..) => 0,
        }
    }
}

/// Shared copies of label values (pages, event types, currencies): one allocation per
/// distinct value in use, not one per window. Values no window uses any more are dropped
/// by [`Self::prune`].
#[derive(Debug, Default, Clone)]
pub struct Interner {
    set: FastSet<Arc<str>>,
    pruned_at: usize,
}

impl Interner {
    pub fn get(&mut self, value: &str) -> Arc<str> {
        if let Some(v) = self.set.get(value) {
            return v.clone();
        }
        let v: Arc<str> = Arc::from(value);
        self.set.insert(v.clone());
        v
    }

    /// Drops the values only the interner holds, when it doubled since the last prune
    /// (amortised: the labels' cardinality is the client's).
    pub fn prune(&mut self) {
        if self.set.len() > (2 * self.pruned_at).max(1_024) {
            self.set.retain(|v| Arc::strong_count(v) > 1);
            self.pruned_at = self.set.len();
        }
    }

    pub fn len(&self) -> usize {
        self.set.len()
    }

    pub fn is_empty(&self) -> bool {
        self.set.is_empty()
    }
}

/// Bytes the allocator (jemalloc, `pulse_platform::malloc`) gives a request of `size`
/// bytes, for estimates: up to 16 KiB its size classes (8, then 16-byte steps to 128,
/// then four classes per doubling: 160, 192, 224, 256, 320, …), each slot as resident as
/// its neighbours; above, whole pages (a large allocation's class rounding beyond its
/// last page is address space never touched, not memory). Issue #15: the estimate
/// counted requested sizes, ~7 % (≈ 70 B an open user) under what the heap held.
pub fn alloc_bytes(size: usize) -> usize {
    const LARGE: usize = 16 * 1024;
    const PAGE: usize = 4096;
    match size {
        0 => 0,
        1..=8 => 8,
        9..=128 => size.div_ceil(16) * 16,
        129..=LARGE => {
            // Four classes between 2^k and 2^(k+1): steps of 2^(k-2).
            let k = usize::BITS - 1 - (size - 1).leading_zeros();
            let step = 1usize << (k - 2);
            size.div_ceil(step) * step
        }
        _ => size.div_ceil(PAGE) * PAGE,
    }
}

/// Heap bytes of an `Arc<str>` of `len` bytes (two counters and the text, rounded to the
/// allocator's class), for estimates.
pub fn arc_str_bytes(len: usize) -> usize {
    alloc_bytes(16 + len)
}

/// Gives back most of the room of a hash map left mostly empty (a hash table keeps its
/// capacity when entries are removed): below a quarter full, to twice its entries.
pub fn shrink_map<K: Eq + std::hash::Hash, V, S: std::hash::BuildHasher>(m: &mut HashMap<K, V, S>) {
    if m.capacity() > 64 && m.len() * 4 < m.capacity() {
        m.shrink_to(m.len() * 2);
    }
}

/// [`shrink_map`] for a hash set.
pub fn shrink_set<T: Eq + std::hash::Hash, S: std::hash::BuildHasher>(m: &mut HashSet<T, S>) {
    if m.capacity() > 64 && m.len() * 4 < m.capacity() {
        m.shrink_to(m.len() * 2);
    }
}

/// Heap bytes of a hash table of entries `T` that can hold `capacity` entries (its
/// `capacity()`, which a table keeps after its entries are removed or cleared): hashbrown
/// allocates a power of two of buckets, 8 for every 7 entries of capacity (from 16 buckets
/// up), each an entry and a control byte, plus one group (16) of control bytes, in one
/// allocation ([`alloc_bytes`]).
pub fn table_bytes<T>(capacity: usize) -> usize {
    if capacity == 0 {
        return 0;
    }
    let buckets = if capacity < 8 {
        capacity + 1
    } else {
        (capacity / 7 * 8).next_power_of_two()
    };
    alloc_bytes((buckets * std::mem::size_of::<T>()).next_multiple_of(16) + buckets + 16)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Bytes this thread holds in the heap now, as jemalloc counts them: every allocation
    /// at its size class (its per-thread counters, so other tests do not interfere).
    pub(crate) fn thread_heap() -> i64 {
        use tikv_jemalloc_ctl::thread::{allocatedp, deallocatedp};
        let allocated = allocatedp::read()
            .expect("jemalloc's thread counters")
            .get();
        let freed = deallocatedp::read()
            .expect("jemalloc's thread counters")
            .get();
        allocated as i64 - freed as i64
    }

    /// The most the heap grows at one insert while `n` users go in, and the tables'
    /// estimated bytes at the end.
    fn largest_step(
        n: usize,
        mut insert: impl FnMut(Arc<str>),
        bytes: impl Fn() -> usize,
    ) -> (i64, usize) {
        let keys: Vec<Arc<str>> = (0..n).map(|i| Arc::from(format!("u{i:07}"))).collect();
        let mut largest = 0;
        for k in keys {
            let before = thread_heap();
            insert(k);
            largest = largest.max(thread_heap() - before);
        }
        (largest, bytes())
    }

    /// Issue #15: a sharded map never grows by more than a shard's table at once, where
    /// one table grows by all of it (the 1M-user run's +170 MiB at one insert); lookups,
    /// updates and removals find what one map would.
    #[test]
    fn a_sharded_map_grows_a_shard_at_a_time_and_answers_as_one_map() {
        let n = 200_000;
        let mut one: FastMap<Arc<str>, u64> = FastMap::default();
        let one_step = {
            let one = std::cell::RefCell::new(&mut one);
            largest_step(
                n,
                |k| {
                    one.borrow_mut().insert(k, 1);
                },
                || table_bytes::<(Arc<str>, u64)>(one.borrow().capacity()),
            )
        };
        let mut sharded: ShardedMap<Arc<str>, u64> = ShardedMap::default();
        let sharded_step = {
            let sharded = std::cell::RefCell::new(&mut sharded);
            largest_step(
                n,
                |k| {
                    sharded.borrow_mut().insert(k, 1);
                },
                || sharded.borrow().table_bytes(),
            )
        };
        // One table: its last doubling is half its final size at one insert.
        assert!(
            one_step.0 as usize >= one_step.1 / 3,
            "one table: {one_step:?}"
        );
        // Sharded: at most a shard's (1/64 of the tables, with room for an uneven shard).
        assert!(
            sharded_step.0 as usize <= sharded_step.1 / 16,
            "sharded: {sharded_step:?}"
        );
        assert!(
            sharded_step.1 <= one_step.1 * 2,
            "{sharded_step:?} vs {one_step:?}"
        );
        // Every shard holds a fair share.
        let lens: Vec<usize> = sharded
            .shards
            .iter()
            .map(hashbrown::HashTable::len)
            .collect();
        let fair = n / SHARDS;
        assert!(
            lens.iter().all(|&l| l > fair * 3 / 4 && l < fair * 5 / 4),
            "{lens:?}"
        );
        // Answers as one map.
        assert_eq!(sharded.len(), n);
        for i in (0..n).step_by(7) {
            let k = format!("u{i:07}");
            *sharded.get_mut(k.as_str()).unwrap() += 1;
            *one.get_mut(k.as_str()).unwrap() += 1;
        }
        for i in (0..n).step_by(11) {
            let k = format!("u{i:07}");
            assert_eq!(sharded.remove(k.as_str()), one.remove(k.as_str()));
        }
        sharded.retain(|_, v| *v == 1);
        one.retain(|_, v| *v == 1);
        let mut a: Vec<(String, u64)> = sharded.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        let mut b: Vec<(String, u64)> = one.iter().map(|(k, v)| (k.to_string(), *v)).collect();
        a.sort();
        b.sort();
        assert_eq!(a, b);
        assert_eq!(
            sharded.get_key_value("u0000001").map(|(k, _)| &**k),
            one.get_key_value("u0000001").map(|(k, _)| &**k)
        );
        *sharded.get_or_default(Arc::from("new")) += 5;
        assert_eq!(sharded.get("new"), Some(&5));
        assert_eq!(sharded.values().count(), sharded.len());
        sharded.clear();
        assert!(sharded.is_empty());
        sharded.shrink();
        assert_eq!(sharded.table_bytes(), 0);
    }

    #[test]
    fn alloc_bytes_is_what_the_allocator_gives_a_request() {
        for size in (1..=4_096).chain((4_097..=40_000).step_by(97)) {
            let before = thread_heap();
            let v: Vec<u8> = Vec::with_capacity(size);
            let given = (thread_heap() - before) as usize;
            drop(v);
            if size <= 16 * 1024 {
                assert_eq!(alloc_bytes(size), given, "{size} B");
            } else {
                // Large: whole pages (the class's rounding past them is never touched).
                assert!(
                    alloc_bytes(size) <= given && alloc_bytes(size) >= size,
                    "{size} B"
                );
                assert_eq!(alloc_bytes(size) % 4096, 0, "{size} B");
            }
        }
        assert_eq!(alloc_bytes(0), 0);
    }

    #[test]
    fn counts_keep_one_label_inline_and_more_sorted() {
        let mut i = Interner::default();
        let mut c: Counts<u64> = Counts::default();
        assert_eq!(c.iter().count(), 0);
        assert_eq!(c.heap_bytes(), 0);
        *c.entry("/b", &mut i) += 1;
        *c.entry("/b", &mut i) += 1;
        assert!(matches!(c, Counts::One(..)));
        assert_eq!(c.heap_bytes(), 0, "one label: no allocation");
        assert_eq!(c.iter().collect::<Vec<_>>(), vec![("/b", 2)]);
        *c.entry("/a", &mut i) += 5;
        *c.entry("/c", &mut i) += 1;
        *c.entry("/b", &mut i) += 1;
        assert_eq!(
            c.iter().collect::<Vec<_>>(),
            vec![("/a", 5), ("/b", 3), ("/c", 1)]
        );
        assert!(c.heap_bytes() > 0);
        let mut d: Counts<u64> = Counts::default();
        *d.entry("/z", &mut i) += 1;
        *d.entry("/y", &mut i) += 1;
        assert_eq!(d.iter().collect::<Vec<_>>(), vec![("/y", 1), ("/z", 1)]);
    }

    #[test]
    fn an_id_set_grows_into_a_hash_set_and_keeps_its_ids() {
        let mut s = IdSet::default();
        for i in 0..100 {
            let id = format!("e{i}");
            assert!(!s.contains(&id));
            s.insert(Arc::from(id.as_str()));
            assert!(s.contains(&id));
        }
        assert!(matches!(s, IdSet::Large(_)));
        assert_eq!(s.len(), 100);
        s.remove("e5");
        assert!(!s.contains("e5") && s.contains("e6"));
    }

    #[test]
    fn ids_compare_equal_exactly_when_they_are_equal() {
        let ids: Vec<String> = (0..40)
            .map(|n| "abcdefghijklmnopqrstuvwxyz0123456789abcd"[..n].to_owned())
            .chain(
                [
                    "b-10",
                    "b-20",
                    "x-123456789-y",
                    "x-123456780-y",
                    "1234-x-5678",
                    "1234-y-5678",
                ]
                .map(String::from),
            )
            .chain((0..20).map(|n| format!("e-{n:0>20}-{}", n % 3)))
            .collect();
        for a in &ids {
            for b in &ids {
                assert_eq!(same_id(a, b), a == b, "{a:?} {b:?}");
            }
            // The same id with any one byte changed.
            for i in 0..a.len() {
                let mut c = a.clone().into_bytes();
                c[i] ^= 1;
                let c = String::from_utf8(c).unwrap_or_default();
                assert!(!same_id(a, &c), "{a:?} {c:?}");
            }
        }
    }

    #[test]
    fn a_bloom_never_rules_out_an_id_it_holds_and_rules_out_most_others() {
        let mut bloom = IdBloom::default();
        let held: Vec<String> = (0..6).map(|n| format!("b-{}", n * 5_000)).collect();
        for id in &held {
            bloom.add(id_bits(id));
        }
        assert!(held.iter().all(|id| bloom.may_contain(id_bits(id))));
        for id in ["", "a", "b-1", "0123456789abcdef0123"] {
            assert_eq!(
                id_bits(id).count_ones().clamp(1, 2),
                id_bits(id).count_ones()
            );
        }
        let others = (0..10_000)
            .map(|n| format!("b-{}", 100_000 + n))
            .filter(|id| bloom.may_contain(id_bits(id)))
            .count();
        // Six ids set at most 12 of 32 bits: about (12/32)^2 = 14 % pass by chance.
        assert!(
            others < 2_000,
            "{others} of 10,000 other ids pass the filter"
        );
    }

    #[test]
    fn counts_stay_sorted_and_share_interned_labels() {
        let mut i = Interner::default();
        let mut a: Counts<u64> = Counts::default();
        let mut b: Counts<u64> = Counts::default();
        for l in ["/b", "/a", "/b", "/c"] {
            *a.entry(l, &mut i) += 1;
        }
        *b.entry("/a", &mut i) += 1;
        assert_eq!(
            a.iter().collect::<Vec<_>>(),
            vec![("/a", 1), ("/b", 2), ("/c", 1)]
        );
        assert_eq!(i.len(), 3);
        drop(a);
        i.pruned_at = 0;
        i.set
            .extend((0..2_000).map(|n| Arc::from(format!("x{n}").as_str())));
        i.prune();
        assert_eq!(i.len(), 1, "only /a is still used");
        drop(b);
    }

    #[test]
    fn offsets_track_min_and_max_per_partition() {
        let mut o = Offsets::default();
        assert_eq!(o.fold(1, 10), None);
        assert_eq!(o.fold(0, 7), None);
        assert_eq!(o.fold(1, 4), Some(10));
        assert_eq!(o.min(1), Some(4));
        assert_eq!(o.mins().collect::<Vec<_>>(), vec![(0, 7), (1, 4)]);
        assert_eq!(o.last_partition(), Some(1));
    }
}
