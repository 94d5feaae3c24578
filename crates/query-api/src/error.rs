//! The one error type of every query and its single mapping to a code, an HTTP status and
//! a gRPC code (`pulse_platform::api_error`, which renders both answers). Both transports
//! count errors by kind here.

use std::time::Duration;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use pulse_platform::api_error::{self, ApiError};

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
    /// `from`..`to` is longer than `--max-range-ms`.
    #[error("range too long: {message}")]
    RangeTooLong { message: String },
    /// No valid `Authorization: Bearer <token>`.
    #[error("a valid `Authorization: Bearer <token>` is required")]
    Unauthenticated,
    /// The requested entity has no data in the range.
    #[error("{0}")]
    NotFound(String),
    /// ClickHouse cannot be reached; a retry later can help.
    #[error("ClickHouse is unavailable: {0}")]
    Unavailable(#[source] clickhouse::error::Error),
    /// The query ran longer than `--query-timeout-ms`.
    #[error("the query did not finish within {} ms", .0.as_millis())]
    Timeout(Duration),
    /// ClickHouse refused the query for going over one of its limits (memory, result
    /// rows); the same request will fail again, a narrower one may not.
    #[error(
        "the query went over ClickHouse's `{setting}` limit of {limit} ({flag}); ask for a shorter range or fewer rows"
    )]
    LimitExceeded {
        setting: &'static str,
        flag: &'static str,
        limit: u64,
    },
    /// ClickHouse answered with an error (logged, not shown).
    #[error("internal error: {0}")]
    ClickHouse(#[source] clickhouse::error::Error),
    /// ClickHouse answered with an unexpected result (logged, not shown).
    #[error("internal error: {0}")]
    Internal(String),
}

/// The JSON error body: `{"error": {"code", "parameter"?, "message"}}` (the platform's
/// standard shape). Codes: invalid_parameter, invalid_range, too_many_points,
/// range_too_long, unauthenticated, not_found, unavailable, timeout, limit_exceeded,
/// internal.
pub use pulse_platform::api_error::{ErrorBody, ErrorDetail};

impl QueryError {
    pub fn invalid(parameter: &'static str, message: impl Into<String>) -> Self {
        Self::InvalidParameter {
            parameter,
            message: message.into(),
        }
    }

    /// Counts and logs the error once, for `transport` (`http` or `grpc`).
    fn observe(&self, transport: &'static str) {
        ::metrics::counter!(m::ERRORS_TOTAL, "kind" => self.code(), "transport" => transport)
            .increment(1);
        match self {
            Self::Unavailable(_)
            | Self::Timeout(_)
            | Self::LimitExceeded { .. }
            | Self::ClickHouse(_)
            | Self::Internal(_) => {
                // With its causes: a TLS failure's reason, URL and CA file are only there.
                let error = pulse_platform::clickhouse::error_chain(self);
                tracing::warn!(kind = self.code(), transport, %error, "query failed");
            }
            _ => tracing::debug!(kind = self.code(), transport, error = %self, "request refused"),
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody::of(self)
    }

    /// The gRPC status: the code, the message (naming the parameter for InvalidArgument),
    /// and `retry-after` metadata when unavailable.
    pub fn into_status(self) -> tonic::Status {
        self.observe("grpc");
        api_error::grpc_status(&self)
    }
}

impl ApiError for QueryError {
    /// The stable code, also the `kind` label of the error metric.
    fn code(&self) -> &'static str {
        match self {
            Self::InvalidParameter { .. } => "invalid_parameter",
            Self::InvalidRange { .. } => "invalid_range",
            Self::TooManyPoints { .. } => "too_many_points",
            Self::RangeTooLong { .. } => "range_too_long",
            Self::Unauthenticated => "unauthenticated",
            Self::NotFound(_) => "not_found",
            Self::Unavailable(_) => "unavailable",
            Self::Timeout(_) => "timeout",
            Self::LimitExceeded { .. } => "limit_exceeded",
            Self::ClickHouse(_) | Self::Internal(_) => "internal",
        }
    }

    /// The parameter at fault: `from` for an empty or too long range, `step` for too
    /// many points.
    fn parameter(&self) -> Option<&'static str> {
        match self {
            Self::InvalidParameter { parameter, .. } => Some(parameter),
            Self::InvalidRange { .. } | Self::RangeTooLong { .. } => Some("from"),
            Self::TooManyPoints { .. } => Some("step"),
            _ => None,
        }
    }

    fn http_status(&self) -> StatusCode {
        match self {
            Self::InvalidParameter { .. }
            | Self::InvalidRange { .. }
            | Self::TooManyPoints { .. }
            | Self::RangeTooLong { .. } => StatusCode::BAD_REQUEST,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::NotFound(_) => StatusCode::NOT_FOUND,
            Self::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::LimitExceeded { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::ClickHouse(_) | Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    fn grpc_code(&self) -> tonic::Code {
        match self {
            Self::InvalidParameter { .. }
            | Self::InvalidRange { .. }
            | Self::TooManyPoints { .. }
            | Self::RangeTooLong { .. } => tonic::Code::InvalidArgument,
            Self::Unauthenticated => tonic::Code::Unauthenticated,
            Self::NotFound(_) => tonic::Code::NotFound,
            Self::Unavailable(_) => tonic::Code::Unavailable,
            Self::Timeout(_) => tonic::Code::DeadlineExceeded,
            Self::LimitExceeded { .. } => tonic::Code::ResourceExhausted,
            Self::ClickHouse(_) | Self::Internal(_) => tonic::Code::Internal,
        }
    }

    /// The message shown to callers; internal details stay in the logs.
    fn public_message(&self) -> String {
        match self {
            Self::ClickHouse(_) | Self::Internal(_) => {
                "the query failed; see the service logs".to_owned()
            }
            other => other.to_string(),
        }
    }

    fn retry_after(&self) -> Option<u64> {
        matches!(self, Self::Unavailable(_)).then_some(RETRY_AFTER_SECS)
    }

    fn www_authenticate(&self) -> Option<&'static str> {
        matches!(self, Self::Unauthenticated).then_some("Bearer realm=\"pulse\"")
    }
}

impl IntoResponse for QueryError {
    fn into_response(self) -> Response {
        self.observe("http");
        api_error::http_response(&self)
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
                QueryError::RangeTooLong {
                    message: "x".into(),
                },
                400,
                tonic::Code::InvalidArgument,
            ),
            (
                QueryError::LimitExceeded {
                    setting: "max_result_rows",
                    flag: "--query-max-result-rows",
                    limit: 1,
                },
                422,
                tonic::Code::ResourceExhausted,
            ),
            (
                QueryError::Unauthenticated,
                401,
                tonic::Code::Unauthenticated,
            ),
            (QueryError::NotFound("x".into()), 404, tonic::Code::NotFound),
            (
                QueryError::Unavailable(clickhouse::error::Error::Network("x".into())),
                503,
                tonic::Code::Unavailable,
            ),
            (
                QueryError::Timeout(Duration::from_secs(1)),
                504,
                tonic::Code::DeadlineExceeded,
            ),
            (
                QueryError::ClickHouse(clickhouse::error::Error::BadResponse("x".into())),
                500,
                tonic::Code::Internal,
            ),
            (QueryError::Internal("x".into()), 500, tonic::Code::Internal),
        ];
        for (e, http, grpc) in cases {
            assert_eq!(e.http_status().as_u16(), http, "{e}");
            assert_eq!(e.grpc_code(), grpc, "{e}");
            // Every kind's series is registered at zero (metrics::init).
            assert!(m::ERROR_KINDS.contains(&e.code()), "{}", e.code());
            assert!(m::GRPC_CODES.contains(&grpc), "{grpc:?}");
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
