//! The ingest service: HTTP (axum) and gRPC (tonic) intake. Events are validated,
//! enriched, filtered by the PII policy, deduplicated, framed with the registered schema
//! id and produced to `pulse.events.v1`; rejected ones go to `pulse.events.dlq.v1` with the
//! reason. This file wires the pieces together; modules: `config` (flags and their
//! validation), `body` (HTTP bodies), `validate`/`amount` (the event contract), `auth`
//! (API keys, rate limits), `error` (refusals and their status codes), `pii`, `dedup`, `pipeline` (shared by both transports),
//! `http`, `grpc`, `metrics`.

pub mod amount;
pub mod auth;
pub mod body;
pub mod config;
pub mod dedup;
pub mod error;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod pii;
pub mod pipeline;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pulse_contracts::pb::ingest::v1::ingest_service_server::IngestServiceServer;
use pulse_contracts::wire::RegistryEncoder;
use pulse_platform::kafka::KafkaProducer;
use pulse_platform::kafka::topics::{TopicError, TopicKind, TopicSpec, ensure_topics};
use pulse_platform::server::ServeError;
use pulse_platform::service::ServiceContext;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{KeysError, RateLimiter};
use crate::config::PiiSettingError;
use crate::dedup::DedupSet;
use crate::pipeline::{Framer, Ingestor, PipelineConfig};

pub use crate::config::{Config, DEV_API_KEY};

/// Service name: metrics label, OpenTelemetry `service.name`, log field.
pub const SERVICE: &str = "ingest";

/// Audit records (key file reloads) that may wait for the broker before new ones are
/// dropped (counted in `pulse_audit_records_failed_total{reason="queue_full"}`, logged).
const AUDIT_QUEUE: usize = 64;
/// How long one audit record may wait for the broker's acknowledgement.
const AUDIT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating topics: {0}")]
    Topics(#[from] TopicError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("configuration: {0}")]
    ApiKeys(#[from] KeysError),
    #[error("configuration: {0}")]
    Pii(#[from] PiiSettingError),
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Serve(#[from] ServeError),
    #[error("configuration: TLS: {0}")]
    Tls(#[from] pulse_platform::tls::TlsError),
    #[error("schema registry client: {0}")]
    RegistryClient(String),
}

/// The running HTTP and gRPC servers ([`Servers::stop`] stops accepting and waits for
/// in-flight requests).
pub use pulse_platform::server::ServerPair as Servers;

/// Builds the pipeline and serves HTTP on `http` and gRPC on `grpc`.
pub async fn serve(
    config: &Config,
    producer: Arc<KafkaProducer>,
    framer: Arc<dyn Framer>,
    http: TcpListener,
    grpc: TcpListener,
) -> Result<Servers, Error> {
    let keys = Arc::new(config.api_key_store()?);
    let stop = CancellationToken::new();
    let audit = pulse_platform::audit::AuditLog::spawn(
        producer.clone(),
        config.audit_topic.clone(),
        AUDIT_QUEUE,
        AUDIT_WRITE_TIMEOUT,
    );
    pulse_platform::audit::set_process_log(SERVICE, audit.clone());
    tokio::spawn(
        keys.clone()
            .watch(config.api_keys_reload_interval, stop.clone(), audit),
    );
    let pii = config.pii()?;
    let limiter = Arc::new(RateLimiter::new(config.rate_limit, config.rate_burst));
    let ingestor = Ingestor::new(
        PipelineConfig {
            events_topic: config.events_topic.clone(),
            dlq_topic: config.dlq_topic.clone(),
            limits: config.limits(),
            max_backpressure_wait: Duration::from_millis(config.max_backpressure_wait_ms),
            in_flight_wait: config.in_flight_wait,
            max_dlq_original_bytes: config.max_dlq_original_bytes,
            dlq_original: config.dlq_original,
        },
        producer,
        framer,
        pii,
        DedupSet::new(
            config.dedup_capacity,
            Duration::from_secs(config.dedup_window_secs),
        ),
    );
    let app = http::router(http::HttpState {
        ingestor: ingestor.clone(),
        keys: keys.clone(),
        limiter: limiter.clone(),
        body_limits: config.body_limits(),
        retry_after_secs: config.retry_after_secs,
    });
    let service = IngestServiceServer::new(grpc::GrpcIngest {
        ingestor,
        keys,
        limiter,
        max_batch_events: config.max_batch_events,
        max_stream_events: config.max_stream_events,
    });
    let settings = config.server.settings()?;
    let servers = Servers::start_with(
        http,
        app,
        grpc,
        service,
        pulse_contracts::FILE_DESCRIPTOR_SET,
        &settings,
        stop,
    )
    .await?;
    tracing::info!(http_addr = %servers.http_addr, grpc_addr = %servers.grpc_addr, tls = settings.tls.is_some(), "ingest serving");
    Ok(servers)
}

/// The registry client ingest frames events with, sending the configured credentials.
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

/// librdkafka settings of ingest's producer that differ from librdkafka's defaults; an
/// operator's `--kafka-option` of the same key wins (it is applied after them).
///
/// `max.in.flight.requests.per.connection=1`: librdkafka 2.12's idempotent producer
/// counts a partition's in-flight *messages* against its limit of 5 in-flight *requests*,
/// so a partition with a request of 5 or more records outstanding sends nothing more
/// until it is answered — and meanwhile, once the oldest queued record is older than
/// `linger.ms`, the broker thread is told to wake up at once, again and again: it polls
/// its socket in a busy loop for the whole round trip (librdkafka PR #4989). With a broker
/// that answers in tens of milliseconds that loop was 85 % of ingest's CPU (README, Benchmark
/// table). With one request in flight per connection, the next request waits in
/// librdkafka's output queue instead, which stops the request building (and the wake-ups)
/// until the broker answers; the records queued meanwhile go out in the next, larger,
/// request. The partition could not have had a second request in flight anyway.
pub const PRODUCER_DEFAULT_OPTIONS: &[(&str, &str)] =
    &[("max.in.flight.requests.per.connection", "1")];

/// Runs the service until shutdown.
pub async fn run(config: Config, ctx: ServiceContext) -> Result<(), Error> {
    crate::metrics::describe();
    crate::metrics::init(&config.events_topic, &config.dlq_topic);
    for setting in config.deprecated_settings() {
        tracing::warn!(
            setting = %setting,
            refused = %config.refused_schema_versions(),
            "deprecated setting: every schema_version outside its range is refused; \
             use --refuse-schema-versions / PULSE_INGEST_REFUSE_SCHEMA_VERSIONS instead"
        );
    }
    let specs = [
        TopicSpec::of(
            TopicKind::Events,
            &config.events_topic,
            config.kafka.partitions,
        ),
        TopicSpec::of(TopicKind::Dlq, &config.dlq_topic, config.kafka.partitions),
        pulse_platform::audit::topic_spec(&config.audit_topic),
    ];
    ensure_topics(&config.kafka, &specs).await?;
    let producer = Arc::new(KafkaProducer::new(
        &config.kafka.with_default_options(PRODUCER_DEFAULT_OPTIONS),
        "pulse-ingest",
    )?);
    // A producer that stops delivering (a stalled broker, or one failing every request)
    // makes ingest not ready and is recreated (see platform::kafka::producer).
    let watchdog = ctx.watch_producer(
        &producer,
        "kafka-producer",
        config.kafka.producer_stall_timeout,
    );
    let framer: Arc<dyn Framer> = Arc::new(registry_encoder(&config)?);
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
    Ok(result?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_request_in_flight_per_connection_by_default() {
        let c = pulse_platform::kafka::KafkaConfig::for_brokers("b:9092")
            .with_default_options(PRODUCER_DEFAULT_OPTIONS);
        assert_eq!(
            c.options,
            vec!["max.in.flight.requests.per.connection=1".to_owned()]
        );
    }
}
