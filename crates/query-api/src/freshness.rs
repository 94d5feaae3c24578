//! Data freshness: the table-wide part (latest write, latest final window, latest event),
//! cached for `--freshness-cache-ms` so a burst of requests costs one pair of scans (and,
//! once it is older, served while one background read replaces it); the
//! `freshness` object of every answer derived from it; and the per-stage view of
//! `GET /v1/freshness`. SQL lives in `store`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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

/// The cached table-wide freshness. Once the value is older than the TTL, a request still
/// gets it (up to twice the TTL old) while one background read replaces it: the freshness
/// scans (a pass over `user_activity` and `sessions`, slower as they grow) never add to a
/// request's time as long as requests keep coming. Older than twice the TTL (or never
/// read), a request reads it itself.
#[derive(Debug)]
pub struct FreshnessCache {
    ttl: Duration,
    cached: Arc<Mutex<Option<(Instant, TableFreshness)>>>,
    /// A background read is under way (at most one).
    refreshing: Arc<AtomicBool>,
}

impl FreshnessCache {
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            cached: Arc::new(Mutex::new(None)),
            refreshing: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The table-wide freshness: the cached value while younger than the TTL; up to twice
    /// the TTL old, the cached value while one background read replaces it; else read now.
    /// The lock is not held during a read: when ClickHouse hangs, each request waits for
    /// its own query timeout, never for the others'.
    pub async fn get(&self, store: &Store) -> Result<TableFreshness, QueryError> {
        let cached = *self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, value)) = cached {
            let age = at.elapsed();
            if age < self.ttl {
                ::metrics::counter!(m::FRESHNESS_CACHE_TOTAL, "outcome" => "hit").increment(1);
                return Ok(value);
            }
            if age < self.ttl.saturating_mul(2) {
                ::metrics::counter!(m::FRESHNESS_CACHE_TOTAL, "outcome" => "stale").increment(1);
                self.refresh_in_background(store);
                return Ok(value);
            }
        }
        ::metrics::counter!(m::FRESHNESS_CACHE_TOTAL, "outcome" => "miss").increment(1);
        read_into(store, &self.cached).await
    }

    /// Starts one background read unless one is under way (a failure is logged; the next
    /// request past the TTL tries again).
    fn refresh_in_background(&self, store: &Store) {
        if self.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        let (store, cached, refreshing) =
            (store.clone(), self.cached.clone(), self.refreshing.clone());
        tokio::spawn(async move {
            if let Err(e) = read_into(&store, &cached).await {
                tracing::warn!(error = %e, "reading the table-wide freshness failed; the cached value is served until it is twice the cache TTL old");
            }
            refreshing.store(false, Ordering::Release);
        });
    }
}

/// Reads the table-wide freshness and caches it.
async fn read_into(
    store: &Store,
    cached: &Mutex<Option<(Instant, TableFreshness)>>,
) -> Result<TableFreshness, QueryError> {
    let (activity, sessions) =
        tokio::try_join!(store.activity_freshness(), store.sessions_freshness())?;
    let present = |rows: u64, v: i64| (rows > 0).then_some(v);
    let value = TableFreshness {
        activity_written_ms: present(activity.rows, activity.written_ms),
        sessions_written_ms: present(sessions.rows, sessions.written_ms),
        final_window_end_ms: present(activity.final_rows, activity.final_end_ms),
        last_event_ms: present(activity.rows, activity.last_event_ms),
    };
    *cached.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), value));
    Ok(value)
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

    fn unreachable_store() -> Store {
        let cfg = pulse_platform::clickhouse::ClickHouseConfig {
            // Nothing listens on port 1: every read fails at once.
            url: "http://127.0.0.1:1".into(),
            ..Default::default()
        };
        Store::new(&cfg, Duration::from_secs(5))
    }

    fn cached_at(ttl: Duration, age: Duration, value: TableFreshness) -> FreshnessCache {
        let cache = FreshnessCache::new(ttl);
        let at = Instant::now()
            .checked_sub(age)
            .expect("the clock is past `age`");
        *cache.cached.lock().unwrap() = Some((at, value));
        cache
    }

    #[tokio::test]
    async fn a_value_past_the_ttl_is_served_while_it_is_read_again_in_the_background() {
        let value = TableFreshness {
            activity_written_ms: Some(42),
            ..TableFreshness::default()
        };
        let store = unreachable_store();
        let ttl = Duration::from_secs(10);
        // Younger than the TTL: served.
        let fresh = cached_at(ttl, Duration::from_secs(1), value);
        assert_eq!(fresh.get(&store).await.unwrap(), value);
        assert!(!fresh.refreshing.load(Ordering::Acquire));
        // Past the TTL, under twice it: served without waiting for the read (which fails
        // here), and one background read started.
        let stale = cached_at(ttl, Duration::from_secs(15), value);
        assert_eq!(stale.get(&store).await.unwrap(), value);
        // The failed background read clears its flag and leaves the value in place.
        for _ in 0..500 {
            if !stale.refreshing.load(Ordering::Acquire) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(!stale.refreshing.load(Ordering::Acquire));
        assert_eq!(stale.get(&store).await.unwrap(), value);
        // Twice the TTL old: the request reads itself (and fails with the store).
        let old = cached_at(ttl, Duration::from_secs(25), value);
        assert!(old.get(&store).await.is_err());
        // TTL 0: read for every request.
        let none = cached_at(Duration::ZERO, Duration::ZERO, value);
        assert!(none.get(&store).await.is_err());
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
