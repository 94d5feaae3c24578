//! The integration tests of Pulse, in one test binary (`cargo test -p pulse-tests --test it`):
//! one module per component or scenario, against the real broker, ClickHouse and S3 that
//! `scripts/test.sh` starts, plus the end-to-end test. What the modules share is in
//! [`support`]; the backing services' addresses and unique names are in the `pulse_tests`
//! library (`tests/src/lib.rs`).

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

mod support;

mod audit;
mod clickhouse_schema;
mod clickhouse_server;
mod clickhouse_tls;
mod dlq;
mod e2e;
mod ingest;
mod ingest_fuzz;
mod ingest_stream;
mod kafka_broker;
mod kafka_sasl;
mod kafka_tls;
mod ledger;
mod pii;
mod processor;
mod processor_max_session;
mod processor_recovery;
mod pulsectl;
mod pulsectl_replay;
mod query_api;
mod query_api_readonly;
mod query_api_tokens;
mod rollback;
mod rules_version;
mod s3_server;
mod s3_sse;
mod schema_registry;
mod schema_registry_tls;
mod server_limits;
mod server_tls;
mod shadow;
mod topic_durability;
mod topic_reader;
mod writer_blocking;
mod writer_clickhouse;
mod writer_parquet;
mod writer_recovery;
mod writer_startup;
