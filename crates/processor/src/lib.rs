//! The processor: event-time windowed metrics over `pulse.events.v1` — per-user tumbling
//! window activity and gap-based sessions — with watermarks, allowed lateness, a late
//! side output, and effectively-once output (deterministic versions; offsets committed
//! only up to what open aggregates no longer need). Modules: `model` (input and settings),
//! `watermark`, `window`, `session`, `engine` (pure logic), `run` (the Kafka loop),
//! `metrics`.

pub mod checkpoint;
pub mod compact;
pub mod engine;
pub mod metrics;
pub mod model;
pub mod retention;
pub mod rules;
pub mod run;
pub mod session;
pub mod watermark;
pub mod window;

/// The unit tests' heap is the binary's (jemalloc), so its counters see what the state
/// holds (`engine` tests: the estimate against the heap).
#[cfg(test)]
#[global_allocator]
static ALLOC: pulse_platform::malloc::Allocator = pulse_platform::malloc::ALLOCATOR;

use std::net::SocketAddr;
use std::time::Duration;

use pulse_contracts::topics;
use pulse_contracts::wire::RegistryEncoder;
use pulse_platform::config::{Problems, Validate};
use pulse_platform::kafka::topics::{
    TopicError, TopicKind, TopicSpec, ensure_topics, topic_configs,
};
use pulse_platform::kafka::{KafkaConfig, KafkaConsumer, KafkaProducer};
use pulse_platform::service::ServiceContext;
use pulse_platform::telemetry::TelemetryConfig;
use pulse_platform::windowing::WindowSettings;

use crate::model::TimeConfig;

/// Service name: metrics label, OpenTelemetry `service.name`, log field.
pub const SERVICE: &str = "processor";
/// Service name of a shadow processor (`--shadow`): its metrics carry
/// `service="processor-shadow"`, its traces `service.name=processor-shadow`.
pub const SHADOW_SERVICE: &str = "processor-shadow";

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

/// Configuration; every flag has a `PULSE_*` environment fallback (see README).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "pulse-processor",
    version,
    about = "Event-time windowed metrics with watermarks, lateness and sessions."
)]
pub struct Config {
    /// Address of the admin server (/metrics, /livez, /readyz).
    #[arg(
        long = "admin-addr",
        env = "PULSE_ADMIN_ADDR",
        default_value = "127.0.0.1:9102"
    )]
    pub admin_addr: SocketAddr,
    /// TLS, header read timeout and limits of the admin server.
    #[command(flatten)]
    pub admin_server: pulse_platform::server::AdminServerArgs,
    /// Schema registry base URL (outputs are framed with their registered schema ids).
    #[arg(
        long = "schema-registry-url",
        env = "PULSE_SCHEMA_REGISTRY_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub schema_registry_url: String,
    #[command(flatten)]
    pub registry_auth: pulse_platform::registry_auth::RegistryAuthArgs,
    /// Consumer group; every replica of the processor uses the same one.
    #[arg(
        long = "group-id",
        env = "PULSE_PROCESSOR_GROUP_ID",
        default_value = "pulse-processor"
    )]
    pub group_id: String,
    /// Window size and allowed lateness, shared with the query API.
    #[command(flatten)]
    pub windowing: WindowSettings,
    /// Watermark = max event time seen − this, ms.
    #[arg(
        long = "max-out-of-orderness-ms",
        env = "PULSE_PROCESSOR_MAX_OUT_OF_ORDERNESS_MS",
        default_value_t = 5_000
    )]
    pub max_out_of_orderness_ms: i64,
    /// A partition silent this long (processing time) is idle and does not hold the watermark, ms.
    #[arg(
        long = "idle-timeout-ms",
        env = "PULSE_PROCESSOR_IDLE_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub idle_timeout_ms: i64,
    /// Event times beyond processing time + this never advance the watermark, ms.
    #[arg(
        long = "max-future-skew-ms",
        env = "PULSE_PROCESSOR_MAX_FUTURE_SKEW_MS",
        default_value_t = 300_000
    )]
    pub max_future_skew_ms: i64,
    /// Session gap, ms.
    #[arg(
        long = "session-gap-ms",
        env = "PULSE_PROCESSOR_SESSION_GAP_MS",
        default_value_t = 1_800_000
    )]
    pub session_gap_ms: i64,
    /// Maximum session duration (humantime, e.g. `12h`): a user's events with no gap longer
    /// than the session gap are cut into sessions shorter than this, so an always-active
    /// user cannot keep one session, and the partition's commit, open forever. Must be
    /// longer than the session gap.
    #[arg(
        long = "max-session-duration",
        env = "PULSE_PROCESSOR_MAX_SESSION_DURATION",
        default_value = "24h",
        value_parser = humantime::parse_duration
    )]
    pub max_session_duration: Duration,
    /// Interval of early (non-final) results and of offset storing, ms.
    #[arg(
        long = "emit-interval-ms",
        env = "PULSE_PROCESSOR_EMIT_INTERVAL_MS",
        default_value_t = 1_000
    )]
    pub emit_interval_ms: u64,
    /// State budget in bytes (0: none). When the estimated state (open windows and
    /// sessions, the checkpoints kept: `pulse_processor_state_bytes`) exceeds it, the
    /// processor is not ready ("state budget exceeded") and counts the tick in
    /// `pulse_processor_state_budget_exceeded_total`; it keeps processing, and loses or
    /// changes nothing (see README, Memory bounds).
    #[arg(
        long = "state-budget-bytes",
        env = "PULSE_PROCESSOR_STATE_BUDGET_BYTES",
        default_value_t = 0
    )]
    pub state_budget_bytes: u64,
    #[arg(long = "events-topic", env = "PULSE_EVENTS_TOPIC", default_value = topics::EVENTS)]
    pub events_topic: String,
    #[arg(long = "user-activity-topic", env = "PULSE_USER_ACTIVITY_TOPIC", default_value = topics::USER_ACTIVITY)]
    pub user_activity_topic: String,
    #[arg(long = "sessions-topic", env = "PULSE_SESSIONS_TOPIC", default_value = topics::SESSIONS)]
    pub sessions_topic: String,
    #[arg(long = "late-topic", env = "PULSE_LATE_TOPIC", default_value = topics::EVENTS_LATE)]
    pub late_topic: String,
    /// Compacted topic of per-partition checkpoints (resume offset, last offset, event-time progress).
    #[arg(long = "checkpoint-topic", env = "PULSE_PROCESSOR_CHECKPOINT_TOPIC", default_value = topics::PROCESSOR_CHECKPOINTS)]
    pub checkpoint_topic: String,
    /// Run as the shadow `<name>` (1–32 of a-z, 0-9, -): read the same events topic in
    /// the group `<group-id>-shadow-<name>`, and write the outputs, late events and
    /// checkpoints to `<topic>.shadow.<name>` instead of the live topics (see
    /// docs/operations.md). Unset: the live processor.
    #[arg(
        long = "shadow",
        env = "PULSE_PROCESSOR_SHADOW",
        value_parser = parse_shadow_name
    )]
    pub shadow: Option<String>,
    /// Start even when the events topic's retention is shorter than the longest span an
    /// open window or session holds (see README, Topics): records it still needs may be
    /// deleted, and their aggregates lose them after a restart.
    #[arg(
        long = "allow-short-retention",
        env = "PULSE_PROCESSOR_ALLOW_SHORT_RETENTION"
    )]
    pub allow_short_retention: bool,
    /// The name of the processing rules in force (1–64 of A-Z a-z 0-9 . _ -, e.g.
    /// `2026-12-rc1`). Every output carries the rules version `<name>+<fingerprint>`, the
    /// fingerprint being 12 hex digits of a hash of the rule values (window, allowed
    /// lateness, out-of-orderness, session gap, maximum session duration); unset: the
    /// fingerprint alone (see docs/operations.md, Processing rules and their version).
    #[arg(
        long = "rules-version",
        env = "PULSE_PROCESSOR_RULES_VERSION",
        value_parser = rules::parse_name
    )]
    pub rules_version: Option<String>,
    /// The append-only audit topic the rules in force are recorded to at every start
    /// (`processor.rules`, or `processor.rules.changed` when they differ from the last
    /// record of this consumer group).
    #[arg(long = "audit-topic", env = "PULSE_AUDIT_TOPIC", default_value = topics::AUDIT)]
    pub audit_topic: String,
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}

/// `--shadow`'s value parser (clap names the flag in its error).
fn parse_shadow_name(s: &str) -> Result<String, String> {
    topics::validate_shadow_name(s).map(str::to_owned)
}

impl Config {
    /// The consumer group: `--group-id`, or for a shadow `<group-id>-shadow-<name>`.
    pub fn group(&self) -> String {
        match &self.shadow {
            Some(name) => topics::shadow_group(&self.group_id, name),
            None => self.group_id.clone(),
        }
    }

    /// The topic this instance writes instead of the live topic `live`: `live` itself,
    /// or for a shadow `<live>.shadow.<name>`.
    fn output(&self, live: &str) -> String {
        match &self.shadow {
            Some(name) => topics::shadow_topic(live, name),
            None => live.to_owned(),
        }
    }

    /// The checkpoint topic this instance reads and writes (a shadow has its own).
    pub fn checkpoint_topic(&self) -> String {
        self.output(&self.checkpoint_topic)
    }

    /// The topics this instance produces to (outputs, late events, checkpoints).
    pub fn produced_topics(&self) -> Vec<String> {
        let t = self.topics();
        vec![t.user_activity, t.sessions, t.late, self.checkpoint_topic()]
    }

    /// The live topics a shadow must never produce to: the configured ones and the
    /// defaults.
    pub fn live_topics(&self) -> Vec<String> {
        let mut live: Vec<String> = [
            &self.events_topic,
            &self.user_activity_topic,
            &self.sessions_topic,
            &self.late_topic,
            &self.checkpoint_topic,
        ]
        .into_iter()
        .cloned()
        .collect();
        live.extend(
            topics::ALL_DATA_TOPICS
                .iter()
                .chain(&[topics::PROCESSOR_CHECKPOINTS, topics::SCHEMAS])
                .map(|t| (*t).to_owned()),
        );
        live
    }

    /// For a shadow: refuses any produced topic that is a live one (a guard behind the
    /// naming, checked before the processor starts).
    pub fn check_shadow_outputs(&self) -> Result<(), Error> {
        if self.shadow.is_none() {
            return Ok(());
        }
        let live = self.live_topics();
        match self
            .produced_topics()
            .into_iter()
            .find(|t| live.contains(t))
        {
            Some(topic) => Err(Error::ShadowWritesLive(topic)),
            None => Ok(()),
        }
    }

    pub fn time(&self) -> TimeConfig {
        TimeConfig {
            window_ms: self.windowing.window_ms,
            allowed_lateness_ms: self.windowing.allowed_lateness_ms,
            max_out_of_orderness_ms: self.max_out_of_orderness_ms,
            idle_timeout_ms: self.idle_timeout_ms,
            max_future_skew_ms: self.max_future_skew_ms,
            session_gap_ms: self.session_gap_ms,
        }
    }

    /// The processing rules: the settings that change the numbers.
    pub fn rules(&self) -> rules::Rules {
        rules::Rules {
            window_ms: self.windowing.window_ms,
            allowed_lateness_ms: self.windowing.allowed_lateness_ms,
            max_out_of_orderness_ms: self.max_out_of_orderness_ms,
            session_gap_ms: self.session_gap_ms,
            max_session_ms: self.max_session_ms(),
        }
    }

    /// The rules version every output carries: `<--rules-version>+<fingerprint>`, or the
    /// fingerprint alone.
    pub fn rules_version(&self) -> String {
        rules::rules_version(self.rules_version.as_deref(), &self.rules())
    }

    /// The maximum session duration in ms (saturating).
    pub fn max_session_ms(&self) -> i64 {
        i64::try_from(self.max_session_duration.as_millis()).unwrap_or(i64::MAX)
    }

    /// The shortest retention of the events topic that keeps every record an open window
    /// or session may need: max session duration + session gap + allowed lateness +
    /// window + max out-of-orderness.
    pub fn needed_retention(&self) -> Duration {
        let ms = [
            self.session_gap_ms,
            self.windowing.allowed_lateness_ms,
            self.windowing.window_ms,
            self.max_out_of_orderness_ms,
        ]
        .iter()
        .map(|v| u64::try_from(*v).unwrap_or(0))
        .fold(0_u64, u64::saturating_add);
        self.max_session_duration
            .saturating_add(Duration::from_millis(ms))
    }

    /// The topics the processor reads and writes, with their kinds.
    pub fn topic_specs(&self) -> Vec<TopicSpec> {
        let partitions = self.kafka.partitions;
        let t = self.topics();
        vec![
            TopicSpec::of(TopicKind::Events, &t.events, partitions),
            TopicSpec::of(TopicKind::Aggregates, &t.user_activity, partitions),
            TopicSpec::of(TopicKind::Aggregates, &t.sessions, partitions),
            TopicSpec::of(TopicKind::Late, &t.late, partitions),
            TopicSpec::compacted(self.checkpoint_topic()),
        ]
    }

    /// The topics the loop reads and writes (for a shadow, its shadow topics).
    pub fn topics(&self) -> run::Topics {
        run::Topics {
            events: self.events_topic.clone(),
            user_activity: self.output(&self.user_activity_topic),
            sessions: self.output(&self.sessions_topic),
            late: self.output(&self.late_topic),
        }
    }
}

impl Validate for Config {
    fn validate(&self, p: &mut Problems) {
        self.windowing.validate(p);
        self.registry_auth.validate(p);
        p.check(
            self.max_out_of_orderness_ms >= 0,
            "--max-out-of-orderness-ms",
            "must be >= 0",
        );
        p.check(
            self.idle_timeout_ms >= 1,
            "--idle-timeout-ms",
            "must be >= 1",
        );
        p.check(
            self.max_future_skew_ms >= 0,
            "--max-future-skew-ms",
            "must be >= 0",
        );
        p.check(self.session_gap_ms >= 1, "--session-gap-ms", "must be >= 1");
        p.check(
            self.max_session_ms() > self.session_gap_ms,
            "--max-session-duration",
            "must be longer than the session gap (--session-gap-ms)",
        );
        p.check(
            self.emit_interval_ms >= 10,
            "--emit-interval-ms",
            "must be >= 10",
        );
        p.check(!self.group_id.is_empty(), "--group-id", "must not be empty");
        p.check(
            self.allow_short_retention || self.kafka.topics.events_retention >= self.needed_retention(),
            "--kafka-events-retention / PULSE_KAFKA_EVENTS_RETENTION",
            format!(
                "{} is shorter than the {} open sessions and windows need (max session duration + session gap + allowed lateness + window + max out-of-orderness); raise it or pass --allow-short-retention",
                humantime::format_duration(self.kafka.topics.events_retention),
                humantime::format_duration(self.needed_retention())
            ),
        );
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
    #[error("{0}")]
    Run(#[from] run::RunError),
    #[error("{0}")]
    ShortRetention(#[from] retention::ShortRetention),
    #[error("schema registry client: {0}")]
    RegistryClient(String),
    #[error("--shadow: the shadow would produce to the live topic {0}; refusing to start")]
    ShadowWritesLive(String),
}

/// The registry client, with the configured credentials.
pub fn registry_encoder(config: &Config) -> Result<RegistryEncoder, Error> {
    let credentials = config
        .registry_auth
        .credentials()
        .map_err(Error::RegistryClient)?;
    let ca_pem = config
        .registry_auth
        .ca_pem()
        .map_err(Error::RegistryClient)?;
    RegistryEncoder::with_options(
        &config.schema_registry_url,
        pulse_contracts::wire::RegistryClientOptions {
            credentials: credentials.as_ref().map(|(u, p)| (u.as_str(), p.expose())),
            ca_pem: ca_pem.as_deref(),
        },
    )
    .map_err(|e| Error::RegistryClient(e.to_string()))
}

/// The processor's producer (outputs, late events, checkpoints) gets these unless
/// `--kafka-option` sets them: a bound in bytes on the records waiting in librdkafka's queue
/// (librdkafka's own: 1,048,576 KiB; its count bound is `--kafka-queue-max-messages`). The
/// queue is outside the Rust heap (librdkafka's copies, glibc's malloc), beside the state,
/// and glibc keeps most of what a burst took: when a watermark closes 120,000 windows at
/// once their final records went into it faster than the broker acknowledged them, +96 MiB
/// of RSS within 5 s with librdkafka's bound; with 8 MiB the memory outside the heap still
/// rose 19 → 39 MiB after the first such close and stayed (memory benchmark, issue #15).
/// Full, it makes the loop wait (backpressure: the enqueues wait for room), nothing is
/// dropped; a record is at most a checkpoint part (256 KiB) or an aggregate, far below it.
pub const PRODUCER_DEFAULT_OPTIONS: &[(&str, &str)] = &[("queue.buffering.max.kbytes", "2048")];

/// How long a revoke waits for queued outputs and checkpoints to be acknowledged.
const REVOKE_FLUSH_TIMEOUT: Duration = Duration::from_secs(30);

/// Builds the processor loop for `config` (used by `run` and by tests).
pub async fn build(config: &Config) -> Result<run::Processor, Error> {
    config.check_shadow_outputs()?;
    ensure_topics(&config.kafka, &config.topic_specs()).await?;
    let (consumer, rebalances) = KafkaConsumer::new(
        &config.kafka,
        client_id(config),
        &config.group(),
        &[&config.events_topic],
    )?;
    let producer = KafkaProducer::new(
        &config.kafka.with_default_options(PRODUCER_DEFAULT_OPTIONS),
        client_id(config),
    )?;
    // Outputs and checkpoints already queued land before a revoke's commit, so the next
    // owner of a partition reads the newest checkpoint (see `run::Pipeline`).
    let flusher = producer.clone();
    consumer.before_revoke(move || {
        if let Err(e) = flusher.flush(REVOKE_FLUSH_TIMEOUT) {
            tracing::warn!(error = %e, "flushing queued outputs before a revoke failed");
        }
    });
    Ok(run::Processor {
        engine: engine::Engine::new(config.time()).with_max_session_ms(config.max_session_ms()),
        consumer,
        rebalances,
        producer,
        encoder: registry_encoder(config)?,
        topics: config.topics(),
        tick: Duration::from_millis(config.emit_interval_ms),
        checkpoints: checkpoint::CheckpointStore {
            topic: config.checkpoint_topic(),
            group: config.group(),
            input_topic: config.events_topic.clone(),
            kafka: config.kafka.clone(),
            generations: Default::default(),
        },
        health: Default::default(),
        state_budget_bytes: config.state_budget_bytes,
        rules_version: config.rules_version(),
    })
}

/// How long reading the audit trail, and writing its record, may take at start.
const AUDIT_TIMEOUT: Duration = Duration::from_secs(10);

/// Records the rules in force in the audit trail (`--audit-topic`, created if missing):
/// `processor.rules`, or `processor.rules.changed` when the last record of this consumer
/// group holds another version. Never fails the start (see [`rules::audit_start`]).
pub async fn audit_rules(
    config: &Config,
    producer: &KafkaProducer,
) -> pulse_platform::audit::AuditRecord {
    pulse_platform::audit::describe();
    let spec = pulse_platform::audit::topic_spec(&config.audit_topic);
    if let Err(e) = ensure_topics(&config.kafka, &[spec]).await {
        tracing::warn!(topic = config.audit_topic, error = %e, "cannot create the audit topic");
    }
    let (version, rules, group) = (config.rules_version(), config.rules(), config.group());
    let now = rules::InForce {
        service: if config.shadow.is_some() {
            SHADOW_SERVICE
        } else {
            SERVICE
        },
        group: &group,
        version: &version,
        rules: &rules,
    };
    rules::audit_start(
        &config.kafka,
        producer,
        &config.audit_topic,
        &now,
        AUDIT_TIMEOUT,
    )
    .await
}

/// The Kafka client id: `pulse-processor`, or `pulse-processor-shadow` for a shadow (so
/// broker-side logs and quotas tell them apart).
fn client_id(config: &Config) -> &'static str {
    if config.shadow.is_some() {
        "pulse-processor-shadow"
    } else {
        "pulse-processor"
    }
}

/// Refuses to start (unless `--allow-short-retention`) when the events topic's
/// retention is shorter than [`Config::needed_retention`]. A broker that cannot describe
/// the topic's configs, or does not report its retention, is logged at WARN and the
/// processor starts.
pub async fn check_events_retention(config: &Config) -> Result<(), Error> {
    let topic = &config.events_topic;
    let needed = config.needed_retention();
    let configs = match topic_configs(&config.kafka, topic).await {
        Ok(Some(c)) => c,
        Ok(None) => {
            tracing::warn!(
                topic,
                "the events topic does not exist; its retention is not checked"
            );
            return Ok(());
        }
        Err(e) => {
            tracing::warn!(topic, error = %e, "cannot describe the events topic's configs; its retention is not checked");
            return Ok(());
        }
    };
    match retention::judge(&configs, needed) {
        retention::Verdict::Enough => {
            tracing::info!(topic, needed = %humantime::format_duration(needed), "the events topic's retention covers open sessions and windows");
            Ok(())
        }
        retention::Verdict::Unknown(why) => {
            tracing::warn!(topic, why, needed = %humantime::format_duration(needed), "the events topic's retention is not checked");
            Ok(())
        }
        retention::Verdict::Short { retention } => {
            let e = retention::ShortRetention {
                topic: topic.clone(),
                retention,
                needed,
            };
            if config.allow_short_retention {
                tracing::warn!(error = %e, "starting anyway (--allow-short-retention)");
                Ok(())
            } else {
                Err(e.into())
            }
        }
    }
}

/// Runs the service until shutdown.
pub async fn run(config: Config, ctx: ServiceContext) -> Result<(), Error> {
    crate::metrics::describe();
    // A rotation of the admin listener's certificate is a key change: audited
    // (`keys.tls.reload`) by a producer made when one happens.
    pulse_platform::audit::set_process_log(
        if config.shadow.is_some() {
            SHADOW_SERVICE
        } else {
            SERVICE
        },
        pulse_platform::audit::AuditLog::on_demand(
            &config.kafka,
            "pulse-processor-audit",
            &config.audit_topic,
        ),
    );
    config.check_shadow_outputs()?;
    if let Some(name) = &config.shadow {
        tracing::info!(
            shadow = name,
            group = config.group(),
            outputs = ?config.produced_topics(),
            "running as a shadow: nothing is written to the live topics"
        );
    }
    let produced = config.produced_topics();
    crate::metrics::init(&produced.iter().map(String::as_str).collect::<Vec<_>>());
    // The heap gauges every second on their own, not only at the loop's emissions: a
    // blocked or busy loop (a rebalance's restore, a mass close) would leave them seconds
    // stale, and RSS compared with a stale reading looked like memory outside the heap
    // (issue #15, the 1M-user run).
    tokio::spawn(crate::metrics::refresh_heap(ctx.shutdown.child_token()));
    // Before anything else, so a topic that would lose records keeps the processor from
    // starting at all (the topics are created first when missing).
    ensure_topics(&config.kafka, &config.topic_specs()).await?;
    check_events_retention(&config).await?;
    // Outputs can be framed only once their subjects are registered (pulsectl schemas
    // register, the chart's schema Job): wait for them, not ready, instead of failing the
    // first emission and crash-looping on a fresh install.
    let encoder = registry_encoder(&config)?;
    let outputs = config.topics();
    let register = match &config.shadow {
        Some(name) => format!("pulsectl shadow schemas --shadow {name}"),
        None => "pulsectl schemas register".to_owned(),
    };
    for (topic, schema) in [
        (
            &outputs.user_activity,
            pulse_contracts::schemas::USER_WINDOW_ACTIVITY,
        ),
        (&outputs.sessions, pulse_contracts::schemas::SESSION),
    ] {
        let registered = ctx
            .wait_until_ok(
                &format!("the schema of {topic} in the registry (run {register})"),
                || async {
                    encoder
                        .encode(topic, schema.full_name, &[])
                        .await
                        .map(|_| ())
                },
            )
            .await;
        if !registered {
            return Ok(());
        }
    }
    let mut processor = build(&config).await?;
    processor.health = ctx.health.clone();
    audit_rules(&config, &processor.producer).await;
    // An output producer that cannot deliver (a stalled or broken broker) makes the
    // processor not ready and is recreated (see platform::kafka::producer); the emission
    // that failed stops the loop, and the orchestrator restarts it from its checkpoints.
    let _watchdog = ctx.watch_producer(
        &processor.producer,
        "kafka-producer",
        config.kafka.producer_stall_timeout,
    );
    // A member left owning nothing while the group's partitions do not advance is not
    // ready, with the reason, while its watchdog rejoins the group (platform consumer).
    processor
        .consumer
        .watch_health(ctx.health.clone(), "kafka-consumer");
    ctx.health.set_ready(true);
    let stop = ctx.shutdown.child_token();
    processor.run(stop).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;

    fn parse(args: &[&str]) -> Config {
        Config::try_parse_from(std::iter::once("pulse-processor").chain(args.iter().copied()))
            .unwrap_or_else(|e| panic!("{e}"))
    }

    fn problems(c: &Config) -> String {
        let mut p = Problems::default();
        c.validate(&mut p);
        p.into_result()
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    }

    #[test]
    fn the_producer_queue_is_bounded_in_bytes() {
        let c = KafkaConfig::for_brokers("b:9092").with_default_options(PRODUCER_DEFAULT_OPTIONS);
        assert_eq!(
            c.options,
            vec!["queue.buffering.max.kbytes=2048".to_owned()]
        );
    }

    #[test]
    fn the_maximum_session_duration_is_a_humantime_flag_defaulting_to_a_day() {
        let c = parse(&[]);
        assert_eq!(c.max_session_ms(), 24 * 3_600_000);
        assert_eq!(problems(&c), "");
        let c = parse(&["--max-session-duration", "12h"]);
        assert_eq!(c.max_session_ms(), 12 * 3_600_000);
        assert!(
            Config::try_parse_from(["pulse-processor", "--max-session-duration", "12"]).is_err()
        );
    }

    #[test]
    fn a_maximum_session_duration_not_longer_than_the_gap_is_refused() {
        let c = parse(&["--max-session-duration", "30m"]);
        assert!(
            problems(&c).contains("--max-session-duration"),
            "{}",
            problems(&c)
        );
        let c = parse(&[
            "--max-session-duration",
            "30m",
            "--session-gap-ms",
            "600000",
        ]);
        assert_eq!(problems(&c), "");
    }

    #[test]
    fn the_events_retention_must_cover_the_longest_session_unless_allowed() {
        let c = parse(&[]);
        // 24 h + 30 min gap + 1 min lateness + 1 min window + 5 s out-of-orderness.
        assert_eq!(
            c.needed_retention(),
            Duration::from_millis(86_400_000 + 1_800_000 + 60_000 + 60_000 + 5_000)
        );
        let c = parse(&["--kafka-events-retention", "1d"]);
        let text = problems(&c);
        assert!(
            text.contains("--kafka-events-retention") && text.contains("1day 32m 5s"),
            "{text}"
        );
        let c = parse(&["--kafka-events-retention", "1d", "--allow-short-retention"]);
        assert_eq!(problems(&c), "");
    }

    #[test]
    fn a_shadow_reads_the_live_events_in_its_own_group_and_writes_only_shadow_topics() {
        let live = parse(&[]);
        assert_eq!(live.group(), "pulse-processor");
        assert_eq!(live.topics().sessions, topics::SESSIONS);
        assert!(live.check_shadow_outputs().is_ok());
        let c = parse(&["--shadow", "gap-10m"]);
        assert_eq!(c.group(), "pulse-processor-shadow-gap-10m");
        let t = c.topics();
        assert_eq!(t.events, topics::EVENTS, "the shadow reads the live events");
        assert_eq!(t.user_activity, "pulse.user-activity.v1.shadow.gap-10m");
        assert_eq!(t.sessions, "pulse.sessions.v1.shadow.gap-10m");
        assert_eq!(t.late, "pulse.events.late.v1.shadow.gap-10m");
        assert_eq!(
            c.checkpoint_topic(),
            "pulse.processor.checkpoints.v1.shadow.gap-10m"
        );
        // What it creates at start: the shadow topics, and the live events topic it reads.
        let created: Vec<String> = c.topic_specs().iter().map(|s| s.name.clone()).collect();
        assert_eq!(created[0], topics::EVENTS);
        assert_eq!(created[1..].to_vec(), c.produced_topics());
    }

    #[test]
    fn no_live_topic_can_be_produced_to_in_shadow_mode() {
        // Every topic flag set to every live name (and to each other), so a shadow whose
        // live topics are configured oddly is covered too.
        let flags = [
            "--events-topic",
            "--user-activity-topic",
            "--sessions-topic",
            "--late-topic",
            "--checkpoint-topic",
        ];
        let names = [topics::ALL_DATA_TOPICS, &[topics::PROCESSOR_CHECKPOINTS]].concat();
        for flag in flags {
            for name in &names {
                let c = parse(&["--shadow", "x", flag, name]);
                let live = c.live_topics();
                for produced in c.produced_topics() {
                    assert!(!live.contains(&produced), "{flag} {name}: {produced}");
                    assert!(topics::is_shadow_topic(&produced), "{produced}");
                }
                assert!(c.check_shadow_outputs().is_ok());
            }
        }
        // A live topic that is itself named like another's shadow is caught by the guard.
        let c = parse(&[
            "--shadow",
            "x",
            "--late-topic",
            "pulse.sessions.v1",
            "--sessions-topic",
            "pulse.sessions.v1.shadow.x.shadow.x",
            "--user-activity-topic",
            "pulse.sessions.v1.shadow.x",
        ]);
        assert!(matches!(
            c.check_shadow_outputs(),
            Err(Error::ShadowWritesLive(t)) if t == "pulse.sessions.v1.shadow.x.shadow.x"
        ));
    }

    #[test]
    fn a_shadow_runs_as_its_own_service() {
        assert_eq!(
            service_name_of(["pulse-processor", "--shadow", "x"]),
            SHADOW_SERVICE
        );
        assert_eq!(service_name_of(["pulse-processor"]), SERVICE);
        // A command line that does not parse is reported by the service's main.
        assert_eq!(
            service_name_of(["pulse-processor", "--shadow", "X"]),
            SERVICE
        );
    }

    #[test]
    fn a_bad_shadow_name_is_refused_naming_the_flag() {
        for bad in ["", "Gap", "gap_10", &"x".repeat(33)] {
            let err = Config::try_parse_from(["pulse-processor", "--shadow", bad])
                .unwrap_err()
                .to_string();
            assert!(err.contains("--shadow"), "{err}");
        }
    }

    #[test]
    fn the_rules_version_follows_the_rule_flags_and_nothing_else() {
        let base = parse(&[]);
        let v = base.rules_version();
        assert_eq!(
            v,
            base.rules().fingerprint(),
            "no name: the fingerprint alone"
        );
        // Settings that are not rules leave it as it is.
        for unrelated in [
            &["--emit-interval-ms", "250"][..],
            &["--idle-timeout-ms", "5000"],
            &["--max-future-skew-ms", "1000"],
            &["--state-budget-bytes", "1000000"],
            &["--group-id", "other"],
            &["--shadow", "x"],
            &["--sessions-topic", "s"],
            &["--kafka-partitions", "8"],
            &["--allow-short-retention"],
        ] {
            assert_eq!(parse(unrelated).rules_version(), v, "{unrelated:?}");
        }
        // Each rule changes it.
        let mut seen = std::collections::BTreeSet::from([v.clone()]);
        for rule in [
            &["--window-ms", "30000"][..],
            &["--allowed-lateness-ms", "0"],
            &["--max-out-of-orderness-ms", "1000"],
            &["--session-gap-ms", "600000"],
            &["--max-session-duration", "12h"],
        ] {
            assert!(seen.insert(parse(rule).rules_version()), "{rule:?}");
        }
        let named = parse(&["--rules-version", "2026-12-rc1"]);
        assert_eq!(named.rules_version(), format!("2026-12-rc1+{v}"));
    }

    #[test]
    fn a_bad_rules_version_name_is_refused_naming_the_flag() {
        for bad in ["", "a+b", "-x", "a b"] {
            let arg = format!("--rules-version={bad}");
            let err = Config::try_parse_from(["pulse-processor", arg.as_str()])
                .unwrap_err()
                .to_string();
            assert!(err.contains("--rules-version"), "{err}");
        }
    }

    #[test]
    fn the_processor_creates_its_topics_with_their_kinds() {
        let kinds: Vec<TopicKind> = parse(&[]).topic_specs().iter().map(|s| s.kind).collect();
        assert_eq!(
            kinds,
            [
                TopicKind::Events,
                TopicKind::Aggregates,
                TopicKind::Aggregates,
                TopicKind::Late,
                TopicKind::Compacted
            ]
        );
    }
}
