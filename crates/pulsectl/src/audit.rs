//! `pulsectl audit`: lists the audit trail (`pulse.audit.v1`, records of
//! `pulse_platform::audit`) as text or JSON lines, filtered by time, action and actor, from
//! the topic (`--source topic`, the default) or from the writer's ClickHouse copy
//! (`--source clickhouse`, table `audit_log`); and
//! [`record`], with which the commands that change things (`dlq redrive`, `replay`,
//! `migrate`, `topics create`, `shadow discard`, `shadow promote check|finish`) write their
//! own record: who
//! (`--actor`, else `$USER`), what, and how it ended ([`Ending`]: `ok`, `refused` — the
//! command's checks or flags said no, nothing changed — or `failed`).
//! The record format and its producer are platform's; reading the topic is `dlq::read`'s
//! (platform's `kafka::reader`).

use std::time::Duration;

use pulse_contracts::topics;
use pulse_platform::audit::{AuditRecord, AuditRow, Outcome, topic_spec, write_now};
use pulse_platform::clickhouse::ClickHouseConfig;
use pulse_platform::config::{Validate, validate_all};
use pulse_platform::kafka::{KafkaConfig, KafkaProducer, ensure_topics};
use serde_json::json;

use crate::dlq::ReadError;
use crate::dlq::read::read_records;
use crate::progress::{Progress, ProgressArgs};

/// Who runs `pulsectl` and where its audit records go; global flags, so they may be
/// given before or after the subcommand.
#[derive(Debug, Clone, clap::Args)]
pub struct AuditArgs {
    /// Who runs this command, recorded in the audit trail of the changes it makes
    /// (default: `$USER`).
    #[arg(long = "actor", env = "PULSE_ACTOR", global = true)]
    pub actor: Option<String>,
    /// The audit topic: written by `dlq redrive`, `replay`, `migrate`, `topics create`,
    /// `shadow discard` and `shadow promote` (and by `ledger watch` when its admin
    /// certificate is reloaded), read by `audit`.
    #[arg(
        long = "audit-topic",
        env = "PULSE_AUDIT_TOPIC",
        default_value = topics::AUDIT,
        global = true
    )]
    pub audit_topic: String,
    /// How long writing an audit record may take before the command gives up on it (with
    /// a warning on stderr; the command's own result stands).
    #[arg(
        long = "audit-timeout",
        env = "PULSE_AUDIT_TIMEOUT",
        default_value = "10s",
        value_parser = crate::duration::parse_duration,
        global = true
    )]
    pub audit_timeout: Duration,
}

impl AuditArgs {
    /// `--actor`, else `$USER`, else `unknown`.
    pub fn actor(&self) -> String {
        self.actor
            .clone()
            .filter(|a| !a.trim().is_empty())
            .or_else(|| std::env::var("USER").ok().filter(|u| !u.is_empty()))
            .unwrap_or_else(|| "unknown".into())
    }
}

/// How a command that changes things ended, as its audit record states it: the outcome
/// and the detail (what was done, the reasons of a refusal, the error).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ending {
    pub outcome: Outcome,
    pub detail: String,
}

impl Ending {
    /// Done.
    pub fn ok(detail: impl Into<String>) -> Self {
        Self::new(Outcome::Ok, detail)
    }

    /// Not done, nothing changed: the command's own checks said no (`shadow promote`
    /// found differences) or its flags were refused; `detail` holds the reasons.
    pub fn refused(detail: impl Into<String>) -> Self {
        Self::new(Outcome::Refused, detail)
    }

    /// Tried and failed (an error, a failed step).
    pub fn failed(detail: impl Into<String>) -> Self {
        Self::new(Outcome::Failed, detail)
    }

    fn new(outcome: Outcome, detail: impl Into<String>) -> Self {
        Self {
            outcome,
            detail: detail.into(),
        }
    }

    /// The ending of a command that stopped with `error` (`detail` states it): `refused`
    /// when its flags were refused or its checks said no before it changed anything
    /// (invalid settings, an empty range, a negative tolerance, a promotion refused), else
    /// `failed`.
    pub fn of_error(error: &crate::Error, detail: impl Into<String>) -> Self {
        use crate::shadow::ShadowError;
        match error {
            crate::Error::Config(_)
            | crate::Error::Topics(pulse_platform::kafka::topics::TopicError::Drift { .. })
            | crate::Error::Shadow(
                ShadowError::Refused(_) | ShadowError::Range { .. } | ShadowError::Tolerance(_),
            ) => Self::refused(detail),
            _ => Self::failed(detail),
        }
    }
}

/// `Ok(detail)`: `ok`; `Err(error)`: `failed`.
impl From<Result<String, String>> for Ending {
    fn from(result: Result<String, String>) -> Self {
        match result {
            Ok(d) => Self::ok(d),
            Err(e) => Self::failed(e),
        }
    }
}

/// Writes the audit record of a command's change and waits for the broker, at most
/// `--audit-timeout`; a record that cannot be written is a warning on stderr (the change
/// itself happened, failed or was refused regardless). `ending` is the command's: an
/// [`Ending`], or `Ok(detail)` / `Err(error)` for `ok` / `failed`.
pub async fn record(
    args: &AuditArgs,
    kafka: &KafkaConfig,
    action: &str,
    target: &str,
    ending: impl Into<Ending>,
) {
    let Ending { outcome, detail } = ending.into();
    let rec = AuditRecord::new("pulsectl", &args.actor(), action, target, outcome)
        .with_detail(detail)
        .with_source(hostname());
    let written = async {
        tokio::time::timeout(
            args.audit_timeout,
            ensure_topics(kafka, &[topic_spec(&args.audit_topic)]),
        )
        .await
        .map_err(|_| format!("creating {} timed out", args.audit_topic))?
        .map_err(|e| e.to_string())?;
        let producer = KafkaProducer::new(kafka, "pulsectl-audit").map_err(|e| e.to_string())?;
        write_now(&producer, &args.audit_topic, &rec, args.audit_timeout)
            .await
            .map_err(|e| e.to_string())
    };
    if let Err(e) = written.await {
        eprintln!(
            "pulsectl: warning: the audit record of this {action} was not written to {}: {e}",
            args.audit_topic
        );
    }
}

/// The machine the operator runs `pulsectl` on (`$HOSTNAME`, else `/etc/hostname`).
fn hostname() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .map_or_else(|| "pulsectl".into(), |h| format!("pulsectl@{h}"))
}

/// Where `pulsectl audit` reads the trail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Source {
    /// The audit topic: the system of record, every record as soon as it is written,
    /// kept for the topic's retention (a year); needs only the broker.
    Topic,
    /// The ClickHouse table `audit_log` the writer fills: the trail beyond the topic's
    /// retention, filtered in the server; lags the topic by a writer batch (about a
    /// second) and holds nothing if no ClickHouse writer copies the topic.
    Clickhouse,
}

/// `pulsectl audit`.
#[derive(Debug, Clone, clap::Args)]
pub struct ListArgs {
    /// Where to read the trail: `topic` (default) or `clickhouse`.
    #[arg(long, value_enum, default_value = "topic")]
    pub source: Source,
    /// Only records of the last DURATION (`90s`, `5m`, `24h`) or since a time (RFC 3339 or
    /// epoch ms).
    #[arg(long)]
    pub since: Option<String>,
    /// Only this action (`schema.register`) or family of actions (`schema`).
    #[arg(long)]
    pub action: Option<String>,
    /// Only records of this actor.
    #[arg(long)]
    pub who: Option<String>,
    /// Only records with this outcome: `ok`, `refused` (authentication or authorization
    /// failed, or a command's checks or flags said no) or `failed`.
    #[arg(long, value_parser = parse_outcome)]
    pub outcome: Option<Outcome>,
    /// One JSON object per line (the stored record) instead of text.
    #[arg(long)]
    pub json: bool,
    /// How long reading the topic (or querying ClickHouse) may take.
    #[arg(long = "read-timeout", default_value = "30s", value_parser = crate::duration::parse_duration)]
    pub read_timeout: Duration,
    #[command(flatten)]
    pub kafka: KafkaConfig,
    /// The ClickHouse holding `audit_log` (`--source clickhouse`).
    #[command(flatten)]
    pub clickhouse: ClickHouseConfig,
}

/// Why `audit` failed.
#[derive(Debug, thiserror::Error)]
pub enum AuditListError {
    #[error("--since {0:?}: not a duration (90s, 5m, 24h), RFC 3339 time or epoch ms")]
    Since(String),
    #[error("{0}")]
    Read(#[from] ReadError),
    #[error("reading {table} from ClickHouse: {source}")]
    ClickHouse {
        table: String,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("reading audit_log from ClickHouse: no answer within {0:?} (--read-timeout)")]
    ClickHouseTimeout(Duration),
}

/// `--since` as epoch ms: a duration before `now_ms`, or a time.
pub fn since_ms(since: &str, now_ms: i64) -> Result<i64, AuditListError> {
    if let Ok(d) = crate::duration::parse_duration(since)
        && since.trim().parse::<i64>().is_err()
    {
        return Ok(now_ms.saturating_sub(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)));
    }
    crate::replay::read::parse_time(since).map_err(|_| AuditListError::Since(since.to_owned()))
}

/// `--outcome`'s value parser.
fn parse_outcome(s: &str) -> Result<Outcome, String> {
    s.parse()
}

/// Whether `action` is `filter` or one of its family (`schema` matches `schema.register`).
pub fn action_matches(action: &str, filter: &str) -> bool {
    action == filter
        || action
            .strip_prefix(filter.trim_end_matches('.'))
            .is_some_and(|rest| rest.starts_with('.'))
}

/// The records of the audit topic (or of its ClickHouse copy, `--source clickhouse`)
/// that pass the filters, oldest first (records of another format version are skipped).
pub async fn list(
    args: &ListArgs,
    topic: &str,
    progress: &Progress,
) -> Result<Vec<AuditRecord>, AuditListError> {
    let since = match &args.since {
        Some(s) => Some(since_ms(s, pulse_platform::clock::now_ms())?),
        None => None,
    };
    let records = match args.source {
        Source::Topic => read_records(&args.kafka, topic, args.read_timeout, progress)
            .await?
            .iter()
            .filter_map(|r| AuditRecord::from_json(r.value_or_empty()))
            .collect(),
        Source::Clickhouse => read_table(args, topic, since).await?,
    };
    let mut out: Vec<AuditRecord> = records
        .into_iter()
        .filter(|r| since.is_none_or(|s| r.ts_ms >= s))
        .filter(|r| {
            args.action
                .as_deref()
                .is_none_or(|a| action_matches(&r.action, a))
        })
        .filter(|r| args.who.as_deref().is_none_or(|w| r.actor == w))
        .filter(|r| args.outcome.is_none_or(|o| r.outcome == o))
        .collect();
    out.sort_by_key(|r| r.ts_ms);
    Ok(out)
}

/// The rows of `audit_log` copied from `topic`, each topic position once (`LIMIT 1 BY`,
/// in case a re-delivery was ever stored twice), since `since` and of `--who`; the action
/// filter (a family prefix) and the outcome filter are applied by the caller, like for the
/// topic.
async fn read_table(
    args: &ListArgs,
    topic: &str,
    since: Option<i64>,
) -> Result<Vec<AuditRecord>, AuditListError> {
    let table = pulse_platform::audit::TABLE;
    let who = if args.who.is_some() {
        " AND actor = ?"
    } else {
        ""
    };
    let sql = format!(
        "SELECT {} FROM {table} WHERE kafka_topic = ? AND ts_ms >= ?{who} \
         ORDER BY ts_ms, id LIMIT 1 BY kafka_topic, kafka_partition, kafka_offset",
        pulse_platform::audit::COLUMNS
    );
    let mut query = args
        .clickhouse
        .client()
        .query(&sql)
        .bind(topic)
        .bind(since.unwrap_or(i64::MIN));
    if let Some(w) = &args.who {
        query = query.bind(w.as_str());
    }
    let rows: Vec<AuditRow> = tokio::time::timeout(args.read_timeout, query.fetch_all())
        .await
        .map_err(|_| AuditListError::ClickHouseTimeout(args.read_timeout))?
        .map_err(|source| AuditListError::ClickHouse {
            table: format!("{}.{table}", args.clickhouse.database),
            source,
        })?;
    Ok(rows.iter().map(AuditRow::to_record).collect())
}

/// `TIME  SERVICE  ACTOR  ACTION  TARGET  OUTCOME[ STATUS]  [SOURCE]  DETAIL`.
pub fn text_line(r: &AuditRecord) -> String {
    let status = r.status.map(|s| format!(" {s}")).unwrap_or_default();
    format!(
        "{}  {}  {}  {}  {}  {}{status}  {}  {}",
        crate::rfc3339(r.ts_ms),
        r.service,
        r.actor,
        r.action,
        if r.target.is_empty() { "-" } else { &r.target },
        r.outcome,
        r.source.as_deref().unwrap_or("-"),
        r.detail
    )
}

pub async fn run(
    args: ListArgs,
    audit: &AuditArgs,
    progress: &ProgressArgs,
) -> Result<(), crate::Error> {
    let settings: &dyn Validate = match args.source {
        Source::Topic => &args.kafka,
        Source::Clickhouse => &args.clickhouse,
    };
    validate_all(&[settings])?;
    let reading = Progress::start(progress, "audit read", "records", None);
    let records = list(&args, &audit.audit_topic, &reading).await?;
    reading.finish();
    for r in &records {
        if args.json {
            println!("{}", json!(r));
        } else {
            println!("{}", text_line(r));
        }
    }
    if !args.json {
        eprintln!("{} record(s)", records.len());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn actions_match_exactly_or_by_family() {
        assert!(action_matches("schema.register", "schema.register"));
        assert!(action_matches("schema.register", "schema"));
        assert!(action_matches("schema.register", "schema."));
        assert!(!action_matches("schema.register", "schema.reg"));
        assert!(!action_matches("schemas.x", "schema"));
        assert!(!action_matches("replay", "re"));
    }

    #[test]
    fn since_is_a_duration_ago_or_a_time() {
        let now = 10_000_000;
        assert_eq!(since_ms("1h", now).unwrap(), now - 3_600_000);
        assert_eq!(since_ms("90s", now).unwrap(), now - 90_000);
        assert_eq!(
            since_ms("1234", now).unwrap(),
            1234,
            "a bare number is epoch ms"
        );
        assert_eq!(
            since_ms("1970-01-01T00:00:01Z", now).unwrap(),
            1000,
            "RFC 3339"
        );
        let e = since_ms("yesterday", now).unwrap_err().to_string();
        assert!(e.contains("--since \"yesterday\""), "{e}");
    }

    #[test]
    fn the_actor_is_the_flag_then_user() {
        let mut a = AuditArgs {
            actor: Some("alice".into()),
            audit_topic: topics::AUDIT.into(),
            audit_timeout: Duration::from_secs(1),
        };
        assert_eq!(a.actor(), "alice");
        a.actor = Some("  ".into());
        let fallback = std::env::var("USER")
            .ok()
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "unknown".into());
        assert_eq!(a.actor(), fallback);
    }

    #[test]
    fn the_source_is_the_topic_unless_clickhouse_is_asked_for() {
        use clap::Parser as _;
        let list = |argv: &[&str]| match crate::Cli::try_parse_from(argv).unwrap().command {
            crate::Command::Audit(a) => *a,
            other => panic!("{other:?}"),
        };
        assert_eq!(list(&["pulsectl", "audit"]).source, Source::Topic);
        let ch = list(&[
            "pulsectl",
            "audit",
            "--source",
            "clickhouse",
            "--clickhouse-database",
            "audits",
        ]);
        assert_eq!(
            (ch.source, ch.clickhouse.database.as_str()),
            (Source::Clickhouse, "audits")
        );
        let err = crate::Cli::try_parse_from(["pulsectl", "audit", "--source", "s3"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--source"), "{err}");
    }

    #[test]
    fn an_ending_is_ok_refused_or_failed_and_flag_refusals_are_refused() {
        assert_eq!(Ending::from(Ok("d".to_owned())), Ending::ok("d"));
        assert_eq!(
            Ending::from(Err("e".to_owned())).outcome,
            Outcome::Failed,
            "an error of a command that cannot refuse stays failed"
        );
        let refused = [
            crate::Error::Shadow(crate::shadow::ShadowError::Refused(2)),
            crate::Error::Shadow(crate::shadow::ShadowError::Range { from: 2, to: 1 }),
            crate::Error::Shadow(crate::shadow::ShadowError::Tolerance(-1.0)),
            crate::Error::Config(
                {
                    let mut p = pulse_platform::config::Problems::default();
                    p.add("--x", "bad");
                    p.into_result()
                }
                .unwrap_err(),
            ),
        ];
        for e in &refused {
            assert_eq!(Ending::of_error(e, "r").outcome, Outcome::Refused, "{e}");
        }
        let failed = crate::Error::Shadow(crate::shadow::ShadowError::Discard(1));
        assert_eq!(Ending::of_error(&failed, "f"), Ending::failed("f"));
    }

    #[test]
    fn the_outcome_filter_takes_the_three_outcomes() {
        use clap::Parser as _;
        let outcome = |argv: &[&str]| match crate::Cli::try_parse_from(argv).unwrap().command {
            crate::Command::Audit(a) => a.outcome,
            other => panic!("{other:?}"),
        };
        assert_eq!(outcome(&["pulsectl", "audit"]), None);
        for (text, want) in [
            ("ok", Outcome::Ok),
            ("refused", Outcome::Refused),
            ("failed", Outcome::Failed),
        ] {
            assert_eq!(
                outcome(&["pulsectl", "audit", "--outcome", text]),
                Some(want)
            );
        }
        let err = crate::Cli::try_parse_from(["pulsectl", "audit", "--outcome", "denied"])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("--outcome") && err.contains("refused"),
            "{err}"
        );
    }

    #[test]
    fn a_text_line_shows_who_what_and_the_outcome() {
        let r = AuditRecord {
            ts_ms: 0,
            ..AuditRecord::new(
                "schema-registry",
                "alice",
                "schema.config",
                "s-value",
                Outcome::Refused,
            )
            .with_status(401)
            .with_source("127.0.0.1:1")
            .with_detail("PUT /config/s-value")
        };
        assert_eq!(
            text_line(&r),
            "1970-01-01T00:00:00Z  schema-registry  alice  schema.config  s-value  refused 401  127.0.0.1:1  PUT /config/s-value"
        );
    }
}
