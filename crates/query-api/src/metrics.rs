//! The query API's metrics. HTTP requests by route template and status are counted by
//! `pulse_platform::http::observe` (`pulse_http_requests_total`,
//! `pulse_http_request_duration_seconds`); gRPC requests, ClickHouse query latency,
//! errors, the freshness cache and the bearer tokens (by name, never a token) are counted
//! here.

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const CLICKHOUSE_QUERY_SECONDS: &str = "pulse_query_clickhouse_query_seconds";
pub const ERRORS_TOTAL: &str = "pulse_query_errors_total";
pub const GRPC_REQUESTS_TOTAL: &str = "pulse_query_grpc_requests_total";
pub const GRPC_REQUEST_SECONDS: &str = "pulse_query_grpc_request_duration_seconds";
pub const FRESHNESS_CACHE_TOTAL: &str = "pulse_query_freshness_cache_total";
pub const AUTHENTICATED_TOTAL: &str = "pulse_query_authenticated_requests_total";
pub const API_TOKENS: &str = "pulse_query_api_tokens";
pub const API_TOKENS_RELOAD_TOTAL: &str = "pulse_query_api_tokens_reload_total";

/// Describes every metric (call once per process; repeated calls are harmless).
pub fn describe() {
    pulse_platform::http::describe_metrics();
    describe_histogram!(
        CLICKHOUSE_QUERY_SECONDS,
        Unit::Seconds,
        "ClickHouse query latency, by query name (active_users, revenue, top_pages, …), failures included."
    );
    describe_counter!(
        ERRORS_TOTAL,
        "Requests answered with an error, by kind (invalid_parameter, invalid_range, too_many_points, range_too_long, unauthenticated, not_found, unavailable, timeout, limit_exceeded, internal) and transport (http, grpc)."
    );
    describe_counter!(
        GRPC_REQUESTS_TOTAL,
        "gRPC requests served, by method and status code."
    );
    describe_histogram!(
        GRPC_REQUEST_SECONDS,
        Unit::Seconds,
        "gRPC request latency, by method."
    );
    describe_counter!(
        FRESHNESS_CACHE_TOTAL,
        "Lookups of the table-wide freshness, by outcome: hit (younger than --freshness-cache-ms), stale (up to twice that old, served while one background read replaces it), miss (read by the request)."
    );
    describe_counter!(
        AUTHENTICATED_TOTAL,
        "Requests (HTTP and gRPC) authenticated, by the bearer token's name (`token=name`, or `unnamed`; never the token): during a rotation, the old token's series stops growing once its clients moved."
    );
    describe_gauge!(
        API_TOKENS,
        "Bearer tokens in force (inline and from --api-tokens-file, after the last good reload)."
    );
    describe_counter!(
        API_TOKENS_RELOAD_TOTAL,
        "Reloads of --api-tokens-file after its content changed, by outcome (ok; error: the previous tokens stay in force)."
    );
}

/// The `kind` values of [`ERRORS_TOTAL`] (`QueryError::code`).
pub const ERROR_KINDS: &[&str] = &[
    "invalid_parameter",
    "invalid_range",
    "too_many_points",
    "range_too_long",
    "unauthenticated",
    "not_found",
    "unavailable",
    "timeout",
    "limit_exceeded",
    "internal",
];
/// The `transport` values of [`ERRORS_TOTAL`].
pub const TRANSPORTS: &[&str] = &["http", "grpc"];
/// The `method` values of the gRPC metrics (`QueryService`'s methods).
pub const GRPC_METHODS: &[&str] = &[
    "ActiveUsers",
    "ActiveUsersCurrent",
    "Revenue",
    "RevenueLastHour",
    "TopPages",
    "User",
    "Sessions",
    "GetFreshness",
    "FindEvents",
];
/// The status codes a `QueryService` method answers with (`Ok` and `QueryError::grpc_code`).
pub const GRPC_CODES: &[tonic::Code] = &[
    tonic::Code::Ok,
    tonic::Code::InvalidArgument,
    tonic::Code::Unauthenticated,
    tonic::Code::NotFound,
    tonic::Code::Unavailable,
    tonic::Code::DeadlineExceeded,
    tonic::Code::ResourceExhausted,
    tonic::Code::Internal,
];

/// Creates, at zero, the series that only an error or a first gRPC call would otherwise
/// create (metrics-rs registers a series at its first update), so rules and dashboards see
/// them from the first scrape: token file reloads by outcome, errors by every kind and
/// transport, gRPC requests by every method and status code, and each method's (empty)
/// latency histogram. Label values come
/// from these fixed lists, never from a request.
pub fn init() {
    for outcome in ["ok", "error"] {
        metrics::counter!(API_TOKENS_RELOAD_TOTAL, "outcome" => outcome).increment(0);
    }
    for &kind in ERROR_KINDS {
        for &transport in TRANSPORTS {
            metrics::counter!(ERRORS_TOTAL, "kind" => kind, "transport" => transport).increment(0);
        }
    }
    for &method in GRPC_METHODS {
        for code in GRPC_CODES {
            metrics::counter!(GRPC_REQUESTS_TOTAL, "method" => method, "code" => format!("{code:?}"))
                .increment(0);
        }
        // Registering the handle creates the (empty) histogram series.
        let _ = metrics::histogram!(GRPC_REQUEST_SECONDS, "method" => method);
    }
}

#[cfg(test)]
mod init_tests {
    use super::*;

    #[test]
    fn a_fresh_scrape_has_the_fault_only_series() {
        let text = pulse_platform::metrics::scrape_with(init);
        for series in [
            r#"pulse_query_errors_total{kind="internal",transport="http"} 0"#,
            r#"pulse_query_errors_total{kind="timeout",transport="grpc"} 0"#,
            r#"pulse_query_grpc_requests_total{method="ActiveUsers",code="Ok"} 0"#,
            r#"pulse_query_grpc_requests_total{method="GetFreshness",code="Internal"} 0"#,
            r#"pulse_query_grpc_request_duration_seconds_count{method="TopPages"} 0"#,
            r#"pulse_query_api_tokens_reload_total{outcome="error"} 0"#,
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
    }

    /// The body of `fn <name>` in `src` (up to the first line closing it at 4 spaces).
    fn fn_body<'a>(src: &'a str, name: &str) -> &'a str {
        let start = src
            .find(&format!("fn {name}("))
            .unwrap_or_else(|| panic!("no fn {name}"));
        let body = &src[start..];
        let end = body.find("\n    }\n").unwrap_or(body.len());
        &body[..end]
    }

    /// The lists above follow the code that labels the series: every `kind` that
    /// `QueryError::code` returns, every status `QueryError::grpc_code` returns and every
    /// method `GrpcQuery` counts is initialised (a new variant or method without its zero
    /// series fails here, not silently in a dashboard).
    #[test]
    fn the_initialised_labels_cover_every_value_the_code_uses() {
        let error_rs = include_str!("error.rs");
        let kinds: Vec<&str> = fn_body(error_rs, "code")
            .split('"')
            .skip(1)
            .step_by(2)
            .collect();
        assert!(kinds.len() >= 5, "{kinds:?}");
        for kind in kinds {
            assert!(
                ERROR_KINDS.contains(&kind),
                "kind {kind} missing from ERROR_KINDS"
            );
        }
        let codes: Vec<String> = GRPC_CODES.iter().map(|c| format!("{c:?}")).collect();
        for part in fn_body(error_rs, "grpc_code")
            .split("tonic::Code::")
            .skip(1)
        {
            let code: String = part
                .chars()
                .take_while(char::is_ascii_alphanumeric)
                .collect();
            assert!(codes.contains(&code), "code {code} missing from GRPC_CODES");
        }
        let methods: Vec<&str> = include_str!("grpc.rs")
            .split("self.handle(\"")
            .skip(1)
            .filter_map(|p| p.split('"').next())
            .collect();
        assert!(methods.len() >= 8, "{methods:?}");
        for m in &methods {
            assert!(
                GRPC_METHODS.contains(m),
                "method {m} missing from GRPC_METHODS"
            );
        }
    }

    #[test]
    fn a_call_after_start_up_lands_in_the_initialised_series() {
        let text = pulse_platform::metrics::scrape_with(|| {
            init();
            metrics::histogram!(GRPC_REQUEST_SECONDS, "method" => "TopPages").record(0.02);
            metrics::counter!(GRPC_REQUESTS_TOTAL, "method" => "TopPages", "code" => "Ok")
                .increment(1);
        });
        for series in [
            r#"pulse_query_grpc_request_duration_seconds_bucket{method="TopPages",le="0.025"} 1"#,
            r#"pulse_query_grpc_request_duration_seconds_count{method="TopPages"} 1"#,
            r#"pulse_query_grpc_request_duration_seconds_bucket{method="User",le="+Inf"} 0"#,
            r#"pulse_query_grpc_requests_total{method="TopPages",code="Ok"} 1"#,
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
    }
}
