//! `pulsectl shadow promote check|finish`: the checks around moving the live processor to
//! the shadow's version (docs/operations.md, "Promote"). Swapping what the live Deployment
//! runs is the operator's (the chart's values); this module decides whether the shadow may
//! be promoted (`check`: its diff is within the tolerance on a range final on both sides,
//! with the same window size as live) and whether the promotion happened (`finish`: after
//! the switch, live equals the shadow exactly on a range after it, and no live session is
//! left with an early result that outranks a final one), then discards the shadow.
//! Reading and comparing is `shadow::diff`; discarding is `shadow::discard`. Each check and
//! finish writes an audit record (`shadow.promote.check|finish`), a refusal as `refused`
//! with its reasons.

use std::collections::BTreeSet;

use pulse_platform::audit::action;
use pulse_platform::clickhouse::ClickHouseConfig;
use pulse_platform::config::validate_all;
use pulse_platform::kafka::KafkaConfig;
use pulse_platform::windowing::WindowSettings;
use pulse_storage::migrate;

use super::{
    DiffArgs, DiffReport, DiscardArgs, DiscardSummary, ShadowError, diff, discard, discard_outcome,
    fetch,
};
use crate::audit::{self, AuditArgs, Ending};
use crate::rfc3339;

#[derive(Debug, clap::Subcommand)]
pub enum PromoteCommand {
    /// Before the switch: refuse unless every window of the range is final on both sides,
    /// the window sizes match and the diff is within the tolerance; print the steps.
    Check(Box<CheckArgs>),
    /// After the switch: refuse unless live equals the shadow exactly on the range (which
    /// must start after the switch) and no live session kept a stale early result; then
    /// discard the shadow.
    Finish(Box<FinishArgs>),
}

#[derive(Debug, clap::Args)]
pub struct CheckArgs {
    #[command(flatten)]
    pub diff: DiffArgs,
    /// The live processor's group, named in the steps printed.
    #[arg(long = "processor-group-id", default_value = "pulse-processor")]
    pub processor_group: String,
    /// The broker the audit record of the check is written to.
    #[command(flatten)]
    pub kafka: KafkaConfig,
}

#[derive(Debug, clap::Args)]
pub struct FinishArgs {
    /// Start of a range of windows that begin after the switch (inclusive).
    #[arg(long, value_parser = crate::replay::parse_time, allow_hyphen_values = true)]
    pub from: i64,
    /// End of the range (exclusive); both sides' watermarks must have passed it.
    #[arg(long, value_parser = crate::replay::parse_time, allow_hyphen_values = true)]
    pub to: i64,
    /// How far before `--from` to look for live sessions left with a stale early result
    /// (a session open at the switch started at most the maximum session duration before).
    #[arg(long = "session-lookback", value_parser = humantime::parse_duration, default_value = "24h")]
    pub session_lookback: std::time::Duration,
    /// How many differing keys to print.
    #[arg(long = "max-keys", default_value_t = 20)]
    pub max_keys: usize,
    #[command(flatten)]
    pub windowing: WindowSettings,
    /// The shadow to discard once the checks pass, and how.
    #[command(flatten)]
    pub discard: DiscardArgs,
}

impl FinishArgs {
    /// The exact diff of the range.
    fn diff_args(&self) -> DiffArgs {
        DiffArgs {
            shadow: self.discard.shadow.clone(),
            from: self.from,
            to: self.to,
            tolerance: 0.0,
            max_keys: self.max_keys,
            windowing: self.windowing,
            clickhouse: self.discard.clickhouse.clone(),
        }
    }
}

/// Why a shadow may not be promoted (or a promotion not finished) yet.
#[derive(Debug, Clone, PartialEq)]
pub enum Refusal {
    /// Windows of the range not final on both sides (the shadow, or live, is behind).
    NotCaughtUp(usize),
    /// The shadow's latest final window of the range is earlier than live's.
    Behind { live: i64, shadow: Option<i64> },
    /// No window of the range has rows on both sides: nothing shows what changes.
    NothingCompared,
    /// Window sizes (ms) of live and of the shadow in the range differ.
    WindowSize { live: Vec<i64>, shadow: Vec<i64> },
    /// Metric windows that differ beyond the tolerance.
    Differs(usize),
    /// Live sessions whose latest row is an early result though a final one exists.
    StaleSessions(Vec<String>),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotCaughtUp(n) => write!(
                f,
                "{n} window(s) of the range are not final on both sides: wait until both \
                 watermarks (pulse_processor_watermark_ms, pulse_shadow_processor_watermark_ms) \
                 have passed --to, or end --to earlier"
            ),
            Self::Behind { live, shadow } => write!(
                f,
                "the shadow is behind live: its latest final window of the range starts at \
                 {}, live's at {live}; wait until pulse_shadow_processor_watermark_ms passes --to",
                shadow.map_or("none".to_owned(), |s| s.to_string())
            ),
            Self::NothingCompared => write!(
                f,
                "no window of the range has final rows on both sides: nothing shows what the \
                 promotion changes (is the shadow's writer running, and --from/--to right?)"
            ),
            Self::WindowSize { live, shadow } => write!(
                f,
                "the shadow's windows are {shadow:?} ms long, live's {live:?} ms: a new window \
                 size cannot continue the live checkpoints (keys change); run it as a new \
                 pipeline instead"
            ),
            Self::Differs(n) => write!(
                f,
                "{n} metric window(s) differ beyond the tolerance (listed above)"
            ),
            Self::StaleSessions(ids) => write!(
                f,
                "{} live session(s) keep an early result that outranks their final one (the \
                 old version's open session re-cut by the new rules), e.g. {}: their events \
                 count twice",
                ids.len(),
                ids.iter().take(5).cloned().collect::<Vec<_>>().join(", ")
            ),
        }
    }
}

/// The refusals a diff report implies: open windows, nothing compared, differences.
pub fn judge(report: &DiffReport) -> Vec<Refusal> {
    let mut out = Vec::new();
    if !report.open_windows.is_empty() {
        out.push(Refusal::NotCaughtUp(report.open_windows.len()));
    }
    if let (Some(live), shadow) = report.last_final
        && shadow.is_none_or(|s| s < live)
    {
        out.push(Refusal::Behind { live, shadow });
    }
    if report
        .summary
        .get("active_users")
        .is_none_or(|s| s.windows == 0)
    {
        out.push(Refusal::NothingCompared);
    }
    if !report.differing.is_empty() {
        out.push(Refusal::Differs(report.differing.len()));
    }
    out
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct Length {
    len: i64,
}

/// The distinct window lengths of `table`'s windows in `[from, to)`.
async fn window_lengths(
    cfg: &ClickHouseConfig,
    table: &str,
    from: i64,
    to: i64,
) -> Result<Vec<i64>, ShadowError> {
    let sql = format!(
        "SELECT DISTINCT window_end_ms - window_start_ms AS len FROM {table} \
         WHERE window_start_ms >= ? AND window_end_ms <= ? ORDER BY len"
    );
    let rows: Vec<Length> = fetch(cfg, table, &sql, from, to).await?;
    Ok(rows.into_iter().map(|r| r.len).collect())
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct Stale {
    user_id: String,
    session_id: String,
}

/// Live sessions starting in `[from, to)` whose highest version is not final although a
/// final row of the same id exists: after a rules change, the old version's early result
/// of a session open at the switch outranks the new version's final one (same id, more
/// events). Such a session's events are counted in it and in the new sessions too.
pub async fn stale_sessions(
    cfg: &ClickHouseConfig,
    from: i64,
    to: i64,
) -> Result<Vec<String>, ShadowError> {
    let sql = "SELECT user_id, session_id FROM sessions WHERE start_ms >= ? AND start_ms < ? \
               GROUP BY user_id, session_id \
               HAVING argMax(is_final, version) = 0 AND max(is_final) = 1 \
               ORDER BY user_id, session_id";
    let rows: Vec<Stale> = fetch(cfg, "sessions", sql, from, to).await?;
    Ok(rows
        .into_iter()
        .map(|r| format!("{}/{}", r.user_id, r.session_id))
        .collect())
}

/// `check`: the diff, its refusals and the window-size check.
pub async fn check(args: &CheckArgs) -> Result<(DiffReport, Vec<Refusal>), ShadowError> {
    let d = &args.diff;
    let report = diff(d).await?;
    let mut refusals = judge(&report);
    let shadow_table = migrate::shadow_table("user_activity", &d.shadow);
    let (live, shadow) = tokio::try_join!(
        window_lengths(&d.clickhouse, "user_activity", d.from, d.to),
        window_lengths(&d.clickhouse, &shadow_table, d.from, d.to),
    )?;
    let lengths: BTreeSet<i64> = live.iter().chain(&shadow).copied().collect();
    if lengths.len() > 1 {
        refusals.push(Refusal::WindowSize { live, shadow });
    }
    Ok((report, refusals))
}

/// `finish`'s checks (nothing is discarded here): the exact diff and the stale sessions.
pub async fn finish_checks(args: &FinishArgs) -> Result<(DiffReport, Vec<Refusal>), ShadowError> {
    let report = diff(&args.diff_args()).await?;
    let mut refusals = judge(&report);
    let lookback = i64::try_from(args.session_lookback.as_millis()).unwrap_or(i64::MAX);
    let stale = stale_sessions(
        &args.discard.clickhouse,
        args.from.saturating_sub(lookback),
        args.to,
    )
    .await?;
    if !stale.is_empty() {
        refusals.push(Refusal::StaleSessions(stale));
    }
    Ok((report, refusals))
}

fn print_refusals(what: &str, refusals: &[Refusal]) {
    println!("{what}: REFUSED");
    for r in refusals {
        println!("  - {r}");
    }
}

/// The refusals as one line of an audit record's detail.
fn refused(refusals: &[Refusal]) -> String {
    let reasons: Vec<String> = refusals.iter().map(ToString::to_string).collect();
    format!("refused: {}", reasons.join("; "))
}

/// The range of a check or finish, as its audit record names it.
fn range(from: i64, to: i64) -> String {
    format!("windows [{}, {})", rfc3339(from), rfc3339(to))
}

/// `check`, printed: the refusals (none: the shadow may be promoted, steps printed).
async fn run_check(args: &CheckArgs) -> Result<Vec<Refusal>, crate::Error> {
    let d = &args.diff;
    validate_all(&[&d.clickhouse, &d.windowing, &args.kafka])?;
    println!(
        "shadow {}: promotion check on windows in [{}, {}), tolerance {}",
        d.shadow,
        rfc3339(d.from),
        rfc3339(d.to),
        d.tolerance
    );
    let (report, refusals) = check(args).await?;
    print!("{}", report.render(d.max_keys));
    if !refusals.is_empty() {
        print_refusals("promotion", &refusals);
        return Ok(refusals);
    }
    println!(
        "shadow {} may be promoted. The switch is yours (the chart's values):\n\
         1. Give the live processor the shadow's image and processing flags, without \
         --shadow, keeping its group ({}), topics and checkpoint topic; the old \
         process stops (SIGTERM) before the new one starts, which continues from the \
         live offsets and checkpoints and re-emits what was open. Leave the shadow \
         running.\n\
         2. Once both watermarks have passed a few windows after the switch, stop the \
         shadow (shadow.enabled=false) and run\n   \
         pulsectl shadow promote finish --shadow {} --from <a window after the switch> \
         --to <a time both watermarks passed>\n   \
         It checks that live now equals the shadow there and discards the shadow.",
        d.shadow, args.processor_group, d.shadow
    );
    Ok(refusals)
}

/// How a `finish` that ran its checks ended.
enum Finished {
    /// Refused: nothing was discarded.
    Refused(Vec<Refusal>),
    /// The checks passed and the shadow was discarded (some steps may have failed).
    Discarded(DiscardSummary),
}

/// `finish`, printed: its checks, then the discard.
async fn run_finish(args: &FinishArgs) -> Result<Finished, crate::Error> {
    validate_all(&[&args.discard.clickhouse, &args.windowing])?;
    args.discard.validate()?;
    if args.from >= args.to {
        return Err(ShadowError::Range {
            from: args.from,
            to: args.to,
        }
        .into());
    }
    println!(
        "shadow {}: promotion finish: live must equal the shadow on windows in [{}, {})",
        args.discard.shadow,
        rfc3339(args.from),
        rfc3339(args.to)
    );
    let (report, refusals) = finish_checks(args).await?;
    print!("{}", report.render(args.max_keys));
    if !refusals.is_empty() {
        print_refusals("finish (nothing was discarded)", &refusals);
        println!(
            "  live does not (yet) run the shadow's version on the live group, or the \
             range starts before the switch; see docs/operations.md, Promote"
        );
        return Ok(Finished::Refused(refusals));
    }
    println!("live equals the shadow on the range: discarding the shadow");
    Ok(Finished::Discarded(discard(&args.discard).await))
}

/// Runs `check` or `finish` and writes its audit record (`shadow.promote.check|finish`,
/// target the shadow's name, the range in the detail): `refused` with the reasons when
/// its checks (or flags) said no, `failed` for an error or a failed discard step.
pub async fn run(command: PromoteCommand, audit: &AuditArgs) -> Result<(), crate::Error> {
    match command {
        PromoteCommand::Check(args) => {
            let d = &args.diff;
            let range = format!("{}, tolerance {}", range(d.from, d.to), d.tolerance);
            let result = run_check(&args).await;
            let ending = match &result {
                Ok(r) if r.is_empty() => Ending::ok(format!("{range}: may be promoted")),
                Ok(r) => Ending::refused(format!("{range}: {}", refused(r))),
                Err(e) => Ending::of_error(e, format!("{range}: {e}")),
            };
            audit::record(
                audit,
                &args.kafka,
                action::SHADOW_PROMOTE_CHECK,
                &d.shadow,
                ending,
            )
            .await;
            match result? {
                r if r.is_empty() => {}
                r => return Err(ShadowError::Refused(r.len()).into()),
            }
        }
        PromoteCommand::Finish(args) => {
            let range = range(args.from, args.to);
            let result = run_finish(&args).await;
            let ending = match &result {
                Ok(Finished::Refused(r)) => {
                    Ending::refused(format!("{range}: {} (nothing was discarded)", refused(r)))
                }
                Ok(Finished::Discarded(summary)) => discard_outcome(summary)
                    .map(|d| format!("{range}: live equals the shadow; discard: {d}"))
                    .map_err(|d| format!("{range}: live equals the shadow; discard: {d}"))
                    .into(),
                Err(e) => Ending::of_error(e, format!("{range}: {e}")),
            };
            audit::record(
                audit,
                &args.discard.kafka,
                action::SHADOW_PROMOTE_FINISH,
                &args.discard.shadow,
                ending,
            )
            .await;
            match result? {
                Finished::Refused(r) => return Err(ShadowError::Refused(r.len()).into()),
                Finished::Discarded(s) if !s.failed.is_empty() => {
                    return Err(ShadowError::Discard(s.failed.len()).into());
                }
                Finished::Discarded(_) => {
                    println!("promotion of shadow {} finished", args.discard.shadow)
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::MetricSummary;
    use super::*;

    fn summary(windows: usize, live: f64) -> MetricSummary {
        MetricSummary {
            windows,
            differing: 0,
            live_total: live,
            shadow_total: live,
        }
    }

    #[test]
    fn an_empty_or_open_range_is_refused_and_a_closed_equal_one_is_not() {
        let empty = DiffReport::default();
        assert_eq!(judge(&empty), [Refusal::NothingCompared]);
        let mut r = DiffReport::default();
        r.summary.insert("active_users".into(), summary(3, 5.0));
        r.last_final = (Some(20), Some(20));
        assert!(judge(&r).is_empty());
        r.open_session_windows.insert(10);
        assert!(judge(&r).is_empty(), "a session still open is no reason");
        r.open_windows.insert(10);
        assert_eq!(judge(&r), [Refusal::NotCaughtUp(1)]);
        r.open_windows.clear();
        r.last_final = (Some(20), Some(10));
        assert_eq!(
            judge(&r),
            [Refusal::Behind {
                live: 20,
                shadow: Some(10)
            }]
        );
        let text = Refusal::NotCaughtUp(1).to_string();
        assert!(text.contains("--to"), "{text}");
    }

    #[test]
    fn finish_parses_the_discard_flags_and_diffs_exactly() {
        use clap::Parser as _;
        let cli = crate::Cli::parse_from([
            "pulsectl",
            "shadow",
            "promote",
            "finish",
            "--shadow",
            "v2",
            "--from",
            "10",
            "--to",
            "20",
            "--keep-topics",
            "--processor-group-id",
            "g",
        ]);
        let crate::Command::Shadow {
            command: super::super::ShadowCommand::Promote { command },
        } = cli.command
        else {
            panic!("not shadow promote")
        };
        let PromoteCommand::Finish(f) = command else {
            panic!("not finish")
        };
        assert!(f.discard.keep_topics);
        assert_eq!(f.discard.groups()[0], "g-shadow-v2");
        let d = f.diff_args();
        assert_eq!((d.from, d.to, d.tolerance), (10, 20, 0.0));
        assert_eq!(f.session_lookback, std::time::Duration::from_secs(86_400));
    }
}
