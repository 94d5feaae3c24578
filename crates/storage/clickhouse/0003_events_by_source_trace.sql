-- Pulse hot store, migration 0003: find events by the producer's trace id.
--
-- ClickHouse 18.16 has no data-skipping (bloom filter) indexes, so the lookup is a
-- table ordered by `source_trace_id`, filled by a materialized view on every insert into
-- `events` (rows with an empty id are skipped). It holds the key of `events`, so a search
-- reads few granules of both tables:
--
--   SELECT * FROM {database}.events FINAL
--   WHERE (user_id, event_time_ms, event_id) IN
--     (SELECT user_id, event_time_ms, event_id
--      FROM {database}.events_by_source_trace WHERE source_trace_id = 'abcd-1234');
--
-- Retried inserts collapse like `events` (same key). Day partitions follow `events` and
-- are trimmed by the same retention. Rows written before migration 0002 have no producer
-- trace id and are not in the lookup.
CREATE TABLE IF NOT EXISTS {database}.events_by_source_trace
(
    source_trace_id String,
    user_id String,
    event_time_ms Int64,
    event_id String,
    ingest_time_ms Int64,
    event_date Date
)
ENGINE = ReplacingMergeTree(ingest_time_ms)
PARTITION BY toYYYYMMDD(event_date)
ORDER BY (source_trace_id, user_id, event_time_ms, event_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS {database}.events_by_source_trace_mv
TO {database}.events_by_source_trace
AS SELECT source_trace_id, user_id, event_time_ms, event_id, ingest_time_ms, event_date
FROM {database}.events
WHERE source_trace_id != '';
