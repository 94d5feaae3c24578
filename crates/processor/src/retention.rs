//! The start-up check that the events topic keeps records long enough: the processor
//! rebuilds open windows and sessions from the log after a restart or rebalance and
//! commits an offset only when nothing open needs the records before it, so a record
//! deleted by retention while a window or session still needs it is lost from its
//! aggregate. The longest such span is the maximum session duration + session gap +
//! allowed lateness + window size + maximum out-of-orderness (the watermark's lag).

use std::collections::BTreeMap;
use std::time::Duration;

/// What the events topic's configs say about its retention against what is needed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Long enough (or no time-based deletion at all).
    Enough,
    /// Shorter than needed.
    Short { retention: Duration },
    /// The broker did not report enough to tell (the local broker reports only configs
    /// set on the topic).
    Unknown(String),
}

/// Judges the reported `configs` of a topic against `needed`.
pub fn judge(configs: &BTreeMap<String, String>, needed: Duration) -> Verdict {
    if let Some(policy) = configs.get("cleanup.policy")
        && !policy.split(',').any(|p| p.trim() == "delete")
    {
        return Verdict::Enough; // compaction only: nothing is deleted by time
    }
    match configs.get("retention.ms").map(|v| v.trim().parse::<i64>()) {
        None => Verdict::Unknown("the broker does not report its retention.ms".into()),
        Some(Err(_)) => Verdict::Unknown(format!(
            "its retention.ms {:?} is not a number",
            configs
                .get("retention.ms")
                .map(String::as_str)
                .unwrap_or("")
        )),
        Some(Ok(ms)) if ms < 0 => Verdict::Enough, // -1: kept forever
        Some(Ok(ms)) => {
            let retention = Duration::from_millis(ms.unsigned_abs());
            if retention >= needed {
                Verdict::Enough
            } else {
                Verdict::Short { retention }
            }
        }
    }
}

/// Why the processor refuses to start.
#[derive(Debug, thiserror::Error)]
#[error(
    "the events topic {topic} keeps records for {retention}, shorter than the {needed} the processor \
     needs (max session duration + session gap + allowed lateness + window + max out-of-orderness): \
     records still needed by open sessions or windows could be deleted. Raise the topic's retention.ms \
     to at least {needed_ms} (e.g. kafka-configs.sh --alter --entity-type topics --entity-name {topic} \
     --add-config retention.ms={needed_ms}), shorten those settings, or start with \
     --allow-short-retention (PULSE_PROCESSOR_ALLOW_SHORT_RETENTION=true) to accept the risk",
    retention = humantime::format_duration(*.retention),
    needed = humantime::format_duration(*.needed),
    needed_ms = .needed.as_millis()
)]
pub struct ShortRetention {
    pub topic: String,
    pub retention: Duration,
    pub needed: Duration,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn configs(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn a_retention_shorter_than_needed_is_short_and_a_longer_one_is_enough() {
        assert_eq!(
            judge(&configs(&[("retention.ms", "3600000")]), DAY),
            Verdict::Short {
                retention: Duration::from_secs(3_600)
            }
        );
        assert_eq!(
            judge(
                &configs(&[("cleanup.policy", "delete"), ("retention.ms", "604800000")]),
                DAY
            ),
            Verdict::Enough
        );
        assert_eq!(
            judge(&configs(&[("retention.ms", "-1")]), DAY),
            Verdict::Enough
        );
    }

    #[test]
    fn a_compacted_topic_is_not_deleted_by_time() {
        assert_eq!(
            judge(
                &configs(&[("cleanup.policy", "compact"), ("retention.ms", "1000")]),
                DAY
            ),
            Verdict::Enough
        );
        assert!(matches!(
            judge(
                &configs(&[
                    ("cleanup.policy", "compact,delete"),
                    ("retention.ms", "1000")
                ]),
                DAY
            ),
            Verdict::Short { .. }
        ));
    }

    #[test]
    fn an_unreported_retention_is_unknown() {
        assert!(matches!(judge(&configs(&[]), DAY), Verdict::Unknown(_)));
        assert!(matches!(
            judge(&configs(&[("retention.ms", "soon")]), DAY),
            Verdict::Unknown(_)
        ));
    }

    #[test]
    fn the_refusal_names_the_topic_both_durations_and_the_override() {
        let text = ShortRetention {
            topic: "pulse.events.v1".into(),
            retention: Duration::from_secs(3_600),
            needed: DAY + Duration::from_secs(60),
        }
        .to_string();
        for needle in [
            "pulse.events.v1",
            "for 1h,",
            "the 1day 1m the processor needs",
            "retention.ms=86460000",
            "--allow-short-retention",
        ] {
            assert!(text.contains(needle), "{needle} missing in {text}");
        }
    }
}
