//! The processor's Kafka loop: consume `pulse.events.v1` in a consumer group, feed the
//! engine, send too-late events to the late topic, and on every tick produce the due
//! aggregates. Each tick's emission then goes through a pipeline while the loop keeps
//! consuming: its outputs are acknowledged, then its checkpoints are written and
//! acknowledged, and only then is each partition's resume offset stored (so a crash or
//! rebalance rebuilds open aggregates from the log).

pub use pulse_platform::clock::now_ms;
use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use futures::stream::FuturesOrdered;

use prost::Message as _;
use pulse_contracts::wire::{self, RegistryEncoder};
use pulse_contracts::{headers, schemas, trace_context};
use pulse_platform::admin::Health;
use pulse_platform::kafka::{
    AckFuture, KafkaConsumer, KafkaProducer, OutRecord, ProduceError, RebalanceEvent,
};
use rdkafka::Message;
use rdkafka::message::{BorrowedMessage, Headers, OwnedHeaders};
use tokio_util::sync::CancellationToken;
use tracing_opentelemetry::OpenTelemetrySpanExt;

use crate::checkpoint::{CheckpointError, CheckpointStore};
use crate::engine::{CheckpointUpdate, Engine, Outcome, Outputs};
use crate::metrics as m;
use crate::model::InputEvent;

/// Topics the loop reads and writes.
#[derive(Debug, Clone)]
pub struct Topics {
    pub events: String,
    pub user_activity: String,
    pub sessions: String,
    pub late: String,
}

/// Why the loop stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("kafka: {0}")]
    Kafka(#[from] rdkafka::error::KafkaError),
    #[error(
        "producing outputs failed (the offsets were not committed; a restart re-emits them): {0}"
    )]
    Produce(#[from] ProduceError),
    #[error(
        "framing outputs failed (the offsets were not committed; a restart re-emits them): {0}"
    )]
    Frame(#[from] wire::WireError),
    #[error(
        "writing a checkpoint failed (the offsets were not committed; a restart re-emits them): {0}"
    )]
    Checkpoint(#[from] CheckpointError),
    #[error(
        "encoding an output failed (the offsets were not committed; a restart re-emits them): {0}"
    )]
    Encode(prost::EncodeError),
}

impl RunError {
    /// Whether trying again (in-process or after a restart) can help.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Kafka(_) => true,
            Self::Produce(e) => e.is_retryable(),
            Self::Frame(e) => e.is_retryable(),
            Self::Checkpoint(e) => e.is_retryable(),
            // Into a growing buffer: cannot happen.
            Self::Encode(_) => false,
        }
    }
}

/// Users whose results an emission builds and produces at a time (see `emit`): bounds the
/// results held in memory (about 1 KB a user) whatever the number of changed users.
const EMIT_CHUNK_USERS: usize = 1_024;

/// How long an output may wait for room in a full producer queue (backpressure slows the
/// loop; it never drops an output).
const OUTPUT_QUEUE_WAIT: Duration = Duration::from_secs(60);

/// Ticks whose outputs may be awaiting acknowledgement at once before the loop stops
/// consuming to wait for the oldest.
const MAX_EMISSIONS_IN_FLIGHT: usize = 4;

/// The readiness component the state budget blocks.
const STATE_COMPONENT: &str = "state";

/// The state against its budget. Over it, the processor reports itself not ready
/// ("state budget exceeded: …") and counts the tick, and keeps processing: closing windows
/// or sessions early, or dropping events, would change answers the guarantees say are
/// exact, and pausing consumption would stop the watermark that closes them. The signal
/// is for scaling out (state is per partition: more replicas share it) or raising the
/// budget, and for the alert on `pulse_processor_state_budget_exceeded_total`.
#[derive(Debug, PartialEq, Eq)]
pub enum StateBudget {
    Within,
    Exceeded(String),
}

impl StateBudget {
    pub fn judge(bytes: usize, budget: u64) -> Self {
        let bytes = u64::try_from(bytes).unwrap_or(u64::MAX);
        if budget > 0 && bytes > budget {
            Self::Exceeded(format!(
                "state budget exceeded: estimated {bytes} bytes > --state-budget-bytes {budget}"
            ))
        } else {
            Self::Within
        }
    }
}

/// Judges `bytes` against `budget` and sets readiness and the counter accordingly.
pub fn apply_state_budget(health: &Health, bytes: usize, budget: u64) -> StateBudget {
    let verdict = StateBudget::judge(bytes, budget);
    match &verdict {
        StateBudget::Exceeded(reason) => {
            metrics::counter!(m::STATE_BUDGET_EXCEEDED_TOTAL).increment(1);
            if health.blocked().is_none_or(|b| !b.contains("state budget")) {
                tracing::warn!(
                    bytes,
                    budget,
                    "state budget exceeded: not ready until it shrinks"
                );
            }
            health.block(STATE_COMPONENT, reason.clone());
        }
        StateBudget::Within => health.unblock(STATE_COMPONENT),
    }
    verdict
}

/// Decodes a record of the events topic. None when it is not a framed Pulse event.
/// The lean decode of [`crate::model::decode`]: only the fields the engine reads.
pub fn decode(msg: &BorrowedMessage<'_>) -> Option<InputEvent> {
    crate::model::decode(msg.partition(), msg.offset(), msg.payload()?, msg.headers())
}

/// The processor loop.
pub struct Processor {
    pub engine: Engine,
    pub consumer: KafkaConsumer,
    pub rebalances: tokio::sync::mpsc::UnboundedReceiver<RebalanceEvent>,
    pub producer: KafkaProducer,
    pub encoder: RegistryEncoder,
    pub topics: Topics,
    pub tick: Duration,
    /// Also keeps each partition's checkpoint in force (unchanged ones are not rewritten,
    /// changed ones are written as deltas).
    pub checkpoints: CheckpointStore,
    /// Readiness: blocked while the state exceeds its budget.
    pub health: Health,
    /// `--state-budget-bytes` (0: none).
    pub state_budget_bytes: u64,
    /// The rules version stamped on every output (`Config::rules_version`).
    pub rules_version: String,
}

impl std::fmt::Debug for Processor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Processor")
            .field("topics", &self.topics)
            .finish_non_exhaustive()
    }
}

/// One tick's emission on its way to durability: its outputs (and the late records sent
/// since the last tick) are acknowledged, then its checkpoints, then its offsets are stored.
/// Emissions pass these stages in order, while the loop goes on consuming.
#[derive(Debug)]
struct Emission {
    /// The rebalance epoch it was taken in; after a rebalance it no longer counts.
    epoch: u64,
    /// Each assigned partition's checkpoint at the time of the emission, as an update of
    /// the previous emission's (emissions write them in order).
    checkpoints: Vec<(i32, CheckpointUpdate)>,
    /// Each assigned partition's resume offset at the time of the emission.
    resumes: Vec<(i32, i64)>,
    started: Instant,
}

type Stage = Pin<Box<dyn Future<Output = Result<Emission, RunError>> + Send>>;

/// Waits for every acknowledgement in `acks`, then hands `emission` on.
/// At most this many acknowledgements wait in `pending` (issue #15: one boxed future per
/// result; an emission of ~187,000 finals held ≈ 73 MiB of them in the 1M-user run): past
/// it the oldest half is awaited before the next result is produced. Outputs are still all
/// acknowledged before their emission's checkpoints; with the producer's queue bounded in
/// bytes (`PRODUCER_DEFAULT_OPTIONS`) the oldest are normally acknowledged already.
const MAX_PENDING_ACKS: usize = 8_192;

/// The state estimate's gauge is also set after this many records, not only at the ticks'
/// emissions (judged against the budget there): while users arrive fast — the user tables'
/// shards doubling one after another at ~917,000 users in the 1M-user run, +70 MiB in 3 s —
/// a tick-old estimate read beside a fresh RSS made up most of the gap (issue #15).
const STATE_GAUGE_RECORDS: u32 = 1_024;

/// Awaits the oldest half of `pending` once it holds [`MAX_PENDING_ACKS`].
async fn settle_oldest(pending: &mut Vec<AckFuture>) -> Result<(), RunError> {
    if pending.len() >= MAX_PENDING_ACKS {
        for ack in pending.drain(..MAX_PENDING_ACKS / 2) {
            ack.await.map_err(RunError::from)?;
        }
    }
    Ok(())
}

fn after_acks(acks: Vec<AckFuture>, emission: Emission) -> Stage {
    Box::pin(async move {
        for ack in acks {
            ack.await.map_err(RunError::from)?;
        }
        Ok(emission)
    })
}

/// The emissions in flight and what they are checked against.
#[derive(Default)]
struct Pipeline {
    /// Waiting for their outputs' acknowledgements.
    outputs: FuturesOrdered<Stage>,
    /// Waiting for their checkpoints' acknowledgements.
    checkpoints: FuturesOrdered<Stage>,
    /// Bumped by every rebalance event.
    epoch: u64,
    assigned: HashSet<i32>,
}

impl Pipeline {
    fn len(&self) -> usize {
        self.outputs.len() + self.checkpoints.len()
    }
}

impl Processor {
    /// Runs until `stop` is cancelled; then emits, flushes and commits what is durable,
    /// and closes the consumer (`KafkaConsumer::close_after`). An error stops the loop at
    /// once: nothing past the last durable emission is committed, and the next owner of the
    /// partitions (this process, restarted) processes it again.
    pub async fn run(mut self, stop: CancellationToken) -> Result<(), RunError> {
        let result = self.run_loop(stop).await;
        let consumer = self.consumer.clone();
        drop(self);
        consumer.close_after(result).await
    }

    async fn run_loop(&mut self, stop: CancellationToken) -> Result<(), RunError> {
        let mut pipe = Pipeline::default();
        let mut pending: Vec<AckFuture> = Vec::new();
        let consumer = self.consumer.clone();
        let mut ticker = tokio::time::interval(self.tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut records = 0_u32;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                Some(ev) = self.rebalances.recv() => self.on_rebalance(ev, &mut pipe).await?,
                Some(done) = pipe.outputs.next() => self.write_checkpoints(done?, &mut pipe).await?,
                Some(done) = pipe.checkpoints.next() => self.store_offsets(done?, &pipe)?,
                _ = ticker.tick() => {
                    // A broker that stops acknowledging slows consumption instead of letting
                    // emissions pile up.
                    while pipe.len() >= MAX_EMISSIONS_IN_FLIGHT {
                        self.advance_oldest(&mut pipe).await?;
                    }
                    self.emit(&mut pending, &mut pipe, true).await?;
                }
                msg = consumer.recv() => {
                    let msg = match msg {
                        Ok(m) => m,
                        Err(e) => {
                            tracing::warn!(error = %e, "consume failed");
                            continue;
                        }
                    };
                    // The assignment that delivered this record is applied first.
                    while let Ok(ev) = self.rebalances.try_recv() {
                        self.on_rebalance(ev, &mut pipe).await?;
                    }
                    if let Some(ack) = self.on_record(&msg).await? {
                        // Late records between ticks are bounded like an emission's.
                        pending.push(ack);
                        settle_oldest(&mut pending).await?;
                    }
                    records += 1;
                    if records >= STATE_GAUGE_RECORDS {
                        records = 0;
                        self.publish_state_bytes();
                    }
                }
            }
        }
        // Shutdown: everything due is produced and acknowledged before the last commit.
        while let Ok(ev) = self.rebalances.try_recv() {
            self.on_rebalance(ev, &mut pipe).await?;
        }
        self.emit(&mut pending, &mut pipe, true).await?;
        while pipe.len() > 0 {
            self.advance_oldest(&mut pipe).await?;
        }
        self.consumer.commit_now()?;
        Ok(())
    }

    /// Moves the oldest emission in flight one stage on, waiting for it.
    async fn advance_oldest(&mut self, pipe: &mut Pipeline) -> Result<(), RunError> {
        // Emissions reach the checkpoint stage in order, so the oldest is the front of the
        // checkpoint stage if it has any.
        if !pipe.checkpoints.is_empty() {
            if let Some(done) = pipe.checkpoints.next().await {
                self.store_offsets(done?, pipe)?;
            }
        } else if let Some(done) = pipe.outputs.next().await {
            self.write_checkpoints(done?, pipe).await?;
        }
        Ok(())
    }

    async fn on_rebalance(
        &mut self,
        ev: RebalanceEvent,
        pipe: &mut Pipeline,
    ) -> Result<(), RunError> {
        // Emissions in flight no longer write checkpoints or store offsets: the partitions
        // they cover may have changed hands (what they had queued was flushed before the
        // revoke's commit; see `build`).
        pipe.epoch += 1;
        // The checkpoint updates of those emissions are dropped with them: the next of
        // every partition is whole.
        self.engine.resync_checkpoints();
        let assigned = &mut pipe.assigned;
        match ev {
            RebalanceEvent::Assigned(parts) => {
                let mine: Vec<i32> = parts
                    .into_iter()
                    .filter(|(t, _)| *t == self.topics.events)
                    .map(|(_, p)| p)
                    .collect();
                let mut checkpoints = self.checkpoints.read_all(Duration::from_secs(30)).await?;
                // Only the assigned partitions' are kept, and each is moved into the engine
                // (not copied: with a million open sessions a copy is hundreds of MB).
                checkpoints.retain(|p, _| mine.contains(p));
                for p in mine {
                    self.engine.assign(p, now_ms());
                    if let Some(cp) = checkpoints.remove(&p) {
                        tracing::info!(
                            partition = p,
                            resume_offset = cp.resume_offset,
                            last_offset = cp.last_offset,
                            max_event_ms = cp.max_event_ms,
                            closed_watermark = cp.closed_watermark,
                            open_sessions = cp.open_sessions.len(),
                            "continuing from checkpoint"
                        );
                        if cp.max_session_ms != Some(self.engine.max_session_ms()) {
                            tracing::warn!(
                                partition = p,
                                checkpoint_max_session_ms = cp.max_session_ms,
                                max_session_ms = self.engine.max_session_ms(),
                                "the maximum session duration differs from the checkpoint's: open sessions are re-cut by the new maximum"
                            );
                        }
                        if let Some(prior) = self.engine.restore(p, cp, now_ms()) {
                            tracing::warn!(
                                partition = p,
                                prior_session_gap_ms = prior.session_gap_ms,
                                prior_max_session_ms = prior.max_session_ms,
                                prior_until_offset = prior.until,
                                session_gap_ms = self.engine.session_gap_ms(),
                                max_session_ms = self.engine.max_session_ms(),
                                "session rules changed: the replay supersedes the results the prior rules emitted for sessions still open"
                            );
                        }
                    }
                    assigned.insert(p);
                }
            }
            RebalanceEvent::Revoked(parts) => {
                for (topic, p) in parts {
                    if topic == self.topics.events {
                        self.engine.revoke(p);
                        self.checkpoints.forget(p);
                        assigned.remove(&p);
                    }
                }
            }
            RebalanceEvent::Error(_) => {}
        }
        Ok(())
    }

    async fn on_record(
        &mut self,
        msg: &BorrowedMessage<'_>,
    ) -> Result<Option<AckFuture>, RunError> {
        let parent = trace_context::extract(msg.headers());
        let span = tracing::info_span!(
            "processor.event",
            partition = msg.partition(),
            offset = msg.offset()
        );
        let _ = span.set_parent(parent);
        let now = now_ms();
        let Some(event) = decode(msg) else {
            metrics::counter!(m::EVENTS_TOTAL, "outcome" => "undecodable").increment(1);
            tracing::warn!(
                offset = msg.offset(),
                partition = msg.partition(),
                "skipping a record that is not a framed Pulse event"
            );
            self.engine.skip(msg.partition(), msg.offset(), now);
            return Ok(None);
        };
        match self.engine.process(&event, now) {
            Outcome::Added { future } => {
                metrics::counter!(m::EVENTS_TOTAL, "outcome" => if future { "future" } else { "added" }).increment(1);
                metrics::gauge!(m::LAST_EVENT_TIME_MS).set(event.event_time_ms as f64);
                Ok(None)
            }
            Outcome::Duplicate => {
                metrics::counter!(m::EVENTS_TOTAL, "outcome" => "duplicate").increment(1);
                Ok(None)
            }
            Outcome::Replayed => {
                metrics::counter!(m::EVENTS_TOTAL, "outcome" => "replayed").increment(1);
                Ok(None)
            }
            Outcome::Late { reason } => {
                metrics::counter!(m::EVENTS_TOTAL, "outcome" => "late").increment(1);
                let mut h = OwnedHeaders::new();
                if let Some(orig) = msg.headers() {
                    for header in orig.iter() {
                        if let Some(v) = header.value {
                            h = h.insert(rdkafka::message::Header {
                                key: header.key,
                                value: Some(v),
                            });
                        }
                    }
                }
                h = headers::with_str(h, headers::ERROR_CODE, "late_event");
                h = headers::with_str(h, headers::ERROR_DETAIL, &reason);
                let rec = OutRecord::new(
                    &self.topics.late,
                    Some(event.user_id.into_bytes()),
                    msg.payload().unwrap_or_default().to_vec(),
                )
                .with_headers(h);
                span.in_scope(|| tracing::debug!(reason, "late event to the late topic"));
                self.producer
                    .enqueue_with_wait(rec, OUTPUT_QUEUE_WAIT)
                    .await
                    .map(Some)
                    .map_err(RunError::from)
            }
        }
    }

    /// Produces the due outputs and puts them, with the late records sent since the last
    /// tick, in the pipeline, together with each assigned partition's checkpoint and resume
    /// offset as they are now.
    async fn emit(
        &mut self,
        pending: &mut Vec<AckFuture>,
        pipe: &mut Pipeline,
        early: bool,
    ) -> Result<(), RunError> {
        let started = Instant::now();
        let now = now_ms();
        let span = tracing::info_span!(
            "processor.emit",
            activity = tracing::field::Empty,
            sessions = tracing::field::Empty
        );
        let cx = span.context();
        let trace_headers = trace_context::inject(&cx, OwnedHeaders::new());
        // In slices of EMIT_CHUNK_USERS users, each produced before the next is built, so
        // an emission's results are never all in memory at once (issue #15: 100,000 changed
        // users took the heap from 97 to 181 MB). Nothing else touches the engine until
        // the plan is done: this task is the only one that does.
        let mut plan = self.engine.begin_emit(now, early);
        let (mut activity, mut sessions) = (0, 0);
        while !plan.done() {
            let outputs = self.engine.emit_chunk(&mut plan, EMIT_CHUNK_USERS);
            activity += outputs.activity.len();
            sessions += outputs.sessions.len();
            self.produce_outputs(outputs, &trace_headers, pending)
                .await?;
        }
        span.record("activity", activity);
        span.record("sessions", sessions);
        let mut emission = Emission {
            epoch: pipe.epoch,
            checkpoints: Vec::new(),
            resumes: Vec::new(),
            started,
        };
        for p in &pipe.assigned {
            // Changes since the previous emission's, or whole when the store has no
            // checkpoint in force to apply them to (an update of an emission in flight
            // is applied before this one: emissions are written in order).
            let full = !self.checkpoints.has_checkpoint(*p);
            if let Some(update) = self.engine.checkpoint_update(*p, full) {
                emission.checkpoints.push((*p, update));
            }
            let label = p.to_string();
            if let Some(wm) = self.engine.partition_watermark(*p) {
                metrics::gauge!(m::PARTITION_WATERMARK_MS, "partition" => label.clone())
                    .set(wm as f64);
            }
            if let Some(hold) = self.engine.commit_hold_ms(*p) {
                metrics::gauge!(m::COMMIT_HOLD_SECONDS, "partition" => label.clone())
                    .set(hold as f64 / 1000.0);
            }
            if let Some(resume) = self.engine.resume_offset(*p) {
                emission.resumes.push((*p, resume));
                if let Some(last) = self.engine.last_offset(*p) {
                    metrics::gauge!(m::HELD_RECORDS, "partition" => label)
                        .set((last + 1 - resume).max(0) as f64);
                }
            }
        }
        pipe.outputs
            .push_back(after_acks(std::mem::take(pending), emission));
        metrics::gauge!(m::EMISSIONS_IN_FLIGHT).set(pipe.len() as f64);
        if let Some(wm) = self.engine.watermark() {
            metrics::gauge!(m::WATERMARK_MS).set(wm as f64);
            metrics::gauge!(m::WATERMARK_LAG_SECONDS).set((now - wm) as f64 / 1000.0);
        }
        metrics::gauge!(m::OPEN_WINDOWS).set(self.engine.open_windows() as f64);
        metrics::gauge!(m::OPEN_SESSIONS).set(self.engine.open_sessions() as f64);
        metrics::counter!(m::SESSIONS_SUPERSEDED_TOTAL).absolute(self.engine.sessions_superseded());
        self.account_state();
        Ok(())
    }

    /// Publishes the estimated state size and judges it against the budget: over it, the
    /// processor is not ready (the reason says so) and the tick is counted; it keeps
    /// processing, so nothing is lost or changed (see [`StateBudget`]).
    fn account_state(&self) {
        let bytes = self.publish_state_bytes();
        metrics::gauge!(m::STATE_BUDGET_BYTES).set(self.state_budget_bytes as f64);
        m::record_heap();
        apply_state_budget(&self.health, bytes, self.state_budget_bytes);
    }

    /// Sets `pulse_processor_state_bytes` to the estimate now (O(1): kept up to date per
    /// change) and returns it.
    fn publish_state_bytes(&self) -> usize {
        let bytes = self.engine.state_bytes() + self.checkpoints.held_bytes();
        metrics::gauge!(m::STATE_BYTES).set(bytes as f64);
        bytes
    }

    /// An emission's outputs are acknowledged: queue its changed checkpoints. Checkpoints
    /// are queued in emission order, so the topic's latest is always the newest.
    async fn write_checkpoints(
        &mut self,
        emission: Emission,
        pipe: &mut Pipeline,
    ) -> Result<(), RunError> {
        if emission.epoch != pipe.epoch {
            tracing::debug!("dropping an emission's checkpoints taken before a rebalance");
            return Ok(());
        }
        let mut acks = Vec::new();
        for (p, cp) in &emission.checkpoints {
            if pipe.assigned.contains(p) {
                acks.extend(
                    self.checkpoints
                        .write_update(&self.producer, *p, cp)
                        .await
                        .map_err(RunError::from)?,
                );
            }
        }
        pipe.checkpoints.push_back(after_acks(acks, emission));
        Ok(())
    }

    /// An emission's checkpoints are acknowledged: store the offsets they cover.
    fn store_offsets(&self, emission: Emission, pipe: &Pipeline) -> Result<(), RunError> {
        metrics::gauge!(m::EMISSIONS_IN_FLIGHT).set(pipe.len() as f64);
        if emission.epoch != pipe.epoch {
            return Ok(());
        }
        for (p, resume) in &emission.resumes {
            if *resume > 0 && pipe.assigned.contains(p) {
                self.consumer
                    .mark_durable(&self.topics.events, *p, resume - 1)?;
            }
        }
        metrics::histogram!(m::EMIT_SECONDS).record(emission.started.elapsed().as_secs_f64());
        Ok(())
    }

    async fn produce_outputs(
        &self,
        outputs: Outputs,
        trace: &OwnedHeaders,
        pending: &mut Vec<AckFuture>,
    ) -> Result<(), RunError> {
        let watermark = self.engine.watermark();
        // Looked up once per slice, not per result (a registry lookup each).
        let corrections = metrics::counter!(m::CORRECTIONS_TOTAL);
        let counter = |kind: &'static str, fin: bool| {
            let fin = if fin { "true" } else { "false" };
            metrics::counter!(m::OUTPUTS_TOTAL, "kind" => kind, "final" => fin)
        };
        let activity = [counter("activity", false), counter("activity", true)];
        let session = [counter("session", false), counter("session", true)];
        // One buffer for every result's protobuf encoding.
        let mut buf = Vec::new();
        for mut a in outputs.activity {
            a.rules_version.clone_from(&self.rules_version);
            if !a.r#final && watermark.is_some_and(|wm| a.window_end_ms <= wm) {
                corrections.increment(1);
            }
            let key = format!("{}|{}", a.user_id, a.window_start_ms);
            let fin = a.r#final;
            buf.clear();
            a.encode(&mut buf).map_err(RunError::Encode)?;
            let value = self
                .encoder
                .encode(
                    &self.topics.user_activity,
                    schemas::USER_WINDOW_ACTIVITY.full_name,
                    &buf,
                )
                .await
                .map_err(RunError::from)?;
            let rec = OutRecord::new(&self.topics.user_activity, Some(key.into_bytes()), value)
                .with_headers(trace.clone());
            pending.push(
                self.producer
                    .enqueue_with_wait(rec, OUTPUT_QUEUE_WAIT)
                    .await
                    .map_err(RunError::from)?,
            );
            settle_oldest(pending).await?;
            activity[usize::from(fin)].increment(1);
        }
        for mut s in outputs.sessions {
            s.rules_version.clone_from(&self.rules_version);
            let fin = s.r#final;
            buf.clear();
            s.encode(&mut buf).map_err(RunError::Encode)?;
            let value = self
                .encoder
                .encode(&self.topics.sessions, schemas::SESSION.full_name, &buf)
                .await
                .map_err(RunError::from)?;
            let rec = OutRecord::new(
                &self.topics.sessions,
                Some(s.session_id.into_bytes()),
                value,
            )
            .with_headers(trace.clone());
            pending.push(
                self.producer
                    .enqueue_with_wait(rec, OUTPUT_QUEUE_WAIT)
                    .await
                    .map_err(RunError::from)?,
            );
            settle_oldest(pending).await?;
            session[usize::from(fin)].increment(1);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Acknowledgements waiting in an emission stay bounded: past the bound the oldest
    /// half is awaited (in order), the newest kept; a failed one ends the loop.
    #[tokio::test]
    async fn waiting_acknowledgements_stay_bounded_and_the_oldest_are_awaited_first() {
        let awaited = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let ack = |i: usize, ok: bool| -> AckFuture {
            let awaited = awaited.clone();
            Box::pin(async move {
                awaited.lock().unwrap().push(i);
                if ok {
                    Ok(pulse_platform::kafka::Acked {
                        partition: 0,
                        offset: i as i64,
                    })
                } else {
                    Err(pulse_platform::kafka::ProduceError::QueueFull)
                }
            })
        };
        let mut pending = Vec::new();
        for i in 0..MAX_PENDING_ACKS - 1 {
            pending.push(ack(i, true));
            settle_oldest(&mut pending).await.unwrap();
        }
        assert_eq!(pending.len(), MAX_PENDING_ACKS - 1);
        assert!(awaited.lock().unwrap().is_empty());
        pending.push(ack(MAX_PENDING_ACKS - 1, true));
        settle_oldest(&mut pending).await.unwrap();
        assert_eq!(pending.len(), MAX_PENDING_ACKS / 2);
        let done = awaited.lock().unwrap().clone();
        assert_eq!(done, (0..MAX_PENDING_ACKS / 2).collect::<Vec<_>>());

        let mut failing: Vec<AckFuture> = (0..MAX_PENDING_ACKS).map(|i| ack(i, i != 3)).collect();
        assert!(settle_oldest(&mut failing).await.is_err());
    }

    #[test]
    fn a_state_over_its_budget_makes_the_processor_not_ready_until_it_shrinks() {
        let health = Health::new();
        health.set_ready(true);
        let text = pulse_platform::metrics::scrape_with(|| {
            assert_eq!(apply_state_budget(&health, 10_000, 0), StateBudget::Within);
            assert!(health.is_ready(), "no budget: always within");
            assert_eq!(
                apply_state_budget(&health, 10_000, 10_000),
                StateBudget::Within
            );
            let over = apply_state_budget(&health, 10_001, 10_000);
            assert!(
                matches!(over, StateBudget::Exceeded(ref r) if r.contains("state budget exceeded"))
            );
            assert!(!health.is_ready());
            assert!(
                health.blocked().unwrap().contains("state budget exceeded"),
                "{:?}",
                health.blocked()
            );
            apply_state_budget(&health, 20_000, 10_000);
            apply_state_budget(&health, 9_000, 10_000);
            assert!(health.is_ready(), "{:?}", health.blocked());
        });
        assert!(
            text.contains("pulse_processor_state_budget_exceeded_total 2"),
            "{text}"
        );
    }
}
