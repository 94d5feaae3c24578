//! Limits on every HTTP and gRPC server, so that a slow or hostile client cannot take a
//! service down: a request-body read timeout (tower-http's `TimeoutBody`: the longest
//! pause while a body is received), a request timeout (tower's `Timeout`, which covers
//! reading the body too, so a body trickled just fast enough is still cut), a concurrency
//! limit per server with load shedding (tower's `GlobalConcurrencyLimit` + `LoadShed`:
//! refused at once, never queued), a connection limit per listener and a header read
//! timeout per connection (in [`crate::listener`]: a connection beyond the limit is
//! answered 503 / `UNAVAILABLE` and closed; headers that take too long close the
//! connection).
//!
//! Refusals answer 503 with `Retry-After` over HTTP and `UNAVAILABLE` with `retry-after`
//! metadata over gRPC; a body that stalls is answered 408 Request Timeout with
//! `Retry-After` and `Connection: close` (a 4xx: the pause is the client's, not the
//! server's load) and `UNAVAILABLE` with `retry-after` over gRPC.
//! Each is counted in [`LIMITED_TOTAL`] by server and limit (fixed label values).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::http::{Request, StatusCode};
use axum::response::Response;
use http_body_util::BodyExt as _;
use tower::ServiceBuilder;
use tower::limit::GlobalConcurrencyLimitLayer;
use tower::load_shed::LoadShedLayer;
use tower::timeout::TimeoutLayer;
use tower_http::timeout::{TimeoutBody, TimeoutError};

use crate::api_error::ApiError;
use crate::config::{Problems, Validate};

pub const LIMITED_TOTAL: &str = "pulse_server_limited_total";

/// The `limit` label values of [`LIMITED_TOTAL`].
pub const LIMITS: &[&str] = &[
    "body_timeout",
    "request_timeout",
    "concurrency",
    "connections",
    "header_timeout",
];

/// Describes the limit metric (repeated calls are harmless).
pub fn describe_metrics() {
    metrics::describe_counter!(
        LIMITED_TOTAL,
        "Requests and connections cut or refused by a server limit, by server (http, grpc, admin) and limit (request_timeout, concurrency: answered 503/UNAVAILABLE with Retry-After; body_timeout: a body paused longer than --request-body-timeout, answered 408/UNAVAILABLE with Retry-After; connections: connections beyond --max-connections, answered 503/UNAVAILABLE with Retry-After and closed, or closed at once while too many refusals are under way; header_timeout: connections closed because a request's headers took longer than --header-read-timeout)."
    );
}

/// Creates the limit series of `server` at zero.
pub fn init_metrics(server: &'static str) {
    describe_metrics();
    for &limit in LIMITS {
        metrics::counter!(LIMITED_TOTAL, "server" => server, "limit" => limit).increment(0);
    }
}

pub(crate) fn count(server: &'static str, limit: &'static str) {
    metrics::counter!(LIMITED_TOTAL, "server" => server, "limit" => limit).increment(1);
}

fn parse_duration(s: &str) -> Result<Duration, humantime::DurationError> {
    humantime::parse_duration(s)
}

/// The limit flags every server shares (each applies to each HTTP and gRPC server of the
/// service, and to its admin server, separately).
#[derive(Debug, Clone, clap::Args)]
pub struct LimitArgs {
    /// Longest pause while a request body is received (HTTP bodies and the messages of a
    /// gRPC client stream); the request is cut after it and answered 408 (gRPC:
    /// UNAVAILABLE) with Retry-After. E.g. `10s`, `500ms`.
    #[arg(
        long = "request-body-timeout",
        env = "PULSE_REQUEST_BODY_TIMEOUT",
        default_value = "30s",
        value_parser = parse_duration
    )]
    pub request_body_timeout: Duration,
    /// Longest time a request may take, reading its body included (503 / UNAVAILABLE
    /// with Retry-After after it). A gRPC response stream is not limited once it started.
    #[arg(
        long = "request-timeout",
        env = "PULSE_REQUEST_TIMEOUT",
        default_value = "60s",
        value_parser = parse_duration
    )]
    pub request_timeout: Duration,
    /// Most requests one server (HTTP, gRPC or admin) handles at once; more are refused
    /// at once with 503 / UNAVAILABLE and Retry-After.
    #[arg(
        long = "max-concurrent-requests",
        env = "PULSE_MAX_CONCURRENT_REQUESTS",
        default_value_t = 512
    )]
    pub max_concurrent_requests: usize,
    /// Most open connections per listener; a connection beyond it is answered 503
    /// (gRPC: UNAVAILABLE) with Retry-After and closed.
    #[arg(
        long = "max-connections",
        env = "PULSE_MAX_CONNECTIONS",
        default_value_t = 1024
    )]
    pub max_connections: usize,
    /// Retry-After seconds of an answer refused by a limit.
    #[arg(
        long = "limit-retry-after-secs",
        env = "PULSE_LIMIT_RETRY_AFTER_SECS",
        default_value_t = 1
    )]
    pub limit_retry_after_secs: u64,
}

impl Default for LimitArgs {
    fn default() -> Self {
        Self {
            request_body_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(60),
            max_concurrent_requests: 512,
            max_connections: 1024,
            limit_retry_after_secs: 1,
        }
    }
}

impl Validate for LimitArgs {
    fn validate(&self, p: &mut Problems) {
        p.check(
            !self.request_body_timeout.is_zero(),
            "--request-body-timeout / PULSE_REQUEST_BODY_TIMEOUT",
            "must be more than 0",
        );
        p.check(
            !self.request_timeout.is_zero(),
            "--request-timeout / PULSE_REQUEST_TIMEOUT",
            "must be more than 0",
        );
        p.check(
            self.max_concurrent_requests >= 1,
            "--max-concurrent-requests / PULSE_MAX_CONCURRENT_REQUESTS",
            "must be at least 1",
        );
        p.check(
            self.max_connections >= 1,
            "--max-connections / PULSE_MAX_CONNECTIONS",
            "must be at least 1",
        );
    }
}

/// Why a server refused a request.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    #[error("the server is at its limit of {0} concurrent requests; retry later")]
    Concurrency(usize),
    #[error("the request took longer than the server's limit of {0:?}")]
    Timeout(Duration),
    #[error("the request body paused for longer than the server's limit of {0:?}")]
    BodyTimeout(Duration),
    #[error("the server is at its limit of {0} open connections; retry later")]
    Connections(usize),
}

/// A refusal with its `Retry-After` seconds: the answer of a limit.
#[derive(Debug)]
pub(crate) struct Refused {
    pub(crate) why: Refusal,
    pub(crate) retry_after: u64,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.why.fmt(f)
    }
}

impl std::error::Error for Refused {}

impl ApiError for Refused {
    fn code(&self) -> &'static str {
        match self.why {
            Refusal::Concurrency(_) => "overloaded",
            Refusal::Timeout(_) => "request_timeout",
            Refusal::BodyTimeout(_) => "body_timeout",
            Refusal::Connections(_) => "too_many_connections",
        }
    }
    fn http_status(&self) -> StatusCode {
        match self.why {
            Refusal::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }
    fn grpc_code(&self) -> tonic::Code {
        tonic::Code::Unavailable
    }
    fn retry_after(&self) -> Option<u64> {
        Some(self.retry_after)
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The refusal of a request the limit layers failed with, counted for `server`.
fn refusal(e: &BoxError, limits: &LimitArgs, server: &'static str) -> Refused {
    let why = if e.is::<tower::timeout::error::Elapsed>() {
        count(server, "request_timeout");
        Refusal::Timeout(limits.request_timeout)
    } else {
        // The only other error of the stack: load shedding at the concurrency limit.
        count(server, "concurrency");
        Refusal::Concurrency(limits.max_concurrent_requests)
    };
    Refused {
        why,
        retry_after: limits.limit_retry_after_secs,
    }
}

/// `body` cut after `timeout` without a frame, counted for `server`; `cut` is set when
/// it was.
fn timed_body<B>(
    body: B,
    timeout: Duration,
    server: &'static str,
    cut: Arc<AtomicBool>,
) -> http_body_util::combinators::MapErr<TimeoutBody<B>, impl FnMut(BoxError) -> BoxError + Clone>
where
    B: http_body::Body,
    B::Error: Into<BoxError>,
{
    TimeoutBody::new(timeout, body).map_err(move |e: BoxError| {
        if e.is::<TimeoutError>() && !cut.swap(true, Ordering::Relaxed) {
            count(server, "body_timeout");
        }
        e
    })
}

/// A body type the limits wrap and answer with: axum's (HTTP servers) or tonic's (gRPC).
trait LimitedBody: http_body::Body + Sized + Send + 'static {
    /// `body` as this type (the request body handed to the service).
    fn wrap<B>(body: B) -> Self
    where
        B: http_body::Body<Data = axum::body::Bytes> + Send + 'static,
        B::Error: Into<BoxError>;
    /// The answer of `refused`.
    fn answer(refused: &Refused) -> Response<Self>;
}

impl LimitedBody for axum::body::Body {
    fn wrap<B>(body: B) -> Self
    where
        B: http_body::Body<Data = axum::body::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self::new(body)
    }
    fn answer(refused: &Refused) -> Response<Self> {
        let mut response = crate::api_error::http_response(refused);
        // The rest of the body is still on its way (or never comes): this connection
        // cannot carry another request.
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
        response
    }
}

impl LimitedBody for tonic::body::Body {
    fn wrap<B>(body: B) -> Self
    where
        B: http_body::Body<Data = axum::body::Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        Self::new(body)
    }
    fn answer(refused: &Refused) -> Response<Self> {
        crate::api_error::grpc_status(refused).into_http()
    }
}

/// The request-body timeout as a service: the body cut after the longest pause, and the
/// answer of a request whose body was cut replaced by the limit's (whatever the handler
/// made of the unreadable body), so that the client learns it was a limit and when to
/// retry.
#[derive(Debug, Clone)]
struct BodyTimeout<S> {
    inner: S,
    timeout: Duration,
    retry_after: u64,
    server: &'static str,
}

impl<S, B> tower::Service<Request<B>> for BodyTimeout<S>
where
    S: tower::Service<Request<B>, Response = Response<B>>,
    S::Future: Send + 'static,
    B: LimitedBody<Data = axum::body::Bytes>,
    B::Error: Into<BoxError>,
{
    type Response = Response<B>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Response<B>, S::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let cut = Arc::new(AtomicBool::new(false));
        let (timeout, server) = (self.timeout, self.server);
        let req = req.map(|b| B::wrap(timed_body(b, timeout, server, cut.clone())));
        let response = self.inner.call(req);
        let retry_after = self.retry_after;
        Box::pin(async move {
            let response = response.await?;
            if cut.load(Ordering::Relaxed) {
                return Ok(B::answer(&Refused {
                    why: Refusal::BodyTimeout(timeout),
                    retry_after,
                }));
            }
            Ok(response)
        })
    }
}

fn body_timeout_layer<S>(
    limits: &LimitArgs,
    server: &'static str,
) -> impl tower::Layer<S, Service = BodyTimeout<S>> + Clone + use<S> {
    let (timeout, retry_after) = (limits.request_body_timeout, limits.limit_retry_after_secs);
    tower::layer::layer_fn(move |inner| BodyTimeout {
        inner,
        timeout,
        retry_after,
        server,
    })
}

/// `app` with the limits applied to every route (and the fallback). `server` names it in
/// the limit metric (`http` or `admin`).
pub fn http(app: axum::Router, limits: &LimitArgs, server: &'static str) -> axum::Router {
    init_metrics(server);
    let l = limits.clone();
    app.layer(
        ServiceBuilder::new()
            .layer(axum::error_handling::HandleErrorLayer::new(
                move |e: BoxError| {
                    let response = crate::api_error::http_response(&refusal(&e, &l, server));
                    std::future::ready(response)
                },
            ))
            .layer(LoadShedLayer::new())
            .layer(GlobalConcurrencyLimitLayer::with_semaphore(Arc::new(
                tokio::sync::Semaphore::new(limits.max_concurrent_requests),
            )))
            .layer(TimeoutLayer::new(limits.request_timeout))
            .layer(body_timeout_layer(limits, server)),
    )
}

/// The limit layers of a tonic server (`Server::builder().layer(..)`), counted as `grpc`.
pub fn grpc_layer(
    limits: LimitArgs,
) -> impl tower::Layer<
    tonic::service::Routes,
    Service = impl tower::Service<
        Request<tonic::body::Body>,
        Response = Response<tonic::body::Body>,
        Error = BoxError,
        Future = impl Send,
    > + Clone
              + Send
              + Sync
              + 'static,
> + Clone {
    const SERVER: &str = "grpc";
    init_metrics(SERVER);
    let (timeout, max) = (limits.request_timeout, limits.max_concurrent_requests);
    let l = limits.clone();
    ServiceBuilder::new()
        .map_result(
            move |r: Result<Response<tonic::body::Body>, BoxError>| -> Result<_, BoxError> {
                // Load shedding fails in `call`, never in `poll_ready`, so every refusal
                // passes through here and becomes an answer.
                Ok(match r {
                    Ok(response) => response,
                    Err(e) => crate::api_error::grpc_status(&refusal(&e, &l, SERVER)).into_http(),
                })
            },
        )
        .layer(LoadShedLayer::new())
        .layer(GlobalConcurrencyLimitLayer::with_semaphore(Arc::new(
            tokio::sync::Semaphore::new(max),
        )))
        .layer(TimeoutLayer::new(timeout))
        .layer(body_timeout_layer(&limits, SERVER))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::Body;
    use axum::http::Request;
    use tower::{Layer as _, Service as _, ServiceExt as _};

    use std::convert::Infallible;

    use super::*;

    fn limits() -> LimitArgs {
        LimitArgs {
            request_body_timeout: Duration::from_millis(200),
            request_timeout: Duration::from_millis(400),
            max_concurrent_requests: 1,
            max_connections: 10,
            limit_retry_after_secs: 3,
        }
    }

    fn app() -> axum::Router {
        let app = axum::Router::new()
            .route(
                "/slow",
                axum::routing::get(|| async {
                    tokio::time::sleep(Duration::from_secs(5)).await;
                    "late"
                }),
            )
            .route(
                "/echo",
                axum::routing::post(|body: axum::body::Bytes| async move { body }),
            );
        http(app, &limits(), "http")
    }

    #[tokio::test]
    async fn a_request_over_the_timeout_is_answered_503_with_retry_after() {
        let r = app()
            .oneshot(Request::get("/slow").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "3");
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        assert!(
            String::from_utf8_lossy(&body).contains("\"request_timeout\""),
            "{body:?}"
        );
    }

    #[tokio::test]
    async fn the_request_over_the_concurrency_limit_is_refused_at_once() {
        let app = app();
        let first = tokio::spawn(
            app.clone()
                .oneshot(Request::get("/slow").body(Body::empty()).unwrap()),
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let started = std::time::Instant::now();
        let r = app
            .oneshot(Request::get("/slow").body(Body::empty()).unwrap())
            .await
            .unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "3");
        assert!(started.elapsed() < Duration::from_millis(300));
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        assert!(
            String::from_utf8_lossy(&body).contains("\"overloaded\""),
            "{body:?}"
        );
        assert_eq!(first.await.unwrap().unwrap().status(), 503, "timed out");
    }

    #[tokio::test]
    async fn a_body_that_stalls_is_cut_after_the_body_timeout() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, Infallible>>(1);
        tx.send(Ok("a".into())).await.unwrap();
        let body = Body::from_stream(tokio_stream_from(rx));
        let started = std::time::Instant::now();
        let r = app()
            .oneshot(Request::post("/echo").body(body).unwrap())
            .await
            .unwrap();
        let elapsed = started.elapsed();
        assert_eq!(r.status(), 408);
        assert_eq!(r.headers()["retry-after"], "3");
        assert_eq!(r.headers()["connection"], "close");
        assert!(
            elapsed >= Duration::from_millis(200) && elapsed < Duration::from_millis(400),
            "{elapsed:?}"
        );
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        assert!(
            String::from_utf8_lossy(&body).contains("\"body_timeout\""),
            "{body:?}"
        );
        drop(tx);
    }

    #[tokio::test]
    async fn a_grpc_request_whose_body_stalls_gets_unavailable_with_retry_after() {
        // A service that reads the whole body and answers OK whatever the read gave: the
        // limit's answer replaces it.
        let service = tower::service_fn(|req: Request<tonic::body::Body>| async move {
            let _ = req.into_body().collect().await;
            Ok::<_, Infallible>(tonic::Status::ok("").into_http::<tonic::body::Body>())
        });
        let mut service = body_timeout_layer(&limits(), "grpc").layer(service);
        let (tx, rx) = tokio::sync::mpsc::channel::<Result<axum::body::Bytes, Infallible>>(1);
        tx.send(Ok("a".into())).await.unwrap();
        let body = tonic::body::Body::new(http_body_util::StreamBody::new(
            futures::StreamExt::map(tokio_stream_from(rx), |b| b.map(http_body::Frame::data)),
        ));
        let started = std::time::Instant::now();
        let r = service
            .ready()
            .await
            .unwrap()
            .call(Request::post("/s/m").body(body).unwrap())
            .await
            .unwrap();
        assert!(started.elapsed() >= Duration::from_millis(200));
        let status = tonic::Status::from_header_map(r.headers()).unwrap();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert_eq!(r.headers()["retry-after"], "3");
        drop(tx);
    }

    fn tokio_stream_from<T: Send + 'static>(
        mut rx: tokio::sync::mpsc::Receiver<T>,
    ) -> impl futures::Stream<Item = T> {
        futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
    }
}
