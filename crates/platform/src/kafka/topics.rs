//! Topic bootstrap and durability: creates the topics a service needs when they are
//! missing (the broker does not auto-create them), with an explicit replication factor,
//! `min.insync.replicas`, cleanup policy and retention per kind of topic
//! ([`TopicSettings`]), and reads back what an existing topic has ([`describe_topics`],
//! [`TopicState::drift`]) so `pulsectl topics create` can report topics that differ and the
//! processor can check the events topic's retention. Each admin operation runs beside the
//! connection check of [`preflight`], so a broker that refuses the client's SASL
//! authentication or TLS handshake fails it at once, naming why ([`TopicError::Refused`]),
//! instead of a timeout a minute later. Existing topics are never altered
//! here: the `rdkafka` crate offers only the legacy AlterConfigs request, which replaces
//! every setting of a topic and which the local broker does not implement.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{
    AdminClient, AdminOptions, NewTopic, OwnedResourceSpecifier, ResourceSpecifier,
    TopicReplication,
};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;

use crate::config::{Problems, Validate};
use crate::kafka::KafkaConfig;
use crate::kafka::preflight::{self, Refused};

/// What a topic holds; decides its cleanup policy and retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicKind {
    /// Accepted events (`pulse.events.v1`): the processor rebuilds open windows and
    /// sessions from it, so it must be kept longer than the longest of them.
    Events,
    /// Refused events, kept for inspection and redrive.
    Dlq,
    /// Events later than the allowed lateness.
    Late,
    /// The processor's outputs (user activity, sessions), read by the writers.
    Aggregates,
    /// A log-compacted topic (checkpoints, `_schemas`): kept by key, not by time.
    Compacted,
    /// Any other topic (benchmarks, tests): replication only; the broker's default
    /// cleanup policy and retention apply.
    Other,
}

/// Durability settings of the topics Pulse creates. The defaults suit a cluster of three
/// or more brokers (three replicas, writes need two in sync, as `acks=all` producers
/// expect); a single local broker needs `--kafka-replication-factor 1
/// --kafka-min-insync-replicas 1` ([`TopicSettings::single_broker`]). They apply when a
/// topic is created; `pulsectl topics create` reports existing topics that differ.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct TopicSettings {
    /// Replication factor of the topics Pulse creates (1 for a single broker).
    #[arg(
        long = "kafka-replication-factor",
        env = "PULSE_KAFKA_REPLICATION_FACTOR",
        default_value_t = 3
    )]
    pub replication_factor: i32,
    /// `min.insync.replicas` of the topics Pulse creates: replicas that must have a record
    /// before an `acks=all` produce succeeds; at most the replication factor (1 for a
    /// single broker).
    #[arg(
        long = "kafka-min-insync-replicas",
        env = "PULSE_KAFKA_MIN_INSYNC_REPLICAS",
        default_value_t = 2
    )]
    pub min_insync_replicas: i32,
    /// Retention of the events topic (humantime, e.g. `7d`). The processor refuses to
    /// start when it is shorter than the longest span a window or session holds.
    #[arg(
        long = "kafka-events-retention",
        env = "PULSE_KAFKA_EVENTS_RETENTION",
        default_value = "7d",
        value_parser = humantime::parse_duration
    )]
    pub events_retention: Duration,
    /// Retention of the DLQ topic: the time to inspect and redrive refused events.
    #[arg(
        long = "kafka-dlq-retention",
        env = "PULSE_KAFKA_DLQ_RETENTION",
        default_value = "30d",
        value_parser = humantime::parse_duration
    )]
    pub dlq_retention: Duration,
    /// Retention of the late-events topic.
    #[arg(
        long = "kafka-late-retention",
        env = "PULSE_KAFKA_LATE_RETENTION",
        default_value = "7d",
        value_parser = humantime::parse_duration
    )]
    pub late_retention: Duration,
    /// Retention of the aggregate topics (user activity, sessions) the writers read.
    #[arg(
        long = "kafka-aggregates-retention",
        env = "PULSE_KAFKA_AGGREGATES_RETENTION",
        default_value = "7d",
        value_parser = humantime::parse_duration
    )]
    pub aggregates_retention: Duration,
}

const DAY: Duration = Duration::from_secs(86_400);

impl Default for TopicSettings {
    fn default() -> Self {
        Self {
            replication_factor: 3,
            min_insync_replicas: 2,
            events_retention: 7 * DAY,
            dlq_retention: 30 * DAY,
            late_retention: 7 * DAY,
            aggregates_retention: 7 * DAY,
        }
    }
}

impl TopicSettings {
    /// The defaults with one replica, for a single broker (the local stack, tests).
    pub fn single_broker() -> Self {
        Self {
            replication_factor: 1,
            min_insync_replicas: 1,
            ..Self::default()
        }
    }

    /// The retention of `kind`, if Pulse sets one.
    pub fn retention(&self, kind: TopicKind) -> Option<Duration> {
        match kind {
            TopicKind::Events => Some(self.events_retention),
            TopicKind::Dlq => Some(self.dlq_retention),
            TopicKind::Late => Some(self.late_retention),
            TopicKind::Aggregates => Some(self.aggregates_retention),
            TopicKind::Compacted | TopicKind::Other => None,
        }
    }

    /// The topic-level configs Pulse sets on a topic of `kind`.
    pub fn configs(&self, kind: TopicKind) -> Vec<(String, String)> {
        let mut c = vec![(
            "min.insync.replicas".to_owned(),
            self.min_insync_replicas.to_string(),
        )];
        match kind {
            TopicKind::Compacted => c.push(("cleanup.policy".into(), "compact".into())),
            TopicKind::Other => {}
            _ => c.push(("cleanup.policy".into(), "delete".into())),
        }
        if let Some(r) = self.retention(kind) {
            c.push(("retention.ms".into(), r.as_millis().to_string()));
        }
        c
    }
}

impl Validate for TopicSettings {
    fn validate(&self, p: &mut Problems) {
        p.check(
            self.replication_factor >= 1,
            "--kafka-replication-factor / PULSE_KAFKA_REPLICATION_FACTOR",
            format!("must be >= 1, got {}", self.replication_factor),
        );
        p.check(
            self.min_insync_replicas >= 1 && self.min_insync_replicas <= self.replication_factor,
            "--kafka-min-insync-replicas / PULSE_KAFKA_MIN_INSYNC_REPLICAS",
            format!(
                "must be between 1 and the replication factor ({}), got {}",
                self.replication_factor, self.min_insync_replicas
            ),
        );
        for (name, d) in [
            ("--kafka-events-retention", self.events_retention),
            ("--kafka-dlq-retention", self.dlq_retention),
            ("--kafka-late-retention", self.late_retention),
            ("--kafka-aggregates-retention", self.aggregates_retention),
        ] {
            p.check(
                d >= Duration::from_secs(60) && i64::try_from(d.as_millis()).is_ok(),
                name,
                format!("must be at least 1m, got {}", humantime::format_duration(d)),
            );
        }
    }
}

/// A topic to create: name, partitions, kind and extra topic-level configs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub kind: TopicKind,
    /// Configs set on top of the kind's (they win).
    pub configs: Vec<(String, String)>,
}

impl TopicSpec {
    /// A topic of kind [`TopicKind::Other`].
    pub fn new(name: impl Into<String>, partitions: i32) -> Self {
        Self::of(TopicKind::Other, name, partitions)
    }

    /// A topic of `kind`.
    pub fn of(kind: TopicKind, name: impl Into<String>, partitions: i32) -> Self {
        Self {
            name: name.into(),
            partitions,
            kind,
            configs: Vec::new(),
        }
    }

    /// A log-compacted topic with one partition (e.g. `_schemas`).
    pub fn compacted(name: impl Into<String>) -> Self {
        Self::of(TopicKind::Compacted, name, 1)
    }

    /// Every topic-level config this spec sets under `settings`.
    pub fn configs(&self, settings: &TopicSettings) -> Vec<(String, String)> {
        let mut all: BTreeMap<String, String> = settings.configs(self.kind).into_iter().collect();
        all.extend(self.configs.iter().cloned());
        all.into_iter().collect()
    }
}

/// Why topic bootstrap or inspection failed.
#[derive(Debug, thiserror::Error)]
pub enum TopicError {
    #[error("creating the Kafka admin client: {0}")]
    Client(#[source] KafkaError),
    #[error("create topics request failed: {0}")]
    Request(#[source] KafkaError),
    #[error("topic {topic}: {code}")]
    Topic {
        topic: String,
        code: RDKafkaErrorCode,
    },
    #[error("reading topic metadata: {0}")]
    Metadata(#[source] KafkaError),
    /// The broker refused the client (SASL authentication, TLS handshake): no retry helps
    /// until the settings or credentials change.
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("the topic metadata task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error("describing the configs of topic {topic}: {source}")]
    Describe {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error(
        "{count} existing topic(s) differ from the configured settings (listed above); \
         alter them with your Kafka tools (e.g. kafka-configs.sh --alter --entity-type topics \
         --add-config retention.ms=…), change the settings to match, or pass --allow-drift \
         to report without failing"
    )]
    Drift { count: usize },
}

const ADMIN_TIMEOUT: Duration = Duration::from_secs(30);

fn admin(cfg: &KafkaConfig) -> Result<AdminClient<DefaultClientContext>, TopicError> {
    cfg.client_config("pulse-topic-admin")
        .create()
        .map_err(TopicError::Client)
}

/// Creates every missing topic in `specs` with `cfg.topics`' replication factor and
/// configs. Returns the names it created.
pub async fn ensure_topics(
    cfg: &KafkaConfig,
    specs: &[TopicSpec],
) -> Result<Vec<String>, TopicError> {
    let first = specs.first().map(|s| s.name.as_str());
    preflight::guarded(cfg, first, create_topics(cfg, specs)).await
}

async fn create_topics(cfg: &KafkaConfig, specs: &[TopicSpec]) -> Result<Vec<String>, TopicError> {
    let admin = admin(cfg)?;
    let configs: Vec<Vec<(String, String)>> =
        specs.iter().map(|s| s.configs(&cfg.topics)).collect();
    let new_topics: Vec<NewTopic<'_>> = specs
        .iter()
        .zip(&configs)
        .map(|(s, configs)| {
            configs.iter().fold(
                NewTopic::new(
                    &s.name,
                    s.partitions,
                    TopicReplication::Fixed(cfg.topics.replication_factor),
                ),
                |t, (k, v)| t.set(k, v),
            )
        })
        .collect();
    let opts = AdminOptions::new().operation_timeout(Some(ADMIN_TIMEOUT));
    let results = admin
        .create_topics(new_topics.iter(), &opts)
        .await
        .map_err(TopicError::Request)?;
    let mut created = Vec::new();
    for r in results {
        match r {
            Ok(name) => {
                tracing::info!(topic = %name, "topic created");
                created.push(name);
            }
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(TopicError::Topic { topic, code }),
        }
    }
    Ok(created)
}

/// What an existing topic has: partitions, replicas and the configs the broker reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicState {
    pub name: String,
    pub partitions: usize,
    /// The fewest replicas of any partition.
    pub replication_factor: usize,
    /// The configs the broker reported (Kafka reports every config, defaults included;
    /// the local broker, Tansu 0.6, only those set on the topic).
    pub configs: BTreeMap<String, String>,
}

impl TopicState {
    /// How this topic differs from `spec` under `settings`, one line per difference
    /// (empty when it matches). A config the broker does not report counts as different:
    /// the broker's default applies instead of the configured value.
    pub fn drift(&self, spec: &TopicSpec, settings: &TopicSettings) -> Vec<String> {
        let mut out = Vec::new();
        if i64::try_from(self.partitions).ok() != Some(i64::from(spec.partitions)) {
            out.push(format!(
                "has {} partition(s), want {}",
                self.partitions, spec.partitions
            ));
        }
        if i64::try_from(self.replication_factor).ok()
            != Some(i64::from(settings.replication_factor))
        {
            out.push(format!(
                "has replication factor {}, want {}",
                self.replication_factor, settings.replication_factor
            ));
        }
        for (k, want) in spec.configs(settings) {
            match self.configs.get(&k) {
                Some(have) if *have == want => {}
                Some(have) => out.push(format!("{k} is {have}, want {want}")),
                None => out.push(format!("{k} is not set (broker default), want {want}")),
            }
        }
        out
    }
}

/// The state of each of `names`, `None` for a topic that does not exist.
pub async fn describe_topics(
    cfg: &KafkaConfig,
    names: &[&str],
) -> Result<Vec<Option<TopicState>>, TopicError> {
    preflight::guarded(cfg, names.first().copied(), describe(cfg, names)).await
}

async fn describe(
    cfg: &KafkaConfig,
    names: &[&str],
) -> Result<Vec<Option<TopicState>>, TopicError> {
    let admin = std::sync::Arc::new(admin(cfg)?);
    let metadata = {
        let admin = std::sync::Arc::clone(&admin);
        tokio::task::spawn_blocking(move || admin.inner().fetch_metadata(None, ADMIN_TIMEOUT))
            .await?
            .map_err(TopicError::Metadata)?
    };
    let mut out = Vec::with_capacity(names.len());
    for name in names {
        let Some(t) = metadata
            .topics()
            .iter()
            .find(|t| t.name() == *name && t.error().is_none())
        else {
            out.push(None);
            continue;
        };
        let configs = describe_configs(&admin, name).await?.unwrap_or_default();
        out.push(Some(TopicState {
            name: (*name).to_owned(),
            partitions: t.partitions().len(),
            replication_factor: t
                .partitions()
                .iter()
                .map(|p| p.replicas().len())
                .min()
                .unwrap_or(0),
            configs,
        }));
    }
    Ok(out)
}

/// The configs the broker reports for `topic`; `None` when the topic does not exist.
pub async fn topic_configs(
    cfg: &KafkaConfig,
    topic: &str,
) -> Result<Option<BTreeMap<String, String>>, TopicError> {
    preflight::guarded(cfg, Some(topic), async {
        describe_configs(&admin(cfg)?, topic).await
    })
    .await
}

async fn describe_configs(
    admin: &AdminClient<DefaultClientContext>,
    topic: &str,
) -> Result<Option<BTreeMap<String, String>>, TopicError> {
    let opts = AdminOptions::new().request_timeout(Some(ADMIN_TIMEOUT));
    let results = admin
        .describe_configs([&ResourceSpecifier::Topic(topic)], &opts)
        .await
        .map_err(|source| TopicError::Describe {
            topic: topic.to_owned(),
            source,
        })?;
    for r in results {
        match r {
            Ok(res) if res.specifier == OwnedResourceSpecifier::Topic(topic.to_owned()) => {
                return Ok(Some(
                    res.entries
                        .into_iter()
                        .filter_map(|e| e.value.map(|v| (e.name, v)))
                        .collect(),
                ));
            }
            Ok(_) => {}
            Err(RDKafkaErrorCode::UnknownTopicOrPartition) => return Ok(None),
            Err(code) => {
                return Err(TopicError::Describe {
                    topic: topic.to_owned(),
                    source: KafkaError::AdminOp(code),
                });
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate_all;

    #[test]
    fn defaults_suit_three_brokers_and_every_data_kind_gets_a_retention() {
        let s = TopicSettings::default();
        assert_eq!((s.replication_factor, s.min_insync_replicas), (3, 2));
        validate_all(&[&s]).unwrap();
        validate_all(&[&TopicSettings::single_broker()]).unwrap();
        let events = s.configs(TopicKind::Events);
        assert!(events.contains(&("retention.ms".into(), "604800000".into())));
        assert!(events.contains(&("cleanup.policy".into(), "delete".into())));
        assert!(events.contains(&("min.insync.replicas".into(), "2".into())));
        let dlq = s.configs(TopicKind::Dlq);
        assert!(dlq.contains(&("retention.ms".into(), (30 * 86_400_000_u64).to_string())));
        let compacted = s.configs(TopicKind::Compacted);
        assert!(compacted.contains(&("cleanup.policy".into(), "compact".into())));
        assert!(!compacted.iter().any(|(k, _)| k == "retention.ms"));
        assert_eq!(
            s.configs(TopicKind::Other),
            vec![("min.insync.replicas".into(), "2".into())]
        );
    }

    #[test]
    fn bad_durability_settings_are_named() {
        let s = TopicSettings {
            replication_factor: 1,
            min_insync_replicas: 2,
            dlq_retention: Duration::from_secs(5),
            ..TopicSettings::default()
        };
        let text = validate_all(&[&s]).unwrap_err().to_string();
        for needle in [
            "--kafka-min-insync-replicas",
            "replication factor (1), got 2",
            "--kafka-dlq-retention",
            "at least 1m, got 5s",
        ] {
            assert!(text.contains(needle), "{needle} missing in {text}");
        }
    }

    #[test]
    fn drift_names_each_difference_and_a_matching_topic_has_none() {
        let settings = TopicSettings::default();
        let spec = TopicSpec::of(TopicKind::Events, "e", 6);
        let matching = TopicState {
            name: "e".into(),
            partitions: 6,
            replication_factor: 3,
            configs: spec.configs(&settings).into_iter().collect(),
        };
        assert_eq!(matching.drift(&spec, &settings), Vec::<String>::new());
        let mut configs = matching.configs.clone();
        configs.insert("retention.ms".into(), "3600000".into());
        configs.remove("min.insync.replicas");
        let drifted = TopicState {
            partitions: 3,
            replication_factor: 1,
            configs,
            ..matching
        };
        assert_eq!(
            drifted.drift(&spec, &settings),
            vec![
                "has 3 partition(s), want 6".to_string(),
                "has replication factor 1, want 3".into(),
                "min.insync.replicas is not set (broker default), want 2".into(),
                "retention.ms is 3600000, want 604800000".into(),
            ]
        );
    }

    #[test]
    fn extra_configs_win_over_the_kinds() {
        let mut spec = TopicSpec::of(TopicKind::Late, "l", 1);
        spec.configs.push(("retention.ms".into(), "1000".into()));
        let c = spec.configs(&TopicSettings::default());
        assert_eq!(
            c.iter()
                .filter(|(k, _)| k == "retention.ms")
                .collect::<Vec<_>>(),
            vec![&("retention.ms".to_string(), "1000".to_string())]
        );
    }
}
