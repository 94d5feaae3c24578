//! Reading what is on a topic: every record from the beginning to the end it has now.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use pulse_platform::kafka::KafkaConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{Message, Offset, TopicPartitionList};

use super::{Deadline, wait_until};

/// Every record of `topic` on `kafka` (all partitions, from the first offset to the end
/// offsets it has when called), in the order they arrive; at most 60 s.
pub async fn read_to_end(kafka: &KafkaConfig, topic: &str) -> Vec<OwnedMessage> {
    let c: BaseConsumer = kafka
        .client_config("pulse-test-reader")
        .set("group.id", pulse_tests::unique("reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .create()
        .unwrap();
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    let mut ends = BTreeMap::new();
    for part in md.topics()[0].partitions() {
        let (low, high) = c
            .fetch_watermarks(topic, part.id(), Duration::from_secs(10))
            .unwrap();
        if high > low {
            tpl.add_partition_offset(topic, part.id(), Offset::Offset(low))
                .unwrap();
            ends.insert(part.id(), high);
        }
    }
    let mut out = Vec::new();
    if ends.is_empty() {
        return out;
    }
    c.assign(&tpl).unwrap();
    let mut done = BTreeSet::new();
    // Each look polls (up to 200 ms) for one record; no pause between looks.
    let deadline = Deadline::after(Duration::from_secs(60)).every(Duration::ZERO);
    let what = format!("every record of {topic} up to the end offsets {ends:?}");
    wait_until(deadline, what, async || {
        if let Some(m) = c.poll(Duration::from_millis(200)) {
            let m = m.unwrap().detach();
            if m.offset() + 1 >= ends[&m.partition()] {
                done.insert(m.partition());
            }
            out.push(m);
        }
        if done.len() == ends.len() {
            Ok(())
        } else {
            Err(format!(
                "{} records, partitions read to the end: {done:?}",
                out.len()
            ))
        }
    })
    .await;
    out
}
