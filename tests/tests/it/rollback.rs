//! Rebuilding derived data from the archive (docs/operations.md, "Rollback and replay
//! plan"), against the real broker, ClickHouse and S3: a processor and the ClickHouse and
//! Parquet writers run over a seeded workload; then the range is replayed from the Parquet
//! archive (`pulsectl replay`) into a rebuild topic, the same processor version rebuilds it
//! as the shadow `rebuild` (`--events-topic <rebuild topic>`, so its outputs go to tables of
//! their own), and `pulsectl shadow diff` finds the rebuilt aggregates equal to the
//! original ones on every metric, window and key, with totals equal to the workload's.
//! Then the live rows of the range are damaged (as a bad version would have written them)
//! and replaced by the rebuilt ones with the documented ClickHouse statements.

use std::collections::BTreeSet;

use clap::Parser as _;
use pulse_contracts::topics as names;
use pulse_platform::kafka::TopicSpec;

use crate::shadow::{
    GAP_MS, PARTITIONS, Running, SPAN_MS, Topics, WAIT, WINDOW_MS, diff, processor, produce,
    sessions, workload, writer,
};
use crate::support::{archive, cleanup, registry, wait_until};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn aggregates_rebuilt_from_the_archive_equal_the_original_ones() {
    let kafka = pulse_tests::kafka();
    let t = Topics::new();
    let rebuild_topic = pulse_tests::unique("rollback_rebuild");
    let database = cleanup::Database::unique("pulse_rollback");
    let db = database.database.clone();
    let mut specs = vec![
        TopicSpec::new(t.events.as_str(), PARTITIONS),
        TopicSpec::new(rebuild_topic.as_str(), PARTITIONS),
    ];
    for name in [&t.activity, &t.sessions, &t.late, &t.dlq] {
        specs.push(TopicSpec::new(name.as_str(), 1));
    }
    let mut guard = cleanup::Topics::create(&specs).await;
    guard.add(&t.checkpoints);
    for live in [&t.activity, &t.sessions, &t.late, &t.checkpoints, &t.dlq] {
        guard.add(names::shadow_topic(live, "rebuild"));
    }
    let registry = registry::start(&kafka).await;
    let registry_url = format!("http://{}", registry.addr);
    registry::register_aggregates(&registry, &[&t.activity, &t.sessions]).await;
    registry::register(
        &registry_url,
        &rebuild_topic,
        pulse_contracts::schemas::EVENTS.source,
    )
    .await;
    let pulsectl = |args: &[&str]| {
        pulsectl::Cli::parse_from(
            std::iter::once("pulsectl")
                .chain(args.iter().copied())
                .map(str::to_owned),
        )
        .command
    };
    let pulsectl::Command::Shadow {
        command: pulsectl::shadow::ShadowCommand::Schemas(args),
    } = pulsectl(&[
        "shadow",
        "schemas",
        "--shadow",
        "rebuild",
        "--schema-registry-url",
        &registry_url,
        "--user-activity-topic",
        &t.activity,
        "--sessions-topic",
        &t.sessions,
    ])
    else {
        panic!("not shadow schemas")
    };
    pulsectl::shadow::register_schemas(&args).await.unwrap();

    // The original run: processor, ClickHouse writer and the Parquet archive.
    let group = pulse_tests::unique("rollback_proc");
    let wgroup = pulse_tests::unique("rollback_writer");
    let prefix = pulse_tests::short_unique("rb");
    let pgroup = pulse_tests::unique("rollback_parquet");
    let ch_writer = writer(&t, &db, &wgroup, &[]).await;
    let original = processor(&t, &registry_url, &group, GAP_MS, &[]).await;
    let archiver = archive::Sink::start(&archive::parquet_config(
        &t.events,
        &t.dlq,
        &pgroup,
        &prefix,
        &[
            "--kafka-partitions",
            &PARTITIONS.to_string(),
            "--clickhouse-url",
            "http://127.0.0.1:1",
            "--parquet-freshness",
            "false",
            "--parquet-max-age-ms",
            "200",
        ],
    ))
    .await;
    let now = pulse_platform::clock::now_ms();
    let base = (now - 7_200_000).div_euclid(WINDOW_MS) * WINDOW_MS;
    let work = workload(base);
    produce(&t.events, &work).await;
    archive::wait_committed_to_end("rollback-test", &pgroup, &t.events, PARTITIONS).await;
    archiver.stop().await;
    original.stop().await;

    // The rebuild: replay the range from the archive into the rebuild topic (the range
    // only: the flush events that close it come after), and the same processor version as
    // the shadow `rebuild` on that topic.
    let (from, to) = (base, base + SPAN_MS + WINDOW_MS);
    let mut argv = vec![
        "replay".to_owned(),
        "--from".to_owned(),
        from.to_string(),
        "--to".to_owned(),
        to.to_string(),
        "--topic".to_owned(),
        rebuild_topic.clone(),
        "--schema-registry-url".to_owned(),
        registry_url.clone(),
        "--kafka-brokers".to_owned(),
        kafka.brokers.clone(),
    ];
    argv.extend(archive::s3_flags(&prefix));
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    let pulsectl::Command::Replay(replay_args) = pulsectl(&argv) else {
        panic!("not replay")
    };
    let summary = pulsectl::replay::replay(&replay_args, None).await.unwrap();
    assert!(summary.complete(), "{summary:?}");
    assert_eq!(summary.published, work.len() as u64, "{summary:?}");
    let shadow_writer = writer(&t, &db, &wgroup, &["--shadow", "rebuild"]).await;
    // The live topic names (the shadow derives its outputs from them), the rebuild topic in.
    let rebuild_topics = Topics {
        events: rebuild_topic.clone(),
        activity: t.activity.clone(),
        sessions: t.sessions.clone(),
        late: t.late.clone(),
        checkpoints: t.checkpoints.clone(),
        dlq: t.dlq.clone(),
    };
    let rebuild: Running = processor(
        &rebuild_topics,
        &registry_url,
        &group,
        GAP_MS,
        &["--shadow", "rebuild"],
    )
    .await;
    // Later events on both topics close every window and session of the range.
    let flush: Vec<crate::shadow::Event> = (0..20)
        .map(|i| crate::shadow::Event {
            id: format!("flush-{i}"),
            user: format!("flush-{i}"),
            t: base + 900_000,
            purchase: None,
        })
        .collect();
    let original = processor(&t, &registry_url, &group, GAP_MS, &[]).await;
    produce(&t.events, &flush).await;
    produce(&rebuild_topic, &flush).await;

    let windows: BTreeSet<i64> = work
        .iter()
        .map(|e| e.t.div_euclid(WINDOW_MS) * WINDOW_MS)
        .collect();
    let want_sessions = sessions(&work, GAP_MS).len() as f64;
    let report = wait_until(
        WAIT,
        "the rebuild final on every window of the range",
        async || {
            let r = diff("rebuild", &db, from, to).await;
            let done = r.open_windows.is_empty()
                && r.summary.get("page_views").map(|s| s.windows) == Some(windows.len())
                && r.summary
                    .get("sessions")
                    .map(|s| (s.live_total, s.shadow_total))
                    == Some((want_sessions, want_sessions));
            if done { Ok(r) } else { Err(r.render(5)) }
        },
    )
    .await;
    eprintln!("original vs rebuild:\n{}", report.render(20));
    assert!(report.differing.is_empty(), "{}", report.render(20));
    let page_views = work.iter().filter(|e| e.purchase.is_none()).count() as f64;
    assert_eq!(report.summary["page_views"].live_total, page_views);
    for (metric, m) in &report.summary {
        assert!(m.live_total > 0.0, "{metric}");
        assert_eq!(m.live_total, m.shadow_total, "{metric}");
    }
    for l in [rebuild, original, shadow_writer, ch_writer] {
        l.stop().await;
    }
    registry.stop().await.unwrap();

    // Moving the rebuilt aggregates into the live tables (docs/operations.md, "Rebuilding
    // aggregates from the archive"): live rows of the range made wrong — as a bad
    // processor version would have written them — are replaced by the rebuild's.
    let ch = database.client();
    let (activity_range, sessions_range) = (
        format!("window_start_ms >= {from} AND window_end_ms <= {to}"),
        format!("start_ms >= {from} AND start_ms < {to}"),
    );
    // Each statement, then (ALTER … UPDATE/DELETE are asynchronous mutations; ClickHouse
    // 18.16 has no `mutations_sync`) until the database has no unfinished mutation.
    let sql = |q: String| {
        let (ch, db) = (ch.clone(), db.clone());
        async move {
            ch.query(&q)
                .execute()
                .await
                .unwrap_or_else(|e| panic!("{q}: {e}"));
            let pending = format!(
                "SELECT toUInt64(count()) FROM system.mutations WHERE database = '{db}' AND is_done = 0"
            );
            wait_until(WAIT, format!("the mutations of {q}"), async || {
                let n: u64 = ch
                    .query(&pending)
                    .fetch_one()
                    .await
                    .map_err(|e| e.to_string())?;
                if n == 0 {
                    Ok(())
                } else {
                    Err(format!("{n} unfinished"))
                }
            })
            .await;
        }
    };
    sql(format!(
        "ALTER TABLE user_activity UPDATE page_views = page_views + 1 WHERE {activity_range}"
    ))
    .await;
    sql(format!(
        "ALTER TABLE sessions DELETE WHERE {sessions_range} AND cityHash64(session_id) % 2 = 0"
    ))
    .await;
    let damaged = diff("rebuild", &db, from, to).await;
    assert!(
        damaged.summary["page_views"].live_total > page_views
            && damaged.summary["sessions"].live_total < want_sessions,
        "the live tables were not damaged: {}",
        damaged.render(5)
    );
    // The documented steps, verbatim but for the range.
    sql(format!(
        "ALTER TABLE user_activity DELETE WHERE {activity_range}"
    ))
    .await;
    sql(format!(
        "INSERT INTO user_activity SELECT * FROM user_activity_shadow_rebuild WHERE {activity_range}"
    ))
    .await;
    sql(format!(
        "ALTER TABLE sessions DELETE WHERE {sessions_range}"
    ))
    .await;
    sql(format!(
        "INSERT INTO sessions SELECT * FROM sessions_shadow_rebuild WHERE {sessions_range}"
    ))
    .await;
    let repaired = diff("rebuild", &db, from, to).await;
    eprintln!("live after the move:\n{}", repaired.render(20));
    assert!(repaired.differing.is_empty(), "{}", repaired.render(20));
    assert_eq!(repaired.summary["page_views"].live_total, page_views);
    assert_eq!(repaired.summary["sessions"].live_total, want_sessions);
    for (metric, m) in &repaired.summary {
        assert_eq!(m.live_total, m.shadow_total, "{metric}");
    }
}
