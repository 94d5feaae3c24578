//! The Parquet sink: consumes raw events (`pulse.events.v1`) in the consumer group
//! `pulse-writer-parquet` and archives them on S3. Rows collect in a *roll* until it is
//! due by rows, record bytes or age; the roll is written as one Parquet object per
//! (partition, UTC hour of event time), named from the topic, partition and offsets (see
//! `archive`), and only after S3 confirmed every object are the offsets marked durable and
//! committed. Failed uploads are retried with backoff and jitter while consumption is
//! paused; a retried roll overwrites the same objects. Refusals that are not transient
//! (credentials, a missing bucket) are retried too, with the sink reported blocked
//! (`blocked`). At shutdown the last roll is bounded by `shutdown_timeout`. Undecodable
//! records go to the DLQ.
//! After each roll a best-effort `freshness` row per partition goes to ClickHouse.

use pulse_platform::clock::now_ms;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use prost::Message as _;
use pulse_contracts::pb::events::v1::Event;
use pulse_contracts::{headers, trace_context, wire};
use pulse_platform::Health;
use pulse_platform::kafka::{KafkaConsumer, KafkaProducer, ProduceError, RebalanceEvent};
use pulse_platform::s3::S3Config;
use rdkafka::Message;
use rdkafka::message::BorrowedMessage;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

use crate::archive::{self, ArchiveError, ArchiveRow, HourBucket};
use crate::batch::BatchLimits;
use crate::blocked::Blocked;
use crate::metrics as m;
use crate::pause::{self, wait_polling};
use crate::retry::{Backoff, BlockReason, ErrorKind};
use crate::rows::FreshnessRow;

/// Stage name in the freshness table.
pub const STAGE: &str = "writer-parquet";
/// `sink` label of the metrics.
const SINK: &str = "parquet";
/// How long one freshness insert may take before it is abandoned.
const FRESHNESS_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ParquetTopics {
    pub events: String,
    pub dlq: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ParquetSinkError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error("dead-lettering an undecodable record failed: {0}")]
    Dlq(#[source] ProduceError),
    #[error("encoding a Parquet object failed (a bug; nothing was committed): {0}")]
    Encode(#[from] ArchiveError),
    #[error("the encoding task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// What an S3 failure means. Every failure is retried (an archive never drops data, and
/// an upload is never about one row); `Blocking` ones (credentials, rights, a missing
/// bucket) need an operator, and the sink reports itself blocked meanwhile.
pub fn classify_s3(err: &object_store::Error) -> ErrorKind {
    use object_store::Error as E;
    match err {
        // A put answered 404: the bucket does not exist (keys are created, never looked up).
        E::NotFound { .. } => ErrorKind::Blocking(BlockReason::MissingBucket),
        E::Unauthenticated { .. } => ErrorKind::Blocking(BlockReason::Authentication),
        E::PermissionDenied { .. } => ErrorKind::Blocking(s3_refusal(&err.to_string())),
        E::InvalidPath { .. }
        | E::NotSupported { .. }
        | E::NotImplemented { .. }
        | E::UnknownConfigurationKey { .. } => ErrorKind::Blocking(BlockReason::Server),
        // Other statuses keep the S3 error code in the message.
        _ => {
            let text = err.to_string();
            if text.contains("NoSuchBucket") {
                ErrorKind::Blocking(BlockReason::MissingBucket)
            } else if [
                "InvalidAccessKeyId",
                "SignatureDoesNotMatch",
                "NotSignedUp",
                "AccessDenied",
            ]
            .iter()
            .any(|c| text.contains(c))
            {
                ErrorKind::Blocking(s3_refusal(&text))
            } else {
                ErrorKind::Retryable
            }
        }
    }
}

/// A 403: bad keys or signature (`InvalidAccessKeyId`, `SignatureDoesNotMatch`; s3s
/// answers an unknown key with `NotSignedUp`), else
/// missing rights.
fn s3_refusal(text: &str) -> BlockReason {
    if ["InvalidAccessKeyId", "SignatureDoesNotMatch", "NotSignedUp"]
        .iter()
        .any(|c| text.contains(c))
    {
        BlockReason::Authentication
    } else {
        BlockReason::AccessDenied
    }
}

/// Per partition: (max event time, max ingest time) archived so far.
type Freshness = BTreeMap<i32, (i64, i64)>;

/// Bytes the allocator hands out for a request of `cap` bytes (glibc: 8 bytes of header,
/// 16-byte steps, 32 at least).
fn alloc_bytes(cap: usize) -> usize {
    if cap == 0 {
        0
    } else {
        (cap + 8).next_multiple_of(16).max(32)
    }
}

/// Per row, what encoding adds besides the copies of its strings and protobuf: the Arrow
/// offsets and fixed-width values of every column, and the Parquet writer's page buffers.
const ENCODE_ROW_OVERHEAD: usize = 160;

/// The estimated memory one buffered row holds until its roll is uploaded: its heap
/// allocations (every string, the properties, the raw protobuf) and its share of the copy
/// the encoding makes (the Arrow columns hold its strings and protobuf again; the Parquet
/// output is reserved at half the protobuf bytes). The row itself is counted by its
/// group's `Vec` capacity ([`Roll::buffered_bytes`]).
fn row_footprint(row: &ArchiveRow) -> usize {
    let strings = [
        &row.event_id,
        &row.event_type,
        &row.user_id,
        &row.session_id,
        &row.page,
        &row.referrer,
        &row.currency,
        &row.trace_id,
        &row.source,
        &row.ingest_source,
        &row.kafka_topic,
    ];
    let mut text: usize = strings.iter().map(|s| s.len()).sum();
    let mut heap: usize = strings.iter().map(|s| alloc_bytes(s.capacity())).sum();
    heap += alloc_bytes(row.properties.capacity() * std::mem::size_of::<(String, String)>());
    for (k, v) in &row.properties {
        text += k.len() + v.len();
        heap += alloc_bytes(k.capacity()) + alloc_bytes(v.capacity());
    }
    if let Some(t) = &row.source_trace_id {
        text += t.len();
        heap += alloc_bytes(t.capacity());
    }
    let proto = row.event_proto.len();
    heap += alloc_bytes(row.event_proto.capacity());
    heap + text + proto + proto / 2 + ENCODE_ROW_OVERHEAD
}

/// The objects of a roll are keyed by partition and hour (the topic is the events topic).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct FileKey {
    partition: i32,
    bucket: HourBucket,
}

/// The rows of one object, and the trace context of its first record.
#[derive(Debug)]
struct Group {
    rows: Vec<ArchiveRow>,
    /// Record bytes of the rows (as read from Kafka).
    bytes: usize,
    /// The rows' [`row_footprint`]s.
    footprint: usize,
    parent: opentelemetry::Context,
}

/// What has been read since the last confirmed upload.
#[derive(Debug, Default)]
struct Roll {
    groups: BTreeMap<FileKey, Group>,
    rows: usize,
    bytes: usize,
    started: Option<Instant>,
    /// Per partition: the highest offset handled (rows and dead-lettered records).
    done: BTreeMap<i32, i64>,
    /// Per partition: (max event time, max ingest time) of the rows.
    freshness: BTreeMap<i32, (i64, i64)>,
    /// (partition, ingest timestamp) of the rows (end-to-end latency at commit).
    ingest_ts: Vec<(i32, i64)>,
}

impl Roll {
    fn is_empty(&self) -> bool {
        self.done.is_empty()
    }

    /// The estimated memory the roll holds (see [`row_footprint`]), the rows' slots in
    /// their groups' vectors included (by capacity, as allocated).
    fn buffered_bytes(&self) -> usize {
        let groups: usize = self
            .groups
            .values()
            .map(|g| g.footprint + g.rows.capacity() * std::mem::size_of::<ArchiveRow>())
            .sum();
        groups + self.ingest_ts.capacity() * std::mem::size_of::<(i32, i64)>()
    }

    fn is_full(&self, limits: &RollLimits) -> bool {
        self.rows >= limits.batch.max_rows
            || self.bytes >= limits.batch.max_bytes
            || self.buffered_bytes() >= limits.max_buffer_bytes
    }

    fn is_due(&self, limits: &RollLimits, now: Instant) -> bool {
        !self.is_empty()
            && (self.is_full(limits)
                || self
                    .started
                    .is_some_and(|s| now.duration_since(s) >= limits.batch.max_age))
    }

    fn mark_done(&mut self, partition: i32, offset: i64, now: Instant) {
        self.started.get_or_insert(now);
        let e = self.done.entry(partition).or_insert(offset);
        *e = (*e).max(offset);
    }

    fn push(
        &mut self,
        row: ArchiveRow,
        parent: impl FnOnce() -> opentelemetry::Context,
        record_bytes: usize,
        ingest_ts: Option<i64>,
        now: Instant,
    ) {
        let partition = row.kafka_partition;
        self.mark_done(partition, row.kafka_offset, now);
        let f = self
            .freshness
            .entry(partition)
            .or_insert((row.event_time_ms, row.ingest_time_ms));
        *f = (f.0.max(row.event_time_ms), f.1.max(row.ingest_time_ms));
        if let Some(ts) = ingest_ts {
            self.ingest_ts.push((partition, ts));
        }
        self.rows += 1;
        self.bytes += record_bytes;
        let key = FileKey {
            partition,
            bucket: archive::hour_bucket(row.event_time_ms),
        };
        let group = self.groups.entry(key).or_insert_with(|| Group {
            rows: Vec::new(),
            bytes: 0,
            footprint: 0,
            parent: parent(),
        });
        group.footprint += row_footprint(&row);
        group.rows.push(row);
        group.bytes += record_bytes;
    }

    /// Forgets the rows of partitions taken away in a rebalance: their next owner re-reads
    /// them from the last commit, so uploading them here would only duplicate them.
    fn revoke(&mut self, partitions: &[i32]) {
        self.groups
            .retain(|k, _| !partitions.contains(&k.partition));
        self.done.retain(|p, _| !partitions.contains(p));
        self.freshness.retain(|p, _| !partitions.contains(p));
        self.ingest_ts.retain(|(p, _)| !partitions.contains(p));
        self.rows = self.groups.values().map(|g| g.rows.len()).sum();
        self.bytes = self.groups.values().map(|g| g.bytes).sum();
        if self.done.is_empty() {
            self.started = None;
        }
    }
}

/// When a roll is written: at `batch.max_rows` rows, `batch.max_bytes` record bytes or
/// `batch.max_age`, or once its estimated memory ([`row_footprint`]: the decoded rows and
/// the copy their encoding makes) reaches `max_buffer_bytes` — the knob that bounds the
/// sink's memory whatever the rows look like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollLimits {
    pub batch: BatchLimits,
    pub max_buffer_bytes: usize,
}

/// The sink loop.
pub struct ParquetSink {
    pub store: Arc<dyn ObjectStore>,
    /// Bucket settings; object keys go under its prefix.
    pub s3: S3Config,
    pub consumer: KafkaConsumer,
    pub rebalances: mpsc::UnboundedReceiver<RebalanceEvent>,
    pub producer: KafkaProducer,
    pub topics: ParquetTopics,
    pub limits: RollLimits,
    pub backoff: Backoff,
    /// Where freshness rows go (`None`: not written).
    pub freshness: Option<clickhouse::Client>,
    /// Readiness: 503 with the reason while S3 refuses uploads (credentials, bucket).
    pub health: Health,
    /// How long writing the last roll at shutdown may take, retries included.
    pub shutdown_timeout: Duration,
}

impl std::fmt::Debug for ParquetSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParquetSink")
            .field("s3", &self.s3)
            .field("topics", &self.topics)
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl ParquetSink {
    /// Runs until `stop`; then writes the current roll and commits.
    pub async fn run(mut self, stop: CancellationToken) -> Result<(), ParquetSinkError> {
        let result = self.run_loop(stop).await;
        let consumer = self.consumer.clone();
        drop(self);
        consumer.close_after(result).await
    }

    async fn run_loop(&mut self, stop: CancellationToken) -> Result<(), ParquetSinkError> {
        let mut blocked = Blocked::new(SINK, self.health.clone());
        let mut roll = Roll::default();
        let mut high = Freshness::new();
        let consumer = self.consumer.clone();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    if roll.is_due(&self.limits, Instant::now()) {
                        self.write_roll(std::mem::take(&mut roll), &mut high, &mut blocked, &stop).await?;
                    }
                }
                Some(event) = self.rebalances.recv() => {
                    if let RebalanceEvent::Revoked(parts) = event {
                        let mine: Vec<i32> = parts
                            .into_iter()
                            .filter(|(t, _)| *t == self.topics.events)
                            .map(|(_, p)| p)
                            .collect();
                        roll.revoke(&mine);
                    }
                }
                msg = consumer.recv() => {
                    match msg {
                        Ok(msg) => self.add(&msg, &mut roll).await?,
                        Err(e) => tracing::warn!(error = %e, "consume failed"),
                    }
                    if roll.is_full(&self.limits) {
                        self.write_roll(std::mem::take(&mut roll), &mut high, &mut blocked, &stop).await?;
                    }
                }
            }
        }
        // Shutdown: the current roll is written, retrying for at most `shutdown_timeout`
        // (an upload in flight is abandoned then); its offsets are committed only if every
        // object was confirmed, else the next owner re-reads it. A second signal exits at once.
        let rows = roll.rows;
        let (timeout, never) = (self.shutdown_timeout, CancellationToken::new());
        let last = self.write_roll(roll, &mut high, &mut blocked, &never);
        match tokio::time::timeout(timeout, last).await {
            Ok(result) => {
                result?;
            }
            Err(_) => tracing::warn!(
                timeout_ms = timeout.as_millis() as u64,
                rows,
                "shutdown: S3 did not take the last roll in time; it stays uncommitted and is re-read by the next owner"
            ),
        }
        self.consumer.commit_now()?;
        Ok(())
    }

    async fn add(
        &mut self,
        msg: &BorrowedMessage<'_>,
        roll: &mut Roll,
    ) -> Result<(), ParquetSinkError> {
        let now = Instant::now();
        let value = msg.payload().unwrap_or_default();
        let (partition, offset) = (msg.partition(), msg.offset());
        let decoded = wire::unframe(value)
            .map_err(|e| e.to_string())
            .and_then(|f| {
                Event::decode(f.payload)
                    .map(|e| (e, f.payload))
                    .map_err(|e| format!("not a pulse.events.v1.Event: {e}"))
            });
        match decoded {
            Ok((event, proto)) => {
                let cx = trace_context::extract(msg.headers());
                let trace = trace_context::trace_id_hex(&cx);
                let row = ArchiveRow::from_event(
                    &event,
                    proto,
                    msg.topic(),
                    partition,
                    offset,
                    trace.as_deref(),
                );
                let ingest_ts = msg.headers().and_then(headers::ingest_ts_ms);
                roll.push(row, || cx, value.len(), ingest_ts, now);
            }
            Err(reason) => {
                // Not a record this sink can archive: kept on the DLQ, never dropped. Its
                // offset is committed with the roll it was read in.
                tracing::warn!(
                    partition,
                    offset,
                    reason,
                    "dead-lettering an undecodable record"
                );
                crate::dlq::dead_letter(
                    &self.producer,
                    &self.topics.dlq,
                    SINK,
                    msg.topic(),
                    value.to_vec(),
                    "undecodable",
                    &reason,
                )
                .await
                .map_err(ParquetSinkError::Dlq)?;
                roll.mark_done(partition, offset, now);
            }
        }
        Ok(())
    }

    /// Uploads every object of `roll`; when S3 confirmed them all, marks each partition's
    /// highest offset durable and commits. Returns `false` if `stop` ended a retry wait
    /// (then nothing of the roll is committed: the next owner re-reads and rewrites it).
    async fn write_roll(
        &mut self,
        roll: Roll,
        high: &mut Freshness,
        blocked: &mut Blocked,
        stop: &CancellationToken,
    ) -> Result<bool, ParquetSinkError> {
        if roll.is_empty() {
            return Ok(true);
        }
        let started = Instant::now();
        let (rows, record_bytes, buffered) = (roll.rows, roll.bytes, roll.buffered_bytes());
        for (key, group) in roll.groups {
            let first = group.rows.iter().map(|r| r.kafka_offset).min().unwrap_or(0);
            let last = group.rows.iter().map(|r| r.kafka_offset).max().unwrap_or(0);
            let path = self.s3.key(&archive::object_key(
                &key.bucket,
                &self.topics.events,
                key.partition,
                first,
                last,
            ));
            let n = group.rows.len();
            let span = tracing::info_span!(
                "writer.parquet.upload",
                key = %path,
                partition = key.partition,
                rows = n,
                first_offset = first,
                last_offset = last
            );
            let _ = span.set_parent(group.parent);
            let encoding = Instant::now();
            let body = tokio::task::spawn_blocking(move || archive::encode(&group.rows)).await??;
            metrics::histogram!(m::ENCODE_SECONDS, "sink" => SINK)
                .record(encoding.elapsed().as_secs_f64());
            let body = Bytes::from(body);
            let size = body.len();
            if !self
                .upload(&path, body, blocked, stop)
                .instrument(span)
                .await?
            {
                return Ok(false);
            }
            metrics::counter!(m::FILES_UPLOADED_TOTAL, "sink" => SINK).increment(1);
            metrics::counter!(m::UPLOADED_BYTES_TOTAL, "sink" => SINK).increment(size as u64);
            metrics::histogram!(m::FILE_ROWS, "sink" => SINK).record(n as f64);
            metrics::histogram!(m::FILE_BYTES, "sink" => SINK).record(size as f64);
            tracing::debug!(key = %path, rows = n, bytes = size, "parquet object uploaded");
        }
        // Every object is confirmed: now (and only now) the offsets may move.
        for (partition, offset) in &roll.done {
            if let Err(e) = self
                .consumer
                .mark_durable(&self.topics.events, *partition, *offset)
            {
                // The partition was revoked meanwhile; its next owner re-archives from the
                // last commit (overwriting or adding objects, never losing rows).
                metrics::counter!(m::ERRORS_TOTAL, "sink" => SINK, "kind" => "commit").increment(1);
                tracing::warn!(partition, offset, error = %e, "marking offsets durable failed");
            }
        }
        if let Err(e) = self.consumer.commit_now() {
            metrics::counter!(m::ERRORS_TOTAL, "sink" => SINK, "kind" => "commit").increment(1);
            tracing::warn!(error = %e, "commit failed; the stored offsets are committed with the next one");
        }
        let written_at = now_ms();
        metrics::counter!(m::ROWS_WRITTEN_TOTAL, "sink" => SINK, "table" => "events")
            .increment(rows as u64);
        metrics::histogram!(m::BATCH_ROWS, "sink" => SINK, "table" => "events").record(rows as f64);
        metrics::histogram!(m::BATCH_BYTES, "sink" => SINK, "table" => "events")
            .record(record_bytes as f64);
        metrics::histogram!(m::BATCH_SECONDS, "sink" => SINK)
            .record(started.elapsed().as_secs_f64());
        for (_, ts) in &roll.ingest_ts {
            metrics::histogram!(m::END_TO_END_SECONDS, "sink" => SINK)
                .record((written_at - ts).max(0) as f64 / 1000.0);
        }
        // The partitions of this roll, at the highest times archived so far (a roll of
        // older events never moves freshness backwards).
        let highest = roll.freshness.into_iter().map(|(partition, (ev, ing))| {
            let h = high.entry(partition).or_insert((ev, ing));
            *h = (h.0.max(ev), h.1.max(ing));
            (partition, *h)
        });
        let fresh = FreshnessRow::for_partitions(STAGE, highest, written_at);
        crate::metrics::record_freshness(SINK, &fresh);
        self.write_freshness(fresh);
        tracing::info!(
            rows,
            record_bytes,
            buffered_bytes = buffered,
            partitions = roll.done.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "roll archived and committed"
        );
        Ok(true)
    }

    /// Puts one object, retrying every failure with backoff (consumption paused meanwhile,
    /// the sink reported blocked while S3 refuses for a reason retrying alone cannot fix)
    /// until S3 confirms it. Returns `false` if `stop` ended a retry wait.
    async fn upload(
        &mut self,
        path: &Path,
        body: Bytes,
        blocked: &mut Blocked,
        stop: &CancellationToken,
    ) -> Result<bool, ParquetSinkError> {
        loop {
            let attempt = Instant::now();
            let put = tokio::select! {
                _ = stop.cancelled() => return Ok(false),
                r = self.store.put(path, PutPayload::from(body.clone())) => r,
            };
            match put {
                Ok(_) => {
                    metrics::histogram!(m::UPLOAD_SECONDS, "sink" => SINK)
                        .record(attempt.elapsed().as_secs_f64());
                    pause::succeeded(&self.consumer, &mut self.backoff, blocked, SINK);
                    return Ok(true);
                }
                Err(e) => {
                    let kind = classify_s3(&e);
                    metrics::counter!(m::ERRORS_TOTAL, "sink" => SINK, "kind" => kind.as_str())
                        .increment(1);
                    let wait =
                        pause::failed(&self.consumer, &mut self.backoff, blocked, SINK, kind, &e);
                    let (wait_ms, failures) = (wait.as_millis() as u64, self.backoff.failures());
                    tracing::warn!(key = %path, kind = kind.as_str(), error = %e, wait_ms, failures, "S3 upload failed; retrying");
                    if !wait_polling(&self.consumer, wait, stop).await? {
                        return Ok(false);
                    }
                }
            }
        }
    }

    /// Writes the freshness rows in the background: a slow or failing ClickHouse only
    /// logs a warning and counts a metric, it never holds up the archive.
    fn write_freshness(&self, rows: Vec<FreshnessRow>) {
        let Some(client) = self.freshness.clone() else {
            return;
        };
        if rows.is_empty() {
            return;
        }
        tokio::spawn(async move {
            let insert = async {
                let mut ins = client.insert::<FreshnessRow>("freshness").await?;
                for r in &rows {
                    ins.write(r).await?;
                }
                ins.end().await
            };
            let error = match tokio::time::timeout(FRESHNESS_TIMEOUT, insert).await {
                Ok(Ok(())) => return,
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("timed out after {FRESHNESS_TIMEOUT:?}"),
            };
            metrics::counter!(m::FRESHNESS_ERRORS_TOTAL, "sink" => SINK).increment(1);
            tracing::warn!(
                error,
                "writing freshness rows failed (the archive is written)"
            );
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(partition: i32, offset: i64, event_time_ms: i64, proto_len: usize) -> ArchiveRow {
        ArchiveRow {
            event_id: format!("e{offset}"),
            schema_version: 1,
            event_type: "page_view".into(),
            user_id: String::new(),
            session_id: String::new(),
            page: String::new(),
            referrer: String::new(),
            currency: String::new(),
            amount_micros: None,
            properties: Vec::new(),
            event_time_ms,
            ingest_time_ms: event_time_ms + 1,
            trace_id: String::new(),
            source: String::new(),
            ingest_source: String::new(),
            kafka_topic: "t".into(),
            kafka_partition: partition,
            kafka_offset: offset,
            event_proto: vec![0; proto_len],
            source_trace_id: None,
        }
    }

    const H: i64 = 3_600_000;
    const T: i64 = 1_709_164_800_000; // 2024-02-29 00:00 UTC

    fn limits() -> RollLimits {
        RollLimits {
            batch: BatchLimits {
                max_rows: 4,
                max_bytes: 100,
                max_age: Duration::from_millis(500),
            },
            max_buffer_bytes: usize::MAX,
        }
    }

    #[test]
    fn rows_are_grouped_by_partition_and_hour_and_offsets_tracked_per_partition() {
        let t0 = Instant::now();
        let mut roll = Roll::default();
        roll.push(
            row(0, 10, T, 1),
            opentelemetry::Context::new,
            1,
            Some(5),
            t0,
        );
        roll.push(
            row(0, 11, T + H, 1),
            opentelemetry::Context::new,
            1,
            None,
            t0,
        );
        roll.push(
            row(1, 3, T + 1, 1),
            opentelemetry::Context::new,
            1,
            Some(6),
            t0,
        );
        roll.push(
            row(0, 12, T + 2, 1),
            opentelemetry::Context::new,
            1,
            None,
            t0,
        );
        roll.mark_done(1, 4, t0); // a dead-lettered record
        let groups: Vec<(i32, u8, Vec<i64>)> = roll
            .groups
            .iter()
            .map(|(k, g)| {
                (
                    k.partition,
                    k.bucket.hour,
                    g.rows.iter().map(|r| r.kafka_offset).collect(),
                )
            })
            .collect();
        assert_eq!(
            groups,
            vec![(0, 0, vec![10, 12]), (0, 1, vec![11]), (1, 0, vec![3])]
        );
        assert_eq!(roll.done, BTreeMap::from([(0, 12), (1, 4)]));
        assert_eq!(roll.freshness[&0], (T + H, T + H + 1));
        assert_eq!(roll.ingest_ts, vec![(0, 5), (1, 6)]);
        assert_eq!((roll.rows, roll.bytes), (4, 4));
    }

    #[test]
    fn a_roll_is_due_by_rows_bytes_or_age_even_with_only_dead_letters() {
        let t0 = Instant::now();
        let mut roll = Roll::default();
        assert!(
            !roll.is_due(&limits(), t0 + Duration::from_secs(9)),
            "empty"
        );
        roll.mark_done(0, 1, t0);
        assert!(!roll.is_due(&limits(), t0));
        assert!(
            roll.is_due(&limits(), t0 + Duration::from_millis(500)),
            "by age"
        );

        let mut by_rows = Roll::default();
        for i in 0..4 {
            assert!(!by_rows.is_full(&limits()));
            by_rows.push(row(0, i, T, 1), opentelemetry::Context::new, 1, None, t0);
        }
        assert!(by_rows.is_full(&limits()) && by_rows.is_due(&limits(), t0));

        let mut by_bytes = Roll::default();
        by_bytes.push(
            row(0, 0, T, 100),
            opentelemetry::Context::new,
            100,
            None,
            t0,
        );
        assert!(by_bytes.is_full(&limits()));
    }

    #[test]
    fn a_roll_is_full_when_its_estimated_memory_reaches_the_buffer_limit() {
        let t0 = Instant::now();
        let limits = RollLimits {
            batch: BatchLimits {
                max_rows: 1_000_000,
                max_bytes: usize::MAX,
                max_age: Duration::from_secs(60),
            },
            max_buffer_bytes: 256 * 1024,
        };
        let mut roll = Roll::default();
        let mut rows = 0;
        while !roll.is_full(&limits) {
            roll.push(
                row(rows % 2, i64::from(rows), T, 300),
                opentelemetry::Context::new,
                300,
                None,
                t0,
            );
            rows += 1;
        }
        // A row of 300 protobuf bytes holds its inline struct, its allocations and its
        // share of the encoding: more than 3 times the record, never counted as less.
        let per_row = roll.buffered_bytes() / roll.rows;
        assert!(
            per_row > 3 * 300 && per_row < 4_000,
            "{per_row} bytes per row"
        );
        assert!(roll.rows < 1_000, "{} rows", roll.rows);
        assert!(
            roll.bytes < 256 * 1024 / 3,
            "the record bytes alone are far from it"
        );
        // Revoking a partition gives its memory back.
        let before = roll.buffered_bytes();
        roll.revoke(&[1]);
        assert!(
            roll.buffered_bytes() < before * 2 / 3,
            "{before} -> {}",
            roll.buffered_bytes()
        );
    }

    /// Not a check: measures the resident memory a roll of `PULSE_ROLL_ROWS` (100,000)
    /// loadgen-like rows takes, built and then encoded, against the estimate.
    /// `cargo test -p pulse-writer --release --lib -- --ignored --nocapture roll_memory`
    #[test]
    #[ignore]
    fn roll_memory_against_the_estimate() {
        fn rss() -> usize {
            let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
            let pages: usize = statm
                .split_whitespace()
                .nth(1)
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            pages * 4096
        }
        fn hwm() -> usize {
            let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
            status
                .lines()
                .find_map(|l| l.strip_prefix("VmHWM:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
                .unwrap_or(0)
                * 1024
        }
        use pulse_contracts::pb::events::v1::{EventKey, IngestInfo, Metadata, Payload};
        let n: usize = std::env::var("PULSE_ROLL_ROWS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(100_000);
        let t0 = Instant::now();
        let before = rss();
        let mut roll = Roll::default();
        for i in 0..n {
            let e = Event {
                event_id: format!("lg-42-{i}"),
                schema_version: 1,
                event_type: "page_view".into(),
                key: Some(EventKey {
                    user_id: format!("user-{}", i % 1_000_000),
                    session_id: format!("s-{}", i % 5_000),
                }),
                payload: Some(Payload {
                    page: format!("/products/{}", i % 500),
                    referrer: "https://www.example.com/search?q=shoes".into(),
                    currency: String::new(),
                    amount_micros: None,
                    properties: [("plan".to_owned(), "pro".to_owned())].into(),
                }),
                metadata: Some(Metadata {
                    event_timestamp_ms: T + i as i64,
                    trace_id: String::new(),
                    source: "web".into(),
                }),
                ingest: Some(IngestInfo {
                    ingest_timestamp_ms: T + i as i64 + 5,
                    ingest_source: "loadgen".into(),
                    protocol: "http".into(),
                }),
            };
            let proto = e.encode_to_vec();
            let row = ArchiveRow::from_event(
                &e,
                &proto,
                "pulse.events.v1",
                (i % 3) as i32,
                i as i64,
                Some("0af7651916cd43dd8448eb211c80319c"),
            );
            roll.push(
                row,
                opentelemetry::Context::new,
                proto.len() + 5,
                Some(T),
                t0,
            );
        }
        let held = rss() - before;
        let estimate = roll.buffered_bytes();
        let mut peak_encoding = 0;
        for (_, group) in std::mem::take(&mut roll.groups) {
            let body = archive::encode(&group.rows).unwrap_or_default();
            peak_encoding = peak_encoding.max(hwm().saturating_sub(before));
            drop((group, body));
        }
        println!(
            "{n} rows, {} record bytes: resident {} MiB after buffering ({} B/row), peak {} MiB while encoding; estimate {} MiB ({} B/row)",
            roll.bytes,
            held >> 20,
            held / n,
            peak_encoding >> 20,
            estimate >> 20,
            estimate / n
        );
    }

    #[test]
    fn revoked_partitions_leave_the_roll() {
        let t0 = Instant::now();
        let mut roll = Roll::default();
        roll.push(row(0, 1, T, 3), opentelemetry::Context::new, 3, Some(1), t0);
        roll.push(row(1, 1, T, 5), opentelemetry::Context::new, 5, Some(2), t0);
        roll.mark_done(2, 7, t0);
        roll.revoke(&[1, 2]);
        assert_eq!(roll.done, BTreeMap::from([(0, 1)]));
        assert_eq!((roll.rows, roll.bytes), (1, 3));
        assert_eq!(roll.ingest_ts, vec![(0, 1)]);
        assert!(roll.groups.keys().all(|k| k.partition == 0));
        roll.revoke(&[0]);
        assert!(roll.is_empty() && roll.started.is_none());
    }

    #[test]
    fn s3_refusals_block_and_other_failures_are_transient() {
        use object_store::Error as E;
        let cases = [
            (
                E::NotFound {
                    path: "x".into(),
                    source: "NoSuchBucket".into(),
                },
                ErrorKind::Blocking(BlockReason::MissingBucket),
            ),
            (
                E::PermissionDenied {
                    path: "x".into(),
                    source: "<Code>InvalidAccessKeyId</Code>".into(),
                },
                ErrorKind::Blocking(BlockReason::Authentication),
            ),
            (
                E::PermissionDenied {
                    path: "x".into(),
                    source: "<Code>SignatureDoesNotMatch</Code>".into(),
                },
                ErrorKind::Blocking(BlockReason::Authentication),
            ),
            (
                E::PermissionDenied {
                    path: "x".into(),
                    source: "<Code>AccessDenied</Code>".into(),
                },
                ErrorKind::Blocking(BlockReason::AccessDenied),
            ),
            (
                E::Unauthenticated {
                    path: "x".into(),
                    source: "401".into(),
                },
                ErrorKind::Blocking(BlockReason::Authentication),
            ),
            (
                E::Generic {
                    store: "S3",
                    source: "Client error with status 400 Bad Request: <Code>NoSuchBucket</Code>"
                        .into(),
                },
                ErrorKind::Blocking(BlockReason::MissingBucket),
            ),
            (
                E::Generic {
                    store: "S3",
                    source: "connection refused".into(),
                },
                ErrorKind::Retryable,
            ),
            (
                E::Generic {
                    store: "S3",
                    source: "Server returned non-2xx status code: 503 Service Unavailable".into(),
                },
                ErrorKind::Retryable,
            ),
        ];
        for (err, kind) in cases {
            assert_eq!(classify_s3(&err), kind, "{err}");
        }
    }
}
