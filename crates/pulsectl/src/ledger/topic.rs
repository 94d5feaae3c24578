//! Reading a topic for the ledger, incrementally: a [`TopicTail`] starts at the first record
//! produced at or after a time (or the partition's beginning when the broker cannot look
//! offsets up by time) and [`TopicTail::read_chunk`] returns the records up to the end the
//! partitions had when the round of reads began, a bounded chunk at a time, then remembers
//! where it stopped. Partitions are
//! assigned directly (no group membership, no commits), so the ledger never moves anyone's
//! offsets. What the records mean is `ledger::decode`'s.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use pulse_platform::kafka::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::dlq::ReadError;

/// One record, with the headers the ledger reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawRecord {
    pub partition: i32,
    pub offset: i64,
    /// `pulse-event-id`.
    pub event_id: Option<String>,
    /// `pulse-source-topic` (DLQ records of the writers).
    pub source_topic: Option<String>,
    /// `pulse-ingest-ts`: when ingest accepted the event, epoch ms.
    pub ingest_ms: Option<i64>,
    pub payload: Vec<u8>,
}

/// A topic read from a starting time onwards, chunk by chunk.
pub struct TopicTail {
    consumer: BaseConsumer,
    topic: String,
    /// partition → next offset to read.
    next: BTreeMap<i32, i64>,
    /// partition → the end of the round of reads in progress (`read_chunk`).
    round: Option<BTreeMap<i32, i64>>,
}

impl std::fmt::Debug for TopicTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicTail")
            .field("topic", &self.topic)
            .field("next", &self.next)
            .finish_non_exhaustive()
    }
}

fn header(h: Option<&rdkafka::message::BorrowedHeaders>, name: &str) -> Option<String> {
    h?.iter()
        .find(|x| x.key == name)
        .and_then(|x| x.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

impl TopicTail {
    /// Opens `topic` at the first record with a timestamp at or after `start_ms` in every
    /// partition (`None`: from the beginning). Blocking; call from a blocking task.
    pub fn open(
        kafka: &KafkaConfig,
        topic: &str,
        start_ms: Option<i64>,
        timeout: Duration,
    ) -> Result<Self, ReadError> {
        // Assigned, never subscribed: nothing is committed. The services' bounded prefetch
        // (three tails are open at once).
        let (consumer, partitions) = crate::dlq::read::assigned_consumer(
            &kafka.with_consumer_prefetch_defaults(),
            "pulsectl-ledger",
            "pulsectl-ledger",
            topic,
            timeout,
        )?;
        let mut next = BTreeMap::new();
        for p in &partitions {
            let (low, _) = consumer.fetch_watermarks(topic, *p, timeout)?;
            next.insert(*p, low);
        }
        if let Some(start) = start_ms {
            // Where the broker can look offsets up by time, start there; where it cannot
            // (or answers nothing usable), the beginning is always right, only slower.
            let mut tpl = TopicPartitionList::new();
            for p in &partitions {
                tpl.add_partition_offset(topic, *p, Offset::Offset(start.max(0)))?;
            }
            if let Ok(found) = consumer.offsets_for_times(tpl, timeout) {
                for e in found.elements() {
                    let low = next.get(&e.partition()).copied().unwrap_or(0);
                    match e.offset() {
                        Offset::Offset(o) if o >= low => {
                            next.insert(e.partition(), o);
                        }
                        Offset::End => {
                            let (_, high) =
                                consumer.fetch_watermarks(topic, e.partition(), timeout)?;
                            next.insert(e.partition(), high.max(low));
                        }
                        _ => {}
                    }
                }
            }
        }
        Ok(Self {
            consumer,
            topic: topic.to_owned(),
            next,
            round: None,
        })
    }

    /// The topic's name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Records between where the tail is and the current end of every partition: what a
    /// catch-up reads now (for its progress).
    pub fn backlog(&self, timeout: Duration) -> Result<u64, ReadError> {
        let mut left = 0_u64;
        for (p, next) in &self.next {
            let (low, high) = self.consumer.fetch_watermarks(&self.topic, *p, timeout)?;
            left += u64::try_from(high - (*next).max(low)).unwrap_or(0);
        }
        Ok(left)
    }

    /// Reads from the given offsets again (a deferral of the book): each partition's next
    /// read starts at the lower of its position and the offset given.
    pub fn rewind(&mut self, offsets: &BTreeMap<i32, i64>) {
        for (p, o) in offsets {
            if let Some(next) = self.next.get_mut(p) {
                *next = (*next).min(*o);
            }
        }
    }

    /// Up to `max_records` records from where the last read stopped towards the ends the
    /// partitions had when this round of reads began, ordered by partition and offset,
    /// and whether more are left of the round (`false`: the round reached those ends; the
    /// next call starts a new round at the ends the partitions have then). Memory is
    /// bounded by `max_records` (and librdkafka's prefetch) whatever the backlog. Blocking;
    /// call from a blocking task. On an error nothing is remembered, so the next read
    /// returns the same records again.
    pub fn read_chunk(
        &mut self,
        timeout: Duration,
        max_records: usize,
    ) -> Result<(Vec<RawRecord>, bool), ReadError> {
        let topic = self.topic.clone();
        let ends = match self.round.take() {
            Some(ends) => ends,
            None => {
                let mut ends = BTreeMap::new();
                for p in self.next.keys() {
                    let (_, high) = self.consumer.fetch_watermarks(&topic, *p, timeout)?;
                    ends.insert(*p, high);
                }
                ends
            }
        };
        // partition → (next offset, end offset)
        let mut todo: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
        let mut tpl = TopicPartitionList::new();
        for (p, from) in &self.next {
            let (low, _) = self.consumer.fetch_watermarks(&topic, *p, timeout)?;
            let from = (*from).max(low);
            let end = ends.get(p).copied().unwrap_or(from);
            if end > from {
                tpl.add_partition_offset(&topic, *p, Offset::Offset(from))?;
                todo.insert(*p, (from, end));
            }
        }
        let mut out = Vec::new();
        if todo.is_empty() {
            return Ok((out, false));
        }
        self.consumer.assign(&tpl)?;
        let deadline = Instant::now() + timeout;
        let mut remaining = todo.clone();
        // partition → next offset after what `out` holds
        let mut reached: BTreeMap<i32, i64> = BTreeMap::new();
        while !remaining.is_empty() && out.len() < max_records.max(1) {
            if Instant::now() > deadline {
                return Err(ReadError::Timeout {
                    topic,
                    secs: timeout.as_secs(),
                    missing: remaining.len(),
                });
            }
            let Some(msg) = self.consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let msg = msg?;
            let Some((_, end)) = remaining.get(&msg.partition()).copied() else {
                continue;
            };
            if msg.offset() < end {
                let h = msg.headers();
                out.push(RawRecord {
                    partition: msg.partition(),
                    offset: msg.offset(),
                    event_id: header(h, pulse_contracts::headers::EVENT_ID),
                    source_topic: header(h, SOURCE_TOPIC),
                    ingest_ms: header(h, pulse_contracts::headers::INGEST_TS)
                        .and_then(|v| v.parse().ok()),
                    payload: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
                });
                reached.insert(msg.partition(), msg.offset() + 1);
            }
            if msg.offset() + 1 >= end {
                remaining.remove(&msg.partition());
                reached.insert(msg.partition(), end);
            }
        }
        // Stop fetching until the next read.
        self.consumer.unassign().map_err(ReadError::Kafka)?;
        for (p, at) in reached {
            self.next.insert(p, at);
        }
        if !remaining.is_empty() {
            self.round = Some(ends);
        }
        out.sort_by_key(|r| (r.partition, r.offset));
        Ok((out, !remaining.is_empty()))
    }
}

/// The header the writers put on the records they dead-letter: the topic it came from.
pub const SOURCE_TOPIC: &str = "pulse-source-topic";

/// Records read per chunk: what one read holds in memory at most (~0.5 KB a record).
pub const CHUNK_RECORDS: usize = 20_000;

/// Runs a blocking [`TopicTail::read_chunk`] of `tail` on the blocking pool.
pub async fn read_async(
    tail: &Arc<Mutex<TopicTail>>,
    timeout: Duration,
) -> Result<(Vec<RawRecord>, bool), ReadError> {
    let tail = Arc::clone(tail);
    tokio::task::spawn_blocking(move || {
        tail.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read_chunk(timeout, CHUNK_RECORDS)
    })
    .await
    .map_err(|_| ReadError::Kafka(KafkaError::Canceled))?
}

/// [`TopicTail::backlog`] of `tail` on the blocking pool.
pub async fn backlog_async(
    tail: &Arc<Mutex<TopicTail>>,
    timeout: Duration,
) -> Result<u64, ReadError> {
    let tail = Arc::clone(tail);
    tokio::task::spawn_blocking(move || {
        tail.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .backlog(timeout)
    })
    .await
    .map_err(|_| ReadError::Kafka(KafkaError::Canceled))?
}

/// Opens a tail on the blocking pool.
pub async fn open_async(
    kafka: &KafkaConfig,
    topic: &str,
    start_ms: Option<i64>,
    timeout: Duration,
) -> Result<TopicTail, ReadError> {
    let (kafka, topic) = (kafka.clone(), topic.to_owned());
    tokio::task::spawn_blocking(move || TopicTail::open(&kafka, &topic, start_ms, timeout))
        .await
        .map_err(|_| ReadError::Kafka(KafkaError::Canceled))?
}
