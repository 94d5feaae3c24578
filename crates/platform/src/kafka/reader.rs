//! Reading a topic to its end: [`TopicReader`] reads every partition (or the ones asked
//! for) from a start of its own ([`Start`]: the beginning, an offset, the last N records)
//! to the end it had when the read began (its high watermark then), within one deadline
//! and up to a record limit, and returns the records ([`TopicRecord`]) or hands them to a
//! callback as they arrive. Partitions are assigned directly: no group membership, no
//! commits, so a read never moves anyone's offsets (the group id librdkafka requires,
//! `<prefix>-<pid>-<nanos>`, is a formality). For tools and start-up checks (the audit
//! trail, the DLQ), not for services' consumption (that is [`super::consumer`]'s, which
//! commits). What the records mean is the caller's.

use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{Offset, TopicPartitionList};

use crate::kafka::KafkaConfig;

/// How long one poll waits for a record before the deadline is checked again.
const POLL: Duration = Duration::from_millis(200);

/// Where a partition's read starts. Offsets outside the partition's records (deleted by
/// retention, not yet written) are moved to the nearest end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// The partition's first record still kept (its low watermark).
    Beginning,
    /// This offset.
    Offset(i64),
    /// The last N records before the end (fewer when the partition holds fewer).
    Last(u64),
}

impl Start {
    /// The first offset to read of a partition holding the offsets `low..high`.
    pub fn offset_in(self, low: i64, high: i64) -> i64 {
        let high = high.max(low);
        match self {
            Self::Beginning => low,
            Self::Offset(o) => o.clamp(low, high),
            Self::Last(n) => high
                .saturating_sub(i64::try_from(n).unwrap_or(i64::MAX))
                .max(low),
        }
    }
}

/// One record read, with everything the broker keeps of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRecord {
    pub partition: i32,
    pub offset: i64,
    /// The record's timestamp, epoch ms (`None`: the broker gave none).
    pub timestamp_ms: Option<i64>,
    pub key: Option<Vec<u8>>,
    /// `None`: a tombstone (no value at all).
    pub value: Option<Vec<u8>>,
    /// In the order the producer wrote them; a header without a value is `None`.
    pub headers: Vec<(String, Option<Vec<u8>>)>,
}

impl TopicRecord {
    fn from_message(msg: &impl Message) -> Self {
        Self {
            partition: msg.partition(),
            offset: msg.offset(),
            timestamp_ms: msg.timestamp().to_millis(),
            key: msg.key().map(<[u8]>::to_vec),
            value: msg.payload().map(<[u8]>::to_vec),
            headers: msg
                .headers()
                .map(|h| {
                    h.iter()
                        .map(|x| (x.key.to_owned(), x.value.map(<[u8]>::to_vec)))
                        .collect()
                })
                .unwrap_or_default(),
        }
    }

    /// The value of the first header called `name` (`None` when there is none, or when
    /// the first one has no value).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// [`Self::header`] as text (invalid UTF-8 replaced).
    pub fn header_str(&self, name: &str) -> Option<String> {
        self.header(name)
            .map(|v| String::from_utf8_lossy(v).into_owned())
    }

    /// The value, empty for a tombstone.
    pub fn value_or_empty(&self) -> &[u8] {
        self.value.as_deref().unwrap_or_default()
    }
}

/// A partition that a read did not finish: where it stood, and where it had to get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Behind {
    pub partition: i32,
    /// The next offset the read waited for.
    pub next: i64,
    /// The end to reach (the high watermark when the read began).
    pub end: i64,
}

fn fmt_timeout(timeout: &Duration) -> humantime::FormattedDuration {
    humantime::format_duration(*timeout)
}

fn list_behind(behind: &[Behind]) -> String {
    behind
        .iter()
        .map(|b| {
            format!(
                "partition {} at offset {} of {}",
                b.partition, b.next, b.end
            )
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Why a topic could not be read to its end. Every case names the topic; retrying can
/// help with [`Self::Timeout`] and the broker errors, not with a missing topic or partition.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("reading topic {topic}: creating the consumer: {source}")]
    Consumer {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("reading topic {topic}: fetching its metadata: {source}")]
    Metadata {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("topic {0} does not exist")]
    NoTopic(String),
    #[error("topic {topic} has no partition {missing:?} (it has {count})")]
    NoPartition {
        topic: String,
        missing: Vec<i32>,
        count: usize,
    },
    #[error("reading topic {topic}: fetching the watermarks of partition {partition}: {source}")]
    Watermarks {
        topic: String,
        partition: i32,
        #[source]
        source: KafkaError,
    },
    #[error("reading topic {topic}: assigning its partitions: {source}")]
    Assign {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("reading topic {topic}: {source}")]
    Poll {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error(
        "reading {topic} timed out after {} with {} partition(s) not read to their end: {}",
        fmt_timeout(.timeout),
        .behind.len(),
        list_behind(.behind)
    )]
    Timeout {
        topic: String,
        timeout: Duration,
        behind: Vec<Behind>,
    },
    /// A broker call that got only what was left of the deadline failed after it ran out
    /// (librdkafka may report such a timeout as a transport failure).
    #[error("timed out after {}: {source}", fmt_timeout(.timeout))]
    Late {
        timeout: Duration,
        #[source]
        source: Box<ReadError>,
    },
    #[error("reading topic {topic}: the blocking read task failed: {reason}")]
    Task { topic: String, reason: String },
}

impl ReadError {
    /// The topic the read was of.
    pub fn topic(&self) -> &str {
        match self {
            Self::NoTopic(topic)
            | Self::Consumer { topic, .. }
            | Self::Metadata { topic, .. }
            | Self::NoPartition { topic, .. }
            | Self::Watermarks { topic, .. }
            | Self::Assign { topic, .. }
            | Self::Poll { topic, .. }
            | Self::Timeout { topic, .. }
            | Self::Task { topic, .. } => topic,
            Self::Late { source, .. } => source.topic(),
        }
    }

    /// This error of a broker call made with what was left of a `timeout` that has now
    /// run out, as the timeout it is.
    fn after_deadline(self, timeout: Duration) -> Self {
        match self {
            Self::Metadata { .. } | Self::Watermarks { .. } => Self::Late {
                timeout,
                source: Box::new(self),
            },
            other => other,
        }
    }
}

/// A consumer for reading `topic` by assigning its partitions (never subscribed: the group
/// id, `<group_prefix>-<pid>-<nanos>`, is only a formality and no offset is ever committed
/// under it), and the topic's partitions. Blocking. [`ReadError::NoTopic`] when the broker
/// knows no partition of the topic.
pub fn assigned_consumer(
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
    let consumer: BaseConsumer = c.create().map_err(|source| ReadError::Consumer {
        topic: topic.to_owned(),
        source,
    })?;
    let metadata = consumer
        .fetch_metadata(Some(topic), timeout)
        .map_err(|source| ReadError::Metadata {
            topic: topic.to_owned(),
            source,
        })?;
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

/// What a read covers of one partition: the offsets `from..end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartitionRange {
    pub partition: i32,
    pub from: i64,
    /// The high watermark when the read began (exclusive).
    pub end: i64,
}

/// The ranges to read of partitions with watermarks `(partition, low, high)`: from each
/// partition's start to its high watermark; partitions with nothing in range are left out.
pub fn plan(
    watermarks: &[(i32, i64, i64)],
    start: Start,
    starts: &BTreeMap<i32, Start>,
) -> Vec<PartitionRange> {
    watermarks
        .iter()
        .filter_map(|&(partition, low, high)| {
            let from = starts
                .get(&partition)
                .copied()
                .unwrap_or(start)
                .offset_in(low, high);
            (high > from).then_some(PartitionRange {
                partition,
                from,
                end: high,
            })
        })
        .collect()
}

/// Which partitions a read still waits for, and how far each got. No Kafka: the loop of
/// [`OpenRead::for_each`] feeds it what the consumer delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Progress {
    /// partition → (next offset expected, end).
    open: BTreeMap<i32, (i64, i64)>,
}

impl Progress {
    fn new(ranges: &[PartitionRange]) -> Self {
        Self {
            open: ranges
                .iter()
                .map(|r| (r.partition, (r.from, r.end)))
                .collect(),
        }
    }

    /// Whether a record at `offset` of `partition` belongs to the read (and notes it).
    fn accept(&mut self, partition: i32, offset: i64) -> bool {
        let Some((next, end)) = self.open.get_mut(&partition) else {
            return false;
        };
        if offset >= *end {
            self.open.remove(&partition);
            return false;
        }
        *next = offset + 1;
        if *next >= *end {
            self.open.remove(&partition);
        }
        true
    }

    fn done(&self) -> bool {
        self.open.is_empty()
    }

    fn behind(&self) -> Vec<Behind> {
        self.open
            .iter()
            .map(|(&partition, &(next, end))| Behind {
                partition,
                next,
                end,
            })
            .collect()
    }
}

/// How a read ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadSummary {
    /// Records handed to the caller.
    pub records: u64,
    /// The read stopped at the record limit before every partition reached its end.
    pub limited: bool,
}

/// A read of one topic to its end; built with the `with_*` methods, then
/// [`Self::read`] (async), [`Self::read_blocking`] or [`Self::open_blocking`] (to know
/// the ranges before the records come, then stream them).
#[derive(Debug, Clone)]
pub struct TopicReader {
    kafka: KafkaConfig,
    client_id: String,
    group_prefix: String,
    topic: String,
    partitions: Option<Vec<i32>>,
    start: Start,
    starts: BTreeMap<i32, Start>,
    timeout: Duration,
    max_records: Option<usize>,
}

impl TopicReader {
    /// Every partition of `topic` from the beginning, within 30 s, no record limit; the
    /// client id `client_id` (broker logs and quotas), also the group id's prefix.
    pub fn new(kafka: &KafkaConfig, client_id: &str, topic: &str) -> Self {
        Self {
            kafka: kafka.clone(),
            client_id: client_id.to_owned(),
            group_prefix: client_id.to_owned(),
            topic: topic.to_owned(),
            partitions: None,
            start: Start::Beginning,
            starts: BTreeMap::new(),
            timeout: Duration::from_secs(30),
            max_records: None,
        }
    }

    /// The prefix of the formal group id (default: the client id).
    pub fn with_group_prefix(mut self, prefix: &str) -> Self {
        prefix.clone_into(&mut self.group_prefix);
        self
    }

    /// Only these partitions (each must exist: [`ReadError::NoPartition`]).
    pub fn with_partitions(mut self, partitions: impl IntoIterator<Item = i32>) -> Self {
        self.partitions = Some(partitions.into_iter().collect());
        self
    }

    /// Where every partition starts (default: the beginning).
    pub fn with_start(mut self, start: Start) -> Self {
        self.start = start;
        self
    }

    /// Where `partition` starts, instead of [`Self::with_start`]'s.
    pub fn with_partition_start(mut self, partition: i32, start: Start) -> Self {
        self.starts.insert(partition, start);
        self
    }

    /// How long the whole read may take, from the first broker call to the last record.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Stop after this many records (which partitions they come from depends on the
    /// order the broker delivers them in).
    pub fn with_max_records(mut self, max: usize) -> Self {
        self.max_records = Some(max);
        self
    }

    /// The topic read.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Connects, fetches the watermarks and assigns the partitions: the ranges are known
    /// from here on, the records come with [`OpenRead::for_each`]. Blocking.
    pub fn open_blocking(&self) -> Result<OpenRead, ReadError> {
        let started = Instant::now();
        let deadline = started + self.timeout;
        let left = || deadline.saturating_duration_since(Instant::now());
        let late = |e: ReadError| {
            if Instant::now() >= deadline {
                e.after_deadline(self.timeout)
            } else {
                e
            }
        };
        let topic = self.topic.as_str();
        let (consumer, all) = assigned_consumer(
            &self.kafka,
            &self.client_id,
            &self.group_prefix,
            topic,
            left(),
        )
        .map_err(late)?;
        let partitions = match &self.partitions {
            None => all,
            Some(wanted) => {
                let missing: Vec<i32> = wanted
                    .iter()
                    .copied()
                    .filter(|p| !all.contains(p))
                    .collect();
                if !missing.is_empty() {
                    return Err(ReadError::NoPartition {
                        topic: topic.to_owned(),
                        missing,
                        count: all.len(),
                    });
                }
                wanted.clone()
            }
        };
        let mut watermarks = Vec::with_capacity(partitions.len());
        for partition in partitions {
            let (low, high) = consumer
                .fetch_watermarks(topic, partition, left())
                .map_err(|source| {
                    late(ReadError::Watermarks {
                        topic: topic.to_owned(),
                        partition,
                        source,
                    })
                })?;
            watermarks.push((partition, low, high));
        }
        let ranges = plan(&watermarks, self.start, &self.starts);
        if !ranges.is_empty() {
            let mut tpl = TopicPartitionList::new();
            let assign = |source| ReadError::Assign {
                topic: topic.to_owned(),
                source,
            };
            for r in &ranges {
                tpl.add_partition_offset(topic, r.partition, Offset::Offset(r.from))
                    .map_err(assign)?;
            }
            consumer.assign(&tpl).map_err(assign)?;
        }
        Ok(OpenRead {
            consumer,
            topic: self.topic.clone(),
            ranges,
            started,
            deadline,
            timeout: self.timeout,
            max_records: self.max_records,
        })
    }

    /// Every record of the read, ordered by partition and offset. Blocking.
    pub fn read_blocking(&self) -> Result<Vec<TopicRecord>, ReadError> {
        self.open_blocking()?.collect()
    }

    /// [`Self::read_blocking`] on the blocking pool.
    pub async fn read(&self) -> Result<Vec<TopicRecord>, ReadError> {
        let reader = self.clone();
        tokio::task::spawn_blocking(move || reader.read_blocking())
            .await
            .map_err(|e| ReadError::Task {
                topic: self.topic.clone(),
                reason: e.to_string(),
            })?
    }
}

/// A read whose partitions are assigned ([`TopicReader::open_blocking`]).
pub struct OpenRead {
    consumer: BaseConsumer,
    topic: String,
    ranges: Vec<PartitionRange>,
    started: Instant,
    deadline: Instant,
    timeout: Duration,
    max_records: Option<usize>,
}

impl std::fmt::Debug for OpenRead {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OpenRead")
            .field("topic", &self.topic)
            .field("ranges", &self.ranges)
            .finish_non_exhaustive()
    }
}

impl OpenRead {
    /// What the read covers, partition by partition (partitions with nothing to read are
    /// not listed).
    pub fn ranges(&self) -> &[PartitionRange] {
        &self.ranges
    }

    /// The offsets in range over all partitions: the records to come, at most (compaction
    /// may have left fewer).
    pub fn offsets_in_range(&self) -> u64 {
        self.ranges
            .iter()
            .map(|r| u64::try_from(r.end - r.from).unwrap_or(0))
            .sum()
    }

    /// Hands every record of the ranges to `on_record` as it arrives (in offset order
    /// within a partition, partitions interleaved), until every partition reached its end
    /// or the record limit is reached. Blocking.
    pub fn for_each(
        self,
        mut on_record: impl FnMut(TopicRecord),
    ) -> Result<ReadSummary, ReadError> {
        let topic = self.topic.as_str();
        let mut progress = Progress::new(&self.ranges);
        let mut records = 0_u64;
        let limit = self
            .max_records
            .map(|m| u64::try_from(m).unwrap_or(u64::MAX));
        while !progress.done() {
            if limit.is_some_and(|l| records >= l) {
                break;
            }
            if Instant::now() > self.deadline {
                return Err(ReadError::Timeout {
                    topic: topic.to_owned(),
                    timeout: self.timeout,
                    behind: progress.behind(),
                });
            }
            let Some(polled) = self.consumer.poll(POLL) else {
                continue;
            };
            let msg = polled.map_err(|source| ReadError::Poll {
                topic: topic.to_owned(),
                source,
            })?;
            if progress.accept(msg.partition(), msg.offset()) {
                on_record(TopicRecord::from_message(&msg));
                records += 1;
            }
        }
        let limited = !progress.done();
        tracing::debug!(
            topic,
            records,
            limited,
            elapsed_ms = u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "topic read to its end"
        );
        Ok(ReadSummary { records, limited })
    }

    /// Every record of the ranges (up to the limit), ordered by partition and offset.
    pub fn collect(self) -> Result<Vec<TopicRecord>, ReadError> {
        let mut out = Vec::new();
        self.for_each(|r| out.push(r))?;
        out.sort_by_key(|r| (r.partition, r.offset));
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_start_is_an_offset_inside_the_partition() {
        // A partition holding the offsets 10..50.
        assert_eq!(Start::Beginning.offset_in(10, 50), 10);
        assert_eq!(Start::Offset(20).offset_in(10, 50), 20);
        assert_eq!(
            Start::Offset(3).offset_in(10, 50),
            10,
            "deleted: the first kept"
        );
        assert_eq!(
            Start::Offset(70).offset_in(10, 50),
            50,
            "not written: the end"
        );
        assert_eq!(Start::Last(5).offset_in(10, 50), 45);
        assert_eq!(Start::Last(100).offset_in(10, 50), 10, "fewer than N");
        assert_eq!(Start::Last(u64::MAX).offset_in(10, 50), 10);
        assert_eq!(Start::Last(0).offset_in(10, 50), 50, "nothing");
        assert_eq!(Start::Last(3).offset_in(7, 7), 7, "empty");
    }

    #[test]
    fn the_plan_reads_each_partition_from_its_start_to_its_high_watermark() {
        let marks = [(0, 0, 10), (1, 5, 5), (2, 3, 8)];
        let starts = BTreeMap::from([(2, Start::Offset(6))]);
        assert_eq!(
            plan(&marks, Start::Last(4), &starts),
            vec![
                PartitionRange {
                    partition: 0,
                    from: 6,
                    end: 10
                },
                // 1 is empty: left out.
                PartitionRange {
                    partition: 2,
                    from: 6,
                    end: 8
                },
            ]
        );
        assert!(plan(&marks, Start::Last(0), &BTreeMap::new()).is_empty());
    }

    fn ranges() -> Vec<PartitionRange> {
        vec![
            PartitionRange {
                partition: 0,
                from: 0,
                end: 3,
            },
            PartitionRange {
                partition: 1,
                from: 5,
                end: 7,
            },
        ]
    }

    #[test]
    fn a_read_ends_when_every_partition_reached_its_end_at_start() {
        let mut p = Progress::new(&ranges());
        assert!(p.accept(0, 0));
        assert!(p.accept(1, 5));
        assert!(!p.accept(2, 0), "a partition not read");
        assert!(p.accept(0, 2), "a gap (compaction) is fine");
        assert!(!p.done());
        assert_eq!(
            p.behind(),
            vec![Behind {
                partition: 1,
                next: 6,
                end: 7
            }]
        );
        assert!(p.accept(1, 6));
        assert!(p.done());
        assert!(!p.accept(1, 7), "written after the read began");
    }

    #[test]
    fn a_record_past_the_end_closes_its_partition_without_being_read() {
        let mut p = Progress::new(&ranges());
        assert!(!p.accept(0, 3));
        assert_eq!(p.behind().len(), 1);
    }

    #[test]
    fn a_timeout_names_the_topic_and_every_partition_behind() {
        let e = ReadError::Timeout {
            topic: "pulse.audit.v1".into(),
            timeout: Duration::from_millis(1500),
            behind: vec![
                Behind {
                    partition: 0,
                    next: 4,
                    end: 9,
                },
                Behind {
                    partition: 2,
                    next: 0,
                    end: 1,
                },
            ],
        };
        assert_eq!(
            e.to_string(),
            "reading pulse.audit.v1 timed out after 1s 500ms with 2 partition(s) not read to \
             their end: partition 0 at offset 4 of 9, partition 2 at offset 0 of 1"
        );
        assert_eq!(e.topic(), "pulse.audit.v1");
        let e = ReadError::Watermarks {
            topic: "t".into(),
            partition: 3,
            source: KafkaError::Canceled,
        };
        let text = e.after_deadline(Duration::from_millis(5)).to_string();
        assert!(
            text.starts_with(
                "timed out after 5ms: reading topic t: fetching the watermarks of partition 3: "
            ),
            "{text}"
        );
    }

    #[test]
    fn headers_are_found_by_name_first_one_wins() {
        let r = TopicRecord {
            partition: 0,
            offset: 0,
            timestamp_ms: None,
            key: None,
            value: None,
            headers: vec![
                ("a".into(), Some(b"1".to_vec())),
                ("b".into(), None),
                ("a".into(), Some(b"2".to_vec())),
            ],
        };
        assert_eq!(r.header("a"), Some(&b"1"[..]));
        assert_eq!(r.header_str("a").as_deref(), Some("1"));
        assert_eq!(r.header("b"), None);
        assert_eq!(r.header("c"), None);
        assert_eq!(r.value_or_empty(), b"");
    }
}
