//! `pulse-writer`: parses config and runs [`pulse_writer::run`] until SIGTERM/SIGINT.

#[tokio::main]
async fn main() -> Result<(), pulse_platform::service::MainError> {
    pulse_platform::service::main::<pulse_writer::Config, _, _, _>(
        pulse_writer::SERVICE,
        pulse_writer::run,
    )
    .await
}
