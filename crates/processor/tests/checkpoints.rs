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
        session_gap_ms: Some(1_800_000),
        prior_session_rules: None,
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

/// The records the previous release (checkpoint format 2) wrote for `cp` as generation
/// `generation`: its encoder, kept verbatim — parts of at most 256 KiB of sessions in slot
/// `generation % 2` (key `…|<partition>|<slot>|<index>`), then the header with the
/// checkpoint's scalars, its generation and number of parts.
fn format_2_records(partition: i32, generation: u64, cp: &Checkpoint) -> Vec<(String, Vec<u8>)> {
    #[derive(serde::Serialize, Default)]
    struct Part {
        generation: u64,
        open_sessions: BTreeMap<String, i64>,
        continued_sessions: std::collections::BTreeSet<String>,
    }
    #[derive(serde::Serialize)]
    struct Header {
        #[serde(flatten)]
        checkpoint: Checkpoint,
        generation: u64,
        parts: u32,
    }
    let mut parts: Vec<Part> = Vec::new();
    let mut size = 0;
    for (user, start) in &cp.open_sessions {
        let continued = cp.continued_sessions.contains(user);
        let entry = user.len() * if continued { 2 } else { 1 } + 32;
        if parts.is_empty() || size + entry > 256 * 1024 {
            parts.push(Part {
                generation,
                ..Part::default()
            });
            size = 0;
        }
        size += entry;
        let part = parts.last_mut().unwrap();
        part.open_sessions.insert(user.clone(), *start);
        if continued {
            part.continued_sessions.insert(user.clone());
        }
    }
    let header = Header {
        checkpoint: Checkpoint {
            open_sessions: BTreeMap::new(),
            continued_sessions: Default::default(),
            ..cp.clone()
        },
        generation,
        parts: parts.len() as u32,
    };
    let mut out: Vec<(String, Vec<u8>)> = parts
        .iter()
        .enumerate()
        .map(|(i, part)| {
            (
                format!("pulse-processor|events|{partition}|{}|{i}", generation % 2),
                serde_json::to_vec(part).unwrap(),
            )
        })
        .collect();
    out.push((
        format!("pulse-processor|events|{partition}"),
        serde_json::to_vec(&header).unwrap(),
    ));
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn a_checkpoint_of_the_previous_format_is_read_and_continued_incrementally() {
    let cluster = MockCluster::new(1).unwrap();
    cluster.create_topic("checkpoints", 1, 1).unwrap();
    let kafka = KafkaConfig::for_brokers(cluster.bootstrap_servers());
    let producer = KafkaProducer::new(&kafka, "test").unwrap();
    // The previous release wrote generations 4 and 5 of partition 0 (150,000 sessions).
    let old = checkpoint(150_000, 40);
    for (generation, cp) in [(4, checkpoint(140_000, 40)), (5, old.clone())] {
        for (key, value) in format_2_records(0, generation, &cp) {
            let rec =
                pulse_platform::kafka::OutRecord::new("checkpoints", Some(key.into_bytes()), value);
            producer.send(rec, Duration::from_secs(30)).await.unwrap();
        }
    }
    // This release reads it as it was...
    let upgraded = store(&kafka);
    let read = upgraded.read_all(Duration::from_secs(30)).await.unwrap();
    assert_eq!(read[&0], old);
    // ...and its next checkpoint is a delta on that base: a few KB, not the 150,000
    // sessions again.
    let mut next = old.clone();
    next.last_offset = 11;
    for i in 0..100 {
        next.open_sessions
            .insert(format!("new-{i}"), 1_700_000_500_000);
        next.open_sessions.remove(&format!("user-{i:09}"));
        next.continued_sessions.remove(&format!("user-{i:09}"));
    }
    let records = upgraded.prepare(0, &next);
    let written: usize = records.iter().map(|(_, v, _)| v.len()).sum();
    assert_eq!(
        records.iter().map(|r| r.2).collect::<Vec<_>>(),
        vec!["delta", "header"]
    );
    assert!(written < 10_000, "{written} bytes");
    for (key, value, _) in records {
        let rec = pulse_platform::kafka::OutRecord::new("checkpoints", Some(key), value);
        producer.send(rec, Duration::from_secs(30)).await.unwrap();
    }
    let read = store(&kafka)
        .read_all(Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(read[&0], next);
}
