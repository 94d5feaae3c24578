//! Kafka clients for every service: the shared connection config, a producer with
//! two-phase send (enqueue now, broker acknowledgement later), a consumer that commits
//! only what the caller marked durable, a reader of a topic to its end (tools and start-up
//! checks, no group), and topic bootstrap (the broker does not auto-create topics).

pub mod config;
pub mod consumer;
mod preflight;
pub mod producer;
pub mod reader;
pub mod topics;

pub use config::KafkaConfig;
pub use consumer::{KafkaConsumer, RebalanceEvent};
pub use preflight::Refused;
pub use producer::{AckFuture, Acked, KafkaProducer, OutRecord, ProduceError, RecordProducer};
pub use reader::{Start, TopicReader, TopicRecord};
pub use topics::{TopicKind, TopicSettings, TopicSpec, ensure_topics};

/// A librdkafka log line, to tracing at its level (rdkafka's default context sends them to
/// the `log` crate, which Pulse's subscriber does not receive): the consumer's and the
/// producer's contexts log through it, so a failed TLS handshake or SASL authentication is
/// in the service's log as it happens. (Not the topic admin client: rdkafka 0.39 queues
/// librdkafka's log lines and errors on a client's main queue, and its `AdminClient` never
/// polls that queue — serving it would need FFI, which this workspace forbids. The
/// connection check beside each admin operation, [`preflight`], polls its own client's
/// queue instead: its lines come through here, and a refused SASL authentication or TLS
/// handshake fails the admin operation at once.)
pub(crate) fn log_to_tracing(level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
    use rdkafka::config::RDKafkaLogLevel as L;
    match level {
        L::Emerg | L::Alert | L::Critical | L::Error => {
            tracing::error!(facility = fac, "librdkafka: {message}")
        }
        L::Warning => tracing::warn!(facility = fac, "librdkafka: {message}"),
        L::Notice | L::Info => tracing::info!(facility = fac, "librdkafka: {message}"),
        L::Debug => tracing::debug!(facility = fac, "librdkafka: {message}"),
    }
}
