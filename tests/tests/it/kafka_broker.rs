//! The Kafka wrappers against the real broker (Tansu, started by scripts/test.sh):
//! idempotent produce with headers, and a consumer group that resumes from its committed
//! offset.

use std::time::Duration;

use pulse_contracts::{headers, trace_context};
use pulse_platform::kafka::{
    KafkaConsumer, KafkaProducer, OutRecord, RecordProducer, TopicSpec, ensure_topics,
};
use rdkafka::Message;
use rdkafka::message::{Headers, OwnedHeaders};

use crate::support::cleanup;

async fn recv(consumer: &KafkaConsumer) -> rdkafka::message::OwnedMessage {
    tokio::time::timeout(Duration::from_secs(60), consumer.recv())
        .await
        .expect("a record within 60 s")
        .expect("no consumer error")
        .detach()
}

#[tokio::test]
async fn idempotent_produce_keeps_headers_and_order() {
    let cfg = pulse_tests::kafka();
    let topic = pulse_tests::unique("produce");
    let _topics = cleanup::Topics::adopt([&topic]);
    let created = ensure_topics(&cfg, &[TopicSpec::new(&topic, 1)])
        .await
        .unwrap();
    assert_eq!(created, vec![topic.clone()]);
    // A second bootstrap is a no-op, not an error.
    assert!(
        ensure_topics(&cfg, &[TopicSpec::new(&topic, 1)])
            .await
            .unwrap()
            .is_empty()
    );

    let producer = KafkaProducer::new(&cfg, "pulse-test").unwrap();
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut offsets = Vec::new();
    for i in 0..20 {
        let h = headers::with_str(OwnedHeaders::new(), headers::TRACEPARENT, traceparent);
        let h = headers::with_str(h, headers::EVENT_ID, &format!("evt-{i}"));
        let h = headers::with_str(h, headers::INGEST_TS, "1764000000000");
        let rec = OutRecord::new(
            &topic,
            Some(b"user-1".to_vec()),
            format!("v{i}").into_bytes(),
        )
        .with_headers(h);
        offsets.push(producer.enqueue(rec).unwrap());
    }
    let mut acked = Vec::new();
    for a in offsets {
        acked.push(a.await.unwrap().offset);
    }
    assert_eq!(
        acked,
        (0..20).collect::<Vec<i64>>(),
        "acknowledged in order, once each"
    );

    let (consumer, _) =
        KafkaConsumer::new(&cfg, "pulse-test", &pulse_tests::unique("g"), &[&topic]).unwrap();
    for i in 0..20 {
        let m = recv(&consumer).await;
        assert_eq!(m.offset(), i);
        assert_eq!(m.payload().unwrap(), format!("v{i}").as_bytes());
        assert_eq!(m.key().unwrap(), b"user-1");
        let h = m.headers().unwrap();
        let evt = h.iter().find(|h| h.key == headers::EVENT_ID).unwrap();
        assert_eq!(evt.value.unwrap(), format!("evt-{i}").as_bytes());
        let cx = trace_context::extract(Some(h));
        assert_eq!(
            trace_context::trace_id_hex(&cx).as_deref(),
            Some("4bf92f3577b34da6a3ce929d0e0e4736")
        );
    }
}

#[tokio::test]
async fn consumer_group_resumes_from_its_committed_offset() {
    let cfg = pulse_tests::kafka();
    let topic = pulse_tests::unique("resume");
    let group = pulse_tests::unique("group");
    let _topics = cleanup::Topics::create(&[TopicSpec::new(&topic, 1)]).await;
    let producer = KafkaProducer::new(&cfg, "pulse-test").unwrap();
    for i in 0..10 {
        producer
            .send(
                OutRecord::new(&topic, None, format!("r{i}").into_bytes()),
                Duration::from_secs(5),
            )
            .await
            .unwrap();
    }

    {
        let (consumer, _) = KafkaConsumer::new(&cfg, "pulse-test", &group, &[&topic]).unwrap();
        for i in 0..10 {
            assert_eq!(recv(&consumer).await.offset(), i);
        }
        // Only records 0..=6 became durable.
        consumer.mark_durable(&topic, 0, 6).unwrap();
        consumer.commit_now().unwrap();
        let committed = consumer.committed(Duration::from_secs(10)).unwrap();
        let off = committed.find_partition(&topic, 0).unwrap().offset();
        assert_eq!(off, rdkafka::Offset::Offset(7));
    }

    let (consumer, _) = KafkaConsumer::new(&cfg, "pulse-test", &group, &[&topic]).unwrap();
    let m = recv(&consumer).await;
    assert_eq!(m.offset(), 7, "resumes after the last durable record");
    assert_eq!(m.payload().unwrap(), b"r7");
}
