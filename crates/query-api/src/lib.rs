//! The query-api service: analytics over the processor's aggregates in ClickHouse, served
//! as JSON over HTTP (axum) and as the `pulse.query.v1.QueryService` over gRPC (tonic,
//! with health and reflection), every answer with data-freshness metadata; a search of
//! the stored events by the producer's own trace id; plus an OpenAPI document and a live
//! dashboard.
//!
//! Modules: `config` (flags), `auth` (bearer tokens), `params` (request parsing), `store`
//! (all SQL), `freshness`, `query` (the one implementation of every number), `model`
//! (JSON shapes), `http`, `grpc`, `openapi`, `dashboard`, `metrics`, `error`.
//!
//! Kafka: the service's only Kafka writes are its audit records (token file reloads), through
//! `pulse_platform::audit::AuditTrail`, which never makes a query, the start or readiness
//! wait for the broker (README, Audit trail).

pub mod auth;
pub mod config;
pub mod dashboard;
pub mod error;
pub mod freshness;
pub mod grpc;
pub mod http;
pub mod metrics;
pub mod model;
pub mod openapi;
pub mod params;
pub mod query;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use pulse_contracts::pb::query::v1::query_service_server::QueryServiceServer;
use pulse_platform::audit::{AuditLog, AuditTrail};
use pulse_platform::server::{ServeError, ServerSettings};
use pulse_platform::service::ServiceContext;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::{TokenFileError, TokenStore};
pub use crate::config::{Config, DEV_TOKEN};
use crate::query::Engine;
use crate::store::Store;

/// Service name: metrics label, OpenTelemetry `service.name`, log field.
pub const SERVICE: &str = "query-api";

/// How long shutdown waits for audit records the broker has not acknowledged yet (a
/// broker that is down delays the exit by at most this).
const AUDIT_FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("configuration: {0}")]
    TokenFile(#[from] TokenFileError),
    #[error("configuration: at least one API token is required")]
    NoTokens,
    #[error("binding {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("server: {0}")]
    Serve(#[from] ServeError),
    #[error("configuration: TLS: {0}")]
    Tls(#[from] pulse_platform::tls::TlsError),
    #[error("configuration: the audit producer: {0}")]
    AuditProducer(#[from] rdkafka::error::KafkaError),
}

/// What both transports share: the query engine and the accepted tokens (reloaded from
/// `--api-tokens-file` while the servers run).
#[derive(Debug, Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub tokens: Arc<TokenStore>,
}

impl AppState {
    /// The state of `config`: a ClickHouse store (no connection is made yet) and the tokens,
    /// whose reloads are logged but written to no audit topic (see [`AppState::audited`]).
    pub fn new(config: &Config) -> Result<Self, Error> {
        Self::audited(config, AuditLog::disabled())
    }

    /// [`AppState::new`] with the token file's reloads recorded to `audit`.
    pub fn audited(config: &Config, audit: AuditLog) -> Result<Self, Error> {
        let tokens = config.token_store()?.with_audit(audit);
        if tokens.current().is_empty() {
            return Err(Error::NoTokens);
        }
        let store = Store::new(&config.clickhouse, config.query_timeout())
            .with_limits(config.query_limits());
        Ok(Self {
            engine: Arc::new(Engine::new(store, config.freshness_ttl(), config.limits())),
            tokens: Arc::new(tokens),
        })
    }
}

/// The running HTTP and gRPC servers ([`Servers::wait`] waits until they stopped after
/// the shutdown token was cancelled).
pub use pulse_platform::server::ServerPair as Servers;

/// Serves HTTP on `http` and gRPC on `grpc` until `shutdown` is cancelled (plain, default
/// limits; see [`serve_with`]).
pub async fn serve(
    http: TcpListener,
    grpc: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<Servers, Error> {
    serve_with(http, grpc, state, &ServerSettings::default(), shutdown).await
}

/// [`serve`] with TLS and limits from `settings`. The token file is watched for changes
/// until `shutdown` is cancelled.
pub async fn serve_with(
    http: TcpListener,
    grpc: TcpListener,
    state: AppState,
    settings: &ServerSettings,
    shutdown: CancellationToken,
) -> Result<Servers, Error> {
    tokio::spawn(state.tokens.clone().watch(shutdown.child_token()));
    let app = http::router(state.clone());
    let service = QueryServiceServer::new(grpc::GrpcQuery::new(state));
    let servers = Servers::start_with(
        http,
        app,
        grpc,
        service,
        pulse_contracts::FILE_DESCRIPTOR_SET,
        settings,
        shutdown,
    )
    .await?;
    tracing::info!(http_addr = %servers.http_addr, grpc_addr = %servers.grpc_addr, tls = settings.tls.is_some(), "query-api serving");
    Ok(servers)
}

/// Runs the service until shutdown.
pub async fn run(config: Config, ctx: ServiceContext) -> Result<(), Error> {
    crate::metrics::describe();
    crate::metrics::init();
    // The audit trail's own producer: nothing waits for the broker, and readiness and
    // liveness never depend on it (no producer watchdog here, unlike ingest's).
    let stop_audit = CancellationToken::new();
    let _stop_audit = stop_audit.clone().drop_guard();
    let audit = AuditTrail::start(
        &config.kafka,
        "pulse-query-api-audit",
        &config.audit_topic,
        stop_audit,
    )?;
    pulse_platform::audit::set_process_log("query-api", audit.log());
    let state = AppState::audited(&config, audit.log())?;
    let tokens = state.tokens.current();
    tracing::info!(
        tokens = tokens.len(),
        names = ?tokens.names(),
        file = ?config.api_tokens_file,
        reload_interval_ms = config.api_tokens_reload_interval_ms,
        "bearer tokens loaded (names only)"
    );
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })
    };
    let settings = config.server.settings()?;
    let servers = serve_with(
        bind(config.http_addr).await?,
        bind(config.grpc_addr).await?,
        state,
        &settings,
        ctx.shutdown.child_token(),
    )
    .await?;
    ctx.health.set_ready(true);
    ctx.shutdown.cancelled().await;
    tracing::info!("draining: no new requests; finishing in-flight ones");
    let served = servers.wait().await;
    audit.flush(AUDIT_FLUSH_TIMEOUT).await;
    Ok(served?)
}
