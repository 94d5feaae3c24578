//! The query-api service: Analytics over HTTP and gRPC with freshness metadata, and the live dashboard.
//!
//! Status: the service skeleton — config, telemetry, admin endpoints, graceful shutdown
//! and topic bootstrap. Its pipeline work lands with issue #7.

use std::net::SocketAddr;

use pulse_platform::config::{Problems, Validate};
use pulse_platform::service::ServiceContext;
use pulse_platform::telemetry::TelemetryConfig;

/// Service name: metrics label, OpenTelemetry `service.name`, log field.
pub const SERVICE: &str = "query-api";

/// Configuration; every flag has a `PULSE_*` environment fallback (see README).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "pulse-query-api",
    version,
    about = "Analytics over HTTP and gRPC with freshness metadata, and the live dashboard."
)]
pub struct Config {
    /// Address of the admin server (/metrics, /livez, /readyz).
    #[arg(
        long = "admin-addr",
        env = "PULSE_ADMIN_ADDR",
        default_value = "127.0.0.1:9104"
    )]
    pub admin_addr: SocketAddr,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}

impl Validate for Config {
    fn validate(&self, p: &mut Problems) {
        self.telemetry.validate(p);
    }
}

pulse_platform::impl_service_config!(Config);

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
        "skeleton build: only the admin endpoints are served (see issue #7)"
    );
    ctx.shutdown.cancelled().await;
    drop(config);
    Ok(())
}
