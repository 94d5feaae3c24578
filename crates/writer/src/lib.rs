//! The writer: stores what the pipeline produced. `--sink clickhouse` writes raw events,
//! window activity and sessions to ClickHouse (hot store); `--sink parquet` archives raw
//! events as Parquet on S3. Each sink is its own consumer group and deployment.
//! Modules: `batch` (batching and commit points), `retry` (error kinds, backoff, circuit
//! breaker), `blocked` (readiness and metric while the store refuses every write),
//! `pause` (paused consumption that keeps the group membership), `dlq` (dead-lettering), `clickhouse_sink` (the ClickHouse loop),
//! `audit` (the audit topic's exactly-once copy into `audit_log`, next to the ClickHouse loop),
//! `parquet_sink` (the S3 loop), `metrics`. The schema, its migrations and retention, the
//! row types and the archive layout are the storage contract in `pulse-storage`.

pub mod audit;
pub mod batch;
pub mod blocked;
pub mod clickhouse_sink;
pub mod dlq;
pub mod metrics;
pub mod parquet_sink;
pub mod pause;
pub mod retry;
pub mod startup;

// The storage contract (schema, rows, archive layout) lives in `pulse-storage`.
use pulse_storage::{archive, migrate, rows};

use std::net::SocketAddr;
use std::time::Duration;

use pulse_contracts::topics;
use pulse_platform::clickhouse::ClickHouseConfig;
use pulse_platform::config::{Problems, Validate};
use pulse_platform::kafka::topics::{TopicError, TopicKind, TopicSpec, ensure_topics};
use pulse_platform::kafka::{KafkaConfig, KafkaConsumer, KafkaProducer};
use pulse_platform::s3::S3Config;
use pulse_platform::service::ServiceContext;
use pulse_platform::telemetry::TelemetryConfig;

use crate::batch::BatchLimits;
use crate::clickhouse_sink::{ClickHouseSink, SinkTables, SinkTopics};
use crate::parquet_sink::{ParquetSink, ParquetTopics, RollLimits};
use crate::retry::Backoff;

/// Service name: metrics label, OpenTelemetry `service.name`, log field.
pub const SERVICE: &str = "writer";

/// The writer's sink.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Sink {
    /// The ClickHouse hot store.
    Clickhouse,
    /// The Parquet archive of raw events on S3.
    Parquet,
}

/// Configuration; every flag has a `PULSE_*` environment fallback (see README).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "pulse-writer",
    version,
    about = "Stores events and aggregates in ClickHouse (and Parquet on S3)."
)]
pub struct Config {
    /// Address of the admin server (/metrics, /livez, /readyz).
    #[arg(
        long = "admin-addr",
        env = "PULSE_ADMIN_ADDR",
        default_value = "127.0.0.1:9103"
    )]
    pub admin_addr: SocketAddr,
    /// TLS, header read timeout and limits of the admin server.
    #[command(flatten)]
    pub admin_server: pulse_platform::server::AdminServerArgs,
    /// Which sink this instance runs.
    #[arg(
        long = "sink",
        env = "PULSE_WRITER_SINK",
        value_enum,
        default_value = "clickhouse"
    )]
    pub sink: Sink,
    /// Consumer group (default: pulse-writer-<sink>).
    #[arg(long = "group-id", env = "PULSE_WRITER_GROUP_ID")]
    pub group_id: Option<String>,
    /// ClickHouse sink only: write the outputs of the shadow processor `<name>` (1–32 of
    /// a-z, 0-9, -): consume `<topic>.shadow.<name>` of the user-activity and sessions
    /// topics (not the events) in the group `<group>-shadow-<name>`, into the tables
    /// `user_activity_shadow_<name>` and `sessions_shadow_<name>` (`-` as `_`; created at
    /// start as copies of the live tables); refused records go to `<dlq>.shadow.<name>`.
    /// Live tables and topics are never written. Unset: the live writer.
    #[arg(
        long = "shadow",
        env = "PULSE_WRITER_SHADOW",
        value_parser = parse_shadow_name
    )]
    pub shadow: Option<String>,
    /// A batch is written at this many rows...
    #[arg(
        long = "batch-max-rows",
        env = "PULSE_WRITER_BATCH_MAX_ROWS",
        default_value_t = 10_000
    )]
    pub batch_max_rows: usize,
    /// ...or this many record bytes...
    #[arg(long = "batch-max-bytes", env = "PULSE_WRITER_BATCH_MAX_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub batch_max_bytes: usize,
    /// ...or when its oldest row is this old, ms.
    #[arg(
        long = "batch-max-age-ms",
        env = "PULSE_WRITER_BATCH_MAX_AGE_MS",
        default_value_t = 1_000
    )]
    pub batch_max_age_ms: u64,
    /// First retry delay, ms (doubles per failure, with jitter).
    #[arg(
        long = "retry-base-ms",
        env = "PULSE_WRITER_RETRY_BASE_MS",
        default_value_t = 200
    )]
    pub retry_base_ms: u64,
    /// Longest retry delay, ms.
    #[arg(
        long = "retry-max-ms",
        env = "PULSE_WRITER_RETRY_MAX_MS",
        default_value_t = 10_000
    )]
    pub retry_max_ms: u64,
    /// Consecutive failures that open the circuit breaker.
    #[arg(
        long = "breaker-failures",
        env = "PULSE_WRITER_BREAKER_FAILURES",
        default_value_t = 8
    )]
    pub breaker_failures: u32,
    /// Probe interval while the breaker is open, ms.
    #[arg(
        long = "breaker-probe-ms",
        env = "PULSE_WRITER_BREAKER_PROBE_MS",
        default_value_t = 15_000
    )]
    pub breaker_probe_ms: u64,
    /// Deadline of one insert, ms: a ClickHouse that hangs instead of refusing is then
    /// retried (with backoff, paused consumption and the circuit breaker) like one that is
    /// down.
    #[arg(
        long = "insert-timeout-ms",
        env = "PULSE_WRITER_INSERT_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub insert_timeout_ms: u64,
    /// How long the final write at shutdown (the buffered batch, or the Parquet roll) may
    /// take, retries included, ms. What is not written by then is not committed: the next
    /// owner re-reads it. Keep it below the pod's termination grace period.
    #[arg(
        long = "shutdown-timeout-ms",
        env = "PULSE_WRITER_SHUTDOWN_TIMEOUT_MS",
        default_value_t = 60_000
    )]
    pub shutdown_timeout_ms: u64,
    /// Apply the ClickHouse migrations at start.
    #[arg(long = "migrate", env = "PULSE_WRITER_MIGRATE", default_value_t = true, action = clap::ArgAction::Set)]
    pub migrate: bool,
    /// Days of data kept: older day partitions are dropped (checked hourly; 0 = keep all).
    #[arg(
        long = "retention-days",
        env = "PULSE_WRITER_RETENTION_DAYS",
        default_value_t = 30
    )]
    pub retention_days: u32,
    #[arg(long = "events-topic", env = "PULSE_EVENTS_TOPIC", default_value = topics::EVENTS)]
    pub events_topic: String,
    #[arg(long = "user-activity-topic", env = "PULSE_USER_ACTIVITY_TOPIC", default_value = topics::USER_ACTIVITY)]
    pub user_activity_topic: String,
    #[arg(long = "sessions-topic", env = "PULSE_SESSIONS_TOPIC", default_value = topics::SESSIONS)]
    pub sessions_topic: String,
    #[arg(long = "dlq-topic", env = "PULSE_DLQ_TOPIC", default_value = topics::EVENTS_DLQ)]
    pub dlq_topic: String,
    /// ClickHouse sink (not a shadow): also copy the audit topic into the append-only table
    /// `audit_log`, exactly once, in the consumer group `<group>-audit` (see `audit`).
    #[arg(long = "audit-copy", env = "PULSE_WRITER_AUDIT_COPY", default_value_t = true, action = clap::ArgAction::Set)]
    pub audit_copy: bool,
    /// The audit topic copied into `audit_log`, where the ClickHouse writer records the
    /// migrations it applied at start (created at start when missing), and where either
    /// sink records a reload of its admin certificate (`keys.tls.reload`; the topic is
    /// created then if missing). Empty with `--audit-copy false`: none of these.
    #[arg(long = "audit-topic", env = "PULSE_AUDIT_TOPIC", default_value = topics::AUDIT)]
    pub audit_topic: String,
    /// Parquet sink: a roll (the objects of one upload) is written at this many rows...
    #[arg(
        long = "parquet-max-rows",
        env = "PULSE_WRITER_PARQUET_MAX_ROWS",
        default_value_t = 100_000
    )]
    pub parquet_max_rows: usize,
    /// ...or this many record bytes...
    #[arg(long = "parquet-max-bytes", env = "PULSE_WRITER_PARQUET_MAX_BYTES", default_value_t = 64 * 1024 * 1024)]
    pub parquet_max_bytes: usize,
    /// ...or when its oldest record is this old, ms...
    #[arg(
        long = "parquet-max-age-ms",
        env = "PULSE_WRITER_PARQUET_MAX_AGE_MS",
        default_value_t = 60_000
    )]
    pub parquet_max_age_ms: u64,
    /// ...or once the memory it holds reaches this many bytes (estimated from the decoded
    /// rows and the column copy their encoding makes): the bound of the sink's memory.
    #[arg(long = "parquet-max-buffer-bytes", env = "PULSE_WRITER_PARQUET_MAX_BUFFER_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub parquet_max_buffer_bytes: usize,
    /// Parquet sink: after each confirmed upload, write a `freshness` row per partition
    /// (stage `writer-parquet`) to ClickHouse, best effort.
    #[arg(long = "parquet-freshness", env = "PULSE_WRITER_PARQUET_FRESHNESS", default_value_t = true, action = clap::ArgAction::Set)]
    pub parquet_freshness: bool,
    #[command(flatten)]
    pub clickhouse: ClickHouseConfig,
    #[command(flatten)]
    pub s3: S3Config,
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}

impl Validate for Config {
    fn validate(&self, p: &mut Problems) {
        p.check(self.batch_max_rows >= 1, "--batch-max-rows", "must be >= 1");
        p.check(
            self.batch_max_bytes >= 1024,
            "--batch-max-bytes",
            "must be >= 1024",
        );
        p.check(
            self.batch_max_age_ms >= 10,
            "--batch-max-age-ms",
            "must be >= 10",
        );
        p.check(self.retry_base_ms >= 1, "--retry-base-ms", "must be >= 1");
        p.check(
            self.insert_timeout_ms >= 100,
            "--insert-timeout-ms",
            "must be >= 100",
        );
        p.check(
            self.shutdown_timeout_ms >= 100,
            "--shutdown-timeout-ms",
            "must be >= 100",
        );
        p.check(
            self.retry_max_ms >= self.retry_base_ms,
            "--retry-max-ms",
            "must be >= --retry-base-ms",
        );
        p.check(
            self.breaker_failures >= 1,
            "--breaker-failures",
            "must be >= 1",
        );
        p.check(
            self.parquet_max_rows >= 1,
            "--parquet-max-rows",
            "must be >= 1",
        );
        p.check(
            self.parquet_max_bytes >= 1024,
            "--parquet-max-bytes",
            "must be >= 1024",
        );
        p.check(
            self.parquet_max_buffer_bytes >= 64 * 1024,
            "--parquet-max-buffer-bytes",
            "must be >= 65536",
        );
        p.check(
            self.parquet_max_age_ms >= 10,
            "--parquet-max-age-ms",
            "must be >= 10",
        );
        p.check(
            self.shadow.is_none() || self.sink == Sink::Clickhouse,
            "--shadow",
            "only the ClickHouse sink (--sink clickhouse) writes a shadow's tables",
        );
        p.check(
            !self.copies_audit() || !self.audit_topic.trim().is_empty(),
            "--audit-topic",
            "must not be empty (or turn the copy off with --audit-copy false)",
        );
        self.clickhouse.validate(p);
        if self.sink == Sink::Parquet {
            self.s3.validate(p);
        }
        self.kafka.validate(p);
        self.telemetry.validate(p);
        self.admin_server.validate(p);
    }
}

pulse_platform::impl_service_config!(Config, admin_server);

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating topics: {0}")]
    Topics(#[from] TopicError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("ClickHouse migrations: {0}")]
    Migrate(#[from] migrate::MigrateError),
    #[error("{0}")]
    Sink(#[from] clickhouse_sink::SinkError),
    #[error("S3: {0}")]
    S3(#[from] object_store::Error),
    #[error("{0}")]
    ParquetSink(#[from] parquet_sink::ParquetSinkError),
    /// A ClickHouse setting that no retry can fix (the URL does not parse, a scheme the
    /// client does not support): the process exits instead of waiting.
    #[error(
        "ClickHouse cannot be used with these settings (check --clickhouse-url / PULSE_CLICKHOUSE_URL): {0}"
    )]
    ClickHouseSettings(#[source] migrate::MigrateError),
}

/// `--shadow`'s value parser (clap names the flag in its error).
fn parse_shadow_name(s: &str) -> Result<String, String> {
    topics::validate_shadow_name(s).map(str::to_owned)
}

/// Service name of a shadow writer (`--shadow`): its metrics carry
/// `service="writer-shadow"`, its traces `service.name=writer-shadow`.
pub const SHADOW_SERVICE: &str = "writer-shadow";

/// [`SHADOW_SERVICE`] when the command line or environment asks for a shadow, else
/// [`SERVICE`] (a command line that does not parse is reported by the service's `main`).
pub fn service_name() -> &'static str {
    service_name_of(std::env::args_os())
}

/// [`service_name`] of the command line `args` (and the environment).
pub fn service_name_of<I, T>(args: I) -> &'static str
where
    I: IntoIterator<Item = T>,
    T: Into<std::ffi::OsString> + Clone,
{
    use clap::Parser as _;
    match Config::try_parse_from(args) {
        Ok(c) if c.shadow.is_some() => SHADOW_SERVICE,
        _ => SERVICE,
    }
}

impl Config {
    /// The consumer group: `--group-id` or `pulse-writer-<sink>`; for a shadow,
    /// `<that>-shadow-<name>`.
    pub fn group(&self) -> String {
        let group = self.group_id.clone().unwrap_or_else(|| match self.sink {
            Sink::Clickhouse => "pulse-writer-clickhouse".into(),
            Sink::Parquet => "pulse-writer-parquet".into(),
        });
        match &self.shadow {
            Some(name) => topics::shadow_group(&group, name),
            None => group,
        }
    }

    fn output(&self, live: &str) -> String {
        match &self.shadow {
            Some(name) => topics::shadow_topic(live, name),
            None => live.to_owned(),
        }
    }

    /// The ClickHouse sink's topics: for a shadow, the shadow copies of the aggregate
    /// topics and the DLQ (the events topic stays the live one's, and is not consumed).
    pub fn sink_topics(&self) -> SinkTopics {
        SinkTopics {
            events: self.events_topic.clone(),
            user_activity: self.output(&self.user_activity_topic),
            sessions: self.output(&self.sessions_topic),
            dlq: self.output(&self.dlq_topic),
        }
    }

    /// The topics the ClickHouse sink consumes: all three, or for a shadow its two
    /// aggregate topics.
    pub fn consumed_topics(&self) -> Vec<String> {
        let t = self.sink_topics();
        if self.shadow.is_some() {
            vec![t.user_activity, t.sessions]
        } else {
            vec![t.events, t.user_activity, t.sessions]
        }
    }

    /// The ClickHouse tables written: the live ones, or the shadow's copies.
    pub fn sink_tables(&self) -> SinkTables {
        match &self.shadow {
            Some(name) => SinkTables {
                // Never written by a shadow (it does not consume the events topic); a
                // name that does not exist keeps it that way if that ever changed.
                events: migrate::shadow_table("events", name),
                user_activity: migrate::shadow_table("user_activity", name),
                sessions: migrate::shadow_table("sessions", name),
            },
            None => SinkTables::default(),
        }
    }
}

/// Builds the ClickHouse sink loop (used by `run` and tests). Applies migrations first when
/// configured (once: a failure is returned; `run` waits for ClickHouse before this).
pub async fn build_clickhouse(config: &Config) -> Result<ClickHouseSink, Error> {
    ensure_clickhouse_topics(config).await?;
    if config.migrate {
        let applied = migrate::migrate(&config.clickhouse).await?;
        tracing::info!(?applied, "ClickHouse migrations applied");
    }
    if let Some(name) = &config.shadow {
        let tables = migrate::create_shadow_tables(&config.clickhouse, name).await?;
        tracing::info!(?tables, "shadow tables ready");
    }
    clickhouse_sink(config)
}

async fn ensure_clickhouse_topics(config: &Config) -> Result<(), Error> {
    Ok(ensure_clickhouse_topics_of(config).await?)
}

async fn ensure_clickhouse_topics_of(config: &Config) -> Result<(), TopicError> {
    let t = config.sink_topics();
    let mut topics = vec![
        (TopicKind::Aggregates, &t.user_activity),
        (TopicKind::Aggregates, &t.sessions),
        (TopicKind::Dlq, &t.dlq),
    ];
    if config.shadow.is_none() {
        topics.insert(0, (TopicKind::Events, &t.events));
    }
    let specs: Vec<TopicSpec> = topics
        .iter()
        .map(|(kind, t)| TopicSpec::of(*kind, t.as_str(), config.kafka.partitions))
        .chain(
            config
                .audits()
                .then(|| pulse_platform::audit::topic_spec(&config.audit_topic)),
        )
        .collect();
    ensure_topics(&config.kafka, &specs).await?;
    Ok(())
}

/// The ClickHouse sink loop: its consumer joins the group here, so only once ClickHouse
/// answered (and the migrations are applied).
fn clickhouse_sink(config: &Config) -> Result<ClickHouseSink, Error> {
    let consumed = config.consumed_topics();
    let (consumer, _rebalances) = KafkaConsumer::new(
        &config.kafka,
        "pulse-writer",
        &config.group(),
        &consumed.iter().map(String::as_str).collect::<Vec<_>>(),
    )?;
    Ok(ClickHouseSink {
        insert_timeout: Duration::from_millis(config.insert_timeout_ms),
        client: config.clickhouse.client(),
        consumer,
        producer: KafkaProducer::new(&config.kafka, "pulse-writer")?,
        topics: config.sink_topics(),
        tables: config.sink_tables(),
        limits: BatchLimits {
            max_rows: config.batch_max_rows,
            max_bytes: config.batch_max_bytes,
            max_age: Duration::from_millis(config.batch_max_age_ms),
        },
        backoff: Backoff::new(
            Duration::from_millis(config.retry_base_ms),
            Duration::from_millis(config.retry_max_ms),
            config.breaker_failures,
            Duration::from_millis(config.breaker_probe_ms),
        ),
        health: pulse_platform::Health::new(),
        shutdown_timeout: Duration::from_millis(config.shutdown_timeout_ms),
    })
}

/// Builds the Parquet sink loop (used by `run` and tests): consumes the events topic in
/// its own group and uploads to `config.s3`. It applies no ClickHouse migrations (the
/// ClickHouse sink owns the schema); freshness rows are written if the table exists.
pub async fn build_parquet(config: &Config) -> Result<ParquetSink, Error> {
    ensure_parquet_topics(config).await?;
    parquet_sink(config, config.s3.object_store()?)
}

async fn ensure_parquet_topics(config: &Config) -> Result<(), Error> {
    Ok(ensure_parquet_topics_of(config).await?)
}

async fn ensure_parquet_topics_of(config: &Config) -> Result<(), TopicError> {
    let specs = [
        TopicSpec::of(
            TopicKind::Events,
            config.events_topic.as_str(),
            config.kafka.partitions,
        ),
        TopicSpec::of(
            TopicKind::Dlq,
            config.dlq_topic.as_str(),
            config.kafka.partitions,
        ),
    ];
    ensure_topics(&config.kafka, &specs).await?;
    Ok(())
}

/// The Parquet sink loop on `store`: its consumer joins the group here, so only once S3
/// answered.
fn parquet_sink(
    config: &Config,
    store: std::sync::Arc<dyn object_store::ObjectStore>,
) -> Result<ParquetSink, Error> {
    let (consumer, rebalances) = KafkaConsumer::new(
        &config.kafka,
        "pulse-writer",
        &config.group(),
        &[&config.events_topic],
    )?;
    Ok(ParquetSink {
        store,
        s3: config.s3.clone(),
        consumer,
        rebalances,
        producer: KafkaProducer::new(&config.kafka, "pulse-writer")?,
        topics: ParquetTopics {
            events: config.events_topic.clone(),
            dlq: config.dlq_topic.clone(),
        },
        limits: RollLimits {
            batch: BatchLimits {
                max_rows: config.parquet_max_rows,
                max_bytes: config.parquet_max_bytes,
                max_age: Duration::from_millis(config.parquet_max_age_ms),
            },
            max_buffer_bytes: config.parquet_max_buffer_bytes,
        },
        backoff: Backoff::new(
            Duration::from_millis(config.retry_base_ms),
            Duration::from_millis(config.retry_max_ms),
            config.breaker_failures,
            Duration::from_millis(config.breaker_probe_ms),
        ),
        freshness: config.parquet_freshness.then(|| config.clickhouse.client()),
        health: pulse_platform::Health::new(),
        shutdown_timeout: Duration::from_millis(config.shutdown_timeout_ms),
    })
}

fn today_yyyymmdd() -> u32 {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    migrate::yyyymmdd_from_ms(now_ms)
}

/// Runs the service until shutdown.
pub async fn run(config: Config, ctx: ServiceContext) -> Result<(), Error> {
    crate::metrics::describe();
    audit::audit_certificate_reloads(&config);
    let sink_label = match config.sink {
        Sink::Parquet => "parquet",
        Sink::Clickhouse => "clickhouse",
    };
    crate::metrics::init(sink_label, &config.sink_topics().dlq);
    startup::describe(sink_label);
    match config.sink {
        Sink::Parquet => {
            // The broker first (the topics), then the store: until both answer the writer
            // is alive, not ready, and consumes nothing.
            if !startup::wait_for_kafka(&config, &ctx, sink_label, || {
                ensure_parquet_topics_of(&config)
            })
            .await?
            {
                return Ok(()); // shutdown while waiting: nothing was consumed
            }
            let store = config.s3.object_store()?;
            if !startup::wait_for_s3(&config, &ctx, store.as_ref()).await? {
                return Ok(()); // shutdown while waiting: nothing was consumed
            }
            let mut sink = parquet_sink(&config, store)?;
            sink.health = ctx.health.clone();
            // A member left owning nothing while the group does not advance: not ready.
            sink.consumer
                .watch_health(ctx.health.clone(), "kafka-consumer");
            // A DLQ producer that cannot deliver makes the writer not ready and is recreated.
            let _watchdog = ctx.watch_producer(
                &sink.producer,
                "kafka-dlq-producer",
                config.kafka.producer_stall_timeout,
            );
            ctx.health.set_ready(true);
            Ok(sink.run(ctx.shutdown.child_token()).await?)
        }
        Sink::Clickhouse => {
            if !startup::wait_for_kafka(&config, &ctx, sink_label, || {
                ensure_clickhouse_topics_of(&config)
            })
            .await?
            {
                return Ok(()); // shutdown while waiting: nothing was consumed
            }
            let Some(applied) = startup::wait_for_clickhouse(&config, &ctx).await? else {
                return Ok(()); // shutdown while waiting: nothing was consumed
            };
            let mut sink = clickhouse_sink(&config)?;
            audit::record_migrations(&config, &sink.producer, &applied);
            sink.health = ctx.health.clone();
            // A member left owning nothing while the group does not advance: not ready.
            sink.consumer
                .watch_health(ctx.health.clone(), "kafka-consumer");
            // A DLQ producer that cannot deliver makes the writer not ready and is recreated.
            let _watchdog = ctx.watch_producer(
                &sink.producer,
                "kafka-dlq-producer",
                config.kafka.producer_stall_timeout,
            );
            let retention = {
                let cfg = config.clickhouse.clone();
                // A shadow's tables are not trimmed (it is short-lived; discard drops them).
                let days = if config.shadow.is_some() {
                    0
                } else {
                    config.retention_days
                };
                tokio::spawn(async move {
                    if days == 0 {
                        return;
                    }
                    loop {
                        match migrate::apply_retention(&cfg, days, today_yyyymmdd()).await {
                            Ok(dropped) if !dropped.is_empty() => {
                                tracing::info!(?dropped, "retention dropped partitions")
                            }
                            Ok(_) => {}
                            Err(e) => {
                                tracing::warn!(error = %e, "retention failed; retrying in an hour")
                            }
                        }
                        tokio::time::sleep(Duration::from_secs(3_600)).await;
                    }
                })
            };
            // The audit topic's copy into `audit_log`, next to the sink (its own group);
            // it stops with the sink.
            let stop_copy = ctx.shutdown.child_token();
            let audit_copy =
                audit::build(&config)?.map(|copy| tokio::spawn(copy.run(stop_copy.clone())));
            ctx.health.set_ready(true);
            let result = sink.run(ctx.shutdown.child_token()).await;
            retention.abort();
            stop_copy.cancel();
            if let Some(copy) = audit_copy {
                let _ = copy.await;
            }
            Ok(result?)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, Parser};

    #[test]
    fn the_flag_ids_of_every_section_are_distinct() {
        Config::command().debug_assert();
    }

    #[test]
    fn a_full_parquet_command_line_parses() {
        // The S3 keys come from files (never flags).
        let dir = std::env::temp_dir().join(format!("pulse-writer-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (ak, sk) = (dir.join("ak"), dir.join("sk"));
        std::fs::write(&ak, "ak\n").unwrap();
        std::fs::write(&sk, "sk\n").unwrap();
        let cfg = Config::try_parse_from([
            "pulse-writer",
            "--sink",
            "parquet",
            "--parquet-max-rows",
            "500",
            "--parquet-max-bytes",
            "2048",
            "--parquet-max-age-ms",
            "250",
            "--parquet-freshness",
            "false",
            "--s3-endpoint",
            "http://127.0.0.1:9999",
            "--s3-bucket",
            "archive",
            "--s3-prefix",
            "pulse/raw",
            "--s3-region",
            "eu-west-1",
            "--s3-access-key-file",
            ak.to_str().unwrap(),
            "--s3-secret-key-file",
            sk.to_str().unwrap(),
            "--s3-path-style",
            "false",
            "--clickhouse-url",
            "http://127.0.0.1:8124",
            "--clickhouse-compression",
            "none",
            "--kafka-brokers",
            "127.0.0.1:19092",
            "--kafka-compression",
            "zstd",
            "--events-topic",
            "ev",
            "--dlq-topic",
            "dlq",
            "--retry-base-ms",
            "50",
            "--log-format",
            "text",
        ])
        .unwrap();
        assert_eq!(cfg.sink, Sink::Parquet);
        assert_eq!(cfg.group(), "pulse-writer-parquet");
        assert_eq!(
            (
                cfg.parquet_max_rows,
                cfg.parquet_max_bytes,
                cfg.parquet_max_age_ms
            ),
            (500, 2048, 250)
        );
        assert!(!cfg.parquet_freshness);
        assert_eq!(cfg.s3.endpoint, "http://127.0.0.1:9999");
        assert_eq!(cfg.s3.bucket, "archive");
        assert_eq!(cfg.s3.prefix, "pulse/raw");
        assert_eq!(cfg.s3.region, "eu-west-1");
        let (access, secret) = cfg.s3.credentials().unwrap();
        assert_eq!((access.expose(), secret.expose()), ("ak", "sk"));
        assert!(!cfg.s3.path_style);
        assert_eq!(cfg.clickhouse.url, "http://127.0.0.1:8124");
        assert_eq!(cfg.kafka.compression, "zstd");
        assert_eq!(
            (cfg.events_topic.as_str(), cfg.dlq_topic.as_str()),
            ("ev", "dlq")
        );
        assert!(pulse_platform::config::validate_all(&[&cfg]).is_ok());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_shadow_writer_reads_only_the_shadow_topics_into_the_shadow_tables() {
        let live = Config::try_parse_from(["pulse-writer"]).unwrap();
        assert_eq!(live.group(), "pulse-writer-clickhouse");
        assert_eq!(live.sink_tables(), SinkTables::default());
        assert_eq!(
            live.consumed_topics(),
            [topics::EVENTS, topics::USER_ACTIVITY, topics::SESSIONS]
        );
        let c = Config::try_parse_from(["pulse-writer", "--shadow", "gap-10m"]).unwrap();
        assert!(pulse_platform::config::validate_all(&[&c]).is_ok());
        assert_eq!(c.group(), "pulse-writer-clickhouse-shadow-gap-10m");
        assert_eq!(
            c.consumed_topics(),
            [
                "pulse.user-activity.v1.shadow.gap-10m",
                "pulse.sessions.v1.shadow.gap-10m"
            ]
        );
        assert_eq!(c.sink_topics().dlq, "pulse.events.dlq.v1.shadow.gap-10m");
        let tables = c.sink_tables();
        assert_eq!(tables.user_activity, "user_activity_shadow_gap_10m");
        assert_eq!(tables.sessions, "sessions_shadow_gap_10m");
        let live_tables = SinkTables::default();
        for t in [&tables.events, &tables.user_activity, &tables.sessions] {
            assert!(
                ![
                    &live_tables.events,
                    &live_tables.user_activity,
                    &live_tables.sessions
                ]
                .contains(&t),
                "{t}"
            );
        }
        for t in c.consumed_topics().iter().chain([&c.sink_topics().dlq]) {
            assert!(!topics::ALL_DATA_TOPICS.contains(&t.as_str()), "{t}");
        }
    }

    #[test]
    fn a_shadow_writer_runs_as_its_own_service() {
        assert_eq!(
            service_name_of(["pulse-writer", "--shadow", "x"]),
            SHADOW_SERVICE
        );
        assert_eq!(service_name_of(["pulse-writer"]), SERVICE);
    }

    #[test]
    fn a_shadow_is_for_the_clickhouse_sink_with_a_valid_name() {
        let c =
            Config::try_parse_from(["pulse-writer", "--sink", "parquet", "--shadow", "x"]).unwrap();
        let problems = pulse_platform::config::validate_all(&[&c]).unwrap_err().0;
        assert!(problems.iter().any(|p| p.key == "--shadow"), "{problems:?}");
        let err = Config::try_parse_from(["pulse-writer", "--shadow", "Not_Ok"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--shadow"), "{err}");
    }

    #[test]
    fn parquet_defaults_match_the_readme() {
        let cfg = Config::try_parse_from(["pulse-writer", "--sink", "parquet"]).unwrap();
        assert_eq!(cfg.parquet_max_rows, 100_000);
        assert_eq!(cfg.parquet_max_bytes, 64 * 1024 * 1024);
        assert_eq!(cfg.parquet_max_age_ms, 60_000);
        assert_eq!(cfg.parquet_max_buffer_bytes, 16 * 1024 * 1024);
        assert!(cfg.parquet_freshness);
    }

    #[test]
    fn bad_parquet_settings_are_all_reported() {
        let cfg = Config::try_parse_from([
            "pulse-writer",
            "--sink",
            "parquet",
            "--parquet-max-rows",
            "0",
            "--parquet-max-bytes",
            "10",
            "--parquet-max-age-ms",
            "1",
            "--s3-prefix",
            "/x/",
        ])
        .unwrap();
        let problems = pulse_platform::config::validate_all(&[&cfg]).unwrap_err().0;
        assert_eq!(problems.len(), 4, "{problems:?}");
    }
}
