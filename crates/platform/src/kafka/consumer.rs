//! The Kafka consumer: a group member that stores an offset only when the caller says the
//! record's output is durable (`mark_durable`), commits stored offsets periodically and
//! before giving partitions away in a rebalance, reports rebalances to the service, and
//! exports consumer lag, refreshed on a timer from the broker ([`refresh_lag`]) so that it
//! keeps growing while consumption is paused or stuck. A watchdog ([`StuckDetector`]) makes
//! a member that owns no partition while nobody consumes its topics leave and rejoin the group.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::BorrowedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};
use tokio::sync::mpsc;

use crate::kafka::KafkaConfig;
use crate::metrics as m;

/// A change of this member's partitions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RebalanceEvent {
    /// These partitions are now ours.
    Assigned(Vec<(String, i32)>),
    /// These partitions are being taken away; their stored offsets were committed first.
    Revoked(Vec<(String, i32)>),
    /// The rebalance failed (the group will retry).
    Error(KafkaError),
}

/// Called before the commit that hands partitions away (see [`KafkaConsumer::before_revoke`]).
type RevokeHook = Box<dyn Fn() + Send + Sync>;

/// librdkafka callbacks: rebalances, commits and logs.
pub struct PulseConsumerContext {
    events: mpsc::UnboundedSender<RebalanceEvent>,
    before_revoke: OnceLock<RevokeHook>,
    /// Set when the last rebalance assigned this member nothing (librdkafka applied an
    /// empty assignment); cleared by a non-empty assignment or a revoke. Read by the
    /// watchdog ([`StuckDetector`]'s fast path).
    assigned_nothing: Mutex<bool>,
}

impl PulseConsumerContext {
    fn set_assigned_nothing(&self, value: bool) {
        *self
            .assigned_nothing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = value;
    }

    fn assigned_nothing(&self) -> bool {
        *self
            .assigned_nothing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl std::fmt::Debug for PulseConsumerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PulseConsumerContext")
            .field("before_revoke", &self.before_revoke.get().is_some())
            .finish_non_exhaustive()
    }
}

/// Where this consumer stands on one partition it owns, as read from the broker by
/// [`refresh_lag`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset (None: the group never committed one).
    pub committed: Option<i64>,
    /// The offset after the last record handed to the application (None: nothing read
    /// since the partition was assigned).
    pub position: Option<i64>,
    /// The partition's low and high watermarks.
    pub low: i64,
    pub high: i64,
}

impl PartitionLag {
    /// `pulse_kafka_consumer_lag_records`: high watermark minus the committed offset (from
    /// the log start when nothing was committed, as a new group reads from the earliest).
    pub fn committed_lag(&self) -> i64 {
        (self.high - self.committed.unwrap_or(self.low).max(self.low)).max(0)
    }

    /// `pulse_kafka_consumer_processing_lag_records`: high watermark minus what this
    /// consumer reads next: its position, else (nothing read yet since the assignment)
    /// where it resumes, the committed offset or the log start. Never negative (a
    /// position past a watermark read a moment earlier).
    pub fn processing_lag(&self) -> i64 {
        let next = self
            .position
            .or(self.committed)
            .unwrap_or(self.low)
            .max(self.low);
        (self.high - next).max(0)
    }
}

/// Reads, for every partition this consumer owns, the committed offset, the position and
/// the watermarks (blocking broker calls: the assignment's committed offsets in one
/// request, then one watermark request per partition).
fn read_lag(
    consumer: &StreamConsumer<PulseConsumerContext>,
    timeout: Duration,
) -> KafkaResult<Vec<PartitionLag>> {
    let assignment = consumer.assignment()?;
    if assignment.count() == 0 {
        return Ok(Vec::new());
    }
    let committed = consumer.committed_offsets(assignment.clone(), timeout)?;
    let position = consumer.position()?;
    let offset_of = |tpl: &TopicPartitionList, topic: &str, partition: i32| match tpl
        .find_partition(topic, partition)
        .map(|e| e.offset())
    {
        Some(Offset::Offset(o)) if o >= 0 => Some(o),
        _ => None,
    };
    let mut out = Vec::with_capacity(assignment.count());
    for e in assignment.elements() {
        let (topic, partition) = (e.topic(), e.partition());
        let (low, high) = consumer.fetch_watermarks(topic, partition, timeout)?;
        out.push(PartitionLag {
            topic: topic.to_owned(),
            partition,
            committed: offset_of(&committed, topic, partition),
            position: offset_of(&position, topic, partition),
            low,
            high,
        });
    }
    Ok(out)
}

/// Refreshes both lag gauges every `every` until the consumer is dropped, from the broker
/// rather than from what the consumer fetched: librdkafka's own statistics only move while
/// the partition is fetched and the consumer polled, so a paused consumer (a writer whose
/// breaker is open) or a stuck one would show a frozen, small lag while the backlog grows.
/// Partitions this member reported before and no longer owns are set to 0, so a sum over
/// replicas counts each partition once. A round whose broker calls fail changes nothing
/// (logged at debug; the next round retries).
async fn refresh_lag(consumer: Weak<StreamConsumer<PulseConsumerContext>>, every: Duration) {
    let timeout = every.clamp(Duration::from_secs(1), Duration::from_secs(5));
    let mut reported: HashSet<(String, i32)> = HashSet::new();
    loop {
        tokio::time::sleep(every).await;
        let c = consumer.clone();
        let read =
            tokio::task::spawn_blocking(move || c.upgrade().map(|c| read_lag(&c, timeout))).await;
        let lags = match read {
            Ok(Some(Ok(lags))) => lags,
            Ok(Some(Err(e))) => {
                tracing::debug!(error = %e, "reading the consumer lag from the broker failed; retrying");
                continue;
            }
            _ => return, // the consumer was dropped (or the runtime is shutting down)
        };
        let mut now = HashSet::with_capacity(lags.len());
        for l in &lags {
            let (topic, partition) = (l.topic.clone(), l.partition.to_string());
            #[allow(clippy::cast_precision_loss)]
            {
                metrics::gauge!(m::KAFKA_CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.clone())
                    .set(l.committed_lag() as f64);
                metrics::gauge!(m::KAFKA_PROCESSING_LAG, "topic" => topic, "partition" => partition)
                    .set(l.processing_lag() as f64);
            }
            now.insert((l.topic.clone(), l.partition));
        }
        for (topic, partition) in reported.difference(&now) {
            metrics::gauge!(m::KAFKA_CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string()).set(0.0);
            metrics::gauge!(m::KAFKA_PROCESSING_LAG, "topic" => topic.clone(), "partition" => partition.to_string()).set(0.0);
        }
        reported = now;
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl ClientContext for PulseConsumerContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        crate::kafka::log_to_tracing(level, fac, log_message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        tracing::warn!(%error, reason, "kafka client error");
    }
}

impl ConsumerContext for PulseConsumerContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            if let Some(hook) = self.before_revoke.get() {
                hook();
            }
            // Hand over exactly what is durable, so the next owner resumes from there.
            let outcome = match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) => "ok",
                // Nothing stored since the last commit is not a failure.
                Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => "ok",
                Err(e) => {
                    tracing::warn!(error = %e, "commit before revoke failed; the next owner may reprocess records");
                    "error"
                }
            };
            metrics::counter!(m::KAFKA_COMMITS_TOTAL, "outcome" => outcome).increment(1);
            metrics::counter!(m::KAFKA_REBALANCES_TOTAL, "kind" => "revoke").increment(1);
            let parts = partitions(tpl);
            self.set_assigned_nothing(false);
            tracing::info!(partitions = ?parts, "partitions revoked");
            let _ = self.events.send(RebalanceEvent::Revoked(parts));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                metrics::counter!(m::KAFKA_REBALANCES_TOTAL, "kind" => "assign").increment(1);
                let parts = partitions(tpl);
                self.set_assigned_nothing(parts.is_empty());
                tracing::info!(partitions = ?parts, "partitions assigned");
                let _ = self.events.send(RebalanceEvent::Assigned(parts));
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => {
                metrics::counter!(m::KAFKA_REBALANCES_TOTAL, "kind" => "error").increment(1);
                tracing::warn!(error = %e, "rebalance failed");
                let _ = self.events.send(RebalanceEvent::Error(e.clone()));
            }
        }
        let assigned = consumer.assignment().map(|a| a.count()).unwrap_or(0);
        metrics::gauge!(m::KAFKA_ASSIGNED_PARTITIONS).set(assigned as f64);
    }

    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        let outcome = match result {
            Ok(())
            | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => "ok",
            Err(e) => {
                tracing::warn!(error = %e, "offset commit failed; it is retried with the next commit");
                "error"
            }
        };
        metrics::counter!(m::KAFKA_COMMITS_TOTAL, "outcome" => outcome).increment(1);
    }
}

/// How long closing a consumer (leaving its group) may take when a service's loop ends.
pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(10);

/// A consumer-group member.
#[derive(Clone)]
pub struct KafkaConsumer {
    inner: Arc<StreamConsumer<PulseConsumerContext>>,
    group_id: String,
    stuck: Arc<StuckState>,
}

/// What the watchdog found, and where it reports it (see [`KafkaConsumer::watch_health`]).
#[derive(Default)]
struct StuckState {
    group_id: String,
    reason: Mutex<Option<String>>,
    health: OnceLock<(crate::Health, &'static str)>,
}

impl StuckState {
    fn set(&self, reason: Option<String>) {
        metrics::gauge!(m::KAFKA_CONSUMER_STUCK, "group" => self.group_id.clone())
            .set(if reason.is_some() { 1.0 } else { 0.0 });
        if let Some((health, component)) = self.health.get() {
            match &reason {
                Some(r) => health.block(component, r.clone()),
                None => health.unblock(component),
            }
        }
        *self
            .reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = reason;
    }

    fn get(&self) -> Option<String> {
        self.reason
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl std::fmt::Debug for KafkaConsumer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaConsumer")
            .field("group_id", &self.group_id)
            .finish_non_exhaustive()
    }
}

impl KafkaConsumer {
    /// Joins `group_id` and subscribes to `topics`. Returns the consumer and the stream of
    /// rebalance events. New groups start from the earliest offset.
    pub fn new(
        cfg: &KafkaConfig,
        client_id: &str,
        group_id: &str,
        topics: &[&str],
    ) -> Result<(Self, mpsc::UnboundedReceiver<RebalanceEvent>), KafkaError> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut c = cfg.consumer_client_config(client_id);
        c.set("group.id", group_id)
            .set("enable.auto.commit", "true")
            .set(
                "auto.commit.interval.ms",
                cfg.commit_interval_ms.to_string(),
            )
            // Offsets are stored only by mark_durable, never on delivery to the app.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", cfg.session_timeout_ms.to_string());
        cfg.apply_options(&mut c);
        let consumer: StreamConsumer<PulseConsumerContext> =
            c.create_with_context(PulseConsumerContext {
                events: tx,
                before_revoke: OnceLock::new(),
                assigned_nothing: Mutex::new(false),
            })?;
        consumer.subscribe(topics)?;
        let this = Self {
            inner: Arc::new(consumer),
            group_id: group_id.to_owned(),
            stuck: Arc::new(StuckState {
                group_id: group_id.to_owned(),
                ..StuckState::default()
            }),
        };
        if let (false, Ok(rt)) = (
            cfg.consumer_stuck_timeout.is_zero(),
            tokio::runtime::Handle::try_current(),
        ) {
            rt.spawn(watchdog(
                Arc::downgrade(&this.inner),
                this.stuck.clone(),
                topics.iter().map(|t| (*t).to_owned()).collect(),
                group_id.to_owned(),
                cfg.consumer_stuck_timeout,
            ));
        }
        // The lag gauges, every --kafka-statistics-interval-ms (0: none).
        if let (false, Ok(rt)) = (
            cfg.statistics_interval_ms == 0,
            tokio::runtime::Handle::try_current(),
        ) {
            rt.spawn(refresh_lag(
                Arc::downgrade(&this.inner),
                Duration::from_millis(u64::from(cfg.statistics_interval_ms)),
            ));
        }
        this.stuck.set(None);
        Ok((this, rx))
    }

    /// Reports the stuck-member watchdog's verdict to `health`: readiness is blocked for
    /// `component` with the reason while this member owns no partition and nobody consumes
    /// its topics (see `--kafka-consumer-stuck-timeout`). Only the first call counts.
    pub fn watch_health(&self, health: crate::Health, component: &'static str) {
        if self.stuck.health.set((health, component)).is_ok() {
            self.stuck.set(self.stuck.get());
        }
    }

    /// Why the watchdog considers this member stuck, if it does.
    pub fn stuck_reason(&self) -> Option<String> {
        self.stuck.get()
    }

    /// The next record (also drives rebalance callbacks).
    pub async fn recv(&self) -> Result<BorrowedMessage<'_>, KafkaError> {
        let msg = self.inner.recv().await?;
        metrics::counter!(m::KAFKA_CONSUMED_TOTAL, "topic" => msg.topic().to_owned()).increment(1);
        Ok(msg)
    }

    /// Marks every record of `topic`/`partition` up to and including `offset` as durably
    /// processed: the next commit moves the group's position to `offset + 1`.
    pub fn mark_durable(&self, topic: &str, partition: i32, offset: i64) -> Result<(), KafkaError> {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(offset + 1))?;
        self.inner.store_offsets(&tpl)?;
        metrics::counter!(m::KAFKA_OFFSETS_STORED_TOTAL, "topic" => topic.to_owned()).increment(1);
        Ok(())
    }

    /// Installs `hook`, run in the rebalance callback before the stored offsets are committed
    /// and the partitions handed to their next owner: the place to make writes that were
    /// already queued land first (for example `KafkaProducer::flush`). It runs on the task
    /// that polls the consumer and may block it. Only the first hook installed is kept;
    /// returns false if one was already installed.
    pub fn before_revoke(&self, hook: impl Fn() + Send + Sync + 'static) -> bool {
        self.inner
            .context()
            .before_revoke
            .set(Box::new(hook))
            .is_ok()
    }

    /// Commits the stored offsets now and waits for the broker (use at shutdown).
    pub fn commit_now(&self) -> Result<(), KafkaError> {
        match self.inner.commit_consumer_state(CommitMode::Sync) {
            Ok(())
            | Err(KafkaError::ConsumerCommit(rdkafka::types::RDKafkaErrorCode::NoOffset)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// The group's committed offsets for the current assignment.
    pub fn committed(
        &self,
        timeout: std::time::Duration,
    ) -> Result<TopicPartitionList, KafkaError> {
        self.inner.committed(timeout)
    }

    /// Stops fetching every assigned partition, keeping the group membership (records
    /// already fetched are dropped by librdkafka and fetched again after
    /// [`resume_all`](Self::resume_all), from the last one handed over). A partition
    /// assigned later is not paused. Best effort: a failure is logged.
    pub fn pause_all(&self) {
        match self.inner.assignment() {
            Ok(a) => {
                if let Err(e) = self.inner.pause(&a) {
                    tracing::warn!(error = %e, "pausing the assigned partitions failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the assignment to pause failed"),
        }
    }

    /// Resumes fetching every assigned partition (see [`pause_all`](Self::pause_all)).
    pub fn resume_all(&self) {
        match self.inner.assignment() {
            Ok(a) => {
                if let Err(e) = self.inner.resume(&a) {
                    tracing::warn!(error = %e, "resuming the assigned partitions failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading the assignment to resume failed"),
        }
    }

    /// The underlying consumer, for seek and metadata.
    pub fn raw(&self) -> &StreamConsumer<PulseConsumerContext> {
        &self.inner
    }

    pub fn group_id(&self) -> &str {
        &self.group_id
    }

    /// The end of a service's consumer loop that returned `result`: an error is logged
    /// first (the close may take its whole timeout), then the consumer is closed within
    /// [`CLOSE_TIMEOUT`] ([`close_within`](Self::close_within)); returns `result`. Drop the
    /// loop's other clones of the consumer before.
    pub async fn close_after<E: std::fmt::Display>(self, result: Result<(), E>) -> Result<(), E> {
        if let Err(e) = &result {
            tracing::warn!(group = %self.group_id, error = %e, "the consuming loop stopped on an error; closing the consumer, then exiting (what was not committed is read again after the restart)");
        }
        self.close_within(CLOSE_TIMEOUT).await;
        result
    }

    /// Leaves the group and closes the consumer, waiting at most `timeout`. librdkafka's
    /// close runs the last rebalance and waits for the group coordinator; with a broker
    /// that accepts connections but does not answer it never returns (seen: a processor
    /// whose loop had ended stayed up, live and silent, for minutes after a broker
    /// restart). The close runs on a thread of its own; past `timeout` it is left there
    /// (the process is about to exit; the group drops the member after its session
    /// timeout) and this returns false, logged at WARN. Only the last clone closes: with
    /// others alive this drops its handle and returns true.
    pub async fn close_within(self, timeout: Duration) -> bool {
        let Self {
            inner, group_id, ..
        } = self;
        if Arc::strong_count(&inner) > 1 {
            return true;
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("kafka-consumer-close".into())
            .spawn(move || {
                drop(inner);
                let _ = tx.send(());
            });
        if let Err(e) = spawned {
            tracing::warn!(group = %group_id, error = %e, "no thread to close the Kafka consumer on; leaving it open");
            return false;
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(_) => true,
            Err(_) => {
                tracing::warn!(
                    group = %group_id,
                    timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX),
                    "closing the Kafka consumer did not finish in time (the broker does not answer); leaving it, the group drops this member after its session timeout"
                );
                false
            }
        }
    }
}

/// Where the group stands on one partition of a subscribed topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionProgress {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset; None if it never committed one.
    pub committed: Option<i64>,
    pub low: i64,
    pub high: i64,
}

impl PartitionProgress {
    /// Where the group resumes reading (the committed offset, else the start of the log).
    fn position(&self) -> i64 {
        self.committed.unwrap_or(self.low).max(self.low)
    }
}

/// The watchdog's verdict on one observation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// This member owns partitions, or its topics have nothing to read, or the group's
    /// committed offsets advance: nothing to do.
    Fine,
    /// This member owns nothing and nothing advances, for less than the timeout so far
    /// (or the broker could not be asked).
    Watching,
    /// Owns nothing while nothing advances for `stalled` (`orphaned`: since a rebalance
    /// assigned it nothing, which is sooner): rejoin now.
    Stuck {
        stalled: Duration,
        pending: usize,
        orphaned: bool,
    },
}

/// Decides when a consumer-group member is stuck: it owns no partition while partitions of
/// its topics have records left to read and none of the group's committed offsets advanced,
/// for the stuck timeout. A member beyond the partition count also owns nothing, but then
/// the members that own the partitions commit, which resets the clock.
///
/// A member whose last rebalance assigned it nothing (librdkafka applied an empty
/// assignment) while records are left and nothing advances is stuck sooner: after two
/// watchdog rounds (a third of the stuck timeout). That is the broken generation Tansu
/// 0.6's group coordinator forms when a killed member was the leader and expires between a
/// follower's JoinGroup and SyncGroup: the follower's empty SyncGroup completes the
/// generation and every member is assigned nothing until one rejoins. (Asking the
/// coordinator how many members the group has would tell that from a spare replica, but
/// Tansu 0.6 drops the connection on DescribeGroups.) A spare replica whose owners do not
/// commit for that long rejoins too, which costs the group a rebalance, no data. After
/// each `Stuck` the next one needs twice as long (at most 8 times), so a cause a rejoin
/// does not fix (an owner that legitimately does not commit) costs a rebalance rarely.
#[derive(Debug)]
pub struct StuckDetector {
    timeout: Duration,
    grace: Duration,
    since: Option<Instant>,
    orphaned_since: Option<Instant>,
    last: HashMap<(String, i32), i64>,
    strikes: u32,
}

impl StuckDetector {
    pub fn new(timeout: Duration) -> Self {
        Self {
            timeout,
            grace: watchdog_round(timeout) * 2,
            since: None,
            orphaned_since: None,
            last: HashMap::new(),
            strikes: 0,
        }
    }

    /// The time the condition must hold before the next `Stuck`.
    pub fn required(&self) -> Duration {
        self.timeout * 2u32.pow(self.strikes.min(3))
    }

    /// The time an orphaned member waits before the next `Stuck`.
    pub fn required_orphaned(&self) -> Duration {
        self.grace * 2u32.pow(self.strikes.min(3))
    }

    /// One observation at `now`: the partitions this member owns and, when it owns none,
    /// the group's progress on every partition of its topics (None: the broker could not
    /// be asked; that is no evidence of progress, so the clock starts or keeps running),
    /// and whether its last rebalance assigned it nothing.
    pub fn observe(
        &mut self,
        now: Instant,
        assigned: usize,
        progress: Option<&[PartitionProgress]>,
        assigned_nothing: bool,
    ) -> Verdict {
        if assigned > 0 {
            self.since = None;
            self.orphaned_since = None;
            self.last.clear();
            self.strikes = 0;
            return Verdict::Fine;
        }
        // Unknown progress (the broker did not answer) is no evidence that anyone consumes:
        // the clock runs; `pending` 0 then stands for "unknown".
        let mut pending = 0;
        let mut advanced = false;
        if let Some(parts) = progress {
            for p in parts {
                let key = (p.topic.clone(), p.partition);
                // Only a committed offset that moved up counts as progress (a commit that
                // was not readable once and is again is not).
                if let Some(c) = p.committed {
                    if self.last.get(&key).is_some_and(|prev| c > *prev) {
                        advanced = true;
                    }
                    self.last.insert(key, c);
                }
                if p.high > p.position() {
                    pending += 1;
                }
            }
        }
        if assigned_nothing && progress.is_some() && pending > 0 && !advanced {
            let since = *self.orphaned_since.get_or_insert(now);
            let held = now.saturating_duration_since(since);
            if held >= self.required_orphaned() {
                self.orphaned_since = None;
                self.since = Some(now);
                self.strikes += 1;
                return Verdict::Stuck {
                    stalled: held,
                    pending,
                    orphaned: true,
                };
            }
        } else {
            self.orphaned_since = None;
        }
        if progress.is_some() && (advanced || pending == 0) {
            self.since = None;
            return Verdict::Fine;
        }
        let since = *self.since.get_or_insert(now);
        let stalled = now.saturating_duration_since(since);
        if stalled >= self.required() {
            self.since = Some(now);
            self.orphaned_since = None;
            self.strikes += 1;
            return Verdict::Stuck {
                stalled,
                pending,
                orphaned: false,
            };
        }
        Verdict::Watching
    }
}

/// How often the watchdog observes a member: a sixth of the stuck timeout, 1 s to 10 s.
fn watchdog_round(timeout: Duration) -> Duration {
    (timeout / 6).clamp(Duration::from_secs(1), Duration::from_secs(10))
}

/// Reads the group's progress on every partition of `topics` (blocking broker calls).
fn read_progress(
    consumer: &StreamConsumer<PulseConsumerContext>,
    topics: &[String],
) -> KafkaResult<Vec<PartitionProgress>> {
    let timeout = Duration::from_secs(5);
    let mut tpl = TopicPartitionList::new();
    let mut parts = Vec::new();
    for topic in topics {
        let md = consumer.fetch_metadata(Some(topic), timeout)?;
        for t in md.topics().iter().filter(|t| t.name() == topic) {
            for p in t.partitions() {
                tpl.add_partition(topic, p.id());
                let (low, high) = consumer.fetch_watermarks(topic, p.id(), timeout)?;
                parts.push(PartitionProgress {
                    topic: topic.clone(),
                    partition: p.id(),
                    committed: None,
                    low,
                    high,
                });
            }
        }
    }
    if parts.is_empty() {
        return Ok(parts);
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    for p in &mut parts {
        if let Some(Offset::Offset(o)) = committed
            .find_partition(&p.topic, p.partition)
            .map(|e| e.offset())
        {
            p.committed = Some(o);
        }
    }
    Ok(parts)
}

/// What the watchdog observed in one round.
struct Observation {
    assigned: usize,
    progress: Option<Vec<PartitionProgress>>,
    assigned_nothing: bool,
}

/// The stuck-member watchdog: observes the consumer every few seconds until it is dropped;
/// when [`StuckDetector`] says stuck, blocks readiness (if wired) and leaves and rejoins
/// the group (unsubscribe, subscribe: the broker sees a new member join and rebalances,
/// which a broker that kept a dead member's generation, as Tansu 0.6 does, needs).
async fn watchdog(
    consumer: Weak<StreamConsumer<PulseConsumerContext>>,
    state: Arc<StuckState>,
    topics: Vec<String>,
    group_id: String,
    timeout: Duration,
) {
    let mut detector = StuckDetector::new(timeout);
    let every = watchdog_round(timeout);
    loop {
        tokio::time::sleep(every).await;
        let (c, t) = (consumer.clone(), topics.clone());
        let observed = tokio::task::spawn_blocking(move || {
            let c = c.upgrade()?;
            let assigned = c.assignment().map(|a| a.count()).unwrap_or(0);
            if assigned > 0 {
                return Some(Observation {
                    assigned,
                    progress: None,
                    assigned_nothing: false,
                });
            }
            let progress = match read_progress(&c, &t) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(error = %e, "stuck-member watchdog: reading the group's progress failed; counting it as no progress");
                    None
                }
            };
            Some(Observation {
                assigned,
                progress,
                assigned_nothing: c.context().assigned_nothing(),
            })
        })
        .await;
        let Ok(Some(o)) = observed else {
            return; // the consumer was dropped (or the runtime is shutting down)
        };
        let verdict = detector.observe(
            Instant::now(),
            o.assigned,
            o.progress.as_deref(),
            o.assigned_nothing,
        );
        match verdict {
            Verdict::Fine => {
                if state.get().is_some() {
                    tracing::info!(group = %group_id, "consumer is no longer stuck");
                    state.set(None);
                }
            }
            Verdict::Watching => {}
            Verdict::Stuck {
                stalled,
                pending,
                orphaned,
            } => {
                let stalled = humantime::format_duration(Duration::from_secs(stalled.as_secs()));
                let reason = if orphaned {
                    format!(
                        "consumer of group {group_id} was assigned no partition by the last rebalance while {pending} partition(s) of {topics:?} have records left and no committed offset advanced for {stalled}; rejoining the group"
                    )
                } else {
                    let left = if pending > 0 {
                        format!("{pending} partition(s) of {topics:?} have records left")
                    } else {
                        format!("the group's progress on {topics:?} cannot be read")
                    };
                    format!(
                        "consumer of group {group_id} owns no partition while {left} and no committed offset advanced for {stalled}; rejoining the group"
                    )
                };
                tracing::warn!(group = %group_id, "{reason}");
                state.set(Some(reason));
                metrics::counter!(m::KAFKA_CONSUMER_REJOINS_TOTAL, "group" => group_id.clone())
                    .increment(1);
                let (c, t) = (consumer.clone(), topics.clone());
                let rejoined = tokio::task::spawn_blocking(move || {
                    let c = c.upgrade()?;
                    c.unsubscribe();
                    c.context().set_assigned_nothing(false);
                    let refs: Vec<&str> = t.iter().map(String::as_str).collect();
                    Some(c.subscribe(&refs))
                })
                .await;
                match rejoined {
                    Ok(Some(Ok(()))) => {}
                    Ok(Some(Err(e))) => {
                        tracing::error!(group = %group_id, error = %e, "resubscribing after leaving the group failed")
                    }
                    _ => return,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::PartitionLag;

    fn lag(committed: Option<i64>, position: Option<i64>, low: i64, high: i64) -> PartitionLag {
        PartitionLag {
            topic: "t".into(),
            partition: 0,
            committed,
            position,
            low,
            high,
        }
    }

    #[test]
    fn processing_lag_is_what_is_left_to_read_and_grows_while_the_position_stands_still() {
        assert_eq!(lag(Some(100), Some(400), 0, 1_000).processing_lag(), 600);
        assert_eq!(lag(Some(100), Some(1_000), 0, 1_000).processing_lag(), 0);
        // Paused or stuck: the position stays, the high watermark moves on.
        assert_eq!(lag(Some(100), Some(400), 0, 5_000).processing_lag(), 4_600);
        // A position past a watermark read earlier never shows as negative lag.
        assert_eq!(lag(None, Some(1_005), 0, 1_000).processing_lag(), 0);
    }

    #[test]
    fn nothing_read_yet_counts_from_where_the_consumer_resumes() {
        assert_eq!(lag(Some(300), None, 0, 1_000).processing_lag(), 700);
        assert_eq!(lag(None, None, 200, 1_000).processing_lag(), 800);
        // A committed offset deleted by retention resumes at the log start.
        assert_eq!(lag(Some(50), None, 200, 1_000).processing_lag(), 800);
    }

    #[test]
    fn committed_lag_counts_from_the_committed_offset_or_the_log_start() {
        assert_eq!(lag(Some(300), Some(900), 0, 1_000).committed_lag(), 700);
        assert_eq!(lag(None, Some(900), 100, 1_000).committed_lag(), 900);
        assert_eq!(lag(Some(1_000), None, 0, 1_000).committed_lag(), 0);
    }

    mod stuck {
        use std::time::{Duration, Instant};

        use super::super::{PartitionProgress, StuckDetector, Verdict};

        fn parts(positions: &[(Option<i64>, i64)]) -> Vec<PartitionProgress> {
            positions
                .iter()
                .enumerate()
                .map(|(i, (committed, high))| PartitionProgress {
                    topic: "t".into(),
                    partition: i as i32,
                    committed: *committed,
                    low: 0,
                    high: *high,
                })
                .collect()
        }

        const T: Duration = Duration::from_secs(30);

        #[test]
        fn a_member_that_owns_nothing_while_nothing_advances_is_stuck_after_the_timeout() {
            let mut d = StuckDetector::new(T);
            let t0 = Instant::now();
            let p = parts(&[(Some(10), 50), (None, 20), (Some(5), 5)]);
            assert_eq!(d.observe(t0, 0, Some(&p), false), Verdict::Watching);
            assert_eq!(d.observe(t0 + T / 2, 0, Some(&p), false), Verdict::Watching);
            assert_eq!(
                d.observe(t0 + T, 0, Some(&p), false),
                Verdict::Stuck {
                    stalled: T,
                    pending: 2,
                    orphaned: false
                }
            );
            // The clock restarts, and the next verdict needs twice as long.
            assert_eq!(d.observe(t0 + T * 2, 0, Some(&p), false), Verdict::Watching);
            assert!(matches!(
                d.observe(t0 + T * 3, 0, Some(&p), false),
                Verdict::Stuck { .. }
            ));
            assert_eq!(d.required(), T * 4);
            // Owning partitions again resets everything.
            assert_eq!(d.observe(t0 + T * 4, 3, None, false), Verdict::Fine);
            assert_eq!(d.required(), T);
        }

        #[test]
        fn a_member_beyond_the_partition_count_is_fine_while_the_owners_commit() {
            let mut d = StuckDetector::new(T);
            let t0 = Instant::now();
            for i in 0..10u32 {
                let committed = 10 + i64::from(i);
                let p = parts(&[(Some(committed), 100), (Some(7), 100)]);
                let v = d.observe(t0 + T * i, 0, Some(&p), false);
                assert!(
                    matches!(v, Verdict::Fine | Verdict::Watching),
                    "{v:?} at {i}"
                );
                if i > 0 {
                    assert_eq!(v, Verdict::Fine);
                }
            }
        }

        #[test]
        fn nothing_to_read_or_no_partitions_is_fine() {
            let mut d = StuckDetector::new(T);
            let t0 = Instant::now();
            let caught_up = parts(&[(Some(50), 50), (None, 0)]);
            for i in 0..5u32 {
                assert_eq!(
                    d.observe(t0 + T * i, 0, Some(&caught_up), false),
                    Verdict::Fine
                );
                assert_eq!(d.observe(t0 + T * i, 0, Some(&[]), false), Verdict::Fine);
            }
        }

        #[test]
        fn unknown_progress_is_no_progress() {
            let mut d = StuckDetector::new(T);
            let t0 = Instant::now();
            assert_eq!(d.observe(t0, 0, None, false), Verdict::Watching);
            let p = parts(&[(Some(1), 9)]);
            assert_eq!(d.observe(t0 + T / 2, 0, Some(&p), false), Verdict::Watching);
            assert_eq!(
                d.observe(t0 + T, 0, None, false),
                Verdict::Stuck {
                    stalled: T,
                    pending: 0,
                    orphaned: false
                }
            );
        }

        #[test]
        fn a_commit_that_becomes_readable_again_is_not_progress() {
            let mut d = StuckDetector::new(T);
            let t0 = Instant::now();
            let five = parts(&[(Some(5), 9)]);
            assert_eq!(d.observe(t0, 0, Some(&five), false), Verdict::Watching);
            let unknown = parts(&[(None, 9)]);
            assert_eq!(
                d.observe(t0 + T / 3, 0, Some(&unknown), false),
                Verdict::Watching
            );
            assert!(matches!(
                d.observe(t0 + T, 0, Some(&five), false),
                Verdict::Stuck { .. }
            ));
        }

        #[test]
        fn a_member_assigned_nothing_is_stuck_after_two_rounds_and_then_backs_off() {
            let mut d = StuckDetector::new(T);
            let grace = T / 3; // two watchdog rounds of T / 6
            let t0 = Instant::now();
            let p = parts(&[(Some(10), 50), (None, 20), (Some(5), 5)]);
            assert_eq!(d.observe(t0, 0, Some(&p), true), Verdict::Watching);
            assert_eq!(
                d.observe(t0 + grace / 2, 0, Some(&p), true),
                Verdict::Watching
            );
            assert_eq!(
                d.observe(t0 + grace, 0, Some(&p), true),
                Verdict::Stuck {
                    stalled: grace,
                    pending: 2,
                    orphaned: true
                }
            );
            // A rejoin that did not help: the next one waits twice as long.
            assert_eq!(
                d.observe(t0 + grace * 2, 0, Some(&p), true),
                Verdict::Watching
            );
            assert_eq!(
                d.observe(t0 + grace * 3, 0, Some(&p), true),
                Verdict::Watching
            );
            assert!(matches!(
                d.observe(t0 + grace * 4, 0, Some(&p), true),
                Verdict::Stuck { orphaned: true, .. }
            ));
        }

        #[test]
        fn an_empty_assignment_is_not_stuck_early_while_the_group_advances_or_nothing_is_left() {
            let mut d = StuckDetector::new(T);
            let round = T / 6;
            let t0 = Instant::now();
            // A spare replica while the owners commit.
            for i in 0..8u32 {
                let p = parts(&[(Some(10 + i64::from(i)), 100)]);
                let v = d.observe(t0 + round * i, 0, Some(&p), true);
                assert!(
                    matches!(v, Verdict::Fine | Verdict::Watching),
                    "{v:?} at {i}"
                );
            }
            // Nothing left to read, or the broker cannot be asked (the slow path decides).
            let mut d = StuckDetector::new(T);
            let idle = parts(&[(Some(5), 5)]);
            for i in 0..4u32 {
                assert_eq!(
                    d.observe(t0 + round * i, 0, Some(&idle), true),
                    Verdict::Fine
                );
            }
            let mut d = StuckDetector::new(T);
            for i in 0..4u32 {
                assert_eq!(d.observe(t0 + round * i, 0, None, true), Verdict::Watching);
            }
            // Assigned nothing once, then a new rebalance is under way: the clock restarts.
            let mut d = StuckDetector::new(T);
            let p = parts(&[(Some(10), 50)]);
            assert_eq!(d.observe(t0, 0, Some(&p), true), Verdict::Watching);
            assert_eq!(d.observe(t0 + round, 0, Some(&p), false), Verdict::Watching);
            assert_eq!(
                d.observe(t0 + round * 2, 0, Some(&p), true),
                Verdict::Watching
            );
            assert_eq!(
                d.observe(t0 + round * 3, 0, Some(&p), true),
                Verdict::Watching
            );
        }

        #[test]
        fn a_committed_offset_below_the_log_start_counts_from_the_log_start() {
            let mut d = StuckDetector::new(T);
            let t0 = Instant::now();
            let mut p = parts(&[(Some(3), 10)]);
            p[0].low = 10;
            // Everything left was deleted by retention: nothing to read.
            assert_eq!(d.observe(t0, 0, Some(&p), false), Verdict::Fine);
        }
    }
}
