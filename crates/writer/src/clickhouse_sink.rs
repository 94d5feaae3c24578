//! The ClickHouse sink: consumes the events, user-activity and sessions topics in the
//! consumer group `pulse-writer-clickhouse`, batches rows by count, bytes and age, writes
//! them with RowBinary inserts, and marks offsets durable only after ClickHouse accepted
//! the batch. Transient failures are retried with backoff and jitter while consumption is
//! paused (memory stays bounded; a circuit breaker spaces the probes of a dead server);
//! failures that are not about the data (credentials, rights, a missing table) are retried
//! the same way while the sink reports itself blocked (`blocked`): nothing of the batch is
//! dead-lettered or committed. Only rows ClickHouse refuses for what they hold go to the
//! DLQ with the reason. Retries are idempotent: ReplacingMergeTree keys collapse rows
//! written twice. At shutdown the final flush is bounded (`shutdown_timeout`).

use pulse_platform::clock::now_ms;
use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use clickhouse::{Client, RowOwned, RowWrite};
use prost::Message as _;
use pulse_contracts::pb::aggregates::v1::{Session, UserWindowActivity};
use pulse_contracts::pb::events::v1::Event;
use pulse_contracts::{headers, trace_context, wire};
use pulse_platform::Health;
use pulse_platform::kafka::{KafkaConsumer, KafkaProducer, ProduceError};
use rdkafka::Message;
use rdkafka::message::BorrowedMessage;
use tokio_util::sync::CancellationToken;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::batch::{Batch, BatchLimits, Source, commit_points};
use crate::blocked::Blocked;
use crate::metrics as m;
use crate::pause::{self, wait_polling};
use crate::retry::{Backoff, ErrorKind, classify};
use crate::rows::{ActivityRow, EventRow, FreshnessRow, SessionRow};

/// Stage name in the freshness table and metrics.
pub const STAGE: &str = "writer-clickhouse";

#[derive(Debug, Clone)]
pub struct SinkTopics {
    pub events: String,
    pub user_activity: String,
    pub sessions: String,
    pub dlq: String,
}

/// The tables the sink writes: the live ones, or a shadow's copies (`--shadow`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkTables {
    pub events: String,
    pub user_activity: String,
    pub sessions: String,
}

impl Default for SinkTables {
    fn default() -> Self {
        Self {
            events: "events".into(),
            user_activity: "user_activity".into(),
            sessions: "sessions".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("dead-lettering a refused record failed: {0}")]
    Dlq(#[source] ProduceError),
}

/// The sink loop.
pub struct ClickHouseSink {
    /// Deadline of one insert (a hung server counts as a retryable timeout).
    pub insert_timeout: Duration,
    pub client: Client,
    pub consumer: KafkaConsumer,
    pub producer: KafkaProducer,
    pub topics: SinkTopics,
    /// Where each topic's rows go.
    pub tables: SinkTables,
    pub limits: BatchLimits,
    pub backoff: Backoff,
    /// Readiness: 503 with the reason while ClickHouse refuses every write for a reason
    /// that is not about the data. `run` of the service passes its own; a sink built for a
    /// test has a detached one.
    pub health: Health,
    /// How long the final flush at shutdown may take (retries included) before the
    /// unwritten rest is left uncommitted for the next owner.
    pub shutdown_timeout: Duration,
}

impl std::fmt::Debug for ClickHouseSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClickHouseSink")
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Batches {
    events: Batch<EventRow>,
    activity: Batch<ActivityRow>,
    sessions: Batch<SessionRow>,
    /// Per partition of the events topic: (max event time, max ingest time) in the batch.
    freshness: BTreeMap<i32, (i64, i64)>,
    /// Ingest timestamps of the records in the batch (end-to-end latency at commit).
    ingest_ts: Vec<i64>,
    /// Records already dead-lettered (undecodable). Their offsets are committed with the
    /// batch, never before it: committing one alone would also cover the batch's earlier,
    /// still unwritten rows of the same partition.
    skipped: Vec<Source>,
}

impl Batches {
    fn rows(&self) -> usize {
        self.events.len() + self.activity.len() + self.sessions.len()
    }
    fn bytes(&self) -> usize {
        self.events.bytes() + self.activity.bytes() + self.sessions.bytes()
    }
    /// The row or byte limit is reached: nothing more is read until it is written.
    fn is_full(&self, limits: &BatchLimits) -> bool {
        self.rows() >= limits.max_rows || self.bytes() >= limits.max_bytes
    }
    /// When the oldest row reaches the age limit (`None`: nothing buffered).
    fn due_at(&self, limits: &BatchLimits) -> Option<Instant> {
        [
            self.events.due_at(limits),
            self.activity.due_at(limits),
            self.sessions.due_at(limits),
        ]
        .into_iter()
        .flatten()
        .min()
    }
    fn take(&mut self) -> Self {
        std::mem::take(self)
    }
    fn is_due(&self, limits: &BatchLimits, now: Instant) -> bool {
        // Dead-lettered records wait for no more rows: their commit is due with what is
        // buffered (the DLQ copy is already acknowledged).
        !self.skipped.is_empty()
            || self.is_full(limits)
            || self.events.is_due(limits, now)
            || self.activity.is_due(limits, now)
            || self.sessions.is_due(limits, now)
    }
}

async fn insert<R: RowOwned + RowWrite>(
    client: &Client,
    table: &str,
    rows: &[R],
    timeout: Duration,
) -> Result<(), clickhouse::error::Error> {
    // A server that hangs (instead of refusing) must fail the insert too, so that retries,
    // pausing and the circuit breaker apply: without a deadline the loop waits forever
    // while librdkafka keeps prefetching (measured: +64 MiB RSS during a 30 s freeze).
    let write = async {
        let mut ins = client.insert::<R>(table).await?;
        for r in rows {
            ins.write(r).await?;
        }
        ins.end().await
    };
    tokio::time::timeout(timeout, write)
        .await
        .unwrap_or(Err(clickhouse::error::Error::TimedOut))
}

/// A flush in flight: it owns the [`TableWriter`] and hands it back with its outcome
/// (`Ok(false)`: stopped while ClickHouse was failing, nothing of the batch committed).
type Flushing = Pin<Box<dyn Future<Output = (TableWriter, Result<bool, SinkError>)> + Send>>;

impl ClickHouseSink {
    /// Runs until `stop`; then writes what is buffered and commits.
    pub async fn run(mut self, stop: CancellationToken) -> Result<(), SinkError> {
        let result = self.run_loop(stop).await;
        let consumer = self.consumer.clone();
        drop(self);
        consumer.close_after(result).await
    }

    /// The part of the sink that writes a batch (ClickHouse, retries, the DLQ for refused
    /// rows, offsets), moved into each flush.
    fn table_writer(&self) -> TableWriter {
        TableWriter {
            insert_timeout: self.insert_timeout,
            client: self.client.clone(),
            consumer: self.consumer.clone(),
            producer: self.producer.clone(),
            dlq: self.topics.dlq.clone(),
            tables: self.tables.clone(),
            backoff: self.backoff.clone(),
            blocked: Blocked::new("clickhouse", self.health.clone()),
            retrying: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Reads records into a batch while the previous batch is written: one flush at a time
    /// (offsets are marked in order), and the next batch is not read past its limits
    /// meanwhile (at most two batches in memory). While a flush retries a failure,
    /// consumption is paused and nothing is read. A batch is flushed once it is due (rows,
    /// bytes, age — at its exact age, not on a coarse tick) and no flush is in flight.
    async fn run_loop(&mut self, stop: CancellationToken) -> Result<(), SinkError> {
        let mut idle = Some(self.table_writer());
        let retrying = idle
            .as_ref()
            .map(|w| w.retrying.clone())
            .unwrap_or_default();
        let mut flushing: Option<Flushing> = None;
        let mut batches = Batches::default();
        let consumer = self.consumer.clone();
        // `false` once a flush stopped before its batch was written: what was read after it
        // must not be committed either (its offsets would cover the unwritten ones).
        let mut all_written = true;
        // One timer, moved to the buffered rows' due time when that changes.
        let far = || Instant::now() + Duration::from_secs(3_600);
        let age = tokio::time::sleep_until(far().into());
        tokio::pin!(age);
        let mut armed: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if flushing.is_none()
                && batches.is_due(&self.limits, now)
                && let Some(writer) = idle.take()
            {
                let batch = batches.take();
                let stop = stop.clone();
                flushing = Some(Box::pin(async move {
                    let mut writer = writer;
                    let result = writer.flush(batch, &stop).await;
                    (writer, result)
                }));
            }
            let reading = !batches.is_full(&self.limits) && !retrying.load(Ordering::Relaxed);
            let due_at = batches.due_at(&self.limits);
            if due_at != armed {
                age.as_mut().reset(due_at.unwrap_or_else(far).into());
                armed = due_at;
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                (writer, result) = async {
                    match flushing.as_mut() {
                        Some(f) => f.await,
                        None => std::future::pending().await,
                    }
                }, if flushing.is_some() => {
                    flushing = None;
                    idle = Some(writer);
                    if !result? {
                        all_written = false;
                        break;
                    }
                }
                _ = &mut age, if flushing.is_none() && armed.is_some() => {}
                msg = consumer.recv(), if reading => {
                    match msg {
                        Ok(msg) => self.add(&msg, &mut batches).await?,
                        Err(e) => tracing::warn!(error = %e, "consume failed"),
                    }
                }
            }
        }
        // Shutdown: finish the flush in flight and write what is buffered, but for at most
        // `shutdown_timeout` together (an insert in flight is abandoned then): what is not
        // written is not committed, and the next owner re-reads it. The offsets of what was
        // written are committed.
        let timeout = self.shutdown_timeout;
        let rows = batches.rows();
        let never = CancellationToken::new();
        let last = async {
            if let Some(f) = flushing.take() {
                let (writer, result) = f.await;
                idle = Some(writer);
                all_written &= result?;
            }
            match idle.as_mut() {
                Some(writer) if all_written => writer.flush(batches, &never).await.map(|_| ()),
                _ => Ok(()),
            }
        };
        match tokio::time::timeout(timeout, last).await {
            Ok(result) => result?,
            Err(_) => tracing::warn!(
                timeout_ms = timeout.as_millis() as u64,
                rows,
                "shutdown: ClickHouse did not take the last batch in time; it stays uncommitted and is re-read by the next owner"
            ),
        }
        self.consumer.commit_now()?;
        Ok(())
    }

    async fn add(&self, msg: &BorrowedMessage<'_>, b: &mut Batches) -> Result<(), SinkError> {
        let now = Instant::now();
        let topic = msg.topic().to_owned();
        let value = msg.payload().unwrap_or_default();
        let source = Source {
            topic: topic.clone(),
            partition: msg.partition(),
            offset: msg.offset(),
            value: value.to_vec(),
        };
        let written_at = now_ms();
        let decoded = wire::unframe(value)
            .map_err(|e| e.to_string())
            .map(|f| f.payload);
        let ingest_ts = msg.headers().and_then(headers::ingest_ts_ms);
        if let Some(ts) = ingest_ts {
            b.ingest_ts.push(ts);
        }
        // One span per record, continuing the trace that came with it (ingest request →
        // processor → this writer), like the processor's per-record span.
        let span = tracing::info_span!(
            "writer.record",
            sink = "clickhouse",
            topic = %topic,
            partition = msg.partition(),
            offset = msg.offset()
        );
        let _ = span.set_parent(trace_context::extract(msg.headers()));
        let entered = span.enter();
        let result: Result<(), String> = decoded.and_then(|payload| {
            if topic == self.topics.events {
                let e = Event::decode(payload).map_err(|e| e.to_string())?;
                let trace = trace_context::trace_id_hex(&trace_context::extract(msg.headers()));
                let row = EventRow::from_event(
                    &e,
                    msg.partition(),
                    msg.offset(),
                    trace.as_deref(),
                    written_at,
                );
                let ev_ms = e
                    .metadata
                    .as_ref()
                    .map(|m| m.event_timestamp_ms)
                    .unwrap_or(0);
                let ing_ms = ingest_ts.unwrap_or(0);
                let f = b
                    .freshness
                    .entry(msg.partition())
                    .or_insert((ev_ms, ing_ms));
                *f = (f.0.max(ev_ms), f.1.max(ing_ms));
                b.events.push(row, source.clone(), now);
            } else if topic == self.topics.user_activity {
                let a = UserWindowActivity::decode(payload).map_err(|e| e.to_string())?;
                b.activity.push(
                    ActivityRow::from_activity(&a, written_at),
                    source.clone(),
                    now,
                );
            } else if topic == self.topics.sessions {
                let s = Session::decode(payload).map_err(|e| e.to_string())?;
                b.sessions.push(
                    SessionRow::from_session(&s, written_at),
                    source.clone(),
                    now,
                );
            } else {
                return Err(format!("unexpected topic {topic}"));
            }
            Ok(())
        });
        drop(entered); // never held across the await below
        if let Err(reason) = result {
            // Not a record this sink can store: kept on the DLQ, never dropped.
            dead_letter(
                &self.producer,
                &self.topics.dlq,
                &source,
                "undecodable",
                &reason,
            )
            .await?;
            b.skipped.push(Source {
                value: Vec::new(),
                ..source
            });
        }
        Ok(())
    }
}

/// `source`'s record to the DLQ topic `dlq` as refused by this sink, with `code` and `detail`
/// (the sink's undecodable records and the rows ClickHouse refused).
async fn dead_letter(
    producer: &KafkaProducer,
    dlq: &str,
    source: &Source,
    code: &str,
    detail: &str,
) -> Result<(), SinkError> {
    crate::dlq::dead_letter(
        producer,
        dlq,
        "clickhouse",
        &source.topic,
        source.value.clone(),
        code,
        detail,
    )
    .await
    .map_err(SinkError::Dlq)
}

/// Writes batches: the inserts with their retries (paused consumption, backoff, circuit
/// breaker, the blocked state), refused rows to the DLQ, and the offsets of what is
/// durable. Moved into the flush in flight and back.
struct TableWriter {
    insert_timeout: Duration,
    client: Client,
    consumer: KafkaConsumer,
    producer: KafkaProducer,
    dlq: String,
    tables: SinkTables,
    backoff: Backoff,
    blocked: Blocked,
    /// Set while a write waits to retry (consumption is paused): the loop reads nothing
    /// then. Cleared by the next successful write.
    retrying: Arc<AtomicBool>,
}

impl TableWriter {
    /// Writes one table's batch, retrying transient and blocking failures until it succeeds
    /// (or `stop` ends a wait: then the batch stays unwritten and uncommitted, and `false`
    /// is returned). Rows refused for what they hold are written one by one and the
    /// failing ones dead-lettered.
    async fn write<R: RowOwned + RowWrite>(
        &mut self,
        table: &str,
        batch: Batch<R>,
        stop: &CancellationToken,
    ) -> Result<bool, SinkError> {
        if batch.is_empty() {
            return Ok(true);
        }
        let started = Instant::now();
        loop {
            match insert(&self.client, table, &batch.rows, self.insert_timeout).await {
                Ok(()) => {
                    self.succeeded();
                    metrics::counter!(m::ROWS_WRITTEN_TOTAL, "sink" => "clickhouse", "table" => table.to_owned())
                        .increment(batch.len() as u64);
                    metrics::histogram!(m::BATCH_ROWS, "sink" => "clickhouse", "table" => table.to_owned())
                        .record(batch.len() as f64);
                    metrics::histogram!(m::BATCH_BYTES, "sink" => "clickhouse", "table" => table.to_owned())
                        .record(batch.bytes() as f64);
                    metrics::histogram!(m::BATCH_SECONDS, "sink" => "clickhouse")
                        .record(started.elapsed().as_secs_f64());
                    return Ok(true);
                }
                Err(e) => {
                    let kind = classify(&e);
                    metrics::counter!(m::ERRORS_TOTAL, "sink" => "clickhouse", "kind" => kind.as_str()).increment(1);
                    if kind == ErrorKind::Row {
                        tracing::warn!(table, error = %e, rows = batch.len(), "ClickHouse refused the batch's data; isolating the bad rows");
                        return self.write_one_by_one(table, batch, stop).await;
                    }
                    if !self.retry_wait(table, kind, &e, batch.len(), stop).await? {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// After a transient or blocking failure: pauses consumption, reports a blocking one,
    /// and waits the backoff while polling the consumer. `false` if `stop` ended the wait.
    async fn retry_wait(
        &mut self,
        table: &str,
        kind: ErrorKind,
        e: &clickhouse::error::Error,
        rows: usize,
        stop: &CancellationToken,
    ) -> Result<bool, SinkError> {
        self.retrying.store(true, Ordering::Relaxed);
        let wait = pause::failed(
            &self.consumer,
            &mut self.backoff,
            &mut self.blocked,
            "clickhouse",
            kind,
            e,
        );
        tracing::warn!(table, kind = kind.as_str(), error = %e, rows, wait_ms = wait.as_millis() as u64, failures = self.backoff.failures(), "ClickHouse write failed; retrying");
        Ok(wait_polling(&self.consumer, wait, stop).await?)
    }

    fn succeeded(&mut self) {
        self.retrying.store(false, Ordering::Relaxed);
        pause::succeeded(
            &self.consumer,
            &mut self.backoff,
            &mut self.blocked,
            "clickhouse",
        );
    }

    /// Inserts each row alone: a row refused for what it holds goes to the DLQ; any other
    /// failure is retried (with backoff, paused, blocked if it is not about the data) until
    /// the row is written or refused for good. `false` if `stop` ended a wait (the batch is
    /// then not committed; the rows written or dead-lettered so far are again after the
    /// re-read).
    async fn write_one_by_one<R: RowOwned + RowWrite>(
        &mut self,
        table: &str,
        batch: Batch<R>,
        stop: &CancellationToken,
    ) -> Result<bool, SinkError> {
        for (row, source) in batch.rows.iter().zip(&batch.sources) {
            loop {
                let Err(e) = insert(
                    &self.client,
                    table,
                    std::slice::from_ref(row),
                    self.insert_timeout,
                )
                .await
                else {
                    self.succeeded();
                    metrics::counter!(m::ROWS_WRITTEN_TOTAL, "sink" => "clickhouse", "table" => table.to_owned())
                        .increment(1);
                    break;
                };
                let kind = classify(&e);
                if kind == ErrorKind::Row {
                    dead_letter(
                        &self.producer,
                        &self.dlq,
                        source,
                        "rejected_by_clickhouse",
                        &e.to_string(),
                    )
                    .await?;
                    break;
                }
                metrics::counter!(m::ERRORS_TOTAL, "sink" => "clickhouse", "kind" => kind.as_str())
                    .increment(1);
                if !self.retry_wait(table, kind, &e, 1, stop).await? {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Writes every table's batch; only when all are durable are the offsets marked. The
    /// aggregates go first: what the query API reads is visible without waiting for the
    /// raw events' insert. `Ok(false)`: `stop` ended a retry wait, nothing of `b` is
    /// committed (the next owner re-reads and rewrites it, idempotently).
    async fn flush(&mut self, mut b: Batches, stop: &CancellationToken) -> Result<bool, SinkError> {
        if b.rows() == 0 {
            // Only dead-lettered records: nothing earlier is pending, commit them.
            for ((topic, partition), offset) in commit_points(&b.skipped) {
                self.mark_durable(&topic, partition, offset);
            }
            return Ok(true);
        }
        let points = commit_points(
            b.events
                .sources
                .iter()
                .chain(&b.activity.sources)
                .chain(&b.sessions.sources)
                .chain(&b.skipped),
        );
        let tables = self.tables.clone();
        let ok = self
            .write(&tables.user_activity, b.activity.take(), stop)
            .await?
            && self
                .write(&tables.sessions, b.sessions.take(), stop)
                .await?
            && self.write(&tables.events, b.events.take(), stop).await?;
        if !ok {
            return Ok(false);
        }
        let written_at = now_ms();
        let fresh = FreshnessRow::for_partitions(STAGE, b.freshness, written_at);
        m::record_freshness("clickhouse", &fresh);
        if !fresh.is_empty()
            && let Err(e) = insert(&self.client, "freshness", &fresh, self.insert_timeout).await
        {
            tracing::warn!(error = %e, "writing freshness rows failed (data rows are written)");
        }
        for ((topic, partition), offset) in points {
            self.mark_durable(&topic, partition, offset);
        }
        for ts in b.ingest_ts {
            metrics::histogram!(m::END_TO_END_SECONDS, "sink" => "clickhouse")
                .record((written_at - ts).max(0) as f64 / 1000.0);
        }
        Ok(true)
    }

    /// Stores a written record's offset for the next commit. A partition revoked meanwhile
    /// (a rebalance during a long retry) refuses it: its next owner re-reads from the last
    /// commit and rewrites the rows idempotently.
    fn mark_durable(&self, topic: &str, partition: i32, offset: i64) {
        if let Err(e) = self.consumer.mark_durable(topic, partition, offset) {
            metrics::counter!(m::ERRORS_TOTAL, "sink" => "clickhouse", "kind" => "commit")
                .increment(1);
            tracing::warn!(topic, partition, offset, error = %e, "marking offsets durable failed");
        }
    }
}
