//! ClickHouse connection settings shared by the writer, the query API and `pulsectl`.
//!
//! Two settings exist for old servers: Debian's ClickHouse 18.16 (used by the local
//! stack and the tests) returns empty bodies for compressed responses and lacks the
//! query the client uses for schema validation. The defaults (`none`, validation off)
//! work on 18.16 and on current releases; with a current server `lz4` and validation on
//! are safe to choose.
//!
//! `https://` URLs go over rustls ([`tls`]), trusting `--clickhouse-ca-file` or the
//! system's CA certificates. The password comes from a file or the environment, never
//! from a flag.

mod tls;

use std::path::PathBuf;

use crate::config::{Problems, Validate};
use crate::secret::{Secret, removed_secret_flag};

pub(crate) use tls::ca_roots;
pub use tls::{ConnectError, error_chain};

/// The environment variable holding the password when no file is given.
pub const PASSWORD_ENV: &str = "PULSE_CLICKHOUSE_PASSWORD";

/// Transport compression between Pulse and ClickHouse.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ClickHouseCompression {
    /// Plain bodies; required for ClickHouse 18.16.
    None,
    /// LZ4 blocks; for current servers.
    Lz4,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ClickHouseConfig {
    /// ClickHouse HTTP endpoint.
    #[arg(
        long = "clickhouse-url",
        env = "PULSE_CLICKHOUSE_URL",
        default_value = "http://127.0.0.1:8123"
    )]
    pub url: String,
    /// Database holding Pulse's tables.
    #[arg(
        long = "clickhouse-database",
        env = "PULSE_CLICKHOUSE_DATABASE",
        default_value = "pulse"
    )]
    pub database: String,
    #[arg(
        long = "clickhouse-user",
        env = "PULSE_CLICKHOUSE_USER",
        default_value = "default"
    )]
    pub user: String,
    /// The password from PULSE_CLICKHOUSE_PASSWORD (environment only, never a flag).
    /// Never logged.
    #[arg(skip = Secret::from_env(PASSWORD_ENV))]
    pub password: Secret,
    /// File holding the password (e.g. a mounted Secret); read each time a client is
    /// created. Or set the password itself in PULSE_CLICKHOUSE_PASSWORD (environment only,
    /// no flag; not both).
    #[arg(
        long = "clickhouse-password-file",
        env = "PULSE_CLICKHOUSE_PASSWORD_FILE"
    )]
    pub password_file: Option<PathBuf>,
    /// Removed: took the password as a process argument. Refused at start, naming the
    /// replacement.
    #[arg(long = "clickhouse-password", hide = true)]
    pub removed_password_flag: Option<Secret>,
    /// PEM file of the CA certificate(s) that signed ClickHouse's server certificate, for
    /// `https://` URLs; unset: the system's CA certificates. Read each time a client is
    /// created.
    #[arg(long = "clickhouse-ca-file", env = "PULSE_CLICKHOUSE_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    /// Transport compression (`none` is required for ClickHouse 18.16).
    #[arg(
        id = "clickhouse_compression",
        long = "clickhouse-compression",
        env = "PULSE_CLICKHOUSE_COMPRESSION",
        value_enum,
        default_value = "none"
    )]
    pub compression: ClickHouseCompression,
    /// Validate row types against the table schema before inserting (needs ClickHouse >= 22).
    #[arg(
        long = "clickhouse-validation",
        env = "PULSE_CLICKHOUSE_VALIDATION",
        default_value_t = false
    )]
    pub validation: bool,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        Self {
            url: "http://127.0.0.1:8123".into(),
            database: "pulse".into(),
            user: "default".into(),
            password: Secret::default(),
            password_file: None,
            removed_password_flag: None,
            ca_file: None,
            compression: ClickHouseCompression::None,
            validation: false,
        }
    }
}

impl ClickHouseConfig {
    /// A client for Pulse's database.
    pub fn client(&self) -> clickhouse::Client {
        self.server_client().with_database(&self.database)
    }

    /// A client without a database selected (to create the database itself).
    ///
    /// `https://` URLs are checked against the CA file or the system's roots. A CA file
    /// that cannot be used (validation at start refuses that; a file broken later) is
    /// logged, and every request of the client fails with that reason.
    pub fn server_client(&self) -> clickhouse::Client {
        let base = tls::client(self.is_https(), self.ca_file.as_deref()).unwrap_or_else(|reason| {
            tracing::error!(url = %self.url, %reason, "clickhouse: TLS settings unusable");
            tls::broken_client(reason)
        });
        base.with_url(&self.url)
            .with_user(&self.user)
            .with_password(self.effective_password().expose())
            .with_compression(match self.compression {
                ClickHouseCompression::None => clickhouse::Compression::None,
                ClickHouseCompression::Lz4 => clickhouse::Compression::Lz4,
            })
            .with_validation(self.validation)
    }
}

impl ClickHouseConfig {
    fn is_https(&self) -> bool {
        self.url.starts_with("https://")
    }

    /// The password from the file or the environment. A file that cannot be read (validation
    /// at start refuses that; a file removed later) is logged by name and no password is
    /// sent, so ClickHouse refuses the client with an authentication error.
    fn effective_password(&self) -> Secret {
        Secret::resolve(&self.password, self.password_file.as_deref()).unwrap_or_else(|reason| {
            tracing::error!(%reason, "clickhouse: password not set");
            Secret::default()
        })
    }
}

impl Validate for ClickHouseConfig {
    fn validate(&self, p: &mut Problems) {
        removed_secret_flag(
            p,
            "--clickhouse-password",
            self.removed_password_flag.is_some(),
            "--clickhouse-password-file or the environment variable PULSE_CLICKHOUSE_PASSWORD",
        );
        const CA: &str = "--clickhouse-ca-file / PULSE_CLICKHOUSE_CA_FILE";
        match (&self.ca_file, self.is_https()) {
            (Some(_), false) => p.add(
                CA,
                format!(
                    "a CA file is set but --clickhouse-url {:?} is not https://: the connection would not use TLS",
                    self.url
                ),
            ),
            (Some(ca), true) => {
                if let Err(reason) = tls::read_ca_file(ca) {
                    p.add(CA, reason);
                }
            }
            (None, true) => {
                if let Err(reason) = tls::roots(None) {
                    p.add(CA, reason);
                }
            }
            (None, false) => {}
        }
        if let Err(reason) = Secret::resolve(&self.password, self.password_file.as_deref()) {
            p.add(
                "--clickhouse-password-file / PULSE_CLICKHOUSE_PASSWORD_FILE",
                reason,
            );
        }
        p.check(
            self.url.starts_with("http://") || self.url.starts_with("https://"),
            "--clickhouse-url / PULSE_CLICKHOUSE_URL",
            format!("must be an http(s) URL, got {:?}", self.url),
        );
        p.check(
            !self.database.is_empty()
                && self
                    .database
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_'),
            "--clickhouse-database / PULSE_CLICKHOUSE_DATABASE",
            format!("must be letters, digits and _, got {:?}", self.database),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every shared config section can be flattened into one command line.
    #[derive(Debug, clap::Parser)]
    struct All {
        #[command(flatten)]
        kafka: crate::kafka::KafkaConfig,
        #[command(flatten)]
        clickhouse: ClickHouseConfig,
        #[command(flatten)]
        s3: crate::s3::S3Config,
        #[command(flatten)]
        telemetry: crate::telemetry::TelemetryConfig,
    }

    #[test]
    fn shared_sections_flatten_together_without_clashing_flags() {
        use clap::{CommandFactory, Parser};
        All::command().debug_assert();
        let all = All::parse_from([
            "x",
            "--clickhouse-compression",
            "lz4",
            "--kafka-compression",
            "zstd",
        ]);
        assert_eq!(all.clickhouse.compression, ClickHouseCompression::Lz4);
        assert_eq!(all.kafka.compression, "zstd");
    }

    #[test]
    fn debug_output_never_shows_the_password() {
        let cfg = ClickHouseConfig {
            password: "hunter2".into(),
            ..ClickHouseConfig::default()
        };
        let text = format!("{cfg:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("<redacted>"));
    }

    #[test]
    fn the_password_comes_from_its_file_or_the_environment_never_both() {
        let dir = std::env::temp_dir().join(format!("pulse-ch-pw-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("password");
        std::fs::write(&file, "from-file\n").unwrap();
        let from_file =
            All::try_parse_from_for_test(&["--clickhouse-password-file", file.to_str().unwrap()])
                .clickhouse;
        crate::config::validate_all(&[&from_file]).unwrap();
        assert_eq!(from_file.effective_password().expose(), "from-file");
        // PULSE_CLICKHOUSE_PASSWORD is read at parse time; set directly here so the test
        // does not change the process environment.
        let from_env = ClickHouseConfig {
            password: "from-env".into(),
            ..ClickHouseConfig::default()
        };
        assert_eq!(from_env.effective_password().expose(), "from-env");
        let both = ClickHouseConfig {
            password: "from-env".into(),
            ..All::try_parse_from_for_test(&["--clickhouse-password-file", file.to_str().unwrap()])
                .clickhouse
        };
        let text = crate::config::validate_all(&[&both])
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("--clickhouse-password-file") && text.contains("set only one"),
            "{text}"
        );
        assert!(!text.contains("from-"), "{text}");
        assert!(both.effective_password().is_empty());
        let none = All::try_parse_from_for_test(&[]).clickhouse;
        assert!(none.effective_password().is_empty());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    impl All {
        fn try_parse_from_for_test(args: &[&str]) -> Self {
            <Self as clap::Parser>::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
                .unwrap()
        }
    }

    #[test]
    fn the_removed_password_flag_is_refused_naming_the_replacement_not_the_value() {
        let old = All::try_parse_from_for_test(&["--clickhouse-password", "from-arg"]).clickhouse;
        let text = crate::config::validate_all(&[&old])
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("--clickhouse-password: this flag was removed")
                && text.contains("--clickhouse-password-file or the environment variable PULSE_CLICKHOUSE_PASSWORD"),
            "{text}"
        );
        assert!(!text.contains("from-arg"), "{text}");
    }

    #[test]
    fn a_ca_file_must_hold_certificates_and_go_with_an_https_url() {
        let dir = std::env::temp_dir().join(format!("pulse-ch-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let not_pem = dir.join("not.pem");
        std::fs::write(&not_pem, "hello\n").unwrap();
        let https = |ca: Option<PathBuf>| ClickHouseConfig {
            url: "https://clickhouse.example:8443".into(),
            ca_file: ca,
            ..ClickHouseConfig::default()
        };
        for (ca, expected) in [
            (dir.join("missing.pem"), "cannot read"),
            (not_pem.clone(), "holds no PEM certificate"),
        ] {
            let text = crate::config::validate_all(&[&https(Some(ca.clone()))])
                .unwrap_err()
                .to_string();
            assert!(
                text.contains("--clickhouse-ca-file")
                    && text.contains(expected)
                    && text.contains(&ca.display().to_string()),
                "{text}"
            );
        }
        let plain = ClickHouseConfig {
            ca_file: Some(not_pem),
            ..ClickHouseConfig::default()
        };
        let text = crate::config::validate_all(&[&plain])
            .unwrap_err()
            .to_string();
        assert!(text.contains("is not https://"), "{text}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn error_chain_names_every_cause_once() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer: {0}")]
        struct Outer(#[source] Inner);
        #[derive(Debug, thiserror::Error)]
        #[error("inner")]
        struct Inner(#[source] std::io::Error);
        let e = Outer(Inner(std::io::Error::other("root cause")));
        assert_eq!(error_chain(&e), "outer: inner: root cause");
    }

    #[test]
    fn help_never_shows_secret_values() {
        use clap::CommandFactory;
        let help = All::command().render_long_help().to_string();
        for secret in ["pulse-dev-access", "pulse-dev-secret"] {
            assert!(!help.contains(secret), "{secret} in --help");
        }
        for env in [
            "PULSE_CLICKHOUSE_PASSWORD",
            "PULSE_S3_ACCESS_KEY",
            "PULSE_S3_SECRET_KEY",
        ] {
            // Environment only: named in the text of the file flag, never a flag itself.
            assert!(
                help.contains(&format!("itself in {env}")),
                "{env} missing in --help"
            );
            assert!(
                !help.contains(&format!("[env: {env}]")) && !help.contains(&format!("{env}=")),
                "--help offers {env} as a flag or shows its value"
            );
        }
        for removed in [
            "--clickhouse-password ",
            "--s3-access-key ",
            "--s3-secret-key ",
        ] {
            assert!(!help.contains(removed), "{removed}in --help");
        }
    }

    #[test]
    fn defaults_suit_clickhouse_18_16() {
        let cfg = ClickHouseConfig::default();
        assert_eq!(cfg.compression, ClickHouseCompression::None);
        assert!(!cfg.validation);
        crate::config::validate_all(&[&cfg]).unwrap();
    }

    #[test]
    fn bad_database_name_is_reported() {
        let cfg = ClickHouseConfig {
            database: "pulse; DROP".into(),
            url: "127.0.0.1:8123".into(),
            ..ClickHouseConfig::default()
        };
        assert_eq!(crate::config::validate_all(&[&cfg]).unwrap_err().0.len(), 2);
    }
}
