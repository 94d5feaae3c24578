//! Reading a topic for the ledger, incrementally: a [`TopicTail`] starts at the first record
//! produced at or after a time (or the partition's beginning when the broker cannot look
//! offsets up by time) and each [`TopicTail::read_to_end`] returns the records up to the end
//! the partitions have at that moment, then remembers where it stopped. Partitions are
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
        // Assigned, never subscribed: nothing is committed.
        let (consumer, partitions) = crate::dlq::read::assigned_consumer(
            kafka,
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
        })
    }

    /// The topic's name.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The records from where the last read stopped up to the partitions' current ends,
    /// ordered by partition and offset. Blocking; call from a blocking task. On an error
    /// nothing is remembered, so the next read returns the same records again.
    pub fn read_to_end(&mut self, timeout: Duration) -> Result<Vec<RawRecord>, ReadError> {
        let topic = self.topic.clone();
        // partition → (next offset, end offset)
        let mut todo: BTreeMap<i32, (i64, i64)> = BTreeMap::new();
        let mut tpl = TopicPartitionList::new();
        for (p, from) in &self.next {
            let (low, high) = self.consumer.fetch_watermarks(&topic, *p, timeout)?;
            let from = (*from).max(low);
            if high > from {
                tpl.add_partition_offset(&topic, *p, Offset::Offset(from))?;
                todo.insert(*p, (from, high));
            }
        }
        let mut out = Vec::new();
        if todo.is_empty() {
            return Ok(out);
        }
        self.consumer.assign(&tpl)?;
        let deadline = Instant::now() + timeout;
        let mut remaining = todo.clone();
        while !remaining.is_empty() {
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
            }
            if msg.offset() + 1 >= end {
                remaining.remove(&msg.partition());
            }
        }
        // Stop fetching until the next read.
        self.consumer.unassign().map_err(ReadError::Kafka)?;
        for (p, (_, end)) in todo {
            self.next.insert(p, end);
        }
        out.sort_by_key(|r| (r.partition, r.offset));
        Ok(out)
    }
}

/// The header the writers put on the records they dead-letter: the topic it came from.
pub const SOURCE_TOPIC: &str = "pulse-source-topic";

/// Runs a blocking read of `tail` on the blocking pool.
pub async fn read_async(
    tail: &Arc<Mutex<TopicTail>>,
    timeout: Duration,
) -> Result<Vec<RawRecord>, ReadError> {
    let tail = Arc::clone(tail);
    tokio::task::spawn_blocking(move || {
        tail.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .read_to_end(timeout)
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
