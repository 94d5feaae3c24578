//! ClickHouse schema migrations and day-partition retention for the hot store.
//!
//! The migrations live in `crates/storage/clickhouse/` as plain SQL and are embedded here, so the
//! writer binary can bring any ClickHouse (Debian's 18.16 or a current release) to the
//! current schema on start-up. Each file uses the literal placeholder `{database}` for
//! the configured database. Applied versions are recorded in `schema_migrations`;
//! statements are written re-runnable (`IF NOT EXISTS`) so an interrupted migration, or
//! two writers migrating at once, is harmless.

use pulse_platform::clock::now_ms;

use pulse_platform::clickhouse::ClickHouseConfig;

/// Migrations embedded from `crates/storage/clickhouse/` (`include_str!`), in order:
/// `(version, name, sql)`.
pub const MIGRATIONS: &[(u32, &str, &str)] = &[
    (1, "init", include_str!("../clickhouse/0001_init.sql")),
    (
        2,
        "source_trace_id",
        include_str!("../clickhouse/0002_source_trace_id.sql"),
    ),
    (
        3,
        "events_by_source_trace",
        include_str!("../clickhouse/0003_events_by_source_trace.sql"),
    ),
    (
        4,
        "rules_version",
        include_str!("../clickhouse/0004_rules_version.sql"),
    ),
    (
        5,
        "audit_log",
        include_str!("../clickhouse/0005_audit_log.sql"),
    ),
];

/// The bookkeeping table, created before it is read (migration 0001 declares it too).
const SCHEMA_MIGRATIONS_DDL: &str = "CREATE TABLE IF NOT EXISTS {database}.schema_migrations \
     (version UInt32, name String, applied_at_ms Int64) ENGINE = MergeTree ORDER BY version";

/// The day-partitioned tables that retention trims.
pub const RETENTION_TABLES: &[&str] = &[
    "events",
    "events_by_source_trace",
    "user_activity",
    "sessions",
];

/// The live tables a shadow processor's writer has copies of (`--shadow`): the aggregates.
pub const SHADOW_TABLES: &[&str] = &["user_activity", "sessions"];

/// The shadow `shadow`'s copy of the live table `live`: `<live>_shadow_<shadow>` with `-`
/// as `_` (a plain identifier; shadow names have no `_`, so two names never share a table).
pub fn shadow_table(live: &str, shadow: &str) -> String {
    format!("{live}_shadow_{}", shadow.replace('-', "_"))
}

fn valid_shadow(name: &str) -> Result<&str, MigrateError> {
    pulse_contracts::topics::validate_shadow_name(name)
        .map_err(|_| MigrateError::InvalidShadow(name.to_owned()))
}

/// The column additions of the migrations to the live table `live` (`ALTER TABLE
/// {db}.{live} ADD COLUMN …`), rewritten for its copy `table`, in migration order: what
/// brings a copy made before those migrations to the live table's columns.
pub fn shadow_column_additions(db: &str, live: &str, table: &str) -> Vec<String> {
    let prefix = format!("ALTER TABLE {db}.{live} ");
    MIGRATIONS
        .iter()
        .flat_map(|(_, _, sql)| split_statements(&render(sql, db)))
        .filter(|s| s.to_ascii_uppercase().contains("ADD COLUMN"))
        .filter_map(|s| {
            s.strip_prefix(&prefix)
                .map(|rest| format!("ALTER TABLE {db}.{table} {rest}"))
        })
        .collect()
}

/// Creates the shadow's tables (if missing) as copies of the live ones: same columns,
/// engine, ordering key and partitioning (`CREATE TABLE … AS`, valid on 18.16). Run after
/// the migrations; returns the tables' names. A copy made before a migration that added
/// a column to the live table (0004's `rules_version`) gets the column here: each
/// addition is applied to the copy, "already exists" counting as done, as in [`migrate`].
/// Other changes to a live table do not reach an existing copy: discard and recreate it.
pub async fn create_shadow_tables(
    cfg: &ClickHouseConfig,
    shadow: &str,
) -> Result<Vec<String>, MigrateError> {
    let db = valid_database(&cfg.database)?;
    let shadow = valid_shadow(shadow)?;
    let server = cfg.server_client();
    let mut made = Vec::new();
    for live in SHADOW_TABLES {
        let table = shadow_table(live, shadow);
        server
            .query_raw(&format!(
                "CREATE TABLE IF NOT EXISTS {db}.{table} AS {db}.{live}"
            ))
            .execute()
            .await
            .map_err(query_error(format!("creating {table}")))?;
        for statement in shadow_column_additions(db, live, &table) {
            match server.query_raw(&statement).execute().await {
                Err(e) if is_added_column(&statement, &e.to_string()) => {}
                result => result.map_err(query_error(format!(
                    "adding a column to {table}: {}",
                    head(&statement)
                )))?,
            }
        }
        made.push(table);
    }
    Ok(made)
}

/// Drops the shadow's tables (those that exist); returns their names.
pub async fn drop_shadow_tables(
    cfg: &ClickHouseConfig,
    shadow: &str,
) -> Result<Vec<String>, MigrateError> {
    let db = valid_database(&cfg.database)?;
    let shadow = valid_shadow(shadow)?;
    let server = cfg.server_client();
    let mut dropped = Vec::new();
    for live in SHADOW_TABLES {
        let table = shadow_table(live, shadow);
        server
            .query_raw(&format!("DROP TABLE IF EXISTS {db}.{table}"))
            .execute()
            .await
            .map_err(query_error(format!("dropping {table}")))?;
        dropped.push(table);
    }
    Ok(dropped)
}

/// Why migrating or trimming failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The database name would not be a plain identifier.
    #[error("invalid ClickHouse database name {0:?}: letters, digits and _ only")]
    InvalidDatabase(String),
    /// The shadow name would not make a plain identifier.
    #[error("invalid shadow name {0:?}: 1 to 32 of a-z, 0-9 and - only")]
    InvalidShadow(String),
    /// A statement of a migration failed.
    #[error("migration {version} failed at `{statement}`: {source}")]
    Sql {
        version: u32,
        /// The first 80 characters of the statement.
        statement: String,
        #[source]
        source: clickhouse::error::Error,
    },
    /// A bookkeeping or retention query failed.
    #[error("ClickHouse {step} failed: {source}")]
    Query {
        step: String,
        #[source]
        source: clickhouse::error::Error,
    },
    /// `today_yyyymmdd` is not a calendar date.
    #[error("{0} is not a YYYYMMDD date")]
    InvalidDate(u32),
}

#[derive(Debug, clickhouse::Row, serde::Serialize)]
struct MigrationRow {
    version: u32,
    name: String,
    applied_at_ms: i64,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct PartRow {
    table: String,
    partition_id: String,
}

fn valid_database(name: &str) -> Result<&str, MigrateError> {
    if !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        Ok(name)
    } else {
        Err(MigrateError::InvalidDatabase(name.to_owned()))
    }
}

/// Replaces the `{database}` placeholder.
fn render(sql: &str, database: &str) -> String {
    sql.replace("{database}", database)
}

fn query_error(step: impl Into<String>) -> impl FnOnce(clickhouse::error::Error) -> MigrateError {
    let step = step.into();
    move |source| MigrateError::Query { step, source }
}

/// Splits a SQL script into statements on `;` outside of quotes and comments. Comments
/// are dropped (replaced by a space), statements are trimmed, empty ones skipped.
pub fn split_statements(sql: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut chars = sql.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\'' | '"' | '`' => {
                cur.push(c);
                while let Some(q) = chars.next() {
                    cur.push(q);
                    if q == '\\' {
                        if let Some(escaped) = chars.next() {
                            cur.push(escaped);
                        }
                    } else if q == c {
                        // A doubled quote is an escaped quote, not the end.
                        if chars.peek() == Some(&c) {
                            cur.push(c);
                            chars.next();
                        } else {
                            break;
                        }
                    }
                }
            }
            '-' if chars.peek() == Some(&'-') => {
                for n in chars.by_ref() {
                    if n == '\n' {
                        break;
                    }
                }
                cur.push(' ');
            }
            '/' if chars.peek() == Some(&'*') => {
                chars.next();
                let mut prev = '\0';
                for n in chars.by_ref() {
                    if prev == '*' && n == '/' {
                        break;
                    }
                    prev = n;
                }
                cur.push(' ');
            }
            ';' => {
                let stmt = cur.trim();
                if !stmt.is_empty() {
                    out.push(stmt.to_owned());
                }
                cur.clear();
            }
            _ => cur.push(c),
        }
    }
    let stmt = cur.trim();
    if !stmt.is_empty() {
        out.push(stmt.to_owned());
    }
    out
}

/// Whether `error` of `statement` says that the column it adds exists already.
fn is_added_column(statement: &str, error: &str) -> bool {
    statement.to_ascii_uppercase().contains("ADD COLUMN") && error.contains("already exists")
}

fn head(statement: &str) -> String {
    let flat = statement.split_whitespace().collect::<Vec<_>>().join(" ");
    flat.chars().take(80).collect()
}

/// Creates the database if missing and applies every migration not yet recorded in
/// `schema_migrations`, statement by statement, recording each applied version.
/// Idempotent: a second run applies nothing. Returns the versions applied now.
pub async fn migrate(cfg: &ClickHouseConfig) -> Result<Vec<u32>, MigrateError> {
    let db = valid_database(&cfg.database)?;
    let server = cfg.server_client();
    server
        .query_raw(&format!("CREATE DATABASE IF NOT EXISTS {db}"))
        .execute()
        .await
        .map_err(query_error(format!("CREATE DATABASE {db}")))?;
    server
        .query_raw(&render(SCHEMA_MIGRATIONS_DDL, db))
        .execute()
        .await
        .map_err(query_error("creating schema_migrations"))?;
    let done: Vec<u32> = server
        .query_raw(&format!(
            "SELECT DISTINCT version FROM {db}.schema_migrations"
        ))
        .fetch_all()
        .await
        .map_err(query_error("reading schema_migrations"))?;

    let client = cfg.client();
    let mut applied = Vec::new();
    for &(version, name, sql) in MIGRATIONS {
        if done.contains(&version) {
            continue;
        }
        for statement in split_statements(&render(sql, db)) {
            match server.query_raw(&statement).execute().await {
                // No `ADD COLUMN IF NOT EXISTS` on 18.16: a column an interrupted run of
                // this migration already added is done (migration 0004 adds two).
                Err(e) if is_added_column(&statement, &e.to_string()) => {}
                result => result.map_err(|source| MigrateError::Sql {
                    version,
                    statement: head(&statement),
                    source,
                })?,
            }
        }
        let mut insert = client
            .insert::<MigrationRow>("schema_migrations")
            .await
            .map_err(query_error("recording a migration"))?;
        insert
            .write(&MigrationRow {
                version,
                name: name.to_owned(),
                applied_at_ms: now_ms(),
            })
            .await
            .map_err(query_error("recording a migration"))?;
        insert
            .end()
            .await
            .map_err(query_error("recording a migration"))?;
        tracing::info!(database = db, version, name, "applied ClickHouse migration");
        applied.push(version);
    }
    Ok(applied)
}

/// `YYYYMMDD` of the UTC day containing `ms` (epoch milliseconds).
pub fn yyyymmdd_from_ms(ms: i64) -> u32 {
    time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1_000))
        .map_or(19_700_101, |t| yyyymmdd(t.date()))
}

fn yyyymmdd(date: time::Date) -> u32 {
    u32::try_from(date.year()).unwrap_or(0) * 10_000
        + u32::from(u8::from(date.month())) * 100
        + u32::from(date.day())
}

/// The oldest day kept: `today - retention_days`, as `YYYYMMDD` (0 if before year 1).
fn cutoff_yyyymmdd(today_yyyymmdd: u32, retention_days: u32) -> Result<u32, MigrateError> {
    let bad = || MigrateError::InvalidDate(today_yyyymmdd);
    let year = i32::try_from(today_yyyymmdd / 10_000).map_err(|_| bad())?;
    let month = u8::try_from(today_yyyymmdd / 100 % 100)
        .ok()
        .and_then(|m| time::Month::try_from(m).ok())
        .ok_or_else(bad)?;
    let day = u8::try_from(today_yyyymmdd % 100).map_err(|_| bad())?;
    let today = time::Date::from_calendar_date(year, month, day).map_err(|_| bad())?;
    Ok(today
        .checked_sub(time::Duration::days(i64::from(retention_days)))
        .map_or(0, yyyymmdd))
}

/// Whether a partition id is a `YYYYMMDD` day before `cutoff` (other ids are never dropped).
fn is_expired(partition_id: &str, cutoff: u32) -> bool {
    partition_id.len() == 8
        && partition_id.bytes().all(|b| b.is_ascii_digit())
        && partition_id.parse::<u32>().is_ok_and(|day| day < cutoff)
}

/// Drops the day partitions of `events` (and its lookup `events_by_source_trace`),
/// `user_activity` and `sessions` older than
/// `retention_days` before `today_yyyymmdd` (a day `retention_days` ago is kept; with 0
/// only today is kept), found by partition id in `system.parts` (active parts only).
/// Returns the `(table, partition_id)` pairs dropped.
pub async fn apply_retention(
    cfg: &ClickHouseConfig,
    retention_days: u32,
    today_yyyymmdd: u32,
) -> Result<Vec<(String, String)>, MigrateError> {
    let db = valid_database(&cfg.database)?;
    let cutoff = cutoff_yyyymmdd(today_yyyymmdd, retention_days)?;
    let server = cfg.server_client();
    let tables = RETENTION_TABLES
        .iter()
        .map(|t| format!("'{t}'"))
        .collect::<Vec<_>>()
        .join(", ");
    let parts: Vec<PartRow> = server
        .query(&format!(
            "SELECT DISTINCT table, partition_id FROM system.parts \
             WHERE database = ? AND active AND table IN ({tables}) \
             ORDER BY table, partition_id"
        ))
        .bind(db)
        .fetch_all()
        .await
        .map_err(query_error("listing partitions"))?;

    let mut dropped = Vec::new();
    for part in parts {
        if !is_expired(&part.partition_id, cutoff) {
            continue;
        }
        // Both parts are checked identifiers: a known table and an all-digit id.
        server
            .query_raw(&format!(
                "ALTER TABLE {db}.{} DROP PARTITION {}",
                part.table, part.partition_id
            ))
            .execute()
            .await
            .map_err(query_error(format!(
                "dropping partition {} of {}",
                part.partition_id, part.table
            )))?;
        tracing::info!(
            database = db,
            table = part.table,
            partition = part.partition_id,
            "dropped expired partition"
        );
        dropped.push((part.table, part.partition_id));
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_on_semicolons_outside_quotes_and_comments() {
        let sql = "-- header; not a split\nCREATE TABLE a (x String DEFAULT ';');\n\
                   /* block ; comment */ SELECT 'it''s;' , \"q;\" , `b;`;\n\
                   SELECT 'back\\'slash;'\n;;\n  -- trailing comment only\n";
        assert_eq!(
            split_statements(sql),
            vec![
                "CREATE TABLE a (x String DEFAULT ';')".to_owned(),
                "SELECT 'it''s;' , \"q;\" , `b;`".to_owned(),
                "SELECT 'back\\'slash;'".to_owned(),
            ]
        );
    }

    #[test]
    fn only_an_added_column_that_exists_counts_as_done() {
        let add = "ALTER TABLE pulse.sessions ADD COLUMN rules_version String DEFAULT ''";
        // 18.16 and current releases word it alike.
        let exists = "Code: 44, e.displayText() = DB::Exception: Cannot add column rules_version: column with this name already exists";
        assert!(is_added_column(add, exists));
        assert!(!is_added_column(
            add,
            "Code: 60, e.displayText() = DB::Exception: Table pulse.sessions doesn't exist"
        ));
        assert!(!is_added_column(
            "CREATE TABLE pulse.x (a String) ENGINE = Log",
            exists
        ));
    }

    #[test]
    fn a_shadow_copy_gets_the_column_additions_of_its_live_table_only() {
        let adds = shadow_column_additions("pulse", "sessions", "sessions_shadow_v2");
        assert_eq!(
            adds,
            ["ALTER TABLE pulse.sessions_shadow_v2 ADD COLUMN rules_version String DEFAULT ''"]
        );
        let adds = shadow_column_additions("pulse", "user_activity", "user_activity_shadow_v2");
        assert_eq!(adds.len(), 1, "{adds:?}");
        assert!(
            adds[0]
                .starts_with("ALTER TABLE pulse.user_activity_shadow_v2 ADD COLUMN rules_version")
        );
        // events' source_trace_id (0002) is no aggregate's.
        for live in SHADOW_TABLES {
            let adds = shadow_column_additions("pulse", live, "x");
            assert!(
                adds.iter().all(|a| !a.contains("source_trace_id")),
                "{adds:?}"
            );
        }
    }

    #[test]
    fn the_last_statement_needs_no_semicolon() {
        assert_eq!(
            split_statements("SELECT 1; SELECT 2"),
            vec!["SELECT 1", "SELECT 2"]
        );
        assert!(split_statements(" \n-- nothing\n ; ").is_empty());
    }

    #[test]
    fn migrations_are_ordered_and_render_the_database() {
        let versions: Vec<u32> = MIGRATIONS.iter().map(|m| m.0).collect();
        let mut sorted = versions.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(versions, sorted);
        for &(_, _, sql) in MIGRATIONS {
            for statement in split_statements(&render(sql, "pulse_x")) {
                assert!(!statement.contains("{database}"), "{statement}");
                // Sent with query_raw, but keep the scripts free of bind markers anyway.
                assert!(!statement.contains('?'), "{statement}");
            }
        }
    }

    #[test]
    fn the_initial_migration_creates_every_table_within_the_18_16_subset() {
        let statements = split_statements(&render(MIGRATIONS[0].2, "pulse"));
        for table in [
            "events",
            "user_activity",
            "sessions",
            "freshness",
            "schema_migrations",
        ] {
            let create = format!("CREATE TABLE IF NOT EXISTS pulse.{table}");
            assert!(
                statements.iter().any(|s| s.starts_with(&create)),
                "{table} missing"
            );
        }
        for statement in &statements {
            for banned in [
                "DateTime64",
                "TTL",
                "LowCardinality",
                "Map(",
                "Nullable",
                "JSON",
            ] {
                assert!(!statement.contains(banned), "{banned} in {statement}");
            }
        }
    }

    #[test]
    fn every_migration_stays_within_the_18_16_subset() {
        for &(version, _, sql) in MIGRATIONS {
            for statement in split_statements(&render(sql, "pulse")) {
                for banned in [
                    "DateTime64",
                    "TTL",
                    "LowCardinality",
                    "Map(",
                    "Nullable",
                    "JSON",
                    "INDEX",
                ] {
                    assert!(
                        !statement.contains(banned),
                        "{version}: {banned} in {statement}"
                    );
                }
            }
        }
        // 18.16 has no `ADD COLUMN IF NOT EXISTS`: a migration with a column addition
        // holds only column additions (one column each), which the runner treats as done
        // when the column exists, so a failed one is retried from the start.
        for &(version, _, sql) in MIGRATIONS {
            let statements = split_statements(sql);
            if statements.iter().any(|s| s.contains("ADD COLUMN")) {
                for s in &statements {
                    assert!(
                        s.starts_with("ALTER TABLE") && s.matches("ADD COLUMN").count() == 1,
                        "migration {version}: {s}"
                    );
                }
            }
        }
    }

    #[test]
    fn bookkeeping_ddl_matches_the_migration() {
        let ddl = render(SCHEMA_MIGRATIONS_DDL, "pulse");
        let from_file: String = split_statements(&render(MIGRATIONS[0].2, "pulse"))
            .into_iter()
            .find(|s| s.contains("pulse.schema_migrations"))
            .unwrap_or_default();
        let squash = |s: &str| s.split_whitespace().collect::<String>();
        assert_eq!(squash(&ddl), squash(&from_file));
    }

    #[test]
    fn database_names_are_plain_identifiers() {
        assert!(valid_database("pulse_1").is_ok());
        assert!(valid_database("").is_err());
        assert!(valid_database("pulse; DROP").is_err());
        assert!(valid_database("a.b").is_err());
    }

    #[test]
    fn shadow_tables_are_plain_identifiers_distinct_from_the_live_ones() {
        assert_eq!(
            shadow_table("sessions", "gap-10m"),
            "sessions_shadow_gap_10m"
        );
        for live in SHADOW_TABLES {
            let t = shadow_table(live, "a-1");
            assert!(valid_database(&t).is_ok(), "{t}");
            assert!(!RETENTION_TABLES.contains(&t.as_str()));
        }
        assert!(valid_shadow("a-1").is_ok());
        for bad in ["", "A", "a_b", "a;b", "a b"] {
            assert!(valid_shadow(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn statement_heads_are_short_and_flat() {
        let long = format!("CREATE TABLE\n  x ({})", "a String, ".repeat(20));
        let h = head(&long);
        assert_eq!(h.chars().count(), 80);
        assert!(h.starts_with("CREATE TABLE x (a String"));
    }

    #[test]
    fn cutoff_counts_back_calendar_days() {
        assert_eq!(cutoff_yyyymmdd(20240110, 7).ok(), Some(20240103));
        assert_eq!(cutoff_yyyymmdd(20240301, 1).ok(), Some(20240229));
        assert_eq!(cutoff_yyyymmdd(20250101, 0).ok(), Some(20250101));
        assert_eq!(cutoff_yyyymmdd(20250101, 365).ok(), Some(20240102));
        assert!(matches!(
            cutoff_yyyymmdd(20241301, 1),
            Err(MigrateError::InvalidDate(20241301))
        ));
        assert!(cutoff_yyyymmdd(20240230, 1).is_err());
    }

    #[test]
    fn only_day_partitions_before_the_cutoff_expire() {
        assert!(is_expired("20240102", 20240103));
        assert!(!is_expired("20240103", 20240103));
        assert!(!is_expired("all", 20240103));
        assert!(!is_expired("2024010", 20240103));
        assert!(!is_expired("2024-01-", 20240103));
    }

    #[test]
    fn yyyymmdd_of_epoch_ms() {
        assert_eq!(yyyymmdd_from_ms(0), 19700101);
        assert_eq!(yyyymmdd_from_ms(-1), 19691231);
        assert_eq!(yyyymmdd_from_ms(1_709_164_800_000), 20240229);
    }
}
