//! Reads a whole topic, from the beginning of every partition to the end it had when the
//! read started: partitions are assigned directly (no group membership, no commits), so an
//! inspection never moves anyone's offsets. Decoding and printing are left to the caller.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use pulse_contracts::headers;
use pulse_platform::kafka::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};
use serde::Serialize;

use crate::progress::Progress;

/// One record of the DLQ (or any topic), with the headers the DLQ uses.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    /// The record's timestamp, epoch ms.
    pub timestamp_ms: Option<i64>,
    /// `pulse-error-code`.
    pub code: Option<String>,
    /// `pulse-error-detail`.
    pub detail: Option<String>,
    /// `pulse-event-id`.
    pub event_id: Option<String>,
    /// `pulse-original-size`: set when the DLQ kept only the first bytes of a longer
    /// original (such a record cannot be redriven).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub original_size: Option<u64>,
    #[serde(skip)]
    pub payload: Vec<u8>,
}

/// Why a topic could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("topic {0} does not exist")]
    NoTopic(String),
    #[error(
        "reading {topic} timed out after {secs} s with {missing} partition(s) not read to their end"
    )]
    Timeout {
        topic: String,
        secs: u64,
        missing: usize,
    },
}

fn header(h: Option<&rdkafka::message::BorrowedHeaders>, name: &str) -> Option<String> {
    h?.iter()
        .find(|x| x.key == name)
        .and_then(|x| x.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
}

/// Every record of `topic` up to its current end, ordered by partition and offset;
/// `progress` counts the records read out of the offsets in range.
pub async fn read_topic(
    kafka: &KafkaConfig,
    topic: &str,
    timeout: Duration,
    progress: &Progress,
) -> Result<Vec<Record>, ReadError> {
    let (kafka, topic, progress) = (kafka.clone(), topic.to_owned(), progress.clone());
    tokio::task::spawn_blocking(move || read_blocking(&kafka, &topic, timeout, &progress))
        .await
        .map_err(|_| ReadError::Kafka(KafkaError::Canceled))?
}

/// A consumer for reading `topic` by assigning its partitions (never subscribed: the group
/// id, `<group_prefix>-<pid>-<nanos>`, is only a formality and no offset is ever committed
/// under it), and the topic's partitions. Blocking.
pub(crate) fn assigned_consumer(
    kafka: &KafkaConfig,
    client_id: &str,
    group_prefix: &str,
    topic: &str,
    timeout: Duration,
) -> Result<(BaseConsumer, Vec<i32>), ReadError> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let mut c = kafka.consumer_client_config(client_id);
    c.set(
        "group.id",
        format!("{group_prefix}-{}-{nanos}", std::process::id()),
    )
    .set("enable.auto.commit", "false")
    .set("enable.auto.offset.store", "false")
    .set("enable.partition.eof", "false")
    .set("auto.offset.reset", "earliest");
    let consumer: BaseConsumer = c.create()?;
    let metadata = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .find(|t| t.name() == topic && t.error().is_none())
        .map(|t| t.partitions().iter().map(|p| p.id()).collect())
        .unwrap_or_default();
    if partitions.is_empty() {
        return Err(ReadError::NoTopic(topic.to_owned()));
    }
    Ok((consumer, partitions))
}

fn read_blocking(
    kafka: &KafkaConfig,
    topic: &str,
    timeout: Duration,
    progress: &Progress,
) -> Result<Vec<Record>, ReadError> {
    let (consumer, partitions) =
        assigned_consumer(kafka, "pulsectl", "pulsectl-read", topic, timeout)?;
    // partition → last offset to read.
    let mut remaining: BTreeMap<i32, i64> = BTreeMap::new();
    // Offsets in range; compaction may leave fewer records.
    let mut total = 0u64;
    let mut tpl = TopicPartitionList::new();
    for p in partitions {
        let (low, high) = consumer.fetch_watermarks(topic, p, timeout)?;
        if high > low {
            tpl.add_partition_offset(topic, p, Offset::Offset(low))?;
            remaining.insert(p, high - 1);
            total += u64::try_from(high - low).unwrap_or(0);
        }
    }
    progress.set_total(Some(total));
    let mut out = Vec::new();
    if remaining.is_empty() {
        return Ok(out);
    }
    consumer.assign(&tpl)?;
    let deadline = Instant::now() + timeout;
    while !remaining.is_empty() {
        if Instant::now() > deadline {
            return Err(ReadError::Timeout {
                topic: topic.to_owned(),
                secs: timeout.as_secs(),
                missing: remaining.len(),
            });
        }
        let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = msg?;
        let Some(last) = remaining.get(&msg.partition()).copied() else {
            continue;
        };
        if msg.offset() > last {
            remaining.remove(&msg.partition());
            continue;
        }
        let h = msg.headers();
        out.push(Record {
            partition: msg.partition(),
            offset: msg.offset(),
            timestamp_ms: msg.timestamp().to_millis(),
            code: header(h, headers::ERROR_CODE),
            detail: header(h, headers::ERROR_DETAIL),
            event_id: header(h, headers::EVENT_ID),
            original_size: header(h, headers::ORIGINAL_SIZE).and_then(|v| v.parse().ok()),
            payload: msg.payload().map(<[u8]>::to_vec).unwrap_or_default(),
        });
        progress.inc(1);
        if msg.offset() >= last {
            remaining.remove(&msg.partition());
        }
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    Ok(out)
}

/// A printable preview of `bytes`: text with control characters shown as `.`, or for
/// binary data (protobuf) printable ASCII with every other byte as `.`; at most `max`
/// characters, `…` when cut.
pub fn preview(bytes: &[u8], max: usize) -> String {
    let chars: Vec<char> = match std::str::from_utf8(bytes) {
        Ok(text) => text
            .chars()
            .map(|c| if c.is_control() { '.' } else { c })
            .collect(),
        Err(_) => bytes
            .iter()
            .map(|b| {
                if (0x20..0x7f).contains(b) {
                    char::from(*b)
                } else {
                    '.'
                }
            })
            .collect(),
    };
    let mut s: String = chars.iter().take(max).collect();
    if chars.len() > max {
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn previews_are_printable_and_cut() {
        assert_eq!(preview(b"{\"a\":\n1}", 100), "{\"a\":.1}");
        assert_eq!(preview(&[0x00, 0x0a, b'h', b'i', 0xff], 100), "..hi.");
        assert_eq!(preview(b"abcdef", 3), "abc…");
        assert_eq!(preview("é€".as_bytes(), 10), "é€");
    }
}
