//! The Kafka wrappers against rdkafka's in-process `MockCluster` (librdkafka's mock
//! broker): acknowledgement futures, backpressure, delivery failure and
//! commit-after-durable. The same behaviours are also tested against the real broker in
//! the `pulse-tests` crate.

#![allow(clippy::unwrap_used)] // tests: a failed unwrap is a failed test

use std::time::Duration;

use pulse_platform::kafka::{
    KafkaConfig, KafkaConsumer, KafkaProducer, OutRecord, ProduceError, RebalanceEvent,
    RecordProducer,
};
use rdkafka::Message;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

fn cluster(topic: &str, partitions: i32) -> MockCluster<'static, DefaultProducerContext> {
    let c = MockCluster::new(1).unwrap();
    c.create_topic(topic, partitions, 1).unwrap();
    c
}

fn record(topic: &str, i: usize) -> OutRecord {
    OutRecord::new(
        topic,
        Some(format!("user-{i}").into_bytes()),
        format!("payload-{i}").into_bytes(),
    )
}

async fn recv(consumer: &KafkaConsumer) -> (i32, i64, Vec<u8>) {
    let m = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
        .await
        .expect("a record within 30 s")
        .unwrap();
    (
        m.partition(),
        m.offset(),
        m.payload().unwrap_or_default().to_vec(),
    )
}

#[tokio::test]
async fn ack_future_resolves_with_the_stored_offset() {
    let c = cluster("acks", 1);
    let cfg = KafkaConfig::for_brokers(c.bootstrap_servers());
    let p = KafkaProducer::new(&cfg, "test").unwrap();
    let mut offsets = Vec::new();
    for i in 0..3 {
        let ack = p.enqueue(record("acks", i)).unwrap().await.unwrap();
        assert_eq!(ack.partition, 0);
        offsets.push(ack.offset);
    }
    assert_eq!(offsets, vec![0, 1, 2]);
}

#[tokio::test]
async fn a_full_local_queue_is_backpressure_and_nothing_is_dropped() {
    let c = cluster("bp", 1);
    let cfg = KafkaConfig {
        queue_max_messages: 5,
        // Hold batches so the queue fills before anything drains.
        linger_ms: 2_000,
        ..KafkaConfig::for_brokers(c.bootstrap_servers())
    };
    let p = KafkaProducer::new(&cfg, "test").unwrap();
    let mut acks = Vec::new();
    for i in 0..5 {
        acks.push(p.enqueue(record("bp", i)).unwrap());
    }
    assert!(matches!(
        p.enqueue(record("bp", 5)),
        Err(ProduceError::QueueFull)
    ));
    assert!(ProduceError::QueueFull.is_retryable());
    // Waiting for room succeeds once the linger expires and acknowledgements free the queue.
    acks.push(
        p.enqueue_with_wait(record("bp", 5), Duration::from_secs(30))
            .await
            .unwrap(),
    );
    for a in acks {
        a.await.unwrap();
    }

    let (consumer, _) = KafkaConsumer::new(&cfg, "test", "bp-reader", &["bp"]).unwrap();
    let mut payloads = Vec::new();
    for _ in 0..6 {
        payloads.push(String::from_utf8(recv(&consumer).await.2).unwrap());
    }
    let expected: Vec<String> = (0..6).map(|i| format!("payload-{i}")).collect();
    assert_eq!(
        payloads, expected,
        "every acknowledged record is in the log, in order"
    );
}

#[tokio::test]
async fn an_unreachable_broker_fails_the_ack_future_not_the_enqueue() {
    let c = cluster("down", 1);
    let cfg = KafkaConfig {
        message_timeout_ms: 1_000,
        ..KafkaConfig::for_brokers(c.bootstrap_servers())
    };
    let p = KafkaProducer::new(&cfg, "test").unwrap();
    c.broker_down(1).unwrap();
    let ack = p
        .enqueue(record("down", 0))
        .expect("enqueue succeeds while the broker is down");
    let err = tokio::time::timeout(Duration::from_secs(30), ack)
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(err, ProduceError::Delivery(_)), "{err}");
    assert!(err.is_retryable(), "a timeout may succeed when retried");
}

#[tokio::test]
async fn the_group_resumes_after_the_last_offset_marked_durable() {
    let c = cluster("durable", 1);
    let cfg = KafkaConfig::for_brokers(c.bootstrap_servers());
    let p = KafkaProducer::new(&cfg, "test").unwrap();
    for i in 0..10 {
        p.enqueue(record("durable", i)).unwrap().await.unwrap();
    }

    {
        let (consumer, mut events) = KafkaConsumer::new(&cfg, "test", "g1", &["durable"]).unwrap();
        for expected in 0..10 {
            let (partition, offset, _) = recv(&consumer).await;
            assert_eq!((partition, offset), (0, expected));
        }
        assert_eq!(
            events.try_recv().unwrap(),
            RebalanceEvent::Assigned(vec![("durable".into(), 0)])
        );
        // Records 0..=4 were made durable; 5..=9 were received but not.
        consumer.mark_durable("durable", 0, 4).unwrap();
        consumer.commit_now().unwrap();
    }

    let (consumer, _) = KafkaConsumer::new(&cfg, "test", "g1", &["durable"]).unwrap();
    let (_, offset, payload) = recv(&consumer).await;
    assert_eq!(offset, 5, "resumes at the first record not marked durable");
    assert_eq!(payload, b"payload-5");
}

/// Polls `cond` every 20 ms for at most `within`.
async fn eventually(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !cond() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_producer_whose_deliveries_all_fail_is_reported_and_a_recreated_one_delivers() {
    use pulse_platform::Health;
    use rdkafka::types::{RDKafkaApiKey, RDKafkaRespErr};

    let c = cluster("stall", 1);
    let mut cfg = KafkaConfig::for_brokers(c.bootstrap_servers());
    cfg.message_timeout_ms = 2_000;
    let p = KafkaProducer::new(&cfg, "test").unwrap();
    p.enqueue(record("stall", 0)).unwrap().await.unwrap();
    assert!(
        p.unhealthy(Duration::ZERO).is_none(),
        "healthy after an ack"
    );

    // The broker answers every produce request with an error (as a broker whose storage
    // fails every request does).
    c.request_errors(
        RDKafkaApiKey::Produce,
        &[RDKafkaRespErr::RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED; 500],
    );
    let health = Health::default();
    health.set_ready(true);
    let stop = tokio_util::sync::CancellationToken::new();
    let stall = Duration::from_millis(300);
    let watchdog = pulse_platform::kafka::producer::spawn_watchdog(
        p.clone(),
        health.clone(),
        "kafka-producer",
        stall,
        stop.clone(),
    );
    let failed = p.enqueue(record("stall", 1)).unwrap().await;
    assert!(failed.is_err(), "{failed:?}");
    eventually(Duration::from_secs(10), "readiness to be blocked", || {
        health.blocked().is_some()
    })
    .await;
    assert!(!health.is_ready());
    let reason = health.blocked().unwrap();
    assert!(reason.contains("kafka-producer"), "{reason}");
    eventually(Duration::from_secs(10), "a recreated client", || {
        p.recreated() >= 1
    })
    .await;

    // The broker works again: the (recreated) producer delivers and readiness returns.
    c.clear_request_errors(RDKafkaApiKey::Produce);
    let mut delivered = false;
    for i in 2..50 {
        if p.enqueue(record("stall", i)).unwrap().await.is_ok() {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(delivered, "no delivery after the broker recovered");
    eventually(Duration::from_secs(10), "readiness to return", || {
        health.is_ready()
    })
    .await;
    stop.cancel();
    watchdog.await.unwrap();
}

#[tokio::test]
async fn a_paused_consumer_hands_over_nothing_until_it_resumes() {
    let c = cluster("paused", 2);
    let cfg = KafkaConfig::for_brokers(c.bootstrap_servers());
    let p = KafkaProducer::new(&cfg, "test").unwrap();
    p.enqueue(record("paused", 0)).unwrap().await.unwrap();
    let (consumer, _) = KafkaConsumer::new(&cfg, "test", "pauser", &["paused"]).unwrap();
    // The first record proves the partitions are assigned.
    let (_, _, first) = recv(&consumer).await;
    assert_eq!(first, b"payload-0");
    consumer.pause_all();
    for i in 1..4 {
        p.enqueue(record("paused", i)).unwrap().await.unwrap();
    }
    let while_paused = tokio::time::timeout(Duration::from_secs(2), consumer.recv()).await;
    assert!(
        while_paused.is_err(),
        "a paused consumer handed over a record"
    );
    consumer.resume_all();
    let mut got = Vec::new();
    for _ in 1..4 {
        got.push(String::from_utf8(recv(&consumer).await.2).unwrap());
    }
    got.sort();
    assert_eq!(got, ["payload-1", "payload-2", "payload-3"]);
}
