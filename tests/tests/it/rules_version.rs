//! Processing rules versions against the real broker, registry and ClickHouse 18.16: a
//! processor started with `--rules-version` stamps every window and session it emits, the
//! writer keeps it on every row, and the query API reports the versions of the rows an
//! answer used in its `freshness`; a restart with a changed rule writes a
//! `processor.rules.changed` record (from → to) to the audit topic, an unchanged restart a
//! `processor.rules` one, and rows of each side keep their own version. The aggregates
//! schema registered before `rules_version` existed upgrades under FULL_TRANSITIVE, and a
//! store at migration 0003 gets the column (old rows read `''`), also when an earlier run
//! of migration 0004 stopped halfway.

use std::time::Duration;

use clap::Parser as _;
use prost::Message as _;
use pulse_contracts::{headers, wire};
use pulse_platform::audit::AuditRecord;
use pulse_platform::kafka::{KafkaProducer, OutRecord, TopicSpec};
use pulse_processor::rules;
use pulse_storage::migrate::{MIGRATIONS, migrate, split_statements};
use rdkafka::message::OwnedHeaders;
use serde_json::{Value, json};

use crate::support::cleanup::{self, Database};
use crate::support::pipeline::{self, QueryApi, Rules, Running, Topics};
use crate::support::{events, registry, wait_until};

const WINDOW_MS: i64 = 10_000;
const WAIT: Duration = Duration::from_secs(60);
const NAME: &str = "it-rc1";

/// The audit topic of the test's processor (deleted with its topics).
fn audit_topic(t: &Topics) -> String {
    format!("{}_audit", t.events)
}

fn processor_config(t: &Topics, registry: &str, gap_ms: i64) -> pulse_processor::Config {
    let rules = Rules {
        window_ms: WINDOW_MS,
        allowed_lateness_ms: 0,
        max_out_of_orderness_ms: 0,
        session_gap_ms: gap_ms,
    };
    let audit = audit_topic(t);
    pipeline::processor_config(
        registry,
        &format!("{}-group", t.events),
        rules,
        &t.processor_flags(),
        &[
            "--audit-topic",
            &audit,
            "--idle-timeout-ms",
            "600000",
            "--rules-version",
            NAME,
        ],
    )
}

/// Builds the processor of `cfg`, records its rules in the audit trail as `run` does at
/// start, and runs it.
async fn start_processor(cfg: &pulse_processor::Config) -> (Running, AuditRecord) {
    let p = pulse_processor::build(cfg).await.unwrap();
    let record = pulse_processor::audit_rules(cfg, &p.producer).await;
    (Running::spawn(|stop| p.run(stop)), record)
}

async fn start_writer(t: &Topics, db: &str) -> Running {
    let group = format!("{}-writer", t.events);
    pipeline::start_writer(&pipeline::writer_config(db, &group, &t.writer_flags(), &[])).await
}

/// Page views `(id, user, event time)`, in this order, on the one partition.
async fn produce(topic: &str, events: &[(&str, &str, i64)]) {
    let p = KafkaProducer::new(&pulse_tests::kafka(), "rules-test").unwrap();
    let mut acks = Vec::new();
    for (id, user, t) in events {
        let e = events::event(*id, *user, *t).page("/home").build();
        let h = headers::with_str(OwnedHeaders::new(), headers::EVENT_ID, id);
        let h = headers::with_str(h, headers::INGEST_TS, &(t + 100).to_string());
        let rec = OutRecord::new(
            topic,
            Some(user.as_bytes().to_vec()),
            wire::frame(1, &[0], &e.encode_to_vec()),
        )
        .with_headers(h);
        acks.push(p.enqueue_with_wait(rec, WAIT).await.unwrap());
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// `(window_start_ms, rules_version, is_final)` of the latest version of every window.
async fn windows(db: &Database) -> Vec<(i64, String, u8)> {
    db.client()
        .query(
            "SELECT window_start_ms, rules_version, is_final FROM user_activity FINAL \
             ORDER BY window_start_ms, user_id",
        )
        .fetch_all()
        .await
        .unwrap_or_default()
}

/// The distinct rules versions of all rows of `table` (every emission, not only the latest).
async fn all_versions(db: &Database, table: &str) -> Vec<String> {
    db.client()
        .query(&format!(
            "SELECT DISTINCT rules_version FROM {table} ORDER BY rules_version"
        ))
        .fetch_all()
        .await
        .unwrap()
}

/// The `freshness.rules_versions` of the query API's 200 answer to `path`.
async fn rules_versions(api: &QueryApi, path: &str) -> Value {
    api.get(path).await["freshness"]["rules_versions"].clone()
}

/// A test's topics (deleted when the guard drops) and a registry holding the aggregates
/// schema under the test's output topics.
async fn setup(
    kafka: &pulse_platform::kafka::KafkaConfig,
) -> (Topics, cleanup::Topics, registry::Registry, String) {
    let t = Topics::unique("rules");
    let mut topics = cleanup::Topics::create(
        &[&t.events, &t.activity, &t.sessions, &t.late, &t.dlq]
            .map(|n| TopicSpec::new(n.as_str(), 1)),
    )
    .await;
    topics.add(&t.checkpoints);
    topics.add(audit_topic(&t));
    let registry = registry::start(kafka).await;
    registry::register_aggregates(&registry, &[&t.activity, &t.sessions]).await;
    let registry_url = format!("http://{}", registry.addr);
    (t, topics, registry, registry_url)
}

#[tokio::test]
async fn every_row_and_answer_carries_the_rules_version_and_a_change_is_audited() {
    let kafka = pulse_tests::kafka();
    let (t, topics, registry, registry_url) = setup(&kafka).await;
    let db = Database::unique("pulse_rules");

    // Phase 1: session gap 20 s. Window W0 gets u1's and u2's views; u3's view in W2 moves
    // the watermark (no out-of-orderness, no lateness) past W0 and its sessions.
    let first = processor_config(&t, &registry_url, 20_000);
    let v1 = first.rules_version();
    assert!(v1.starts_with(&format!("{NAME}+")), "{v1}");
    let (processor, record) = start_processor(&first).await;
    assert_eq!(
        (record.action.as_str(), record.target.as_str()),
        (rules::ACTION_RULES, first.group().as_str())
    );
    assert!(record.detail.contains("from=none"), "{}", record.detail);
    let writer = start_writer(&t, &db.database).await;
    let base = (pulse_platform::clock::now_ms() - 600_000).div_euclid(WINDOW_MS) * WINDOW_MS;
    produce(
        &t.events,
        &[
            ("e1", "u1", base + 1_000),
            ("e2", "u2", base + 2_000),
            ("e3", "u1", base + 3_000),
            ("e4", "u3", base + 45_000),
        ],
    )
    .await;
    wait_until(WAIT, "W0 final in ClickHouse, W4 written", async || {
        let w = windows(&db).await;
        let w0_final = w.iter().filter(|r| r.0 == base && r.2 == 1).count() == 2;
        let w4 = w.iter().any(|r| r.0 == base + 40_000);
        if w0_final && w4 { Ok(()) } else { Err(w) }
    })
    .await;
    wait_until(WAIT, "u1's and u2's sessions in ClickHouse", async || {
        let n: u64 = db
            .client()
            .query("SELECT count() FROM sessions FINAL WHERE is_final = 1")
            .fetch_one()
            .await
            .unwrap_or_default();
        if n >= 2 { Ok(()) } else { Err(n) }
    })
    .await;
    assert_eq!(
        all_versions(&db, "user_activity").await,
        std::slice::from_ref(&v1)
    );
    assert_eq!(
        all_versions(&db, "sessions").await,
        std::slice::from_ref(&v1)
    );
    processor.stop().await;

    // Phase 2: the same name with another session gap is another rules version, and the
    // start says so in the audit trail.
    let second = processor_config(&t, &registry_url, 5_000);
    let v2 = second.rules_version();
    assert_ne!(v1, v2);
    assert!(v2.starts_with(&format!("{NAME}+")), "{v2}");
    let (processor, record) = start_processor(&second).await;
    assert_eq!(record.action, rules::ACTION_RULES_CHANGED, "{record:?}");
    assert!(
        record
            .detail
            .contains(&format!("rules_version={v2} from={v1} ")),
        "{}",
        record.detail
    );
    assert!(
        record.detail.contains("session_gap_ms=5000"),
        "{}",
        record.detail
    );
    // Events in W8: written with the new version; W0 keeps the old one (final before).
    produce(
        &t.events,
        &[("e5", "u1", base + 81_000), ("e6", "u2", base + 82_000)],
    )
    .await;
    wait_until(WAIT, "W8 written with the new rules", async || {
        let w = windows(&db).await;
        let w8: Vec<_> = w.iter().filter(|r| r.0 == base + 80_000).collect();
        if w8.len() == 2 && w8.iter().all(|r| r.1 == v2) {
            Ok(())
        } else {
            Err(w)
        }
    })
    .await;
    let w = windows(&db).await;
    assert!(
        w.iter().filter(|r| r.0 == base).all(|r| r.1 == v1),
        "W0 was final under the old rules: {w:?}"
    );
    processor.stop().await;
    writer.stop().await;

    // An unchanged restart is a plain `processor.rules` record with the same version.
    let audit = audit_topic(&t);
    let again = pulse_processor::Config::parse_from([
        "pulse-processor",
        "--kafka-brokers",
        &kafka.brokers,
        "--group-id",
        &second.group(),
        "--audit-topic",
        &audit,
        "--window-ms",
        &WINDOW_MS.to_string(),
        "--allowed-lateness-ms",
        "0",
        "--max-out-of-orderness-ms",
        "0",
        "--session-gap-ms",
        "5000",
        "--rules-version",
        NAME,
        // Not a rule: the version stays.
        "--emit-interval-ms",
        "250",
    ]);
    assert_eq!(again.rules_version(), v2);
    let producer = KafkaProducer::new(&kafka, "rules-test").unwrap();
    let record = pulse_processor::audit_rules(&again, &producer).await;
    assert_eq!(record.action, rules::ACTION_RULES, "{record:?}");
    assert!(
        record.detail.contains(&format!("rules_version={v2} ")),
        "{}",
        record.detail
    );
    assert!(!record.detail.contains("from="), "{}", record.detail);
    // The trail as the audit topic holds it: three starts of this group, in order.
    let cli = pulsectl::Cli::parse_from([
        "pulsectl",
        "audit",
        "--action",
        "processor.rules",
        "--kafka-brokers",
        &kafka.brokers,
    ]);
    let pulsectl::Command::Audit(args) = cli.command else {
        panic!("not the audit command");
    };
    let listed = pulsectl::audit::list(
        &args,
        &audit_topic(&t),
        &pulsectl::progress::Progress::hidden(),
    )
    .await
    .unwrap();
    let trail: Vec<(&str, Option<&str>)> = listed
        .iter()
        .map(|r| (r.action.as_str(), rules::recorded_version(&r.detail)))
        .collect();
    assert_eq!(
        trail,
        [
            (rules::ACTION_RULES, Some(v1.as_str())),
            (rules::ACTION_RULES_CHANGED, Some(v2.as_str())),
            (rules::ACTION_RULES, Some(v2.as_str())),
        ]
    );

    // The query API: each answer reports the versions of the rows it used.
    let api = QueryApi::start(&db, WINDOW_MS).await;
    let range = |from: i64, to: i64| format!("from={from}&to={to}");
    let old = range(base, base + 20_000);
    let new = range(base + 80_000, base + 90_000);
    let all = range(base, base + 120_000);
    assert_eq!(
        rules_versions(&api, &format!("/v1/active_users?{old}&step=1m")).await,
        json!([v1])
    );
    assert_eq!(
        rules_versions(&api, &format!("/v1/active_users?{new}&step=1m")).await,
        json!([v2])
    );
    let mut both = [v1.clone(), v2.clone()];
    both.sort();
    assert_eq!(
        rules_versions(&api, &format!("/v1/active_users?{all}&step=1m")).await,
        json!(both)
    );
    assert_eq!(
        rules_versions(&api, &format!("/v1/sessions?{old}")).await,
        json!([v1])
    );
    assert_eq!(
        rules_versions(&api, &format!("/v1/users/u1?{new}")).await,
        json!([v2])
    );
    assert_eq!(
        rules_versions(&api, &format!("/v1/top_pages?{all}")).await,
        json!(both)
    );
    // No aggregate in the range: no version.
    assert_eq!(
        rules_versions(
            &api,
            &format!("/v1/active_users?{}&step=1m", range(base - 60_000, base))
        )
        .await,
        json!([])
    );
    api.stop().await;
    registry.stop().await.unwrap();
    drop(topics);
}

#[tokio::test]
async fn the_aggregates_schema_from_before_rules_versions_upgrades_in_the_registry() {
    let kafka = pulse_tests::kafka();
    let registry = registry::start(&kafka).await;
    let url = format!("http://{}", registry.addr);
    let topic = pulse_tests::unique("rules_upgrade");
    let client = reqwest::Client::new();
    let r = client
        .put(format!("{url}/config/{topic}-value"))
        .json(&json!({ "compatibility": "FULL_TRANSITIVE" }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let before =
        include_str!("../../../crates/contracts/fixtures/aggregates-v1-before-rules-version.proto");
    assert_eq!(registry::register(&url, &topic, before).await.status(), 200);
    let r = registry::register(&url, &topic, pulse_contracts::schemas::AGGREGATES.source).await;
    let status = r.status();
    assert_eq!(status, 200, "{}", r.text().await.unwrap_or_default());
    registry.stop().await.unwrap();
}

/// A `user_activity` row as writers before migration 0004 wrote it (a few columns; the
/// others take their defaults).
#[derive(Debug, clickhouse::Row, serde::Serialize)]
struct ActivityBefore {
    user_id: String,
    window_start_ms: i64,
    version: u64,
    window_date: u16,
}

#[tokio::test]
async fn a_store_at_migration_3_gets_the_rules_version_column_even_after_a_half_run() {
    let cfg = Database::unique("pulse_rules_upgrade");
    let server = cfg.server_client();
    let db = cfg.database.as_str();
    server
        .query(&format!("CREATE DATABASE {db}"))
        .execute()
        .await
        .unwrap();
    // The store as migrations 1–3 left it, recorded the way `migrate` does.
    for (version, name, sql) in MIGRATIONS.iter().filter(|m| m.0 <= 3) {
        for statement in split_statements(&sql.replace("{database}", db)) {
            server.query(&statement).execute().await.unwrap();
        }
        server
            .query(&format!(
                "INSERT INTO {db}.schema_migrations (version, name, applied_at_ms) VALUES ({version}, '{name}', 0)"
            ))
            .execute()
            .await
            .unwrap();
    }
    let client = cfg.client();
    let mut ins = client
        .insert::<ActivityBefore>("user_activity")
        .await
        .unwrap();
    ins.write(&ActivityBefore {
        user_id: "old".into(),
        window_start_ms: 60_000,
        version: 1,
        window_date: 0,
    })
    .await
    .unwrap();
    ins.end().await.unwrap();
    // A run of migration 0004 that stopped after its first statement (not recorded).
    let v4 = MIGRATIONS.iter().find(|m| m.0 == 4).unwrap();
    let statements = split_statements(&v4.2.replace("{database}", db));
    assert_eq!(statements.len(), 2);
    server.query(&statements[0]).execute().await.unwrap();

    let applied = migrate(&cfg).await.unwrap();
    assert!(applied.contains(&4), "{applied:?}");
    assert!(applied.iter().all(|v| *v > 3), "{applied:?}");
    for table in ["user_activity", "sessions"] {
        let columns: Vec<(String, String, String)> = client
            .query(
                "SELECT name, type, default_expression FROM system.columns \
                 WHERE database = ? AND table = ? AND name = 'rules_version'",
            )
            .bind(db)
            .bind(table)
            .fetch_all()
            .await
            .unwrap();
        assert_eq!(
            columns,
            [("rules_version".into(), "String".into(), "''".into())],
            "{table}"
        );
    }
    // The old row reads '', a current row its version.
    let a = pulse_contracts::pb::aggregates::v1::UserWindowActivity {
        user_id: "new".into(),
        window_start_ms: 60_000,
        version: 2,
        rules_version: "r+0123456789ab".into(),
        ..Default::default()
    };
    let mut ins = client
        .insert::<pulse_storage::rows::ActivityRow>("user_activity")
        .await
        .unwrap();
    ins.write(&pulse_storage::rows::ActivityRow::from_activity(&a, 1))
        .await
        .unwrap();
    ins.end().await.unwrap();
    let rows: Vec<(String, String)> = client
        .query("SELECT user_id, rules_version FROM user_activity FINAL ORDER BY user_id")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(
        rows,
        [
            ("new".to_owned(), "r+0123456789ab".to_owned()),
            ("old".to_owned(), String::new())
        ]
    );
}

/// Issue #21: a shorter session gap at a restart (a promotion, a rollback) splits a
/// session that was open at the switch. Its early result under the old gap (6 events)
/// must not stay beside the new parts (3 + 4 events) — before the fix its id was the new
/// first part's, with a higher version, and the query API counted 10 page views in two
/// sessions instead of 7.
#[tokio::test]
async fn a_shorter_session_gap_at_a_restart_supersedes_the_open_session_it_splits() {
    let kafka = pulse_tests::kafka();
    let (t, topics, registry, registry_url) = setup(&kafka).await;
    let db = Database::unique("pulse_rules_gap");

    let (processor, _) = start_processor(&processor_config(&t, &registry_url, 20_000)).await;
    let writer = start_writer(&t, &db.database).await;
    let base = (pulse_platform::clock::now_ms() - 600_000).div_euclid(WINDOW_MS) * WINDOW_MS;
    // p: three views a second apart, a 12 s pause (within 20 s, beyond 5 s), three more.
    let first: Vec<(String, i64)> = [1_000, 2_000, 3_000, 15_000, 16_000, 17_000]
        .iter()
        .enumerate()
        .map(|(i, dt)| (format!("p{i}"), base + dt))
        .collect();
    let batch: Vec<(&str, &str, i64)> =
        first.iter().map(|(id, t)| (id.as_str(), "p", *t)).collect();
    produce(&t.events, &batch).await;
    wait_until(
        WAIT,
        "p's open 6-event session (early) in ClickHouse",
        async || {
            let n: Vec<(u64, u8)> = db
                .client()
                .query("SELECT event_count, is_final FROM sessions WHERE user_id = 'p'")
                .fetch_all()
                .await
                .unwrap_or_default();
            if n.contains(&(6, 0)) { Ok(()) } else { Err(n) }
        },
    )
    .await;
    processor.stop().await;

    // The new rules: a 5 s gap. One more view of p, then a far event closes everything.
    let (processor, record) = start_processor(&processor_config(&t, &registry_url, 5_000)).await;
    assert_eq!(record.action, rules::ACTION_RULES_CHANGED, "{record:?}");
    produce(
        &t.events,
        &[("p6", "p", base + 18_000), ("z0", "z", base + 300_000)],
    )
    .await;
    wait_until(WAIT, "p's sessions final in ClickHouse", async || {
        let n: Vec<(i64, u64)> = db
            .client()
            .query("SELECT DISTINCT start_ms, event_count FROM sessions WHERE user_id = 'p' AND is_final = 1 ORDER BY start_ms")
            .fetch_all()
            .await
            .unwrap_or_default();
        if n == [(base + 1_000, 3), (base + 15_000, 4)] { Ok(()) } else { Err(n) }
    })
    .await;
    processor.stop().await;
    writer.stop().await;

    let api = QueryApi::start(&db, WINDOW_MS).await;
    assert_eq!(
        api.sessions(base, base + 60_000).await,
        (2, 3.5),
        "two sessions of 3 and 4 page views; the old 6-view result is superseded"
    );
    api.stop().await;
    registry.stop().await.unwrap();
    drop(topics);
}
