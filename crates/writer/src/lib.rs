//! The writer service: Sinks: ClickHouse hot store and Parquet-on-S3 archive.
//!
//! Status: the service skeleton — config, telemetry, admin endpoints, graceful shutdown
//! and topic bootstrap. Its pipeline work lands with issue #6.

use std::net::SocketAddr;

use pulse_platform::config::{Problems, Validate};
use pulse_platform::kafka::KafkaConfig;
use pulse_platform::service::{ServiceConfig, ServiceContext};
use pulse_platform::telemetry::TelemetryConfig;

/// Service name: metrics label, OpenTelemetry `service.name`, log field.
pub const SERVICE: &str = "writer";

/// The writer's sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sink {
    /// The ClickHouse hot store.
    Clickhouse,
    /// The Parquet archive on S3.
    Parquet,
}

/// Configuration; every flag has a `PULSE_*` environment fallback (see README).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "pulse-writer",
    version,
    about = "Sinks: ClickHouse hot store and Parquet-on-S3 archive."
)]
pub struct Config {
    /// Address of the admin server (/metrics, /livez, /readyz).
    #[arg(
        long = "admin-addr",
        env = "PULSE_ADMIN_ADDR",
        default_value = "127.0.0.1:9103"
    )]
    pub admin_addr: SocketAddr,
    /// Which sink this instance runs; each sink is its own consumer group and deployment.
    #[arg(
        long = "sink",
        env = "PULSE_WRITER_SINK",
        value_enum,
        default_value = "clickhouse"
    )]
    pub sink: Sink,
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}

impl Validate for Config {
    fn validate(&self, p: &mut Problems) {
        self.kafka.validate(p);
        self.telemetry.validate(p);
    }
}

impl ServiceConfig for Config {
    fn telemetry(&self) -> &TelemetryConfig {
        &self.telemetry
    }
    fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }
}

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Startup(String),
}

/// Runs the service until shutdown.
pub async fn run(config: Config, ctx: ServiceContext) -> Result<(), Error> {
    ctx.health.set_ready(true);
    tracing::warn!(
        service = SERVICE,
        "skeleton build: only the admin endpoints are served (see issue #6)"
    );
    ctx.shutdown.cancelled().await;
    drop(config);
    Ok(())
}
