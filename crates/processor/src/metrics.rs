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
pub const EMISSIONS_IN_FLIGHT: &str = "pulse_processor_emissions_in_flight";

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
    describe_gauge!(
        LAST_EVENT_TIME_MS,
        "Latest event time folded in, epoch ms (freshness)."
    );
}
