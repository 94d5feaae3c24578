//! Kafka connection and client settings, shared by producers, consumers and the admin
//! client: [`KafkaConfig::client_config`] is the one place every Kafka client of every
//! service and `pulsectl` gets its librdkafka config from. Anything librdkafka accepts can
//! be added with `--kafka-option key=value` (TLS and SASL included, see README,
//! Security) — except secrets, which come from files or the environment only.

use std::path::{Path, PathBuf};

use rdkafka::ClientConfig;

use crate::config::{Problems, Validate};
use crate::kafka::topics::TopicSettings;
use crate::secret::Secret;

/// A librdkafka property holding a secret: set from a file or an environment variable,
/// never from `--kafka-option` (process arguments and config dumps show those).
#[derive(Debug, Clone, Copy)]
pub struct SecretOption {
    /// The librdkafka property.
    pub key: &'static str,
    /// The flag naming a file that holds the value.
    pub file_flag: &'static str,
    /// The environment variable naming that file.
    pub file_env: &'static str,
    /// The environment variable holding the value itself.
    pub env: &'static str,
}

impl SecretOption {
    /// How to set it, for error messages.
    pub fn how(&self) -> String {
        format!(
            "{} / {} (a file) or {} (the value)",
            self.file_flag, self.file_env, self.env
        )
    }
}

/// The secret librdkafka properties Pulse sets itself, from a file or the environment.
pub const SECRET_OPTIONS: [SecretOption; 3] = [
    SecretOption {
        key: "sasl.password",
        file_flag: "--kafka-sasl-password-file",
        file_env: "PULSE_KAFKA_SASL_PASSWORD_FILE",
        env: "PULSE_KAFKA_SASL_PASSWORD",
    },
    SecretOption {
        key: "ssl.key.password",
        file_flag: "--kafka-ssl-key-password-file",
        file_env: "PULSE_KAFKA_SSL_KEY_PASSWORD_FILE",
        env: "PULSE_KAFKA_SSL_KEY_PASSWORD",
    },
    SecretOption {
        key: "sasl.oauthbearer.client.secret",
        file_flag: "--kafka-oauthbearer-client-secret-file",
        file_env: "PULSE_KAFKA_OAUTHBEARER_CLIENT_SECRET_FILE",
        env: "PULSE_KAFKA_OAUTHBEARER_CLIENT_SECRET",
    },
];

/// Secret librdkafka properties Pulse has no setting for, and what to use instead.
const REFUSED_OPTIONS: [(&str, &str); 3] = [
    (
        "ssl.key.pem",
        "put the key in a file and set ssl.key.location",
    ),
    (
        "ssl.keystore.password",
        "use PEM files (ssl.certificate.location, ssl.key.location) instead of a keystore",
    ),
    (
        "ssl.truststore.password",
        "use a PEM CA file (ssl.ca.location) instead of a truststore",
    ),
];

/// Why `--kafka-option key=…` is refused, if it is: `key` is a secret.
fn refused_option(key: &str) -> Option<String> {
    if let Some(s) = SECRET_OPTIONS.iter().find(|s| s.key == key) {
        return Some(format!(
            "{key} is a secret and is never taken from --kafka-option (process arguments and config dumps show those); set it with {}",
            s.how()
        ));
    }
    REFUSED_OPTIONS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, instead)| {
            format!(
                "{key} is a secret and is never taken from --kafka-option (process arguments and config dumps show those); {instead}"
            )
        })
}

/// Every consumer's prefetch bounds (librdkafka's defaults in brackets): what librdkafka
/// fetches ahead of the application and queues in memory while it is busy (a Parquet
/// upload, a ClickHouse insert, a slow window emission). librdkafka's defaults let one
/// consumer hold 64 MiB of queued records plus 50 MiB fetch responses, more than a
/// stateless service's whole memory goal (64 MiB; issue #15); these keep it to a few MiB
/// and still fetch thousands of records per request. Each can be overridden with
/// `--kafka-option key=value` (README, Configuration).
pub const CONSUMER_PREFETCH_DEFAULTS: [(&str, &str); 3] = [
    // Queued pre-fetched records, KiB, for the whole consumer [65536].
    ("queued.max.messages.kbytes", "4096"),
    // Records librdkafka tries to keep queued [100000].
    ("queued.min.messages", "10000"),
    // Bytes one fetch response may hold [52428800]; a larger record is still returned.
    ("fetch.max.bytes", "4194304"),
];

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
    /// How often each consumer reads its committed offsets, position and the high watermarks
    /// from the broker to refresh the lag gauges (also while consumption is paused or
    /// stuck); 0 turns the refresh off.
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
    /// (e.g. `security.protocol=SASL_SSL`, `ssl.ca.location=/etc/kafka/ca.pem`,
    /// `sasl.mechanism=SCRAM-SHA-512`, `sasl.username=pulse`). Applied last. Secrets
    /// (`sasl.password`, `ssl.key.password`, …) are refused here: use the `*-file` flags or
    /// their environment variables.
    #[arg(
        long = "kafka-option",
        env = "PULSE_KAFKA_OPTIONS",
        value_delimiter = ','
    )]
    pub options: Vec<String>,
    /// File holding the SASL password (`sasl.password`), e.g. a mounted Secret; read each
    /// time a client is created. Or the password itself in PULSE_KAFKA_SASL_PASSWORD
    /// (environment only, never a flag). Not both.
    #[arg(
        long = "kafka-sasl-password-file",
        env = "PULSE_KAFKA_SASL_PASSWORD_FILE"
    )]
    pub sasl_password_file: Option<PathBuf>,
    /// The SASL password from PULSE_KAFKA_SASL_PASSWORD.
    #[arg(skip = Secret::from_env(SECRET_OPTIONS[0].env))]
    pub sasl_password: Secret,
    /// File holding the password of the encrypted client key (`ssl.key.password`) at
    /// `ssl.key.location`. Or the password itself in PULSE_KAFKA_SSL_KEY_PASSWORD
    /// (environment only). Not both.
    #[arg(
        long = "kafka-ssl-key-password-file",
        env = "PULSE_KAFKA_SSL_KEY_PASSWORD_FILE"
    )]
    pub ssl_key_password_file: Option<PathBuf>,
    /// The client key password from PULSE_KAFKA_SSL_KEY_PASSWORD.
    #[arg(skip = Secret::from_env(SECRET_OPTIONS[1].env))]
    pub ssl_key_password: Secret,
    /// File holding the OIDC client secret (`sasl.oauthbearer.client.secret`) for
    /// `sasl.mechanism=OAUTHBEARER` with `sasl.oauthbearer.method=oidc`. Or the secret
    /// itself in PULSE_KAFKA_OAUTHBEARER_CLIENT_SECRET (environment only). Not both.
    #[arg(
        long = "kafka-oauthbearer-client-secret-file",
        env = "PULSE_KAFKA_OAUTHBEARER_CLIENT_SECRET_FILE"
    )]
    pub oauthbearer_client_secret_file: Option<PathBuf>,
    /// The OIDC client secret from PULSE_KAFKA_OAUTHBEARER_CLIENT_SECRET.
    #[arg(skip = Secret::from_env(SECRET_OPTIONS[2].env))]
    pub oauthbearer_client_secret: Secret,
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
            sasl_password_file: None,
            sasl_password: Secret::default(),
            ssl_key_password_file: None,
            ssl_key_password: Secret::default(),
            oauthbearer_client_secret_file: None,
            oauthbearer_client_secret: Secret::default(),
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

    /// The base librdkafka config of every Kafka client: brokers, client id, the extra
    /// options (TLS and SASL settings among them) and the secrets, read from their files
    /// now (so a client created after a rotation gets the new value). A secret that cannot
    /// be read (validation at start refuses that; a file removed later) is logged — by
    /// its setting, never its value — and left unset, so the broker refuses the client.
    pub fn client_config(&self, client_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("client.id", client_id);
        self.apply_options(&mut c);
        for (option, value, file) in self.secrets() {
            match Secret::resolve(value, file) {
                Ok(secret) if secret.is_empty() => {}
                Ok(secret) => {
                    c.set(option.key, secret.expose());
                }
                Err(reason) => tracing::error!(
                    property = option.key,
                    setting = %option.how(),
                    %reason,
                    "kafka: secret not set"
                ),
            }
        }
        c
    }

    /// The base config of a consumer: [`Self::client_config`] plus the bounded prefetch of
    /// [`CONSUMER_PREFETCH_DEFAULTS`] (an extra option of the same key wins).
    pub fn consumer_client_config(&self, client_id: &str) -> ClientConfig {
        let mut c = self.client_config(client_id);
        for (k, v) in CONSUMER_PREFETCH_DEFAULTS {
            if self.option(k).is_none() {
                c.set(k, v);
            }
        }
        c
    }

    /// This config with [`CONSUMER_PREFETCH_DEFAULTS`] put before the extra options (which
    /// still win): for consumers created from [`Self::client_config`] elsewhere.
    pub fn with_consumer_prefetch_defaults(&self) -> Self {
        let mut c = self.clone();
        c.options = CONSUMER_PREFETCH_DEFAULTS
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .chain(self.options.iter().cloned())
            .collect();
        c
    }

    /// Each secret property with its value (from the environment) and file, if set.
    fn secrets(&self) -> [(&'static SecretOption, &Secret, Option<&Path>); 3] {
        [
            (
                &SECRET_OPTIONS[0],
                &self.sasl_password,
                self.sasl_password_file.as_deref(),
            ),
            (
                &SECRET_OPTIONS[1],
                &self.ssl_key_password,
                self.ssl_key_password_file.as_deref(),
            ),
            (
                &SECRET_OPTIONS[2],
                &self.oauthbearer_client_secret,
                self.oauthbearer_client_secret_file.as_deref(),
            ),
        ]
    }

    /// Sets the extra `--kafka-option` properties on `c`. Called last, so they win over
    /// Pulse's own defaults (producer and consumer settings included). Secret properties
    /// are skipped (validation at start refuses them with the reason).
    pub fn apply_options(&self, c: &mut ClientConfig) {
        for (k, v) in self.parsed_options() {
            if refused_option(k).is_some() {
                tracing::error!(
                    property = k,
                    "kafka: a secret in --kafka-option / PULSE_KAFKA_OPTIONS is ignored"
                );
                continue;
            }
            c.set(k, v);
        }
    }

    /// The value of the extra option `key`, if set (the last one wins, as in librdkafka).
    fn option(&self, key: &str) -> Option<&str> {
        self.parsed_options()
            .filter(|(k, _)| *k == key)
            .map(|(_, v)| v)
            .last()
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

    /// This configuration with a service's own `defaults` put before the extra options,
    /// which are applied after them and so still win (an operator's `--kafka-option`).
    pub fn with_default_options(&self, defaults: &[(&str, &str)]) -> KafkaConfig {
        let mut c = self.clone();
        c.options = defaults
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .chain(self.options.iter().cloned())
            .collect();
        c
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
            match o.split_once('=') {
                Some((k, _)) if !k.trim().is_empty() => {
                    if let Some(reason) = refused_option(k.trim()) {
                        // Never echo the value: it is the secret.
                        p.add("--kafka-option / PULSE_KAFKA_OPTIONS", reason);
                    }
                }
                _ => p.add(
                    "--kafka-option / PULSE_KAFKA_OPTIONS",
                    format!("{o:?} is not key=value"),
                ),
            }
        }
        for (option, value, file) in self.secrets() {
            if let Err(reason) = Secret::resolve(value, file) {
                p.add(
                    format!(
                        "{} / {} / {}",
                        option.file_flag, option.file_env, option.env
                    ),
                    reason,
                );
            }
        }
        self.validate_security(p);
    }
}

impl KafkaConfig {
    /// TLS and SASL settings that cannot work together are named at start, rather than
    /// as a broker connection failing later.
    fn validate_security(&self, p: &mut Problems) {
        let key = "--kafka-option / PULSE_KAFKA_OPTIONS";
        let protocol = self
            .option("security.protocol")
            .unwrap_or("plaintext")
            .to_ascii_lowercase();
        p.check(
            ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&protocol.as_str()),
            key,
            format!("security.protocol must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL, got {protocol:?}"),
        );
        for file_option in [
            "ssl.ca.location",
            "ssl.certificate.location",
            "ssl.key.location",
        ] {
            if let Some(path) = self.option(file_option).filter(|v| *v != "probe") {
                p.check(
                    Path::new(path).exists(),
                    key,
                    format!("{file_option}={path}: no such file or directory"),
                );
            }
        }
        if !protocol.starts_with("sasl_") {
            return;
        }
        let mechanism = self
            .option("sasl.mechanism")
            .or_else(|| self.option("sasl.mechanisms"))
            .unwrap_or("GSSAPI");
        if ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"].contains(&mechanism) {
            p.check(
                self.option("sasl.username").is_some_and(|u| !u.is_empty()),
                key,
                format!("sasl.mechanism={mechanism} needs sasl.username"),
            );
            let password = self.secrets()[0];
            p.check(
                !password.1.is_empty() || password.2.is_some(),
                key,
                format!(
                    "sasl.mechanism={mechanism} needs a password: set {}",
                    SECRET_OPTIONS[0].how()
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_services_default_options_come_first_so_an_operators_option_wins() {
        let mut kafka = KafkaConfig::for_brokers("b:9092");
        let defaults = [("queue.buffering.max.kbytes", "2048")];
        assert_eq!(
            kafka.with_default_options(&defaults).options,
            vec!["queue.buffering.max.kbytes=2048".to_owned()]
        );
        kafka.options = vec![
            "queue.buffering.max.kbytes=65536".into(),
            "linger.ms=20".into(),
        ];
        let c = kafka.with_default_options(&defaults);
        let kbytes: Vec<&str> = c
            .parsed_options()
            .filter(|(k, _)| *k == "queue.buffering.max.kbytes")
            .map(|(_, v)| v)
            .collect();
        // Applied in order: the operator's value is the last one set, so it wins.
        assert_eq!(kbytes, vec!["2048", "65536"]);
        assert_eq!(c.brokers, "b:9092");
    }
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

    #[test]
    fn consumers_get_the_bounded_prefetch_and_an_extra_option_wins_over_it() {
        let c = KafkaConfig::default().consumer_client_config("pulse");
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("4096"));
        assert_eq!(c.get("queued.min.messages"), Some("10000"));
        assert_eq!(c.get("fetch.max.bytes"), Some("4194304"));
        // Producers are not given consumer properties (librdkafka would warn).
        let p = KafkaConfig::default().client_config("pulse");
        assert_eq!(p.get("queued.max.messages.kbytes"), None);
        let cfg = KafkaConfig {
            options: vec!["queued.max.messages.kbytes=65536".into()],
            ..KafkaConfig::default()
        };
        let c = cfg.consumer_client_config("pulse");
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("65536"));
        assert_eq!(c.get("fetch.max.bytes"), Some("4194304"));
        let c = cfg.with_consumer_prefetch_defaults().client_config("pulse");
        assert_eq!(c.get("queued.max.messages.kbytes"), Some("65536"));
        assert_eq!(c.get("queued.min.messages"), Some("10000"));
        // And librdkafka takes them all (a consumer is created with them).
        let consumer: Result<rdkafka::consumer::BaseConsumer, _> = KafkaConfig::default()
            .consumer_client_config("pulse")
            .set("group.id", "g")
            .create();
        assert!(consumer.is_ok(), "{:?}", consumer.err());
    }

    /// A temporary folder removed on drop.
    struct TempDir(std::path::PathBuf);
    impl TempDir {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("pulse-{name}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            Self(dir)
        }
        fn file(&self, name: &str, content: &str) -> std::path::PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, content).unwrap();
            path
        }
    }
    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn librdkafka_is_built_with_tls_sasl_and_every_codec() {
        let native = ClientConfig::new().create_native_config().unwrap();
        let features = native.get("builtin.features").unwrap();
        let features: Vec<&str> = features.split(',').collect();
        for needed in [
            "ssl",
            "sasl_plain",
            "sasl_scram",
            "sasl_oauthbearer",
            "gzip",
            "snappy",
            "lz4",
            "zstd",
        ] {
            assert!(
                features.contains(&needed),
                "{needed} missing in {features:?}"
            );
        }
        // librdkafka refuses security.protocol=SASL_SSL at creation when built without
        // OpenSSL; with it the client is created (it connects later, in the background).
        let cfg = KafkaConfig {
            options: vec![
                "security.protocol=SASL_SSL".into(),
                "sasl.mechanism=SCRAM-SHA-512".into(),
                "sasl.username=pulse".into(),
            ],
            sasl_password: "pw".into(),
            ..KafkaConfig::for_brokers("127.0.0.1:1")
        };
        let producer: Result<rdkafka::producer::BaseProducer, _> =
            cfg.client_config("pulse-test").create();
        assert!(producer.is_ok(), "{:?}", producer.err());
    }

    #[test]
    fn a_secret_in_a_kafka_option_is_refused_and_never_echoed() {
        for (option, alternative) in [
            ("sasl.password=hunter2", "--kafka-sasl-password-file"),
            ("ssl.key.password=hunter2", "PULSE_KAFKA_SSL_KEY_PASSWORD"),
            (
                "sasl.oauthbearer.client.secret=hunter2",
                "PULSE_KAFKA_OAUTHBEARER_CLIENT_SECRET_FILE",
            ),
            ("ssl.key.pem=hunter2", "ssl.key.location"),
        ] {
            let cfg = KafkaConfig {
                options: vec![option.into()],
                ..KafkaConfig::default()
            };
            let text = validate_all(&[&cfg]).unwrap_err().to_string();
            assert!(text.contains("--kafka-option"), "{text}");
            assert!(
                text.contains(alternative),
                "{alternative} missing in {text}"
            );
            assert!(
                !text.contains("hunter2"),
                "the error shows the secret: {text}"
            );
            let key = option.split_once('=').unwrap().0;
            assert_eq!(
                cfg.client_config("pulse").get(key),
                None,
                "{key} was applied"
            );
        }
    }

    #[test]
    fn secrets_come_from_their_file_or_the_environment_never_both() {
        let dir = TempDir::new("kafka-secrets");
        let file = dir.file("sasl", "from-file\n");
        let from_file = KafkaConfig {
            sasl_password_file: Some(file.clone()),
            ..KafkaConfig::default()
        };
        validate_all(&[&from_file]).unwrap();
        let c = from_file.client_config("pulse");
        assert_eq!(c.get("sasl.password"), Some("from-file"));
        assert!(!format!("{c:?}").contains("from-file"), "{c:?}");
        assert!(!format!("{from_file:?}").contains("from-file"));

        let from_env = KafkaConfig {
            ssl_key_password: "from-env".into(),
            ..KafkaConfig::default()
        };
        let c = from_env.client_config("pulse");
        assert_eq!(c.get("ssl.key.password"), Some("from-env"));
        assert_eq!(c.get("sasl.password"), None);
        assert!(!format!("{from_env:?}").contains("from-env"));

        let both = KafkaConfig {
            sasl_password: "from-env".into(),
            ..from_file.clone()
        };
        let text = validate_all(&[&both]).unwrap_err().to_string();
        assert!(
            text.contains("PULSE_KAFKA_SASL_PASSWORD") && text.contains("set only one"),
            "{text}"
        );
        assert!(!text.contains("from-"), "{text}");
        // Not applied at all rather than one of the two picked silently.
        assert_eq!(both.client_config("pulse").get("sasl.password"), None);

        let missing = KafkaConfig {
            oauthbearer_client_secret_file: Some(dir.0.join("missing")),
            ..KafkaConfig::default()
        };
        let text = validate_all(&[&missing]).unwrap_err().to_string();
        assert!(
            text.contains("--kafka-oauthbearer-client-secret-file") && text.contains("missing"),
            "{text}"
        );
    }

    #[test]
    fn secret_files_are_flags_and_secret_values_are_not() {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            kafka: KafkaConfig,
        }
        let parsed = <Cli as clap::Parser>::try_parse_from([
            "x",
            "--kafka-sasl-password-file",
            "/run/secrets/kafka",
            "--kafka-ssl-key-password-file",
            "/run/secrets/key",
        ])
        .unwrap()
        .kafka;
        assert_eq!(
            parsed.sasl_password_file.as_deref(),
            Some(Path::new("/run/secrets/kafka"))
        );
        assert_eq!(
            parsed.ssl_key_password_file.as_deref(),
            Some(Path::new("/run/secrets/key"))
        );
        for flag in [
            "--kafka-sasl-password",
            "--kafka-ssl-key-password",
            "--kafka-oauthbearer-client-secret",
        ] {
            assert!(
                <Cli as clap::Parser>::try_parse_from(["x", flag, "hunter2"]).is_err(),
                "{flag} is accepted on the command line"
            );
        }
    }

    #[test]
    fn sasl_settings_that_cannot_work_are_named() {
        let cfg = KafkaConfig {
            options: vec![
                "security.protocol=SASL_SSL".into(),
                "sasl.mechanism=SCRAM-SHA-256".into(),
                "ssl.ca.location=/nonexistent/ca.pem".into(),
            ],
            ..KafkaConfig::default()
        };
        let text = validate_all(&[&cfg]).unwrap_err().to_string();
        for needle in [
            "needs sasl.username",
            "needs a password",
            "--kafka-sasl-password-file",
            "/nonexistent/ca.pem",
        ] {
            assert!(text.contains(needle), "{needle} missing in {text}");
        }
        let typo = KafkaConfig {
            options: vec!["security.protocol=TLS".into()],
            ..KafkaConfig::default()
        };
        let text = validate_all(&[&typo]).unwrap_err().to_string();
        assert!(
            text.contains("SASL_SSL") && text.contains("\"tls\""),
            "{text}"
        );
        let ok = KafkaConfig {
            options: vec![
                "security.protocol=sasl_plaintext".into(),
                "sasl.mechanisms=PLAIN".into(),
                "sasl.username=pulse".into(),
            ],
            sasl_password: "pw".into(),
            ..KafkaConfig::default()
        };
        validate_all(&[&ok]).unwrap();
    }
}
