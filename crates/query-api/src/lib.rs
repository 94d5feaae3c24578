//! The query-api service: analytics over the processor's aggregates in ClickHouse, served
//! as JSON over HTTP (axum) and as the `pulse.query.v1.QueryService` over gRPC (tonic,
//! with health and reflection), every answer with data-freshness metadata, plus an
//! OpenAPI document and a live dashboard.
//!
//! Modules: `config` (flags), `auth` (bearer tokens), `params` (request parsing), `store`
//! (all SQL), `freshness`, `query` (the one implementation of every number), `model`
//! (JSON shapes), `http`, `grpc`, `openapi`, `dashboard`, `metrics`, `error`.

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

use pulse_contracts::pb::query::v1::query_service_server::QueryServiceServer;
use pulse_platform::service::ServiceContext;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Tokens;
pub use crate::config::{Config, DEV_TOKEN};
use crate::query::Engine;
use crate::store::Store;

/// Service name: metrics label, OpenTelemetry `service.name`, log field.
pub const SERVICE: &str = "query-api";

/// Why the service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum Error {
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

/// What both transports share: the query engine and the accepted tokens.
#[derive(Debug, Clone)]
pub struct AppState {
    pub engine: Arc<Engine>,
    pub tokens: Arc<Tokens>,
}

impl AppState {
    /// The state of `config`: a ClickHouse store (no connection is made yet) and the tokens.
    pub fn new(config: &Config) -> Result<Self, Error> {
        let tokens = config.tokens().map_err(Error::Config)?;
        if tokens.is_empty() {
            return Err(Error::Config("at least one API token is required".into()));
        }
        let store = Store::new(&config.clickhouse, config.query_timeout());
        Ok(Self {
            engine: Arc::new(Engine::new(store, config.freshness_ttl(), config.limits())),
            tokens: Arc::new(tokens),
        })
    }
}

/// The running HTTP and gRPC servers.
#[derive(Debug)]
pub struct Servers {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    http: tokio::task::JoinHandle<std::io::Result<()>>,
    grpc: tokio::task::JoinHandle<Result<(), tonic::transport::Error>>,
}

impl Servers {
    /// Waits until both servers stopped (after `shutdown` was cancelled and in-flight
    /// requests finished).
    pub async fn wait(self) -> Result<(), Error> {
        let h = self.http.await;
        let g = self.grpc.await;
        h.map_err(|e| Error::Serve(e.to_string()))?
            .map_err(|e| Error::Serve(e.to_string()))?;
        g.map_err(|e| Error::Serve(e.to_string()))?
            .map_err(|e| Error::Serve(e.to_string()))?;
        Ok(())
    }
}

/// Serves HTTP on `http` and gRPC on `grpc` until `shutdown` is cancelled.
pub async fn serve(
    http: TcpListener,
    grpc: TcpListener,
    state: AppState,
    shutdown: CancellationToken,
) -> Result<Servers, Error> {
    let http_addr = http.local_addr().map_err(|e| Error::Serve(e.to_string()))?;
    let grpc_addr = grpc.local_addr().map_err(|e| Error::Serve(e.to_string()))?;
    let app = http::router(state.clone());
    let http_task = {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(pulse_platform::http::nodelay(http), app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await
        })
    };
    let (health_service, reflection) = pulse_platform::grpc::health_and_reflection(
        <QueryServiceServer<grpc::GrpcQuery> as tonic::server::NamedService>::NAME,
        pulse_contracts::FILE_DESCRIPTOR_SET,
    )
    .await
    .map_err(|e| Error::Serve(e.to_string()))?;
    let service = QueryServiceServer::new(grpc::GrpcQuery::new(state));
    let grpc_task = {
        let stop = shutdown.clone();
        let incoming = pulse_platform::grpc::incoming(grpc);
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(health_service)
                .add_service(reflection)
                .add_service(service)
                .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await })
                .await
        })
    };
    tracing::info!(%http_addr, %grpc_addr, "query-api serving");
    Ok(Servers {
        http_addr,
        grpc_addr,
        http: http_task,
        grpc: grpc_task,
    })
}

/// Runs the service until shutdown.
pub async fn run(config: Config, ctx: ServiceContext) -> Result<(), Error> {
    crate::metrics::describe();
    let state = AppState::new(&config)?;
    let bind = |addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| Error::Bind { addr, source })
    };
    let servers = serve(
        bind(config.http_addr).await?,
        bind(config.grpc_addr).await?,
        state,
        ctx.shutdown.child_token(),
    )
    .await?;
    ctx.health.set_ready(true);
    ctx.shutdown.cancelled().await;
    tracing::info!("draining: no new requests; finishing in-flight ones");
    servers.wait().await
}
