//! An in-process schema registry for the tests that need one (`ingest.rs`, `ingest_fuzz.rs`,
//! `processor.rs`, `processor_recovery.rs`, `pulsectl_replay.rs`), and schema registration.

// Each test binary includes this file and uses a subset of it.
#![allow(dead_code)]

use std::time::Duration;

use pulse_platform::kafka::KafkaConfig;
use serde_json::json;

/// A registry replica on a free 127.0.0.1 port, keeping its schemas in a topic of its own.
pub async fn start(kafka: &KafkaConfig) -> pulse_schema_registry::Replica {
    pulse_schema_registry::Replica::start(
        kafka,
        &pulse_tests::unique("_schemas"),
        Duration::from_secs(30),
        Duration::from_secs(60),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap()
}

/// POSTs the protobuf `schema` as a new version of subject `<topic>-value` at `url`.
pub async fn register(url: &str, topic: &str, schema: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{url}/subjects/{topic}-value/versions"))
        .json(&json!({ "schemaType": "PROTOBUF", "schema": schema }))
        .send()
        .await
        .unwrap()
}

/// Registers the aggregates schema for each of `topics`, asserting each answer is 200.
pub async fn register_aggregates(registry: &pulse_schema_registry::Replica, topics: &[&str]) {
    let url = format!("http://{}", registry.addr);
    for topic in topics {
        let r = register(&url, topic, pulse_contracts::schemas::AGGREGATES.source).await;
        assert_eq!(r.status(), 200);
    }
}
