//! The ingest service's metrics (HTTP request metrics come from `platform::http`, Kafka
//! producer metrics from `platform::kafka`).

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const EVENTS_TOTAL: &str = "pulse_ingest_events_total";
pub const EVENTS_BY_SCHEMA_VERSION_TOTAL: &str = "pulse_ingest_events_by_schema_version_total";
pub const BATCH_EVENTS: &str = "pulse_ingest_batch_events";
pub const BODY_BYTES: &str = "pulse_ingest_body_bytes";
pub const PRODUCE_ACK_SECONDS: &str = "pulse_ingest_batch_ack_seconds";
pub const DEDUP_SET_SIZE: &str = "pulse_ingest_dedup_set_size";
pub const DLQ_TRUNCATED_TOTAL: &str = "pulse_ingest_dlq_truncated_total";
pub const DLQ_DEDUPLICATED_TOTAL: &str = "pulse_ingest_dlq_deduplicated_total";
pub const DEDUP_IN_FLIGHT_WAITS_TOTAL: &str = "pulse_ingest_dedup_in_flight_waits_total";
pub const PRODUCER_QUEUE_DEPTH: &str = "pulse_ingest_producer_queue_depth";
pub const PII_CHANGES_TOTAL: &str = "pulse_ingest_pii_changes_total";
pub const AUTH_FAILURES_TOTAL: &str = "pulse_ingest_auth_failures_total";
pub const AUTHENTICATED_TOTAL: &str = "pulse_ingest_authenticated_requests_total";
pub const API_KEYS: &str = "pulse_ingest_api_keys";
pub const API_KEYS_RELOAD_TOTAL: &str = "pulse_ingest_api_keys_reload_total";

pub fn describe() {
    pulse_platform::http::describe_metrics();
    describe_counter!(
        EVENTS_TOTAL,
        "Events by outcome (accepted, duplicate, invalid, rate_limited, unavailable) and reason (validation code)."
    );
    describe_counter!(
        EVENTS_BY_SCHEMA_VERSION_TOTAL,
        "Accepted events (acknowledged by the broker) by the producer's schema_version: \
         version=\"1\" … \"32\", higher versions as \"other\"."
    );
    describe_histogram!(BATCH_EVENTS, "Events per request, by protocol.");
    describe_histogram!(BODY_BYTES, Unit::Bytes, "Request body size on the wire.");
    describe_histogram!(
        PRODUCE_ACK_SECONDS,
        Unit::Seconds,
        "Time from the start of a batch to the broker acknowledging all its records."
    );
    describe_gauge!(DEDUP_SET_SIZE, "Event ids in this replica's dedup set.");
    describe_counter!(
        DLQ_TRUNCATED_TOTAL,
        "DLQ records whose original was longer than --max-dlq-original-bytes and was cut (flagged with pulse-original-size)."
    );
    describe_counter!(
        DLQ_DEDUPLICATED_TOTAL,
        "Rejected events answered `rejected` again without a new DLQ record: a DLQ record of the same event id was already acknowledged within the dedup window (a client's retry)."
    );
    describe_counter!(
        DEDUP_IN_FLIGHT_WAITS_TOTAL,
        "Waits for an earlier attempt of the same event id that was still waiting for the broker, by outcome (settled, timeout: answered 503)."
    );
    describe_gauge!(
        PRODUCER_QUEUE_DEPTH,
        "Records queued in the producer and not yet acknowledged."
    );
    describe_counter!(
        PII_CHANGES_TOTAL,
        "Field values dropped, hashed or truncated by the PII policy."
    );
    describe_counter!(
        AUTH_FAILURES_TOTAL,
        "Requests refused for a missing or unknown API key."
    );
    describe_counter!(
        AUTHENTICATED_TOTAL,
        "Requests authenticated, by the API key's name (`key=source:name`, or the source; never the key): during a rotation, the old key's series stops growing once its clients moved."
    );
    describe_gauge!(
        API_KEYS,
        "API keys in force (inline and from --api-keys-file, after the last good reload)."
    );
    describe_counter!(
        API_KEYS_RELOAD_TOTAL,
        "Reloads of --api-keys-file after its content changed, by outcome (ok; error: the previous keys stay in force)."
    );
}

/// The `outcome` values of [`DEDUP_IN_FLIGHT_WAITS_TOTAL`].
pub const IN_FLIGHT_WAIT_OUTCOMES: &[&str] = &["settled", "timeout"];

/// Creates, at zero, the series that only a fault, a refusal or a policy would otherwise
/// create (metrics-rs registers a series at its first update), so rules and dashboards see
/// them from the first scrape: DLQ truncations, in-flight dedup waits (each outcome),
/// authentication failures, PII changes, and the producer's series for the configured
/// events and DLQ topics. Label values are fixed or configured, never client input.
pub fn init(events_topic: &str, dlq_topic: &str) {
    metrics::counter!(DLQ_TRUNCATED_TOTAL).increment(0);
    metrics::counter!(DLQ_DEDUPLICATED_TOTAL).increment(0);
    for &outcome in IN_FLIGHT_WAIT_OUTCOMES {
        metrics::counter!(DEDUP_IN_FLIGHT_WAITS_TOTAL, "outcome" => outcome).increment(0);
    }
    metrics::counter!(AUTH_FAILURES_TOTAL).increment(0);
    for outcome in ["ok", "error"] {
        metrics::counter!(API_KEYS_RELOAD_TOTAL, "outcome" => outcome).increment(0);
    }
    metrics::counter!(PII_CHANGES_TOTAL).increment(0);
    pulse_platform::metrics::init_producer(&[events_topic, dlq_topic]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_scrape_has_the_fault_only_series() {
        let text = pulse_platform::metrics::scrape_with(|| {
            init("pulse.events.v1", "pulse.events.dlq.v1");
        });
        for series in [
            "pulse_ingest_dlq_truncated_total 0",
            "pulse_ingest_dlq_deduplicated_total 0",
            "pulse_ingest_dedup_in_flight_waits_total{outcome=\"settled\"} 0",
            "pulse_ingest_dedup_in_flight_waits_total{outcome=\"timeout\"} 0",
            "pulse_ingest_auth_failures_total 0",
            "pulse_ingest_pii_changes_total 0",
            "pulse_kafka_produce_errors_total{topic=\"pulse.events.dlq.v1\",kind=\"delivery\"} 0",
            "pulse_kafka_produce_backpressure_total{topic=\"pulse.events.v1\"} 0",
            "pulse_kafka_producer_recreated_total 0",
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
    }
}
