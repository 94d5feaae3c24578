//! Writer throughput benchmark, in two parts, each beside a baseline measured in the same run:
//!
//! 1. **Parquet encoding** (no I/O): `--events` generated events, framed as on the topic,
//!    are decoded and encoded into Parquet by `pulse_storage::archive` in rolls of
//!    `--roll-rows` (the sink's work per record, minus the upload), beside a baseline that
//!    only unframes and prost-decodes the same records (run first and last; the mean is the
//!    baseline). The ratio shows what archiving costs relative to decoding.
//! 2. **ClickHouse inserts**: `--insert-rows` event rows inserted with the `clickhouse` crate
//!    (RowBinary over HTTP, `pulse_storage::rows::EventRow`, exactly as the ClickHouse sink
//!    does) beside `clickhouse-client` (ClickHouse's own client, native protocol) inserting
//!    the same rows as TabSeparated into an identical table (`CREATE TABLE … AS events`).
//!    Both sides insert in batches of `--insert-batch` rows (the client: one process per
//!    batch) from data prepared in memory beforehand, each into a fresh table, in the order
//!    crate, client, crate, client; each side's rate is the mean of its two runs. Row
//!    counts are checked afterwards. Goal: crate ÷ client >= 0.8.
//!
//! Run it with `scripts/bench.sh writer`, which starts a ClickHouse server on free ports and
//! passes `--clickhouse-url` and `--clickhouse-tcp-port`. It is a measurement, not a test:
//! it exits 0 whatever the ratios.

use std::io::Write as _;
use std::process::{Command, Stdio};
use std::time::Instant;

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use prost::Message as _;
use pulse_contracts::pb::events::v1 as ev;
use pulse_contracts::wire;
use pulse_platform::clickhouse::ClickHouseConfig;
use pulse_storage::archive::{self, ArchiveRow};
use pulse_storage::rows::EventRow;

#[derive(Debug, Parser)]
#[command(
    name = "bench-writer",
    about = "Writer rows/s: Parquet encoding beside prost decoding, ClickHouse inserts beside clickhouse-client."
)]
struct Args {
    /// Events decoded and encoded in the Parquet part.
    #[arg(long, default_value_t = 300_000)]
    events: usize,
    /// Rows per Parquet object (the sink's --parquet-max-rows default).
    #[arg(long, default_value_t = 100_000)]
    roll_rows: usize,
    /// ClickHouse HTTP URL (the crate's endpoint).
    #[arg(long, env = "PULSE_BENCH_CLICKHOUSE_URL")]
    clickhouse_url: String,
    /// ClickHouse native-protocol port on the same host (clickhouse-client's endpoint).
    #[arg(long, env = "PULSE_BENCH_CLICKHOUSE_TCP_PORT", default_value_t = 9000)]
    clickhouse_tcp_port: u16,
    /// The client binary; `clickhouse` (the combined binary) is run as `clickhouse client`.
    #[arg(
        long,
        env = "PULSE_BENCH_CLICKHOUSE_CLIENT",
        default_value = "clickhouse-client"
    )]
    clickhouse_client: String,
    /// Rows inserted by each side per run.
    #[arg(long, default_value_t = 200_000)]
    insert_rows: usize,
    /// Rows per INSERT statement, both sides.
    #[arg(long, default_value_t = 100_000)]
    insert_batch: usize,
    /// Skip the ClickHouse part.
    #[arg(long)]
    no_clickhouse: bool,
    /// Also write the figures as JSON to this file (`scripts/bench.sh all` reads it).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// A small deterministic generator (xorshift), so every run measures the same data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const PAGES: &[&str] = &[
    "/",
    "/pricing",
    "/docs/getting-started",
    "/blog/launch",
    "/checkout",
];
const TYPES: &[&str] = &["page_view", "page_view", "page_view", "click", "purchase"];
/// 2025-11-25T00:00:00Z.
const T0: i64 = 1_764_028_800_000;

fn event(rng: &mut Rng, i: usize) -> ev::Event {
    let ty = TYPES[rng.below(TYPES.len() as u64) as usize];
    let purchase = ty == "purchase";
    let user = rng.below(5_000);
    let time = T0 + i as i64 * 20 + rng.below(1_000) as i64;
    let properties = (0..rng.below(4))
        .map(|k| (format!("prop{k}"), format!("value-{}", rng.below(100))))
        .collect();
    ev::Event {
        event_id: format!("{:032x}", rng.next() as u128 * 31 + i as u128),
        schema_version: 1,
        event_type: ty.into(),
        key: Some(ev::EventKey {
            user_id: format!("user-{user}"),
            session_id: format!("s-{user}-{}", i / 1_000),
        }),
        payload: Some(ev::Payload {
            page: PAGES[rng.below(PAGES.len() as u64) as usize].into(),
            referrer: if rng.below(2) == 0 {
                "https://www.example.com/search?q=pulse".into()
            } else {
                String::new()
            },
            currency: if purchase {
                "EUR".into()
            } else {
                String::new()
            },
            amount_micros: purchase.then(|| rng.below(500_000_000) as i64),
            properties,
        }),
        metadata: Some(ev::Metadata {
            event_timestamp_ms: time,
            trace_id: String::new(),
            source: "web".into(),
        }),
        ingest: Some(ev::IngestInfo {
            ingest_timestamp_ms: time + 40,
            ingest_source: "bench".into(),
            protocol: "http".into(),
        }),
    }
}

fn events(n: usize) -> Vec<ev::Event> {
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    (0..n).map(|i| event(&mut rng, i)).collect()
}

fn rate(rows: usize, secs: f64) -> f64 {
    rows as f64 / secs.max(1e-9)
}

/// Unframes and decodes every record; returns seconds.
fn decode_only(records: &[Vec<u8>]) -> Result<f64> {
    let started = Instant::now();
    let mut check = 0_u64;
    for r in records {
        let f = wire::unframe(r)?;
        let e = ev::Event::decode(f.payload)?;
        check = check.wrapping_add(e.event_id.len() as u64);
    }
    let secs = started.elapsed().as_secs_f64();
    std::hint::black_box(check);
    Ok(secs)
}

/// Unframes, decodes and archives every record in rolls; returns (seconds, Parquet bytes).
fn decode_and_encode(records: &[Vec<u8>], roll_rows: usize) -> Result<(f64, usize)> {
    let started = Instant::now();
    let mut rows: Vec<ArchiveRow> = Vec::with_capacity(roll_rows);
    let mut bytes = 0;
    for (offset, r) in records.iter().enumerate() {
        let f = wire::unframe(r)?;
        let e = ev::Event::decode(f.payload)?;
        rows.push(ArchiveRow::from_event(
            &e,
            f.payload,
            "pulse.events.v1",
            0,
            offset as i64,
            None,
        ));
        if rows.len() >= roll_rows {
            bytes += archive::encode(&rows)?.len();
            rows.clear();
        }
    }
    if !rows.is_empty() {
        bytes += archive::encode(&rows)?.len();
    }
    Ok((started.elapsed().as_secs_f64(), bytes))
}

fn parquet_part(args: &Args) -> Result<serde_json::Value> {
    eprintln!("[bench] generating {} events", args.events);
    let records: Vec<Vec<u8>> = events(args.events)
        .iter()
        .map(|e| wire::frame(1, &[0], &e.encode_to_vec()))
        .collect();
    let record_bytes: usize = records.iter().map(Vec::len).sum();
    // Warm-up (allocator, page faults) on a slice.
    let warm = &records[..records.len().min(20_000)];
    decode_only(warm)?;
    decode_and_encode(warm, args.roll_rows)?;

    let d1 = decode_only(&records)?;
    let (enc, parquet_bytes) = decode_and_encode(&records, args.roll_rows)?;
    let d2 = decode_only(&records)?;
    let n = records.len();
    let base = (rate(n, d1) + rate(n, d2)) / 2.0;
    let archived = rate(n, enc);
    println!();
    println!(
        "Parquet encoding ({n} events, rolls of {} rows, zstd level {}):",
        args.roll_rows,
        archive::ZSTD_LEVEL
    );
    println!("  {:<44} {:>12}", "phase", "rows/s");
    println!(
        "  {:<44} {:>12.0}",
        "baseline: unframe + prost decode (first)",
        rate(n, d1)
    );
    println!(
        "  {:<44} {:>12.0}",
        "archive: decode + ArchiveRow + Parquet encode", archived
    );
    println!(
        "  {:<44} {:>12.0}",
        "baseline: unframe + prost decode (last)",
        rate(n, d2)
    );
    println!(
        "  archive ÷ decode baseline = {:.3}   ({:.1} MB of records → {:.1} MB of Parquet, {:.1}×)",
        archived / base,
        record_bytes as f64 / 1e6,
        parquet_bytes as f64 / 1e6,
        record_bytes as f64 / parquet_bytes.max(1) as f64
    );
    Ok(serde_json::json!({
        "events": n,
        "decode_rows_per_s": [rate(n, d1), rate(n, d2)],
        "archive_rows_per_s": archived,
        "archive_vs_decode": archived / base,
        "record_bytes": record_bytes,
        "parquet_bytes": parquet_bytes,
    }))
}

/// TabSeparated escaping of a string field.
fn tsv_str(out: &mut String, s: &str) {
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\0' => out.push_str("\\0"),
            _ => out.push(c),
        }
    }
}

/// An `Array(String)` in TabSeparated: `['a','b']` with quotes and backslashes escaped.
fn tsv_array(out: &mut String, items: &[String]) {
    out.push('[');
    for (i, s) in items.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push('\'');
        for c in s.chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '\'' => out.push_str("\\'"),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                _ => out.push(c),
            }
        }
        out.push('\'');
    }
    out.push(']');
}

fn date(days: u16) -> Result<String> {
    let d = time::Date::from_julian_day(2_440_588 + i32::from(days))?;
    Ok(format!(
        "{:04}-{:02}-{:02}",
        d.year(),
        u8::from(d.month()),
        d.day()
    ))
}

/// One `events` row as a TabSeparated line, columns in table order.
fn tsv_row(out: &mut String, r: &EventRow) -> Result<()> {
    use std::fmt::Write as _;
    for s in [
        &r.event_id,
        &r.schema_version.to_string(),
        &r.event_type,
        &r.user_id,
        &r.session_id,
        &r.page,
        &r.referrer,
        &r.currency,
    ] {
        tsv_str(out, s);
        out.push('\t');
    }
    write!(out, "{}\t{}\t", r.amount_micros, r.has_amount)?;
    tsv_array(out, &r.property_keys);
    out.push('\t');
    tsv_array(out, &r.property_values);
    write!(out, "\t{}\t{}\t", r.event_time_ms, r.ingest_time_ms)?;
    for s in [&r.trace_id, &r.source, &r.ingest_source] {
        tsv_str(out, s);
        out.push('\t');
    }
    write!(
        out,
        "{}\t{}\t{}\t{}\t",
        r.kafka_partition,
        r.kafka_offset,
        r.written_at_ms,
        date(r.event_date)?
    )?;
    // Added by migration 0002, after every earlier column.
    tsv_str(out, &r.source_trace_id);
    out.push('\n');
    Ok(())
}

async fn insert_crate(
    client: &clickhouse::Client,
    table: &str,
    rows: &[EventRow],
    batch: usize,
) -> Result<f64> {
    let started = Instant::now();
    for chunk in rows.chunks(batch) {
        let mut ins = client.insert::<EventRow>(table).await?;
        for r in chunk {
            ins.write(r).await?;
        }
        ins.end().await?;
    }
    Ok(started.elapsed().as_secs_f64())
}

fn client_command(args: &Args, database: &str, query: &str) -> Command {
    let mut c = if args.clickhouse_client.ends_with("clickhouse") {
        let mut c = Command::new(&args.clickhouse_client);
        c.arg("client");
        c
    } else {
        Command::new(&args.clickhouse_client)
    };
    c.args([
        "--host",
        "127.0.0.1",
        "--port",
        &args.clickhouse_tcp_port.to_string(),
        "--database",
        database,
        "--query",
        query,
    ]);
    c
}

fn insert_client(args: &Args, database: &str, table: &str, batches: &[String]) -> Result<f64> {
    let query = format!("INSERT INTO {table} FORMAT TabSeparated");
    let started = Instant::now();
    for data in batches {
        let mut child = client_command(args, database, &query)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", args.clickhouse_client))?;
        child
            .stdin
            .take()
            .context("client stdin")?
            .write_all(data.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{} failed: {}",
                args.clickhouse_client,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    Ok(started.elapsed().as_secs_f64())
}

async fn clickhouse_part(args: &Args) -> Result<serde_json::Value> {
    let database = format!("bench_writer_{}", uuid::Uuid::new_v4().simple());
    let cfg = ClickHouseConfig {
        url: args.clickhouse_url.clone(),
        database: database.clone(),
        ..ClickHouseConfig::default()
    };
    pulse_storage::migrate::migrate(&cfg)
        .await
        .context("creating the events table")?;
    let result = clickhouse_runs(args, &cfg).await;
    let dropped = cfg
        .server_client()
        .query(&format!("DROP DATABASE {database}"))
        .execute()
        .await;
    if let Err(e) = dropped {
        eprintln!("[bench] dropping {database}: {e}");
    }
    result
}

async fn clickhouse_runs(args: &Args, cfg: &ClickHouseConfig) -> Result<serde_json::Value> {
    let n = args.insert_rows;
    let batch = args.insert_batch.max(1);
    eprintln!("[bench] preparing {n} event rows (RowBinary structs and TabSeparated text)");
    let rows: Vec<EventRow> = events(n)
        .iter()
        .enumerate()
        .map(|(i, e)| EventRow::from_event(e, (i % 3) as i32, i as i64, None, T0 + 60_000))
        .collect();
    let mut batches = Vec::new();
    for chunk in rows.chunks(batch) {
        let mut text = String::with_capacity(chunk.len() * 300);
        for r in chunk {
            tsv_row(&mut text, r)?;
        }
        batches.push(text);
    }
    let tsv_bytes: usize = batches.iter().map(String::len).sum();
    let client = cfg.client();
    let mut crate_secs = Vec::new();
    let mut client_secs = Vec::new();
    // A warm-up insert per side (connections, the client binary in the page cache).
    let warm = &rows[..rows.len().min(1_000)];
    let create = |t: &str| format!("CREATE TABLE {t} AS events");
    client.query(&create("warm_crate")).execute().await?;
    insert_crate(&client, "warm_crate", warm, batch).await?;
    client.query(&create("warm_client")).execute().await?;
    let warm_text = {
        let mut t = String::new();
        for r in warm {
            tsv_row(&mut t, r)?;
        }
        t
    };
    insert_client(args, &cfg.database, "warm_client", &[warm_text])?;

    for run in 1..=2 {
        let t = format!("by_crate_{run}");
        client.query(&create(&t)).execute().await?;
        eprintln!("[bench] crate run {run}");
        crate_secs.push((t.clone(), insert_crate(&client, &t, &rows, batch).await?));
        let t = format!("by_client_{run}");
        client.query(&create(&t)).execute().await?;
        eprintln!("[bench] clickhouse-client run {run}");
        client_secs.push((t.clone(), insert_client(args, &cfg.database, &t, &batches)?));
    }
    for (t, _) in crate_secs.iter().chain(&client_secs) {
        let count: u64 = client
            .query(&format!("SELECT count() FROM {t}"))
            .fetch_one()
            .await?;
        if count != n as u64 {
            bail!("{t} holds {count} rows, expected {n}");
        }
    }
    let mean =
        |v: &[(String, f64)]| v.iter().map(|(_, s)| rate(n, *s)).sum::<f64>() / v.len() as f64;
    let (by_crate, by_client) = (mean(&crate_secs), mean(&client_secs));
    println!();
    println!(
        "ClickHouse inserts ({n} event rows per run, {} per INSERT, every table checked to hold {n} rows):",
        batch
    );
    println!("  {:<52} {:>12}", "phase", "rows/s");
    for ((_, c), (_, k)) in crate_secs.iter().zip(&client_secs) {
        println!(
            "  {:<52} {:>12.0}",
            "clickhouse crate, RowBinary over HTTP (as the sink)",
            rate(n, *c)
        );
        println!(
            "  {:<52} {:>12.0}",
            "clickhouse-client, TabSeparated, native protocol",
            rate(n, *k)
        );
    }
    println!(
        "  crate ÷ clickhouse-client = {:.3} (goal >= 0.8)   (TabSeparated input: {:.1} MB)",
        by_crate / by_client,
        tsv_bytes as f64 / 1e6
    );
    Ok(serde_json::json!({
        "rows": n,
        "insert_batch": batch,
        "crate_rows_per_s": crate_secs.iter().map(|(_, s)| rate(n, *s)).collect::<Vec<_>>(),
        "client_rows_per_s": client_secs.iter().map(|(_, s)| rate(n, *s)).collect::<Vec<_>>(),
        "crate_vs_client": by_crate / by_client,
        "goal_vs_client": 0.8,
    }))
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.events == 0 || args.insert_rows == 0 || args.roll_rows == 0 {
        bail!("--events, --roll-rows and --insert-rows must be at least 1");
    }
    let parquet = parquet_part(&args)?;
    let clickhouse = if args.no_clickhouse {
        serde_json::Value::Null
    } else {
        clickhouse_part(&args).await?
    };
    if let Some(path) = &args.json {
        let out =
            serde_json::json!({"bench": "writer", "parquet": parquet, "clickhouse": clickhouse});
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
