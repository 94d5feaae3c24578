//! `POST /v1/events`: authenticates the API key, rate-limits per key, decodes the body
//! (gzip, JSON / array / NDJSON) and hands the events to the pipeline; maps every failure
//! to one JSON error shape and status (400, 401, 413, 415, 429, 503).

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use serde_json::json;

use crate::auth::{ApiKeys, RateLimiter, presented_key, retry_after_secs};
use crate::body::{self, BodyError, BodyLimits};
use crate::metrics as m;
use crate::pipeline::{BatchResult, Incoming, IngestError, Ingestor};

/// What the HTTP handler needs.
#[derive(Debug, Clone)]
pub struct HttpState {
    pub ingestor: Ingestor,
    pub keys: Arc<ApiKeys>,
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

/// An error answer: `{"error": {"code", "reason"}}`.
#[derive(Debug)]
pub struct HttpError {
    status: StatusCode,
    code: &'static str,
    reason: String,
    retry_after: Option<u64>,
}

impl HttpError {
    fn new(status: StatusCode, code: &'static str, reason: impl Into<String>) -> Self {
        Self {
            status,
            code,
            reason: reason.into(),
            retry_after: None,
        }
    }
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let body = json!({ "error": { "code": self.code, "reason": self.reason } });
        let mut resp = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after
            && let Ok(v) = HeaderValue::from_str(&secs.to_string())
        {
            resp.headers_mut().insert(header::RETRY_AFTER, v);
        }
        if self.status == StatusCode::UNAUTHORIZED {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

fn body_error(e: &BodyError) -> HttpError {
    let status = match e {
        BodyError::TooLarge { .. }
        | BodyError::DecompressedTooLarge { .. }
        | BodyError::TooManyEvents { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        BodyError::UnsupportedEncoding(_) | BodyError::UnsupportedContentType(_) => {
            StatusCode::UNSUPPORTED_MEDIA_TYPE
        }
        BodyError::BadGzip(_) | BodyError::Empty | BodyError::NotJson(_) => StatusCode::BAD_REQUEST,
    };
    HttpError::new(status, e.code(), e.to_string())
}

fn unavailable(e: IngestError, retry_after: u64) -> HttpError {
    let code = match e {
        IngestError::Backpressure => "backpressure",
        IngestError::Unavailable(_) => "unavailable",
    };
    HttpError {
        retry_after: Some(retry_after),
        ..HttpError::new(StatusCode::SERVICE_UNAVAILABLE, code, e.to_string())
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

/// Authenticates the request; returns the key's source name.
pub fn authenticate(
    keys: &ApiKeys,
    authorization: Option<&str>,
    x_api_key: Option<&str>,
) -> Option<String> {
    let source = presented_key(authorization, x_api_key).and_then(|k| keys.authenticate(k));
    if source.is_none() {
        metrics::counter!(m::AUTH_FAILURES_TOTAL).increment(1);
    }
    source
}

async fn post_events(State(state): State<HttpState>, req: Request) -> Result<Response, HttpError> {
    let headers = req.headers().clone();
    let parent = pulse_platform::http::extract_context(&headers);
    let source = authenticate(
        &state.keys,
        header_str(&headers, "authorization"),
        header_str(&headers, "x-api-key"),
    )
    .ok_or_else(|| {
        HttpError::new(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "a valid API key is required (Authorization: Bearer <key> or X-Api-Key)",
        )
    })?;
    let format = body::format_for(body_header(&headers, "content-type").as_deref())
        .map_err(|e| body_error(&e))?;
    // Rate-limit before the body is read, decoded and split: a source whose bucket is
    // empty costs no decompression or parsing. (The request's events are charged below,
    // once they are counted.)
    if let Err(wait) = state
        .limiter
        .try_acquire(&source, 0, std::time::Instant::now())
    {
        metrics::counter!(m::EVENTS_TOTAL, "outcome" => "rate_limited", "reason" => "")
            .increment(1);
        return Err(rate_limited(&source, wait));
    }
    let limit = state.body_limits.max_body_bytes;
    let raw = axum::body::to_bytes(Body::new(req.into_body()), limit)
        .await
        .map_err(|_| body_error(&BodyError::TooLarge { limit }))?;
    metrics::histogram!(m::BODY_BYTES).record(raw.len() as f64);
    let decoded = body::decode(
        &raw,
        body_header(&headers, "content-encoding").as_deref(),
        &state.body_limits,
    )
    .map_err(|e| body_error(&e))?;
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
            return Err(body_error(&e));
        }
        Err(e) => return Err(body_error(&e)),
    };
    let count = u32::try_from(events.len()).unwrap_or(u32::MAX);
    if let Err(wait) = state
        .limiter
        .try_acquire(&source, count, std::time::Instant::now())
    {
        metrics::counter!(m::EVENTS_TOTAL, "outcome" => "rate_limited", "reason" => "")
            .increment(u64::from(count));
        return Err(rate_limited(&source, wait));
    }
    let incoming = events.into_iter().map(Incoming::json).collect();
    let result = state
        .ingestor
        .ingest(&source, "http", incoming, parent)
        .await
        .map_err(|e| unavailable(e, state.retry_after_secs))?;
    Ok(axum::Json(result_json(&result)).into_response())
}

/// 429 with `Retry-After` for a source whose token bucket is empty.
fn rate_limited(source: &str, wait: std::time::Duration) -> HttpError {
    HttpError {
        retry_after: Some(retry_after_secs(wait)),
        ..HttpError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!("the rate limit of source {source:?} is exhausted"),
        )
    }
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
