//! The Kafka consumer: a group member that stores an offset only when the caller says the
//! record's output is durable (`mark_durable`), commits stored offsets periodically and
//! before giving partitions away in a rebalance, reports rebalances to the service, and
//! exports consumer lag from librdkafka statistics.

use std::sync::{Arc, OnceLock};

use rdkafka::client::ClientContext;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer,
};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::message::BorrowedMessage;
use rdkafka::statistics::Statistics;
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

/// librdkafka callbacks: rebalances, commits, statistics and logs.
pub struct PulseConsumerContext {
    events: mpsc::UnboundedSender<RebalanceEvent>,
    before_revoke: OnceLock<RevokeHook>,
}

impl std::fmt::Debug for PulseConsumerContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PulseConsumerContext")
            .field("before_revoke", &self.before_revoke.get().is_some())
            .finish_non_exhaustive()
    }
}

/// Processing lag of one partition from librdkafka's statistics: the high watermark minus
/// the offset after the last record handed to the application (`app_offset`), i.e. what
/// this consumer still has to read. 0 for a partition it does not fetch (revoked, or never
/// assigned: `fetch_state` other than `active`), so a sum over replicas counts each
/// partition once; None while either offset is unknown (-1 before the first fetch).
pub fn processing_lag(fetch_state: &str, hi_offset: i64, app_offset: i64) -> Option<i64> {
    if fetch_state != "active" {
        return Some(0);
    }
    if hi_offset < 0 {
        return None;
    }
    if app_offset < 0 {
        // Assigned and fetching but nothing handed over yet: everything is still ahead,
        // unless librdkafka has not resolved the start offset (reported as unknown).
        return None;
    }
    Some((hi_offset - app_offset).max(0))
}

fn partitions(tpl: &TopicPartitionList) -> Vec<(String, i32)> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

impl ClientContext for PulseConsumerContext {
    fn stats(&self, stats: Statistics) {
        for (topic, t) in &stats.topics {
            for (partition, p) in &t.partitions {
                // Partition -1 is librdkafka's internal "unassigned" bucket; lag -1 means unknown.
                if *partition < 0 {
                    continue;
                }
                if p.consumer_lag >= 0 {
                    metrics::gauge!(m::KAFKA_CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string())
                        .set(p.consumer_lag as f64);
                }
                if let Some(lag) = processing_lag(&p.fetch_state, p.hi_offset, p.app_offset) {
                    metrics::gauge!(m::KAFKA_PROCESSING_LAG, "topic" => topic.clone(), "partition" => partition.to_string())
                        .set(lag as f64);
                }
            }
        }
    }

    fn log(&self, level: RDKafkaLogLevel, fac: &str, log_message: &str) {
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(facility = fac, "librdkafka: {log_message}")
            }
            RDKafkaLogLevel::Warning => tracing::warn!(facility = fac, "librdkafka: {log_message}"),
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(facility = fac, "librdkafka: {log_message}")
            }
            RDKafkaLogLevel::Debug => tracing::debug!(facility = fac, "librdkafka: {log_message}"),
        }
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
            tracing::info!(partitions = ?parts, "partitions revoked");
            let _ = self.events.send(RebalanceEvent::Revoked(parts));
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                metrics::counter!(m::KAFKA_REBALANCES_TOTAL, "kind" => "assign").increment(1);
                let parts = partitions(tpl);
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

/// A consumer-group member.
#[derive(Clone)]
pub struct KafkaConsumer {
    inner: Arc<StreamConsumer<PulseConsumerContext>>,
    group_id: String,
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
        let mut c = cfg.client_config(client_id);
        c.set("group.id", group_id)
            .set("enable.auto.commit", "true")
            .set(
                "auto.commit.interval.ms",
                cfg.commit_interval_ms.to_string(),
            )
            // Offsets are stored only by mark_durable, never on delivery to the app.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", cfg.session_timeout_ms.to_string())
            .set(
                "statistics.interval.ms",
                cfg.statistics_interval_ms.to_string(),
            );
        cfg.apply_options(&mut c);
        let consumer: StreamConsumer<PulseConsumerContext> =
            c.create_with_context(PulseConsumerContext {
                events: tx,
                before_revoke: OnceLock::new(),
            })?;
        consumer.subscribe(topics)?;
        Ok((
            Self {
                inner: Arc::new(consumer),
                group_id: group_id.to_owned(),
            },
            rx,
        ))
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
}

#[cfg(test)]
mod tests {
    use super::processing_lag;

    #[test]
    fn processing_lag_is_what_is_left_to_read_of_an_active_partition() {
        assert_eq!(processing_lag("active", 1_000, 400), Some(600));
        assert_eq!(processing_lag("active", 1_000, 1_000), Some(0));
        // A position past a watermark read earlier never shows as negative lag.
        assert_eq!(processing_lag("active", 1_000, 1_005), Some(0));
    }

    #[test]
    fn partitions_not_fetched_count_zero_and_unknown_offsets_are_skipped() {
        assert_eq!(processing_lag("stopped", 1_000, 400), Some(0));
        assert_eq!(processing_lag("none", -1, -1), Some(0));
        assert_eq!(processing_lag("active", -1, 5), None);
        assert_eq!(processing_lag("active", 1_000, -1), None);
    }
}
