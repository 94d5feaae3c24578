//! `pulse-query-api`: parses config and runs [`pulse_query_api::run`] until SIGTERM/SIGINT.

#[tokio::main]
async fn main() -> Result<(), pulse_platform::service::MainError> {
    pulse_platform::service::main::<pulse_query_api::Config, _, _, _>(
        pulse_query_api::SERVICE,
        pulse_query_api::run,
    )
    .await
}
