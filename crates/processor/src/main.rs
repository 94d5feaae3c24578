//! `pulse-processor`: parses config and runs [`pulse_processor::run`] until SIGTERM/SIGINT.

#[tokio::main]
async fn main() -> Result<(), pulse_platform::service::MainError> {
    pulse_platform::service::main::<pulse_processor::Config, _, _, _>(
        pulse_processor::SERVICE,
        pulse_processor::run,
    )
    .await
}
