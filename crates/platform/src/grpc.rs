//! The standard services every Pulse gRPC server carries beside its own: gRPC health
//! (SERVING for the server and for the named service) and reflection that lists only that
//! service (Pulse's descriptor set holds every Pulse service, most served elsewhere); the
//! caller's W3C trace context from request metadata; and [`Traced`], which runs every call
//! of a service in a server span continuing that context and names the span in the
//! answer's `traceresponse` and `x-trace-id` metadata, error answers included, and logs
//! each call's completion like the HTTP servers' (`request served` at debug, `request
//! failed` at warn for the codes HTTP maps to 5xx) with its gRPC status, method, the name
//! of the key it authenticated with and its duration. A service records that name with
//! [`crate::http::record_auth_key`] on its `tonic::Request::extensions()` (tonic's
//! extensions are `http`'s).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Instant;

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

/// What a call's completion line needs until its answer is complete.
struct Completion {
    span: tracing::Span,
    method: String,
    service: &'static str,
    started: Instant,
    key: crate::http::AuthKeySlot,
}

impl Completion {
    /// Logs the completion with the gRPC status `code` (`None`: the answer ended without
    /// one, e.g. the client went away).
    fn log(self, code: Option<i32>) {
        let elapsed_ms = self.started.elapsed().as_secs_f64() * 1e3;
        let key = self.key.get();
        if let Some(key) = key {
            self.span.record("auth.key", key);
        }
        let (method, service) = (self.method.as_str(), self.service);
        let name = code.map_or("none", |c| code_name(tonic::Code::from(c)));
        self.span.in_scope(|| {
            // The codes HTTP maps to 5xx: Unknown, DeadlineExceeded, Unimplemented,
            // Internal, Unavailable, DataLoss.
            if matches!(code, Some(2 | 4 | 12 | 13 | 14 | 15)) {
                tracing::warn!(
                    grpc.status = name,
                    rpc.service = service,
                    rpc.method = method,
                    auth.key = key,
                    elapsed_ms,
                    "request failed"
                );
            } else {
                tracing::debug!(
                    grpc.status = name,
                    rpc.service = service,
                    rpc.method = method,
                    auth.key = key,
                    elapsed_ms,
                    "request served"
                );
            }
        });
    }
}

/// The gRPC status code's name, as in the specification (`OK`, `UNAVAILABLE`, …).
fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code as C;
    match code {
        C::Ok => "OK",
        C::Cancelled => "CANCELLED",
        C::Unknown => "UNKNOWN",
        C::InvalidArgument => "INVALID_ARGUMENT",
        C::DeadlineExceeded => "DEADLINE_EXCEEDED",
        C::NotFound => "NOT_FOUND",
        C::AlreadyExists => "ALREADY_EXISTS",
        C::PermissionDenied => "PERMISSION_DENIED",
        C::ResourceExhausted => "RESOURCE_EXHAUSTED",
        C::FailedPrecondition => "FAILED_PRECONDITION",
        C::Aborted => "ABORTED",
        C::OutOfRange => "OUT_OF_RANGE",
        C::Unimplemented => "UNIMPLEMENTED",
        C::Internal => "INTERNAL",
        C::Unavailable => "UNAVAILABLE",
        C::DataLoss => "DATA_LOSS",
        C::Unauthenticated => "UNAUTHENTICATED",
    }
}

/// The `grpc-status` of `headers` (a trailers-only answer's, or the trailers'), if any.
fn grpc_status(headers: &http::HeaderMap) -> Option<i32> {
    headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

/// An answer's body that logs the call's completion when its trailers pass (or when it
/// ends or is dropped without them).
struct Observed {
    inner: Body,
    completion: Option<Completion>,
}

impl http_body::Body for Observed {
    type Data = <Body as http_body::Body>::Data;
    type Error = <Body as http_body::Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_ref()
                    && let Some(c) = self.completion.take()
                {
                    c.log(grpc_status(trailers));
                }
            }
            Poll::Ready(None | Some(Err(_))) => {
                if let Some(c) = self.completion.take() {
                    c.log(None);
                }
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        if let Some(c) = self.completion.take() {
            c.log(None);
        }
    }
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
            auth.key = tracing::field::Empty,
        );
        let _ = span.set_parent(crate::http::extract_context(req.headers()));
        let key = crate::http::AuthKeySlot::default();
        let mut req = req;
        req.extensions_mut().insert(key.clone());
        let completion = Completion {
            span: span.clone(),
            method,
            service: S::NAME,
            started: Instant::now(),
            key,
        };
        let call = span.in_scope(|| self.inner.call(req));
        Box::pin(async move {
            let mut response = call.instrument(span.clone()).await?;
            crate::http::insert_trace_headers(response.headers_mut(), &span);
            // A trailers-only answer (an error) is complete now; else at its trailers.
            if let Some(code) = grpc_status(response.headers()) {
                completion.log(Some(code));
                return Ok(response);
            }
            Ok(response.map(|inner| {
                Body::new(Observed {
                    inner,
                    completion: Some(completion),
                })
            }))
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

    use crate::test_support::Capture;

    /// A service in front of `S` that records the key name `test-key`, as a service's
    /// authentication does.
    #[derive(Clone)]
    struct Keyed<S>(S);

    impl<S: tonic::server::NamedService> tonic::server::NamedService for Keyed<S> {
        const NAME: &'static str = S::NAME;
    }

    impl<S> tonic::codegen::Service<http::Request<tonic::body::Body>> for Keyed<S>
    where
        S: tonic::codegen::Service<http::Request<tonic::body::Body>>,
    {
        type Response = S::Response;
        type Error = S::Error;
        type Future = S::Future;

        fn poll_ready(
            &mut self,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            self.0.poll_ready(cx)
        }

        fn call(&mut self, req: http::Request<tonic::body::Body>) -> Self::Future {
            crate::http::record_auth_key(req.extensions(), "test-key");
            crate::http::record_auth_key(req.extensions(), "second-name-ignored");
            self.0.call(req)
        }
    }

    /// The completion line of a call answered OK (its status in the trailers, after the
    /// message) and of one refused trailers-only (UNAVAILABLE: a server fault, at warn),
    /// with the method, the status name, the key name and the duration.
    #[tokio::test]
    async fn every_call_logs_its_completion_with_status_method_and_key_name() {
        use http_body_util::BodyExt as _;
        use tonic::codegen::Service as _;
        let (capture, _guard) = Capture::install();
        let (_, health) = tonic_health::server::health_reporter();
        let mut svc = super::Traced::new(Keyed(health));
        // Check(HealthCheckRequest {}): an uncompressed, empty message.
        let req = http::Request::post("/grpc.health.v1.Health/Check")
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(tonic::body::Body::new(http_body_util::Full::new(
                tonic::codegen::Bytes::from_static(&[0, 0, 0, 0, 0]),
            )))
            .unwrap();
        let r = svc.call(req).await.unwrap();
        assert!(
            r.headers().get("grpc-status").is_none(),
            "not trailers-only"
        );
        let text = || capture.text();
        assert!(
            !text().contains("request served"),
            "logged before the answer was complete:\n{}",
            text()
        );
        let collected = r.into_body().collect().await.unwrap();
        assert_eq!(collected.trailers().unwrap()["grpc-status"], "0");
        let served = text();
        let line = served
            .lines()
            .find(|l| l.contains("request served"))
            .unwrap_or_else(|| panic!("no completion line:\n{served}"));
        for part in [
            "DEBUG",
            "grpc.status=\"OK\"",
            "rpc.method=\"Check\"",
            "rpc.service=\"grpc.health.v1.Health\"",
            "auth.key=\"test-key\"",
            "elapsed_ms=",
        ] {
            assert!(line.contains(part), "{part} not in {line}");
        }
        assert_eq!(served.matches("request served").count(), 1, "{served}");

        let mut down = super::Traced::new(Down);
        let r = down
            .call(
                http::Request::post("/test.Down/Get")
                    .body(tonic::body::Body::empty())
                    .unwrap(),
            )
            .await
            .unwrap();
        drop(r);
        let all = text();
        let line = all
            .lines()
            .find(|l| l.contains("request failed"))
            .unwrap_or_else(|| panic!("no failure line:\n{all}"));
        for part in [
            "WARN",
            "grpc.status=\"UNAVAILABLE\"",
            "rpc.method=\"Get\"",
            "rpc.service=\"test.Down\"",
        ] {
            assert!(line.contains(part), "{part} not in {line}");
        }
        assert!(!line.contains("auth.key"), "{line}");
        assert_eq!(all.matches("request failed").count(), 1, "{all}");
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
