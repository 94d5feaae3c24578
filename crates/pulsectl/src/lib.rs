//! `pulsectl`, the operator CLI. Each subcommand is a module; this file holds the
//! command tree and dispatch. Implemented: `topics create|list`, `schemas register|check`,
//! `migrate`, `loadgen`, `dlq inspect|redrive`, `slo`, `replay`, `ledger [watch]`. What
//! several commands share sits beside them: `ingest_client` (ingest's flags and clients),
//! `progress` (long work shown on stderr; the global `--progress` flags), `duration`.

pub mod audit;
pub mod dlq;
pub mod duration;
pub mod ingest_client;
pub mod ledger;
pub mod loadgen;
pub mod migrate;
pub mod progress;
pub mod replay;
pub mod schemas;
pub mod shadow;
pub mod slo;
pub mod topics;

use pulse_platform::clickhouse::ClickHouseConfig;
use pulse_platform::clock::rfc3339;
use pulse_platform::kafka::KafkaConfig;

/// Pulse operator CLI.
#[derive(Debug, clap::Parser)]
#[command(name = "pulsectl", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    #[command(flatten)]
    pub progress: progress::ProgressArgs,
    #[command(flatten)]
    pub audit: audit::AuditArgs,
}

#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Kafka topics.
    Topics {
        #[command(subcommand)]
        command: topics::TopicsCommand,
        #[command(flatten)]
        kafka: KafkaConfig,
    },
    /// Record schemas in the schema registry.
    Schemas {
        #[command(subcommand)]
        command: schemas::SchemasCommand,
    },
    /// Apply the ClickHouse migrations (idempotent); prints the versions applied.
    Migrate {
        #[command(flatten)]
        clickhouse: ClickHouseConfig,
        /// The broker the audit record of the migration is written to.
        #[command(flatten)]
        kafka: KafkaConfig,
    },
    /// Send a realistic, seeded workload to ingest (HTTP or gRPC) and report what happened.
    Loadgen(Box<loadgen::LoadgenArgs>),
    /// The dead-letter queue: inspect records, re-submit them to ingest.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Scrape the services' metrics and report the SLIs against their targets.
    Slo(slo::SloArgs),
    /// Re-publish the archived events of an event-time range to the events topic.
    Replay(Box<replay::ReplayArgs>),
    /// Reconcile a closed event-time range: every accepted event in one terminal state per
    /// path, revenue equal to the query API's (`ledger watch`: continuously, with metrics).
    Ledger(Box<ledger::LedgerArgs>),
    /// List the audit trail: schema changes, refused writes, key reloads, redrives,
    /// replays, migrations and shadow discards and promotions, with who, what, when and
    /// the outcome.
    Audit(Box<audit::ListArgs>),
    /// A shadow processor: register its schemas, diff it against live, discard it.
    Shadow {
        #[command(subcommand)]
        command: shadow::ShadowCommand,
    },
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Config(#[from] pulse_platform::config::ConfigErrors),
    #[error("topics: {0}")]
    Topics(#[from] pulse_platform::kafka::topics::TopicError),
    #[error("schemas: {0}")]
    Schemas(#[from] schemas::SchemaError),
    #[error("migrate: {0}")]
    Migrate(#[from] pulse_storage::migrate::MigrateError),
    #[error("loadgen: {0}")]
    Loadgen(#[from] loadgen::LoadgenError),
    #[error("dlq: {0}")]
    Dlq(#[from] dlq::DlqError),
    #[error("slo: {0}")]
    Slo(#[from] slo::SloError),
    #[error("replay: {0}")]
    Replay(#[from] replay::ReplayError),
    #[error("ledger: {0}")]
    Ledger(#[from] ledger::LedgerError),
    #[error("audit: {0}")]
    Audit(#[from] audit::AuditListError),
    #[error("shadow: {0}")]
    Shadow(#[from] shadow::ShadowError),
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<(), Error> {
    let progress = &cli.progress;
    match cli.command {
        Command::Topics {
            command: topics::TopicsCommand::Create { allow_drift },
            kafka,
        } => {
            // Audited when it changed something (topics created) or did not go through
            // (refused: bad flags, topics that differ; failed: the broker); a run that
            // found everything in place changed nothing and writes no record.
            let mut created = Vec::new();
            let result = topics::create(&kafka, allow_drift, &mut created).await;
            if !created.is_empty() || result.is_err() {
                let done = format!("created {}", created.join(", "));
                let outcome = ending(&result, done.clone(), |e| {
                    if created.is_empty() {
                        e.to_string()
                    } else {
                        format!("{done}; then: {e}")
                    }
                });
                audit::record(
                    &cli.audit,
                    &kafka,
                    pulse_platform::audit::action::TOPICS_CREATE,
                    &kafka.brokers,
                    outcome,
                )
                .await;
            }
            result
        }
        Command::Topics { command, kafka } => topics::run(command, &kafka).await,
        Command::Schemas { command } => schemas::run(command).await,
        Command::Migrate { clickhouse, kafka } => {
            let result = migrate::run(&clickhouse, progress).await;
            let outcome = ending(
                &result,
                format!("database {} migrated", clickhouse.database),
                Error::to_string,
            );
            let target = format!("{} database {}", clickhouse.url, clickhouse.database);
            audit::record(
                &cli.audit,
                &kafka,
                pulse_platform::audit::action::MIGRATE,
                &target,
                outcome,
            )
            .await;
            result
        }
        Command::Loadgen(args) => loadgen::run(*args, progress).await,
        Command::Dlq {
            command: dlq::DlqCommand::Redrive(args),
        } => {
            let (kafka, target) = (args.topic.kafka.clone(), args.topic.topic.clone());
            let detail = match &args.code {
                Some(code) => format!("records with code {code} to {}", args.ingest.target),
                None => format!("{} record(s) to {}", args.offsets.len(), args.ingest.target),
            };
            let result = dlq::run(dlq::DlqCommand::Redrive(args), progress).await;
            let outcome = ending(&result, detail, Error::to_string);
            audit::record(
                &cli.audit,
                &kafka,
                pulse_platform::audit::action::DLQ_REDRIVE,
                &target,
                outcome,
            )
            .await;
            result
        }
        Command::Dlq { command } => dlq::run(command, progress).await,
        Command::Slo(args) => slo::run(args).await,
        Command::Replay(args) if args.dry_run => replay::run(*args, progress).await,
        Command::Replay(args) => {
            let (kafka, target) = (args.kafka.clone(), args.topic.clone());
            let detail = format!("event time {} .. {}", rfc3339(args.from), rfc3339(args.to));
            let result = replay::run(*args, progress).await;
            let outcome = ending(&result, detail.clone(), |e| format!("{detail}: {e}"));
            audit::record(
                &cli.audit,
                &kafka,
                pulse_platform::audit::action::REPLAY,
                &target,
                outcome,
            )
            .await;
            result
        }
        Command::Ledger(args) => ledger::run(*args, progress, &cli.audit).await,
        Command::Audit(args) => audit::run(*args, &cli.audit, progress).await,
        Command::Shadow { command } => shadow::run(command, &cli.audit).await,
    }
}

/// How a command ended, for its audit record: `ok` with `done`; else `refused` or `failed`
/// ([`audit::Ending::of_error`]) with `error`'s statement of it.
fn ending(
    result: &Result<(), Error>,
    done: String,
    error: impl FnOnce(&Error) -> String,
) -> audit::Ending {
    match result {
        Ok(()) => audit::Ending::ok(done),
        Err(e) => audit::Ending::of_error(e, error(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_tree_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }

    #[test]
    fn loadgen_dlq_and_slo_parse_their_flags() {
        use clap::Parser;
        let cli = Cli::parse_from([
            "pulsectl",
            "loadgen",
            "--rate",
            "10",
            "--duration",
            "5s",
            "--seed",
            "42",
            "--grpc",
            "http://127.0.0.1:50051",
        ]);
        let Command::Loadgen(args) = cli.command else {
            panic!("not loadgen")
        };
        assert_eq!((args.rate, args.seed), (10.0, Some(42)));
        let cli = Cli::parse_from([
            "pulsectl",
            "dlq",
            "redrive",
            "--offsets",
            "0:1,2:3",
            "--kafka-brokers",
            "k:9092",
        ]);
        let Command::Dlq {
            command: dlq::DlqCommand::Redrive(r),
        } = cli.command
        else {
            panic!("not dlq redrive")
        };
        assert_eq!(r.offsets, vec![(0, 1), (2, 3)]);
        assert_eq!(r.topic.kafka.brokers, "k:9092");
        assert!(Cli::try_parse_from(["pulsectl", "dlq", "redrive"]).is_err());
        let cli = Cli::parse_from([
            "pulsectl",
            "dlq",
            "redrive",
            "--code",
            "missing_field",
            "--target",
            "https://ingest:8443",
            "--ca-file",
            "/etc/pulse/ca.pem",
        ]);
        let Command::Dlq {
            command: dlq::DlqCommand::Redrive(r),
        } = cli.command
        else {
            panic!("not dlq redrive")
        };
        assert_eq!(r.ingest.target, "https://ingest:8443");
        assert_eq!(
            r.ingest.ca_file.as_deref(),
            Some(std::path::Path::new("/etc/pulse/ca.pem"))
        );
        let cli = Cli::parse_from(["pulsectl", "slo", "--check"]);
        assert!(matches!(cli.command, Command::Slo(s) if s.check && s.metrics.len() == 4));
    }

    #[test]
    fn the_progress_flags_are_global_and_the_interval_is_checked() {
        use clap::Parser;
        let cli = Cli::parse_from(["pulsectl", "migrate"]);
        assert_eq!(cli.progress.mode, progress::Mode::Auto);
        assert_eq!(cli.progress.interval, std::time::Duration::from_secs(5));
        let cli = Cli::parse_from([
            "pulsectl",
            "replay",
            "--from",
            "0",
            "--to",
            "1",
            "--progress",
            "plain",
            "--progress-interval",
            "1s",
        ]);
        assert_eq!(cli.progress.mode, progress::Mode::Plain);
        assert_eq!(cli.progress.interval, std::time::Duration::from_secs(1));
        let cli = Cli::parse_from(["pulsectl", "--progress", "off", "migrate"]);
        assert_eq!(cli.progress.mode, progress::Mode::Off);
        let err = Cli::try_parse_from(["pulsectl", "migrate", "--progress-interval", "0s"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("at least 100ms"), "{err}");
        assert!(Cli::try_parse_from(["pulsectl", "migrate", "--progress", "fancy"]).is_err());
    }
}
