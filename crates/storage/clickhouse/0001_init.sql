-- Pulse hot store, migration 0001: the initial schema.
--
-- Applied by pulse-writer (crates/writer/src/migrate.rs), statement by statement;
-- `{database}` is replaced with the configured database (default `pulse`).
-- Every statement is valid on Debian's ClickHouse 18.16 and on current releases:
-- no DateTime64, TTL, LowCardinality, Map or Nullable; times are Int64 epoch
-- milliseconds (UTC); a Date column drives day partitioning. Statements are
-- re-runnable (IF NOT EXISTS) so a half-applied migration can simply be retried.
-- See README.md in this directory for the read patterns.

-- Every accepted event. Duplicates (retried batches, redelivery) carry the same
-- ordering key and collapse; read with FINAL or GROUP BY the key.
CREATE TABLE IF NOT EXISTS {database}.events
(
    event_id String,
    schema_version UInt32,
    event_type String,
    user_id String,
    session_id String,
    page String,
    referrer String,
    currency String,
    amount_micros Int64,
    has_amount UInt8,
    property_keys Array(String),
    property_values Array(String),
    event_time_ms Int64,
    ingest_time_ms Int64,
    trace_id String,
    source String,
    ingest_source String,
    kafka_partition Int32,
    kafka_offset Int64,
    written_at_ms Int64,
    event_date Date
)
ENGINE = ReplacingMergeTree(ingest_time_ms)
PARTITION BY toYYYYMMDD(event_date)
ORDER BY (user_id, event_time_ms, event_id);

-- Per-user tumbling-window activity; early and final emissions of one window
-- replace each other, the highest version wins.
CREATE TABLE IF NOT EXISTS {database}.user_activity
(
    user_id String,
    window_start_ms Int64,
    window_end_ms Int64,
    page_views UInt64,
    pages Array(String),
    page_views_by_page Array(UInt64),
    types Array(String),
    events_by_type Array(UInt64),
    revenue_currencies Array(String),
    revenue_micros Array(Int64),
    event_count UInt64,
    first_event_ms Int64,
    last_event_ms Int64,
    version UInt64,
    is_final UInt8,
    last_ingest_ms Int64,
    written_at_ms Int64,
    window_date Date
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMMDD(window_date)
ORDER BY (user_id, window_start_ms);

-- Gap-based sessions; the highest version of a session wins.
CREATE TABLE IF NOT EXISTS {database}.sessions
(
    session_id String,
    user_id String,
    start_ms Int64,
    end_ms Int64,
    duration_ms Int64,
    page_count UInt64,
    event_count UInt64,
    version UInt64,
    is_final UInt8,
    last_ingest_ms Int64,
    merged_session_ids Array(String),
    written_at_ms Int64,
    start_date Date
)
ENGINE = ReplacingMergeTree(version)
PARTITION BY toYYYYMMDD(start_date)
ORDER BY (user_id, session_id);

-- Freshness per pipeline stage and Kafka partition; the latest write wins.
CREATE TABLE IF NOT EXISTS {database}.freshness
(
    stage String,
    kafka_partition Int32,
    last_event_time_ms Int64,
    last_ingest_ms Int64,
    written_at_ms Int64
)
ENGINE = ReplacingMergeTree(written_at_ms)
ORDER BY (stage, kafka_partition);

-- Applied migrations (also created by the migrator before it reads it).
CREATE TABLE IF NOT EXISTS {database}.schema_migrations
(
    version UInt32,
    name String,
    applied_at_ms Int64
)
ENGINE = MergeTree
ORDER BY version;
