//! The processor service: Event-time windowed metrics with watermarks, lateness and sessions.
//!
//! Status: the service skeleton — config, telemetry, admin endpoints, graceful shutdown
//! and topic bootstrap. Its pipeline work lands with issue #5.

use std::net::SocketAddr;

use pulse_contracts::topics;
use pulse_platform::config::{Problems, Validate};
use pulse_platform::kafka::KafkaConfig;
use pulse_platform::kafka::topics::{TopicError, TopicSpec, ensure_topics};
use pulse_platform::service::{ServiceConfig, ServiceContext};
use pulse_platform::telemetry::TelemetryConfig;

/// Service name: metrics label, OpenTelemetry `service.name`, log field.
pub const SERVICE: &str = "processor";

/// Configuration; every flag has a `PULSE_*` environment fallback (see README).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "pulse-processor",
    version,
    about = "Event-time windowed metrics with watermarks, lateness and sessions."
)]
pub struct Config {
    /// Address of the admin server (/metrics, /livez, /readyz).
    #[arg(
        long = "admin-addr",
        env = "PULSE_ADMIN_ADDR",
        default_value = "127.0.0.1:9102"
    )]
    pub admin_addr: SocketAddr,
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
    #[error("creating topics: {0}")]
    Topics(#[from] TopicError),
}

/// Runs the service until shutdown.
pub async fn run(config: Config, ctx: ServiceContext) -> Result<(), Error> {
    let specs = [topics::USER_ACTIVITY, topics::SESSIONS, topics::EVENTS_LATE]
        .iter()
        .map(|t| TopicSpec::new(*t, config.kafka.partitions))
        .collect::<Vec<_>>();
    ensure_topics(&config.kafka, &specs).await?;
    ctx.health.set_ready(true);
    tracing::warn!(
        service = SERVICE,
        "skeleton build: only the admin endpoints are served (see issue #5)"
    );
    ctx.shutdown.cancelled().await;
    drop(config);
    Ok(())
}
