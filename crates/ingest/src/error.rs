//! Why ingest refuses a request, on either transport, and the one mapping of each refusal
//! to a code, an HTTP status and a gRPC code (`pulse_platform::api_error` renders both).
//! The HTTP body keeps ingest's documented shape `{"error": {"code", "reason"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use pulse_platform::api_error::{self, ApiError, Body};
use serde_json::json;

use crate::body::BodyError;
use crate::pipeline::IngestError;

/// How a client presents an API key, as the refusal names it.
pub const HTTP_KEY_HINT: &str = "Authorization: Bearer <key> or X-Api-Key";
pub const GRPC_KEY_HINT: &str = "authorization: Bearer <key> or x-api-key";

/// A refused request.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// No valid API key; `hint` says how to present one on the transport.
    #[error("a valid API key is required ({hint})")]
    Unauthenticated { hint: &'static str },
    /// The HTTP body cannot be read as events.
    #[error(transparent)]
    Body(#[from] BodyError),
    /// A gRPC batch that is empty or larger than `--max-batch-events`.
    #[error("events: {0}")]
    InvalidBatch(String),
    /// The source's token bucket is empty.
    #[error("the rate limit of source {key_source:?} is exhausted")]
    RateLimited {
        key_source: String,
        retry_after_secs: u64,
    },
    /// A `StreamEvents` call that would carry more than `--max-stream-events`.
    #[error(
        "events: this StreamEvents call would carry more than {limit} events (its answer \
         holds one result per event); the {processed} events of earlier messages were \
         processed and a retry of them is answered duplicate; use SendEventsStream for \
         longer streams"
    )]
    StreamLimit { limit: usize, processed: usize },
    /// The pipeline cannot take the batch now; a retry later can help.
    #[error("{error}")]
    Unavailable {
        #[source]
        error: IngestError,
        /// `Retry-After` seconds, when the transport sends one.
        retry_after_secs: Option<u64>,
    },
}

impl ApiError for Refusal {
    fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated { .. } => "unauthenticated",
            Self::Body(e) => e.code(),
            Self::InvalidBatch(_) => "invalid_batch",
            Self::RateLimited { .. } => "rate_limited",
            Self::StreamLimit { .. } => "stream_limit",
            Self::Unavailable { error, .. } => error.code(),
        }
    }

    fn http_status(&self) -> StatusCode {
        match self {
            Self::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            Self::Body(
                BodyError::TooLarge { .. }
                | BodyError::DecompressedTooLarge { .. }
                | BodyError::TooManyEvents { .. },
            )
            | Self::StreamLimit { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Body(
                BodyError::UnsupportedEncoding(_) | BodyError::UnsupportedContentType(_),
            ) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Body(BodyError::BadGzip(_) | BodyError::Empty | BodyError::NotJson(_))
            | Self::InvalidBatch(_) => StatusCode::BAD_REQUEST,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    fn grpc_code(&self) -> tonic::Code {
        match self {
            Self::Unauthenticated { .. } => tonic::Code::Unauthenticated,
            Self::Body(_) | Self::InvalidBatch(_) => tonic::Code::InvalidArgument,
            Self::RateLimited { .. } | Self::StreamLimit { .. } => tonic::Code::ResourceExhausted,
            Self::Unavailable { .. } => tonic::Code::Unavailable,
        }
    }

    fn retry_after(&self) -> Option<u64> {
        match self {
            Self::RateLimited {
                retry_after_secs, ..
            } => Some(*retry_after_secs),
            Self::Unavailable {
                retry_after_secs, ..
            } => *retry_after_secs,
            _ => None,
        }
    }

    fn www_authenticate(&self) -> Option<&'static str> {
        matches!(self, Self::Unauthenticated { .. }).then_some("Bearer")
    }

    /// `{"error": {"code", "reason"}}`, ingest's shape since its first release.
    fn body(&self) -> Body {
        Body::Custom(json!({ "error": { "code": self.code(), "reason": self.public_message() } }))
    }
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        api_error::http_response(&self)
    }
}

impl From<Refusal> for tonic::Status {
    fn from(r: Refusal) -> Self {
        api_error::grpc_status(&r)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_maps_to_one_code_http_status_and_grpc_code() {
        let unavailable = |error, retry_after_secs| Refusal::Unavailable {
            error,
            retry_after_secs,
        };
        let cases = [
            (
                Refusal::Unauthenticated {
                    hint: HTTP_KEY_HINT,
                },
                "unauthenticated",
                401,
                tonic::Code::Unauthenticated,
            ),
            (
                Refusal::Body(BodyError::TooLarge { limit: 1 }),
                "body_too_large",
                413,
                tonic::Code::InvalidArgument,
            ),
            (
                Refusal::Body(BodyError::UnsupportedContentType("text/csv".into())),
                "unsupported_content_type",
                415,
                tonic::Code::InvalidArgument,
            ),
            (
                Refusal::Body(BodyError::Empty),
                "empty_body",
                400,
                tonic::Code::InvalidArgument,
            ),
            (
                Refusal::InvalidBatch("the batch is empty".into()),
                "invalid_batch",
                400,
                tonic::Code::InvalidArgument,
            ),
            (
                Refusal::RateLimited {
                    key_source: "web".into(),
                    retry_after_secs: 1,
                },
                "rate_limited",
                429,
                tonic::Code::ResourceExhausted,
            ),
            (
                Refusal::StreamLimit {
                    limit: 10,
                    processed: 5,
                },
                "stream_limit",
                413,
                tonic::Code::ResourceExhausted,
            ),
            (
                unavailable(IngestError::Backpressure, Some(1)),
                "backpressure",
                503,
                tonic::Code::Unavailable,
            ),
            (
                unavailable(
                    IngestError::InFlight {
                        event_id: "e".into(),
                    },
                    None,
                ),
                "unavailable",
                503,
                tonic::Code::Unavailable,
            ),
        ];
        for (r, code, http, grpc) in cases {
            assert_eq!(r.code(), code, "{r}");
            assert_eq!(r.http_status().as_u16(), http, "{r}");
            assert_eq!(r.grpc_code(), grpc, "{r}");
        }
    }

    #[tokio::test]
    async fn the_http_answer_keeps_ingests_shape_and_headers() {
        let answer = |r: Refusal| async move {
            let resp = r.into_response();
            let headers = resp.headers().clone();
            let body = axum::body::to_bytes(resp.into_body(), 1 << 16)
                .await
                .unwrap();
            (headers, String::from_utf8(body.to_vec()).unwrap())
        };
        let (headers, body) = answer(Refusal::Unauthenticated {
            hint: HTTP_KEY_HINT,
        })
        .await;
        assert_eq!(
            body,
            r#"{"error":{"code":"unauthenticated","reason":"a valid API key is required (Authorization: Bearer <key> or X-Api-Key)"}}"#
        );
        assert_eq!(headers["www-authenticate"], "Bearer");
        let (headers, body) = answer(Refusal::RateLimited {
            key_source: "web".into(),
            retry_after_secs: 3,
        })
        .await;
        assert_eq!(
            body,
            r#"{"error":{"code":"rate_limited","reason":"the rate limit of source \"web\" is exhausted"}}"#
        );
        assert_eq!(headers["retry-after"], "3");
    }

    #[test]
    fn the_grpc_status_keeps_its_messages_and_retry_after() {
        let s = tonic::Status::from(Refusal::Unauthenticated {
            hint: GRPC_KEY_HINT,
        });
        assert_eq!(s.code(), tonic::Code::Unauthenticated);
        assert_eq!(
            s.message(),
            "a valid API key is required (authorization: Bearer <key> or x-api-key)"
        );
        let s = tonic::Status::from(Refusal::RateLimited {
            key_source: "web".into(),
            retry_after_secs: 2,
        });
        assert_eq!(s.metadata().get("retry-after").unwrap(), "2");
        let s = tonic::Status::from(Refusal::Unavailable {
            error: IngestError::Backpressure,
            retry_after_secs: None,
        });
        assert_eq!(s.message(), "the producer queue is full; retry later");
        assert!(s.metadata().get("retry-after").is_none());
    }
}
