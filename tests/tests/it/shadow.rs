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
use pulse_platform::audit::{AuditRecord, Outcome};
use pulse_platform::kafka::{KafkaProducer, OutRecord, TopicSpec};
use pulsectl::shadow::{DiffReport, ShadowCommand};
use rdkafka::message::OwnedHeaders;

use crate::support::child_process::binary;
use crate::support::cleanup;
use crate::support::pipeline::{self, Rules};
pub(crate) use crate::support::pipeline::{Running, Topics};
use crate::support::registry;
use crate::support::{events, wait_until};

pub(crate) const WINDOW_MS: i64 = 10_000;
/// The live session gap, and the shadow `gap`'s.
pub(crate) const GAP_MS: i64 = 20_000;
const SHADOW_GAP_MS: i64 = 5_000;
pub(crate) const PARTITIONS: i32 = 2;
pub(crate) const WAIT: Duration = Duration::from_secs(60);

/// One event: id, user, event time, purchase (currency, micros).
#[derive(Debug, Clone)]
pub(crate) struct Event {
    pub(crate) id: String,
    pub(crate) user: String,
    pub(crate) t: i64,
    pub(crate) purchase: Option<(&'static str, i64)>,
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
pub(crate) const SPAN_MS: i64 = 200_000;

/// 6 users over 200 s from `base`, events mostly 1–4 s apart (within both gaps); about one
/// step in twelve is a pause of 25–35 s (longer than both gaps: a new session on both
/// sides), and users u1 and u4 each have one pause of 8–12 s at their 20th event (between
/// the gaps: a new session only in the shadow). One event in five is a purchase. Sorted
/// by event time (no lateness involved).
pub(crate) fn workload(base: i64) -> Vec<Event> {
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
pub(crate) fn sessions(events: &[Event], gap: i64) -> BTreeSet<(String, i64, i64, u64)> {
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

/// One page view at `t` for each of `n` users `<name>-<i>` (spread over the partitions: far
/// later ones move every partition's watermark).
fn one_each(name: &str, n: usize, t: i64) -> Vec<Event> {
    (0..n)
        .map(|i| Event {
            id: format!("{name}-{i}"),
            user: format!("{name}-{i}"),
            t,
            purchase: None,
        })
        .collect()
}

pub(crate) async fn produce(topic: &str, events: &[Event]) {
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

/// The shadow tests' topics, named `shadow_*` (shadows derive theirs from them).
impl Topics {
    pub(crate) fn new() -> Self {
        Self::unique("shadow")
    }
}

/// The rules of the shadow tests' processors, with the session gap `gap`.
fn rules(gap: i64) -> Rules {
    Rules {
        window_ms: WINDOW_MS,
        allowed_lateness_ms: 2_000,
        max_out_of_orderness_ms: 1_000,
        session_gap_ms: gap,
    }
}

/// A processor with the session gap `gap` and the flags `extra`.
pub(crate) async fn processor(
    t: &Topics,
    registry: &str,
    group: &str,
    gap: i64,
    extra: &[&str],
) -> Running {
    let mut flags = vec!["--idle-timeout-ms", "600000"];
    flags.extend_from_slice(extra);
    let topics = t.processor_flags();
    pipeline::start_processor(&pipeline::processor_config(
        registry,
        group,
        rules(gap),
        &topics,
        &flags,
    ))
    .await
}

pub(crate) async fn writer(t: &Topics, db: &str, group: &str, extra: &[&str]) -> Running {
    pipeline::start_writer(&pipeline::writer_config(
        db,
        group,
        &t.writer_flags(),
        extra,
    ))
    .await
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

pub(crate) async fn diff(shadow: &str, db: &str, from: i64, to: i64) -> DiffReport {
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

/// A shadow test's topics and registry.
struct Setup {
    t: Topics,
    /// Deletes the live and the shadows' topics.
    guard: cleanup::Topics,
    registry: registry::Registry,
    registry_url: String,
}

/// The topics (the events topic with `partitions`, the outputs with one; the `shadows`'
/// topics deleted with them) and a registry holding the aggregates schema under the live
/// output topics and, registered by `pulsectl shadow schemas`, the `shadows`' ones.
async fn setup(shadows: &[&str], partitions: i32) -> Setup {
    let t = Topics::new();
    let mut specs = vec![TopicSpec::new(t.events.as_str(), partitions)];
    for name in [&t.activity, &t.sessions, &t.late, &t.dlq] {
        specs.push(TopicSpec::new(name.as_str(), 1));
    }
    let mut guard = cleanup::Topics::create(&specs).await;
    guard.add(&t.checkpoints);
    for shadow in shadows {
        for live in [&t.activity, &t.sessions, &t.late, &t.checkpoints, &t.dlq] {
            guard.add(names::shadow_topic(live, shadow));
        }
    }
    let registry = registry::start(&pulse_tests::kafka()).await;
    let registry_url = format!("http://{}", registry.addr);
    registry::register_aggregates(&registry, &[&t.activity, &t.sessions]).await;
    for shadow in shadows {
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
    Setup {
        t,
        guard,
        registry,
        registry_url,
    }
}

/// The flags of `shadow discard` (and `promote finish`) for `shadow` of the pipeline `t`
/// with the live (processor, writer) `groups`, keeping its topics.
fn discard_flags_of(
    shadow: &str,
    t: &Topics,
    groups: (&str, &str),
    registry_url: &str,
    db: &str,
) -> Vec<String> {
    [
        "--shadow",
        shadow,
        "--keep-topics",
        "--processor-group-id",
        groups.0,
        "--writer-group-id",
        groups.1,
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
        "--schema-registry-url",
        registry_url,
        "--clickhouse-url",
        &pulse_tests::clickhouse().url,
        "--clickhouse-database",
        db,
    ]
    .map(str::to_owned)
    .to_vec()
}

/// `shadow promote finish` on the windows of `[from, to)` (the discard flags follow).
fn finish_flags_of(from: i64, to: i64) -> Vec<String> {
    [
        "shadow",
        "promote",
        "finish",
        "--from",
        &from.to_string(),
        "--to",
        &to.to_string(),
        "--window-ms",
        &WINDOW_MS.to_string(),
    ]
    .map(str::to_owned)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shadow_with_live_settings_diffs_to_zero_and_a_shorter_gap_changes_only_sessions() {
    let Setup {
        t,
        mut guard,
        registry,
        registry_url,
    } = setup(&["same", "gap"], PARTITIONS).await;
    let database = cleanup::Database::unique("pulse_shadow");
    let db = database.database.clone();

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
    produce(&t.events, &one_each("flush", 20, base + 900_000)).await;

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
    let audit_topic = pulse_tests::unique("shadow_audit");
    guard.add(&audit_topic);
    let mut discard_flags = vec!["shadow".to_owned(), "discard".to_owned()];
    discard_flags.extend(discard_flags_of(
        "gap",
        &t,
        (&group, &wgroup),
        &registry_url,
        &db,
    ));
    discard_flags.extend(audit_flags(&audit_topic, "ops-carol"));
    let subject = |live: &str, shadow: &str| format!("{}-value", names::shadow_topic(live, shadow));
    let before = subjects_with_deleted(&registry_url).await;
    for live in [&t.activity, &t.sessions] {
        assert!(before.contains(&subject(live, "gap")), "{before:?}");
    }
    let (code, out) = run_pulsectl(&discard_flags).await;
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
    // The shadow's subjects are gone for good (not even soft-deleted); the other
    // shadow's stay; a subject never registered is no error.
    for live in [&t.activity, &t.sessions] {
        let deleted = format!("deleted subject {}", subject(live, "gap"));
        assert!(out.contains(&deleted), "{out}");
    }
    let missing = format!("subject {} does not exist", subject(&t.late, "gap"));
    assert!(out.contains(&missing), "{out}");
    let after = subjects_with_deleted(&registry_url).await;
    assert!(
        !after.iter().any(|s| s.contains(".shadow.gap")),
        "{after:?}"
    );
    for live in [&t.activity, &t.sessions] {
        assert!(after.contains(&subject(live, "same")), "{after:?}");
    }
    // Discarding again finds nothing, and is no error.
    let (code, again) = run_pulsectl(&discard_flags).await;
    assert_eq!(code, Some(0), "{again}");
    assert!(!again.contains("deleted subject"), "{again}");
    // Both discards are in the audit trail: who, what, which shadow, what was removed.
    let records = shadow_audit(&audit_topic).await;
    assert_eq!(records.len(), 2, "{records:#?}");
    for r in &records {
        assert_eq!(
            (
                r.action.as_str(),
                r.actor.as_str(),
                r.target.as_str(),
                r.outcome,
                r.service.as_str()
            ),
            (
                "shadow.discard",
                "ops-carol",
                "gap",
                Outcome::Ok,
                "pulsectl"
            ),
            "{r:#?}"
        );
    }
    let first = &records[0].detail;
    for part in [
        format!("table {db}.sessions_shadow_gap"),
        format!("consumer group {}", names::shadow_group(&group, "gap")),
        format!("subject {}", subject(&t.sessions, "gap")),
        format!("kept topic {}", names::shadow_topic(&t.activity, "gap")),
    ] {
        assert!(first.contains(&part), "{part}: {first}");
    }
    assert!(records[1].detail.contains("not found"), "{:?}", records[1]);
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
        // One test broker: topics it creates (a writer's `pulse.audit.v1`) get one replica.
        .env("PULSE_KAFKA_REPLICATION_FACTOR", "1")
        .env("PULSE_KAFKA_MIN_INSYNC_REPLICAS", "1")
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

/// The start of the window `t` falls in.
fn window_of(t: i64) -> i64 {
    t.div_euclid(WINDOW_MS) * WINDOW_MS
}

/// `user`'s events from `from` to `to`, 1–4 s apart, with one pause of 8–12 s (between the
/// two gaps) after `pause_at`; one in five a purchase.
fn run_of(rng: &mut Rng, user: &str, from: i64, to: i64, pause_at: Option<i64>) -> Vec<Event> {
    let (mut t, mut out, mut paused) = (from + rng.below(1_000) as i64, Vec::new(), false);
    while t < to {
        let purchase = (rng.below(5) == 0).then(|| {
            (
                if rng.below(2) == 0 { "EUR" } else { "USD" },
                1_000_000 + rng.below(9_000_000) as i64,
            )
        });
        out.push(Event {
            id: format!("{user}-e{}", out.len()),
            user: user.to_owned(),
            t,
            purchase,
        });
        t += match pause_at {
            Some(p) if t >= p && !paused => {
                paused = true;
                8_000 + rng.below(4_000) as i64
            }
            _ => 1_000 + rng.below(3_000) as i64,
        };
    }
    out
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct StoredSession {
    user_id: String,
    session_id: String,
    start_ms: i64,
    end_ms: i64,
    events: u64,
    is_final: u8,
    merged: Vec<String>,
}

/// The current sessions of `table` starting in `[from, to)` (latest version of each id,
/// superseded ids left out): (user, start, end, event count, final).
async fn stored_sessions(
    db: &cleanup::Database,
    table: &str,
    from: i64,
    to: i64,
) -> BTreeSet<(String, i64, i64, u64, bool)> {
    let sql = format!(
        "SELECT user_id, session_id, any(start_ms) AS start_ms, argMax(end_ms, version) AS end_ms, \
         argMax(event_count, version) AS events, argMax(is_final, version) AS is_final, \
         argMax(merged_session_ids, version) AS merged FROM {table} \
         GROUP BY user_id, session_id"
    );
    let rows: Vec<StoredSession> = db.client().query(&sql).fetch_all().await.unwrap();
    let superseded: BTreeSet<(String, String)> = rows
        .iter()
        .flat_map(|r| {
            r.merged
                .iter()
                .filter(|m| **m != r.session_id)
                .map(|m| (r.user_id.clone(), m.clone()))
        })
        .collect();
    rows.into_iter()
        .filter(|r| (from..to).contains(&r.start_ms))
        .filter(|r| !superseded.contains(&(r.user_id.clone(), r.session_id.clone())))
        .map(|r| (r.user_id, r.start_ms, r.end_ms, r.events, r.is_final == 1))
        .collect()
}

/// A promotion under a changed session gap: live runs gap A (20 s), a shadow gap B (5 s).
/// `promote check` refuses an open range and an exact diff, passes with a tolerance; the
/// live processor is then replaced by gap B on the live group, topics and checkpoints while
/// events keep coming; afterwards the live sessions are exactly A's (from the workload, in
/// the test) for those closed before the switch and B's for the rest — each event in one
/// session, no window missing or counted twice — and `promote finish` refuses a range
/// before the switch, then passes on one after it and discards the shadow.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_promotion_switches_live_to_the_new_rules_without_a_gap_or_a_double_count() {
    let Setup {
        t,
        mut guard,
        registry,
        registry_url,
    } = setup(&["b"], PARTITIONS).await;
    let database = cleanup::Database::unique("pulse_promote");
    let db = database.database.clone();

    let Pipelines {
        group,
        wgroup,
        live_writer,
        shadow_writer,
        live: live_a,
        shadow: shadow_b,
    } = pipelines(&t, &db, &registry_url, "b").await;

    // The workload: users done before the switch (b*), users active across it (c*: their
    // pause between the gaps comes after it), users starting after it (a*).
    let now = pulse_platform::clock::now_ms();
    let base = window_of(now - 7_200_000);
    let switch = base + 200_000;
    let end = base + 340_000;
    let mut rng = Rng(0x9a0d_0002_beef_cafe);
    let mut work = Vec::new();
    for (user, from, to, pause) in [
        ("b0", 0, 150, Some(40)),
        ("b1", 0, 150, None),
        ("b2", 20, 140, Some(90)),
        ("b3", 5, 120, Some(60)),
        ("c0", 100, 330, Some(250)),
        ("c1", 120, 330, Some(270)),
        ("a0", 215, 330, Some(260)),
        ("a1", 220, 320, None),
    ] {
        work.extend(run_of(
            &mut rng,
            user,
            base + from * 1_000,
            base + to * 1_000,
            pause.map(|p| base + p * 1_000),
        ));
    }
    // Ticks just before the switch on many users (so every partition's watermark gets there).
    let ticks = one_each("tick", 10, switch - 500);
    work.sort_by_key(|e| (e.t, e.id.clone()));
    let (before, after): (Vec<Event>, Vec<Event>) =
        work.iter().cloned().partition(|e| e.t < switch);
    let mut all = work.clone();
    all.extend(ticks.iter().cloned());

    produce(&t.events, &before).await;
    produce(&t.events, &ticks).await;
    // Live (gap A) has read everything before the switch once the window ending 8 s before
    // it is final there (the ticks' watermark closes it); the shadow likewise.
    let settled = window_of(switch) - WINDOW_MS;
    wait_window_final(&database, "b", settled - WINDOW_MS).await;

    // `promote check` before the switch. A range with open windows: refused, not caught up.
    let audit_topic = pulse_tests::unique("promote_audit");
    guard.add(&audit_topic);
    let check_flags = |from: i64, to: i64, extra: &[&str]| -> Vec<String> {
        let mut f = check_flags_of("b", &db, from, to);
        f.extend(extra.iter().map(|s| (*s).to_owned()));
        f.extend(audit_flags(&audit_topic, "ops-dave"));
        f
    };
    let (code, out) =
        run_pulsectl(&check_flags(base, switch + 60_000, &["--tolerance", "1"])).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("REFUSED") && out.contains("not final on both sides"),
        "{out}"
    );
    // The closed range before the switch, exact: refused, the session windows differ.
    let closed_to = settled - WINDOW_MS;
    let (code, out) = run_pulsectl(&check_flags(base, closed_to, &[])).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("differ beyond the tolerance"), "{out}");
    assert!(!out.contains("not final on both sides"), "{out}");
    // With a tolerance that accepts the change: may be promoted, and the steps are printed.
    let (code, out) = run_pulsectl(&check_flags(base, closed_to, &["--tolerance", "1"])).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("may be promoted") && out.contains("without --shadow"),
        "{out}"
    );

    // The switch: live stops, the new rules start on the live group, topics and
    // checkpoints (no --shadow); events keep coming meanwhile.
    let producing = tokio::spawn({
        let (topic, after) = (t.events.clone(), after.clone());
        async move { produce(&topic, &after[..after.len() / 2]).await }
    });
    live_a.stop().await;
    let live_b = processor(&t, &registry_url, &group, SHADOW_GAP_MS, &[]).await;
    producing.await.unwrap();
    produce(&t.events, &after[after.len() / 2..]).await;
    produce(&t.events, &one_each("flush", 20, base + 900_000)).await;

    // The answers, computed here. B: the shadow's (gap B over every event). Live: per user,
    // A's sessions closed before the switch (their last event more than gap A + allowed
    // lateness before the ticks' watermark), then gap B over the user's remaining events
    // (the session open at the switch is re-cut by the new rules from its first event).
    let shadow_want: BTreeSet<_> = sessions(&all, SHADOW_GAP_MS)
        .into_iter()
        .map(|(u, s, e, n)| (u, s, e, n, true))
        .collect();
    let watermark_at_switch = switch - 500 - 1_000;
    let mut live_want = BTreeSet::new();
    let users: BTreeSet<&str> = all.iter().map(|e| e.user.as_str()).collect();
    for user in users {
        let mine: Vec<Event> = all.iter().filter(|e| e.user == user).cloned().collect();
        let a = sessions(&mine, GAP_MS);
        let closed: Vec<_> = a
            .iter()
            .filter(|(_, _, end, _)| end + GAP_MS + 2_000 < watermark_at_switch)
            .cloned()
            .collect();
        let rest_from = closed
            .iter()
            .map(|(_, _, end, _)| end + 1)
            .max()
            .unwrap_or(i64::MIN);
        let rest: Vec<Event> = mine.into_iter().filter(|e| e.t >= rest_from).collect();
        live_want.extend(closed.into_iter().map(|(u, s, e, n)| (u, s, e, n, true)));
        if !rest.is_empty() {
            live_want.extend(
                sessions(&rest, SHADOW_GAP_MS)
                    .into_iter()
                    .map(|(u, s, e, n)| (u, s, e, n, true)),
            );
        }
    }
    assert_ne!(
        live_want, shadow_want,
        "the switch must leave A's sessions before it"
    );
    let changed_after: Vec<_> = sessions(&all, GAP_MS)
        .symmetric_difference(&sessions(&all, SHADOW_GAP_MS))
        .filter(|(_, s, _, _)| *s >= switch)
        .cloned()
        .collect();
    assert!(
        !changed_after.is_empty(),
        "gap B must change sessions after the switch"
    );

    let range_end = window_of(end) + WINDOW_MS;
    let activity_windows: BTreeSet<i64> = all.iter().map(|e| window_of(e.t)).collect();
    let shadow_table = pulse_storage::migrate::shadow_table("sessions", "b");
    wait_until(
        WAIT,
        "every window and session of the range final on both sides",
        async || {
            let (live, shadow) = (
                stored_sessions(&database, "sessions", base, range_end).await,
                stored_sessions(&database, &shadow_table, base, range_end).await,
            );
            let r = diff("b", &db, base, range_end).await;
            let done = shadow == shadow_want
                && live.len() >= live_want.len()
                && live.iter().all(|s| s.4)
                && r.summary.get("page_views").map(|s| s.windows) == Some(activity_windows.len());
            if done {
                Ok(())
            } else {
                Err(format!("live {live:?}\n{}", r.render(5)))
            }
        },
    )
    .await;

    // Live: exactly A's sessions before the switch and B's after — every event in one
    // session (nothing counted twice, nothing missing).
    let live = stored_sessions(&database, "sessions", base, range_end).await;
    assert_eq!(live, live_want, "live sessions after the promotion");
    let counted: u64 = live.iter().map(|s| s.3).sum();
    assert_eq!(
        counted,
        all.len() as u64,
        "each event in exactly one live session"
    );
    // Window metrics do not depend on the gap: every window once, equal to the workload's.
    let r = diff("b", &db, base, range_end).await;
    let s = &r.summary;
    let page_views = all.iter().filter(|e| e.purchase.is_none()).count();
    let active: usize = all
        .iter()
        .map(|e| (window_of(e.t), e.user.as_str()))
        .collect::<BTreeSet<_>>()
        .len();
    assert_eq!(s["page_views"].live_total, page_views as f64);
    assert_eq!(s["active_users"].live_total, active as f64);
    for metric in ["page_views", "active_users", "revenue[EUR]", "revenue[USD]"] {
        assert_eq!(s[metric].differing, 0, "{metric}: {}", r.render(10));
    }
    live_b.stop().await;
    shadow_b.stop().await;
    live_writer.stop().await;
    shadow_writer.stop().await;

    // `promote finish`: refused on a range before the switch (live kept A there), passes on
    // the windows after it and discards the shadow.
    let finish_flags = |from: i64| -> Vec<String> {
        let mut f = finish_flags_of(from, range_end);
        f.extend(discard_flags_of(
            "b",
            &t,
            (&group, &wgroup),
            &registry_url,
            &db,
        ));
        f.extend(audit_flags(&audit_topic, "ops-dave"));
        f
    };
    let (code, out) = run_pulsectl(&finish_flags(base)).await;
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("nothing was discarded") && out.contains("sessions"),
        "{out}"
    );
    let (code, out) = run_pulsectl(&finish_flags(window_of(switch) + WINDOW_MS)).await;
    eprintln!("finish:\n{out}");
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("no differences") && out.contains("promotion of shadow b finished"),
        "{out}"
    );
    let tables: Vec<String> = database
        .client()
        .query("SELECT name FROM system.tables WHERE database = ? ORDER BY name")
        .bind(&db)
        .fetch_all()
        .await
        .unwrap();
    assert!(!tables.iter().any(|t| t.contains("_shadow_")), "{tables:?}");
    let subjects = subjects_with_deleted(&registry_url).await;
    assert!(
        !subjects.iter().any(|s| s.contains(".shadow.b-")),
        "{subjects:?}"
    );
    // Every check and finish is in the audit trail, in order, with its range and outcome
    // (a refusal with its reasons).
    let records = shadow_audit(&audit_topic).await;
    let got = outcomes(&records);
    let (check, finish) = ("shadow.promote.check", "shadow.promote.finish");
    assert_eq!(
        got,
        [
            (check, Outcome::Refused),
            (check, Outcome::Refused),
            (check, Outcome::Ok),
            (finish, Outcome::Refused),
            (finish, Outcome::Ok),
        ],
        "{records:#?}"
    );
    for r in &records {
        assert_eq!((r.actor.as_str(), r.target.as_str()), ("ops-dave", "b"));
        assert!(r.detail.starts_with("windows ["), "{r:?}");
    }
    let detail = |i: usize| records[i].detail.as_str();
    assert!(
        detail(0).contains("refused: ") && detail(0).contains("not final on both sides"),
        "{}",
        detail(0)
    );
    assert!(
        detail(1).contains("differ beyond the tolerance"),
        "{}",
        detail(1)
    );
    assert!(detail(2).contains("may be promoted"), "{}", detail(2));
    assert!(detail(3).contains("nothing was discarded"), "{}", detail(3));
    let discarded = format!("subject {}-value", names::shadow_topic(&t.sessions, "b"));
    assert!(
        detail(4).contains("live equals the shadow") && detail(4).contains(&discarded),
        "{}",
        detail(4)
    );
    registry.stop().await.unwrap();
}

/// Issue #21 through a promotion: a session open at the switch that the new rules split.
/// Live runs a 20 s session gap, the shadow `short` 5 s; user p's six views (a 12 s pause
/// after the third) are one open session for live and two for the shadow when the switch
/// comes. After `promote check`, the switch to the 5 s gap on the live group and `promote
/// finish` (docs/operations.md, "Promote"), the live sessions equal the shadow's and the
/// query API's `/v1/sessions` counts exactly the new rules' sessions (p: 3 and 4 views),
/// not also the old rules' early 6-view session beside them.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_session_open_at_a_promotion_is_counted_once_under_the_new_rules() {
    // One partition: every event moves the one watermark.
    let Setup {
        t,
        mut guard,
        registry,
        registry_url,
    } = setup(&["short"], 1).await;
    let database = cleanup::Database::unique("pulse_promote_open");
    let db = database.database.clone();
    let Pipelines {
        group,
        wgroup,
        live_writer,
        shadow_writer,
        live: live_a,
        shadow,
    } = pipelines(&t, &db, &registry_url, "short").await;

    let base = window_of(pulse_platform::clock::now_ms() - 7_200_000);
    let view = |id: &str, user: &str, dt: i64| Event {
        id: id.to_owned(),
        user: user.to_owned(),
        t: base + dt,
        purchase: None,
    };
    // Before the switch: p at 1, 2, 3 s, then 15, 16, 17 s. The watermark (16 s) closes
    // window [0, 10 s) on both sides and the shadow's first session of p (3 views); live's
    // one session of p is open (an early result of 6 views).
    let before: Vec<Event> = [1_000, 2_000, 3_000, 15_000, 16_000, 17_000]
        .iter()
        .enumerate()
        .map(|(i, dt)| view(&format!("p{i}"), "p", *dt))
        .collect();
    produce(&t.events, &before).await;
    let shadow_sessions = pulse_storage::migrate::shadow_table("sessions", "short");
    wait_until(
        WAIT,
        "live: p's open 6-view session; the shadow: p's first session final",
        async || {
            let rows = |table: String| {
                let client = database.client();
                async move {
                    client
                        .query(&format!(
                            "SELECT event_count, is_final FROM {table} WHERE user_id = 'p'"
                        ))
                        .fetch_all::<(u64, u8)>()
                        .await
                        .unwrap_or_default()
                }
            };
            let (live, short) = (
                rows("sessions".to_owned()).await,
                rows(shadow_sessions.clone()).await,
            );
            if live.contains(&(6, 0)) && short.contains(&(3, 1)) {
                Ok(())
            } else {
                Err(format!("live {live:?} shadow {short:?}"))
            }
        },
    )
    .await;

    wait_window_final(&database, "short", base).await;

    // 1. `promote check` on the window closed before the switch: equal, may be promoted
    // (p's sessions there are still open on live, so not compared).
    let audit_topic = pulse_tests::unique("promote_open_audit");
    guard.add(&audit_topic);
    let mut check = check_flags_of("short", &db, base, base + WINDOW_MS);
    check.extend(audit_flags(&audit_topic, "ops-erin"));
    let (code, out) = run_pulsectl(&check).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("may be promoted"), "{out}");

    // 2. The switch: live stops, the 5 s gap starts on the live group, topics and
    // checkpoints. Then p's seventh view (in its second session under 5 s), user a's views
    // in a window after the switch, and a far event that closes everything.
    live_a.stop().await;
    let live_b = processor(&t, &registry_url, &group, SHADOW_GAP_MS, &[]).await;
    let mut after = vec![view("p6", "p", 18_000)];
    after.extend((0..3).map(|i| view(&format!("a{i}"), "a", 40_000 + i * 1_000)));
    produce(&t.events, &after).await;
    produce(&t.events, &[view("z0", "z", 300_000)]).await;
    let mut all = before.clone();
    all.extend(after);
    let range_end = base + 100_000;
    let want: BTreeSet<(String, i64, i64, u64, bool)> = sessions(&all, SHADOW_GAP_MS)
        .into_iter()
        .map(|(u, s, e, n)| (u, s, e, n, true))
        .collect();
    let p_sessions: Vec<u64> = want.iter().filter(|s| s.0 == "p").map(|s| s.3).collect();
    assert_eq!(p_sessions, [3, 4], "the new rules split p's session");
    let stored = wait_until(
        WAIT,
        "live and shadow sessions final, the new rules' ones",
        async || {
            let (live, short) = (
                stored_sessions(&database, "sessions", base, range_end).await,
                stored_sessions(&database, &shadow_sessions, base, range_end).await,
            );
            if live == want && short == want {
                Ok(live)
            } else {
                Err(format!("live {live:?}\nshadow {short:?}"))
            }
        },
    )
    .await;
    let counted: u64 = stored.iter().map(|s| s.3).sum();
    assert_eq!(counted, all.len() as u64, "each event in one live session");
    live_b.stop().await;
    shadow.stop().await;
    live_writer.stop().await;
    shadow_writer.stop().await;

    // 3. `promote finish` on the windows after the switch: live equals the shadow, no live
    // session keeps an early result that outranks its final one; the shadow is discarded.
    let mut finish = finish_flags_of(base + 40_000, range_end);
    finish.extend(discard_flags_of(
        "short",
        &t,
        (&group, &wgroup),
        &registry_url,
        &db,
    ));
    finish.extend(audit_flags(&audit_topic, "ops-erin"));
    let (code, out) = run_pulsectl(&finish).await;
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("promotion of shadow short finished"), "{out}");

    // The query API counts the new rules' sessions once: p's 3 + 4 views in two sessions
    // (before the supersede fix: 3 sessions, or 10 views in 2), then a's.
    let api = pipeline::QueryApi::start(&database, WINDOW_MS).await;
    let expect = |from: i64, to: i64| {
        let mine: Vec<_> = want.iter().filter(|s| (from..to).contains(&s.1)).collect();
        let pages: u64 = mine.iter().map(|s| s.3).sum();
        (mine.len() as u64, pages as f64 / mine.len() as f64)
    };
    assert_eq!(api.sessions(base, base + 30_000).await, (2, 3.5));
    assert_eq!(
        api.sessions(base, base + 30_000).await,
        expect(base, base + 30_000)
    );
    assert_eq!(
        api.sessions(base, range_end).await,
        expect(base, range_end),
        "p's two sessions and a's"
    );
    api.stop().await;
    let records = shadow_audit(&audit_topic).await;
    assert_eq!(
        outcomes(&records),
        [
            ("shadow.promote.check", Outcome::Ok),
            ("shadow.promote.finish", Outcome::Ok)
        ],
        "{records:#?}"
    );
    registry.stop().await.unwrap();
}

/// `shadow promote check` flags for `shadow` over `[from, to)` (the diff's).
fn check_flags_of(shadow: &str, db: &str, from: i64, to: i64) -> Vec<String> {
    let mut f = diff_flags(shadow, db, from, to);
    f[1] = "check".to_owned();
    f.insert(1, "promote".to_owned());
    f
}

/// Waits until the window starting at `window` has final rows in `user_activity` and in
/// the shadow `shadow`'s copy.
async fn wait_window_final(database: &cleanup::Database, shadow: &str, window: i64) {
    for table in [
        "user_activity".to_owned(),
        pulse_storage::migrate::shadow_table("user_activity", shadow),
    ] {
        wait_until(
            WAIT,
            format!("{table}: window {window} final"),
            async || {
                let n: u64 = database
                    .client()
                    .query(&format!(
                        "SELECT count() FROM {table} WHERE window_start_ms = ? AND is_final = 1"
                    ))
                    .bind(window)
                    .fetch_one()
                    .await
                    .map_err(|e| e.to_string())?;
                if n > 0 {
                    Ok(())
                } else {
                    Err("not yet".to_owned())
                }
            },
        )
        .await;
    }
}

/// A promotion's loops: live (gap A) and the shadow (gap B), each a processor and a writer.
struct Pipelines {
    /// The live processor's group (the shadow's derives from it).
    group: String,
    /// The live writer's group.
    wgroup: String,
    live_writer: Running,
    shadow_writer: Running,
    live: Running,
    shadow: Running,
}

/// Starts the writers (live first: it applies the migrations), then live with gap A and
/// the shadow `shadow` with gap B.
async fn pipelines(t: &Topics, db: &str, registry_url: &str, shadow: &str) -> Pipelines {
    let group = pulse_tests::unique(&format!("promote_{shadow}_proc"));
    let wgroup = pulse_tests::unique(&format!("promote_{shadow}_writer"));
    let live_writer = writer(t, db, &wgroup, &[]).await;
    let shadow_writer = writer(t, db, &wgroup, &["--shadow", shadow]).await;
    let live = processor(t, registry_url, &group, GAP_MS, &[]).await;
    let shadow = processor(
        t,
        registry_url,
        &group,
        SHADOW_GAP_MS,
        &["--shadow", shadow],
    )
    .await;
    Pipelines {
        group,
        wgroup,
        live_writer,
        shadow_writer,
        live,
        shadow,
    }
}

/// (action, outcome) of each audit record.
fn outcomes(records: &[AuditRecord]) -> Vec<(&str, Outcome)> {
    records
        .iter()
        .map(|r| (r.action.as_str(), r.outcome))
        .collect()
}

/// The kafka flags of a `pulsectl` command that writes its audit record to `audit_topic`
/// (created for one broker) as `actor`.
fn audit_flags(audit_topic: &str, actor: &str) -> Vec<String> {
    [
        "--audit-topic",
        audit_topic,
        "--actor",
        actor,
        "--kafka-brokers",
        &pulse_tests::kafka().brokers,
        "--kafka-replication-factor",
        "1",
        "--kafka-min-insync-replicas",
        "1",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// `pulsectl audit --json --action shadow` on `topic`: the shadow commands' records.
async fn shadow_audit(topic: &str) -> Vec<AuditRecord> {
    let out = tokio::time::timeout(
        WAIT,
        tokio::process::Command::new(binary("pulsectl"))
            .args([
                "audit",
                "--json",
                "--action",
                "shadow",
                "--audit-topic",
                topic,
                "--kafka-brokers",
                &pulse_tests::kafka().brokers,
            ])
            .env_remove("PULSE_AUDIT_TOPIC")
            .output(),
    )
    .await
    .expect("pulsectl audit did not finish in time")
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "pulsectl audit: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The subjects the registry at `url` holds, soft-deleted ones included.
async fn subjects_with_deleted(url: &str) -> Vec<String> {
    reqwest::get(format!("{url}/subjects?deleted=true"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// `(name, type)` of `table`'s columns.
async fn columns(database: &cleanup::Database, table: &str) -> BTreeSet<(String, String)> {
    database
        .client()
        .query("SELECT name, type FROM system.columns WHERE database = ? AND table = ?")
        .bind(&database.database)
        .bind(table)
        .fetch_all::<(String, String)>()
        .await
        .unwrap()
        .into_iter()
        .collect()
}

/// A shadow's tables made by a writer from before migration 0004 lack `rules_version`:
/// the shadow writer's start-up adds it (as the migration did to the live tables), and the
/// sessions it then writes there carry their rules version.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_shadow_table_made_before_rules_versions_gets_the_column_and_its_rows_carry_it() {
    let t = Topics::new();
    let database = cleanup::Database::unique("pulse_shadow_old");
    let db = database.database.clone();
    let mut guard =
        cleanup::Topics::adopt([&t.events, &t.activity, &t.sessions, &t.dlq].map(String::from));
    for live in [&t.events, &t.activity, &t.sessions, &t.dlq] {
        guard.add(names::shadow_topic(live, "old"));
    }
    pulse_storage::migrate::migrate(&database).await.unwrap();
    // The shape an older shadow writer left: a copy of live before 0004.
    let server = database.server_client();
    for live in pulse_storage::migrate::SHADOW_TABLES {
        let table = pulse_storage::migrate::shadow_table(live, "old");
        for sql in [
            format!("CREATE TABLE {db}.{table} AS {db}.{live}"),
            format!("ALTER TABLE {db}.{table} DROP COLUMN rules_version"),
        ] {
            server.query(&sql).execute().await.unwrap();
        }
        let old = columns(&database, &table).await;
        assert!(!old.iter().any(|(n, _)| n == "rules_version"), "{old:?}");
        assert!(old.len() > 5, "{table}: {old:?}");
    }

    let wgroup = pulse_tests::unique("shadow_old_writer");
    let shadow_writer = writer(&t, &db, &wgroup, &["--shadow", "old"]).await;
    for live in pulse_storage::migrate::SHADOW_TABLES {
        let table = pulse_storage::migrate::shadow_table(live, "old");
        assert_eq!(
            columns(&database, &table).await,
            columns(&database, live).await,
            "{table} has the live table's columns"
        );
    }
    // A session of a shadow processor reaches the upgraded table with its rules version.
    let session = pulse_contracts::pb::aggregates::v1::Session {
        session_id: "s-old-1".into(),
        user_id: "u-old".into(),
        start_ms: 1_000,
        end_ms: 2_000,
        duration_ms: 1_000,
        event_count: 2,
        page_count: 2,
        version: 1,
        r#final: true,
        rules_version: "gap-5s+0123456789ab".into(),
        ..Default::default()
    };
    let p = KafkaProducer::new(&pulse_tests::kafka(), "shadow-old-test").unwrap();
    let rec = OutRecord::new(
        names::shadow_topic(&t.sessions, "old"),
        Some(b"u-old".to_vec()),
        wire::frame(1, &[0], &session.encode_to_vec()),
    );
    p.enqueue_with_wait(rec, WAIT).await.unwrap().await.unwrap();
    let table = pulse_storage::migrate::shadow_table("sessions", "old");
    let rows = wait_until(WAIT, format!("the session in {table}"), async || {
        let rows: Vec<(String, String)> = database
            .client()
            .query(&format!("SELECT session_id, rules_version FROM {table}"))
            .fetch_all()
            .await
            .map_err(|e| e.to_string())?;
        if rows.is_empty() {
            Err("no row yet".to_owned())
        } else {
            Ok(rows)
        }
    })
    .await;
    assert_eq!(
        rows,
        [("s-old-1".to_owned(), "gap-5s+0123456789ab".to_owned())]
    );
    shadow_writer.stop().await;
}
