//! The Kafka producer: idempotent, `acks=all`, with a two-phase send. `enqueue` returns
//! at once — an error if the record cannot be queued (a full local queue is
//! [`ProduceError::QueueFull`], i.e. backpressure, never a silent drop) — and otherwise an
//! [`AckFuture`] that resolves when the broker acknowledged the record or it finally failed.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};

use crate::kafka::KafkaConfig;
use crate::metrics as m;

/// One record to produce.
#[derive(Debug, Clone)]
pub struct OutRecord {
    pub topic: String,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub headers: OwnedHeaders,
    /// A fixed partition; `None` lets the partitioner hash the key.
    pub partition: Option<i32>,
}

impl OutRecord {
    pub fn new(topic: impl Into<String>, key: Option<Vec<u8>>, payload: Vec<u8>) -> Self {
        Self {
            topic: topic.into(),
            key,
            payload,
            headers: OwnedHeaders::new(),
            partition: None,
        }
    }

    pub fn with_headers(mut self, headers: OwnedHeaders) -> Self {
        self.headers = headers;
        self
    }
}

/// Where the broker stored an acknowledged record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    pub partition: i32,
    pub offset: i64,
}

/// Why a record was not produced.
#[derive(Debug, thiserror::Error)]
pub enum ProduceError {
    /// The local queue is full: slow down and retry (backpressure).
    #[error(
        "producer queue is full (backpressure); retry after in-flight records are acknowledged"
    )]
    QueueFull,
    /// The record could not be queued for a reason a retry will not fix (e.g. too large).
    #[error("record rejected before sending: {0}")]
    Enqueue(KafkaError),
    /// The broker did not acknowledge the record within the message timeout.
    #[error("broker did not acknowledge the record: {0}")]
    Delivery(KafkaError),
    /// The producer was dropped before the acknowledgement arrived.
    #[error("producer shut down before the acknowledgement arrived")]
    Cancelled,
}

impl ProduceError {
    /// Whether the same record may succeed if sent again.
    pub fn is_retryable(&self) -> bool {
        match self {
            ProduceError::QueueFull | ProduceError::Cancelled => true,
            ProduceError::Delivery(e) => !matches!(
                e.rdkafka_error_code(),
                Some(RDKafkaErrorCode::MessageSizeTooLarge | RDKafkaErrorCode::InvalidRecord)
            ),
            ProduceError::Enqueue(_) => false,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ProduceError::QueueFull => "queue_full",
            ProduceError::Enqueue(_) => "enqueue",
            ProduceError::Delivery(_) => "delivery",
            ProduceError::Cancelled => "cancelled",
        }
    }
}

/// The broker acknowledgement of one enqueued record.
pub type AckFuture = Pin<Box<dyn Future<Output = Result<Acked, ProduceError>> + Send>>;

/// What service logic needs from a producer; a broker-free fake implements it in tests.
pub trait RecordProducer: Send + Sync {
    /// Queues `record`; errors at once if it cannot be queued.
    fn enqueue(&self, record: OutRecord) -> Result<AckFuture, ProduceError>;
}

/// Queues `record` on any [`RecordProducer`], retrying while its local queue is full (1 ms
/// doubling to 50 ms) for at most `max_backpressure_wait`; then returns the last result, so
/// a queue still full is [`ProduceError::QueueFull`].
pub async fn enqueue_with_wait(
    producer: &(impl RecordProducer + ?Sized),
    record: OutRecord,
    max_backpressure_wait: Duration,
) -> Result<AckFuture, ProduceError> {
    let deadline = Instant::now() + max_backpressure_wait;
    let mut pause = Duration::from_millis(1);
    loop {
        match producer.enqueue(record.clone()) {
            Err(ProduceError::QueueFull) if Instant::now() < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            other => return other,
        }
    }
}

/// The librdkafka-backed producer.
#[derive(Clone)]
pub struct KafkaProducer {
    inner: FutureProducer,
}

impl std::fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaProducer").finish_non_exhaustive()
    }
}

impl KafkaProducer {
    /// An idempotent, acks=all producer.
    pub fn new(cfg: &KafkaConfig, client_id: &str) -> Result<Self, KafkaError> {
        let mut c = cfg.client_config(client_id);
        c.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", cfg.linger_ms.to_string())
            .set(
                "queue.buffering.max.messages",
                cfg.queue_max_messages.to_string(),
            )
            .set("message.timeout.ms", cfg.message_timeout_ms.to_string())
            .set("compression.type", &cfg.compression);
        // Extra options win over our defaults.
        cfg.apply_options(&mut c);
        Ok(Self { inner: c.create()? })
    }

    /// Queues `record`, waiting while the local queue is full for at most
    /// `max_backpressure_wait`, then returns the acknowledgement future.
    pub async fn enqueue_with_wait(
        &self,
        record: OutRecord,
        max_backpressure_wait: Duration,
    ) -> Result<AckFuture, ProduceError> {
        enqueue_with_wait(self, record, max_backpressure_wait).await
    }

    /// Enqueues and waits for the acknowledgement.
    pub async fn send(
        &self,
        record: OutRecord,
        max_backpressure_wait: Duration,
    ) -> Result<Acked, ProduceError> {
        self.enqueue_with_wait(record, max_backpressure_wait)
            .await?
            .await
    }

    /// Waits until every queued record was acknowledged or failed, up to `timeout`.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner.flush(timeout)
    }

    /// Records queued locally and not yet acknowledged.
    pub fn in_flight(&self) -> i32 {
        self.inner.in_flight_count()
    }
}

impl RecordProducer for KafkaProducer {
    fn enqueue(&self, record: OutRecord) -> Result<AckFuture, ProduceError> {
        let topic = record.topic.clone();
        let mut fr = FutureRecord::<Vec<u8>, Vec<u8>>::to(&record.topic)
            .payload(&record.payload)
            .headers(record.headers.clone());
        if let Some(k) = &record.key {
            fr = fr.key(k);
        }
        if let Some(p) = record.partition {
            fr = fr.partition(p);
        }
        let started = Instant::now();
        match self.inner.send_result(fr) {
            Ok(delivery) => Ok(delivery
                .map(move |r| {
                    let result = match r {
                        Ok(Ok(d)) => Ok(Acked {
                            partition: d.partition,
                            offset: d.offset,
                        }),
                        Ok(Err((e, _msg))) => Err(ProduceError::Delivery(e)),
                        Err(_canceled) => Err(ProduceError::Cancelled),
                    };
                    match &result {
                        Ok(_) => {
                            metrics::counter!(m::KAFKA_PRODUCED_TOTAL, "topic" => topic.clone()).increment(1);
                            metrics::histogram!(m::KAFKA_PRODUCE_ACK_SECONDS, "topic" => topic)
                                .record(started.elapsed().as_secs_f64());
                        }
                        Err(e) => {
                            metrics::counter!(m::KAFKA_PRODUCE_ERRORS_TOTAL, "topic" => topic, "kind" => e.kind())
                                .increment(1);
                        }
                    }
                    result
                })
                .boxed()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                metrics::counter!(m::KAFKA_PRODUCE_BACKPRESSURE_TOTAL, "topic" => topic).increment(1);
                Err(ProduceError::QueueFull)
            }
            Err((e, _)) => {
                metrics::counter!(m::KAFKA_PRODUCE_ERRORS_TOTAL, "topic" => topic, "kind" => "enqueue").increment(1);
                Err(ProduceError::Enqueue(e))
            }
        }
    }
}
