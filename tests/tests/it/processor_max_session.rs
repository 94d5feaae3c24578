//! The maximum session duration against the real broker (#15 defect 3): a user who is
//! never idle gets sessions cut at `--max-session-duration`, final while they are still
//! active, and the group's committed offset moves past them instead of staying pinned at
//! the user's first event; a second instance that takes over from the checkpoint cuts the
//! rest of the run the same way.
//!

use std::collections::BTreeMap;
use std::time::Duration;

use clap::Parser;
use prost::Message as _;
use pulse_contracts::pb::aggregates::v1::Session;
use pulse_contracts::{headers, wire};
use pulse_platform::kafka::{KafkaProducer, OutRecord, TopicSpec};
use pulse_processor::session::Sessions;
use rdkafka::Message;
use rdkafka::consumer::BaseConsumer;
use rdkafka::message::OwnedHeaders;
use tokio_util::sync::CancellationToken;

use crate::support::archive::committed;
use crate::support::cleanup;
use crate::support::kafka::read_to_end;
use crate::support::registry;
use crate::support::{Deadline, events, wait_until};

const GAP_MS: i64 = 2_000;
const MAX_MS: i64 = 10_000;
const LATENESS_MS: i64 = 1_000;
const OUT_OF_ORDERNESS_MS: i64 = 500;
/// One event every this much event time: always within the gap.
const STEP_MS: i64 = 500;
const WAIT: Duration = Duration::from_secs(90);
const USER: &str = "always-active";

struct Topics {
    events: String,
    activity: String,
    sessions: String,
    late: String,
    checkpoints: String,
    group: String,
}

fn config(t: &Topics, registry_addr: std::net::SocketAddr) -> pulse_processor::Config {
    let args: Vec<String> = [
        ("--kafka-brokers", pulse_tests::kafka().brokers),
        ("--schema-registry-url", format!("http://{registry_addr}")),
        ("--group-id", t.group.clone()),
        ("--events-topic", t.events.clone()),
        ("--user-activity-topic", t.activity.clone()),
        ("--sessions-topic", t.sessions.clone()),
        ("--late-topic", t.late.clone()),
        ("--checkpoint-topic", t.checkpoints.clone()),
        ("--window-ms", "1000".to_owned()),
        ("--allowed-lateness-ms", LATENESS_MS.to_string()),
        ("--max-out-of-orderness-ms", OUT_OF_ORDERNESS_MS.to_string()),
        ("--session-gap-ms", GAP_MS.to_string()),
        ("--max-session-duration", "10s".to_owned()),
        ("--idle-timeout-ms", "600000".to_owned()),
        ("--emit-interval-ms", "100".to_owned()),
    ]
    .into_iter()
    .flat_map(|(k, v)| [k.to_owned(), v])
    .collect();
    pulse_processor::Config::parse_from(std::iter::once("pulse-processor".to_owned()).chain(args))
}

/// An in-process processor.
struct Instance {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), pulse_processor::run::RunError>>,
}

impl Instance {
    async fn start(cfg: &pulse_processor::Config) -> Self {
        let processor = pulse_processor::build(cfg).await.unwrap();
        let stop = CancellationToken::new();
        let task = tokio::spawn(processor.run(stop.clone()));
        Self { stop, task }
    }

    async fn stop(self) {
        self.stop.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// Produces one page view of `user` per event time in `times`, in order.
async fn produce(topic: &str, user: &str, times: impl IntoIterator<Item = i64>) {
    let p = KafkaProducer::new(&pulse_tests::kafka(), "processor-max-session-test").unwrap();
    let mut acks = Vec::new();
    for t in times {
        let id = format!("{user}-{t}");
        let e = events::event(&id, user, t).page("/").build();
        let h = headers::with_str(OwnedHeaders::new(), headers::EVENT_ID, &id);
        let h = headers::with_str(h, headers::INGEST_TS, &(t + 100).to_string());
        let rec = OutRecord::new(
            topic,
            Some(user.as_bytes().to_vec()),
            wire::frame(1, &[0], &e.encode_to_vec()),
        )
        .with_headers(h);
        acks.push(
            p.enqueue_with_wait(rec, Duration::from_secs(30))
                .await
                .unwrap(),
        );
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// The highest-version record of each session id of `user` on `topic`.
async fn sessions_of(topic: &str, user: &str) -> BTreeMap<String, Session> {
    let mut out: BTreeMap<String, Session> = BTreeMap::new();
    for m in read_to_end(&pulse_tests::kafka(), topic).await {
        let s = Session::decode(wire::unframe(m.payload().unwrap()).unwrap().payload).unwrap();
        if s.user_id == user && out.get(&s.session_id).is_none_or(|b| b.version < s.version) {
            out.insert(s.session_id.clone(), s);
        }
    }
    out
}

/// The final sessions of `user` as (start, end, events), once there are `n` of them.
async fn wait_finals(topic: &str, user: &str, n: usize) -> BTreeMap<String, Session> {
    wait_until(
        Deadline::after(WAIT),
        format!("{n} final sessions of {user}"),
        async || {
            let all = sessions_of(topic, user).await;
            let finals: Vec<(i64, i64, u64)> = all
                .values()
                .filter(|s| s.r#final)
                .map(|s| (s.start_ms, s.end_ms, s.event_count))
                .collect();
            if finals.len() >= n {
                Ok(all)
            } else {
                Err(finals)
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn an_always_active_user_gets_sessions_cut_at_the_maximum_and_does_not_pin_the_commit() {
    let t = Topics {
        events: pulse_tests::unique("maxsession_events"),
        activity: pulse_tests::unique("maxsession_activity"),
        sessions: pulse_tests::unique("maxsession_sessions"),
        late: pulse_tests::unique("maxsession_late"),
        checkpoints: pulse_tests::unique("maxsession_checkpoints"),
        group: pulse_tests::unique("maxsession"),
    };
    let specs: Vec<TopicSpec> = [&t.events, &t.activity, &t.sessions, &t.late]
        .iter()
        .map(|name| TopicSpec::new(name.as_str(), 1))
        .collect();
    let mut topics = cleanup::Topics::create(&specs).await;
    topics.add(&t.checkpoints);
    let kafka = pulse_tests::kafka();
    let registry = registry::start(&kafka).await;
    registry::register_aggregates(&registry, &[&t.activity, &t.sessions]).await;
    let cfg = config(&t, registry.addr);

    // 60 s of event time, one event every 500 ms (offsets 0..=120), two hours ago.
    let base = pulse_platform::clock::now_ms() - 2 * 3_600_000;
    let base = base - base.rem_euclid(1_000);
    let first = Instance::start(&cfg).await;
    produce(&t.events, USER, (0..=120).map(|i| base + i * STEP_MS)).await;

    // Cut at base + 10 s, 20 s, …: the sessions ending by base + 49.5 s are final (the
    // watermark, base + 59.5 s, is past their end + gap + lateness) while the user is
    // still active.
    let got = wait_finals(&t.sessions, USER, 5).await;
    let finals: Vec<&Session> = got.values().filter(|s| s.r#final).collect();
    let mut spans: Vec<(i64, i64, u64)> = finals
        .iter()
        .map(|s| (s.start_ms - base, s.end_ms - base, s.event_count))
        .collect();
    spans.sort_unstable();
    assert_eq!(
        spans,
        (0..5)
            .map(|k| (k * MAX_MS, k * MAX_MS + 9_500, 20))
            .collect::<Vec<_>>()
    );
    for s in &finals {
        assert_eq!(
            s.session_id,
            Sessions::split_session_id(USER, s.start_ms, MAX_MS)
        );
        assert!(
            s.merged_session_ids
                .contains(&Sessions::session_id(USER, s.start_ms))
        );
        assert!(s.duration_ms < MAX_MS);
    }

    // The commit follows: the earliest record still needed is the first of the open
    // session from base + 50 s (offset 100), not offset 0.
    let c: BaseConsumer = kafka
        .client_config("processor-max-session-committed")
        .set("group.id", &t.group)
        .create()
        .unwrap();
    wait_until(
        Deadline::after(WAIT),
        "the processor's group to commit past the final sessions",
        async || {
            let now = committed(&c, &t.events, 1);
            if now[0] >= 100 { Ok(()) } else { Err(now) }
        },
    )
    .await;
    first.stop().await;

    // A second instance continues from the checkpoint; the user goes quiet and a last
    // event 10 min later closes the rest of the run.
    let second = Instance::start(&cfg).await;
    produce(&t.events, USER, [base + 600_000]).await;
    let got = wait_finals(&t.sessions, USER, 7).await;
    let mut spans: Vec<(i64, i64, u64, bool)> = got
        .values()
        .filter(|s| s.r#final)
        .map(|s| {
            let cut = s.session_id == Sessions::split_session_id(USER, s.start_ms, MAX_MS);
            (s.start_ms - base, s.end_ms - base, s.event_count, cut)
        })
        .collect();
    spans.sort_unstable();
    let mut want: Vec<(i64, i64, u64, bool)> = (0..6)
        .map(|k| (k * MAX_MS, k * MAX_MS + 9_500, 20, true))
        .collect();
    want.push((60_000, 60_000, 1, false));
    assert_eq!(spans, want);
    // Every id of the user that is not final is superseded by a final session.
    for s in got
        .values()
        .filter(|s| !s.r#final && s.start_ms < base + 600_000)
    {
        assert!(
            got.values()
                .any(|f| f.r#final && f.merged_session_ids.contains(&s.session_id)),
            "session {} ({}..{}) left open",
            s.session_id,
            s.start_ms - base,
            s.end_ms - base
        );
    }
    second.stop().await;
    registry.stop().await.unwrap();
    drop(topics);
}
