//! An in-process ingest against the real broker, for the tests that post to one
//! (`ingest`, `ingest_fuzz`, `pulsectl`): its topics, flags and servers, and reading
//! what it produced.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use pulse_ingest::pipeline::Framer;
use pulse_platform::kafka::{
    KafkaConfig, KafkaProducer, TopicKind, TopicSettings, TopicSpec, ensure_topics,
};
use rdkafka::Message;
use rdkafka::message::OwnedMessage;

use super::cleanup;

/// Creates the events topic (2 partitions) and the DLQ (`dlq_partitions`) on the test
/// broker, with their kinds' retention and one replica (the test broker is a single
/// one); they are deleted when the guard is dropped.
pub async fn create_topics(events: &str, dlq: &str, dlq_partitions: i32) -> cleanup::Topics {
    let kafka = KafkaConfig {
        topics: TopicSettings::single_broker(),
        ..pulse_tests::kafka()
    };
    ensure_topics(
        &kafka,
        &[
            TopicSpec::of(TopicKind::Events, events, 2),
            TopicSpec::of(TopicKind::Dlq, dlq, dlq_partitions),
        ],
    )
    .await
    .unwrap();
    cleanup::Topics::adopt([events, dlq])
}

/// `pulse-ingest` flags for `kafka` and the topics, then `extra`, with `api_keys` and
/// `hmac_key` set as the environment would.
pub fn config(
    kafka: &KafkaConfig,
    api_keys: &str,
    hmac_key: &str,
    events: &str,
    dlq: &str,
    extra: &[&str],
) -> pulse_ingest::Config {
    let mut args: Vec<String> = [
        "pulse-ingest",
        "--kafka-brokers",
        &kafka.brokers,
        "--events-topic",
        events,
        "--dlq-topic",
        dlq,
        // The settings the chart run creates the fixed topics (pulse.audit.v1) with.
        "--kafka-replication-factor",
        "1",
        "--kafka-min-insync-replicas",
        "1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend(extra.iter().map(|s| s.to_string()));
    // The secrets as if from PULSE_INGEST_API_KEYS / PULSE_INGEST_PII_HMAC_KEY (never flags;
    // the tests run in parallel, so not through the process environment).
    pulse_ingest::Config {
        api_keys: api_keys.into(),
        pii_hmac_key: hmac_key.into(),
        ..pulse_ingest::Config::parse_from(args)
    }
}

/// Serves `cfg` on two free 127.0.0.1 ports (HTTP, gRPC), producing as `client_id`.
pub async fn serve(
    kafka: &KafkaConfig,
    cfg: &pulse_ingest::Config,
    framer: Arc<dyn Framer>,
    client_id: &str,
) -> pulse_ingest::Servers {
    let producer = Arc::new(KafkaProducer::new(kafka, client_id).unwrap());
    pulse_ingest::serve(
        cfg,
        producer,
        framer,
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap()
}

/// Exactly `n` records of `topic` (read by a consumer group of its own), and nothing more
/// within a grace period.
pub async fn read_exactly(topic: &str, n: usize) -> Vec<OwnedMessage> {
    let consumer = pulse_tests::reader("ingest-reader", "reader", topic);
    let mut out = Vec::new();
    while out.len() < n {
        let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
            .await
            .unwrap_or_else(|_| panic!("only {} of {n} records on {topic}", out.len()))
            .unwrap();
        out.push(m.detach());
    }
    if let Ok(Ok(extra)) = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await {
        panic!(
            "unexpected extra record at offset {} on {topic}",
            extra.offset()
        );
    }
    out
}
