//! Processing rules and their version: the settings that change the numbers the processor
//! emits ([`Rules`]), the rules version every output carries (`rules_version` of
//! `UserWindowActivity` and `Session`: the operator's `--rules-version` name and a
//! fingerprint of the rule values, [`rules_version`]), and the audit trail of rules in
//! force ([`audit_start`]: a `processor.rules` record at every start, or
//! `processor.rules.changed` when the version differs from the last one recorded for the
//! same consumer group). Stamping the outputs is the run loop's job.
//!
//! The fingerprint is the first 12 hex digits of the SHA-256 of [`Rules::canonical`], a
//! fixed text of `key=value` pairs: the same values give the same fingerprint on every
//! machine and run; any rule value changes it; settings that are not rules (emit interval,
//! idle timeout, topics, budgets, …) are not in it.

use std::time::Duration;

use pulse_platform::audit::{AuditRecord, Outcome, write_now};
use pulse_platform::kafka::reader::ReadError;
use pulse_platform::kafka::{KafkaConfig, RecordProducer, Start, TopicReader};
use sha2::{Digest, Sha256};

/// Audit action of a start whose rules version equals the last one recorded (or the first
/// record of the group).
pub const ACTION_RULES: &str = "processor.rules";
/// Audit action of a start whose rules version differs from the last one recorded.
pub const ACTION_RULES_CHANGED: &str = "processor.rules.changed";
/// The actor of the processor's rules records: its configuration.
pub const ACTOR: &str = "config";

/// Hex digits of the fingerprint (48 bits).
pub const FINGERPRINT_LEN: usize = 12;
/// Longest `--rules-version` name.
pub const MAX_NAME_LEN: usize = 64;

/// At most this many of the newest records per partition of the audit topic are read to
/// find the last rules version (the trail holds administrative changes, not data).
const AUDIT_READ_MAX_RECORDS: u64 = 100_000;

/// The rules that change the numbers. Event types are fixed in the code today
/// ([`crate::model::InputEvent`]); they are part of the canonical text so that making one
/// configurable later keeps the fingerprint of a deployment that keeps the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rules {
    /// Tumbling window size, ms.
    pub window_ms: i64,
    /// How long after a window's end a late event still corrects it, ms.
    pub allowed_lateness_ms: i64,
    /// Watermark = max event time − this, ms (decides which events are late).
    pub max_out_of_orderness_ms: i64,
    /// Session gap, ms.
    pub session_gap_ms: i64,
    /// Maximum session duration, ms.
    pub max_session_ms: i64,
}

/// The event type counted as a page view.
pub const PAGE_VIEW_EVENT_TYPE: &str = "page_view";
/// The event type whose amount is revenue.
pub const REVENUE_EVENT_TYPE: &str = "purchase";
/// Which event types count as activity (open windows, extend sessions): all of them.
pub const ACTIVITY_EVENT_TYPES: &str = "*";

impl Rules {
    /// The rules as `key=value` pairs, space-separated, in a fixed order (the
    /// fingerprint's input and the audit record's settings).
    pub fn canonical(&self) -> String {
        format!(
            "rules/v1 window_ms={} allowed_lateness_ms={} max_out_of_orderness_ms={} \
             session_gap_ms={} max_session_ms={} page_view_event_type={PAGE_VIEW_EVENT_TYPE} \
             revenue_event_type={REVENUE_EVENT_TYPE} activity_event_types={ACTIVITY_EVENT_TYPES}",
            self.window_ms,
            self.allowed_lateness_ms,
            self.max_out_of_orderness_ms,
            self.session_gap_ms,
            self.max_session_ms,
        )
    }

    /// The first [`FINGERPRINT_LEN`] hex digits of the SHA-256 of [`Self::canonical`].
    pub fn fingerprint(&self) -> String {
        let digest = Sha256::digest(self.canonical().as_bytes());
        let mut hex = hex::encode(digest);
        hex.truncate(FINGERPRINT_LEN);
        hex
    }
}

/// The rules version: `<name>+<fingerprint>`, or the fingerprint alone without a name.
pub fn rules_version(name: Option<&str>, rules: &Rules) -> String {
    match name {
        Some(n) if !n.is_empty() => format!("{n}+{}", rules.fingerprint()),
        _ => rules.fingerprint(),
    }
}

/// `--rules-version`'s value parser: 1–64 of `A-Z a-z 0-9 . _ -`, starting with a letter
/// or digit (no `+`: it separates the name from the fingerprint).
pub fn parse_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= MAX_NAME_LEN
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "{s:?} is not a rules version name: 1 to {MAX_NAME_LEN} of A-Z, a-z, 0-9, '.', '_', '-', starting with a letter or digit"
        ))
    }
}

/// The rules version recorded in an audit record's detail (`rules_version=<v> …`).
pub fn recorded_version(detail: &str) -> Option<&str> {
    detail
        .split_whitespace()
        .find_map(|t| t.strip_prefix("rules_version="))
}

/// The rules a processor runs with, and whose they are.
#[derive(Debug, Clone, Copy)]
pub struct InForce<'a> {
    /// `processor` or `processor-shadow`.
    pub service: &'a str,
    /// The consumer group (the audit records' target: the live processor and each shadow
    /// have their own history).
    pub group: &'a str,
    pub version: &'a str,
    pub rules: &'a Rules,
}

/// How the rules in force compare with the last ones recorded for the same group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Previous {
    /// No rules record of the group in the audit trail: its first start with versions.
    None,
    /// The last record holds this version.
    Recorded(String),
    /// The audit topic could not be read (why); the change is not known.
    Unknown(String),
}

/// The audit record of a start with `version` and `rules`, for the consumer group
/// `target`: `processor.rules.changed` (detail `from=<previous>`) when the last recorded
/// version differs, else `processor.rules`.
pub fn start_record(now: &InForce<'_>, previous: &Previous) -> AuditRecord {
    let InForce {
        service,
        group: target,
        version,
        rules,
    } = *now;
    let (action, note) = match previous {
        Previous::Recorded(p) if p != version => (ACTION_RULES_CHANGED, format!(" from={p}")),
        Previous::Recorded(_) => (ACTION_RULES, String::new()),
        Previous::None => (ACTION_RULES, " from=none".to_owned()),
        Previous::Unknown(why) => (
            ACTION_RULES,
            format!(" from=unknown ({})", why.replace(char::is_whitespace, "_")),
        ),
    };
    let mut record = AuditRecord::new(service, ACTOR, action, target, Outcome::Ok).with_detail(
        format!("rules_version={version}{note} {}", rules.canonical()),
    );
    if let Some(host) = std::env::var("HOSTNAME").ok().filter(|h| !h.is_empty()) {
        record = record.with_source(host);
    }
    record
}

/// The version of the newest rules record of `target` among `records` (by timestamp, then
/// order).
pub fn last_recorded<'a>(
    records: impl IntoIterator<Item = &'a AuditRecord>,
    target: &str,
) -> Option<String> {
    records
        .into_iter()
        .filter(|r| {
            r.target == target && (r.action == ACTION_RULES || r.action == ACTION_RULES_CHANGED)
        })
        .filter_map(|r| recorded_version(&r.detail).map(|v| (r.ts_ms, v)))
        .fold(None, |best: Option<(i64, &str)>, (ts, v)| match best {
            Some((b, _)) if b > ts => best,
            _ => Some((ts, v)),
        })
        .map(|(_, v)| v.to_owned())
}

/// The last rules version recorded for `target` in the audit topic: read from the newest
/// records (at most [`AUDIT_READ_MAX_RECORDS`] per partition) up to the topic's end when
/// the read started, within `timeout` (partitions assigned directly: no group membership,
/// nothing committed). A topic that does not exist holds no record.
pub async fn previous(
    kafka: &KafkaConfig,
    topic: &str,
    target: &str,
    timeout: Duration,
) -> Previous {
    let read = TopicReader::new(kafka, "pulse-processor-audit", topic)
        .with_start(Start::Last(AUDIT_READ_MAX_RECORDS))
        .with_timeout(timeout)
        .read()
        .await;
    match read {
        Ok(records) => {
            let records: Vec<AuditRecord> = records
                .iter()
                .filter_map(|r| r.value.as_deref().and_then(AuditRecord::from_json))
                .collect();
            match last_recorded(&records, target) {
                Some(v) => Previous::Recorded(v),
                None => Previous::None,
            }
        }
        Err(ReadError::NoTopic(_)) => Previous::None,
        // The message names the topic and the reason.
        Err(e) => Previous::Unknown(e.to_string()),
    }
}

/// At start: reads the last rules version recorded for the consumer group `target` in the
/// audit topic and writes this start's record (`processor.rules`, or
/// `processor.rules.changed` from → to), waiting at most `timeout` for each. Neither step
/// keeps the processor from starting: a failed read is recorded as `from=unknown`, a
/// failed write is counted and logged by the audit module. Returns the record.
pub async fn audit_start(
    kafka: &KafkaConfig,
    producer: &(impl RecordProducer + ?Sized),
    audit_topic: &str,
    now: &InForce<'_>,
    timeout: Duration,
) -> AuditRecord {
    let (target, version) = (now.group, now.version);
    let previous = previous(kafka, audit_topic, target, timeout).await;
    if let Previous::Unknown(why) = &previous {
        tracing::warn!(
            topic = audit_topic,
            error = why,
            "cannot read the audit trail: a rules change is not detected at this start"
        );
    }
    let record = start_record(now, &previous);
    if record.action == ACTION_RULES_CHANGED {
        tracing::warn!(group = target, rules_version = version, detail = %record.detail, "processing rules changed");
    } else {
        tracing::info!(group = target, rules_version = version, detail = %record.detail, "processing rules");
    }
    // A failure is counted and logged (with the record's fields) by `write_now`.
    let _ = write_now(producer, audit_topic, &record, timeout).await;
    record
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        Rules {
            window_ms: 60_000,
            allowed_lateness_ms: 60_000,
            max_out_of_orderness_ms: 5_000,
            session_gap_ms: 1_800_000,
            max_session_ms: 86_400_000,
        }
    }

    #[test]
    fn the_fingerprint_is_fixed_for_fixed_rules() {
        // A constant: the same on every machine, run and build (a changed canonical text
        // or hash must be a deliberate, documented change of every deployment's version).
        // (Checked independently: `printf %s "<canonical>" | sha256sum | cut -c1-12`.)
        assert_eq!(
            rules().canonical(),
            "rules/v1 window_ms=60000 allowed_lateness_ms=60000 max_out_of_orderness_ms=5000 \
             session_gap_ms=1800000 max_session_ms=86400000 page_view_event_type=page_view \
             revenue_event_type=purchase activity_event_types=*"
        );
        assert_eq!(rules().fingerprint(), "b6320f5f73b1");
        assert_eq!(rules().fingerprint().len(), FINGERPRINT_LEN);
        assert!(rules().fingerprint().bytes().all(|b| b.is_ascii_hexdigit()));
    }

    #[test]
    fn every_rule_changes_the_fingerprint() {
        let base = rules();
        let changed = [
            Rules {
                window_ms: 30_000,
                ..base
            },
            Rules {
                allowed_lateness_ms: 0,
                ..base
            },
            Rules {
                max_out_of_orderness_ms: 4_999,
                ..base
            },
            Rules {
                session_gap_ms: 600_000,
                ..base
            },
            Rules {
                max_session_ms: 43_200_000,
                ..base
            },
        ];
        let mut seen = std::collections::BTreeSet::from([base.fingerprint()]);
        for r in changed {
            assert!(seen.insert(r.fingerprint()), "{r:?} collides");
        }
        // Values that only swap places are different rules too.
        let swapped = Rules {
            window_ms: 5_000,
            max_out_of_orderness_ms: 60_000,
            ..base
        };
        assert_ne!(swapped.fingerprint(), base.fingerprint());
    }

    #[test]
    fn the_version_is_the_name_and_the_fingerprint() {
        let fp = rules().fingerprint();
        assert_eq!(
            rules_version(Some("2026-12-rc1"), &rules()),
            format!("2026-12-rc1+{fp}")
        );
        assert_eq!(rules_version(None, &rules()), fp);
        assert_eq!(
            recorded_version(&format!("rules_version=a+{fp} from=none rules/v1")),
            Some(format!("a+{fp}").as_str())
        );
    }

    #[test]
    fn names_are_short_plain_words() {
        for good in ["2026-12-rc1", "v2", "gap.10m_x", &"a".repeat(MAX_NAME_LEN)] {
            assert_eq!(parse_name(good).as_deref(), Ok(good));
        }
        for bad in [
            "",
            "-x",
            ".x",
            "a+b",
            "a b",
            "ä",
            &"a".repeat(MAX_NAME_LEN + 1),
        ] {
            let e = parse_name(bad).unwrap_err();
            assert!(e.contains("not a rules version name"), "{e}");
        }
    }

    #[test]
    fn a_start_is_a_change_only_when_the_last_recorded_version_differs() {
        let r = rules();
        let v = rules_version(Some("b"), &r);
        let now = InForce {
            service: "processor",
            group: "g",
            version: &v,
            rules: &r,
        };
        let rec = |prev: Previous| start_record(&now, &prev);
        let same = rec(Previous::Recorded(v.clone()));
        assert_eq!(same.action, ACTION_RULES);
        assert_eq!(recorded_version(&same.detail), Some(v.as_str()));
        assert!(
            same.detail.contains("session_gap_ms=1800000"),
            "{}",
            same.detail
        );
        let changed = rec(Previous::Recorded("a+000000000000".into()));
        assert_eq!(changed.action, ACTION_RULES_CHANGED);
        assert!(
            changed.detail.contains("from=a+000000000000"),
            "{}",
            changed.detail
        );
        assert_eq!(changed.target, "g");
        assert_eq!(changed.actor, ACTOR);
        assert_eq!(rec(Previous::None).action, ACTION_RULES);
        let unknown = rec(Previous::Unknown("reading t: timed out".into()));
        assert_eq!(unknown.action, ACTION_RULES);
        assert!(
            unknown.detail.contains("from=unknown"),
            "{}",
            unknown.detail
        );
        assert_eq!(recorded_version(&unknown.detail), Some(v.as_str()));
    }

    #[test]
    fn the_last_record_of_the_same_group_counts() {
        let r = rules();
        let rec = |service, group, version| {
            let now = InForce {
                service,
                group,
                version,
                rules: &r,
            };
            start_record(&now, &Previous::None)
        };
        let mut a = rec("processor", "live", "a");
        let mut b = rec("processor", "live", "b");
        let mut shadow = rec("processor-shadow", "shadow-x", "c");
        let mut other = AuditRecord::new("pulsectl", "op", "replay", "live", Outcome::Ok)
            .with_detail("rules_version=zzz");
        (a.ts_ms, b.ts_ms, shadow.ts_ms, other.ts_ms) = (1, 2, 3, 4);
        assert_eq!(
            last_recorded([&b, &a, &shadow, &other], "live").as_deref(),
            Some("b")
        );
        assert_eq!(
            last_recorded([&a, &shadow], "shadow-x").as_deref(),
            Some("c")
        );
        assert_eq!(last_recorded([&other], "live"), None);
        // Same timestamp: the later record wins.
        b.ts_ms = 1;
        assert_eq!(last_recorded([&a, &b], "live").as_deref(), Some("b"));
    }
}
