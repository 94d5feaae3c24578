//! An HTTP server (axum) and a gRPC server (tonic) side by side, as a service that answers
//! on both transports runs them: each on its own listener with `TCP_NODELAY`, the gRPC one
//! with health and reflection beside the service (whose calls run in the server span of
//! [`crate::grpc::Traced`]), both stopped by one token. Stopping is
//! ordered: both stop accepting at once, then each finishes its in-flight requests, and
//! [`ServerPair::stop`] returns only when both have, so the caller can flush what those
//! requests queued (a producer, say) afterwards. Routes and services are the caller's.

use std::convert::Infallible;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http::{Request, Response};
use tonic::server::NamedService;

/// Why a server pair could not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("reading the address of the {transport} listener: {source}")]
    LocalAddr {
        transport: &'static str,
        source: std::io::Error,
    },
    #[error("building gRPC reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    #[error("HTTP server: {0}")]
    Http(#[source] std::io::Error),
    #[error("gRPC server: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error("the {transport} server task ended abnormally: {source}")]
    Task {
        transport: &'static str,
        source: tokio::task::JoinError,
    },
}

/// The running HTTP and gRPC servers.
#[derive(Debug)]
pub struct ServerPair {
    pub http_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
    stop: CancellationToken,
    http: JoinHandle<std::io::Result<()>>,
    grpc: JoinHandle<Result<(), tonic::transport::Error>>,
}

impl ServerPair {
    /// Serves `app` on `http` and `service` (with gRPC health and reflection from the
    /// encoded `descriptors`) on `grpc` until `stop` is cancelled.
    pub async fn start<S>(
        http: TcpListener,
        app: axum::Router,
        grpc: TcpListener,
        service: S,
        descriptors: &'static [u8],
        stop: CancellationToken,
    ) -> Result<Self, ServeError>
    where
        S: Service<Request<Body>, Response = Response<Body>, Error = Infallible>
            + NamedService
            + Clone
            + Send
            + Sync
            + 'static,
        S::Future: Send + 'static,
    {
        let local = |l: &TcpListener, transport| {
            l.local_addr()
                .map_err(|source| ServeError::LocalAddr { transport, source })
        };
        let http_addr = local(&http, "HTTP")?;
        let grpc_addr = local(&grpc, "gRPC")?;
        let (health, reflection) = crate::grpc::health_and_reflection(S::NAME, descriptors).await?;
        let http = {
            let stop = stop.clone();
            tokio::spawn(async move {
                axum::serve(crate::http::nodelay(http), app)
                    .with_graceful_shutdown(async move { stop.cancelled().await })
                    .await
            })
        };
        let grpc = {
            let stop = stop.clone();
            let incoming = crate::grpc::incoming(grpc);
            tokio::spawn(async move {
                tonic::transport::Server::builder()
                    .add_service(health)
                    .add_service(reflection)
                    .add_service(crate::grpc::Traced::new(service))
                    .serve_with_incoming_shutdown(incoming, async move { stop.cancelled().await })
                    .await
            })
        };
        Ok(Self {
            http_addr,
            grpc_addr,
            stop,
            http,
            grpc,
        })
    }

    /// Stops accepting on both and waits until their in-flight requests finished.
    pub async fn stop(self) -> Result<(), ServeError> {
        self.stop.cancel();
        self.wait().await
    }

    /// Waits until both servers stopped (after the token given to
    /// [`start`](Self::start) was cancelled and in-flight requests finished). The first
    /// failure is returned; both are always awaited.
    pub async fn wait(self) -> Result<(), ServeError> {
        let http = self.http.await;
        let grpc = self.grpc.await;
        http.map_err(|source| ServeError::Task {
            transport: "HTTP",
            source,
        })?
        .map_err(ServeError::Http)?;
        grpc.map_err(|source| ServeError::Task {
            transport: "gRPC",
            source,
        })??;
        Ok(())
    }
}
