//! The ingest service: HTTP (axum) and gRPC (tonic) intake. Events are validated,
//! enriched, filtered by the PII policy, deduplicated, framed with the registered schema
//! id and produced to `pulse.events.v1`; rejected ones go to `pulse.events.dlq.v1` with the
//! reason. Modules: `body` (HTTP bodies), `validate`/`amount` (the event contract), `auth`
//! (API keys, rate limits), `pii`, `dedup`, `pipeline` (shared by both transports),
//! `http`, `grpc`, `metrics`.

pub mod amount;
pub mod auth;
pub mod body;
pub mod dedup;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod pii;
pub mod pipeline;
pub mod validate;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pulse_contracts::pb::ingest::v1::ingest_service_server::IngestServiceServer;
use pulse_contracts::topics;
use pulse_contracts::wire::RegistryEncoder;
use pulse_platform::config::{Problems, Validate};
use pulse_platform::kafka::topics::{TopicError, TopicSpec, ensure_topics};
use pulse_platform::kafka::{KafkaConfig, KafkaProducer};
use pulse_platform::secret::Secret;
use pulse_platform::service::ServiceContext;
use pulse_platform::telemetry::TelemetryConfig;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{ApiKeys, RateLimiter};
use crate::body::BodyLimits;
use crate::dedup::DedupSet;
use crate::pii::PiiPolicy;
use crate::pipeline::{Framer, Ingestor, PipelineConfig};
use crate::validate::Limits;

/// Service name: metrics label, OpenTelemetry `service.name`, log field.
pub const SERVICE: &str = "ingest";

/// The API key of the local dev stack (documented in the README; never use it elsewhere).
pub const DEV_API_KEY: &str = "pulse-dev-key";

/// Configuration; every flag has a `PULSE_*` environment fallback (see README).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "pulse-ingest", version, about = "HTTP and gRPC event intake.")]
pub struct Config {
    /// HTTP listen address.
    #[arg(
        long = "http-addr",
        env = "PULSE_INGEST_HTTP_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub http_addr: SocketAddr,
    /// gRPC listen address.
    #[arg(
        long = "grpc-addr",
        env = "PULSE_INGEST_GRPC_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub grpc_addr: SocketAddr,
    /// Address of the admin server (/metrics, /livez, /readyz).
    #[arg(
        long = "admin-addr",
        env = "PULSE_ADMIN_ADDR",
        default_value = "127.0.0.1:9101"
    )]
    pub admin_addr: SocketAddr,
    /// Schema registry base URL (events are framed with the id registered for `<topic>-value`).
    #[arg(
        long = "schema-registry-url",
        env = "PULSE_SCHEMA_REGISTRY_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub schema_registry_url: String,
    /// API keys as `key=source,…`. Prefer the env var or a file; never logged.
    #[arg(
        long = "api-keys",
        env = "PULSE_INGEST_API_KEYS",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub api_keys: Secret,
    /// File with one `key=source` per line (e.g. a mounted Kubernetes secret).
    #[arg(long = "api-keys-file", env = "PULSE_INGEST_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Per-key rate limit, events per second (0 = unlimited).
    #[arg(
        long = "rate-limit",
        env = "PULSE_INGEST_RATE_LIMIT",
        default_value_t = 10_000.0
    )]
    pub rate_limit: f64,
    /// Per-key burst, events.
    #[arg(
        long = "rate-burst",
        env = "PULSE_INGEST_RATE_BURST",
        default_value_t = 20_000.0
    )]
    pub rate_burst: f64,
    /// Maximum request body on the wire, bytes.
    #[arg(long = "max-body-bytes", env = "PULSE_INGEST_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Maximum body after gzip decoding, bytes.
    #[arg(long = "max-decompressed-bytes", env = "PULSE_INGEST_MAX_DECOMPRESSED_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_decompressed_bytes: usize,
    /// Maximum events per request (HTTP) or per message (gRPC).
    #[arg(
        long = "max-batch-events",
        env = "PULSE_INGEST_MAX_BATCH_EVENTS",
        default_value_t = 1000
    )]
    pub max_batch_events: usize,
    /// Most events one gRPC `StreamEvents` call may carry (its single answer holds one
    /// result per event); the message that would exceed it is refused with
    /// RESOURCE_EXHAUSTED. `SendEventsStream` answers per message and has no such limit.
    #[arg(
        long = "max-stream-events",
        env = "PULSE_INGEST_MAX_STREAM_EVENTS",
        default_value_t = 50_000
    )]
    pub max_stream_events: usize,
    /// Most bytes of a rejected original a DLQ record keeps; longer originals (an
    /// unparseable 8 MiB body, say) are cut to this and flagged with their size
    /// (`pulse-original-size`), so the record always fits the broker's message limit
    /// (librdkafka's `message.max.bytes`, 1,000,000 by default, headers included).
    #[arg(
        long = "max-dlq-original-bytes",
        env = "PULSE_INGEST_MAX_DLQ_ORIGINAL_BYTES",
        default_value_t = 900 * 1024
    )]
    pub max_dlq_original_bytes: usize,
    /// Maximum size of one event, bytes.
    #[arg(long = "max-event-bytes", env = "PULSE_INGEST_MAX_EVENT_BYTES", default_value_t = 32 * 1024)]
    pub max_event_bytes: usize,
    /// How far in the future an event time may be, ms.
    #[arg(
        long = "max-future-skew-ms",
        env = "PULSE_INGEST_MAX_FUTURE_SKEW_MS",
        default_value_t = 300_000
    )]
    pub max_future_skew_ms: i64,
    /// How old an event time may be, ms.
    #[arg(long = "max-age-ms", env = "PULSE_INGEST_MAX_AGE_MS", default_value_t = 7 * 24 * 3_600_000)]
    pub max_age_ms: i64,
    /// Oldest supported `schema_version`.
    #[arg(
        long = "min-schema-version",
        env = "PULSE_INGEST_MIN_SCHEMA_VERSION",
        default_value_t = 1
    )]
    pub min_schema_version: u32,
    /// Newest supported `schema_version`.
    #[arg(
        long = "max-schema-version",
        env = "PULSE_INGEST_MAX_SCHEMA_VERSION",
        default_value_t = 1
    )]
    pub max_schema_version: u32,
    /// Event ids remembered for dedup (memory bound).
    #[arg(
        long = "dedup-capacity",
        env = "PULSE_INGEST_DEDUP_CAPACITY",
        default_value_t = 1_000_000
    )]
    pub dedup_capacity: usize,
    /// How long an event id is remembered, seconds.
    #[arg(
        long = "dedup-window-secs",
        env = "PULSE_INGEST_DEDUP_WINDOW_SECS",
        default_value_t = 600
    )]
    pub dedup_window_secs: u64,
    /// PII policy: `path=keep|drop|hash|truncate,…,email=<action>` (see README).
    #[arg(long = "pii-policy", env = "PULSE_INGEST_PII_POLICY", default_value = PiiPolicy::DEFAULT_SPEC)]
    pub pii_policy: String,
    /// HMAC key for hashed PII. Prefer the env var or a file; never logged.
    #[arg(
        long = "pii-hmac-key",
        env = "PULSE_INGEST_PII_HMAC_KEY",
        default_value = "",
        hide_env_values = true,
        hide_default_value = true
    )]
    pub pii_hmac_key: Secret,
    /// File holding the HMAC key for hashed PII.
    #[arg(long = "pii-hmac-key-file", env = "PULSE_INGEST_PII_HMAC_KEY_FILE")]
    pub pii_hmac_key_file: Option<PathBuf>,
    /// How long a request may wait for room in a full producer queue before 503.
    #[arg(
        long = "max-backpressure-wait-ms",
        env = "PULSE_INGEST_MAX_BACKPRESSURE_WAIT_MS",
        default_value_t = 100
    )]
    pub max_backpressure_wait_ms: u64,
    /// How long a request waits for an earlier attempt of the same event id that is
    /// still waiting for the broker (then it is a duplicate if that attempt was stored,
    /// new if it failed) before answering 503; e.g. `5s`, `500ms`.
    #[arg(
        long = "in-flight-wait",
        env = "PULSE_INGEST_IN_FLIGHT_WAIT",
        default_value = "5s",
        value_parser = humantime::parse_duration
    )]
    pub in_flight_wait: Duration,
    /// Retry-After seconds on 503.
    #[arg(
        long = "retry-after-secs",
        env = "PULSE_INGEST_RETRY_AFTER_SECS",
        default_value_t = 1
    )]
    pub retry_after_secs: u64,
    /// Topic of accepted events.
    #[arg(long = "events-topic", env = "PULSE_EVENTS_TOPIC", default_value = topics::EVENTS)]
    pub events_topic: String,
    /// Dead-letter topic.
    #[arg(long = "dlq-topic", env = "PULSE_DLQ_TOPIC", default_value = topics::EVENTS_DLQ)]
    pub dlq_topic: String,
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}

impl Config {
    fn api_keys_resolved(&self) -> Result<ApiKeys, String> {
        let mut keys = ApiKeys::parse(self.api_keys.expose())?;
        if let Some(path) = &self.api_keys_file {
            keys.extend(ApiKeys::from_file(path)?);
        }
        Ok(keys)
    }

    fn hmac_key(&self) -> Result<Vec<u8>, String> {
        match &self.pii_hmac_key_file {
            Some(path) => std::fs::read(path)
                .map(|k| k.trim_ascii().to_vec())
                .map_err(|e| format!("reading {}: {e}", path.display())),
            None => Ok(self.pii_hmac_key.expose().as_bytes().to_vec()),
        }
    }

    fn pii(&self) -> Result<PiiPolicy, String> {
        PiiPolicy::parse(&self.pii_policy, &self.hmac_key()?)
    }

    pub fn limits(&self) -> Limits {
        Limits {
            min_schema_version: self.min_schema_version,
            max_schema_version: self.max_schema_version,
            max_future_skew_ms: self.max_future_skew_ms,
            max_age_ms: self.max_age_ms,
            max_event_bytes: self.max_event_bytes,
            ..Limits::default()
        }
    }

    pub fn body_limits(&self) -> BodyLimits {
        BodyLimits {
            max_body_bytes: self.max_body_bytes,
            max_decompressed_bytes: self.max_decompressed_bytes,
            max_batch_events: self.max_batch_events,
        }
    }
}

impl Validate for Config {
    fn validate(&self, p: &mut Problems) {
        match self.api_keys_resolved() {
            Ok(k) => p.check(
                !k.is_empty(),
                "--api-keys / PULSE_INGEST_API_KEYS / --api-keys-file",
                "at least one API key is required",
            ),
            Err(e) => p.add("--api-keys / PULSE_INGEST_API_KEYS / --api-keys-file", e),
        }
        if let Err(e) = self.pii() {
            p.add("--pii-policy / PULSE_INGEST_PII_POLICY", e);
        }
        p.check(
            self.schema_registry_url.starts_with("http://")
                || self.schema_registry_url.starts_with("https://"),
            "--schema-registry-url / PULSE_SCHEMA_REGISTRY_URL",
            format!("must be an http(s) URL, got {:?}", self.schema_registry_url),
        );
        p.check(
            self.max_body_bytes >= 1024,
            "--max-body-bytes",
            "must be >= 1024",
        );
        p.check(
            self.max_decompressed_bytes >= self.max_body_bytes,
            "--max-decompressed-bytes",
            "must be >= --max-body-bytes",
        );
        p.check(
            self.max_batch_events >= 1,
            "--max-batch-events",
            "must be >= 1",
        );
        p.check(
            (1..=1_000_000).contains(&self.max_dlq_original_bytes),
            "--max-dlq-original-bytes",
            "must be between 1 and 1000000 (the broker's default message limit)",
        );
        p.check(
            self.max_stream_events >= self.max_batch_events,
            "--max-stream-events",
            "must be >= --max-batch-events",
        );
        p.check(
            self.min_schema_version <= self.max_schema_version,
            "--min-schema-version",
            "must be <= --max-schema-version",
        );
        p.check(self.dedup_capacity >= 1, "--dedup-capacity", "must be >= 1");
        p.check(self.rate_burst >= 1.0, "--rate-burst", "must be >= 1");
        self.kafka.validate(p);
        self.telemetry.validate(p);
    }
}

pulse_platform::impl_service_config!(Config);

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating topics: {0}")]
    Topics(#[from] TopicError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("configuration: {0}")]
    Config(String),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Serve(String),
}

/// The running HTTP and gRPC servers.
#[derive(Debug)]
pub struct Servers {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    stop: CancellationToken,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    grpc: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Servers {
    /// Stops accepting and waits for in-flight requests to finish.
    pub async fn stop(self) -> Result<(), Error> {
        self.stop.cancel();
        let h = self.http.await;
        let g = self.grpc.await;
        h.map_err(|e| Error::Serve(e.to_string()))?
            .map_err(|e| Error::Serve(e.to_string()))?;
        g.map_err(|e| Error::Serve(e.to_string()))?
            .map_err(|e| Error::Serve(e.to_string()))?;
        Ok(())
    }
}

/// Builds the pipeline and serves HTTP on `http` and gRPC on `grpc`.
pub async fn serve(
    config: &Config,
    producer: Arc<KafkaProducer>,
    framer: Arc<dyn Framer>,
    http: TcpListener,
    grpc: TcpListener,
) -> Result<Servers, Error> {
    let keys = Arc::new(config.api_keys_resolved().map_err(Error::Config)?);
    let pii = config.pii().map_err(Error::Config)?;
    let limiter = Arc::new(RateLimiter::new(config.rate_limit, config.rate_burst));
    let ingestor = Ingestor::new(
        PipelineConfig {
            events_topic: config.events_topic.clone(),
            dlq_topic: config.dlq_topic.clone(),
            limits: config.limits(),
            max_backpressure_wait: Duration::from_millis(config.max_backpressure_wait_ms),
            in_flight_wait: config.in_flight_wait,
            max_dlq_original_bytes: config.max_dlq_original_bytes,
        },
        producer,
        framer,
        pii,
        DedupSet::new(
            config.dedup_capacity,
            Duration::from_secs(config.dedup_window_secs),
        ),
    );
    let stop = CancellationToken::new();
    let http_addr = http.local_addr().map_err(|e| Error::Serve(e.to_string()))?;
    let grpc_addr = grpc.local_addr().map_err(|e| Error::Serve(e.to_string()))?;
    let app = http::router(http::HttpState {
        ingestor: ingestor.clone(),
        keys: keys.clone(),
        limiter: limiter.clone(),
        body_limits: config.body_limits(),
        retry_after_secs: config.retry_after_secs,
    });
    let http_task = {
        let stop = stop.clone();
        tokio::spawn(async move {
            axum::serve(pulse_platform::http::nodelay(http), app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    };
    let service = grpc::GrpcIngest {
        ingestor,
        keys,
        limiter,
        max_batch_events: config.max_batch_events,
        max_stream_events: config.max_stream_events,
    };
    let (health_service, reflection) = pulse_platform::grpc::health_and_reflection(
        <IngestServiceServer<grpc::GrpcIngest> as tonic::server::NamedService>::NAME,
        pulse_contracts::FILE_DESCRIPTOR_SET,
    )
    .await
    .map_err(|e| Error::Serve(e.to_string()))?;
    let grpc_task = {
        let stop = stop.clone();
        let incoming = pulse_platform::grpc::incoming(grpc);
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(reflection)
                .add_service(IngestServiceServer::new(service))
                .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await })
                .await
        })
    };
    tracing::info!(%http_addr, %grpc_addr, "ingest serving");
    Ok(Servers {
        http_addr,
        grpc_addr,
        stop,
        http: http_task,
        grpc: grpc_task,
    })
}

/// Runs the service until shutdown.
pub async fn run(config: Config, ctx: ServiceContext) -> Result<(), Error> {
    crate::metrics::describe();
    let specs = [config.events_topic.as_str(), config.dlq_topic.as_str()]
        .iter()
        .map(|t| TopicSpec::new(*t, config.kafka.partitions))
        .collect::<Vec<_>>();
    ensure_topics(&config.kafka, &specs).await?;
    let producer = Arc::new(KafkaProducer::new(&config.kafka, "pulse-ingest")?);
    // A producer that stops delivering (a stalled broker, or one failing every request)
    // makes ingest not ready and is recreated (see platform::kafka::producer).
    let watchdog = ctx.watch_producer(
        &producer,
        "kafka-producer",
        config.kafka.producer_stall_timeout,
    );
    let framer: Arc<dyn Framer> = Arc::new(RegistryEncoder::new(&config.schema_registry_url));
    // Events can be framed once the registry answers and the subject exists.
    let topic = config.events_topic.as_str();
    let schema_ready = ctx
        .wait_until_ok(
            &format!("the schema of {topic} in the registry (run pulsectl schemas register)"),
            || async { framer.frame(topic, &[]).await.map(|_| ()) },
        )
        .await;
    if !schema_ready {
        return Ok(());
    }
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })
    };
    let servers = serve(
        &config,
        producer.clone(),
        framer,
        bind(config.http_addr).await?,
        bind(config.grpc_addr).await?,
    )
    .await?;
    let depth = {
        let producer = producer.clone();
        tokio::spawn(async move {
            loop {
                ::metrics::gauge!(crate::metrics::PRODUCER_QUEUE_DEPTH)
                    .set(f64::from(producer.in_flight()));
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        })
    };
    ctx.health.set_ready(true);
    ctx.shutdown.cancelled().await;
    tracing::info!("draining: no new requests; finishing in-flight ones");
    let result = servers.stop().await;
    depth.abort();
    watchdog.abort();
    if let Err(e) = producer.flush(Duration::from_secs(30)) {
        tracing::warn!(error = %e, "producer flush at shutdown failed");
    }
    result
}
