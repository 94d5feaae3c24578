//! `pulsectl migrate`: brings ClickHouse to the current schema with the writer's embedded
//! migrations (`pulse_storage::migrate`), printing the versions it applied. The migrations
//! themselves, and their idempotence, belong to the writer.

use pulse_platform::clickhouse::ClickHouseConfig;
use pulse_platform::config::validate_all;
use pulse_storage::migrate::{MIGRATIONS, MigrateError, migrate};

/// Applies the pending migrations; returns the versions applied (empty when up to date).
pub async fn apply(clickhouse: &ClickHouseConfig) -> Result<Vec<u32>, MigrateError> {
    migrate(clickhouse).await
}

pub async fn run(clickhouse: &ClickHouseConfig) -> Result<(), crate::Error> {
    validate_all(&[clickhouse])?;
    let applied = apply(clickhouse).await?;
    let latest = MIGRATIONS.iter().map(|(v, _, _)| *v).max().unwrap_or(0);
    if applied.is_empty() {
        println!(
            "database {} is up to date (schema version {latest})",
            clickhouse.database
        );
    }
    for v in applied {
        let name = MIGRATIONS
            .iter()
            .find(|(version, _, _)| *version == v)
            .map_or("", |(_, name, _)| *name);
        println!("applied migration {v:04} {name}");
    }
    Ok(())
}
