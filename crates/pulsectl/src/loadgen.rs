//! `pulsectl loadgen`: drives a realistic, seeded workload against ingest over HTTP or
//! gRPC at a planned rate, shows live progress, prints a summary and optionally writes
//! the answers the platform should give (`--expect-out`). The workload itself
//! (`workload`), the expected answers (`expect`) and the accounting (`stats`) live in the
//! submodules, transport and retries in `crate::ingest_client`; this file schedules and
//! dispatches batches.

pub mod expect;
pub mod stats;
pub mod workload;

use pulse_platform::clock::now_ms;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use pulse_platform::config::{Problems, Validate, validate_all};
use serde_json::Value;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use self::expect::{Answered, Settings, Status};
use self::stats::{Counts, Summary, progress_message};
use self::workload::{GenEvent, Kind, UserOrder, Workload, WorkloadConfig};
use crate::duration::parse_duration;
use crate::ingest_client::{
    ClientError, Delivery, GrpcIngest, HttpIngest, IngestArgs, Retry, SendError,
};
use crate::progress::{Progress, ProgressArgs};

/// A partial batch waits at most this long for more events before it is sent.
const LINGER: Duration = Duration::from_millis(500);

#[derive(Debug, Clone, clap::Args)]
pub struct LoadgenArgs {
    #[command(flatten)]
    pub ingest: IngestArgs,
    /// Send over gRPC to this URL instead (unary SendEvents), e.g. http://127.0.0.1:50051.
    #[arg(long)]
    pub grpc: Option<String>,
    /// Simulated users.
    #[arg(long, default_value_t = 200)]
    pub users: u32,
    /// How events are spread over the users: `random` (each event a user drawn at random)
    /// or `turns` (users take turns in a fixed, scattered order, so the first `--users`
    /// normal events reach `--users` distinct users and every user stays active).
    #[arg(long, value_enum, default_value_t = UserOrder::Random)]
    pub user_order: UserOrder,
    /// Events per second (planned; the summary shows what was achieved).
    #[arg(long, default_value_t = 50.0)]
    pub rate: f64,
    /// How long to run (`90s`, `5m`, `1h`, `500ms`; `0` = until Ctrl-C or `--events`).
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Send this many events, then stop (with `--duration`: whichever comes first).
    #[arg(long)]
    pub events: Option<u64>,
    /// Events per request (at most; a partial batch is sent after 500 ms).
    #[arg(long, default_value_t = 20)]
    pub batch_size: usize,
    /// Seed of the workload: the same seed (and settings) gives the same events. Default:
    /// derived from the clock, printed at the start.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    pub concurrency: usize,
    /// Share of events sent with their event time shifted back (out of order).
    #[arg(long, default_value_t = 0.05)]
    pub out_of_order: f64,
    /// Upper bound of that shift (below the processor's 5 s out-of-orderness).
    #[arg(long, default_value_t = 3_000)]
    pub out_of_order_max_ms: i64,
    /// Share of events dated `--late-by-ms` before the start (beyond the allowed lateness).
    #[arg(long, default_value_t = 0.01)]
    pub late: f64,
    /// How far before the start of the run late events are dated.
    #[arg(long, default_value_t = 600_000)]
    pub late_by_ms: i64,
    /// Late events are sent only after this much of the run (so the watermark has moved).
    #[arg(long, default_value_t = 10_000)]
    pub late_warmup_ms: i64,
    /// Share of events that re-send an already-sent event with the same event_id.
    #[arg(long, default_value_t = 0.02)]
    pub duplicates: f64,
    /// Share of events that fail validation (missing user_id, negative amount, unknown
    /// currency, bad event_type).
    #[arg(long, default_value_t = 0.01)]
    pub malformed: f64,
    /// Write the answers the platform should give for this run to FILE (JSON).
    #[arg(long, value_name = "FILE")]
    pub expect_out: Option<PathBuf>,
    /// Write every sent event's outcome to FILE, one JSON object a line: `event_id`,
    /// `status` (accepted, duplicate, rejected, or failed/unsent when no answer came),
    /// `late`, and `code` for a rejected event. What a reconciliation (scripts/chaos.sh)
    /// compares the stores against.
    #[arg(long, value_name = "FILE")]
    pub record: Option<PathBuf>,
    /// The processor's window length, for the expected answers.
    #[arg(long, default_value_t = 60_000)]
    pub window_ms: i64,
    /// The processor's session gap, for the expected answers.
    #[arg(long, default_value_t = 1_800_000)]
    pub session_gap_ms: i64,
    /// Give up on a batch that is still refused with 503/429 or unanswered after this long.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub max_retry: Duration,
    /// Timeout of one request.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub request_timeout: Duration,
}

impl Validate for LoadgenArgs {
    fn validate(&self, p: &mut Problems) {
        let url_ok = |u: &str| u.starts_with("http://") || u.starts_with("https://");
        self.ingest.validate(p);
        p.check(
            self.events != Some(0),
            "--events",
            "must be >= 1 (leave it out to run for --duration)",
        );
        if let Some(g) = &self.grpc {
            p.check(
                url_ok(g),
                "--grpc",
                format!("must be an http(s) URL, got {g:?}"),
            );
        }
        p.check(
            self.rate.is_finite() && self.rate > 0.0,
            "--rate",
            format!("must be > 0, got {}", self.rate),
        );
        p.check(self.users >= 1, "--users", "must be >= 1");
        p.check(
            (1..=1000).contains(&self.batch_size),
            "--batch-size",
            format!(
                "must be 1..=1000 (ingest's batch limit), got {}",
                self.batch_size
            ),
        );
        p.check(
            (1..=256).contains(&self.concurrency),
            "--concurrency",
            format!("must be 1..=256, got {}", self.concurrency),
        );
        let fractions = [
            ("--out-of-order", self.out_of_order),
            ("--late", self.late),
            ("--duplicates", self.duplicates),
            ("--malformed", self.malformed),
        ];
        for (name, f) in fractions {
            p.check(
                (0.0..=1.0).contains(&f),
                name,
                format!("must be a fraction in 0..=1, got {f}"),
            );
        }
        let sum: f64 = fractions.iter().map(|(_, f)| f).sum();
        p.check(
            sum <= 1.0,
            "--out-of-order + --late + --duplicates + --malformed",
            format!("must add up to at most 1, got {sum}"),
        );
        p.check(
            self.out_of_order_max_ms >= 2,
            "--out-of-order-max-ms",
            "must be >= 2",
        );
        p.check(self.late_by_ms >= 1, "--late-by-ms", "must be >= 1");
        p.check(self.late_warmup_ms >= 0, "--late-warmup-ms", "must be >= 0");
        p.check(self.window_ms >= 1, "--window-ms", "must be >= 1");
        p.check(self.session_gap_ms >= 0, "--session-gap-ms", "must be >= 0");
    }
}

/// Why a load run failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadgenError {
    #[error("{0}")]
    Config(#[from] pulse_platform::config::ConfigErrors),
    #[error("cannot reach ingest: {0}")]
    Connect(#[from] ClientError),
    #[error("writing {path}: {source}")]
    WriteFile {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{failed} event(s) were never acknowledged by ingest (see the errors above)")]
    Lost { failed: u64 },
}

/// How the library run behaves beyond the arguments.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Show the seed line and live progress on stderr, as these flags say (None: neither).
    pub progress: Option<ProgressArgs>,
    /// Keep every answered event in the report (always on with `--expect-out`).
    pub keep_answers: bool,
}

/// What a run did.
#[derive(Debug, Clone)]
pub struct Report {
    pub summary: Summary,
    /// Epoch ms the event times are relative to.
    pub start_ms: i64,
    /// Every answered event, by sequence number (when kept).
    pub answered: Vec<Answered>,
    /// Error messages of batches that were not answered, with how often each occurred.
    pub errors: BTreeMap<String, u64>,
    /// Ids of events that got no answer, each with "failed" or "unsent" (when kept).
    pub unanswered: Vec<(String, &'static str)>,
}

impl Report {
    /// The answers the platform should give for this run.
    pub fn expected(&self, settings: Settings) -> expect::Expected {
        expect::expected(&self.answered, settings)
    }
}

#[derive(Debug, Clone)]
enum Transport {
    Http(HttpIngest),
    Grpc(GrpcIngest),
}

#[derive(Debug, Default)]
struct Shared {
    counts: Counts,
    answered: Vec<(u64, Answered)>,
    unanswered: Vec<(u64, String, &'static str)>,
    errors: BTreeMap<String, u64>,
}

fn lock(shared: &Mutex<Shared>) -> MutexGuard<'_, Shared> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

fn clock_seed() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() % 1_000_000_000)
        .unwrap_or(1)
}

/// What ingest's answer to `e` means for the expected answers.
fn answered(e: &GenEvent, status: Status, code: Option<String>, start_ms: i64) -> Answered {
    Answered {
        event_id: e.event_id.clone(),
        user_id: e.user_id.clone().unwrap_or_default(),
        event_type: e.event_type.clone(),
        page: e.page.clone(),
        currency: e.currency.clone(),
        amount_micros: e.amount_micros,
        event_time_ms: e.event_time_ms(start_ms),
        late: e.kind == Kind::Late,
        status,
        reason_code: code,
    }
}

fn unanswered(s: &mut Shared, batch: &[GenEvent], outcome: &'static str) {
    s.unanswered
        .extend(batch.iter().map(|e| (e.seq, e.event_id.clone(), outcome)));
}

/// Books a batch's delivery. Returns true when the run must stop (the key was refused).
fn record(
    shared: &Mutex<Shared>,
    batch: &[GenEvent],
    d: Delivery,
    start_ms: i64,
    keep: bool,
    progress: &Progress,
) -> bool {
    let mut s = lock(shared);
    let stop = book(&mut s, batch, d, start_ms, keep, progress);
    progress.set_position(s.counts.done());
    progress.set_message(progress_message(&s.counts));
    stop
}

fn book(
    s: &mut Shared,
    batch: &[GenEvent],
    d: Delivery,
    start_ms: i64,
    keep: bool,
    progress: &Progress,
) -> bool {
    s.counts.requests += u64::from(d.attempts);
    s.counts.retries += u64::from(d.attempts.saturating_sub(1));
    for l in &d.latencies {
        s.counts.latencies.record(*l);
    }
    let n = batch.len() as u64;
    match d.result {
        Ok(answers) if answers.len() == batch.len() => {
            for (e, a) in batch.iter().zip(answers) {
                let status = match a.status.as_str() {
                    "accepted" => Status::Accepted,
                    // An earlier attempt of this batch failed (no answer, or 503 for a batch
                    // the broker stored part of) but some of it was taken: those events come
                    // back as duplicates although they are this run's first.
                    "duplicate"
                        if d.earlier_attempt_failed
                            && !matches!(e.kind, Kind::Duplicate { .. }) =>
                    {
                        Status::Accepted
                    }
                    "duplicate" => Status::Duplicate,
                    _ => Status::Rejected,
                };
                match status {
                    Status::Accepted => s.counts.accepted += 1,
                    Status::Duplicate => s.counts.duplicates += 1,
                    Status::Rejected => s.counts.rejected += 1,
                }
                if keep {
                    // gRPC answers carry no code; the generator knows which rule it broke.
                    let code = (status == Status::Rejected).then(|| {
                        a.code.unwrap_or_else(|| match e.kind {
                            Kind::Malformed(how) => how.expected_code().to_owned(),
                            _ => format!("unknown ({})", a.field.unwrap_or_default()),
                        })
                    });
                    let item = answered(e, status, code, start_ms);
                    s.answered.push((e.seq, item));
                }
            }
            false
        }
        Ok(answers) => {
            s.counts.failed += n;
            if keep {
                unanswered(s, batch, "failed");
            }
            let msg = format!(
                "ingest answered {} results for {} events",
                answers.len(),
                batch.len()
            );
            *s.errors.entry(msg).or_default() += 1;
            false
        }
        Err(_) if d.abandoned => {
            s.counts.unsent += n;
            if keep {
                unanswered(s, batch, "unsent");
            }
            false
        }
        Err(e) => {
            s.counts.failed += n;
            if keep {
                unanswered(s, batch, "failed");
            }
            let msg = e.to_string();
            let first = !s.errors.contains_key(&msg);
            *s.errors.entry(msg.clone()).or_default() += 1;
            if first {
                progress.println(&format!("loadgen: a batch of {n} event(s) failed: {msg}"));
            }
            // A wrong key or an unusable certificate would fail every batch: stop.
            matches!(&e, SendError::Tls { .. })
                || matches!(&e, SendError::Refused { status, .. }
                    if status.starts_with("401") || status == "Unauthenticated")
        }
    }
}

/// Events the run will send: `--events`, or what `--rate` plans for `--duration` (one
/// event every 1/rate s from 0), whichever is fewer; None when it runs until Ctrl-C.
pub fn planned_events(args: &LoadgenArgs) -> Option<u64> {
    let by_time = (!args.duration.is_zero())
        .then(|| (args.duration.as_secs_f64() * args.rate).ceil().max(0.0) as u64);
    match (by_time, args.events) {
        (Some(t), Some(e)) => Some(t.min(e)),
        (t, e) => t.or(e),
    }
}

/// Runs the workload until `--duration` has passed (or `stop` is cancelled) and every
/// request has been answered or given up.
pub async fn run_load(
    args: &LoadgenArgs,
    stop: CancellationToken,
    opts: RunOptions,
) -> Result<Report, LoadgenError> {
    validate_all(&[args])?;
    let seed = args.seed.unwrap_or_else(clock_seed);
    let keep = opts.keep_answers || args.expect_out.is_some() || args.record.is_some();
    let transport = match &args.grpc {
        Some(url) => Transport::Grpc(
            args.ingest
                .grpc(url, args.request_timeout)
                .await
                .map_err(LoadgenError::Connect)?,
        ),
        None => Transport::Http(
            args.ingest
                .http(args.request_timeout)
                .map_err(LoadgenError::Connect)?,
        ),
    };
    let mut workload = Workload::new(WorkloadConfig {
        seed,
        users: args.users,
        rate: args.rate,
        out_of_order: args.out_of_order,
        out_of_order_max_ms: args.out_of_order_max_ms,
        late: args.late,
        late_by_ms: args.late_by_ms,
        late_warmup_ms: args.late_warmup_ms,
        duplicates: args.duplicates,
        malformed: args.malformed,
        duplicate_min_distance: (args.batch_size * args.concurrency) as u64,
        user_order: args.user_order,
    });
    let progress = match &opts.progress {
        Some(p) => {
            eprintln!(
                "loadgen: seed {seed}, {} events/s, {} users, to {}",
                args.rate,
                args.users,
                args.grpc.as_deref().unwrap_or(&args.ingest.target)
            );
            Progress::start(p, "loadgen", "events", planned_events(args))
        }
        None => Progress::hidden(),
    };

    let shared = Arc::new(Mutex::new(Shared::default()));
    // Cancelled by Ctrl-C (via `stop`) or when ingest refuses the API key.
    let halt = stop.child_token();
    let retry = Retry {
        max_retry: args.max_retry,
    };
    let permits = Arc::new(Semaphore::new(args.concurrency));
    let mut tasks: JoinSet<()> = JoinSet::new();
    let started = Instant::now();
    let start_ms = now_ms();
    let end = (!args.duration.is_zero()).then(|| started + args.duration);

    let due = |e: &GenEvent| started + Duration::from_millis(e.send_offset_ms.max(0) as u64);
    let mut next = workload.next();
    let mut pending: Vec<GenEvent> = Vec::new();
    let mut first_due = started;
    let mut generated: u64 = 0;
    loop {
        while tasks.try_join_next().is_some() {}
        let Some(event) = next.take() else { break };
        let event_due = due(&event);
        // Ctrl-C (or a refused key) ends generating; what was generated is still sent.
        let finished = halt.is_cancelled()
            || end.is_some_and(|e| event_due >= e)
            || args.events.is_some_and(|n| generated >= n);
        let now = Instant::now();
        // A partial batch waits for more events only while the next one is not due yet:
        // behind schedule, due events fill it first (else every batch would be one event
        // once the run lags more than the linger behind, and it would never catch up).
        let flush = !pending.is_empty()
            && (finished
                || pending.len() >= args.batch_size
                || (now >= first_due + LINGER && event_due > now));
        if flush {
            let batch = std::mem::take(&mut pending);
            // Every task ends after its retries (at once once halted), so this wait is bounded.
            let Ok(permit) = permits.clone().acquire_owned().await else {
                let mut s = lock(&shared);
                s.counts.unsent += batch.len() as u64;
                if keep {
                    unanswered(&mut s, &batch, "unsent");
                }
                break;
            };
            let (transport, shared, halt, retry, progress) = (
                transport.clone(),
                shared.clone(),
                halt.clone(),
                retry,
                progress.clone(),
            );
            tasks.spawn(async move {
                let _permit = permit;
                let delivery = match &transport {
                    Transport::Http(h) => {
                        let body =
                            Value::Array(batch.iter().map(|e| e.to_json(start_ms)).collect());
                        let body = serde_json::to_vec(&body).unwrap_or_default();
                        retry.run(&halt, || h.post(body.clone())).await
                    }
                    Transport::Grpc(g) => {
                        retry
                            .run(&halt, || {
                                g.send(batch.iter().map(|e| e.to_pb(start_ms)).collect())
                            })
                            .await
                    }
                };
                if record(&shared, &batch, delivery, start_ms, keep, &progress) {
                    halt.cancel();
                }
            });
        }
        if finished {
            // The last partial batch was flushed above.
            break;
        }
        if event_due <= now {
            if pending.is_empty() {
                first_due = event_due;
            }
            pending.push(event);
            generated += 1;
            lock(&shared).counts.generated += 1;
            next = workload.next();
            continue;
        }
        let wake = if pending.is_empty() {
            event_due
        } else {
            event_due.min(first_due + LINGER)
        };
        next = Some(event);
        tokio::select! {
            _ = halt.cancelled() => {}
            _ = tokio::time::sleep_until(wake) => {}
        }
    }
    while let Some(joined) = tasks.join_next().await {
        if let Err(e) = joined {
            tracing::warn!(error = %e, "a loadgen request task failed");
        }
    }
    let elapsed = started.elapsed();
    {
        let s = lock(&shared);
        progress.set_position(s.counts.done());
        progress.set_message(progress_message(&s.counts));
    }
    progress.finish();
    let mut s = std::mem::take(&mut *lock(&shared));
    s.answered.sort_by_key(|(seq, _)| *seq);
    s.unanswered.sort_by_key(|(seq, _, _)| *seq);
    Ok(Report {
        summary: Summary::new(seed, &s.counts, elapsed),
        start_ms,
        answered: s.answered.into_iter().map(|(_, a)| a).collect(),
        errors: s.errors,
        unanswered: s
            .unanswered
            .into_iter()
            .map(|(_, id, outcome)| (id, outcome))
            .collect(),
    })
}

/// `--record`'s lines: one JSON object per sent event, answered ones first (in sending
/// order), then those that got no answer.
fn outcomes_ndjson(report: &Report) -> String {
    let mut out = String::new();
    for a in &report.answered {
        let status = match a.status {
            Status::Accepted => "accepted",
            Status::Duplicate => "duplicate",
            Status::Rejected => "rejected",
        };
        let line = serde_json::json!({
            "event_id": a.event_id,
            "status": status,
            "late": a.late,
            "code": a.reason_code,
        });
        out.push_str(&line.to_string());
        out.push('\n');
    }
    for (id, outcome) in &report.unanswered {
        let line = serde_json::json!({"event_id": id, "status": outcome});
        out.push_str(&line.to_string());
        out.push('\n');
    }
    out
}

/// The command: runs until the duration or Ctrl-C, prints the summary, writes the expect
/// file; fails when events were lost.
pub async fn run(args: LoadgenArgs, progress: &ProgressArgs) -> Result<(), crate::Error> {
    let stop = CancellationToken::new();
    let on_signal = stop.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!(
                "\nloadgen: stopping (Ctrl-C): waiting for requests in flight; Ctrl-C again exits at once"
            );
            on_signal.cancel();
        }
        if tokio::signal::ctrl_c().await.is_ok() {
            std::process::exit(130);
        }
    });
    let report = run_load(
        &args,
        stop,
        RunOptions {
            progress: Some(progress.clone()),
            keep_answers: false,
        },
    )
    .await?;
    println!("{}", report.summary);
    for (msg, n) in &report.errors {
        println!("  error ({n}x): {msg}");
    }
    if let Some(path) = &args.expect_out {
        let expected = report.expected(Settings {
            window_ms: args.window_ms,
            session_gap_ms: args.session_gap_ms,
        });
        let text = serde_json::to_vec_pretty(&expected).unwrap_or_default();
        std::fs::write(path, text).map_err(|source| LoadgenError::WriteFile {
            path: path.clone(),
            source,
        })?;
        println!("  expected answers written to {}", path.display());
    }
    if let Some(path) = &args.record {
        std::fs::write(path, outcomes_ndjson(&report)).map_err(|source| {
            LoadgenError::WriteFile {
                path: path.clone(),
                source,
            }
        })?;
        println!("  every event's outcome written to {}", path.display());
    }
    if report.summary.failed > 0 {
        return Err(LoadgenError::Lost {
            failed: report.summary.failed,
        }
        .into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, clap::Parser)]
    struct Cli {
        #[command(flatten)]
        args: LoadgenArgs,
    }

    #[test]
    fn defaults_are_valid_and_every_bad_setting_is_reported() {
        let ok = Cli::parse_from(["x"]).args;
        validate_all(&[&ok]).unwrap();
        assert_eq!(ok.ingest.key().unwrap().expose(), "pulse-dev-key");
        let bad = Cli::parse_from([
            "x",
            "--rate",
            "0",
            "--batch-size",
            "5000",
            "--malformed",
            "0.6",
            "--duplicates",
            "0.6",
            "--target",
            "localhost:8080",
        ])
        .args;
        let err = validate_all(&[&bad]).unwrap_err().to_string();
        for needle in ["--rate", "--batch-size", "add up", "--target"] {
            assert!(err.contains(needle), "{needle} missing in {err}");
        }
    }

    #[test]
    fn the_planned_event_count_is_rate_times_duration_or_events_whichever_is_fewer() {
        let planned = |extra: &[&str]| {
            let mut argv = vec!["x"];
            argv.extend_from_slice(extra);
            planned_events(&Cli::parse_from(argv).args)
        };
        assert_eq!(planned(&[]), Some(3_000), "50/s for 60 s");
        assert_eq!(planned(&["--rate", "2.5", "--duration", "3s"]), Some(8));
        assert_eq!(planned(&["--events", "100"]), Some(100));
        assert_eq!(planned(&["--events", "10000"]), Some(3_000));
        assert_eq!(planned(&["--duration", "0", "--events", "7"]), Some(7));
        assert_eq!(planned(&["--duration", "0"]), None, "until Ctrl-C");
        let bad = Cli::parse_from(["x", "--events", "0"]).args;
        let err = validate_all(&[&bad]).unwrap_err().to_string();
        assert!(err.contains("--events"), "{err}");
    }

    /// A workload of well-formed, in-order, unique events.
    fn plain_workload() -> Workload {
        Workload::new(WorkloadConfig {
            duplicates: 0.0,
            malformed: 0.0,
            late: 0.0,
            out_of_order: 0.0,
            ..WorkloadConfig::default()
        })
    }

    #[test]
    fn a_duplicate_answer_after_an_earlier_attempt_failed_counts_as_accepted() {
        let mut w = plain_workload();
        let batch: Vec<GenEvent> = (0..2).filter_map(|_| w.next()).collect();
        let answer = |status: &str| crate::ingest_client::Answer {
            status: status.into(),
            event_id: String::new(),
            code: None,
            field: None,
            reason: None,
        };
        let shared = Mutex::new(Shared::default());
        let d = Delivery {
            result: Ok(vec![answer("duplicate"), answer("accepted")]),
            attempts: 2,
            latencies: vec![Duration::from_millis(3)],
            earlier_attempt_failed: true,
            abandoned: false,
        };
        assert!(!record(&shared, &batch, d, 0, true, &Progress::hidden()));
        let s = lock(&shared);
        assert_eq!((s.counts.accepted, s.counts.duplicates), (2, 0));
        assert_eq!(s.counts.retries, 1);
        assert_eq!(s.answered.len(), 2);
    }

    #[test]
    fn the_record_lists_answered_events_and_those_without_an_answer() {
        let mut w = plain_workload();
        let batch: Vec<GenEvent> = (0..3).filter_map(|_| w.next()).collect();
        let shared = Mutex::new(Shared::default());
        let answered = Delivery {
            result: Ok(vec![crate::ingest_client::Answer {
                status: "accepted".into(),
                event_id: batch[0].event_id.clone(),
                code: None,
                field: None,
                reason: None,
            }]),
            attempts: 1,
            latencies: vec![],
            earlier_attempt_failed: false,
            abandoned: false,
        };
        record(&shared, &batch[..1], answered, 0, true, &Progress::hidden());
        let lost = Delivery {
            result: Err(SendError::transport(std::io::Error::from(
                std::io::ErrorKind::TimedOut,
            ))),
            attempts: 3,
            latencies: vec![],
            earlier_attempt_failed: true,
            abandoned: false,
        };
        record(&shared, &batch[1..], lost, 0, true, &Progress::hidden());
        let mut s = std::mem::take(&mut *lock(&shared));
        let report = Report {
            summary: Summary::new(1, &s.counts, Duration::from_secs(1)),
            start_ms: 0,
            answered: s.answered.drain(..).map(|(_, a)| a).collect(),
            errors: s.errors,
            unanswered: s.unanswered.into_iter().map(|(_, id, o)| (id, o)).collect(),
        };
        let lines: Vec<Value> = outcomes_ndjson(&report)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[0]["status"], "accepted");
        assert_eq!(lines[0]["event_id"], batch[0].event_id.as_str());
        for (line, e) in lines[1..].iter().zip(&batch[1..]) {
            assert_eq!(line["status"], "failed");
            assert_eq!(line["event_id"], e.event_id.as_str());
        }
    }
}
