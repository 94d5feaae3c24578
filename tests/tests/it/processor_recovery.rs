//! The processor's effectively-once guarantee against the real broker: outputs are
//! deterministic (same input, same keys and versions) and offsets are committed only up to
//! what open windows and sessions no longer need, so after a crash (SIGKILL of the real
//! `pulse-processor` binary) or a rebalance (a second instance joining, then the first one
//! leaving) the final aggregates equal those of an uninterrupted run over the same topic.
//!
//! Each test runs a deterministic workload (8 users in bursts, out-of-order events within
//! the allowed lateness, duplicates, purchases) through the run under test and through an
//! uninterrupted reference instance (own group, own output topics) that consumes the events
//! as they are produced. Both start with one warm-up event per partition, and end with one
//! far-future flush event per partition that closes everything. The test computes the
//! windows and sessions the workload implies, waits (with a deadline) until both runs have
//! a final record for each, and then compares the highest-version record per key: whole
//! protobuf messages, no extra or missing keys, nothing on the late topics.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::Path;
use std::time::Duration;

use clap::Parser;
use prost::Message as _;
use pulse_contracts::pb::aggregates::v1::{Session, UserWindowActivity};
use pulse_contracts::pb::events::v1 as ev;
use pulse_contracts::{headers, wire};
use pulse_platform::kafka::{KafkaConsumer, KafkaProducer, OutRecord, TopicSpec};
use rdkafka::Message;
use rdkafka::consumer::Consumer;
use rdkafka::message::OwnedHeaders;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const WINDOW_MS: i64 = 10_000;
const LATENESS_MS: i64 = 5_000;
const OUT_OF_ORDERNESS_MS: i64 = 1_000;
const GAP_MS: i64 = 20_000;
/// Partitions are never idle during a test: idleness is processing-time, not input.
const IDLE_MS: i64 = 600_000;
/// Time allowed for one wait (a consumer group join, a restart, all finals).
const WAIT: Duration = Duration::from_secs(90);
/// Users whose far-future events close every window and session of the workload.
const FLUSH_PREFIX: &str = "flush-";
/// How often a wait looks at the consumer group's assignments.
const POLL: Duration = Duration::from_millis(50);

use crate::support::child_process::{binary, free_port};
use crate::support::cleanup::{self, TempDir};
use crate::support::registry::{self, Registry};
use crate::support::{Deadline, events, poll_until, wait_until};

/// The processor's topics of one run (events shared, outputs per run).
#[derive(Debug, Clone)]
struct Topics {
    events: String,
    activity: String,
    sessions: String,
    late: String,
    checkpoints: String,
}

impl Topics {
    fn outputs_of(events: &str, name: &str) -> Self {
        Self {
            events: events.to_owned(),
            activity: pulse_tests::unique(&format!("{name}_activity")),
            sessions: pulse_tests::unique(&format!("{name}_sessions")),
            late: pulse_tests::unique(&format!("{name}_late")),
            checkpoints: pulse_tests::unique(&format!("{name}_checkpoints")),
        }
    }

    /// Flags naming the topics and the event-time settings (shared by every instance).
    fn flags(&self) -> Vec<String> {
        [
            ("--events-topic", self.events.clone()),
            ("--user-activity-topic", self.activity.clone()),
            ("--sessions-topic", self.sessions.clone()),
            ("--late-topic", self.late.clone()),
            ("--checkpoint-topic", self.checkpoints.clone()),
            ("--window-ms", WINDOW_MS.to_string()),
            ("--allowed-lateness-ms", LATENESS_MS.to_string()),
            ("--max-out-of-orderness-ms", OUT_OF_ORDERNESS_MS.to_string()),
            ("--session-gap-ms", GAP_MS.to_string()),
            ("--idle-timeout-ms", IDLE_MS.to_string()),
            ("--emit-interval-ms", "100".to_owned()),
        ]
        .into_iter()
        .flat_map(|(k, v)| [k.to_owned(), v])
        .collect()
    }
}

/// Creates the events topic (`partitions`) and each run's output topics (1 partition),
/// starts a schema registry and registers the aggregates schema for the outputs. The
/// topics (the checkpoint topics the processors create included) are deleted when the
/// guard is dropped.
async fn setup(events: &str, partitions: i32, runs: &[&Topics]) -> (Registry, cleanup::Topics) {
    let kafka = pulse_tests::kafka();
    let mut specs = vec![TopicSpec::new(events, partitions)];
    for t in runs {
        for name in [&t.activity, &t.sessions, &t.late] {
            specs.push(TopicSpec::new(name.as_str(), 1));
        }
    }
    let mut topics = cleanup::Topics::create(&specs).await;
    for t in runs {
        topics.add(&t.checkpoints);
    }
    let registry = registry::start(&kafka).await;
    for t in runs {
        registry::register_aggregates(&registry, &[&t.activity, &t.sessions]).await;
    }
    (registry, topics)
}

fn config(t: &Topics, registry: &Registry, group: &str) -> pulse_processor::Config {
    let mut args: Vec<String> = vec![
        "pulse-processor".into(),
        "--kafka-brokers".into(),
        pulse_tests::kafka().brokers,
        "--schema-registry-url".into(),
        format!("http://{}", registry.addr),
        "--group-id".into(),
        group.into(),
    ];
    args.extend(t.flags());
    pulse_processor::Config::parse_from(args)
}

/// An in-process processor instance whose assigned partitions the test can watch.
struct Instance {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), pulse_processor::run::RunError>>,
    /// The loop's consumer (shared), to read its current assignment.
    consumer: KafkaConsumer,
}

impl Instance {
    async fn start(cfg: &pulse_processor::Config) -> Self {
        let processor = pulse_processor::build(cfg).await.unwrap();
        let consumer = processor.consumer.clone();
        let stop = CancellationToken::new();
        let task = tokio::spawn(processor.run(stop.clone()));
        Self {
            stop,
            task,
            consumer,
        }
    }

    fn assigned(&self) -> BTreeSet<i32> {
        self.consumer
            .raw()
            .assignment()
            .unwrap()
            .elements()
            .iter()
            .map(|e| e.partition())
            .collect()
    }

    /// Waits until the assigned partitions are exactly `want`.
    async fn wait_assigned(&self, name: &str, want: &BTreeSet<i32>) {
        let what = format!("{name} to be assigned {want:?}");
        wait_until(Deadline::after(WAIT).every(POLL), what, async || {
            let has = self.assigned();
            if &has == want {
                return Ok(());
            }
            assert!(!self.task.is_finished(), "{name} stopped");
            Err(has)
        })
        .await;
    }

    /// Stops the loop (it emits, flushes and commits) and waits for it.
    async fn stop(self) {
        // The loop's consumer must be the last reference, so that it leaves the group.
        drop(self.consumer);
        self.stop.cancel();
        // Bounded: a loop that never finishes its shutdown fails the test instead of
        // hanging it.
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("the processor loop did not stop within the wait")
            .unwrap()
            .unwrap();
    }
}

/// One event of the workload.
#[derive(Debug, Clone)]
struct Event {
    id: String,
    user: String,
    /// Event time, epoch ms.
    t: i64,
    page: String,
    /// (currency, micros) of a purchase.
    purchase: Option<(&'static str, i64)>,
}

impl Event {
    fn to_proto(&self) -> ev::Event {
        let e = events::event(&self.id, &self.user, self.t);
        match self.purchase {
            Some((currency, micros)) => e.purchase(currency, micros),
            None => e.page(&self.page),
        }
        .build()
    }
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The workload, in production order: 8 users active in bursts of 40 s separated by 30 s
/// pauses (longer than the session gap, so sessions close mid-stream), one event every
/// 450 ms of event time over 180 s; about one in eight delayed by 1.5–3 s (out of order,
/// within the allowed lateness), one in twelve sent again three events later (duplicate),
/// one in seven a purchase. Event times start at `base` (two hours in the past, so no
/// event is future-dated).
fn workload(base: i64) -> Vec<Event> {
    let mut rng = Rng(0x5eed_1234_abcd_9876);
    let pages = ["/home", "/search", "/cart", "/product/1", "/product/2"];
    let mut out: Vec<Event> = Vec::new();
    let mut dups: Vec<(usize, Event)> = Vec::new();
    for step in 0..400_i64 {
        let nominal = step * 450;
        let active: Vec<u64> = (0..8_u64)
            .filter(|k| (nominal / 1000 + (*k as i64) * 9) % 70 < 40)
            .collect();
        if !active.is_empty() {
            let user = active[rng.below(active.len() as u64) as usize];
            let delay = if rng.below(8) == 0 {
                1_500 + rng.below(1_500) as i64
            } else {
                0
            };
            let purchase = (rng.below(7) == 0).then(|| {
                (
                    if rng.below(2) == 0 { "EUR" } else { "USD" },
                    1_000_000 + rng.below(50_000_000) as i64,
                )
            });
            let e = Event {
                id: format!("e{step}"),
                user: format!("u{user}"),
                t: base + (nominal - delay).max(0),
                page: pages[rng.below(pages.len() as u64) as usize].to_owned(),
                purchase,
            };
            if rng.below(12) == 0 {
                dups.push((out.len() + 3, e.clone()));
            }
            out.push(e);
        }
        while let Some(i) = dups.iter().position(|(at, _)| *at <= out.len()) {
            out.push(dups.remove(i).1);
        }
    }
    out.extend(dups.into_iter().map(|(_, e)| e));
    out
}

/// One event at `t` for each of the users `<prefix>0`, `<prefix>1`, … until every
/// partition of the events topic has one. Used at the start (`warm-`, at the workload's
/// base time: every partition has data before the workload arrives) and at the end
/// (`flush-`, 10 min after the workload: every partition's watermark passes every window
/// and session of the workload).
async fn produce_to_every_partition(
    topic: &str,
    partitions: i32,
    prefix: &str,
    t: i64,
) -> Vec<(Event, i32, i64)> {
    let mut hit: BTreeSet<i32> = BTreeSet::new();
    let mut acks = Vec::new();
    let mut i = 0;
    while hit.len() < partitions as usize {
        assert!(i < 200, "{prefix} events reached only partitions {hit:?}");
        let e = Event {
            id: format!("{prefix}{i}"),
            user: format!("{prefix}{i}"),
            t,
            page: "/home".into(),
            purchase: None,
        };
        let a = produce(topic, std::slice::from_ref(&e)).await;
        hit.insert(a[0].1);
        acks.extend(a);
        i += 1;
    }
    acks
}

/// The window keys (`user|start`) of `events`.
fn window_keys<'a>(events: impl IntoIterator<Item = &'a Event>) -> BTreeSet<String> {
    events
        .into_iter()
        .map(|e| format!("{}|{}", e.user, e.t.div_euclid(WINDOW_MS) * WINDOW_MS))
        .collect()
}

/// Produces `events` in order (key = user id, so the partitioner picks the partition);
/// returns each event with its partition and offset.
async fn produce(topic: &str, events: &[Event]) -> Vec<(Event, i32, i64)> {
    let p = KafkaProducer::new(&pulse_tests::kafka(), "processor-recovery-test").unwrap();
    let mut acks = Vec::new();
    for e in events {
        let h = headers::with_str(OwnedHeaders::new(), headers::EVENT_ID, &e.id);
        let h = headers::with_str(h, headers::INGEST_TS, &(e.t + 250).to_string());
        let rec = OutRecord::new(
            topic,
            Some(e.user.clone().into_bytes()),
            wire::frame(1, &[0], &e.to_proto().encode_to_vec()),
        )
        .with_headers(h);
        acks.push(
            p.enqueue_with_wait(rec, Duration::from_secs(30))
                .await
                .unwrap(),
        );
    }
    let mut out = Vec::new();
    for (e, ack) in events.iter().zip(acks) {
        let a = ack.await.unwrap();
        out.push((e.clone(), a.partition, a.offset));
    }
    out
}

/// What the workload implies: per (user, window start) and per session id, the event count
/// (duplicates dropped; flush users left out).
#[derive(Debug, Default)]
struct Expected {
    windows: BTreeMap<String, u64>,
    sessions: BTreeMap<String, u64>,
}

impl Expected {
    fn of<'a>(events: impl IntoIterator<Item = &'a Event>) -> Self {
        let mut seen = BTreeSet::new();
        let mut times: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
        let mut x = Self::default();
        for e in events {
            if e.user.starts_with(FLUSH_PREFIX) || !seen.insert((&e.user, &e.id)) {
                continue;
            }
            let start = e.t.div_euclid(WINDOW_MS) * WINDOW_MS;
            *x.windows.entry(format!("{}|{start}", e.user)).or_default() += 1;
            times.entry(&e.user).or_default().push(e.t);
        }
        for (user, mut ts) in times {
            ts.sort_unstable();
            let mut start = ts[0];
            let mut count = 0;
            for (i, t) in ts.iter().enumerate() {
                if i > 0 && t - ts[i - 1] > GAP_MS {
                    let id = pulse_processor::session::Sessions::session_id(user, start);
                    x.sessions.insert(id, count);
                    start = *t;
                    count = 0;
                }
                count += 1;
            }
            let id = pulse_processor::session::Sessions::session_id(user, start);
            x.sessions.insert(id, count);
        }
        x
    }
}

trait Aggregate: prost::Message + Default + Clone + PartialEq + std::fmt::Debug {
    fn version(&self) -> u64;
    fn is_final(&self) -> bool;
    fn user(&self) -> &str;
    fn summary(&self) -> String;
}

impl Aggregate for UserWindowActivity {
    fn version(&self) -> u64 {
        self.version
    }
    fn is_final(&self) -> bool {
        self.r#final
    }
    fn user(&self) -> &str {
        &self.user_id
    }
    fn summary(&self) -> String {
        format!(
            "events {} page_views {} revenue {:?} first {} last {} version {:#x} final {}",
            self.event_count,
            self.page_views,
            self.revenue
                .iter()
                .map(|r| (r.currency.as_str(), r.amount_micros))
                .collect::<Vec<_>>(),
            self.first_event_ms,
            self.last_event_ms,
            self.version,
            self.r#final
        )
    }
}

impl Aggregate for Session {
    fn version(&self) -> u64 {
        self.version
    }
    fn is_final(&self) -> bool {
        self.r#final
    }
    fn user(&self) -> &str {
        &self.user_id
    }
    fn summary(&self) -> String {
        format!(
            "user {} start {} end {} events {} pages {} merged {:?} version {:#x} final {}",
            self.user_id,
            self.start_ms,
            self.end_ms,
            self.event_count,
            self.page_count,
            self.merged_session_ids,
            self.version,
            self.r#final
        )
    }
}

/// The highest-version record per key of an output topic, read from its beginning.
struct Latest<T> {
    consumer: KafkaConsumer,
    best: BTreeMap<String, T>,
    records: usize,
}

impl<T: Aggregate> Latest<T> {
    fn new(topic: &str) -> Self {
        let consumer = pulse_tests::reader("processor-recovery-test", "reader", topic);
        Self {
            consumer,
            best: BTreeMap::new(),
            records: 0,
        }
    }

    /// Reads until `done` holds; false if `deadline` passes first (the caller reports what
    /// is missing).
    async fn until(&mut self, deadline: Instant, done: impl Fn(&Self) -> bool) -> bool {
        // Each look reads one record (waiting for it up to the deadline); no pause between.
        let looks = Deadline::at(deadline).every(Duration::ZERO);
        poll_until(looks, async || {
            if done(self) {
                return Ok(());
            }
            let Ok(m) = tokio::time::timeout_at(deadline, self.consumer.recv()).await else {
                return Err(());
            };
            let m = m.unwrap();
            let key = String::from_utf8(m.key().unwrap().to_vec()).unwrap();
            let v = T::decode(wire::unframe(m.payload().unwrap()).unwrap().payload).unwrap();
            self.records += 1;
            if self
                .best
                .get(&key)
                .is_none_or(|b| b.version() < v.version())
            {
                self.best.insert(key, v);
            }
            if done(self) { Ok(()) } else { Err(()) }
        })
        .await
        .is_ok()
    }

    /// Whether every key of `want` has a final record.
    fn all_final<V>(&self, want: &BTreeMap<String, V>) -> bool {
        want.keys()
            .all(|k| self.best.get(k).is_some_and(|v| v.is_final()))
    }

    /// The keys of `want` without a final record.
    fn missing<V>(&self, want: &BTreeMap<String, V>) -> Vec<String> {
        want.keys()
            .filter(|k| !self.best.get(*k).is_some_and(|v| v.is_final()))
            .cloned()
            .collect()
    }

    /// The highest-version records, flush users left out.
    fn workload(&self) -> BTreeMap<String, T> {
        self.best
            .iter()
            .filter(|(_, v)| !v.user().starts_with(FLUSH_PREFIX))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

/// The records of a one-partition late topic, per user: how many, and one event's time
/// with the processor's reason.
async fn late_events(topic: &str) -> BTreeMap<String, (usize, String)> {
    let c = pulse_tests::reader("processor-recovery-test", "late-reader", topic);
    let (lo, hi) = c
        .raw()
        .fetch_watermarks(topic, 0, Duration::from_secs(10))
        .unwrap();
    let mut out: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for _ in lo..hi {
        let m = tokio::time::timeout(WAIT, c.recv()).await.unwrap().unwrap();
        let e = ev::Event::decode(wire::unframe(m.payload().unwrap()).unwrap().payload).unwrap();
        let reason = m
            .headers()
            .and_then(|h| headers::get_str(h, headers::ERROR_DETAIL))
            .unwrap_or_default()
            .to_owned();
        let user = e.key.unwrap().user_id;
        let entry = out.entry(user).or_default();
        entry.0 += 1;
        if entry.1.is_empty() {
            entry.1 = format!("{} (partition {}): {reason}", e.event_id, m.partition());
        }
    }
    out
}

/// Outputs of one run, read to the point where every expected final is present (or the
/// deadline passed).
struct Outputs {
    name: &'static str,
    topics: Topics,
    activity: Latest<UserWindowActivity>,
    sessions: Latest<Session>,
}

impl Outputs {
    fn new(name: &'static str, topics: &Topics) -> Self {
        Self {
            name,
            topics: topics.clone(),
            activity: Latest::new(&topics.activity),
            sessions: Latest::new(&topics.sessions),
        }
    }

    /// Reads until every expected window and session has a final record; false on timeout.
    async fn wait_all_final(&mut self, x: &Expected, deadline: Instant) -> bool {
        let (a, s) = tokio::join!(
            self.activity.until(deadline, |a| a.all_final(&x.windows)),
            self.sessions.until(deadline, |s| s.all_final(&x.sessions))
        );
        a && s
    }

    /// Reads until every window of `keys` has a record (early or final).
    async fn wait_windows(&mut self, keys: &BTreeSet<String>) -> bool {
        let deadline = Instant::now() + WAIT;
        self.activity
            .until(deadline, |a| keys.iter().all(|k| a.best.contains_key(k)))
            .await
    }

    /// What is wrong with this run's results against the workload: missing finals, wrong
    /// event counts, records on the late topic.
    async fn problems(&self, x: &Expected) -> Vec<String> {
        let mut p = Vec::new();
        let n = self.name;
        let missing = self.activity.missing(&x.windows);
        if !missing.is_empty() {
            p.push(format!(
                "{n}: {} windows without a final: {missing:?}",
                missing.len()
            ));
        }
        let missing = self.sessions.missing(&x.sessions);
        if !missing.is_empty() {
            p.push(format!(
                "{n}: {} sessions without a final: {missing:?}",
                missing.len()
            ));
        }
        for (k, want) in &x.windows {
            if let Some(a) = self.activity.best.get(k).filter(|a| a.r#final)
                && a.event_count != *want
            {
                p.push(format!(
                    "{n}: window {k} counts {} events, the workload has {want}",
                    a.event_count
                ));
            }
        }
        for (k, want) in &x.sessions {
            if let Some(s) = self.sessions.best.get(k).filter(|s| s.r#final)
                && s.event_count != *want
            {
                p.push(format!(
                    "{n}: session {k} counts {} events, the workload has {want}",
                    s.event_count
                ));
            }
        }
        let late = late_events(&self.topics.late).await;
        if !late.is_empty() {
            p.push(format!(
                "{n}: {} workload events went to the late topic:",
                late.values().map(|(c, _)| c).sum::<usize>()
            ));
            for (user, (c, example)) in late {
                p.push(format!("{n}:   {c} of {user}, e.g. {example}"));
            }
        }
        p
    }
}

/// Drops early (non-final) sessions that a final session lists in `merged_session_ids`:
/// consumers retire those rows (README, Processor). Whether such an early result was emitted
/// at all depends on emission timing, so it is not compared.
fn retire_merged(sessions: BTreeMap<String, Session>) -> BTreeMap<String, Session> {
    let merged: BTreeSet<String> = sessions
        .values()
        .filter(|s| s.r#final)
        .flat_map(|s| s.merged_session_ids.iter().cloned())
        .collect();
    sessions
        .into_iter()
        .filter(|(id, s)| s.r#final || !merged.contains(id))
        .collect()
}

/// Per key, the highest-version record of `got` against `want`'s (whole messages).
fn diff<T: Aggregate>(
    what: &str,
    got: &BTreeMap<String, T>,
    want: &BTreeMap<String, T>,
) -> Vec<String> {
    let keys: BTreeSet<&String> = got.keys().chain(want.keys()).collect();
    let mut out = Vec::new();
    for k in keys {
        match (got.get(k), want.get(k)) {
            (Some(g), Some(w)) if g != w => out.push(format!(
                "{what} {k}: got {} / reference {}",
                g.summary(),
                w.summary()
            )),
            (Some(g), None) => out.push(format!("{what} {k}: extra, got {}", g.summary())),
            (None, Some(w)) => out.push(format!("{what} {k}: missing, reference {}", w.summary())),
            _ => {}
        }
    }
    out
}

/// Fails with every difference between `run` and `reference` (and what is wrong with either
/// against the workload).
async fn assert_same(
    run: &Outputs,
    reference: &Outputs,
    x: &Expected,
    acks: &[(Event, i32, i64)],
    context: &str,
) {
    let mut report = Vec::new();
    report.extend(reference.problems(x).await);
    report.extend(run.problems(x).await);
    report.extend(diff(
        "window",
        &run.activity.workload(),
        &reference.activity.workload(),
    ));
    report.extend(diff(
        "session",
        &retire_merged(run.sessions.workload()),
        &retire_merged(reference.sessions.workload()),
    ));
    if report.is_empty() {
        return;
    }
    let mut users: BTreeMap<&str, BTreeSet<i32>> = BTreeMap::new();
    for (e, p, _) in acks {
        users.entry(&e.user).or_default().insert(*p);
    }
    let mut msg = format!(
        "{} differences between the {} run and the uninterrupted reference ({context}); \
         partitions of users: {users:?}\n",
        report.len(),
        run.name
    );
    for line in report.iter().take(40) {
        writeln!(msg, "  {line}").unwrap();
    }
    if report.len() > 40 {
        writeln!(msg, "  … and {} more", report.len() - 40).unwrap();
    }
    panic!("{msg}");
}

/// Starts the real binary with the run's topics, configured by flags and environment;
/// stdout and stderr go to `log`.
fn spawn_binary(t: &Topics, registry: &Registry, group: &str, log: &Path) -> tokio::process::Child {
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    tokio::process::Command::new(binary("pulse-processor"))
        .args(t.flags())
        .env("PULSE_KAFKA_BROKERS", pulse_tests::kafka().brokers)
        .env(
            "PULSE_SCHEMA_REGISTRY_URL",
            format!("http://{}", registry.addr),
        )
        .env("PULSE_PROCESSOR_GROUP_ID", group)
        // Tansu 0.6 leaves a group stuck (the survivor gets no partitions) when the killed
        // member's session expires while the new one joins; as a static member the
        // restarted process takes over the killed one's membership at once.
        .env(
            "PULSE_KAFKA_OPTIONS",
            format!("group.instance.id={group}-member"),
        )
        .env("PULSE_ADMIN_ADDR", format!("127.0.0.1:{}", free_port()))
        .env("PULSE_LOG_FORMAT", "text")
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

fn base_time() -> i64 {
    let two_hours_ago = pulse_processor::run::now_ms() - 2 * 3_600_000;
    two_hours_ago.div_euclid(60_000) * 60_000
}

/// The records the previous release (checkpoint format 2) wrote for `cp` as generation
/// `generation`, keys after `prefix`: its encoder, kept verbatim — parts of at most 256 KiB
/// of sessions in slot `generation % 2`, then the header with the checkpoint's scalars,
/// its generation and number of parts.
fn format_2_records(
    prefix: &str,
    partition: i32,
    generation: u64,
    cp: &pulse_processor::engine::Checkpoint,
) -> Vec<(String, Vec<u8>)> {
    #[derive(serde::Serialize, Default)]
    struct Part {
        generation: u64,
        open_sessions: BTreeMap<String, i64>,
        continued_sessions: BTreeSet<String>,
    }
    #[derive(serde::Serialize)]
    struct Header {
        #[serde(flatten)]
        checkpoint: pulse_processor::engine::Checkpoint,
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
        checkpoint: pulse_processor::engine::Checkpoint {
            open_sessions: BTreeMap::new(),
            continued_sessions: BTreeSet::new(),
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
                format!("{prefix}{partition}|{}|{i}", generation % 2),
                serde_json::to_vec(part).unwrap(),
            )
        })
        .collect();
    out.push((
        format!("{prefix}{partition}"),
        serde_json::to_vec(&header).unwrap(),
    ));
    out
}

/// Replaces the checkpoints of `group` on `t`'s checkpoint topic by the same checkpoints in
/// the previous release's format (as if it had written them before an upgrade). Returns
/// how many partitions had one and their open sessions.
async fn rewrite_checkpoints_as_format_2(t: &Topics, events: &str, group: &str) -> (usize, usize) {
    let store = pulse_processor::checkpoint::CheckpointStore {
        topic: t.checkpoints.clone(),
        group: group.to_owned(),
        input_topic: events.to_owned(),
        kafka: pulse_tests::kafka(),
        generations: Default::default(),
    };
    let read = store.read_all(Duration::from_secs(30)).await.unwrap();
    let producer = KafkaProducer::new(&pulse_tests::kafka(), "test-format-2").unwrap();
    let prefix = format!("{group}|{events}|");
    for (p, cp) in &read {
        for (key, value) in format_2_records(&prefix, *p, 1_000_001, cp) {
            let rec = OutRecord::new(&t.checkpoints, Some(key.into_bytes()), value);
            producer.send(rec, Duration::from_secs(30)).await.unwrap();
        }
    }
    let back = store.read_all(Duration::from_secs(30)).await.unwrap();
    assert_eq!(
        back, read,
        "the format-2 records read back as the same checkpoints"
    );
    (
        read.len(),
        read.values().map(|c| c.open_sessions.len()).sum(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn final_aggregates_after_a_sigkill_and_restart_equal_an_uninterrupted_run() {
    sigkill_and_restart("killed", false).await;
}

/// The upgrade rule: a changed checkpoint format gets a test that starts from the old one.
/// The killed processor's checkpoints are rewritten in the previous release's format
/// (format 2: header + parts, no deltas) before the restart, which must continue from them
/// exactly, then write its own (incremental) checkpoints on top.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_from_checkpoints_of_the_previous_format_equals_an_uninterrupted_run() {
    sigkill_and_restart("upgraded", true).await;
}

async fn sigkill_and_restart(name: &str, rewrite_as_format_2: bool) {
    let logs = TempDir::new("processor-recovery");
    let events_topic = pulse_tests::unique("events");
    let run = Topics::outputs_of(&events_topic, name);
    let reference = Topics::outputs_of(&events_topic, "reference");
    let (registry, _topics) = setup(&events_topic, 2, &[&run, &reference]).await;
    let base = base_time();
    let events = workload(base);
    let (first, rest) = events.split_at(events.len() / 2);
    let mut out = Outputs::new("killed and restarted", &run);
    let mut reference_out = Outputs::new("reference", &reference);

    // The uninterrupted reference consumes the events as they are produced; it has seen
    // data on both partitions before the workload arrives.
    let reference_group = pulse_tests::unique("reference");
    let reference_instance =
        Instance::start(&config(&reference, &registry, &reference_group)).await;
    reference_instance
        .wait_assigned("reference", &BTreeSet::from([0, 1]))
        .await;
    let mut acks = produce_to_every_partition(&events_topic, 2, "warm-", base).await;
    let warm = window_keys(acks.iter().map(|a| &a.0));
    assert!(
        reference_out.wait_windows(&warm).await,
        "the reference did not process the warm-up events"
    );

    let first_acks = produce(&events_topic, first).await;
    let partitions: BTreeSet<i32> = first_acks.iter().map(|a| a.1).collect();
    assert_eq!(
        partitions,
        BTreeSet::from([0, 1]),
        "the workload uses both partitions"
    );
    acks.extend(first_acks);

    let group = pulse_tests::unique(name);
    let log1 = logs.path().join("processor-1.log");
    let mut child = spawn_binary(&run, &registry, &group, &log1);
    // Mid-stream: some windows are final (their offsets may be committed), others open.
    let started = out
        .activity
        .until(Instant::now() + WAIT, |a| {
            a.best.values().any(|v| v.r#final)
        })
        .await;
    assert!(
        started,
        "the first processor produced no final result; see {}",
        log1.display()
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the first processor exited; see {}",
        log1.display()
    );
    child.kill().await.unwrap(); // SIGKILL: no flush, no final commit
    eprintln!(
        "killed the first processor ({}) after {} activity records",
        child.wait().await.unwrap(),
        out.activity.records
    );

    if rewrite_as_format_2 {
        let (partitions, sessions) =
            rewrite_checkpoints_as_format_2(&run, &events_topic, &group).await;
        eprintln!("rewrote {partitions} checkpoints ({sessions} open sessions) in format 2");
        assert!(partitions > 0, "the killed processor wrote no checkpoint");
    }
    acks.extend(produce(&events_topic, rest).await);
    let last = events.iter().map(|e| e.t).max().unwrap();
    acks.extend(produce_to_every_partition(&events_topic, 2, FLUSH_PREFIX, last + 600_000).await);
    let x = Expected::of(acks.iter().map(|a| &a.0));

    let log2 = logs.path().join("processor-2.log");
    let mut child = spawn_binary(&run, &registry, &group, &log2);
    let deadline = Instant::now() + WAIT;
    let (complete, reference_complete) = tokio::join!(
        out.wait_all_final(&x, deadline),
        reference_out.wait_all_final(&x, deadline)
    );
    eprintln!(
        "restarted run complete: {complete}, reference complete: {reference_complete}; \
         {} windows, {} sessions expected",
        x.windows.len(),
        x.sessions.len()
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "the restarted processor exited; see {}",
        log2.display()
    );
    assert_same(&out, &reference_out, &x, &acks, "SIGKILL and restart").await;

    child.kill().await.unwrap();
    reference_instance.stop().await;
    registry.stop().await.unwrap();
    drop(logs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_share_the_partitions_and_a_forced_rebalance_loses_nothing() {
    let events_topic = pulse_tests::unique("events");
    let run = Topics::outputs_of(&events_topic, "shared");
    let reference = Topics::outputs_of(&events_topic, "reference");
    let (registry, _topics) = setup(&events_topic, 4, &[&run, &reference]).await;
    let base = base_time();
    let events = workload(base);
    let third = events.len() / 3;
    let (part1, part2, part3) = (
        &events[..third],
        &events[third..2 * third],
        &events[2 * third..],
    );
    let all: BTreeSet<i32> = (0..4).collect();
    let mut out = Outputs::new("two-instance", &run);
    let mut reference_out = Outputs::new("reference", &reference);

    // The reference and instance A consume the events as they are produced; both have
    // seen data on every partition before the workload arrives.
    let reference_instance = Instance::start(&config(
        &reference,
        &registry,
        &pulse_tests::unique("reference"),
    ))
    .await;
    let group = pulse_tests::unique("shared");
    let a = Instance::start(&config(&run, &registry, &group)).await;
    reference_instance.wait_assigned("reference", &all).await;
    a.wait_assigned("instance A", &all).await;
    let mut acks = produce_to_every_partition(&events_topic, 4, "warm-", base).await;
    let warm = window_keys(acks.iter().map(|a| &a.0));
    assert!(
        reference_out.wait_windows(&warm).await,
        "the reference did not process the warm-up"
    );
    assert!(
        out.wait_windows(&warm).await,
        "instance A did not process the warm-up"
    );

    acks.extend(produce(&events_topic, part1).await);
    let some_final = out
        .activity
        .until(Instant::now() + WAIT, |o| {
            o.best
                .values()
                .any(|v| v.r#final && !v.user_id.starts_with("warm-"))
        })
        .await;
    assert!(some_final, "instance A produced no final result");

    // B joins: the group rebalances and the instances share the 4 partitions.
    let b = Instance::start(&config(&run, &registry, &group)).await;
    wait_until(
        Deadline::after(WAIT).every(POLL),
        "a 2 + 2 assignment of A and B",
        async || match (a.assigned(), b.assigned()) {
            (pa, pb) if pa.len() == 2 && pb.len() == 2 => Ok(()),
            (pa, pb) => Err(format!("A {pa:?}, B {pb:?}")),
        },
    )
    .await;
    eprintln!("shared: A {:?}, B {:?}", a.assigned(), b.assigned());

    // Both process part 2: every window of it shows up (early or final).
    acks.extend(produce(&events_topic, part2).await);
    assert!(
        out.wait_windows(&window_keys(part2)).await,
        "the two instances did not process part 2"
    );

    // A leaves (it emits and commits first): B gets every partition.
    a.stop().await;
    b.wait_assigned("instance B", &all).await;

    acks.extend(produce(&events_topic, part3).await);
    let last = events.iter().map(|e| e.t).max().unwrap();
    acks.extend(produce_to_every_partition(&events_topic, 4, FLUSH_PREFIX, last + 600_000).await);
    let x = Expected::of(acks.iter().map(|a| &a.0));

    let deadline = Instant::now() + WAIT;
    let (complete, reference_complete) = tokio::join!(
        out.wait_all_final(&x, deadline),
        reference_out.wait_all_final(&x, deadline)
    );
    eprintln!(
        "two-instance run complete: {complete}, reference complete: {reference_complete}; \
         {} windows, {} sessions expected",
        x.windows.len(),
        x.sessions.len()
    );
    assert_same(&out, &reference_out, &x, &acks, "B joins, then A leaves").await;

    b.stop().await;
    reference_instance.stop().await;
    registry.stop().await.unwrap();
}

/// Upgrades: the window settings' earlier env names (per service) still configure the
/// binaries, and earlier names that disagree are refused at start naming the new one.
#[test]
fn window_settings_read_the_earlier_env_names_and_refuse_disagreeing_ones() {
    let help = |bin: &str, env: &[(&str, &str)]| {
        let out = std::process::Command::new(binary(bin))
            .arg("--help")
            .envs(env.iter().copied())
            .output()
            .unwrap();
        assert!(out.status.success(), "{bin} --help failed");
        String::from_utf8(out.stdout).unwrap()
    };
    let processor = help("pulse-processor", &[("PULSE_PROCESSOR_WINDOW_MS", "30000")]);
    assert!(
        processor.contains("PULSE_WINDOW_MS") && processor.contains("[default: 30000]"),
        "{processor}"
    );
    let query = help(
        "pulse-query-api",
        &[("PULSE_QUERY_ALLOWED_LATENESS_MS", "5000")],
    );
    assert!(
        query.contains("PULSE_ALLOWED_LATENESS_MS") && query.contains("[default: 5000]"),
        "{query}"
    );

    let out = std::process::Command::new(binary("pulse-processor"))
        .env("PULSE_PROCESSOR_WINDOW_MS", "60000")
        .env("PULSE_QUERY_WINDOW_MS", "30000")
        .env("PULSE_ADMIN_ADDR", "127.0.0.1:0")
        .env("PULSE_KAFKA_BROKERS", "127.0.0.1:1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with disagreeing windows");
    assert!(
        stderr.contains("PULSE_WINDOW_MS") && stderr.contains("disagree"),
        "{stderr}"
    );
}
