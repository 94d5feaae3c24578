//! `pulsectl topics create`: creates every Pulse topic that is missing, with the
//! configured partitions (the `_schemas` log is compacted with one partition).

use pulse_contracts::topics;
use pulse_platform::config::validate_all;
use pulse_platform::kafka::{KafkaConfig, TopicSpec, ensure_topics};

use crate::Error;

#[derive(Debug, clap::Subcommand)]
pub enum TopicsCommand {
    /// Create every Pulse topic that does not exist yet (existing ones are left alone).
    Create,
    /// Print the topics Pulse uses and their partitions.
    List,
}

/// Every topic of Pulse, as created by `topics create`.
pub fn all_topics(partitions: i32) -> Vec<TopicSpec> {
    let mut specs: Vec<TopicSpec> = topics::ALL_DATA_TOPICS
        .iter()
        .map(|t| TopicSpec::new(*t, partitions))
        .collect();
    specs.push(TopicSpec::compacted(topics::SCHEMAS));
    specs.push(TopicSpec::compacted(topics::PROCESSOR_CHECKPOINTS));
    specs
}

pub async fn run(command: TopicsCommand, kafka: &KafkaConfig) -> Result<(), Error> {
    validate_all(&[kafka])?;
    match command {
        TopicsCommand::Create => {
            let specs = all_topics(kafka.partitions);
            let created = ensure_topics(kafka, &specs).await?;
            for s in &specs {
                let state = if created.contains(&s.name) {
                    "created"
                } else {
                    "exists"
                };
                println!("{:<28} {:>3} partition(s)  {state}", s.name, s.partitions);
            }
        }
        TopicsCommand::List => {
            for s in all_topics(kafka.partitions) {
                println!("{:<28} {:>3} partition(s)", s.name, s.partitions);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_data_topic_and_the_compacted_logs_are_created() {
        let specs = all_topics(6);
        assert_eq!(specs.len(), topics::ALL_DATA_TOPICS.len() + 2);
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
        assert_eq!(cp.partitions, 1);
        let schemas = specs.iter().find(|s| s.name == topics::SCHEMAS).unwrap();
        assert_eq!(schemas.partitions, 1);
        assert_eq!(
            schemas.configs,
            vec![("cleanup.policy".to_string(), "compact".to_string())]
        );
    }
}
