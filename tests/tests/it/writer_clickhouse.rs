//! The ClickHouse sink against the real broker and ClickHouse 18.16: rows land once
//! (duplicates and re-deliveries collapse under the documented read pattern), aggregates
//! keep the highest version, and offsets are committed only after the insert.

use std::time::Duration;

use clap::Parser;
use prost::Message as _;
use pulse_contracts::pb::aggregates::v1::UserWindowActivity;
use pulse_contracts::pb::events::v1 as ev;
use pulse_contracts::{headers, wire};
use pulse_platform::kafka::{KafkaProducer, OutRecord, TopicSpec};
use rdkafka::message::OwnedHeaders;
use tokio_util::sync::CancellationToken;

use crate::support::{Deadline, cleanup, events, wait_until};

struct Setup {
    cfg: pulse_writer::Config,
    events: String,
    activity: String,
    _topics: cleanup::Topics,
    _database: cleanup::Database,
}

async fn setup() -> Setup {
    let kafka = pulse_tests::kafka();
    let ch = pulse_tests::clickhouse();
    let events = pulse_tests::unique("events");
    let activity = pulse_tests::unique("activity");
    let sessions = pulse_tests::unique("sessions");
    let dlq = pulse_tests::unique("dlq");
    let topics = cleanup::Topics::create(
        &[&events, &activity, &sessions, &dlq]
            .iter()
            .map(|t| TopicSpec::new(t.as_str(), 2))
            .collect::<Vec<_>>(),
    )
    .await;
    let database = cleanup::Database::unique("pulse_writer");
    let db = database.database.clone();
    let cfg = pulse_writer::Config::parse_from([
        "pulse-writer",
        "--kafka-brokers",
        &kafka.brokers,
        "--clickhouse-url",
        &ch.url,
        "--clickhouse-database",
        &db,
        "--group-id",
        &pulse_tests::unique("writer"),
        "--batch-max-age-ms",
        "200",
        "--events-topic",
        &events,
        "--user-activity-topic",
        &activity,
        "--sessions-topic",
        &sessions,
        "--dlq-topic",
        &dlq,
    ]);
    Setup {
        cfg,
        events,
        activity,
        _topics: topics,
        _database: database,
    }
}

fn event(id: &str, user: &str) -> ev::Event {
    events::event(id, user, 1_764_000_000_000)
        .page("/p")
        .ingested(1_764_000_000_500, "t")
        .build()
}

async fn produce(topic: &str, key: &str, bytes: Vec<u8>) {
    let p = KafkaProducer::new(&pulse_tests::kafka(), "writer-test").unwrap();
    let h = headers::with_str(OwnedHeaders::new(), headers::INGEST_TS, "1764000000500");
    p.send(
        OutRecord::new(
            topic,
            Some(key.as_bytes().to_vec()),
            wire::frame(1, &[0], &bytes),
        )
        .with_headers(h),
        Duration::from_secs(5),
    )
    .await
    .unwrap();
}

async fn count(client: &clickhouse::Client, sql: &str) -> u64 {
    client.query(sql).fetch_one::<u64>().await.unwrap()
}

#[tokio::test]
async fn events_land_once_and_windows_keep_their_highest_version() {
    let s = setup().await;
    let sink = pulse_writer::build_clickhouse(&s.cfg).await.unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(sink.run(stop.clone()));

    for i in 0..20 {
        produce(
            &s.events,
            &format!("u{}", i % 3),
            event(&format!("e{i}"), &format!("u{}", i % 3)).encode_to_vec(),
        )
        .await;
    }
    // Re-deliveries of the same events (e.g. a retried produce or a replay).
    for i in 0..5 {
        produce(
            &s.events,
            &format!("u{}", i % 3),
            event(&format!("e{i}"), &format!("u{}", i % 3)).encode_to_vec(),
        )
        .await;
    }
    let window = |version: u64, views: u64, fin: bool| UserWindowActivity {
        user_id: "u1".into(),
        window_start_ms: 1_764_000_000_000,
        window_end_ms: 1_764_000_060_000,
        page_views: views,
        event_count: views,
        version,
        r#final: fin,
        ..Default::default()
    };
    produce(&s.activity, "u1|w", window(3, 2, false).encode_to_vec()).await;
    produce(&s.activity, "u1|w", window(5, 4, true).encode_to_vec()).await;

    let client = s.cfg.clickhouse.client();
    // Rows may already be merged, so wait on what the read pattern answers.
    wait_until(
        Deadline::after(Duration::from_secs(60)).every(Duration::from_millis(200)),
        "20 distinct events and window version 5 in ClickHouse",
        async || {
            let raw = client
                .query("SELECT uniqExact(event_id) FROM events")
                .fetch_one::<u64>()
                .await
                .unwrap_or(0);
            let top = client
                .query("SELECT max(version) FROM user_activity")
                .fetch_one::<u64>()
                .await
                .unwrap_or(0);
            if raw >= 20 && top >= 5 {
                Ok(())
            } else {
                Err(format!(
                    "{raw} distinct events, highest window version {top}"
                ))
            }
        },
    )
    .await;
    assert_eq!(
        count(&client, "SELECT count() FROM events FINAL").await,
        20,
        "each event once under FINAL"
    );
    assert_eq!(
        count(&client, "SELECT uniqExact(event_id) FROM events").await,
        20
    );
    let views: u64 = client
        .query("SELECT argMax(page_views, version) FROM user_activity WHERE user_id = 'u1'")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(views, 4, "the highest version wins");
    let fresh = count(
        &client,
        "SELECT count() FROM freshness FINAL WHERE stage = 'writer-clickhouse'",
    )
    .await;
    assert!(fresh >= 1, "freshness rows are written");

    stop.cancel();
    task.await.unwrap().unwrap();
}
