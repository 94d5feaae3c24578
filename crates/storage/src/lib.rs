//! The storage contract of Pulse: what the writer stores and what the query API,
//! `pulsectl` and the tests read back. `migrate` owns the ClickHouse schema (the SQL in
//! `crates/storage/clickhouse/`) and day-partition retention, `rows` the hot store's row
//! types field for field, `archive` the Parquet-on-S3 layout (Hive folders, object names,
//! the Arrow schema), `ledger` what the event ledger reads back. Writing, batching and
//! retrying are the writer's; queries are the query API's. This crate depends only on
//! `contracts` and `platform`, so no service crate has to depend on another to agree on a
//! table or a file.

pub mod archive;
pub mod ledger;
pub mod migrate;
pub mod rows;
