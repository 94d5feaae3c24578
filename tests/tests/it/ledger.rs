//! `pulsectl ledger` against the real pipeline: the processor, the ClickHouse writer, the
//! Parquet sink and the query API run in-process on the real broker, ClickHouse 18.16 and
//! s3s-fs, with topics, a database and an archive prefix of their own. A clean range
//! (with a duplicate record and a late event) reconciles to zero; a range that is not
//! closed yet is refused; events produced while the Parquet sink is down are named as
//! missing from the archive; rows deleted from ClickHouse are named; a changed aggregate
//! is a revenue difference; the binary exits 0 and 1 accordingly; and `ledger watch`
//! exports the same findings as `pulse_ledger_*` metrics on its admin port, counting an
//! event that arrives after its window was reconciled as unchecked.

use std::time::Duration;

use clap::Parser;
use pulse_contracts::headers;
use pulse_contracts::pb::events::v1 as ev;
use pulse_platform::clickhouse::ClickHouseConfig;
use pulse_platform::kafka::{KafkaProducer, TopicSpec};
use pulse_query_api::Servers;
use pulse_storage::rows::ActivityRow;
use pulse_tests::short_unique;
use pulsectl::ledger::{LedgerArgs, LedgerError, Path, Report, SourceArgs, check};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::support::child_process::binary;
use crate::support::{archive, cleanup, events, kafka, metric_sum, registry, wait_until};

/// The archive objects in the hour folders of `[from, to)` under `prefix`.
async fn archive_objects(prefix: &str, from: i64, to: i64) -> usize {
    use pulsectl::replay::read;
    let mut s3 = pulse_tests::s3();
    s3.prefix = prefix.to_owned();
    let store = s3.object_store().unwrap();
    let mut n = 0;
    for bucket in read::hour_folders(from, to) {
        n += read::list_folder(store.as_ref(), &read::folder_path(&s3, &bucket))
            .await
            .unwrap()
            .len();
    }
    n
}

/// 2025-11-24T16:00:00Z: an hour boundary in the past.
const B0: i64 = 1_764_000_000_000 / 3_600_000 * 3_600_000;
const M: i64 = 60_000;
const TOKEN: &str = "ledger-test-token";
const DEADLINE: Duration = Duration::from_secs(45);

struct Pipeline {
    events: String,
    late: String,
    dlq: String,
    prefix: String,
    ch: ClickHouseConfig,
    stop: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    parquet: Option<archive::Sink>,
    parquet_group: String,
    api: Servers,
    api_base: String,
    registry: registry::Registry,
    _topics: cleanup::Topics,
    _database: cleanup::Database,
}

async fn pipeline() -> Pipeline {
    let kafka = pulse_tests::kafka();
    let events = short_unique("lg_ev");
    let [activity, sessions, late, dlq] =
        ["lg_act", "lg_ses", "lg_late", "lg_dlq"].map(pulse_tests::unique);
    let topics = cleanup::Topics::create(
        &[&events, &activity, &sessions, &late, &dlq]
            .iter()
            .map(|t| TopicSpec::new(t.as_str(), 1))
            .collect::<Vec<_>>(),
    )
    .await;
    let registry = registry::start(&kafka).await;
    registry::register_aggregates(&registry, &[&activity, &sessions]).await;
    let database = cleanup::Database::unique("pulse_ledger");
    let ch = ClickHouseConfig::clone(&database);
    let stop = CancellationToken::new();
    let mut tasks = Vec::new();

    let processor = pulse_processor::Config::parse_from([
        "pulse-processor",
        "--kafka-brokers",
        &kafka.brokers,
        // The settings the chart run creates the fixed topics (the checkpoints) with.
        "--kafka-replication-factor",
        "1",
        "--kafka-min-insync-replicas",
        "1",
        "--schema-registry-url",
        &format!("http://{}", registry.addr),
        "--group-id",
        &pulse_tests::unique("lg_proc"),
        "--window-ms",
        "60000",
        "--allowed-lateness-ms",
        "30000",
        "--max-out-of-orderness-ms",
        "1000",
        "--emit-interval-ms",
        "100",
        "--events-topic",
        &events,
        "--user-activity-topic",
        &activity,
        "--sessions-topic",
        &sessions,
        "--late-topic",
        &late,
    ]);
    let processor = pulse_processor::build(&processor).await.unwrap();
    let s = stop.clone();
    tasks.push(tokio::spawn(async move {
        processor.run(s).await.unwrap();
    }));

    let writer = pulse_writer::Config::parse_from([
        "pulse-writer",
        "--kafka-brokers",
        &kafka.brokers,
        "--clickhouse-url",
        &ch.url,
        "--clickhouse-database",
        &ch.database,
        "--group-id",
        &pulse_tests::unique("lg_ch"),
        "--batch-max-age-ms",
        "200",
        "--events-topic",
        &events,
        "--user-activity-topic",
        &activity,
        "--sessions-topic",
        &sessions,
        "--dlq-topic",
        &dlq,
    ]);
    let sink = pulse_writer::build_clickhouse(&writer).await.unwrap();
    let s = stop.clone();
    tasks.push(tokio::spawn(async move {
        sink.run(s).await.unwrap();
    }));

    let prefix = short_unique("lg");
    let parquet_group = pulse_tests::unique("lg_pq");
    let parquet = archive::Sink::start(&archive::parquet_config(
        &events,
        &dlq,
        &parquet_group,
        &prefix,
        &[
            "--kafka-partitions",
            "1",
            "--clickhouse-url",
            "http://127.0.0.1:1",
            "--parquet-freshness",
            "false",
            "--parquet-max-age-ms",
            "200",
        ],
    ))
    .await;

    let api = pulse_query_api::Config::parse_from([
        "pulse-query-api",
        "--clickhouse-url",
        &ch.url,
        "--clickhouse-database",
        &ch.database,
        "--window-ms",
        "60000",
        "--allowed-lateness-ms",
        "30000",
        "--freshness-cache-ms",
        "0",
    ]);
    // As if from PULSE_QUERY_API_TOKENS (a secret is never a flag).
    let api = pulse_query_api::Config {
        api_tokens: TOKEN.into(),
        ..api
    };
    let state = pulse_query_api::AppState::new(&api).unwrap();
    let api = pulse_query_api::serve(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        state,
        stop.clone(),
    )
    .await
    .unwrap();
    let api_base = format!("http://{}", api.http_addr);
    Pipeline {
        events,
        late,
        dlq,
        prefix,
        ch,
        stop,
        tasks,
        parquet: Some(parquet),
        parquet_group,
        api,
        api_base,
        registry,
        _topics: topics,
        _database: database,
    }
}

impl Pipeline {
    /// The ledger's flags for this pipeline, then `extra`; the query token is not a flag
    /// (PULSE_LEDGER_QUERY_TOKEN, or `SourceArgs::query_token` in process).
    fn argv(&self, extra: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = [
            "--events-topic",
            &self.events,
            "--late-topic",
            &self.late,
            "--dlq-topic",
            &self.dlq,
            "--kafka-brokers",
            &pulse_tests::kafka().brokers,
            "--clickhouse-url",
            &self.ch.url,
            "--clickhouse-database",
            &self.ch.database,
            "--query-url",
            &self.api_base,
            "--window-ms",
            "60000",
            "--allowed-lateness-ms",
            "30000",
            "--settle",
            "0s",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        v.extend(archive::s3_flags(&self.prefix));
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    }

    fn sources(&self) -> SourceArgs {
        let mut argv = vec![
            "pulsectl".to_owned(),
            "ledger".to_owned(),
            "--from".to_owned(),
            "0".to_owned(),
            "--to".to_owned(),
            "1".to_owned(),
        ];
        argv.extend(self.argv(&[]));
        match pulsectl::Cli::parse_from(argv).command {
            pulsectl::Command::Ledger(a) => {
                let LedgerArgs { sources, .. } = *a;
                SourceArgs {
                    query_token: TOKEN.into(),
                    ..sources
                }
            }
            other => panic!("not ledger: {other:?}"),
        }
    }

    async fn ledger(&self, from: i64, to: i64) -> Report {
        check(from, to, &self.sources(), None).await.unwrap()
    }

    async fn produce(&self, es: &[ev::Event]) {
        let p = KafkaProducer::new(&pulse_tests::kafka(), "ledger-test").unwrap();
        for e in es {
            let id = [(headers::EVENT_ID, e.event_id.as_str())];
            archive::send_event(&p, &self.events, 0, e, &id, None).await;
        }
    }

    async fn count(&self, sql: &str) -> u64 {
        self.ch
            .client()
            .query(sql)
            .fetch_one::<u64>()
            .await
            .unwrap()
    }

    /// Waits until the latest final window ends at or after `end` and `events` rows of
    /// distinct ids are in ClickHouse.
    async fn wait_stored(&self, end: i64, events: u64) {
        wait_until(
            DEADLINE,
            format!("final windows to {end} and {events} events"),
            async || {
                let f = self
                    .count(
                        "SELECT toUInt64(max(window_end_ms)) FROM user_activity WHERE is_final = 1",
                    )
                    .await;
                let n = self
                    .count("SELECT toUInt64(uniqExact(event_id)) FROM events")
                    .await;
                if f >= end as u64 && n == events {
                    Ok(())
                } else {
                    Err((f, n))
                }
            },
        )
        .await;
    }

    async fn shutdown(mut self) {
        if let Some(p) = self.parquet.take() {
            p.stop().await;
        }
        self.stop.cancel();
        for t in self.tasks {
            t.await.unwrap();
        }
        self.api.wait().await.unwrap();
        self.registry.stop().await.unwrap();
    }
}

/// Event `id` of `user` at `B0 + t` ms, ingested 500 ms later; a purchase when `amount`.
fn event(id: &str, user: &str, t: i64, amount: Option<(&str, i64)>) -> ev::Event {
    let e = events::event(id, user, B0 + t).ingested(B0 + t + 500, "lg");
    match amount {
        Some((c, a)) => e.purchase(c, a),
        None => e.page("/p"),
    }
    .build()
}

/// Range A: [B0, B0 + 2 min), 4 users, purchases in EUR and USD, one id sent twice.
fn range_a() -> Vec<ev::Event> {
    let mut v = Vec::new();
    for i in 0..24 {
        let user = format!("u{}", i % 4);
        let amount = match i % 6 {
            0 => Some(("EUR", 10_500_000 + i)),
            3 => Some(("USD", 1_000_001)),
            _ => None,
        };
        v.push(event(&format!("a{i}"), &user, i * 5_000, amount));
    }
    v.push(v[5].clone()); // the same id again (a replay): harmless
    v
}

fn ids(r: &Report, path: Path) -> Vec<String> {
    r.paths[&path]
        .missing
        .iter()
        .map(|i| i.event_id.clone())
        .collect()
}

#[tokio::test]
async fn the_ledger_reconciles_a_clean_range_and_names_what_a_store_lost() {
    let mut p = pipeline().await;
    let a = range_a();
    p.produce(&a).await;
    // u9 far later moves the watermark past [B0, B0 + 2 min) + lateness: final.
    p.produce(&[event("close1", "u9", 200_000, None)]).await;
    p.wait_stored(B0 + 2 * M, 25).await;
    // A late event of range A: on the late topic, stored, archived, not aggregated.
    p.produce(&[event("late1", "u1", 10_000, None)]).await;
    wait_until(DEADLINE, "the late event on the late topic", async || {
        let n = kafka::read_to_end(&pulse_tests::kafka(), &p.late)
            .await
            .len();
        if n == 1 { Ok(()) } else { Err(n) }
    })
    .await;
    p.wait_stored(B0 + 2 * M, 26).await;
    archive::wait_committed_to_end("ledger-test", &p.parquet_group, &p.events, 1).await;

    // A clean range: every state adds up, revenue equal to the micro.
    let r = p.ledger(B0, B0 + 2 * M).await;
    let lines = r.lines(20).join("\n");
    assert!(!r.is_mismatch(), "{lines}");
    assert_eq!(r.windows.len(), 2);
    let total = |f: fn(&pulsectl::ledger::reconcile::WindowRow) -> u64| {
        r.windows.iter().map(f).sum::<u64>()
    };
    assert_eq!(total(|w| w.accepted), 25, "{lines}");
    assert_eq!(total(|w| w.clickhouse), 25, "{lines}");
    assert_eq!(total(|w| w.archive.unwrap()), 25, "{lines}");
    assert_eq!(total(|w| w.late), 1, "{lines}");
    assert_eq!(total(|w| w.aggregated), 24, "{lines}");
    assert_eq!(r.topic_copies, 1);
    let revenue = r.revenue.clone().unwrap();
    let eur: i128 = (0..24)
        .filter(|i| i % 6 == 0)
        .map(|i| i128::from(10_500_000 + i))
        .sum();
    assert_eq!(
        revenue
            .iter()
            .map(|x| (x.hour_ms, x.currency.as_str(), x.raw, x.served))
            .collect::<Vec<_>>(),
        [(B0, "EUR", eur, eur), (B0, "USD", 4_000_004, 4_000_004)],
        "{lines}"
    );

    // A range holding more events than the memory budget is refused, naming the knob.
    let mut small = p.sources();
    small.max_held_events = 10;
    let e = check(B0, B0 + 2 * M, &small, None).await.unwrap_err();
    assert!(matches!(e, LedgerError::OverBudget { max: 10, .. }), "{e}");
    assert!(e.to_string().contains("--max-held-events"), "{e}");

    // A range that is not closed yet is refused, naming why.
    let e = check(B0 + 10 * M, B0 + 11 * M, &p.sources(), None)
        .await
        .unwrap_err();
    assert!(matches!(e, LedgerError::NotClosed(_)), "{e}");
    assert!(e.to_string().contains("the range is not closed: no window ending at or after --to 2025-11-24T16:11:00Z is final yet"), "{e}");

    // Range B is produced while the Parquet sink is down: never archived.
    if let Some(sink) = p.parquet.take() {
        sink.stop().await;
    }
    let b: Vec<ev::Event> = (0..5)
        .map(|i| event(&format!("b{i}"), "u5", 4 * M + i * 7_000, None))
        .collect();
    p.produce(&b).await;
    p.produce(&[event("close2", "u9", 400_000, None)]).await;
    p.wait_stored(B0 + 5 * M, 32).await;
    let r = p.ledger(B0 + 4 * M, B0 + 5 * M).await;
    let lines = r.lines(20).join("\n");
    assert_eq!(
        ids(&r, Path::Archive),
        ["b0", "b1", "b2", "b3", "b4"],
        "{lines}"
    );
    assert!(r.paths[&Path::Clickhouse].is_clean(), "{lines}");
    assert!(r.paths[&Path::Aggregate].is_clean(), "{lines}");
    assert!(lines.contains("missing in archive: b0 ("), "{lines}");
    assert!(
        lines.contains("result: MISMATCH — archive: 5 missing"),
        "{lines}"
    );

    // Rows deleted in ClickHouse are named on the clickhouse path only.
    p.ch.client()
        .query("ALTER TABLE events DELETE WHERE event_id IN ('a3', 'a7')")
        .execute()
        .await
        .unwrap();
    wait_until(DEADLINE, "the deletion to apply", async || {
        let n = p
            .count("SELECT toUInt64(count()) FROM events WHERE event_id IN ('a3', 'a7')")
            .await;
        if n == 0 { Ok(()) } else { Err(n) }
    })
    .await;
    let r = p.ledger(B0, B0 + 2 * M).await;
    let lines = r.lines(20).join("\n");
    assert_eq!(ids(&r, Path::Clickhouse), ["a3", "a7"], "{lines}");
    assert!(r.paths[&Path::Archive].is_clean(), "{lines}");
    assert!(r.paths[&Path::Aggregate].is_clean(), "{lines}");
    assert!(r.revenue_mismatches().is_empty(), "{lines}");

    // A newer version of u0's first window with one cent more EUR: the counts still
    // agree, the revenue does not.
    let mut row: ActivityRow = p
        .ch
        .client()
        .query("SELECT ?fields FROM user_activity WHERE user_id = 'u0' AND window_start_ms = ? ORDER BY version DESC LIMIT 1")
        .bind(B0)
        .fetch_one()
        .await
        .unwrap();
    let eur_at = row
        .revenue_currencies
        .iter()
        .position(|c| c == "EUR")
        .unwrap();
    row.revenue_micros[eur_at] += 10_000;
    row.version += 1_000;
    let client = p.ch.client();
    let mut ins = client.insert::<ActivityRow>("user_activity").await.unwrap();
    ins.write(&row).await.unwrap();
    ins.end().await.unwrap();
    let r = p.ledger(B0, B0 + 2 * M).await;
    let lines = r.lines(20).join("\n");
    let bad = r.revenue_mismatches();
    assert_eq!(bad.len(), 1, "{lines}");
    assert_eq!(
        (bad[0].currency.as_str(), bad[0].delta()),
        ("EUR", 10_000),
        "{lines}"
    );
    assert!(lines.contains("delta 0.01  MISMATCH"), "{lines}");
    assert!(r.paths[&Path::Aggregate].is_clean(), "{lines}");

    // The binary: a mismatch exits 1 naming it; a clean range exits 0.
    let run = |from: i64, to: i64| {
        let mut argv = vec![
            "ledger".to_owned(),
            "--from".to_owned(),
            pulse_platform::clock::rfc3339(from),
            "--to".to_owned(),
            to.to_string(),
        ];
        argv.extend(p.argv(&["--progress-interval", "100ms"]));
        // On the blocking pool: the in-process query API must keep answering meanwhile.
        tokio::task::spawn_blocking(move || {
            std::process::Command::new(binary("pulsectl"))
                .args(argv)
                .env("PULSE_LEDGER_QUERY_TOKEN", TOKEN)
                .env_remove("PULSE_PROGRESS")
                .output()
                .unwrap()
        })
    };
    let out = run(B0, B0 + 2 * M).await.unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("missing in clickhouse: a3 ("),
        "{stdout}\n{stderr}"
    );
    assert!(stderr.contains("clickhouse: 2 missing"), "{stderr}");
    assert!(
        stderr.contains("revenue: 1 hour/currency bucket(s) differ"),
        "{stderr}"
    );
    let out = run(B0 + 2 * M, B0 + 4 * M).await.unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{}\n{stderr}",
        String::from_utf8_lossy(&out.stdout),
    );
    // Its stderr is a pipe: reading the topics and the archive shows plain progress lines,
    // each ending with a done line counting every record of the three topics and every
    // object of the range's hour folder.
    let mut records = 0;
    for topic in [&p.events, &p.late, &p.dlq] {
        records += kafka::read_to_end(&pulse_tests::kafka(), topic).await.len();
    }
    let objects = archive_objects(&p.prefix, B0 + 2 * M, B0 + 4 * M).await;
    assert!(
        records > 0 && objects > 0,
        "{records} records, {objects} objects"
    );
    assert!(
        stderr.contains(&format!("ledger topics: done, {records} records in "))
            && stderr.contains(&format!("ledger archive: done, {objects} objects in ")),
        "{stderr}"
    );
    assert!(!stderr.contains('\r'), "plain lines, no bar: {stderr:?}");
    for line in stderr.lines().filter(|l| l.starts_with("ledger topics: ")) {
        let rest = &line["ledger topics: ".len()..];
        if let Some((done, total)) = rest
            .split_whitespace()
            .next()
            .and_then(|c| c.split_once('/'))
        {
            assert!(
                line.contains(" records/s, ETA ") && line.contains(", elapsed "),
                "{line}"
            );
            assert_eq!(
                total,
                records.to_string(),
                "the backlog is the total: {line}"
            );
            assert!(done.parse::<usize>().unwrap() <= records, "{line}");
        }
    }

    // `ledger watch` reconciles every closed window from its look-back and exports it —
    // with a memory budget of 4 events, so it defers windows and reads the events topic
    // again, and must still find exactly what an unbounded ledger finds.
    let lookback_s = (pulse_platform::clock::now_ms() - B0) / 1000 + 1;
    let mut argv = vec![
        "pulsectl".to_owned(),
        "ledger".to_owned(),
        "watch".to_owned(),
        "--interval".to_owned(),
        "200ms".to_owned(),
        "--lookback".to_owned(),
        format!("{lookback_s}s"),
        "--max-held-events".to_owned(),
        "4".to_owned(),
    ];
    argv.extend(p.argv(&[]));
    let pulsectl::Command::Ledger(args) = pulsectl::Cli::parse_from(argv).command else {
        panic!("not ledger")
    };
    let Some(pulsectl::ledger::LedgerCommand::Watch(mut watch)) = args.command else {
        panic!("not ledger watch")
    };
    watch.sources.query_token = TOKEN.into();
    let (ctx, admin) =
        pulse_platform::service::start("ledger", TcpListener::bind("127.0.0.1:0").await.unwrap())
            .unwrap();
    let metrics_url = format!("http://{}/metrics", ctx.admin_addr);
    let watch_ctx = ctx.clone();
    let task =
        tokio::spawn(async move { pulsectl::ledger::watch::watch(&watch, &watch_ctx).await });
    let scrape = wait_until(
        DEADLINE,
        "ledger watch to reconcile up to B0 + 5 min",
        async || {
            let text = reqwest::get(&metrics_url)
                .await
                .map_err(|e| e.to_string())?
                .text()
                .await
                .map_err(|e| e.to_string())?;
            match metric_sum(&text, "pulse_ledger_last_reconciled_timestamp_seconds", &[]) {
                Some(t) if t >= ((B0 + 5 * M) / 1000) as f64 => Ok(text),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    let sum = |name: &str, labels: &[&str]| metric_sum(&scrape, name, labels).unwrap_or(-1.0);
    assert_eq!(
        sum(
            "pulse_ledger_missing_events_total",
            &["path=\"clickhouse\""]
        ),
        2.0,
        "{scrape}"
    );
    assert_eq!(
        sum("pulse_ledger_missing_events_total", &["path=\"archive\""]),
        5.0,
        "{scrape}"
    );
    assert_eq!(
        sum("pulse_ledger_missing_events_total", &["path=\"aggregate\""]),
        0.0,
        "{scrape}"
    );
    // 25 of range A, close1, 5 of range B.
    assert_eq!(
        sum(
            "pulse_ledger_checked_events_total",
            &["path=\"clickhouse\""]
        ),
        31.0,
        "{scrape}"
    );
    assert_eq!(
        sum("pulse_ledger_events_total", &["state=\"accepted\""]),
        31.0,
        "{scrape}"
    );
    assert_eq!(
        sum("pulse_ledger_events_total", &["state=\"late\""]),
        1.0,
        "{scrape}"
    );
    assert_eq!(
        sum(
            "pulse_ledger_revenue_mismatches_total",
            &["currency=\"EUR\""]
        ),
        1.0,
        "{scrape}"
    );
    assert_eq!(
        sum("pulse_ledger_revenue_delta_micros", &["currency=\"USD\""]),
        0.0,
        "{scrape}"
    );
    assert!(
        sum("pulse_ledger_runs_total", &["result=\"mismatch\""]) >= 2.0,
        "{scrape}"
    );
    assert!(
        sum("pulse_ledger_runs_total", &["result=\"ok\""]) >= 1.0,
        "{scrape}"
    );
    for name in [
        "pulse_ledger_duplicate_events_total",
        "pulse_ledger_unexpected_events_total",
        "pulse_ledger_closed_timestamp_seconds",
    ] {
        assert!(
            metric_sum(&scrape, name, &[]).is_some(),
            "{name} missing:\n{scrape}"
        );
    }
    assert!(
        scrape.contains("# HELP pulse_ledger_missing_events_total"),
        "{scrape}"
    );
    assert_eq!(
        sum("pulse_ledger_unchecked_events_total", &[]),
        0.0,
        "{scrape}"
    );
    assert!(
        sum("pulse_ledger_rereads_total", &[]) >= 1.0,
        "the budget of 4 deferred windows: {scrape}"
    );
    assert!(
        sum("pulse_ledger_held_events", &["kind=\"book\""]) >= 0.0,
        "{scrape}"
    );
    // An event of a window `watch` has reconciled already is counted as unchecked, not
    // lost and not in the reconciled counters.
    p.produce(&[event("late2", "u2", 30_000, None)]).await;
    wait_until(
        DEADLINE,
        "the late arrival counted as unchecked",
        async || {
            let text = reqwest::get(&metrics_url)
                .await
                .map_err(|e| e.to_string())?
                .text()
                .await
                .map_err(|e| e.to_string())?;
            let unchecked = metric_sum(&text, "pulse_ledger_unchecked_events_total", &[]);
            let accepted = metric_sum(&text, "pulse_ledger_events_total", &["state=\"accepted\""]);
            match (unchecked, accepted) {
                (Some(1.0), Some(31.0)) => Ok(()),
                other => Err(format!("{other:?}")),
            }
        },
    )
    .await;
    ctx.shutdown.trigger();
    task.await.unwrap().unwrap();
    admin.stop().await;
    p.shutdown().await;
}

/// A query API over TLS on `db`, requiring client certificates signed by `client_ca`
/// (mutual TLS): its HTTPS base URL, its stop token and its servers.
async fn tls_query_api(
    db: &ClickHouseConfig,
    cert: &std::path::Path,
    key: &std::path::Path,
    client_ca: &std::path::Path,
) -> (String, CancellationToken, Servers) {
    let config = pulse_query_api::Config::parse_from([
        "pulse-query-api",
        "--clickhouse-url",
        &db.url,
        "--clickhouse-database",
        &db.database,
        "--window-ms",
        "60000",
        "--allowed-lateness-ms",
        "30000",
        "--freshness-cache-ms",
        "0",
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
        "--tls-client-ca-file",
        client_ca.to_str().unwrap(),
    ]);
    let config = pulse_query_api::Config {
        api_tokens: TOKEN.into(),
        ..config
    };
    let settings = config.server.settings().unwrap();
    let state = pulse_query_api::AppState::new(&config).unwrap();
    let stop = CancellationToken::new();
    let servers = pulse_query_api::serve_with(
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
        state,
        &settings,
        stop.clone(),
    )
    .await
    .unwrap();
    (format!("https://{}", servers.http_addr), stop, servers)
}

impl Pipeline {
    /// The ledger's settings as `pulsectl ledger` parses them, with `--query-url url`
    /// and `extra` flags.
    fn sources_for(&self, url: &str, extra: &[&str]) -> SourceArgs {
        let mut argv = vec!["pulsectl", "ledger", "--from", "0", "--to", "1"]
            .into_iter()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        let mut rest = self.argv(extra);
        let at = rest.iter().position(|a| a == "--query-url").unwrap();
        rest[at + 1] = url.to_owned();
        argv.extend(rest);
        match pulsectl::Cli::try_parse_from(argv).unwrap().command {
            pulsectl::Command::Ledger(a) => {
                let LedgerArgs { sources, .. } = *a;
                SourceArgs {
                    query_token: TOKEN.into(),
                    ..sources
                }
            }
            other => panic!("not ledger: {other:?}"),
        }
    }
}

/// The revenue check against a query API that serves HTTPS and requires client
/// certificates: with `--query-ca-file` and `--query-client-cert-file` /
/// `--query-client-key-file` the ledger reads the revenue there (not skipped) and finds
/// what it finds over plain HTTP; without the CA it fails naming the certificate check and
/// the setting; without a client certificate it is refused.
#[tokio::test]
async fn the_ledger_reads_the_revenue_from_a_query_api_over_mutual_tls_with_its_ca() {
    let p = pipeline().await;
    p.produce(&range_a()).await;
    p.produce(&[event("close1", "u9", 200_000, None)]).await;
    p.wait_stored(B0 + 2 * M, 25).await;
    archive::wait_committed_to_end("ledger-test", &p.parquet_group, &p.events, 1).await;
    let plain = p.ledger(B0, B0 + 2 * M).await;
    let served = plain
        .revenue
        .clone()
        .expect("plain HTTP: the revenue checked");
    assert!(!served.is_empty(), "{}", plain.lines(20).join("\n"));

    let (ca, cert, key) = crate::server_tls::pki("ledger-query-tls");
    let clients = crate::support::tls::work_dir("ledger-query-tls-clients");
    crate::support::tls::make_ca(&clients, "ledger-client-ca");
    let (client_cert, client_key) =
        crate::support::tls::make_client_cert(&clients, "ledger-client-ca", "pulse-ledger", None);
    let (url, stop, servers) =
        tls_query_api(&p.ch, &cert, &key, &clients.join("ledger-client-ca.pem")).await;
    let (ca, client_cert, client_key) = (
        ca.to_str().unwrap(),
        client_cert.to_str().unwrap(),
        client_key.to_str().unwrap(),
    );

    // The CA and a client certificate: the same revenue, read over mutual TLS.
    let trusted = p.sources_for(
        &url,
        &[
            "--query-ca-file",
            ca,
            "--query-client-cert-file",
            client_cert,
            "--query-client-key-file",
            client_key,
        ],
    );
    let r = check(B0, B0 + 2 * M, &trusted, None).await.unwrap();
    let lines = r.lines(20).join("\n");
    assert!(!r.is_mismatch(), "{lines}");
    assert_eq!(r.revenue.as_ref(), Some(&served), "{lines}");

    // No CA (the built-in roots only): the handshake fails, naming why and what to set.
    let untrusted = p.sources_for(
        &url,
        &[
            "--query-client-cert-file",
            client_cert,
            "--query-client-key-file",
            client_key,
        ],
    );
    let e = check(B0, B0 + 2 * M, &untrusted, None).await.unwrap_err();
    let text = e.to_string();
    assert!(
        matches!(
            e,
            LedgerError::Revenue(pulsectl::ledger::revenue::RevenueError::Tls { .. })
        ),
        "{text}"
    );
    assert!(
        text.contains("TLS handshake failed")
            && text.contains("UnknownIssuer")
            && text.contains("--query-ca-file / PULSE_LEDGER_QUERY_CA_FILE"),
        "{text}"
    );

    // The CA but no client certificate: refused. (Whether the client sees the server's
    // alert or the closed connection races TLS 1.3's late refusal; either fails.)
    let anonymous = p.sources_for(&url, &["--query-ca-file", ca]);
    let e = check(B0, B0 + 2 * M, &anonymous, None).await.unwrap_err();
    assert!(matches!(e, LedgerError::Revenue(_)), "{e}");

    // A CA file with an http:// query URL is refused at start, naming the setting.
    let mixed = p.sources_for(&p.api_base, &["--query-ca-file", ca]);
    let e = check(B0, B0 + 2 * M, &mixed, None).await.unwrap_err();
    assert!(
        e.to_string()
            .contains("--query-ca-file / PULSE_LEDGER_QUERY_CA_FILE")
            && e.to_string().contains("is not https://"),
        "{e}"
    );

    stop.cancel();
    servers.wait().await.unwrap();
    p.shutdown().await;
}
