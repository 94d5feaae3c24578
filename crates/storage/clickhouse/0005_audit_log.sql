-- Pulse hot store, migration 0005: the audit trail.
--
-- One row per record of the audit topic (`pulse.audit.v1`, `pulse_platform::audit`):
-- every administrative change (schema register/delete/config, refused attempts, key and
-- credential file reloads, DLQ redrive, replay, migrations) with who, what, when and the
-- outcome. Written by the ClickHouse writer (`crates/writer/src/audit.rs`), listed by
-- `pulsectl audit --source clickhouse`.
--
-- Append-only: a plain MergeTree, never replaced, collapsed or trimmed by the writer
-- (no retention drops this table; the topic keeps a year). Exactly once on re-delivery:
-- the writer reads `max(kafka_offset)` of the partition before every insert and skips
-- records at or below it, so a batch re-read after a crash between the insert and the
-- offset commit is not written twice. That works because one insert here is one part
-- (no PARTITION BY, batches far below `max_insert_block_size`): an insert lands whole or
-- not at all, and offsets of one partition are written in order. Readers may also add
-- `LIMIT 1 BY kafka_topic, kafka_partition, kafka_offset` (as `pulsectl audit` does).
--
-- Columns: `ts_ms` when the change ended (epoch ms), `id` the record's id, `service` who
-- recorded it, `actor` who made it (registry user, API key or token name, `file`, the
-- operator, `anonymous`), `action` and `target`, `outcome` (ok / refused / failed),
-- `status` (HTTP status, 0 when none), `source` (the caller's address, '' when unknown),
-- `detail`, `trace_id` (W3C trace id of the request, '' when none), the Kafka position
-- of the record, `written_at_ms` (when the writer inserted it).
CREATE TABLE IF NOT EXISTS {database}.audit_log
(
    ts_ms Int64,
    id String,
    service String,
    actor String,
    action String,
    target String,
    outcome String,
    status UInt16,
    source String,
    detail String,
    trace_id String,
    kafka_topic String,
    kafka_partition Int32,
    kafka_offset Int64,
    written_at_ms Int64
)
ENGINE = MergeTree
ORDER BY (ts_ms, id);
