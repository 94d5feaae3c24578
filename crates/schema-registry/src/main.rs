//! `pulse-schema-registry`: parses config and runs [`pulse_schema_registry::run`] until SIGTERM/SIGINT.

#[tokio::main]
async fn main() -> Result<(), pulse_platform::service::MainError> {
    pulse_platform::service::main::<pulse_schema_registry::Config, _, _, _>(
        pulse_schema_registry::SERVICE,
        pulse_schema_registry::run,
    )
    .await
}
