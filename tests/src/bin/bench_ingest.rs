//! Ingest throughput benchmark: drives the HTTP and gRPC paths of an in-process ingest
//! with batches and compares the events/s with a raw rdkafka producer that sends the same
//! records (protobuf, framed, keyed, with ingest's headers) to the same broker and topic in
//! the same run. A raw run comes first, then `--rounds` times HTTP, gRPC and raw again; each
//! HTTP and gRPC phase is compared with the mean of the raw runs just before and after its
//! round (the broker's speed drifts within a run), and the median of a transport's ratios
//! is its figure (goal >= 0.8). Each request's latency gives p50/p99.
//!
//! Every phase uses `--concurrency` tasks that each send one batch of `--batch` events and
//! wait for its answer (for raw: every broker acknowledgement) before sending the next, so
//! the raw producer sees the same request shape as ingest's producer. Event ids are unique
//! across all phases, so nothing is deduplicated.
//!
//! Run it with `scripts/bench.sh ingest`, which starts a broker; this binary only needs
//! `--brokers`. It is a measurement, not a test: it exits 0 whatever the ratio.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use prost::Message as _;
use pulse_contracts::headers;
use pulse_contracts::pb::events::v1 as ev;
use pulse_contracts::pb::ingest::v1::SendEventsRequest;
use pulse_contracts::pb::ingest::v1::ingest_service_client::IngestServiceClient;
use pulse_ingest::pii::PiiPolicy;
use pulse_ingest::pipeline::{FixedSchemaId, Framer};
use pulse_platform::kafka::{KafkaProducer, OutRecord, RecordProducer, TopicSpec, ensure_topics};
use serde_json::{Value, json};
use tonic::transport::Channel;

const API_KEY: &str = "bench-key";
const SOURCE: &str = "bench";
const HMAC_KEY: &str = "bench";
const SCHEMA_ID: u32 = 1;
/// Distinct batch templates per transport (event ids are patched in per request).
const TEMPLATES: usize = 16;
const USERS: usize = 20;

#[derive(Debug, Parser)]
#[command(
    name = "bench-ingest",
    about = "Ingest HTTP/gRPC events/s and latency beside a raw rdkafka producer."
)]
struct Args {
    /// Bootstrap brokers (host:port,…) of the broker to measure against.
    #[arg(long, env = "PULSE_BENCH_KAFKA_BROKERS")]
    brokers: String,
    /// Measured seconds per phase.
    #[arg(long, default_value_t = 10)]
    duration_secs: u64,
    /// Events per request (and per raw batch).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Concurrent senders per phase.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Unmeasured seconds before each phase's window.
    #[arg(long, default_value_t = 2)]
    warmup_secs: u64,
    /// Producer linger of both ingest's producer and the raw one.
    #[arg(long, default_value_t = 5)]
    linger_ms: u32,
    /// Partitions of the benchmark's topics.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// Rounds of HTTP, gRPC and raw phases after the first raw phase.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// The broker's process id: each phase then also prints the share of a core the broker
    /// used, to show whether it was the limit (`scripts/bench.sh` passes it).
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Also write every phase's figures and the medians as JSON to this file
    /// (`scripts/bench.sh all` reads it).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// Process mode: run THIS `pulse-ingest` binary as its own process (with its default
    /// topics, framing through `--registry-url`) and measure events per CPU-second of that
    /// process alone, per format (`--formats`), beside the floor (the same events' parse +
    /// validate + PII + encode + frame in a tight loop in this process). No raw phases.
    /// `scripts/bench.sh ingest --process` starts the registry and passes both.
    #[arg(long, env = "PULSE_BENCH_INGEST_BIN")]
    ingest_bin: Option<std::path::PathBuf>,
    /// Process mode: the schema registry the ingest process frames with (Pulse's schemas
    /// registered).
    #[arg(long, env = "PULSE_BENCH_REGISTRY_URL")]
    registry_url: Option<String>,
    /// Process mode: the phases of each round, in order (json = a JSON array body, ndjson,
    /// gzip = the JSON array gzipped, grpc = SendEvents).
    #[arg(long, value_delimiter = ',', default_value = "json,ndjson,gzip,grpc")]
    formats: Vec<String>,
    /// Process mode: seconds of the in-process floor loop.
    #[arg(long, default_value_t = 3)]
    floor_secs: u64,
    /// Process mode: where the ingest process's stdout and stderr go (default: a file in
    /// the temporary folder, printed).
    #[arg(long)]
    ingest_log: Option<std::path::PathBuf>,
    /// Process mode: an extra argument for the ingest process (repeat it).
    #[arg(long = "ingest-arg", allow_hyphen_values = true)]
    ingest_args: Vec<String>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or_default()
}

/// Bytes with fixed-width event ids at known offsets, so a template is rendered with
/// fresh ids by copying it and overwriting the ids (no re-serialisation per request).
#[derive(Debug, Clone)]
struct Patchable {
    bytes: Vec<u8>,
    offsets: Vec<usize>,
}

impl Patchable {
    /// `bytes` must contain each of `placeholders` exactly once.
    fn new(bytes: Vec<u8>, placeholders: &[String]) -> Result<Self> {
        let mut offsets = Vec::with_capacity(placeholders.len());
        for p in placeholders {
            let p = p.as_bytes();
            let mut hits = bytes
                .windows(p.len())
                .enumerate()
                .filter(|(_, w)| *w == p)
                .map(|(i, _)| i);
            match (hits.next(), hits.next()) {
                (Some(i), None) => offsets.push(i),
                _ => bail!(
                    "placeholder {} is not in the template exactly once",
                    String::from_utf8_lossy(p)
                ),
            }
        }
        Ok(Self { bytes, offsets })
    }

    fn render(&self, ids: &[String]) -> Vec<u8> {
        let mut out = self.bytes.clone();
        for (off, id) in self.offsets.iter().zip(ids) {
            out[*off..*off + id.len()].copy_from_slice(id.as_bytes());
        }
        out
    }
}

/// Unique, fixed-width event ids for the whole run.
#[derive(Debug)]
struct Ids {
    run: u32,
    next: AtomicU64,
}

impl Ids {
    fn id(run: u32, n: u64) -> String {
        format!("bench-{run:08x}-{n:012}")
    }

    fn placeholder(n: u64) -> String {
        // Same width as `id`.
        format!("tmplt-ffffffff-{n:012}")
    }

    fn take(&self, count: usize) -> Vec<String> {
        let start = self.next.fetch_add(count as u64, Ordering::Relaxed);
        (start..start + count as u64)
            .map(|n| Self::id(self.run, n))
            .collect()
    }
}

/// One record of the raw baseline: what ingest would produce for the same event.
#[derive(Debug, Clone)]
struct RawRecord {
    key: Vec<u8>,
    value: Patchable,
}

/// The same logical events in the three forms the phases send.
#[derive(Debug)]
struct Templates {
    json: Vec<Patchable>,
    /// The same events as NDJSON (one object per line).
    ndjson: Vec<Patchable>,
    pb: Vec<Vec<ev::Event>>,
    raw: Vec<Vec<RawRecord>>,
}

/// A small deterministic generator (no need for cryptographic randomness).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
        items[(self.next() % items.len() as u64) as usize]
    }
}

/// A realistic event as clients send it: ~75 % page views, the rest purchases.
fn json_event(rng: &mut Rng, id: &str, ts: i64) -> Value {
    let user = format!("user-{:02}", rng.next() % USERS as u64);
    let session = format!("s-{user}-{}", rng.next() % 4);
    let ip = format!("203.0.113.{}", rng.next() % 250 + 1);
    let plan = rng.pick(&["free", "pro", "team"]);
    if rng.next().is_multiple_of(4) {
        let amount = format!("{}.{:02}", rng.next() % 500 + 1, rng.next() % 100);
        json!({
            "event_id": id,
            "schema_version": 1,
            "event_type": "purchase",
            "key": { "user_id": user, "session_id": session },
            "payload": {
                "page": "/checkout",
                "currency": rng.pick(&["EUR", "USD", "GBP"]),
                "amount": amount,
                "properties": { "ip": ip, "plan": plan }
            },
            "metadata": { "event_timestamp": ts, "source": "web" }
        })
    } else {
        json!({
            "event_id": id,
            "schema_version": 1,
            "event_type": "page_view",
            "key": { "user_id": user, "session_id": session },
            "payload": {
                "page": rng.pick(&["/", "/pricing", "/docs/getting-started", "/blog/launch", "/cart"]),
                "referrer": rng.pick(&["https://www.example.com/", "https://search.example.org/?q=pulse", ""]),
                "properties": { "ip": ip, "plan": plan }
            },
            "metadata": { "event_timestamp": ts, "source": "web" }
        })
    }
}

impl Templates {
    /// Builds `TEMPLATES` batches of `batch` events. The protobuf forms come from ingest's
    /// own validation, so HTTP, gRPC and raw carry the same events; the raw records are
    /// additionally enriched and PII-filtered as ingest does before producing.
    fn build(batch: usize) -> Result<Self> {
        let limits = pulse_ingest::validate::Limits::default();
        let pii = PiiPolicy::parse(PiiPolicy::DEFAULT_SPEC, HMAC_KEY.as_bytes())
            .map_err(anyhow::Error::msg)?;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let ts = now_ms();
        let mut out = Self {
            json: Vec::new(),
            ndjson: Vec::new(),
            pb: Vec::new(),
            raw: Vec::new(),
        };
        let mut n = 0u64;
        for _ in 0..TEMPLATES {
            let mut placeholders = Vec::with_capacity(batch);
            let mut events = Vec::with_capacity(batch);
            let mut pbs = Vec::with_capacity(batch);
            let mut raws = Vec::with_capacity(batch);
            for _ in 0..batch {
                let ph = Ids::placeholder(n);
                n += 1;
                let event = json_event(&mut rng, &ph, ts);
                let bytes = serde_json::to_vec(&event)?;
                let mut pb = pulse_ingest::validate::validate(&bytes, ts, &limits)
                    .map_err(|e| anyhow::anyhow!("generated event is invalid: {e}"))?;
                pbs.push(pb.clone());
                pb.ingest = Some(ev::IngestInfo {
                    ingest_timestamp_ms: ts,
                    ingest_source: SOURCE.into(),
                    protocol: "http".into(),
                });
                pii.apply(&mut pb);
                let key = pb
                    .key
                    .as_ref()
                    .map(|k| k.user_id.as_bytes().to_vec())
                    .unwrap_or_default();
                let value = pulse_contracts::wire::frame(SCHEMA_ID, &[0], &pb.encode_to_vec());
                raws.push(RawRecord {
                    key,
                    value: Patchable::new(value, std::slice::from_ref(&ph))?,
                });
                events.push(event);
                placeholders.push(ph);
            }
            let mut ndjson = Vec::new();
            for e in &events {
                serde_json::to_writer(&mut ndjson, e)?;
                ndjson.push(b'\n');
            }
            out.ndjson.push(Patchable::new(ndjson, &placeholders)?);
            out.json.push(Patchable::new(
                serde_json::to_vec(&Value::Array(events))?,
                &placeholders,
            )?);
            out.pb.push(pbs);
            out.raw.push(raws);
        }
        Ok(out)
    }
}

/// A W3C traceparent, fresh per request (ingest copies the caller's onto each record).
fn traceparent(seq: u64) -> String {
    format!(
        "00-{}-{:016x}-01",
        uuid::Uuid::new_v4().simple(),
        seq | 1 << 63
    )
}

/// What a phase sends to.
enum Target {
    Raw {
        producer: KafkaProducer,
        topic: String,
    },
    Http {
        client: reqwest::Client,
        url: String,
        /// NDJSON instead of a JSON array.
        ndjson: bool,
        /// The body gzipped (`Content-Encoding: gzip`).
        gzip: bool,
    },
    Grpc {
        clients: Vec<IngestServiceClient<Channel>>,
    },
}

/// One request's outcome: events accepted, or why it failed.
type Outcome = std::result::Result<u64, String>;

impl Target {
    async fn send(&self, t: &Templates, worker: usize, seq: u64, ids: &Ids) -> Outcome {
        let tmpl = (seq as usize) % TEMPLATES;
        let tp = traceparent(seq);
        match self {
            Target::Raw { producer, topic } => {
                let records = &t.raw[tmpl];
                let ids = ids.take(records.len());
                let now = now_ms().to_string();
                // The headers of ingest's records: trace context, event id, ingest time.
                let trace = pulse_tests::ingest_trace_headers(&tp);
                let mut pending = Vec::with_capacity(records.len());
                let mut failure = None;
                for (r, id) in records.iter().zip(&ids) {
                    let mut h = headers::with_str(trace.clone(), headers::EVENT_ID, id);
                    h = headers::with_str(h, headers::INGEST_TS, &now);
                    let rec = OutRecord::new(
                        topic.as_str(),
                        Some(r.key.clone()),
                        r.value.render(std::slice::from_ref(id)),
                    )
                    .with_headers(h);
                    match enqueue(producer, rec).await {
                        Ok(ack) => pending.push(ack),
                        Err(e) => {
                            failure = Some(e);
                            break;
                        }
                    }
                }
                let mut acked = 0;
                for ack in pending {
                    match ack.await {
                        Ok(_) => acked += 1,
                        Err(e) => failure = failure.or(Some(e.to_string())),
                    }
                }
                match failure {
                    Some(e) => Err(format!("raw produce: {e}")),
                    None => Ok(acked),
                }
            }
            Target::Http {
                client,
                url,
                ndjson,
                gzip,
            } => {
                let body_t = if *ndjson {
                    &t.ndjson[tmpl]
                } else {
                    &t.json[tmpl]
                };
                let n = body_t.offsets.len();
                let mut body = body_t.render(&ids.take(n));
                let mut req = client
                    .post(url)
                    .header(
                        "content-type",
                        if *ndjson {
                            "application/x-ndjson"
                        } else {
                            "application/json"
                        },
                    )
                    .header("x-api-key", API_KEY)
                    .header("traceparent", &tp);
                if *gzip {
                    use std::io::Write as _;
                    let mut gz = flate2::write::GzEncoder::new(
                        Vec::with_capacity(body.len() / 4),
                        flate2::Compression::fast(),
                    );
                    gz.write_all(&body).map_err(|e| format!("gzip: {e}"))?;
                    body = gz.finish().map_err(|e| format!("gzip: {e}"))?;
                    req = req.header("content-encoding", "gzip");
                }
                let resp = req
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| format!("http: {e}"))?;
                let status = resp.status();
                let text = resp.text().await.map_err(|e| format!("http body: {e}"))?;
                if status != reqwest::StatusCode::OK {
                    return Err(format!("http {status}: {}", truncate(&text)));
                }
                let v: Value =
                    serde_json::from_str(&text).map_err(|e| format!("http response: {e}"))?;
                let accepted = v["accepted"].as_u64().unwrap_or(0);
                if accepted != n as u64 {
                    return Err(format!(
                        "http 200 but {accepted} of {n} accepted: {}",
                        truncate(&text)
                    ));
                }
                Ok(accepted)
            }
            Target::Grpc { clients } => {
                let events = &t.pb[tmpl];
                let n = events.len();
                let events = events
                    .iter()
                    .zip(ids.take(n))
                    .map(|(e, id)| ev::Event {
                        event_id: id,
                        ..e.clone()
                    })
                    .collect();
                let mut req = tonic::Request::new(SendEventsRequest { events });
                let md = req.metadata_mut();
                md.insert(
                    "x-api-key",
                    tonic::metadata::MetadataValue::from_static(API_KEY),
                );
                if let Ok(v) = tp.parse() {
                    md.insert("traceparent", v);
                }
                let mut client = clients[worker % clients.len()].clone();
                let resp = client
                    .send_events(req)
                    .await
                    .map_err(|s| format!("grpc {:?}: {}", s.code(), truncate(s.message())))?
                    .into_inner();
                if resp.accepted as usize != n {
                    return Err(format!(
                        "grpc ok but {} of {n} accepted ({} duplicates, {} rejected)",
                        resp.accepted, resp.duplicates, resp.rejected
                    ));
                }
                Ok(u64::from(resp.accepted))
            }
        }
    }
}

/// Queues a record like ingest does: waits up to 100 ms for room in a full queue.
async fn enqueue(
    producer: &KafkaProducer,
    rec: OutRecord,
) -> std::result::Result<pulse_platform::kafka::AckFuture, String> {
    let deadline = Instant::now() + Duration::from_millis(100);
    let mut pause = Duration::from_millis(1);
    loop {
        match producer.enqueue(rec.clone()) {
            Ok(ack) => return Ok(ack),
            Err(pulse_platform::kafka::ProduceError::QueueFull) if Instant::now() < deadline => {
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(50));
            }
            Err(e) => return Err(e.to_string()),
        }
    }
}

fn truncate(s: &str) -> String {
    s.chars().take(300).collect()
}

#[derive(Debug)]
struct PhaseStats {
    name: &'static str,
    events: u64,
    requests: u64,
    errors: u64,
    error_samples: Vec<String>,
    elapsed: Duration,
    latencies: Vec<Duration>,
    /// The broker's CPU use during the measured window, in % of one core (NaN unknown).
    broker_busy: f64,
    /// CPU seconds the measured ingest process used in the window (process mode; NaN
    /// otherwise).
    ingest_cpu: f64,
}

impl PhaseStats {
    /// Events per CPU-second of the measured ingest process (NaN unknown).
    fn per_cpu_second(&self) -> f64 {
        if self.ingest_cpu > 0.0 {
            self.events as f64 / self.ingest_cpu
        } else {
            f64::NAN
        }
    }

    fn rate(&self) -> f64 {
        let secs = self.elapsed.as_secs_f64();
        if secs > 0.0 {
            self.events as f64 / secs
        } else {
            0.0
        }
    }

    /// Nearest-rank percentile in ms.
    fn percentile_ms(&self, q: f64) -> f64 {
        if self.latencies.is_empty() {
            return f64::NAN;
        }
        let rank =
            ((q * self.latencies.len() as f64).ceil() as usize).clamp(1, self.latencies.len());
        self.latencies[rank - 1].as_secs_f64() * 1e3
    }
}

#[derive(Default)]
struct WorkerStats {
    events: u64,
    requests: u64,
    errors: u64,
    error_samples: Vec<String>,
    latencies: Vec<Duration>,
    last_done: Option<Instant>,
}

/// Runs one phase: warmup, then the measured window. A request counts when it started
/// inside the window; the window ends when the last counted request completed.
async fn run_phase(
    name: &'static str,
    target: Arc<Target>,
    templates: Arc<Templates>,
    ids: Arc<Ids>,
    args: &Args,
    ingest_pid: Option<u32>,
) -> Result<PhaseStats> {
    let start = Instant::now();
    let measure_from = start + Duration::from_secs(args.warmup_secs);
    let end = measure_from + Duration::from_secs(args.duration_secs);
    let seq = Arc::new(AtomicU64::new(0));
    let broker = args.broker_pid;
    let broker_from = tokio::spawn(async move {
        tokio::time::sleep_until(measure_from.into()).await;
        let ingest = ingest_pid.map_or(f64::NAN, |p| pulse_tests::cpu_seconds(Some(p)));
        (Instant::now(), pulse_tests::cpu_seconds(broker), ingest)
    });
    let mut tasks = Vec::with_capacity(args.concurrency);
    for worker in 0..args.concurrency {
        let (target, templates, ids, seq) =
            (target.clone(), templates.clone(), ids.clone(), seq.clone());
        tasks.push(tokio::spawn(async move {
            let mut s = WorkerStats::default();
            loop {
                let began = Instant::now();
                if began >= end {
                    break;
                }
                let n = seq.fetch_add(1, Ordering::Relaxed);
                let outcome = target.send(&templates, worker, n, &ids).await;
                let done = Instant::now();
                if began < measure_from {
                    if let Err(e) = outcome {
                        // Warmup errors are reported but not counted.
                        if s.error_samples.len() < 3 {
                            s.error_samples.push(format!("(warmup) {e}"));
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                    continue;
                }
                s.requests += 1;
                s.last_done = Some(done);
                match outcome {
                    Ok(n) => {
                        s.events += n;
                        s.latencies.push(done - began);
                    }
                    Err(e) => {
                        s.errors += 1;
                        if s.error_samples.len() < 3 {
                            s.error_samples.push(e);
                        }
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                }
            }
            s
        }));
    }
    let mut stats = PhaseStats {
        name,
        events: 0,
        requests: 0,
        errors: 0,
        error_samples: Vec::new(),
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
        broker_busy: f64::NAN,
        ingest_cpu: f64::NAN,
    };
    let mut last_done = end;
    for t in tasks {
        let s = t
            .await
            .with_context(|| format!("{name}: a sender task failed"))?;
        stats.events += s.events;
        stats.requests += s.requests;
        stats.errors += s.errors;
        stats.error_samples.extend(s.error_samples);
        stats.latencies.extend(s.latencies);
        if let Some(d) = s.last_done {
            last_done = last_done.max(d);
        }
    }
    let (t0, cpu0, ingest0) = broker_from
        .await
        .with_context(|| format!("{name}: the broker CPU sampler failed"))?;
    if let Some(p) = ingest_pid {
        stats.ingest_cpu = pulse_tests::cpu_seconds(Some(p)) - ingest0;
    }
    stats.broker_busy =
        100.0 * (pulse_tests::cpu_seconds(broker) - cpu0) / t0.elapsed().as_secs_f64();
    stats.elapsed = last_done.saturating_duration_since(measure_from);
    stats.latencies.sort_unstable();
    eprintln!(
        "[bench] {name:<11} {:>9.0} events/s  ({} events, {} requests, {} errors in {:.2} s){}",
        stats.rate(),
        stats.events,
        stats.requests,
        stats.errors,
        stats.elapsed.as_secs_f64(),
        if ingest_pid.is_some() {
            format!(
                "; ingest {:.2} CPU-s = {:.0} events per CPU-second",
                stats.ingest_cpu,
                stats.per_cpu_second()
            )
        } else {
            String::new()
        }
    );
    for e in &stats.error_samples {
        eprintln!("[bench]   error: {e}");
    }
    Ok(stats)
}

fn ingest_config(args: &Args, events: &str, dlq: &str) -> pulse_ingest::Config {
    let max_batch = args.batch.max(1000).to_string();
    let cfg = pulse_ingest::Config::parse_from([
        "pulse-ingest",
        "--rate-limit",
        "0",
        "--dedup-capacity",
        "100000000",
        "--max-batch-events",
        &max_batch,
        "--max-body-bytes",
        &(64 * 1024 * 1024).to_string(),
        "--max-decompressed-bytes",
        &(64 * 1024 * 1024).to_string(),
        "--kafka-brokers",
        &args.brokers,
        "--kafka-partitions",
        &args.partitions.to_string(),
        "--kafka-linger-ms",
        &args.linger_ms.to_string(),
        "--events-topic",
        events,
        "--dlq-topic",
        dlq,
    ]);
    // As if from PULSE_INGEST_API_KEYS / PULSE_INGEST_PII_HMAC_KEY (never flags).
    pulse_ingest::Config {
        api_keys: format!("{API_KEY}={SOURCE}").into(),
        pii_hmac_key: HMAC_KEY.into(),
        ..cfg
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.batch == 0 || args.concurrency == 0 || args.duration_secs == 0 {
        bail!("--batch, --concurrency and --duration-secs must be >= 1");
    }
    if args.ingest_bin.is_some() {
        return process_mode(&args).await;
    }
    let run = uuid::Uuid::new_v4().simple().to_string();
    let events_topic = format!("bench.events.{run}");
    let dlq_topic = format!("bench.dlq.{run}");
    let cfg = ingest_config(&args, &events_topic, &dlq_topic);
    ensure_topics(
        &cfg.kafka,
        &[
            TopicSpec::new(&events_topic, args.partitions),
            TopicSpec::new(&dlq_topic, args.partitions),
        ],
    )
    .await
    .context("creating the benchmark topics")?;

    let ingest_producer = Arc::new(
        KafkaProducer::new(&cfg.kafka, "pulse-ingest").context("creating ingest's producer")?,
    );
    let framer: Arc<dyn Framer> = Arc::new(FixedSchemaId(SCHEMA_ID));
    let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
    let servers = pulse_ingest::serve(
        &cfg,
        ingest_producer.clone(),
        framer,
        bind().await.context("binding HTTP")?,
        bind().await.context("binding gRPC")?,
    )
    .await
    .context("starting ingest")?;
    let raw_producer =
        KafkaProducer::new(&cfg.kafka, "bench-raw").context("creating the raw producer")?;

    let templates = Arc::new(Templates::build(args.batch)?);
    let ids = Arc::new(Ids {
        run: u32::from_str_radix(&run[..8], 16).unwrap_or_default(),
        next: AtomicU64::new(0),
    });
    let raw = Arc::new(Target::Raw {
        producer: raw_producer.clone(),
        topic: events_topic.clone(),
    });
    let http = Arc::new(Target::Http {
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(args.concurrency)
            .build()
            .context("building the HTTP client")?,
        url: format!("http://{}/v1/events", servers.http_addr),
        ndjson: false,
        gzip: false,
    });
    let grpc_url = format!("http://{}", servers.grpc_addr);
    let mut clients = Vec::with_capacity(args.concurrency);
    for _ in 0..args.concurrency {
        // One connection per sender, like the HTTP client's pool.
        clients.push(
            IngestServiceClient::connect(grpc_url.clone())
                .await
                .context("connecting to ingest's gRPC")?,
        );
    }
    let grpc = Arc::new(Target::Grpc { clients });

    eprintln!(
        "[bench] brokers {}, topic {events_topic} ({} partitions), batch {}, concurrency {}, \
         warmup {} s + {} s per phase, linger {} ms",
        args.brokers,
        args.partitions,
        args.batch,
        args.concurrency,
        args.warmup_secs,
        args.duration_secs,
        args.linger_ms
    );
    let t = &templates;
    let rounds = args.rounds.max(1);
    let mut raws = vec![run_phase("raw", raw.clone(), t.clone(), ids.clone(), &args, None).await?];
    let mut phases: Vec<(PhaseStats, PhaseStats)> = Vec::new();
    for _ in 0..rounds {
        let http_s = run_phase("http", http.clone(), t.clone(), ids.clone(), &args, None).await?;
        let grpc_s = run_phase("grpc", grpc.clone(), t.clone(), ids.clone(), &args, None).await?;
        phases.push((http_s, grpc_s));
        raws.push(run_phase("raw", raw.clone(), t.clone(), ids.clone(), &args, None).await?);
    }

    servers.stop().await.context("stopping ingest")?;
    for p in [ingest_producer.as_ref(), &raw_producer] {
        if let Err(e) = p.flush(Duration::from_secs(10)) {
            eprintln!("[bench] producer flush: {e}");
        }
    }

    let row = |s: &PhaseStats, local: f64| {
        let ratio = if local > 0.0 {
            s.rate() / local
        } else {
            f64::NAN
        };
        println!(
            "{:<12} {:>10.0} {:>8.2} {:>8.2} {:>7.2} {:>7} {:>9.0}",
            s.name,
            s.rate(),
            s.percentile_ms(0.50),
            s.percentile_ms(0.99),
            ratio,
            s.errors,
            s.broker_busy
        );
        ratio
    };
    let overall = raws.iter().map(PhaseStats::rate).sum::<f64>() / raws.len() as f64;
    println!();
    println!(
        "{:<12} {:>10} {:>8} {:>8} {:>7} {:>7} {:>9}",
        "phase", "events/s", "p50 ms", "p99 ms", "vs raw", "errors", "broker %"
    );
    let (mut http_r, mut grpc_r) = (Vec::new(), Vec::new());
    for (i, raw_s) in raws.iter().enumerate() {
        row(raw_s, overall);
        if let Some((h, g)) = phases.get(i) {
            // Each round against the raw runs just before and after it.
            let local = (raw_s.rate() + raws[i + 1].rate()) / 2.0;
            http_r.push(row(h, local));
            grpc_r.push(row(g, local));
        }
    }
    println!();
    println!(
        "vs raw = each phase's events/s / mean of the raw runs before and after its round \
         (raw rows: vs the mean of all raw runs, {overall:.0} events/s)"
    );
    println!(
        "http/raw: {} (goal >= 0.80)",
        pulse_tests::ratio_summary(&http_r)
    );
    println!(
        "grpc/raw: {} (goal >= 0.80)",
        pulse_tests::ratio_summary(&grpc_r)
    );
    println!(
        "batch {} events, concurrency {}, {} s measured per phase after {} s warmup; \
         latency = one request (raw: one batch until every ack)",
        args.batch, args.concurrency, args.duration_secs, args.warmup_secs
    );
    if let Some(path) = &args.json {
        let phase = |s: &PhaseStats, ratio: Option<f64>| {
            json!({
                "phase": s.name,
                "events_per_s": s.rate(),
                "p50_ms": s.percentile_ms(0.50),
                "p99_ms": s.percentile_ms(0.99),
                "errors": s.errors,
                "broker_busy_pct": s.broker_busy,
                "vs_raw": ratio,
            })
        };
        let mut all = Vec::new();
        for (i, raw_s) in raws.iter().enumerate() {
            all.push(phase(raw_s, None));
            if let Some((h, g)) = phases.get(i) {
                all.push(phase(h, http_r.get(i).copied()));
                all.push(phase(g, grpc_r.get(i).copied()));
            }
        }
        let out = json!({
            "bench": "ingest",
            "batch": args.batch,
            "concurrency": args.concurrency,
            "duration_secs": args.duration_secs,
            "rounds": rounds,
            "phases": all,
            "raw_events_per_s_mean": overall,
            "http_vs_raw_median": median(&http_r),
            "grpc_vs_raw_median": median(&grpc_r),
            "goal_vs_raw": 0.8,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// Three distinct free local ports for the child, below the kernel's ephemeral range (from
/// 32768), so no outgoing connection takes one before the child binds it (as
/// `scripts/lib.sh` `free_port` does).
fn free_addrs() -> Result<[std::net::SocketAddr; 3]> {
    let mut held = Vec::with_capacity(3);
    let mut seed = uuid::Uuid::new_v4().as_u128() as u64 | 1;
    for _ in 0..1000 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let port = 20_000 + (seed % 12_000) as u16;
        if let Ok(l) = std::net::TcpListener::bind(("127.0.0.1", port)) {
            held.push(l);
            if held.len() == 3 {
                let addr = |l: &std::net::TcpListener| l.local_addr().context("a free port");
                return Ok([addr(&held[0])?, addr(&held[1])?, addr(&held[2])?]);
            }
        }
    }
    bail!("found no three free ports in 20000..32000")
}

/// The floor: the same JSON batches split, validated, enriched, PII-filtered, encoded and
/// framed in a tight loop on one thread (what ingest cannot do with less CPU); events per
/// CPU-second of that thread.
fn floor(templates: &Templates, secs: u64) -> Result<(u64, f64)> {
    use pulse_ingest::body::{BodyFormat, BodyLimits, split};
    let limits = pulse_ingest::validate::Limits::default();
    let body_limits = BodyLimits {
        max_batch_events: usize::MAX,
        ..BodyLimits::default()
    };
    let pii = PiiPolicy::parse(PiiPolicy::DEFAULT_SPEC, HMAC_KEY.as_bytes())
        .map_err(anyhow::Error::msg)?;
    let bodies: Vec<Vec<u8>> = templates
        .json
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let ids: Vec<String> = (0..t.offsets.len())
                .map(|n| Ids::id(0, (i * t.offsets.len() + n) as u64))
                .collect();
            t.render(&ids)
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(secs);
    let cpu0 = pulse_tests::stat_cpu_seconds("/proc/thread-self/stat");
    let mut events = 0u64;
    let mut bytes = 0usize;
    while Instant::now() < deadline {
        for body in &bodies {
            let now = now_ms();
            for e in split(body, BodyFormat::Json, &body_limits)? {
                let mut pb = pulse_ingest::validate::validate(&e, now, &limits)
                    .map_err(|e| anyhow::anyhow!("floor: invalid event: {e}"))?;
                pb.ingest = Some(ev::IngestInfo {
                    ingest_timestamp_ms: now,
                    ingest_source: SOURCE.into(),
                    protocol: "http".into(),
                });
                pii.apply(&mut pb);
                let framed = pulse_contracts::wire::frame(SCHEMA_ID, &[0], &pb.encode_to_vec());
                bytes += std::hint::black_box(framed).len();
                events += 1;
            }
        }
    }
    let cpu = pulse_tests::stat_cpu_seconds("/proc/thread-self/stat") - cpu0;
    std::hint::black_box(bytes);
    Ok((events, events as f64 / cpu))
}

/// Process mode (`--ingest-bin`): the real binary in its own process, its CPU alone.
async fn process_mode(args: &Args) -> Result<()> {
    let bin = args.ingest_bin.clone().context("--ingest-bin")?;
    let registry = args
        .registry_url
        .clone()
        .context("process mode needs --registry-url (the registry ingest frames with)")?;
    let [http_addr, grpc_addr, admin_addr] = free_addrs()?;
    let log_path = args.ingest_log.clone().unwrap_or_else(|| {
        std::env::temp_dir().join(format!("bench-ingest-{}.log", std::process::id()))
    });
    let log = std::fs::File::create(&log_path)
        .with_context(|| format!("creating {}", log_path.display()))?;
    let max_batch = args.batch.max(1000).to_string();
    let mut cmd = tokio::process::Command::new(&bin);
    cmd.env("PULSE_INGEST_API_KEYS", format!("{API_KEY}={SOURCE}"))
        .env("PULSE_INGEST_PII_HMAC_KEY", HMAC_KEY);
    cmd.args([
        "--rate-limit",
        "0",
        "--max-batch-events",
        &max_batch,
        "--kafka-brokers",
        &args.brokers,
        "--kafka-partitions",
        &args.partitions.to_string(),
        "--kafka-linger-ms",
        &args.linger_ms.to_string(),
        "--schema-registry-url",
        &registry,
        "--http-addr",
        &http_addr.to_string(),
        "--grpc-addr",
        &grpc_addr.to_string(),
        "--admin-addr",
        &admin_addr.to_string(),
    ])
    .args(&args.ingest_args)
    .stdin(std::process::Stdio::null())
    .stdout(log.try_clone().context("ingest log")?)
    .stderr(log)
    .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    let pid = child.id().context("the ingest process has no pid")?;
    eprintln!(
        "[bench] ingest process {} (pid {pid}), log {}, http {http_addr}, grpc {grpc_addr}, admin {admin_addr}",
        bin.display(),
        log_path.display()
    );
    let result = process_phases(args, pid, http_addr, grpc_addr, admin_addr, &mut child).await;
    // Peak resident memory of the ingest process over the whole run.
    if let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status"))
        && let Some(hwm) = status.lines().find(|l| l.starts_with("VmHWM:"))
    {
        println!("ingest peak RSS (VmHWM): {}", hwm["VmHWM:".len()..].trim());
    }
    // SIGTERM: the binary drains and flushes; then it must exit.
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    match tokio::time::timeout(Duration::from_secs(40), child.wait()).await {
        Ok(Ok(status)) => eprintln!("[bench] ingest process exited: {status}"),
        Ok(Err(e)) => eprintln!("[bench] waiting for the ingest process: {e}"),
        Err(_) => {
            eprintln!("[bench] the ingest process did not stop in 40 s; killing it");
            let _ = child.kill().await;
        }
    }
    result
}

async fn process_phases(
    args: &Args,
    pid: u32,
    http_addr: std::net::SocketAddr,
    grpc_addr: std::net::SocketAddr,
    admin_addr: std::net::SocketAddr,
    child: &mut tokio::process::Child,
) -> Result<()> {
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(args.concurrency)
        .build()
        .context("building the HTTP client")?;
    // Ready: topics created, the schema found in the registry, servers bound.
    let ready_url = format!("http://{admin_addr}/readyz");
    let waited = Instant::now();
    loop {
        if let Some(status) = child.try_wait().context("checking the ingest process")? {
            bail!("the ingest process exited before it was ready: {status} (see its log)");
        }
        if let Ok(r) = client.get(&ready_url).send().await
            && r.status().is_success()
        {
            break;
        }
        if waited.elapsed() > Duration::from_secs(120) {
            bail!("the ingest process was not ready in 120 s (see its log)");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "[bench] ingest ready after {:.1} s",
        waited.elapsed().as_secs_f64()
    );
    let templates = Arc::new(Templates::build(args.batch)?);
    let floor_t = templates.clone();
    let floor_secs = args.floor_secs.max(1);
    let (floor_events, floor_rate) =
        tokio::task::spawn_blocking(move || floor(&floor_t, floor_secs))
            .await
            .context("the floor loop panicked")??;
    eprintln!(
        "[bench] floor       {floor_rate:>9.0} events per CPU-second ({floor_events} events: split + validate + PII + encode + frame, one thread)"
    );
    let run = uuid::Uuid::new_v4().simple().to_string();
    let ids = Arc::new(Ids {
        run: u32::from_str_radix(&run[..8], 16).unwrap_or_default(),
        next: AtomicU64::new(0),
    });
    let url = format!("http://{http_addr}/v1/events");
    let grpc_url = format!("http://{grpc_addr}");
    let mut targets: Vec<(&'static str, Arc<Target>)> = Vec::new();
    for f in &args.formats {
        let http = |ndjson, gzip| Target::Http {
            client: client.clone(),
            url: url.clone(),
            ndjson,
            gzip,
        };
        let t = match f.as_str() {
            "json" => ("json", http(false, false)),
            "ndjson" => ("ndjson", http(true, false)),
            "gzip" => ("gzip", http(false, true)),
            "grpc" => {
                let mut clients = Vec::with_capacity(args.concurrency);
                for _ in 0..args.concurrency {
                    clients.push(
                        IngestServiceClient::connect(grpc_url.clone())
                            .await
                            .context("connecting to ingest's gRPC")?,
                    );
                }
                ("grpc", Target::Grpc { clients })
            }
            other => bail!("--formats: unknown format {other:?} (json, ndjson, gzip, grpc)"),
        };
        targets.push((t.0, Arc::new(t.1)));
    }
    eprintln!(
        "[bench] process mode: brokers {}, batch {}, concurrency {}, warmup {} s + {} s per phase, {} rounds of {}",
        args.brokers,
        args.batch,
        args.concurrency,
        args.warmup_secs,
        args.duration_secs,
        args.rounds.max(1),
        args.formats.join(", ")
    );
    let idle0 = pulse_tests::cpu_seconds(Some(pid));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = (pulse_tests::cpu_seconds(Some(pid)) - idle0) / 2.0;
    let mut phases: Vec<PhaseStats> = Vec::new();
    for _ in 0..args.rounds.max(1) {
        for (name, target) in &targets {
            phases.push(
                run_phase(
                    name,
                    target.clone(),
                    templates.clone(),
                    ids.clone(),
                    args,
                    Some(pid),
                )
                .await?,
            );
        }
    }
    println!();
    println!(
        "{:<8} {:>10} {:>8} {:>8} {:>9} {:>14} {:>7} {:>9}",
        "phase", "events/s", "p50 ms", "p99 ms", "ingest %", "events/CPU-s", "errors", "broker %"
    );
    for s in &phases {
        println!(
            "{:<8} {:>10.0} {:>8.2} {:>8.2} {:>9.1} {:>14.0} {:>7} {:>9.0}",
            s.name,
            s.rate(),
            s.percentile_ms(0.50),
            s.percentile_ms(0.99),
            100.0 * s.ingest_cpu / s.elapsed.as_secs_f64().max(1e-9),
            s.per_cpu_second(),
            s.errors,
            s.broker_busy
        );
    }
    println!();
    println!(
        "floor (split + validate + PII + encode + frame, one thread, in this process): {floor_rate:.0} events per CPU-second"
    );
    println!(
        "ingest idle (no requests, 2 s before the phases): {:.1} % of a core",
        100.0 * idle
    );
    let mut medians = serde_json::Map::new();
    for (name, _) in &targets {
        let v: Vec<f64> = phases
            .iter()
            .filter(|s| s.name == *name)
            .map(PhaseStats::per_cpu_second)
            .collect();
        let rates: Vec<f64> = phases
            .iter()
            .filter(|s| s.name == *name)
            .map(PhaseStats::rate)
            .collect();
        let m = median(&v).unwrap_or(f64::NAN);
        println!(
            "{name:<7} events per CPU-second of the ingest process: median {m:.0} ({}; goal for JSON batches >= 100000), {:.1} % of the floor; events/s median {:.0}",
            v.iter()
                .map(|x| format!("{x:.0}"))
                .collect::<Vec<_>>()
                .join(", "),
            100.0 * m / floor_rate,
            median(&rates).unwrap_or(f64::NAN)
        );
        medians.insert((*name).to_owned(), json!(m));
    }
    println!(
        "batch {} events, concurrency {}, {} s measured per phase after {} s warmup; events/CPU-s = events of the requests started in the window ÷ the ingest process's CPU (user + system, every thread) from the window's start until the last of them was answered",
        args.batch, args.concurrency, args.duration_secs, args.warmup_secs
    );
    if let Some(path) = &args.json {
        let all: Vec<Value> = phases
            .iter()
            .map(|s| {
                json!({
                    "phase": s.name,
                    "events_per_s": s.rate(),
                    "p50_ms": s.percentile_ms(0.50),
                    "p99_ms": s.percentile_ms(0.99),
                    "errors": s.errors,
                    "broker_busy_pct": s.broker_busy,
                    "ingest_cpu_s": s.ingest_cpu,
                    "events_per_cpu_s": s.per_cpu_second(),
                })
            })
            .collect();
        let out = json!({
            "bench": "ingest-process",
            "batch": args.batch,
            "concurrency": args.concurrency,
            "duration_secs": args.duration_secs,
            "phases": all,
            "events_per_cpu_s_median": medians,
            "floor_events_per_cpu_s": floor_rate,
            "idle_core_share": idle,
            "goal_events_per_cpu_s": 100_000,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

/// The median as `pulse_tests::ratio_summary` prints it (the upper middle of an even count).
fn median(v: &[f64]) -> Option<f64> {
    let mut sorted = v.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted.get(sorted.len() / 2).copied()
}
