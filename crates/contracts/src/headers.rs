//! Kafka record header names, and typed access to the ones every record carries.

use rdkafka::message::{BorrowedHeaders, Header, Headers, OwnedHeaders};

/// W3C trace context (see `trace_context`).
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";
/// The event id, so consumers can dedup without decoding the value.
pub const EVENT_ID: &str = "pulse-event-id";
/// Processing time: when ingest accepted the event, epoch ms as a decimal string.
pub const INGEST_TS: &str = "pulse-ingest-ts";
/// `1` on events that `pulsectl replay` re-published from the Parquet archive.
pub const REPLAY: &str = "pulse-replay";
/// DLQ and late-topic records: a stable machine-readable code...
pub const ERROR_CODE: &str = "pulse-error-code";
/// ...and a human-readable detail naming the field and the reason.
pub const ERROR_DETAIL: &str = "pulse-error-detail";
/// DLQ records whose original was longer than the DLQ keeps: the original's size in bytes
/// (decimal). The value then holds only the original's first bytes.
pub const ORIGINAL_SIZE: &str = "pulse-original-size";

/// The value of header `name` as UTF-8, if present and valid.
pub fn get_str<'a>(headers: &'a BorrowedHeaders, name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|h| h.key == name)
        .and_then(|h| h.value)
        .and_then(|v| std::str::from_utf8(v).ok())
}

/// The `pulse-ingest-ts` header as epoch ms, if present and a valid integer.
pub fn ingest_ts_ms(headers: &BorrowedHeaders) -> Option<i64> {
    get_str(headers, INGEST_TS).and_then(|v| v.parse().ok())
}

/// Appends a string header.
pub fn with_str(headers: OwnedHeaders, name: &str, value: &str) -> OwnedHeaders {
    headers.insert(Header {
        key: name,
        value: Some(value),
    })
}
