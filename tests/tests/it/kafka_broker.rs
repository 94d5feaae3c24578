//! The Kafka wrappers against the real broker (Tansu, started by scripts/test.sh):
//! idempotent produce with headers, a consumer group that resumes from its committed
//! offset, and the consumer-lag gauges a real `pulse-writer` exports in its `/metrics`
//! (what KEDA scales on): exactly the backlog while the writer is paused by a ClickHouse
//! outage (its circuit open), 0 once the store is back and the backlog is written.

use std::time::Duration;

use pulse_contracts::{headers, trace_context, wire};
use pulse_platform::kafka::{
    KafkaConsumer, KafkaProducer, OutRecord, RecordProducer, TopicSpec, ensure_topics,
};
use rdkafka::Message;
use rdkafka::message::{Headers, OwnedHeaders};

use crate::support::child_process::free_port;
use crate::support::cleanup::{self, TempDir};
use crate::support::forwarder::{Forwarder, address_of};
use crate::support::writer_process::{WriterProcess, WriterTopics};
use crate::support::{events, wait_until};

async fn recv(consumer: &KafkaConsumer) -> rdkafka::message::OwnedMessage {
    tokio::time::timeout(Duration::from_secs(60), consumer.recv())
        .await
        .expect("a record within 60 s")
        .expect("no consumer error")
        .detach()
}

#[tokio::test]
async fn idempotent_produce_keeps_headers_and_order() {
    let cfg = pulse_tests::kafka();
    let topic = pulse_tests::unique("produce");
    let _topics = cleanup::Topics::adopt([&topic]);
    let created = ensure_topics(&cfg, &[TopicSpec::new(&topic, 1)])
        .await
        .unwrap();
    assert_eq!(created, vec![topic.clone()]);
    // A second bootstrap is a no-op, not an error.
    assert!(
        ensure_topics(&cfg, &[TopicSpec::new(&topic, 1)])
            .await
            .unwrap()
            .is_empty()
    );

    let producer = KafkaProducer::new(&cfg, "pulse-test").unwrap();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut offsets = Vec::new();
    for i in 0..20 {
        let h = headers::with_str(OwnedHeaders::new(), headers::TRACEPARENT, traceparent);
        let h = headers::with_str(h, headers::EVENT_ID, &format!("evt-{i}"));
        let h = headers::with_str(h, headers::INGEST_TS, "1764000000000");
        let rec = OutRecord::new(
            &topic,
            Some(b"user-1".to_vec()),
            format!("v{i}").into_bytes(),
        )
        .with_headers(h);
        offsets.push(producer.enqueue(rec).unwrap());
    }
    let mut acked = Vec::new();
    for a in offsets {
        acked.push(a.await.unwrap().offset);
    }
    assert_eq!(
        acked,
        (0..20).collect::<Vec<i64>>(),
        "acknowledged in order, once each"
    );

    let (consumer, _) =
        KafkaConsumer::new(&cfg, "pulse-test", &pulse_tests::unique("g"), &[&topic]).unwrap();
    for i in 0..20 {
        let m = recv(&consumer).await;
        assert_eq!(m.offset(), i);
        assert_eq!(m.payload().unwrap(), format!("v{i}").as_bytes());
        assert_eq!(m.key().unwrap(), b"user-1");
        let h = m.headers().unwrap();
        let evt = h.iter().find(|h| h.key == headers::EVENT_ID).unwrap();
        assert_eq!(evt.value.unwrap(), format!("evt-{i}").as_bytes());
        let cx = trace_context::extract(Some(h));
        assert_eq!(
            trace_context::trace_id_hex(&cx).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }
}

#[tokio::test]
async fn consumer_group_resumes_from_its_committed_offset() {
    let cfg = pulse_tests::kafka();
    let topic = pulse_tests::unique("resume");
    let group = pulse_tests::unique("group");
    let _topics = cleanup::Topics::create(&[TopicSpec::new(&topic, 1)]).await;
    let producer = KafkaProducer::new(&cfg, "pulse-test").unwrap();
    for i in 0..10 {
        producer
            .send(
                OutRecord::new(&topic, None, format!("r{i}").into_bytes()),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    }

    {
        let (consumer, _) = KafkaConsumer::new(&cfg, "pulse-test", &group, &[&topic]).unwrap();
        for i in 0..10 {
            assert_eq!(recv(&consumer).await.offset(), i);
        }
        // Only records 0..=6 became durable.
        consumer.mark_durable(&topic, 0, 6).unwrap();
        consumer.commit_now().unwrap();
        let committed = consumer.committed(Duration::from_secs(10)).unwrap();
        let off = committed.find_partition(&topic, 0).unwrap().offset();
        assert_eq!(off, rdkafka::Offset::Offset(7));
    }

    let (consumer, _) = KafkaConsumer::new(&cfg, "pulse-test", &group, &[&topic]).unwrap();
    let m = recv(&consumer).await;
    assert_eq!(m.offset(), 7, "resumes after the last durable record");
    assert_eq!(m.payload().unwrap(), b"r7");
}

/// Processing lag: what KEDA scales on (the chart's ScaledObject query).
const PROCESSING_LAG: &str = "pulse_kafka_consumer_processing_lag_records";
/// Committed-offset lag.
const COMMITTED_LAG: &str = "pulse_kafka_consumer_lag_records";
const CIRCUIT_OPEN: &str = "pulse_writer_circuit_open";

/// Queues one valid event per id on `topic` (framed as the processor writes them, keyed by
/// user, so they spread over the partitions) and waits for every acknowledgement.
async fn produce_events(producer: &KafkaProducer, topic: &str, ids: impl Iterator<Item = String>) {
    let t = 1_764_000_000_000;
    let mut acks = Vec::new();
    for id in ids {
        let user = format!("u-{id}");
        let event = events::event(&id, &user, t)
            .page("/lag")
            .ingested(t + 100, "kafka-lag-test")
            .build();
        let h = headers::with_str(OwnedHeaders::new(), headers::INGEST_TS, "1764000000100");
        let rec = OutRecord::new(
            topic,
            Some(user.into_bytes()),
            wire::frame(1, &[0], &prost::Message::encode_to_vec(&event)),
        )
        .with_headers(h);
        acks.push(producer.enqueue(rec).unwrap());
    }
    for a in acks {
        a.await.unwrap();
    }
}

/// The writer's `metric` summed over `topic`'s partitions, waited for until `ok` holds.
async fn wait_lag(
    writer: &mut WriterProcess,
    metric: &str,
    topic: &str,
    what: &str,
    ok: impl Fn(f64) -> bool,
) -> f64 {
    let label = format!("topic=\"{topic}\"");
    wait_until(
        Duration::from_secs(20),
        format!("{metric}{{{label}}} {what}"),
        async || {
            writer.assert_running();
            let v = writer.metric(metric, &[&label]).await;
            v.filter(|v| ok(*v)).ok_or(v)
        },
    )
    .await
}

/// The lag gauges of a real consumer against the real broker: a `pulse-writer` whose
/// ClickHouse is cut (through a forwarder) pauses consumption and opens its circuit; the
/// records produced meanwhile are exactly its processing lag in `/metrics` (refreshed from
/// the broker although nothing is fetched), next to `pulse_writer_circuit_open 1` (the two
/// inputs of the chart's KEDA gate in one scrape). With ClickHouse back, the backlog is
/// written and both lags fall to 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_writer_exports_the_backlog_as_lag_and_zero_once_written() {
    const BACKLOG: usize = 300;
    let logs = TempDir::new("kafka-lag");
    let log = logs.path().join("writer.log");
    let topics = WriterTopics::create("lag").await;
    let group = pulse_tests::unique("lag");
    // Its own database, created and migrated by the writer at start.
    let ch = cleanup::Database::unique("pulse_kafka_lag");
    let target = address_of(&ch.url).await;
    let port = free_port();
    let forwarder = Forwarder::start(port, target).await;
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
        "100",
        "--retry-base-ms",
        "100",
        "--retry-max-ms",
        "300",
        "--breaker-failures",
        "2",
        "--breaker-probe-ms",
        "500",
        "--kafka-commit-interval-ms",
        "300",
        "--kafka-statistics-interval-ms",
        "300",
    ]
    .map(String::from)
    .into_iter()
    .chain(topics.flags())
    .collect();
    let mut writer = WriterProcess::spawn(&args, &[], log.clone());
    // Assigned and measured: every partition of the (empty) events topic at 0.
    wait_lag(&mut writer, PROCESSING_LAG, &topics.events, "== 0", |v| {
        v == 0.0
    })
    .await;

    // ClickHouse unreachable; one event makes the writer try, fail, pause and open its
    // circuit (it keeps that event in memory: read, so not part of the processing lag).
    drop(forwarder);
    let producer = KafkaProducer::new(&pulse_tests::kafka(), "kafka-lag-test").unwrap();
    produce_events(
        &producer,
        &topics.events,
        std::iter::once("first".to_owned()),
    )
    .await;
    writer
        .wait_metric(CIRCUIT_OPEN, &["sink=\"clickhouse\""], 1.0)
        .await;

    // The backlog, produced while the writer is paused: its processing lag is exactly the
    // backlog, its committed lag the backlog plus the unwritten first event.
    produce_events(
        &producer,
        &topics.events,
        (0..BACKLOG).map(|i| format!("b{i}")),
    )
    .await;
    let n = BACKLOG as f64;
    wait_lag(
        &mut writer,
        PROCESSING_LAG,
        &topics.events,
        &format!("== {n}"),
        |v| v == n,
    )
    .await;
    wait_lag(
        &mut writer,
        COMMITTED_LAG,
        &topics.events,
        &format!("== {n} + 1"),
        |v| v == n + 1.0,
    )
    .await;
    let text = writer.metrics().await.unwrap();
    assert_eq!(
        crate::support::metric_sum(&text, CIRCUIT_OPEN, &["sink=\"clickhouse\""]),
        Some(1.0),
        "the circuit closed while ClickHouse was still unreachable; see {}",
        log.display()
    );
    assert_eq!(
        crate::support::metric_sum(
            &text,
            PROCESSING_LAG,
            &[&format!("topic=\"{}\"", topics.events)]
        ),
        Some(n),
        "the lag stayed at the backlog while paused"
    );

    // ClickHouse back on the same address: the probe succeeds, the writer resumes and
    // writes everything; both lags fall to 0 and the circuit closes.
    let _forwarder = Forwarder::start(port, target).await;
    wait_lag(&mut writer, PROCESSING_LAG, &topics.events, "== 0", |v| {
        v == 0.0
    })
    .await;
    wait_lag(&mut writer, COMMITTED_LAG, &topics.events, "== 0", |v| {
        v == 0.0
    })
    .await;
    assert_eq!(
        writer.metric(CIRCUIT_OPEN, &["sink=\"clickhouse\""]).await,
        Some(0.0)
    );
    let written = writer
        .metric(
            "pulse_writer_rows_written_total",
            &["sink=\"clickhouse\"", "table=\"events\""],
        )
        .await;
    assert_eq!(
        written,
        Some(n + 1.0),
        "every event written once; see {}",
        log.display()
    );
    drop(writer);
    drop(logs);
}

/// Sends `signal` (`-STOP`, `-CONT`) to `pid`.
fn signal(pid: u32, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill {signal} {pid}: {status}");
}

/// Closing a consumer group member is bounded. librdkafka's close runs the last rebalance
/// and waits for the group coordinator: in the 1,000,000-user memory run of 2026-12-07,
/// after the overloaded local broker was restarted three times, a processor whose loop had
/// ended hung in that close (gdb: `BaseConsumer::drop` → rebalance → `assignment()`), up,
/// live and silent for 7 minutes. That hang was not reproduced here; a broker paused with
/// SIGSTOP (connections accepted, nothing answered) makes a plain drop take ~5 s, so this
/// checks that `close_within` gives up at its bound (1 s) while such a close goes on, and
/// that against a broker that answers it closes.
#[tokio::test]
async fn closing_a_consumer_is_bounded_when_its_broker_stops_answering() {
    use crate::kafka_tls::Tansu;
    use pulse_platform::kafka::{KafkaConfig, TopicSettings};

    let dir = crate::support::tls::work_dir("close-hung");
    let port = free_port();
    let tansu = Tansu::start(&dir, port, port, false).await;
    let cfg = KafkaConfig {
        topics: TopicSettings::single_broker(),
        ..KafkaConfig::for_brokers(format!("127.0.0.1:{port}"))
    };
    let topic = pulse_tests::unique("close");
    ensure_topics(&cfg, &[TopicSpec::new(&topic, 1)])
        .await
        .unwrap();
    let producer = KafkaProducer::new(&cfg, "pulse-test").unwrap();
    produce_events(&producer, &topic, (0..2).map(|i| format!("close-{i}"))).await;
    let member = |group: &str| {
        let (consumer, _rebalances) =
            KafkaConsumer::new(&cfg, "pulse-test", group, &[&topic]).unwrap();
        consumer
    };

    // A broker that answers: the member leaves its group and closes.
    let healthy = member(&pulse_tests::unique("close-ok"));
    recv(&healthy).await;
    let started = std::time::Instant::now();
    assert!(healthy.close_within(Duration::from_secs(30)).await);
    let healthy_close = started.elapsed();

    // A broker that stopped answering: the close gives up at its bound.
    let member2 = member(&pulse_tests::unique("close-hung"));
    recv(&member2).await;
    signal(tansu.pid(), "-STOP");
    let started = std::time::Instant::now();
    let closed = member2.close_within(Duration::from_secs(1)).await;
    let hung_close = started.elapsed();
    signal(tansu.pid(), "-CONT");
    assert!(
        !closed,
        "the close finished against a paused broker in {hung_close:?}: the test paused nothing"
    );
    assert!(
        hung_close < Duration::from_secs(3),
        "close_within(1 s) took {hung_close:?}"
    );
    eprintln!(
        "closed in {healthy_close:?} against a broker that answers; gave up after {hung_close:?} against a paused one"
    );
    drop(producer);
    drop(tansu);
    let _ = std::fs::remove_dir_all(&dir);
}
