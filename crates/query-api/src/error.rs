//! The one error type of every query and its single mapping to an HTTP status with the
//! JSON error body, and to a gRPC status. Both transports count errors by kind here.

use std::time::Duration;

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use utoipa::ToSchema;

use crate::metrics as m;

/// Seconds a client should wait before retrying when ClickHouse is unreachable.
pub const RETRY_AFTER_SECS: u64 = 1;

/// Why a query has no answer.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    /// A request parameter is malformed or out of range.
    #[error("invalid parameter `{parameter}`: {message}")]
    InvalidParameter {
        parameter: &'static str,
        message: String,
    },
    /// `from` is not before `to`.
    #[error("invalid range: {message}")]
    InvalidRange { message: String },
    /// The range and step give more buckets than `--max-points`.
    #[error("too many points: {message}")]
    TooManyPoints { message: String },
    /// No valid `Authorization: Bearer <token>`.
    #[error("a valid `Authorization: Bearer <token>` is required")]
    Unauthenticated,
    /// The requested entity has no data in the range.
    #[error("{0}")]
    NotFound(String),
    /// ClickHouse cannot be reached; a retry later can help.
    #[error("ClickHouse is unavailable: {0}")]
    Unavailable(String),
    /// The query ran longer than `--query-timeout-ms`.
    #[error("the query did not finish within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// ClickHouse answered with an error or an unexpected result (logged, not shown).
    #[error("internal error: {0}")]
    Internal(String),
}

/// The JSON error body: `{"error": {"code", "parameter"?, "message"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable machine-readable code: invalid_parameter, invalid_range, too_many_points,
    /// unauthenticated, not_found, unavailable, timeout, internal.
    pub code: &'static str,
    /// The request parameter at fault (400 answers only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parameter: Option<&'static str>,
    pub message: String,
}

impl QueryError {
    pub fn invalid(parameter: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidParameter {
            parameter,
            message: message.into(),
        }
    }

    /// The stable code, also the `kind` label of the error metric.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidParameter { .. } => "invalid_parameter",
            Self::InvalidRange { .. } => "invalid_range",
            Self::TooManyPoints { .. } => "too_many_points",
            Self::Unauthenticated => "unauthenticated",
            Self::NotFound(_) => "not_found",
            Self::Unavailable(_) => "unavailable",
            Self::Timeout(_) => "timeout",
            Self::Internal(_) => "internal",
        }
    }

    /// The parameter at fault: `from` for an empty range, `step` for too many points.
    pub fn parameter(&self) -> Option<&'static str> {
        match self {
            Self::InvalidParameter { parameter, .. } => Some(parameter),
            Self::InvalidRange { .. } => Some("from"),
            Self::TooManyPoints { .. } => Some("step"),
            _ => None,
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            Self::InvalidParameter { .. }
            | Self::InvalidRange { .. }
            | Self::TooManyPoints { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn grpc_code(&self) -> tonic::Code {
        match self {
            Self::InvalidParameter { .. }
            | Self::InvalidRange { .. }
            | Self::TooManyPoints { .. } => tonic::Code::InvalidArgument,
            Self::Unauthenticated => tonic::Code::Unauthenticated,
            Self::NotFound(_) => tonic::Code::NotFound,
            Self::Unavailable(_) => tonic::Code::Unavailable,
            Self::Timeout(_) => tonic::Code::DeadlineExceeded,
            Self::Internal(_) => tonic::Code::Internal,
        }
    }

    /// The message shown to callers; internal details stay in the logs.
    fn public_message(&self) -> String {
        match self {
            Self::Internal(_) => "the query failed; see the service logs".to_owned(),
            other => other.to_string(),
        }
    }

    /// Counts and logs the error once, for `transport` (`http` or `grpc`).
    fn observe(&self, transport: &'static str) {
        ::metrics::counter!(m::ERRORS_TOTAL, "kind" => self.code(), "transport" => transport)
            .increment(1);
        match self {
            Self::Unavailable(_) | Self::Timeout(_) | Self::Internal(_) => {
                tracing::warn!(kind = self.code(), transport, error = %self, "query failed");
            }
            _ => tracing::debug!(kind = self.code(), transport, error = %self, "request refused"),
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                code: self.code(),
                parameter: self.parameter(),
                message: self.public_message(),
            },
        }
    }

    /// The gRPC status: the code, the message (naming the parameter for InvalidArgument),
    /// and `retry-after` metadata when unavailable.
    pub fn into_status(self) -> tonic::Status {
        self.observe("grpc");
        let mut status = tonic::Status::new(self.grpc_code(), self.public_message());
        if matches!(self, Self::Unavailable(_)) {
            status.metadata_mut().insert(
                "retry-after",
                tonic::metadata::MetadataValue::from(RETRY_AFTER_SECS),
            );
        }
        if let Some(p) = self.parameter() {
            status.metadata_mut().insert(
                "pulse-parameter",
                tonic::metadata::MetadataValue::from_static(p),
            );
        }
        status
    }
}

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        self.observe("http");
        let mut response = (self.http_status(), axum::Json(self.body())).into_response();
        let headers = response.headers_mut();
        match self {
            Self::Unavailable(_) => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from(RETRY_AFTER_SECS));
            }
            Self::Unauthenticated => {
                headers.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"pulse\""),
                );
            }
            _ => {}
        }
        response
    }
}

impl From<QueryError> for tonic::Status {
    fn from(e: QueryError) -> Self {
        e.into_status()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_maps_to_one_http_status_and_grpc_code() {
        let cases = [
            (
                QueryError::invalid("step", "x"),
                400,
                tonic::Code::InvalidArgument,
            ),
            (
                QueryError::InvalidRange {
                    message: "x".into(),
                },
                400,
                tonic::Code::InvalidArgument,
            ),
            (
                QueryError::TooManyPoints {
                    message: "x".into(),
                },
                400,
                tonic::Code::InvalidArgument,
            ),
            (
                QueryError::Unauthenticated,
                401,
                tonic::Code::Unauthenticated,
            ),
            (QueryError::NotFound("x".into()), 404, tonic::Code::NotFound),
            (
                QueryError::Unavailable("x".into()),
                503,
                tonic::Code::Unavailable,
            ),
            (
                QueryError::Timeout(Duration::from_secs(1)),
                504,
                tonic::Code::DeadlineExceeded,
            ),
            (QueryError::Internal("x".into()), 500, tonic::Code::Internal),
        ];
        for (e, http, grpc) in cases {
            assert_eq!(e.http_status().as_u16(), http, "{e}");
            assert_eq!(e.grpc_code(), grpc, "{e}");
        }
    }

    #[test]
    fn the_body_names_the_parameter_and_hides_internal_details() {
        let body =
            serde_json::to_value(QueryError::invalid("limit", "must be 1..=1000").body()).unwrap();
        assert_eq!(body["error"]["code"], "invalid_parameter");
        assert_eq!(body["error"]["parameter"], "limit");
        let body =
            serde_json::to_value(QueryError::Internal("Code: 47 secret".into()).body()).unwrap();
        assert!(body["error"].get("parameter").is_none());
        assert!(
            !body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("secret")
        );
    }
}
