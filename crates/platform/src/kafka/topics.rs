//! Topic bootstrap: creates the topics a service needs when they are missing (the broker
//! does not auto-create them). Existing topics are left as they are.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::kafka::KafkaConfig;

/// A topic to create: name, partitions and topic-level configs (e.g. `cleanup.policy`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub configs: Vec<(String, String)>,
}

impl TopicSpec {
    pub fn new(name: impl Into<String>, partitions: i32) -> Self {
        Self {
            name: name.into(),
            partitions,
            configs: Vec::new(),
        }
    }

    /// A log-compacted topic with one partition (e.g. `_schemas`).
    pub fn compacted(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            partitions: 1,
            configs: vec![("cleanup.policy".into(), "compact".into())],
        }
    }
}

/// Why topic bootstrap failed.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("creating the Kafka admin client: {0}")]
    Client(KafkaError),
    #[error("create topics request failed: {0}")]
    Request(KafkaError),
    #[error("topic {topic}: {code}")]
    Topic {
        topic: String,
        code: RDKafkaErrorCode,
    },
}

/// Creates every missing topic in `specs`. Returns the names it created.
pub async fn ensure_topics(
    cfg: &KafkaConfig,
    specs: &[TopicSpec],
) -> Result<Vec<String>, TopicError> {
    let admin: AdminClient<DefaultClientContext> = cfg
        .client_config("pulse-topic-bootstrap")
        .create()
        .map_err(TopicError::Client)?;
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .map(|s| {
            s.configs.iter().fold(
                NewTopic::new(
                    &s.name,
                    s.partitions,
                    TopicReplication::Fixed(cfg.replication_factor),
                ),
                |t, (k, v)| t.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = admin
        .create_topics(new_topics.iter(), &opts)
        .await
        .map_err(TopicError::Request)?;
    let mut created = Vec::new();
    for r in results {
        match r {
            Ok(name) => {
                tracing::info!(topic = %name, "topic created");
                created.push(name);
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(TopicError::Topic { topic, code }),
        }
    }
    Ok(created)
}
