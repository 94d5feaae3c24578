//! `pulse-processor`: parses config and runs [`pulse_processor::run`] until SIGTERM/SIGINT.
//! A shadow (`--shadow`) runs as the service `processor-shadow`: the `service` label of its
//! metrics and its OpenTelemetry `service.name` (see docs/operations.md).

/// jemalloc for the Rust heap (`pulse_platform::malloc`: a third more events per CPU-second
/// than glibc's malloc at the same resident memory).
#[global_allocator]
static ALLOC: pulse_platform::malloc::Allocator = pulse_platform::malloc::ALLOCATOR;

#[tokio::main]
async fn main() -> Result<(), pulse_platform::service::MainError> {
    pulse_platform::service::main::<pulse_processor::Config, _, _, _>(
        pulse_processor::service_name(),
        pulse_processor::run,
    )
    .await
}
