//! Waiting for the broker and the sink's store at start. Until the broker answers (the
//! topics are checked or created), the writer is alive, answers `/readyz` 503 "blocked:
//! kafka: unreachable: …", counts each failed attempt in
//! `pulse_writer_startup_retries_total{reason="kafka_unreachable"}` and retries with the
//! same backoff; a topic setting the broker refuses for good ends the process instead.
//! Then, until ClickHouse answers (and its migrations are
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
use pulse_platform::kafka::topics::TopicError;
use pulse_platform::service::ServiceContext;
use pulse_storage::migrate::{self, MigrateError};

use crate::retry::{Backoff, BlockReason, ErrorKind};
use crate::{Config, Error};

/// Failed start-up attempts, by sink and reason.
pub const STARTUP_RETRIES_TOTAL: &str = "pulse_writer_startup_retries_total";

/// The `reason` label values of [`STARTUP_RETRIES_TOTAL`].
pub const REASONS: [&str; 4] = [
    "unreachable",
    "refused",
    "missing_bucket",
    "kafka_unreachable",
];

/// Longest wait for one attempt to reach the broker (the attempt deadline is
/// `--insert-timeout-ms` up to this): the topic admin request itself waits 30 s.
const KAFKA_ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// Describes this module's metric and creates its series of `sink` at zero (so they are
/// in the first scrape).
pub fn describe(sink: &'static str) {
    describe_counter!(
        STARTUP_RETRIES_TOTAL,
        "Failed start-up checks of the broker (creating or checking the topics; reason kafka_unreachable) and of the sink's store (ClickHouse migrations or ping, S3 bucket listing; unreachable, refused, missing_bucket), by sink and reason; the writer consumes nothing and /readyz is 503 until they succeed."
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
        MigrateError::InvalidDatabase(_)
        | MigrateError::InvalidDate(_)
        | MigrateError::InvalidShadow(_) => {
            return Failure::Fatal(Error::ClickHouseSettings(e));
        }
    };
    match source {
        // The URL does not parse, or names a scheme this build cannot speak.
        E::InvalidParams(_) | E::Unsupported(_) => Failure::Fatal(Error::ClickHouseSettings(e)),
        E::Network(_) | E::TimedOut => Failure::Retry {
            reason: "unreachable",
            // The causes too: a TLS failure's reason, URL and CA file are only there.
            detail: format!(
                "clickhouse unreachable: {}",
                pulse_platform::clickhouse::error_chain(&e)
            ),
        },
        // The server answered but refused (credentials, rights, read-only, …): an operator
        // or the server itself can fix it while we wait.
        _ => Failure::Retry {
            reason: "refused",
            detail: format!("clickhouse refused the start-up queries: {e}"),
        },
    }
}

/// One attempt: the migrations (with `--migrate`), else a `SELECT 1`. Returns the versions
/// of the migrations it applied (none: all were there already, or `--migrate false`).
async fn clickhouse_attempt(config: &Config) -> Result<Vec<u32>, Failure> {
    let applied = migrate_or_check(config).await?;
    // A shadow writer's tables: copies of the live ones, made once these exist.
    if let Some(name) = &config.shadow {
        let tables = migrate::create_shadow_tables(&config.clickhouse, name)
            .await
            .map_err(clickhouse_failure)?;
        tracing::info!(?tables, "shadow tables ready");
    }
    Ok(applied)
}

async fn migrate_or_check(config: &Config) -> Result<Vec<u32>, Failure> {
    if config.migrate {
        let applied = migrate::migrate(&config.clickhouse)
            .await
            .map_err(clickhouse_failure)?;
        tracing::info!(?applied, "ClickHouse migrations applied");
        Ok(applied)
    } else {
        config
            .clickhouse
            .server_client()
            .query("SELECT 1")
            .execute()
            .await
            .map(|()| Vec::new())
            .map_err(|source| {
                clickhouse_failure(MigrateError::Query {
                    step: "SELECT 1".into(),
                    source,
                })
            })
    }
}

/// Waits until ClickHouse answers and the migrations are applied: `Ok(Some(versions))`
/// with the versions of the migrations applied while waiting (for the audit trail),
/// `Ok(None)`: shutdown started first.
pub async fn wait_for_clickhouse(
    config: &Config,
    ctx: &ServiceContext,
) -> Result<Option<Vec<u32>>, Error> {
    let applied = std::sync::Mutex::new(Vec::new());
    let refused = std::sync::Mutex::new(crate::audit::RefusedMigrations::default());
    let (applied_ref, refused_ref) = (&applied, &refused);
    let ready = wait(
        config,
        ctx,
        Labels::store(config, "clickhouse", "clickhouse"),
        move || async move {
            let versions = match clickhouse_attempt(config).await {
                Ok(versions) => versions,
                Err(failure) => {
                    // ClickHouse answered and said no: the schema change did not happen,
                    // which belongs in the audit trail (an unreachable server is not one).
                    if let Failure::Retry {
                        reason: "refused",
                        detail,
                    } = &failure
                    {
                        refused_ref
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .refused(config, detail);
                    }
                    return Err(failure);
                }
            };
            applied_ref
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend(versions);
            Ok(())
        },
    )
    .await?;
    let applied = applied
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    Ok(ready.then_some(applied))
}

/// What a failure to check or create the topics means at start: the broker is down, hangs
/// or is not ready yet (retried), or it refuses a topic for good, or the client settings
/// are wrong (fatal).
fn kafka_failure(e: TopicError) -> Failure {
    use rdkafka::types::RDKafkaErrorCode as C;
    let transient = match &e {
        TopicError::Request(_) | TopicError::Metadata(_) | TopicError::Task(_) => true,
        TopicError::Topic { code, .. } => matches!(
            code,
            C::RequestTimedOut
                | C::OperationTimedOut
                | C::BrokerNotAvailable
                | C::LeaderNotAvailable
                | C::NotController
                | C::NotCoordinator
                | C::CoordinatorNotAvailable
                | C::NetworkException
                | C::AllBrokersDown
                | C::BrokerTransportFailure
                | C::KafkaStorageError
                | C::NotEnoughReplicas
        ),
        _ => false,
    };
    if transient {
        Failure::Retry {
            reason: "kafka_unreachable",
            detail: format!("unreachable: {e}"),
        }
    } else {
        Failure::Fatal(Error::Topics(e))
    }
}

/// Waits until the broker answers and `ensure` (checking or creating the sink's topics)
/// succeeded. `Ok(false)`: shutdown started first.
pub async fn wait_for_kafka<F, Fut>(
    config: &Config,
    ctx: &ServiceContext,
    sink: &'static str,
    mut ensure: F,
) -> Result<bool, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), TopicError>>,
{
    let deadline = Duration::from_millis(config.insert_timeout_ms).min(KAFKA_ATTEMPT_TIMEOUT);
    let timeout_reason = (
        "kafka_unreachable",
        format!("unreachable (brokers {})", config.kafka.brokers),
    );
    wait(
        config,
        ctx,
        Labels {
            sink,
            component: "kafka",
            store: "kafka",
            deadline,
            timeout_reason,
        },
        || {
            let attempt = ensure();
            async move { attempt.await.map_err(kafka_failure) }
        },
    )
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
    wait(
        config,
        ctx,
        Labels::store(config, "parquet", "s3"),
        || async {
            match store.list_with_delimiter(prefix.as_ref()).await {
                Ok(_) => Ok(()),
                Err(e) => s3_failure(&e).map_or(Ok(()), Err),
            }
        },
    )
    .await
}

/// Who waits for what, in labels and messages.
struct Labels {
    /// The `sink` metric label.
    sink: &'static str,
    /// The readiness component blocked meanwhile.
    component: &'static str,
    /// The dependency, in messages.
    store: &'static str,
    /// Deadline of one attempt.
    deadline: Duration,
    /// (metric reason, readiness word) when an attempt exceeds the deadline.
    timeout_reason: (&'static str, String),
}

impl Labels {
    /// The sink's store: readiness blocked under the sink's name, attempts bounded by the
    /// insert deadline (`--insert-timeout-ms`).
    fn store(config: &Config, sink: &'static str, store: &'static str) -> Self {
        Self {
            sink,
            component: sink,
            store,
            deadline: Duration::from_millis(config.insert_timeout_ms),
            timeout_reason: ("unreachable", format!("{store} unreachable")),
        }
    }
}

/// Runs `attempt` (each within `labels.deadline`) until it succeeds; meanwhile readiness
/// is blocked for `labels.component` with the reason.
async fn wait<F, Fut>(
    config: &Config,
    ctx: &ServiceContext,
    labels: Labels,
    mut attempt: F,
) -> Result<bool, Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<(), Failure>>,
{
    let Labels {
        sink,
        component,
        store,
        deadline,
        timeout_reason,
    } = labels;
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
                ctx.health.unblock(component);
                return Ok(true);
            }
            Ok(Err(Failure::Fatal(e))) => return Err(e),
            Ok(Err(Failure::Retry { reason, detail })) => (reason, detail),
            Err(_) => (
                timeout_reason.0,
                format!("{}: no answer within {deadline:?}", timeout_reason.1),
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
        ctx.health.block(component, detail);
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
