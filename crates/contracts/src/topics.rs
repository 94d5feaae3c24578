//! Kafka topic names. The broker does not auto-create topics: `platform::topics`
//! creates these at start, and `pulsectl topics create` does it for operators.

/// Accepted, validated, deduplicated events. Key: user_id.
pub const EVENTS: &str = "pulse.events.v1";
/// Events ingest refused, with their original bytes and the reason in headers.
pub const EVENTS_DLQ: &str = "pulse.events.dlq.v1";
/// Events that arrived after their window closed past the allowed lateness.
pub const EVENTS_LATE: &str = "pulse.events.late.v1";
/// Per-user tumbling-window activity. Key: "<user_id>|<window_start_ms>".
pub const USER_ACTIVITY: &str = "pulse.user-activity.v1";
/// Gap-based sessions. Key: session_id.
pub const SESSIONS: &str = "pulse.sessions.v1";
/// The processor's per-partition checkpoints (compacted; see `processor::checkpoint`).
pub const PROCESSOR_CHECKPOINTS: &str = "pulse.processor.checkpoints.v1";
/// The schema registry's compacted log.
pub const SCHEMAS: &str = "_schemas";

/// Every data topic of the pipeline (not `_schemas`, which is compacted and owned by the registry).
pub const ALL_DATA_TOPICS: &[&str] = &[EVENTS, EVENTS_DLQ, EVENTS_LATE, USER_ACTIVITY, SESSIONS];
