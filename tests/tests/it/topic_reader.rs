//! Platform's topic reader (`pulse_platform::kafka::reader`) against the real broker: a
//! topic of three partitions is read to the end it had when the read began, each record
//! exactly once with its key, value, headers and timestamp; "the last N" starts, a start
//! offset, a partition filter and a record limit read just what they say; a missing topic
//! and a deadline too short are errors that name the topic (and, for the deadline, every
//! partition not read to its end).

use std::collections::BTreeSet;
use std::time::Duration;

use pulse_platform::kafka::reader::ReadError;
use pulse_platform::kafka::{
    KafkaProducer, OutRecord, RecordProducer, Start, TopicReader, TopicRecord, TopicSpec,
};
use rdkafka::message::{Header, OwnedHeaders};

use crate::support::cleanup;

const PARTITIONS: i32 = 3;
/// Records per partition.
const PER_PARTITION: i64 = 20;

/// (partition, offset, key, value, header `n`) of a record.
type Seen = (i32, i64, Vec<u8>, Vec<u8>, String);

fn seen(r: &TopicRecord) -> Seen {
    (
        r.partition,
        r.offset,
        r.key.clone().unwrap(),
        r.value.clone().unwrap(),
        r.header_str("n").unwrap(),
    )
}

/// Produces `PER_PARTITION` records to each partition of `topic`, record `i` to partition
/// `i % PARTITIONS`; returns what was acknowledged where.
async fn produce(producer: &KafkaProducer, topic: &str, first: i64, count: i64) -> Vec<Seen> {
    let mut acks = Vec::new();
    for i in first..first + count {
        let headers = OwnedHeaders::new().insert(Header {
            key: "n",
            value: Some(i.to_string().as_bytes()),
        });
        let mut rec = OutRecord::new(
            topic,
            Some(format!("k{i}").into_bytes()),
            format!("v{i}").into_bytes(),
        )
        .with_headers(headers);
        rec.partition = Some(i32::try_from(i % i64::from(PARTITIONS)).unwrap());
        acks.push((i, producer.enqueue(rec).unwrap()));
    }
    let mut out = Vec::new();
    for (i, ack) in acks {
        let at = ack.await.unwrap();
        out.push((
            at.partition,
            at.offset,
            format!("k{i}").into_bytes(),
            format!("v{i}").into_bytes(),
            i.to_string(),
        ));
    }
    out
}

/// A topic of `PARTITIONS` partitions holding `PER_PARTITION` records each.
async fn filled_topic(prefix: &str) -> (String, KafkaProducer, Vec<Seen>, cleanup::Topics) {
    let topic = pulse_tests::unique(prefix);
    let guard = cleanup::Topics::create(&[TopicSpec::new(&topic, PARTITIONS)]).await;
    let producer = KafkaProducer::new(&pulse_tests::kafka(), "pulse-test-reader").unwrap();
    let written = produce(&producer, &topic, 0, PER_PARTITION * i64::from(PARTITIONS)).await;
    (topic, producer, written, guard)
}

#[tokio::test]
async fn a_topic_is_read_to_the_end_it_had_when_the_read_began_each_record_once() {
    let kafka = pulse_tests::kafka();
    let (topic, producer, written, _guard) = filled_topic("reader-all").await;
    let reader =
        TopicReader::new(&kafka, "pulse-test-reader", &topic).with_timeout(Duration::from_secs(30));

    let open = reader.open_blocking().unwrap();
    assert_eq!(
        open.offsets_in_range(),
        u64::try_from(written.len()).unwrap()
    );
    // Written after the read began: not part of it.
    let later = produce(&producer, &topic, 1000, 6).await;
    let records = open.collect().unwrap();
    let got: Vec<Seen> = records.iter().map(seen).collect();
    let mut expected = written.clone();
    expected.sort();
    assert_eq!(got, expected, "every record once, by partition and offset");
    assert!(
        records
            .iter()
            .all(|r| r.timestamp_ms.is_some_and(|t| t > 0))
    );

    // A new read reaches the new end; the async entry point gives the same records.
    let again: BTreeSet<Seen> = reader.read().await.unwrap().iter().map(seen).collect();
    let all: BTreeSet<Seen> = written.iter().chain(&later).cloned().collect();
    assert_eq!(again, all);

    // Streamed to a callback: the same records, counted.
    let mut streamed = BTreeSet::new();
    let summary = reader
        .open_blocking()
        .unwrap()
        .for_each(|r| {
            streamed.insert(seen(&r));
        })
        .unwrap();
    assert_eq!(streamed, all);
    assert_eq!(
        (summary.records, summary.limited),
        (u64::try_from(all.len()).unwrap(), false)
    );
}

#[tokio::test]
async fn the_last_n_an_offset_a_partition_filter_and_a_limit_read_just_that() {
    let kafka = pulse_tests::kafka();
    let (topic, _producer, written, _guard) = filled_topic("reader-start").await;
    let reader = || TopicReader::new(&kafka, "pulse-test-reader", &topic);
    let expect = |keep: &dyn Fn(&Seen) -> bool| -> Vec<Seen> {
        let mut v: Vec<Seen> = written.iter().filter(|s| keep(s)).cloned().collect();
        v.sort();
        v
    };

    // The last 4 records of every partition.
    let last = reader().with_start(Start::Last(4)).read_blocking().unwrap();
    assert_eq!(
        last.iter().map(seen).collect::<Vec<_>>(),
        expect(&|s| s.1 >= PER_PARTITION - 4)
    );
    // More than a partition holds: all of it.
    assert_eq!(
        reader()
            .with_start(Start::Last(1_000))
            .read_blocking()
            .unwrap()
            .len(),
        written.len()
    );

    // Partitions 0 and 2 only, 2 from offset 15 and 0 its last 2.
    let some = reader()
        .with_partitions([0, 2])
        .with_start(Start::Last(2))
        .with_partition_start(2, Start::Offset(15))
        .read_blocking()
        .unwrap();
    assert_eq!(
        some.iter().map(seen).collect::<Vec<_>>(),
        expect(&|s| (s.0 == 0 && s.1 >= PER_PARTITION - 2) || (s.0 == 2 && s.1 >= 15))
    );

    // A partition the topic does not have.
    let e = reader()
        .with_partitions([1, 7])
        .read_blocking()
        .unwrap_err();
    assert!(matches!(e, ReadError::NoPartition { .. }), "{e}");
    assert!(e.to_string().contains(&topic), "{e}");

    // At most 7 records: the read stops there and says so.
    let mut n = 0;
    let summary = reader()
        .with_max_records(7)
        .open_blocking()
        .unwrap()
        .for_each(|_| n += 1)
        .unwrap();
    assert_eq!((n, summary.records, summary.limited), (7, 7, true));
}

#[tokio::test]
async fn a_missing_topic_or_a_deadline_too_short_is_an_error_naming_the_topic() {
    let kafka = pulse_tests::kafka();
    let missing = pulse_tests::unique("reader-missing");
    let e = TopicReader::new(&kafka, "pulse-test-reader", &missing)
        .with_timeout(Duration::from_secs(10))
        .read()
        .await
        .unwrap_err();
    assert!(matches!(e, ReadError::NoTopic(_)), "{e}");
    assert_eq!(e.to_string(), format!("topic {missing} does not exist"));

    let (topic, _producer, _written, _guard) = filled_topic("reader-deadline").await;
    // Too short to even ask the broker: the step that ran out names the topic.
    let e = TopicReader::new(&kafka, "pulse-test-reader", &topic)
        .with_timeout(Duration::from_millis(1))
        .read()
        .await
        .unwrap_err();
    assert_eq!(e.topic(), topic);
    let text = e.to_string();
    assert!(text.contains(&topic), "{text}");
    assert!(text.to_lowercase().contains("timed out"), "{text}");

    // Long enough to start, too short for the records: a caller that takes 50 ms per
    // record (a slow consumer, simulated) cannot get through 60 of them in 1 s.
    let open = TopicReader::new(&kafka, "pulse-test-reader", &topic)
        .with_timeout(Duration::from_secs(1))
        .open_blocking()
        .unwrap();
    let e = open
        .for_each(|_| std::thread::sleep(Duration::from_millis(50)))
        .unwrap_err();
    let ReadError::Timeout { behind, .. } = &e else {
        panic!("{e}");
    };
    assert!(
        !behind.is_empty() && behind.iter().all(|b| b.next < b.end),
        "{behind:?}"
    );
    let text = e.to_string();
    assert!(
        text.starts_with(&format!("reading {topic} timed out after 1s with ")),
        "{text}"
    );
    for b in behind {
        assert!(
            text.contains(&format!(
                "partition {} at offset {} of {}",
                b.partition, b.next, b.end
            )),
            "{text}"
        );
    }
}
