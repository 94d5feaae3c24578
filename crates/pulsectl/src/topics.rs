//! `pulsectl topics create|list`: creates every Pulse topic that is missing, with the
//! configured partitions, replication factor, `min.insync.replicas` and retention per kind
//! (platform's `TopicSettings`; the `_schemas` log and the processor's checkpoints are
//! compacted with one partition), and reports existing topics that differ from them.
//! Existing topics are never altered: a difference is printed and fails the command
//! (unless `--allow-drift`), because silently keeping a topic with fewer replicas or a
//! shorter retention than configured is how durability is lost unnoticed.

use pulse_contracts::topics;
use pulse_platform::config::validate_all;
use pulse_platform::kafka::topics::{TopicError, describe_topics};
use pulse_platform::kafka::{KafkaConfig, TopicKind, TopicSpec, ensure_topics};

use crate::Error;

#[derive(Debug, clap::Subcommand)]
pub enum TopicsCommand {
    /// Create every Pulse topic that does not exist yet, and check the existing ones
    /// against the settings (partitions, replication factor, configs).
    Create {
        /// Report existing topics that differ from the settings without failing.
        #[arg(long = "allow-drift", env = "PULSE_TOPICS_ALLOW_DRIFT")]
        allow_drift: bool,
    },
    /// Print the topics Pulse uses with the partitions, replication factor and configs
    /// they are created with.
    List,
}

/// Every topic of Pulse, as created by `topics create`.
pub fn all_topics(partitions: i32) -> Vec<TopicSpec> {
    let kind = |t: &str| match t {
        topics::EVENTS => TopicKind::Events,
        topics::EVENTS_DLQ => TopicKind::Dlq,
        topics::EVENTS_LATE => TopicKind::Late,
        _ => TopicKind::Aggregates,
    };
    let mut specs: Vec<TopicSpec> = topics::ALL_DATA_TOPICS
        .iter()
        .map(|t| TopicSpec::of(kind(t), *t, partitions))
        .collect();
    specs.push(TopicSpec::compacted(topics::SCHEMAS));
    specs.push(TopicSpec::compacted(topics::PROCESSOR_CHECKPOINTS));
    specs.push(pulse_platform::audit::topic_spec(topics::AUDIT));
    specs
}

pub async fn run(command: TopicsCommand, kafka: &KafkaConfig) -> Result<(), Error> {
    match command {
        TopicsCommand::Create { allow_drift } => create(kafka, allow_drift, &mut Vec::new()).await,
        TopicsCommand::List => list(kafka),
    }
}

/// `topics create`: creates the missing topics (their names pushed to `created` as soon as
/// the broker made them, so the caller can audit them whatever the outcome) and checks the
/// existing ones.
pub async fn create(
    kafka: &KafkaConfig,
    allow_drift: bool,
    created: &mut Vec<String>,
) -> Result<(), Error> {
    validate_all(&[kafka])?;
    let rf = kafka.topics.replication_factor;
    let specs = all_topics(kafka.partitions);
    created.extend(ensure_topics(kafka, &specs).await?);
    let names: Vec<&str> = specs.iter().map(|s| s.name.as_str()).collect();
    let states = describe_topics(kafka, &names).await?;
    let mut drifted = 0;
    for (s, state) in specs.iter().zip(&states) {
        let drift = match state {
            Some(state) if !created.contains(&s.name) => state.drift(s, &kafka.topics),
            _ => Vec::new(),
        };
        let status = if created.contains(&s.name) {
            "created"
        } else if drift.is_empty() {
            "exists"
        } else {
            "differs"
        };
        println!(
            "{:<32} {:>3} partition(s)  rf {rf}  {status}",
            s.name, s.partitions
        );
        for d in &drift {
            println!("    {d}");
        }
        drifted += usize::from(!drift.is_empty());
    }
    if drifted > 0 {
        let err = TopicError::Drift { count: drifted };
        if !allow_drift {
            return Err(err.into());
        }
        eprintln!("pulsectl: warning: {err}");
    }
    Ok(())
}

fn list(kafka: &KafkaConfig) -> Result<(), Error> {
    validate_all(&[kafka])?;
    let rf = kafka.topics.replication_factor;
    for s in all_topics(kafka.partitions) {
        let configs: Vec<String> = s
            .configs(&kafka.topics)
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        println!(
            "{:<32} {:>3} partition(s)  rf {rf}  {}",
            s.name,
            s.partitions,
            configs.join(" ")
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use pulse_platform::kafka::TopicSettings;

    #[test]
    fn every_data_topic_and_the_compacted_logs_are_created() {
        let specs = all_topics(6);
        assert_eq!(specs.len(), topics::ALL_DATA_TOPICS.len() + 3);
        assert!(
            specs
                .iter()
                .filter(|s| topics::ALL_DATA_TOPICS.contains(&s.name.as_str()))
                .all(|s| s.partitions == 6)
        );
        let cp = specs
            .iter()
            .find(|s| s.name == topics::PROCESSOR_CHECKPOINTS)
            .unwrap();
        assert_eq!((cp.partitions, cp.kind), (1, TopicKind::Compacted));
        let schemas = specs.iter().find(|s| s.name == topics::SCHEMAS).unwrap();
        assert_eq!(schemas.partitions, 1);
        assert!(
            schemas
                .configs(&TopicSettings::default())
                .contains(&("cleanup.policy".to_string(), "compact".to_string()))
        );
        // The audit trail: one partition (one order), deleted only after a year.
        let audit = specs.iter().find(|s| s.name == topics::AUDIT).unwrap();
        assert_eq!(audit.partitions, 1);
        let configs = audit.configs(&TopicSettings::default());
        assert!(configs.contains(&("cleanup.policy".to_string(), "delete".to_string())));
        assert!(configs.contains(&("retention.ms".to_string(), "31536000000".to_string())));
    }

    #[test]
    fn each_data_topic_gets_the_retention_of_its_kind() {
        let kind = |name: &str| {
            all_topics(1)
                .into_iter()
                .find(|s| s.name == name)
                .unwrap()
                .kind
        };
        assert_eq!(kind(topics::EVENTS), TopicKind::Events);
        assert_eq!(kind(topics::EVENTS_DLQ), TopicKind::Dlq);
        assert_eq!(kind(topics::EVENTS_LATE), TopicKind::Late);
        assert_eq!(kind(topics::USER_ACTIVITY), TopicKind::Aggregates);
        assert_eq!(kind(topics::SESSIONS), TopicKind::Aggregates);
    }
}
