//! The query core shared by HTTP and gRPC: typed parameters in, typed answers (epoch
//! milliseconds, exact money strings) with their freshness out. The meaning of every
//! number is defined here (README "Query API"); the SQL is in `store`, parsing in
//! `params`, and each transport only converts to its wire shape.

use std::time::Duration;

use pulse_contracts::money::micros_to_decimal;

use crate::error::QueryError;
use crate::freshness::{self, Freshness, FreshnessCache, StageFreshness, rules_versions};
use crate::params::{DAY_MS, HOUR_MS, MINUTE_MS, Step, TimeRange, Window, now_ms, rfc3339};
use crate::store::{EventRow, RevenueRow, SessionsRow, Store};

/// An answer and the freshness of the data it was computed from.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer<T> {
    pub data: T,
    pub freshness: Freshness,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveUsersPoint {
    pub ts_ms: i64,
    pub active_users: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RevenuePoint {
    pub ts_ms: i64,
    pub currency: String,
    /// Exact decimal, e.g. `12.34`.
    pub amount: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrencyTotal {
    pub currency: String,
    pub amount: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageViews {
    pub page: String,
    pub views: u64,
    pub unique_users: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UserSummary {
    pub user_id: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    pub page_views: u64,
    pub events: u64,
    pub sessions: u64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SessionStats {
    pub sessions: u64,
    pub avg_duration_seconds: f64,
    pub p50_duration_seconds: f64,
    pub p95_duration_seconds: f64,
    pub avg_pages: f64,
}

/// A stored event found by its producer trace id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEvent {
    pub event_id: String,
    pub event_type: String,
    pub user_id: String,
    pub session_id: String,
    pub event_time_ms: i64,
    pub ingest_time_ms: i64,
    /// The W3C trace id of the record that carried it (32 lowercase hex digits), `None`
    /// when it came without W3C trace context.
    pub trace_id: Option<String>,
    /// The producer's `metadata.trace_id`, as sent.
    pub source_trace_id: String,
    pub source: String,
    pub schema_version: u32,
    pub page: String,
    /// Currency and exact decimal amount, `None` for an event without an amount.
    pub amount: Option<(String, String)>,
}

/// The events of one producer trace id, and whether more matched than the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventSearch {
    pub events: Vec<StoredEvent>,
    pub truncated: bool,
}

/// Whether `id` is a W3C trace id: 32 lowercase hex digits, not all zero.
pub fn is_w3c_trace_id(id: &str) -> bool {
    id.len() == 32
        && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
        && id.bytes().any(|b| b != b'0')
}

impl From<EventRow> for StoredEvent {
    fn from(r: EventRow) -> Self {
        // The `trace_id` column falls back to the producer's id when the record had no
        // W3C context: only a W3C id is reported as one.
        let trace_id = is_w3c_trace_id(&r.trace_id).then_some(r.trace_id);
        Self {
            event_id: r.event_id,
            event_type: r.event_type,
            user_id: r.user_id,
            session_id: r.session_id,
            event_time_ms: r.event_time_ms,
            ingest_time_ms: r.ingest_time_ms,
            trace_id,
            source_trace_id: r.source_trace_id,
            source: r.source,
            schema_version: r.schema_version,
            page: r.page,
            amount: (r.has_amount != 0).then(|| (r.currency, micros_to_decimal(r.amount_micros))),
        }
    }
}

/// Knobs the answers depend on.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The processor's window length: a step must be a whole number of windows.
    pub window_ms: i64,
    pub max_points: usize,
    pub allowed_lateness_ms: i64,
    /// The longest `from`..`to` of a request.
    pub max_range_ms: i64,
}

/// `ms` in the largest whole unit (`31 d`, `36 h`, `90 min`), else in ms.
fn duration_text(ms: i64) -> String {
    for (unit, len) in [("d", DAY_MS), ("h", HOUR_MS), ("min", MINUTE_MS)] {
        if ms % len == 0 {
            return format!("{} {unit}", ms / len);
        }
    }
    format!("{ms} ms")
}

/// The nearest-rank percentile `pct`/100 of ascending `sorted`: the element at index
/// ceil(pct/100 · n) − 1 (integer arithmetic, no float rounding), `None` when empty. The
/// definition the sessions SQL implements in ClickHouse (`store`); also used by benchmarks.
pub fn nearest_rank(sorted: &[i64], pct: u32) -> Option<i64> {
    let n = sorted.len();
    if n == 0 {
        return None;
    }
    let pct = usize::try_from(pct.clamp(1, 100)).unwrap_or(100);
    let rank = (pct * n).div_ceil(100);
    sorted.get(rank.max(1) - 1).copied()
}

/// Session statistics of a [`SessionsRow`] (percentiles computed by ClickHouse, see
/// `store`): all 0 when there are none.
pub fn session_stats(row: &SessionsRow) -> SessionStats {
    if row.count == 0 {
        return SessionStats {
            sessions: 0,
            avg_duration_seconds: 0.0,
            p50_duration_seconds: 0.0,
            p95_duration_seconds: 0.0,
            avg_pages: 0.0,
        };
    }
    let n = row.count as f64;
    let secs = |ms: i64| ms as f64 / 1000.0;
    SessionStats {
        sessions: row.count,
        avg_duration_seconds: row.total_duration_ms as f64 / n / 1000.0,
        p50_duration_seconds: secs(row.p50_ms),
        p95_duration_seconds: secs(row.p95_ms),
        avg_pages: row.total_pages as f64 / n,
    }
}

fn amount(row: &RevenueRow) -> Result<String, QueryError> {
    row.micros().map(micros_to_decimal).ok_or_else(|| {
        QueryError::Internal(format!(
            "the revenue total of {} does not fit 64-bit micros",
            row.currency
        ))
    })
}

/// The query engine: a store, the freshness cache and the limits.
#[derive(Debug)]
pub struct Engine {
    store: Store,
    freshness: FreshnessCache,
    limits: Limits,
}

impl Engine {
    pub fn new(store: Store, freshness_ttl: Duration, limits: Limits) -> Self {
        Self {
            store,
            freshness: FreshnessCache::new(freshness_ttl),
            limits,
        }
    }

    /// Runs `data` and the (cached) freshness together; the answer covers times before
    /// `to_ms`, and `data` also gives the rules versions of the aggregates it used.
    async fn answer<T>(
        &self,
        to_ms: i64,
        data: impl Future<Output = Result<(T, Vec<String>), QueryError>>,
    ) -> Result<Answer<T>, QueryError> {
        let ((data, rules_versions), table) =
            tokio::try_join!(data, self.freshness.get(&self.store))?;
        let mut freshness = table.for_answer(to_ms, now_ms(), self.limits.allowed_lateness_ms);
        freshness.rules_versions = rules_versions;
        Ok(Answer { data, freshness })
    }

    /// Refuses a range longer than `max_range_ms` (every endpoint with `from`/`to`).
    fn check_range(&self, range: TimeRange) -> Result<(), QueryError> {
        let len = range.to_ms - range.from_ms;
        let max = self.limits.max_range_ms;
        if len > max {
            return Err(QueryError::RangeTooLong {
                message: format!(
                    "`from` ({}) to `to` ({}) spans {}; at most {} per request (--max-range-ms): move `from` later or `to` earlier",
                    rfc3339(range.from_ms),
                    rfc3339(range.to_ms),
                    duration_text(len),
                    duration_text(max)
                ),
            });
        }
        Ok(())
    }

    /// The buckets of a series, checking the range length, the step against the window
    /// length and the point limit.
    fn buckets(&self, range: TimeRange, step: Step) -> Result<Vec<i64>, QueryError> {
        self.check_range(range)?;
        if self.limits.window_ms > 0 && step.ms % self.limits.window_ms != 0 {
            return Err(QueryError::invalid(
                "step",
                format!(
                    "{} is not a whole number of the processor's {} ms windows",
                    step.label, self.limits.window_ms
                ),
            ));
        }
        step.buckets(range, self.limits.max_points)
    }

    /// Distinct users with activity per bucket; every bucket present, 0 when empty.
    pub async fn active_users(
        &self,
        range: TimeRange,
        step: Step,
    ) -> Result<Answer<Vec<ActiveUsersPoint>>, QueryError> {
        let buckets = self.buckets(range, step)?;
        let fetch = self.store.active_users(step.ms, range.from_ms, range.to_ms);
        self.answer(range.to_ms, async move {
            let rows = fetch.await?;
            let points = buckets
                .into_iter()
                .map(|ts_ms| ActiveUsersPoint {
                    ts_ms,
                    active_users: rows
                        .iter()
                        .find(|r| r.bucket == ts_ms)
                        .map_or(0, |r| r.users),
                })
                .collect();
            Ok((
                points,
                rules_versions(rows.iter().map(|r| &r.rules_versions)),
            ))
        })
        .await
    }

    /// Distinct users with a window starting at or after now − `window`.
    pub async fn active_users_current(&self, window: &Window) -> Result<Answer<u64>, QueryError> {
        let now = now_ms();
        let fetch = self.store.active_users_since(now - window.ms);
        self.answer(now, async move {
            let row = fetch.await?;
            Ok((row.users, rules_versions([&row.rules_versions])))
        })
        .await
    }

    /// Revenue per bucket and currency (only pairs with data), ts asc then currency asc.
    pub async fn revenue(
        &self,
        range: TimeRange,
        step: Step,
        currency: Option<&str>,
    ) -> Result<Answer<Vec<RevenuePoint>>, QueryError> {
        self.buckets(range, step)?;
        let fetch = self
            .store
            .revenue(step.ms, range.from_ms, range.to_ms, currency);
        self.answer(range.to_ms, async move {
            let rows = fetch.await?;
            let points = rows
                .iter()
                .map(|r| {
                    Ok(RevenuePoint {
                        ts_ms: r.bucket,
                        currency: r.currency.clone(),
                        amount: amount(r)?,
                    })
                })
                .collect::<Result<_, QueryError>>()?;
            Ok((
                points,
                rules_versions(rows.iter().map(|r| &r.rules_versions)),
            ))
        })
        .await
    }

    /// Revenue per currency over windows starting in the last hour.
    pub async fn revenue_last_hour(&self) -> Result<Answer<Vec<CurrencyTotal>>, QueryError> {
        let now = now_ms();
        let fetch = self.store.revenue_since(now - HOUR_MS);
        self.answer(now, async move {
            let rows = fetch.await?;
            let totals = rows
                .iter()
                .map(|r| {
                    Ok(CurrencyTotal {
                        currency: r.currency.clone(),
                        amount: amount(r)?,
                    })
                })
                .collect::<Result<_, QueryError>>()?;
            Ok((
                totals,
                rules_versions(rows.iter().map(|r| &r.rules_versions)),
            ))
        })
        .await
    }

    /// Pages by views (desc, then page asc), with distinct viewers.
    pub async fn top_pages(
        &self,
        range: TimeRange,
        limit: u32,
    ) -> Result<Answer<Vec<PageViews>>, QueryError> {
        self.check_range(range)?;
        let fetch = self.store.top_pages(range.from_ms, range.to_ms, limit);
        self.answer(range.to_ms, async move {
            let rows = fetch.await?;
            let versions = rules_versions(rows.iter().map(|r| &r.rules_versions));
            let pages = rows
                .into_iter()
                .map(|r| PageViews {
                    page: r.page,
                    views: r.views,
                    unique_users: r.viewers,
                })
                .collect();
            Ok((pages, versions))
        })
        .await
    }

    /// One user's activity in the range; `NotFound` without a window in it.
    pub async fn user(
        &self,
        user_id: &str,
        range: TimeRange,
    ) -> Result<Answer<UserSummary>, QueryError> {
        self.check_range(range)?;
        let windows = self.store.user(user_id, range.from_ms, range.to_ms);
        let sessions = self
            .store
            .sessions(range.from_ms, range.to_ms, Some(user_id));
        self.answer(range.to_ms, async move {
            let (w, s) = tokio::try_join!(windows, sessions)?;
            if w.windows == 0 {
                return Err(QueryError::NotFound(format!(
                    "user {user_id:?} has no activity in the range"
                )));
            }
            let summary = UserSummary {
                user_id: user_id.to_owned(),
                first_seen_ms: w.first_seen,
                last_seen_ms: w.last_seen,
                page_views: w.page_views,
                events: w.events,
                sessions: s.count,
            };
            Ok((
                summary,
                rules_versions([&w.rules_versions, &s.rules_versions]),
            ))
        })
        .await
    }

    /// Statistics of the current sessions starting in the range.
    pub async fn sessions(&self, range: TimeRange) -> Result<Answer<SessionStats>, QueryError> {
        self.check_range(range)?;
        let fetch = self.store.sessions(range.from_ms, range.to_ms, None);
        self.answer(range.to_ms, async move {
            let row = fetch.await?;
            Ok((session_stats(&row), rules_versions([&row.rules_versions])))
        })
        .await
    }

    /// Up to `limit` stored events whose producer trace id is `source_trace_id`, with an
    /// event time in the range, by event time; `truncated` when more matched.
    pub async fn events_by_source_trace(
        &self,
        source_trace_id: &str,
        range: TimeRange,
        limit: u32,
    ) -> Result<Answer<EventSearch>, QueryError> {
        self.check_range(range)?;
        let fetch = self.store.events_by_source_trace(
            source_trace_id,
            range.from_ms,
            range.to_ms,
            limit.saturating_add(1),
        );
        self.answer(range.to_ms, async move {
            let mut rows = fetch.await?;
            let keep = usize::try_from(limit).unwrap_or(usize::MAX);
            let truncated = rows.len() > keep;
            rows.truncate(keep);
            let found = EventSearch {
                events: rows.into_iter().map(StoredEvent::from).collect(),
                truncated,
            };
            // Stored events, not aggregates: no processing rules involved.
            Ok((found, Vec::new()))
        })
        .await
    }

    /// Freshness of each pipeline stage.
    pub async fn stages(&self) -> Result<Vec<StageFreshness>, QueryError> {
        freshness::stages(&self.store, &self.freshness, now_ms()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_written_in_their_largest_whole_unit() {
        assert_eq!(duration_text(31 * DAY_MS), "31 d");
        assert_eq!(duration_text(36 * HOUR_MS), "36 h");
        assert_eq!(duration_text(90 * MINUTE_MS), "90 min");
        assert_eq!(duration_text(1_500), "1500 ms");
    }

    #[test]
    fn ranges_up_to_the_maximum_pass_and_longer_ones_name_from_and_the_limit() {
        use pulse_platform::api_error::ApiError as _;
        let store = Store::new(
            &pulse_platform::clickhouse::ClickHouseConfig::default(),
            Duration::from_secs(1),
        );
        let limits = Limits {
            window_ms: MINUTE_MS,
            max_points: 1500,
            allowed_lateness_ms: 0,
            max_range_ms: DAY_MS,
        };
        let engine = Engine::new(store, Duration::ZERO, limits);
        let range = |len| TimeRange {
            from_ms: 0,
            to_ms: len,
        };
        engine.check_range(range(DAY_MS)).unwrap();
        let e = engine.check_range(range(DAY_MS + 1)).unwrap_err();
        assert_eq!((e.code(), e.parameter()), ("range_too_long", Some("from")));
        assert!(e.to_string().contains("at most 1 d"), "{e}");
        assert!(e.to_string().contains("--max-range-ms"), "{e}");
    }

    #[test]
    fn only_w3c_trace_ids_are_reported_as_such() {
        assert!(is_w3c_trace_id("4bf92f3577b34da6a3ce929d0e0e4736"));
        for not in [
            "abcd-1234",
            "",
            "00000000000000000000000000000000",
            "4BF92F3577B34DA6A3CE929D0E0E4736",
            "4bf92f3577b34da6a3ce929d0e0e47",
        ] {
            assert!(!is_w3c_trace_id(not), "{not}");
        }
        let row = |trace: &str, has_amount| EventRow {
            event_id: "e1".into(),
            event_type: "purchase".into(),
            user_id: "u1".into(),
            session_id: "s1".into(),
            event_time_ms: 1,
            ingest_time_ms: 2,
            trace_id: trace.into(),
            source_trace_id: "abcd-1234".into(),
            source: "web".into(),
            schema_version: 3,
            page: "/".into(),
            currency: "JPY".into(),
            amount_micros: 1_500_000_000,
            has_amount,
        };
        let e = StoredEvent::from(row("abcd-1234", 0));
        assert_eq!((e.trace_id, e.amount), (None, None));
        let e = StoredEvent::from(row("4bf92f3577b34da6a3ce929d0e0e4736", 1));
        assert_eq!(
            e.trace_id.as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
        assert_eq!(e.amount, Some(("JPY".into(), "1500.00".into())));
    }

    #[test]
    fn nearest_rank_takes_the_element_at_ceil_q_n_minus_one() {
        let v: Vec<i64> = (1..=20).collect();
        assert_eq!(nearest_rank(&v, 50), Some(10)); // ceil(10) - 1 = index 9
        assert_eq!(nearest_rank(&v, 95), Some(19)); // ceil(19) - 1 = index 18
        assert_eq!(nearest_rank(&v, 100), Some(20));
        let v = [3, 7, 9];
        assert_eq!(nearest_rank(&v, 50), Some(7)); // ceil(1.5) - 1 = 1
        assert_eq!(nearest_rank(&v, 95), Some(9)); // ceil(2.85) - 1 = 2
        assert_eq!(nearest_rank(&[42], 50), Some(42));
        assert_eq!(nearest_rank(&[42], 95), Some(42));
        assert_eq!(nearest_rank(&[], 50), None);
        // Where q·n is a whole number, no float error pushes the rank up by one.
        let v: Vec<i64> = (1..=100).collect();
        for q in [50u32, 95] {
            assert_eq!(nearest_rank(&v, q), Some(i64::from(q)));
        }
    }

    #[test]
    fn session_stats_average_and_take_percentiles_in_seconds() {
        let row = SessionsRow {
            count: 4,
            total_duration_ms: 10_000,
            total_pages: 10,
            p50_ms: 2_000,
            p95_ms: 4_000,
            rules_versions: Vec::new(),
        };
        let s = session_stats(&row);
        assert_eq!(s.sessions, 4);
        assert_eq!(s.avg_duration_seconds, 2.5);
        assert_eq!(s.p50_duration_seconds, 2.0);
        assert_eq!(s.p95_duration_seconds, 4.0);
        assert_eq!(s.avg_pages, 2.5);
    }

    #[test]
    fn no_sessions_means_all_zero() {
        let s = session_stats(&SessionsRow {
            count: 0,
            total_duration_ms: 0,
            total_pages: 0,
            p50_ms: 0,
            p95_ms: 0,
            rules_versions: Vec::new(),
        });
        assert_eq!(
            (
                s.sessions,
                s.avg_duration_seconds,
                s.p50_duration_seconds,
                s.p95_duration_seconds,
                s.avg_pages
            ),
            (0, 0.0, 0.0, 0.0, 0.0)
        );
    }
}
