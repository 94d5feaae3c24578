//! `pulsectl ledger --from … --to …`: the event ledger of a closed event-time range. Every
//! accepted event (a record of the events topic) must end in exactly one terminal state
//! per path — stored in ClickHouse or dead-lettered; archived in Parquet or
//! dead-lettered; counted in its window's aggregate or on the late topic — and the
//! revenue per hour and currency of the raw events must equal, to the micro, what the
//! query API serves from the aggregates. Prints the per-window counts per state and every
//! difference (ids per path), and fails on a mismatch. `pulsectl ledger watch` runs the
//! same reconciliation on every newly closed window and exports `pulse_ledger_*` metrics.
//! `ledger --from --to` shows reading the topics (records) and the archive (objects) on
//! stderr with `crate::progress` (a bar on a terminal, plain lines otherwise).
//!
//! Modules: `topic` (reading topics), `book` (the topics' side), `sources` (the stores'
//! side and the closed-range rule), `reconcile` (the comparison), `revenue` (the query
//! API's answer), `query_tls` (trusting an `https://` query API), `watch` (the continuous
//! mode and its metrics).

pub mod book;
pub mod metrics;
pub mod query_tls;
pub mod reconcile;
pub mod revenue;
pub mod sources;
pub mod topic;
pub mod watch;

use std::time::Duration;

use pulse_contracts::topics;
use pulse_platform::clickhouse::ClickHouseConfig;
use pulse_platform::config::{Problems, Validate, validate_all};
use pulse_platform::kafka::KafkaConfig;
use pulse_platform::s3::S3Config;
use pulse_platform::secret::{Secret, removed_secret_flag};
use pulse_platform::windowing::WindowSettings;

pub use self::reconcile::{Path, Report};
pub use self::sources::Sources;
use crate::progress::ProgressArgs;

/// `ledger`: one closed range, or `ledger watch`.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct LedgerArgs {
    #[command(subcommand)]
    pub command: Option<LedgerCommand>,
    /// Start of the event-time range, inclusive: RFC 3339 or epoch ms, on a window boundary.
    #[arg(long, value_parser = crate::replay::parse_time, allow_hyphen_values = true, required = true)]
    pub from: Option<i64>,
    /// End of the event-time range, exclusive: RFC 3339 or epoch ms, on a window boundary,
    /// and closed (README: pulsectl, ledger).
    #[arg(long, value_parser = crate::replay::parse_time, allow_hyphen_values = true, required = true)]
    pub to: Option<i64>,
    #[command(flatten)]
    pub sources: SourceArgs,
}

#[derive(Debug, Clone, clap::Subcommand)]
pub enum LedgerCommand {
    /// Reconcile every newly closed window, continuously, and export `pulse_ledger_*`
    /// metrics on an admin port.
    Watch(Box<watch::WatchArgs>),
}

/// Where the ledger reads, and how it decides that a range is closed.
#[derive(Debug, Clone, clap::Args)]
pub struct SourceArgs {
    /// The accepted events.
    #[arg(long = "events-topic", env = "PULSE_EVENTS_TOPIC", default_value = topics::EVENTS)]
    pub events_topic: String,
    /// The processor's late side output.
    #[arg(long = "late-topic", env = "PULSE_LATE_TOPIC", default_value = topics::EVENTS_LATE)]
    pub late_topic: String,
    /// The dead-letter queue (the writers' dead letters are matched to accepted events).
    #[arg(long = "dlq-topic", env = "PULSE_DLQ_TOPIC", default_value = topics::EVENTS_DLQ)]
    pub dlq_topic: String,
    /// The topics are read from records produced this long before the range's start
    /// (an event's ingest time can precede its event time by the future-skew the pipeline
    /// allows), where the broker can look offsets up by time; else from the beginning.
    #[arg(long = "scan-margin", env = "PULSE_LEDGER_SCAN_MARGIN", default_value = "15m", value_parser = humantime::parse_duration)]
    pub scan_margin: Duration,
    /// Wall-clock time after a range's end plus the allowed lateness before it counts as
    /// closed (the writers' batches and the Parquet roll, `--parquet-max-age-ms`, must
    /// have been flushed).
    #[arg(long = "settle", env = "PULSE_LEDGER_SETTLE", default_value = "2m", value_parser = humantime::parse_duration)]
    pub settle: Duration,
    /// The query API's HTTP base URL (the revenue it serves is checked).
    #[arg(
        long = "query-url",
        env = "PULSE_LEDGER_QUERY_URL",
        default_value = "http://127.0.0.1:8090"
    )]
    pub query_url: String,
    /// A bearer token of the query API from PULSE_LEDGER_QUERY_TOKEN (environment only,
    /// never a flag). Never logged.
    #[arg(skip = Secret::from_env(QUERY_TOKEN_ENV))]
    pub query_token: Secret,
    /// A file holding the bearer token (e.g. a mounted Kubernetes Secret). Or set the token
    /// itself in PULSE_LEDGER_QUERY_TOKEN (environment only, no flag; the file wins).
    /// Neither: the dev stack's token.
    #[arg(long = "query-token-file", env = "PULSE_LEDGER_QUERY_TOKEN_FILE")]
    pub query_token_file: Option<std::path::PathBuf>,
    /// Removed: took the token as a process argument. Refused at start, naming the
    /// replacement.
    #[arg(long = "query-token", hide = true)]
    pub removed_query_token_flag: Option<Secret>,
    /// The query API's TLS: `--query-ca-file`, `--query-client-cert-file`,
    /// `--query-client-key-file`.
    #[command(flatten)]
    pub query_tls: query_tls::QueryTlsArgs,
    /// Do not check the Parquet archive (no S3).
    #[arg(long = "skip-archive", env = "PULSE_LEDGER_SKIP_ARCHIVE")]
    pub skip_archive: bool,
    /// Do not check the revenue (no query API).
    #[arg(long = "skip-revenue", env = "PULSE_LEDGER_SKIP_REVENUE")]
    pub skip_revenue: bool,
    /// How long reading a topic, ClickHouse, S3 or the query API may take.
    #[arg(long = "read-timeout", env = "PULSE_LEDGER_READ_TIMEOUT", default_value = "60s", value_parser = humantime::parse_duration)]
    pub read_timeout: Duration,
    /// Ids printed per difference.
    #[arg(long = "max-ids", default_value_t = 20)]
    pub max_ids: usize,
    /// The memory budget, in events held at once (accepted events of the span not yet
    /// reconciled, with their late and dead-lettered ones; ~200 bytes each, plus as many
    /// archive rows). `ledger watch` defers the windows that do not fit and reads their
    /// events again once the earlier ones are reconciled; `ledger --from --to` refuses a
    /// range holding more (split it).
    #[arg(
        long = "max-held-events",
        env = "PULSE_LEDGER_MAX_HELD_EVENTS",
        default_value_t = DEFAULT_MAX_HELD_EVENTS
    )]
    pub max_held_events: usize,
    /// Window size and allowed lateness: the processor's (`PULSE_WINDOW_MS`,
    /// `PULSE_ALLOWED_LATENESS_MS`).
    #[command(flatten)]
    pub windowing: WindowSettings,
    #[command(flatten)]
    pub kafka: KafkaConfig,
    #[command(flatten)]
    pub clickhouse: ClickHouseConfig,
    #[command(flatten)]
    pub s3: S3Config,
}

/// The environment variable holding the query API token; environment only, never a flag.
pub const QUERY_TOKEN_ENV: &str = "PULSE_LEDGER_QUERY_TOKEN";
/// The query API token of the local dev stack, used when none is set.
pub const DEV_QUERY_TOKEN: &str = "pulse-dev-token";

impl Validate for SourceArgs {
    fn validate(&self, p: &mut Problems) {
        removed_secret_flag(
            p,
            "--query-token",
            self.removed_query_token_flag.is_some(),
            "--query-token-file or the environment variable PULSE_LEDGER_QUERY_TOKEN",
        );
        for (v, flag) in [
            (&self.events_topic, "--events-topic"),
            (&self.late_topic, "--late-topic"),
            (&self.dlq_topic, "--dlq-topic"),
        ] {
            p.check(!v.is_empty(), flag, "must not be empty");
        }
        if !self.skip_revenue {
            p.check(
                self.query_url.starts_with("http://") || self.query_url.starts_with("https://"),
                "--query-url / PULSE_LEDGER_QUERY_URL",
                format!(
                    "must be an http(s) URL, got {:?} (or pass --skip-revenue)",
                    self.query_url
                ),
            );
            self.query_tls.check(&self.query_url, p);
        }
        p.check(
            !self.read_timeout.is_zero(),
            "--read-timeout",
            "must be longer than 0",
        );
        p.check(
            self.max_held_events >= 1,
            "--max-held-events / PULSE_LEDGER_MAX_HELD_EVENTS",
            "must be at least 1",
        );
        self.windowing.validate(p);
        self.kafka.validate(p);
        if !self.skip_archive {
            self.s3.validate(p);
        }
    }
}

impl SourceArgs {
    pub fn window_ms(&self) -> i64 {
        self.windowing.window_ms
    }

    /// The query API token: from `--query-token-file` when set, else
    /// PULSE_LEDGER_QUERY_TOKEN, else the dev stack's token.
    pub fn token(&self) -> Result<Secret, LedgerError> {
        match &self.query_token_file {
            Some(path) => Secret::from_file(path).map_err(|reason| {
                LedgerError::Config(pulse_platform::config::ConfigErrors(vec![
                    pulse_platform::config::ConfigError {
                        key: "--query-token-file / PULSE_LEDGER_QUERY_TOKEN_FILE".into(),
                        reason,
                    },
                ]))
            }),
            None if self.query_token.is_empty() => Ok(Secret::new(DEV_QUERY_TOKEN)),
            None => Ok(self.query_token.clone()),
        }
    }
}

/// A range to reconcile: aligned to windows, ordered, at most [`MAX_HOURS`] long.
pub fn check_range(from: i64, to: i64, window_ms: i64, p: &mut Problems) {
    let t = crate::rfc3339;
    p.check(
        from < to,
        "--from / --to",
        format!("--from must be before --to, got {} and {}", t(from), t(to)),
    );
    p.check(
        from >= 0,
        "--from",
        format!("{} is before 1970, where Pulse keeps no events", t(from)),
    );
    if window_ms > 0 {
        for (v, flag) in [(from, "--from"), (to, "--to")] {
            p.check(
                v.rem_euclid(window_ms) == 0,
                flag,
                format!(
                    "{} is not on a window boundary (windows of {window_ms} ms); the aggregates are per window",
                    t(v)
                ),
            );
        }
    }
    let hours = crate::replay::read::hours_spanned(from, to);
    p.check(
        hours <= MAX_HOURS,
        "--from / --to",
        format!("the range spans {hours} hours; at most {MAX_HOURS} per run (split it)"),
    );
}

/// The longest range one run reconciles (every id of it is held in memory, up to
/// `--max-held-events`).
pub const MAX_HOURS: i64 = 24;

/// `--max-held-events`' default: ~200,000 events ≈ 40 MiB of book (plus as many archive
/// rows), about 50 s of the local benchmark's 4,000 events/s.
pub const DEFAULT_MAX_HELD_EVENTS: usize = 200_000;

/// Why the ledger could not reconcile, or found a difference.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{0}")]
    Config(#[from] pulse_platform::config::ConfigErrors),
    #[error("{0}")]
    Topic(#[from] crate::dlq::ReadError),
    #[error("{0}")]
    ClickHouse(#[from] pulse_storage::ledger::LedgerQueryError),
    #[error("s3: {0}")]
    Store(#[from] object_store::Error),
    #[error("archive object {key}: {reason}")]
    Archive { key: String, reason: String },
    #[error("revenue: {0}")]
    Revenue(#[from] revenue::RevenueError),
    #[error("{0}")]
    NotClosed(String),
    #[error(
        "the range holds more than {max} events (read so far: {held}), the memory budget --max-held-events / PULSE_LEDGER_MAX_HELD_EVENTS; split it into shorter ranges or raise the budget"
    )]
    OverBudget { held: usize, max: usize },
    #[error("admin server: {0}")]
    Admin(#[from] std::io::Error),
    #[error("mismatch in [{from}, {to}): {summary}")]
    Mismatch {
        from: String,
        to: String,
        summary: String,
    },
}

/// Reconciles one closed range as configured (validated first; refused when not closed).
/// With `progress`, shows reading the topics and the archive on stderr.
pub async fn check(
    from: i64,
    to: i64,
    args: &SourceArgs,
    progress: Option<&ProgressArgs>,
) -> Result<Report, LedgerError> {
    validate_all(&[args])?;
    let mut p = Problems::default();
    check_range(from, to, args.window_ms(), &mut p);
    p.into_result()?;
    let mut sources = Sources::open(args, from, to).await?;
    if let Some(p) = progress {
        sources.show_progress(p);
    }
    let horizon = sources
        .closed_horizon(to - args.window_ms(), sources::now_ms())
        .await?;
    sources::check_closed(to, &horizon)?;
    sources.catch_up().await?;
    sources.reconcile(from, to).await
}

/// `ledger --from --to`, or `ledger watch` (whose admin certificate reloads are audited
/// to `audit`'s topic).
pub async fn run(
    args: LedgerArgs,
    progress: &ProgressArgs,
    audit: &crate::audit::AuditArgs,
) -> Result<(), crate::Error> {
    match args.command {
        Some(LedgerCommand::Watch(w)) => Ok(watch::run(*w, audit).await?),
        None => {
            let (Some(from), Some(to)) = (args.from, args.to) else {
                return Err(LedgerError::NotClosed("--from and --to are required".into()).into());
            };
            let report = check(from, to, &args.sources, Some(progress)).await?;
            for line in report.lines(args.sources.max_ids) {
                println!("{line}");
            }
            if report.is_mismatch() {
                return Err(LedgerError::Mismatch {
                    from: crate::rfc3339(from),
                    to: crate::rfc3339(to),
                    summary: report.mismatch_summary(),
                }
                .into());
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::{Cli, Command};

    fn parse(args: &[&str]) -> Result<LedgerArgs, clap::Error> {
        let mut argv = vec!["pulsectl", "ledger"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv)?.command {
            Command::Ledger(a) => Ok(*a),
            other => panic!("not ledger: {other:?}"),
        }
    }

    #[test]
    fn a_range_needs_from_and_to_and_watch_needs_neither() {
        let a = parse(&["--from", "2025-11-25T00:00:00Z", "--to", "1764032400000"]).unwrap();
        assert_eq!(
            (a.from, a.to),
            (Some(1_764_028_800_000), Some(1_764_032_400_000))
        );
        assert!(a.command.is_none());
        assert_eq!(a.sources.settle, Duration::from_secs(120));
        assert!(parse(&["--from", "0"]).is_err());
        assert!(parse(&["--from", "yesterday", "--to", "0"]).is_err());
        let w = parse(&["watch", "--interval", "5s", "--currencies", "EUR,USD"]).unwrap();
        let Some(LedgerCommand::Watch(w)) = w.command else {
            panic!("not watch")
        };
        assert_eq!(w.interval, Duration::from_secs(5));
        assert_eq!(w.currencies, ["EUR", "USD"]);
        assert!(parse(&["watch", "--from", "0"]).is_err());
    }

    #[test]
    fn ranges_must_be_ordered_window_aligned_and_bounded() {
        let errors = |from: i64, to: i64| {
            let mut p = Problems::default();
            check_range(from, to, 60_000, &mut p);
            p.into_result()
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        const T: i64 = 1_764_028_800_000;
        assert_eq!(errors(T, T + 60_000), "");
        assert!(errors(T + 60_000, T).contains("--from must be before --to"));
        let e = errors(T + 1, T + 60_000);
        assert!(
            e.contains("--from") && e.contains("not on a window boundary"),
            "{e}"
        );
        assert!(errors(T, T + 25 * 3_600_000).contains("at most 24 per run"));
    }

    #[test]
    fn the_removed_query_token_flag_is_refused_naming_the_replacement_not_the_value() {
        let a = parse(&[
            "--from",
            "0",
            "--to",
            "60000",
            "--query-token",
            "tok-from-arg",
        ])
        .unwrap();
        let text = validate_all(&[&a.sources]).unwrap_err().to_string();
        assert!(
            text.contains("--query-token: this flag was removed")
                && text.contains(
                    "--query-token-file or the environment variable PULSE_LEDGER_QUERY_TOKEN"
                ),
            "{text}"
        );
        assert!(!text.contains("tok-from-arg"), "{text}");
        assert_ne!(a.sources.token().unwrap().expose(), "tok-from-arg");
        let default = parse(&["--from", "0", "--to", "60000"]).unwrap().sources;
        if std::env::var_os(QUERY_TOKEN_ENV).is_none() {
            assert_eq!(default.token().unwrap().expose(), DEV_QUERY_TOKEN);
        }
        let from_env = SourceArgs {
            query_token: "from-env".into(),
            ..default
        };
        assert_eq!(from_env.token().unwrap().expose(), "from-env");
    }

    #[test]
    fn help_never_shows_secret_values() {
        use clap::CommandFactory as _;
        let mut cli = Cli::command();
        let ledger = cli.find_subcommand_mut("ledger").unwrap();
        let mut help = ledger.render_long_help().to_string();
        let watch = ledger.find_subcommand_mut("watch").unwrap();
        help.push_str(&watch.render_long_help().to_string());
        assert!(
            help.contains(&format!("itself in {QUERY_TOKEN_ENV} (environment only")),
            "{QUERY_TOKEN_ENV} missing in --help"
        );
        assert!(
            !help.contains(&format!("[env: {QUERY_TOKEN_ENV}]"))
                && !help.contains(&format!("{QUERY_TOKEN_ENV}="))
                && !help.contains(DEV_QUERY_TOKEN),
            "--help offers {QUERY_TOKEN_ENV} as a flag or shows a token"
        );
        assert!(!help.contains("--query-token "), "--query-token in --help");
    }
}
