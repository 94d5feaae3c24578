//! The audit trail's ClickHouse copy: the ClickHouse writer also consumes the audit topic
//! (`pulse.audit.v1`, records of `pulse_platform::audit`) in a consumer group of its own
//! (`<group>-audit`) and appends each record to the table `audit_log` (migration 0005), so
//! the trail outlives the topic's retention and can be queried with SQL
//! (`pulsectl audit --source clickhouse`).
//!
//! Exactly once without replacing rows: before every insert the copy reads the highest
//! offset already stored for each partition of the batch and leaves out the records at or
//! below it. A batch re-read after a crash between the insert and the offset commit (or by
//! the next owner after a rebalance) is therefore not stored twice. This relies on one
//! insert being one part (the table has no PARTITION BY and batches are small), so an
//! insert lands whole or not at all, and on each partition being written in offset order
//! by its one owner. Offsets are marked durable only after ClickHouse accepted the insert.
//!
//! A failed insert is retried with backoff until it succeeds or the writer stops (the
//! trail is never dropped); records that are not audit JSON of a known version are
//! skipped and counted. Owns the copy's loop and metrics; the record format and the row
//! are platform's, the table is the storage contract's.

use std::collections::BTreeMap;
use std::time::Duration;

use pulse_platform::audit::{AuditRecord, AuditRow};
use pulse_platform::clock::now_ms;
use pulse_platform::kafka::KafkaConsumer;
use rdkafka::Message;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::retry::Backoff;

/// Audit records inserted into `audit_log`.
pub const ROWS_WRITTEN_TOTAL: &str = "pulse_writer_audit_rows_written_total";
/// Audit rows of failed inserts (each is retried: a row may count more than once).
pub const ROWS_FAILED_TOTAL: &str = "pulse_writer_audit_rows_failed_total";
/// Audit records not inserted, by `reason`: `duplicate` (already stored, a re-delivery),
/// `unreadable` (not audit JSON of a known version).
pub const ROWS_SKIPPED_TOTAL: &str = "pulse_writer_audit_rows_skipped_total";

const SKIP_REASONS: [&str; 2] = ["duplicate", "unreadable"];

/// Describes the copy's metrics and registers them at zero (scraped before the first
/// record).
pub fn describe() {
    metrics::describe_counter!(
        ROWS_WRITTEN_TOTAL,
        "Audit records the writer inserted into the ClickHouse table audit_log."
    );
    metrics::describe_counter!(
        ROWS_FAILED_TOTAL,
        "Audit rows in inserts into audit_log that failed (retried with backoff; a row may count once per attempt)."
    );
    metrics::describe_counter!(
        ROWS_SKIPPED_TOTAL,
        "Audit records not inserted into audit_log (reason: duplicate = already stored, a re-delivery; unreadable = not audit JSON of a known version)."
    );
    metrics::counter!(ROWS_WRITTEN_TOTAL).increment(0);
    metrics::counter!(ROWS_FAILED_TOTAL).increment(0);
    for reason in SKIP_REASONS {
        metrics::counter!(ROWS_SKIPPED_TOTAL, "reason" => reason).increment(0);
    }
}

/// The copy loop (built by `crate::audit_copy`, run next to the ClickHouse sink).
pub struct AuditCopy {
    pub consumer: KafkaConsumer,
    pub client: clickhouse::Client,
    /// The table (`pulse_platform::audit::TABLE`).
    pub table: String,
    /// A batch is written at this many records...
    pub max_rows: usize,
    /// ...or when its oldest record is this old.
    pub max_age: Duration,
    /// Deadline of one insert (and of the offset query before it).
    pub insert_timeout: Duration,
    pub backoff: Backoff,
    /// How long the final write at shutdown may take.
    pub shutdown_timeout: Duration,
}

impl std::fmt::Debug for AuditCopy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditCopy")
            .field("group", &self.consumer.group_id())
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

/// What was read and not yet stored.
#[derive(Default)]
struct Pending {
    rows: Vec<AuditRow>,
    /// The highest offset read per (topic, partition), unreadable records included: what
    /// is marked durable once the rows are stored.
    read_upto: BTreeMap<(String, i32), i64>,
    oldest: Option<Instant>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.read_upto.is_empty()
    }
}

/// Why an insert failed.
#[derive(Debug, thiserror::Error)]
enum WriteError {
    #[error("reading the stored offsets of {table}: {source}")]
    Offsets {
        table: String,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("inserting into {table}: {source}")]
    Insert {
        table: String,
        #[source]
        source: clickhouse::error::Error,
    },
}

/// The rows of `rows` that are not stored yet: those above `stored` for their partition
/// (`stored` holds the highest stored offset per (topic, partition); absent = none).
pub fn not_stored(rows: &[AuditRow], stored: &BTreeMap<(String, i32), i64>) -> Vec<AuditRow> {
    rows.iter()
        .filter(|r| {
            stored
                .get(&(r.kafka_topic.clone(), r.kafka_partition))
                .is_none_or(|&max| r.kafka_offset > max)
        })
        .cloned()
        .collect()
}

impl AuditCopy {
    /// Runs until `stop`; then writes what was read (for at most the shutdown timeout)
    /// and commits.
    pub async fn run(mut self, stop: CancellationToken) {
        describe();
        let consumer = self.consumer.clone();
        let mut pending = Pending::default();
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = tick.tick() => {
                    if pending.oldest.is_some_and(|t| t.elapsed() >= self.max_age) {
                        self.flush(&mut pending, &stop).await;
                    }
                }
                msg = consumer.recv() => {
                    match msg {
                        Ok(msg) => add(&msg, &mut pending),
                        Err(e) => tracing::warn!(error = %e, "audit topic consume failed"),
                    }
                    if pending.rows.len() >= self.max_rows {
                        self.flush(&mut pending, &stop).await;
                    }
                }
            }
        }
        let never = CancellationToken::new();
        if tokio::time::timeout(self.shutdown_timeout, self.flush(&mut pending, &never))
            .await
            .is_err()
        {
            tracing::warn!(
                rows = pending.rows.len(),
                "audit rows not written at shutdown; the next owner re-reads them"
            );
        }
        if let Err(e) = self.consumer.commit_now() {
            tracing::warn!(error = %e, "audit offsets not committed at shutdown; records already stored are skipped when re-read");
        }
    }

    /// Writes `pending` (retrying until it is stored or `stop`), then marks its offsets
    /// durable.
    async fn flush(&mut self, pending: &mut Pending, stop: &CancellationToken) {
        if pending.is_empty() {
            return;
        }
        loop {
            match self.write(&pending.rows).await {
                Ok((written, duplicates)) => {
                    self.backoff.success();
                    metrics::counter!(ROWS_WRITTEN_TOTAL).increment(written as u64);
                    metrics::counter!(ROWS_SKIPPED_TOTAL, "reason" => "duplicate")
                        .increment(duplicates as u64);
                    if duplicates > 0 {
                        tracing::info!(
                            duplicates,
                            written,
                            "audit records already in the table were not inserted again"
                        );
                    }
                    for ((topic, partition), offset) in &pending.read_upto {
                        if let Err(e) = self.consumer.mark_durable(topic, *partition, *offset) {
                            tracing::warn!(error = %e, topic, partition, "storing the audit offset failed; the records are skipped when re-read");
                        }
                    }
                    *pending = Pending::default();
                    return;
                }
                Err(e) => {
                    metrics::counter!(ROWS_FAILED_TOTAL).increment(pending.rows.len() as u64);
                    let delay = self.backoff.failure();
                    tracing::warn!(
                        error = %e,
                        rows = pending.rows.len(),
                        retry_in_ms = delay.as_millis() as u64,
                        "audit rows not written; retrying"
                    );
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(delay) => {}
                    }
                }
            }
        }
    }

    /// Inserts the rows not stored yet; returns (inserted, left out as duplicates).
    async fn write(&self, rows: &[AuditRow]) -> Result<(usize, usize), WriteError> {
        let stored = self.stored_upto(rows).await?;
        let mut fresh = not_stored(rows, &stored);
        let duplicates = rows.len() - fresh.len();
        if fresh.is_empty() {
            return Ok((0, duplicates));
        }
        let written_at = now_ms();
        for r in &mut fresh {
            r.written_at_ms = written_at;
        }
        let insert = async {
            let mut ins = self.client.insert::<AuditRow>(&self.table).await?;
            for r in &fresh {
                ins.write(r).await?;
            }
            ins.end().await
        };
        tokio::time::timeout(self.insert_timeout, insert)
            .await
            .unwrap_or(Err(clickhouse::error::Error::TimedOut))
            .map_err(|source| WriteError::Insert {
                table: self.table.clone(),
                source,
            })?;
        Ok((fresh.len(), duplicates))
    }

    /// The highest stored offset of each (topic, partition) of `rows` that has any.
    async fn stored_upto(
        &self,
        rows: &[AuditRow],
    ) -> Result<BTreeMap<(String, i32), i64>, WriteError> {
        let mut partitions: Vec<(String, i32)> = rows
            .iter()
            .map(|r| (r.kafka_topic.clone(), r.kafka_partition))
            .collect();
        partitions.sort();
        partitions.dedup();
        let mut stored = BTreeMap::new();
        for (topic, partition) in partitions {
            let sql = format!(
                "SELECT count() AS n, max(kafka_offset) AS upto FROM {} \
                 WHERE kafka_topic = ? AND kafka_partition = ?",
                self.table
            );
            let query = self
                .client
                .query(&sql)
                .bind(topic.as_str())
                .bind(partition)
                .fetch_one::<(u64, i64)>();
            let (n, upto) = tokio::time::timeout(self.insert_timeout, query)
                .await
                .unwrap_or(Err(clickhouse::error::Error::TimedOut))
                .map_err(|source| WriteError::Offsets {
                    table: self.table.clone(),
                    source,
                })?;
            if n > 0 {
                stored.insert((topic, partition), upto);
            }
        }
        Ok(stored)
    }
}

impl crate::Config {
    /// Whether this writer copies the audit topic into ClickHouse: the live ClickHouse
    /// sink (not a shadow, not Parquet) with `--audit-copy` on.
    pub fn copies_audit(&self) -> bool {
        self.audit_copy && self.sink == crate::Sink::Clickhouse && self.shadow.is_none()
    }

    /// Whether this writer needs the audit topic: it copies it, or it is a ClickHouse
    /// writer that applies the migrations at start (`--migrate`) and records them there
    /// ([`record_migrations`]; an empty `--audit-topic` turns that off).
    pub fn audits(&self) -> bool {
        self.copies_audit()
            || (self.sink == crate::Sink::Clickhouse
                && self.migrate
                && !self.audit_topic.trim().is_empty())
    }

    /// The audit copy's consumer group: `<group>-audit`.
    pub fn audit_group(&self) -> String {
        format!("{}-audit", self.group())
    }

    /// The service its certificate reloads are recorded as (`keys.tls.reload`): the
    /// chart's component names, `writer-clickhouse` and `writer-parquet`, so the two
    /// deployments are told apart, or `writer-shadow` (the shadow's service name).
    pub fn tls_audit_service(&self) -> &'static str {
        match (self.sink, &self.shadow) {
            (_, Some(_)) => crate::SHADOW_SERVICE,
            (crate::Sink::Clickhouse, None) => "writer-clickhouse",
            (crate::Sink::Parquet, None) => "writer-parquet",
        }
    }
}

/// Makes the process's audit log (`pulse_platform::audit::set_process_log`) one whose
/// producer is made when a record comes, so a rotation of the admin listener's certificate
/// is audited (`keys.tls.reload`); an empty `--audit-topic` leaves it logged and counted
/// only.
pub fn audit_certificate_reloads(config: &crate::Config) {
    pulse_platform::audit::set_process_log(
        config.tls_audit_service(),
        pulse_platform::audit::AuditLog::on_demand(
            &config.kafka,
            "pulse-writer-audit",
            &config.audit_topic,
        ),
    );
}

/// The audit record of the ClickHouse migrations this writer applied at start
/// (`--migrate`): action `migrate` as `pulsectl migrate`'s, actor `pulse-writer`, the
/// database as target, the versions in the detail and the host (pod) as source. `None` when
/// nothing was applied (every start after the first) or the writer has no audit topic.
pub fn migrations_record(config: &crate::Config, applied: &[u32]) -> Option<AuditRecord> {
    if applied.is_empty() {
        return None;
    }
    let versions: Vec<String> = applied.iter().map(|v| format!("{v:04}")).collect();
    migrate_record(
        config,
        pulse_platform::audit::Outcome::Ok,
        format!("applied at start (--migrate): {}", versions.join(", ")),
    )
}

/// The audit record of start-up migrations ClickHouse refused (`--migrate`; the writer
/// retries them, `/readyz` names the error): as [`migrations_record`]'s, outcome `failed`
/// and the error in the detail. `None` without an audit topic.
pub fn migration_refused_record(config: &crate::Config, error: &str) -> Option<AuditRecord> {
    migrate_record(
        config,
        pulse_platform::audit::Outcome::Failed,
        format!("refused at start (--migrate), retrying: {error}"),
    )
}

fn migrate_record(
    config: &crate::Config,
    outcome: pulse_platform::audit::Outcome,
    detail: String,
) -> Option<AuditRecord> {
    if !config.migrate || !config.audits() {
        return None;
    }
    let target = format!(
        "{} database {}",
        config.clickhouse.url, config.clickhouse.database
    );
    let record = AuditRecord::new(
        "writer",
        "pulse-writer",
        pulse_platform::audit::action::MIGRATE,
        &target,
        outcome,
    )
    .with_detail(detail);
    Some(match std::env::var("HOSTNAME") {
        Ok(host) if !host.trim().is_empty() => record.with_source(host.trim()),
        _ => record,
    })
}

/// Writes [`migrations_record`] to the audit topic in the background: the writer does not
/// wait for it; a record that is not acknowledged is counted in
/// `pulse_audit_records_failed_total` and logged at error level, as every audit record.
pub fn record_migrations(
    config: &crate::Config,
    producer: &pulse_platform::kafka::KafkaProducer,
    applied: &[u32],
) {
    if let Some(record) = migrations_record(config, applied) {
        write_in_background(config, producer, record);
    }
}

/// The start-up migrations ClickHouse refused, each distinct error recorded once
/// ([`migration_refused_record`]) while the writer retries: an operator reading the trail
/// sees that and why the schema change did not happen, not one record per attempt. Its
/// producer is made at the first refusal (a start that succeeds makes none).
#[derive(Default)]
pub struct RefusedMigrations {
    last: Option<String>,
    producer: Option<pulse_platform::kafka::KafkaProducer>,
}

impl std::fmt::Debug for RefusedMigrations {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RefusedMigrations")
            .field("last", &self.last)
            .field("producer", &self.producer.is_some())
            .finish()
    }
}

impl RefusedMigrations {
    /// Records `error` unless it is the one recorded last.
    pub fn refused(&mut self, config: &crate::Config, error: &str) {
        if self.last.as_deref() == Some(error) {
            return;
        }
        let Some(record) = migration_refused_record(config, error) else {
            return;
        };
        self.last = Some(error.to_owned());
        if self.producer.is_none() {
            match pulse_platform::kafka::KafkaProducer::new(&config.kafka, "pulse-writer-audit") {
                Ok(p) => self.producer = Some(p),
                Err(e) => {
                    pulse_platform::audit::describe();
                    metrics::counter!(pulse_platform::audit::RECORDS_FAILED_TOTAL, "reason" => "produce")
                        .increment(1);
                    record.log_failed("produce", &e.to_string());
                    return;
                }
            }
        }
        if let Some(producer) = &self.producer {
            write_in_background(config, producer, record);
        }
    }
}

fn write_in_background(
    config: &crate::Config,
    producer: &pulse_platform::kafka::KafkaProducer,
    record: AuditRecord,
) {
    pulse_platform::audit::describe();
    tracing::info!(
        audit.action = %record.action,
        audit.outcome = %record.outcome,
        audit.target = %record.target,
        audit.detail = %record.detail,
        "audit"
    );
    let producer = producer.clone();
    let topic = config.audit_topic.clone();
    let timeout = pulse_platform::audit::write_timeout(&config.kafka);
    tokio::spawn(async move {
        let _ = pulse_platform::audit::write_now(&producer, &topic, &record, timeout).await;
    });
}

/// The audit copy of `config` (`None` when [`crate::Config::copies_audit`] is off): its
/// consumer joins `<group>-audit` on the audit topic here.
pub fn build(config: &crate::Config) -> Result<Option<AuditCopy>, rdkafka::error::KafkaError> {
    if !config.copies_audit() {
        return Ok(None);
    }
    let (consumer, _rebalances) = KafkaConsumer::new(
        &config.kafka,
        "pulse-writer-audit",
        &config.audit_group(),
        &[config.audit_topic.as_str()],
    )?;
    Ok(Some(AuditCopy {
        consumer,
        client: config.clickhouse.client(),
        table: pulse_platform::audit::TABLE.to_owned(),
        max_rows: config.batch_max_rows,
        max_age: Duration::from_millis(config.batch_max_age_ms),
        insert_timeout: Duration::from_millis(config.insert_timeout_ms),
        backoff: Backoff::new(
            Duration::from_millis(config.retry_base_ms),
            Duration::from_millis(config.retry_max_ms),
            config.breaker_failures,
            Duration::from_millis(config.breaker_probe_ms),
        ),
        shutdown_timeout: Duration::from_millis(config.shutdown_timeout_ms),
    }))
}

/// Adds one consumed record to `pending` (a record that is not audit JSON of a known
/// version is counted, logged and only advances the offset).
fn add(msg: &impl Message, pending: &mut Pending) {
    let (topic, partition, offset) = (msg.topic(), msg.partition(), msg.offset());
    pending
        .read_upto
        .insert((topic.to_owned(), partition), offset);
    pending.oldest.get_or_insert_with(Instant::now);
    match msg.payload().and_then(AuditRecord::from_json) {
        Some(record) => pending
            .rows
            .push(AuditRow::from_record(&record, topic, partition, offset, 0)),
        None => {
            metrics::counter!(ROWS_SKIPPED_TOTAL, "reason" => "unreadable").increment(1);
            tracing::warn!(
                topic,
                partition,
                offset,
                "audit topic record is not audit JSON of a known version; skipped"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulse_platform::audit::{Outcome, action};

    fn row(partition: i32, offset: i64) -> AuditRow {
        let r = AuditRecord::new("t", "a", action::MIGRATE, "", Outcome::Ok);
        AuditRow::from_record(&r, "audit", partition, offset, 0)
    }

    #[test]
    fn only_the_live_clickhouse_writer_copies_the_audit_topic() {
        use clap::Parser as _;
        let live = crate::Config::try_parse_from(["pulse-writer"]).unwrap();
        assert!(live.copies_audit());
        assert_eq!(live.audit_topic, pulse_contracts::topics::AUDIT);
        assert_eq!(live.audit_group(), "pulse-writer-clickhouse-audit");
        for args in [
            &["pulse-writer", "--audit-copy", "false"][..],
            &["pulse-writer", "--shadow", "x"],
            &["pulse-writer", "--sink", "parquet"],
        ] {
            let c = crate::Config::try_parse_from(args).unwrap();
            assert!(!c.copies_audit(), "{args:?}");
        }
    }

    #[test]
    fn certificate_reloads_name_the_writer_as_the_chart_does() {
        use clap::Parser as _;
        let service = |args: &[&str]| {
            crate::Config::try_parse_from(
                std::iter::once("pulse-writer").chain(args.iter().copied()),
            )
            .unwrap()
            .tls_audit_service()
        };
        assert_eq!(service(&[]), "writer-clickhouse");
        assert_eq!(service(&["--sink", "parquet"]), "writer-parquet");
        assert_eq!(service(&["--shadow", "x"]), crate::SHADOW_SERVICE);
    }

    #[test]
    fn applied_migrations_are_recorded_once_and_only_where_there_is_an_audit_topic() {
        use clap::Parser as _;
        let live = crate::Config::try_parse_from(["pulse-writer"]).unwrap();
        assert!(migrations_record(&live, &[]).is_none(), "nothing applied");
        let r = migrations_record(&live, &[4, 5]).unwrap();
        assert_eq!(
            (r.service.as_str(), r.actor.as_str(), r.action.as_str()),
            ("writer", "pulse-writer", action::MIGRATE)
        );
        assert_eq!(r.outcome, Outcome::Ok);
        assert_eq!(r.target, "http://127.0.0.1:8123 database pulse");
        assert!(r.detail.ends_with("0004, 0005"), "{}", r.detail);
        // A shadow or a writer without the copy still records its migrations; not without
        // --migrate, not the Parquet writer, not with an empty audit topic.
        for args in [
            &["pulse-writer", "--shadow", "x"][..],
            &["pulse-writer", "--audit-copy", "false"],
        ] {
            let c = crate::Config::try_parse_from(args).unwrap();
            assert!(migrations_record(&c, &[1]).is_some(), "{args:?}");
        }
        for args in [
            &["pulse-writer", "--migrate", "false"][..],
            &["pulse-writer", "--sink", "parquet"],
            &["pulse-writer", "--audit-copy", "false", "--audit-topic", ""],
        ] {
            let c = crate::Config::try_parse_from(args).unwrap();
            assert!(migrations_record(&c, &[1]).is_none(), "{args:?}");
        }
    }

    #[test]
    fn a_refused_migration_is_recorded_as_failed_with_the_error_where_applied_ones_would_be() {
        use clap::Parser as _;
        let live = crate::Config::try_parse_from(["pulse-writer"]).unwrap();
        let r = migration_refused_record(&live, "clickhouse refused: Code: 47").unwrap();
        assert_eq!(
            (r.actor.as_str(), r.action.as_str(), r.outcome),
            ("pulse-writer", action::MIGRATE, Outcome::Failed)
        );
        assert_eq!(
            r.detail,
            "refused at start (--migrate), retrying: clickhouse refused: Code: 47"
        );
        for args in [
            &["pulse-writer", "--migrate", "false"][..],
            &["pulse-writer", "--audit-copy", "false", "--audit-topic", ""],
        ] {
            let c = crate::Config::try_parse_from(args).unwrap();
            assert!(migration_refused_record(&c, "x").is_none(), "{args:?}");
        }
    }

    #[test]
    fn only_records_above_the_stored_offset_of_their_partition_are_inserted() {
        let rows = [row(0, 4), row(0, 5), row(0, 6), row(1, 0), row(1, 1)];
        let mut stored = BTreeMap::new();
        assert_eq!(not_stored(&rows, &stored).len(), 5, "nothing stored yet");
        stored.insert(("audit".to_owned(), 0), 5);
        let fresh: Vec<(i32, i64)> = not_stored(&rows, &stored)
            .iter()
            .map(|r| (r.kafka_partition, r.kafka_offset))
            .collect();
        assert_eq!(fresh, [(0, 6), (1, 0), (1, 1)]);
        stored.insert(("audit".to_owned(), 1), 1);
        stored.insert(("other".to_owned(), 0), 100);
        assert_eq!(
            not_stored(&rows, &stored).len(),
            1,
            "another topic's offsets do not count"
        );
    }
}
