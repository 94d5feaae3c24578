#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test
//! Checkpoints through a broker (rdkafka's in-process `MockCluster`, with librdkafka's
//! default `message.max.bytes`): a partition with 100,000 open sessions writes and reads
//! its checkpoint, which a single record could not hold.

use std::collections::BTreeMap;
use std::time::Duration;

use pulse_platform::kafka::{KafkaConfig, KafkaProducer};
use pulse_processor::checkpoint::CheckpointStore;
use pulse_processor::engine::Checkpoint;
use rdkafka::mocking::MockCluster;

fn checkpoint(users: usize, last_offset: i64) -> Checkpoint {
    Checkpoint {
        resume_offset: 1,
        last_offset,
        max_event_ms: Some(1_700_000_000_000),
        closed_watermark: Some(1_699_999_990_000),
        open_sessions: (0..users)
            .map(|i| (format!("user-{i:09}"), 1_700_000_000_000 + i as i64))
            .collect(),
        continued_sessions: (0..users)
            .step_by(10)
            .map(|i| format!("user-{i:09}"))
            .collect(),
        max_session_ms: Some(86_400_000),
    }
}

fn store(kafka: &KafkaConfig) -> CheckpointStore {
    CheckpointStore {
        topic: "checkpoints".into(),
        group: "pulse-processor".into(),
        input_topic: "events".into(),
        kafka: kafka.clone(),
        generations: Default::default(),
    }
}

async fn write(store: &CheckpointStore, producer: &KafkaProducer, p: i32, cp: &Checkpoint) {
    for ack in store.write(producer, p, cp).await.unwrap() {
        ack.await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_partition_with_100k_open_sessions_writes_and_reads_its_checkpoint() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("checkpoints", 1, 1).unwrap();
    let kafka = KafkaConfig::for_brokers(cluster.bootstrap_servers());
    let producer = KafkaProducer::new(&kafka, "test").unwrap();
    let first = store(&kafka);
    let big = checkpoint(100_000, 10);
    assert!(serde_json::to_vec(&big).unwrap().len() > 2_000_000);
    write(&first, &producer, 0, &big).await;
    write(&first, &producer, 1, &checkpoint(3, 7)).await;
    // A later, larger checkpoint of partition 0 replaces it.
    let bigger = checkpoint(120_000, 20);
    write(&first, &producer, 0, &bigger).await;

    // The partitions' next owner reads the latest of each.
    let next = store(&kafka);
    let read = next.read_all(Duration::from_secs(30)).await.unwrap();
    assert_eq!(read.len(), 2);
    assert_eq!(read[&0], bigger);
    assert_eq!(read[&1], checkpoint(3, 7));

    // It continues the generations, so a smaller checkpoint is read back without the
    // parts the larger ones left.
    let small = checkpoint(5, 30);
    write(&next, &producer, 0, &small).await;
    let read = store(&kafka)
        .read_all(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(read[&0], small);
    assert_eq!(
        read[&0].open_sessions,
        (0..5)
            .map(|i| (format!("user-{i:09}"), 1_700_000_000_000 + i as i64))
            .collect::<BTreeMap<_, _>>()
    );
}
