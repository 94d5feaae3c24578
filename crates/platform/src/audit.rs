//! The audit trail: one record format for every administrative change (schema register,
//! delete and config change, refused attempts, API key reloads, DLQ redrive, replay,
//! migrations) and the producer every service and `pulsectl` writes it with, to the
//! append-only topic `pulse.audit.v1` (`pulse_contracts::topics::AUDIT`).
//!
//! Owns: [`AuditRecord`] (JSON, versioned by `v`), [`AuditLog`] (a bounded, never-blocking
//! queue in front of the Kafka producer, for request paths; [`AuditLog::on_demand`] makes
//! its producer only while records wait, for rare ones), [`AuditTrail`] (an
//! [`AuditLog`] with a producer of its own that never makes its service wait for the
//! broker, for the query API) and [`write_now`] (one record, awaited with a deadline, for
//! the CLI), and the audit metrics. Which changes are audited
//! and who the actor is are the callers' decisions. Records never hold secrets: keys appear
//! by name only.
//!
//! A record that cannot be written (queue full, broker error, no acknowledgement within the
//! deadline) is counted in `pulse_audit_records_failed_total{reason}` and logged at error
//! level with its fields, so the change is still on record in the service's log.

use std::sync::Arc;
use std::time::Duration;

use rdkafka::error::KafkaError;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::kafka::producer::enqueue_with_wait;
use crate::kafka::topics::{TopicKind, TopicSpec};
use crate::kafka::{KafkaConfig, KafkaProducer, OutRecord, RecordProducer};

/// The version of [`AuditRecord`]'s JSON shape. Additive changes keep it; a reader skips
/// records of a version it does not know.
pub const VERSION: u32 = 1;

/// Records written to the audit topic.
pub const RECORDS_WRITTEN_TOTAL: &str = "pulse_audit_records_written_total";
/// Records that could not be written, by `reason` (`queue_full`, `produce`, `timeout`).
pub const RECORDS_FAILED_TOTAL: &str = "pulse_audit_records_failed_total";

const FAILURE_REASONS: [&str; 3] = ["queue_full", "produce", "timeout"];

/// Actions (the `action` field). Prefixes group them: `schema.`, `keys.`, `dlq.`, …
pub mod action {
    /// `POST /subjects/{s}/versions`.
    pub const SCHEMA_REGISTER: &str = "schema.register";
    /// `DELETE /subjects/{s}` or `/subjects/{s}/versions/{v}`.
    pub const SCHEMA_DELETE: &str = "schema.delete";
    /// `PUT|DELETE /config` or `/config/{s}`.
    pub const SCHEMA_CONFIG: &str = "schema.config";
    /// Any other registry write (a route added later).
    pub const SCHEMA_OTHER_WRITE: &str = "schema.write";
    /// Ingest reloaded its API key file.
    pub const KEYS_RELOAD: &str = "keys.reload";
    /// The schema registry reloaded its credentials file (`--auth-file`).
    pub const CREDENTIALS_RELOAD: &str = "keys.registry-users.reload";
    /// The query API reloaded its token file (`--api-tokens-file`).
    pub const TOKENS_RELOAD: &str = "keys.query-tokens.reload";
    /// A server reloaded its TLS certificate and key files (a rotation), or refused them.
    pub const TLS_RELOAD: &str = "keys.tls.reload";
    /// `pulsectl dlq redrive`.
    pub const DLQ_REDRIVE: &str = "dlq.redrive";
    /// `pulsectl replay`.
    pub const REPLAY: &str = "replay";
    /// `pulsectl migrate`.
    pub const MIGRATE: &str = "migrate";
    /// `pulsectl topics create` that created topics, or was refused or failed.
    pub const TOPICS_CREATE: &str = "topics.create";
    /// `pulsectl shadow promote check` (passed, or refused with the reasons).
    pub const SHADOW_PROMOTE_CHECK: &str = "shadow.promote.check";
    /// `pulsectl shadow promote finish` (refused, or passed and the shadow discarded).
    pub const SHADOW_PROMOTE_FINISH: &str = "shadow.promote.finish";
    /// `pulsectl shadow discard`.
    pub const SHADOW_DISCARD: &str = "shadow.discard";
}

/// How an audited change ended (`ok`, `refused`, `failed` in the JSON and the table;
/// every version of the format has had these three).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// Done.
    Ok,
    /// Refused before it changed anything: authentication or authorization failed, or a
    /// command's own checks or flags said no (`pulsectl shadow promote check|finish`
    /// finding differences, a discard with invalid flags); `detail` holds the reasons.
    Refused,
    /// Tried and failed (an error answer, a failed command or step).
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Refused => "refused",
            Outcome::Failed => "failed",
        }
    }
}

impl std::str::FromStr for Outcome {
    type Err = String;

    /// `ok`, `refused` or `failed`.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "ok" => Ok(Outcome::Ok),
            "refused" => Ok(Outcome::Refused),
            "failed" => Ok(Outcome::Failed),
            other => Err(format!(
                "{other:?} is not an audit outcome: ok, refused or failed"
            )),
        }
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One audited change. Serialized as one JSON object per Kafka record (key: `service`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Format version ([`VERSION`]).
    pub v: u32,
    /// Unique id of the record (a retried write may store it twice; readers may dedup).
    pub id: String,
    /// When the change ended, epoch ms.
    pub ts_ms: i64,
    /// The service (or `pulsectl`) that made or refused the change.
    pub service: String,
    /// Who: the registry user, the API key name, `file` (a key file reload), the operator
    /// (`pulsectl --actor`, else `$USER`), or `anonymous`.
    pub actor: String,
    /// What, one of [`action`].
    pub action: String,
    /// What it applied to: a subject, a topic, a database (may be empty).
    pub target: String,
    pub outcome: Outcome,
    /// The HTTP status answered, where there was one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// The caller's address, where known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// Free text: the request, the keys added/removed by name, the error. Never a secret.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub detail: String,
    /// The W3C trace id (32 hex) of the request or task that made the change, when it ran
    /// in a recorded span; empty otherwise. Added in format version 1 (older records lack
    /// it).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub trace_id: String,
}

impl AuditRecord {
    /// A record stamped now, with a fresh id.
    pub fn new(service: &str, actor: &str, action: &str, target: &str, outcome: Outcome) -> Self {
        let ts_ms = crate::clock::now_ms();
        Self {
            v: VERSION,
            id: new_id(ts_ms),
            ts_ms,
            service: service.to_owned(),
            actor: actor.to_owned(),
            action: action.to_owned(),
            target: target.to_owned(),
            outcome,
            status: None,
            source: None,
            detail: String::new(),
            trace_id: current_trace_id(),
        }
    }

    pub fn with_status(mut self, status: u16) -> Self {
        self.status = Some(status);
        self
    }

    pub fn with_source(mut self, source: impl Into<String>) -> Self {
        self.source = Some(source.into());
        self
    }

    pub fn with_detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = detail.into();
        self
    }

    /// The JSON bytes written to the topic.
    pub fn to_json(&self) -> Vec<u8> {
        // A struct of strings and numbers always serializes.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses a record of a known version; `None` for anything else (another version, not
    /// JSON), which readers skip.
    pub fn from_json(bytes: &[u8]) -> Option<Self> {
        let r: Self = serde_json::from_slice(bytes).ok()?;
        (r.v == VERSION).then_some(r)
    }

    fn out_record(&self, topic: &str) -> OutRecord {
        OutRecord::new(
            topic,
            Some(self.service.as_bytes().to_vec()),
            self.to_json(),
        )
    }

    /// The record as structured log fields (what remains when it could not be written).
    pub fn log_failed(&self, reason: &str, error: &str) {
        tracing::error!(
            reason,
            error,
            audit.id = %self.id,
            audit.actor = %self.actor,
            audit.action = %self.action,
            audit.target = %self.target,
            audit.outcome = %self.outcome,
            audit.status = self.status,
            audit.source = self.source.as_deref().unwrap_or(""),
            audit.detail = %self.detail,
            "audit record not written to the audit topic"
        );
    }
}

/// The ClickHouse table the writer copies the audit topic into (migration
/// `0005_audit_log.sql`): append-only, one row per record, exactly once per topic position.
pub const TABLE: &str = "audit_log";

/// The columns of [`TABLE`] in [`AuditRow`]'s order, for `SELECT`s.
pub const COLUMNS: &str = "ts_ms, id, service, actor, action, target, outcome, status, \
     source, detail, trace_id, kafka_topic, kafka_partition, kafka_offset, written_at_ms";

/// One row of [`TABLE`]: an [`AuditRecord`] and where it was read from the topic.
#[derive(Debug, Clone, PartialEq, Eq, clickhouse::Row, Serialize, Deserialize)]
pub struct AuditRow {
    pub ts_ms: i64,
    pub id: String,
    pub service: String,
    pub actor: String,
    pub action: String,
    pub target: String,
    /// `ok`, `refused` or `failed`.
    pub outcome: String,
    /// The HTTP status, 0 when there was none.
    pub status: u16,
    /// The caller's address, empty when unknown.
    pub source: String,
    pub detail: String,
    pub trace_id: String,
    pub kafka_topic: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    /// When the writer inserted the row, epoch ms.
    pub written_at_ms: i64,
}

impl AuditRow {
    /// The row of `record`, read from `topic`/`partition` at `offset`.
    pub fn from_record(
        record: &AuditRecord,
        topic: &str,
        partition: i32,
        offset: i64,
        written_at_ms: i64,
    ) -> Self {
        Self {
            ts_ms: record.ts_ms,
            id: record.id.clone(),
            service: record.service.clone(),
            actor: record.actor.clone(),
            action: record.action.clone(),
            target: record.target.clone(),
            outcome: record.outcome.as_str().to_owned(),
            status: record.status.unwrap_or(0),
            source: record.source.clone().unwrap_or_default(),
            detail: record.detail.clone(),
            trace_id: record.trace_id.clone(),
            kafka_topic: topic.to_owned(),
            kafka_partition: partition,
            kafka_offset: offset,
            written_at_ms,
        }
    }

    /// The record the row holds (an outcome the format does not know reads as `failed`).
    pub fn to_record(&self) -> AuditRecord {
        let outcome = self.outcome.parse().unwrap_or(Outcome::Failed);
        AuditRecord {
            v: VERSION,
            id: self.id.clone(),
            ts_ms: self.ts_ms,
            service: self.service.clone(),
            actor: self.actor.clone(),
            action: self.action.clone(),
            target: self.target.clone(),
            outcome,
            status: (self.status != 0).then_some(self.status),
            source: (!self.source.is_empty()).then(|| self.source.clone()),
            detail: self.detail.clone(),
            trace_id: self.trace_id.clone(),
        }
    }
}

/// The OpenTelemetry trace id of the current span, if it is a valid (recorded) one.
fn current_trace_id() -> String {
    use opentelemetry::trace::TraceContextExt as _;
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        sc.trace_id().to_string()
    } else {
        String::new()
    }
}

/// `<ts hex>-<64 random bits hex>`: unique enough for a trail (no uuid dependency here).
fn new_id(ts_ms: i64) -> String {
    use std::hash::{BuildHasher, Hasher};
    static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u32(std::process::id());
    format!("{ts_ms:x}-{:016x}", h.finish())
}

/// The audit topic's spec: one partition (one total order), delete policy, retention of a
/// year (`retention.ms`; longer-lived copies belong in a store of their own).
pub fn topic_spec(topic: &str) -> TopicSpec {
    let mut spec = TopicSpec::of(TopicKind::Other, topic, 1);
    spec.configs = vec![
        ("cleanup.policy".into(), "delete".into()),
        ("retention.ms".into(), (365u64 * 86_400_000).to_string()),
    ];
    spec
}

/// Describes the audit metrics and registers them at zero, so they are scraped before the
/// first record.
pub fn describe() {
    metrics::describe_counter!(
        RECORDS_WRITTEN_TOTAL,
        "Audit records the broker acknowledged on the audit topic."
    );
    metrics::describe_counter!(
        RECORDS_FAILED_TOTAL,
        "Audit records that could not be written (reason: queue_full, produce, timeout); each is logged at error level with its fields."
    );
    metrics::counter!(RECORDS_WRITTEN_TOTAL).increment(0);
    for reason in FAILURE_REASONS {
        metrics::counter!(RECORDS_FAILED_TOTAL, "reason" => reason).increment(0);
    }
}

/// Why one record was not written.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("producing the audit record: {0}")]
    Produce(#[from] crate::kafka::ProduceError),
    #[error("the broker did not acknowledge the audit record within {0:?}")]
    Timeout(Duration),
}

impl AuditError {
    fn reason(&self) -> &'static str {
        match self {
            AuditError::Produce(_) => "produce",
            AuditError::Timeout(_) => "timeout",
        }
    }
}

/// Writes one record and waits for the broker's acknowledgement, at most `timeout` in all
/// (for the CLI, where the operator should see that the record was not written). A failure
/// is counted and logged like [`AuditLog`]'s, and returned.
pub async fn write_now(
    producer: &(impl RecordProducer + ?Sized),
    topic: &str,
    record: &AuditRecord,
    timeout: Duration,
) -> Result<(), AuditError> {
    let result = tokio::time::timeout(timeout, async {
        let ack = enqueue_with_wait(producer, record.out_record(topic), timeout).await?;
        ack.await?;
        Ok::<(), AuditError>(())
    })
    .await
    .unwrap_or(Err(AuditError::Timeout(timeout)));
    match &result {
        Ok(()) => metrics::counter!(RECORDS_WRITTEN_TOTAL).increment(1),
        Err(e) => {
            metrics::counter!(RECORDS_FAILED_TOTAL, "reason" => e.reason()).increment(1);
            record.log_failed(e.reason(), &e.to_string());
        }
    }
    result
}

/// The audit log of this process for changes that happen below the service's own code
/// (a TLS certificate reloaded by a listener), and the service it names: set once by a
/// service at start ([`set_process_log`]; [`AuditLog::on_demand`] for one without a
/// producer of its own); where none is set such changes are only logged.
static PROCESS_LOG: std::sync::OnceLock<(&'static str, AuditLog)> = std::sync::OnceLock::new();

/// Makes `log` this process's audit log for [`process_log`], its records naming `service`.
/// The first call wins; later ones are ignored.
pub fn set_process_log(service: &'static str, log: AuditLog) {
    let _ = PROCESS_LOG.set((service, log));
}

/// The process's audit log and service name, if a service set one.
pub fn process_log() -> Option<&'static (&'static str, AuditLog)> {
    PROCESS_LOG.get()
}

/// The audit trail of a service: [`AuditLog::record`] never blocks (a bounded queue; a full
/// queue counts and logs the record as not written), a background task writes each record
/// and waits for its acknowledgement for at most the write timeout. Cheap to clone;
/// [`AuditLog::disabled`] drops every record (tests, embedded use) after logging it.
#[derive(Clone, Debug, Default)]
pub struct AuditLog {
    tx: Option<mpsc::Sender<AuditRecord>>,
}

impl AuditLog {
    /// An audit log that writes nowhere (records are still logged at info level).
    pub fn disabled() -> Self {
        Self::default()
    }

    /// Starts the writer task: at most `capacity` records wait; each write is given
    /// `timeout`. The task ends when every clone of the returned log is dropped.
    pub fn spawn(
        producer: Arc<dyn RecordProducer>,
        topic: impl Into<String>,
        capacity: usize,
        timeout: Duration,
    ) -> Self {
        describe();
        let topic = topic.into();
        let (tx, mut rx) = mpsc::channel::<AuditRecord>(capacity.max(1));
        tokio::spawn(async move {
            while let Some(record) = rx.recv().await {
                let _ = write_now(producer.as_ref(), &topic, &record, timeout).await;
            }
        });
        Self { tx: Some(tx) }
    }

    /// Queues `record` for writing; never waits. Every record is also logged at info level.
    pub fn record(&self, record: AuditRecord) {
        tracing::info!(
            audit.actor = %record.actor,
            audit.action = %record.action,
            audit.target = %record.target,
            audit.outcome = %record.outcome,
            audit.status = record.status,
            audit.source = record.source.as_deref().unwrap_or(""),
            audit.detail = %record.detail,
            "audit"
        );
        let Some(tx) = &self.tx else {
            return;
        };
        if let Err(e) = tx.try_send(record) {
            let (mpsc::error::TrySendError::Full(record)
            | mpsc::error::TrySendError::Closed(record)) = e;
            metrics::counter!(RECORDS_FAILED_TOTAL, "reason" => "queue_full").increment(1);
            record.log_failed("queue_full", "the audit queue is full");
        }
    }

    /// An audit log for a process whose audited changes are rare (the processor's, a
    /// writer's or the ledger's certificate rotations) and that has no producer of its own
    /// for them: the writer task makes a Kafka producer (client id `client_id`) when a
    /// record comes, creating the audit topic first if it is missing, writes the records
    /// queued by then, and drops the producer once none waits, so no Kafka client is held
    /// between records. [`AuditLog::record`] never waits; a record that cannot be written
    /// is counted and logged as every [`AuditLog`]'s. An empty `topic` gives
    /// [`AuditLog::disabled`] (records are only logged).
    pub fn on_demand(kafka: &KafkaConfig, client_id: &str, topic: &str) -> Self {
        if topic.trim().is_empty() {
            return Self::disabled();
        }
        let (kafka, client_id) = (kafka.clone(), client_id.to_owned());
        let spec = topic_spec(topic);
        let timeout = write_timeout(&kafka);
        let make = move || {
            let (kafka, client_id, spec) = (kafka.clone(), client_id.clone(), spec.clone());
            async move {
                let specs = [spec];
                match tokio::time::timeout(timeout, crate::kafka::ensure_topics(&kafka, &specs))
                    .await
                {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => {
                        tracing::warn!(topic = %specs[0].name, error = %e, "audit topic not checked or created");
                    }
                    Err(_) => {
                        tracing::warn!(topic = %specs[0].name, timeout_s = timeout.as_secs(), "audit topic not checked: the broker did not answer in time");
                    }
                }
                KafkaProducer::new(&kafka, &client_id).map_err(|e| e.to_string())
            }
        };
        Self::spawn_on_demand(make, topic, ON_DEMAND_QUEUE, timeout)
    }

    /// [`AuditLog::on_demand`] with the producer `make` makes.
    fn spawn_on_demand<P, F, Fut>(
        make: F,
        topic: impl Into<String>,
        capacity: usize,
        timeout: Duration,
    ) -> Self
    where
        P: RecordProducer + 'static,
        F: Fn() -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<P, String>> + Send,
    {
        describe();
        let topic = topic.into();
        let (tx, mut rx) = mpsc::channel::<AuditRecord>(capacity.max(1));
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut next = Some(first);
                match make().await {
                    Ok(producer) => {
                        while let Some(record) = next.take().or_else(|| rx.try_recv().ok()) {
                            let _ = write_now(&producer, &topic, &record, timeout).await;
                        }
                        // Dropping a client joins its threads: off the async threads.
                        let _ = tokio::task::spawn_blocking(move || drop(producer)).await;
                    }
                    Err(e) => {
                        while let Some(record) = next.take().or_else(|| rx.try_recv().ok()) {
                            metrics::counter!(RECORDS_FAILED_TOTAL, "reason" => "produce")
                                .increment(1);
                            record.log_failed("produce", &format!("making the producer: {e}"));
                        }
                    }
                }
            }
        });
        Self { tx: Some(tx) }
    }
}

/// Records an [`AuditLog::on_demand`] lets wait (a listener's reload writes one).
const ON_DEMAND_QUEUE: usize = 16;

/// Records an [`AuditTrail`] lets wait for the broker before new ones are dropped
/// (counted in `pulse_audit_records_failed_total{reason="queue_full"}`, logged).
pub const TRAIL_QUEUE: usize = 64;

/// How long one audit record written with `kafka`'s producer may wait for its
/// acknowledgement: the producer's message timeout (`--kafka-message-timeout-ms`) and 5 s
/// more, so librdkafka's own verdict comes first and a failed delivery is seen by the
/// producer's health (an [`AuditTrail`] repairs its producer by it).
pub fn write_timeout(kafka: &KafkaConfig) -> Duration {
    Duration::from_millis(kafka.message_timeout_ms.into()) + Duration::from_secs(5)
}

/// How often an [`AuditTrail`] tries again to create its topic while the broker does not
/// answer.
const TOPIC_RETRY: Duration = Duration::from_secs(30);

/// An [`AuditLog`] with a Kafka producer of its own, for a service whose audit records are
/// its only Kafka writes and whose availability must not depend on Kafka (the query API).
/// Nothing here waits for the broker or touches readiness or liveness: creating the
/// producer contacts no broker (librdkafka connects in the background), the audit topic is
/// created in the background when it is missing, and a producer whose deliveries keep
/// failing is recreated with a new client (as the services' producer watchdog does, minus
/// the readiness block). While the broker is down a record fails after the producer's
/// message timeout: counted and logged at error level as every [`AuditLog`]'s.
#[derive(Debug)]
pub struct AuditTrail {
    log: AuditLog,
    producer: KafkaProducer,
}

impl AuditTrail {
    /// Starts the producer (client id `client_id`), the writer task and the background
    /// tasks (topic creation, producer repair), which end when `stop` is cancelled. Fails
    /// only for a client configuration librdkafka refuses, never for the broker.
    pub fn start(
        kafka: &KafkaConfig,
        client_id: &str,
        topic: &str,
        stop: CancellationToken,
    ) -> Result<Self, KafkaError> {
        let producer = KafkaProducer::new(kafka, client_id)?;
        let log = AuditLog::spawn(
            Arc::new(producer.clone()),
            topic,
            TRAIL_QUEUE,
            write_timeout(kafka),
        );
        tokio::spawn(create_topic(kafka.clone(), topic_spec(topic), stop.clone()));
        tokio::spawn(repair(
            producer.clone(),
            kafka.producer_stall_timeout.max(Duration::from_secs(1)),
            stop,
        ));
        Ok(Self { log, producer })
    }

    /// The log to record to (cheap to clone).
    pub fn log(&self) -> AuditLog {
        self.log.clone()
    }

    /// At shutdown: waits at most `timeout` for the records the producer still holds (off
    /// the async threads); what is not acknowledged by then is logged, not waited for.
    pub async fn flush(&self, timeout: Duration) {
        let producer = self.producer.clone();
        match tokio::task::spawn_blocking(move || producer.flush(timeout)).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "audit producer flush at shutdown failed"),
            Err(e) => tracing::warn!(error = %e, "audit producer flush task failed"),
        }
    }
}

/// Creates the audit topic when missing, trying again every [`TOPIC_RETRY`] while the
/// broker does not answer, until `stop`. A broker's refusal (no permission to create
/// topics, say) ends it: the topic is then the other services' or the operator's to create
/// (`pulsectl topics create`), and records fail until it exists.
async fn create_topic(kafka: KafkaConfig, spec: TopicSpec, stop: CancellationToken) {
    let specs = [spec];
    loop {
        let attempt = tokio::select! {
            _ = stop.cancelled() => return,
            r = crate::kafka::ensure_topics(&kafka, &specs) => r,
        };
        match attempt {
            Ok(_) => return,
            Err(e @ crate::kafka::topics::TopicError::Request(_)) => {
                tracing::warn!(topic = %specs[0].name, error = %e, retry_in_s = TOPIC_RETRY.as_secs(),
                    "audit topic not checked: the broker did not answer; audit records fail until it does");
            }
            Err(e) => {
                tracing::warn!(topic = %specs[0].name, error = %e,
                    "audit topic not created; audit records fail until it exists");
                return;
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(TOPIC_RETRY) => {}
        }
    }
}

/// Recreates `producer` while its deliveries have all failed for `stall` (at most once per
/// `stall`), until `stop`: a client the broker left in a state it cannot produce from
/// gets a new producer id. Readiness and liveness are left alone.
async fn repair(producer: KafkaProducer, stall: Duration, stop: CancellationToken) {
    let mut recreated_at: Option<std::time::Instant> = None;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        let Some(reason) = producer.unhealthy(stall) else {
            continue;
        };
        if recreated_at.is_some_and(|t| t.elapsed() < stall) {
            continue;
        }
        recreated_at = Some(std::time::Instant::now());
        tracing::warn!(reason, "recreating the audit producer");
        if let Err(e) = producer.recreate() {
            tracing::error!(error = %e, "recreating the audit producer failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kafka::{AckFuture, Acked, ProduceError};
    use std::sync::Mutex;

    #[test]
    fn every_outcome_round_trips_and_records_written_before_refused_still_read() {
        for outcome in [Outcome::Ok, Outcome::Refused, Outcome::Failed] {
            let r = AuditRecord::new("pulsectl", "op", action::SHADOW_PROMOTE_CHECK, "b", outcome)
                .with_detail("windows [..): refused: x");
            assert_eq!(AuditRecord::from_json(&r.to_json()), Some(r.clone()));
            assert_eq!(outcome.as_str().parse::<Outcome>(), Ok(outcome));
            let row = AuditRow::from_record(&r, "t", 0, 7, 1);
            assert_eq!(row.outcome, outcome.as_str());
            assert_eq!(row.to_record(), r);
        }
        // As pulsectl wrote a refused promote check before `refused` was used for it.
        let old = br#"{"v":1,"id":"1-2","ts_ms":5,"service":"pulsectl","actor":"op","action":"shadow.promote.check","target":"b","outcome":"failed","detail":"refused: x"}"#;
        let r = AuditRecord::from_json(old).unwrap();
        assert_eq!(
            (r.outcome, r.detail.as_str()),
            (Outcome::Failed, "refused: x")
        );
        let ok = br#"{"v":1,"id":"1-3","ts_ms":5,"service":"pulsectl","actor":"op","action":"migrate","target":"","outcome":"ok"}"#;
        assert_eq!(AuditRecord::from_json(ok).unwrap().outcome, Outcome::Ok);
        let err = "denied".parse::<Outcome>().unwrap_err();
        assert!(err.contains("ok, refused or failed"), "{err}");
    }

    #[test]
    fn a_record_round_trips_as_versioned_json_without_empty_fields() {
        let r = AuditRecord::new(
            "schema-registry",
            "alice",
            action::SCHEMA_REGISTER,
            "pulse.events.v1-value",
            Outcome::Ok,
        )
        .with_status(200)
        .with_source("10.0.0.1:5555");
        let json: serde_json::Value = serde_json::from_slice(&r.to_json()).unwrap();
        assert_eq!(json["v"], 1);
        assert_eq!(json["actor"], "alice");
        assert_eq!(json["action"], "schema.register");
        assert_eq!(json["outcome"], "ok");
        assert_eq!(json["status"], 200);
        assert!(json.get("detail").is_none(), "{json}");
        assert_eq!(AuditRecord::from_json(&r.to_json()), Some(r.clone()));
        let mut other = json.clone();
        other["v"] = 2.into();
        assert_eq!(
            AuditRecord::from_json(other.to_string().as_bytes()),
            None,
            "an unknown version is skipped"
        );
        assert_eq!(AuditRecord::from_json(b"not json"), None);
        let second = AuditRecord::new("s", "a", "x", "", Outcome::Failed);
        assert_ne!(r.id, second.id);
    }

    #[test]
    fn a_row_holds_the_record_and_its_topic_position() {
        let r = AuditRecord::new(
            "ingest",
            "file",
            action::KEYS_RELOAD,
            "/k",
            Outcome::Refused,
        )
        .with_status(401)
        .with_source("10.0.0.2:1")
        .with_detail("d");
        let row = AuditRow::from_record(&r, "pulse.audit.v1", 0, 41, 7);
        assert_eq!((row.status, row.outcome.as_str()), (401, "refused"));
        assert_eq!((row.kafka_partition, row.kafka_offset), (0, 41));
        assert_eq!(row.to_record(), r);
        let bare = AuditRecord::new("pulsectl", "op", action::MIGRATE, "", Outcome::Ok);
        let row = AuditRow::from_record(&bare, "t", 0, 0, 0);
        assert_eq!((row.status, row.source.as_str()), (0, ""));
        assert_eq!(
            row.to_record(),
            bare,
            "no status or source reads back as none"
        );
        assert_eq!(
            COLUMNS.split(',').count(),
            15,
            "one column per field of AuditRow"
        );
    }

    /// Acknowledges after `delay`, or never (`None`).
    struct Slow {
        delay: Option<Duration>,
        sent: Mutex<Vec<OutRecord>>,
    }

    impl RecordProducer for Slow {
        fn enqueue(&self, record: OutRecord) -> Result<AckFuture, ProduceError> {
            self.sent.lock().unwrap().push(record);
            let delay = self.delay;
            Ok(Box::pin(async move {
                match delay {
                    Some(d) => tokio::time::sleep(d).await,
                    None => std::future::pending::<()>().await,
                }
                Ok(Acked {
                    partition: 0,
                    offset: 0,
                })
            }))
        }
    }

    #[test]
    fn a_trail_record_waits_longer_than_the_producer_message_timeout() {
        let mut kafka = KafkaConfig::for_brokers("b:9092");
        kafka.message_timeout_ms = 2_000;
        assert_eq!(write_timeout(&kafka), Duration::from_secs(7));
    }

    #[tokio::test]
    async fn write_now_gives_up_after_its_timeout() {
        let p = Slow {
            delay: None,
            sent: Mutex::default(),
        };
        let r = AuditRecord::new("pulsectl", "op", action::MIGRATE, "db", Outcome::Ok);
        let started = std::time::Instant::now();
        let e = write_now(&p, "audit", &r, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(e, AuditError::Timeout(_)), "{e}");
        assert!(started.elapsed() < Duration::from_secs(2));
        let sent = p.sent.lock().unwrap();
        assert_eq!(sent.len(), 1);
        assert_eq!(sent[0].topic, "audit");
        assert_eq!(sent[0].key.as_deref(), Some(&b"pulsectl"[..]));
        assert_eq!(AuditRecord::from_json(&sent[0].payload), Some(r));
    }

    #[tokio::test]
    async fn record_never_blocks_when_the_broker_does_not_answer() {
        let p = Arc::new(Slow {
            delay: None,
            sent: Mutex::default(),
        });
        let log = AuditLog::spawn(p.clone(), "audit", 2, Duration::from_secs(3600));
        let started = std::time::Instant::now();
        for i in 0..1000 {
            log.record(AuditRecord::new(
                "t",
                "a",
                action::SCHEMA_CONFIG,
                &i.to_string(),
                Outcome::Ok,
            ));
        }
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "record() must not wait for the broker"
        );
        // One write in flight, the queue's two waiting; the rest were dropped (counted).
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(p.sent.lock().unwrap().len(), 1);
    }

    /// Shares its records with the test; counts its drops.
    struct Counted {
        sent: Arc<Mutex<Vec<OutRecord>>>,
        dropped: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl RecordProducer for Counted {
        fn enqueue(&self, record: OutRecord) -> Result<AckFuture, ProduceError> {
            self.sent.lock().unwrap().push(record);
            Ok(Box::pin(async {
                Ok(Acked {
                    partition: 0,
                    offset: 0,
                })
            }))
        }
    }

    impl Drop for Counted {
        fn drop(&mut self) {
            self.dropped
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    async fn until(what: &str, done: impl Fn() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !done() {
            assert!(std::time::Instant::now() < deadline, "{what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn an_on_demand_log_makes_a_producer_only_while_records_wait() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (made, dropped) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        // The first attempt fails (the client configuration refused, say); later ones work.
        let make = {
            let (sent, made, dropped) = (sent.clone(), made.clone(), dropped.clone());
            move || {
                let n = made.fetch_add(1, SeqCst);
                let p = Counted {
                    sent: sent.clone(),
                    dropped: dropped.clone(),
                };
                async move {
                    if n == 0 {
                        drop(p);
                        Err("refused".to_owned())
                    } else {
                        Ok(p)
                    }
                }
            }
        };
        let log = AuditLog::spawn_on_demand(make, "audit", 16, Duration::from_secs(5));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(made.load(SeqCst), 0, "no producer before a record");
        let rec =
            |t: &str| AuditRecord::new("processor", "file", action::TLS_RELOAD, t, Outcome::Ok);
        log.record(rec("lost"));
        until("the failed attempt", || dropped.load(SeqCst) == 1).await;
        assert!(sent.lock().unwrap().is_empty(), "no producer, nothing sent");
        for t in ["a", "b"] {
            log.record(rec(t));
        }
        until("both written and the producer dropped", || {
            sent.lock().unwrap().len() == 2 && dropped.load(SeqCst) >= 2
        })
        .await;
        log.record(rec("c"));
        until("a producer made again", || sent.lock().unwrap().len() == 3).await;
        until("and dropped again", || {
            dropped.load(SeqCst) == made.load(SeqCst)
        })
        .await;
        let targets: Vec<String> = sent
            .lock()
            .unwrap()
            .iter()
            .map(|r| {
                assert_eq!(
                    (r.topic.as_str(), r.key.as_deref()),
                    ("audit", Some(&b"processor"[..]))
                );
                AuditRecord::from_json(&r.payload).unwrap().target
            })
            .collect();
        assert_eq!(targets, ["a", "b", "c"]);
        assert_eq!(made.load(SeqCst), 3, "one producer per burst");
    }

    #[test]
    fn an_on_demand_log_without_a_topic_only_logs() {
        let kafka = KafkaConfig::for_brokers("b:9092");
        assert!(AuditLog::on_demand(&kafka, "c", " ").tx.is_none());
    }

    #[tokio::test]
    async fn queued_records_are_written_in_order() {
        let p = Arc::new(Slow {
            delay: Some(Duration::from_millis(1)),
            sent: Mutex::default(),
        });
        let log = AuditLog::spawn(p.clone(), "audit", 16, Duration::from_secs(5));
        for i in 0..5 {
            log.record(AuditRecord::new("t", "a", "x", &i.to_string(), Outcome::Ok));
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while p.sent.lock().unwrap().len() < 5 && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let targets: Vec<String> = p
            .sent
            .lock()
            .unwrap()
            .iter()
            .map(|r| AuditRecord::from_json(&r.payload).unwrap().target)
            .collect();
        assert_eq!(targets, ["0", "1", "2", "3", "4"]);
    }
}
