//! Every SQL statement of the query API, and running them against ClickHouse: values are
//! bound with the `clickhouse` crate's `?` placeholders (never spliced into the text),
//! aggregates are read with the argMax pattern of crates/storage/clickhouse/README.md (the version
//! renamed `_v` in a subquery, so every window and session counts once, at its highest
//! version), each query runs in a `clickhouse.query` span carrying its SQL as
//! `db.statement`, is timed by name, and is cut off after the query timeout. ClickHouse
//! runs every query with `readonly=1` (the service cannot write or change settings in a
//! statement), `max_execution_time`, and the [`QueryLimits`] on memory and result rows;
//! a query over a limit is refused as [`QueryError::LimitExceeded`]. A store made
//! with [`Store::recording`] also keeps every statement it sends, values bound (how the
//! query benchmark sends exactly the API's SQL straight to ClickHouse).
//!
//! Turning these rows into answers is `query`'s job; this module only fetches.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use clickhouse::query::Query;
use pulse_platform::clickhouse::ClickHouseConfig;
use serde::Deserialize;
use tracing::Instrument;

use crate::error::QueryError;
use crate::metrics as m;

/// Latest version of every window in `[?, ?)` of `window_start_ms`, with `$cols` (argMax
/// expressions over `_v`) computed from the raw columns `$raw`, and `rv`: the rules
/// version of that latest version (migration 0004), which each statement collects with
/// `groupUniqArray(rv) AS rules_versions` over the windows it uses (the `freshness` of
/// the answer).
macro_rules! latest_windows {
    ($raw:literal, $cols:literal, $filter:literal) => {
        concat!(
            "(SELECT user_id, window_start_ms, ",
            $cols,
            ", argMax(rules_version, _v) AS rv FROM (SELECT user_id, window_start_ms, ",
            $raw,
            ", rules_version, version AS _v FROM user_activity WHERE ",
            $filter,
            ") GROUP BY user_id, window_start_ms)"
        )
    };
}

/// Active users per bucket. Binds: step, step, from, to.
const ACTIVE_USERS: &str = concat!(
    "SELECT toInt64(intDiv(window_start_ms, ?) * ?) AS bucket, toUInt64(uniqExact(user_id)) AS users, ",
    "groupUniqArray(rv) AS rules_versions FROM ",
    latest_windows!(
        "event_count",
        "argMax(event_count, _v) AS events",
        "window_start_ms >= ? AND window_start_ms < ?"
    ),
    " WHERE events > 0 GROUP BY bucket ORDER BY bucket"
);

/// Active users with a window starting at or after a time. Binds: since.
const ACTIVE_USERS_SINCE: &str = concat!(
    "SELECT toUInt64(uniqExact(user_id)) AS users, groupUniqArray(rv) AS rules_versions FROM ",
    latest_windows!(
        "event_count",
        "argMax(event_count, _v) AS events",
        "window_start_ms >= ?"
    ),
    " WHERE events > 0"
);

/// Revenue per bucket and currency, summed as whole units and remainders so that the
/// exact total can be checked for overflow. Binds: step, step, from, to, currency, currency.
const REVENUE: &str = concat!(
    "SELECT toInt64(intDiv(window_start_ms, ?) * ?) AS bucket, currency, ",
    "toInt64(sum(intDiv(micros, 1000000))) AS units, toInt64(sum(micros % 1000000)) AS rest, ",
    "groupUniqArray(rv) AS rules_versions FROM ",
    latest_windows!(
        "revenue_currencies, revenue_micros",
        "argMax(revenue_currencies, _v) AS currencies, argMax(revenue_micros, _v) AS amounts",
        "window_start_ms >= ? AND window_start_ms < ?"
    ),
    " ARRAY JOIN currencies AS currency, amounts AS micros",
    " WHERE ? = '' OR currency = ?",
    " GROUP BY bucket, currency ORDER BY bucket, currency"
);

/// Revenue per currency over windows starting at or after a time. Binds: since.
const REVENUE_SINCE: &str = concat!(
    "SELECT toInt64(0) AS bucket, currency, ",
    "toInt64(sum(intDiv(micros, 1000000))) AS units, toInt64(sum(micros % 1000000)) AS rest, ",
    "groupUniqArray(rv) AS rules_versions FROM ",
    latest_windows!(
        "revenue_currencies, revenue_micros",
        "argMax(revenue_currencies, _v) AS currencies, argMax(revenue_micros, _v) AS amounts",
        "window_start_ms >= ?"
    ),
    " ARRAY JOIN currencies AS currency, amounts AS micros",
    " GROUP BY currency ORDER BY currency"
);

/// Page views and distinct viewers per page. Binds: from, to, limit.
const TOP_PAGES: &str = concat!(
    "SELECT page, toUInt64(sum(n)) AS views, toUInt64(uniqExactIf(user_id, n > 0)) AS viewers, ",
    "groupUniqArray(rv) AS rules_versions FROM ",
    latest_windows!(
        "pages, page_views_by_page",
        "argMax(pages, _v) AS page_list, argMax(page_views_by_page, _v) AS view_list",
        "window_start_ms >= ? AND window_start_ms < ?"
    ),
    " ARRAY JOIN page_list AS page, view_list AS n",
    " GROUP BY page ORDER BY views DESC, page ASC LIMIT ?"
);

/// One user's windows in a range. Binds: user, from, to.
const USER: &str = "SELECT toUInt64(count()) AS windows, toInt64(min(first_ms)) AS first_seen, \
     toInt64(max(last_ms)) AS last_seen, toUInt64(sum(views)) AS page_views, \
     toUInt64(sum(events)) AS event_total, groupUniqArray(rv) AS rules_versions \
     FROM (SELECT window_start_ms, argMax(first_event_ms, _v) AS first_ms, \
     argMax(last_event_ms, _v) AS last_ms, argMax(page_views, _v) AS views, \
     argMax(event_count, _v) AS events, argMax(rules_version, _v) AS rv \
     FROM (SELECT window_start_ms, first_event_ms, last_event_ms, page_views, event_count, \
     rules_version, version AS _v FROM user_activity \
     WHERE user_id = ? AND window_start_ms >= ? AND window_start_ms < ?) \
     GROUP BY window_start_ms)";

/// Current sessions (latest version; not listed in another session's latest
/// `merged_session_ids`) starting in a range: count, totals, and the nearest-rank p50 and
/// p95 durations, computed in ClickHouse (the element at 1-based index ceil(q·n) of the
/// sorted durations, in integers: `intDiv(q·n + 99, 100)` for q in percent; 0 when none),
/// so one row comes back however many sessions there are.
/// `start_ms` never changes for a session id (the id is derived from it), so it can
/// filter the raw rows. A session may be superseded by one starting before the range,
/// so the merged ids are read from every session of the users concerned.
macro_rules! current_sessions {
    ($user_filter:literal) => {
        concat!(
            "SELECT n, total_ms, total_pages, ",
            "toInt64(durations[greatest(1, intDiv(50 * n + 99, 100))]) AS p50_ms, ",
            "toInt64(durations[greatest(1, intDiv(95 * n + 99, 100))]) AS p95_ms, rules_versions FROM (",
            "SELECT toUInt64(count()) AS n, toInt64(sum(dur)) AS total_ms, ",
            "toUInt64(sum(pages)) AS total_pages, arraySort(groupArray(dur)) AS durations, ",
            "groupUniqArray(rv) AS rules_versions FROM (",
            "SELECT user_id, session_id, argMax(duration_ms, _v) AS dur, argMax(page_count, _v) AS pages, ",
            "argMax(rules_version, _v) AS rv ",
            "FROM (SELECT user_id, session_id, duration_ms, page_count, rules_version, version AS _v FROM sessions ",
            "WHERE start_ms >= ? AND start_ms < ?",
            $user_filter,
            ") GROUP BY user_id, session_id) ",
            "WHERE (user_id, session_id) NOT IN (",
            "SELECT user_id, merged_id FROM (",
            "SELECT user_id, session_id, argMax(merged_session_ids, _v) AS merged ",
            "FROM (SELECT user_id, session_id, merged_session_ids, version AS _v FROM sessions ",
            "WHERE user_id IN (SELECT user_id FROM sessions WHERE start_ms >= ? AND start_ms < ?",
            $user_filter,
            ")) GROUP BY user_id, session_id) ",
            // ARRAY JOIN, not a lambda over session_id: 18.16 cannot resolve outer
            // columns inside arrayFilter here.
            "ARRAY JOIN merged AS merged_id WHERE merged_id != session_id))"
        )
    };
}

/// Binds: from, to, from, to.
const SESSIONS: &str = current_sessions!("");
/// Binds: from, to, user, from, to, user.
const USER_SESSIONS: &str = current_sessions!(" AND user_id = ?");

/// Table-wide freshness of `user_activity`. Plain maxima over raw rows: a duplicate or an
/// older version of a row cannot change a maximum of times that only grow with versions,
/// and a window with any final emission is final.
const ACTIVITY_FRESHNESS: &str = "SELECT toUInt64(count()) AS rows, \
     toUInt64(countIf(is_final = 1)) AS final_rows, toInt64(max(written_at_ms)) AS written, \
     toInt64(maxIf(window_end_ms, is_final = 1)) AS final_end, \
     toInt64(max(last_event_ms)) AS last_event FROM user_activity";

/// Table-wide freshness of `sessions` (latest write; see above).
const SESSIONS_FRESHNESS: &str =
    "SELECT toUInt64(count()) AS rows, toInt64(max(written_at_ms)) AS written FROM sessions";

/// Per stage, the latest row of each Kafka partition (argMax by `written_at_ms`), then the
/// maximum over partitions.
const STAGES: &str = "SELECT stage, toInt64(max(event_ms)) AS last_event_time, \
     toInt64(max(ingest_ms)) AS last_ingest, toInt64(max(written_ms)) AS written \
     FROM (SELECT stage, kafka_partition, argMax(last_event_time_ms, _v) AS event_ms, \
     argMax(last_ingest_ms, _v) AS ingest_ms, max(_v) AS written_ms \
     FROM (SELECT stage, kafka_partition, last_event_time_ms, last_ingest_ms, \
     written_at_ms AS _v FROM freshness) GROUP BY stage, kafka_partition) \
     GROUP BY stage ORDER BY stage";

/// Stored events whose producer trace id (`metadata.trace_id`, any form) is one value:
/// the keys come from the `events_by_source_trace` lookup (migration 0003, ordered by that
/// id), the rows from `events` by its key; each event once (`LIMIT 1 BY` its key, the
/// latest ingest first, as ReplacingMergeTree keeps it). Binds: id, from, to, from, to,
/// limit (the caller asks for one more than it answers, to know whether it cut).
const EVENTS_BY_SOURCE_TRACE: &str = "SELECT event_id, event_type, user_id, session_id, \
     event_time_ms, ingest_time_ms, trace_id, source_trace_id, source, schema_version, page, \
     currency, amount_micros, has_amount FROM events \
     WHERE (user_id, event_time_ms, event_id) IN (SELECT user_id, event_time_ms, event_id \
     FROM events_by_source_trace WHERE source_trace_id = ? \
     AND event_time_ms >= ? AND event_time_ms < ?) \
     AND event_time_ms >= ? AND event_time_ms < ? \
     ORDER BY event_time_ms, event_id, user_id, ingest_time_ms DESC \
     LIMIT 1 BY user_id, event_time_ms, event_id LIMIT ?";

#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct BucketUsers {
    pub bucket: i64,
    pub users: u64,
    /// The rules versions of the windows counted.
    pub rules_versions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct UsersRow {
    pub users: u64,
    /// The rules versions of the windows counted.
    pub rules_versions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct RevenueRow {
    pub bucket: i64,
    pub currency: String,
    /// Sum of whole units (truncated toward zero) of each amount.
    pub units: i64,
    /// Sum of the remainders (micros % 1e6) of each amount.
    pub rest: i64,
    /// The rules versions of the windows summed.
    pub rules_versions: Vec<String>,
}

impl RevenueRow {
    /// The exact total in micros, `None` when it does not fit an `i64`.
    pub fn micros(&self) -> Option<i64> {
        let total = i128::from(self.units) * 1_000_000 + i128::from(self.rest);
        i64::try_from(total).ok()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct PageRow {
    pub page: String,
    pub views: u64,
    pub viewers: u64,
    /// The rules versions of the windows counted.
    pub rules_versions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct UserRow {
    pub windows: u64,
    pub first_seen: i64,
    pub last_seen: i64,
    pub page_views: u64,
    pub events: u64,
    /// The rules versions of the windows summed.
    pub rules_versions: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct SessionsRow {
    pub count: u64,
    pub total_duration_ms: i64,
    pub total_pages: u64,
    /// Nearest-rank median duration (0 without sessions).
    pub p50_ms: i64,
    /// Nearest-rank 95th percentile duration (0 without sessions).
    pub p95_ms: i64,
    /// The rules versions of the sessions counted.
    pub rules_versions: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct ActivityFreshnessRow {
    pub rows: u64,
    pub final_rows: u64,
    pub written_ms: i64,
    pub final_end_ms: i64,
    pub last_event_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct SessionsFreshnessRow {
    pub rows: u64,
    pub written_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct StageRow {
    pub stage: String,
    pub last_event_time_ms: i64,
    pub last_ingest_ms: i64,
    pub written_at_ms: i64,
}

/// One stored event found by its producer trace id.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Deserialize)]
pub struct EventRow {
    pub event_id: String,
    pub event_type: String,
    pub user_id: String,
    pub session_id: String,
    pub event_time_ms: i64,
    pub ingest_time_ms: i64,
    /// The record's W3C trace id, or the producer's id when the record had none.
    pub trace_id: String,
    pub source_trace_id: String,
    pub source: String,
    pub schema_version: u32,
    pub page: String,
    pub currency: String,
    pub amount_micros: i64,
    pub has_amount: u8,
}

/// A statement as the store sent it: its name (the `query` label of its timing) and its
/// SQL with every value bound, byte for byte the body of the request to ClickHouse.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Statement {
    pub name: &'static str,
    pub sql: String,
}

/// Where a recording store appends the statements it sends, in the order they were sent.
pub type StatementLog = Arc<Mutex<Vec<Statement>>>;

/// The limits ClickHouse enforces on each query besides its running time (0 = none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueryLimits {
    /// `max_memory_usage`, bytes.
    pub max_memory_bytes: u64,
    /// `max_result_rows` (with `result_overflow_mode=throw`).
    pub max_result_rows: u64,
}

/// ClickHouse's error codes for a query over a limit: MEMORY_LIMIT_EXCEEDED, and
/// TOO_MANY_ROWS / TOO_MANY_ROWS_OR_BYTES (the code of `max_result_rows` since 18.x).
const MEMORY_LIMIT_EXCEEDED: u32 = 241;
const TOO_MANY_ROWS: [u32; 2] = [158, 396];
/// TIMEOUT_EXCEEDED (`max_execution_time`).
const TIMEOUT_EXCEEDED: u32 = 159;

/// The ClickHouse error code in an error's text (`Code: 241, e.displayText() = …`).
fn server_code(text: &str) -> Option<u32> {
    let rest = &text[text.find("Code: ")? + "Code: ".len()..];
    let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
    rest.get(..digits)?.parse().ok()
}

/// The ClickHouse side of the query API.
#[derive(Clone)]
pub struct Store {
    client: clickhouse::Client,
    timeout: Duration,
    limits: QueryLimits,
    /// Set by [`Store::recording`].
    log: Option<StatementLog>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("timeout", &self.timeout)
            .field("limits", &self.limits)
            .field("recording", &self.log.is_some())
            .finish_non_exhaustive()
    }
}

/// Maps a client error: transport failures are `Unavailable` (a retry can help), server
/// timeouts (code 159) `Timeout`, a memory or result-rows limit `LimitExceeded`,
/// everything else `Internal`.
fn classify(e: clickhouse::error::Error, timeout: Duration, limits: QueryLimits) -> QueryError {
    if let clickhouse::error::Error::Network(_) = e {
        return QueryError::Unavailable(e);
    }
    if let clickhouse::error::Error::TimedOut = e {
        return QueryError::Timeout(timeout);
    }
    match server_code(&e.to_string()) {
        Some(TIMEOUT_EXCEEDED) => QueryError::Timeout(timeout),
        Some(MEMORY_LIMIT_EXCEEDED) => QueryError::LimitExceeded {
            setting: "max_memory_usage",
            flag: "--query-max-memory-bytes",
            limit: limits.max_memory_bytes,
        },
        Some(code) if TOO_MANY_ROWS.contains(&code) => QueryError::LimitExceeded {
            setting: "max_result_rows",
            flag: "--query-max-result-rows",
            limit: limits.max_result_rows,
        },
        _ => QueryError::ClickHouse(e),
    }
}

impl Store {
    /// A store on `cfg`'s database, read-only (`readonly=1`); ClickHouse also stops
    /// queries at the timeout (`max_execution_time`, whole seconds, at least 1).
    pub fn new(cfg: &ClickHouseConfig, timeout: Duration) -> Self {
        let secs = timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0);
        let client = cfg
            .client()
            .with_setting("readonly", "1")
            .with_setting("max_execution_time", secs.max(1).to_string());
        Self {
            client,
            timeout,
            limits: QueryLimits::default(),
            log: None,
        }
    }

    /// This store, with ClickHouse enforcing `limits` on every query (a 0 leaves that
    /// limit to the server's profile).
    pub fn with_limits(self, limits: QueryLimits) -> Self {
        let mut client = self.client;
        if limits.max_memory_bytes > 0 {
            client = client.with_setting("max_memory_usage", limits.max_memory_bytes.to_string());
        }
        if limits.max_result_rows > 0 {
            client = client
                .with_setting("max_result_rows", limits.max_result_rows.to_string())
                .with_setting("result_overflow_mode", "throw");
        }
        Self {
            client,
            limits,
            ..self
        }
    }

    /// The ClickHouse client with the settings every query of this store runs with
    /// (`readonly=1`, the timeout and the limits): for tests that check what the service's
    /// access can and cannot do.
    #[doc(hidden)]
    pub fn client(&self) -> &clickhouse::Client {
        &self.client
    }

    /// This store, also appending every statement it sends to `log` (for benchmarks; the
    /// service never records).
    pub fn recording(self, log: StatementLog) -> Self {
        Self {
            log: Some(log),
            ..self
        }
    }

    /// Runs `query` (built from `sql`), timing it as `name` in a span with its SQL.
    async fn fetch<T>(
        &self,
        name: &'static str,
        sql: &'static str,
        query: Query,
    ) -> Result<Vec<T>, QueryError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        if let Some(log) = &self.log {
            let sql = query.sql_display().to_string();
            log.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(Statement { name, sql });
        }
        let span = tracing::info_span!(
            "clickhouse.query",
            otel.kind = "client",
            db.system = "clickhouse",
            db.operation = name,
            db.statement = sql,
        );
        let started = Instant::now();
        let result = tokio::time::timeout(
            self.timeout,
            query.fetch_all::<T>().instrument(span.clone()),
        )
        .await;
        ::metrics::histogram!(m::CLICKHOUSE_QUERY_SECONDS, "query" => name)
            .record(started.elapsed().as_secs_f64());
        let result = match result {
            Err(_) => Err(QueryError::Timeout(self.timeout)),
            Ok(r) => r.map_err(|e| classify(e, self.timeout, self.limits)),
        };
        if let Err(e) = &result {
            span.in_scope(|| tracing::debug!(query = name, error = %e, "clickhouse query failed"));
        }
        result
    }

    async fn fetch_one<T>(
        &self,
        name: &'static str,
        sql: &'static str,
        query: Query,
    ) -> Result<T, QueryError>
    where
        T: clickhouse::RowOwned + clickhouse::RowRead,
    {
        self.fetch::<T>(name, sql, query)
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| QueryError::Internal(format!("{name}: no row returned")))
    }

    pub async fn active_users(
        &self,
        step_ms: i64,
        from: i64,
        to: i64,
    ) -> Result<Vec<BucketUsers>, QueryError> {
        let q = self
            .client
            .query(ACTIVE_USERS)
            .bind(step_ms)
            .bind(step_ms)
            .bind(from)
            .bind(to);
        self.fetch("active_users", ACTIVE_USERS, q).await
    }

    pub async fn active_users_since(&self, since: i64) -> Result<UsersRow, QueryError> {
        let q = self.client.query(ACTIVE_USERS_SINCE).bind(since);
        self.fetch_one("active_users_current", ACTIVE_USERS_SINCE, q)
            .await
    }

    pub async fn revenue(
        &self,
        step_ms: i64,
        from: i64,
        to: i64,
        currency: Option<&str>,
    ) -> Result<Vec<RevenueRow>, QueryError> {
        let c = currency.unwrap_or("");
        let q = self
            .client
            .query(REVENUE)
            .bind(step_ms)
            .bind(step_ms)
            .bind(from)
            .bind(to)
            .bind(c)
            .bind(c);
        self.fetch("revenue", REVENUE, q).await
    }

    pub async fn revenue_since(&self, since: i64) -> Result<Vec<RevenueRow>, QueryError> {
        let q = self.client.query(REVENUE_SINCE).bind(since);
        self.fetch("revenue_last_hour", REVENUE_SINCE, q).await
    }

    pub async fn top_pages(
        &self,
        from: i64,
        to: i64,
        limit: u32,
    ) -> Result<Vec<PageRow>, QueryError> {
        let q = self.client.query(TOP_PAGES).bind(from).bind(to).bind(limit);
        self.fetch("top_pages", TOP_PAGES, q).await
    }

    pub async fn user(&self, user_id: &str, from: i64, to: i64) -> Result<UserRow, QueryError> {
        let q = self.client.query(USER).bind(user_id).bind(from).bind(to);
        self.fetch_one("user", USER, q).await
    }

    pub async fn sessions(
        &self,
        from: i64,
        to: i64,
        user_id: Option<&str>,
    ) -> Result<SessionsRow, QueryError> {
        match user_id {
            None => {
                let q = self
                    .client
                    .query(SESSIONS)
                    .bind(from)
                    .bind(to)
                    .bind(from)
                    .bind(to);
                self.fetch_one("sessions", SESSIONS, q).await
            }
            Some(u) => {
                let q = self
                    .client
                    .query(USER_SESSIONS)
                    .bind(from)
                    .bind(to)
                    .bind(u)
                    .bind(from)
                    .bind(to)
                    .bind(u);
                self.fetch_one("user_sessions", USER_SESSIONS, q).await
            }
        }
    }

    /// Up to `limit` events with producer trace id `source_trace_id` and an event time in
    /// `[from, to)`, by event time.
    pub async fn events_by_source_trace(
        &self,
        source_trace_id: &str,
        from: i64,
        to: i64,
        limit: u32,
    ) -> Result<Vec<EventRow>, QueryError> {
        let q = self
            .client
            .query(EVENTS_BY_SOURCE_TRACE)
            .bind(source_trace_id)
            .bind(from)
            .bind(to)
            .bind(from)
            .bind(to)
            .bind(limit);
        self.fetch("events_by_source_trace", EVENTS_BY_SOURCE_TRACE, q)
            .await
    }

    pub async fn activity_freshness(&self) -> Result<ActivityFreshnessRow, QueryError> {
        let q = self.client.query(ACTIVITY_FRESHNESS);
        self.fetch_one("activity_freshness", ACTIVITY_FRESHNESS, q)
            .await
    }

    pub async fn sessions_freshness(&self) -> Result<SessionsFreshnessRow, QueryError> {
        let q = self.client.query(SESSIONS_FRESHNESS);
        self.fetch_one("sessions_freshness", SESSIONS_FRESHNESS, q)
            .await
    }

    pub async fn stages(&self) -> Result<Vec<StageRow>, QueryError> {
        let q = self.client.query(STAGES);
        self.fetch("stages", STAGES, q).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_statement_has_as_many_placeholders_as_binds() {
        let count = |sql: &str| sql.matches('?').count();
        assert_eq!(count(ACTIVE_USERS), 4);
        assert_eq!(count(ACTIVE_USERS_SINCE), 1);
        assert_eq!(count(REVENUE), 6);
        assert_eq!(count(REVENUE_SINCE), 1);
        assert_eq!(count(TOP_PAGES), 3);
        assert_eq!(count(USER), 3);
        assert_eq!(count(SESSIONS), 4);
        assert_eq!(count(USER_SESSIONS), 6);
        assert_eq!(count(EVENTS_BY_SOURCE_TRACE), 6);
        assert_eq!(
            count(STAGES) + count(ACTIVITY_FRESHNESS) + count(SESSIONS_FRESHNESS),
            0
        );
    }

    #[tokio::test]
    async fn a_recording_store_keeps_each_statement_with_its_values_bound() {
        let cfg = ClickHouseConfig {
            // Nothing listens on port 1: the query fails, after it was recorded.
            url: "http://127.0.0.1:1".into(),
            ..ClickHouseConfig::default()
        };
        let log = StatementLog::default();
        let store = Store::new(&cfg, Duration::from_secs(5)).recording(log.clone());
        assert!(store.top_pages(1_000, 2_000, 7).await.is_err());
        let sent = log.lock().unwrap().clone();
        let expected = TOP_PAGES
            .replacen('?', "1000", 1)
            .replacen('?', "2000", 1)
            .replacen('?', "7", 1);
        assert_eq!(
            sent,
            [Statement {
                name: "top_pages",
                sql: expected
            }]
        );
        assert!(Store::new(&cfg, Duration::from_secs(5)).log.is_none());
    }

    #[test]
    fn clickhouse_error_codes_are_read_from_the_error_text() {
        assert_eq!(
            server_code("bad response: Code: 396, e.displayText() = DB::Exception: Limit"),
            Some(396)
        );
        assert_eq!(
            server_code("Code: 241. DB::Exception: Memory limit"),
            Some(241)
        );
        assert_eq!(server_code("no code here"), None);
        assert_eq!(server_code("Code: x"), None);
    }

    #[test]
    fn limit_errors_name_the_setting_and_the_flag() {
        let limits = QueryLimits {
            max_memory_bytes: 1000,
            max_result_rows: 7,
        };
        let t = Duration::from_secs(1);
        let bad = |text: &str| clickhouse::error::Error::BadResponse(text.into());
        let e = classify(
            bad("Code: 396, e.displayText() = DB::Exception: Limit for result exceeded"),
            t,
            limits,
        );
        assert!(
            matches!(
                e,
                QueryError::LimitExceeded {
                    setting: "max_result_rows",
                    limit: 7,
                    ..
                }
            ),
            "{e}"
        );
        let e = classify(
            bad("Code: 241, e.displayText() = DB::Exception: Memory limit"),
            t,
            limits,
        );
        assert!(e.to_string().contains("--query-max-memory-bytes"), "{e}");
        let e = classify(bad("Code: 159, e.displayText() = timeout"), t, limits);
        assert!(matches!(e, QueryError::Timeout(_)), "{e}");
        let e = classify(
            bad("Code: 47, e.displayText() = unknown identifier"),
            t,
            limits,
        );
        assert!(matches!(e, QueryError::ClickHouse(_)), "{e}");
    }

    #[test]
    fn revenue_totals_are_exact_and_overflow_is_detected() {
        let row = |units, rest| RevenueRow {
            bucket: 0,
            currency: "EUR".into(),
            units,
            rest,
            rules_versions: Vec::new(),
        };
        assert_eq!(row(12, 340_000).micros(), Some(12_340_000));
        // -2.5 + 1.25 = -1.25: units -2 + 1, remainders -500000 + 250000.
        assert_eq!(row(-1, -250_000).micros(), Some(-1_250_000));
        assert_eq!(row(i64::MAX / 1_000_000 + 1, 0).micros(), None);
    }
}
