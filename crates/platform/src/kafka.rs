//! Kafka clients for every service: the shared connection config, a producer with
//! two-phase send (enqueue now, broker acknowledgement later), a consumer that commits
//! only what the caller marked durable, a reader of a topic to its end (tools and start-up
//! checks, no group), and topic bootstrap (the broker does not auto-create topics).

pub mod config;
pub mod consumer;
pub mod producer;
pub mod reader;
pub mod topics;

pub use config::KafkaConfig;
pub use consumer::{KafkaConsumer, RebalanceEvent};
pub use producer::{AckFuture, Acked, KafkaProducer, OutRecord, ProduceError, RecordProducer};
pub use reader::{Start, TopicReader, TopicRecord};
pub use topics::{TopicKind, TopicSettings, TopicSpec, ensure_topics};
