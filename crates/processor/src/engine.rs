//! The processor's engine: for each input event, dedup across the user's open windows and
//! sessions, lateness against the watermark, and folding into windows and sessions; on
//! each tick, the results to emit (early and final); and the safe commit point of each
//! partition — the earliest offset an open window or session still needs, so a restart
//! rebuilds every open aggregate from the log itself. Pure logic: no Kafka, no clocks
//! (processing time is passed in).

use std::collections::HashMap;

use pulse_contracts::pb::aggregates::v1::{Session, UserWindowActivity};

use crate::model::{Admit, InputEvent, TimeConfig};
use crate::session::Sessions;
use crate::watermark::{Observation, Watermarks};
use crate::window::Windows;

/// What happened to one event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Folded into its window and session. `future` when its event time was beyond
    /// processing time + the allowed skew (aggregated, but it did not move the watermark).
    Added {
        future: bool,
    },
    Duplicate,
    /// Later than the allowed lateness: for the late topic, with the reason.
    Late {
        reason: String,
    },
    /// Re-read after a restart and already handled before it: at or before the checkpoint's
    /// last offset, in a window the checkpointed watermark had closed (its final result or its
    /// late record was produced then). Skipped.
    Replayed,
}

/// What a partition's next owner needs to continue exactly where the last checkpoint was:
/// written after every acknowledged emission, before the offsets are stored.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Checkpoint {
    /// The offset to resume from (the earliest record an open aggregate needs).
    pub resume_offset: i64,
    /// The last offset processed.
    pub last_offset: i64,
    /// The partition's max event time (its watermark + the out-of-orderness).
    pub max_event_ms: Option<i64>,
    /// The watermark the engine had used to close windows and sessions when the checkpoint
    /// was written: a replayed record is known to be handled only if this closed its window.
    #[serde(default)]
    pub closed_watermark: Option<i64>,
    /// Users with a session still open then, and its earliest start: a replayed record of
    /// such a user at or after that start belongs to an open session; any other replayed
    /// record's session was already final.
    #[serde(default)]
    pub open_sessions: std::collections::BTreeMap<String, i64>,
    /// Users of `open_sessions` whose earliest open session continues one already final
    /// (cut at the maximum session duration): a new event of theirs before that start is
    /// late, as it was before the restart. Absent in checkpoints written before the maximum
    /// existed (no session was ever cut then).
    #[serde(default, skip_serializing_if = "std::collections::BTreeSet::is_empty")]
    pub continued_sessions: std::collections::BTreeSet<String>,
    /// The maximum session duration the open sessions were cut with; None in checkpoints
    /// written before it existed (no maximum). A different value at restore is a rules
    /// change (see the README).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_session_ms: Option<i64>,
}

/// A partition being replayed after a restore.
#[derive(Debug, Clone)]
struct Replay {
    open_sessions: std::collections::BTreeMap<String, i64>,
    /// Records at or before this offset were processed before the restart.
    until: i64,
    /// The watermark that had closed windows then.
    closed_watermark: Option<i64>,
    /// Processing time of the restore.
    since_ms: i64,
    /// A record of the partition was processed since the restore.
    seen: bool,
    /// The replay reached `until`.
    done: bool,
}

/// Results to produce.
#[derive(Debug, Default)]
pub struct Outputs {
    pub activity: Vec<UserWindowActivity>,
    pub sessions: Vec<Session>,
}

impl Outputs {
    pub fn is_empty(&self) -> bool {
        self.activity.is_empty() && self.sessions.is_empty()
    }
}

#[derive(Debug)]
pub struct Engine {
    cfg: TimeConfig,
    watermarks: Watermarks,
    windows: Windows,
    sessions: Sessions,
    /// Last offset processed per partition.
    last_offset: HashMap<i32, i64>,
    /// Partitions restored from a checkpoint and their replay progress.
    replays: HashMap<i32, Replay>,
    /// The highest watermark used so far: the combined watermark may step back when an
    /// idle partition wakes up, but a closed window must never reopen.
    high_watermark: Option<i64>,
}

impl Engine {
    pub fn new(cfg: TimeConfig) -> Self {
        Self {
            cfg,
            watermarks: Watermarks::new(cfg),
            windows: Windows::new(cfg),
            sessions: Sessions::new(cfg),
            last_offset: HashMap::new(),
            high_watermark: None,
            replays: HashMap::new(),
        }
    }

    /// The engine with sessions cut at `max_session_ms` instead of the default
    /// ([`crate::model::DEFAULT_MAX_SESSION_MS`]).
    pub fn with_max_session_ms(mut self, max_session_ms: i64) -> Self {
        self.sessions = Sessions::with_max_session_ms(self.cfg, max_session_ms);
        self
    }

    /// The maximum session duration in force, ms.
    pub fn max_session_ms(&self) -> i64 {
        self.sessions.max_session_ms()
    }

    /// Continues `partition` from its last checkpoint: restores its event-time progress and
    /// remembers which records a replay re-reads.
    pub fn restore(&mut self, partition: i32, cp: Checkpoint, now_ms: i64) {
        if let Some(t) = cp.max_event_ms {
            self.watermarks.observe(partition, t, now_ms);
        }
        for user in &cp.continued_sessions {
            if let Some(start) = cp.open_sessions.get(user) {
                self.sessions.restore_continuation(user, *start, partition);
            }
        }
        self.replays.insert(
            partition,
            Replay {
                open_sessions: cp.open_sessions,
                until: cp.last_offset,
                closed_watermark: cp.closed_watermark,
                since_ms: now_ms,
                seen: false,
                done: false,
            },
        );
        self.high_watermark = None;
    }

    /// Whether some restored partition is still replaying records processed before the
    /// restart. Finals wait for it: a window rebuilt from part of its replay must not be
    /// closed. A restored partition that delivers nothing for the idle timeout counts as done.
    fn replaying(&self, now_ms: i64) -> bool {
        self.replays.values().any(|r| {
            !r.done && (r.seen || now_ms.saturating_sub(r.since_ms) < self.cfg.idle_timeout_ms)
        })
    }

    /// The checkpoint of `partition` now; None before any record of it.
    pub fn checkpoint(&self, partition: i32) -> Option<Checkpoint> {
        Some(Checkpoint {
            resume_offset: self.resume_offset(partition)?,
            last_offset: *self.last_offset.get(&partition)?,
            max_event_ms: self.watermarks.max_event_time(partition),
            closed_watermark: self.high_watermark,
            open_sessions: self.sessions.open_starts(partition),
            continued_sessions: self.sessions.continued(partition),
            max_session_ms: Some(self.sessions.max_session_ms()),
        })
    }

    /// The watermark in force: the combined watermark, never below one already used.
    fn advance_watermark(&mut self, now_ms: i64) -> Option<i64> {
        let current = self.watermarks.current(now_ms);
        self.high_watermark = match (self.high_watermark, current) {
            (Some(h), Some(c)) => Some(h.max(c)),
            (h, c) => h.or(c),
        };
        self.high_watermark
    }

    /// A newly assigned partition starts without data and may be behind the others, so
    /// the combined watermark is recomputed from scratch.
    pub fn assign(&mut self, partition: i32, now_ms: i64) {
        self.watermarks.assign(partition, now_ms);
        self.high_watermark = None;
    }

    /// Forgets everything of `partition` (the new owner rebuilds it from the log).
    pub fn revoke(&mut self, partition: i32) {
        self.watermarks.revoke(partition);
        self.windows.revoke(partition);
        self.sessions.revoke(partition);
        self.last_offset.remove(&partition);
        self.replays.remove(&partition);
    }

    /// A record of `partition` that could not be decoded: it still counts as processed.
    pub fn skip(&mut self, partition: i32, offset: i64, now_ms: i64) {
        self.watermarks.touch(partition, now_ms);
        self.last_offset.insert(partition, offset);
    }

    pub fn process(&mut self, event: &InputEvent, now_ms: i64) -> Outcome {
        let future = matches!(
            self.watermarks
                .observe(event.partition, event.event_time_ms, now_ms),
            Observation::Future
        );
        self.last_offset.insert(event.partition, event.offset);
        let watermark = self.advance_watermark(now_ms);
        if self.windows.contains(&event.user_id, &event.event_id)
            || self.sessions.contains(&event.user_id, &event.event_id)
        {
            return Outcome::Duplicate;
        }
        let mut replay = None;
        if let Some(r) = self.replays.get_mut(&event.partition) {
            r.seen = true;
            if event.offset >= r.until {
                r.done = true;
            }
            if event.offset <= r.until {
                let session_open = r
                    .open_sessions
                    .get(&event.user_id)
                    .is_some_and(|start| event.event_time_ms >= *start);
                replay = Some((r.closed_watermark, session_open));
            }
        }
        if let Some((closed, session_open)) = replay {
            // Processed before the restart: decided as it was then. Its session is rebuilt
            // only if that session was still open at the checkpoint (no lateness check: the
            // record was accepted then).
            if session_open {
                let _ = self.sessions.add(event, None);
            }
            if self.windows.is_late(event.event_time_ms, closed) {
                // Its window's final (or its late record) was produced before.
                return Outcome::Replayed;
            }
            let _ = self.windows.add(event, closed);
            return Outcome::Added { future };
        }
        if self.windows.is_late(event.event_time_ms, watermark) {
            let wm = watermark.unwrap_or(i64::MIN);
            return Outcome::Late {
                reason: format!(
                    "event time {} is more than the allowed lateness ({} ms) behind the end of its window; watermark {}",
                    event.event_time_ms, self.cfg.allowed_lateness_ms, wm
                ),
            };
        }
        match self.windows.add(event, watermark) {
            Admit::Added => {
                // A session may judge the event late on its own (gap-based); the window
                // result still counts it.
                let _ = self.sessions.add(event, watermark);
                Outcome::Added { future }
            }
            Admit::Duplicate => Outcome::Duplicate,
            Admit::Late => Outcome::Late {
                reason: "event is later than the allowed lateness of its window".into(),
            },
        }
    }

    /// Results due at processing time `now_ms`: finals for closed windows and sessions,
    /// and (when `early`) updates of changed open ones.
    pub fn emit(&mut self, now_ms: i64, early: bool) -> Outputs {
        let watermark = self.advance_watermark(now_ms);
        if self.replaying(now_ms) {
            return Outputs::default();
        }
        Outputs {
            activity: self.windows.emit(watermark, early),
            sessions: self.sessions.emit(watermark, early),
        }
    }

    /// The offset a consumer of `partition` must resume from so that every open window
    /// and session is rebuilt: the earliest offset they hold, or the record after the last
    /// one processed when nothing is open. None before any record of the partition.
    pub fn resume_offset(&self, partition: i32) -> Option<i64> {
        let held = [
            self.windows.min_open_offset(partition),
            self.sessions.min_open_offset(partition),
        ]
        .into_iter()
        .flatten()
        .min();
        match held {
            Some(o) => Some(o),
            None => self.last_offset.get(&partition).map(|o| o + 1),
        }
    }

    /// How far, in event time, `partition`'s commit is held back: the watermark minus the
    /// earliest start of an open window or session holding its records (0 when none is
    /// open; None before a watermark). An open window starts less than window +
    /// allowed lateness before the watermark, an open session less than the maximum
    /// session duration + gap + allowed lateness, so this is bounded by configuration
    /// (only future-dated events, which never move the watermark, can hold longer).
    pub fn commit_hold_ms(&self, partition: i32) -> Option<i64> {
        let wm = self.high_watermark?;
        let earliest = [
            self.windows.min_open_start(partition),
            self.sessions.min_open_start(partition),
        ]
        .into_iter()
        .flatten()
        .min();
        Some(earliest.map_or(0, |start| wm.saturating_sub(start).max(0)))
    }

    pub fn watermark(&self) -> Option<i64> {
        self.high_watermark
    }

    /// `partition`'s own watermark (its max event time − the out-of-orderness).
    pub fn partition_watermark(&self, partition: i32) -> Option<i64> {
        self.watermarks.partition_watermark(partition)
    }

    /// The last offset of `partition` processed.
    pub fn last_offset(&self, partition: i32) -> Option<i64> {
        self.last_offset.get(&partition).copied()
    }

    pub fn open_windows(&self) -> usize {
        self.windows.open_count()
    }

    pub fn open_sessions(&self) -> usize {
        self.sessions.open_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(offset: i64, user: &str, t: i64) -> InputEvent {
        InputEvent {
            partition: 0,
            offset,
            event_id: format!("e{offset}"),
            user_id: user.into(),
            event_type: "page_view".into(),
            page: "/".into(),
            currency: String::new(),
            amount_micros: None,
            event_time_ms: t,
            ingest_ms: t,
        }
    }

    fn cfg() -> TimeConfig {
        TimeConfig {
            window_ms: 60_000,
            allowed_lateness_ms: 10_000,
            max_out_of_orderness_ms: 1_000,
            idle_timeout_ms: 1_000_000,
            max_future_skew_ms: 1_000_000_000,
            session_gap_ms: 30_000,
        }
    }

    #[test]
    fn the_resume_offset_is_the_earliest_record_an_open_aggregate_needs() {
        let mut e = Engine::new(cfg());
        e.assign(0, 0);
        e.process(&ev(0, "a", 1_000), 0);
        e.process(&ev(1, "b", 2_000), 0);
        assert_eq!(e.resume_offset(0), Some(0));
        // Much later events close a's and b's window and session.
        e.process(&ev(2, "c", 500_000), 0);
        let out = e.emit(0, false);
        assert!(out.activity.iter().any(|a| a.user_id == "a" && a.r#final));
        assert_eq!(e.resume_offset(0), Some(2), "only c's aggregates are open");
    }

    #[test]
    fn duplicates_and_late_events_are_told_apart() {
        let mut e = Engine::new(cfg());
        e.assign(0, 0);
        assert_eq!(
            e.process(&ev(0, "a", 100_000), 0),
            Outcome::Added { future: false }
        );
        let mut dup = ev(1, "a", 100_500);
        dup.event_id = "e0".into();
        assert_eq!(e.process(&dup, 0), Outcome::Duplicate);
        e.process(&ev(2, "a", 400_000), 0);
        assert!(matches!(
            e.process(&ev(3, "a", 1_000), 0),
            Outcome::Late { .. }
        ));
    }

    #[test]
    fn a_restart_from_the_resume_offset_rebuilds_the_same_results() {
        let events: Vec<InputEvent> = (0..40)
            .map(|i| ev(i, ["a", "b", "c"][(i % 3) as usize], 1_000 + i * 7_000))
            .collect();
        // Uninterrupted run.
        let mut full = Engine::new(cfg());
        full.assign(0, 0);
        let mut finals_full = Vec::new();
        for x in &events {
            full.process(x, 0);
            finals_full.extend(full.emit(0, false).activity);
        }
        // Run that stops after 25 events and restarts from the resume offset.
        let mut first = Engine::new(cfg());
        first.assign(0, 0);
        let mut finals = Vec::new();
        for x in &events[..25] {
            first.process(x, 0);
            finals.extend(first.emit(0, false).activity);
        }
        let resume = first.resume_offset(0).unwrap() as usize;
        let mut second = Engine::new(cfg());
        second.assign(0, 0);
        for x in &events[resume..] {
            second.process(x, 0);
            finals.extend(second.emit(0, false).activity);
        }
        // Keep the highest version per window, as the sinks do.
        let best = |v: Vec<UserWindowActivity>| {
            let mut m: std::collections::BTreeMap<(String, i64), UserWindowActivity> =
                Default::default();
            for a in v {
                let k = (a.user_id.clone(), a.window_start_ms);
                if m.get(&k).is_none_or(|b| b.version < a.version) {
                    m.insert(k, a);
                }
            }
            m
        };
        assert_eq!(best(finals), best(finals_full));
    }

    #[test]
    fn a_restart_from_a_checkpoint_skips_what_was_already_handled() {
        let mut first = Engine::new(cfg());
        first.assign(0, 0);
        first.process(&ev(0, "a", 1_000), 0);
        first.process(&ev(1, "b", 2_000), 0);
        first.process(&ev(2, "b", 200_000), 0);
        // a's window closes; b's new window at 200 s stays open.
        let out = first.emit(0, false);
        assert!(out.activity.iter().any(|x| x.user_id == "a" && x.r#final));
        // A too-late event of a goes to the late topic.
        assert!(matches!(
            first.process(&ev(3, "a", 1_500), 0),
            Outcome::Late { .. }
        ));
        let cp = first.checkpoint(0).unwrap();
        assert_eq!(
            (cp.resume_offset, cp.last_offset, cp.max_event_ms),
            (2, 3, Some(200_000))
        );

        // The next owner resumes at 2 with the checkpoint: offset 3 is a replay of a record
        // already sent to the late topic, so it is skipped, not folded into a rebuild.
        let mut next = Engine::new(cfg());
        next.assign(0, 0);
        next.restore(0, cp, 0);
        assert_eq!(
            next.process(&ev(2, "b", 200_000), 0),
            Outcome::Added { future: false }
        );
        assert_eq!(next.process(&ev(3, "a", 1_500), 0), Outcome::Replayed);
        // New records after the checkpoint are judged normally.
        assert!(matches!(
            next.process(&ev(4, "a", 1_600), 0),
            Outcome::Late { .. }
        ));
        assert!(
            next.emit(0, false)
                .activity
                .iter()
                .all(|x| x.user_id == "b")
        );
    }

    /// Final sessions by id (the sinks keep the highest version of each).
    fn final_sessions(v: &[Session]) -> std::collections::BTreeMap<String, Session> {
        let mut m: std::collections::BTreeMap<String, Session> = Default::default();
        for s in v.iter().filter(|s| s.r#final) {
            if m.get(&s.session_id).is_none_or(|b| b.version < s.version) {
                m.insert(s.session_id.clone(), s.clone());
            }
        }
        m
    }

    #[test]
    fn an_always_active_user_no_longer_pins_the_resume_offset() {
        // A user with an event every 10 s for two hours: never a gap of 30 s.
        let max = 120_000;
        let mut e = Engine::new(cfg()).with_max_session_ms(max);
        e.assign(0, 0);
        let bound = max + cfg().session_gap_ms + cfg().allowed_lateness_ms;
        for i in 0..720 {
            e.process(&ev(i, "a", 1_000 + i * 10_000), 0);
            e.emit(0, false);
            let hold = e.commit_hold_ms(0).unwrap();
            assert!(hold <= bound, "hold {hold} ms at offset {i}");
        }
        // The resume offset follows: at most (bound + out-of-orderness) / 10 s behind.
        let held = e.last_offset(0).unwrap() + 1 - e.resume_offset(0).unwrap();
        assert!(held <= 17, "{held} records held");
        assert!(e.open_sessions() <= 2);
    }

    #[test]
    fn the_cut_is_the_same_after_a_restart_from_a_checkpoint() {
        let cfg = cfg();
        let max = 60_000;
        let s = 1_000;
        // a: one run cut at 61 s (first session 1..60 s, the next from 70 s); the first
        // is final at 105 s; then an event at 65 s (its window still open) that would move
        // the second session's start back, which the final first session forbids.
        let mut events: Vec<InputEvent> = [1, 21, 41, 60, 70, 85, 100, 105, 65, 110, 125, 140]
            .into_iter()
            .enumerate()
            .map(|(i, t)| ev(i as i64, "a", t * s))
            .collect();
        let n = events.len() as i64;
        events.push(ev(n, "b", 2_000 * s));
        let mut full = Engine::new(cfg).with_max_session_ms(max);
        full.assign(0, 0);
        let mut want = Vec::new();
        for x in &events {
            full.process(x, 0);
            want.extend(full.emit(0, false).sessions);
        }
        let want = final_sessions(&want);
        let a: Vec<(i64, i64, u64)> = want
            .values()
            .filter(|x| x.user_id == "a")
            .map(|x| (x.start_ms, x.end_ms, x.event_count))
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        assert_eq!(
            a,
            vec![(s, 60 * s, 4), (70 * s, 125 * s, 6), (140 * s, 140 * s, 1)]
        );

        for stop in 1..events.len() {
            let mut first = Engine::new(cfg).with_max_session_ms(max);
            first.assign(0, 0);
            let mut got = Vec::new();
            for x in &events[..stop] {
                first.process(x, 0);
                got.extend(first.emit(0, false).sessions);
            }
            // Through the checkpoint topic's encoding.
            let json = serde_json::to_vec(&first.checkpoint(0).unwrap()).unwrap();
            let cp: Checkpoint = serde_json::from_slice(&json).unwrap();
            let mut next = Engine::new(cfg).with_max_session_ms(max);
            next.assign(0, 0);
            next.restore(0, cp.clone(), 0);
            for x in &events[cp.resume_offset as usize..] {
                next.process(x, 0);
                got.extend(next.emit(0, false).sessions);
            }
            assert_eq!(final_sessions(&got), want, "restart after {stop} events");
        }
    }

    #[test]
    fn an_old_checkpoint_holding_a_session_longer_than_the_maximum_is_cut_on_replay() {
        let max = 120_000;
        // a, active every 10 s from 1 s to 591 s: the previous version (no maximum) kept
        // one session open since 1 s and wrote this checkpoint after offset 59.
        let events: Vec<InputEvent> = (0..62)
            .map(|i| match i {
                60 => ev(i, "a", 601_000),
                61 => ev(i, "b", 5_000_000),
                _ => ev(i, "a", 1_000 + i * 10_000),
            })
            .collect();
        let old = r#"{"resume_offset":0,"last_offset":59,"max_event_ms":591000,"closed_watermark":590000,"open_sessions":{"a":1000}}"#;
        let cp: Checkpoint = serde_json::from_str(old).unwrap();
        assert!(cp.continued_sessions.is_empty() && cp.max_session_ms.is_none());
        let mut e = Engine::new(cfg()).with_max_session_ms(max);
        e.assign(0, 0);
        e.restore(0, cp, 0);
        let mut out = Vec::new();
        for x in &events {
            e.process(x, 0);
            out.extend(e.emit(0, false).sessions);
        }
        let got = final_sessions(&out);
        let a: Vec<&Session> = got.values().filter(|x| x.user_id == "a").collect();
        let mut spans: Vec<(i64, i64, u64)> = a
            .iter()
            .map(|x| (x.start_ms, x.end_ms, x.event_count))
            .collect();
        spans.sort();
        assert_eq!(
            spans,
            vec![
                (1_000, 111_000, 12),
                (121_000, 231_000, 12),
                (241_000, 351_000, 12),
                (361_000, 471_000, 12),
                (481_000, 591_000, 12),
                (601_000, 601_000, 1),
            ]
        );
        // The first takes the split id and supersedes the long session's id, whose early
        // results (with more events, so a higher version) the previous version wrote.
        let first = a.iter().find(|x| x.start_ms == 1_000).unwrap();
        assert_eq!(
            first.session_id,
            Sessions::split_session_id("a", 1_000, max)
        );
        assert!(
            first
                .merged_session_ids
                .contains(&Sessions::session_id("a", 1_000))
        );
        // The same as if this version had run from the start.
        let mut fresh = Engine::new(cfg()).with_max_session_ms(max);
        fresh.assign(0, 0);
        let mut all = Vec::new();
        for x in &events {
            fresh.process(x, 0);
            all.extend(fresh.emit(0, false).sessions);
        }
        assert_eq!(got, final_sessions(&all));
        // Its checkpoints now carry the maximum.
        assert_eq!(e.checkpoint(0).unwrap().max_session_ms, Some(max));
    }
}
