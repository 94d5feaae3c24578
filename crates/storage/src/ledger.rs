//! What the event ledger (`pulsectl ledger`) reads back from the hot store for a closed
//! event-time range: the distinct event ids of `events`, the event count of the latest
//! version of every user's `user_activity` window, and the processor's progress (the
//! latest final window end). Reconciling them with the topics and the archive is the
//! ledger's; the statements here only fetch, with bound values, valid on ClickHouse 18.16.

use clickhouse::Client;

/// Distinct event ids with an event time in `[?, ?)`, with that time and how many rows
/// each has (rows not merged yet by the ReplacingMergeTree count more than once). The day
/// column bounds the parts read (partition pruning). Binds: from, last, from, to (`last`
/// is the range's last millisecond).
const EVENT_IDS: &str = "SELECT event_id, toInt64(any(event_time_ms)) AS time_ms, \
     toUInt64(count()) AS rows FROM events \
     WHERE event_date >= toDate(toDateTime(intDiv(?, 1000))) \
     AND event_date <= toDate(toDateTime(intDiv(?, 1000))) \
     AND event_time_ms >= ? AND event_time_ms < ? GROUP BY event_id";

/// The latest version of every user's window starting in `[?, ?)`: its event count and
/// whether it is final. Binds: from, last, from, to.
const USER_WINDOWS: &str = "SELECT user_id, window_start_ms, argMax(event_count, _v) AS events, \
     argMax(is_final, _v) AS is_final FROM (SELECT user_id, window_start_ms, event_count, \
     is_final, version AS _v FROM user_activity \
     WHERE window_date >= toDate(toDateTime(intDiv(?, 1000))) \
     AND window_date <= toDate(toDateTime(intDiv(?, 1000))) \
     AND window_start_ms >= ? AND window_start_ms < ?) GROUP BY user_id, window_start_ms";

/// The latest end of a final window starting at or after `?` (0 when there is none):
/// every window ending at or before it is closed by the processor's watermark. The day
/// column bounds the parts read. Binds: since, since.
const FINAL_WINDOW_END: &str = "SELECT toInt64(max(window_end_ms)) AS end_ms FROM user_activity \
     WHERE window_date >= toDate(toDateTime(intDiv(?, 1000))) AND window_start_ms >= ? \
     AND is_final = 1";

/// One distinct event id of `events`.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Deserialize)]
pub struct StoredId {
    pub event_id: String,
    /// Its event time, epoch ms (named apart from the column: ClickHouse 18.16 would
    /// read an alias of the column's own name in the WHERE clause).
    pub time_ms: i64,
    /// Physical rows (1 once merged; more before a merge, never a mismatch).
    pub rows: u64,
}

/// The latest version of one user's window.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, serde::Deserialize)]
pub struct UserWindow {
    pub user_id: String,
    pub window_start_ms: i64,
    /// `event_count` of the latest version.
    pub events: u64,
    pub is_final: u8,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct EndRow {
    end_ms: i64,
}

/// Why the hot store could not be read.
#[derive(Debug, thiserror::Error)]
#[error("clickhouse: {what}: {source}")]
pub struct LedgerQueryError {
    pub what: &'static str,
    #[source]
    pub source: clickhouse::error::Error,
}

fn failed(what: &'static str) -> impl FnOnce(clickhouse::error::Error) -> LedgerQueryError {
    move |source| LedgerQueryError { what, source }
}

/// The distinct event ids of `events` with an event time in `[from_ms, to_ms)`.
pub async fn event_ids(
    client: &Client,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<StoredId>, LedgerQueryError> {
    client
        .query(EVENT_IDS)
        .bind(from_ms)
        .bind(to_ms.saturating_sub(1))
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all()
        .await
        .map_err(failed("reading event ids of events"))
}

/// The latest version of every user's window starting in `[from_ms, to_ms)`.
pub async fn user_windows(
    client: &Client,
    from_ms: i64,
    to_ms: i64,
) -> Result<Vec<UserWindow>, LedgerQueryError> {
    client
        .query(USER_WINDOWS)
        .bind(from_ms)
        .bind(to_ms.saturating_sub(1))
        .bind(from_ms)
        .bind(to_ms)
        .fetch_all()
        .await
        .map_err(failed("reading the windows of user_activity"))
}

/// The latest end of a final window starting at or after `since_ms` (only the days from
/// `since_ms` on are read), `None` when there is none.
pub async fn final_window_end(
    client: &Client,
    since_ms: i64,
) -> Result<Option<i64>, LedgerQueryError> {
    let rows: Vec<EndRow> = client
        .query(FINAL_WINDOW_END)
        .bind(since_ms.max(0))
        .bind(since_ms)
        .fetch_all()
        .await
        .map_err(failed("reading the latest final window of user_activity"))?;
    Ok(rows.first().map(|r| r.end_ms).filter(|e| *e > 0))
}
