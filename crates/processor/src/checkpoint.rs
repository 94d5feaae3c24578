//! Per-partition checkpoints on a compacted topic (`pulse.processor.checkpoints.v1`, one
//! partition, key `<group>|<input topic>|<partition>`): the resume offset, the last offset
//! processed and the partition's max event time. A checkpoint is written and acknowledged
//! before the offsets it covers are stored, and read by whoever is assigned the partition
//! next, so a replay after a crash or rebalance continues with the same event-time
//! progress instead of rebuilding it from the replayed records alone.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pulse_platform::kafka::{AckFuture, KafkaConfig, KafkaProducer, OutRecord, ProduceError};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};

use crate::engine::Checkpoint;

/// Where checkpoints live and whose they are.
#[derive(Debug, Clone)]
pub struct CheckpointStore {
    pub topic: String,
    pub group: String,
    pub input_topic: String,
    pub kafka: KafkaConfig,
}

impl CheckpointStore {
    fn prefix(&self) -> String {
        format!("{}|{}|", self.group, self.input_topic)
    }

    /// Queues the checkpoint of `partition`.
    pub async fn write(
        &self,
        producer: &KafkaProducer,
        partition: i32,
        cp: &Checkpoint,
    ) -> Result<AckFuture, ProduceError> {
        let key = format!("{}{partition}", self.prefix());
        let value = serde_json::to_vec(cp).unwrap_or_default();
        producer
            .enqueue_with_wait(
                OutRecord::new(&self.topic, Some(key.into_bytes()), value),
                Duration::from_secs(60),
            )
            .await
    }

    /// Reads the whole checkpoint topic and returns the latest checkpoint of each partition
    /// of this group and input topic.
    pub async fn read_all(
        &self,
        timeout: Duration,
    ) -> Result<HashMap<i32, Checkpoint>, KafkaError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || store.read_blocking(timeout))
            .await
            .map_err(|_| KafkaError::Canceled)?
    }

    fn read_blocking(&self, timeout: Duration) -> Result<HashMap<i32, Checkpoint>, KafkaError> {
        let mut c = self.kafka.client_config("pulse-processor-checkpoints");
        c.set(
            "group.id",
            format!("pulse-processor-checkpoints-{}", std::process::id()),
        )
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest");
        let consumer: BaseConsumer = c.create()?;
        let (_low, high) = consumer.fetch_watermarks(&self.topic, 0, timeout)?;
        let mut out = HashMap::new();
        if high <= 0 {
            return Ok(out);
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
            let partition = msg
                .key()
                .and_then(|k| std::str::from_utf8(k).ok())
                .and_then(|k| k.strip_prefix(prefix.as_str()))
                .and_then(|p| p.parse::<i32>().ok());
            if let (Some(p), Some(cp)) = (
                partition,
                msg.payload()
                    .and_then(|v| serde_json::from_slice::<Checkpoint>(v).ok()),
            ) {
                out.insert(p, cp);
            }
            if msg.offset() >= high - 1 {
                return Ok(out);
            }
        }
    }
}
