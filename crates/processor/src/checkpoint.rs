//! Per-partition checkpoints on a compacted topic (`pulse.processor.checkpoints.v1`, one
//! partition): the resume offset, the last offset processed, the partition's event-time
//! progress and the users with a session still open. A checkpoint is written and
//! acknowledged before the offsets it covers are stored, and read by whoever is assigned
//! the partition next, so a replay after a crash or rebalance continues with the same
//! event-time progress instead of rebuilding it from the replayed records alone.
//!
//! **Bounded records.** The open sessions grow with the number of users, so they are not
//! written in one record: a checkpoint is a header (key `<group>|<input topic>|<partition>`,
//! the checkpoint without its sessions, plus its generation and number of parts) and parts
//! of at most [`PART_BYTES`] of sessions each (key `<group>|<input topic>|<partition>|<slot>|
//! <index>`). Generations alternate between two slots, so the keys a partition uses stay
//! bounded (compaction keeps the latest of each), and the parts of a new checkpoint never
//! overwrite those of the header still in force. Parts are queued before their header on
//! the topic's single partition, so a header is never visible before its parts; the reader
//! takes a partition's latest header and the parts of its generation. A header whose parts
//! are not all there (a write that failed half-way, whose offsets were then never stored) is
//! ignored with a warning: the partition starts as if it had no checkpoint. A record of the
//! earlier format (one record, sessions inline) is a header without parts and still loads.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pulse_platform::kafka::{AckFuture, KafkaConfig, KafkaProducer, OutRecord, ProduceError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use crate::engine::Checkpoint;

/// Most bytes of sessions in one part: well under librdkafka's default `message.max.bytes`
/// (1,000,000) and a broker's default `max.message.bytes` (1 MiB), whatever the number of
/// users. A user id longer than this still gets a part of its own.
pub const PART_BYTES: usize = 256 * 1024;

/// Where checkpoints live and whose they are.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    pub topic: String,
    pub group: String,
    pub input_topic: String,
    pub kafka: KafkaConfig,
    /// Per partition, the generation of the latest checkpoint read or written.
    pub generations: Arc<Mutex<HashMap<i32, u64>>>,
}

/// The header record: the checkpoint without its sessions (those are in the parts).
#[derive(Debug, Serialize, Deserialize)]
struct Header {
    #[serde(flatten)]
    checkpoint: Checkpoint,
    /// 0 in records of the earlier format.
    #[serde(default)]
    generation: u64,
    /// Parts holding the sessions; 0 when they are inline (the earlier format).
    #[serde(default)]
    parts: u32,
}

/// One part of a checkpoint's sessions.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Part {
    generation: u64,
    #[serde(default)]
    open_sessions: BTreeMap<String, i64>,
    #[serde(default)]
    continued_sessions: BTreeSet<String>,
}

/// A decoded record key.
#[derive(Debug, PartialEq, Eq)]
enum Key {
    Header(i32),
    Part {
        partition: i32,
        slot: u64,
        index: u32,
    },
}

fn slot(generation: u64) -> u64 {
    generation % 2
}

/// The records of `cp` as generation `generation`: (key suffix after the prefix, value),
/// parts first, the header last.
fn encode(partition: i32, generation: u64, cp: &Checkpoint) -> Vec<(String, Vec<u8>)> {
    let mut parts: Vec<Part> = Vec::new();
    let mut size = 0;
    for (user, start) in &cp.open_sessions {
        // The JSON of one entry: "user":start, plus the user again when continued.
        let continued = cp.continued_sessions.contains(user);
        let entry = user.len() * if continued { 2 } else { 1 } + 32;
        if parts.is_empty() || size + entry > PART_BYTES {
            parts.push(Part {
                generation,
                ..Part::default()
            });
            size = 0;
        }
        size += entry;
        if let Some(part) = parts.last_mut() {
            part.open_sessions.insert(user.clone(), *start);
            if continued {
                part.continued_sessions.insert(user.clone());
            }
        }
    }
    let header = Header {
        checkpoint: Checkpoint {
            open_sessions: BTreeMap::new(),
            continued_sessions: BTreeSet::new(),
            ..cp.clone()
        },
        generation,
        parts: u32::try_from(parts.len()).unwrap_or(u32::MAX),
    };
    let mut out: Vec<(String, Vec<u8>)> = parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            (
                format!("{partition}|{}|{i}", slot(generation)),
                serde_json::to_vec(part).unwrap_or_default(),
            )
        })
        .collect();
    out.push((
        partition.to_string(),
        serde_json::to_vec(&header).unwrap_or_default(),
    ));
    out
}

fn parse_key(rest: &str) -> Option<Key> {
    let mut it = rest.split('|');
    let partition = it.next()?.parse().ok()?;
    match (it.next(), it.next(), it.next()) {
        (None, ..) => Some(Key::Header(partition)),
        (Some(slot), Some(index), None) => Some(Key::Part {
            partition,
            slot: slot.parse().ok()?,
            index: index.parse().ok()?,
        }),
        _ => None,
    }
}

/// The latest records of one checkpoint topic, by key, and what they assemble to.
#[derive(Debug, Default)]
struct Assembler {
    headers: HashMap<i32, Header>,
    parts: HashMap<(i32, u64, u32), Part>,
}

impl Assembler {
    fn add(&mut self, key: Key, value: &[u8]) {
        match key {
            Key::Header(p) => {
                if let Ok(h) = serde_json::from_slice::<Header>(value) {
                    self.headers.insert(p, h);
                }
            }
            Key::Part {
                partition,
                slot,
                index,
            } => {
                if let Ok(part) = serde_json::from_slice::<Part>(value) {
                    self.parts.insert((partition, slot, index), part);
                }
            }
        }
    }

    /// Each partition's checkpoint and generation; partitions whose latest header misses
    /// parts are left out.
    fn finish(mut self) -> HashMap<i32, (Checkpoint, u64)> {
        let mut out = HashMap::new();
        for (p, header) in self.headers {
            let Header {
                mut checkpoint,
                generation,
                parts,
            } = header;
            let mut complete = true;
            for index in 0..parts {
                match self.parts.remove(&(p, slot(generation), index)) {
                    Some(part) if part.generation == generation => {
                        checkpoint.open_sessions.extend(part.open_sessions);
                        checkpoint
                            .continued_sessions
                            .extend(part.continued_sessions);
                    }
                    _ => {
                        complete = false;
                        break;
                    }
                }
            }
            if complete {
                out.insert(p, (checkpoint, generation));
            } else {
                tracing::warn!(
                    partition = p,
                    generation,
                    parts,
                    "a checkpoint's parts are missing; the partition continues without it"
                );
            }
        }
        out
    }
}

impl CheckpointStore {
    fn prefix(&self) -> String {
        format!("{}|{}|", self.group, self.input_topic)
    }

    fn next_generation(&self, partition: i32) -> u64 {
        let mut g = self
            .generations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let next = g.get(&partition).map_or(1, |x| x.saturating_add(1));
        g.insert(partition, next);
        next
    }

    /// Queues the checkpoint of `partition` (its parts, then its header); one
    /// acknowledgement per record.
    pub async fn write(
        &self,
        producer: &KafkaProducer,
        partition: i32,
        cp: &Checkpoint,
    ) -> Result<Vec<AckFuture>, ProduceError> {
        let generation = self.next_generation(partition);
        let prefix = self.prefix();
        let mut acks = Vec::new();
        for (key, value) in encode(partition, generation, cp) {
            acks.push(
                producer
                    .enqueue_with_wait(
                        OutRecord::new(
                            &self.topic,
                            Some(format!("{prefix}{key}").into_bytes()),
                            value,
                        ),
                        Duration::from_secs(60),
                    )
                    .await?,
            );
        }
        Ok(acks)
    }

    /// Reads the whole checkpoint topic and returns the latest checkpoint of each partition
    /// of this group and input topic.
    pub async fn read_all(
        &self,
        timeout: Duration,
    ) -> Result<HashMap<i32, Checkpoint>, KafkaError> {
        let store = self.clone();
        let read = tokio::task::spawn_blocking(move || store.read_blocking(timeout))
            .await
            .map_err(|_| KafkaError::Canceled)??;
        let mut generations = self
            .generations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut out = HashMap::new();
        for (p, (cp, generation)) in read {
            let g = generations.entry(p).or_insert(generation);
            *g = (*g).max(generation);
            out.insert(p, cp);
        }
        Ok(out)
    }

    fn read_blocking(
        &self,
        timeout: Duration,
    ) -> Result<HashMap<i32, (Checkpoint, u64)>, KafkaError> {
        let mut c = self.kafka.client_config("pulse-processor-checkpoints");
        c.set(
            "group.id",
            format!("pulse-processor-checkpoints-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
        let consumer: BaseConsumer = c.create()?;
        let (_low, high) = consumer.fetch_watermarks(&self.topic, 0, timeout)?;
        let mut records = Assembler::default();
        if high <= 0 {
            return Ok(HashMap::new());
        }
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(&self.topic, 0, Offset::Beginning)?;
        consumer.assign(&tpl)?;
        let prefix = self.prefix();
        let deadline = Instant::now() + timeout;
        loop {
            if Instant::now() > deadline {
                return Err(KafkaError::Canceled);
            }
            let Some(msg) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let msg = msg?;
            let key = msg
                .key()
                .and_then(|k| std::str::from_utf8(k).ok())
                .and_then(|k| k.strip_prefix(prefix.as_str()))
                .and_then(parse_key);
            if let (Some(key), Some(value)) = (key, msg.payload()) {
                records.add(key, value);
            }
            if msg.offset() >= high - 1 {
                return Ok(records.finish());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(users: usize, every_continued: usize) -> Checkpoint {
        Checkpoint {
            resume_offset: 5,
            last_offset: 1_000_000,
            max_event_ms: Some(1_700_000_000_000),
            closed_watermark: Some(1_699_999_990_000),
            open_sessions: (0..users)
                .map(|i| (format!("user-{i:08}"), 1_700_000_000_000 + i as i64))
                .collect(),
            continued_sessions: (0..users)
                .step_by(every_continued)
                .map(|i| format!("user-{i:08}"))
                .collect(),
            max_session_ms: Some(86_400_000),
        }
    }

    fn assemble(records: Vec<(String, Vec<u8>)>) -> HashMap<i32, (Checkpoint, u64)> {
        let mut a = Assembler::default();
        for (k, v) in records {
            a.add(parse_key(&k).unwrap(), &v);
        }
        a.finish()
    }

    #[test]
    fn a_checkpoint_of_100k_open_sessions_is_written_in_bounded_records() {
        let cp = checkpoint(100_000, 7);
        let records = encode(3, 8, &cp);
        assert!(records.len() > 4, "{} records", records.len());
        for (key, value) in &records {
            assert!(
                value.len() <= PART_BYTES + 1_024,
                "{key}: {} bytes",
                value.len()
            );
        }
        assert_eq!(records.last().unwrap().0, "3");
        assert_eq!(assemble(records), HashMap::from([(3, (cp, 8))]));
    }

    #[test]
    fn a_smaller_checkpoint_ignores_the_parts_left_by_earlier_generations() {
        let big = checkpoint(30_000, 3);
        let small = checkpoint(10, 3);
        let mut records = encode(0, 1, &big);
        records.extend(encode(0, 2, &big));
        records.extend(encode(0, 3, &small));
        assert_eq!(assemble(records), HashMap::from([(0, (small, 3))]));
    }

    #[test]
    fn a_header_whose_parts_are_missing_is_not_used() {
        let mut records = encode(0, 4, &checkpoint(30_000, 3));
        records.remove(1);
        assert!(assemble(records).is_empty());
        // Parts of another generation in the same slot do not complete it.
        let mut records = encode(0, 2, &checkpoint(30_000, 3));
        let header = records.pop().unwrap();
        records.extend(encode(0, 4, &checkpoint(30_000, 3)));
        records.pop();
        records.push(header);
        assert!(assemble(records).is_empty());
    }

    #[test]
    fn a_checkpoint_of_the_earlier_single_record_format_still_loads() {
        let old = br#"{"resume_offset":3,"last_offset":9,"max_event_ms":1000,"closed_watermark":900,"open_sessions":{"a":100,"b":200}}"#;
        let got = assemble(vec![("1".into(), old.to_vec())]);
        let (cp, generation) = &got[&1];
        assert_eq!(generation, &0);
        assert_eq!((cp.resume_offset, cp.last_offset), (3, 9));
        assert_eq!(
            cp.open_sessions,
            BTreeMap::from([("a".to_owned(), 100), ("b".to_owned(), 200)])
        );
        assert!(cp.continued_sessions.is_empty());
        assert_eq!(cp.max_session_ms, None);
    }

    #[test]
    fn keys_of_headers_and_parts_are_told_apart() {
        assert_eq!(parse_key("12"), Some(Key::Header(12)));
        assert_eq!(
            parse_key("12|1|3"),
            Some(Key::Part {
                partition: 12,
                slot: 1,
                index: 3
            })
        );
        assert_eq!(parse_key("12|1"), None);
        assert_eq!(parse_key("x"), None);
    }
}
