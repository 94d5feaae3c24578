//! The writer when its store is down at start, with the real `pulse-writer` binary against
//! the real broker, ClickHouse 18.16 and s3s-fs. The store's address is a port of a TCP
//! forwarder this test starts only later (nothing listens there before):
//!
//! - ClickHouse: the writer stays alive (`/livez` 200), answers `/readyz` 503 with
//!   "clickhouse unreachable: …", counts its attempts in
//!   `pulse_writer_startup_retries_total` and owns no partition; once the forwarder runs it
//!   applies the migrations, becomes ready and stores the events produced before and after.
//! - S3: the Parquet writer likewise ("s3 unreachable"), then archives and commits; and
//!   the same while its bucket is missing ("s3 bucket missing") until the bucket is made.
//! - Kafka: a writer whose broker is unreachable at start waits likewise ("blocked:
//!   kafka: unreachable …", `reason="kafka_unreachable"`), exits 0 on SIGTERM meanwhile,
//!   and once the broker answers it checks its topics, becomes ready and archives.
//! - A ClickHouse URL that can never work ends the process at once with an error naming
//!   the setting.
//! - A migration ClickHouse refuses is retried, named by `/readyz` and audited once as
//!   `failed`; mended, the migrations are applied and audited as `ok`.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use prost::Message as _;
use pulse_contracts::pb::events::v1 as ev;
use pulse_contracts::{headers, wire};
use pulse_platform::kafka::{KafkaProducer, OutRecord};
use rdkafka::message::OwnedHeaders;
use tokio::time::Instant;

use crate::support::child_process::{binary, free_port};
use crate::support::cleanup::{self, TempDir};
use crate::support::forwarder::{Forwarder, address_of};
use crate::support::writer_process::{WriterProcess, WriterTopics, committed_offsets};
use crate::support::{Deadline, poll_until, wait_until};

const DEADLINE: Duration = Duration::from_secs(60);
/// How long the writer must stay up and not ready while its store is unreachable.
const DOWN_FOR: Duration = Duration::from_secs(4);

fn event(id: &str, user: &str) -> ev::Event {
    let t = 1_764_000_000_000;
    crate::support::events::event(id, user, t)
        .page("/p")
        .ingested(t + 100, "writer-startup-test")
        .build()
}

/// Produces the events `ids` (framed as the processor writes them, keyed by user) and
/// waits for the broker's acknowledgements.
async fn produce(topic: &str, ids: &[&str]) {
    let p = KafkaProducer::new(&pulse_tests::kafka(), "writer-startup-test").unwrap();
    for id in ids {
        let user = format!("u-{id}");
        let h = headers::with_str(OwnedHeaders::new(), headers::EVENT_ID, id);
        let h = headers::with_str(h, headers::INGEST_TS, "1764000000100");
        let rec = OutRecord::new(
            topic,
            Some(user.clone().into_bytes()),
            wire::frame(1, &[0], &event(id, &user).encode_to_vec()),
        )
        .with_headers(h);
        p.send(rec, Duration::from_secs(10)).await.unwrap();
    }
}

/// The writers' `migrate` records in `audit_topic`.
async fn writer_migrate_records(audit_topic: &str) -> Vec<pulse_platform::audit::AuditRecord> {
    crate::audit::audit_json(audit_topic, &["--action", "migrate"])
        .await
        .into_iter()
        .filter(|r| r.service == "writer")
        .collect()
}

/// Waits until [`writer_migrate_records`] finds at least one, and returns them.
async fn wait_migrate_records(
    audit_topic: &str,
    what: &str,
) -> Vec<pulse_platform::audit::AuditRecord> {
    wait_until(DEADLINE, what, async || {
        let records = writer_migrate_records(audit_topic).await;
        if records.is_empty() {
            Err("none yet")
        } else {
            Ok(records)
        }
    })
    .await
}

/// Starts the writer with fast retries, a 2 s attempt deadline and `args`.
fn spawn(args: &[String], log: PathBuf) -> WriterProcess {
    let mut all: Vec<String> = [
        "--retry-base-ms",
        "100",
        "--retry-max-ms",
        "500",
        "--insert-timeout-ms",
        "2000",
    ]
    .map(String::from)
    .to_vec();
    all.extend_from_slice(args);
    WriterProcess::spawn(&all, &[], log)
}

/// Waits until the writer (still running) committed both produced events of `topic`: a
/// roll or insert is committed only after its store confirmed it.
async fn wait_both_committed(writer: &mut WriterProcess, group: &str, topic: &str) {
    wait_until(
        Deadline::after(DEADLINE).every(Duration::from_millis(200)),
        "both events archived and committed",
        async || {
            writer.assert_running();
            let c: i64 = committed_offsets(group, topic).iter().sum();
            if c == 2 { Ok(()) } else { Err(c) }
        },
    )
    .await;
}

/// For [`DOWN_FOR`], the writer keeps running, `/livez` is 200 and `/readyz` 503 naming
/// `reason`, and it owns no partition; then its start-up retries are counted under
/// `metric_reason`.
async fn assert_waits_without_consuming(
    writer: &mut WriterProcess,
    sink: &str,
    reason: &str,
    metric_reason: &str,
) {
    let body = writer.wait_readyz(503, reason).await;
    eprintln!("/readyz while the store is unreachable: {body}");
    let until = Instant::now() + DOWN_FOR;
    while Instant::now() < until {
        writer.assert_running();
        assert_eq!(writer.get("/livez").await.map(|(s, _)| s), Some(200));
        let (status, body) = writer.get("/readyz").await.unwrap();
        assert!(status == 503 && body.contains(reason), "{status} {body}");
        let assigned = writer
            .metric("pulse_kafka_assigned_partitions", &[])
            .await
            .unwrap_or(0.0);
        assert_eq!(assigned, 0.0, "the writer consumes while its store is down");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let sink_label = format!("sink=\"{sink}\"");
    let reason_label = format!("reason=\"{metric_reason}\"");
    let retries = writer
        .wait_metric(
            "pulse_writer_startup_retries_total",
            &[&sink_label, &reason_label],
            3.0,
        )
        .await;
    eprintln!("{retries} start-up attempts failed while the store was unreachable");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clickhouse_writer_started_while_clickhouse_is_down_waits_then_stores_events() {
    let logs = TempDir::new("writer-startup-ch");
    let topics = WriterTopics::create("stu").await;
    let ch = cleanup::Database::unique("pulse_writer_startup");
    let group = pulse_tests::unique("writer");
    let (audit_topic, _audit_guard, _) = crate::audit::new_audit_topic("writer-migrate").await;
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let args: Vec<String> = [
        "--sink",
        "clickhouse",
        "--clickhouse-url",
        &url,
        "--clickhouse-database",
        &ch.database,
        "--group-id",
        &group,
        "--batch-max-age-ms",
        "200",
        "--audit-topic",
        &audit_topic,
    ]
    .map(String::from)
    .into_iter()
    .chain(topics.flags())
    .collect();
    produce(&topics.events, &["before"]).await;
    let log = logs.path().join("writer.log");
    let mut writer = spawn(&args, log.clone());

    assert_waits_without_consuming(
        &mut writer,
        "clickhouse",
        "clickhouse unreachable: ",
        "unreachable",
    )
    .await;
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("WARN") && l.contains("clickhouse unreachable")),
        "no WARN line with the error in {}",
        log.display()
    );

    // ClickHouse becomes reachable: migrations, ready, and the events are stored.
    let _forwarder = Forwarder::start(port, address_of(&ch.url).await).await;
    writer.wait_readyz(200, "ready").await;
    produce(&topics.events, &["after"]).await;
    let client = ch.client();
    let stored = wait_until(DEADLINE, "both events in ClickHouse", async || {
        let ids: Vec<String> = client
            .query("SELECT DISTINCT event_id FROM events FINAL ORDER BY event_id")
            .fetch_all()
            .await
            .map_err(|e| e.to_string())?;
        if ids.len() == 2 {
            Ok(ids)
        } else {
            Err(format!("{ids:?}"))
        }
    })
    .await;
    assert_eq!(stored, ["after", "before"]);
    writer.assert_running();

    // The migrations it applied are in the audit trail, once: a restart applies none and
    // records nothing.
    let records = wait_migrate_records(&audit_topic, "the migrations' audit record").await;
    let [record] = &records[..] else {
        panic!("want one migrate record, got {records:?}")
    };
    assert_eq!(record.actor, "pulse-writer");
    assert_eq!(record.outcome, pulse_platform::audit::Outcome::Ok);
    assert_eq!(
        record.target,
        format!("{url} database {}", ch.database),
        "{record:?}"
    );
    let all: Vec<String> = pulse_storage::migrate::MIGRATIONS
        .iter()
        .map(|(v, _, _)| format!("{v:04}"))
        .collect();
    assert!(
        record.detail.ends_with(&all.join(", ")),
        "every migration of a new database in {:?}",
        record.detail
    );
    drop(writer);
    let mut again = spawn(&args, logs.path().join("writer-again.log"));
    again.wait_readyz(200, "ready").await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let records = writer_migrate_records(&audit_topic).await;
    assert_eq!(
        records.len(),
        1,
        "a start that applied nothing: {records:?}"
    );
    again.assert_running();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parquet_writer_started_while_s3_is_down_waits_then_archives() {
    let logs = TempDir::new("writer-startup-s3");
    let topics = WriterTopics::create("sts").await;
    let s3 = pulse_tests::s3();
    let group = pulse_tests::unique("writer_pq");
    let port = free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let prefix = pulse_tests::short_unique("stu");
    let args: Vec<String> = [
        "--sink",
        "parquet",
        "--group-id",
        &group,
        "--events-topic",
        &topics.events,
        "--dlq-topic",
        &topics.dlq,
        "--parquet-max-age-ms",
        "200",
        "--parquet-freshness",
        "false",
        "--s3-endpoint",
        &endpoint,
        "--s3-bucket",
        &s3.bucket,
        "--s3-access-key-file",
        &pulse_tests::secret_file("s3-access-key", s3.access_key.expose()),
        "--s3-secret-key-file",
        &pulse_tests::secret_file("s3-secret-key", s3.secret_key.expose()),
        "--s3-prefix",
        &prefix,
    ]
    .map(String::from)
    .to_vec();
    produce(&topics.events, &["p0", "p1"]).await;
    let log = logs.path().join("writer.log");
    let mut writer = spawn(&args, log.clone());

    assert_waits_without_consuming(&mut writer, "parquet", "s3 unreachable: ", "unreachable").await;
    assert_eq!(committed_offsets(&group, &topics.events), [0, 0]);

    let _forwarder = Forwarder::start(port, address_of(&s3.endpoint).await).await;
    writer.wait_readyz(200, "ready").await;
    // The roll is committed only after S3 confirmed its upload.
    wait_both_committed(&mut writer, &group, &topics.events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_started_while_the_broker_is_unreachable_waits_then_archives() {
    let logs = TempDir::new("writer-startup-kafka");
    let topics = WriterTopics::create("stk").await;
    let s3 = pulse_tests::s3();
    let group = pulse_tests::unique("writer_pq");
    // The writer bootstraps from a forwarder's port, where nothing listens until later.
    let port = free_port();
    let args = |group: &str| -> Vec<String> {
        [
            "--sink",
            "parquet",
            "--group-id",
            group,
            "--events-topic",
            &topics.events,
            "--dlq-topic",
            &topics.dlq,
            "--parquet-max-age-ms",
            "200",
            "--parquet-freshness",
            "false",
            "--s3-endpoint",
            &s3.endpoint,
            "--s3-bucket",
            &s3.bucket,
            "--s3-access-key-file",
            &pulse_tests::secret_file("s3-access-key", s3.access_key.expose()),
            "--s3-secret-key-file",
            &pulse_tests::secret_file("s3-secret-key", s3.secret_key.expose()),
            "--s3-prefix",
            &pulse_tests::short_unique("stk"),
            "--kafka-option",
            &format!("bootstrap.servers=127.0.0.1:{port}"),
        ]
        .map(String::from)
        .to_vec()
    };
    produce(&topics.events, &["k0", "k1"]).await;
    let mut writer = spawn(&args(&group), logs.path().join("writer.log"));
    // A second one, stopped while it waits: SIGTERM ends it at once and cleanly.
    let mut stopped = spawn(
        &args(&pulse_tests::unique("writer_pq")),
        logs.path().join("stopped.log"),
    );

    assert_waits_without_consuming(
        &mut writer,
        "parquet",
        "blocked: kafka: unreachable",
        "kafka_unreachable",
    )
    .await;
    assert_eq!(committed_offsets(&group, &topics.events), [0, 0]);
    let text = std::fs::read_to_string(logs.path().join("writer.log")).unwrap();
    assert!(
        text.lines()
            .any(|l| l.contains("WARN") && l.contains("kafka not usable at start")),
        "no WARN line about the broker in {}",
        logs.path().display()
    );
    stopped.wait_readyz(503, "blocked: kafka: ").await;
    let status = stopped.terminate(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM while waiting for the broker: {status:?}"
    );

    // The broker becomes reachable: topics checked, ready, and the events archived.
    let _forwarder = Forwarder::start(port, address_of(&pulse_tests::kafka().brokers).await).await;
    writer.wait_readyz(200, "ready").await;
    wait_both_committed(&mut writer, &group, &topics.events).await;
}

/// A bucket of the test's s3s-fs (a folder under its root, `$PULSE_TEST_STATE/s3`) that
/// does not exist until [`LaterBucket::create`]; removed on drop.
struct LaterBucket {
    name: String,
    dir: PathBuf,
}

impl LaterBucket {
    fn new() -> Self {
        let state = std::env::var("PULSE_TEST_STATE")
            .expect("PULSE_TEST_STATE (the stack's folder, set by scripts/test.sh)");
        // S3 bucket names: lowercase letters, digits and hyphens, at most 63.
        let name: String = pulse_tests::unique("stu-missing")
            .replace('_', "-")
            .chars()
            .take(40)
            .collect();
        let dir = PathBuf::from(state).join("s3").join(&name);
        assert!(!dir.exists(), "{} exists already", dir.display());
        Self { name, dir }
    }

    fn create(&self) {
        std::fs::create_dir_all(&self.dir).unwrap();
    }
}

impl Drop for LaterBucket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parquet_writer_whose_bucket_is_missing_waits_until_it_exists() {
    let logs = TempDir::new("writer-startup-bucket");
    let topics = WriterTopics::create("stm").await;
    let s3 = pulse_tests::s3();
    let bucket = LaterBucket::new();
    let group = pulse_tests::unique("writer_pq");
    let args: Vec<String> = [
        "--sink",
        "parquet",
        "--group-id",
        &group,
        "--events-topic",
        &topics.events,
        "--dlq-topic",
        &topics.dlq,
        "--parquet-max-age-ms",
        "200",
        "--parquet-freshness",
        "false",
        "--s3-endpoint",
        &s3.endpoint,
        "--s3-bucket",
        &bucket.name,
        "--s3-access-key-file",
        &pulse_tests::secret_file("s3-access-key", s3.access_key.expose()),
        "--s3-secret-key-file",
        &pulse_tests::secret_file("s3-secret-key", s3.secret_key.expose()),
    ]
    .map(String::from)
    .to_vec();
    produce(&topics.events, &["m0", "m1"]).await;
    let log = logs.path().join("writer.log");
    let mut writer = spawn(&args, log.clone());

    let body = writer.wait_readyz(503, "s3 bucket missing: ").await;
    eprintln!("/readyz while the bucket is missing: {body}");
    writer
        .wait_metric(
            "pulse_writer_startup_retries_total",
            &["sink=\"parquet\"", "reason=\"missing_bucket\""],
            2.0,
        )
        .await;
    let assigned = writer
        .metric("pulse_kafka_assigned_partitions", &[])
        .await
        .unwrap_or(0.0);
    assert_eq!(
        assigned, 0.0,
        "the writer consumes while its bucket is missing"
    );
    assert_eq!(committed_offsets(&group, &topics.events), [0, 0]);

    bucket.create();
    writer.wait_readyz(200, "ready").await;
    wait_both_committed(&mut writer, &group, &topics.events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clickhouse_url_that_cannot_work_ends_the_writer_with_a_clear_error() {
    let logs = TempDir::new("writer-startup-bad-url");
    let topics = WriterTopics::create("stb").await;
    let log = logs.path().join("writer.log");
    let out = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(binary("pulse-writer"))
        .args([
            "--kafka-brokers",
            &pulse_tests::kafka().brokers,
            "--admin-addr",
            &format!("127.0.0.1:{}", free_port()),
            "--log-format",
            "text",
            "--sink",
            "clickhouse",
            // Passes the http(s) check, but the port is no number.
            "--clickhouse-url",
            "http://127.0.0.1:notaport",
        ])
        .args(topics.flags())
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    let exited = poll_until(
        Deadline::after(Duration::from_secs(30)).every(Duration::from_millis(100)),
        async || child.try_wait().unwrap().ok_or(()),
    )
    .await;
    if exited.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let text = std::fs::read_to_string(&log).unwrap();
    let status = exited.unwrap_or_else(|()| panic!("the writer kept running:\n{text}"));
    assert!(!status.success(), "{status:?}");
    assert!(
        text.contains("--clickhouse-url") && text.contains("invalid port number"),
        "the error does not name the setting and the reason:\n{text}"
    );
}

/// A start-up migration ClickHouse answers and refuses (here: a `schema_migrations` table
/// of the wrong shape, as a hand edit or another tool could leave) keeps the writer alive
/// and not ready, naming the error, and is in the audit trail once as `failed` however
/// often the writer retries; once the table is mended the writer applies every migration,
/// records that, and becomes ready.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_migration_clickhouse_refuses_is_audited_once_and_applied_once_mended() {
    let logs = TempDir::new("writer-startup-refused");
    let topics = WriterTopics::create("stref").await;
    let ch = cleanup::Database::unique("pulse_writer_refused");
    let server = ch.server_client();
    let db = &ch.database;
    server
        .query(&format!("CREATE DATABASE {db}"))
        .execute()
        .await
        .unwrap();
    server
        .query(&format!(
            "CREATE TABLE {db}.schema_migrations (wrong UInt8) ENGINE = Memory"
        ))
        .execute()
        .await
        .unwrap();
    let group = pulse_tests::unique("writer");
    let (audit_topic, _audit_guard, _) = crate::audit::new_audit_topic("writer-refused").await;
    let args: Vec<String> = [
        "--sink",
        "clickhouse",
        "--clickhouse-url",
        &ch.url,
        "--clickhouse-database",
        db,
        "--group-id",
        &group,
        "--audit-topic",
        &audit_topic,
    ]
    .map(String::from)
    .into_iter()
    .chain(topics.flags())
    .collect();
    let mut writer = spawn(&args, logs.path().join("writer.log"));
    assert_waits_without_consuming(
        &mut writer,
        "clickhouse",
        "clickhouse refused the start-up queries: ",
        "refused",
    )
    .await;

    // At least three attempts failed by now (asserted above): one record.
    let records = wait_migrate_records(&audit_topic, "the refused migration's record").await;
    let [refused] = &records[..] else {
        panic!("want one record for the repeated refusal, got {records:?}")
    };
    assert_eq!(
        (refused.outcome, refused.actor.as_str()),
        (pulse_platform::audit::Outcome::Failed, "pulse-writer"),
        "{refused:?}"
    );
    assert_eq!(refused.target, format!("{} database {db}", ch.url));
    assert!(
        refused
            .detail
            .starts_with("refused at start (--migrate), retrying: clickhouse refused")
            && refused.detail.contains("schema_migrations"),
        "{refused:?}"
    );

    // Mended: the writer applies everything, records it, and is ready.
    server
        .query(&format!("DROP TABLE {db}.schema_migrations"))
        .execute()
        .await
        .unwrap();
    writer.wait_readyz(200, "ready").await;
    let records = wait_until(DEADLINE, "the applied migrations' record", async || {
        let records = writer_migrate_records(&audit_topic).await;
        if records.len() == 2 {
            Ok(records)
        } else {
            Err(format!("{records:?}"))
        }
    })
    .await;
    assert_eq!(records[1].outcome, pulse_platform::audit::Outcome::Ok);
    assert!(
        records[1]
            .detail
            .starts_with("applied at start (--migrate): 0001"),
        "{:?}",
        records[1]
    );
    writer.assert_running();
}
