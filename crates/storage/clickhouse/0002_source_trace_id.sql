-- Pulse hot store, migration 0002: the producer's own trace id on every event.
--
-- `metadata.trace_id` is whatever the producer sent (any form, e.g. "abcd-1234"); the
-- `trace_id` column keeps the record's W3C trace id when there is one, so the producer's
-- id was lost for those rows. `source_trace_id` always holds the producer's id ('' when it
-- sent none, and on rows written before this migration).
--
-- One statement alone: ClickHouse 18.16 has no `ADD COLUMN IF NOT EXISTS`, and a
-- migration is recorded only after all its statements succeeded.
ALTER TABLE {database}.events ADD COLUMN source_trace_id String DEFAULT '';
