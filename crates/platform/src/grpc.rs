//! The standard services every Pulse gRPC server carries beside its own: gRPC health
//! (SERVING for the server and for the named service) and reflection that lists only that
//! service (Pulse's descriptor set holds every Pulse service, most served elsewhere); the
//! caller's W3C trace context from request metadata; and [`Traced`], which runs every call
//! of a service in a server span continuing that context and names the span in the
//! answer's `traceresponse` and `x-trace-id` metadata, error answers included.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use opentelemetry::propagation::{Extractor, TextMapPropagator as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tonic::body::Body;
use tonic::codegen::Service;
use tonic::codegen::http;
use tonic::metadata::{KeyRef, MetadataMap};
use tonic::server::NamedService;
use tonic_health::pb::health_server::{Health, HealthServer};
use tonic_reflection::pb::v1::server_reflection_server::{
    SERVICE_NAME as REFLECTION, ServerReflection, ServerReflectionServer,
};
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Health and reflection for a server serving `service` (its `NamedService::NAME`), with
/// the encoded `FileDescriptorSet` that describes it.
pub async fn health_and_reflection(
    service: &'static str,
    descriptors: &'static [u8],
) -> Result<
    (
        HealthServer<impl Health>,
        ServerReflectionServer<impl ServerReflection>,
    ),
    tonic_reflection::server::Error,
> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(service, tonic_health::ServingStatus::Serving)
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(descriptors)
        .with_service_name(service)
        .with_service_name(REFLECTION)
        .build_v1()?;
    Ok((health, reflection))
}

/// The accepted connections of `listener` for a tonic server, with `TCP_NODELAY` set (tonic
/// sets it only on sockets it binds itself): without it, a response's small HTTP/2 frames
/// wait on Nagle's algorithm and the peer's delayed ACK.
pub fn incoming(listener: tokio::net::TcpListener) -> tonic::transport::server::TcpIncoming {
    tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true))
}

struct MetadataExtractor<'a>(&'a MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                KeyRef::Ascii(k) => Some(k.as_str()),
                KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

/// The caller's trace context from gRPC metadata (`traceparent`, `tracestate`); empty if
/// absent or malformed. The gRPC counterpart of [`crate::http::extract_context`].
pub fn extract_context(metadata: &MetadataMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&MetadataExtractor(metadata))
}

/// A gRPC service whose every call runs in a `grpc.request` server span that continues
/// the caller's `traceparent` metadata, and whose every answer (a trailers-only error
/// too) carries that span in `traceresponse` (`00-<trace id>-<span id>-<flags>`) and
/// `x-trace-id` metadata. The service's own spans are children of it.
#[derive(Debug, Clone)]
pub struct Traced<S> {
    inner: S,
}

impl<S> Traced<S> {
    pub fn new(inner: S) -> Self {
        Self { inner }
    }
}

impl<S: NamedService> NamedService for Traced<S> {
    const NAME: &'static str = S::NAME;
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S> Service<http::Request<Body>> for Traced<S>
where
    S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>
        + NamedService,
    S::Future: Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<Body>) -> Self::Future {
        // The method is the last path segment of a known service's route; the path is the
        // client's, so only a bounded, printable name is recorded.
        let method = req
            .uri()
            .path()
            .rsplit_once('/')
            .map(|(_, m)| m)
            .filter(|m| {
                m.len() <= 64 && !m.is_empty() && m.bytes().all(|b| b.is_ascii_alphanumeric())
            })
            .unwrap_or("unknown")
            .to_owned();
        let span = tracing::info_span!(
            "grpc.request",
            otel.kind = "server",
            rpc.system = "grpc",
            rpc.service = S::NAME,
            rpc.method = %method,
        );
        let _ = span.set_parent(crate::http::extract_context(req.headers()));
        let call = span.in_scope(|| self.inner.call(req));
        Box::pin(async move {
            let mut response = call.instrument(span.clone()).await?;
            crate::http::insert_trace_headers(response.headers_mut(), &span);
            Ok(response)
        })
    }
}

#[cfg(test)]
mod tests {
    use futures::StreamExt as _;
    use tonic::codegen::http;

    #[test]
    fn the_trace_context_comes_from_the_traceparent_metadata() {
        use opentelemetry::trace::TraceContextExt as _;
        let mut md = tonic::metadata::MetadataMap::new();
        md.insert(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
                .parse()
                .unwrap(),
        );
        let cx = super::extract_context(&md);
        let span = cx.span();
        let sc = span.span_context();
        assert!(sc.is_remote());
        assert_eq!(
            sc.trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let empty = super::extract_context(&tonic::metadata::MetadataMap::new());
        assert!(!empty.span().span_context().is_valid());
    }

    /// A service that refuses every call as UNAVAILABLE (a trailers-only answer).
    #[derive(Debug, Clone)]
    struct Down;

    impl tonic::server::NamedService for Down {
        const NAME: &'static str = "test.Down";
    }

    impl tonic::codegen::Service<http::Request<tonic::body::Body>> for Down {
        type Response = http::Response<tonic::body::Body>;
        type Error = std::convert::Infallible;
        type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<tonic::body::Body>) -> Self::Future {
            std::future::ready(Ok(tonic::Status::unavailable("down").into_http()))
        }
    }

    #[tokio::test]
    async fn traced_calls_answer_with_the_trace_of_the_incoming_traceparent_errors_too() {
        use tonic::codegen::Service as _;
        let _guard = tracing::subscriber::set_default(crate::http::otel_subscriber());
        let mut svc = super::Traced::new(Down);
        let req = http::Request::post("/test.Down/Get")
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .body(tonic::body::Body::empty())
            .unwrap();
        let r = svc.call(req).await.unwrap();
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(
            r.headers()["x-trace-id"],
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        let tr = r.headers()["traceresponse"].to_str().unwrap();
        assert!(
            tr.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{tr}"
        );
        let fresh = svc
            .call(
                http::Request::post("/test.Down/Get")
                    .body(tonic::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        let id = fresh.headers()["x-trace-id"].to_str().unwrap();
        assert_eq!(id.len(), 32);
        assert_ne!(id, "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[tokio::test]
    async fn accepted_grpc_connections_have_tcp_nodelay_set() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut incoming = super::incoming(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let accepted = incoming.next().await.unwrap().unwrap();
        assert!(accepted.nodelay().unwrap());
    }
}
