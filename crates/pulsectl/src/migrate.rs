//! `pulsectl migrate`: brings ClickHouse to the current schema with the writer's embedded
//! migrations (`pulse_storage::migrate`), printing the versions it applied. The migrations
//! themselves, and their idempotence, belong to the writer. Progress (on stderr) counts
//! the migrations; `pulse_storage::migrate` applies them in one call, so the bar moves from
//! none to all at the end, with the time taken.

use pulse_platform::clickhouse::ClickHouseConfig;
use pulse_platform::config::validate_all;
use pulse_storage::migrate::{MIGRATIONS, MigrateError, migrate};

use crate::progress::{Progress, ProgressArgs};

/// Applies the pending migrations; returns the versions applied (empty when up to date).
pub async fn apply(clickhouse: &ClickHouseConfig) -> Result<Vec<u32>, MigrateError> {
    migrate(clickhouse).await
}

pub async fn run(
    clickhouse: &ClickHouseConfig,
    progress: &ProgressArgs,
) -> Result<(), crate::Error> {
    validate_all(&[clickhouse])?;
    let bar = Progress::start(
        progress,
        "migrate",
        "migrations",
        Some(MIGRATIONS.len() as u64),
    );
    bar.set_message(format!("database {}", clickhouse.database));
    let applied = apply(clickhouse).await?;
    bar.set_position(MIGRATIONS.len() as u64);
    bar.set_message(format!(
        "database {}: {} applied now, {} already there",
        clickhouse.database,
        applied.len(),
        MIGRATIONS.len().saturating_sub(applied.len())
    ));
    bar.finish();
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
