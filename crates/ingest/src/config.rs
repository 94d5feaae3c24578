//! Ingest's configuration: every flag with its `PULSE_*` environment fallback, the
//! settings derived from them (limits, keys, PII policy) and their validation, which names
//! every bad setting at once. The wiring that uses it is in the crate root.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use pulse_contracts::topics;
use pulse_platform::config::{Problems, Validate};
use pulse_platform::kafka::KafkaConfig;
use pulse_platform::registry_auth::RegistryAuthArgs;
use pulse_platform::secret::{Secret, removed_secret_flag};
use pulse_platform::server::ServerArgs;
use pulse_platform::telemetry::TelemetryConfig;

use crate::auth::{ApiKeys, KeysError};
use crate::body::BodyLimits;
use crate::pii::PiiPolicy;
use crate::validate::{Limits, RefusedVersions};

/// The environment variable holding API keys (`key=source,…`); environment only, never a flag.
pub const API_KEYS_ENV: &str = "PULSE_INGEST_API_KEYS";
/// The environment variable holding the PII HMAC key; environment only, never a flag.
pub const PII_HMAC_KEY_ENV: &str = "PULSE_INGEST_PII_HMAC_KEY";

/// Why the PII policy could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PiiSettingError {
    #[error("reading {}: {source}", path.display())]
    ReadKey {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The policy text is malformed; the message names the item and the reason.
    #[error("{0}")]
    Policy(String),
}

/// The API key of the local dev stack (documented in the README; never use it elsewhere).
pub const DEV_API_KEY: &str = "pulse-dev-key";

/// Configuration; every flag has a `PULSE_*` environment fallback (see README).
#[derive(Debug, Clone, clap::Parser)]
#[command(name = "pulse-ingest", version, about = "HTTP and gRPC event intake.")]
pub struct Config {
    /// HTTP listen address.
    #[arg(
        long = "http-addr",
        env = "PULSE_INGEST_HTTP_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub http_addr: SocketAddr,
    /// gRPC listen address.
    #[arg(
        long = "grpc-addr",
        env = "PULSE_INGEST_GRPC_ADDR",
        default_value = "127.0.0.1:50051"
    )]
    pub grpc_addr: SocketAddr,
    /// Address of the admin server (/metrics, /livez, /readyz).
    #[arg(
        long = "admin-addr",
        env = "PULSE_ADMIN_ADDR",
        default_value = "127.0.0.1:9101"
    )]
    pub admin_addr: SocketAddr,
    /// Schema registry base URL (events are framed with the id registered for `<topic>-value`).
    #[arg(
        long = "schema-registry-url",
        env = "PULSE_SCHEMA_REGISTRY_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub schema_registry_url: String,
    #[command(flatten)]
    pub registry_auth: RegistryAuthArgs,
    /// API keys as `key=source,…` from PULSE_INGEST_API_KEYS (environment only, never a
    /// flag). Never logged.
    #[arg(skip = Secret::from_env(API_KEYS_ENV))]
    pub api_keys: Secret,
    /// File with one `key=source` (or `key=source:name`) per line (e.g. a mounted
    /// Kubernetes secret); re-read when its content changes, no restart needed. Or set the
    /// key list itself in PULSE_INGEST_API_KEYS (environment only, no flag; the keys of
    /// both are used).
    #[arg(long = "api-keys-file", env = "PULSE_INGEST_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// Removed: took the API keys as a process argument. Refused at start, naming the
    /// replacement.
    #[arg(long = "api-keys", hide = true)]
    pub removed_api_keys_flag: Option<Secret>,
    /// How often `--api-keys-file` is checked for changes.
    #[arg(
        long = "api-keys-reload-interval",
        env = "PULSE_INGEST_API_KEYS_RELOAD_INTERVAL",
        default_value = "5s",
        value_parser = humantime::parse_duration
    )]
    pub api_keys_reload_interval: Duration,
    /// Per-key rate limit, events per second (0 = unlimited).
    #[arg(
        long = "rate-limit",
        env = "PULSE_INGEST_RATE_LIMIT",
        default_value_t = 10_000.0
    )]
    pub rate_limit: f64,
    /// Per-key burst, events.
    #[arg(
        long = "rate-burst",
        env = "PULSE_INGEST_RATE_BURST",
        default_value_t = 20_000.0
    )]
    pub rate_burst: f64,
    /// Maximum request body on the wire, bytes.
    #[arg(long = "max-body-bytes", env = "PULSE_INGEST_MAX_BODY_BYTES", default_value_t = 1024 * 1024)]
    pub max_body_bytes: usize,
    /// Maximum body after gzip decoding, bytes.
    #[arg(long = "max-decompressed-bytes", env = "PULSE_INGEST_MAX_DECOMPRESSED_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_decompressed_bytes: usize,
    /// Maximum events per request (HTTP) or per message (gRPC).
    #[arg(
        long = "max-batch-events",
        env = "PULSE_INGEST_MAX_BATCH_EVENTS",
        default_value_t = 1000
    )]
    pub max_batch_events: usize,
    /// Most events one gRPC `StreamEvents` call may carry (its single answer holds one
    /// result per event); the message that would exceed it is refused with
    /// RESOURCE_EXHAUSTED. `SendEventsStream` answers per message and has no such limit.
    #[arg(
        long = "max-stream-events",
        env = "PULSE_INGEST_MAX_STREAM_EVENTS",
        default_value_t = 50_000
    )]
    pub max_stream_events: usize,
    /// Most bytes of a rejected original a DLQ record keeps; longer originals (an
    /// unparseable 8 MiB body, say) are cut to this and flagged with their size
    /// (`pulse-original-size`), so the record always fits the broker's message limit
    /// (librdkafka's `message.max.bytes`, 1,000,000 by default, headers included).
    #[arg(
        long = "max-dlq-original-bytes",
        env = "PULSE_INGEST_MAX_DLQ_ORIGINAL_BYTES",
        default_value_t = 900 * 1024
    )]
    pub max_dlq_original_bytes: usize,
    /// What a DLQ record keeps of a rejected event: `keep` (the bytes as received, the
    /// default, so redrive re-submits them unchanged) or `redact` (the PII policy applied
    /// to what parses, JSON or a protobuf event; bytes that parse as neither are not kept).
    #[arg(
        long = "dlq-original",
        env = "PULSE_INGEST_DLQ_ORIGINAL",
        value_enum,
        default_value = "keep"
    )]
    pub dlq_original: crate::pipeline::DlqOriginal,
    /// Maximum size of one event, bytes.
    #[arg(long = "max-event-bytes", env = "PULSE_INGEST_MAX_EVENT_BYTES", default_value_t = 32 * 1024)]
    pub max_event_bytes: usize,
    /// How far in the future an event time may be, ms.
    #[arg(
        long = "max-future-skew-ms",
        env = "PULSE_INGEST_MAX_FUTURE_SKEW_MS",
        default_value_t = 300_000
    )]
    pub max_future_skew_ms: i64,
    /// How old an event time may be, ms.
    #[arg(long = "max-age-ms", env = "PULSE_INGEST_MAX_AGE_MS", default_value_t = 7 * 24 * 3_600_000)]
    pub max_age_ms: i64,
    /// Producer `schema_version`s to refuse, e.g. `2,4-6` (default: none; every version
    /// from 1 up is accepted and stored with the event).
    #[arg(
        long = "refuse-schema-versions",
        env = "PULSE_INGEST_REFUSE_SCHEMA_VERSIONS",
        default_value = ""
    )]
    pub refuse_schema_versions: RefusedVersions,
    /// Deprecated (read so that existing deployments keep their behaviour): the oldest
    /// accepted `schema_version`; `M` refuses `1..M-1`, added to --refuse-schema-versions.
    #[arg(
        long = "min-schema-version",
        env = "PULSE_INGEST_MIN_SCHEMA_VERSION",
        hide = true
    )]
    pub min_schema_version: Option<u32>,
    /// Deprecated: the newest accepted `schema_version`; `N` refuses everything above `N`,
    /// added to --refuse-schema-versions.
    #[arg(
        long = "max-schema-version",
        env = "PULSE_INGEST_MAX_SCHEMA_VERSION",
        hide = true
    )]
    pub max_schema_version: Option<u32>,
    /// Event ids remembered for dedup (memory bound).
    #[arg(
        long = "dedup-capacity",
        env = "PULSE_INGEST_DEDUP_CAPACITY",
        default_value_t = 1_000_000
    )]
    pub dedup_capacity: usize,
    /// How long an event id is remembered, seconds.
    #[arg(
        long = "dedup-window-secs",
        env = "PULSE_INGEST_DEDUP_WINDOW_SECS",
        default_value_t = 600
    )]
    pub dedup_window_secs: u64,
    /// PII policy: `path=keep|drop|hash|truncate,…,email=<action>` (see README).
    #[arg(long = "pii-policy", env = "PULSE_INGEST_PII_POLICY", default_value = PiiPolicy::DEFAULT_SPEC)]
    pub pii_policy: String,
    /// HMAC key for hashed PII from PULSE_INGEST_PII_HMAC_KEY (environment only, never a
    /// flag). Never logged.
    #[arg(skip = Secret::from_env(PII_HMAC_KEY_ENV))]
    pub pii_hmac_key: Secret,
    /// File holding the HMAC key for hashed PII. Or set the key itself in
    /// PULSE_INGEST_PII_HMAC_KEY (environment only, no flag; the file wins).
    #[arg(long = "pii-hmac-key-file", env = "PULSE_INGEST_PII_HMAC_KEY_FILE")]
    pub pii_hmac_key_file: Option<PathBuf>,
    /// Removed: took the HMAC key as a process argument. Refused at start, naming the
    /// replacement.
    #[arg(long = "pii-hmac-key", hide = true)]
    pub removed_pii_hmac_key_flag: Option<Secret>,
    /// How long a request may wait for room in a full producer queue before 503.
    #[arg(
        long = "max-backpressure-wait-ms",
        env = "PULSE_INGEST_MAX_BACKPRESSURE_WAIT_MS",
        default_value_t = 100
    )]
    pub max_backpressure_wait_ms: u64,
    /// How long a request waits for an earlier attempt of the same event id that is
    /// still waiting for the broker (then it is a duplicate if that attempt was stored,
    /// new if it failed) before answering 503; e.g. `5s`, `500ms`.
    #[arg(
        long = "in-flight-wait",
        env = "PULSE_INGEST_IN_FLIGHT_WAIT",
        default_value = "5s",
        value_parser = humantime::parse_duration
    )]
    pub in_flight_wait: Duration,
    /// Retry-After seconds on 503.
    #[arg(
        long = "retry-after-secs",
        env = "PULSE_INGEST_RETRY_AFTER_SECS",
        default_value_t = 1
    )]
    pub retry_after_secs: u64,
    /// Topic of accepted events.
    #[arg(long = "events-topic", env = "PULSE_EVENTS_TOPIC", default_value = topics::EVENTS)]
    pub events_topic: String,
    /// Dead-letter topic.
    #[arg(long = "dlq-topic", env = "PULSE_DLQ_TOPIC", default_value = topics::EVENTS_DLQ)]
    pub dlq_topic: String,
    /// The append-only audit topic API key file reloads are recorded to.
    #[arg(long = "audit-topic", env = "PULSE_AUDIT_TOPIC", default_value = topics::AUDIT)]
    pub audit_topic: String,
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
    /// TLS and limits of the HTTP, gRPC and admin servers.
    #[command(flatten)]
    pub server: ServerArgs,
}

impl Config {
    /// The keys in force, reloaded from `--api-keys-file` by [`crate::auth::KeyStore::watch`].
    pub(crate) fn api_key_store(&self) -> Result<crate::auth::KeyStore, KeysError> {
        crate::auth::KeyStore::load(
            ApiKeys::parse(self.api_keys.expose())?,
            self.api_keys_file.clone(),
        )
    }

    pub(crate) fn api_keys_resolved(&self) -> Result<ApiKeys, KeysError> {
        let mut keys = ApiKeys::parse(self.api_keys.expose())?;
        if let Some(path) = &self.api_keys_file {
            keys.extend(ApiKeys::from_file(path)?);
        }
        Ok(keys)
    }

    fn hmac_key(&self) -> Result<Vec<u8>, PiiSettingError> {
        match &self.pii_hmac_key_file {
            Some(path) => std::fs::read(path)
                .map(|k| k.trim_ascii().to_vec())
                .map_err(|source| PiiSettingError::ReadKey {
                    path: path.clone(),
                    source,
                }),
            None => Ok(self.pii_hmac_key.expose().as_bytes().to_vec()),
        }
    }

    pub(crate) fn pii(&self) -> Result<PiiPolicy, PiiSettingError> {
        PiiPolicy::parse(&self.pii_policy, &self.hmac_key()?).map_err(PiiSettingError::Policy)
    }

    /// --refuse-schema-versions plus what the deprecated --min/--max-schema-version
    /// (which earlier versions read) refuse.
    pub fn refused_schema_versions(&self) -> RefusedVersions {
        self.refuse_schema_versions
            .with_bounds(self.min_schema_version, self.max_schema_version)
    }

    /// The deprecated settings in use, for a start-up warning naming their replacement.
    pub fn deprecated_settings(&self) -> Vec<String> {
        let mut used = Vec::new();
        if let Some(m) = self.min_schema_version {
            used.push(format!(
                "--min-schema-version / PULSE_INGEST_MIN_SCHEMA_VERSION={m}"
            ));
        }
        if let Some(m) = self.max_schema_version {
            used.push(format!(
                "--max-schema-version / PULSE_INGEST_MAX_SCHEMA_VERSION={m}"
            ));
        }
        used
    }

    pub fn limits(&self) -> Limits {
        Limits {
            refused_schema_versions: self.refused_schema_versions(),
            max_future_skew_ms: self.max_future_skew_ms,
            max_age_ms: self.max_age_ms,
            max_event_bytes: self.max_event_bytes,
            ..Limits::default()
        }
    }

    pub fn body_limits(&self) -> BodyLimits {
        BodyLimits {
            max_body_bytes: self.max_body_bytes,
            max_decompressed_bytes: self.max_decompressed_bytes,
            max_batch_events: self.max_batch_events,
        }
    }
}

impl Validate for Config {
    fn validate(&self, p: &mut Problems) {
        removed_secret_flag(
            p,
            "--api-keys",
            self.removed_api_keys_flag.is_some(),
            "--api-keys-file or the environment variable PULSE_INGEST_API_KEYS",
        );
        removed_secret_flag(
            p,
            "--pii-hmac-key",
            self.removed_pii_hmac_key_flag.is_some(),
            "--pii-hmac-key-file or the environment variable PULSE_INGEST_PII_HMAC_KEY",
        );
        match self.api_keys_resolved() {
            Ok(k) => p.check(
                !k.is_empty(),
                "PULSE_INGEST_API_KEYS / --api-keys-file",
                "at least one API key is required",
            ),
            Err(e) => p.add("PULSE_INGEST_API_KEYS / --api-keys-file", e.to_string()),
        }
        p.check(
            !self.api_keys_reload_interval.is_zero(),
            "--api-keys-reload-interval / PULSE_INGEST_API_KEYS_RELOAD_INTERVAL",
            "must be more than 0",
        );
        if let Err(e) = self.pii() {
            p.add("--pii-policy / PULSE_INGEST_PII_POLICY", e.to_string());
        }
        p.check(
            self.schema_registry_url.starts_with("http://")
                || self.schema_registry_url.starts_with("https://"),
            "--schema-registry-url / PULSE_SCHEMA_REGISTRY_URL",
            format!("must be an http(s) URL, got {:?}", self.schema_registry_url),
        );
        self.registry_auth.validate(p);
        p.check(
            self.max_body_bytes >= 1024,
            "--max-body-bytes",
            "must be >= 1024",
        );
        p.check(
            self.max_decompressed_bytes >= self.max_body_bytes,
            "--max-decompressed-bytes",
            "must be >= --max-body-bytes",
        );
        p.check(
            self.max_batch_events >= 1,
            "--max-batch-events",
            "must be >= 1",
        );
        p.check(
            (1..=1_000_000).contains(&self.max_dlq_original_bytes),
            "--max-dlq-original-bytes",
            "must be between 1 and 1000000 (the broker's default message limit)",
        );
        p.check(
            self.max_stream_events >= self.max_batch_events,
            "--max-stream-events",
            "must be >= --max-batch-events",
        );
        p.check(self.dedup_capacity >= 1, "--dedup-capacity", "must be >= 1");
        p.check(self.rate_burst >= 1.0, "--rate-burst", "must be >= 1");
        self.kafka.validate(p);
        self.telemetry.validate(p);
        self.server.validate(p);
    }
}

pulse_platform::impl_service_config!(Config, server);

#[cfg(test)]
mod flag_tests {
    use clap::CommandFactory as _;

    #[test]
    fn every_flag_has_a_name_of_its_own() {
        // clap's debug assertions: duplicate argument ids or flags (ingest's own and the
        // flattened platform ones) panic here rather than at start.
        super::Config::command().debug_assert();
    }

    #[test]
    fn the_removed_secret_flags_are_refused_naming_the_replacement_not_the_value() {
        use clap::Parser as _;
        let c = super::Config::try_parse_from([
            "x",
            "--api-keys",
            "k-from-arg=web",
            "--pii-hmac-key",
            "hmac-from-arg",
        ])
        .unwrap();
        let text = pulse_platform::config::validate_all(&[&c])
            .unwrap_err()
            .to_string();
        for expected in [
            "--api-keys: this flag was removed",
            "--api-keys-file or the environment variable PULSE_INGEST_API_KEYS",
            "--pii-hmac-key: this flag was removed",
            "--pii-hmac-key-file or the environment variable PULSE_INGEST_PII_HMAC_KEY",
        ] {
            assert!(text.contains(expected), "{expected} missing in {text}");
        }
        for value in ["k-from-arg", "hmac-from-arg"] {
            assert!(!text.contains(value), "{value} echoed in {text}");
        }
        assert!(
            c.api_keys_resolved().unwrap().is_empty(),
            "a flag never sets keys"
        );
    }

    #[test]
    fn help_never_shows_secret_values() {
        let help = super::Config::command().render_long_help().to_string();
        for env in [super::API_KEYS_ENV, super::PII_HMAC_KEY_ENV] {
            // Environment only: named in the text of the file flag, never a flag itself.
            assert!(
                help.contains(&format!("itself in {env} (environment only")),
                "{env} missing"
            );
            assert!(
                !help.contains(&format!("[env: {env}]")) && !help.contains(&format!("{env}=")),
                "--help offers {env} as a flag or shows its value"
            );
        }
        for removed in ["--api-keys ", "--pii-hmac-key "] {
            assert!(!help.contains(removed), "{removed}in --help");
        }
    }
}
