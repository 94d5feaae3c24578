//! Topic durability on the real broker (#15 defect 9): the processor binary refuses to
//! start when its events topic keeps records for less than the longest span an open window
//! or session holds, naming the topic, the retention and the minimum, and saying how to
//! override; with a long enough retention, or with `--allow-short-retention`, it starts and
//! becomes ready. `pulsectl topics create` reports existing topics that differ from the
//! settings and fails unless `--allow-drift`; a run that created topics or was stopped is
//! in the audit trail, a run that found everything in place is not.

use std::process::Stdio;
use std::time::Duration;

use pulse_platform::audit::{Outcome, action};
use pulse_platform::kafka::{KafkaConfig, TopicKind, TopicSettings, TopicSpec, ensure_topics};

use crate::audit::audit_json;

use crate::support::child_process::{binary, free_port};
use crate::support::{Deadline, cleanup, registry, wait_until};

/// Long enough for the binary to start, describe the topic and exit (or become ready).
const WAIT: Duration = Duration::from_secs(60);

/// The processor's default span: 24 h max session + 30 min gap + 1 min lateness + 1 min
/// window + 5 s out-of-orderness.
const NEEDED: &str = "1day 32m 5s";

struct Names {
    events: String,
    activity: String,
    sessions: String,
    late: String,
    checkpoints: String,
}

impl Names {
    fn new(tag: &str) -> Self {
        Self {
            events: pulse_tests::unique(&format!("retention_{tag}_events")),
            activity: pulse_tests::unique(&format!("retention_{tag}_activity")),
            sessions: pulse_tests::unique(&format!("retention_{tag}_sessions")),
            late: pulse_tests::unique(&format!("retention_{tag}_late")),
            checkpoints: pulse_tests::unique(&format!("retention_{tag}_checkpoints")),
        }
    }

    /// Creates the events topic with `retention` (one replica: the test broker is a single
    /// one); the processor creates the rest. All are deleted with the guard.
    async fn create_events(&self, retention: Duration) -> cleanup::Topics {
        let kafka = KafkaConfig {
            topics: TopicSettings {
                events_retention: retention,
                ..TopicSettings::single_broker()
            },
            ..pulse_tests::kafka()
        };
        ensure_topics(&kafka, &[TopicSpec::of(TopicKind::Events, &self.events, 1)])
            .await
            .unwrap();
        cleanup::Topics::adopt([
            &self.events,
            &self.activity,
            &self.sessions,
            &self.late,
            &self.checkpoints,
        ])
    }
}

/// The processor binary on `names`, with `extra` flags; output captured.
fn processor(
    names: &Names,
    registry_url: &str,
    admin_port: u16,
    extra: &[&str],
) -> tokio::process::Child {
    tokio::process::Command::new(binary("pulse-processor"))
        .args([
            "--events-topic",
            &names.events,
            "--user-activity-topic",
            &names.activity,
            "--sessions-topic",
            &names.sessions,
            "--late-topic",
            &names.late,
            "--checkpoint-topic",
            &names.checkpoints,
            "--group-id",
            &pulse_tests::unique("retention"),
            "--schema-registry-url",
            registry_url,
            "--admin-addr",
            &format!("127.0.0.1:{admin_port}"),
            "--kafka-partitions",
            "1",
            "--kafka-replication-factor",
            "1",
            "--kafka-min-insync-replicas",
            "1",
        ])
        .args(extra)
        .env("PULSE_KAFKA_BROKERS", pulse_tests::kafka().brokers)
        .env("PULSE_LOG_FORMAT", "text")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Waits until `/readyz` of the processor on `admin_port` answers 200, failing if the
/// process exits first.
async fn wait_ready(child: &mut tokio::process::Child, admin_port: u16) {
    let url = format!("http://127.0.0.1:{admin_port}/readyz");
    wait_until(
        Deadline::after(WAIT),
        "the processor to be ready",
        async || {
            if let Some(status) = child.try_wait().unwrap() {
                panic!("the processor exited with {status} before it was ready");
            }
            match reqwest::get(&url).await {
                Ok(r) if r.status() == 200 => Ok(()),
                Ok(r) => Err(r.status().to_string()),
                Err(e) => Err(e.to_string()),
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_processor_refuses_an_events_topic_that_keeps_records_for_less_than_a_session() {
    let names = Names::new("short");
    let _topics = names.create_events(Duration::from_secs(3_600)).await;
    // No registry is needed: the check comes before anything else.
    let child = processor(&names, "http://127.0.0.1:9", free_port(), &[]);
    let out = tokio::time::timeout(WAIT, child.wait_with_output())
        .await
        .expect("the processor did not exit")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "it exited with success:\n{text}");
    for needle in [
        names.events.as_str(),
        "keeps records for 1h,",
        &format!("shorter than the {NEEDED} the processor needs"),
        "retention.ms=88325000",
        "--allow-short-retention",
    ] {
        assert!(text.contains(needle), "{needle:?} missing in:\n{text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_processor_starts_on_an_events_topic_that_keeps_records_long_enough() {
    let names = Names::new("long");
    let _topics = names.create_events(Duration::from_secs(7 * 86_400)).await;
    let kafka = pulse_tests::kafka();
    let registry = registry::start(&kafka).await;
    registry::register_aggregates(&registry, &[&names.activity, &names.sessions]).await;
    let admin = free_port();
    let mut child = processor(&names, &format!("http://{}", registry.addr), admin, &[]);
    wait_ready(&mut child, admin).await;
    child.kill().await.unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn allow_short_retention_starts_the_processor_anyway() {
    let names = Names::new("allowed");
    let _topics = names.create_events(Duration::from_secs(3_600)).await;
    let kafka = pulse_tests::kafka();
    let registry = registry::start(&kafka).await;
    registry::register_aggregates(&registry, &[&names.activity, &names.sessions]).await;
    let admin = free_port();
    let mut child = processor(
        &names,
        &format!("http://{}", registry.addr),
        admin,
        &["--allow-short-retention"],
    );
    wait_ready(&mut child, admin).await;
    child.kill().await.unwrap();
}

/// `pulsectl topics <kafka flags> create <create flags>` on the test broker with one
/// replica (a single broker) and `kafka` added to the Kafka flags; its audit records go to
/// `audit_topic`.
async fn topics_create(
    audit_topic: &str,
    kafka: &[&str],
    create: &[&str],
) -> (bool, String, String) {
    let out = tokio::process::Command::new(binary("pulsectl"))
        .args(["--audit-topic", audit_topic, "--actor", "topics-test"])
        .args([
            "topics",
            "--kafka-replication-factor",
            "1",
            "--kafka-min-insync-replicas",
            "1",
        ])
        .args(kafka)
        .arg("create")
        .args(create)
        .env("PULSE_KAFKA_BROKERS", pulse_tests::kafka().brokers)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The contract's fixed topic names: the same ones the chart run of scripts/test.sh
/// creates, with the same settings (one replica, default retention, 3 partitions).
#[tokio::test(flavor = "multi_thread")]
async fn topics_create_reports_existing_topics_that_differ_and_fails_unless_allowed() {
    let (audit_topic, _audit_guard, _) = crate::audit::new_audit_topic("audit-topics").await;
    let (ok, out, err) = topics_create(&audit_topic, &[], &["--allow-drift"]).await;
    assert!(ok, "{out}{err}");
    // Audited when it created something (the contract's names may exist already when
    // another test made them first): one `ok` record naming exactly what was created.
    let created: Vec<&str> = out
        .lines()
        .filter(|l| l.ends_with(" created"))
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    let records = audit_json(&audit_topic, &["--action", action::TOPICS_CREATE]).await;
    if created.is_empty() {
        assert!(
            records.is_empty(),
            "nothing created, nothing to audit: {records:?}"
        );
    } else {
        assert_eq!(records.len(), 1, "{records:?}");
        let r = &records[0];
        assert_eq!(
            (r.outcome, r.actor.as_str()),
            (Outcome::Ok, "topics-test"),
            "{r:?}"
        );
        assert_eq!(r.target, pulse_tests::kafka().brokers, "{r:?}");
        assert_eq!(r.detail, format!("created {}", created.join(", ")), "{r:?}");
    }
    let (ok, out, err) = topics_create(&audit_topic, &[], &[]).await;
    assert!(ok, "the same settings again must match:\n{out}{err}");
    assert!(!out.contains("differs"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("pulse.events.v1 ") && l.ends_with("exists")),
        "{out}"
    );

    let (ok, out, err) =
        topics_create(&audit_topic, &["--kafka-events-retention", "2d"], &[]).await;
    assert!(
        !ok,
        "a topic that differs must fail the command:\n{out}{err}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("pulse.events.v1 ") && l.ends_with("differs")),
        "{out}"
    );
    assert!(
        out.contains("    retention.ms is 604800000, want 172800000"),
        "{out}"
    );
    assert!(
        err.contains("1 existing topic(s) differ") && err.contains("--allow-drift"),
        "{err}"
    );

    let (ok, out, err) = topics_create(
        &audit_topic,
        &["--kafka-events-retention", "2d"],
        &["--allow-drift"],
    )
    .await;
    assert!(ok, "--allow-drift only reports:\n{out}{err}");
    assert!(
        out.contains("retention.ms is 604800000, want 172800000"),
        "{out}"
    );
    assert!(err.contains("warning"), "{err}");

    // The run in place and the one allowed to drift changed nothing: not audited; the one
    // the drift check stopped is, as refused, with the reason.
    let records = audit_json(&audit_topic, &["--action", action::TOPICS_CREATE]).await;
    let refused: Vec<_> = records
        .iter()
        .filter(|r| r.outcome == Outcome::Refused)
        .collect();
    assert_eq!(
        records.len(),
        usize::from(!created.is_empty()) + 1,
        "{records:?}"
    );
    assert_eq!(refused.len(), 1, "{records:?}");
    assert!(
        refused[0].detail.contains("1 existing topic(s) differ"),
        "{:?}",
        refused[0]
    );
}
