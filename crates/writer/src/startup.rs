//! Waiting for the sink's store at start: until ClickHouse answers (and its migrations are
//! applied) or S3 answers for the bucket, the writer stays alive (`/livez` 200), reports
//! itself not ready with the reason (`/readyz` 503 "clickhouse unreachable: …"), consumes
//! nothing (its consumer does not join the group yet), logs every failed attempt at WARN
//! with the error, counts it in `pulse_writer_startup_retries_total`, and retries with
//! bounded backoff (`--retry-base-ms` doubling up to `--retry-max-ms`, with jitter). A
//! setting no retry can fix (a ClickHouse URL that does not parse) ends the process with
//! the error instead. Building the sink loops and retrying writes later stay with `lib`
//! and the sinks.

use std::future::Future;
use std::time::Duration;

use metrics::describe_counter;
use object_store::ObjectStore;
use pulse_platform::service::ServiceContext;
use pulse_storage::migrate::{self, MigrateError};

use crate::retry::{Backoff, BlockReason, ErrorKind};
use crate::{Config, Error};

/// Failed start-up attempts, by sink and reason.
pub const STARTUP_RETRIES_TOTAL: &str = "pulse_writer_startup_retries_total";

/// The `reason` label values of [`STARTUP_RETRIES_TOTAL`].
pub const REASONS: [&str; 3] = ["unreachable", "refused", "missing_bucket"];

/// Describes this module's metric and creates its series of `sink` at zero (so they are
/// in the first scrape).
pub fn describe(sink: &'static str) {
    describe_counter!(
        STARTUP_RETRIES_TOTAL,
        "Failed start-up checks of the sink's store (ClickHouse migrations or ping, S3 bucket listing), by sink and reason (unreachable, refused, missing_bucket); the writer consumes nothing and /readyz is 503 until one succeeds."
    );
    for reason in REASONS {
        metrics::counter!(STARTUP_RETRIES_TOTAL, "sink" => sink, "reason" => reason).increment(0);
    }
}

/// Why a start-up attempt failed.
#[derive(Debug)]
pub enum Failure {
    /// Retrying can help: the store is down, hangs, refuses us, or the bucket is missing.
    Retry {
        /// Bounded metric label: `unreachable`, `refused` or `missing_bucket`.
        reason: &'static str,
        /// For `/readyz` and the log: "clickhouse unreachable: <error>".
        detail: String,
    },
    /// No retry can help (a setting is wrong): the process exits with this error.
    Fatal(Error),
}

/// What a `clickhouse` client error means at start.
fn clickhouse_failure(e: MigrateError) -> Failure {
    use clickhouse::error::Error as E;
    let source = match &e {
        MigrateError::Sql { source, .. } | MigrateError::Query { source, .. } => source,
        MigrateError::InvalidDatabase(_) | MigrateError::InvalidDate(_) => {
            return Failure::Fatal(Error::ClickHouseSettings(e));
        }
    };
    match source {
        // The URL does not parse, or names a scheme this build cannot speak.
        E::InvalidParams(_) | E::Unsupported(_) => Failure::Fatal(Error::ClickHouseSettings(e)),
        E::Network(_) | E::TimedOut => Failure::Retry {
            reason: "unreachable",
            detail: format!("clickhouse unreachable: {e}"),
        },
        // The server answered but refused (credentials, rights, read-only, …): an operator
        // or the server itself can fix it while we wait.
        _ => Failure::Retry {
            reason: "refused",
            detail: format!("clickhouse refused the start-up queries: {e}"),
        },
    }
}

/// One attempt: the migrations (with `--migrate`), else a `SELECT 1`.
async fn clickhouse_attempt(config: &Config) -> Result<(), Failure> {
    if config.migrate {
        let applied = migrate::migrate(&config.clickhouse)
            .await
            .map_err(clickhouse_failure)?;
        tracing::info!(?applied, "ClickHouse migrations applied");
        Ok(())
    } else {
        config
            .clickhouse
            .server_client()
            .query("SELECT 1")
            .execute()
            .await
            .map_err(|source| {
                clickhouse_failure(MigrateError::Query {
                    step: "SELECT 1".into(),
                    source,
                })
            })
    }
}

/// Waits until ClickHouse answers and the migrations are applied. `Ok(false)`: shutdown
/// started first.
pub async fn wait_for_clickhouse(config: &Config, ctx: &ServiceContext) -> Result<bool, Error> {
    wait(config, ctx, "clickhouse", "clickhouse", || {
        clickhouse_attempt(config)
    })
    .await
}

/// What an S3 error means at start.
fn s3_failure(e: &object_store::Error) -> Option<Failure> {
    let (reason, what) = match crate::parquet_sink::classify_s3(e) {
        ErrorKind::Blocking(BlockReason::MissingBucket) => ("missing_bucket", "bucket missing"),
        // Listing is not writing: a role that may put objects but not list them is fine,
        // and uploads report a real refusal.
        ErrorKind::Blocking(BlockReason::AccessDenied) => {
            tracing::info!(error = %e, "s3: listing the bucket is not allowed; not checked at start");
            return None;
        }
        ErrorKind::Blocking(_) => ("refused", "refused"),
        ErrorKind::Retryable | ErrorKind::Row => ("unreachable", "unreachable"),
    };
    Some(Failure::Retry {
        reason,
        detail: format!("s3 {what}: {e}"),
    })
}

/// Waits until S3 lists the archive's prefix in the bucket (the bucket exists and the
/// credentials work). `Ok(false)`: shutdown started first.
pub async fn wait_for_s3(
    config: &Config,
    ctx: &ServiceContext,
    store: &dyn ObjectStore,
) -> Result<bool, Error> {
    let prefix = (!config.s3.prefix.is_empty())
        .then(|| object_store::path::Path::from(config.s3.prefix.as_str()));
    wait(config, ctx, "parquet", "s3", || async {
        match store.list_with_delimiter(prefix.as_ref()).await {
            Ok(_) => Ok(()),
            Err(e) => s3_failure(&e).map_or(Ok(()), Err),
        }
    })
    .await
}

/// Runs `attempt` (each with the insert deadline, `--insert-timeout-ms`) until it succeeds;
/// meanwhile readiness is blocked for `sink` (also the metric label) with the reason.
/// `store` names the store in messages.
async fn wait<F, Fut>(
    config: &Config,
    ctx: &ServiceContext,
    sink: &'static str,
    store: &'static str,
    mut attempt: F,
) -> Result<bool, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    let deadline = Duration::from_millis(config.insert_timeout_ms);
    // No circuit breaker: the cap bounds the wait between attempts.
    let mut backoff = Backoff::new(
        Duration::from_millis(config.retry_base_ms),
        Duration::from_millis(config.retry_max_ms),
        u32::MAX,
        Duration::from_millis(config.retry_max_ms),
    );
    loop {
        let outcome = tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(false),
            r = tokio::time::timeout(deadline, attempt()) => r,
        };
        let (reason, detail) = match outcome {
            Ok(Ok(())) => {
                if backoff.failures() > 0 {
                    tracing::info!(
                        sink,
                        attempts = backoff.failures() + 1,
                        "{store} answers; starting to consume"
                    );
                }
                ctx.health.unblock(sink);
                return Ok(true);
            }
            Ok(Err(Failure::Fatal(e))) => return Err(e),
            Ok(Err(Failure::Retry { reason, detail })) => (reason, detail),
            Err(_) => (
                "unreachable",
                format!("{store} unreachable: no answer within {deadline:?}"),
            ),
        };
        let pause = backoff.failure();
        metrics::counter!(STARTUP_RETRIES_TOTAL, "sink" => sink, "reason" => reason).increment(1);
        tracing::warn!(
            sink,
            attempt = backoff.failures(),
            retry_in_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
            error = %detail,
            "{store} not usable at start; not consuming, retrying"
        );
        ctx.health.block(sink, detail);
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Ok(false),
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query_error(source: clickhouse::error::Error) -> MigrateError {
        MigrateError::Query {
            step: "CREATE DATABASE pulse".into(),
            source,
        }
    }

    #[test]
    fn a_url_that_does_not_parse_is_fatal_and_a_dead_server_is_retried() {
        let bad_url = clickhouse::error::Error::InvalidParams("relative URL without a base".into());
        assert!(matches!(
            clickhouse_failure(query_error(bad_url)),
            Failure::Fatal(Error::ClickHouseSettings(_))
        ));
        let refused = clickhouse::error::Error::Network("connection refused".into());
        match clickhouse_failure(query_error(refused)) {
            Failure::Retry { reason, detail } => {
                assert_eq!(reason, "unreachable");
                assert!(
                    detail.starts_with("clickhouse unreachable: ClickHouse CREATE DATABASE"),
                    "{detail}"
                );
            }
            other => panic!("{other:?}"),
        }
        let auth = clickhouse::error::Error::BadResponse(
            "Code: 192, e.displayText() = DB::Exception: Unknown user nobody".into(),
        );
        assert!(matches!(
            clickhouse_failure(query_error(auth)),
            Failure::Retry {
                reason: "refused",
                ..
            }
        ));
    }
}
