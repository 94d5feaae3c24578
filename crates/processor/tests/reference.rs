#![allow(clippy::unwrap_used)]
//! Property test: the engine against a plain batch reference over random out-of-order
//! streams (one partition, several users, duplicates re-sent verbatim, late events).
//!
//! The reference decides acceptance with the engine's documented rules, computed
//! independently (watermark = max event time seen, this event included, − out-of-orderness;
//! an event is late when its window's end + allowed lateness <= watermark; a re-sent event
//! is never folded in twice), then aggregates the accepted events in batch: windows by
//! grouping, sessions by sorting, splitting at gaps, and cutting each run at the maximum
//! session duration (the first event at or after a session's start + the maximum starts
//! the next session).

use std::collections::{BTreeMap, HashSet};

use proptest::prelude::*;
use pulse_contracts::pb::aggregates::v1::{Session, UserWindowActivity};
use pulse_processor::engine::{Engine, Outcome};
use pulse_processor::model::{InputEvent, TimeConfig};
use pulse_processor::session::Sessions;

const BASE: i64 = 1_700_000_000_000;
const WINDOW: i64 = 10_000;
/// Times and durations are multiples of this, so boundaries (an event exactly at a
/// window's end + lateness, exactly a gap apart) are hit often.
const TICK: i64 = 250;
/// Processing time: the future skew is huge, so no event counts as future-dated.
const NOW: i64 = BASE;
const FLUSH_USER: &str = "flush";
const PAGES: [&str; 4] = ["/", "/a", "/b", ""];

#[derive(Debug, Clone)]
enum Kind {
    PageView(usize),
    Purchase { usd: bool, amount: i64 },
    PurchaseWithoutAmount,
    Click,
}

#[derive(Debug, Clone)]
enum Step {
    New {
        user: usize,
        back: bool,
        delta: i64,
        kind: Kind,
    },
    Resend(prop::sample::Index),
}

fn kind() -> impl Strategy<Value = Kind> {
    prop_oneof![
        4 => (0..PAGES.len()).prop_map(Kind::PageView),
        2 => (any::<bool>(), -1_000_000i64..1_000_000_000)
            .prop_map(|(usd, amount)| Kind::Purchase { usd, amount }),
        1 => Just(Kind::PurchaseWithoutAmount),
        1 => Just(Kind::Click),
    ]
}

fn step(users: usize) -> impl Strategy<Value = Step> {
    prop_oneof![
        // Mostly forward (up to 4 s), sometimes back by up to 20 s (past the lateness bound at
        // times).
        7 => (0..users, 0i64..=16, kind()).prop_map(|(user, delta, kind)| Step::New {
            user,
            back: false,
            delta: delta * TICK,
            kind
        }),
        3 => (0..users, 0i64..=80, kind()).prop_map(|(user, delta, kind)| Step::New {
            user,
            back: true,
            delta: delta * TICK,
            kind
        }),
        1 => any::<prop::sample::Index>().prop_map(Step::Resend),
    ]
}

#[derive(Debug, Clone)]
struct Case {
    cfg: TimeConfig,
    max_session_ms: i64,
    /// Early results every this many events.
    early_every: usize,
    events: Vec<InputEvent>,
}

fn build(cfg: TimeConfig, max_session_ms: i64, early_every: usize, steps: Vec<Step>) -> Case {
    let mut events: Vec<InputEvent> = Vec::new();
    let mut max_t = BASE;
    for s in steps {
        let offset = i64::try_from(events.len()).unwrap();
        match s {
            Step::New {
                user,
                back,
                delta,
                kind,
            } => {
                let t = if back { max_t - delta } else { max_t + delta };
                max_t = max_t.max(t);
                let (event_type, page, currency, amount) = match kind {
                    Kind::PageView(p) => ("page_view", PAGES[p], "", None),
                    Kind::Purchase { usd, amount } => (
                        "purchase",
                        "",
                        if usd { "USD" } else { "EUR" },
                        Some(amount),
                    ),
                    Kind::PurchaseWithoutAmount => ("purchase", "", "EUR", None),
                    Kind::Click => ("click", "/a", "", None),
                };
                events.push(InputEvent {
                    partition: 0,
                    offset,
                    event_id: format!("e{offset}"),
                    user_id: format!("u{user}"),
                    event_type: event_type.into(),
                    page: page.into(),
                    currency: currency.into(),
                    amount_micros: amount,
                    event_time_ms: t,
                    ingest_ms: NOW,
                });
            }
            Step::Resend(pick) => {
                if !events.is_empty() {
                    let original = events[pick.index(events.len())].clone();
                    events.push(InputEvent { offset, ..original });
                }
            }
        }
    }
    Case {
        cfg,
        max_session_ms,
        early_every,
        events,
    }
}

fn case() -> impl Strategy<Value = Case> {
    (
        (0i64..=20).prop_map(|n| n * TICK),
        (0i64..=12).prop_map(|n| n * TICK),
        (20i64..=80).prop_map(|n| n * TICK),
        1usize..=10,
        1usize..=4,
        // Longer than the gap (as the flag is validated) by up to 40 s: runs of the
        // generated streams are often cut.
        (1i64..=160).prop_map(|n| n * TICK),
    )
        .prop_flat_map(|(lateness, ooo, gap, early_every, users, over_gap)| {
            let cfg = TimeConfig {
                window_ms: WINDOW,
                allowed_lateness_ms: lateness,
                max_out_of_orderness_ms: ooo,
                idle_timeout_ms: i64::MAX / 4,
                max_future_skew_ms: i64::MAX / 4,
                session_gap_ms: gap,
            };
            prop::collection::vec(step(users), 0..=200)
                .prop_map(move |steps| build(cfg, gap + over_gap, early_every, steps))
        })
}

/// The aggregate fields of one window.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct WindowAgg {
    end: i64,
    event_count: u64,
    page_views: u64,
    page_views_by_page: BTreeMap<String, u64>,
    events_by_type: BTreeMap<String, u64>,
    revenue: BTreeMap<String, i64>,
    first_event_ms: i64,
    last_event_ms: i64,
}

impl WindowAgg {
    fn of(a: &UserWindowActivity) -> Self {
        Self {
            end: a.window_end_ms,
            event_count: a.event_count,
            page_views: a.page_views,
            page_views_by_page: a
                .page_views_by_page
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            events_by_type: a
                .events_by_type
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            revenue: a
                .revenue
                .iter()
                .map(|c| (c.currency.clone(), c.amount_micros))
                .collect(),
            first_event_ms: a.first_event_ms,
            last_event_ms: a.last_event_ms,
        }
    }
}

/// (end, event_count, page_count, cut at the maximum) of one session.
type SessionAgg = (i64, u64, u64, bool);

/// What the reference expects `process` to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Added,
    Late,
    /// A verbatim re-send: Duplicate while the original is held open, else Late.
    Rejected,
}

/// The batch reference. Acceptance is decided event by event (it depends on the order);
/// the aggregates are computed in batch over the accepted events.
struct Reference {
    cfg: TimeConfig,
    max_session_ms: i64,
    max_t: Option<i64>,
    seen: HashSet<(String, String)>,
    /// Events accepted into windows.
    accepted: Vec<InputEvent>,
    /// Per user: (time, is page view) of events accepted into sessions and not yet final.
    open: BTreeMap<String, Vec<(i64, bool)>>,
    /// Per user: the latest end of a session already final (until no event can reach it),
    /// and when that session was cut at the maximum, the start of the session continuing it.
    closed: BTreeMap<String, (i64, Option<i64>)>,
    /// Event times at or below this may touch a forgotten final session.
    floor: i64,
    final_sessions: Vec<(String, i64, SessionAgg)>,
}

fn window_end(t: i64) -> i64 {
    t.div_euclid(WINDOW) * WINDOW + WINDOW
}

/// Sorts, splits at gaps > `gap`, and cuts each run where an event is at or after its
/// session's first event + `max`: the events of each session, in time order, and whether
/// it was cut at the maximum (the next session continues its run).
fn split(mut evs: Vec<(i64, bool)>, gap: i64, max: i64) -> Vec<(Vec<(i64, bool)>, bool)> {
    evs.sort_unstable();
    let mut out: Vec<(Vec<(i64, bool)>, bool)> = Vec::new();
    for (t, pv) in evs {
        match out.last_mut() {
            Some((s, _)) if t - s.last().unwrap().0 <= gap && t < s[0].0 + max => s.push((t, pv)),
            Some((s, cut)) if t - s.last().unwrap().0 <= gap => {
                *cut = true;
                out.push((vec![(t, pv)], false));
            }
            _ => out.push((vec![(t, pv)], false)),
        }
    }
    out
}

impl Reference {
    fn new(cfg: TimeConfig, max_session_ms: i64) -> Self {
        Self {
            cfg,
            max_session_ms,
            max_t: None,
            seen: HashSet::new(),
            accepted: Vec::new(),
            open: BTreeMap::new(),
            closed: BTreeMap::new(),
            floor: i64::MIN,
            final_sessions: Vec::new(),
        }
    }

    fn watermark(&self) -> Option<i64> {
        self.max_t.map(|m| m - self.cfg.max_out_of_orderness_ms)
    }

    fn process(&mut self, e: &InputEvent) -> Expect {
        let t = e.event_time_ms;
        self.max_t = Some(self.max_t.map_or(t, |m| m.max(t)));
        let wm = self.watermark().unwrap();
        if !self.seen.insert((e.user_id.clone(), e.event_id.clone())) {
            return Expect::Rejected;
        }
        let lateness = self.cfg.allowed_lateness_ms;
        if window_end(t) + lateness <= wm {
            return Expect::Late;
        }
        self.accepted.push(e.clone());
        // Sessions: late if it would reach a session already final, or if the watermark
        // is past it by gap + lateness and it touches no open session of the user.
        let gap = self.cfg.session_gap_ms;
        let open = self.open.entry(e.user_id.clone()).or_default();
        let session_late = self
            .closed
            .get(&e.user_id)
            .is_some_and(|(c, next)| t <= c + gap && !next.is_some_and(|s| t >= s))
            || (t + gap + lateness <= wm
                && (t <= self.floor || !open.iter().any(|(x, _)| (t - x).abs() <= gap)));
        if !session_late {
            open.push((t, e.is_page_view()));
        }
        Expect::Added
    }

    /// Finalizes the sessions the current watermark closes.
    fn emit(&mut self) {
        let Some(wm) = self.watermark() else {
            return;
        };
        let gap = self.cfg.session_gap_ms;
        let horizon = gap + self.cfg.allowed_lateness_ms;
        let users: Vec<String> = self
            .open
            .keys()
            .chain(self.closed.keys())
            .cloned()
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        for user in users {
            let evs = self.open.remove(&user).unwrap_or_default();
            let mut still_open: Vec<(i64, bool)> = Vec::new();
            let sessions = split(evs, gap, self.max_session_ms);
            for (i, (session, cut)) in sessions.iter().enumerate() {
                let start = session[0].0;
                let end = session[session.len() - 1].0;
                if end + horizon <= wm {
                    let n = u64::try_from(session.len()).unwrap();
                    let pages =
                        u64::try_from(session.iter().filter(|(_, pv)| *pv).count()).unwrap();
                    self.final_sessions
                        .push((user.clone(), start, (end, n, pages, *cut)));
                    let next = cut.then(|| sessions[i + 1].0[0].0);
                    let c = self.closed.entry(user.clone()).or_insert((end, next));
                    if end >= c.0 {
                        *c = (end, next);
                    }
                } else {
                    still_open.extend(session.iter().copied());
                }
            }
            if let Some((c, _)) = self.closed.get(&user).copied()
                && still_open.is_empty()
                && c + gap + horizon <= wm
            {
                self.floor = self.floor.max(c + gap);
                self.closed.remove(&user);
            }
            if !still_open.is_empty() {
                self.open.insert(user, still_open);
            }
        }
    }
}

fn run(case: &Case) -> Result<(), TestCaseError> {
    let cfg = case.cfg;
    let max = case.max_session_ms;
    let mut engine = Engine::new(cfg).with_max_session_ms(max);
    engine.assign(0, NOW);
    let mut reference = Reference::new(cfg, max);
    let mut activity: Vec<UserWindowActivity> = Vec::new();
    let mut sessions: Vec<Session> = Vec::new();

    let max_t = case
        .events
        .iter()
        .map(|e| e.event_time_ms)
        .max()
        .unwrap_or(BASE);
    let flush = InputEvent {
        partition: 0,
        offset: i64::try_from(case.events.len()).unwrap(),
        event_id: "flush".into(),
        user_id: FLUSH_USER.into(),
        event_type: "click".into(),
        page: String::new(),
        currency: String::new(),
        amount_micros: None,
        event_time_ms: max_t + 10 * (WINDOW + cfg.allowed_lateness_ms + cfg.session_gap_ms),
        ingest_ms: NOW,
    };

    for (i, e) in case
        .events
        .iter()
        .chain(std::iter::once(&flush))
        .enumerate()
    {
        let got = engine.process(e, NOW);
        let want = reference.process(e);
        let ok = match want {
            Expect::Added => got == Outcome::Added { future: false },
            Expect::Late => matches!(got, Outcome::Late { .. }),
            Expect::Rejected => matches!(got, Outcome::Duplicate | Outcome::Late { .. }),
        };
        prop_assert!(ok, "event #{i} {e:?}: engine {got:?}, reference {want:?}");
        if (i + 1) % case.early_every == 0 {
            let out = engine.emit(NOW, true);
            reference.emit();
            activity.extend(out.activity);
            sessions.extend(out.sessions);
        }
    }
    let out = engine.emit(NOW, false);
    reference.emit();
    activity.extend(out.activity);
    sessions.extend(out.sessions);
    activity.retain(|a| a.user_id != FLUSH_USER);
    sessions.retain(|s| s.user_id != FLUSH_USER);

    // Engine windows: each key final exactly once, and the final is the highest version.
    let mut finals: BTreeMap<(String, i64), WindowAgg> = BTreeMap::new();
    let mut best: BTreeMap<(String, i64), &UserWindowActivity> = BTreeMap::new();
    for a in &activity {
        let key = (a.user_id.clone(), a.window_start_ms);
        if a.r#final {
            prop_assert!(
                finals.insert(key.clone(), WindowAgg::of(a)).is_none(),
                "window {key:?} emitted final twice"
            );
        }
        if best.get(&key).is_none_or(|b| b.version < a.version) {
            best.insert(key, a);
        }
    }
    for (key, a) in &best {
        prop_assert!(
            a.r#final,
            "window {key:?}: highest version is not final: {a:?}"
        );
    }

    // Reference windows, in batch over the accepted events.
    let mut expected: BTreeMap<(String, i64), WindowAgg> = BTreeMap::new();
    for e in reference
        .accepted
        .iter()
        .filter(|e| e.user_id != FLUSH_USER)
    {
        let t = e.event_time_ms;
        let end = window_end(t);
        let w = expected
            .entry((e.user_id.clone(), end - WINDOW))
            .or_insert_with(|| WindowAgg {
                end,
                first_event_ms: t,
                last_event_ms: t,
                ..WindowAgg::default()
            });
        w.event_count += 1;
        if e.event_type == "page_view" {
            w.page_views += 1;
            if !e.page.is_empty() {
                *w.page_views_by_page.entry(e.page.clone()).or_default() += 1;
            }
        }
        *w.events_by_type.entry(e.event_type.clone()).or_default() += 1;
        if e.event_type == "purchase"
            && let Some(a) = e.amount_micros
            && !e.currency.is_empty()
        {
            *w.revenue.entry(e.currency.clone()).or_default() += a;
        }
        w.first_event_ms = w.first_event_ms.min(t);
        w.last_event_ms = w.last_event_ms.max(t);
    }
    prop_assert_eq!(
        finals.keys().collect::<Vec<_>>(),
        expected.keys().collect::<Vec<_>>()
    );
    for (key, want) in &expected {
        prop_assert_eq!(&finals[key], want, "window {:?}", key);
    }

    // Sessions: each final exactly once, equal to the reference's.
    let mut got_sessions: BTreeMap<(String, i64), SessionAgg> = BTreeMap::new();
    for s in sessions.iter().filter(|s| s.r#final) {
        let key = (s.user_id.clone(), s.start_ms);
        let plain = Sessions::session_id(&s.user_id, s.start_ms);
        let cut = s.session_id != plain;
        if cut {
            prop_assert_eq!(
                &s.session_id,
                &Sessions::split_session_id(&s.user_id, s.start_ms, max)
            );
            prop_assert!(s.merged_session_ids.contains(&plain));
        }
        prop_assert_eq!(s.duration_ms, s.end_ms - s.start_ms);
        prop_assert!(s.duration_ms < max, "longer than the maximum: {:?}", s);
        prop_assert!(
            got_sessions
                .insert(key.clone(), (s.end_ms, s.event_count, s.page_count, cut))
                .is_none(),
            "session {key:?} emitted final twice"
        );
    }
    let mut want_sessions: BTreeMap<(String, i64), SessionAgg> = BTreeMap::new();
    for (user, start, agg) in reference
        .final_sessions
        .iter()
        .filter(|(u, ..)| u != FLUSH_USER)
    {
        prop_assert!(
            want_sessions.insert((user.clone(), *start), *agg).is_none(),
            "reference: session {user} {start} final twice"
        );
    }
    prop_assert!(
        reference
            .open
            .iter()
            .all(|(u, evs)| u == FLUSH_USER || evs.is_empty()),
        "reference: sessions left open after the flush"
    );
    prop_assert_eq!(got_sessions, want_sessions);
    Ok(())
}

proptest! {
    #[test]
    fn the_engine_matches_a_batch_reference_over_random_out_of_order_streams(case in case()) {
        run(&case)?;
    }
}
