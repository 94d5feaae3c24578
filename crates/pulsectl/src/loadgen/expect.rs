//! The answers the platform should give for a load run (`loadgen --expect-out`): a pure
//! function of what ingest answered for each event. It mirrors the processor's aggregates
//! (`crates/processor/src/window.rs`, `session.rs`, `model.rs`) and the query definitions
//! of QUERY_SEMANTICS.md; it leaves reading the answers and comparing them to others.
//!
//! Counted events are those ingest accepted (each event id once) minus the late ones.
//! - A window is `[floor(t / window_ms) * window_ms, + window_ms)` per user; page views are
//!   `page_view` events (per page only when the page is not empty); revenue comes from
//!   `purchase` events with an amount and a currency.
//! - A session is a maximal run of a user's events at most `session_gap_ms` apart;
//!   duration = last − first event time; page_count = `page_view` events.
//! - Buckets are 1 minute: bucket = floor(window_start / 60 000) * 60 000.
//! - Range: from = the start of the minute of the first window, to = the end of the minute
//!   after the last window's minute.

use std::collections::{BTreeMap, BTreeSet};

use pulse_contracts::money::micros_to_decimal;
use serde::Serialize;

/// The query step of the expected series.
pub const STEP_MS: i64 = 60_000;
/// How many users the `users` sample holds.
pub const USER_SAMPLE: usize = 5;
/// The `top_pages` limit.
pub const TOP_PAGES: usize = 10;

/// What ingest answered for one event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Accepted,
    Duplicate,
    Rejected,
}

/// One event as sent and answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answered {
    pub event_id: String,
    pub user_id: String,
    pub event_type: String,
    pub page: String,
    pub currency: String,
    pub amount_micros: Option<i64>,
    pub event_time_ms: i64,
    /// Sent beyond the processor's allowed lateness (counted in no aggregate).
    pub late: bool,
    pub status: Status,
    /// Ingest's code for a rejected event.
    pub reason_code: Option<String>,
}

/// The aggregation settings of the processor the answers are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub window_ms: i64,
    pub session_gap_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Range {
    pub from_ms: i64,
    pub to_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ActivePoint {
    pub ts_ms: i64,
    pub active_users: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RevenuePoint {
    pub ts_ms: i64,
    pub currency: String,
    pub amount: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TopPage {
    pub page: String,
    pub views: u64,
    pub unique_users: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserAnswer {
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub page_views: u64,
    pub events: u64,
    pub sessions: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SessionStats {
    pub sessions: u64,
    pub avg_duration_seconds: f64,
    pub p50_duration_seconds: f64,
    pub p95_duration_seconds: f64,
    pub avg_pages: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Rejected {
    pub event_id: String,
    pub reason_code: String,
}

/// The expect file.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Expected {
    pub range: Range,
    pub active_users: Vec<ActivePoint>,
    pub revenue: Vec<RevenuePoint>,
    pub top_pages: Vec<TopPage>,
    pub users: BTreeMap<String, UserAnswer>,
    pub sessions: SessionStats,
    pub accepted_event_ids: Vec<String>,
    pub late_event_ids: Vec<String>,
    pub rejected: Vec<Rejected>,
    pub duplicates: u64,
}

#[derive(Debug, Default)]
struct Window {
    event_count: u64,
    page_views: u64,
    by_page: BTreeMap<String, u64>,
    revenue: BTreeMap<String, i128>,
    first_ms: i64,
    last_ms: i64,
}

#[derive(Debug)]
struct Session {
    start_ms: i64,
    end_ms: i64,
    pages: u64,
}

fn floor_to(t: i64, step: i64) -> i64 {
    t - t.rem_euclid(step.max(1))
}

fn is_page_view(e: &Answered) -> bool {
    e.event_type == "page_view"
}

fn revenue(e: &Answered) -> Option<(&str, i64)> {
    match (e.event_type.as_str(), e.amount_micros) {
        ("purchase", Some(a)) if !e.currency.is_empty() => Some((e.currency.as_str(), a)),
        _ => None,
    }
}

/// Gap-based sessions of each user over event time.
fn sessions<'a>(counted: &[&'a Answered], gap: i64) -> BTreeMap<&'a str, Vec<Session>> {
    let mut by_user: BTreeMap<&str, Vec<&Answered>> = BTreeMap::new();
    for e in counted {
        by_user.entry(e.user_id.as_str()).or_default().push(e);
    }
    by_user
        .into_iter()
        .map(|(user, mut events)| {
            events.sort_by_key(|e| e.event_time_ms);
            let mut out: Vec<Session> = Vec::new();
            for e in events {
                let t = e.event_time_ms;
                match out.last_mut() {
                    Some(s) if t.saturating_sub(s.end_ms) <= gap.max(0) => {
                        s.end_ms = t;
                        s.pages += u64::from(is_page_view(e));
                    }
                    _ => out.push(Session {
                        start_ms: t,
                        end_ms: t,
                        pages: u64::from(is_page_view(e)),
                    }),
                }
            }
            (user, out)
        })
        .collect()
}

/// Nearest-rank percentile of sorted values: the element at index ceil(q·n) − 1.
fn nearest_rank(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn clamp_i64(v: i128) -> i64 {
    i64::try_from(v).unwrap_or(if v < 0 { i64::MIN } else { i64::MAX })
}

/// The answers for the events ingest answered.
pub fn expected(answered: &[Answered], settings: Settings) -> Expected {
    let mut seen = BTreeSet::new();
    let accepted: Vec<&Answered> = answered
        .iter()
        .filter(|e| e.status == Status::Accepted)
        .filter(|e| seen.insert(e.event_id.as_str()))
        .collect();
    let counted: Vec<&Answered> = accepted.iter().copied().filter(|e| !e.late).collect();

    // Windows per (user, start).
    let mut windows: BTreeMap<(&str, i64), Window> = BTreeMap::new();
    for e in &counted {
        let start = floor_to(e.event_time_ms, settings.window_ms);
        let w = windows
            .entry((e.user_id.as_str(), start))
            .or_insert_with(|| Window {
                first_ms: i64::MAX,
                last_ms: i64::MIN,
                ..Window::default()
            });
        w.event_count += 1;
        if is_page_view(e) {
            w.page_views += 1;
            if !e.page.is_empty() {
                *w.by_page.entry(e.page.clone()).or_default() += 1;
            }
        }
        if let Some((currency, amount)) = revenue(e) {
            *w.revenue.entry(currency.to_owned()).or_default() += i128::from(amount);
        }
        w.first_ms = w.first_ms.min(e.event_time_ms);
        w.last_ms = w.last_ms.max(e.event_time_ms);
    }

    let range = match (
        windows.keys().map(|(_, s)| *s).min(),
        windows.keys().map(|(_, s)| *s).max(),
    ) {
        (Some(lo), Some(hi)) => Range {
            from_ms: floor_to(lo, STEP_MS),
            to_ms: floor_to(hi, STEP_MS) + 2 * STEP_MS,
        },
        _ => Range {
            from_ms: 0,
            to_ms: 0,
        },
    };
    let in_range = |start: i64| start >= range.from_ms && start < range.to_ms;

    // active_users: every bucket of the range, 0 when empty.
    let mut active: BTreeMap<i64, BTreeSet<&str>> = BTreeMap::new();
    let mut ts = floor_to(range.from_ms, STEP_MS);
    while ts < range.to_ms {
        active.insert(ts, BTreeSet::new());
        ts += STEP_MS;
    }
    let mut revenue_by: BTreeMap<(i64, String), i128> = BTreeMap::new();
    let mut views: BTreeMap<&str, (u64, BTreeSet<&str>)> = BTreeMap::new();
    for ((user, start), w) in windows.iter().filter(|((_, s), _)| in_range(*s)) {
        let bucket = floor_to(*start, STEP_MS);
        if w.event_count > 0 {
            active.entry(bucket).or_default().insert(user);
        }
        for (currency, sum) in &w.revenue {
            *revenue_by.entry((bucket, currency.clone())).or_default() += sum;
        }
        for (page, n) in &w.by_page {
            let v = views.entry(page.as_str()).or_default();
            v.0 += n;
            if *n > 0 {
                v.1.insert(user);
            }
        }
    }
    let active_users = active
        .into_iter()
        .map(|(ts_ms, users)| ActivePoint {
            ts_ms,
            active_users: users.len() as u64,
        })
        .collect();
    let revenue = revenue_by
        .into_iter()
        .map(|((ts_ms, currency), sum)| RevenuePoint {
            ts_ms,
            currency,
            amount: micros_to_decimal(clamp_i64(sum)),
        })
        .collect();
    let mut top_pages: Vec<TopPage> = views
        .into_iter()
        .map(|(page, (views, users))| TopPage {
            page: page.to_owned(),
            views,
            unique_users: users.len() as u64,
        })
        .collect();
    top_pages.sort_by(|a, b| b.views.cmp(&a.views).then_with(|| a.page.cmp(&b.page)));
    top_pages.truncate(TOP_PAGES);

    let sessions_by_user = sessions(&counted, settings.session_gap_ms);
    let current: Vec<&Session> = sessions_by_user
        .values()
        .flatten()
        .filter(|s| s.start_ms >= range.from_ms && s.start_ms < range.to_ms)
        .collect();
    let n = current.len();
    let mut durations: Vec<f64> = current
        .iter()
        .map(|s| (s.end_ms - s.start_ms) as f64 / 1000.0)
        .collect();
    durations.sort_by(f64::total_cmp);
    let mean = |sum: f64| if n == 0 { 0.0 } else { sum / n as f64 };
    let session_stats = SessionStats {
        sessions: n as u64,
        // mean(duration_ms) / 1000, summed exactly in integer ms first.
        avg_duration_seconds: mean(
            current
                .iter()
                .map(|s| i128::from(s.end_ms - s.start_ms))
                .sum::<i128>() as f64,
        ) / 1000.0,
        p50_duration_seconds: nearest_rank(&durations, 0.5),
        p95_duration_seconds: nearest_rank(&durations, 0.95),
        avg_pages: mean(current.iter().map(|s| s.pages as f64).sum()),
    };

    // The sample: the users with the most counted events (ties by id).
    let mut per_user: BTreeMap<&str, UserAnswer> = BTreeMap::new();
    for ((user, _), w) in windows.iter().filter(|((_, s), _)| in_range(*s)) {
        let a = per_user.entry(user).or_insert(UserAnswer {
            first_seen_ms: i64::MAX,
            last_seen_ms: i64::MIN,
            page_views: 0,
            events: 0,
            sessions: 0,
        });
        a.first_seen_ms = a.first_seen_ms.min(w.first_ms);
        a.last_seen_ms = a.last_seen_ms.max(w.last_ms);
        a.page_views += w.page_views;
        a.events += w.event_count;
    }
    let mut ranked: Vec<(&str, UserAnswer)> = per_user.into_iter().collect();
    ranked.sort_by(|a, b| b.1.events.cmp(&a.1.events).then_with(|| a.0.cmp(b.0)));
    let users = ranked
        .into_iter()
        .take(USER_SAMPLE)
        .map(|(user, mut a)| {
            a.sessions = sessions_by_user.get(user).map_or(0, |ss| {
                ss.iter()
                    .filter(|s| s.start_ms >= range.from_ms && s.start_ms < range.to_ms)
                    .count() as u64
            });
            (user.to_owned(), a)
        })
        .collect();

    Expected {
        range,
        active_users,
        revenue,
        top_pages,
        users,
        sessions: session_stats,
        accepted_event_ids: accepted.iter().map(|e| e.event_id.clone()).collect(),
        late_event_ids: accepted
            .iter()
            .filter(|e| e.late)
            .map(|e| e.event_id.clone())
            .collect(),
        rejected: answered
            .iter()
            .filter(|e| e.status == Status::Rejected)
            .map(|e| Rejected {
                event_id: e.event_id.clone(),
                reason_code: e.reason_code.clone().unwrap_or_default(),
            })
            .collect(),
        duplicates: answered
            .iter()
            .filter(|e| e.status == Status::Duplicate)
            .count() as u64,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_700_000_040_000; // a minute boundary (1_700_000_040_000 % 60_000 == 0)

    fn ev(id: &str, user: &str, ty: &str, page: &str, t: i64) -> Answered {
        Answered {
            event_id: id.into(),
            user_id: user.into(),
            event_type: ty.into(),
            page: page.into(),
            currency: String::new(),
            amount_micros: None,
            event_time_ms: t,
            late: false,
            status: Status::Accepted,
            reason_code: None,
        }
    }

    fn buy(id: &str, user: &str, currency: &str, micros: i64, t: i64) -> Answered {
        Answered {
            currency: currency.into(),
            amount_micros: Some(micros),
            ..ev(id, user, "purchase", "/checkout", t)
        }
    }

    #[test]
    fn expected_answers_of_a_small_hand_made_run() {
        assert_eq!(T0 % 60_000, 0);
        let mut events = vec![
            ev("e1", "alice", "page_view", "/", T0 + 1_000),
            ev("e2", "alice", "click", "/", T0 + 2_000),
            // The last millisecond of minute 0 and the first of minute 1: a bucket edge.
            ev("e3", "bob", "page_view", "/pricing", T0 + 59_999),
            ev("e4", "bob", "page_view", "/", T0 + 60_000),
            buy("e5", "alice", "EUR", 12_340_000, T0 + 61_000),
            buy("e6", "bob", "EUR", 1_000_001, T0 + 62_000),
            buy("e7", "bob", "JPY", 1_500_000_000, T0 + 62_500),
            // A page view without a page counts as a page view but on no page.
            ev("e8", "carol", "page_view", "", T0 + 120_500),
        ];
        // A duplicate answer (same id as e1, not counted again).
        events.push(Answered {
            status: Status::Duplicate,
            ..events[0].clone()
        });
        // A late event: accepted, but in no aggregate and not in the range.
        events.push(Answered {
            late: true,
            ..ev("late1", "dave", "page_view", "/", T0 - 600_000)
        });
        // A malformed event, rejected.
        events.push(Answered {
            status: Status::Rejected,
            reason_code: Some("invalid_currency".into()),
            ..buy("bad1", "erin", "XYZ", 1, T0 + 3_000)
        });
        // A carol session after a gap longer than the session gap (2 min here).
        events.push(ev("e9", "carol", "page_view", "/", T0 + 240_501));

        let x = expected(
            &events,
            Settings {
                window_ms: 60_000,
                session_gap_ms: 120_000,
            },
        );
        assert_eq!(
            x.range,
            Range {
                from_ms: T0,
                to_ms: T0 + 6 * 60_000
            }
        );
        let active: Vec<(i64, u64)> = x
            .active_users
            .iter()
            .map(|p| (p.ts_ms - T0, p.active_users))
            .collect();
        assert_eq!(
            active,
            vec![
                (0, 2),
                (60_000, 2),
                (120_000, 1),
                (180_000, 0),
                (240_000, 1),
                (300_000, 0)
            ]
        );
        let revenue: Vec<(i64, &str, &str)> = x
            .revenue
            .iter()
            .map(|p| (p.ts_ms - T0, p.currency.as_str(), p.amount.as_str()))
            .collect();
        assert_eq!(
            revenue,
            vec![(60_000, "EUR", "13.340001"), (60_000, "JPY", "1500.00")]
        );
        let top: Vec<(&str, u64, u64)> = x
            .top_pages
            .iter()
            .map(|p| (p.page.as_str(), p.views, p.unique_users))
            .collect();
        assert_eq!(top, vec![("/", 3, 3), ("/pricing", 1, 1)]);

        // Users by events: bob 4, alice 3, carol 2.
        assert_eq!(
            x.users.keys().collect::<Vec<_>>(),
            vec!["alice", "bob", "carol"]
        );
        assert_eq!(
            x.users["bob"],
            UserAnswer {
                first_seen_ms: T0 + 59_999,
                last_seen_ms: T0 + 62_500,
                page_views: 2,
                events: 4,
                sessions: 1
            }
        );
        assert_eq!(x.users["carol"].sessions, 2);
        assert_eq!(x.users["carol"].page_views, 2);

        // Sessions: alice 1 000..61 000 (60 s, 1 page), bob 59 999..62 500 (2.501 s, 2
        // pages), carol 120 500 (0 s, 1 page) and 240 501 (0 s, 1 page).
        assert_eq!(x.sessions.sessions, 4);
        assert!((x.sessions.avg_duration_seconds - (60.0 + 2.501) / 4.0).abs() < 1e-9);
        assert_eq!(x.sessions.p50_duration_seconds, 0.0);
        assert_eq!(x.sessions.p95_duration_seconds, 60.0);
        assert!((x.sessions.avg_pages - 5.0 / 4.0).abs() < 1e-9);

        assert_eq!(
            x.accepted_event_ids,
            vec![
                "e1", "e2", "e3", "e4", "e5", "e6", "e7", "e8", "late1", "e9"
            ]
        );
        assert_eq!(x.late_event_ids, vec!["late1"]);
        assert_eq!(
            x.rejected,
            vec![Rejected {
                event_id: "bad1".into(),
                reason_code: "invalid_currency".into()
            }]
        );
        assert_eq!(x.duplicates, 1);
    }

    #[test]
    fn nothing_accepted_gives_empty_answers() {
        let x = expected(
            &[],
            Settings {
                window_ms: 60_000,
                session_gap_ms: 1_800_000,
            },
        );
        assert!(x.active_users.is_empty() && x.revenue.is_empty() && x.users.is_empty());
        assert_eq!(x.sessions.sessions, 0);
        assert_eq!(x.sessions.avg_duration_seconds, 0.0);
    }

    #[test]
    fn nearest_rank_takes_the_element_at_ceil_q_n_minus_one() {
        let v = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(nearest_rank(&v, 0.5), 2.0);
        assert_eq!(nearest_rank(&v, 0.95), 4.0);
        assert_eq!(nearest_rank(&[7.0], 0.5), 7.0);
    }
}
