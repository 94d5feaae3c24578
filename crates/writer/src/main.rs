//! `pulse-writer`: parses config and runs [`pulse_writer::run`] until SIGTERM/SIGINT.
//! A shadow (`--shadow`) runs as the service `writer-shadow` (the `service` label of its
//! metrics, its OpenTelemetry `service.name`).

#[tokio::main]
async fn main() -> Result<(), pulse_platform::service::MainError> {
    pulse_platform::service::main::<pulse_writer::Config, _, _, _>(
        pulse_writer::service_name(),
        pulse_writer::run,
    )
    .await
}
