//! Query API latency benchmark: every endpoint's p50/p95 over HTTP beside exactly the SQL it
//! runs sent straight to ClickHouse's HTTP interface, interleaved in the same run.
//!
//! 1. **Seed**: a fresh database (Pulse's schema) gets `--users` users over `--hours` of
//!    1-minute `user_activity` windows ending at the current minute. Each user is active in
//!    about `--active-share` of the minutes, in visits of `--visit-minutes` on average (one
//!    session per visit); a share (`--early-share`) of windows and sessions has an early,
//!    non-final version 1 before the final version 2, the last two minutes are still open,
//!    a few sessions absorbed the user's previous one, and a few windows carry revenue. Rows
//!    go in with the `clickhouse` crate (RowBinary) in chronological INSERTs of
//!    `--insert-batch` rows, as the writer sends them; the benchmark then waits until no
//!    background merge runs and prints the row counts.
//! 2. **Serve** the query API in-process on 127.0.0.1:0 twice: with the default
//!    `--freshness-cache-ms` and with 0 (no cache). Two more instances with a recording
//!    store (`Store::recording`) capture the statements of each request, values bound: one
//!    without cache (every statement of a request) and one whose cache is always warm (the
//!    data statements only, what a request sends on a cache hit). No SQL text is repeated
//!    here.
//! 3. **Measure**: per endpoint, `--warmup` then `--requests` iterations; each iteration
//!    makes, in an order that rotates, one GET to each API instance (the whole body read)
//!    and sends the captured statements straight to ClickHouse as the `clickhouse` crate
//!    does (POST, the SQL as the body, `default_format=RowBinary`, the database and
//!    `max_execution_time` as URL parameters; the whole body read): every statement one
//!    after another (the sum is the baseline of the issue), every statement concurrently,
//!    and the data statements concurrently (how the API sends them).
//!
//! Run it with `scripts/bench.sh query`, which starts a ClickHouse server on free ports and
//! passes `--clickhouse-url`. It is a measurement, not a test: it exits 0 whatever the ratios.

use std::collections::BTreeSet;
use std::sync::{Arc, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use pulse_platform::clickhouse::ClickHouseConfig;
use pulse_query_api::query::{Engine, nearest_rank};
use pulse_query_api::store::{Statement, StatementLog, Store};
use pulse_query_api::{AppState, Config, Servers};
use pulse_storage::rows::{ActivityRow, FreshnessRow, SessionRow, epoch_day};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "bench-query-token";
const MINUTE: i64 = 60_000;
const HOUR: i64 = 60 * MINUTE;

#[derive(Debug, Parser)]
#[command(
    name = "bench-query",
    about = "Query API p50/p95 per endpoint beside the same SQL sent straight to ClickHouse."
)]
struct Args {
    /// ClickHouse HTTP URL.
    #[arg(long, env = "PULSE_BENCH_CLICKHOUSE_URL")]
    clickhouse_url: String,
    /// Users seeded.
    #[arg(long, default_value_t = 2_000)]
    users: u32,
    /// Hours of 1-minute windows seeded, ending at the current minute.
    #[arg(long, default_value_t = 24)]
    hours: u32,
    /// Share of the minutes in which a user is active (0..1].
    #[arg(long, default_value_t = 0.05)]
    active_share: f64,
    /// Mean length of a visit (one session), minutes.
    #[arg(long, default_value_t = 8)]
    visit_minutes: u32,
    /// Share of windows and sessions with an early version before the final one [0..1].
    #[arg(long, default_value_t = 0.3)]
    early_share: f64,
    /// Rows per INSERT.
    #[arg(long, default_value_t = 50_000)]
    insert_batch: usize,
    /// Measured iterations per endpoint.
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Unmeasured iterations per endpoint before them.
    #[arg(long, default_value_t = 20)]
    warmup: usize,
    /// Keep the database afterwards (its name is printed).
    #[arg(long)]
    keep_database: bool,
    /// Also write every endpoint's figures as JSON to this file (`scripts/bench.sh all`
    /// reads it).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

// ---------------------------------------------------------------------------------------
// Seed data

/// A small deterministic generator (xorshift), so every run seeds the same shape.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1_u64 << 53) as f64
    }
}

const CURRENCIES: [&str; 3] = ["EUR", "GBP", "USD"];
const PAGE_COUNT: u64 = 60;

/// A page, skewed towards the first ones (a few pages get most views).
fn page(rng: &mut Rng) -> String {
    let i = (rng.unit().powi(3) * PAGE_COUNT as f64) as u64;
    match i {
        0 => "/".into(),
        1 => "/pricing".into(),
        2 => "/checkout".into(),
        n => format!("/docs/page-{n:02}"),
    }
}

#[derive(Default)]
struct Seed {
    activity: Vec<ActivityRow>,
    sessions: Vec<SessionRow>,
    freshness: Vec<FreshnessRow>,
    windows: usize,
    early_windows: usize,
    open_windows: usize,
    session_count: usize,
    early_sessions: usize,
    merged_sessions: usize,
}

/// The session of one visit, filled in while its windows are generated.
struct Visit {
    first_ms: i64,
    last_ms: i64,
    pages: u64,
    events: u64,
}

/// One window's final (or, when still open, only) row and, maybe, its early version.
fn window(rng: &mut Rng, args: &Args, user: &str, start: i64, t_end: i64, seed: &mut Seed) {
    let mut by_page: Vec<(String, u64)> = Vec::new();
    for _ in 0..1 + rng.below(3) {
        let p = page(rng);
        let views = 1 + rng.below(2);
        match by_page.iter_mut().find(|(q, _)| *q == p) {
            Some((_, v)) => *v += views,
            None => by_page.push((p, views)),
        }
    }
    by_page.sort();
    let views: u64 = by_page.iter().map(|(_, v)| v).sum();
    let clicks = rng.below(3);
    let purchase = rng.below(25) == 0;
    let mut types = vec![("click", clicks), ("page_view", views)];
    let mut revenue = Vec::new();
    if purchase {
        types.push(("purchase", 1));
        let currency = CURRENCIES[rng.below(CURRENCIES.len() as u64) as usize];
        revenue.push((
            currency.to_owned(),
            1_000_000 + rng.below(199_000_000) as i64,
        ));
    }
    types.retain(|(_, n)| *n > 0);
    let events = types.iter().map(|(_, n)| n).sum::<u64>();
    let first = start + rng.below(20_000) as i64;
    let last = first + rng.below(39_000) as i64;
    let open = start + MINUTE > t_end - 2 * MINUTE;
    let early = !open && rng.unit() < args.early_share;
    let row = ActivityRow {
        user_id: user.to_owned(),
        window_start_ms: start,
        window_end_ms: start + MINUTE,
        page_views: views,
        pages: by_page.iter().map(|(p, _)| p.clone()).collect(),
        page_views_by_page: by_page.iter().map(|(_, v)| *v).collect(),
        types: types.iter().map(|(t, _)| (*t).to_owned()).collect(),
        events_by_type: types.iter().map(|(_, n)| *n).collect(),
        revenue_currencies: revenue.iter().map(|(c, _)| c.clone()).collect(),
        revenue_micros: revenue.iter().map(|(_, a)| *a).collect(),
        event_count: events,
        first_event_ms: first,
        last_event_ms: last,
        version: if early { 2 } else { 1 },
        is_final: u8::from(!open),
        last_ingest_ms: last + 40,
        // Final rows are written once the allowed lateness (60 s) passed the window end.
        written_at_ms: if open {
            last + 1_000
        } else {
            start + 2 * MINUTE + rng.below(2_000) as i64
        },
        window_date: epoch_day(start),
        rules_version: String::new(),
    };
    if early {
        let mid = first + (last - first) / 2;
        seed.activity.push(ActivityRow {
            page_views: row.page_views.div_ceil(2),
            page_views_by_page: row
                .page_views_by_page
                .iter()
                .map(|v| v.div_ceil(2))
                .collect(),
            events_by_type: row.events_by_type.iter().map(|n| n.div_ceil(2)).collect(),
            event_count: row.event_count.div_ceil(2),
            last_event_ms: mid,
            version: 1,
            is_final: 0,
            last_ingest_ms: mid + 40,
            written_at_ms: mid + 1_000,
            ..row.clone()
        });
        seed.early_windows += 1;
    }
    seed.windows += 1;
    seed.open_windows += usize::from(open);
    seed.activity.push(row);
}

/// The visits of one user: disjoint minute ranges covering about `--active-share` of the
/// minutes (0.5× to 1.5× per user).
fn visits(rng: &mut Rng, args: &Args, minutes: i64) -> Vec<(i64, i64)> {
    let target = (args.active_share * minutes as f64 * (0.5 + rng.unit())).max(1.0) as i64;
    let mean = i64::from(args.visit_minutes.max(1));
    let mut taken = BTreeSet::new();
    let mut visits = Vec::new();
    let mut covered = 0;
    let mut attempts = 0;
    while covered < target && attempts < 1_000 {
        attempts += 1;
        let len = 1 + rng.below((2 * mean - 1) as u64) as i64;
        let start = rng.below(minutes as u64) as i64;
        let end = (start + len).min(minutes);
        // A gap of at least one idle minute between visits (else they are one session).
        if (start - 1..end + 1).any(|m| taken.contains(&m)) {
            continue;
        }
        taken.extend(start..end);
        covered += end - start;
        visits.push((start, end));
    }
    visits.sort_unstable();
    visits
}

fn generate(args: &Args, t_end: i64) -> Seed {
    let mut rng = Rng(0x5EED_0F0E_57AB_1E01);
    let minutes = i64::from(args.hours) * 60;
    let t_start = t_end - minutes * MINUTE;
    let mut seed = Seed::default();
    for u in 0..args.users {
        let user = format!("user-{u:05}");
        let mut previous: Option<String> = None;
        for (from, to) in visits(&mut rng, args, minutes) {
            let mut visit = Visit {
                first_ms: i64::MAX,
                last_ms: 0,
                pages: 0,
                events: 0,
            };
            for m in from..to {
                let at = seed.activity.len();
                window(
                    &mut rng,
                    args,
                    &user,
                    t_start + m * MINUTE,
                    t_end,
                    &mut seed,
                );
                if let Some(w) = seed.activity[at..].last() {
                    visit.first_ms = visit.first_ms.min(w.first_event_ms);
                    visit.last_ms = visit.last_ms.max(w.last_event_ms);
                    visit.pages += w.page_views;
                    visit.events += w.event_count;
                }
            }
            let id = format!("{user}-{}", visit.first_ms);
            // A session is final 30 minutes (the inactivity gap) after its last event.
            let open = visit.last_ms + 30 * MINUTE > t_end;
            let early = !open && rng.unit() < args.early_share;
            let merged = match &previous {
                Some(p) if rng.below(50) == 0 => vec![p.clone()],
                _ => Vec::new(),
            };
            let duration = visit.last_ms - visit.first_ms;
            let row = SessionRow {
                session_id: id.clone(),
                user_id: user.clone(),
                start_ms: visit.first_ms,
                end_ms: visit.last_ms,
                duration_ms: duration,
                page_count: visit.pages,
                event_count: visit.events,
                version: if early { 2 } else { 1 },
                is_final: u8::from(!open),
                last_ingest_ms: visit.last_ms + 40,
                merged_session_ids: merged,
                written_at_ms: if open {
                    visit.last_ms + 1_000
                } else {
                    visit.last_ms + 30 * MINUTE + 1_000
                },
                start_date: epoch_day(visit.first_ms),
                rules_version: String::new(),
            };
            if early {
                seed.sessions.push(SessionRow {
                    end_ms: visit.first_ms + duration / 2,
                    duration_ms: duration / 2,
                    page_count: visit.pages.div_ceil(2),
                    event_count: visit.events.div_ceil(2),
                    version: 1,
                    is_final: 0,
                    merged_session_ids: Vec::new(),
                    written_at_ms: visit.first_ms + duration / 2 + 1_000,
                    ..row.clone()
                });
                seed.early_sessions += 1;
            }
            seed.merged_sessions += usize::from(!row.merged_session_ids.is_empty());
            seed.session_count += 1;
            seed.sessions.push(row);
            previous = Some(id);
        }
    }
    for stage in ["writer-clickhouse", "writer-parquet"] {
        for partition in 0..6 {
            for k in 0..3_i64 {
                let event = t_end - (2 - k) * MINUTE - rng.below(5_000) as i64;
                seed.freshness.push(FreshnessRow {
                    stage: stage.into(),
                    kafka_partition: partition,
                    last_event_time_ms: event,
                    last_ingest_ms: event + 40,
                    written_at_ms: event + 1_000 + k,
                });
            }
        }
    }
    // The writer inserts in the order the rows were produced.
    seed.activity.sort_by_key(|r| r.written_at_ms);
    seed.sessions.sort_by_key(|r| r.written_at_ms);
    seed
}

async fn insert<R>(client: &clickhouse::Client, table: &str, rows: &[R], batch: usize) -> Result<()>
where
    R: clickhouse::RowOwned + clickhouse::RowWrite,
{
    for chunk in rows.chunks(batch.max(1)) {
        let mut ins = client.insert::<R>(table).await?;
        for r in chunk {
            ins.write(r).await?;
        }
        ins.end()
            .await
            .with_context(|| format!("inserting into {table}"))?;
    }
    Ok(())
}

/// Waits (up to 5 minutes) until no merge of `database` ran in five polls in a row, so
/// background merges do not land in one side's samples.
async fn settle(cfg: &ClickHouseConfig) -> Result<()> {
    let client = cfg.server_client();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut quiet = 0;
    while quiet < 5 {
        let running: u64 = client
            .query("SELECT toUInt64(count()) FROM system.merges WHERE database = ?")
            .bind(&cfg.database)
            .fetch_one()
            .await?;
        quiet = if running == 0 { quiet + 1 } else { 0 };
        if Instant::now() > deadline {
            eprintln!("[bench] merges still running after 5 minutes; measuring anyway");
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

async fn seed_database(args: &Args, cfg: &ClickHouseConfig, t_end: i64) -> Result<()> {
    eprintln!("[bench] generating the seed");
    let seed = generate(args, t_end);
    let client = cfg.client();
    let started = Instant::now();
    let batch = args.insert_batch;
    insert(&client, "user_activity", &seed.activity, batch).await?;
    insert(&client, "sessions", &seed.sessions, batch).await?;
    insert(&client, "freshness", &seed.freshness, batch).await?;
    let inserted = started.elapsed();
    eprintln!("[bench] waiting until no background merge runs");
    settle(cfg).await?;
    let mut now = Vec::new();
    for table in ["user_activity", "sessions", "freshness"] {
        let (rows, parts): (u64, u64) = client
            .query(
                "SELECT toUInt64(sum(rows)), toUInt64(count()) FROM system.parts \
                 WHERE database = ? AND table = ? AND active",
            )
            .bind(&cfg.database)
            .bind(table)
            .fetch_one()
            .await?;
        now.push(format!("{table} {rows} rows in {parts} parts"));
    }
    let minutes = u64::from(args.hours) * 60;
    println!();
    println!(
        "Seed ({} users × {} h of 1-minute windows, database {}):",
        args.users, args.hours, cfg.database
    );
    println!(
        "  user_activity: {} rows inserted = {} windows ({:.1} % of user-minutes; {} still open) + {} early versions",
        seed.activity.len(),
        seed.windows,
        100.0 * seed.windows as f64 / (u64::from(args.users) * minutes).max(1) as f64,
        seed.open_windows,
        seed.early_windows
    );
    println!(
        "  sessions:      {} rows inserted = {} sessions (mean {:.1} windows; {} absorbed the previous one) + {} early versions",
        seed.sessions.len(),
        seed.session_count,
        seed.windows as f64 / seed.session_count.max(1) as f64,
        seed.merged_sessions,
        seed.early_sessions
    );
    println!("  freshness:     {} rows inserted", seed.freshness.len());
    println!(
        "  inserted in {:.1} s in INSERTs of up to {} rows; after merges settled: {}",
        inserted.as_secs_f64(),
        batch,
        now.join(", ")
    );
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The API instances

fn config(cfg: &ClickHouseConfig, cache_ms: Option<u64>) -> Config {
    let mut args = vec![
        "pulse-query-api".to_owned(),
        "--clickhouse-url".into(),
        cfg.url.clone(),
        "--clickhouse-database".into(),
        cfg.database.clone(),
    ];
    if let Some(ms) = cache_ms {
        args.extend(["--freshness-cache-ms".into(), ms.to_string()]);
    }
    // As if from PULSE_QUERY_API_TOKENS (a secret is never a flag).
    Config {
        api_tokens: TOKEN.into(),
        ..Config::parse_from(args)
    }
}

async fn serve(state: AppState, stop: &CancellationToken) -> Result<(String, Servers)> {
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let servers = pulse_query_api::serve(http, grpc, state, stop.child_token()).await?;
    Ok((format!("http://{}", servers.http_addr), servers))
}

/// An instance whose store records the statements it sends.
struct Capture {
    base: String,
    log: StatementLog,
}

async fn capture_instance(
    config: &Config,
    freshness_ttl: Duration,
    stop: &CancellationToken,
    servers: &mut Vec<Servers>,
) -> Result<Capture> {
    let log = StatementLog::default();
    let store = Store::new(&config.clickhouse, config.query_timeout()).recording(log.clone());
    let state = AppState {
        engine: Arc::new(Engine::new(store, freshness_ttl, config.limits())),
        tokens: Arc::new(config.token_store().map_err(anyhow::Error::msg)?),
    };
    let (base, s) = serve(state, stop).await?;
    servers.push(s);
    Ok(Capture { base, log })
}

/// GET `path` with the token; the whole body is read. Fails unless 200.
async fn get(http: &reqwest::Client, base: &str, path: &str) -> Result<(Duration, usize)> {
    let started = Instant::now();
    let resp = http
        .get(format!("{base}{path}"))
        .header("authorization", format!("Bearer {TOKEN}"))
        .send()
        .await?;
    let status = resp.status();
    let body = resp.bytes().await?;
    let took = started.elapsed();
    if !status.is_success() {
        bail!("GET {path}: {status}: {}", String::from_utf8_lossy(&body));
    }
    Ok((took, body.len()))
}

impl Capture {
    /// The statements one request for `path` sends.
    async fn statements(&self, http: &reqwest::Client, path: &str) -> Result<Vec<Statement>> {
        self.log
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
        get(http, &self.base, path).await?;
        Ok(std::mem::take(
            &mut *self.log.lock().unwrap_or_else(PoisonError::into_inner),
        ))
    }
}

// ---------------------------------------------------------------------------------------
// Straight to ClickHouse

/// ClickHouse's HTTP interface, called as the `clickhouse` crate calls it for the store.
#[derive(Clone)]
struct Direct {
    http: reqwest::Client,
    url: String,
    user: String,
    password: String,
}

impl Direct {
    fn new(config: &Config) -> Result<Self> {
        // The store's client: its database, RowBinary (validation off) and the timeout.
        let timeout = config.query_timeout();
        let secs = (timeout.as_secs() + u64::from(timeout.subsec_nanos() > 0)).max(1);
        let mut url = reqwest::Url::parse(&config.clickhouse.url)?;
        url.query_pairs_mut()
            .clear()
            .append_pair("default_format", "RowBinary")
            .append_pair("database", &config.clickhouse.database)
            .append_pair("max_execution_time", &secs.to_string());
        Ok(Self {
            http: reqwest::Client::new(),
            url: url.into(),
            user: config.clickhouse.user.clone(),
            password: config.clickhouse.password.expose().to_owned(),
        })
    }

    /// Sends one statement; the whole RowBinary body is read. Fails unless 200.
    async fn send(&self, sql: String) -> Result<usize> {
        let resp = self
            .http
            .post(&self.url)
            .header("X-ClickHouse-User", &self.user)
            .header("X-ClickHouse-Key", &self.password)
            .body(sql)
            .send()
            .await?;
        let status = resp.status();
        let body = resp.bytes().await?;
        if !status.is_success() {
            bail!("ClickHouse: {status}: {}", String::from_utf8_lossy(&body));
        }
        Ok(body.len())
    }

    /// Sends the statements one after another: the sum of their times, the bytes read.
    async fn one_by_one(&self, statements: &[Statement]) -> Result<(Duration, usize)> {
        let mut total = Duration::ZERO;
        let mut bytes = 0;
        for s in statements {
            let sql = s.sql.clone();
            let started = Instant::now();
            bytes += self.send(sql).await?;
            total += started.elapsed();
        }
        Ok((total, bytes))
    }

    /// Sends the statements concurrently: the time until the last answer was read.
    async fn concurrently(&self, statements: &[Statement]) -> Result<Duration> {
        let sqls: Vec<String> = statements.iter().map(|s| s.sql.clone()).collect();
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for sql in sqls {
            let me = self.clone();
            tasks.spawn(async move { me.send(sql).await });
        }
        while let Some(done) = tasks.join_next().await {
            done??;
        }
        Ok(started.elapsed())
    }
}

// ---------------------------------------------------------------------------------------
// Measuring

struct Endpoint {
    label: &'static str,
    path: String,
}

fn endpoints(t_end: i64, user: &str) -> Vec<Endpoint> {
    let hour = format!("from={}&to={t_end}", t_end - HOUR);
    let day = format!("from={}&to={t_end}", t_end - 24 * HOUR);
    let e = |label, path: String| Endpoint { label, path };
    // The endpoints relative to now first, while the seed's last minutes are recent.
    vec![
        e("active_users/current 5m", "/v1/active_users/current".into()),
        e("revenue_last_hour", "/v1/revenue_last_hour".into()),
        e(
            "active_users 1h step 1m",
            format!("/v1/active_users?{hour}&step=1m"),
        ),
        e(
            "active_users 24h step 15m",
            format!("/v1/active_users?{day}&step=15m"),
        ),
        e("revenue 1h step 1m", format!("/v1/revenue?{hour}&step=1m")),
        e("top_pages 1h", format!("/v1/top_pages?{hour}")),
        e("top_pages 24h", format!("/v1/top_pages?{day}")),
        e("users/{id} 24h", format!("/v1/users/{user}?{day}")),
        e("sessions 1h", format!("/v1/sessions?{hour}")),
        e("freshness", "/v1/freshness".into()),
    ]
}

/// Microseconds of each sample of one series.
#[derive(Default)]
struct Series(Vec<i64>);

impl Series {
    fn push(&mut self, d: Duration) {
        self.0
            .push(i64::try_from(d.as_micros()).unwrap_or(i64::MAX));
    }
    /// p50 and p95 in ms (nearest rank, as the API's session percentiles).
    fn p50_p95(&self) -> (f64, f64) {
        let mut v = self.0.clone();
        v.sort_unstable();
        let ms = |pct| nearest_rank(&v, pct).unwrap_or(0) as f64 / 1000.0;
        (ms(50), ms(95))
    }
}

#[derive(Default)]
struct Samples {
    api_cached: Series,
    api_uncached: Series,
    one_by_one: Series,
    all_concurrently: Series,
    data_concurrently: Series,
}

struct Measured {
    label: &'static str,
    all: Vec<&'static str>,
    data: Vec<&'static str>,
    json_bytes: usize,
    rowbinary_bytes: usize,
    samples: Samples,
}

struct Bench {
    http: reqwest::Client,
    cached: String,
    uncached: String,
    every: Capture,
    data_only: Capture,
    direct: Direct,
}

impl Bench {
    async fn measure(&self, e: &Endpoint, args: &Args) -> Result<Measured> {
        let all = self.every.statements(&self.http, &e.path).await?;
        // The first request fills the recording instance's cache; the second sends only
        // the data statements.
        self.data_only.statements(&self.http, &e.path).await?;
        let data = self.data_only.statements(&self.http, &e.path).await?;
        if data.is_empty() || data.len() >= all.len() {
            bail!(
                "{}: captured {} data and {} statements in all",
                e.label,
                data.len(),
                all.len()
            );
        }
        let mut s = Samples::default();
        let (mut json_bytes, mut rowbinary_bytes) = (0, 0);
        for i in 0..args.warmup + args.requests {
            let measured = i >= args.warmup;
            for k in 0..5 {
                match (i + k) % 5 {
                    0 => {
                        let (d, n) = get(&self.http, &self.cached, &e.path).await?;
                        json_bytes = n;
                        if measured {
                            s.api_cached.push(d);
                        }
                    }
                    1 => {
                        let (d, _) = get(&self.http, &self.uncached, &e.path).await?;
                        if measured {
                            s.api_uncached.push(d);
                        }
                    }
                    2 => {
                        let (d, n) = self.direct.one_by_one(&all).await?;
                        rowbinary_bytes = n;
                        if measured {
                            s.one_by_one.push(d);
                        }
                    }
                    3 => {
                        let d = self.direct.concurrently(&all).await?;
                        if measured {
                            s.all_concurrently.push(d);
                        }
                    }
                    _ => {
                        let d = self.direct.concurrently(&data).await?;
                        if measured {
                            s.data_concurrently.push(d);
                        }
                    }
                }
            }
        }
        Ok(Measured {
            label: e.label,
            all: all.iter().map(|s| s.name).collect(),
            data: data.iter().map(|s| s.name).collect(),
            json_bytes,
            rowbinary_bytes,
            samples: s,
        })
    }
}

fn ratio(api: f64, direct: f64) -> f64 {
    api / direct.max(1e-9)
}

/// The rows of one endpoint: (API config, baseline, API series, baseline series).
fn rows<'a>(m: &'a Measured, cache: &str) -> [(String, String, &'a Series, &'a Series); 4] {
    let (a, d) = (m.all.len(), m.data.len());
    let s = &m.samples;
    [
        (
            cache.to_owned(),
            format!("all {a}, one by one"),
            &s.api_cached,
            &s.one_by_one,
        ),
        (
            cache.to_owned(),
            format!("data {d}, as the API sends"),
            &s.api_cached,
            &s.data_concurrently,
        ),
        (
            "no cache".to_owned(),
            format!("all {a}, one by one"),
            &s.api_uncached,
            &s.one_by_one,
        ),
        (
            "no cache".to_owned(),
            format!("all {a}, as the API sends"),
            &s.api_uncached,
            &s.all_concurrently,
        ),
    ]
}

fn report(results: &[Measured], cache_ms: u64, args: &Args) {
    let cache = format!("cache {cache_ms} ms");
    println!();
    println!(
        "Query API latency, {} measured iterations per endpoint after {} warm-up; one iteration = one GET to each API instance and the captured statements sent straight to ClickHouse three ways, in rotating order:",
        args.requests, args.warmup
    );
    println!(
        "  statements per request: data | freshness (on a freshness cache hit only the data statements are sent):"
    );
    for m in results {
        let fresh: Vec<&str> = {
            let mut rest = m.all.clone();
            for d in &m.data {
                if let Some(i) = rest.iter().position(|n| n == d) {
                    rest.remove(i);
                }
            }
            rest
        };
        println!(
            "    {:<26} {} | {}   (answer {} B of JSON; {} B of RowBinary for all statements)",
            m.label,
            m.data.join(" + "),
            fresh.join(" + "),
            m.json_bytes,
            m.rowbinary_bytes
        );
    }
    println!();
    println!(
        "  {:<26} {:<13} {:<28} {:>8} {:>8} {:>10} {:>10} {:>9} {:>9}",
        "endpoint",
        "API",
        "direct: same SQL",
        "API p50",
        "API p95",
        "direct p50",
        "direct p95",
        "ratio p50",
        "ratio p95"
    );
    for m in results {
        for (i, (api, base, a, d)) in rows(m, &cache).into_iter().enumerate() {
            let (a50, a95) = a.p50_p95();
            let (d50, d95) = d.p50_p95();
            println!(
                "  {:<26} {:<13} {:<28} {:>8.2} {:>8.2} {:>10.2} {:>10.2} {:>9.2} {:>9.2}",
                if i == 0 { m.label } else { "" },
                api,
                base,
                a50,
                a95,
                d50,
                d95,
                ratio(a50, d50),
                ratio(a95, d95)
            );
        }
    }
    println!("  (ms; ratio = API ÷ direct)");
    println!();
    let n = results.len();
    let count = |row: usize, f: &dyn Fn(f64, f64) -> bool| {
        results
            .iter()
            .filter(|m| {
                let (_, _, a, d) = &rows(m, &cache)[row];
                let ((a50, a95), (d50, d95)) = (a.p50_p95(), d.p50_p95());
                f(ratio(a50, d50), ratio(a95, d95))
            })
            .count()
    };
    let span = |row: usize| {
        let r: Vec<f64> = results
            .iter()
            .map(|m| {
                let (_, _, a, d) = &rows(m, &cache)[row];
                ratio(a.p50_p95().0, d.p50_p95().0)
            })
            .collect();
        let lo = r.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = r.iter().copied().fold(0.0, f64::max);
        format!("{lo:.2}..{hi:.2}")
    };
    println!(
        "  goal ratio <= 1.2 (API with its default {cache} vs all its statements one by one): met at p50 on {}/{n} endpoints, at p95 on {}/{n}",
        count(0, &|r50, _| r50 <= 1.2),
        count(0, &|_, r95| r95 <= 1.2)
    );
    println!(
        "  the freshness cache: with it the API's p50 is below that baseline on {}/{n} endpoints (a cache hit skips the freshness statements the baseline always sends; at most one refresh per {cache_ms} ms)",
        count(0, &|r50, _| r50 < 1.0)
    );
    println!(
        "  API overhead alone (HTTP, auth, parameters, RowBinary decoding, JSON): p50 ratio {} with the cache vs its data statements, {} without the cache vs all statements sent concurrently as the API sends them",
        span(1),
        span(3)
    );
}

// ---------------------------------------------------------------------------------------

async fn run(args: &Args, cfg: &ClickHouseConfig, stop: &CancellationToken) -> Result<()> {
    let now = i64::try_from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis())?;
    let t_end = now - now.rem_euclid(MINUTE);
    seed_database(args, cfg, t_end).await?;

    let default = config(cfg, None);
    let no_cache = config(cfg, Some(0));
    let mut servers = Vec::new();
    let (cached, s) = serve(AppState::new(&default)?, stop).await?;
    servers.push(s);
    let (uncached, s) = serve(AppState::new(&no_cache)?, stop).await?;
    servers.push(s);
    let every = capture_instance(&no_cache, Duration::ZERO, stop, &mut servers).await?;
    let always_warm = Duration::from_secs(24 * 3600);
    let data_only = capture_instance(&no_cache, always_warm, stop, &mut servers).await?;
    let bench = Bench {
        http: reqwest::Client::new(),
        cached,
        uncached,
        every,
        data_only,
        direct: Direct::new(&default)?,
    };
    let user = format!("user-{:05}", args.users / 2);
    let mut results = Vec::new();
    for e in endpoints(t_end, &user) {
        eprintln!("[bench] {}", e.label);
        results.push(bench.measure(&e, args).await?);
    }
    report(&results, default.freshness_cache_ms, args);
    if let Some(path) = &args.json {
        let cache = format!("cache {} ms", default.freshness_cache_ms);
        let endpoints: Vec<serde_json::Value> = results
            .iter()
            .map(|m| {
                let rows: Vec<serde_json::Value> = rows(m, &cache)
                    .iter()
                    .map(|(api, base, a, d)| {
                        let ((a50, a95), (d50, d95)) = (a.p50_p95(), d.p50_p95());
                        serde_json::json!({
                            "api": api, "baseline": base,
                            "api_p50_ms": a50, "api_p95_ms": a95,
                            "direct_p50_ms": d50, "direct_p95_ms": d95,
                            "ratio_p50": ratio(a50, d50), "ratio_p95": ratio(a95, d95),
                        })
                    })
                    .collect();
                serde_json::json!({"endpoint": m.label, "rows": rows})
            })
            .collect();
        let out = serde_json::json!({
            "bench": "query",
            "requests": args.requests,
            "users": args.users,
            "hours": args.hours,
            "endpoints": endpoints,
            "goal_ratio": 1.2,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    stop.cancel();
    for s in servers {
        s.wait().await?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.users == 0 || args.hours == 0 || args.visit_minutes == 0 || args.requests == 0 {
        bail!("--users, --hours, --visit-minutes and --requests must be at least 1");
    }
    let share = |f: f64| (0.0..=1.0).contains(&f);
    if !(args.active_share > 0.0 && share(args.active_share) && share(args.early_share)) {
        bail!("--active-share must be in (0, 1] and --early-share in [0, 1]");
    }
    let cfg = ClickHouseConfig {
        url: args.clickhouse_url.clone(),
        database: format!("bench_query_{}", uuid::Uuid::new_v4().simple()),
        ..ClickHouseConfig::default()
    };
    pulse_storage::migrate::migrate(&cfg)
        .await
        .context("creating the schema")?;
    let stop = CancellationToken::new();
    let result = run(&args, &cfg, &stop).await;
    stop.cancel();
    if args.keep_database {
        eprintln!("[bench] kept database {}", cfg.database);
    } else {
        let dropped = cfg
            .server_client()
            .query(&format!("DROP DATABASE {}", cfg.database))
            .execute()
            .await;
        if let Err(e) = dropped {
            eprintln!("[bench] dropping {}: {e}", cfg.database);
        }
    }
    result
}
