//! The hot-store schema (crates/storage/clickhouse/) against the real server (Debian's 18.16 in
//! scripts/test.sh): migrations, the documented exactly-once read patterns (`FINAL` and
//! `argMax ... GROUP BY key`) and day-partition retention.

use pulse_contracts::pb::aggregates::v1::UserWindowActivity;
use pulse_contracts::pb::events::v1::Event;
use pulse_platform::clickhouse::ClickHouseConfig;
use pulse_storage::migrate::{MIGRATIONS, apply_retention, migrate, yyyymmdd_from_ms};
use pulse_storage::rows::{ActivityRow, EventRow, SessionRow};

use crate::support::cleanup::Database;
use crate::support::events;

const DAY_MS: i64 = 86_400_000;
/// 2024-02-29 12:00 UTC.
const NOW: i64 = 1_709_164_800_000 + 12 * 3_600_000;

const EVENT_COLUMNS: &[&str] = &[
    "event_id",
    "schema_version",
    "event_type",
    "user_id",
    "session_id",
    "page",
    "referrer",
    "currency",
    "amount_micros",
    "has_amount",
    "property_keys",
    "property_values",
    "event_time_ms",
    "ingest_time_ms",
    "trace_id",
    "source",
    "ingest_source",
    "kafka_partition",
    "kafka_offset",
    "written_at_ms",
    "event_date",
    "source_trace_id",
];

const ACTIVITY_COLUMNS: &[&str] = &[
    "user_id",
    "window_start_ms",
    "window_end_ms",
    "page_views",
    "pages",
    "page_views_by_page",
    "types",
    "events_by_type",
    "revenue_currencies",
    "revenue_micros",
    "event_count",
    "first_event_ms",
    "last_event_ms",
    "version",
    "is_final",
    "last_ingest_ms",
    "written_at_ms",
    "window_date",
    "rules_version",
];

/// The documented `argMax` read pattern (crates/storage/clickhouse/README.md): key columns as is,
/// the version as `max`, every other column as `argMax(col, version)`. The version is
/// renamed in a subquery because an alias equal to a column name would shadow that column
/// inside the other aggregates (error 184).
fn arg_max_query(
    table: &str,
    columns: &[&str],
    key: &[&str],
    version: &str,
    filter: &str,
) -> String {
    let select = columns
        .iter()
        .map(|c| {
            if key.contains(c) {
                (*c).to_owned()
            } else if *c == version {
                format!("max(_v) AS {c}")
            } else {
                format!("argMax({c}, _v) AS {c}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT {select} FROM (SELECT *, {version} AS _v FROM {table} WHERE {filter}) \
         GROUP BY {} ORDER BY {}",
        key.join(", "),
        key.join(", ")
    )
}

/// A fresh database with the schema applied.
async fn fresh() -> Database {
    let db = Database::unique("pulse_test");
    migrate(&db).await.unwrap();
    db
}

async fn insert<T>(cfg: &ClickHouseConfig, table: &str, rows: &[T])
where
    T: clickhouse::RowOwned + clickhouse::RowWrite,
{
    let mut insert = cfg.client().insert::<T>(table).await.unwrap();
    for r in rows {
        insert.write(r).await.unwrap();
    }
    insert.end().await.unwrap();
}

fn event(id: &str, user: &str, event_time_ms: i64) -> Event {
    events::event(id, user, event_time_ms)
        .purchase("EUR", 12_340_000)
        .page("/checkout")
        .session("s1")
        .property("b", "2")
        .property("a", "1")
        .source("web")
        .ingested(event_time_ms + 100, "shop")
        .build()
}

fn window(user: &str, start: i64, version: u64, page_views: u64, last: bool) -> ActivityRow {
    let a = UserWindowActivity {
        user_id: user.into(),
        window_start_ms: start,
        window_end_ms: start + 60_000,
        page_views,
        page_views_by_page: [("/a".to_owned(), page_views)].into(),
        events_by_type: [("page_view".to_owned(), page_views)].into(),
        revenue: Vec::new(),
        event_count: page_views,
        first_event_ms: start + 1,
        last_event_ms: start + 2,
        version,
        r#final: last,
        last_ingest_ms: start + 3,
        rules_version: String::new(),
    };
    ActivityRow::from_activity(&a, NOW + i64::try_from(version).unwrap())
}

#[tokio::test]
async fn migrations_apply_on_a_fresh_database_and_a_second_run_applies_nothing() {
    let cfg = Database::unique("pulse_test");
    let all: Vec<u32> = MIGRATIONS.iter().map(|m| m.0).collect();
    assert_eq!(migrate(&cfg).await.unwrap(), all);
    assert_eq!(migrate(&cfg).await.unwrap(), Vec::<u32>::new());

    let client = cfg.client();
    let tables: Vec<String> = client
        .query("SELECT name FROM system.tables WHERE database = ? ORDER BY name")
        .bind(cfg.database.as_str())
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(
        tables,
        [
            "audit_log",
            "events",
            "events_by_source_trace",
            "events_by_source_trace_mv",
            "freshness",
            "schema_migrations",
            "sessions",
            "user_activity"
        ]
    );
    let recorded: Vec<u32> = client
        .query("SELECT version FROM schema_migrations ORDER BY version")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(recorded, all);
}

/// An `events` row as a writer before migration 0002 wrote it (no `source_trace_id`).
#[derive(Debug, clickhouse::Row, serde::Serialize, serde::Deserialize)]
struct EventRowV1 {
    event_id: String,
    schema_version: u32,
    event_type: String,
    user_id: String,
    event_time_ms: i64,
    ingest_time_ms: i64,
    trace_id: String,
    event_date: u16,
}

#[tokio::test]
async fn a_store_at_the_initial_schema_upgrades_and_old_rows_and_old_writers_keep_working() {
    let cfg = Database::unique("pulse_upgrade");
    let server = cfg.server_client();
    let db = cfg.database.as_str();
    // The store as migration 0001 left it, applied and recorded the way `migrate` does.
    server
        .query(&format!("CREATE DATABASE {db}"))
        .execute()
        .await
        .unwrap();
    for statement in
        pulse_storage::migrate::split_statements(&MIGRATIONS[0].2.replace("{database}", db))
    {
        server.query(&statement).execute().await.unwrap();
    }
    server
        .query(&format!(
            "INSERT INTO {db}.schema_migrations (version, name, applied_at_ms) VALUES (1, 'init', 0)"
        ))
        .execute()
        .await
        .unwrap();
    let old = |id: &str| EventRowV1 {
        event_id: id.into(),
        schema_version: 1,
        event_type: "page_view".into(),
        user_id: "u1".into(),
        event_time_ms: NOW,
        ingest_time_ms: NOW,
        trace_id: "producer-before".into(),
        event_date: pulse_storage::rows::epoch_day(NOW),
    };
    insert(&cfg, "events", &[old("before")]).await;

    let later: Vec<u32> = MIGRATIONS.iter().skip(1).map(|m| m.0).collect();
    assert_eq!(
        migrate(&cfg).await.unwrap(),
        later,
        "only the new migrations run"
    );
    assert!(migrate(&cfg).await.unwrap().is_empty());

    // A writer of the old row shape still inserts (the new column takes its default);
    // a current writer stores the producer's trace id, which the lookup finds.
    insert(&cfg, "events", &[old("old-writer")]).await;
    let mut e = event("new", "u1", NOW + 1);
    e.metadata.as_mut().unwrap().trace_id = "abcd-1234".into();
    let new = EventRow::from_event(&e, 0, 1, Some("4bf92f3577b34da6a3ce929d0e0e4736"), NOW);
    insert(&cfg, "events", std::slice::from_ref(&new)).await;

    let client = cfg.client();
    let rows: Vec<(String, String, String)> = client
        .query("SELECT event_id, trace_id, source_trace_id FROM events FINAL ORDER BY event_id")
        .fetch_all()
        .await
        .unwrap();
    let row =
        |id: &str, trace: &str, source: &str| (id.to_owned(), trace.to_owned(), source.to_owned());
    assert_eq!(
        rows,
        [
            row("before", "producer-before", ""),
            row("new", "4bf92f3577b34da6a3ce929d0e0e4736", "abcd-1234"),
            row("old-writer", "producer-before", ""),
        ]
    );
    let all: Vec<EventRow> = client
        .query("SELECT ?fields FROM events FINAL WHERE event_id = 'new'")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(all, [new]);
    let found: Vec<String> = client
        .query(
            "SELECT event_id FROM events FINAL WHERE (user_id, event_time_ms, event_id) IN \
             (SELECT user_id, event_time_ms, event_id FROM events_by_source_trace \
              WHERE source_trace_id = ?)",
        )
        .bind("abcd-1234")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(found, ["new"]);
    let indexed: u64 = client
        .query("SELECT count() FROM events_by_source_trace")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(
        indexed, 1,
        "events without a producer trace id are not indexed"
    );
}

#[tokio::test]
async fn an_event_inserted_twice_is_returned_once_by_final_and_by_arg_max() {
    let cfg = fresh().await;
    let first = EventRow::from_event(&event("e1", "u1", NOW), 0, 10, None, NOW + 1_000);
    // The retried batch: same event and offset, written again later.
    let retried = EventRow {
        written_at_ms: NOW + 5_000,
        ..first.clone()
    };
    let other = EventRow::from_event(&event("e2", "u1", NOW + 1), 0, 11, None, NOW + 1_000);
    insert(&cfg, "events", &[first.clone(), other.clone()]).await;
    insert(&cfg, "events", std::slice::from_ref(&retried)).await;
    let client = cfg.client();

    let fin: Vec<EventRow> = client
        .query("SELECT ?fields FROM events FINAL WHERE user_id = ? ORDER BY event_id")
        .bind("u1")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(fin.len(), 2, "{fin:?}");
    assert!(fin[0] == first || fin[0] == retried, "{:?}", fin[0]);
    assert_eq!(fin[1], other);

    let sql = arg_max_query(
        "events",
        EVENT_COLUMNS,
        &["user_id", "event_time_ms", "event_id"],
        "ingest_time_ms",
        "user_id = ?",
    );
    let grouped: Vec<EventRow> = client.query(&sql).bind("u1").fetch_all().await.unwrap();
    assert_eq!(grouped.len(), 2, "{grouped:?}");
    assert!(
        grouped[0] == first || grouped[0] == retried,
        "{:?}",
        grouped[0]
    );
    assert_eq!(grouped[1], other);
}

#[tokio::test]
async fn a_window_inserted_with_versions_3_and_5_reads_back_as_the_version_5_row() {
    let cfg = fresh().await;
    let early = window("u1", NOW, 3, 2, false);
    let last = window("u1", NOW, 5, 7, true);
    insert(&cfg, "user_activity", std::slice::from_ref(&early)).await;
    insert(&cfg, "user_activity", std::slice::from_ref(&last)).await;
    // Arrival order does not matter: here the final row lands first.
    let late_early = window("u2", NOW, 3, 1, false);
    let first_final = window("u2", NOW, 5, 4, true);
    insert(&cfg, "user_activity", std::slice::from_ref(&first_final)).await;
    insert(&cfg, "user_activity", std::slice::from_ref(&late_early)).await;
    let client = cfg.client();

    let fin: Vec<ActivityRow> = client
        .query("SELECT ?fields FROM user_activity FINAL ORDER BY user_id, window_start_ms")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(fin, [last.clone(), first_final.clone()]);

    let sql = arg_max_query(
        "user_activity",
        ACTIVITY_COLUMNS,
        &["user_id", "window_start_ms"],
        "version",
        "1",
    );
    let grouped: Vec<ActivityRow> = client.query(&sql).fetch_all().await.unwrap();
    assert_eq!(grouped, [last, first_final]);
}

#[tokio::test]
async fn retention_drops_only_partitions_older_than_n_days() {
    let cfg = fresh().await;
    let day = |n: i64| NOW - n * DAY_MS;
    let events: Vec<EventRow> = [0, 3, 7, 8, 10]
        .iter()
        .map(|&n| EventRow::from_event(&event(&format!("e{n}"), "u1", day(n)), 0, n, None, NOW))
        .collect();
    insert(&cfg, "events", &events).await;
    insert(
        &cfg,
        "user_activity",
        &[
            window("u1", day(10), 1, 1, true),
            window("u1", day(1), 1, 1, true),
        ],
    )
    .await;
    let session = |id: &str, start: i64| {
        SessionRow::from_session(
            &pulse_contracts::pb::aggregates::v1::Session {
                session_id: id.into(),
                user_id: "u1".into(),
                start_ms: start,
                end_ms: start + 1_000,
                duration_ms: 1_000,
                version: 1,
                ..Default::default()
            },
            NOW,
        )
    };
    insert(
        &cfg,
        "sessions",
        &[session("s8", day(8)), session("s2", day(2))],
    )
    .await;

    let today = yyyymmdd_from_ms(NOW);
    assert_eq!(today, 20240229);
    let dropped = apply_retention(&cfg, 7, today).await.unwrap();
    let s = |t: &str, p: &str| (t.to_owned(), p.to_owned());
    assert_eq!(
        dropped,
        [
            s("events", "20240219"),
            s("events", "20240221"),
            s("sessions", "20240221"),
            s("user_activity", "20240219"),
        ]
    );

    let left: Vec<String> = cfg
        .client()
        .query("SELECT event_id FROM events ORDER BY event_time_ms")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(left, ["e7", "e3", "e0"]);
    let sessions: Vec<String> = cfg
        .client()
        .query("SELECT session_id FROM sessions")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(sessions, ["s2"]);
    let windows: u64 = cfg
        .client()
        .query("SELECT count() FROM user_activity")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(windows, 1);
    // Nothing left to drop.
    assert!(apply_retention(&cfg, 7, today).await.unwrap().is_empty());
}
