//! The writer's metrics (Kafka consumer metrics come from `platform::kafka`).

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};

pub const ROWS_WRITTEN_TOTAL: &str = "pulse_writer_rows_written_total";
pub const BATCH_ROWS: &str = "pulse_writer_batch_rows";
pub const BATCH_BYTES: &str = "pulse_writer_batch_bytes";
pub const BATCH_SECONDS: &str = "pulse_writer_batch_write_seconds";
pub const RETRIES_TOTAL: &str = "pulse_writer_retries_total";
pub const ERRORS_TOTAL: &str = "pulse_writer_errors_total";
pub const DLQ_TOTAL: &str = "pulse_writer_dead_letters_total";
pub const CIRCUIT_OPEN: &str = "pulse_writer_circuit_open";
pub const BLOCKED: &str = "pulse_writer_blocked";
pub const END_TO_END_SECONDS: &str = "pulse_writer_end_to_end_latency_seconds";
pub const FRESHNESS_EVENT_TIME_MS: &str = "pulse_writer_last_event_time_ms";
// The Parquet sink (shared ones above carry `sink="parquet"`).
pub const FILES_UPLOADED_TOTAL: &str = "pulse_writer_files_uploaded_total";
pub const UPLOADED_BYTES_TOTAL: &str = "pulse_writer_uploaded_bytes_total";
pub const FILE_ROWS: &str = "pulse_writer_file_rows";
pub const FILE_BYTES: &str = "pulse_writer_file_bytes";
pub const UPLOAD_SECONDS: &str = "pulse_writer_upload_seconds";
pub const ENCODE_SECONDS: &str = "pulse_writer_encode_seconds";
pub const FRESHNESS_ERRORS_TOTAL: &str = "pulse_writer_freshness_errors_total";

pub fn describe() {
    describe_counter!(
        ROWS_WRITTEN_TOTAL,
        "Rows the store accepted, by sink and table."
    );
    describe_histogram!(BATCH_ROWS, "Rows per written batch, by sink and table.");
    describe_histogram!(
        BATCH_BYTES,
        Unit::Bytes,
        "Record bytes per written batch, by sink and table."
    );
    describe_histogram!(
        BATCH_SECONDS,
        Unit::Seconds,
        "Time to write one batch, retries included."
    );
    describe_counter!(
        RETRIES_TOTAL,
        "Write attempts retried, by sink and error kind (retryable, blocking)."
    );
    describe_counter!(
        ERRORS_TOTAL,
        "Write errors, by sink and kind (retryable, blocking, row)."
    );
    describe_counter!(
        DLQ_TOTAL,
        "Records sent to the DLQ because the store refused them for good or they could not be decoded."
    );
    describe_gauge!(
        CIRCUIT_OPEN,
        "1 while the circuit breaker is open (the store failed repeatedly)."
    );
    describe_gauge!(
        BLOCKED,
        "1 while the store refuses every write for a reason that is not about the data (credentials, rights, missing table or bucket, coordination), by sink and reason; readiness is 503 meanwhile and nothing is dead-lettered."
    );
    describe_histogram!(
        END_TO_END_SECONDS,
        Unit::Seconds,
        "Ingest timestamp to committed write, per record."
    );
    describe_gauge!(
        FRESHNESS_EVENT_TIME_MS,
        "Latest event time written, by sink and partition."
    );
    describe_counter!(
        FILES_UPLOADED_TOTAL,
        "Parquet objects whose upload S3 confirmed, by sink."
    );
    describe_counter!(
        UPLOADED_BYTES_TOTAL,
        Unit::Bytes,
        "Bytes of Parquet objects whose upload S3 confirmed, by sink."
    );
    describe_histogram!(FILE_ROWS, "Rows per uploaded Parquet object.");
    describe_histogram!(
        FILE_BYTES,
        Unit::Bytes,
        "Size of each uploaded Parquet object (zstd-compressed)."
    );
    describe_histogram!(
        UPLOAD_SECONDS,
        Unit::Seconds,
        "Time of the successful upload attempt of one Parquet object."
    );
    describe_histogram!(
        ENCODE_SECONDS,
        Unit::Seconds,
        "Time to encode one Parquet object from its rows."
    );
    describe_counter!(
        FRESHNESS_ERRORS_TOTAL,
        "Freshness rows that could not be written to ClickHouse (best effort; data is unaffected), by sink."
    );
}

/// Sets the sink's freshness gauge (latest event time written) for each freshness row.
pub fn record_freshness(sink: &'static str, rows: &[pulse_storage::rows::FreshnessRow]) {
    for r in rows {
        metrics::gauge!(FRESHNESS_EVENT_TIME_MS, "sink" => sink, "partition" => r.kafka_partition.to_string())
            .set(r.last_event_time_ms as f64);
    }
}

/// The DLQ `code` values each sink sends (`dlq::dead_letter` callers).
pub const DLQ_CODES_CLICKHOUSE: &[&str] = &["undecodable", "rejected_by_clickhouse"];
pub const DLQ_CODES_PARQUET: &[&str] = &["undecodable"];
/// The `kind` of [`ERRORS_TOTAL`] for a failed offset commit after a write.
pub const ERROR_KIND_COMMIT: &str = "commit";

/// Creates, at zero, the series of `sink` ("clickhouse" or "parquet") that only a failure
/// would otherwise create (metrics-rs registers a series at its first update), so rules
/// and dashboards see them from the first scrape: retries and errors by every kind the
/// sink counts, dead letters by every code it sends, the circuit and every blocked reason
/// (0), the Parquet sink's freshness errors, and the DLQ producer's series for the
/// configured DLQ topic. Label values are fixed or configured, never record content.
pub fn init(sink: &'static str, dlq_topic: &str) {
    use crate::retry::{BlockReason, ErrorKind};
    let parquet = sink == "parquet";
    let retried = [
        ErrorKind::Retryable,
        ErrorKind::Blocking(BlockReason::Server),
    ];
    for kind in retried {
        metrics::counter!(RETRIES_TOTAL, "sink" => sink, "kind" => kind.as_str()).increment(0);
        metrics::counter!(ERRORS_TOTAL, "sink" => sink, "kind" => kind.as_str()).increment(0);
    }
    if !parquet {
        // Only ClickHouse refuses single rows (the archive takes any decodable record).
        let row = ErrorKind::Row.as_str();
        metrics::counter!(ERRORS_TOTAL, "sink" => sink, "kind" => row).increment(0);
    }
    metrics::counter!(ERRORS_TOTAL, "sink" => sink, "kind" => ERROR_KIND_COMMIT).increment(0);
    let codes = if parquet {
        DLQ_CODES_PARQUET
    } else {
        DLQ_CODES_CLICKHOUSE
    };
    for &code in codes {
        metrics::counter!(DLQ_TOTAL, "sink" => sink, "code" => code).increment(0);
    }
    metrics::gauge!(CIRCUIT_OPEN, "sink" => sink).set(0.0);
    for r in BlockReason::ALL {
        metrics::gauge!(BLOCKED, "sink" => sink, "reason" => r.as_str()).set(0.0);
    }
    if parquet {
        metrics::counter!(FRESHNESS_ERRORS_TOTAL, "sink" => sink).increment(0);
    }
    pulse_platform::metrics::init_producer(&[dlq_topic]);
}

#[cfg(test)]
mod init_tests {
    use super::*;

    #[test]
    fn a_fresh_clickhouse_writer_scrape_has_the_fault_only_series() {
        let text =
            pulse_platform::metrics::scrape_with(|| init("clickhouse", "pulse.events.dlq.v1"));
        for series in [
            r#"pulse_writer_retries_total{sink="clickhouse",kind="retryable"} 0"#,
            r#"pulse_writer_retries_total{sink="clickhouse",kind="blocking"} 0"#,
            r#"pulse_writer_errors_total{sink="clickhouse",kind="row"} 0"#,
            r#"pulse_writer_errors_total{sink="clickhouse",kind="commit"} 0"#,
            r#"pulse_writer_dead_letters_total{sink="clickhouse",code="rejected_by_clickhouse"} 0"#,
            r#"pulse_writer_circuit_open{sink="clickhouse"} 0"#,
            r#"pulse_writer_blocked{sink="clickhouse",reason="authentication"} 0"#,
            r#"pulse_kafka_produce_errors_total{topic="pulse.events.dlq.v1",kind="delivery"} 0"#,
            "pulse_kafka_producer_recreated_total 0",
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
        assert!(
            !text.contains("pulse_writer_freshness_errors_total"),
            "{text}"
        );
    }

    #[test]
    fn a_fresh_parquet_writer_scrape_has_the_fault_only_series() {
        let text = pulse_platform::metrics::scrape_with(|| init("parquet", "pulse.events.dlq.v1"));
        for series in [
            r#"pulse_writer_retries_total{sink="parquet",kind="retryable"} 0"#,
            r#"pulse_writer_errors_total{sink="parquet",kind="blocking"} 0"#,
            r#"pulse_writer_dead_letters_total{sink="parquet",code="undecodable"} 0"#,
            r#"pulse_writer_freshness_errors_total{sink="parquet"} 0"#,
            r#"pulse_writer_blocked{sink="parquet",reason="missing_bucket"} 0"#,
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
        assert!(!text.contains(r#"kind="row""#), "{text}");
    }
}
