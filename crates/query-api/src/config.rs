//! The query API's configuration: clap flags with `PULSE_*` environment fallbacks, every
//! one documented in the README's "Query API" section, validated at start.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use pulse_contracts::topics;
use pulse_platform::clickhouse::ClickHouseConfig;
use pulse_platform::config::{Problems, Validate};
use pulse_platform::kafka::KafkaConfig;
use pulse_platform::secret::{Secret, removed_secret_flag};
use pulse_platform::server::ServerArgs;
use pulse_platform::telemetry::TelemetryConfig;
use pulse_platform::windowing::WindowSettings;

use crate::auth::{TokenFileError, TokenStore, Tokens};
use crate::params::DAY_MS;
use crate::query::Limits;
use crate::store::QueryLimits;

/// The token of the local dev stack (documented in the README; never use it elsewhere).
pub const DEV_TOKEN: &str = "pulse-dev-token";

/// The environment variable holding the bearer tokens; environment only, never a flag.
pub const API_TOKENS_ENV: &str = "PULSE_QUERY_API_TOKENS";

/// Configuration; every flag has a `PULSE_*` environment fallback (see README).
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "pulse-query-api",
    version,
    about = "Analytics over HTTP and gRPC with freshness metadata, and the live dashboard."
)]
pub struct Config {
    /// HTTP listen address (JSON API, OpenAPI, dashboard).
    #[arg(
        long = "http-addr",
        env = "PULSE_QUERY_HTTP_ADDR",
        default_value = "127.0.0.1:8090"
    )]
    pub http_addr: SocketAddr,
    /// gRPC listen address.
    #[arg(
        long = "grpc-addr",
        env = "PULSE_QUERY_GRPC_ADDR",
        default_value = "127.0.0.1:50052"
    )]
    pub grpc_addr: SocketAddr,
    /// Address of the admin server (/metrics, /livez, /readyz).
    #[arg(
        long = "admin-addr",
        env = "PULSE_ADMIN_ADDR",
        default_value = "127.0.0.1:9104"
    )]
    pub admin_addr: SocketAddr,
    /// Bearer tokens, comma-separated, from PULSE_QUERY_API_TOKENS (environment only, never
    /// a flag). Never logged.
    #[arg(skip = Secret::from_env(API_TOKENS_ENV))]
    pub api_tokens: Secret,
    /// File with one bearer token (or `token=name`) per line (e.g. a mounted Kubernetes
    /// secret); re-read when its content changes, no restart needed. Or set the token list
    /// itself in PULSE_QUERY_API_TOKENS (environment only, no flag; the tokens of both are
    /// used).
    #[arg(long = "api-tokens-file", env = "PULSE_QUERY_API_TOKENS_FILE")]
    pub api_tokens_file: Option<PathBuf>,
    /// Removed: took the tokens as a process argument. Refused at start, naming the
    /// replacement.
    #[arg(long = "api-tokens", hide = true)]
    pub removed_api_tokens_flag: Option<Secret>,
    /// How often `--api-tokens-file` is checked for changes, ms.
    #[arg(
        long = "api-tokens-reload-interval-ms",
        env = "PULSE_QUERY_API_TOKENS_RELOAD_INTERVAL_MS",
        default_value_t = 5000
    )]
    pub api_tokens_reload_interval_ms: u64,
    /// Window size and allowed lateness, shared with the processor: the watermark
    /// reported is the latest final window end plus the lateness, and a series step must
    /// be a whole number of windows.
    #[command(flatten)]
    pub windowing: WindowSettings,
    /// Most buckets one series answer may have.
    #[arg(
        long = "max-points",
        env = "PULSE_QUERY_MAX_POINTS",
        default_value_t = 1500
    )]
    pub max_points: usize,
    /// Longest `from`..`to` range of any endpoint, ms (400 `range_too_long` beyond it).
    #[arg(
        long = "max-range-ms",
        env = "PULSE_QUERY_MAX_RANGE_MS",
        default_value_t = 31 * DAY_MS
    )]
    pub max_range_ms: i64,
    /// ClickHouse query timeout, ms (504 / DEADLINE_EXCEEDED after it); also sent to
    /// ClickHouse as `max_execution_time` (whole seconds, rounded up).
    #[arg(
        long = "query-timeout-ms",
        env = "PULSE_QUERY_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub query_timeout_ms: u64,
    /// Memory one ClickHouse query may use, bytes (`max_memory_usage`; 0 = no limit).
    #[arg(
        long = "query-max-memory-bytes",
        env = "PULSE_QUERY_MAX_MEMORY_BYTES",
        default_value_t = 1 << 30
    )]
    pub query_max_memory_bytes: u64,
    /// Rows one ClickHouse query may return (`max_result_rows`; 0 = no limit).
    #[arg(
        long = "query-max-result-rows",
        env = "PULSE_QUERY_MAX_RESULT_ROWS",
        default_value_t = 100_000
    )]
    pub query_max_result_rows: u64,
    /// How long the table-wide freshness is cached, ms (0 = read it for every request).
    #[arg(
        long = "freshness-cache-ms",
        env = "PULSE_QUERY_FRESHNESS_CACHE_MS",
        default_value_t = 1000
    )]
    pub freshness_cache_ms: u64,
    #[command(flatten)]
    pub clickhouse: ClickHouseConfig,
    /// The broker the audit records (token file reloads) are written to. Queries never
    /// wait for it: while it is down the service starts, serves and stays ready, and the
    /// records fail (counted in `pulse_audit_records_failed_total`, logged at error level).
    #[command(flatten)]
    pub kafka: KafkaConfig,
    /// The append-only audit topic token file reloads are recorded to (`pulsectl audit`
    /// lists it; created in the background when missing).
    #[arg(long = "audit-topic", env = "PULSE_AUDIT_TOPIC", default_value = topics::AUDIT)]
    pub audit_topic: String,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
    /// TLS and limits of the HTTP, gRPC and admin servers.
    #[command(flatten)]
    pub server: ServerArgs,
}

impl Config {
    /// Every accepted token, from the list and the file.
    pub fn tokens(&self) -> Result<Tokens, TokenFileError> {
        let mut tokens = Tokens::parse_list(self.api_tokens.expose());
        if let Some(path) = &self.api_tokens_file {
            tokens.extend(Tokens::read_file(path)?);
        }
        Ok(tokens)
    }

    /// The tokens in force, reloaded from `--api-tokens-file` by [`TokenStore::watch`].
    pub fn token_store(&self) -> Result<TokenStore, TokenFileError> {
        TokenStore::load(
            Tokens::parse_list(self.api_tokens.expose()),
            self.api_tokens_file.clone(),
            Duration::from_millis(self.api_tokens_reload_interval_ms),
        )
    }

    pub fn limits(&self) -> Limits {
        Limits {
            window_ms: self.windowing.window_ms,
            max_points: self.max_points,
            allowed_lateness_ms: self.windowing.allowed_lateness_ms,
            max_range_ms: self.max_range_ms,
        }
    }

    /// The memory and result limits ClickHouse enforces on every query of the service.
    pub fn query_limits(&self) -> QueryLimits {
        QueryLimits {
            max_memory_bytes: self.query_max_memory_bytes,
            max_result_rows: self.query_max_result_rows,
        }
    }

    pub fn query_timeout(&self) -> Duration {
        Duration::from_millis(self.query_timeout_ms)
    }

    pub fn freshness_ttl(&self) -> Duration {
        Duration::from_millis(self.freshness_cache_ms)
    }
}

const TOKENS_KEY: &str = "PULSE_QUERY_API_TOKENS / --api-tokens-file";

impl Validate for Config {
    fn validate(&self, p: &mut Problems) {
        removed_secret_flag(
            p,
            "--api-tokens",
            self.removed_api_tokens_flag.is_some(),
            "--api-tokens-file or the environment variable PULSE_QUERY_API_TOKENS",
        );
        match self.tokens() {
            Ok(t) => p.check(
                !t.is_empty(),
                TOKENS_KEY,
                "at least one API token is required",
            ),
            Err(e) => p.add(TOKENS_KEY, e.to_string()),
        }
        p.check(
            self.api_tokens_reload_interval_ms >= 1,
            "--api-tokens-reload-interval-ms / PULSE_QUERY_API_TOKENS_RELOAD_INTERVAL_MS",
            "must be >= 1",
        );
        self.windowing.validate(p);
        p.check(self.max_points >= 1, "--max-points", "must be >= 1");
        p.check(
            self.max_range_ms >= 60_000,
            "--max-range-ms / PULSE_QUERY_MAX_RANGE_MS",
            format!(
                "must be at least one minute (60000), got {}",
                self.max_range_ms
            ),
        );
        p.check(
            self.query_timeout_ms >= 1,
            "--query-timeout-ms",
            "must be >= 1",
        );
        self.clickhouse.validate(p);
        self.kafka.validate(p);
        p.check(
            !self.audit_topic.trim().is_empty(),
            "--audit-topic / PULSE_AUDIT_TOPIC",
            "must not be empty",
        );
        self.telemetry.validate(p);
        self.server.validate(p);
    }
}

pulse_platform::impl_service_config!(Config, server);

#[cfg(test)]
mod tests {
    use clap::Parser;
    use pulse_platform::config::validate_all;

    use super::*;

    /// The config of `args` with `tokens` as if from PULSE_QUERY_API_TOKENS (tests must not
    /// set the process environment: they run in parallel).
    fn with_tokens<const N: usize>(tokens: &str, args: [&str; N]) -> Result<Config, clap::Error> {
        Config::try_parse_from(args).map(|c| Config {
            api_tokens: tokens.into(),
            ..c
        })
    }

    #[test]
    fn defaults_match_the_readme() {
        let c = with_tokens("t", ["q"]).unwrap();
        assert_eq!(c.http_addr.to_string(), "127.0.0.1:8090");
        assert_eq!(c.grpc_addr.to_string(), "127.0.0.1:50052");
        assert_eq!(c.admin_addr.to_string(), "127.0.0.1:9104");
        assert_eq!(
            (c.windowing.allowed_lateness_ms, c.windowing.window_ms),
            (60_000, 60_000)
        );
        assert_eq!(
            (c.max_points, c.query_timeout_ms, c.freshness_cache_ms),
            (1500, 10_000, 1000)
        );
        assert_eq!(c.max_range_ms, 2_678_400_000, "31 days");
        assert_eq!(c.api_tokens_reload_interval_ms, 5000);
        assert_eq!(
            (c.query_max_memory_bytes, c.query_max_result_rows),
            (1_073_741_824, 100_000)
        );
        assert_eq!(
            (c.kafka.brokers.as_str(), c.audit_topic.as_str()),
            ("127.0.0.1:9092", "pulse.audit.v1")
        );
        validate_all(&[&c]).unwrap();
    }

    #[test]
    fn a_config_without_tokens_is_refused() {
        let c = with_tokens(" , ", ["q"]).unwrap();
        let err = validate_all(&[&c]).unwrap_err();
        assert!(err.to_string().contains("at least one API token"), "{err}");
    }

    #[test]
    fn debug_output_never_shows_tokens() {
        let c = with_tokens("hunter2", ["q"]).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }

    #[test]
    fn bad_knobs_are_all_reported() {
        let c = with_tokens(
            "t",
            [
                "q",
                "--window-ms",
                "7",
                "--max-points",
                "0",
                "--query-timeout-ms",
                "0",
                "--max-range-ms",
                "59999",
                "--audit-topic",
                " ",
            ],
        )
        .unwrap();
        assert_eq!(validate_all(&[&c]).unwrap_err().0.len(), 5);
    }

    #[test]
    fn every_flag_has_a_name_of_its_own() {
        use clap::CommandFactory as _;
        Config::command().debug_assert();
    }

    #[test]
    fn the_removed_tokens_flag_is_refused_naming_the_replacement_not_the_value() {
        let c = with_tokens("t", ["q", "--api-tokens", "tok-from-arg"]).unwrap();
        let text = validate_all(&[&c]).unwrap_err().to_string();
        assert!(
            text.contains("--api-tokens: this flag was removed")
                && text.contains(
                    "--api-tokens-file or the environment variable PULSE_QUERY_API_TOKENS"
                ),
            "{text}"
        );
        assert!(!text.contains("tok-from-arg"), "{text}");
        let tokens = Config::try_parse_from(["q", "--api-tokens", "tok-from-arg"])
            .unwrap()
            .tokens()
            .unwrap();
        assert!(tokens.is_empty(), "a flag never sets tokens");
    }

    #[test]
    fn help_never_shows_secret_values() {
        use clap::CommandFactory as _;
        let help = Config::command().render_long_help().to_string();
        // Environment only: named in the text of the file flag, never a flag itself.
        assert!(
            help.contains(&format!("itself in {API_TOKENS_ENV} (environment only")),
            "{API_TOKENS_ENV} missing in --help"
        );
        assert!(
            !help.contains(&format!("[env: {API_TOKENS_ENV}]"))
                && !help.contains(&format!("{API_TOKENS_ENV}=")),
            "--help offers {API_TOKENS_ENV} as a flag or shows its value"
        );
        assert!(!help.contains("--api-tokens "), "--api-tokens in --help");
    }
}
