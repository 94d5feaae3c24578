//! `pulse-ingest`: parses config and runs [`pulse_ingest::run`] until SIGTERM/SIGINT.

#[tokio::main]
async fn main() -> Result<(), pulse_platform::service::MainError> {
    pulse_platform::service::main::<pulse_ingest::Config, _, _, _>(
        pulse_ingest::SERVICE,
        pulse_ingest::run,
    )
    .await
}
