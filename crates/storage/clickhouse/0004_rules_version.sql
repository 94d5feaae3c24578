-- Pulse hot store, migration 0004: the processing rules version on every aggregate row.
--
-- The processor stamps each window and session it emits with the version of the rules
-- that produced it (`rules_version`: "<name>+<fingerprint>" or "<fingerprint>"; see
-- docs/operations.md, "Processing rules and their version"); the writer keeps it per
-- row, and the query API reports the versions of the rows an answer used in its
-- `freshness`. Rows written before this migration hold ''. It is not part of any key: a
-- re-emission under other rules replaces the row of the same window or session like any
-- newer version.
--
-- Two tables, one statement each: ClickHouse 18.16 has no `ADD COLUMN IF NOT EXISTS`, so
-- the migration runner treats "column already exists" on an `ADD COLUMN` as done, which
-- keeps this migration re-runnable when it was interrupted after the first statement.
ALTER TABLE {database}.user_activity ADD COLUMN rules_version String DEFAULT '';
ALTER TABLE {database}.sessions ADD COLUMN rules_version String DEFAULT '';
