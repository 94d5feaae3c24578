//! The Prometheus recorder and the metrics the platform itself emits (Kafka clients,
//! admin server). Service crates declare their own metrics in their own `metrics.rs`.
//!
//! Every series carries a `service` label set once at install; label values are bounded
//! (topics and partitions of Pulse, fixed outcome names).

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{BuildError, PrometheusBuilder, PrometheusHandle};

/// The handle that renders the registry in the Prometheus text format.
pub use metrics_exporter_prometheus::PrometheusHandle as Handle;

pub const KAFKA_PRODUCED_TOTAL: &str = "pulse_kafka_produced_records_total";
pub const KAFKA_PRODUCE_ERRORS_TOTAL: &str = "pulse_kafka_produce_errors_total";
pub const KAFKA_PRODUCE_BACKPRESSURE_TOTAL: &str = "pulse_kafka_produce_backpressure_total";
pub const KAFKA_PRODUCE_ACK_SECONDS: &str = "pulse_kafka_produce_ack_seconds";
pub const KAFKA_PRODUCER_RECREATED_TOTAL: &str = "pulse_kafka_producer_recreated_total";
pub const KAFKA_CONSUMER_LAG: &str = "pulse_kafka_consumer_lag_records";
pub const KAFKA_PROCESSING_LAG: &str = "pulse_kafka_consumer_processing_lag_records";
pub const KAFKA_CONSUMED_TOTAL: &str = "pulse_kafka_consumed_records_total";
pub const KAFKA_OFFSETS_STORED_TOTAL: &str = "pulse_kafka_offsets_stored_total";
pub const KAFKA_COMMITS_TOTAL: &str = "pulse_kafka_commits_total";
pub const KAFKA_REBALANCES_TOTAL: &str = "pulse_kafka_rebalances_total";
pub const KAFKA_ASSIGNED_PARTITIONS: &str = "pulse_kafka_assigned_partitions";
pub const KAFKA_CONSUMER_STUCK: &str = "pulse_kafka_consumer_stuck";
pub const KAFKA_CONSUMER_REJOINS_TOTAL: &str = "pulse_kafka_consumer_rejoins_total";
pub const BUILD_INFO: &str = "pulse_build_info";

/// Seconds buckets for request and acknowledgement latencies (1 ms .. 30 s). 3 s is the
/// freshness SLO's threshold: the freshness SLI (deploy/prometheus) counts the writer's
/// end-to-end observations in the `le="3"` bucket.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 3.0, 5.0, 10.0, 30.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the global Prometheus recorder once per process (later calls return the same
/// handle, so tests may call it freely) and describes the platform's metrics.
pub fn install(service: &str) -> Result<PrometheusHandle, BuildError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let recorder = PrometheusBuilder::new()
        .add_global_label("service", service)
        .set_buckets(LATENCY_BUCKETS)?
        .build_recorder();
    let handle = recorder.handle();
    // Another thread may have won the race; then ours is dropped and theirs is used.
    if metrics::set_global_recorder(recorder).is_ok() {
        let _ = HANDLE.set(handle.clone());
        describe();
        metrics::gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
        spawn_upkeep(handle.clone());
    }
    Ok(HANDLE.get().cloned().unwrap_or(handle))
}

/// The `kind` label values of [`KAFKA_PRODUCE_ERRORS_TOTAL`] (one per
/// `kafka::ProduceError` variant; a test there keeps the two in step).
pub const PRODUCE_ERROR_KINDS: &[&str] = &["queue_full", "enqueue", "delivery", "cancelled"];

/// Creates a producer's series at zero for the topics it is configured to write (call at
/// start-up with configured names, never with client input), so that rules and dashboards
/// find them before the first record, error or backpressure: the produced, error (every
/// kind), backpressure and recreated counters. `increment(0)` leaves a counter that already
/// moved as it is, so calling it again is harmless.
pub fn init_producer(topics: &[&str]) {
    metrics::counter!(KAFKA_PRODUCER_RECREATED_TOTAL).increment(0);
    for &topic in topics {
        let t = topic.to_owned();
        metrics::counter!(KAFKA_PRODUCED_TOTAL, "topic" => t.clone()).increment(0);
        metrics::counter!(KAFKA_PRODUCE_BACKPRESSURE_TOTAL, "topic" => t.clone()).increment(0);
        for &kind in PRODUCE_ERROR_KINDS {
            metrics::counter!(KAFKA_PRODUCE_ERRORS_TOTAL, "topic" => t.clone(), "kind" => kind)
                .increment(0);
        }
    }
}

/// The Prometheus text a fresh registry holds after `f` ran with it as the (thread-local)
/// recorder: for the services' tests that their start-up registers the series the rules
/// and dashboards use. The global recorder is not touched.
pub fn scrape_with(f: impl FnOnce()) -> String {
    // The production buckets (so histograms render as histograms); they are valid.
    let recorder = match PrometheusBuilder::new().set_buckets(LATENCY_BUCKETS) {
        Ok(b) => b,
        Err(_) => PrometheusBuilder::new(),
    }
    .build_recorder();
    let handle = recorder.handle();
    metrics::with_local_recorder(&recorder, f);
    handle.render()
}

fn spawn_upkeep(handle: PrometheusHandle) {
    // Histograms are drained by upkeep; without it memory grows between scrapes.
    if let Ok(rt) = tokio::runtime::Handle::try_current() {
        rt.spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(5));
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        });
    }
}

fn describe() {
    describe_counter!(
        KAFKA_PRODUCED_TOTAL,
        "Records the broker acknowledged, by topic."
    );
    describe_counter!(
        KAFKA_PRODUCE_ERRORS_TOTAL,
        "Records that failed to enqueue or were not acknowledged, by topic and kind."
    );
    describe_counter!(
        KAFKA_PRODUCE_BACKPRESSURE_TOTAL,
        "Times an enqueue found the producer's local queue full (the caller waited or was told to retry)."
    );
    describe_histogram!(
        KAFKA_PRODUCE_ACK_SECONDS,
        Unit::Seconds,
        "Time from enqueue to broker acknowledgement."
    );
    describe_counter!(
        KAFKA_PRODUCER_RECREATED_TOTAL,
        "Kafka producer clients replaced because they could not deliver (a fatal error, or no acknowledgement for the stall timeout)."
    );
    describe_gauge!(
        KAFKA_CONSUMER_LAG,
        "Records between the group's committed offset and the partition's high watermark, read from the broker on a timer (also while paused). Large by design for the processor and the Parquet writer, which hold commits back; alert and scale on the processing lag instead."
    );
    describe_gauge!(
        KAFKA_PROCESSING_LAG,
        "Records between what this consumer has read (its position) and the partition's high watermark, per assigned partition; 0 for partitions it no longer fetches. The lag to scale and alert on."
    );
    describe_counter!(
        KAFKA_CONSUMED_TOTAL,
        "Records received by the consumer, by topic."
    );
    describe_counter!(
        KAFKA_OFFSETS_STORED_TOTAL,
        "Offsets marked durable by the service and stored for the next commit."
    );
    describe_counter!(
        KAFKA_COMMITS_TOTAL,
        "Offset commits, by outcome (ok, error)."
    );
    describe_counter!(
        KAFKA_REBALANCES_TOTAL,
        "Consumer-group rebalances, by kind (assign, revoke, error)."
    );
    describe_gauge!(
        KAFKA_ASSIGNED_PARTITIONS,
        "Partitions currently assigned to this consumer."
    );
    describe_gauge!(
        KAFKA_CONSUMER_STUCK,
        "1 while this consumer owns no partition and no partition of its topics with records left makes progress for the stuck timeout (--kafka-consumer-stuck-timeout), else 0."
    );
    describe_counter!(
        KAFKA_CONSUMER_REJOINS_TOTAL,
        "Times a stuck consumer left and rejoined its group as a new member."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the version label says which build runs."
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_producer_scrape_has_every_fault_series_at_zero() {
        let text = scrape_with(|| init_producer(&["pulse.events.v1", "pulse.events.dlq.v1"]));
        assert!(
            text.contains("pulse_kafka_producer_recreated_total 0"),
            "{text}"
        );
        for topic in ["pulse.events.v1", "pulse.events.dlq.v1"] {
            for series in [
                format!("{KAFKA_PRODUCED_TOTAL}{{topic=\"{topic}\"}} 0"),
                format!("{KAFKA_PRODUCE_BACKPRESSURE_TOTAL}{{topic=\"{topic}\"}} 0"),
            ] {
                assert!(text.contains(&series), "{series} missing from\n{text}");
            }
            for kind in PRODUCE_ERROR_KINDS {
                let series =
                    format!("{KAFKA_PRODUCE_ERRORS_TOTAL}{{topic=\"{topic}\",kind=\"{kind}\"}} 0");
                assert!(text.contains(&series), "{series} missing from\n{text}");
            }
        }
    }

    #[test]
    fn init_producer_does_not_reset_a_counter_that_moved() {
        let text = scrape_with(|| {
            metrics::counter!(KAFKA_PRODUCER_RECREATED_TOTAL).increment(2);
            init_producer(&[]);
        });
        assert!(
            text.contains("pulse_kafka_producer_recreated_total 2"),
            "{text}"
        );
    }
}
