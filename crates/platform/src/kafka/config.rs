//! Kafka connection and client settings, shared by producers, consumers and the admin
//! client. Anything librdkafka accepts can be added with `--kafka-option key=value`.

use rdkafka::ClientConfig;

use crate::config::{Problems, Validate};
use crate::kafka::topics::TopicSettings;

#[derive(Debug, Clone, clap::Args)]
pub struct KafkaConfig {
    /// Bootstrap brokers, comma-separated host:port.
    #[arg(
        long = "kafka-brokers",
        env = "PULSE_KAFKA_BROKERS",
        default_value = "127.0.0.1:9092"
    )]
    pub brokers: String,
    /// Partitions for topics this service creates when they are missing.
    #[arg(
        long = "kafka-partitions",
        env = "PULSE_KAFKA_PARTITIONS",
        default_value_t = 3
    )]
    pub partitions: i32,
    /// Replication factor, `min.insync.replicas` and retention of the topics created.
    #[command(flatten)]
    pub topics: TopicSettings,
    /// Producer: how long to wait to fill a batch before sending.
    #[arg(
        long = "kafka-linger-ms",
        env = "PULSE_KAFKA_LINGER_MS",
        default_value_t = 5
    )]
    pub linger_ms: u32,
    /// Producer: records the local queue holds before enqueue reports backpressure.
    #[arg(
        long = "kafka-queue-max-messages",
        env = "PULSE_KAFKA_QUEUE_MAX_MESSAGES",
        default_value_t = 100_000
    )]
    pub queue_max_messages: u32,
    /// Producer: time to get an acknowledgement (including retries) before a record fails.
    #[arg(
        long = "kafka-message-timeout-ms",
        env = "PULSE_KAFKA_MESSAGE_TIMEOUT_MS",
        default_value_t = 30_000
    )]
    pub message_timeout_ms: u32,
    /// Producer compression codec: none, gzip, snappy, lz4 or zstd.
    #[arg(
        id = "kafka_compression",
        long = "kafka-compression",
        env = "PULSE_KAFKA_COMPRESSION",
        default_value = "none"
    )]
    pub compression: String,
    /// Consumer: interval of automatic commits of offsets marked durable.
    #[arg(
        long = "kafka-commit-interval-ms",
        env = "PULSE_KAFKA_COMMIT_INTERVAL_MS",
        default_value_t = 1_000
    )]
    pub commit_interval_ms: u32,
    /// Consumer: group session timeout.
    #[arg(
        long = "kafka-session-timeout-ms",
        env = "PULSE_KAFKA_SESSION_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub session_timeout_ms: u32,
    /// Consumer: a member that owns no partition while no partition of its topics with
    /// records left to read makes progress (no committed offset of the group advances) for
    /// this long is stuck: it leaves and rejoins the group as a new member, and readiness
    /// says why while the condition lasts; e.g. `30s`; `0s` turns the watchdog off.
    #[arg(
        long = "kafka-consumer-stuck-timeout",
        env = "PULSE_KAFKA_CONSUMER_STUCK_TIMEOUT",
        default_value = "30s",
        value_parser = humantime::parse_duration
    )]
    pub consumer_stuck_timeout: std::time::Duration,
    /// Interval of librdkafka statistics (consumer lag metrics); 0 turns them off.
    #[arg(
        long = "kafka-statistics-interval-ms",
        env = "PULSE_KAFKA_STATISTICS_INTERVAL_MS",
        default_value_t = 5_000
    )]
    pub statistics_interval_ms: u32,
    /// A producer whose deliveries have all failed for this long (a stalled broker, or one
    /// that accepts connections but fails every request) makes the service not ready and
    /// is recreated with a new client; e.g. `30s`, `2m`.
    #[arg(
        long = "kafka-producer-stall-timeout",
        env = "PULSE_KAFKA_PRODUCER_STALL_TIMEOUT",
        default_value = "30s",
        value_parser = humantime::parse_duration
    )]
    pub producer_stall_timeout: std::time::Duration,
    /// A producer that has delivered nothing for this long while its deliveries kept
    /// failing (recreating it every stall timeout did not help) fails `/livez`, so the
    /// orchestrator restarts the process; longer than the stall timeout; `0s` turns it off.
    #[arg(
        long = "kafka-producer-liveness-timeout",
        env = "PULSE_KAFKA_PRODUCER_LIVENESS_TIMEOUT",
        default_value = "3m",
        value_parser = humantime::parse_duration
    )]
    pub producer_liveness_timeout: std::time::Duration,
    /// Extra librdkafka properties, `key=value`, repeatable or comma-separated
    /// (e.g. `security.protocol=SASL_SSL`). Applied last.
    #[arg(
        long = "kafka-option",
        env = "PULSE_KAFKA_OPTIONS",
        value_delimiter = ','
    )]
    pub options: Vec<String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            partitions: 3,
            topics: TopicSettings::default(),
            linger_ms: 5,
            queue_max_messages: 100_000,
            message_timeout_ms: 30_000,
            compression: "none".into(),
            commit_interval_ms: 1_000,
            session_timeout_ms: 10_000,
            consumer_stuck_timeout: std::time::Duration::from_secs(30),
            statistics_interval_ms: 5_000,
            producer_stall_timeout: std::time::Duration::from_secs(30),
            producer_liveness_timeout: std::time::Duration::from_secs(180),
            options: Vec::new(),
        }
    }
}

impl KafkaConfig {
    /// A config for `brokers` with every other setting at its default.
    pub fn for_brokers(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            ..Self::default()
        }
    }

    /// The base librdkafka config: brokers, client id and the extra options.
    pub fn client_config(&self, client_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", client_id);
        self.apply_options(&mut c);
        c
    }

    /// Sets the extra `--kafka-option` properties on `c`. Called last, so they win over
    /// Pulse's own defaults (producer and consumer settings included).
    pub fn apply_options(&self, c: &mut ClientConfig) {
        for (k, v) in self.parsed_options() {
            c.set(k, v);
        }
    }

    /// The extra options as `(key, value)`, trimmed; entries without `=` are skipped here
    /// and refused by `validate`.
    pub fn parsed_options(&self) -> impl Iterator<Item = (&str, &str)> {
        self.options
            .iter()
            .filter(|o| !o.trim().is_empty())
            .filter_map(|o| o.split_once('='))
            .map(|(k, v)| (k.trim(), v.trim()))
    }
}

impl Validate for KafkaConfig {
    fn validate(&self, p: &mut Problems) {
        p.check(
            !self.brokers.trim().is_empty(),
            "--kafka-brokers / PULSE_KAFKA_BROKERS",
            "must name at least one host:port",
        );
        for b in self.brokers.split(',').filter(|b| !b.trim().is_empty()) {
            let ok = b
                .trim()
                .rsplit_once(':')
                .is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
            p.check(
                ok,
                "--kafka-brokers / PULSE_KAFKA_BROKERS",
                format!("{b:?} is not host:port"),
            );
        }
        p.check(
            self.partitions >= 1,
            "--kafka-partitions / PULSE_KAFKA_PARTITIONS",
            format!("must be >= 1, got {}", self.partitions),
        );
        self.topics.validate(p);
        p.check(
            ["none", "gzip", "snappy", "lz4", "zstd"].contains(&self.compression.as_str()),
            "--kafka-compression / PULSE_KAFKA_COMPRESSION",
            format!(
                "must be none, gzip, snappy, lz4 or zstd, got {:?}",
                self.compression
            ),
        );
        p.check(
            self.queue_max_messages >= 1,
            "--kafka-queue-max-messages / PULSE_KAFKA_QUEUE_MAX_MESSAGES",
            "must be >= 1",
        );
        p.check(
            self.message_timeout_ms >= 1_000,
            "--kafka-message-timeout-ms / PULSE_KAFKA_MESSAGE_TIMEOUT_MS",
            format!("must be >= 1000, got {}", self.message_timeout_ms),
        );
        p.check(
            self.producer_stall_timeout >= std::time::Duration::from_secs(1),
            "--kafka-producer-stall-timeout / PULSE_KAFKA_PRODUCER_STALL_TIMEOUT",
            "must be at least 1s",
        );
        p.check(
            self.producer_liveness_timeout.is_zero()
                || self.producer_liveness_timeout > self.producer_stall_timeout,
            "--kafka-producer-liveness-timeout / PULSE_KAFKA_PRODUCER_LIVENESS_TIMEOUT",
            format!(
                "must be longer than the stall timeout ({}) so recreating the producer is tried first, or 0s (off); got {}",
                humantime::format_duration(self.producer_stall_timeout),
                humantime::format_duration(self.producer_liveness_timeout)
            ),
        );
        let session = std::time::Duration::from_millis(u64::from(self.session_timeout_ms));
        p.check(
            self.consumer_stuck_timeout.is_zero() || self.consumer_stuck_timeout >= session * 2,
            "--kafka-consumer-stuck-timeout / PULSE_KAFKA_CONSUMER_STUCK_TIMEOUT",
            format!(
                "must be at least twice the session timeout ({}) so the broker can expire a dead member first, or 0s (off); got {}",
                humantime::format_duration(session),
                humantime::format_duration(self.consumer_stuck_timeout)
            ),
        );
        for o in self.options.iter().filter(|o| !o.trim().is_empty()) {
            p.check(
                o.split_once('=').is_some_and(|(k, _)| !k.trim().is_empty()),
                "--kafka-option / PULSE_KAFKA_OPTIONS",
                format!("{o:?} is not key=value"),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::validate_all;

    #[test]
    fn defaults_are_valid() {
        validate_all(&[&KafkaConfig::default()]).unwrap();
    }

    #[test]
    fn every_bad_kafka_setting_is_named() {
        let cfg = KafkaConfig {
            brokers: "localhost,:9092".into(),
            partitions: 0,
            compression: "brotli".into(),
            options: vec!["acks".into()],
            ..KafkaConfig::default()
        };
        let err = validate_all(&[&cfg]).unwrap_err();
        let text = err.to_string();
        for needle in [
            "\"localhost\"",
            "\":9092\"",
            "--kafka-partitions",
            "brotli",
            "\"acks\"",
        ] {
            assert!(text.contains(needle), "{needle} missing in {text}");
        }
    }

    #[test]
    fn the_clap_defaults_are_the_rust_defaults() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            kafka: KafkaConfig,
        }
        let parsed = <Cli as clap::Parser>::try_parse_from(["x"]).unwrap().kafka;
        assert_eq!(parsed.topics, TopicSettings::default());
        assert_eq!(
            parsed.producer_liveness_timeout,
            KafkaConfig::default().producer_liveness_timeout
        );
        assert_eq!(
            parsed.consumer_stuck_timeout,
            KafkaConfig::default().consumer_stuck_timeout
        );
        let single = <Cli as clap::Parser>::try_parse_from([
            "x",
            "--kafka-replication-factor",
            "1",
            "--kafka-min-insync-replicas",
            "1",
        ])
        .unwrap()
        .kafka;
        assert_eq!(single.topics, TopicSettings::single_broker());
    }

    #[test]
    fn a_liveness_timeout_not_longer_than_the_stall_timeout_is_refused() {
        let cfg = KafkaConfig {
            producer_liveness_timeout: std::time::Duration::from_secs(30),
            ..KafkaConfig::default()
        };
        let text = validate_all(&[&cfg]).unwrap_err().to_string();
        assert!(text.contains("--kafka-producer-liveness-timeout"), "{text}");
        let off = KafkaConfig {
            producer_liveness_timeout: std::time::Duration::ZERO,
            ..KafkaConfig::default()
        };
        validate_all(&[&off]).unwrap();
    }

    #[test]
    fn a_stuck_timeout_shorter_than_two_sessions_is_refused() {
        let cfg = KafkaConfig {
            consumer_stuck_timeout: std::time::Duration::from_secs(15),
            ..KafkaConfig::default()
        };
        let text = validate_all(&[&cfg]).unwrap_err().to_string();
        assert!(text.contains("--kafka-consumer-stuck-timeout"), "{text}");
        for ok in [0, 20] {
            let cfg = KafkaConfig {
                consumer_stuck_timeout: std::time::Duration::from_secs(ok),
                ..KafkaConfig::default()
            };
            validate_all(&[&cfg]).unwrap();
        }
    }

    #[test]
    fn extra_options_are_applied_last() {
        let cfg = KafkaConfig {
            options: vec![
                "client.id=override".into(),
                " socket.timeout.ms = 5000 ".into(),
            ],
            ..KafkaConfig::default()
        };
        let c = cfg.client_config("pulse");
        assert_eq!(c.get("client.id"), Some("override"));
        assert_eq!(c.get("socket.timeout.ms"), Some("5000"));
    }
}
