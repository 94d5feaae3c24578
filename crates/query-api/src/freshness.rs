//! Data freshness: the table-wide part (latest write, latest final window, latest event),
//! cached for `--freshness-cache-ms` so a burst of requests costs one pair of scans; the
//! `freshness` object of every answer derived from it; and the per-stage view of
//! `GET /v1/freshness`. SQL lives in `store`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::error::QueryError;
use crate::metrics as m;
use crate::store::Store;

/// Table-wide freshness of the aggregates, as read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TableFreshness {
    /// Latest `written_at_ms` of `user_activity`.
    pub activity_written_ms: Option<i64>,
    /// Latest `written_at_ms` of `sessions`.
    pub sessions_written_ms: Option<i64>,
    /// Latest `window_end_ms` of a final window.
    pub final_window_end_ms: Option<i64>,
    /// Latest `last_event_ms` of any window.
    pub last_event_ms: Option<i64>,
}

impl TableFreshness {
    /// Latest write to `user_activity` or `sessions`.
    pub fn data_last_refreshed_ms(&self) -> Option<i64> {
        self.activity_written_ms.max(self.sessions_written_ms)
    }

    /// The `freshness` of an answer covering event times before `to_ms`, at `now_ms`.
    pub fn for_answer(&self, to_ms: i64, now_ms: i64, allowed_lateness_ms: i64) -> Freshness {
        Freshness {
            data_last_refreshed_at_ms: self.data_last_refreshed_ms(),
            watermark_ms: self
                .final_window_end_ms
                .map(|end| end.saturating_add(allowed_lateness_ms)),
            lag_seconds: self.last_event_ms.map(|t| seconds_between(t, now_ms)),
            complete: self.final_window_end_ms.is_some_and(|end| to_ms <= end),
            rules_versions: Vec::new(),
        }
    }
}

/// `(later - earlier)` in seconds.
pub fn seconds_between(earlier_ms: i64, later_ms: i64) -> f64 {
    (later_ms.saturating_sub(earlier_ms)) as f64 / 1000.0
}

/// The freshness carried by every analytic answer (README "Query API").
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Freshness {
    /// Latest `written_at_ms` of `user_activity`/`sessions`.
    pub data_last_refreshed_at_ms: Option<i64>,
    /// Latest final `window_end_ms` + allowed lateness: a lower bound of the processor's
    /// watermark.
    pub watermark_ms: Option<i64>,
    /// Now − latest `last_event_ms`, seconds.
    pub lag_seconds: Option<f64>,
    /// `to` ≤ the latest final window end: no window of the range can change any more.
    pub complete: bool,
    /// The processing rules versions of the windows and sessions the answer used (each at
    /// its latest version), sorted, distinct; `""` stands for rows written before rules
    /// versions existed. Empty when the answer used no aggregate.
    pub rules_versions: Vec<String>,
}

/// The distinct rules versions of `lists`, sorted.
pub fn rules_versions<'a>(lists: impl IntoIterator<Item = &'a Vec<String>>) -> Vec<String> {
    let set: std::collections::BTreeSet<&String> = lists.into_iter().flatten().collect();
    set.into_iter().cloned().collect()
}

/// One pipeline stage in `GET /v1/freshness`.
#[derive(Debug, Clone, PartialEq)]
pub struct StageFreshness {
    pub stage: &'static str,
    /// Latest event time the stage handled.
    pub last_event_time_ms: Option<i64>,
    /// When the stage last made progress.
    pub last_refresh_ms: Option<i64>,
    /// Now − `last_event_time_ms`, seconds.
    pub lag_seconds: Option<f64>,
}

pub const STAGES: [&str; 4] = ["ingest", "processor", "writer-clickhouse", "writer-parquet"];

/// The cached table-wide freshness.
#[derive(Debug)]
pub struct FreshnessCache {
    ttl: Duration,
    cached: Mutex<Option<(Instant, TableFreshness)>>,
}

impl FreshnessCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            cached: Mutex::new(None),
        }
    }

    /// The table-wide freshness, read again once the cached value is older than the TTL.
    /// The lock is not held during the read: when ClickHouse hangs, each request waits
    /// for its own query timeout, never for the others'.
    pub async fn get(&self, store: &Store) -> Result<TableFreshness, QueryError> {
        let cached = *self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, value)) = cached
            && at.elapsed() < self.ttl
        {
            ::metrics::counter!(m::FRESHNESS_CACHE_TOTAL, "outcome" => "hit").increment(1);
            return Ok(value);
        }
        ::metrics::counter!(m::FRESHNESS_CACHE_TOTAL, "outcome" => "miss").increment(1);
        let (activity, sessions) =
            tokio::try_join!(store.activity_freshness(), store.sessions_freshness())?;
        let present = |rows: u64, v: i64| (rows > 0).then_some(v);
        let value = TableFreshness {
            activity_written_ms: present(activity.rows, activity.written_ms),
            sessions_written_ms: present(sessions.rows, sessions.written_ms),
            final_window_end_ms: present(activity.final_rows, activity.final_end_ms),
            last_event_ms: present(activity.rows, activity.last_event_ms),
        };
        *self.cached.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), value));
        Ok(value)
    }
}

/// The four stages: ingest as seen by the store (the `writer-clickhouse` freshness rows:
/// latest event time and latest ingest time it wrote), the processor (its `user_activity`
/// output: latest `last_event_ms` and latest write), and each writer's own rows.
pub async fn stages(
    store: &Store,
    cache: &FreshnessCache,
    now_ms: i64,
) -> Result<Vec<StageFreshness>, QueryError> {
    let (rows, table) = tokio::try_join!(store.stages(), cache.get(store))?;
    let row = |name: &str| rows.iter().find(|r| r.stage == name);
    let stage = |stage: &'static str, event: Option<i64>, refresh: Option<i64>| StageFreshness {
        stage,
        last_event_time_ms: event,
        last_refresh_ms: refresh,
        lag_seconds: event.map(|t| seconds_between(t, now_ms)),
    };
    let writer_ch = row("writer-clickhouse");
    let writer_pq = row("writer-parquet");
    Ok(vec![
        stage(
            STAGES[0],
            writer_ch.map(|r| r.last_event_time_ms),
            writer_ch.map(|r| r.last_ingest_ms),
        ),
        stage(STAGES[1], table.last_event_ms, table.activity_written_ms),
        stage(
            STAGES[2],
            writer_ch.map(|r| r.last_event_time_ms),
            writer_ch.map(|r| r.written_at_ms),
        ),
        stage(
            STAGES[3],
            writer_pq.map(|r| r.last_event_time_ms),
            writer_pq.map(|r| r.written_at_ms),
        ),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answer_is_complete_only_up_to_the_latest_final_window() {
        let t = TableFreshness {
            activity_written_ms: Some(5_000),
            sessions_written_ms: Some(7_000),
            final_window_end_ms: Some(120_000),
            last_event_ms: Some(150_000),
        };
        let f = t.for_answer(120_000, 160_000, 60_000);
        assert_eq!(f.data_last_refreshed_at_ms, Some(7_000));
        assert_eq!(f.watermark_ms, Some(180_000));
        assert_eq!(f.lag_seconds, Some(10.0));
        assert!(f.complete);
        assert!(!t.for_answer(120_001, 160_000, 60_000).complete);
    }

    #[test]
    fn nothing_final_means_no_watermark_and_incomplete() {
        let f = TableFreshness::default().for_answer(1, 2, 60_000);
        assert_eq!(f, Freshness::default());
    }

    #[test]
    fn the_rules_versions_of_an_answer_are_distinct_and_sorted() {
        let a = vec!["b+1".to_owned(), String::new()];
        let b = vec!["a+2".to_owned(), "b+1".to_owned()];
        assert_eq!(rules_versions([&a, &b]), ["", "a+2", "b+1"]);
        assert!(rules_versions([]).is_empty());
    }
}
