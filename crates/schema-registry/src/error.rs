//! The registry's errors, in Confluent's shape `{"error_code", "message"}` with
//! Confluent's codes, and their one mapping to a code, an HTTP status and a gRPC code
//! (`pulse_platform::api_error`, which renders the answer).

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use pulse_platform::api_error::{self, Body, GrpcCode};

use crate::api::CONTENT_TYPE;
use crate::log::LogError;
use crate::store::Outcome;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("Subject '{0}' not found.")]
    SubjectNotFound(String),
    #[error("Version {0} not found.")]
    VersionNotFound(String),
    #[error("Schema not found: {0}")]
    SchemaNotFound(String),
    #[error("Subject '{0}' was not deleted first before being permanently deleted")]
    SubjectNotSoftDeleted(String),
    #[error(
        "One or more references exist to the schema: subject '{subject}' is referenced by subject '{by}' version {version}; delete that first"
    )]
    ReferenceExists {
        subject: String,
        by: String,
        version: u32,
    },
    #[error("Subject '{0}' does not have subject-level compatibility configured")]
    SubjectLevelNotConfigured(String),
    #[error("Schema being registered is incompatible with an earlier schema for subject \"{subject}\", details: [{}]", .reasons.join("; "))]
    Incompatible {
        subject: String,
        reasons: Vec<String>,
    },
    #[error("Invalid schema: {0}")]
    InvalidSchema(String),
    #[error(
        "The specified version '{0}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
    )]
    InvalidVersion(String),
    #[error("Invalid compatibility level: {0}")]
    InvalidLevel(String),
    #[error("Invalid request: the request body is not valid: {0}")]
    BadBody(#[source] serde_json::Error),
    #[error("Error in the backend data store: {0}")]
    Store(#[source] LogError),
    /// The log applied a command with an outcome the request cannot have (a bug).
    #[error("Error in the backend data store: unexpected outcome {0:?}")]
    UnexpectedOutcome(Box<Outcome>),
    #[error("Operation timed out: {0}")]
    Timeout(#[source] LogError),
    #[error("Unauthorized: send HTTP basic credentials of a registry user")]
    Unauthorized,
    #[error("User '{0}' has the read role; this operation needs the write role")]
    Forbidden(String),
}

impl ApiError {
    /// (HTTP status, Confluent error code).
    pub fn codes(&self) -> (StatusCode, u32) {
        match self {
            ApiError::SubjectNotFound(_) => (StatusCode::NOT_FOUND, 40401),
            ApiError::VersionNotFound(_) => (StatusCode::NOT_FOUND, 40402),
            ApiError::SchemaNotFound(_) => (StatusCode::NOT_FOUND, 40403),
            ApiError::SubjectNotSoftDeleted(_) => (StatusCode::NOT_FOUND, 40405),
            ApiError::SubjectLevelNotConfigured(_) => (StatusCode::NOT_FOUND, 40408),
            ApiError::ReferenceExists { .. } => (StatusCode::UNPROCESSABLE_ENTITY, 42206),
            ApiError::Incompatible { .. } => (StatusCode::CONFLICT, 409),
            ApiError::InvalidSchema(_) => (StatusCode::UNPROCESSABLE_ENTITY, 42201),
            ApiError::InvalidVersion(_) => (StatusCode::UNPROCESSABLE_ENTITY, 42202),
            ApiError::InvalidLevel(_) => (StatusCode::UNPROCESSABLE_ENTITY, 42203),
            ApiError::BadBody(_) => (StatusCode::BAD_REQUEST, 400),
            ApiError::Store(_) | ApiError::UnexpectedOutcome(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, 50001)
            }
            ApiError::Timeout(_) => (StatusCode::INTERNAL_SERVER_ERROR, 50002),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, 40101),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, 40301),
        }
    }
}

impl api_error::ApiError for ApiError {
    fn code(&self) -> &'static str {
        match self {
            ApiError::SubjectNotFound(_) => "subject_not_found",
            ApiError::VersionNotFound(_) => "version_not_found",
            ApiError::SchemaNotFound(_) => "schema_not_found",
            ApiError::SubjectNotSoftDeleted(_) => "subject_not_soft_deleted",
            ApiError::SubjectLevelNotConfigured(_) => "subject_level_not_configured",
            ApiError::ReferenceExists { .. } => "reference_exists",
            ApiError::Incompatible { .. } => "incompatible",
            ApiError::InvalidSchema(_) => "invalid_schema",
            ApiError::InvalidVersion(_) => "invalid_version",
            ApiError::InvalidLevel(_) => "invalid_level",
            ApiError::BadBody(_) => "bad_request",
            ApiError::Store(_) | ApiError::UnexpectedOutcome(_) => "store",
            ApiError::Timeout(_) => "timeout",
            ApiError::Unauthorized => "unauthorized",
            ApiError::Forbidden(_) => "forbidden",
        }
    }

    fn http_status(&self) -> StatusCode {
        self.codes().0
    }

    fn grpc_code(&self) -> GrpcCode {
        match self {
            ApiError::SubjectNotFound(_)
            | ApiError::VersionNotFound(_)
            | ApiError::SchemaNotFound(_)
            | ApiError::SubjectNotSoftDeleted(_)
            | ApiError::SubjectLevelNotConfigured(_) => GrpcCode::NotFound,
            ApiError::Incompatible { .. } | ApiError::ReferenceExists { .. } => {
                GrpcCode::FailedPrecondition
            }
            ApiError::InvalidSchema(_)
            | ApiError::InvalidVersion(_)
            | ApiError::InvalidLevel(_)
            | ApiError::BadBody(_) => GrpcCode::InvalidArgument,
            ApiError::Store(_) | ApiError::UnexpectedOutcome(_) => GrpcCode::Internal,
            ApiError::Timeout(_) => GrpcCode::DeadlineExceeded,
            ApiError::Unauthorized => GrpcCode::Unauthenticated,
            ApiError::Forbidden(_) => GrpcCode::PermissionDenied,
        }
    }

    fn content_type(&self) -> Option<&'static str> {
        Some(CONTENT_TYPE)
    }

    /// Confluent's `{"error_code", "message"}`, which its clients parse.
    fn body(&self) -> Body {
        Body::Custom(
            serde_json::json!({ "error_code": self.codes().1, "message": self.to_string() }),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.codes();
        if status.is_server_error() {
            tracing::warn!(error_code = code, error = %self, "request failed");
        }
        api_error::http_response(&self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulse_platform::api_error::ApiError as _;

    #[test]
    fn every_kind_maps_to_one_status_confluent_code_and_grpc_code() {
        let timeout = || LogError::Timeout(std::time::Duration::from_secs(1));
        let cases = [
            (
                ApiError::SubjectNotFound("s".into()),
                404,
                40401,
                GrpcCode::NotFound,
            ),
            (
                ApiError::VersionNotFound("2".into()),
                404,
                40402,
                GrpcCode::NotFound,
            ),
            (
                ApiError::SchemaNotFound("id 9".into()),
                404,
                40403,
                GrpcCode::NotFound,
            ),
            (
                ApiError::SubjectNotSoftDeleted("s".into()),
                404,
                40405,
                GrpcCode::NotFound,
            ),
            (
                ApiError::SubjectLevelNotConfigured("s".into()),
                404,
                40408,
                GrpcCode::NotFound,
            ),
            (
                ApiError::Incompatible {
                    subject: "s".into(),
                    reasons: vec!["r".into()],
                },
                409,
                409,
                GrpcCode::FailedPrecondition,
            ),
            (
                ApiError::ReferenceExists {
                    subject: "common".into(),
                    by: "order".into(),
                    version: 1,
                },
                422,
                42206,
                GrpcCode::FailedPrecondition,
            ),
            (
                ApiError::InvalidSchema("x".into()),
                422,
                42201,
                GrpcCode::InvalidArgument,
            ),
            (
                ApiError::InvalidVersion("x".into()),
                422,
                42202,
                GrpcCode::InvalidArgument,
            ),
            (
                ApiError::InvalidLevel("x".into()),
                422,
                42203,
                GrpcCode::InvalidArgument,
            ),
            (
                ApiError::BadBody(serde_json::from_str::<u8>("x").unwrap_err()),
                400,
                400,
                GrpcCode::InvalidArgument,
            ),
            (
                ApiError::Store(LogError::ReaderStopped),
                500,
                50001,
                GrpcCode::Internal,
            ),
            (
                ApiError::UnexpectedOutcome(Box::new(Outcome::AlreadyApplied)),
                500,
                50001,
                GrpcCode::Internal,
            ),
            (
                ApiError::Timeout(timeout()),
                500,
                50002,
                GrpcCode::DeadlineExceeded,
            ),
            (
                ApiError::Unauthorized,
                401,
                40101,
                GrpcCode::Unauthenticated,
            ),
            (
                ApiError::Forbidden("r".into()),
                403,
                40301,
                GrpcCode::PermissionDenied,
            ),
        ];
        for (e, http, confluent, grpc) in cases {
            assert_eq!(e.http_status().as_u16(), http, "{e}");
            assert_eq!(e.codes().1, confluent, "{e}");
            assert_eq!(e.grpc_code(), grpc, "{e}");
        }
    }

    #[tokio::test]
    async fn the_answer_is_confluents_shape_and_content_type() {
        let resp = ApiError::SubjectNotFound("orders-value".into()).into_response();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(resp.headers()["content-type"], CONTENT_TYPE);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
            .await
            .unwrap();
        assert_eq!(
            std::str::from_utf8(&body).unwrap(),
            r#"{"error_code":40401,"message":"Subject 'orders-value' not found."}"#
        );
    }
}
