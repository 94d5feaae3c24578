//! What every Pulse service shares: typed config pieces and their validation, telemetry
//! (JSON logs with trace ids, OTLP export), the Prometheus exporter and admin server,
//! graceful shutdown, and the Kafka producer/consumer wrappers with topic bootstrap.
//! Service logic lives in the service crates; this crate has no Pulse business rules.

pub mod admin;
pub mod api_error;
pub mod audit;
pub mod clickhouse;
pub mod clock;
pub mod config;
pub mod grpc;
pub mod http;
pub mod kafka;
pub mod limits;
pub mod listener;
pub mod malloc;
pub mod metrics;
pub mod registry_auth;
pub mod s3;
pub mod secret;
pub mod server;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod tls;
pub mod windowing;

#[cfg(test)]
mod test_support;

pub use admin::Health;
pub use shutdown::Shutdown;
