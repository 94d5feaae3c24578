//! Per-user tumbling event-time windows.
//!
//! Each event goes to the window `[floor(t / window_ms) * window_ms, + window_ms)` of its
//! user. A window stays open until the watermark passes its end plus the allowed
//! lateness; then it is emitted once as final and dropped. Until then it may be emitted
//! early (not final) whenever it changed. Versions come from `model::version`, so they
//! depend only on the input folded in and a rebuild from the log reproduces them.
//!
//! State is kept compact (see `compact`): a user's open windows are an exact-size vector
//! sorted by start (one or two for most users), ids and labels are shared `Arc<str>`s.

use std::collections::BTreeMap;
use std::sync::Arc;

use pulse_contracts::pb::aggregates::v1::{CurrencyAmount, UserWindowActivity};

use crate::compact::{
    Counts, FastSet, IdBloom, IdSet, Interner, Offsets, ShardedMap, alloc_bytes, id_bits,
    insert_exact, push_exact, shrink_set, table_bytes,
};
use crate::model::{Admit, InputEvent, TimeConfig, version};

/// One open window of one user.
#[derive(Debug, Clone)]
struct Window {
    start_ms: i64,
    end_ms: i64,
    event_ids: IdSet,
    /// Rules out most ids not in `event_ids` without scanning them.
    bloom: IdBloom,
    /// Per partition the (min, max) offset folded in. Normally a user's events come from
    /// one partition; keeping them all keeps commit points right even when they do not.
    offsets: Offsets,
    max_offset: i64,
    page_views: u64,
    page_views_by_page: Counts<u64>,
    events_by_type: Counts<u64>,
    /// Exact sums in micros; clamped to i64 on output.
    revenue: Counts<i128>,
    event_count: u64,
    first_event_ms: i64,
    last_event_ms: i64,
    last_ingest_ms: i64,
    /// Changed since the last emission.
    dirty: bool,
}

impl Window {
    fn new(start_ms: i64, end_ms: i64) -> Self {
        Self {
            start_ms,
            end_ms,
            event_ids: IdSet::default(),
            bloom: IdBloom::default(),
            offsets: Offsets::default(),
            max_offset: i64::MIN,
            page_views: 0,
            page_views_by_page: Counts::default(),
            events_by_type: Counts::default(),
            revenue: Counts::default(),
            event_count: 0,
            first_event_ms: i64::MAX,
            last_event_ms: i64::MIN,
            last_ingest_ms: i64::MIN,
            dirty: false,
        }
    }

    /// Folds the event's content in (offsets are handled by the caller).
    fn fold(&mut self, event: &InputEvent, id: Arc<str>, labels: &mut Interner) {
        self.bloom.add(id_bits(&id));
        self.event_ids.insert(id);
        self.max_offset = self.max_offset.max(event.offset);
        if event.is_page_view() {
            self.page_views = self.page_views.saturating_add(1);
            if !event.page.is_empty() {
                let n = self.page_views_by_page.entry(&event.page, labels);
                *n = n.saturating_add(1);
            }
        }
        let n = self.events_by_type.entry(&event.event_type, labels);
        *n = n.saturating_add(1);
        if let Some((currency, amount)) = event.revenue() {
            let sum = self.revenue.entry(currency, labels);
            *sum = sum.saturating_add(i128::from(amount));
        }
        self.event_count = self.event_count.saturating_add(1);
        self.first_event_ms = self.first_event_ms.min(event.event_time_ms);
        self.last_event_ms = self.last_event_ms.max(event.event_time_ms);
        self.last_ingest_ms = self.last_ingest_ms.max(event.ingest_ms);
        self.dirty = true;
    }

    /// Whether `id` (with [`id_bits`] `bits`) is folded in.
    #[inline]
    fn holds(&self, id: &str, bits: u32) -> bool {
        self.bloom.may_contain(bits) && self.event_ids.contains(id)
    }

    fn output(&self, user_id: &str, is_final: bool) -> UserWindowActivity {
        UserWindowActivity {
            user_id: user_id.to_owned(),
            window_start_ms: self.start_ms,
            window_end_ms: self.end_ms,
            page_views: self.page_views,
            page_views_by_page: self
                .page_views_by_page
                .iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            events_by_type: self
                .events_by_type
                .iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            revenue: self
                .revenue
                .iter()
                .map(|(currency, sum)| CurrencyAmount {
                    currency: currency.to_owned(),
                    amount_micros: clamp_i64(sum),
                })
                .collect(),
            event_count: self.event_count,
            first_event_ms: self.first_event_ms,
            last_event_ms: self.last_event_ms,
            version: version(self.max_offset, self.event_count, is_final),
            r#final: is_final,
            last_ingest_ms: self.last_ingest_ms,
            // Stamped by the run loop on the way out (`run::Processor::rules_version`).
            rules_version: String::new(),
        }
    }

    /// Estimated heap bytes (the window itself counted by its holder): its containers (the
    /// ids themselves are shared with the user's session and counted there).
    fn heap_bytes(&self) -> usize {
        let ids = self.event_ids.heap_bytes();
        ids + self.offsets.heap_bytes()
            + self.page_views_by_page.heap_bytes()
            + self.events_by_type.heap_bytes()
            + self.revenue.heap_bytes()
    }
}

fn clamp_i64(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// Estimated heap bytes of one user's open windows (the user id is shared with its
/// session state and counted there; its entry in the users' table is counted with the
/// table, see [`Windows::heap_bytes`]).
fn user_bytes(windows: &[Window], capacity: usize) -> usize {
    alloc_bytes(capacity * std::mem::size_of::<Window>())
        + windows.iter().map(Window::heap_bytes).sum::<usize>()
}

/// The open windows ending at one time, closed together by one watermark and dropped
/// together. Tumbling windows end at one time per window length, so there are a handful
/// (window + allowed lateness over the window length, and the future-dated ones). Issue
/// #15: a tree entry per window in three trees (~150 B each) freed, at a mass close, slots
/// among the sessions' tree nodes in the allocator's pages — freed memory the process kept;
/// one vector per end time is a few large allocations given back whole.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Cohort {
    /// The users with an open window ending here, each once (a user has one window per
    /// end), in no order.
    users: Vec<Arc<str>>,
    /// (partition, earliest offset, earliest start) of these windows, per partition they
    /// hold. A window leaves only with its cohort (closed) or at a revoke (rebuilt), and
    /// its earliest offset only moves back, so these are kept by `min` alone.
    held: Vec<(i32, i64, i64)>,
}

impl Cohort {
    fn hold(&mut self, partition: i32, offset: i64, start: i64) {
        match self.held.iter_mut().find(|(p, _, _)| *p == partition) {
            Some((_, min, first)) => {
                *min = (*min).min(offset);
                *first = (*first).min(start);
            }
            None => push_exact(&mut self.held, (partition, offset, start)),
        }
    }

    /// Estimated heap bytes of its vectors, and its entry in the tree of cohorts.
    fn heap_bytes(&self) -> usize {
        alloc_bytes(self.users.capacity() * std::mem::size_of::<Arc<str>>())
            + alloc_bytes(self.held.capacity() * std::mem::size_of::<(i32, i64, i64)>())
            + 64
    }
}

/// What the windows' per-tick questions need, kept up to date per change (issue #15: a
/// tick or a commit point costs the windows that changed or close, not every open window).
#[derive(Debug, Clone, Default)]
struct Index {
    /// The open windows by end: the ones a watermark closes are a prefix.
    ends: BTreeMap<i64, Cohort>,
    /// Users with a window changed since it was last emitted (a hash set: no string
    /// comparisons down a tree per event; an emission sorts the few it visits).
    dirty: FastSet<Arc<str>>,
    /// Sum of [`user_bytes`] (wrapping: added and removed symmetrically).
    bytes: usize,
    /// Users visited by emissions so far (what a tick costs; see `Engine::emit_visits`).
    visits: u64,
}

impl Index {
    fn add_window(&mut self, user: &Arc<str>, w: &Window) {
        let cohort = self.ends.entry(w.end_ms).or_default();
        cohort.users.push(user.clone());
        for (partition, min) in w.offsets.mins() {
            cohort.hold(partition, min, w.start_ms);
        }
    }

    /// Forgets the cohorts `watermark` closed (their windows were emitted and dropped).
    fn drop_closed(&mut self, allowed_lateness_ms: i64, watermark: Option<i64>) {
        while let Some(entry) = self.ends.first_entry() {
            if !closed(*entry.key(), allowed_lateness_ms, watermark) {
                break;
            }
            entry.remove();
        }
    }

    /// The smallest (offset, start) of `partition` over the open windows: `pick` chooses.
    fn smallest(&self, partition: i32, pick: impl Fn(&(i32, i64, i64)) -> i64) -> Option<i64> {
        self.ends
            .values()
            .flat_map(|c| c.held.iter())
            .filter(|h| h.0 == partition)
            .map(pick)
            .min()
    }
}

/// Per-user tumbling event-time windows: window start = floor(event_time / window_ms) *
/// window_ms (floor division, correct for negative times), end = start + window_ms
/// (half-open).
///
/// A `window_ms` below 1 is treated as 1 and a negative allowed lateness as 0. Bounds
/// that fall outside the i64 range saturate.
#[derive(Debug, Clone)]
pub struct Windows {
    window_ms: i64,
    allowed_lateness_ms: i64,
    /// user → open windows sorted by start. A hash map: an event's lookups hash the user
    /// id once instead of comparing it down a tree; emissions are still deterministic (they
    /// visit the users they need in order, see [`Self::emit`]).
    users: ShardedMap<Arc<str>, Vec<Window>>,
    index: Index,
    open: usize,
    labels: Interner,
}

impl Windows {
    pub fn new(cfg: TimeConfig) -> Self {
        Self {
            window_ms: cfg.window_ms.max(1),
            allowed_lateness_ms: cfg.allowed_lateness_ms.max(0),
            users: ShardedMap::default(),
            index: Index::default(),
            open: 0,
            labels: Interner::default(),
        }
    }

    /// The bounds `[start, end)` of the window holding `event_time_ms`.
    pub fn window_bounds(&self, event_time_ms: i64) -> (i64, i64) {
        let start =
            i128::from(event_time_ms) - i128::from(event_time_ms.rem_euclid(self.window_ms));
        let end = start + i128::from(self.window_ms);
        (clamp_i64(start), clamp_i64(end))
    }

    /// Whether a window ending at `end_ms` is closed at `watermark`.
    fn closed(&self, end_ms: i64, watermark: Option<i64>) -> bool {
        closed(end_ms, self.allowed_lateness_ms, watermark)
    }

    /// Whether an event is too late: its window's end + allowed_lateness_ms <= watermark.
    pub fn is_late(&self, event_time_ms: i64, watermark: Option<i64>) -> bool {
        self.closed(self.window_bounds(event_time_ms).1, watermark)
    }

    /// Whether this event id is already folded into one of `user_id`'s open windows.
    pub fn contains(&self, user_id: &str, event_id: &str) -> bool {
        let bits = id_bits(event_id);
        self.users
            .get(user_id)
            .is_some_and(|ws| ws.iter().any(|w| w.holds(event_id, bits)))
    }

    /// [`Self::contains`] and [`Self::user_key`] with one lookup of the user.
    pub(crate) fn find(&self, user_id: &str, event_id: &str) -> (bool, Option<Arc<str>>) {
        let bits = id_bits(event_id);
        match self.users.get_key_value(user_id) {
            Some((k, ws)) => (ws.iter().any(|w| w.holds(event_id, bits)), Some(k.clone())),
            None => (false, None),
        }
    }

    /// The shared copy of `user_id` if it has open windows.
    pub fn user_key(&self, user_id: &str) -> Option<Arc<str>> {
        self.users.get_key_value(user_id).map(|(k, _)| k.clone())
    }

    /// Folds `event` into its window. Returns Late (state unchanged) when `is_late`,
    /// Duplicate (unchanged) when the same event id is already in any of this user's open
    /// windows, else Added. Marks the window dirty.
    pub fn add(&mut self, event: &InputEvent, watermark: Option<i64>) -> Admit {
        let user = self
            .user_key(&event.user_id)
            .unwrap_or_else(|| Arc::from(event.user_id.as_str()));
        self.add_shared(event, &user, Arc::from(event.event_id.as_str()), watermark)
    }

    /// [`Self::add`] with the user's and the event's ids already shared (the engine passes
    /// the same copies to the sessions).
    pub fn add_shared(
        &mut self,
        event: &InputEvent,
        user: &Arc<str>,
        id: Arc<str>,
        watermark: Option<i64>,
    ) -> Admit {
        if self.is_late(event.event_time_ms, watermark) {
            return Admit::Late;
        }
        if self.contains(&event.user_id, &event.event_id) {
            return Admit::Duplicate;
        }
        self.add_new(event, user, id, watermark)
    }

    /// [`Self::add_shared`] for an event the caller knows is in none of the user's open
    /// windows (the engine checks windows and sessions once, before either folds it in).
    pub(crate) fn add_new(
        &mut self,
        event: &InputEvent,
        user: &Arc<str>,
        id: Arc<str>,
        watermark: Option<i64>,
    ) -> Admit {
        if self.is_late(event.event_time_ms, watermark) {
            return Admit::Late;
        }
        let (start, end) = self.window_bounds(event.event_time_ms);
        let index = &mut self.index;
        let windows = match self.users.get_mut(&**user) {
            Some(ws) => {
                index.bytes = index.bytes.wrapping_sub(user_bytes(ws, ws.capacity()));
                ws
            }
            None => self.users.get_or_default(user.clone()),
        };
        let was_dirty = windows.iter().any(|w| w.dirty);
        let at = match windows.binary_search_by_key(&start, |w| w.start_ms) {
            Ok(at) => at,
            Err(at) => {
                insert_exact(windows, at, Window::new(start, end));
                index.ends.entry(end).or_default().users.push(user.clone());
                self.open = self.open.saturating_add(1);
                at
            }
        };
        let window = &mut windows[at];
        let (partition, offset) = (event.partition, event.offset);
        match window.offsets.fold(partition, offset) {
            Some(min) if offset >= min => {}
            _ => {
                if let Some(cohort) = index.ends.get_mut(&end) {
                    cohort.hold(partition, offset, start);
                }
            }
        }
        window.fold(event, id, &mut self.labels);
        // The user is in the dirty set exactly when one of its windows is dirty: only the
        // first change since its last emission inserts it (no second hash per event).
        if !was_dirty {
            index.dirty.insert(user.clone());
        }
        index.bytes = index
            .bytes
            .wrapping_add(user_bytes(windows, windows.capacity()));
        Admit::Added
    }

    /// Results to emit now: every window whose end + allowed_lateness_ms <= watermark is
    /// emitted once with final = true and removed; if `early` is true, every other dirty
    /// window is emitted with final = false (and its dirty flag cleared). Ordered by user,
    /// then window start. A window finalized without having changed since its last early
    /// emission is still emitted once as final.
    ///
    /// Only the users that need it are visited: those with a window the watermark closes
    /// and, when `early`, those with a dirty window.
    pub fn emit(&mut self, watermark: Option<i64>, early: bool) -> Vec<UserWindowActivity> {
        let visit = self.emit_plan(watermark, early);
        let mut out = Vec::with_capacity(visit.len());
        self.emit_users(&visit, watermark, early, &mut out);
        self.emit_done(watermark);
        out
    }

    /// The users an emission visits, in user order (deterministic output), each once:
    /// those with a window closed by `watermark` and, if `early`, those with a changed one.
    /// [`Self::emit_users`] then emits them, in as many slices as the caller likes (as long
    /// as nothing else changes the windows in between), and [`Self::emit_done`] ends it.
    pub fn emit_plan(&self, watermark: Option<i64>, early: bool) -> Vec<Arc<str>> {
        let lateness = self.allowed_lateness_ms;
        let mut visit: Vec<Arc<str>> = self
            .index
            .ends
            .iter()
            .take_while(|(end, _)| closed(**end, lateness, watermark))
            .flat_map(|(_, cohort)| cohort.users.iter().cloned())
            .collect();
        if early {
            visit.extend(self.index.dirty.iter().cloned());
        }
        // In user order (deterministic output), each once.
        visit.sort_unstable();
        visit.dedup();
        visit
    }

    /// Emits the windows of `visit` (a slice of [`Self::emit_plan`]'s users) into `out`:
    /// closed ones final (and dropped), changed ones early.
    pub fn emit_users(
        &mut self,
        visit: &[Arc<str>],
        watermark: Option<i64>,
        early: bool,
        out: &mut Vec<UserWindowActivity>,
    ) {
        let lateness = self.allowed_lateness_ms;
        let Self {
            users, index, open, ..
        } = self;
        for user in visit {
            let Some(windows) = users.get_mut(&**user) else {
                continue;
            };
            index.visits += 1;
            index.bytes = index
                .bytes
                .wrapping_sub(user_bytes(windows, windows.capacity()));
            windows.retain_mut(|w| {
                if closed(w.end_ms, lateness, watermark) {
                    // Its cohort is dropped whole at the end of the emission.
                    out.push(w.output(user, true));
                    *open = open.saturating_sub(1);
                    false
                } else {
                    if early && w.dirty {
                        out.push(w.output(user, false));
                        w.dirty = false;
                    }
                    true
                }
            });
            windows.shrink_to_fit();
            if !windows.iter().any(|w| w.dirty) {
                index.dirty.remove(user);
            }
            if windows.is_empty() {
                users.remove(&**user);
            } else {
                index.bytes = index
                    .bytes
                    .wrapping_add(user_bytes(windows, windows.capacity()));
            }
        }
    }

    /// Ends an emission at `watermark` (the plan's): the cohorts it closed are dropped
    /// (their windows were), and labels no window counts any more are forgotten.
    pub fn emit_done(&mut self, watermark: Option<i64>) {
        self.index.drop_closed(self.allowed_lateness_ms, watermark);
        self.labels.prune();
    }

    /// The smallest offset of `partition` still held by an open window (the earliest
    /// record a restart must re-read), None if none.
    pub fn min_open_offset(&self, partition: i32) -> Option<i64> {
        self.index.smallest(partition, |h| h.1)
    }

    /// The earliest start of an open window holding records of `partition`, None if none.
    pub fn min_open_start(&self, partition: i32) -> Option<i64> {
        self.index.smallest(partition, |h| h.2)
    }

    /// Drops the open windows holding events of `partition` (it was revoked; a new owner
    /// rebuilds them from the log).
    pub fn revoke(&mut self, partition: i32) {
        let Self { users, open, .. } = self;
        users.retain(|_, windows| {
            windows.retain(|w| {
                if w.offsets.contains(partition) {
                    *open = open.saturating_sub(1);
                    false
                } else {
                    true
                }
            });
            !windows.is_empty()
        });
        // Rare (a rebalance): the index is rebuilt.
        let mut index = Index {
            visits: self.index.visits,
            ..Index::default()
        };
        for (user, windows) in self.users.iter() {
            for w in windows {
                index.add_window(user, w);
            }
            if windows.iter().any(|w| w.dirty) {
                index.dirty.insert(user.clone());
            }
            index.bytes = index
                .bytes
                .wrapping_add(user_bytes(windows, windows.capacity()));
        }
        self.index = index;
    }

    /// Number of open windows over all users.
    pub fn open_count(&self) -> usize {
        self.open
    }

    /// Users visited by emissions so far.
    pub fn emit_visits(&self) -> u64 {
        self.index.visits
    }

    /// Panics unless the index kept up to date equals one built from scratch.
    #[cfg(test)]
    fn assert_indexed(&self) {
        let mut fresh = Index::default();
        for (user, windows) in self.users.iter() {
            for w in windows {
                fresh.add_window(user, w);
            }
            if windows.iter().any(|w| w.dirty) {
                fresh.dirty.insert(user.clone());
            }
            fresh.bytes = fresh
                .bytes
                .wrapping_add(user_bytes(windows, windows.capacity()));
        }
        let sorted = |i: &Index| {
            let mut ends = i.ends.clone();
            for c in ends.values_mut() {
                c.users.sort_unstable();
                c.users.shrink_to_fit();
                c.held.sort_unstable();
                c.held.shrink_to_fit();
            }
            ends
        };
        let i = &self.index;
        assert_eq!(
            (sorted(i), &i.dirty, i.bytes),
            (sorted(&fresh), &fresh.dirty, fresh.bytes)
        );
        let open: usize = self.users.values().map(Vec::len).sum();
        assert_eq!(self.open, open);
    }

    /// Gives back the room of its hash tables left mostly empty (after many windows
    /// closed; the changed users' set after a large emission).
    pub fn shrink(&mut self) {
        self.users.shrink();
        shrink_set(&mut self.index.dirty);
    }

    /// Estimated heap bytes of the open windows (kept up to date per change, plus a sum
    /// over the few end times): their containers and the index's cohorts. User and event
    /// ids are shared with the sessions and counted there.
    pub fn heap_bytes(&self) -> usize {
        let i = &self.index;
        i.bytes
            + i.ends.values().map(Cohort::heap_bytes).sum::<usize>()
            + self.users.table_bytes()
            + table_bytes::<Arc<str>>(i.dirty.capacity())
    }
}

fn closed(end_ms: i64, allowed_lateness_ms: i64, watermark: Option<i64>) -> bool {
    watermark.is_some_and(|wm| end_ms.saturating_add(allowed_lateness_ms) <= wm)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    const MIN: i64 = 60_000;

    fn cfg() -> TimeConfig {
        TimeConfig {
            window_ms: MIN,
            allowed_lateness_ms: 30_000,
            ..TimeConfig::default()
        }
    }

    fn ev(offset: i64, id: &str, user: &str, kind: &str, t: i64) -> InputEvent {
        InputEvent {
            partition: 0,
            offset,
            event_id: id.to_owned(),
            user_id: user.to_owned(),
            event_type: kind.to_owned(),
            page: String::new(),
            currency: String::new(),
            amount_micros: None,
            event_time_ms: t,
            ingest_ms: t.saturating_add(10),
        }
    }

    fn page(offset: i64, id: &str, user: &str, t: i64, page: &str) -> InputEvent {
        InputEvent {
            page: page.to_owned(),
            ..ev(offset, id, user, "page_view", t)
        }
    }

    fn buy(offset: i64, id: &str, user: &str, t: i64, cur: &str, micros: i64) -> InputEvent {
        InputEvent {
            currency: cur.to_owned(),
            amount_micros: Some(micros),
            ..ev(offset, id, user, "purchase", t)
        }
    }

    fn on(partition: i32, e: InputEvent) -> InputEvent {
        InputEvent { partition, ..e }
    }

    fn starts(out: &[UserWindowActivity]) -> Vec<(String, i64, i64)> {
        out.iter()
            .map(|o| (o.user_id.clone(), o.window_start_ms, o.window_end_ms))
            .collect()
    }

    fn s(v: &str) -> String {
        v.to_owned()
    }

    #[test]
    fn events_go_to_tumbling_windows_and_an_event_at_the_end_goes_to_the_next() {
        let mut w = Windows::new(cfg());
        for (i, t) in [0, 59_999, 60_000, 119_999, 120_000]
            .into_iter()
            .enumerate()
        {
            let offset = i64::try_from(i).unwrap();
            assert_eq!(
                w.add(&ev(offset, &format!("e{i}"), "u", "click", t), None),
                Admit::Added
            );
        }
        assert_eq!(w.open_count(), 3);
        let out = w.emit(None, true);
        assert_eq!(
            starts(&out),
            vec![
                (s("u"), 0, 60_000),
                (s("u"), 60_000, 120_000),
                (s("u"), 120_000, 180_000)
            ]
        );
        assert_eq!(
            out.iter().map(|o| o.event_count).collect::<Vec<_>>(),
            vec![2, 2, 1]
        );
    }

    #[test]
    fn negative_event_times_use_floor_division() {
        let w = Windows::new(cfg());
        assert_eq!(w.window_bounds(-1), (-60_000, 0));
        assert_eq!(w.window_bounds(-60_000), (-60_000, 0));
        assert_eq!(w.window_bounds(-60_001), (-120_000, -60_000));
        assert_eq!(w.window_bounds(0), (0, 60_000));
        let mut w = Windows::new(cfg());
        w.add(&ev(0, "a", "u", "click", -1), None);
        w.add(&ev(1, "b", "u", "click", -60_001), None);
        let out = w.emit(None, true);
        assert_eq!(
            starts(&out),
            vec![(s("u"), -120_000, -60_000), (s("u"), -60_000, 0)]
        );
    }

    #[test]
    fn extreme_times_and_sizes_do_not_panic() {
        let mut w = Windows::new(TimeConfig {
            window_ms: 0,
            allowed_lateness_ms: -5,
            ..cfg()
        });
        assert_eq!(w.window_bounds(7), (7, 8));
        let mut w2 = Windows::new(TimeConfig {
            window_ms: i64::MAX,
            allowed_lateness_ms: i64::MAX,
            ..cfg()
        });
        for (i, t) in [i64::MIN, i64::MAX, -1, -2].into_iter().enumerate() {
            let offset = i64::try_from(i).unwrap();
            let e = buy(offset, &format!("e{i}"), "u", t, "USD", i64::MAX);
            assert_eq!(w.add(&e, None), Admit::Added);
            assert_eq!(w2.add(&e, None), Admit::Added);
        }
        // Bounds outside the i64 range saturate; the window keeps its true end.
        assert_eq!(w2.window_bounds(i64::MIN), (i64::MIN, i64::MIN + 1));
        assert_eq!(w2.window_bounds(-1), (i64::MIN + 1, 0));
        assert_eq!(w2.window_bounds(i64::MAX), (i64::MAX, i64::MAX));
        let out = w2.emit(Some(i64::MAX), false);
        assert_eq!(out.iter().map(|o| o.event_count).sum::<u64>(), 4);
        // Two events of i64::MAX micros in one window: the sum saturates.
        assert!(
            out.iter()
                .any(|o| o.revenue[0].amount_micros == i64::MAX && o.event_count == 2)
        );
        assert_eq!(w.emit(Some(i64::MAX), false).len(), 4);
        assert_eq!(w.open_count() + w2.open_count(), 0);
    }

    #[test]
    fn a_window_aggregates_page_views_per_page_by_type_and_exact_revenue_per_currency() {
        let mut w = Windows::new(cfg());
        let events = [
            page(1, "a", "u", 1_000, "/home"),
            page(2, "b", "u", 2_000, "/home"),
            page(3, "c", "u", 3_000, "/cart"),
            page(4, "d", "u", 4_000, ""),
            ev(5, "e", "u", "click", 500),
            buy(6, "f", "u", 5_000, "USD", 100_000),
            buy(7, "g", "u", 6_000, "USD", 200_000),
            buy(8, "h", "u", 7_000, "EUR", 1_999_999),
            buy(9, "i", "u", 8_000, "USD", -50_000),
            buy(10, "j", "u", 9_000, "", 42), // no currency: no revenue
            InputEvent {
                currency: s("GBP"),
                ..ev(11, "k", "u", "click", 9_500) // not a purchase
            },
        ];
        for e in &events {
            assert_eq!(w.add(e, None), Admit::Added);
        }
        let out = w.emit(None, true);
        assert_eq!(out.len(), 1);
        let o = &out[0];
        assert_eq!(o.page_views, 4);
        assert_eq!(
            o.page_views_by_page,
            HashMap::from([(s("/home"), 2), (s("/cart"), 1)])
        );
        assert_eq!(
            o.events_by_type,
            HashMap::from([(s("page_view"), 4), (s("click"), 2), (s("purchase"), 5)])
        );
        assert_eq!(
            o.revenue,
            vec![
                CurrencyAmount {
                    currency: s("EUR"),
                    amount_micros: 1_999_999
                },
                CurrencyAmount {
                    currency: s("USD"),
                    amount_micros: 250_000
                },
            ]
        );
        assert_eq!(o.event_count, 11);
        assert_eq!((o.first_event_ms, o.last_event_ms), (500, 9_500));
        assert_eq!(o.last_ingest_ms, 9_510);
        assert_eq!(o.version, version(11, 11, false));
        assert!(!o.r#final);
    }

    #[test]
    fn early_results_are_not_final_and_versions_increase_as_events_arrive() {
        let mut w = Windows::new(cfg());
        w.add(&ev(10, "a", "u", "click", 1_000), None);
        let first = w.emit(Some(0), true);
        assert_eq!(first.len(), 1);
        assert!(!first[0].r#final);
        // Nothing changed: nothing to emit early.
        assert!(w.emit(Some(0), true).is_empty());
        w.add(&ev(11, "b", "u", "click", 2_000), None);
        // Without `early`, a dirty open window is not emitted.
        assert!(w.emit(Some(0), false).is_empty());
        let second = w.emit(Some(0), true);
        assert_eq!(second.len(), 1);
        assert!(!second[0].r#final);
        assert_eq!(second[0].event_count, 2);
        assert!(second[0].version > first[0].version);
    }

    #[test]
    fn a_window_is_emitted_final_once_when_the_watermark_passes_end_plus_lateness() {
        let mut w = Windows::new(cfg());
        w.add(&ev(10, "a", "u", "click", 1_000), None);
        w.add(&ev(11, "b", "u", "click", 61_000), None);
        let early = w.emit(Some(50_000), true);
        assert_eq!(early.len(), 2);
        // End 60 000 + lateness 30 000: still open one ms before.
        assert!(w.emit(Some(89_999), true).is_empty());
        let out = w.emit(Some(90_000), true);
        assert_eq!(starts(&out), vec![(s("u"), 0, 60_000)]);
        assert!(out[0].r#final);
        // Unchanged since the early emission, but the final one is still emitted and wins.
        assert_eq!(out[0].version, version(10, 1, true));
        assert!(out[0].version > early[0].version);
        assert_eq!(w.open_count(), 1);
        assert!(w.emit(Some(90_000), true).is_empty());
        assert!(w.emit(Some(100_000), false).is_empty());
        let rest = w.emit(Some(150_000), false);
        assert_eq!(starts(&rest), vec![(s("u"), 60_000, 120_000)]);
        assert!(rest[0].r#final);
        assert_eq!(w.open_count(), 0);
    }

    #[test]
    fn a_late_event_within_allowed_lateness_corrects_the_window_with_a_higher_version() {
        let mut w = Windows::new(cfg());
        w.add(&ev(10, "a", "u", "click", 1_000), None);
        let before = w.emit(Some(60_000), true);
        // The watermark passed the window's end, but not end + lateness.
        assert!(!w.is_late(59_999, Some(80_000)));
        assert_eq!(
            w.add(&ev(20, "b", "u", "click", 59_999), Some(80_000)),
            Admit::Added
        );
        let corrected = w.emit(Some(80_000), true);
        assert_eq!(corrected.len(), 1);
        assert_eq!(corrected[0].event_count, 2);
        assert!(!corrected[0].r#final);
        assert!(corrected[0].version > before[0].version);
        let fin = w.emit(Some(90_000), true);
        assert!(fin[0].r#final && fin[0].version > corrected[0].version);
    }

    #[test]
    fn an_event_beyond_allowed_lateness_is_late_and_changes_nothing() {
        let mut w = Windows::new(cfg());
        w.add(&ev(10, "a", "u", "click", 1_000), None);
        w.add(&ev(11, "b", "u", "click", 70_000), None);
        w.emit(Some(0), true);
        assert!(w.is_late(59_999, Some(90_000)));
        assert!(!w.is_late(60_000, Some(90_000)));
        assert!(!w.is_late(0, None));
        assert_eq!(
            w.add(&ev(12, "c", "u", "click", 59_999), Some(90_000)),
            Admit::Late
        );
        // Late even for a window that is still open because emit has not run yet.
        assert_eq!(w.open_count(), 2);
        assert!(!w.contains("u", "c"));
        assert_eq!(w.min_open_offset(0), Some(10));
        assert!(w.emit(Some(0), true).is_empty());
        let out = w.emit(Some(90_000), false);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].event_count, 1);
        assert_eq!(out[0].version, version(10, 1, true));
    }

    #[test]
    fn duplicates_are_dropped_across_the_users_open_windows() {
        let mut w = Windows::new(cfg());
        assert_eq!(w.add(&ev(1, "x", "u", "click", 1_000), None), Admit::Added);
        assert!(w.contains("u", "x"));
        assert!(!w.contains("v", "x"));
        // Same id, other window of the same user: duplicate.
        assert_eq!(
            w.add(&ev(2, "x", "u", "click", 200_000), None),
            Admit::Duplicate
        );
        assert_eq!(
            w.add(&ev(3, "x", "u", "click", 1_000), None),
            Admit::Duplicate
        );
        // Same id for another user is a different event.
        assert_eq!(w.add(&ev(4, "x", "v", "click", 1_000), None), Admit::Added);
        assert_eq!(w.open_count(), 2);
        let out = w.emit(None, true);
        assert_eq!(out.iter().map(|o| o.event_count).sum::<u64>(), 2);
        assert_eq!(out[0].version, version(1, 1, false));
        // Once the window is finalized the id is no longer held.
        w.emit(Some(i64::MAX), false);
        assert!(!w.contains("u", "x"));
    }

    #[test]
    fn the_same_events_in_the_same_order_give_identical_emissions() {
        let events: Vec<InputEvent> = (0..200)
            .map(|i: i64| {
                let user = format!("u{}", i % 5);
                let id = format!("e{}", i % 40);
                let t = (i * 7_919) % 400_000 - 100_000;
                match i % 3 {
                    0 => page(i, &id, &user, t, &format!("/p{}", i % 4)),
                    1 => buy(i, &id, &user, t, ["USD", "EUR"][(i % 2) as usize], i),
                    _ => ev(i, &id, &user, "click", t),
                }
            })
            .collect();
        let run = || {
            let mut w = Windows::new(cfg());
            let mut out = Vec::new();
            let mut admits = Vec::new();
            for (i, e) in events.iter().enumerate() {
                let wm = Some(-150_000 + i64::try_from(i).unwrap() * 3_000);
                admits.push(w.add(e, wm));
                if i % 10 == 0 {
                    out.extend(w.emit(wm, true));
                }
            }
            out.extend(w.emit(Some(i64::MAX), true));
            (admits, out)
        };
        let (a1, o1) = run();
        let (a2, o2) = run();
        assert_eq!(a1, a2);
        assert_eq!(o1, o2);
        assert!(o1.iter().any(|o| o.r#final));
        assert!(a1.contains(&Admit::Late) && a1.contains(&Admit::Duplicate));
    }

    #[test]
    fn a_rebuild_from_a_later_offset_gets_a_lower_version_than_the_complete_window() {
        let events = [
            ev(100, "a", "u", "click", 1_000),
            ev(105, "b", "u", "click", 2_000),
            ev(110, "c", "u", "click", 3_000),
        ];
        let mut full = Windows::new(cfg());
        for e in &events {
            full.add(e, None);
        }
        let mut rebuilt = Windows::new(cfg());
        for e in &events[1..] {
            rebuilt.add(e, None);
        }
        let f = full.emit(None, true);
        let r = rebuilt.emit(None, true);
        assert!(r[0].version < f[0].version);
        // Same content gives the same version, both early and final.
        let mut again = Windows::new(cfg());
        for e in &events {
            again.add(e, None);
        }
        assert_eq!(again.emit(None, true)[0].version, f[0].version);
        assert_eq!(
            again.emit(Some(i64::MAX), true)[0].version,
            full.emit(Some(i64::MAX), true)[0].version
        );
    }

    #[test]
    fn min_open_offset_tracks_the_earliest_held_offset_per_partition() {
        let mut w = Windows::new(cfg());
        assert_eq!(w.min_open_offset(0), None);
        w.add(&on(0, ev(50, "a", "u", "click", 1_000)), None);
        w.add(&on(0, ev(51, "b", "v", "click", 70_000)), None);
        w.add(&on(1, ev(7, "c", "w", "click", 1_000)), None);
        // An older offset of partition 0 folded into u's window lowers the minimum.
        w.add(&on(0, ev(40, "d", "u", "click", 2_000)), None);
        w.add(&on(0, ev(60, "e", "u", "click", 3_000)), None);
        assert_eq!(w.min_open_offset(0), Some(40));
        assert_eq!(w.min_open_offset(1), Some(7));
        assert_eq!(w.min_open_offset(2), None);
        // Windows [0, 60 000) close; v's window (offset 51) stays.
        w.emit(Some(90_000), false);
        assert_eq!(w.min_open_offset(0), Some(51));
        assert_eq!(w.min_open_offset(1), None);
        w.emit(Some(150_000), false);
        assert_eq!(w.min_open_offset(0), None);
    }

    #[test]
    fn revoke_drops_only_the_windows_of_that_partition() {
        let mut w = Windows::new(cfg());
        w.add(&on(0, ev(1, "a", "u", "click", 1_000)), None);
        w.add(&on(0, ev(2, "b", "u", "click", 70_000)), None);
        w.add(&on(1, ev(3, "c", "v", "click", 1_000)), None);
        assert_eq!(w.open_count(), 3);
        w.revoke(0);
        assert_eq!(w.open_count(), 1);
        assert_eq!(w.min_open_offset(0), None);
        assert_eq!(w.min_open_offset(1), Some(3));
        assert!(!w.contains("u", "a"));
        let out = w.emit(None, true);
        assert_eq!(starts(&out), vec![(s("v"), 0, 60_000)]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Event {
            user: u8,
            id: u8,
            partition: i32,
            time: i64,
            kind: u8,
            micros: i64,
        },
        Advance(i64),
        Emit(bool),
    }

    fn op() -> impl Strategy<Value = Op> {
        let time = prop_oneof![
            8 => -300_000i64..600_000,
            1 => any::<i64>(),
            1 => Just(i64::MIN),
            1 => Just(i64::MAX),
        ];
        prop_oneof![
            6 => (0u8..4, 0u8..40, 0i32..3, time, 0u8..3, any::<i64>()).prop_map(
                |(user, id, partition, time, kind, micros)| Op::Event {
                    user,
                    id,
                    partition,
                    time,
                    kind,
                    micros
                }
            ),
            2 => (0i64..50_000).prop_map(Op::Advance),
            2 => any::<bool>().prop_map(Op::Emit),
        ]
    }

    proptest! {
        #[test]
        fn random_sequences_never_panic_and_every_window_is_final_exactly_once(
            ops in proptest::collection::vec(op(), 0..200),
            window_ms in prop_oneof![Just(60_000i64), 1i64..100_000, Just(0), Just(i64::MAX)],
            lateness in prop_oneof![Just(30_000i64), 0i64..100_000, Just(-1), Just(i64::MAX)],
        ) {
            let cfg = TimeConfig { window_ms, allowed_lateness_ms: lateness, ..cfg() };
            let mut w = Windows::new(cfg);
            let mut wm: Option<i64> = None;
            let mut next_offset = [0i64; 3];
            let mut added: HashMap<(String, i64), u64> = HashMap::new();
            let mut emitted = Vec::new();
            for op in ops {
                match op {
                    Op::Event { user, id, partition, time, kind, micros } => {
                        let slot = usize::try_from(partition).unwrap();
                        let offset = next_offset[slot];
                        next_offset[slot] += 1;
                        let e = InputEvent {
                            partition,
                            currency: s(["USD", "EUR", ""][usize::from(kind)]),
                            amount_micros: Some(micros),
                            ..ev(offset, &format!("e{id}"), &format!("u{user}"),
                                ["page_view", "purchase", "click"][usize::from(kind)], time)
                        };
                        let was_late = w.is_late(time, wm);
                        let dup = w.contains(&e.user_id, &e.event_id);
                        let admit = w.add(&e, wm);
                        let expected = if was_late {
                            Admit::Late
                        } else if dup {
                            Admit::Duplicate
                        } else {
                            Admit::Added
                        };
                        prop_assert_eq!(admit, expected);
                        if admit == Admit::Added {
                            let (start, _) = w.window_bounds(time);
                            *added.entry((e.user_id.clone(), start)).or_default() += 1;
                        }
                    }
                    Op::Advance(d) => wm = Some(wm.unwrap_or(-400_000).saturating_add(d)),
                    Op::Emit(early) => emitted.extend(w.emit(wm, early)),
                }
                w.assert_indexed();
            }
            emitted.extend(w.emit(Some(i64::MAX), true));
            prop_assert_eq!(w.open_count(), 0);
            for p in 0..3 {
                prop_assert_eq!(w.min_open_offset(p), None);
            }
            let mut finals: HashMap<(String, i64), u64> = HashMap::new();
            let mut last_version: HashMap<(String, i64), (u64, bool)> = HashMap::new();
            for o in &emitted {
                let key = (o.user_id.clone(), o.window_start_ms);
                if let Some((v, was_final)) = last_version.get(&key) {
                    prop_assert!(!was_final, "emission after final for {:?}", key);
                    prop_assert!(o.version > *v, "version did not increase for {:?}", key);
                }
                last_version.insert(key.clone(), (o.version, o.r#final));
                if o.r#final {
                    prop_assert_eq!(o.event_count, added.get(&key).copied().unwrap_or(0));
                    *finals.entry(key).or_default() += 1;
                }
            }
            prop_assert_eq!(finals.len(), added.len());
            prop_assert!(finals.values().all(|n| *n == 1));
        }
    }
}
