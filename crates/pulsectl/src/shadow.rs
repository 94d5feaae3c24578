//! `pulsectl shadow schemas|diff|discard|promote`: the operator's side of a shadow processor
//! (`pulse-processor --shadow <name>` with `pulse-writer --shadow <name>`, see
//! docs/operations.md). `schemas` registers the aggregate schemas under the shadow
//! topics' subjects; `diff` compares the live and the shadow aggregates of closed windows
//! in ClickHouse, per metric, window and key, and fails when they differ beyond the
//! tolerance; `discard` drops the shadow's tables, consumer groups, topics and registry
//! subjects. The table and topic names come from `pulse_storage::migrate` and
//! `pulse_contracts::topics`; `promote` (the checks around a promotion, then discard) is
//! `shadow::promote`. `discard` and `promote` write an audit record (`crate::audit`).

pub mod promote;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::time::Duration;

use pulse_contracts::schemas::{SESSION, USER_WINDOW_ACTIVITY, value_subject};
use pulse_contracts::topics;
use pulse_platform::audit::action;
use pulse_platform::clickhouse::ClickHouseConfig;
use pulse_platform::config::{Validate as _, validate_all};
use pulse_platform::kafka::KafkaConfig;
use pulse_platform::registry_auth::RegistryAuthArgs;
use pulse_platform::secret::Secret;
use pulse_platform::windowing::WindowSettings;
use pulse_storage::migrate;
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use serde_json::json;

use crate::audit::{self, AuditArgs, Ending};

#[derive(Debug, clap::Subcommand)]
pub enum ShadowCommand {
    /// Register the aggregate schemas under the shadow's output topics (run before
    /// starting the shadow processor; an identical schema keeps its id).
    Schemas(SchemasArgs),
    /// Compare the live and the shadow aggregates of the closed windows of a range; exits
    /// 1 when a metric differs beyond the tolerance, 0 when they are equal.
    Diff(Box<DiffArgs>),
    /// Drop the shadow's tables and delete its consumer groups, topics and schema-registry
    /// subjects (audited as `shadow.discard`).
    Discard(Box<DiscardArgs>),
    /// Promote the shadow's version to live: `check` before the switch (refuses unless
    /// the diff is within the tolerance on a closed range), `finish` after it (refuses
    /// unless live equals the shadow after the switch; then discards the shadow).
    Promote {
        #[command(subcommand)]
        command: promote::PromoteCommand,
    },
}

/// `--shadow`'s value parser (clap names the flag in its error).
fn parse_shadow(s: &str) -> Result<String, String> {
    topics::validate_shadow_name(s).map(str::to_owned)
}

#[derive(Debug, clap::Args)]
pub struct SchemasArgs {
    /// The shadow's name (as given to the processor's `--shadow`).
    #[arg(long, value_parser = parse_shadow)]
    pub shadow: String,
    /// Schema registry base URL.
    #[arg(
        long = "schema-registry-url",
        env = "PULSE_SCHEMA_REGISTRY_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub url: String,
    #[command(flatten)]
    pub registry_auth: RegistryAuthArgs,
    /// The live user-activity topic (the shadow's is `<this>.shadow.<name>`).
    #[arg(long = "user-activity-topic", env = "PULSE_USER_ACTIVITY_TOPIC", default_value = topics::USER_ACTIVITY)]
    pub user_activity_topic: String,
    /// The live sessions topic (the shadow's is `<this>.shadow.<name>`).
    #[arg(long = "sessions-topic", env = "PULSE_SESSIONS_TOPIC", default_value = topics::SESSIONS)]
    pub sessions_topic: String,
}

#[derive(Debug, clap::Args)]
pub struct DiffArgs {
    /// The shadow's name.
    #[arg(long, value_parser = parse_shadow)]
    pub shadow: String,
    /// Start of the event-time range (window starts), inclusive: RFC 3339 or epoch ms.
    #[arg(long, value_parser = crate::replay::parse_time, allow_hyphen_values = true)]
    pub from: i64,
    /// End of the event-time range, exclusive: only windows ending by then are compared.
    #[arg(long, value_parser = crate::replay::parse_time, allow_hyphen_values = true)]
    pub to: i64,
    /// Relative difference allowed per metric and window (0.01: 1 %). 0 (the default):
    /// exact, and a window whose keys differ counts even when its totals are equal.
    #[arg(long, default_value_t = 0.0)]
    pub tolerance: f64,
    /// How many differing keys to print.
    #[arg(long = "max-keys", default_value_t = 20)]
    pub max_keys: usize,
    /// The window size (sessions are counted in the window their start falls in).
    #[command(flatten)]
    pub windowing: WindowSettings,
    #[command(flatten)]
    pub clickhouse: ClickHouseConfig,
}

#[derive(Debug, clap::Args)]
pub struct DiscardArgs {
    /// The shadow's name.
    #[arg(long, value_parser = parse_shadow)]
    pub shadow: String,
    /// The live processor's group (the shadow's is `<this>-shadow-<name>`).
    #[arg(long = "processor-group-id", default_value = "pulse-processor")]
    pub processor_group: String,
    /// The live ClickHouse writer's group (the shadow writer's is `<this>-shadow-<name>`).
    #[arg(long = "writer-group-id", default_value = "pulse-writer-clickhouse")]
    pub writer_group: String,
    /// The live topics the shadow's are named after (`<topic>.shadow.<name>`).
    #[arg(long = "user-activity-topic", env = "PULSE_USER_ACTIVITY_TOPIC", default_value = topics::USER_ACTIVITY)]
    pub user_activity_topic: String,
    #[arg(long = "sessions-topic", env = "PULSE_SESSIONS_TOPIC", default_value = topics::SESSIONS)]
    pub sessions_topic: String,
    #[arg(long = "late-topic", env = "PULSE_LATE_TOPIC", default_value = topics::EVENTS_LATE)]
    pub late_topic: String,
    #[arg(long = "checkpoint-topic", env = "PULSE_PROCESSOR_CHECKPOINT_TOPIC", default_value = topics::PROCESSOR_CHECKPOINTS)]
    pub checkpoint_topic: String,
    #[arg(long = "dlq-topic", env = "PULSE_DLQ_TOPIC", default_value = topics::EVENTS_DLQ)]
    pub dlq_topic: String,
    /// Keep the shadow topics (Tansu 0.6's sqlite storage breaks on DeleteTopics).
    #[arg(long = "keep-topics")]
    pub keep_topics: bool,
    /// Keep the consumer groups.
    #[arg(long = "keep-groups")]
    pub keep_groups: bool,
    /// Keep the shadow topics' schema-registry subjects (`<topic>-value`).
    #[arg(long = "keep-subjects")]
    pub keep_subjects: bool,
    /// Schema registry base URL, where the shadow topics' subjects are deleted.
    #[arg(
        long = "schema-registry-url",
        env = "PULSE_SCHEMA_REGISTRY_URL",
        default_value = "http://127.0.0.1:8081"
    )]
    pub registry_url: String,
    #[command(flatten)]
    pub registry_auth: RegistryAuthArgs,
    #[command(flatten)]
    pub clickhouse: ClickHouseConfig,
    /// The broker of the shadow's groups and topics, and of the audit record.
    #[command(flatten)]
    pub kafka: KafkaConfig,
}

impl DiscardArgs {
    /// Every topic a shadow processor and writer create.
    pub fn topics(&self) -> Vec<String> {
        [
            &self.user_activity_topic,
            &self.sessions_topic,
            &self.late_topic,
            &self.checkpoint_topic,
            &self.dlq_topic,
        ]
        .iter()
        .map(|t| topics::shadow_topic(t, &self.shadow))
        .collect()
    }

    /// The shadow processor's and shadow writer's consumer groups.
    pub fn groups(&self) -> Vec<String> {
        vec![
            topics::shadow_group(&self.processor_group, &self.shadow),
            topics::shadow_group(&self.writer_group, &self.shadow),
        ]
    }

    /// The registry subjects of the shadow topics (TopicNameStrategy, `<topic>-value`):
    /// `shadow schemas` registers those of the aggregates' topics; the others are
    /// deleted too in case something registered them.
    pub fn subjects(&self) -> Vec<String> {
        self.topics().iter().map(|t| value_subject(t)).collect()
    }

    /// Checks the flags `discard` needs (ClickHouse, Kafka, registry credentials).
    fn validate(&self) -> Result<(), pulse_platform::config::ConfigErrors> {
        let mut problems = pulse_platform::config::Problems::default();
        self.clickhouse.validate(&mut problems);
        self.kafka.validate(&mut problems);
        if !self.keep_subjects {
            self.registry_auth.validate(&mut problems);
        }
        problems.into_result()
    }
}

/// Why a shadow command failed.
#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    #[error("--tolerance: {0} is not a fraction >= 0")]
    Tolerance(f64),
    #[error("--from/--to: the range [{from}, {to}) is empty")]
    Range { from: i64, to: i64 },
    #[error("reading {table} from ClickHouse: {source}")]
    Read {
        table: String,
        #[source]
        source: clickhouse::error::Error,
    },
    #[error("{0}")]
    Migrate(#[from] migrate::MigrateError),
    #[error("schema registry: {0}")]
    Registry(String),
    #[error("the shadow differs from live in {0} metric window(s) beyond the tolerance")]
    Differs(usize),
    #[error("discard finished with {0} failed step(s) (listed above)")]
    Discard(usize),
    #[error("refused for {0} reason(s) (listed above)")]
    Refused(usize),
}

/// One user's window, as compared.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct Activity {
    page_views: u64,
    revenue: BTreeMap<String, i64>,
    is_final: bool,
}

/// One current session, as compared: (end, events, pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct SessionVal {
    end_ms: i64,
    events: u64,
    pages: u64,
    is_final: bool,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct ActivityRow {
    user_id: String,
    window_start_ms: i64,
    page_views: u64,
    currencies: Vec<String>,
    micros: Vec<i64>,
    is_final: u8,
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct SessionRow {
    user_id: String,
    session_id: String,
    start_ms: i64,
    end_ms: i64,
    events: u64,
    pages: u64,
    is_final: u8,
    merged: Vec<String>,
}

/// Per (window start, user): the latest version of each window of the range.
type ActivityMap = BTreeMap<(i64, String), Activity>;
/// Per (user, start): the current sessions starting in the range.
type SessionMap = BTreeMap<(String, i64), SessionVal>;

/// The rows of `sql` (a query of `table` with two parameters, `from` and `to`).
pub(crate) async fn fetch<R>(
    cfg: &ClickHouseConfig,
    table: &str,
    sql: &str,
    from: i64,
    to: i64,
) -> Result<Vec<R>, ShadowError>
where
    R: clickhouse::RowOwned + clickhouse::RowRead,
{
    cfg.client()
        .query(sql)
        .bind(from)
        .bind(to)
        .fetch_all()
        .await
        .map_err(|source| ShadowError::Read {
            table: table.to_owned(),
            source,
        })
}

async fn read_activity(
    cfg: &ClickHouseConfig,
    table: &str,
    from: i64,
    to: i64,
) -> Result<ActivityMap, ShadowError> {
    // The latest version of every window (argMax, valid on 18.16).
    let sql = format!(
        "SELECT user_id, window_start_ms, argMax(page_views, version) AS page_views, \
         argMax(revenue_currencies, version) AS currencies, \
         argMax(revenue_micros, version) AS micros, \
         argMax(is_final, version) AS is_final \
         FROM {table} WHERE window_start_ms >= ? AND window_end_ms <= ? \
         GROUP BY user_id, window_start_ms"
    );
    let rows: Vec<ActivityRow> = fetch(cfg, table, &sql, from, to).await?;
    Ok(rows
        .into_iter()
        .map(|r| {
            let mut revenue = BTreeMap::new();
            for (c, m) in r.currencies.into_iter().zip(r.micros) {
                *revenue.entry(c).or_insert(0) += m;
            }
            (
                (r.window_start_ms, r.user_id),
                Activity {
                    page_views: r.page_views,
                    revenue,
                    is_final: r.is_final == 1,
                },
            )
        })
        .collect())
}

async fn read_sessions(
    cfg: &ClickHouseConfig,
    table: &str,
    from: i64,
    to: i64,
) -> Result<SessionMap, ShadowError> {
    // Every session of the users with one starting in the range (a session may be
    // superseded by one of theirs starting earlier: its id is then in that one's
    // `merged_session_ids`).
    let sql = format!(
        "SELECT user_id, session_id, any(start_ms) AS start_ms, \
         argMax(end_ms, version) AS end_ms, argMax(event_count, version) AS events, \
         argMax(page_count, version) AS pages, argMax(is_final, version) AS is_final, \
         argMax(merged_session_ids, version) AS merged \
         FROM {table} WHERE user_id IN \
         (SELECT user_id FROM {table} WHERE start_ms >= ? AND start_ms < ?) \
         GROUP BY user_id, session_id"
    );
    let rows: Vec<SessionRow> = fetch(cfg, table, &sql, from, to).await?;
    let superseded: BTreeSet<(String, String)> = rows
        .iter()
        .flat_map(|r| {
            r.merged
                .iter()
                .filter(|m| **m != r.session_id)
                .map(|m| (r.user_id.clone(), m.clone()))
        })
        .collect();
    Ok(rows
        .into_iter()
        .filter(|r| r.start_ms >= from && r.start_ms < to)
        .filter(|r| !superseded.contains(&(r.user_id.clone(), r.session_id.clone())))
        .map(|r| {
            (
                (r.user_id, r.start_ms),
                SessionVal {
                    end_ms: r.end_ms,
                    events: r.events,
                    pages: r.pages,
                    is_final: r.is_final == 1,
                },
            )
        })
        .collect())
}

/// One metric of one window on both sides, with the keys that differ.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowDiff {
    /// `active_users`, `page_views`, `revenue[<currency>]` or `sessions`.
    pub metric: String,
    pub window_start_ms: i64,
    pub live: f64,
    pub shadow: f64,
    /// The keys (`user` or `user@session start`) whose values differ, with both values.
    pub keys: Vec<String>,
}

/// Per metric: windows compared and windows differing, with both sides' totals.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MetricSummary {
    pub windows: usize,
    pub differing: usize,
    pub live_total: f64,
    pub shadow_total: f64,
}

/// What `diff` found.
#[derive(Debug, Clone, Default)]
pub struct DiffReport {
    pub summary: BTreeMap<String, MetricSummary>,
    /// The metric windows that differ beyond the tolerance, in metric and window order.
    pub differing: Vec<WindowDiff>,
    /// Windows left out: not final on both sides yet (the watermark has not passed them).
    pub open_windows: BTreeSet<i64>,
    /// Windows whose sessions were left out: a session starting there is still open on
    /// one side (a long session, or its window reaches past `--to`).
    pub open_session_windows: BTreeSet<i64>,
    /// Per side, the start of the latest window of the range with final rows (live,
    /// shadow): a shadow behind live has an earlier one.
    pub last_final: (Option<i64>, Option<i64>),
}

impl DiffReport {
    /// The summary table, the differing windows and the first `max_keys` differing keys.
    pub fn render(&self, max_keys: usize) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<20} {:>8} {:>10} {:>16} {:>16}",
            "metric", "windows", "differing", "live total", "shadow total"
        );
        for (metric, s) in &self.summary {
            let _ = writeln!(
                out,
                "{metric:<20} {:>8} {:>10} {:>16} {:>16}",
                s.windows, s.differing, s.live_total, s.shadow_total
            );
        }
        if !self.open_windows.is_empty() {
            let _ = writeln!(
                out,
                "{} window(s) not final on both sides were not compared",
                self.open_windows.len()
            );
        }
        if !self.open_session_windows.is_empty() {
            let _ = writeln!(
                out,
                "{} window(s) with a session still open: their sessions were not compared",
                self.open_session_windows.len()
            );
        }
        if self.differing.is_empty() {
            let _ = writeln!(out, "no differences");
            return out;
        }
        let _ = writeln!(out, "differing windows:");
        for d in &self.differing {
            let _ = writeln!(
                out,
                "  {:<20} window {} ({})  live {}  shadow {}  {} key(s) differ",
                d.metric,
                d.window_start_ms,
                pulse_platform::clock::rfc3339(d.window_start_ms),
                d.live,
                d.shadow,
                d.keys.len()
            );
        }
        let _ = writeln!(out, "first differing keys:");
        for (metric, window, key) in self
            .differing
            .iter()
            .flat_map(|d| {
                d.keys
                    .iter()
                    .map(move |k| (&d.metric, d.window_start_ms, k))
            })
            .take(max_keys)
        {
            let _ = writeln!(out, "  {metric:<20} window {window}  {key}");
        }
        out
    }
}

/// Whether `live` and `shadow` differ beyond `tolerance` (relative to the larger).
fn beyond(live: f64, shadow: f64, tolerance: f64) -> bool {
    (live - shadow).abs() > tolerance * live.abs().max(shadow.abs())
}

/// Per metric and window: (live value, shadow value, differing keys).
type Compared = BTreeMap<(String, i64), (f64, f64, Vec<String>)>;

fn fmt_opt<T: std::fmt::Debug>(v: Option<&T>) -> String {
    v.map_or("none".to_owned(), |v| format!("{v:?}"))
}

/// Compares two sides' windows (already restricted to closed ones).
fn compare_activity(live: &ActivityMap, shadow: &ActivityMap, out: &mut Compared) {
    let keys: BTreeSet<&(i64, String)> = live.keys().chain(shadow.keys()).collect();
    for key @ (window, user) in keys {
        let (l, s) = (live.get(key), shadow.get(key));
        let mut add = |metric: String, lv: f64, sv: f64, differs: bool, detail: String| {
            let e = out
                .entry((metric, *window))
                .or_insert((0.0, 0.0, Vec::new()));
            e.0 += lv;
            e.1 += sv;
            if differs {
                e.2.push(detail);
            }
        };
        add(
            "active_users".into(),
            f64::from(u8::from(l.is_some())),
            f64::from(u8::from(s.is_some())),
            l.is_some() != s.is_some(),
            format!(
                "user {user}: live {}  shadow {}",
                if l.is_some() { "active" } else { "absent" },
                if s.is_some() { "active" } else { "absent" }
            ),
        );
        let (lp, sp) = (l.map_or(0, |a| a.page_views), s.map_or(0, |a| a.page_views));
        add(
            "page_views".into(),
            lp as f64,
            sp as f64,
            lp != sp,
            format!("user {user}: live {lp}  shadow {sp}"),
        );
        let currencies: BTreeSet<&String> = l
            .iter()
            .chain(s.iter())
            .flat_map(|a| a.revenue.keys())
            .collect();
        for c in currencies {
            let lr = l.and_then(|a| a.revenue.get(c)).copied().unwrap_or(0);
            let sr = s.and_then(|a| a.revenue.get(c)).copied().unwrap_or(0);
            add(
                format!("revenue[{c}]"),
                lr as f64,
                sr as f64,
                lr != sr,
                format!("user {user}: live {lr}  shadow {sr} micros"),
            );
        }
    }
}

fn compare_sessions(live: &SessionMap, shadow: &SessionMap, window_ms: i64, out: &mut Compared) {
    let keys: BTreeSet<&(String, i64)> = live.keys().chain(shadow.keys()).collect();
    for key @ (user, start) in keys {
        let window = start.div_euclid(window_ms) * window_ms;
        let (l, s) = (live.get(key), shadow.get(key));
        let strip = |v: Option<&SessionVal>| v.map(|v| (v.end_ms, v.events, v.pages));
        let e = out
            .entry(("sessions".into(), window))
            .or_insert((0.0, 0.0, Vec::new()));
        e.0 += f64::from(u8::from(l.is_some()));
        e.1 += f64::from(u8::from(s.is_some()));
        if strip(l) != strip(s) {
            e.2.push(format!(
                "user {user} session starting {start}: live {}  shadow {} (end, events, pages)",
                fmt_opt(strip(l).as_ref()),
                fmt_opt(strip(s).as_ref())
            ));
        }
    }
}

/// Reads both sides of `[from, to)` and compares the closed windows.
pub async fn diff(args: &DiffArgs) -> Result<DiffReport, ShadowError> {
    if !(args.tolerance >= 0.0 && args.tolerance.is_finite()) {
        return Err(ShadowError::Tolerance(args.tolerance));
    }
    if args.from >= args.to {
        return Err(ShadowError::Range {
            from: args.from,
            to: args.to,
        });
    }
    let (from, to, window_ms) = (args.from, args.to, args.windowing.window_ms.max(1));
    let ch = &args.clickhouse;
    let activity_shadow = migrate::shadow_table("user_activity", &args.shadow);
    let sessions_shadow = migrate::shadow_table("sessions", &args.shadow);
    let (live_a, shadow_a, live_s, shadow_s) = tokio::try_join!(
        read_activity(ch, "user_activity", from, to),
        read_activity(ch, &activity_shadow, from, to),
        read_sessions(ch, "sessions", from, to),
        read_sessions(ch, &sessions_shadow, from, to),
    )?;
    // Closed: every row of the window final on both sides (a window one side has not
    // finished is left out and reported as open).
    let mut open = BTreeSet::new();
    for ((w, _), a) in live_a.iter().chain(&shadow_a) {
        if !a.is_final {
            open.insert(*w);
        }
    }
    let mut open_sessions = BTreeSet::new();
    for ((_, start), s) in live_s.iter().chain(&shadow_s) {
        let w = start.div_euclid(window_ms) * window_ms;
        if !s.is_final || w + window_ms > to {
            open_sessions.insert(w);
        }
    }
    let closed_a = |m: &ActivityMap| -> ActivityMap {
        m.iter()
            .filter(|((w, _), _)| !open.contains(w))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let closed_s = |m: &SessionMap| -> SessionMap {
        m.iter()
            .filter(|((_, start), _)| {
                !open_sessions.contains(&(start.div_euclid(window_ms) * window_ms))
            })
            .map(|(k, v)| (k.clone(), *v))
            .collect()
    };
    let mut compared = Compared::new();
    compare_activity(&closed_a(&live_a), &closed_a(&shadow_a), &mut compared);
    compare_sessions(
        &closed_s(&live_s),
        &closed_s(&shadow_s),
        window_ms,
        &mut compared,
    );
    let last_final = |m: &ActivityMap| {
        m.iter()
            .filter(|(_, a)| a.is_final)
            .map(|((w, _), _)| *w)
            .max()
    };
    let mut report = DiffReport {
        last_final: (last_final(&live_a), last_final(&shadow_a)),
        open_windows: open,
        open_session_windows: open_sessions,
        ..DiffReport::default()
    };
    for ((metric, window), (l, s, keys)) in compared {
        let sum = report.summary.entry(metric.clone()).or_default();
        sum.windows += 1;
        sum.live_total += l;
        sum.shadow_total += s;
        let differs = beyond(l, s, args.tolerance) || (args.tolerance == 0.0 && !keys.is_empty());
        if differs {
            sum.differing += 1;
            report.differing.push(WindowDiff {
                metric,
                window_start_ms: window,
                live: l,
                shadow: s,
                keys,
            });
        }
    }
    Ok(report)
}

/// Registers the aggregate schemas under the shadow topics' subjects; returns
/// (subject, id) pairs.
pub async fn register_schemas(args: &SchemasArgs) -> Result<Vec<(String, u64)>, ShadowError> {
    let client = crate::schemas::registry_client(&args.registry_auth)
        .map_err(|e| ShadowError::Registry(e.to_string()))?;
    let base = args.url.trim_end_matches('/');
    let mut out = Vec::new();
    for (live, schema) in [
        (&args.user_activity_topic, USER_WINDOW_ACTIVITY),
        (&args.sessions_topic, SESSION),
    ] {
        let subject = value_subject(&topics::shadow_topic(live, &args.shadow));
        let url = format!("{base}/subjects/{subject}/versions");
        let credentials = args
            .registry_auth
            .credentials()
            .map_err(ShadowError::Registry)?;
        let resp = authenticated(client.post(&url), credentials.as_ref())
            .header("Content-Type", "application/vnd.schemaregistry.v1+json")
            .json(&json!({ "schemaType": "PROTOBUF", "schema": schema.file.source }))
            .send()
            .await
            .map_err(|e| ShadowError::Registry(format!("{url}: {e}")))?;
        let status = resp.status();
        let body: serde_json::Value = resp.json().await.unwrap_or(serde_json::Value::Null);
        if !status.is_success() {
            return Err(ShadowError::Registry(format!(
                "subject {subject}: registry answered {status}: {}",
                body["message"].as_str().unwrap_or("no message")
            )));
        }
        out.push((subject, body["id"].as_u64().unwrap_or(0)));
    }
    Ok(out)
}

/// What `discard` did, step by step: `<kind> <name>` per table, group, topic and subject.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DiscardSummary {
    /// Removed (a table: dropped if it existed).
    pub removed: Vec<String>,
    /// Not there: nothing to remove.
    pub missing: Vec<String>,
    /// Kept by a `--keep-*` flag.
    pub kept: Vec<String>,
    /// Failed, with the reason (every step is attempted).
    pub failed: Vec<String>,
}

impl DiscardSummary {
    /// One line for the audit record and the end of the output.
    pub fn detail(&self) -> String {
        let part = |what: &str, items: &[String]| {
            (!items.is_empty()).then(|| format!("{what} {}", items.join(", ")))
        };
        let parts: Vec<String> = [
            part("removed", &self.removed),
            part("not found", &self.missing),
            part("kept", &self.kept),
            part("FAILED", &self.failed),
        ]
        .into_iter()
        .flatten()
        .collect();
        if parts.is_empty() {
            "nothing to do".to_owned()
        } else {
            parts.join("; ")
        }
    }
}

/// Consumer groups or topics, as `discard` deletes them.
#[derive(Debug, Clone, Copy)]
enum KafkaKind {
    Group,
    Topic,
}

impl KafkaKind {
    fn noun(self) -> &'static str {
        match self {
            Self::Group => "consumer group",
            Self::Topic => "topic",
        }
    }

    fn keep_flag(self) -> &'static str {
        match self {
            Self::Group => "--keep-groups",
            Self::Topic => "--keep-topics",
        }
    }

    /// The broker's answer for a name that is not there: nothing to delete (a group
    /// that never committed, a topic never created).
    fn absent(self) -> RDKafkaErrorCode {
        match self {
            Self::Group => RDKafkaErrorCode::GroupIdNotFound,
            Self::Topic => RDKafkaErrorCode::UnknownTopicOrPartition,
        }
    }
}

/// Deletes the consumer groups or topics `names` (unless `keep`), printing and counting
/// each one in `summary`.
async fn delete_kafka(
    admin: &AdminClient<DefaultClientContext>,
    kind: KafkaKind,
    names: &[String],
    keep: bool,
    summary: &mut DiscardSummary,
) {
    let noun = kind.noun();
    if keep {
        println!("kept {noun}s {names:?} ({})", kind.keep_flag());
        summary
            .kept
            .extend(names.iter().map(|n| format!("{noun} {n}")));
        return;
    }
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let opts = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let answer = match kind {
        KafkaKind::Group => admin.delete_groups(&refs, &opts).await,
        KafkaKind::Topic => admin.delete_topics(&refs, &opts).await,
    };
    match answer {
        Ok(results) => {
            for r in results {
                match r {
                    Ok(n) => {
                        println!("deleted {noun} {n}");
                        summary.removed.push(format!("{noun} {n}"));
                    }
                    Err((n, code)) if code == kind.absent() => {
                        println!("{noun} {n} does not exist");
                        summary.missing.push(format!("{noun} {n}"));
                    }
                    Err((n, code)) => {
                        println!("FAILED deleting {noun} {n}: {code}");
                        summary.failed.push(format!("{noun} {n}: {code}"));
                    }
                }
            }
        }
        Err(e) => {
            println!("FAILED deleting {noun}s {names:?}: {e}");
            summary
                .failed
                .extend(names.iter().map(|n| format!("{noun} {n}: {e}")));
        }
    }
}

/// Adds the basic-auth header of `credentials`, if any.
fn authenticated(
    req: reqwest::RequestBuilder,
    credentials: Option<&(String, Secret)>,
) -> reqwest::RequestBuilder {
    match credentials {
        Some((user, password)) => req.basic_auth(user, Some(password.expose())),
        None => req,
    }
}

/// A registry answer: the status, and the body as JSON (`Null` if it is not).
async fn registry_call(
    req: reqwest::RequestBuilder,
    url: &str,
) -> Result<(reqwest::StatusCode, serde_json::Value), String> {
    let resp = req
        .send()
        .await
        .map_err(|e| format!("{url}: {}", pulse_platform::clickhouse::error_chain(&e)))?;
    let status = resp.status();
    Ok((status, resp.json().await.unwrap_or(serde_json::Value::Null)))
}

/// The versions a registry DELETE answered with.
fn versions_of(body: &serde_json::Value) -> Vec<u64> {
    body.as_array()
        .map(|a| a.iter().filter_map(serde_json::Value::as_u64).collect())
        .unwrap_or_default()
}

/// Deletes `subject` as Confluent's API requires: soft (`DELETE /subjects/{s}`), then
/// permanently (`?permanent=true`, refused for a subject not soft-deleted first). A
/// subject already soft-deleted answers 404 to the first and is then removed by the
/// second. Returns the versions removed, or `None` when the subject does not exist.
async fn delete_subject(
    client: &reqwest::Client,
    base: &str,
    credentials: Option<&(String, Secret)>,
    subject: &str,
) -> Result<Option<Vec<u64>>, String> {
    let refusal = |step: &str, status: reqwest::StatusCode, body: &serde_json::Value| {
        format!(
            "{step} delete: registry answered {status}: {}",
            body["message"].as_str().unwrap_or("no message")
        )
    };
    let url = format!("{base}/subjects/{subject}");
    let (status, body) =
        registry_call(authenticated(client.delete(&url), credentials), &url).await?;
    let soft = if status.is_success() {
        Some(versions_of(&body))
    } else if status == reqwest::StatusCode::NOT_FOUND {
        // 40401: no such subject; 40404: soft-deleted already.
        None
    } else {
        return Err(refusal("soft", status, &body));
    };
    let url = format!("{url}?permanent=true");
    let (status, body) =
        registry_call(authenticated(client.delete(&url), credentials), &url).await?;
    if status.is_success() {
        Ok(Some(versions_of(&body)))
    } else if status == reqwest::StatusCode::NOT_FOUND && body["error_code"] == 40401 {
        Ok(soft)
    } else {
        Err(refusal("permanent", status, &body))
    }
}

/// Deletes the shadow topics' subjects (unless `--keep-subjects`), printing and counting
/// each one in `summary`.
async fn delete_subjects(args: &DiscardArgs, summary: &mut DiscardSummary) {
    let subjects = args.subjects();
    if args.keep_subjects {
        println!("kept subjects {subjects:?} (--keep-subjects)");
        summary
            .kept
            .extend(subjects.iter().map(|s| format!("subject {s}")));
        return;
    }
    let client = crate::schemas::registry_client(&args.registry_auth).map_err(|e| e.to_string());
    let credentials = args
        .registry_auth
        .credentials()
        .map_err(|e| format!("schema registry credentials: {e}"));
    let (client, credentials) = match (client, credentials) {
        (Ok(c), Ok(creds)) => (c, creds),
        (Err(e), _) | (_, Err(e)) => {
            println!("FAILED deleting subjects {subjects:?}: {e}");
            summary
                .failed
                .extend(subjects.iter().map(|s| format!("subject {s}: {e}")));
            return;
        }
    };
    let base = args.registry_url.trim_end_matches('/');
    for subject in subjects {
        match delete_subject(&client, base, credentials.as_ref(), &subject).await {
            Ok(Some(versions)) => {
                println!("deleted subject {subject} (versions {versions:?}, permanently)");
                summary.removed.push(format!("subject {subject}"));
            }
            Ok(None) => {
                println!("subject {subject} does not exist");
                summary.missing.push(format!("subject {subject}"));
            }
            Err(e) => {
                println!("FAILED deleting subject {subject}: {e}");
                summary.failed.push(format!("subject {subject}: {e}"));
            }
        }
    }
}

/// Drops the tables, then deletes the groups, topics and registry subjects (unless
/// kept); prints each step. Every step is attempted; the failed ones are in the summary.
pub async fn discard(args: &DiscardArgs) -> DiscardSummary {
    let mut summary = DiscardSummary::default();
    let db = &args.clickhouse.database;
    match migrate::drop_shadow_tables(&args.clickhouse, &args.shadow).await {
        Ok(tables) => {
            for t in tables {
                println!("dropped table {db}.{t} (if it existed)");
                summary.removed.push(format!("table {db}.{t}"));
            }
        }
        Err(e) => {
            println!("FAILED dropping the shadow tables: {e}");
            summary.failed.push(format!("tables: {e}"));
        }
    }
    let admin: Result<AdminClient<DefaultClientContext>, _> =
        args.kafka.client_config("pulsectl-shadow").create();
    match admin {
        Ok(admin) => {
            delete_kafka(
                &admin,
                KafkaKind::Group,
                &args.groups(),
                args.keep_groups,
                &mut summary,
            )
            .await;
            delete_kafka(
                &admin,
                KafkaKind::Topic,
                &args.topics(),
                args.keep_topics,
                &mut summary,
            )
            .await;
        }
        Err(e) => {
            println!("FAILED creating the Kafka admin client: {e}");
            summary.failed.push(format!("kafka admin client: {e}"));
        }
    }
    delete_subjects(args, &mut summary).await;
    println!("shadow {}: {}", args.shadow, summary.detail());
    summary
}

/// The audit outcome of a discard: its summary, failed if a step failed.
fn discard_outcome(summary: &DiscardSummary) -> Result<String, String> {
    if summary.failed.is_empty() {
        Ok(summary.detail())
    } else {
        Err(summary.detail())
    }
}

/// `discard` with its audit record (`shadow.discard`, target the shadow's name): `refused`
/// when its flags are (nothing is removed), else `ok` or `failed` with every step.
async fn discard_audited(args: &DiscardArgs, audit: &AuditArgs) -> Result<(), crate::Error> {
    if let Err(e) = args.validate() {
        audit::record(
            audit,
            &args.kafka,
            action::SHADOW_DISCARD,
            &args.shadow,
            Ending::refused(e.to_string()),
        )
        .await;
        return Err(e.into());
    }
    let summary = discard(args).await;
    audit::record(
        audit,
        &args.kafka,
        action::SHADOW_DISCARD,
        &args.shadow,
        discard_outcome(&summary),
    )
    .await;
    match summary.failed.len() {
        0 => Ok(()),
        n => Err(ShadowError::Discard(n).into()),
    }
}

/// Runs a shadow command; `discard` and `promote` write their audit record (`--actor`,
/// `--audit-topic`) whatever their outcome.
pub async fn run(command: ShadowCommand, audit: &AuditArgs) -> Result<(), crate::Error> {
    match command {
        ShadowCommand::Schemas(args) => {
            let mut problems = pulse_platform::config::Problems::default();
            args.registry_auth.validate(&mut problems);
            problems.into_result()?;
            for (subject, id) in register_schemas(&args).await? {
                println!("{subject:<48} id {id}");
            }
        }
        ShadowCommand::Diff(args) => {
            validate_all(&[&args.clickhouse, &args.windowing])?;
            println!(
                "shadow {}: live vs shadow, windows in [{}, {}) of {} ms, tolerance {}",
                args.shadow, args.from, args.to, args.windowing.window_ms, args.tolerance
            );
            let report = diff(&args).await?;
            print!("{}", report.render(args.max_keys));
            let differing = report.differing.len();
            if differing > 0 {
                return Err(ShadowError::Differs(differing).into());
            }
        }
        ShadowCommand::Discard(args) => discard_audited(&args, audit).await?,
        ShadowCommand::Promote { command } => promote::run(command, audit).await?,
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn activity(pv: u64, rev: &[(&str, i64)]) -> Activity {
        Activity {
            page_views: pv,
            revenue: rev.iter().map(|(c, m)| ((*c).to_owned(), *m)).collect(),
            is_final: true,
        }
    }

    #[test]
    fn equal_windows_compare_equal_and_a_changed_user_is_named() {
        let live: ActivityMap = [
            ((0, "a".to_owned()), activity(2, &[("EUR", 5)])),
            ((0, "b".to_owned()), activity(1, &[])),
        ]
        .into();
        let mut out = Compared::new();
        compare_activity(&live, &live.clone(), &mut out);
        assert!(out.values().all(|(l, s, k)| l == s && k.is_empty()));
        assert_eq!(out[&("active_users".to_owned(), 0)].0, 2.0);
        assert_eq!(out[&("revenue[EUR]".to_owned(), 0)].0, 5.0);
        let mut shadow = live.clone();
        shadow.insert((0, "b".to_owned()), activity(3, &[]));
        let mut out = Compared::new();
        compare_activity(&live, &shadow, &mut out);
        let pv = &out[&("page_views".to_owned(), 0)];
        assert_eq!((pv.0, pv.1), (3.0, 5.0));
        assert_eq!(pv.2.len(), 1);
        assert!(pv.2[0].contains("user b"), "{:?}", pv.2);
        assert!(out[&("active_users".to_owned(), 0)].2.is_empty());
    }

    #[test]
    fn sessions_count_in_the_window_of_their_start() {
        let s = |end| SessionVal {
            end_ms: end,
            events: 2,
            pages: 2,
            is_final: true,
        };
        let live: SessionMap = [(("a".to_owned(), 5), s(30)), (("a".to_owned(), 15), s(16))].into();
        let shadow: SessionMap = [(("a".to_owned(), 5), s(16))].into();
        let mut out = Compared::new();
        compare_sessions(&live, &shadow, 10, &mut out);
        assert_eq!(out[&("sessions".to_owned(), 0)].0, 1.0);
        assert_eq!(out[&("sessions".to_owned(), 0)].2.len(), 1, "end differs");
        let w10 = &out[&("sessions".to_owned(), 10)];
        assert_eq!((w10.0, w10.1, w10.2.len()), (1.0, 0.0, 1));
    }

    #[test]
    fn the_tolerance_is_relative_to_the_larger_side() {
        assert!(!beyond(100.0, 100.0, 0.0));
        assert!(beyond(100.0, 101.0, 0.0));
        assert!(!beyond(100.0, 101.0, 0.01));
        assert!(beyond(100.0, 102.0, 0.01));
        assert!(!beyond(0.0, 0.0, 0.0));
    }

    #[test]
    fn a_discard_summary_names_every_step_and_fails_on_a_failed_one() {
        let mut s = DiscardSummary::default();
        assert_eq!(s.detail(), "nothing to do");
        s.removed.push("table pulse.sessions_shadow_v2".into());
        s.missing.push("subject a-value".into());
        s.missing.push("subject b-value".into());
        s.kept.push("topic t.shadow.v2".into());
        assert_eq!(
            discard_outcome(&s),
            Ok(
                "removed table pulse.sessions_shadow_v2; not found subject a-value, \
                subject b-value; kept topic t.shadow.v2"
                    .to_owned()
            )
        );
        s.failed.push("consumer group g: timed out".into());
        let failed = discard_outcome(&s).unwrap_err();
        assert!(
            failed.ends_with("; FAILED consumer group g: timed out"),
            "{failed}"
        );
    }

    #[test]
    fn discard_names_only_shadow_topics_and_groups() {
        use clap::Parser as _;
        let cli = crate::Cli::parse_from(["pulsectl", "shadow", "discard", "--shadow", "v2"]);
        let crate::Command::Shadow {
            command: ShadowCommand::Discard(d),
        } = cli.command
        else {
            panic!("not shadow discard")
        };
        for t in d.topics() {
            assert!(topics::is_shadow_topic(&t), "{t}");
        }
        assert_eq!(
            d.groups(),
            [
                "pulse-processor-shadow-v2",
                "pulse-writer-clickhouse-shadow-v2"
            ]
        );
        assert_eq!(d.subjects().len(), d.topics().len());
        assert!(
            d.subjects()
                .contains(&"pulse.sessions.v1.shadow.v2-value".to_owned()),
            "{:?}",
            d.subjects()
        );
        assert!(!d.keep_subjects);
        let err = crate::Cli::try_parse_from(["pulsectl", "shadow", "diff", "--shadow", "V2"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--shadow"), "{err}");
    }
}
