//! `pulse-processor`: parses config and runs [`pulse_processor::run`] until SIGTERM/SIGINT.
//! A shadow (`--shadow`) runs as the service `processor-shadow`: the `service` label of its
//! metrics and its OpenTelemetry `service.name` (see docs/operations.md).

#[tokio::main]
async fn main() -> Result<(), pulse_platform::service::MainError> {
    pulse_platform::service::main::<pulse_processor::Config, _, _, _>(
        pulse_processor::service_name(),
        pulse_processor::run,
    )
    .await
}
