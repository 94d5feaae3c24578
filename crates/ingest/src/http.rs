//! `POST /v1/events`: authenticates the API key, rate-limits per key, decodes the body
//! (gzip, JSON / array / NDJSON) and hands the events to the pipeline; maps every failure
//! to one JSON error shape and status (400, 401, 413, 415, 429, 503; see `error`).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry::trace::TraceContextExt;
use serde_json::json;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::auth::{KeyStore, RateLimiter, admit, authenticate};
use crate::body::{self, BodyError, BodyLimits};
use crate::error::{HTTP_KEY_HINT, Refusal};
use crate::metrics as m;
use crate::pipeline::{BatchResult, EventResult, Incoming, IngestError, Ingestor};

/// What the HTTP handler needs.
#[derive(Debug, Clone)]
pub struct HttpState {
    pub ingestor: Ingestor,
    pub keys: Arc<KeyStore>,
    pub limiter: Arc<RateLimiter>,
    pub body_limits: BodyLimits,
    /// Seconds clients are told to wait on 503.
    pub retry_after_secs: u64,
}

/// The intake routes.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v1/events", post(post_events))
        // The handler enforces the body limit itself, with the JSON error shape.
        .layer(DefaultBodyLimit::disable())
        .layer(axum::middleware::from_fn(pulse_platform::http::observe))
        .with_state(state)
}

/// 503 with `Retry-After`.
fn unavailable(error: IngestError, retry_after_secs: u64) -> Refusal {
    Refusal::Unavailable {
        error,
        retry_after_secs: Some(retry_after_secs),
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|v| v.to_str().ok())
}

/// A header describing the body (Content-Type, Content-Encoding), read lossily: a value
/// that is not visible ASCII names no supported type or encoding, so it must be refused
/// (415), not ignored as if the header were absent.
fn body_header(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
}

/// The current span's context when it is a valid (recorded) span, else `fallback`.
pub(crate) fn current_or(fallback: opentelemetry::Context) -> opentelemetry::Context {
    let current = tracing::Span::current().context();
    if current.span().span_context().is_valid() {
        current
    } else {
        fallback
    }
}

async fn post_events(State(state): State<HttpState>, req: Request) -> Result<Response, Refusal> {
    let headers = req.headers().clone();
    // The request's server span (platform::http::observe) continues an incoming
    // `traceparent` or starts the trace the answer's `x-trace-id` names: continue it (the
    // header itself when no OpenTelemetry layer is installed).
    let parent = current_or(pulse_platform::http::extract_context(&headers));
    let peer = req
        .extensions()
        .get::<ConnectInfo<std::net::SocketAddr>>()
        .map_or_else(|| "unknown".to_owned(), |c| c.0.to_string());
    let caller = authenticate(
        &state.keys,
        header_str(&headers, "authorization"),
        header_str(&headers, "x-api-key"),
        &peer,
    )
    .ok_or(Refusal::Unauthenticated {
        hint: HTTP_KEY_HINT,
    })?;
    // The key's name (never the key) on the platform's completion line too.
    pulse_platform::http::record_auth_key(req.extensions(), &caller.key);
    let span = caller.span(&peer, "http");
    serve_authenticated(state, req, headers, caller.source, parent)
        .instrument(span)
        .await
}

/// The rest of `POST /v1/events` once the key is known (in the key's span).
async fn serve_authenticated(
    state: HttpState,
    req: Request,
    headers: HeaderMap,
    source: String,
    parent: opentelemetry::Context,
) -> Result<Response, Refusal> {
    let format = body::format_for(body_header(&headers, "content-type").as_deref())?;
    // Rate-limit before the body is read, decoded and split: a source whose bucket is
    // empty costs no decompression or parsing. (The request's events are charged below,
    // once they are counted.)
    admit(&state.limiter, &source, 0)?;
    let limit = state.body_limits.max_body_bytes;
    let raw = axum::body::to_bytes(Body::new(req.into_body()), limit)
        .await
        .map_err(|_| BodyError::TooLarge { limit })?;
    metrics::histogram!(m::BODY_BYTES).record(raw.len() as f64);
    let decoded = body::decode(
        &raw,
        body_header(&headers, "content-encoding").as_deref(),
        &state.body_limits,
    )?;
    let events = match body::split(&decoded, format, &state.body_limits) {
        Ok(events) => events,
        Err(e @ BodyError::NotJson(_)) => {
            // Unparseable at all: 400 with the reason, and the body is kept on the DLQ.
            if let Err(dlq) = state
                .ingestor
                .dead_letter_body(&source, &decoded, e.code(), &e.to_string(), &parent)
                .await
            {
                tracing::warn!(error = %dlq, "could not keep an unparseable body on the DLQ");
                return Err(unavailable(dlq, state.retry_after_secs));
            }
            return Err(e.into());
        }
        Err(e) => return Err(e.into()),
    };
    let count = u32::try_from(events.len()).unwrap_or(u32::MAX);
    admit(&state.limiter, &source, count)?;
    let incoming = events.into_iter().map(Incoming::json).collect();
    let result = state
        .ingestor
        .ingest(&source, "http", incoming, parent)
        .await
        .map_err(|e| unavailable(e, state.retry_after_secs))?;
    Ok(axum::Json(ResultBody::of(&result)).into_response())
}

/// The response body of a processed batch, serialized straight from the results: the same
/// bytes as [`result_json`] (its keys in the same, sorted, order) without building a JSON
/// tree of maps and owned strings per event first.
#[derive(Debug, serde::Serialize)]
pub struct ResultBody<'a> {
    accepted: usize,
    duplicates: usize,
    rejected: usize,
    #[serde(serialize_with = "results_seq")]
    results: &'a [EventResult],
}

impl<'a> ResultBody<'a> {
    pub fn of(r: &'a BatchResult) -> Self {
        Self {
            accepted: r.accepted,
            duplicates: r.duplicates,
            rejected: r.rejected,
            results: &r.results,
        }
    }
}

/// One event's result, keys in `result_json`'s (sorted) order.
#[derive(serde::Serialize)]
struct EventResultBody<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<FieldErrorBody<'a>>,
    event_id: &'a str,
    index: usize,
    status: &'static str,
}

#[derive(serde::Serialize)]
struct FieldErrorBody<'a> {
    code: &'static str,
    field: &'a str,
    reason: &'a str,
}

fn results_seq<S: serde::Serializer>(results: &&[EventResult], s: S) -> Result<S::Ok, S::Error> {
    s.collect_seq(results.iter().map(|e| EventResultBody {
        error: e.error.as_ref().map(|err| FieldErrorBody {
            code: err.code,
            field: &err.field,
            reason: &err.reason,
        }),
        event_id: &e.event_id,
        index: e.index,
        status: e.status.as_str(),
    }))
}

/// The response body of a processed batch as a JSON value (what [`ResultBody`] writes).
pub fn result_json(r: &BatchResult) -> serde_json::Value {
    let results: Vec<serde_json::Value> = r
        .results
        .iter()
        .map(|e| {
            let mut v =
                json!({ "index": e.index, "status": e.status.as_str(), "event_id": e.event_id });
            if let Some(err) = &e.error {
                v["error"] = json!({ "field": err.field, "reason": err.reason, "code": err.code });
            }
            v
        })
        .collect();
    json!({
        "accepted": r.accepted,
        "duplicates": r.duplicates,
        "rejected": r.rejected,
        "results": results,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    use pulse_platform::kafka::{AckFuture, Acked, OutRecord, ProduceError, RecordProducer};
    use tracing::field::{Field, Visit};
    use tracing::span::{Attributes, Id, Record};

    /// A subscriber that writes every span (name and fields) and event (fields) as text.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<String>>, Arc<AtomicU64>);

    struct Text<'a>(&'a mut String);

    impl Visit for Text<'_> {
        fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
            use std::fmt::Write as _;
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    impl tracing::Subscriber for Capture {
        fn enabled(&self, _: &tracing::Metadata<'_>) -> bool {
            true
        }
        fn new_span(&self, span: &Attributes<'_>) -> Id {
            let mut text = self.0.lock().unwrap();
            text.push_str("\nspan ");
            text.push_str(span.metadata().name());
            span.record(&mut Text(&mut text));
            Id::from_u64(self.1.fetch_add(1, Ordering::SeqCst) + 1)
        }
        fn record(&self, _: &Id, values: &Record<'_>) {
            values.record(&mut Text(&mut self.0.lock().unwrap()));
        }
        fn record_follows_from(&self, _: &Id, _: &Id) {}
        fn event(&self, event: &tracing::Event<'_>) {
            let mut text = self.0.lock().unwrap();
            text.push_str("\nevent");
            event.record(&mut Text(&mut text));
        }
        fn enter(&self, _: &Id) {}
        fn exit(&self, _: &Id) {}
    }

    /// Acknowledges every record.
    struct Ack;

    impl RecordProducer for Ack {
        fn enqueue(&self, _: OutRecord) -> Result<AckFuture, ProduceError> {
            Ok(Box::pin(async {
                Ok(Acked {
                    partition: 0,
                    offset: 0,
                })
            }))
        }
    }

    const SECRET: &str = "s3cret-ingest-key-0123456789";
    const WRONG: &str = "wrong-ingest-key-9876543210";

    fn state() -> HttpState {
        use crate::pipeline::{DlqOriginal, FixedSchemaId, PipelineConfig};
        let keys = crate::auth::ApiKeys::parse(&format!("{SECRET}=web:web-2026")).unwrap();
        HttpState {
            ingestor: Ingestor::new(
                PipelineConfig {
                    events_topic: "events".into(),
                    dlq_topic: "dlq".into(),
                    limits: crate::validate::Limits::default(),
                    max_backpressure_wait: Duration::from_millis(20),
                    in_flight_wait: Duration::from_millis(500),
                    max_dlq_original_bytes: 1024,
                    dlq_original: DlqOriginal::Keep,
                },
                Arc::new(Ack),
                Arc::new(FixedSchemaId(1)),
                crate::pii::PiiPolicy::parse(crate::pii::PiiPolicy::DEFAULT_SPEC, b"k").unwrap(),
                crate::dedup::DedupSet::new(100, Duration::from_secs(60)),
            ),
            keys: Arc::new(KeyStore::load(keys, None).unwrap()),
            limiter: Arc::new(RateLimiter::new(0.0, 0.0)),
            body_limits: BodyLimits::default(),
            retry_after_secs: 1,
        }
    }

    fn request(key: &str) -> Request {
        let body = serde_json::json!({
            "event_id": "log-1", "schema_version": 1, "event_type": "page_view",
            "key": { "user_id": "u1" },
            "metadata": { "event_timestamp": pulse_platform::clock::now_ms() }
        });
        let mut req = Request::builder()
            .method("POST")
            .uri("/v1/events")
            .header("authorization", format!("Bearer {key}"))
            .header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap();
        let peer: std::net::SocketAddr = "10.9.8.7:1234".parse().unwrap();
        req.extensions_mut().insert(ConnectInfo(peer));
        req
    }

    #[test]
    fn the_result_body_is_byte_for_byte_the_json_value_answer() {
        use crate::pipeline::Status;
        use crate::validate::FieldError;
        let r = BatchResult {
            accepted: 1,
            duplicates: 1,
            rejected: 1,
            results: vec![
                EventResult {
                    index: 0,
                    status: Status::Accepted,
                    event_id: "a\"1".into(),
                    error: None,
                },
                EventResult {
                    index: 1,
                    status: Status::Duplicate,
                    event_id: "b".into(),
                    error: None,
                },
                EventResult {
                    index: 2,
                    status: Status::Rejected,
                    event_id: String::new(),
                    error: Some(FieldError {
                        field: "payload.amount".into(),
                        reason: "must be \u{e9}xact".into(),
                        code: "invalid_amount",
                    }),
                },
            ],
        };
        assert_eq!(
            String::from_utf8(serde_json::to_vec(&ResultBody::of(&r)).unwrap()).unwrap(),
            serde_json::to_string(&result_json(&r)).unwrap()
        );
        let empty = BatchResult::default();
        assert_eq!(
            serde_json::to_vec(&ResultBody::of(&empty)).unwrap(),
            serde_json::to_vec(&result_json(&empty)).unwrap()
        );
    }

    #[tokio::test]
    async fn an_authenticated_request_runs_under_its_key_name_and_a_refusal_logs_the_caller() {
        let capture = Capture::default();
        let _default = tracing::subscriber::set_default(capture.clone());
        let answer = post_events(State(state()), request(SECRET)).await.unwrap();
        assert_eq!(answer.status(), 200);
        let refused = post_events(State(state()), request(WRONG))
            .await
            .unwrap_err();
        assert!(matches!(refused, Refusal::Unauthenticated { .. }));
        let text = capture.0.lock().unwrap().clone();
        let span = text
            .lines()
            .find(|l| l.starts_with("span ingest.authenticated"))
            .unwrap_or_else(|| panic!("no request span:{text}"));
        for want in [
            "auth.key=web-2026",
            "ingest.source=web",
            "client.address=10.9.8.7:1234",
            "transport=\"http\"",
        ] {
            assert!(span.contains(want), "{want} in {span}");
        }
        let refusal = text
            .lines()
            .find(|l| l.contains("no valid API key"))
            .unwrap_or_else(|| panic!("no refusal log:{text}"));
        assert!(
            refusal.contains("client.address=\"10.9.8.7:1234\"")
                && refusal.contains("reason=\"unknown_key\""),
            "{refusal}"
        );
        assert!(
            !text.contains(SECRET) && !text.contains(WRONG),
            "a key in the logs:{text}"
        );
    }
}
