//! The Kafka producer: idempotent, `acks=all`, with a two-phase send. `enqueue` returns
//! at once — an error if the record cannot be queued (a full local queue is
//! [`ProduceError::QueueFull`], i.e. backpressure, never a silent drop) — and otherwise an
//! [`AckFuture`] that resolves when the broker acknowledged the record or it finally failed.
//!
//! A producer that cannot deliver — a fatal librdkafka error (an idempotence sequence the
//! broker refuses), or deliveries failing with no acknowledgement for longer than a stall
//! timeout (a broker that accepts connections but fails every request) — reports it
//! ([`KafkaProducer::unhealthy`]) and can be replaced by a fresh client with a new producer
//! id ([`KafkaProducer::recreate`]); [`spawn_watchdog`] does both and keeps readiness
//! honest meanwhile.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use futures::FutureExt;
use rdkafka::ClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::OwnedHeaders;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use tokio_util::sync::CancellationToken;

use crate::Health;

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

    /// Queues a copy of `record` (what a retry after a full queue needs). The default
    /// clones it; the Kafka producer only borrows it, since librdkafka copies the bytes.
    fn enqueue_ref(&self, record: &OutRecord) -> Result<AckFuture, ProduceError> {
        self.enqueue(record.clone())
    }

    /// Queues `record`, handing it back with the error when it could not be queued (what
    /// a retry after a full queue needs, without copying the record first). The default
    /// queues a copy ([`enqueue_ref`](Self::enqueue_ref)); the Kafka producer moves the
    /// headers into librdkafka and gets them back only on a refusal.
    fn try_enqueue(&self, record: OutRecord) -> Result<AckFuture, Box<NotQueued>> {
        self.enqueue_ref(&record)
            .map_err(|error| Box::new(NotQueued { error, record }))
    }
}

/// A record [`RecordProducer::try_enqueue`] could not queue, and why.
#[derive(Debug)]
pub struct NotQueued {
    pub error: ProduceError,
    pub record: OutRecord,
}

/// Queues `record` on any [`RecordProducer`], retrying while its local queue is full (1 ms
/// doubling to 50 ms) for at most `max_backpressure_wait`; then returns the last result, so
/// a queue still full is [`ProduceError::QueueFull`].
pub async fn enqueue_with_wait(
    producer: &(impl RecordProducer + ?Sized),
    record: OutRecord,
    max_backpressure_wait: Duration,
) -> Result<AckFuture, ProduceError> {
    let mut record = record;
    let mut deadline: Option<Instant> = None;
    let mut pause = Duration::from_millis(1);
    loop {
        match producer.try_enqueue(record) {
            Ok(ack) => return Ok(ack),
            Err(refused) => {
                let NotQueued {
                    error,
                    record: back,
                } = *refused;
                let deadline =
                    *deadline.get_or_insert_with(|| Instant::now() + max_backpressure_wait);
                if !matches!(error, ProduceError::QueueFull) || Instant::now() >= deadline {
                    return Err(error);
                }
                record = back;
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
        }
    }
}

/// Delivery outcomes the producer's health is judged by.
#[derive(Debug, Default)]
struct Delivery {
    /// The first failed delivery since the last acknowledgement (reset when the client
    /// is recreated, so a fresh client gets a full stall timeout).
    failing_since: Option<Instant>,
    /// librdkafka's fatal error, if one was raised (the client cannot produce again).
    fatal: Option<String>,
    /// Like `failing_since`, and the newest failure, but kept across recreations: what
    /// liveness is judged by ([`liveness_failure`]).
    undelivered_since: Option<Instant>,
    last_failure: Option<Instant>,
}

impl Delivery {
    fn acknowledged(&mut self) {
        self.failing_since = None;
        self.undelivered_since = None;
    }

    fn failed(&mut self, now: Instant) {
        self.failing_since.get_or_insert(now);
        self.undelivered_since.get_or_insert(now);
        self.last_failure = Some(now);
    }
}

/// Why a producer should count as dead at `now` (liveness fails, the process is
/// restarted), if it should: its deliveries have failed with no acknowledgement since
/// the first failure `undelivered_since`, for at least `limit`, and they are still
/// failing (the newest failure is less than `limit` old; a producer that merely has had
/// nothing to send since a failure is not dead). A zero `limit` turns it off.
pub fn liveness_failure(
    undelivered_since: Option<Instant>,
    last_failure: Option<Instant>,
    now: Instant,
    limit: Duration,
) -> Option<String> {
    let (first, last) = (undelivered_since?, last_failure?);
    let undelivered = now.saturating_duration_since(first);
    let quiet = now.saturating_duration_since(last);
    (!limit.is_zero() && undelivered >= limit && quiet < limit).then(|| {
        format!(
            "kafka producer delivered nothing for {} s while every delivery failed (liveness timeout {} s)",
            undelivered.as_secs(),
            limit.as_secs()
        )
    })
}

fn lock(d: &Mutex<Delivery>) -> std::sync::MutexGuard<'_, Delivery> {
    d.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// librdkafka's client callbacks of a Pulse producer: fatal errors are remembered.
struct PulseProducerContext {
    delivery: Arc<Mutex<Delivery>>,
}

impl ClientContext for PulseProducerContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::kafka::log_to_tracing(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            tracing::error!(error = %error, reason, "kafka producer: fatal error");
            lock(&self.delivery).fatal = Some(reason.to_owned());
        } else {
            tracing::warn!(error = %error, reason, "kafka producer error");
        }
    }
}

type Client = FutureProducer<PulseProducerContext>;

/// The librdkafka-backed producer. Cheap to clone; clones share one client, which
/// [`recreate`](Self::recreate) replaces for all of them.
#[derive(Clone)]
pub struct KafkaProducer {
    shared: Arc<Shared>,
}

struct Shared {
    cfg: KafkaConfig,
    client_id: String,
    client: RwLock<Client>,
    delivery: Arc<Mutex<Delivery>>,
    recreated: AtomicU64,
    /// The acknowledgement metrics of each topic written so far (a handful: the topics
    /// of the service's configuration).
    topics: RwLock<Vec<Arc<TopicMetrics>>>,
}

/// The handles of one topic's acknowledgement metrics, resolved once per producer and
/// topic: a record's acknowledgement then updates them without building a label set and
/// looking the series up in the registry (per record, that was a topic-name copy and two
/// lookups; the recorder in place when a topic is first written is the one they count in).
struct TopicMetrics {
    topic: String,
    produced: metrics::Counter,
    ack_seconds: metrics::Histogram,
}

impl TopicMetrics {
    fn new(topic: &str) -> Self {
        Self {
            topic: topic.to_owned(),
            produced: metrics::counter!(m::KAFKA_PRODUCED_TOTAL, "topic" => topic.to_owned()),
            ack_seconds: metrics::histogram!(m::KAFKA_PRODUCE_ACK_SECONDS, "topic" => topic.to_owned()),
        }
    }
}

impl std::fmt::Debug for KafkaProducer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaProducer")
            .field("client_id", &self.shared.client_id)
            .finish_non_exhaustive()
    }
}

impl KafkaProducer {
    /// An idempotent, acks=all producer.
    pub fn new(cfg: &KafkaConfig, client_id: &str) -> Result<Self, KafkaError> {
        let delivery = Arc::new(Mutex::new(Delivery::default()));
        let client = Self::client(cfg, client_id, &delivery)?;
        Ok(Self {
            shared: Arc::new(Shared {
                cfg: cfg.clone(),
                client_id: client_id.to_owned(),
                client: RwLock::new(client),
                delivery,
                recreated: AtomicU64::new(0),
                topics: RwLock::new(Vec::new()),
            }),
        })
    }

    fn client(
        cfg: &KafkaConfig,
        client_id: &str,
        delivery: &Arc<Mutex<Delivery>>,
    ) -> Result<Client, KafkaError> {
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
        c.create_with_context(PulseProducerContext {
            delivery: Arc::clone(delivery),
        })
    }

    /// The acknowledgement metrics of `topic`.
    fn topic_metrics(&self, topic: &str) -> Arc<TopicMetrics> {
        let found = |list: &[Arc<TopicMetrics>]| list.iter().find(|t| t.topic == topic).cloned();
        let known = found(
            &self
                .shared
                .topics
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        known.unwrap_or_else(|| {
            let mut list = self
                .shared
                .topics
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            found(&list).unwrap_or_else(|| {
                let fresh = Arc::new(TopicMetrics::new(topic));
                list.push(Arc::clone(&fresh));
                fresh
            })
        })
    }

    /// Queues one record with `headers` (librdkafka takes them over); a record that could
    /// not be queued gives its headers back with the error.
    fn queue(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        payload: &[u8],
        headers: OwnedHeaders,
        partition: Option<i32>,
    ) -> Result<AckFuture, (ProduceError, OwnedHeaders)> {
        let mut fr = FutureRecord::<[u8], [u8]>::to(topic)
            .payload(payload)
            .headers(headers);
        if let Some(k) = key {
            fr = fr.key(k);
        }
        if let Some(p) = partition {
            fr = fr.partition(p);
        }
        let started = Instant::now();
        let health = Arc::clone(&self.shared.delivery);
        let (error, fr) = match self.current().send_result(fr) {
            Ok(delivery) => {
                let metrics = self.topic_metrics(topic);
                return Ok(delivery
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
                                lock(&health).acknowledged();
                                metrics.produced.increment(1);
                                metrics
                                    .ack_seconds
                                    .record(started.elapsed().as_secs_f64());
                            }
                            Err(e) => {
                                // A refusal of this record (too large, invalid) proves the
                                // broker answers: it says nothing about the producer.
                                if e.is_retryable() {
                                    lock(&health).failed(Instant::now());
                                }
                                metrics::counter!(m::KAFKA_PRODUCE_ERRORS_TOTAL, "topic" => metrics.topic.clone(), "kind" => e.kind())
                                    .increment(1);
                            }
                        }
                        result
                    })
                    .boxed());
            }
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), fr)) => {
                metrics::counter!(m::KAFKA_PRODUCE_BACKPRESSURE_TOTAL, "topic" => topic.to_owned())
                    .increment(1);
                (ProduceError::QueueFull, fr)
            }
            Err((e, fr)) => {
                metrics::counter!(m::KAFKA_PRODUCE_ERRORS_TOTAL, "topic" => topic.to_owned(), "kind" => "enqueue").increment(1);
                (ProduceError::Enqueue(e), fr)
            }
        };
        Err((error, fr.headers.unwrap_or_default()))
    }

    /// The current client (a cheap handle).
    fn current(&self) -> Client {
        self.shared
            .client
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Why this producer cannot deliver now, if it cannot: librdkafka raised a fatal
    /// error, or deliveries have failed for at least `stall` without one acknowledgement.
    pub fn unhealthy(&self, stall: Duration) -> Option<String> {
        let d = lock(&self.shared.delivery);
        if let Some(reason) = &d.fatal {
            return Some(format!("fatal producer error: {reason}"));
        }
        d.failing_since
            .map(|since| since.elapsed())
            .filter(|failing| *failing >= stall)
            .map(|failing| {
                format!(
                    "no broker acknowledgement for {} s (every delivery failed)",
                    failing.as_secs()
                )
            })
    }

    /// Why this producer should fail liveness, if it should (see [`liveness_failure`]),
    /// with its config's `--kafka-producer-liveness-timeout`.
    pub fn dead(&self) -> Option<String> {
        let d = lock(&self.shared.delivery);
        liveness_failure(
            d.undelivered_since,
            d.last_failure,
            Instant::now(),
            self.shared.cfg.producer_liveness_timeout,
        )
    }

    /// Replaces the client by a new one (a new producer id, so the broker sees no stale
    /// idempotence sequence). Records still queued on the old client fail, so their
    /// callers answer with an error and clients retry; nothing is acknowledged that the
    /// broker did not store.
    pub fn recreate(&self) -> Result<(), KafkaError> {
        let fresh = Self::client(
            &self.shared.cfg,
            &self.shared.client_id,
            &self.shared.delivery,
        )?;
        let old = std::mem::replace(
            &mut *self
                .shared
                .client
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            fresh,
        );
        {
            // A fresh client starts a new stall period; liveness keeps counting.
            let mut d = lock(&self.shared.delivery);
            d.failing_since = None;
            d.fatal = None;
        }
        self.shared.recreated.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(m::KAFKA_PRODUCER_RECREATED_TOTAL).increment(1);
        // The old client fails what it still holds (purge) once its last handle is gone.
        drop(old);
        Ok(())
    }

    /// How many times the client was recreated.
    pub fn recreated(&self) -> u64 {
        self.shared.recreated.load(Ordering::Relaxed)
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
        self.current().flush(timeout)
    }

    /// Records queued locally and not yet acknowledged.
    pub fn in_flight(&self) -> i32 {
        self.current().in_flight_count()
    }
}

impl RecordProducer for KafkaProducer {
    fn enqueue(&self, record: OutRecord) -> Result<AckFuture, ProduceError> {
        self.try_enqueue(record).map_err(|refused| refused.error)
    }

    fn enqueue_ref(&self, record: &OutRecord) -> Result<AckFuture, ProduceError> {
        self.queue(
            &record.topic,
            record.key.as_deref(),
            &record.payload,
            record.headers.clone(),
            record.partition,
        )
        .map_err(|(error, _headers)| error)
    }

    /// Moves the record's headers into librdkafka (no copy of them per record).
    fn try_enqueue(&self, record: OutRecord) -> Result<AckFuture, Box<NotQueued>> {
        let OutRecord {
            topic,
            key,
            payload,
            headers,
            partition,
        } = record;
        self.queue(&topic, key.as_deref(), &payload, headers, partition)
            .map_err(|(error, headers)| {
                Box::new(NotQueued {
                    error,
                    record: OutRecord {
                        topic,
                        key,
                        payload,
                        headers,
                        partition,
                    },
                })
            })
    }
}

/// Watches `producer` every second until `stop`: while it cannot deliver
/// ([`KafkaProducer::unhealthy`] with `stall`), readiness is blocked for `component` with
/// the reason, and the client is recreated (at most once per `stall`); readiness returns
/// as soon as the producer is healthy again. For a broker that stalls, or that accepts
/// connections but fails every request, this is what turns endless 503s into recovery.
/// When recreating does not help either ([`KafkaProducer::dead`]: nothing delivered for
/// the liveness timeout), `/livez` fails for `component` so the orchestrator restarts
/// the process; it passes again once a delivery succeeds.
pub fn spawn_watchdog(
    producer: KafkaProducer,
    health: Health,
    component: &'static str,
    stall: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut last_recreate: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            match producer.dead() {
                None => health.revive(component),
                Some(reason) => {
                    if !health.is_dead() {
                        tracing::error!(reason, component, "kafka producer failing liveness");
                    }
                    health.fail_liveness(component, reason);
                }
            }
            match producer.unhealthy(stall) {
                None => health.unblock(component),
                Some(reason) => {
                    health.block(component, reason.clone());
                    if last_recreate.is_none_or(|t| t.elapsed() >= stall) {
                        tracing::warn!(reason, component, "recreating the kafka producer");
                        last_recreate = Some(Instant::now());
                        if let Err(e) = producer.recreate() {
                            tracing::error!(error = %e, component, "recreating the kafka producer failed");
                        }
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn header_list<H: rdkafka::message::Headers>(h: &H) -> Vec<(String, Vec<u8>)> {
        h.iter()
            .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
            .collect()
    }

    /// `try_enqueue` moves a record's headers into librdkafka: a record refused for a full
    /// local queue comes back whole, headers included, and `enqueue_with_wait` then stores
    /// it with them (on rdkafka's in-process mock broker).
    #[tokio::test]
    async fn a_record_refused_for_a_full_queue_comes_back_whole_and_is_stored_with_its_headers() {
        use rdkafka::Message;
        use rdkafka::message::Header;
        let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
        cluster.create_topic("full", 1, 1).unwrap();
        let cfg = KafkaConfig {
            queue_max_messages: 1,
            // Holds the first record, so the queue is still full for the second.
            linger_ms: 1_000,
            ..KafkaConfig::for_brokers(cluster.bootstrap_servers())
        };
        let producer = KafkaProducer::new(&cfg, "refused-test").unwrap();
        let first = producer
            .enqueue(OutRecord::new("full", None, b"first".to_vec()))
            .unwrap();
        let headers = OwnedHeaders::new()
            .insert(Header {
                key: "h1",
                value: Some("v1"),
            })
            .insert(Header {
                key: "h2",
                value: Some("v2"),
            });
        let expected = header_list(&headers);
        let record =
            OutRecord::new("full", Some(b"k".to_vec()), b"second".to_vec()).with_headers(headers);
        let refused = producer
            .try_enqueue(record)
            .err()
            .expect("the queue is full");
        assert!(
            matches!(refused.error, ProduceError::QueueFull),
            "{}",
            refused.error
        );
        let back = refused.record;
        assert_eq!(
            (back.topic.as_str(), back.key.as_deref(), &back.payload[..]),
            ("full", Some(&b"k"[..]), &b"second"[..])
        );
        assert_eq!(header_list(&back.headers), expected);
        let second = enqueue_with_wait(&producer, back, Duration::from_secs(30))
            .await
            .unwrap();
        assert_eq!(first.await.unwrap().offset, 0);
        assert_eq!(second.await.unwrap().offset, 1);

        let (consumer, _) =
            crate::kafka::KafkaConsumer::new(&cfg, "refused-test", "refused-reader", &["full"])
                .unwrap();
        let mut stored = Vec::new();
        while stored.len() < 2 {
            let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
                .await
                .expect("a record within 30 s")
                .unwrap();
            stored.push((
                m.payload().unwrap_or_default().to_vec(),
                m.headers().map(header_list).unwrap_or_default(),
            ));
        }
        assert_eq!(stored[0], (b"first".to_vec(), Vec::new()));
        assert_eq!(stored[1], (b"second".to_vec(), expected));
    }

    #[test]
    fn every_produce_error_kind_is_initialised_at_start_up() {
        let errors = [
            ProduceError::QueueFull,
            ProduceError::Enqueue(KafkaError::Canceled),
            ProduceError::Delivery(KafkaError::Canceled),
            ProduceError::Cancelled,
        ];
        let kinds: Vec<&str> = errors.iter().map(ProduceError::kind).collect();
        assert_eq!(kinds, crate::metrics::PRODUCE_ERROR_KINDS);
    }

    #[test]
    fn liveness_fails_only_after_failing_for_the_whole_limit_and_while_still_failing() {
        let t0 = Instant::now();
        let at = |s: u64| t0 + Duration::from_secs(s);
        assert_eq!(
            liveness_failure(None, None, at(600), MIN),
            None,
            "never failed"
        );
        assert_eq!(
            liveness_failure(Some(t0), Some(at(59)), at(59), MIN),
            None,
            "failing for less than the limit"
        );
        let dead = liveness_failure(Some(t0), Some(at(59)), at(60), MIN).unwrap();
        assert!(dead.contains("delivered nothing for 60 s"), "{dead}");
        assert_eq!(
            liveness_failure(Some(t0), Some(at(10)), at(70), MIN),
            None,
            "one failure, then nothing to send: not dead"
        );
        assert_eq!(
            liveness_failure(Some(t0), Some(at(59)), at(60), Duration::ZERO),
            None,
            "0 turns it off"
        );
    }

    #[test]
    fn an_acknowledgement_clears_the_failure_and_a_recreation_does_not() {
        let mut d = Delivery::default();
        let t0 = Instant::now();
        d.failed(t0);
        d.failed(t0 + Duration::from_secs(5));
        assert_eq!(d.undelivered_since, Some(t0));
        // What `recreate` resets: the stall period, not the liveness period.
        d.failing_since = None;
        d.failed(t0 + Duration::from_secs(9));
        assert_eq!(d.failing_since, Some(t0 + Duration::from_secs(9)));
        assert_eq!(d.undelivered_since, Some(t0));
        d.acknowledged();
        assert_eq!((d.failing_since, d.undelivered_since), (None, None));
    }

    /// No broker listens on the address: every delivery times out. The watchdog blocks
    /// readiness and recreates the client after the stall timeout, and once nothing was
    /// delivered for the liveness timeout it fails liveness.
    #[tokio::test]
    async fn a_producer_that_never_delivers_fails_readiness_then_liveness() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port(); // released at once: nothing listens there
        let cfg = KafkaConfig {
            message_timeout_ms: 1_000,
            producer_stall_timeout: Duration::from_secs(1),
            producer_liveness_timeout: Duration::from_secs(3),
            ..KafkaConfig::for_brokers(format!("127.0.0.1:{port}"))
        };
        let producer = KafkaProducer::new(&cfg, "liveness-test").unwrap();
        let health = Health::new();
        health.set_ready(true);
        let stop = CancellationToken::new();
        let watchdog = spawn_watchdog(
            producer.clone(),
            health.clone(),
            "kafka-producer",
            cfg.producer_stall_timeout,
            stop.clone(),
        );
        let started = Instant::now();
        let mut was_blocked = false;
        while !health.is_dead() {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "liveness never failed"
            );
            if let Ok(ack) = producer.enqueue(OutRecord::new("t", None, b"x".to_vec())) {
                tokio::spawn(ack);
            }
            was_blocked |= health.blocked().is_some();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            started.elapsed() >= Duration::from_secs(3),
            "dead too early"
        );
        assert!(was_blocked, "readiness was never blocked");
        assert!(producer.recreated() >= 1, "the client was never recreated");
        assert!(
            health
                .dead()
                .unwrap()
                .contains("kafka-producer: kafka producer delivered nothing"),
            "{:?}",
            health.dead()
        );
        stop.cancel();
        watchdog.await.unwrap();
    }
}
