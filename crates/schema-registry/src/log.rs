//! The `_schemas` log: proposing commands (produce, then wait until this replica has
//! read its own record back and applied it), the reader that applies every record from
//! the beginning of the log to the local [`Registry`], in log order, and the settler that
//! keeps the log bounded.
//!
//! Records (keys are JSON, see [`RecordKey`]): a command (`keytype` COMMAND, a unique
//! request id; the only kind the previous release wrote, and still read) is decided by
//! every replica in log order. Once decided, the proposer *settles* it: it writes the
//! resulting facts under stable keys (ID, SCHEMA per subject version, CONFIG per subject)
//! and then a tombstone for the command's key, so compaction keeps one record per key
//! and drops the commands. A command whose proposer died before settling is settled by
//! any replica that still sees it unsettled one settle interval later (and by every
//! replica right after start, which also converts a log written by the previous
//! release). A record delivered twice is applied once.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use pulse_platform::kafka::{KafkaConfig, KafkaProducer, OutRecord, ProduceError, RecordProducer};
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tokio::sync::{oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::metrics as m;
use crate::store::{Command, Fact, Outcome, RecordKey, Registry};

/// How often every replica settles what another replica left unsettled (a command or a
/// key still unsettled at two ticks in a row).
pub const SETTLE_INTERVAL: Duration = Duration::from_secs(10);
/// The log reader's `fetch.wait.max.ms` unless an extra Kafka option sets it.
const READER_FETCH_WAIT_MS: &str = "100";

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
    #[error("settling the schema log: {0}")]
    Settle(#[source] KafkaError),
}

/// The producer of facts and tombstones.
#[derive(Clone)]
struct Settler(FutureProducer);

impl std::fmt::Debug for Settler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Settler")
    }
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
    /// Writes facts and tombstones (a tombstone has no value, which `KafkaProducer`
    /// cannot send).
    settler: Settler,
    /// One settle at a time per replica (fewer duplicate facts).
    settling: Arc<tokio::sync::Mutex<()>>,
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
        let mut sc = cfg.client_config("pulse-schema-registry-settle");
        sc.set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "5")
            .set("message.timeout.ms", cfg.message_timeout_ms.to_string());
        cfg.apply_options(&mut sc);
        let settler = Settler(sc.create()?);
        let mut c = cfg.consumer_client_config("pulse-schema-registry-reader");
        // Every replica reads the whole log; no group offsets are committed.
        c.set(
            "group.id",
            format!("pulse-schema-registry-{}", uuid::Uuid::new_v4()),
        )
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("auto.offset.reset", "earliest");
        // A write is answered when this reader has read it back: a broker that holds an
        // empty fetch for its whole wait (Tansu) would add up to the default 500 ms to
        // every write. An idle replica then fetches 10 times a second. `--kafka-option`
        // still wins.
        if !cfg.parsed_options().any(|(k, _)| k == "fetch.wait.max.ms") {
            c.set("fetch.wait.max.ms", READER_FETCH_WAIT_MS);
        }
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
                settler,
                settling: Arc::default(),
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
        // The same bytes as the previous release's key (its tombstone must match them).
        let key = serde_json::to_vec(&RecordKey::Command {
            request_id: request_id.clone(),
        })?;
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
        if result.is_ok() {
            // The outcome is decided and answered now; writing its facts (which only bounds
            // the log) runs behind the answer. If it fails, the settle loop retries.
            let log = self.clone();
            tokio::spawn(async move {
                if let Err(e) = log.settle(None).await {
                    tracing::warn!(error = %e, "settling the schema log failed; the settle loop retries");
                }
            });
        }
        result
    }

    /// Writes the facts of dirty keys and, after them, tombstones for the commands those
    /// facts settle; then waits until this replica has applied them. `only`: restrict to
    /// these keys and commands (the settle loop passes what was unsettled at its previous
    /// tick). Returns the number of records written.
    pub async fn settle(
        &self,
        only: Option<&(BTreeSet<RecordKey>, BTreeSet<String>)>,
    ) -> Result<usize, LogError> {
        let _one = self.settling.lock().await;
        let (facts, commands) = {
            let r = self.registry.read().unwrap_or_else(|e| e.into_inner());
            let facts = r.facts_to_write(only.map(|o| &o.0));
            let writing: BTreeSet<RecordKey> = facts.iter().map(Fact::key).collect();
            let commands = r.settleable(only.map(|o| &o.1), &writing);
            (facts, commands)
        };
        let mut records = Vec::with_capacity(facts.len() + commands.len());
        for fact in &facts {
            records.push((
                serde_json::to_vec(&fact.key())?,
                Some(serde_json::to_vec(fact)?),
            ));
        }
        for request_id in commands {
            records.push((
                serde_json::to_vec(&RecordKey::Command { request_id })?,
                None,
            ));
        }
        self.write_and_wait(records).await
    }

    /// Produces `(key, value)` records (`None`: a tombstone), then waits until this
    /// replica's reader has applied the last one.
    async fn write_and_wait(
        &self,
        records: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    ) -> Result<usize, LogError> {
        let mut acks = Vec::with_capacity(records.len());
        for (key, value) in &records {
            let mut r = FutureRecord::<[u8], [u8]>::to(&self.topic).key(key);
            if let Some(v) = value {
                r = r.payload(v);
            }
            let ack = self
                .settler
                .0
                .send_result(r)
                .map_err(|(e, _)| LogError::Settle(e))?;
            acks.push(ack);
        }
        let mut last = -1;
        for ack in acks {
            match ack.await {
                Ok(Ok(delivered)) => last = last.max(delivered.offset),
                Ok(Err((e, _))) => return Err(LogError::Settle(e)),
                Err(_) => return Err(LogError::Settle(KafkaError::Canceled)),
            }
        }
        let tombstones = records.iter().filter(|(_, v)| v.is_none()).count() as u64;
        metrics::counter!(m::LOG_SETTLED_TOTAL, "kind" => "tombstone").increment(tombstones);
        metrics::counter!(m::LOG_SETTLED_TOTAL, "kind" => "fact")
            .increment(records.len() as u64 - tombstones);
        if last >= 0 {
            let mut applied = self.applied.clone();
            match tokio::time::timeout(self.apply_timeout, applied.wait_for(|&a| a >= last)).await {
                Ok(Ok(_)) => {}
                Ok(Err(_)) => return Err(LogError::ReaderStopped),
                Err(_) => return Err(LogError::Timeout(self.apply_timeout)),
            }
        }
        Ok(records.len())
    }

    /// Settles everything now (start: also converts a log of the previous release), then
    /// every `every` what was still unsettled at the previous tick, until `stop`.
    pub fn spawn_settler(
        &self,
        every: Duration,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        let log = self.clone();
        tokio::spawn(async move {
            let mut previous = None;
            loop {
                match log.settle(previous.as_ref()).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(records = n, "schema log settled"),
                    Err(e) => {
                        tracing::warn!(error = %e, "settling the schema log failed; retrying at the next tick")
                    }
                }
                export_gauges(&log.registry);
                let now = log
                    .registry
                    .read()
                    .unwrap_or_else(|e| e.into_inner())
                    .unsettled();
                metrics::gauge!(m::LOG_UNSETTLED).set((now.0.len() + now.1.len()) as f64);
                previous = Some(now);
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
            }
        })
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
    let mut gauges_at: Option<Instant> = None;
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
        let key = msg
            .key()
            .and_then(|k| serde_json::from_slice::<RecordKey>(k).ok());
        match (key, msg.payload()) {
            // A settled command's tombstone.
            (Some(RecordKey::Command { request_id }), None) => {
                registry
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .settled(&request_id);
                metrics::counter!(m::LOG_APPLIED_TOTAL, "outcome" => "tombstone").increment(1);
            }
            (Some(RecordKey::Command { .. }) | None, Some(payload)) => {
                match serde_json::from_slice::<LogRecord>(payload) {
                    Ok(record) => {
                        let outcome = apply(&registry, record.clone(), offset).await;
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
                    Err(e) => skip(offset, &e),
                }
            }
            (Some(key), Some(payload)) => match serde_json::from_slice::<Fact>(payload) {
                Ok(fact) if fact.key() == key => {
                    registry
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .apply_fact(fact);
                    metrics::counter!(m::LOG_APPLIED_TOTAL, "outcome" => "fact").increment(1);
                }
                Ok(_) => skip(offset, &"the value's key differs from the record's key"),
                Err(e) => skip(offset, &e),
            },
            // Other tombstones (we write none for facts) and keyless empty records.
            (_, None) => {}
        }
        // Counting is O(subjects): at most 4 times a second while replaying (and at every
        // settle tick, so a burst's last state is exported too).
        if gauges_at.is_none_or(|t| t.elapsed() >= Duration::from_millis(250)) {
            gauges_at = Some(Instant::now());
            export_gauges(&registry);
        }
        metrics::gauge!(m::LOG_OFFSET).set(offset as f64);
        let _ = applied.send(offset);
    }
}

fn export_gauges(registry: &RwLock<Registry>) {
    let r = registry.read().unwrap_or_else(|e| e.into_inner());
    metrics::gauge!(m::SUBJECTS).set(r.subjects(false).len() as f64);
    metrics::gauge!(m::SCHEMAS).set(r.schema_count() as f64);
    metrics::gauge!(m::VERSIONS).set(r.version_count() as f64);
}

fn skip(offset: i64, error: &dyn std::fmt::Display) {
    tracing::warn!(offset, error = %error, "skipping a schema log record that is not a Pulse record");
    metrics::counter!(m::LOG_APPLIED_TOTAL, "outcome" => "skipped").increment(1);
}

/// Applies one command record at `offset`: the plan (parsing, compatibility checks) is
/// made on the blocking pool under the read lock, so readers and the async runtime are
/// not held up; only the commit takes the write lock. This task is the registry's only
/// writer, so the state cannot change between the two.
async fn apply(registry: &Arc<RwLock<Registry>>, record: LogRecord, offset: i64) -> Outcome {
    let shared = registry.clone();
    let request_id = record.request_id.clone();
    let planned = tokio::task::spawn_blocking(move || {
        let r = shared.read().unwrap_or_else(|e| e.into_inner());
        (!r.was_applied(&record.request_id)).then(|| r.plan(&record.command))
    })
    .await;
    match planned {
        Ok(Some(plan)) => {
            registry
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .commit(&request_id, offset, plan)
        }
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
