//! `pulsectl ledger watch`: the continuous reconciliation. A long-running process with the
//! platform's admin server (`/metrics`, `/livez`, `/readyz`) that, every `--interval`,
//! reads what the topics got since the last look and reconciles each window that has
//! become closed since, once, in event-time order, exporting the `pulse_ledger_*` metrics
//! (`ledger::metrics`). A range whose sources cannot be read is counted as an error and
//! tried again at the next interval; nothing is skipped.

use std::net::SocketAddr;
use std::time::Duration;

use pulse_platform::config::{Problems, Validate, validate_all};
use pulse_platform::service::ServiceContext;
use pulse_platform::telemetry::TelemetryConfig;
use tokio::net::TcpListener;

use super::metrics as m;
use super::sources::{Sources, now_ms};
use super::{LedgerError, SourceArgs};

/// Service name: metrics label, log field.
pub const SERVICE: &str = "ledger";

#[derive(Debug, Clone, clap::Args)]
pub struct WatchArgs {
    /// Address of the admin server (/metrics, /livez, /readyz).
    #[arg(
        long = "admin-addr",
        env = "PULSE_ADMIN_ADDR",
        default_value = "127.0.0.1:9107"
    )]
    pub admin_addr: SocketAddr,
    /// How often newly closed windows are looked for.
    #[arg(long = "interval", env = "PULSE_LEDGER_INTERVAL", default_value = "15s", value_parser = humantime::parse_duration)]
    pub interval: Duration,
    /// At start, reconcile the closed windows of this much event time before now.
    #[arg(long = "lookback", env = "PULSE_LEDGER_LOOKBACK", default_value = "10m", value_parser = humantime::parse_duration)]
    pub lookback: Duration,
    /// Currencies with a `currency` label of their own on the revenue metrics; others
    /// are `other` (labels stay bounded).
    #[arg(
        long = "currencies",
        env = "PULSE_LEDGER_CURRENCIES",
        value_delimiter = ',',
        default_value = "USD,EUR,GBP,JPY,CHF,CAD,AUD"
    )]
    pub currencies: Vec<String>,
    #[command(flatten)]
    pub sources: SourceArgs,
    /// The admin server's TLS (`--admin-tls-*`) and limits, as every service's.
    #[command(flatten)]
    pub admin_server: pulse_platform::server::AdminServerArgs,
    #[command(flatten)]
    pub telemetry: TelemetryConfig,
}

impl Validate for WatchArgs {
    fn validate(&self, p: &mut Problems) {
        p.check(
            self.interval >= Duration::from_millis(100),
            "--interval / PULSE_LEDGER_INTERVAL",
            "must be at least 100ms",
        );
        p.check(
            self.currencies
                .iter()
                .all(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase())),
            "--currencies / PULSE_LEDGER_CURRENCIES",
            format!(
                "must be ISO 4217 codes (three uppercase letters), got {:?}",
                self.currencies
            ),
        );
        self.sources.validate(p);
        self.admin_server.validate(p);
        self.telemetry.validate(p);
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The binary's `ledger watch`: telemetry, admin server, signals, then [`watch`] until
/// a signal. A reload of the admin server's certificate is audited (`keys.tls.reload`,
/// service `ledger`) to `--audit-topic`, by a producer made when one happens.
pub async fn run(args: WatchArgs, audit: &crate::audit::AuditArgs) -> Result<(), LedgerError> {
    // A long-running process like the services: glibc's allocator tuned the same way
    // (re-executes the process; returns on failure).
    let untuned = pulse_platform::malloc::tune();
    validate_all(&[&args])?;
    let _telemetry = pulse_platform::telemetry::init(SERVICE, &args.telemetry)
        .map_err(|e| LedgerError::Admin(std::io::Error::other(e.to_string())))?;
    if let Some(reason) = untuned {
        tracing::warn!(%reason, "glibc's allocator runs with its defaults");
    }
    let listener = TcpListener::bind(args.admin_addr).await.map_err(|e| {
        LedgerError::Admin(std::io::Error::new(
            e.kind(),
            format!("binding {}: {e}", args.admin_addr),
        ))
    })?;
    let settings = pulse_platform::server::AdminSettingsArgs::admin_settings(&args.admin_server)
        .map_err(|e| LedgerError::Admin(std::io::Error::other(e.to_string())))?;
    let (ctx, admin) = pulse_platform::service::start_with(SERVICE, listener, settings)?;
    // After the metrics recorder is installed, so the audit metrics are exported at zero.
    pulse_platform::audit::set_process_log(
        SERVICE,
        pulse_platform::audit::AuditLog::on_demand(
            &args.sources.kafka,
            "pulse-ledger-audit",
            &audit.audit_topic,
        ),
    );
    ctx.shutdown.install_signal_handlers()?;
    let result = watch(&args, &ctx).await;
    admin.stop().await;
    result
}

/// Reconciles every newly closed window until shutdown. Ready once the sources are open.
pub async fn watch(args: &WatchArgs, ctx: &ServiceContext) -> Result<(), LedgerError> {
    validate_all(&[args])?;
    m::describe();
    m::init(&args.currencies);
    let window = args.sources.window_ms();
    let mut next = now_ms()
        .saturating_sub(ms(args.lookback))
        .div_euclid(window)
        * window;
    // Everything before the look-back counts as reconciled and closed: a ledger that
    // makes no progress from here on (its sources cannot be opened, or it never reconciles)
    // shows as a growing age of these gauges.
    m::set_horizon(next);
    let mut sources = loop {
        match Sources::open(&args.sources, next, i64::MAX).await {
            Ok(s) => break s,
            Err(e) => {
                metrics::counter!(m::RUNS_TOTAL, "result" => "error").increment(1);
                ctx.health.block("ledger", e.to_string());
                tracing::warn!(error = %e, "ledger: opening the sources failed; retrying");
                if pause(ctx, args.interval).await {
                    return Ok(());
                }
            }
        }
    };
    sources.bound_memory();
    ctx.health.unblock("ledger");
    ctx.health.set_ready(true);
    tracing::info!(from = %crate::rfc3339(next), window_ms = window, "ledger: reconciling closed windows");
    // Records of the first read that precede the look-back are not counted as unchecked.
    let mut outside: Option<u64> = None;
    loop {
        if let Err(e) = step(args, &mut sources, &mut next, &mut outside).await {
            metrics::counter!(m::RUNS_TOTAL, "result" => "error").increment(1);
            tracing::warn!(error = %e, window = %crate::rfc3339(next), "ledger: a source could not be read; retrying at the next interval");
        }
        if pause(ctx, args.interval).await {
            return Ok(());
        }
    }
}

/// Sleeps `d`; true when shutdown started first.
async fn pause(ctx: &ServiceContext, d: Duration) -> bool {
    tokio::select! {
        () = ctx.shutdown.cancelled() => true,
        () = tokio::time::sleep(d) => false,
    }
}

/// One look: catch up on the topics, then reconcile each newly closed window.
async fn step(
    args: &WatchArgs,
    sources: &mut Sources,
    next: &mut i64,
    outside: &mut Option<u64>,
) -> Result<(), LedgerError> {
    let window = args.sources.window_ms();
    sources.catch_up().await?;
    m::set_held(sources.held());
    let now_outside = sources.book.outside;
    if let Some(before) = outside.replace(now_outside) {
        metrics::counter!(m::UNCHECKED_TOTAL).increment(now_outside.saturating_sub(before));
    }
    let horizon = sources.closed_horizon(*next, now_ms()).await?;
    let Some(until) = horizon.closed_until() else {
        return Ok(());
    };
    #[allow(clippy::cast_precision_loss)]
    metrics::gauge!(m::CLOSED).set(until as f64 / 1000.0);
    if next.saturating_add(window) > until {
        return Ok(());
    }
    while next.saturating_add(window) <= until {
        let (from, to) = (*next, *next + window);
        let report = sources.reconcile(from, to).await?;
        m::record(&report, &args.currencies);
        if report.is_mismatch() {
            tracing::warn!(
                from = %crate::rfc3339(from),
                to = %crate::rfc3339(to),
                summary = %report.mismatch_summary(),
                "ledger mismatch"
            );
            for line in report.lines(args.sources.max_ids) {
                tracing::warn!("{line}");
            }
        } else {
            tracing::debug!(from = %crate::rfc3339(from), "ledger: window reconciled");
        }
        *next = to;
        if sources.forget_before(to) {
            // The deferred windows' events are read again before the next is reconciled.
            sources.catch_up().await?;
        }
        m::set_held(sources.held());
    }
    Ok(())
}
