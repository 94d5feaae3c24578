//! The query API's ClickHouse access is read-only whatever user it connects as: every
//! statement of its store runs with `readonly=1` (`pulse_query_api::store::Store::new`), so
//! a statement that writes, drops, creates or changes a setting — say an injection that got
//! past the query builders — is refused by ClickHouse itself (code 164, READONLY), while
//! the same client reads. Against the real ClickHouse the scripts start, on a migrated
//! database, connecting as the same user the writer uses.

use std::time::Duration;

use crate::support::cleanup::Database;
use pulse_query_api::store::{QueryLimits, Store};

#[tokio::test]
async fn the_query_store_cannot_write_drop_create_or_lift_its_limits() {
    let ch = Database::migrated("pulse_query_ro").await;
    let store = Store::new(&ch, Duration::from_secs(5)).with_limits(QueryLimits {
        max_memory_bytes: 1 << 30,
        max_result_rows: 1_000,
    });
    let client = store.client();
    let db = &ch.database;
    for sql in [
        format!("INSERT INTO {db}.audit_log (id) VALUES ('x')"),
        format!("ALTER TABLE {db}.audit_log DELETE WHERE 1"),
        format!("DROP TABLE {db}.audit_log"),
        format!("CREATE TABLE {db}.made_by_query_api (a UInt8) ENGINE = Memory"),
        "SET max_result_rows = 0".to_owned(),
    ] {
        let e = client
            .query(&sql)
            .execute()
            .await
            .expect_err(&format!("the read-only store ran {sql:?}"));
        let text = e.to_string();
        assert!(
            text.contains("Code: 164") || text.to_ascii_lowercase().contains("readonly"),
            "{sql:?} refused for another reason: {text}"
        );
    }
    // Nothing changed, and the same client reads.
    let rows: u64 = client
        .query(&format!("SELECT count() FROM {db}.audit_log"))
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(rows, 0);
    let tables: Vec<String> = ch
        .server_client()
        .query(&format!(
            "SELECT name FROM system.tables WHERE database = '{db}' AND name = 'made_by_query_api'"
        ))
        .fetch_all()
        .await
        .unwrap();
    assert!(tables.is_empty(), "{tables:?}");
}
