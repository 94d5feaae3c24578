//! The shadow processor against the real broker and ClickHouse: a live processor and
//! writer, and beside them two shadows (`pulse-processor --shadow`, `pulse-writer
//! --shadow`) reading the same events topic — one with the live settings, one with a
//! shorter session gap — over a seeded workload whose answer the test computes.
//! `pulsectl shadow diff` finds the identical shadow equal on every metric (with non-zero
//! counts), and the other different in exactly the sessions of the windows the gap
//! changes; `pulsectl shadow discard` drops the shadow's tables and groups.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use clap::Parser as _;
use prost::Message as _;
use pulse_contracts::{headers, topics as names, wire};
use pulse_platform::kafka::{KafkaProducer, OutRecord, TopicSpec};
use pulsectl::shadow::{DiffReport, ShadowCommand};
use rdkafka::message::OwnedHeaders;
use tokio_util::sync::CancellationToken;

use crate::support::child_process::binary;
use crate::support::cleanup;
use crate::support::registry;
use crate::support::{events, wait_until};

const WINDOW_MS: i64 = 10_000;
/// The live session gap, and the shadow `gap`'s.
const GAP_MS: i64 = 20_000;
const SHADOW_GAP_MS: i64 = 5_000;
const PARTITIONS: i32 = 2;
const WAIT: Duration = Duration::from_secs(60);

/// One event: id, user, event time, purchase (currency, micros).
#[derive(Debug, Clone)]
struct Event {
    id: String,
    user: String,
    t: i64,
    purchase: Option<(&'static str, i64)>,
}

/// xorshift64*, seeded: the same workload every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    }
}

/// Event times span this much after `base`.
const SPAN_MS: i64 = 200_000;

/// 6 users over 200 s from `base`, events mostly 1–4 s apart (within both gaps); about one
/// step in twelve is a pause of 25–35 s (longer than both gaps: a new session on both
/// sides), and users u1 and u4 each have one pause of 8–12 s at their 20th event (between
/// the gaps: a new session only in the shadow). One event in five is a purchase. Sorted
/// by event time (no lateness involved).
fn workload(base: i64) -> Vec<Event> {
    let mut rng = Rng(0x5ad0_0001_c0ff_ee42);
    let mut out = Vec::new();
    for u in 0..6 {
        let mut t = base + rng.below(3_000) as i64;
        let mut i = 0;
        while t < base + SPAN_MS {
            let purchase = (rng.below(5) == 0).then(|| {
                (
                    if rng.below(2) == 0 { "EUR" } else { "USD" },
                    1_000_000 + rng.below(9_000_000) as i64,
                )
            });
            out.push(Event {
                id: format!("u{u}-e{i}"),
                user: format!("u{u}"),
                t,
                purchase,
            });
            t += if (u == 1 || u == 4) && i == 20 {
                8_000 + rng.below(4_000) as i64
            } else if rng.below(12) == 0 {
                25_000 + rng.below(10_000) as i64
            } else {
                1_000 + rng.below(3_000) as i64
            };
            i += 1;
        }
    }
    out.sort_by_key(|e| (e.t, e.id.clone()));
    out
}

/// Per user, the sessions of `events` with `gap`: (start, end, event count).
fn sessions(events: &[Event], gap: i64) -> BTreeSet<(String, i64, i64, u64)> {
    let mut times: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for e in events {
        times.entry(&e.user).or_default().push(e.t);
    }
    let mut out = BTreeSet::new();
    for (user, mut ts) in times {
        ts.sort_unstable();
        let (mut start, mut count) = (ts[0], 0);
        for (i, t) in ts.iter().enumerate() {
            if i > 0 && t - ts[i - 1] > gap {
                out.insert((user.to_owned(), start, ts[i - 1], count));
                (start, count) = (*t, 0);
            }
            count += 1;
        }
        out.insert((user.to_owned(), start, ts[ts.len() - 1], count));
    }
    out
}

/// The windows whose sessions (by start) differ between the two gaps.
fn session_windows_that_differ(events: &[Event]) -> BTreeSet<i64> {
    let (a, b) = (sessions(events, GAP_MS), sessions(events, SHADOW_GAP_MS));
    a.symmetric_difference(&b)
        .map(|(_, start, _, _)| start.div_euclid(WINDOW_MS) * WINDOW_MS)
        .collect()
}

async fn produce(topic: &str, events: &[Event]) {
    let p = KafkaProducer::new(&pulse_tests::kafka(), "shadow-test").unwrap();
    let mut acks = Vec::new();
    for e in events {
        let sample = events::event(&e.id, &e.user, e.t);
        let sample = match e.purchase {
            Some((currency, micros)) => sample.purchase(currency, micros),
            None => sample.page("/home"),
        };
        let h = headers::with_str(OwnedHeaders::new(), headers::EVENT_ID, &e.id);
        let h = headers::with_str(h, headers::INGEST_TS, &(e.t + 250).to_string());
        let rec = OutRecord::new(
            topic,
            Some(e.user.clone().into_bytes()),
            wire::frame(1, &[0], &sample.build().encode_to_vec()),
        )
        .with_headers(h);
        acks.push(p.enqueue_with_wait(rec, WAIT).await.unwrap());
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// The live topics of this test (outputs unique; shadows derive theirs from them).
struct Topics {
    events: String,
    activity: String,
    sessions: String,
    late: String,
    checkpoints: String,
    dlq: String,
}

impl Topics {
    fn new() -> Self {
        let u = |k: &str| pulse_tests::unique(&format!("shadow_{k}"));
        Self {
            events: u("events"),
            activity: u("activity"),
            sessions: u("sessions"),
            late: u("late"),
            checkpoints: u("checkpoints"),
            dlq: u("dlq"),
        }
    }
}

/// A service loop running in this process until stopped.
struct Running {
    stop: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), String>>,
}

impl Running {
    async fn stop(self) {
        self.stop.cancel();
        tokio::time::timeout(WAIT, self.task)
            .await
            .expect("a loop did not stop in time")
            .unwrap()
            .unwrap();
    }
}

/// A processor with the session gap `gap` and the flags `extra`.
async fn processor(t: &Topics, registry: &str, group: &str, gap: i64, extra: &[&str]) -> Running {
    let mut args: Vec<String> = [
        "pulse-processor",
        "--kafka-brokers",
        &pulse_tests::kafka().brokers,
        "--schema-registry-url",
        registry,
        "--group-id",
        group,
        "--events-topic",
        &t.events,
        "--user-activity-topic",
        &t.activity,
        "--sessions-topic",
        &t.sessions,
        "--late-topic",
        &t.late,
        "--checkpoint-topic",
        &t.checkpoints,
        "--window-ms",
        &WINDOW_MS.to_string(),
        "--allowed-lateness-ms",
        "2000",
        "--max-out-of-orderness-ms",
        "1000",
        "--idle-timeout-ms",
        "600000",
        "--emit-interval-ms",
        "100",
        "--session-gap-ms",
        &gap.to_string(),
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let cfg = pulse_processor::Config::parse_from(args);
    let p = pulse_processor::build(&cfg).await.unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { p.run(stop).await.map_err(|e| e.to_string()) }
    });
    Running { stop, task }
}

async fn writer(t: &Topics, db: &str, group: &str, extra: &[&str]) -> Running {
    let ch = pulse_tests::clickhouse();
    let mut args: Vec<String> = [
        "pulse-writer",
        "--kafka-brokers",
        &pulse_tests::kafka().brokers,
        "--clickhouse-url",
        &ch.url,
        "--clickhouse-database",
        db,
        "--group-id",
        group,
        "--batch-max-age-ms",
        "200",
        "--events-topic",
        &t.events,
        "--user-activity-topic",
        &t.activity,
        "--sessions-topic",
        &t.sessions,
        "--dlq-topic",
        &t.dlq,
    ]
    .map(str::to_owned)
    .to_vec();
    args.extend(extra.iter().map(|s| (*s).to_owned()));
    let cfg = pulse_writer::Config::parse_from(args);
    let sink = pulse_writer::build_clickhouse(&cfg).await.unwrap();
    let stop = CancellationToken::new();
    let task = tokio::spawn({
        let stop = stop.clone();
        async move { sink.run(stop).await.map_err(|e| e.to_string()) }
    });
    Running { stop, task }
}

fn pulsectl_args(args: &[&str]) -> Vec<String> {
    std::iter::once("pulsectl")
        .chain(args.iter().copied())
        .map(str::to_owned)
        .collect()
}

fn shadow_command(args: &[&str]) -> ShadowCommand {
    match pulsectl::Cli::parse_from(pulsectl_args(args)).command {
        pulsectl::Command::Shadow { command } => command,
        other => panic!("not a shadow command: {other:?}"),
    }
}

/// `pulsectl shadow diff` flags for `shadow` over `[from, to)`.
fn diff_flags(shadow: &str, db: &str, from: i64, to: i64) -> Vec<String> {
    [
        "shadow",
        "diff",
        "--shadow",
        shadow,
        "--from",
        &from.to_string(),
        "--to",
        &to.to_string(),
        "--window-ms",
        &WINDOW_MS.to_string(),
        "--clickhouse-url",
        &pulse_tests::clickhouse().url,
        "--clickhouse-database",
        db,
    ]
    .map(str::to_owned)
    .to_vec()
}

async fn diff(shadow: &str, db: &str, from: i64, to: i64) -> DiffReport {
    diff_with(shadow, db, from, to, &[]).await
}

/// [`diff`] with further flags.
async fn diff_with(shadow: &str, db: &str, from: i64, to: i64, extra: &[&str]) -> DiffReport {
    let mut flags = diff_flags(shadow, db, from, to);
    flags.extend(extra.iter().map(|f| (*f).to_owned()));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let ShadowCommand::Diff(args) = shadow_command(&flags) else {
        panic!("not diff")
    };
    pulsectl::shadow::diff(&args).await.unwrap()
}

/// Runs the `pulsectl` binary; its exit code and stdout.
async fn run_pulsectl(args: &[String]) -> (Option<i32>, String) {
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(binary("pulsectl"))
            .args(args)
            .output(),
    )
    .await
    .expect("pulsectl did not finish in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    (out.status.code(), format!("{stdout}\n{stderr}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shadow_with_live_settings_diffs_to_zero_and_a_shorter_gap_changes_only_sessions() {
    let kafka = pulse_tests::kafka();
    let t = Topics::new();
    let database = cleanup::Database::unique("pulse_shadow");
    let db = database.database.clone();
    let mut specs = vec![TopicSpec::new(t.events.as_str(), PARTITIONS)];
    for name in [&t.activity, &t.sessions, &t.late, &t.dlq] {
        specs.push(TopicSpec::new(name.as_str(), 1));
    }
    let mut guard = cleanup::Topics::create(&specs).await;
    guard.add(&t.checkpoints);
    for shadow in ["same", "gap"] {
        for live in [&t.activity, &t.sessions, &t.late, &t.checkpoints, &t.dlq] {
            guard.add(names::shadow_topic(live, shadow));
        }
    }
    let registry = registry::start(&kafka).await;
    let registry_url = format!("http://{}", registry.addr);
    registry::register_aggregates(&registry, &[&t.activity, &t.sessions]).await;
    for shadow in ["same", "gap"] {
        let ShadowCommand::Schemas(args) = shadow_command(&[
            "shadow",
            "schemas",
            "--shadow",
            shadow,
            "--schema-registry-url",
            &registry_url,
            "--user-activity-topic",
            &t.activity,
            "--sessions-topic",
            &t.sessions,
        ]) else {
            panic!("not schemas")
        };
        let ids = pulsectl::shadow::register_schemas(&args).await.unwrap();
        assert_eq!(ids.len(), 2, "{ids:?}");
    }

    // The live pair first (its writer applies the migrations), then the shadows.
    let group = pulse_tests::unique("shadow_proc");
    let wgroup = pulse_tests::unique("shadow_writer");
    let mut loops = vec![
        writer(&t, &db, &wgroup, &[]).await,
        writer(&t, &db, &wgroup, &["--shadow", "same"]).await,
        writer(&t, &db, &wgroup, &["--shadow", "gap"]).await,
        processor(&t, &registry_url, &group, GAP_MS, &[]).await,
        processor(&t, &registry_url, &group, GAP_MS, &["--shadow", "same"]).await,
        processor(
            &t,
            &registry_url,
            &group,
            SHADOW_GAP_MS,
            &["--shadow", "gap"],
        )
        .await,
    ];

    // Two hours in the past on a window boundary: nothing is future-dated.
    let now = pulse_platform::clock::now_ms();
    let base = (now - 7_200_000).div_euclid(WINDOW_MS) * WINDOW_MS;
    let work = workload(base);
    let (from, to) = (base, base + SPAN_MS + WINDOW_MS);
    produce(&t.events, &work).await;
    // Far later events on every partition close every window and session of the range.
    let flush: Vec<Event> = (0..20)
        .map(|i| Event {
            id: format!("flush-{i}"),
            user: format!("flush-{i}"),
            t: base + 900_000,
            purchase: None,
        })
        .collect();
    produce(&t.events, &flush).await;

    // The answer the workload implies.
    let windows: BTreeSet<i64> = work
        .iter()
        .map(|e| e.t.div_euclid(WINDOW_MS) * WINDOW_MS)
        .collect();
    let live_sessions = sessions(&work, GAP_MS).len() as f64;
    let gap_sessions = sessions(&work, SHADOW_GAP_MS).len() as f64;
    let affected = session_windows_that_differ(&work);
    let session_windows: BTreeSet<i64> = sessions(&work, GAP_MS)
        .iter()
        .map(|(_, start, _, _)| start.div_euclid(WINDOW_MS) * WINDOW_MS)
        .collect();
    assert!(
        !affected.is_empty() && gap_sessions > live_sessions,
        "the workload must have pauses between the two gaps"
    );
    assert!(
        session_windows.difference(&affected).count() >= 2,
        "the workload must have windows whose sessions the gap does not change: {session_windows:?} {affected:?}"
    );

    // Wait until every window and session of the range is final and stored on all sides.
    for (shadow, shadow_sessions) in [("same", live_sessions), ("gap", gap_sessions)] {
        let what = format!("shadow {shadow}: every window of the range final on both sides");
        wait_until(WAIT, what, async || {
            let r = diff(shadow, &db, from, to).await;
            let done = r.open_windows.is_empty()
                && r.summary.get("page_views").map(|s| s.windows) == Some(windows.len())
                && r.summary
                    .get("sessions")
                    .map(|s| (s.live_total, s.shadow_total))
                    == Some((live_sessions, shadow_sessions));
            if done { Ok(()) } else { Err(r.render(5)) }
        })
        .await;
    }

    // Identical settings: equal on every metric, with non-zero counts.
    let same = diff("same", &db, from, to).await;
    assert!(same.differing.is_empty(), "{}", same.render(20));
    let users: BTreeMap<i64, BTreeSet<&str>> = work.iter().fold(BTreeMap::new(), |mut m, e| {
        m.entry(e.t.div_euclid(WINDOW_MS) * WINDOW_MS)
            .or_default()
            .insert(e.user.as_str());
        m
    });
    let active: usize = users.values().map(BTreeSet::len).sum();
    let page_views = work.iter().filter(|e| e.purchase.is_none()).count();
    let revenue = |c: &str| -> i64 {
        work.iter()
            .filter_map(|e| e.purchase.filter(|(cur, _)| *cur == c).map(|(_, m)| m))
            .sum()
    };
    let s = &same.summary;
    assert_eq!(s["active_users"].live_total, active as f64);
    assert_eq!(s["page_views"].live_total, page_views as f64);
    assert_eq!(s["revenue[EUR]"].live_total, revenue("EUR") as f64);
    assert_eq!(s["revenue[USD]"].live_total, revenue("USD") as f64);
    assert!(revenue("EUR") > 0 && revenue("USD") > 0 && page_views > 0);
    assert_eq!(s["sessions"].live_total, live_sessions);
    for (metric, m) in s {
        assert_eq!(m.live_total, m.shadow_total, "{metric}");
        assert!(m.live_total > 0.0, "{metric}");
    }

    // A shorter gap: only the sessions of the affected windows differ.
    let gapped = diff("gap", &db, from, to).await;
    let text = gapped.render(50);
    eprintln!("shadow same:\n{}\nshadow gap:\n{text}", same.render(5));
    let differing: BTreeSet<(&str, i64)> = gapped
        .differing
        .iter()
        .map(|d| (d.metric.as_str(), d.window_start_ms))
        .collect();
    let want: BTreeSet<(&str, i64)> = affected.iter().map(|w| ("sessions", *w)).collect();
    assert_eq!(differing, want, "{text}");
    for (metric, m) in &gapped.summary {
        if metric != "sessions" {
            assert_eq!(m.differing, 0, "{metric}: {text}");
            assert_eq!(m.live_total, m.shadow_total, "{metric}");
        }
    }

    // A tolerance of 50 % counts only the windows whose session count changed by more
    // (a window whose sessions changed but not their number is then equal).
    let per_window = |gap: i64| -> BTreeMap<i64, f64> {
        sessions(&work, gap)
            .iter()
            .fold(BTreeMap::new(), |mut m, (_, start, _, _)| {
                *m.entry(start.div_euclid(WINDOW_MS) * WINDOW_MS)
                    .or_default() += 1.0;
                m
            })
    };
    let (live_counts, gap_counts) = (per_window(GAP_MS), per_window(SHADOW_GAP_MS));
    let want: BTreeSet<i64> = affected
        .iter()
        .copied()
        .filter(|w| {
            let (l, s) = (
                live_counts.get(w).copied().unwrap_or(0.0),
                gap_counts.get(w).copied().unwrap_or(0.0),
            );
            (l - s).abs() > 0.5 * l.max(s)
        })
        .collect();
    let tolerant = diff_with("gap", &db, from, to, &["--tolerance", "0.5"]).await;
    let got: BTreeSet<i64> = tolerant
        .differing
        .iter()
        .map(|d| d.window_start_ms)
        .collect();
    assert_eq!(got, want, "{}", tolerant.render(0));
    assert!(got.len() < affected.len(), "{}", tolerant.render(0));

    // The binary: exit 0 and "no differences" for the identical shadow; 1 naming the
    // sessions windows for the other.
    let (code, out) = run_pulsectl(&diff_flags("same", &db, from, to)).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("no differences"), "{out}");
    let (code, out) = run_pulsectl(&diff_flags("gap", &db, from, to)).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("differing windows:") && out.contains("sessions"),
        "{out}"
    );
    assert!(!out.contains("  page_views "), "{out}");

    for l in loops.drain(..) {
        l.stop().await;
    }
    // Nothing of the shadows reached the live topics' consumers: the live sessions count
    // above is the live gap's, and the shadow tables exist beside the live ones.
    let (code, out) = run_pulsectl(
        &[
            "shadow",
            "discard",
            "--shadow",
            "gap",
            "--keep-topics",
            "--processor-group-id",
            &group,
            "--writer-group-id",
            &wgroup,
            "--user-activity-topic",
            &t.activity,
            "--sessions-topic",
            &t.sessions,
            "--late-topic",
            &t.late,
            "--checkpoint-topic",
            &t.checkpoints,
            "--dlq-topic",
            &t.dlq,
            "--kafka-brokers",
            &kafka.brokers,
            "--clickhouse-url",
            &pulse_tests::clickhouse().url,
            "--clickhouse-database",
            &db,
        ]
        .map(str::to_owned),
    )
    .await;
    assert_eq!(code, Some(0), "{out}");
    eprintln!("discard:\n{out}");
    for g in [&group, &wgroup] {
        let deleted = format!("deleted consumer group {}", names::shadow_group(g, "gap"));
        assert!(out.contains(&deleted), "{out}");
    }
    assert!(
        out.contains(&names::shadow_topic(&t.sessions, "gap")),
        "{out}"
    );
    let tables: Vec<String> = database
        .client()
        .query("SELECT name FROM system.tables WHERE database = ? ORDER BY name")
        .bind(&db)
        .fetch_all()
        .await
        .unwrap();
    assert!(
        !tables.iter().any(|t| t.ends_with("_shadow_gap")),
        "{tables:?}"
    );
    assert!(
        tables.contains(&"sessions_shadow_same".to_owned()),
        "{tables:?}"
    );
    registry.stop().await.unwrap();
}

/// Starts `bin` with `args` and `envs`, its admin server on a free port and its output in
/// `log`; waits until its `/metrics` has a series of `metric` and returns the scrape.
async fn scrape_child(
    bin: &str,
    args: &[&str],
    envs: &[(&str, &str)],
    log: &std::path::Path,
    metric: &str,
) -> String {
    let admin = format!("127.0.0.1:{}", crate::support::child_process::free_port());
    let out = std::fs::File::create(log).unwrap();
    let err = out.try_clone().unwrap();
    let mut child = tokio::process::Command::new(binary(bin))
        .args(args)
        .envs(envs.iter().copied())
        .env("PULSE_KAFKA_BROKERS", pulse_tests::kafka().brokers)
        .env("PULSE_ADMIN_ADDR", &admin)
        .env("PULSE_LOG_FORMAT", "text")
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let what = format!("{bin}'s /metrics to have {metric}; see {}", log.display());
    let text = wait_until(WAIT, what, async || {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{bin} exited ({status}); see {}", log.display());
        }
        let r = reqwest::get(format!("http://{admin}/metrics")).await;
        match r {
            Ok(r) => {
                let text = r.text().await.unwrap_or_default();
                if text.lines().any(|l| l.starts_with(metric)) {
                    Ok(text)
                } else {
                    Err("no series yet".to_owned())
                }
            }
            Err(e) => Err(e.to_string()),
        }
    })
    .await;
    child.kill().await.unwrap();
    text
}

/// Every sample line of `metric` in `text`.
fn samples<'a>(text: &'a str, metric: &'a str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(metric)).collect()
}

#[tokio::test]
async fn the_shadow_binaries_label_their_metrics_as_shadows() {
    let t = Topics::new();
    let mut specs = vec![TopicSpec::new(t.events.as_str(), PARTITIONS)];
    for name in [&t.activity, &t.sessions, &t.late, &t.dlq] {
        specs.push(TopicSpec::new(name.as_str(), 1));
    }
    let mut guard = cleanup::Topics::create(&specs).await;
    for live in [&t.activity, &t.sessions, &t.late, &t.checkpoints, &t.dlq] {
        guard.add(names::shadow_topic(live, "m"));
    }
    let database = cleanup::Database::unique("pulse_shadow_m");
    let dir = cleanup::TempDir::new("shadow-metrics");
    let topic_flags = [
        "--events-topic",
        &t.events,
        "--user-activity-topic",
        &t.activity,
        "--sessions-topic",
        &t.sessions,
    ];
    // The processor from the environment (PULSE_PROCESSOR_SHADOW), the writer from its flag.
    let mut args = topic_flags.to_vec();
    args.extend([
        "--late-topic",
        &t.late,
        "--checkpoint-topic",
        &t.checkpoints,
        "--allow-short-retention",
        "--group-id",
        "shadow-metrics",
    ]);
    let text = scrape_child(
        "pulse-processor",
        &args,
        &[("PULSE_PROCESSOR_SHADOW", "m")],
        &dir.path().join("processor.log"),
        "pulse_processor_events_total",
    )
    .await;
    let lines = samples(&text, "pulse_processor_events_total");
    assert!(
        lines
            .iter()
            .all(|l| l.contains(r#"service="processor-shadow""#)),
        "{lines:?}"
    );
    let mut args = topic_flags.to_vec();
    let url = pulse_tests::clickhouse().url;
    args.extend([
        "--shadow",
        "m",
        "--dlq-topic",
        &t.dlq,
        "--clickhouse-url",
        &url,
        "--clickhouse-database",
        &database.database,
        "--group-id",
        "shadow-metrics",
    ]);
    let text = scrape_child(
        "pulse-writer",
        &args,
        &[],
        &dir.path().join("writer.log"),
        "pulse_writer_retries_total",
    )
    .await;
    let lines = samples(&text, "pulse_writer_");
    assert!(!lines.is_empty());
    assert!(
        lines
            .iter()
            .all(|l| l.contains(r#"service="writer-shadow""#)),
        "{lines:?}"
    );
}
