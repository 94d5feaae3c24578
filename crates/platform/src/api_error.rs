//! One shape for the errors a service answers with over HTTP and gRPC. A service's error
//! type implements [`ApiError`] — one mapping from each kind to a stable code, an HTTP
//! status and a gRPC code (test that every kind maps once where the type is defined) — and
//! [`http_response`] and [`grpc_status`] put it on the wire, so the two transports of a
//! service cannot drift apart. What is counted and logged stays with the service.
//!
//! The standard JSON body is [`ErrorBody`], `{"error": {"code", "parameter"?, "message"}}`;
//! a service with an older or a compatibility shape (ingest's `reason`, the schema
//! registry's Confluent `error_code`) answers with its own through [`ApiError::body`].

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
/// The gRPC status codes, for a service that maps its errors without serving gRPC itself.
pub use tonic::Code as GrpcCode;

/// An error a service answers a request with.
pub trait ApiError: std::error::Error {
    /// Stable machine-readable code (also the `kind` label of a service's error metric).
    fn code(&self) -> &'static str;

    fn http_status(&self) -> StatusCode;

    fn grpc_code(&self) -> tonic::Code;

    /// The request parameter at fault, if one is: in the standard body and as the
    /// `pulse-parameter` gRPC metadata.
    fn parameter(&self) -> Option<&'static str> {
        None
    }

    /// The message callers see; by default the error's `Display`. Override it to keep
    /// internal details in the logs.
    fn public_message(&self) -> String {
        self.to_string()
    }

    /// Seconds a client should wait before retrying: `Retry-After` on HTTP, `retry-after`
    /// metadata on gRPC.
    fn retry_after(&self) -> Option<u64> {
        None
    }

    /// The `WWW-Authenticate` challenge of an HTTP answer (a 401's).
    fn www_authenticate(&self) -> Option<&'static str> {
        None
    }

    /// The `Content-Type` of the HTTP body, when it is not `application/json`.
    fn content_type(&self) -> Option<&'static str> {
        None
    }

    /// The HTTP body: the standard [`ErrorBody`] unless the service has its own shape.
    fn body(&self) -> Body {
        Body::Standard(ErrorBody::of(self))
    }
}

/// The JSON body of an error answer.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Body {
    Standard(ErrorBody),
    /// A service's own shape (kept for compatibility with its clients).
    Custom(serde_json::Value),
}

/// The standard error body: `{"error": {"code", "parameter"?, "message"}}`.
#[derive(Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

impl ErrorBody {
    /// The standard body of `e`.
    pub fn of<E: ApiError + ?Sized>(e: &E) -> Self {
        Self {
            error: ErrorDetail {
                code: e.code(),
                parameter: e.parameter(),
                message: e.public_message(),
            },
        }
    }
}

#[derive(Debug, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct ErrorDetail {
    /// Stable machine-readable code.
    pub code: &'static str,
    /// The request parameter at fault, if one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameter: Option<&'static str>,
    pub message: String,
}

/// The HTTP answer of `e`: its status, its JSON body, and the `Retry-After`,
/// `WWW-Authenticate` and `Content-Type` headers it asks for.
pub fn http_response<E: ApiError + ?Sized>(e: &E) -> Response {
    let mut response = (e.http_status(), axum::Json(e.body())).into_response();
    let headers = response.headers_mut();
    if let Some(content_type) = e.content_type() {
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    }
    if let Some(secs) = e.retry_after() {
        headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
    }
    if let Some(challenge) = e.www_authenticate() {
        headers.insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static(challenge),
        );
    }
    response
}

/// The gRPC status of `e`: its code and public message, with `retry-after` and
/// `pulse-parameter` metadata when it has them.
pub fn grpc_status<E: ApiError + ?Sized>(e: &E) -> tonic::Status {
    let mut status = tonic::Status::new(e.grpc_code(), e.public_message());
    if let Some(secs) = e.retry_after() {
        status
            .metadata_mut()
            .insert("retry-after", tonic::metadata::MetadataValue::from(secs));
    }
    if let Some(p) = e.parameter() {
        status.metadata_mut().insert(
            "pulse-parameter",
            tonic::metadata::MetadataValue::from_static(p),
        );
    }
    status
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Sample {
        #[error("`limit` must be 1..=10")]
        Invalid,
        #[error("try later")]
        Busy,
        #[error("no key")]
        NoKey,
        #[error("legacy")]
        Legacy,
    }

    impl ApiError for Sample {
        fn code(&self) -> &'static str {
            match self {
                Self::Invalid => "invalid_parameter",
                Self::Busy => "unavailable",
                Self::NoKey => "unauthenticated",
                Self::Legacy => "legacy",
            }
        }
        fn http_status(&self) -> StatusCode {
            match self {
                Self::Invalid | Self::Legacy => StatusCode::BAD_REQUEST,
                Self::Busy => StatusCode::SERVICE_UNAVAILABLE,
                Self::NoKey => StatusCode::UNAUTHORIZED,
            }
        }
        fn grpc_code(&self) -> tonic::Code {
            match self {
                Self::Invalid | Self::Legacy => tonic::Code::InvalidArgument,
                Self::Busy => tonic::Code::Unavailable,
                Self::NoKey => tonic::Code::Unauthenticated,
            }
        }
        fn parameter(&self) -> Option<&'static str> {
            matches!(self, Self::Invalid).then_some("limit")
        }
        fn retry_after(&self) -> Option<u64> {
            matches!(self, Self::Busy).then_some(2)
        }
        fn www_authenticate(&self) -> Option<&'static str> {
            matches!(self, Self::NoKey).then_some("Bearer")
        }
        fn content_type(&self) -> Option<&'static str> {
            matches!(self, Self::Legacy).then_some("application/vnd.legacy+json")
        }
        fn body(&self) -> Body {
            match self {
                Self::Legacy => {
                    Body::Custom(serde_json::json!({"error_code": 400, "message": "legacy"}))
                }
                _ => Body::Standard(ErrorBody::of(self)),
            }
        }
    }

    async fn answer(e: &Sample) -> (u16, axum::http::HeaderMap, String) {
        let r = http_response(e);
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        (status, headers, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn the_http_answer_carries_status_body_and_the_headers_asked_for() {
        let (status, headers, body) = answer(&Sample::Invalid).await;
        assert_eq!(status, 400);
        assert_eq!(
            body,
            r#"{"error":{"code":"invalid_parameter","parameter":"limit","message":"`limit` must be 1..=10"}}"#
        );
        assert_eq!(headers["content-type"], "application/json");
        assert!(headers.get("retry-after").is_none());

        let (status, headers, body) = answer(&Sample::Busy).await;
        assert_eq!(status, 503);
        assert_eq!(
            body,
            r#"{"error":{"code":"unavailable","message":"try later"}}"#
        );
        assert_eq!(headers["retry-after"], "2");

        let (status, headers, _) = answer(&Sample::NoKey).await;
        assert_eq!(status, 401);
        assert_eq!(headers["www-authenticate"], "Bearer");

        let (_, headers, body) = answer(&Sample::Legacy).await;
        assert_eq!(body, r#"{"error_code":400,"message":"legacy"}"#);
        assert_eq!(headers["content-type"], "application/vnd.legacy+json");
    }

    #[test]
    fn the_grpc_status_carries_code_message_and_metadata() {
        let s = grpc_status(&Sample::Invalid);
        assert_eq!(s.code(), tonic::Code::InvalidArgument);
        assert_eq!(s.message(), "`limit` must be 1..=10");
        assert_eq!(s.metadata().get("pulse-parameter").unwrap(), "limit");
        assert!(s.metadata().get("retry-after").is_none());
        let s = grpc_status(&Sample::Busy);
        assert_eq!(s.code(), tonic::Code::Unavailable);
        assert_eq!(s.metadata().get("retry-after").unwrap(), "2");
    }
}
