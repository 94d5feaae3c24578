//! The processor's metrics (Kafka consumer/producer metrics come from `platform::kafka`).

use metrics::{describe_counter, describe_gauge, describe_histogram};

pub const EVENTS_TOTAL: &str = "pulse_processor_events_total";
pub const OUTPUTS_TOTAL: &str = "pulse_processor_outputs_total";
pub const WATERMARK_MS: &str = "pulse_processor_watermark_ms";
pub const WATERMARK_LAG_SECONDS: &str = "pulse_processor_watermark_lag_seconds";
pub const OPEN_WINDOWS: &str = "pulse_processor_open_windows";
pub const OPEN_SESSIONS: &str = "pulse_processor_open_sessions";
pub const EMIT_SECONDS: &str = "pulse_processor_emit_seconds";
pub const LAST_EVENT_TIME_MS: &str = "pulse_processor_last_event_time_ms";
pub const PARTITION_WATERMARK_MS: &str = "pulse_processor_partition_watermark_ms";
pub const HELD_RECORDS: &str = "pulse_processor_held_records";
pub const COMMIT_HOLD_SECONDS: &str = "pulse_processor_commit_hold_seconds";
pub const CORRECTIONS_TOTAL: &str = "pulse_processor_corrections_total";
pub const SESSIONS_SUPERSEDED_TOTAL: &str = "pulse_processor_sessions_superseded_total";
pub const EMISSIONS_IN_FLIGHT: &str = "pulse_processor_emissions_in_flight";
pub const CHECKPOINT_BYTES_TOTAL: &str = "pulse_processor_checkpoint_bytes_total";
pub const STATE_BYTES: &str = "pulse_processor_state_bytes";
pub const STATE_BUDGET_BYTES: &str = "pulse_processor_state_budget_bytes";
pub const STATE_BUDGET_EXCEEDED_TOTAL: &str = "pulse_processor_state_budget_exceeded_total";
pub const HEAP_ALLOCATED_BYTES: &str = "pulse_processor_heap_allocated_bytes";
pub const HEAP_ACTIVE_BYTES: &str = "pulse_processor_heap_active_bytes";
pub const HEAP_RESIDENT_BYTES: &str = "pulse_processor_heap_resident_bytes";

pub fn describe() {
    describe_counter!(
        EVENTS_TOTAL,
        "Input records by outcome: added, duplicate, late, future (added but not moving the watermark), undecodable."
    );
    describe_counter!(
        OUTPUTS_TOTAL,
        "Aggregates produced, by kind (activity, session) and final (true, false)."
    );
    describe_gauge!(
        WATERMARK_MS,
        "The processor's event-time watermark, epoch ms."
    );
    describe_gauge!(
        WATERMARK_LAG_SECONDS,
        "Processing time minus the watermark."
    );
    describe_gauge!(OPEN_WINDOWS, "Open per-user tumbling windows.");
    describe_gauge!(OPEN_SESSIONS, "Open sessions.");
    describe_histogram!(
        EMIT_SECONDS,
        metrics::Unit::Seconds,
        "Time from a tick's emission until its outputs and checkpoints are acknowledged and its offsets stored."
    );
    describe_gauge!(
        EMISSIONS_IN_FLIGHT,
        "Ticks whose outputs or checkpoints are still awaiting acknowledgement."
    );
    describe_gauge!(
        PARTITION_WATERMARK_MS,
        "Each assigned partition's watermark (max event time minus the out-of-orderness), epoch ms."
    );
    describe_gauge!(
        HELD_RECORDS,
        "Records of a partition after its resume offset: re-read after a crash or rebalance because an open window or session still needs them."
    );
    describe_gauge!(
        COMMIT_HOLD_SECONDS,
        metrics::Unit::Seconds,
        "Per partition, the event time between the watermark and the start of the oldest open window or session holding its records: how far back a restart replays. At most the maximum session duration + session gap + allowed lateness (or window + allowed lateness if longer)."
    );
    describe_counter!(
        CORRECTIONS_TOTAL,
        "Results re-emitted for a window the watermark had already passed (late events within the allowed lateness)."
    );
    describe_counter!(
        SESSIONS_SUPERSEDED_TOTAL,
        "Session ids emitted under the prior session rules that a restart under other rules superseded (listed in merged_session_ids of the session now holding their first event, or retired and renamed); see docs/operations.md, Sessions across the switch."
    );
    describe_counter!(
        CHECKPOINT_BYTES_TOTAL,
        metrics::Unit::Bytes,
        "Bytes of checkpoint records queued, by kind: base (a full rewrite of the open sessions), delta (the sessions changed since the previous checkpoint), header."
    );
    describe_gauge!(
        STATE_BYTES,
        metrics::Unit::Bytes,
        "Estimated heap bytes of the processor's state: open windows, open sessions and the checkpoint in force (an estimate from the structures' sizes, not allocator statistics)."
    );
    describe_gauge!(
        STATE_BUDGET_BYTES,
        metrics::Unit::Bytes,
        "The configured state budget (--state-budget-bytes); 0 when none is set."
    );
    describe_counter!(
        STATE_BUDGET_EXCEEDED_TOTAL,
        "Emission ticks at which the estimated state exceeded the state budget (the processor is then not ready: blocked: state budget exceeded)."
    );
    describe_gauge!(
        HEAP_ALLOCATED_BYTES,
        metrics::Unit::Bytes,
        "Bytes the Rust heap (jemalloc) holds allocated: the state, and every buffer in use (jemalloc's stats.allocated, read every second, apart from the loop). Compare with pulse_processor_state_bytes."
    );
    describe_gauge!(
        HEAP_ACTIVE_BYTES,
        metrics::Unit::Bytes,
        "Bytes in the Rust heap's pages that hold allocations (jemalloc's stats.active); minus the allocated bytes: free room inside them (size-class rounding, freed slots among live ones)."
    );
    describe_gauge!(
        HEAP_RESIDENT_BYTES,
        metrics::Unit::Bytes,
        "Resident bytes of the Rust heap (jemalloc's stats.resident: active pages, its metadata, freed pages not yet given back). The process's RSS beyond it is outside the Rust heap: the binary, thread stacks, librdkafka's queues."
    );
    describe_gauge!(
        LAST_EVENT_TIME_MS,
        "Latest event time folded in, epoch ms (freshness)."
    );
}

/// The `outcome` values of [`EVENTS_TOTAL`].
pub const EVENT_OUTCOMES: &[&str] = &[
    "added",
    "future",
    "duplicate",
    "replayed",
    "late",
    "undecodable",
];

/// Creates, at zero, the series that only a late event, a correction or a fault would
/// otherwise create (metrics-rs registers a series at its first update): input records by
/// every outcome, corrections, and the producer's series for the configured output topics
/// (aggregates, late, checkpoints). Label values are fixed or configured.
pub fn init(output_topics: &[&str]) {
    for &outcome in EVENT_OUTCOMES {
        metrics::counter!(EVENTS_TOTAL, "outcome" => outcome).increment(0);
    }
    metrics::counter!(CORRECTIONS_TOTAL).increment(0);
    metrics::counter!(SESSIONS_SUPERSEDED_TOTAL).increment(0);
    metrics::counter!(STATE_BUDGET_EXCEEDED_TOTAL).increment(0);
    metrics::gauge!(STATE_BYTES).set(0.0);
    metrics::gauge!(STATE_BUDGET_BYTES).set(0.0);
    for kind in ["base", "delta", "header"] {
        metrics::counter!(CHECKPOINT_BYTES_TOTAL, "kind" => kind).increment(0);
    }
    pulse_platform::metrics::init_producer(output_topics);
    record_heap();
}

/// Sets the heap gauges from jemalloc's statistics (left as they were if it does not
/// answer).
/// Refreshes the heap gauges every [`HEAP_REFRESH`] until `stop` (see `run`).
pub async fn refresh_heap(stop: tokio_util::sync::CancellationToken) {
    let mut every = tokio::time::interval(HEAP_REFRESH);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = every.tick() => record_heap(),
        }
    }
}

/// How often [`refresh_heap`] reads jemalloc's statistics (an epoch advance: microseconds).
pub const HEAP_REFRESH: std::time::Duration = std::time::Duration::from_secs(1);

pub fn record_heap() {
    if let Some(h) = pulse_platform::malloc::heap_stats() {
        metrics::gauge!(HEAP_ALLOCATED_BYTES).set(h.allocated as f64);
        metrics::gauge!(HEAP_ACTIVE_BYTES).set(h.active as f64);
        metrics::gauge!(HEAP_RESIDENT_BYTES).set(h.resident as f64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_scrape_has_the_fault_only_series() {
        let text = pulse_platform::metrics::scrape_with(|| init(&["pulse.events.late.v1"]));
        for series in [
            "pulse_processor_corrections_total 0",
            "pulse_processor_events_total{outcome=\"late\"} 0",
            "pulse_processor_events_total{outcome=\"undecodable\"} 0",
            "pulse_processor_state_budget_exceeded_total 0",
            "pulse_processor_state_bytes 0",
            "pulse_processor_heap_allocated_bytes ",
            "pulse_processor_heap_active_bytes ",
            "pulse_processor_heap_resident_bytes ",
            "pulse_processor_checkpoint_bytes_total{kind=\"delta\"} 0",
            "pulse_kafka_produce_errors_total{topic=\"pulse.events.late.v1\",kind=\"enqueue\"} 0",
            "pulse_kafka_produce_backpressure_total{topic=\"pulse.events.late.v1\"} 0",
            "pulse_kafka_producer_recreated_total 0",
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
    }
}
