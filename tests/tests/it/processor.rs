//! The processor against the real broker and a real schema registry: final window and
//! session aggregates, corrected results for late-but-allowed events, the late topic for
//! events beyond the allowed lateness, and commit-after-durable resumption.

use std::collections::BTreeMap;
use std::time::Duration;

use prost::Message as _;
use pulse_contracts::pb::aggregates::v1::{Session, UserWindowActivity};
use pulse_contracts::pb::events::v1 as ev;
use pulse_contracts::{headers, wire};
use pulse_platform::kafka::{KafkaProducer, OutRecord, TopicSpec};
use rdkafka::Message;
use rdkafka::message::{Headers, OwnedHeaders};
use tokio_util::sync::CancellationToken;

use crate::support::pipeline::{self, Rules};
use crate::support::registry::{self, Registry};
use crate::support::{Deadline, cleanup, events, wait_until};

struct Topics {
    events: String,
    activity: String,
    sessions: String,
    late: String,
    _guard: cleanup::Topics,
}

async fn setup() -> (Topics, Registry) {
    let kafka = pulse_tests::kafka();
    let names = ["events", "activity", "sessions", "late"].map(pulse_tests::unique);
    let specs: Vec<TopicSpec> = names.iter().map(|n| TopicSpec::new(n, 1)).collect();
    let guard = cleanup::Topics::create(&specs).await;
    let [events, activity, sessions, late] = names;
    let t = Topics {
        events,
        activity,
        sessions,
        late,
        _guard: guard,
    };
    let registry = registry::start(&kafka).await;
    registry::register_aggregates(&registry, &[&t.activity, &t.sessions]).await;
    (t, registry)
}

fn config(
    t: &Topics,
    registry: &pulse_schema_registry::Replica,
    group: &str,
) -> pulse_processor::Config {
    let rules = Rules {
        window_ms: 60_000,
        allowed_lateness_ms: 30_000,
        max_out_of_orderness_ms: 1_000,
        session_gap_ms: 120_000,
    };
    let topics = [
        ("--events-topic", t.events.as_str()),
        ("--user-activity-topic", &t.activity),
        ("--sessions-topic", &t.sessions),
        ("--late-topic", &t.late),
    ];
    pipeline::processor_config(
        &format!("http://{}", registry.addr),
        group,
        rules,
        &topics,
        // The settings the chart run creates the fixed topics (the checkpoints) with.
        &[
            "--kafka-replication-factor",
            "1",
            "--kafka-min-insync-replicas",
            "1",
        ],
    )
}

/// A page view of /home (or purchase of `amount` EUR micros) of `user` at event time `t`
/// (ms since base).
fn event(id: &str, user: &str, t: i64, amount: Option<i64>) -> ev::Event {
    // A minute boundary, so window [0, 60 s) of the test starts at `base`.
    let base: i64 = 1_764_000_000_000 / 60_000 * 60_000;
    let e = events::event(id, user, base + t);
    match amount {
        Some(a) => e.purchase("EUR", a),
        None => e.page("/home"),
    }
    .build()
}

async fn produce(topic: &str, events: &[ev::Event]) {
    let p = KafkaProducer::new(&pulse_tests::kafka(), "processor-test").unwrap();
    for e in events {
        let h = headers::with_str(OwnedHeaders::new(), headers::EVENT_ID, &e.event_id);
        let h = headers::with_str(h, headers::INGEST_TS, "1764000000000");
        let rec = OutRecord::new(
            topic,
            Some(e.key.as_ref().unwrap().user_id.clone().into_bytes()),
            wire::frame(1, &[0], &e.encode_to_vec()),
        )
        .with_headers(h);
        p.send(rec, Duration::from_secs(5)).await.unwrap();
    }
}

/// Reads `topic` until `done` holds for the highest-version value per key, or 60 s pass.
async fn read_until<T: prost::Message + Default + Clone>(
    topic: &str,
    key_of: impl Fn(&T) -> String,
    version_of: impl Fn(&T) -> u64,
    done: impl Fn(&BTreeMap<String, T>) -> bool,
) -> BTreeMap<String, T> {
    let consumer = pulse_tests::reader("processor-test", "reader", topic);
    let mut best: BTreeMap<String, T> = BTreeMap::new();
    // Each look reads (at most) one record; no pause between looks.
    let deadline = Deadline::after(Duration::from_secs(60)).every(Duration::ZERO);
    wait_until(deadline, format!("the condition on {topic}"), async || {
        if done(&best) {
            return Ok(());
        }
        if let Ok(m) = tokio::time::timeout(Duration::from_millis(500), consumer.recv()).await {
            let m = m.unwrap();
            let framed = wire::unframe(m.payload().unwrap()).unwrap();
            let v = T::decode(framed.payload).unwrap();
            let k = key_of(&v);
            if best.get(&k).is_none_or(|b| version_of(b) < version_of(&v)) {
                best.insert(k, v);
            }
        }
        Err(format!("{} keys", best.len()))
    })
    .await;
    best
}

#[tokio::test]
async fn windows_and_sessions_become_final_and_too_late_events_go_to_the_late_topic() {
    let (t, registry) = setup().await;
    let cfg = config(&t, &registry, &pulse_tests::unique("proc"));
    let processor = pulse_processor::build(&cfg).await.unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn(processor.run(stop.clone()));

    // u1: three events in window [0, 60 s), one purchase; then u2 far later moves the
    // watermark past u1's window end + lateness; then a too-late event of u1.
    produce(
        &t.events,
        &[
            event("a1", "u1", 1_000, None),
            event("a2", "u1", 20_000, None),
            event("a3", "u1", 30_000, Some(19_990_000)),
            event("a2", "u1", 31_000, None), // duplicate id: dropped
            event("b1", "u2", 400_000, None),
        ],
    )
    .await;
    let activity = read_until::<UserWindowActivity>(
        &t.activity,
        |a| format!("{}|{}", a.user_id, a.window_start_ms),
        |a| a.version,
        |m| m.values().any(|a| a.user_id == "u1" && a.r#final),
    )
    .await;
    let u1 = activity.values().find(|a| a.user_id == "u1").unwrap();
    assert_eq!((u1.page_views, u1.event_count), (2, 3));
    assert_eq!(u1.revenue[0].currency, "EUR");
    assert_eq!(u1.revenue[0].amount_micros, 19_990_000);
    assert_eq!(u1.events_by_type["purchase"], 1);

    produce(&t.events, &[event("late1", "u1", 2_000, None)]).await;
    let consumer = pulse_tests::reader("processor-test", "late", &t.late);
    let late = tokio::time::timeout(Duration::from_secs(60), consumer.recv())
        .await
        .unwrap()
        .unwrap();
    let code = late
        .headers()
        .unwrap()
        .iter()
        .find(|h| h.key == headers::ERROR_CODE)
        .and_then(|h| h.value)
        .unwrap()
        .to_vec();
    assert_eq!(code, b"late_event");
    assert_eq!(
        ev::Event::decode(wire::unframe(late.payload().unwrap()).unwrap().payload)
            .unwrap()
            .event_id,
        "late1"
    );

    // u1's session (gap 120 s) is final once the watermark passes end + gap + lateness.
    produce(&t.events, &[event("c1", "u3", 900_000, None)]).await;
    let sessions = read_until::<Session>(
        &t.sessions,
        |s| s.session_id.clone(),
        |s| s.version,
        |m| m.values().any(|s| s.user_id == "u1" && s.r#final),
    )
    .await;
    let s1 = sessions.values().find(|s| s.user_id == "u1").unwrap();
    assert_eq!(
        (s1.event_count, s1.page_count, s1.duration_ms),
        (3, 2, 29_000)
    );

    stop.cancel();
    task.await.unwrap().unwrap();
    registry.stop().await.unwrap();
}
