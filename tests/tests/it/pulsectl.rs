//! `pulsectl` against the real broker and ClickHouse: loadgen's summary matches what is on
//! the topics (accepted records on the events topic, rejected ones on the DLQ, nothing for
//! duplicates) over HTTP and gRPC; `dlq inspect` returns the rejected records with their
//! codes; `dlq redrive` re-submits JSON records and skips protobuf ones; `migrate` applies
//! the schema once.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use pulse_contracts::headers;
use pulse_ingest::pipeline::{FixedSchemaId, Framer};
use pulsectl::dlq::{self, Redriven, TopicArgs};
use pulsectl::loadgen::expect::Settings;
use pulsectl::loadgen::{LoadgenArgs, Report, RunOptions, run_load};
use rdkafka::Message;
use rdkafka::message::{Headers, OwnedMessage};
use tokio_util::sync::CancellationToken;

const MALFORMED_CODES: [&str; 4] = [
    "missing_field",
    "invalid_amount",
    "invalid_currency",
    "invalid_event_type",
];

use crate::support::cleanup;
use crate::support::ingest_server::{self, read_exactly};

struct Ingest {
    http: String,
    grpc: String,
    events_topic: String,
    dlq_topic: String,
    _servers: pulse_ingest::Servers,
    _topics: cleanup::Topics,
}

/// An in-process ingest on 127.0.0.1:0 against the real broker, with its own topics (the
/// pattern of the `ingest` tests, framing with a fixed schema id instead of a registry).
async fn start_ingest() -> Ingest {
    let kafka = pulse_tests::kafka();
    let events_topic = pulse_tests::unique("events");
    let dlq_topic = pulse_tests::unique("dlq");
    let topics = ingest_server::create_topics(&events_topic, &dlq_topic, 2).await;
    let cfg = ingest_server::config(
        &kafka,
        "test-key=loadgen",
        "test-hmac",
        &events_topic,
        &dlq_topic,
        &[],
    );
    let framer: Arc<dyn Framer> = Arc::new(FixedSchemaId(1));
    let servers = ingest_server::serve(&kafka, &cfg, framer, "pulsectl-test").await;
    Ingest {
        http: format!("http://{}", servers.http_addr),
        grpc: format!("http://{}", servers.grpc_addr),
        events_topic,
        dlq_topic,
        _servers: servers,
        _topics: topics,
    }
}

fn loadgen_args(extra: &[&str]) -> LoadgenArgs {
    let mut argv = vec!["pulsectl", "loadgen", "--api-key", "test-key"];
    argv.extend_from_slice(extra);
    match pulsectl::Cli::parse_from(argv).command {
        pulsectl::Command::Loadgen(args) => *args,
        other => panic!("parsed as {other:?}"),
    }
}

fn topic_args(topic: &str) -> TopicArgs {
    TopicArgs {
        topic: topic.to_owned(),
        read_timeout: Duration::from_secs(30),
        kafka: pulse_tests::kafka(),
    }
}

fn event_id(m: &OwnedMessage) -> String {
    m.headers()
        .and_then(|h| h.iter().find(|x| x.key == headers::EVENT_ID))
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap()
}

/// The summary's counts equal what is on the topics; returns the DLQ records as
/// `dlq inspect` reads them.
async fn assert_counts_match_the_topics(ingest: &Ingest, report: &Report) -> Vec<dlq::Record> {
    let s = &report.summary;
    assert_eq!((s.failed, s.unsent), (0, 0), "{s}\n{:?}", report.errors);
    assert_eq!(s.sent, s.generated, "every generated event was answered");
    assert_eq!(s.sent, s.accepted + s.duplicates + s.rejected);
    assert!(
        s.accepted > 0 && s.duplicates > 0 && s.rejected > 0,
        "every kind of answer occurs: {s}"
    );
    let x = report.expected(Settings {
        window_ms: 60_000,
        session_gap_ms: 1_800_000,
    });
    assert!(!x.late_event_ids.is_empty(), "late events were sent: {s}");
    assert_eq!(x.accepted_event_ids.len() as u64, s.accepted);
    assert_eq!(x.duplicates, s.duplicates);

    // Accepted events are on the events topic once each; duplicates produced nothing.
    let records = read_exactly(&ingest.events_topic, s.accepted as usize).await;
    let on_topic: BTreeSet<String> = records.iter().map(event_id).collect();
    assert_eq!(on_topic.len(), records.len(), "no event id twice");
    let accepted: BTreeSet<String> = x.accepted_event_ids.iter().cloned().collect();
    assert_eq!(on_topic, accepted);

    // Rejected events are on the DLQ with the code ingest answered.
    read_exactly(&ingest.dlq_topic, s.rejected as usize).await;
    let dlq = dlq::inspect(&topic_args(&ingest.dlq_topic), None, None)
        .await
        .unwrap();
    let on_dlq: BTreeMap<String, String> = dlq
        .iter()
        .map(|r| (r.event_id.clone().unwrap(), r.code.clone().unwrap()))
        .collect();
    let rejected: BTreeMap<String, String> = x
        .rejected
        .iter()
        .map(|r| (r.event_id.clone(), r.reason_code.clone()))
        .collect();
    assert_eq!(dlq.len() as u64, s.rejected);
    assert_eq!(on_dlq, rejected);
    assert!(
        on_dlq
            .values()
            .all(|c| MALFORMED_CODES.contains(&c.as_str())),
        "{on_dlq:?}"
    );
    dlq
}

#[tokio::test]
async fn loadgen_over_http_matches_the_topics_and_dlq_inspect_and_redrive_see_the_rejects() {
    let ingest = start_ingest().await;
    let args = loadgen_args(&[
        "--target",
        &ingest.http,
        "--rate",
        "40",
        "--duration",
        "4s",
        "--users",
        "20",
        "--batch-size",
        "10",
        "--concurrency",
        "2",
        "--seed",
        "4242",
        "--out-of-order",
        "0.1",
        "--late",
        "0.05",
        "--late-warmup-ms",
        "500",
        "--duplicates",
        "0.1",
        "--malformed",
        "0.1",
    ]);
    let report = run_load(
        &args,
        CancellationToken::new(),
        RunOptions {
            progress: false,
            keep_answers: true,
        },
    )
    .await
    .unwrap();
    let dlq = assert_counts_match_the_topics(&ingest, &report).await;

    // inspect: filtered by code and limited.
    let code = dlq[0].code.clone().unwrap();
    let some = dlq::inspect(&topic_args(&ingest.dlq_topic), Some(&code), Some(1))
        .await
        .unwrap();
    assert_eq!(some.len(), 1);
    assert_eq!(some[0].code.as_deref(), Some(code.as_str()));
    assert!(
        some[0].payload.starts_with(b"{"),
        "the original JSON bytes are kept"
    );

    // redrive: the same bytes are rejected again for the same reason (and land on the DLQ
    // again); a position that does not exist is reported.
    let positions: Vec<(i32, i64)> = dlq
        .iter()
        .filter(|r| r.code.as_deref() == Some(code.as_str()))
        .map(|r| (r.partition, r.offset))
        .collect();
    let mut offsets = positions.clone();
    offsets.push((0, 1_000_000));
    let redriven = dlq::redrive(&dlq::RedriveArgs {
        offsets,
        code: None,
        target: ingest.http.clone(),
        api_key: "test-key".into(),
        topic: topic_args(&ingest.dlq_topic),
    })
    .await
    .unwrap();
    assert_eq!(redriven.len(), positions.len() + 1);
    for (pos, r) in &redriven {
        match r {
            Redriven::Answered(a) => {
                assert!(positions.contains(pos));
                assert_eq!(a.status, "rejected");
                assert_eq!(a.code.as_deref(), Some(code.as_str()));
            }
            Redriven::NotFound => assert_eq!(*pos, (0, 1_000_000)),
            Redriven::Skipped(why) => panic!("{pos:?} skipped: {why}"),
        }
    }
    // The redriven events are still invalid and claim the same ids within the dedup window:
    // ingest answers each `rejected` again without a second DLQ record (a rejected event is
    // dead-lettered once per id; README, Dedup).
    let after = dlq::inspect(&topic_args(&ingest.dlq_topic), None, None)
        .await
        .unwrap();
    assert_eq!(after.len(), dlq.len());
}

#[tokio::test]
async fn loadgen_over_grpc_matches_the_topics_and_redrive_skips_protobuf_records() {
    let ingest = start_ingest().await;
    let args = loadgen_args(&[
        "--grpc",
        &ingest.grpc,
        "--rate",
        "40",
        "--duration",
        "3s",
        "--users",
        "10",
        "--batch-size",
        "8",
        "--seed",
        "77",
        "--late",
        "0.1",
        "--late-warmup-ms",
        "0",
        "--duplicates",
        "0.1",
        "--malformed",
        "0.1",
    ]);
    let report = run_load(
        &args,
        CancellationToken::new(),
        RunOptions {
            progress: false,
            keep_answers: true,
        },
    )
    .await
    .unwrap();
    let dlq = assert_counts_match_the_topics(&ingest, &report).await;
    let redriven = dlq::redrive(&dlq::RedriveArgs {
        offsets: Vec::new(),
        code: dlq[0].code.clone(),
        target: ingest.http.clone(),
        api_key: "test-key".into(),
        topic: topic_args(&ingest.dlq_topic),
    })
    .await
    .unwrap();
    assert!(!redriven.is_empty());
    assert!(
        redriven
            .iter()
            .all(|(_, r)| matches!(r, Redriven::Skipped(_))),
        "gRPC records are protobuf: {redriven:?}"
    );
}

#[tokio::test]
async fn migrate_applies_the_schema_once() {
    let ch = cleanup::Database::unique("pulsectl");
    let first = pulsectl::migrate::apply(&ch).await.unwrap();
    assert!(!first.is_empty());
    assert_eq!(
        first,
        pulse_storage::migrate::MIGRATIONS
            .iter()
            .map(|(v, _, _)| *v)
            .collect::<Vec<_>>()
    );
    assert!(pulsectl::migrate::apply(&ch).await.unwrap().is_empty());
}
