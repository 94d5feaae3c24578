//! Gap-based session windows per user, in event time.
//!
//! A session is a maximal run of one user's events whose consecutive event times are at
//! most `session_gap_ms` apart. Open sessions of a user are kept sorted by start and are
//! always more than a gap apart; an event within a gap of one extends it, an event within a
//! gap of two bridges (merges) them. Everything here is pure logic: no I/O, no clocks.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use pulse_contracts::pb::aggregates::v1::Session;
use sha2::{Digest, Sha256};

use crate::model::{self, Admit, InputEvent, TimeConfig};

/// One open session of a user.
#[derive(Debug, Clone)]
struct Open {
    id: String,
    start_ms: i64,
    end_ms: i64,
    page_count: u64,
    event_count: u64,
    /// Event ids folded in (deduplication).
    event_ids: HashSet<String>,
    /// Per partition: (min offset, max offset) of the events folded in. A user's events
    /// normally come from one partition; keeping a map stays correct if they do not.
    offsets: BTreeMap<i32, (i64, i64)>,
    /// Highest offset folded in, over all partitions (drives the version).
    max_offset: i64,
    last_ingest_ms: i64,
    /// Ids this session superseded (absorbed sessions, and its own ids before its start
    /// moved back).
    merged: BTreeSet<String>,
    /// Changed since it was last emitted.
    dirty: bool,
}

impl Open {
    fn from_event(event: &InputEvent) -> Self {
        let t = event.event_time_ms;
        let mut event_ids = HashSet::new();
        event_ids.insert(event.event_id.clone());
        let mut offsets = BTreeMap::new();
        offsets.insert(event.partition, (event.offset, event.offset));
        Self {
            id: Sessions::session_id(&event.user_id, t),
            start_ms: t,
            end_ms: t,
            page_count: u64::from(event.is_page_view()),
            event_count: 1,
            event_ids,
            offsets,
            max_offset: event.offset,
            last_ingest_ms: event.ingest_ms,
            merged: BTreeSet::new(),
            dirty: true,
        }
    }

    /// Whether event time `t` is within `gap` of this session: in [start - gap, end + gap].
    fn near(&self, t: i64, gap: i64) -> bool {
        self.start_ms.saturating_sub(gap) <= t && t <= self.end_ms.saturating_add(gap)
    }

    /// Folds another session of the same user into this one; its id becomes superseded.
    fn absorb(&mut self, other: Open) {
        self.start_ms = self.start_ms.min(other.start_ms);
        self.end_ms = self.end_ms.max(other.end_ms);
        self.page_count = self.page_count.saturating_add(other.page_count);
        self.event_count = self.event_count.saturating_add(other.event_count);
        self.event_ids.extend(other.event_ids);
        for (partition, (lo, hi)) in other.offsets {
            let entry = self.offsets.entry(partition).or_insert((lo, hi));
            entry.0 = entry.0.min(lo);
            entry.1 = entry.1.max(hi);
        }
        self.max_offset = self.max_offset.max(other.max_offset);
        self.last_ingest_ms = self.last_ingest_ms.max(other.last_ingest_ms);
        self.merged.extend(other.merged);
        self.merged.insert(other.id);
        self.dirty = true;
    }

    fn to_session(&self, user_id: &str, is_final: bool) -> Session {
        Session {
            session_id: self.id.clone(),
            user_id: user_id.to_owned(),
            start_ms: self.start_ms,
            end_ms: self.end_ms,
            duration_ms: self.end_ms.saturating_sub(self.start_ms),
            page_count: self.page_count,
            event_count: self.event_count,
            version: model::version(self.max_offset, self.event_count, is_final),
            r#final: is_final,
            last_ingest_ms: self.last_ingest_ms,
            merged_session_ids: self.merged.iter().cloned().collect(),
        }
    }
}

/// The end of the user's latest session already emitted final. An event within a gap after
/// it could only extend a closed session, so it is late.
#[derive(Debug, Clone, Copy)]
struct Closed {
    end_ms: i64,
    partition: i32,
}

#[derive(Debug, Default)]
struct UserState {
    /// Sorted by start; consecutive sessions are more than a gap apart.
    open: Vec<Open>,
    closed: Option<Closed>,
}

/// Gap-based session windows per user (event time). A session is a maximal run of a user's
/// events where consecutive event times are at most `session_gap_ms` apart. start_ms =
/// first event time, end_ms = last event time, duration_ms = end - start, page_count =
/// page_view events, event_count = all events.
#[derive(Debug)]
pub struct Sessions {
    cfg: TimeConfig,
    users: BTreeMap<String, UserState>,
    /// Event times at or below this may touch a finalized session whose record was pruned:
    /// a watermark-late event there is late even if it touches an open session.
    floor_ms: i64,
}

impl Sessions {
    pub fn new(cfg: TimeConfig) -> Self {
        Self {
            cfg,
            users: BTreeMap::new(),
            floor_ms: i64::MIN,
        }
    }

    fn gap(&self) -> i64 {
        self.cfg.session_gap_ms.max(0)
    }

    /// How far behind the watermark a session's end must be before it is final.
    fn horizon(&self) -> i64 {
        self.gap()
            .saturating_add(self.cfg.allowed_lateness_ms.max(0))
    }

    /// Deterministic session id: "s-" + 32 hex chars of SHA-256 over (user_id, '\0',
    /// start_ms as decimal).
    pub fn session_id(user_id: &str, start_ms: i64) -> String {
        let mut hasher = Sha256::new();
        hasher.update(user_id.as_bytes());
        hasher.update([0u8]);
        hasher.update(start_ms.to_string().as_bytes());
        let digest = hasher.finalize();
        format!("s-{}", hex::encode(&digest[..16]))
    }

    /// Whether an event is too late for sessions: event_time + session_gap_ms +
    /// allowed_lateness_ms <= watermark AND it does not fall within [start - gap, end + gap]
    /// of one of the user's open sessions.
    ///
    /// Also late, so that a final session is never contradicted: an event within a gap after
    /// a session of the user already emitted final (it would extend a closed session), and a
    /// watermark-late event at or below the floor of pruned final sessions.
    pub fn is_late(&self, event: &InputEvent, watermark: Option<i64>) -> bool {
        let t = event.event_time_ms;
        let gap = self.gap();
        let state = self.users.get(&event.user_id);
        if let Some(closed) = state.and_then(|s| s.closed)
            && t <= closed.end_ms.saturating_add(gap)
        {
            return true;
        }
        let Some(wm) = watermark else {
            return false;
        };
        if t.saturating_add(self.horizon()) > wm {
            return false;
        }
        if t <= self.floor_ms {
            return true;
        }
        !state.is_some_and(|s| s.open.iter().any(|o| o.near(t, gap)))
    }

    pub fn contains(&self, user_id: &str, event_id: &str) -> bool {
        self.users
            .get(user_id)
            .is_some_and(|s| s.open.iter().any(|o| o.event_ids.contains(event_id)))
    }

    /// Folds the event in: Duplicate (same event id in any of the user's open sessions; an
    /// event already folded in is never reported late) / Late / Added. An event may extend a
    /// session on either side, start a new session, or bridge two open sessions (its time
    /// within gap of both) — then they merge into one whose id is the id for its (new)
    /// start; the ids of the sessions it absorbed are listed in `merged_session_ids`
    /// (sorted, deduplicated, accumulated across merges). If extending a session backwards
    /// changes its start, the old id goes to `merged_session_ids` as well.
    pub fn add(&mut self, event: &InputEvent, watermark: Option<i64>) -> Admit {
        if self.contains(&event.user_id, &event.event_id) {
            return Admit::Duplicate;
        }
        if self.is_late(event, watermark) {
            return Admit::Late;
        }
        let gap = self.gap();
        let t = event.event_time_ms;
        let state = self.users.entry(event.user_id.clone()).or_default();
        let (touching, mut rest): (Vec<Open>, Vec<Open>) = std::mem::take(&mut state.open)
            .into_iter()
            .partition(|o| o.near(t, gap));
        let mut session = Open::from_event(event);
        for other in touching {
            session.absorb(other);
        }
        // The id for the (possibly new) start; an id retired earlier stays retired unless
        // it is this session's id again.
        let id = Self::session_id(&event.user_id, session.start_ms);
        session.merged.remove(&id);
        session.id = id;
        let at = rest.partition_point(|o| o.start_ms < session.start_ms);
        rest.insert(at, session);
        state.open = rest;
        Admit::Added
    }

    /// Sessions to emit now: every open session with end_ms + session_gap_ms +
    /// allowed_lateness_ms <= watermark is emitted once with final = true and removed; if
    /// `early`, every other dirty session is emitted with final = false (dirty flag
    /// cleared). Deterministic order (user, start). version = model::version(max offset
    /// folded in, event_count, final).
    pub fn emit(&mut self, watermark: Option<i64>, early: bool) -> Vec<Session> {
        let horizon = self.horizon();
        let gap = self.gap();
        let mut out = Vec::new();
        let mut floor = self.floor_ms;
        for (user, state) in &mut self.users {
            let mut kept = Vec::with_capacity(state.open.len());
            for mut open in std::mem::take(&mut state.open) {
                let is_final =
                    watermark.is_some_and(|wm| open.end_ms.saturating_add(horizon) <= wm);
                if is_final {
                    out.push(open.to_session(user, true));
                    let partition = open.offsets.keys().next_back().copied().unwrap_or_default();
                    let end_ms = state
                        .closed
                        .map_or(open.end_ms, |c| c.end_ms.max(open.end_ms));
                    state.closed = Some(Closed { end_ms, partition });
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
        }
        self.floor_ms = floor;
        self.users
            .retain(|_, s| !s.open.is_empty() || s.closed.is_some());
        out
    }

    /// Smallest offset of `partition` still held by an open session, None if none.
    pub fn min_open_offset(&self, partition: i32) -> Option<i64> {
        self.users
            .values()
            .flat_map(|s| s.open.iter())
            .filter_map(|o| o.offsets.get(&partition).map(|(lo, _)| *lo))
            .min()
    }

    /// Per user with an open session holding records of `partition`: the earliest start of
    /// those sessions (for checkpoints: a replayed record at or after it belongs to a session
    /// that was still open).
    pub fn open_starts(&self, partition: i32) -> std::collections::BTreeMap<String, i64> {
        self.users
            .iter()
            .filter_map(|(user, s)| {
                s.open
                    .iter()
                    .filter(|o| o.offsets.contains_key(&partition))
                    .map(|o| o.start_ms)
                    .min()
                    .map(|start| (user.clone(), start))
            })
            .collect()
    }

    /// Drops the open sessions of `partition` (revoked in a rebalance), and the records of
    /// the partition's final sessions.
    pub fn revoke(&mut self, partition: i32) {
        for state in self.users.values_mut() {
            state.open.retain(|o| !o.offsets.contains_key(&partition));
            if state.closed.is_some_and(|c| c.partition == partition) {
                state.closed = None;
            }
        }
        self.users
            .retain(|_, s| !s.open.is_empty() || s.closed.is_some());
    }

    pub fn open_count(&self) -> usize {
        self.users.values().map(|s| s.open.len()).sum()
    }
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
        ) {
            let cfg = TimeConfig {
                session_gap_ms: gap,
                allowed_lateness_ms: lateness,
                ..TimeConfig::default()
            };
            let mut s = Sessions::new(cfg);
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
                prop_assert_eq!(&f.session_id, &Sessions::session_id(&f.user_id, f.start_ms));
                prop_assert!(!f.merged_session_ids.contains(&f.session_id));
            }
            // Every admitted event ends up in exactly one final session.
            prop_assert_eq!(finals.iter().map(|f| f.event_count).sum::<u64>(), added);
            // No two final sessions of a user are within the gap of each other.
            let mut by_user: HashMap<&str, Vec<(i64, i64)>> = HashMap::new();
            for f in &finals {
                by_user.entry(&f.user_id).or_default().push((f.start_ms, f.end_ms));
            }
            for spans in by_user.values_mut() {
                spans.sort();
                for w in spans.windows(2) {
                    prop_assert!(w[1].0 - w[0].1 > gap, "overlap within gap: {:?}", w);
                }
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
