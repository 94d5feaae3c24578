//! Gap-based session windows per user, in event time, with a maximum duration.
//!
//! A user's events whose consecutive event times are at most `session_gap_ms` apart form a
//! run. A run is cut into sessions of less than `max_session_ms` each: the first session
//! starts at the run's first event, and the first event at or after a session's start +
//! `max_session_ms` starts the next one, so a session covers event times
//! `[start, start + max_session_ms)` and a user who is never idle still gets sessions that
//! end. The cut depends only on the event times of the run, never on arrival order or on
//! when results were emitted.
//!
//! Open sessions of a user are kept sorted by start; sessions of different runs are more
//! than a gap apart. An event within a gap of one extends it, an event within a gap of two
//! runs bridges (merges) them, and an event that moves a run's first event back moves
//! every cut after it. Everything here is pure logic: no I/O, no clocks.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;

use crate::compact::{
    FastMap, FastSet, IdSet, Offsets, PartitionMins, ShardedMap, alloc_bytes, arc_str_bytes, hold,
    insert_exact, release, shrink_map, shrink_set, smallest, table_bytes,
};

use pulse_contracts::pb::aggregates::v1::Session;
use sha2::{Digest, Sha256};

use crate::model::{self, Admit, InputEvent, TimeConfig};

/// One event folded into an open session: what a re-cut needs to move it to another
/// session.
#[derive(Debug, Clone)]
struct Ev {
    t: i64,
    partition: i32,
    offset: i64,
    ingest_ms: i64,
    page: bool,
    id: Arc<str>,
}

/// One open session of a user.
#[derive(Debug, Clone)]
struct Open {
    id: String,
    start_ms: i64,
    end_ms: i64,
    page_count: u64,
    /// The events folded in (any order).
    events: Vec<Ev>,
    /// Per partition: (min offset, max offset) of the events folded in. A user's events
    /// normally come from one partition; keeping a map stays correct if they do not.
    offsets: Offsets,
    /// Highest offset folded in, over all partitions (drives the version).
    max_offset: i64,
    last_ingest_ms: i64,
    /// Ids this session superseded (absorbed sessions, its own ids before its start moved
    /// back, and its id from before it was closed at the maximum).
    merged: BTreeSet<String>,
    /// Closed at the maximum duration: the next open session of the user continues the
    /// same run (it starts within a gap of this one's end).
    split: bool,
    /// Changed since it was last emitted.
    dirty: bool,
}

impl Open {
    /// A session of `events` (not empty); `split` when a later session continues its run.
    fn new(user_id: &str, events: Vec<Ev>, split: bool, max_ms: i64) -> Self {
        let mut open = Self {
            id: String::new(),
            start_ms: i64::MAX,
            end_ms: i64::MIN,
            page_count: 0,
            events: Vec::with_capacity(events.len()),
            offsets: Offsets::default(),
            max_offset: i64::MIN,
            last_ingest_ms: i64::MIN,
            merged: BTreeSet::new(),
            split: false,
            dirty: true,
        };
        for e in events {
            open.push(e);
        }
        open.id = Sessions::session_id(user_id, open.start_ms);
        if split {
            open.close_at_max(user_id, max_ms);
        }
        open
    }

    fn push(&mut self, e: Ev) {
        self.start_ms = self.start_ms.min(e.t);
        self.end_ms = self.end_ms.max(e.t);
        self.page_count = self.page_count.saturating_add(u64::from(e.page));
        self.offsets.fold(e.partition, e.offset);
        self.max_offset = self.max_offset.max(e.offset);
        self.last_ingest_ms = self.last_ingest_ms.max(e.ingest_ms);
        self.events.push(e);
        self.dirty = true;
    }

    /// A later session now continues this one's run: it is closed at the maximum, takes
    /// its split id and supersedes the id it had while it was the run's last session.
    fn close_at_max(&mut self, user_id: &str, max_ms: i64) {
        // Its id until now: the plain id, or the id it was renamed to (see `retire_ids`).
        let before = std::mem::replace(
            &mut self.id,
            Sessions::split_session_id(user_id, self.start_ms, max_ms),
        );
        self.merged.insert(before);
        self.merged.remove(&self.id);
        self.split = true;
        self.dirty = true;
    }

    fn event_count(&self) -> u64 {
        u64::try_from(self.events.len()).unwrap_or(u64::MAX)
    }

    /// Whether event time `t` is within `gap` of this session: in [start - gap, end + gap].
    fn near(&self, t: i64, gap: i64) -> bool {
        self.start_ms.saturating_sub(gap) <= t && t <= self.end_ms.saturating_add(gap)
    }

    fn to_session(&self, user_id: &str, is_final: bool) -> Session {
        Session {
            session_id: self.id.clone(),
            user_id: user_id.to_owned(),
            start_ms: self.start_ms,
            end_ms: self.end_ms,
            duration_ms: self.end_ms.saturating_sub(self.start_ms),
            page_count: self.page_count,
            event_count: self.event_count(),
            version: model::version(self.max_offset, self.event_count(), is_final),
            r#final: is_final,
            last_ingest_ms: self.last_ingest_ms,
            merged_session_ids: self.merged.iter().cloned().collect(),
            // Stamped by the run loop on the way out (`run::Processor::rules_version`).
            rules_version: String::new(),
        }
    }
}

/// Cuts the events of one run into sessions by the maximum duration: the first event at or
/// after a session's start + `max_ms` starts the next one.
fn cut(mut events: Vec<Ev>, max_ms: i64) -> Vec<Vec<Ev>> {
    events.sort_by_key(|e| (e.t, e.partition, e.offset));
    let mut out: Vec<Vec<Ev>> = Vec::new();
    for e in events {
        match out.last_mut() {
            Some(s) if e.t < s[0].t.saturating_add(max_ms) => s.push(e),
            _ => out.push(vec![e]),
        }
    }
    out
}

/// The end of the user's latest session already emitted final. An event within a gap after
/// it could only extend a closed session, so it is late — unless that session was closed
/// at the maximum and the event is at or after the start of the open session continuing it.
#[derive(Debug, Clone, Copy)]
struct Closed {
    end_ms: i64,
    partition: i32,
    /// Start of the open session that continues the closed one's run (split at the
    /// maximum).
    next_start_ms: Option<i64>,
}

impl Closed {
    fn reaches(&self, t: i64, gap: i64) -> bool {
        t <= self.end_ms.saturating_add(gap) && self.next_start_ms.is_none_or(|s| t < s)
    }
}

#[derive(Debug, Default)]
struct UserState {
    /// Sorted by start. A session with `split` is followed by the next one of its run;
    /// sessions of different runs are more than a gap apart.
    open: Vec<Open>,
    closed: Option<Closed>,
    /// Event ids of the open sessions (deduplication).
    ids: IdSet,
    /// Ids the prior session rules emitted that no open session may have again (see
    /// [`Sessions::supersede`]); None for nearly every user. Boxed: 8 bytes per user
    /// instead of an empty set's 24, on every open user.
    #[allow(clippy::box_collection)]
    retired: Option<Box<BTreeSet<String>>>,
}

impl UserState {
    /// Every open session whose id is retired takes the id for the same start under the
    /// rules in force (`gap`) and lists the retired one: a result the prior rules emitted
    /// with that id, and more records, would otherwise outrank it by its version.
    fn retire_ids(&mut self, gap: i64) {
        let Some(retired) = self.retired.as_deref() else {
            return;
        };
        for o in &mut self.open {
            if retired.contains(&o.id) {
                let renamed = Sessions::rules_session_id(&o.id, gap);
                let before = std::mem::replace(&mut o.id, renamed);
                o.merged.insert(before);
                o.dirty = true;
            }
        }
    }

    /// Every superseded id that is some open session's current id again is dropped from
    /// the lists (a session must never list a live one).
    fn unlist_current_ids(&mut self) {
        if self.open.iter().all(|o| o.merged.is_empty()) {
            return; // Nothing listed (the usual case): no set of the current ids to build.
        }
        let current: HashSet<String> = self.open.iter().map(|o| o.id.clone()).collect();
        for o in &mut self.open {
            o.merged.retain(|m| !current.contains(m));
        }
    }
}

/// When `state` next needs an emission's attention: the earliest end of an open session +
/// `horizon` (it becomes final), or with none open, the closed record's end + `gap` +
/// `horizon` (it is forgotten). None: nothing to do.
fn deadline(state: &UserState, horizon: i64, gap: i64) -> Option<i64> {
    let open = state
        .open
        .iter()
        .map(|o| o.end_ms.saturating_add(horizon))
        .min();
    match (open, state.closed) {
        (Some(d), _) => Some(d),
        (None, Some(c)) => Some(c.end_ms.saturating_add(gap).saturating_add(horizon)),
        (None, None) => None,
    }
}

/// Estimated heap bytes of one user's state, its event ids' own bytes excepted (see
/// [`Sessions::heap_bytes`]).
fn user_bytes(user: &str, s: &UserState) -> usize {
    let open: usize = s
        .open
        .iter()
        .map(|o| {
            alloc_bytes(o.events.capacity() * std::mem::size_of::<Ev>())
                + o.offsets.heap_bytes()
                + alloc_bytes(o.id.capacity())
                + o.merged
                    .iter()
                    .map(|m| alloc_bytes(m.capacity()) + 48)
                    .sum::<usize>()
        })
        .sum();
    arc_str_bytes(user.len())
        + s.ids.heap_bytes()
        + alloc_bytes(s.open.capacity() * std::mem::size_of::<Open>())
        + open
}

/// What one user's state counts for in the [`Index`].
#[derive(Debug, Default)]
struct Snap {
    /// (partition, min offset, start) of each open session, per partition it holds.
    held: Vec<(i32, i64, i64)>,
    /// Per partition with an open session: (partition, earliest start, continued) — the
    /// user's checkpoint entry (see [`Sessions::checkpoint_entry`]).
    entries: Vec<(i32, i64, bool)>,
    due: Option<i64>,
    dirty: bool,
    open: usize,
    events: usize,
    bytes: usize,
}

impl Snap {
    /// Makes this what `state` counts for, reusing the vectors' room (two snapshots per
    /// event: no allocation once they have grown).
    fn fill(&mut self, user: &str, state: &UserState, horizon: i64, gap: i64) {
        self.held.clear();
        self.entries.clear();
        let mut events = 0;
        let mut dirty = false;
        for o in &state.open {
            events += o.events.len();
            dirty |= o.dirty;
            for (p, min) in o.offsets.mins() {
                self.held.push((p, min, o.start_ms));
            }
        }
        let next = state.closed.and_then(|c| c.next_start_ms);
        for (p, _, start) in &self.held {
            match self.entries.iter_mut().find(|e| e.0 == *p) {
                Some(e) => e.1 = e.1.min(*start),
                None => self.entries.push((*p, *start, false)),
            }
        }
        for e in &mut self.entries {
            e.2 = next == Some(e.1);
        }
        self.due = deadline(state, horizon, gap);
        self.dirty = dirty;
        self.open = state.open.len();
        self.events = events;
        self.bytes = user_bytes(user, state);
    }

    /// Makes this what no state counts for (keeping the vectors' room).
    fn clear(&mut self) {
        self.held.clear();
        self.entries.clear();
        self.due = None;
        self.dirty = false;
        self.open = 0;
        self.events = 0;
        self.bytes = 0;
    }
}

/// What the sessions' per-tick and per-checkpoint questions need, kept up to date as each
/// user's state changes (issue #15: a tick, a commit point or a checkpoint costs the users
/// that changed, not every open session). Every change of a user's state is bracketed by
/// [`Index::account`] (`false` before, `true` after).
#[derive(Debug, Default)]
struct Index {
    /// (partition, min offset) of every open session, per partition it holds.
    held: PartitionMins,
    /// (partition, start) of every open session, per partition it holds.
    starts: PartitionMins,
    /// (deadline, user) entries, a lower bound of each user's [`deadline`]: every user with
    /// a deadline has an entry at or before it (more than one, or one of a user no longer
    /// here, only after its deadline moved back, until an emission visits it). An entry is
    /// added only when a user's deadline moves back (a new state, an earlier session) and
    /// when an emission visits a user for its entries, not whenever an event extends a
    /// session and moves its deadline forward: that was a remove and an insert down this
    /// tree per event (~6 % of the core's profile, issue #19).
    due: BTreeSet<(i64, Arc<str>)>,
    /// The users whose `due` entries the emission in progress took out (see
    /// [`Sessions::emit_plan`]), with the earliest: each gets an entry for its deadline
    /// when it is visited; those left by an emission that did not finish are put back by
    /// the next.
    taken: FastMap<Arc<str>, i64>,
    /// Users with an open session changed since it was last emitted (a hash set: no
    /// string comparisons down a tree per event; an emission sorts the few it visits).
    dirty: FastSet<Arc<str>>,
    /// Per partition tracked, the users whose checkpoint entry may have changed since the
    /// partition's changes were last taken.
    changed: HashMap<i32, FastSet<Arc<str>>>,
    /// Partitions whose changes are tracked (see [`Sessions::track_changes`]).
    tracked: HashSet<i32>,
    /// What the user being changed counted for (see [`Index::begin`]); meaningful while
    /// `pending`.
    before: Snap,
    pending: bool,
    /// Scratch room for what it counts for after the change (see [`Index::end`]).
    after: Snap,
    open: usize,
    events: usize,
    /// Sum of [`user_bytes`] (wrapping: added and removed symmetrically).
    bytes: usize,
    /// Users visited by emissions so far (what a tick costs; see `Engine::emit_visits`).
    visits: u64,
}

impl Index {
    /// Before `user`'s state changes: what it counts for now (see [`Self::end`]).
    fn begin(&mut self, user: &str, state: &UserState, horizon: i64, gap: i64) {
        self.before.fill(user, state, horizon, gap);
        self.pending = true;
    }

    /// After `user`'s state changed (None: it was removed): the index entries that differ
    /// from what it counted for at [`Self::begin`] (nothing, without one) are moved, and
    /// the partitions whose checkpoint entry of the user changed are marked.
    fn end(&mut self, user: &Arc<str>, state: Option<&UserState>, horizon: i64, gap: i64) {
        let mut before = std::mem::take(&mut self.before);
        let mut after = std::mem::take(&mut self.after);
        if !std::mem::take(&mut self.pending) {
            before.clear();
        }
        match state {
            Some(s) => after.fill(user, s, horizon, gap),
            None => after.clear(),
        }
        if before.held != after.held {
            for (p, min, start) in &before.held {
                release(&mut self.held, *p, *min);
                release(&mut self.starts, *p, *start);
            }
            for (p, min, start) in &after.held {
                hold(&mut self.held, *p, *min);
                hold(&mut self.starts, *p, *start);
            }
        }
        if before.entries != after.entries {
            for (p, ..) in before.entries.iter().chain(&after.entries) {
                let was = before.entries.iter().find(|e| e.0 == *p);
                let is = after.entries.iter().find(|e| e.0 == *p);
                if was != is {
                    self.mark(*p, user);
                }
            }
        }
        match (before.due, after.due) {
            // An entry at or before the deadline before is at or before this one. A user
            // without a deadline any more keeps its entries until they are visited.
            (Some(b), Some(a)) if a >= b => {}
            (_, None) => {}
            (_, Some(a)) => {
                self.due.insert((a, user.clone()));
            }
        }
        if before.dirty != after.dirty {
            if after.dirty {
                self.dirty.insert(user.clone());
            } else {
                self.dirty.remove(user);
            }
        }
        self.open = (self.open + after.open).saturating_sub(before.open);
        self.events = (self.events + after.events).saturating_sub(before.events);
        self.bytes = self
            .bytes
            .wrapping_add(after.bytes)
            .wrapping_sub(before.bytes);
        self.before = before;
        self.after = after;
    }

    fn mark(&mut self, partition: i32, user: &Arc<str>) {
        if !self.tracked.contains(&partition) {
            return;
        }
        let set = self.changed.entry(partition).or_default();
        if !set.contains(user) {
            set.insert(user.clone());
        }
    }
}

/// Gap-based session windows per user (event time), cut at a maximum duration. start_ms =
/// first event time, end_ms = last event time, duration_ms = end - start (< the maximum),
/// page_count = page_view events, event_count = all events.
#[derive(Debug)]
pub struct Sessions {
    cfg: TimeConfig,
    max_session_ms: i64,
    /// A hash map: an event's lookups hash the user id once instead of comparing it down
    /// a tree; emissions visit the users they need in order (see [`Self::emit`]).
    users: ShardedMap<Arc<str>, UserState>,
    index: Index,
    /// Event times at or below this may touch a finalized session whose record was pruned:
    /// a watermark-late event there is late even if it touches an open session.
    floor_ms: i64,
}

impl Sessions {
    /// Sessions with the default maximum duration ([`model::DEFAULT_MAX_SESSION_MS`]).
    pub fn new(cfg: TimeConfig) -> Self {
        Self::with_max_session_ms(cfg, model::DEFAULT_MAX_SESSION_MS)
    }

    /// Sessions cut at `max_session_ms` (below 1 is treated as 1).
    pub fn with_max_session_ms(cfg: TimeConfig, max_session_ms: i64) -> Self {
        Self {
            cfg,
            max_session_ms: max_session_ms.max(1),
            users: ShardedMap::default(),
            index: Index::default(),
            floor_ms: i64::MIN,
        }
    }

    pub fn max_session_ms(&self) -> i64 {
        self.max_session_ms
    }

    fn gap(&self) -> i64 {
        self.cfg.session_gap_ms.max(0)
    }

    /// The session gap in force, ms (never negative).
    pub fn gap_ms(&self) -> i64 {
        self.gap()
    }

    /// After a replay under changed session rules (see
    /// [`crate::engine::PriorSessionRules`]): `prior` holds the sessions the prior rules
    /// made of the same records. Each of them that is not also an open session here (same
    /// id, same events) is superseded: listed in `merged_session_ids` of the open session
    /// holding its first event, or — when an open session here has its id with other
    /// events — retired, that session renamed (see `UserState::retire_ids`). Idempotent.
    /// A session already emitted final here can no longer list anything (only when a
    /// replayed partition went idle and emissions went on before its replay ended).
    /// Returns how many ids were newly listed or retired.
    pub fn supersede(&mut self, prior: &Sessions) -> usize {
        let (gap, horizon) = (self.gap(), self.horizon());
        let mut count = 0;
        for (user, old) in prior.users.iter() {
            let Some(state) = self.users.get_mut(&**user) else {
                continue;
            };
            self.index.begin(user, state, horizon, gap);
            for o in &old.open {
                let same = state.open.iter().any(|n| {
                    n.id == o.id
                        && n.events.len() == o.events.len()
                        && o.events
                            .iter()
                            .all(|e| n.events.iter().any(|x| x.id == e.id))
                });
                if same {
                    continue;
                }
                if state.open.iter().any(|n| n.id == o.id) {
                    if state.retired.get_or_insert_default().insert(o.id.clone()) {
                        count += 1;
                    }
                    continue;
                }
                let Some(first) = o.events.iter().min_by_key(|e| (e.t, e.partition, e.offset))
                else {
                    continue;
                };
                if let Some(n) = state
                    .open
                    .iter_mut()
                    .find(|n| n.events.iter().any(|e| e.id == first.id))
                    && !n.merged.contains(&o.id)
                {
                    n.merged.insert(o.id.clone());
                    n.dirty = true;
                    count += 1;
                }
            }
            state.retire_ids(gap);
            state.unlist_current_ids();
            self.index.end(user, Some(state), horizon, gap);
        }
        count
    }

    /// How far behind the watermark a session's end must be before it is final.
    fn horizon(&self) -> i64 {
        self.gap()
            .saturating_add(self.cfg.allowed_lateness_ms.max(0))
    }

    /// Deterministic session id: "s-" + 32 hex chars of SHA-256 over (user_id, '\0',
    /// start_ms as decimal).
    pub fn session_id(user_id: &str, start_ms: i64) -> String {
        Self::hash_id(user_id, start_ms, None)
    }

    /// Deterministic id of a session closed at the maximum duration (a later session of
    /// the user continues its run): "s-" + 32 hex chars of SHA-256 over (user_id, '\0',
    /// start_ms, '\0', "max=" max_session_ms). It differs from the session's
    /// [`Self::session_id`], which it lists in `merged_session_ids`: an earlier result of
    /// the same start with more events (written before the maximum existed, or under a
    /// larger one) is superseded instead of outranking the cut session by its version.
    pub fn split_session_id(user_id: &str, start_ms: i64, max_session_ms: i64) -> String {
        Self::hash_id(user_id, start_ms, Some(max_session_ms))
    }

    /// The id a session whose id the prior rules used (`id`) takes under the rules in
    /// force, with session gap `gap_ms`: "s-" + 32 hex chars of SHA-256 over ("rules", '\0',
    /// id, '\0', "gap=" gap_ms). Deterministic, so a restart renames it the same way.
    pub fn rules_session_id(id: &str, gap_ms: i64) -> String {
        let mut hasher = Sha256::new();
        hasher.update(b"rules\0");
        hasher.update(id.as_bytes());
        hasher.update(format!("\0gap={gap_ms}").as_bytes());
        let digest = hasher.finalize();
        format!("s-{}", hex::encode(&digest[..16]))
    }

    fn hash_id(user_id: &str, start_ms: i64, max_session_ms: Option<i64>) -> String {
        let mut hasher = Sha256::new();
        hasher.update(user_id.as_bytes());
        hasher.update([0u8]);
        hasher.update(start_ms.to_string().as_bytes());
        if let Some(max) = max_session_ms {
            hasher.update([0u8]);
            hasher.update(format!("max={max}").as_bytes());
        }
        let digest = hasher.finalize();
        format!("s-{}", hex::encode(&digest[..16]))
    }

    /// Whether an event is too late for sessions: event_time + session_gap_ms +
    /// allowed_lateness_ms <= watermark AND it does not fall within [start - gap, end + gap]
    /// of one of the user's open sessions.
    ///
    /// Also late, so that a final session is never contradicted: an event within a gap after
    /// a session of the user already emitted final (it would extend a closed session) —
    /// unless that session was closed at the maximum and the event is at or after the start
    /// of the open session continuing it — and a watermark-late event at or below the floor
    /// of pruned final sessions.
    pub fn is_late(&self, event: &InputEvent, watermark: Option<i64>) -> bool {
        let state = self.users.get(event.user_id.as_str());
        let bounds = (self.gap(), self.horizon(), self.floor_ms);
        late(state, event.event_time_ms, watermark, bounds)
    }

    pub fn contains(&self, user_id: &str, event_id: &str) -> bool {
        self.users
            .get(user_id)
            .is_some_and(|s| s.ids.contains(event_id))
    }

    /// Folds the event in: Duplicate (same event id in any of the user's open sessions; an
    /// event already folded in is never reported late) / Late / Added. An event may extend a
    /// run on either side, start a new run, or bridge two open runs (its time within gap of
    /// both) — then they merge. The run is then cut at the maximum duration (see the module
    /// doc); a session's id is the id for its start (the split id when it was closed at the
    /// maximum). Ids a session no longer has — absorbed sessions, a start that moved back,
    /// a cut that moved — go to `merged_session_ids` (sorted, deduplicated, accumulated
    /// across merges) of the session holding this event, or of the session keeping that
    /// start.
    pub fn add(&mut self, event: &InputEvent, watermark: Option<i64>) -> Admit {
        let user = self
            .user_key(&event.user_id)
            .unwrap_or_else(|| Arc::from(event.user_id.as_str()));
        self.add_shared(event, &user, Arc::from(event.event_id.as_str()), watermark)
    }

    /// [`Self::contains`] and [`Self::user_key`] with one lookup of the user.
    pub(crate) fn find(&self, user_id: &str, event_id: &str) -> (bool, Option<Arc<str>>) {
        match self.users.get_key_value(user_id) {
            Some((k, s)) => (s.ids.contains(event_id), Some(k.clone())),
            None => (false, None),
        }
    }

    /// The shared copy of `user_id` if it has state here.
    pub fn user_key(&self, user_id: &str) -> Option<Arc<str>> {
        self.users.get_key_value(user_id).map(|(k, _)| k.clone())
    }

    /// [`Self::add`] with the user's and the event's ids already shared (the engine passes
    /// the same copies to the windows).
    pub fn add_shared(
        &mut self,
        event: &InputEvent,
        user_key: &Arc<str>,
        id: Arc<str>,
        watermark: Option<i64>,
    ) -> Admit {
        if self.contains(&event.user_id, &event.event_id) {
            return Admit::Duplicate;
        }
        self.add_new(event, user_key, id, watermark)
    }

    /// [`Self::add_shared`] for an event the caller knows is in none of the user's open
    /// sessions (the engine checks windows and sessions once, before either folds it in).
    pub(crate) fn add_new(
        &mut self,
        event: &InputEvent,
        user_key: &Arc<str>,
        id: Arc<str>,
        watermark: Option<i64>,
    ) -> Admit {
        let gap = self.gap();
        let horizon = self.horizon();
        let bounds = (gap, horizon, self.floor_ms);
        let max = self.max_session_ms;
        let t = event.event_time_ms;
        let user = event.user_id.as_str();
        let ev = Ev {
            t,
            partition: event.partition,
            offset: event.offset,
            ingest_ms: event.ingest_ms,
            page: event.is_page_view(),
            id,
        };
        // One lookup of the user for the lateness check and the change.
        let state = match self.users.get_mut(&**user_key) {
            Some(s) => {
                if late(Some(s), t, watermark, bounds) {
                    return Admit::Late;
                }
                let at = place(&s.open, t, gap, max);
                if let Place::Push(j) = at
                    && s.open[j]
                        .offsets
                        .min(ev.partition)
                        .is_some_and(|min| min <= ev.offset)
                {
                    push(&mut self.index, user_key, s, j, ev);
                    return Admit::Added;
                }
                self.index.begin(user_key, s, horizon, gap);
                let admit = fold(s, ev, user, gap, max, at);
                self.index.end(user_key, Some(s), horizon, gap);
                return admit;
            }
            None => {
                if late(None, t, watermark, bounds) {
                    return Admit::Late;
                }
                self.users.get_or_default(user_key.clone())
            }
        };
        let admit = fold(state, ev, user, gap, max, Place::NewRun);
        self.index.end(user_key, Some(state), horizon, gap);
        admit
    }

    /// Sessions to emit now: every open session with end_ms + session_gap_ms +
    /// allowed_lateness_ms <= watermark is emitted once with final = true and removed; if
    /// `early`, every other dirty session is emitted with final = false (dirty flag
    /// cleared). Deterministic order (user, start). version = model::version(max offset
    /// folded in, event_count, final).
    ///
    /// Only the users that need it are visited: those with a session due (see
    /// [`deadline`]) and, when `early`, those with a dirty session.
    pub fn emit(&mut self, watermark: Option<i64>, early: bool) -> Vec<Session> {
        let visit = self.emit_plan(watermark, early);
        let mut out = Vec::with_capacity(visit.len());
        self.emit_users(&visit, watermark, early, &mut out);
        out
    }

    /// The users an emission visits, in user order (deterministic output), each once:
    /// those with a session due by `watermark` and, if `early`, those with a changed one.
    /// [`Self::emit_users`] then emits them, in as many slices as the caller likes (as long
    /// as nothing else changes the sessions in between).
    ///
    /// The `due` entries at or before the watermark are taken out (each user visited gets
    /// one for its deadline then), so a user whose deadline moved forward is visited at
    /// most once for its old entry.
    pub fn emit_plan(&mut self, watermark: Option<i64>, early: bool) -> Vec<Arc<str>> {
        let index = &mut self.index;
        // Users an emission that did not finish left unvisited keep their entries.
        for (user, d) in index.taken.drain() {
            index.due.insert((d, user));
        }
        let mut visit: Vec<Arc<str>> = Vec::new();
        if let Some(wm) = watermark {
            while let Some(first) = index.due.first()
                && first.0 <= wm
            {
                let Some((d, user)) = index.due.pop_first() else {
                    break;
                };
                if let Some(earliest) = index.taken.get_mut(&user) {
                    *earliest = (*earliest).min(d);
                } else {
                    visit.push(user.clone());
                    index.taken.insert(user, d);
                }
            }
        }
        if early {
            visit.extend(self.index.dirty.iter().cloned());
        }
        // In user order (deterministic output), each once.
        visit.sort_unstable();
        visit.dedup();
        visit
    }

    /// Emits the sessions of `visit` (a slice of [`Self::emit_plan`]'s users) into `out`.
    pub fn emit_users(
        &mut self,
        visit: &[Arc<str>],
        watermark: Option<i64>,
        early: bool,
        out: &mut Vec<Session>,
    ) {
        let horizon = self.horizon();
        let gap = self.gap();
        for user in visit {
            // Visited for its `due` entries (taken out by the plan): it gets one for its
            // deadline now.
            let for_due = self.index.taken.remove(&**user).is_some();
            let Some(state) = self.users.get_mut(&**user) else {
                continue;
            };
            self.index.visits += 1;
            self.index.begin(user, state, horizon, gap);
            self.floor_ms = emit_user(
                user,
                state,
                watermark,
                early,
                (horizon, gap),
                self.floor_ms,
                out,
            );
            if state.open.is_empty() && state.closed.is_none() {
                self.users.remove(&**user);
                self.index.end(user, None, horizon, gap);
            } else {
                self.index.end(user, Some(state), horizon, gap);
                if for_due && let Some(d) = self.index.after.due {
                    self.index.due.insert((d, user.clone()));
                }
            }
        }
    }

    /// Smallest offset of `partition` still held by an open session, None if none.
    pub fn min_open_offset(&self, partition: i32) -> Option<i64> {
        smallest(&self.index.held, partition)
    }

    /// Earliest start of an open session holding records of `partition`, None if none.
    pub fn min_open_start(&self, partition: i32) -> Option<i64> {
        smallest(&self.index.starts, partition)
    }

    /// Per user with an open session holding records of `partition`: the earliest start of
    /// those sessions (for checkpoints: a replayed record at or after it belongs to a session
    /// that was still open).
    pub fn open_starts(&self, partition: i32) -> BTreeMap<String, i64> {
        self.users
            .iter()
            .filter_map(|(user, s)| {
                s.open
                    .iter()
                    .filter(|o| o.offsets.contains(partition))
                    .map(|o| o.start_ms)
                    .min()
                    .map(|start| (user.to_string(), start))
            })
            .collect()
    }

    /// Users among [`Self::open_starts`] whose earliest open session continues one already
    /// final (cut at the maximum): after a restart an event before that session's start is
    /// still late (see [`Self::restore_continuation`]).
    pub fn continued(&self, partition: i32) -> BTreeSet<String> {
        self.users
            .iter()
            .filter(|(_, s)| {
                let first = s
                    .open
                    .iter()
                    .filter(|o| o.offsets.contains(partition))
                    .map(|o| o.start_ms)
                    .min();
                first.is_some() && s.closed.and_then(|c| c.next_start_ms) == first
            })
            .map(|(user, _)| user.to_string())
            .collect()
    }

    /// After a restart: `user`'s session starting at `start_ms` continues a session already
    /// final (cut at the maximum), so an event before `start_ms` is late, as it was before.
    pub fn restore_continuation(&mut self, user_id: &str, start_ms: i64, partition: i32) {
        let gap = self.gap();
        let horizon = self.horizon();
        let user = self.user_key(user_id).unwrap_or_else(|| Arc::from(user_id));
        let state = match self.users.get_mut(&*user) {
            Some(s) => {
                self.index.begin(&user, s, horizon, gap);
                s
            }
            None => self.users.get_or_default(user.clone()),
        };
        state.closed = Some(Closed {
            end_ms: start_ms.saturating_sub(gap),
            partition,
            next_start_ms: Some(start_ms),
        });
        self.index.end(&user, Some(state), horizon, gap);
    }

    /// `user`'s entry in the checkpoint of `partition`: the earliest start of its open
    /// sessions holding records of the partition (as in [`Self::open_starts`]) and whether
    /// that session continues one already final (as in [`Self::continued`]); None when it
    /// has none.
    pub fn checkpoint_entry(&self, user: &str, partition: i32) -> Option<(i64, bool)> {
        let s = self.users.get(user)?;
        let first = s
            .open
            .iter()
            .filter(|o| o.offsets.contains(partition))
            .map(|o| o.start_ms)
            .min()?;
        Some((first, s.closed.and_then(|c| c.next_start_ms) == Some(first)))
    }

    /// The users whose entry in the checkpoint of `partition` may have changed since the
    /// last call (or [`Self::clear_changed`]).
    pub fn take_changed(&mut self, partition: i32) -> FastSet<Arc<str>> {
        self.index.changed.remove(&partition).unwrap_or_default()
    }

    /// Tracks the changes of `partition` from now on (its checkpoint was just taken
    /// whole): what [`Self::take_changed`] returns.
    pub fn track_changes(&mut self, partition: i32) {
        self.index.tracked.insert(partition);
        self.index.changed.remove(&partition);
    }

    /// Stops tracking the changes of every partition (their next checkpoints are taken
    /// whole), so an engine whose checkpoints are not taken keeps no changes.
    pub fn untrack_changes(&mut self) {
        self.index.tracked.clear();
        self.index.changed.clear();
    }

    /// Drops the open sessions of `partition` (revoked in a rebalance) — a whole run when
    /// any of its sessions holds records of it — and the records of the partition's final
    /// sessions.
    pub fn revoke(&mut self, partition: i32) {
        for state in self.users.values_mut() {
            let mut kept: Vec<Open> = Vec::with_capacity(state.open.len());
            let mut run: Vec<Open> = Vec::new();
            for o in std::mem::take(&mut state.open) {
                let ends_run = !o.split;
                run.push(o);
                if ends_run {
                    if !run.iter().any(|o| o.offsets.contains(partition)) {
                        kept.append(&mut run);
                    }
                    run.clear();
                }
            }
            if !run.iter().any(|o| o.offsets.contains(partition)) {
                kept.append(&mut run);
            }
            state.open = kept;
            let mut ids = IdSet::default();
            for e in state.open.iter().flat_map(|o| o.events.iter()) {
                ids.insert(e.id.clone());
            }
            state.ids = ids;
            if state.closed.is_some_and(|c| c.partition == partition) {
                state.closed = None;
            }
        }
        self.users
            .retain(|_, s| !s.open.is_empty() || s.closed.is_some());
        // Rare (a rebalance): the index is rebuilt; the changes of the other partitions
        // are kept, the revoked one's dropped.
        let mut changed = std::mem::take(&mut self.index.changed);
        changed.remove(&partition);
        let mut tracked = std::mem::take(&mut self.index.tracked);
        tracked.remove(&partition);
        let visits = self.index.visits;
        let (horizon, gap) = (self.horizon(), self.gap());
        self.index = Index::default();
        for (user, state) in self.users.iter() {
            self.index.end(user, Some(state), horizon, gap);
        }
        self.index.changed = changed;
        self.index.tracked = tracked;
        self.index.visits = visits;
    }

    /// Users visited by emissions so far.
    pub fn emit_visits(&self) -> u64 {
        self.index.visits
    }

    /// Panics unless the index kept up to date equals one built from scratch.
    #[cfg(test)]
    fn assert_indexed(&self) {
        let (horizon, gap) = (self.horizon(), self.gap());
        let mut fresh = Index::default();
        for (user, state) in self.users.iter() {
            fresh.end(user, Some(state), horizon, gap);
        }
        let i = &self.index;
        assert_eq!(
            (&i.held, &i.starts, &i.dirty, i.open, i.events, i.bytes),
            (
                &fresh.held,
                &fresh.starts,
                &fresh.dirty,
                fresh.open,
                fresh.events,
                fresh.bytes
            )
        );
        // Every user's deadline has an entry at or before it (a lower bound).
        let mut earliest: HashMap<&str, i64> = HashMap::new();
        for (d, user) in &i.due {
            let e = earliest.entry(&**user).or_insert(*d);
            *e = (*e).min(*d);
        }
        for (d, user) in &fresh.due {
            assert!(
                earliest.get(&**user).is_some_and(|e| e <= d),
                "{user}: deadline {d}, earliest entry {:?}",
                earliest.get(&**user)
            );
        }
        assert!(i.taken.is_empty(), "an emission left users unvisited");
    }

    pub fn open_count(&self) -> usize {
        self.index.open
    }

    /// Gives back the room of its hash tables left mostly empty (after many sessions
    /// closed; the changed users' sets after a large emission or checkpoint).
    pub fn shrink(&mut self) {
        self.users.shrink();
        shrink_set(&mut self.index.dirty);
        shrink_map(&mut self.index.taken);
        for c in self.index.changed.values_mut() {
            shrink_set(c);
        }
    }

    /// Estimated heap bytes of the sessions' state (kept up to date per change, so O(1)):
    /// per user its shared id (user ids are counted here only,
    /// the windows share them), its map entry and event-id set; per open session its
    /// events, with each event id as an `Arc<str>` of `id_len` bytes on average (shared
    /// with the user's window, counted here only), its id and superseded ids; and the
    /// index entries.
    pub fn heap_bytes(&self, id_len: usize) -> usize {
        let index = &self.index;
        let entries = index.held.len() + index.starts.len() + index.due.len();
        let tables = self.users.table_bytes()
            + table_bytes::<Arc<str>>(index.dirty.capacity())
            + table_bytes::<(Arc<str>, i64)>(index.taken.capacity())
            + index
                .changed
                .values()
                .map(|c| table_bytes::<Arc<str>>(c.capacity()))
                .sum::<usize>();
        index.bytes + index.events * arc_str_bytes(id_len) + entries * TREE_ENTRY_BYTES + tables
    }
}

/// Estimated heap bytes of one entry of the index's B-trees: a leaf node (11 entries, up to
/// 280 bytes: the allocator's 320-byte class) holds 6 or 7 when entries come in order, as
/// offsets and deadlines do, and the inner nodes add a few (measured against the heap in
/// `engine` tests).
const TREE_ENTRY_BYTES: usize = 56;

/// The most common change, an event pushed into open session `j` of `user`'s state (see
/// [`Place::Push`]) whose partition the session holds at an offset at or before the
/// event's, with the [`Index`] brought up to date directly instead of through two
/// [`Snap`]s of the user (~7 % of the core's profile, issue #19): of what the index counts,
/// only the event count, the bytes (the session's event vector, the id set) and the dirty
/// set can change — the session's start and its partitions' earliest offsets stay (so do
/// the index's offsets, starts and the checkpoint entries), and its deadline can only
/// move forward (see `Index::due`).
fn push(index: &mut Index, user: &Arc<str>, state: &mut UserState, j: usize, ev: Ev) {
    let was_dirty = state.open.iter().any(|o| o.dirty);
    let (ids, events) = (state.ids.heap_bytes(), state.open[j].events.capacity());
    state.ids.insert(ev.id.clone());
    state.open[j].push(ev);
    let size = std::mem::size_of::<Ev>();
    let grown = alloc_bytes(state.open[j].events.capacity() * size) - alloc_bytes(events * size);
    index.bytes = index
        .bytes
        .wrapping_add(grown + state.ids.heap_bytes())
        .wrapping_sub(ids);
    index.events += 1;
    if !was_dirty {
        index.dirty.insert(user.clone());
    }
}

/// See [`Sessions::is_late`]: whether event time `t` of the user whose state is `state`
/// is late, with `(gap, horizon, floor)` of the sessions.
fn late(
    state: Option<&UserState>,
    t: i64,
    watermark: Option<i64>,
    (gap, horizon, floor): (i64, i64, i64),
) -> bool {
    if state
        .and_then(|s| s.closed)
        .is_some_and(|c| c.reaches(t, gap))
    {
        return true;
    }
    let Some(wm) = watermark else {
        return false;
    };
    if t.saturating_add(horizon) > wm {
        return false;
    }
    if t <= floor {
        return true;
    }
    !state.is_some_and(|s| s.open.iter().any(|o| o.near(t, gap)))
}

/// One user's part of [`Sessions::emit`]: its final sessions (removed), its dirty ones
/// when `early`, and its closed record forgotten once no admissible event can reach it.
/// Returns the floor of pruned final sessions, raised if so.
fn emit_user(
    user: &str,
    state: &mut UserState,
    watermark: Option<i64>,
    early: bool,
    (horizon, gap): (i64, i64),
    mut floor: i64,
    out: &mut Vec<Session>,
) -> i64 {
    let mut kept = Vec::with_capacity(state.open.len());
    let mut sessions = std::mem::take(&mut state.open).into_iter().peekable();
    while let Some(mut open) = sessions.next() {
        let is_final = watermark.is_some_and(|wm| open.end_ms.saturating_add(horizon) <= wm);
        if is_final {
            out.push(open.to_session(user, true));
            for e in &open.events {
                state.ids.remove(&e.id);
            }
            let partition = open.offsets.last_partition().unwrap_or_default();
            let next_start_ms = if open.split {
                sessions.peek().map(|next| next.start_ms)
            } else {
                None
            };
            let this = Closed {
                end_ms: open.end_ms,
                partition,
                next_start_ms,
            };
            state.closed = Some(match state.closed {
                Some(c) if c.end_ms > open.end_ms => c,
                _ => this,
            });
        } else {
            if early && open.dirty {
                out.push(open.to_session(user, false));
                open.dirty = false;
            }
            kept.push(open);
        }
    }
    state.open = kept;
    // Forget the closed record once no admissible event can reach it: with no open
    // session left, any event not late by the watermark is beyond end + gap; the
    // floor keeps watermark-late events from chaining back onto it later.
    if let (Some(closed), Some(wm)) = (state.closed, watermark)
        && state.open.is_empty()
        && closed.end_ms.saturating_add(gap).saturating_add(horizon) <= wm
    {
        floor = floor.max(closed.end_ms.saturating_add(gap));
        state.closed = None;
    }
    floor
}

/// Where an event at `t` goes among a user's open sessions (sorted by start): see [`fold`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Place {
    /// Near no open session: a new run, inserted at its start.
    NewRun,
    /// Into session `j` as it is: within one run, not before its first event, before
    /// `j`'s start + the maximum (its start stays, nothing is cut anew).
    Push(usize),
    /// Session `j`, the run's last, reached the maximum: it is closed there and the event
    /// starts the next.
    CloseAndStart(usize),
    /// Sessions `lo..=hi` (whole runs, or the tail of one) are cut anew with the event.
    Recut(usize, usize),
}

/// Where an event at `t` goes among `open` (sorted by start; see [`fold`]).
fn place(open: &[Open], t: i64, gap: i64, max: i64) -> Place {
    let Some(mut lo) = open.iter().position(|o| o.near(t, gap)) else {
        return Place::NewRun;
    };
    // The touched sessions are consecutive; widen them to whole runs.
    let mut hi = lo;
    while hi + 1 < open.len() && open[hi + 1].near(t, gap) {
        hi += 1;
    }
    while lo > 0 && open[lo - 1].split {
        lo -= 1;
    }
    while open[hi].split && hi + 1 < open.len() {
        hi += 1;
    }
    let one_run = (lo..hi).all(|i| open[i].split);
    if one_run && t >= open[lo].start_ms {
        // Within one run, not before its first event: the session whose start is the
        // latest at or before t.
        let j = lo + open[lo..=hi].partition_point(|o| o.start_ms <= t) - 1;
        if t < open[j].start_ms.saturating_add(max) {
            return Place::Push(j);
        }
        if j == hi {
            return Place::CloseAndStart(j);
        }
        // Before the start of the session after j, past j's maximum: it becomes that
        // session's start, and the cuts after it move.
        return Place::Recut(j + 1, hi);
    }
    Place::Recut(lo, hi)
}

/// Folds `ev` into `user`'s state (the caller checked it is neither a duplicate nor late)
/// at `at` (what [`place`] says of it): see [`Sessions::add`].
fn fold(state: &mut UserState, ev: Ev, user: &str, gap: i64, max: i64, at: Place) -> Admit {
    let t = ev.t;
    state.ids.insert(ev.id.clone());
    let open = &mut state.open;
    match at {
        Place::NewRun => {
            let at = open.partition_point(|o| o.start_ms < t);
            insert_exact(open, at, Open::new(user, vec![ev], false, max));
            // Its id may be one an open session lists as superseded (a start that moved
            // away earlier): a session must never list a live one.
        }
        Place::Push(j) => {
            open[j].push(ev);
            return Admit::Added;
        }
        Place::CloseAndStart(j) => {
            // The run's last session reached the maximum: this event starts the next.
            open[j].close_at_max(user, max);
            insert_exact(open, j + 1, Open::new(user, vec![ev], false, max));
        }
        Place::Recut(lo, hi) => recut(open, lo, hi, ev, user, max),
    }
    state.retire_ids(gap);
    state.unlist_current_ids();
    Admit::Added
}

/// Re-cuts sessions `lo..=hi` of `open` (whole runs, or the tail of one run) with the new
/// event `ev` into one run's sessions. A new session with the start of an old one keeps its
/// superseded ids (and lists the old id if its id changed); the ids of old sessions whose
/// start is no longer a start go to the session holding `ev`.
fn recut(open: &mut Vec<Open>, lo: usize, hi: usize, ev: Ev, user: &str, max: i64) {
    let new_t = ev.t;
    let old: Vec<Open> = open.drain(lo..=hi).collect();
    let mut events: Vec<Ev> = Vec::new();
    let mut shells: Vec<(i64, String, BTreeSet<String>, u64, bool)> = Vec::new();
    for o in old {
        let count = o.event_count();
        shells.push((o.start_ms, o.id, o.merged, count, o.dirty));
        events.extend(o.events);
    }
    events.push(ev);
    let groups = cut(events, max);
    let n = groups.len();
    let mut sessions: Vec<Open> = groups
        .into_iter()
        .enumerate()
        .map(|(i, g)| Open::new(user, g, i + 1 < n, max))
        .collect();
    let holder = sessions
        .partition_point(|s| s.start_ms <= new_t)
        .saturating_sub(1);
    let mut retired = BTreeSet::new();
    for (start, id, merged, count, dirty) in shells {
        if let Some(s) = sessions.iter_mut().find(|s| s.start_ms == start) {
            s.merged.extend(merged);
            if s.id != id {
                s.merged.insert(id);
            } else if s.event_count() == count {
                s.dirty = dirty;
            }
        } else if let Some(s) = sessions
            .iter_mut()
            .find(|s| s.start_ms <= start && start <= s.end_ms)
        {
            // That start is no longer a start: the session now holding its first event
            // supersedes it. Not the session holding `ev`, which may be in another part of
            // the run and become final while this part is still open — and a later cut
            // could make `start` a start again, with the same id, after a final session
            // had listed it as superseded.
            s.merged.extend(merged);
            s.merged.insert(id);
            s.dirty = true;
        } else {
            retired.extend(merged);
            retired.insert(id);
        }
    }
    if let Some(s) = sessions.get_mut(holder) {
        s.merged.extend(retired);
        s.dirty = true;
    }
    for s in &mut sessions {
        let id = s.id.clone();
        s.merged.remove(&id);
    }
    open.splice(lo..lo, sessions);
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    const GAP: i64 = 1_000;
    const LATENESS: i64 = 500;

    fn cfg() -> TimeConfig {
        TimeConfig {
            session_gap_ms: GAP,
            allowed_lateness_ms: LATENESS,
            ..TimeConfig::default()
        }
    }

    fn ev(user: &str, id: &str, t: i64, offset: i64) -> InputEvent {
        ev_in(0, user, id, t, offset, "page_view")
    }

    fn ev_in(partition: i32, user: &str, id: &str, t: i64, offset: i64, ty: &str) -> InputEvent {
        InputEvent {
            partition,
            offset,
            event_id: id.to_owned(),
            user_id: user.to_owned(),
            event_type: ty.to_owned(),
            page: "/p".to_owned(),
            currency: String::new(),
            amount_micros: None,
            event_time_ms: t,
            ingest_ms: t.saturating_add(7),
        }
    }

    #[test]
    fn events_within_the_gap_form_one_session_with_the_right_fields() {
        let mut s = Sessions::new(cfg());
        assert_eq!(s.add(&ev("u", "a", 10_000, 1), None), Admit::Added);
        assert_eq!(
            s.add(&ev_in(0, "u", "b", 10_800, 2, "click"), None),
            Admit::Added
        );
        assert_eq!(s.add(&ev("u", "c", 11_500, 3), None), Admit::Added);
        assert_eq!(s.open_count(), 1);
        let out = s.emit(None, true);
        assert_eq!(out.len(), 1);
        let x = &out[0];
        assert_eq!(x.session_id, Sessions::session_id("u", 10_000));
        assert_eq!(x.user_id, "u");
        assert_eq!(
            (x.start_ms, x.end_ms, x.duration_ms),
            (10_000, 11_500, 1_500)
        );
        assert_eq!((x.page_count, x.event_count), (2, 3));
        assert_eq!(x.last_ingest_ms, 11_507);
        assert_eq!(x.version, model::version(3, 3, false));
        assert!(!x.r#final);
        assert!(x.merged_session_ids.is_empty());
        // Not dirty any more: nothing to emit early.
        assert!(s.emit(None, true).is_empty());
    }

    #[test]
    fn a_gap_larger_than_session_gap_starts_a_new_session() {
        let mut s = Sessions::new(cfg());
        s.add(&ev("u", "a", 0, 1), None);
        s.add(&ev("u", "b", GAP, 2), None);
        s.add(&ev("u", "c", 2 * GAP + 1, 3), None);
        assert_eq!(s.open_count(), 2);
        let out = s.emit(None, true);
        let spans: Vec<_> = out.iter().map(|x| (x.start_ms, x.end_ms)).collect();
        assert_eq!(spans, vec![(0, GAP), (2 * GAP + 1, 2 * GAP + 1)]);
    }

    #[test]
    fn the_session_id_is_deterministic_and_depends_on_user_and_start() {
        let id = Sessions::session_id("u", 42);
        assert_eq!(id, Sessions::session_id("u", 42));
        assert!(id.starts_with("s-"));
        assert_eq!(id.len(), 34);
        assert!(id[2..].chars().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(id, Sessions::session_id("u", 43));
        assert_ne!(id, Sessions::session_id("v", 42));
        // The separator keeps ("u1", 2) and ("u", 12) apart.
        assert_ne!(Sessions::session_id("u1", 2), Sessions::session_id("u", 12));
        let mut h = Sha256::new();
        h.update(b"u\x0042");
        assert_eq!(id, format!("s-{}", hex::encode(&h.finalize()[..16])));
    }

    #[test]
    fn a_late_event_bridging_two_open_sessions_merges_them_and_lists_the_absorbed_id() {
        let mut s = Sessions::new(cfg());
        s.add(&ev("u", "a", 10_000, 1), None);
        s.add(&ev("u", "b", 11_800, 2), None);
        let before = s.emit(None, true);
        assert_eq!(before.len(), 2);
        // Watermark already past the bridging event's own horizon, but the event touches
        // open sessions, so it is still admitted.
        let wm = Some(10_900 + GAP + LATENESS);
        let bridge = ev("u", "c", 10_900, 3);
        assert!(!s.is_late(&bridge, wm));
        assert_eq!(s.add(&bridge, wm), Admit::Added);
        assert_eq!(s.open_count(), 1);
        let out = s.emit(wm, true);
        assert_eq!(out.len(), 1);
        let m = &out[0];
        assert_eq!(m.session_id, Sessions::session_id("u", 10_000));
        assert_eq!((m.start_ms, m.end_ms, m.event_count), (10_000, 11_800, 3));
        assert_eq!(
            m.merged_session_ids,
            vec![Sessions::session_id("u", 11_800)]
        );
        assert!(before.iter().all(|b| m.version > b.version));
    }

    #[test]
    fn a_bridge_with_a_lower_offset_still_gets_a_higher_version() {
        let mut s = Sessions::new(cfg());
        s.add(&ev("u", "a", 0, 10), None);
        s.add(&ev("u", "b", 1_800, 20), None);
        let before = s.emit(None, true);
        s.add(&ev("u", "c", 900, 5), None);
        let m = &s.emit(None, true)[0];
        assert!(before.iter().all(|b| m.version > b.version));
    }

    #[test]
    fn extending_a_session_backwards_changes_its_id_and_lists_the_old_one() {
        let mut s = Sessions::new(cfg());
        s.add(&ev("u", "a", 5_000, 1), None);
        s.add(&ev("u", "b", 4_500, 2), None);
        let out = s.emit(None, true);
        assert_eq!(out[0].session_id, Sessions::session_id("u", 4_500));
        assert_eq!(
            out[0].merged_session_ids,
            vec![Sessions::session_id("u", 5_000)]
        );
        // Accumulates: a further backward step and a bridge add to the list.
        s.add(&ev("u", "c", 7_000, 3), None);
        s.add(&ev("u", "d", 6_000, 4), None);
        s.add(&ev("u", "e", 4_000, 5), None);
        let out = s.emit(None, true);
        assert_eq!(out.len(), 1);
        let mut expected = vec![
            Sessions::session_id("u", 4_500),
            Sessions::session_id("u", 5_000),
            Sessions::session_id("u", 7_000),
        ];
        expected.sort();
        assert_eq!(out[0].session_id, Sessions::session_id("u", 4_000));
        assert_eq!(out[0].merged_session_ids, expected);
    }

    #[test]
    fn final_is_emitted_once_when_the_watermark_passes_end_gap_lateness_then_removed() {
        let mut s = Sessions::new(cfg());
        s.add(&ev("u", "a", 1_000, 1), None);
        s.add(&ev("u", "b", 1_200, 2), None);
        let end_horizon = 1_200 + GAP + LATENESS;
        assert!(s.emit(Some(end_horizon - 1), false).is_empty());
        let out = s.emit(Some(end_horizon), false);
        assert_eq!(out.len(), 1);
        assert!(out[0].r#final);
        assert_eq!(out[0].version, model::version(2, 2, true));
        assert_eq!(s.open_count(), 0);
        assert!(s.emit(Some(end_horizon + 10_000), true).is_empty());
    }

    #[test]
    fn an_event_within_a_gap_after_a_final_session_is_late() {
        let mut s = Sessions::new(cfg());
        s.add(&ev("u", "a", 0, 1), None);
        let wm = Some(GAP + LATENESS);
        assert_eq!(s.emit(wm, false).len(), 1);
        // Not late by the watermark alone, but it would extend the closed session.
        let e = ev("u", "b", 10, 2);
        assert_eq!(s.add(&e, wm), Admit::Late);
        // Beyond the gap it starts a new session.
        assert_eq!(s.add(&ev("u", "c", GAP + 1, 3), wm), Admit::Added);
    }

    #[test]
    fn a_watermark_late_event_cannot_chain_a_session_back_onto_a_forgotten_final_one() {
        let mut s = Sessions::new(TimeConfig {
            session_gap_ms: 10,
            allowed_lateness_ms: 0,
            ..TimeConfig::default()
        });
        s.add(&ev("u", "a", 0, 1), None);
        // Final at 10; its record is pruned at 20 (no open session of the user left).
        assert_eq!(s.emit(Some(20), false).len(), 1);
        assert_eq!(s.add(&ev("u", "b", 11, 2), Some(20)), Admit::Added);
        // Watermark-late, touches the open session at 11, but would put it within the gap
        // of the final session at 0.
        assert_eq!(s.add(&ev("u", "c", 1, 3), Some(20)), Admit::Late);
        // Touching the open session above the floor is still fine.
        assert_eq!(s.add(&ev("u", "d", 1_000, 4), Some(1_000)), Admit::Added);
        assert_eq!(s.add(&ev("u", "e", 990, 5), Some(1_000)), Admit::Added);
    }

    #[test]
    fn duplicates_are_dropped() {
        let mut s = Sessions::new(cfg());
        assert_eq!(s.add(&ev("u", "a", 100, 1), None), Admit::Added);
        assert!(s.contains("u", "a"));
        assert!(!s.contains("v", "a"));
        assert_eq!(s.add(&ev("u", "a", 100, 2), None), Admit::Duplicate);
        assert_eq!(s.add(&ev("u", "a", 900, 3), None), Admit::Duplicate);
        // Same id for another user is a different event.
        assert_eq!(s.add(&ev("v", "a", 100, 4), None), Admit::Added);
        let out = s.emit(None, true);
        assert_eq!(out[0].event_count, 1);
        assert_eq!(out[0].end_ms, 100);
    }

    #[test]
    fn an_event_beyond_lateness_is_late_and_changes_nothing() {
        let mut s = Sessions::new(cfg());
        s.add(&ev("u", "a", 100_000, 1), None);
        let before = s.emit(None, true);
        let wm = Some(100_000);
        let late = ev("u", "b", 100_000 - 2 * GAP - LATENESS, 2);
        assert!(s.is_late(&late, wm));
        assert_eq!(s.add(&late, wm), Admit::Late);
        let other_user = ev("v", "c", 100_000 - GAP - LATENESS, 3);
        assert_eq!(s.add(&other_user, wm), Admit::Late);
        assert!(!s.contains("u", "b"));
        assert_eq!(s.open_count(), 1);
        assert!(s.emit(None, true).is_empty());
        s.add(&ev("u", "d", 100_001, 4), None);
        let after = s.emit(None, true);
        assert_eq!(after[0].event_count, before[0].event_count + 1);
        assert_eq!(after[0].start_ms, before[0].start_ms);
    }

    #[test]
    fn the_same_input_order_gives_identical_output_in_two_fresh_instances() {
        let events: Vec<InputEvent> = (0..60)
            .map(|i| {
                let user = ["a", "b", "c"][(i * 7 % 3) as usize];
                ev_in(
                    (i % 2) as i32,
                    user,
                    &format!("e{}", i % 45),
                    (i * 733 % 5_000) * 3,
                    i,
                    if i % 3 == 0 { "click" } else { "page_view" },
                )
            })
            .collect();
        let run = || {
            let mut s = Sessions::new(cfg());
            let mut out = Vec::new();
            let mut admits = Vec::new();
            for (i, e) in events.iter().enumerate() {
                let wm = Some(i as i64 * 200);
                admits.push(s.add(e, wm));
                out.extend(s.emit(wm, i % 4 == 0));
            }
            out.extend(s.emit(Some(i64::MAX), true));
            (admits, out)
        };
        let (a1, o1) = run();
        let (a2, o2) = run();
        assert_eq!(a1, a2);
        assert_eq!(o1, o2);
        assert!(!o1.is_empty());
    }

    #[test]
    fn min_open_offset_and_revoke_work_per_partition() {
        let mut s = Sessions::new(cfg());
        s.add(&ev_in(0, "a", "1", 100, 7, "x"), None);
        s.add(&ev_in(0, "a", "2", 200, 5, "x"), None);
        s.add(&ev_in(0, "b", "3", 100, 9, "x"), None);
        s.add(&ev_in(1, "c", "4", 100, 3, "x"), None);
        s.add(&ev_in(1, "c", "5", 50_000, 4, "x"), None);
        assert_eq!(s.min_open_offset(0), Some(5));
        assert_eq!(s.min_open_offset(1), Some(3));
        assert_eq!(s.min_open_offset(2), None);
        // Finalizing b's session and c's first releases offsets 9 and 3; a's stays open.
        let out = s.emit(Some(100 + GAP + LATENESS), false);
        assert_eq!(out.len(), 2);
        assert_eq!(s.min_open_offset(0), Some(5));
        assert_eq!(s.min_open_offset(1), Some(4));
        s.revoke(0);
        assert_eq!(s.min_open_offset(0), None);
        assert_eq!(s.open_count(), 1);
        assert!(!s.contains("a", "1"));
        s.revoke(1);
        assert_eq!(s.open_count(), 0);
        assert_eq!(s.min_open_offset(1), None);
    }

    #[test]
    fn extreme_times_and_configs_do_not_panic() {
        for (gap, lateness) in [(i64::MAX, i64::MAX), (-5, -5), (0, 0)] {
            let mut s = Sessions::new(TimeConfig {
                session_gap_ms: gap,
                allowed_lateness_ms: lateness,
                ..TimeConfig::default()
            });
            for wm in [None, Some(i64::MIN), Some(0), Some(i64::MAX)] {
                for (i, t) in [i64::MIN, i64::MAX, 0, -1, i64::MIN]
                    .into_iter()
                    .enumerate()
                {
                    let e = ev_in(0, "u", &format!("{wm:?}{i}"), t, i64::MAX, "page_view");
                    s.add(&e, wm);
                }
                s.emit(wm, true);
            }
            s.emit(Some(i64::MAX), true);
            assert_eq!(s.open_count(), 0);
        }
        let mut s = Sessions::new(TimeConfig {
            session_gap_ms: -5,
            allowed_lateness_ms: -5,
            ..TimeConfig::default()
        });
        s.add(&ev("u", "a", i64::MIN, -1), None);
        s.add(&ev("u", "b", i64::MIN, -1), None);
        s.add(&ev("u", "c", i64::MIN + 1, -1), None);
        let out = s.emit(Some(i64::MAX), false);
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].event_count, 2);
        assert_eq!(out[0].version, model::version(-1, 2, true));
    }

    const MAX: i64 = 5_000;

    fn capped() -> Sessions {
        Sessions::with_max_session_ms(cfg(), MAX)
    }

    #[test]
    fn an_always_active_user_gets_sessions_shorter_than_the_maximum() {
        let mut s = capped();
        let mut out = Vec::new();
        // One event every 500 ms (less than the gap) for 75 s: one run, never idle.
        for i in 0..150 {
            let t = i * 500;
            let wm = Some(t - 100);
            assert_eq!(s.add(&ev("u", &format!("e{i}"), t, i), wm), Admit::Added);
            out.extend(s.emit(wm, i % 10 == 0));
        }
        // Sessions cut at the maximum are final while the user is still active.
        let finals_while_active = out.iter().filter(|x| x.r#final).count();
        assert!(finals_while_active >= 10, "{finals_while_active} finals");
        assert!(s.open_count() <= 3, "{} open", s.open_count());
        out.extend(s.emit(Some(i64::MAX), false));
        let finals: Vec<&Session> = out.iter().filter(|x| x.r#final).collect();
        // [0, 5000) holds 0..=4500, the next starts at 5000, and so on.
        let spans: Vec<(i64, i64)> = finals.iter().map(|x| (x.start_ms, x.end_ms)).collect();
        let want: Vec<(i64, i64)> = (0..15).map(|k| (k * MAX, k * MAX + 4_500)).collect();
        assert_eq!(spans, want);
        assert!(
            finals
                .iter()
                .all(|x| x.duration_ms < MAX && x.event_count == 10)
        );
        for (k, f) in finals.iter().enumerate() {
            let plain = Sessions::session_id("u", f.start_ms);
            if k + 1 < finals.len() {
                assert_eq!(
                    f.session_id,
                    Sessions::split_session_id("u", f.start_ms, MAX)
                );
                assert_eq!(f.merged_session_ids, vec![plain]);
            } else {
                assert_eq!(f.session_id, plain);
                assert!(f.merged_session_ids.is_empty());
            }
        }
        // Every early result of a cut session's plain id is superseded by its final.
        for early in out.iter().filter(|x| !x.r#final) {
            assert!(
                finals.iter().any(|f| f.session_id == early.session_id
                    || f.merged_session_ids.contains(&early.session_id)),
                "early {} left behind",
                early.session_id
            );
        }
    }

    #[test]
    fn the_cut_depends_on_event_times_not_on_arrival_order() {
        let times: Vec<i64> = (0..40).map(|i| i * 300).collect();
        let run = |order: &[usize]| {
            let mut s = capped();
            for (offset, i) in order.iter().enumerate() {
                let e = ev("u", &format!("e{i}"), times[*i], offset as i64);
                assert_eq!(s.add(&e, None), Admit::Added);
            }
            let out = s.emit(Some(i64::MAX), false);
            out.iter()
                .map(|x| (x.session_id.clone(), x.start_ms, x.end_ms, x.event_count))
                .collect::<Vec<_>>()
        };
        let forward: Vec<usize> = (0..40).collect();
        let backward: Vec<usize> = (0..40).rev().collect();
        let shuffled: Vec<usize> = (0..40).map(|i| i * 17 % 40).collect();
        let want = run(&forward);
        assert_eq!(
            want.iter().map(|x| (x.1, x.2)).collect::<Vec<_>>(),
            vec![(0, 4_800), (5_100, 9_900), (10_200, 11_700)]
        );
        assert_eq!(run(&backward), want);
        assert_eq!(run(&shuffled), want);
    }

    #[test]
    fn an_event_moving_a_run_back_moves_the_cuts_and_retires_the_old_ids() {
        let mut s = capped();
        // One run (800 ms apart): [1000, 6000) holds 1000..=5800, then 6600.
        for i in 0..8 {
            s.add(&ev("u", &format!("e{i}"), 1_000 + i * 800, i), None);
        }
        let before = s.emit(None, true);
        let spans: Vec<(i64, i64)> = before.iter().map(|x| (x.start_ms, x.end_ms)).collect();
        assert_eq!(spans, vec![(1_000, 5_800), (6_600, 6_600)]);
        // 200 moves the run's start back: [200, 5200) holds 200..=5000, and 5800 becomes
        // the next session's start. Each old id is retired by the session now holding its
        // old first event: 1000's by [200, 5200), 6600's by the session from 5800.
        assert_eq!(s.add(&ev("u", "b", 200, 10), None), Admit::Added);
        let out = s.emit(Some(i64::MAX), true);
        let spans: Vec<(i64, i64, u64)> = out
            .iter()
            .map(|x| (x.start_ms, x.end_ms, x.event_count))
            .collect();
        assert_eq!(spans, vec![(200, 5_000, 7), (5_800, 6_600, 2)]);
        assert_eq!(out[0].session_id, Sessions::split_session_id("u", 200, MAX));
        assert_eq!(out[1].session_id, Sessions::session_id("u", 5_800));
        assert!(out[0].merged_session_ids.contains(&before[0].session_id));
        assert!(
            out[0]
                .merged_session_ids
                .contains(&Sessions::session_id("u", 200))
        );
        assert_eq!(
            out[1].merged_session_ids,
            vec![before[1].session_id.clone()]
        );
    }

    #[test]
    fn after_a_cut_session_is_final_only_events_of_its_successor_are_admitted() {
        let mut s = capped();
        for (i, t) in [0, 900, 1_800, 2_700, 3_600, 4_500, 5_300]
            .into_iter()
            .enumerate()
        {
            s.add(&ev("u", &format!("e{i}"), t, i as i64), None);
        }
        // [0, 4500] is final; [5300] stays open.
        let wm = Some(4_500 + GAP + LATENESS);
        let out = s.emit(wm, false);
        assert_eq!(out.len(), 1);
        assert_eq!(s.continued(0), BTreeSet::from(["u".to_owned()]));
        // Before the successor's start: would change the final one or move the cut.
        assert_eq!(s.add(&ev("u", "x", 5_200, 9), wm), Admit::Late);
        assert_eq!(s.add(&ev("u", "y", 5_300, 10), wm), Admit::Added);
        // A restored continuation judges the same way.
        let mut r = capped();
        r.restore_continuation("u", 5_300, 0);
        assert_eq!(r.add(&ev("u", "x", 5_200, 9), None), Admit::Late);
        assert_eq!(r.add(&ev("u", "y", 5_300, 10), None), Admit::Added);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Add {
            user: u8,
            id: u8,
            t: i64,
            page: bool,
        },
        Advance(i64),
        Emit(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            6 => (0u8..3, 0u8..40, 0i64..12_000, any::<bool>())
                .prop_map(|(user, id, t, page)| Op::Add { user, id, t, page }),
            2 => (0i64..1_500).prop_map(Op::Advance),
            2 => any::<bool>().prop_map(Op::Emit),
        ]
    }

    proptest! {
        #[test]
        fn random_sequences_never_panic_and_end_with_consistent_final_sessions(
            ops in prop::collection::vec(op(), 1..120),
            gap in 1i64..2_500,
            lateness in 0i64..1_500,
            max in 1i64..6_000,
        ) {
            let cfg = TimeConfig {
                session_gap_ms: gap,
                allowed_lateness_ms: lateness,
                ..TimeConfig::default()
            };
            let mut s = Sessions::with_max_session_ms(cfg, max);
            let mut wm: Option<i64> = None;
            let mut out = Vec::new();
            let mut added = 0u64;
            for (offset, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Add { user, id, t, page } => {
                        let e = ev_in(
                            i32::from(user % 2),
                            &format!("u{user}"),
                            &format!("e{id}"),
                            t,
                            offset as i64,
                            if page { "page_view" } else { "click" },
                        );
                        if s.add(&e, wm) == Admit::Added {
                            added += 1;
                        }
                    }
                    Op::Advance(d) => wm = Some(wm.unwrap_or(-1_000).saturating_add(d)),
                    Op::Emit(early) => out.extend(s.emit(wm, early)),
                }
                s.assert_indexed();
            }
            out.extend(s.emit(Some(i64::MAX), true));
            prop_assert_eq!(s.open_count(), 0);
            prop_assert!(s.emit(Some(i64::MAX), true).is_empty());

            let finals: Vec<&Session> = out.iter().filter(|x| x.r#final).collect();
            let mut ids = HashSet::new();
            for f in &finals {
                prop_assert!(ids.insert(f.session_id.clone()), "final twice: {:?}", f);
                prop_assert!(f.start_ms <= f.end_ms);
                prop_assert_eq!(f.duration_ms, f.end_ms - f.start_ms);
                prop_assert!(f.event_count >= f.page_count);
                prop_assert!(f.event_count >= 1);
                prop_assert!(f.duration_ms < max, "longer than the maximum: {:?}", f);
                let plain = Sessions::session_id(&f.user_id, f.start_ms);
                if f.session_id != plain {
                    prop_assert_eq!(
                        &f.session_id,
                        &Sessions::split_session_id(&f.user_id, f.start_ms, max)
                    );
                    prop_assert!(f.merged_session_ids.contains(&plain));
                }
                prop_assert!(!f.merged_session_ids.contains(&f.session_id));
            }
            // Every admitted event ends up in exactly one final session.
            prop_assert_eq!(finals.iter().map(|f| f.event_count).sum::<u64>(), added);
            // No two final sessions of a user are within the gap of each other, unless the
            // first was cut at the maximum and the second starts at its first event at or
            // after the first's start + the maximum.
            let mut by_user: HashMap<&str, Vec<(i64, i64, bool)>> = HashMap::new();
            for f in &finals {
                let split = f.session_id != Sessions::session_id(&f.user_id, f.start_ms);
                by_user.entry(&f.user_id).or_default().push((f.start_ms, f.end_ms, split));
            }
            for spans in by_user.values_mut() {
                spans.sort();
                for w in spans.windows(2) {
                    if w[0].2 {
                        prop_assert!(w[1].0 - w[0].1 <= gap, "cut without a follower: {:?}", w);
                        prop_assert!(w[1].0 >= w[0].0 + max, "cut too early: {:?}", w);
                    } else {
                        prop_assert!(w[1].0 - w[0].1 > gap, "overlap within gap: {:?}", w);
                    }
                }
                prop_assert!(spans.last().is_none_or(|l| !l.2), "last session cut: {:?}", spans);
            }
            // A final session is never superseded by another final.
            for f in &finals {
                for g in &finals {
                    prop_assert!(!g.merged_session_ids.contains(&f.session_id));
                }
            }
        }
    }
}
