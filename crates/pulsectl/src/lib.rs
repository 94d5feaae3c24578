//! `pulsectl`, the operator CLI. Each subcommand is a module; this file holds the
//! command tree and dispatch. Implemented so far: `topics create|list`,
//! `schemas register|check`.

pub mod schemas;
pub mod topics;

use pulse_platform::kafka::KafkaConfig;

/// Pulse operator CLI.
#[derive(Debug, clap::Parser)]
#[command(name = "pulsectl", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
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
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<(), Error> {
    match cli.command {
        Command::Topics { command, kafka } => topics::run(command, &kafka).await,
        Command::Schemas { command } => schemas::run(command).await,
    }
}
