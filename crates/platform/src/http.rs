//! HTTP server plumbing shared by the HTTP services: every request runs in a span that
//! continues the caller's W3C trace context (`traceparent` header), is counted and timed
//! by route template and status, and is logged as one structured line; every answer,
//! errors included, names that span in its `traceresponse` and `x-trace-id` headers.
//! Label values stay bounded: routes are the matched templates (`/subjects/{subject}`) or
//! `unmatched`, never raw paths, and methods other than the standard nine are `other`.
//! A service's auth layer names the key a request authenticated with ([`record_auth_key`]):
//! the name (never the key) is then on the request's span and its completion line as
//! `auth.key`.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::Response;
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::TraceContextExt as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

pub const HTTP_REQUESTS_TOTAL: &str = "pulse_http_requests_total";
pub const HTTP_REQUEST_SECONDS: &str = "pulse_http_request_duration_seconds";

/// Response header with the server span as W3C Trace Context Level 2 writes it:
/// `00-<trace id>-<span id>-<flags>`.
pub const TRACERESPONSE: HeaderName = HeaderName::from_static("traceresponse");
/// Response header with the 32-hex-digit trace id alone (for people and log searches).
pub const X_TRACE_ID: HeaderName = HeaderName::from_static("x-trace-id");
/// The `route` label of a request that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";
/// The `method` label of a request whose method is none of RFC 9110's eight and PATCH.
pub const OTHER_METHOD: &str = "other";

/// The request extension [`observe`] puts on every request for the service's auth layer
/// to leave the name of the key (API key, bearer token) the request authenticated with;
/// [`observe`] reads it when the answer is ready. Only a name, never a key: the platform
/// knows nothing of a service's keys, the service calls [`record_auth_key`].
#[derive(Debug, Clone, Default)]
pub struct AuthKeySlot(Arc<OnceLock<String>>);

impl AuthKeySlot {
    /// The name recorded for this request, if any.
    pub fn get(&self) -> Option<&str> {
        self.0.get().map(String::as_str)
    }
}

/// Records `name`, the name of the key the request with `extensions` authenticated with
/// (never the key), for its completion line; the first name recorded stays. Without
/// [`observe`] in front (no slot) it does nothing.
pub fn record_auth_key(extensions: &axum::http::Extensions, name: &str) {
    if let Some(slot) = extensions.get::<AuthKeySlot>() {
        let _ = slot.0.set(name.to_owned());
    }
}

/// Describes the HTTP metrics (call once per process; repeated calls are harmless).
pub fn describe_metrics() {
    metrics::describe_counter!(
        HTTP_REQUESTS_TOTAL,
        "HTTP requests served, by route template, method and status."
    );
    metrics::describe_histogram!(
        HTTP_REQUEST_SECONDS,
        metrics::Unit::Seconds,
        "HTTP request latency, by route template and method."
    );
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

/// The caller's trace context from request headers (empty if absent or malformed).
pub fn extract_context(headers: &HeaderMap) -> opentelemetry::Context {
    TraceContextPropagator::new().extract(&HeaderExtractor(headers))
}

/// The `method` label of `method`: its name for the standard methods, else `other` (a
/// client can send any token as a method; it must not become a new series).
pub fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::CONNECT => "CONNECT",
        Method::OPTIONS => "OPTIONS",
        Method::TRACE => "TRACE",
        Method::PATCH => "PATCH",
        _ => OTHER_METHOD,
    }
}

/// The `traceresponse` and `x-trace-id` values naming `span`'s OpenTelemetry span, or
/// `None` when it has none (no OpenTelemetry layer in the subscriber).
pub fn trace_header_values(span: &tracing::Span) -> Option<[(HeaderName, HeaderValue); 2]> {
    let cx = span.context();
    let otel = cx.span();
    let sc = otel.span_context();
    if !sc.is_valid() {
        return None;
    }
    let trace_id = sc.trace_id().to_string();
    let traceresponse = format!(
        "00-{trace_id}-{}-{:02x}",
        sc.span_id(),
        sc.trace_flags().to_u8()
    );
    Some([
        (TRACERESPONSE, HeaderValue::from_str(&traceresponse).ok()?),
        (X_TRACE_ID, HeaderValue::from_str(&trace_id).ok()?),
    ])
}

/// Adds the trace headers of `span` (see [`trace_header_values`]) to `headers`.
pub fn insert_trace_headers(headers: &mut HeaderMap, span: &tracing::Span) {
    if let Some(values) = trace_header_values(span) {
        for (name, value) in values {
            headers.insert(name, value);
        }
    }
}

/// Middleware: `Router::layer(axum::middleware::from_fn(pulse_platform::http::observe))`.
pub async fn observe(mut req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| UNMATCHED_ROUTE.to_owned(), |p| p.as_str().to_owned());
    let method = method_label(req.method());
    let span = tracing::info_span!(
        "http.request",
        otel.kind = "server",
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        auth.key = tracing::field::Empty,
    );
    let _ = span.set_parent(extract_context(req.headers()));
    let slot = AuthKeySlot::default();
    req.extensions_mut().insert(slot.clone());
    let started = Instant::now();
    let mut response = next.run(req).instrument(span.clone()).await;
    insert_trace_headers(response.headers_mut(), &span);
    let status = response.status().as_u16();
    let elapsed = started.elapsed().as_secs_f64();
    span.record("http.response.status_code", status);
    let key = slot.get();
    if let Some(key) = key {
        span.record("auth.key", key);
    }
    metrics::counter!(HTTP_REQUESTS_TOTAL, "route" => route.clone(), "method" => method, "status" => status.to_string())
        .increment(1);
    metrics::histogram!(HTTP_REQUEST_SECONDS, "route" => route.clone(), "method" => method)
        .record(elapsed);
    span.in_scope(|| {
        if status >= 500 {
            tracing::warn!(
                status,
                route,
                method,
                auth.key = key,
                elapsed_ms = elapsed * 1e3,
                "request failed"
            );
        } else {
            tracing::debug!(
                status,
                route,
                method,
                auth.key = key,
                elapsed_ms = elapsed * 1e3,
                "request served"
            );
        }
    });
    response
}

/// `listener` for `axum::serve`, with `TCP_NODELAY` set on every accepted connection (axum
/// leaves Nagle's algorithm on), so a response is not held back waiting for an ACK.
pub fn nodelay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    use axum::serve::ListenerExt as _;
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!(error = %e, "could not set TCP_NODELAY on an accepted connection");
        }
    })
}

/// A subscriber with an OpenTelemetry layer (no exporter), for tests that read span ids.
#[cfg(test)]
pub(crate) fn otel_subscriber() -> impl tracing::Subscriber + Send + Sync {
    use opentelemetry::trace::TracerProvider as _;
    use tracing_subscriber::layer::SubscriberExt as _;
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("test")))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::{Method, Request};
    use axum::serve::Listener as _;
    use tonic::codegen::Service as _;

    const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    async fn answer(req: Request<Body>) -> axum::response::Response {
        let app = axum::Router::new()
            .route("/ok", axum::routing::get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(super::observe));
        app.into_service().call(req).await.unwrap()
    }

    fn header(r: &axum::response::Response, name: &str) -> String {
        r.headers()
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header"))
            .to_str()
            .unwrap()
            .to_owned()
    }

    #[tokio::test]
    async fn answers_name_the_server_span_which_continues_an_incoming_traceparent() {
        let _guard = tracing::subscriber::set_default(super::otel_subscriber());
        let req = Request::get("/ok")
            .header("traceparent", TRACEPARENT)
            .body(Body::empty())
            .unwrap();
        let r = answer(req).await;
        assert_eq!(r.status(), 200);
        assert_eq!(header(&r, "x-trace-id"), "4bf92f3577b34da6a3ce929d0e0e4736");
        let tr = header(&r, "traceresponse");
        let parts: Vec<&str> = tr.split('-').collect();
        assert_eq!(parts.len(), 4, "{tr}");
        assert_eq!(parts[..2], ["00", "4bf92f3577b34da6a3ce929d0e0e4736"]);
        assert_eq!(parts[2].len(), 16);
        assert_ne!(
            parts[2], "00f067aa0ba902b7",
            "the server span, not the caller's"
        );
        assert_eq!(parts[3], "01");
    }

    #[tokio::test]
    async fn error_answers_without_a_traceparent_name_a_fresh_trace() {
        let _guard = tracing::subscriber::set_default(super::otel_subscriber());
        let unmatched = answer(Request::get("/nope").body(Body::empty()).unwrap()).await;
        assert_eq!(unmatched.status(), 404);
        let bad_method = answer(Request::post("/ok").body(Body::empty()).unwrap()).await;
        assert_eq!(bad_method.status(), 405);
        let (a, b) = (
            header(&unmatched, "x-trace-id"),
            header(&bad_method, "x-trace-id"),
        );
        for id in [&a, &b] {
            assert_eq!(id.len(), 32, "{id}");
            assert!(id.bytes().all(|c| c.is_ascii_hexdigit()), "{id}");
            assert_ne!(id.as_str(), "4bf92f3577b34da6a3ce929d0e0e4736");
        }
        assert_ne!(a, b, "each request starts its own trace");
    }

    use crate::test_support::Capture;

    #[tokio::test]
    async fn the_completion_line_names_the_key_the_auth_layer_recorded() {
        let (capture, _guard) = Capture::install();
        let app = axum::Router::new()
            .route(
                "/keyed",
                axum::routing::get(|req: Request<Body>| async move {
                    super::record_auth_key(req.extensions(), "grafana-2026");
                    super::record_auth_key(req.extensions(), "second-name-ignored");
                    (axum::http::StatusCode::BAD_REQUEST, "bad")
                }),
            )
            .route("/anonymous", axum::routing::get(|| async { "ok" }))
            .layer(axum::middleware::from_fn(super::observe));
        for path in ["/keyed", "/anonymous"] {
            let req = Request::get(path).body(Body::empty()).unwrap();
            let r = app.clone().into_service().call(req).await.unwrap();
            assert!(r.status().as_u16() < 500, "{path}");
        }
        let text = capture.text();
        let line = |route: &str| {
            text.lines()
                .find(|l| l.contains("request served") && l.contains(&format!("route=\"{route}\"")))
                .unwrap_or_else(|| panic!("no completion line of {route} in\n{text}"))
                .to_owned()
        };
        let keyed = line("/keyed");
        assert!(keyed.contains("auth.key=\"grafana-2026\""), "{keyed}");
        assert!(!text.contains("second-name-ignored"), "{text}");
        let anonymous = line("/anonymous");
        assert!(!anonymous.contains("auth.key"), "{anonymous}");
    }

    #[test]
    fn unknown_methods_share_one_label() {
        assert_eq!(super::method_label(&Method::GET), "GET");
        assert_eq!(super::method_label(&Method::PATCH), "PATCH");
        for m in ["FOO", "get", "BREW", "X-LONG-MADE-UP-METHOD"] {
            let m = Method::from_bytes(m.as_bytes()).unwrap();
            assert_eq!(super::method_label(&m), "other", "{m}");
        }
    }

    #[tokio::test]
    async fn accepted_http_connections_have_tcp_nodelay_set() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let mut listener = super::nodelay(listener);
        let _client = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (accepted, _) = listener.accept().await;
        assert!(accepted.nodelay().unwrap());
    }
}
