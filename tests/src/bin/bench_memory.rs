//! What the processor's state costs per user (issue #15, "Bounded memory"): the part of
//! `scripts/bench.sh memory` that needs no platform. It measures how much this process's
//! resident memory (RSS, /proc/self/statm) grows while folding `--users` users' events
//! into (each kept alive, so freed memory is not reused by the next one)
//!
//! - `Windows` alone (one open tumbling window per user),
//! - `Sessions` alone (one open session per user),
//! - the whole `Engine` (both, plus watermarks and offsets),
//! - a checkpoint of every partition as the run loop builds one each emission interval
//!   (`Engine::checkpoint`: every open session's user and start), and its JSON size,
//! - and, for ingest, its dedup set (`DedupSet`) holding every event's id,
//!
//! each with `--events-per-user` events per user (in one window and one session). RSS
//! includes the allocator's overhead and the transient event strings' reuse, i.e. what a
//! running processor pays. Prints one table, per user and per 100,000 users.
//!
//! `scripts/bench.sh memory` runs it (100,000 users) before the platform run; directly:
//! `cargo run --release -p pulse-tests --bin bench-memory -- --users 100000`. A
//! measurement, not a test: it exits 0 whatever the figures.

use anyhow::{Context as _, Result};
use clap::Parser;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pulse_ingest::dedup::{Claim, DedupSet};
use pulse_processor::engine::Engine;
use pulse_processor::model::{InputEvent, TimeConfig};
use pulse_processor::session::Sessions;
use pulse_processor::window::Windows;

/// Resident bytes of this process (/proc/self/statm: resident pages × 4 KiB).
fn rss() -> Result<i64> {
    let statm = std::fs::read_to_string("/proc/self/statm").context("reading /proc/self/statm")?;
    let pages: i64 = statm
        .split_whitespace()
        .nth(1)
        .context("/proc/self/statm has no resident field")?
        .parse()
        .context("/proc/self/statm's resident field")?;
    Ok(pages * 4096)
}

#[derive(Debug, Parser)]
#[command(
    about = "Heap bytes of the processor's state per user (windows, sessions, engine, checkpoint)"
)]
struct Args {
    /// Distinct users, each with one open window and one open session.
    #[arg(long, default_value_t = 100_000)]
    users: u64,
    /// Events per user (all in the same window and session).
    #[arg(long, default_value_t = 1)]
    events_per_user: u64,
    /// Partitions the users are spread over (as the events topic's).
    #[arg(long, default_value_t = 3)]
    partitions: i32,
}

/// The processor's defaults (README, Configuration).
fn time_config() -> TimeConfig {
    TimeConfig {
        window_ms: 60_000,
        allowed_lateness_ms: 60_000,
        max_out_of_orderness_ms: 5_000,
        idle_timeout_ms: 30_000,
        max_future_skew_ms: 300_000,
        session_gap_ms: 1_800_000,
    }
}

/// Event `k` of user `u`, shaped like loadgen's (ids, pages), all within one minute.
fn event(args: &Args, u: u64, k: u64, t0: i64) -> InputEvent {
    let seq = k * args.users + u;
    let partition = (u % args.partitions.max(1) as u64) as i32;
    InputEvent {
        partition,
        offset: (seq / args.partitions.max(1) as u64) as i64,
        event_id: format!("lg-15-{seq}"),
        user_id: format!("lg-15-u{u:04}"),
        event_type: if k % 3 == 2 { "click" } else { "page_view" }.to_owned(),
        page: format!("/products/p-{:02}", (u + k) % 25 + 1),
        currency: String::new(),
        amount_micros: None,
        event_time_ms: t0 + (k * 1_000) as i64,
        ingest_ms: t0 + (k * 1_000) as i64,
    }
}

fn events(args: &Args, t0: i64) -> impl Iterator<Item = InputEvent> + '_ {
    (0..args.events_per_user).flat_map(move |k| (0..args.users).map(move |u| event(args, u, k, t0)))
}

struct Row {
    what: &'static str,
    bytes: i64,
}

fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(args.users >= 1, "--users must be >= 1");
    anyhow::ensure!(args.events_per_user >= 1, "--events-per-user must be >= 1");
    anyhow::ensure!(args.partitions >= 1, "--partitions must be >= 1");
    let now = pulse_platform::clock::now_ms();
    // The start of a minute a little in the past, so every event lands in one window.
    let t0 = (now / 60_000 - 2) * 60_000;
    let cfg = time_config();
    let mut rows = Vec::new();

    let before = rss()?;
    let mut windows = Windows::new(cfg);
    for e in events(&args, t0) {
        let _ = windows.add(&e, None);
    }
    rows.push(Row {
        what: "Windows (open per-user windows)",
        bytes: rss()? - before,
    });
    let open_windows = windows.open_count();

    let before = rss()?;
    let mut sessions = Sessions::new(cfg);
    for e in events(&args, t0) {
        let _ = sessions.add(&e, None);
    }
    rows.push(Row {
        what: "Sessions (open sessions)",
        bytes: rss()? - before,
    });
    let open_sessions = sessions.open_count();

    let before = rss()?;
    let mut engine = Engine::new(cfg);
    for p in 0..args.partitions {
        engine.assign(p, now);
    }
    for e in events(&args, t0) {
        let _ = engine.process(&e, now);
    }
    rows.push(Row {
        what: "Engine (windows + sessions + watermarks)",
        bytes: rss()? - before,
    });

    let before = rss()?;
    let checkpoints: Vec<_> = (0..args.partitions)
        .filter_map(|p| engine.checkpoint(p))
        .collect();
    rows.push(Row {
        what: "Checkpoints of every partition (one emission)",
        bytes: rss()? - before,
    });
    let json_bytes: usize = checkpoints
        .iter()
        .map(|cp| serde_json::to_vec(cp).map_or(0, |v| v.len()))
        .sum();

    // Ingest's dedup set with room for every id: one confirmed id per user's event.
    let before = rss()?;
    let dedup = Arc::new(DedupSet::new(
        (args.users * args.events_per_user) as usize,
        Duration::from_secs(600),
    ));
    let at = Instant::now();
    for e in events(&args, t0) {
        if let Claim::New(r) = dedup.claim(&e.event_id, at) {
            r.confirm();
        }
    }
    let dedup_bytes = rss()? - before;
    let ids = dedup.len();

    let users = args.users as f64;
    println!(
        "processor state: {} users, {} event(s) each, {} partitions; {open_windows} open windows, {open_sessions} open sessions",
        args.users, args.events_per_user, args.partitions
    );
    println!(
        "{:<48} {:>14} {:>18}",
        "structure", "bytes / user", "MiB / 100k users"
    );
    let per = |b: i64| {
        (
            b as f64 / users,
            b as f64 / users * 100_000.0 / (1024.0 * 1024.0),
        )
    };
    for r in &rows {
        let (u, m) = per(r.bytes);
        println!("{:<48} {u:>14.0} {m:>18.1}", r.what);
    }
    let (u, m) = per(json_bytes as i64);
    println!(
        "{:<48} {u:>14.0} {m:>18.1}",
        "checkpoint JSON, all partitions (written)"
    );
    let per_id = dedup_bytes as f64 / ids.max(1) as f64;
    println!(
        "{:<48} {per_id:>14.0} {:>18.1}   (per id: {ids} ids)",
        "ingest DedupSet",
        per_id * 100_000.0 / (1024.0 * 1024.0)
    );
    // Kept alive until here, so no measurement reused another's freed memory.
    drop((windows, sessions, engine, checkpoints, dedup));
    Ok(())
}
