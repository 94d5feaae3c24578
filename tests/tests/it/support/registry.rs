//! An in-process schema registry for the tests that need one (`ingest`, `ingest_fuzz`,
//! `processor`, `processor_recovery`, `pulsectl_replay`), and schema registration.

use std::ops::Deref;
use std::time::Duration;

use pulse_platform::kafka::KafkaConfig;
use pulse_schema_registry::Replica;
use serde_json::json;

use super::cleanup;

/// A registry replica (which the struct derefs to) and its schemas topic, deleted when
/// dropped.
pub struct Registry {
    replica: Replica,
    _topic: cleanup::Topics,
}

impl Deref for Registry {
    type Target = Replica;

    fn deref(&self) -> &Replica {
        &self.replica
    }
}

impl Registry {
    /// Stops the replica and waits for it.
    pub async fn stop(self) -> Result<(), pulse_schema_registry::Error> {
        self.replica.stop().await
    }
}

/// A registry replica on a free 127.0.0.1 port, keeping its schemas in a topic of its own.
pub async fn start(kafka: &KafkaConfig) -> Registry {
    let topic = pulse_tests::unique("_schemas");
    let replica = Replica::start(
        kafka,
        &topic,
        Duration::from_secs(30),
        Duration::from_secs(60),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await
    .unwrap();
    Registry {
        replica,
        _topic: cleanup::Topics::adopt([topic]),
    }
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
pub async fn register_aggregates(registry: &Replica, topics: &[&str]) {
    let url = format!("http://{}", registry.addr);
    for topic in topics {
        let r = register(&url, topic, pulse_contracts::schemas::AGGREGATES.source).await;
        assert_eq!(r.status(), 200);
    }
}
