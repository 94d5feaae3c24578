//! The query API's metrics. HTTP requests by route template and status are counted by
//! `pulse_platform::http::observe` (`pulse_http_requests_total`,
//! `pulse_http_request_duration_seconds`); gRPC requests, ClickHouse query latency,
//! errors and the freshness cache are counted here.

use metrics::{Unit, describe_counter, describe_histogram};

pub const CLICKHOUSE_QUERY_SECONDS: &str = "pulse_query_clickhouse_query_seconds";
pub const ERRORS_TOTAL: &str = "pulse_query_errors_total";
pub const GRPC_REQUESTS_TOTAL: &str = "pulse_query_grpc_requests_total";
pub const GRPC_REQUEST_SECONDS: &str = "pulse_query_grpc_request_duration_seconds";
pub const FRESHNESS_CACHE_TOTAL: &str = "pulse_query_freshness_cache_total";

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
        "Requests answered with an error, by kind (invalid_parameter, invalid_range, too_many_points, unauthenticated, not_found, unavailable, timeout, internal) and transport (http, grpc)."
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
        "Lookups of the table-wide freshness, by outcome (hit, miss)."
    );
}
