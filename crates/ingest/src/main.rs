//! `pulse-ingest`: parses config and runs [`pulse_ingest::run`] until SIGTERM/SIGINT.

/// jemalloc for the Rust heap, as the processor (`pulse_platform::malloc`): glibc's
/// malloc, free and consolidation were ~22 % of ingest's CPU under load once librdkafka's
/// busy loop was gone (`scripts/bench.sh ingest --process`; README, Benchmark table).
#[global_allocator]
static ALLOC: pulse_platform::malloc::Allocator = pulse_platform::malloc::ALLOCATOR;

#[tokio::main]
async fn main() -> Result<(), pulse_platform::service::MainError> {
    pulse_platform::service::main::<pulse_ingest::Config, _, _, _>(
        pulse_ingest::SERVICE,
        pulse_ingest::run,
    )
    .await
}
