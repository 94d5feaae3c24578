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
/// The audit trail of administrative changes (append-only; JSON records, see
/// `pulse_platform::audit`). Key: the service that wrote the record.
pub const AUDIT: &str = "pulse.audit.v1";
/// The schema registry's compacted log.
pub const SCHEMAS: &str = "_schemas";

/// Every data topic of the pipeline (not `_schemas`, which is compacted and owned by the registry).
pub const ALL_DATA_TOPICS: &[&str] = &[EVENTS, EVENTS_DLQ, EVENTS_LATE, USER_ACTIVITY, SESSIONS];

/// A shadow processor's name (`--shadow`): 1 to 32 characters of `a-z`, `0-9` and `-`.
/// It is part of the shadow's topic, consumer group and table names.
pub fn validate_shadow_name(name: &str) -> Result<&str, String> {
    if name.is_empty() || name.len() > 32 {
        return Err(format!(
            "{name:?} must be 1 to 32 characters long (it has {})",
            name.len()
        ));
    }
    match name
        .chars()
        .find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-'))
    {
        Some(c) => Err(format!(
            "{name:?} has {c:?}: only a-z, 0-9 and - are allowed"
        )),
        None => Ok(name),
    }
}

/// The infix of every shadow topic: `<live topic>.shadow.<name>`.
const SHADOW_INFIX: &str = ".shadow.";

/// The shadow `name`'s copy of the live topic `live`, e.g.
/// `pulse.sessions.v1.shadow.gap10m` for `pulse.sessions.v1` and `gap10m`.
pub fn shadow_topic(live: &str, name: &str) -> String {
    format!("{live}{SHADOW_INFIX}{name}")
}

/// Whether `topic` is a shadow topic (of any shadow).
pub fn is_shadow_topic(topic: &str) -> bool {
    topic.contains(SHADOW_INFIX)
}

/// The shadow `name`'s consumer group beside the live group `live`:
/// `<live>-shadow-<name>`.
pub fn shadow_group(live: &str, name: &str) -> String {
    format!("{live}-shadow-{name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_names_are_short_lowercase_words() {
        for ok in ["a", "v2", "gap-10m", &"x".repeat(32)] {
            assert_eq!(validate_shadow_name(ok), Ok(ok));
        }
        for bad in ["", "Gap", "a_b", "a.b", "a b", "ü", &"x".repeat(33)] {
            assert!(validate_shadow_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn shadow_topics_and_groups_never_equal_a_live_one() {
        let live = [ALL_DATA_TOPICS, &[PROCESSOR_CHECKPOINTS, SCHEMAS]].concat();
        for name in ["a", "v2", "gap-10m"] {
            for topic in &live {
                let shadow = shadow_topic(topic, name);
                assert!(is_shadow_topic(&shadow));
                assert!(!live.contains(&shadow.as_str()), "{shadow}");
                assert!(!is_shadow_topic(topic));
            }
            assert_eq!(
                shadow_group("pulse-processor", name),
                format!("pulse-processor-shadow-{name}")
            );
        }
        assert_eq!(
            shadow_topic(SESSIONS, "gap-10m"),
            "pulse.sessions.v1.shadow.gap-10m"
        );
    }
}
