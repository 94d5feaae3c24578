//! The schema registry: a Confluent Schema Registry–compatible REST API (the subset Pulse
//! and standard clients use) whose storage is the compacted Kafka topic `_schemas`.
//!
//! Modules: `api` (routes), `auth` (basic authentication and roles), `error` (Confluent error shape), `store` (the deterministic
//! state machine), `log` (the Kafka log and its reader), `parse` (protobuf schema
//! texts), `compat` (compatibility rules), `metrics`. Any number of replicas can run side by side: each
//! reads the whole log, and ids are assigned from log order, never by a replica alone.

pub mod api;
pub mod auth;
pub mod compat;
pub mod error;
pub mod log;
pub mod metrics;
pub mod parse;
pub mod store;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use pulse_platform::config::{Problems, Validate};
use pulse_platform::kafka::KafkaConfig;
use pulse_platform::kafka::topics::{TopicError, TopicSpec, ensure_topics};
use pulse_platform::listener::HttpListener;
use pulse_platform::server::{ServerArgs, ServerSettings};
use pulse_platform::service::ServiceContext;
use pulse_platform::telemetry::TelemetryConfig;
use pulse_platform::tls::Alpn;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Service name: metrics label, OpenTelemetry `service.name`, log field.
pub const SERVICE: &str = "schema-registry";

/// The default audit topic: `pulse_contracts::topics::AUDIT` (the registry does not depend
/// on the contracts crate; the `audit` integration test checks that they agree).
pub const AUDIT_TOPIC: &str = "pulse.audit.v1";
/// Audit records that may wait for the broker before new ones are dropped (counted in
/// `pulse_audit_records_failed_total{reason="queue_full"}` and logged).
const AUDIT_QUEUE: usize = 1024;
/// How long one audit record may wait for the broker's acknowledgement.
const AUDIT_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Configuration; every flag has a `PULSE_*` environment fallback (see README).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "pulse-schema-registry",
    version,
    about = "Confluent-compatible schema registry backed by a Kafka topic."
)]
pub struct Config {
    /// Address of the REST API.
    #[arg(
        long = "http-addr",
        env = "PULSE_SCHEMA_REGISTRY_ADDR",
        default_value = "127.0.0.1:8081"
    )]
    pub http_addr: SocketAddr,
    /// Address of the admin server (/metrics, /livez, /readyz).
    #[arg(
        long = "admin-addr",
        env = "PULSE_ADMIN_ADDR",
        default_value = "127.0.0.1:9105"
    )]
    pub admin_addr: SocketAddr,
    /// The compacted topic holding the registry's log (one partition).
    #[arg(
        long = "schemas-topic",
        env = "PULSE_SCHEMAS_TOPIC",
        default_value = "_schemas"
    )]
    pub schemas_topic: String,
    /// How long a write waits for this replica to read its own record back.
    #[arg(
        long = "apply-timeout-ms",
        env = "PULSE_SCHEMA_REGISTRY_APPLY_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub apply_timeout_ms: u64,
    /// How long startup may take to read the existing log before the replica gives up.
    #[arg(
        long = "startup-timeout-ms",
        env = "PULSE_SCHEMA_REGISTRY_STARTUP_TIMEOUT_MS",
        default_value_t = 120_000
    )]
    pub startup_timeout_ms: u64,
    /// Credentials file: one `name:role:hash` line per user (role `read` or `write`; make
    /// a line with `pulse-schema-registry hash-password`). Without it every caller is
    /// anonymous and may write (local development only; a warning is logged at start).
    #[arg(long = "auth-file", env = "PULSE_REGISTRY_AUTH_FILE")]
    pub auth_file: Option<PathBuf>,
    /// How often the credentials file is checked for changes (reloaded without a restart).
    #[arg(
        long = "auth-reload-interval-ms",
        env = "PULSE_REGISTRY_AUTH_RELOAD_INTERVAL_MS",
        default_value_t = 5_000
    )]
    pub auth_reload_interval_ms: u64,
    /// The append-only topic every write, failed write and refused write is audited to
    /// (`pulsectl audit` lists it; created at start when missing).
    #[arg(long = "audit-topic", env = "PULSE_AUDIT_TOPIC", default_value = AUDIT_TOPIC)]
    pub audit_topic: String,
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
    /// TLS and limits of the REST and admin servers.
    #[command(flatten)]
    pub server: ServerArgs,
}

impl Validate for Config {
    fn validate(&self, p: &mut Problems) {
        p.check(
            !self.schemas_topic.is_empty(),
            "--schemas-topic / PULSE_SCHEMAS_TOPIC",
            "must not be empty",
        );
        p.check(
            self.apply_timeout_ms >= 100,
            "--apply-timeout-ms / PULSE_SCHEMA_REGISTRY_APPLY_TIMEOUT_MS",
            format!("must be >= 100, got {}", self.apply_timeout_ms),
        );
        p.check(
            !self.audit_topic.is_empty(),
            "--audit-topic / PULSE_AUDIT_TOPIC",
            "must not be empty",
        );
        p.check(
            self.auth_reload_interval_ms >= 100,
            "--auth-reload-interval-ms / PULSE_REGISTRY_AUTH_RELOAD_INTERVAL_MS",
            format!("must be >= 100, got {}", self.auth_reload_interval_ms),
        );
        if let Some(path) = &self.auth_file {
            p.check(
                path.is_file(),
                "--auth-file / PULSE_REGISTRY_AUTH_FILE",
                format!("{} is not a readable file", path.display()),
            );
        }
        self.kafka.validate(p);
        self.telemetry.validate(p);
        self.server.validate(p);
    }
}

pulse_platform::impl_service_config!(Config, server);

/// Why the registry stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("creating the schemas topic: {0}")]
    Topics(#[from] TopicError),
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("reading the existing schema log did not finish within {0:?}")]
    CatchUp(Duration),
    #[error("binding the REST API to {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("REST server: {0}")]
    Serve(std::io::Error),
    #[error(transparent)]
    Auth(#[from] auth::AuthFileError),
    #[error("configuration: TLS: {0}")]
    Tls(#[from] pulse_platform::tls::TlsError),
}

/// One running replica: REST server plus log reader.
#[derive(Debug)]
pub struct Replica {
    pub addr: SocketAddr,
    pub log: log::SchemaLog,
    stop_http: CancellationToken,
    stop_reader: CancellationToken,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    reader: tokio::task::JoinHandle<Result<(), rdkafka::error::KafkaError>>,
    settler: tokio::task::JoinHandle<()>,
}

impl Replica {
    /// Creates the log topic if missing, reads the existing log, then serves on `listener`
    /// to anonymous callers (see [`Replica::start_with_access`]).
    pub async fn start(
        kafka: &KafkaConfig,
        topic: &str,
        apply_timeout: Duration,
        startup_timeout: Duration,
        listener: TcpListener,
    ) -> Result<Self, Error> {
        Self::start_with_access(
            kafka,
            topic,
            apply_timeout,
            startup_timeout,
            listener,
            auth::Access::anonymous(),
        )
        .await
    }

    /// [`Replica::start`] with the callers that `access` allows.
    pub async fn start_with_access(
        kafka: &KafkaConfig,
        topic: &str,
        apply_timeout: Duration,
        startup_timeout: Duration,
        listener: TcpListener,
        access: auth::Access,
    ) -> Result<Self, Error> {
        Self::start_with_server(
            kafka,
            topic,
            apply_timeout,
            startup_timeout,
            listener,
            access,
            &ServerSettings::default(),
        )
        .await
    }

    /// [`Replica::start_with_access`] with the REST server's TLS and limits from
    /// `settings`.
    pub async fn start_with_server(
        kafka: &KafkaConfig,
        topic: &str,
        apply_timeout: Duration,
        startup_timeout: Duration,
        listener: TcpListener,
        access: auth::Access,
        settings: &ServerSettings,
    ) -> Result<Self, Error> {
        metrics::describe();
        auth::register_metrics();
        ensure_topics(kafka, &[TopicSpec::compacted(topic)]).await?;
        let stop_reader = CancellationToken::new();
        let (log, reader) =
            log::SchemaLog::start(kafka, topic, apply_timeout, stop_reader.clone())?;
        log.catch_up(kafka, startup_timeout)
            .await
            .map_err(|_| Error::CatchUp(startup_timeout))?;
        // Keeps the log bounded (see `log`); its first pass runs now, in the background.
        let settler = log.spawn_settler(log::SETTLE_INTERVAL, stop_reader.clone());
        let addr = listener.local_addr().map_err(Error::Serve)?;
        let stop_http = CancellationToken::new();
        settings.watch(stop_http.clone());
        let listener = HttpListener::new(
            listener,
            settings.accept(Alpn::Http, "http"),
            stop_http.child_token(),
        )
        .map_err(Error::Serve)?;
        // Handlers see the caller's address (ConnectInfo) for the auth failure log.
        let app = pulse_platform::limits::http(
            api::router(log.clone(), access),
            &settings.limits,
            "http",
        );
        let server = tokio::spawn(pulse_platform::listener::serve(
            listener,
            app,
            stop_http.clone(),
        ));
        tracing::info!(%addr, topic, tls = settings.tls.is_some(), "schema registry serving");
        Ok(Self {
            addr,
            log,
            stop_http,
            stop_reader,
            server,
            reader,
            settler,
        })
    }

    /// Stops accepting, finishes in-flight requests, then stops the log reader.
    pub async fn stop(self) -> Result<(), Error> {
        self.stop_http.cancel();
        let served = self.server.await;
        self.stop_reader.cancel();
        let _ = self.settler.await;
        let _ = self.reader.await;
        match served {
            Ok(r) => r.map_err(Error::Serve),
            Err(e) => Err(Error::Serve(std::io::Error::other(e))),
        }
    }
}

/// Runs the service until shutdown.
pub async fn run(config: Config, ctx: ServiceContext) -> Result<(), Error> {
    let stop_watch = CancellationToken::new();
    let access = match &config.auth_file {
        Some(path) => {
            let users = Arc::new(auth::Users::load(path)?);
            tracing::info!(path = %path.display(), users = users.count(), "registry authentication on");
            auth::Access::users(users)
        }
        None => {
            tracing::warn!(
                "no --auth-file / PULSE_REGISTRY_AUTH_FILE: the registry accepts anonymous registrations, deletes and config changes (local development only)"
            );
            auth::Access::anonymous()
        }
    };
    let _stop_watch = stop_watch.clone().drop_guard();
    ensure_topics(
        &config.kafka,
        &[pulse_platform::audit::topic_spec(&config.audit_topic)],
    )
    .await?;
    let audit_producer = Arc::new(pulse_platform::kafka::KafkaProducer::new(
        &config.kafka,
        "pulse-schema-registry-audit",
    )?);
    let audit = pulse_platform::audit::AuditLog::spawn(
        audit_producer.clone(),
        config.audit_topic.clone(),
        AUDIT_QUEUE,
        AUDIT_WRITE_TIMEOUT,
    );
    pulse_platform::audit::set_process_log("schema-registry", audit.clone());
    let access = access.with_audit(audit);
    // Credential file reloads are audited too (actor `file`).
    access.watch_users(
        Duration::from_millis(config.auth_reload_interval_ms),
        stop_watch.clone(),
    );
    let listener = TcpListener::bind(config.http_addr)
        .await
        .map_err(|source| Error::Bind {
            addr: config.http_addr,
            source,
        })?;
    let settings = config.server.settings()?;
    let replica = Replica::start_with_server(
        &config.kafka,
        &config.schemas_topic,
        Duration::from_millis(config.apply_timeout_ms),
        Duration::from_millis(config.startup_timeout_ms),
        listener,
        access,
        &settings,
    )
    .await?;
    ctx.health.set_ready(true);
    ctx.shutdown.cancelled().await;
    tracing::info!("draining the REST API");
    let stopped = replica.stop().await;
    if let Err(e) = audit_producer.flush(AUDIT_WRITE_TIMEOUT) {
        tracing::warn!(error = %e, "audit producer flush at shutdown failed");
    }
    stopped
}

#[cfg(test)]
mod flag_tests {
    use clap::CommandFactory as _;

    #[test]
    fn every_flag_has_a_name_of_its_own() {
        super::Config::command().debug_assert();
    }
}
