//! Reads a whole topic, from the beginning of every partition to the end it had when the
//! read started, with platform's [`TopicReader`] (partitions assigned directly: no group
//! membership, no commits, so an inspection never moves anyone's offsets), and keeps the
//! headers the DLQ uses. Decoding and printing are left to the caller.

use std::time::Duration;

use pulse_contracts::headers;
use pulse_platform::kafka::KafkaConfig;
use pulse_platform::kafka::reader::{self, TopicReader, TopicRecord};
use rdkafka::error::KafkaError;
use serde::Serialize;

use crate::progress::Progress;

/// A consumer for reading a topic by assigning its partitions (the ledger's tails); its
/// error converts into [`ReadError`].
pub(crate) use pulse_platform::kafka::reader::assigned_consumer;

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

impl From<TopicRecord> for Record {
    fn from(r: TopicRecord) -> Self {
        Self {
            partition: r.partition,
            offset: r.offset,
            timestamp_ms: r.timestamp_ms,
            code: r.header_str(headers::ERROR_CODE),
            detail: r.header_str(headers::ERROR_DETAIL),
            event_id: r.header_str(headers::EVENT_ID),
            original_size: r
                .header_str(headers::ORIGINAL_SIZE)
                .and_then(|v| v.parse().ok()),
            payload: r.value.unwrap_or_default(),
        }
    }
}

/// Why a topic could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Reading to the end ([`TopicReader`]; its message names the topic).
    #[error("{0}")]
    Topic(#[from] reader::ReadError),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error(
        "reading {topic} timed out after {secs} s with {missing} partition(s) not read to their end"
    )]
    Timeout {
        topic: String,
        secs: u64,
        missing: usize,
    },
}

/// Every record of `topic` up to its current end, ordered by partition and offset;
/// `progress` counts the records read out of the offsets in range.
pub async fn read_topic(
    kafka: &KafkaConfig,
    topic: &str,
    timeout: Duration,
    progress: &Progress,
) -> Result<Vec<Record>, ReadError> {
    let records = read_records(kafka, topic, timeout, progress).await?;
    Ok(records.into_iter().map(Record::from).collect())
}

/// [`read_topic`] with every header, key and value as the broker keeps them (for topics
/// other than the DLQ: the audit trail).
pub async fn read_records(
    kafka: &KafkaConfig,
    topic: &str,
    timeout: Duration,
    progress: &Progress,
) -> Result<Vec<TopicRecord>, ReadError> {
    let reader = TopicReader::new(kafka, "pulsectl", topic)
        .with_group_prefix("pulsectl-read")
        .with_timeout(timeout);
    let progress = progress.clone();
    tokio::task::spawn_blocking(move || read_blocking(&reader, &progress))
        .await
        .map_err(|_| ReadError::Kafka(KafkaError::Canceled))?
}

fn read_blocking(reader: &TopicReader, progress: &Progress) -> Result<Vec<TopicRecord>, ReadError> {
    let open = reader.open_blocking()?;
    // Offsets in range; compaction may leave fewer records.
    progress.set_total(Some(open.offsets_in_range()));
    let mut out = Vec::new();
    open.for_each(|r| {
        out.push(r);
        progress.inc(1);
    })?;
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
