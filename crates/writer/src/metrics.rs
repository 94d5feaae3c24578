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
