//! The ClickHouse client settings against the real server (Debian's 18.16 in
//! scripts/test.sh): create a table, insert a batch with RowBinary, select it back.

use clickhouse::Row;
use serde::{Deserialize, Serialize};

use crate::support::cleanup::Database;

#[derive(Debug, Clone, PartialEq, Row, Serialize, Deserialize)]
struct EventRow {
    event_id: String,
    user_id: String,
    event_time_ms: i64,
    amount_micros: i64,
    version: u64,
}

#[tokio::test]
async fn a_batch_inserted_with_row_binary_reads_back_exactly() {
    let guard = Database::unique("pulse_test");
    let db = &guard.database;
    let cfg = pulse_tests::clickhouse();
    let server = cfg.server_client();
    server
        .query(&format!("CREATE DATABASE IF NOT EXISTS {db}"))
        .execute()
        .await
        .unwrap();
    let client = pulse_platform::clickhouse::ClickHouseConfig {
        database: db.clone(),
        ..cfg
    }
    .client();
    client
        .query(
            "CREATE TABLE events (event_id String, user_id String, event_time_ms Int64, \
             amount_micros Int64, version UInt64) \
             ENGINE = ReplacingMergeTree(version) ORDER BY event_id",
        )
        .execute()
        .await
        .unwrap();

    let rows: Vec<EventRow> = (0..1000)
        .map(|i| EventRow {
            event_id: format!("e{i:04}"),
            user_id: format!("u{}", i % 7),
            event_time_ms: 1_764_000_000_000 + i,
            amount_micros: i * 1_000_001,
            version: 1,
        })
        .collect();
    let mut insert = client.insert::<EventRow>("events").await.unwrap();
    for r in &rows {
        insert.write(r).await.unwrap();
    }
    insert.end().await.unwrap();

    let back: Vec<EventRow> = client
        .query("SELECT ?fields FROM events ORDER BY event_id")
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(back, rows);

    // Parameters are bound, not concatenated.
    let n: u64 = client
        .query("SELECT count() FROM events WHERE user_id = ?")
        .bind("u3")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(n, rows.iter().filter(|r| r.user_id == "u3").count() as u64);
}
