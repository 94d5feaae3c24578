//! The `_schemas` log: proposing commands (produce, then wait until this replica has
//! read its own record back and applied it) and the reader that applies every record
//! from the beginning of the log to the local [`Registry`], in log order.
//!
//! Every record has a unique key (its request id), so log compaction never removes a
//! record and a replay always yields the same state. A record delivered twice is applied
//! once (the registry remembers request ids).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use pulse_platform::kafka::{KafkaConfig, KafkaProducer, OutRecord, ProduceError, RecordProducer};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::store::{Command, Outcome, Registry};

/// The value of a log record.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogRecord {
    pub request_id: String,
    #[serde(flatten)]
    pub command: Command,
}

/// Why a proposal did not get an outcome.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("writing to the schema log failed: {0}")]
    Produce(#[from] ProduceError),
    #[error("encoding the log record: {0}")]
    Encode(#[from] serde_json::Error),
    #[error(
        "the log reader did not apply our record within {0:?}; the outcome is unknown, retry the request"
    )]
    Timeout(Duration),
    #[error("the log reader stopped")]
    ReaderStopped,
}

type Pending = Arc<Mutex<HashMap<String, oneshot::Sender<Outcome>>>>;

/// The shared state of one replica.
#[derive(Debug, Clone)]
pub struct SchemaLog {
    topic: String,
    producer: KafkaProducer,
    pending: Pending,
    registry: Arc<RwLock<Registry>>,
    /// Offset of the last record applied (-1 before any).
    applied: watch::Receiver<i64>,
    apply_timeout: Duration,
}

impl SchemaLog {
    /// Starts the reader (from the beginning of `topic`) and returns the log handle and
    /// the reader's task. The reader stops when `stop` is cancelled.
    pub fn start(
        cfg: &KafkaConfig,
        topic: &str,
        apply_timeout: Duration,
        stop: CancellationToken,
    ) -> Result<(Self, tokio::task::JoinHandle<Result<(), KafkaError>>), KafkaError> {
        let producer = KafkaProducer::new(cfg, "pulse-schema-registry")?;
        let mut c = cfg.consumer_client_config("pulse-schema-registry-reader");
        // Every replica reads the whole log; no group offsets are committed.
        c.set(
            "group.id",
            format!("pulse-schema-registry-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest");
        let consumer: StreamConsumer = c.create()?;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, 0, Offset::Beginning)?;
        consumer.assign(&tpl)?;

        let registry = Arc::new(RwLock::new(Registry::default()));
        let pending: Pending = Arc::default();
        let (applied_tx, applied_rx) = watch::channel(-1_i64);
        let reader = tokio::spawn(read_loop(
            consumer,
            registry.clone(),
            pending.clone(),
            applied_tx,
            stop,
        ));
        Ok((
            Self {
                topic: topic.to_owned(),
                producer,
                pending,
                registry,
                applied: applied_rx,
                apply_timeout,
            },
            reader,
        ))
    }

    pub fn registry(&self) -> &Arc<RwLock<Registry>> {
        &self.registry
    }

    /// Writes `command` to the log and returns the outcome this replica computed when it
    /// read the record back.
    pub async fn propose(&self, command: Command) -> Result<Outcome, LogError> {
        let request_id = uuid::Uuid::new_v4().to_string();
        let record = LogRecord {
            request_id: request_id.clone(),
            command,
        };
        let value = serde_json::to_vec(&record)?;
        let key = serde_json::to_vec(
            &serde_json::json!({ "keytype": "COMMAND", "request_id": request_id }),
        )?;
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(request_id.clone(), tx);
        let result = async {
            let ack = self
                .producer
                .enqueue(OutRecord::new(&self.topic, Some(key), value))?
                .await?;
            tracing::debug!(offset = ack.offset, request_id, "schema log record written");
            match tokio::time::timeout(self.apply_timeout, rx).await {
                Ok(Ok(outcome)) => Ok(outcome),
                Ok(Err(_)) => Err(LogError::ReaderStopped),
                Err(_) => Err(LogError::Timeout(self.apply_timeout)),
            }
        }
        .await;
        self.pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&request_id);
        result
    }

    /// Waits until the reader has applied every record that was in the log when this was
    /// called (startup readiness).
    pub async fn catch_up(&self, cfg: &KafkaConfig, timeout: Duration) -> Result<(), KafkaError> {
        let probe: rdkafka::consumer::BaseConsumer =
            cfg.client_config("pulse-schema-registry-probe").create()?;
        let topic = self.topic.clone();
        let (_low, high) =
            tokio::task::spawn_blocking(move || probe.fetch_watermarks(&topic, 0, timeout))
                .await
                .map_err(|_| KafkaError::Canceled)??;
        let mut applied = self.applied.clone();
        let target = high - 1;
        let wait = applied.wait_for(|&a| a >= target);
        match tokio::time::timeout(timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            _ => Err(KafkaError::Canceled),
        }
    }
}

async fn read_loop(
    consumer: StreamConsumer,
    registry: Arc<RwLock<Registry>>,
    pending: Pending,
    applied: watch::Sender<i64>,
    stop: CancellationToken,
) -> Result<(), KafkaError> {
    loop {
        let msg = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            msg = consumer.recv() => msg,
        };
        let msg = match msg {
            Ok(msg) => msg,
            Err(e) => {
                tracing::warn!(error = %e, "reading the schema log failed; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let offset = msg.offset();
        match msg.payload().map(serde_json::from_slice::<LogRecord>) {
            Some(Ok(record)) => {
                let outcome = apply(&registry, record.clone()).await;
                metrics::counter!(m::LOG_APPLIED_TOTAL, "outcome" => outcome_label(&outcome))
                    .increment(1);
                if matches!(outcome, Outcome::Incompatible(_)) {
                    metrics::counter!(m::COMPATIBILITY_REJECTIONS_TOTAL).increment(1);
                }
                let waiter = pending
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&record.request_id);
                if let Some(tx) = waiter {
                    let _ = tx.send(outcome);
                }
            }
            // Tombstones (no payload) and foreign records are skipped, never fatal.
            None => {}
            Some(Err(e)) => {
                tracing::warn!(offset, error = %e, "skipping a schema log record that is not a Pulse command");
                metrics::counter!(m::LOG_APPLIED_TOTAL, "outcome" => "skipped").increment(1);
            }
        }
        {
            let r = registry.read().unwrap_or_else(|e| e.into_inner());
            metrics::gauge!(m::SUBJECTS).set(r.subjects(false).len() as f64);
            metrics::gauge!(m::SCHEMAS).set(r.schema_count() as f64);
            metrics::gauge!(m::VERSIONS).set(r.version_count() as f64);
        }
        metrics::gauge!(m::LOG_OFFSET).set(offset as f64);
        let _ = applied.send(offset);
    }
}

/// Applies one record: the plan (parsing, compatibility checks) is made on the blocking
/// pool under the read lock, so readers and the async runtime are not held up; only the
/// commit takes the write lock. This task is the registry's only writer, so the state
/// cannot change between the two.
async fn apply(registry: &Arc<RwLock<Registry>>, record: LogRecord) -> Outcome {
    let shared = registry.clone();
    let request_id = record.request_id.clone();
    let planned = tokio::task::spawn_blocking(move || {
        let r = shared.read().unwrap_or_else(|e| e.into_inner());
        (!r.was_applied(&record.request_id)).then(|| r.plan(&record.command))
    })
    .await;
    match planned {
        Ok(Some(plan)) => registry
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .commit(&request_id, plan),
        Ok(None) => Outcome::AlreadyApplied,
        // The planning task panicked (a bug in parsing): nothing was changed.
        Err(e) => Outcome::InvalidSchema(format!("internal error while applying: {e}")),
    }
}

fn outcome_label(o: &Outcome) -> &'static str {
    match o {
        Outcome::Registered { .. } => "registered",
        Outcome::Existing { .. } => "existing",
        Outcome::Incompatible(_) => "incompatible",
        Outcome::InvalidSchema(_) | Outcome::InvalidLevel(_) => "invalid",
        Outcome::SubjectNotFound(_) | Outcome::NotSoftDeleted(_) => "not_found",
        Outcome::Deleted(_) => "deleted",
        Outcome::ConfigSet(_) | Outcome::ConfigDeleted(_) => "config",
        Outcome::AlreadyApplied => "duplicate",
    }
}
