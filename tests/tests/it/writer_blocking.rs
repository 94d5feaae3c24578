//! The writer when its store refuses every write for a reason that is not about the data,
//! with the real `pulse-writer` binary against the real broker, ClickHouse 18.16 and
//! s3s-fs:
//!
//! - ClickHouse: the events table is dropped under a running writer (code 60, unknown
//!   table). The writer dead-letters nothing, commits nothing it did not write, answers
//!   `/readyz` 503 with the reason and exports `pulse_writer_blocked`; once the migrations
//!   are run again it writes every event exactly once and is ready again on its own.
//! - S3: the Parquet writer's credentials are refused. It is blocked the same way, a
//!   SIGTERM still stops it within its shutdown timeout without committing the roll S3
//!   never took, and its successor with the right credentials archives every event.
//! - A SIGTERM while ClickHouse is down stops the ClickHouse writer within its shutdown
//!   timeout, and the buffered batch it could not write stays uncommitted.
//!
//! The writer process, its topics and offsets are `support::writer_process`.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use futures::TryStreamExt;
use object_store::ObjectStore as _;
use prost::Message as _;
use pulse_contracts::pb::events::v1 as ev;
use pulse_contracts::{headers, wire};
use pulse_platform::kafka::{KafkaProducer, OutRecord};
use rdkafka::message::OwnedHeaders;
use tokio::time::Instant;

use crate::support::child_process::free_port;
use crate::support::cleanup::{self, TempDir};
use crate::support::forwarder::{Forwarder, address_of};
use crate::support::writer_process::{WriterProcess, WriterTopics, committed_offsets, end_offsets};
use crate::support::{Deadline, events, wait_until};

const DEADLINE: Duration = Duration::from_secs(60);
/// `--shutdown-timeout-ms` of every writer here.
const SHUTDOWN_TIMEOUT_MS: &str = "2000";
/// How long a writer may take to exit after SIGTERM (its shutdown timeout plus slack).
const STOP_WITHIN: Duration = Duration::from_secs(20);

/// Starts the writer with fast retries, a 2 s shutdown timeout and `args`.
fn spawn(args: &[String], log: PathBuf) -> WriterProcess {
    let mut all: Vec<String> = ["--retry-base-ms", "100", "--retry-max-ms", "500"]
        .map(String::from)
        .to_vec();
    all.extend_from_slice(args);
    // As an environment variable, so a writer that lacks the setting still starts.
    WriterProcess::spawn(
        &all,
        &[("PULSE_WRITER_SHUTDOWN_TIMEOUT_MS", SHUTDOWN_TIMEOUT_MS)],
        log,
    )
}

fn event(id: &str, user: &str) -> ev::Event {
    let t = 1_764_000_000_000;
    events::event(id, user, t)
        .page("/p")
        .ingested(t + 100, "writer-blocking-test")
        .build()
}

/// Produces the events `ids` (framed as the processor writes them, keyed by user) and
/// waits for the broker's acknowledgements.
async fn produce(topic: &str, ids: &[String]) {
    let p = KafkaProducer::new(&pulse_tests::kafka(), "writer-blocking-test").unwrap();
    for id in ids {
        let user = format!("u-{id}");
        let h = headers::with_str(OwnedHeaders::new(), headers::INGEST_TS, "1764000000100");
        let rec = OutRecord::new(
            topic,
            Some(user.clone().into_bytes()),
            wire::frame(1, &[0], &event(id, &user).encode_to_vec()),
        )
        .with_headers(h);
        p.send(rec, Duration::from_secs(10)).await.unwrap();
    }
}

/// The group's committed offsets on `topic`, summed over the partitions (0 where none).
fn committed(group: &str, topic: &str) -> i64 {
    committed_offsets(group, topic).iter().sum()
}

/// Records in `topic` (the sum of its partitions' end offsets).
fn records_in(topic: &str) -> i64 {
    end_offsets(topic).iter().sum()
}

/// Waits until the group's committed offsets on `topic` sum to `want`.
async fn wait_committed(group: &str, topic: &str, want: i64) {
    let what = format!("the committed offsets of {topic} to sum up to {want}");
    wait_until(
        Deadline::after(DEADLINE).every(Duration::from_millis(200)),
        what,
        async || {
            let c = committed(group, topic);
            if c == want { Ok(()) } else { Err(c) }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_events_table_blocks_the_writer_without_dead_lettering_until_it_is_back() {
    let logs = TempDir::new("writer-blocking-ch");
    let topics = WriterTopics::create("blk").await;
    let ch = cleanup::Database::unique("pulse_writer_blocking");
    let client = ch.client();
    let group = pulse_tests::unique("writer");
    let args: Vec<String> = [
        "--sink",
        "clickhouse",
        "--clickhouse-url",
        &ch.url,
        "--clickhouse-database",
        &ch.database,
        "--group-id",
        &group,
        "--batch-max-age-ms",
        "200",
        "--breaker-probe-ms",
        "2000",
        // The shortest librdkafka allows (>= the 10 s session timeout): the block below
        // outlasts it, and a writer that stopped polling would leave its group.
        "--kafka-option",
        "max.poll.interval.ms=10000",
    ]
    .map(String::from)
    .into_iter()
    .chain(topics.flags())
    .collect();
    let log = logs.path().join("writer.log");
    let mut writer = spawn(&args, log.clone());
    writer.wait_readyz(200, "ready").await;

    // Working: the first event is written and committed.
    produce(&topics.events, &["e0".to_owned()]).await;
    wait_committed(&group, &topics.events, 1).await;

    // The table goes away under the running writer; five valid events follow.
    client
        .query(&format!("DROP TABLE {}.events", ch.database))
        .execute()
        .await
        .unwrap();
    let ids: Vec<String> = (1..=5).map(|i| format!("e{i}")).collect();
    produce(&topics.events, &ids).await;

    let body = writer
        .wait_readyz(503, "blocked: clickhouse: unknown_table")
        .await;
    let blocked_at = Instant::now();
    eprintln!("/readyz while the table is missing: {body}");
    assert!(body.contains("Code: 60"), "{body}");
    let blocked = writer
        .wait_metric(
            "pulse_writer_blocked",
            &["sink=\"clickhouse\"", "reason=\"unknown_table\""],
            1.0,
        )
        .await;
    assert_eq!(blocked, 1.0);
    // Several retries of the same batch (a writer that dead-letters does so at the first).
    let retries = writer
        .wait_metric(
            "pulse_writer_retries_total",
            &["sink=\"clickhouse\"", "kind=\"blocking\""],
            3.0,
        )
        .await;
    assert_eq!(
        records_in(&topics.dlq),
        0,
        "a batch refused for a missing table was dead-lettered"
    );
    assert_eq!(
        writer
            .metric("pulse_writer_dead_letters_total", &["sink=\"clickhouse\""])
            .await,
        // Registered at zero at start-up (writer::metrics::init); it must not have moved.
        Some(0.0),
        "the writer counted dead letters"
    );
    assert_eq!(
        committed(&group, &topics.events),
        1,
        "offsets of unwritten records were committed"
    );

    // Blocked for longer than max.poll.interval.ms: still blocked, still in the group.
    while blocked_at.elapsed() < Duration::from_secs(13) {
        let got = writer.get("/readyz").await;
        assert!(
            got.as_ref().is_some_and(|(s, _)| *s == 503),
            "/readyz answered {got:?} while the table was missing"
        );
        writer.assert_running();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(records_in(&topics.dlq), 0);
    assert_eq!(committed(&group, &topics.events), 1);

    // The operator runs the migrations again: the table is back and the writer resumes on
    // its own, without a restart.
    client
        .query(&format!("DROP TABLE {}.schema_migrations", ch.database))
        .execute()
        .await
        .unwrap();
    let applied = pulse_storage::migrate::migrate(&ch).await.unwrap();
    assert!(!applied.is_empty());
    let want: BTreeSet<String> = ids.iter().cloned().collect();
    wait_until(
        Deadline::after(DEADLINE).every(Duration::from_millis(200)),
        format!("events FINAL to hold {want:?}; see {}", log.display()),
        async || {
            writer.assert_running();
            let stored: BTreeSet<String> = client
                .query("SELECT DISTINCT event_id FROM events FINAL")
                .fetch_all::<String>()
                .await
                .unwrap_or_default()
                .into_iter()
                .collect();
            if stored == want { Ok(()) } else { Err(stored) }
        },
    )
    .await;
    let once: u64 = client
        .query("SELECT count() FROM events FINAL")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(once, 5, "each event once under FINAL");
    wait_committed(&group, &topics.events, 6).await;
    writer.wait_readyz(200, "ready").await;
    assert_eq!(
        writer
            .metric("pulse_writer_blocked", &["sink=\"clickhouse\""])
            .await,
        Some(0.0),
        "a reason is still reported"
    );
    assert_eq!(records_in(&topics.dlq), 0, "something was dead-lettered");
    let revoked = writer
        .metric("pulse_kafka_rebalances_total", &["kind=\"revoke\""])
        .await
        .unwrap_or(0.0);
    assert_eq!(
        revoked,
        0.0,
        "the writer lost its partitions during the block (left its group); see {}",
        log.display()
    );
    eprintln!(
        "blocked for {retries} retries with nothing dead-lettered or committed; the 5 events \
         written once after the migrations ran again"
    );

    drop(writer);
    drop(ch);
    drop(logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_s3_credentials_block_the_parquet_writer_and_sigterm_still_stops_it_in_time() {
    let logs = TempDir::new("writer-blocking-s3");
    let topics = WriterTopics::create("blk").await;
    let s3 = pulse_tests::s3();
    let prefix = pulse_tests::short_unique("blk");
    let group = pulse_tests::unique("writer_pq");
    let access_file = pulse_tests::secret_file("s3-access-key", s3.access_key.expose());
    let args = |endpoint: &str, secret: &str, max_age_ms: &str| -> Vec<String> {
        let secret_file = pulse_tests::secret_file("s3-secret-key", secret);
        [
            "--sink",
            "parquet",
            "--group-id",
            &group,
            "--events-topic",
            &topics.events,
            "--dlq-topic",
            &topics.dlq,
            "--parquet-max-age-ms",
            max_age_ms,
            "--parquet-freshness",
            "false",
            "--s3-endpoint",
            endpoint,
            "--s3-bucket",
            &s3.bucket,
            "--s3-access-key-file",
            &access_file,
            "--s3-secret-key-file",
            &secret_file,
            "--s3-prefix",
            &prefix,
        ]
        .map(String::from)
        .to_vec()
    };
    let ids: Vec<String> = (0..5).map(|i| format!("e{i}")).collect();
    produce(&topics.events, &ids).await;

    // S3 refuses the credentials from the start: the writer is blocked before it consumes
    // (its start-up check lists the prefix), and SIGTERM stops it.
    let log = logs.path().join("writer-1.log");
    let mut writer = spawn(&args(&s3.endpoint, "not-the-secret", "200"), log.clone());
    let body = writer.wait_readyz(503, "blocked: parquet: ").await;
    eprintln!("/readyz while S3 refuses the credentials: {body}");
    writer
        .wait_metric(
            "pulse_writer_startup_retries_total",
            &["sink=\"parquet\"", "reason=\"refused\""],
            3.0,
        )
        .await;
    assert_eq!(committed(&group, &topics.events), 0);
    assert_eq!(records_in(&topics.dlq), 0);
    assert!(writer.terminate(STOP_WITHIN).await.is_some());

    // A roll that is not due yet when SIGTERM comes, and S3 gone meanwhile (a forwarder
    // the writer started through, then cut): the roll is written at shutdown, fails, and
    // the writer gives up after its shutdown timeout, committing nothing.
    let port = free_port();
    let forwarder = Forwarder::start(port, address_of(&s3.endpoint).await).await;
    let via = format!("http://127.0.0.1:{port}");
    let log = logs.path().join("writer-2.log");
    let mut writer = spawn(&args(&via, s3.secret_key.expose(), "600000"), log.clone());
    writer
        .wait_metric(
            "pulse_kafka_consumed_records_total",
            &[&format!("topic=\"{}\"", topics.events)],
            ids.len() as f64,
        )
        .await;
    drop(forwarder);
    let began = Instant::now();
    let status = writer.terminate(STOP_WITHIN).await;
    assert!(
        status.is_some(),
        "the writer ignored SIGTERM for {STOP_WITHIN:?} while S3 was gone for its last roll; see {}",
        log.display()
    );
    eprintln!(
        "stopped {:.1} s after SIGTERM ({status:?}) with S3 gone for its last roll",
        began.elapsed().as_secs_f64()
    );
    assert_eq!(
        committed(&group, &topics.events),
        0,
        "the roll S3 never took was committed"
    );

    // The successor with the right credentials archives every event and commits.
    let log = logs.path().join("writer-3.log");
    let mut writer = spawn(&args(&s3.endpoint, s3.secret_key.expose(), "200"), log);
    wait_committed(&group, &topics.events, 5).await;
    writer.wait_readyz(200, "ready").await;
    let objects: Vec<object_store::ObjectMeta> = s3
        .object_store()
        .unwrap()
        .list(Some(&object_store::path::Path::from(prefix.as_str())))
        .try_collect()
        .await
        .unwrap();
    assert!(!objects.is_empty(), "nothing archived under {prefix}");
    let rows = writer
        .metric("pulse_writer_rows_written_total", &["sink=\"parquet\""])
        .await;
    assert_eq!(rows, Some(5.0), "{objects:?}");
    assert_eq!(records_in(&topics.dlq), 0);
    drop(writer);
    drop(logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_clickhouse_outage_stops_the_writer_in_time_without_committing() {
    let logs = TempDir::new("writer-blocking-down");
    let topics = WriterTopics::create("blk").await;
    let group = pulse_tests::unique("writer");
    // The writer starts through a forwarder to ClickHouse (its start-up check passes), which
    // is then cut: nothing listens there, every insert fails with a connection error.
    let port = free_port();
    let forwarder = Forwarder::start(port, address_of(&pulse_tests::clickhouse().url).await).await;
    let down = format!("http://127.0.0.1:{port}");
    let args: Vec<String> = [
        "--sink",
        "clickhouse",
        "--clickhouse-url",
        &down,
        "--migrate",
        "false",
        "--retention-days",
        "0",
        "--group-id",
        &group,
        // Not due before SIGTERM: the batch is written by the shutdown's final flush.
        "--batch-max-age-ms",
        "600000",
    ]
    .map(String::from)
    .into_iter()
    .chain(topics.flags())
    .collect();
    let ids: Vec<String> = (0..5).map(|i| format!("e{i}")).collect();
    produce(&topics.events, &ids).await;
    let log = logs.path().join("writer.log");
    let mut writer = spawn(&args, log.clone());
    writer
        .wait_metric(
            "pulse_kafka_consumed_records_total",
            &[&format!("topic=\"{}\"", topics.events)],
            ids.len() as f64,
        )
        .await;
    drop(forwarder);
    let began = Instant::now();
    let status = writer.terminate(STOP_WITHIN).await;
    assert!(
        status.is_some(),
        "the writer ignored SIGTERM for {STOP_WITHIN:?} while ClickHouse was down; see {}",
        log.display()
    );
    eprintln!(
        "stopped {:.1} s after SIGTERM ({status:?}) with ClickHouse down",
        began.elapsed().as_secs_f64()
    );
    assert_eq!(
        committed(&group, &topics.events),
        0,
        "offsets of a batch ClickHouse never took were committed"
    );
    assert_eq!(records_in(&topics.dlq), 0);
    drop(logs);
}
