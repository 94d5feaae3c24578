//! `POST /v1/events`: authenticates the API key, rate-limits per key, decodes the body
//! (gzip, JSON / array / NDJSON) and hands the events to the pipeline; maps every failure
//! to one JSON error shape and status (400, 401, 413, 415, 429, 503; see `error`).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use opentelemetry::trace::TraceContextExt;
use serde_json::json;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::auth::{KeyStore, RateLimiter, admit, authenticate};
use crate::body::{self, BodyError, BodyLimits};
use crate::error::{HTTP_KEY_HINT, Refusal};
use crate::metrics as m;
use crate::pipeline::{BatchResult, Incoming, IngestError, Ingestor};

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
    let source = authenticate(
        &state.keys,
        header_str(&headers, "authorization"),
        header_str(&headers, "x-api-key"),
    )
    .ok_or(Refusal::Unauthenticated {
        hint: HTTP_KEY_HINT,
    })?;
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
    Ok(axum::Json(result_json(&result)).into_response())
}

/// The response body of a processed batch.
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
