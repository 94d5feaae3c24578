//! Processor throughput benchmark, in two parts:
//!
//! 1. **Windowing core**: `pulse_processor::engine::Engine` alone (no Kafka) folds a
//!    generated stream of out-of-order events from many users and emits early and final
//!    results as processing time advances. Prints events/s and events per CPU-second.
//!    Then the same with each event read from a record as ingest writes it (**core +
//!    decode**: its trace context extracted from the headers, the Confluent-framed
//!    protobuf decoded by `pulse_processor::model::decode` with `pulse-ingest-ts`), the
//!    figure of issue #19's goal (>= 300,000 events per CPU-second), printed beside the
//!    **decode** alone (extract + decode, no engine: the floor under it).
//! 2. **Whole loop vs raw consumer**: the same kind of stream is produced once to a topic,
//!    as ingest writes it (its event fields and record headers), and read once unmeasured;
//!    then a raw consumer (the platform's `KafkaConsumer`, a fresh group, nothing done per
//!    record but counting) reads all of it, then `--rounds` times the real processor loop
//!    (`pulse_processor::build` + `run`: consume, decode, aggregate, produce results, write
//!    checkpoints, store offsets) with a fresh group, each followed by the raw consumer
//!    again. Each loop run is compared with the mean of the raw runs just before and after
//!    it (the broker's speed drifts within a run); the median of those ratios is the
//!    figure, and its goal is >= 0.8. The processor is done when its
//!    `pulse_processor_events_total` counters reach the record count.
//!
//! CPU seconds are the process's user + system time from /proc/self/stat (Linux); a
//! phase's figure includes every thread of the process (librdkafka's too). With
//! `--broker-pid`, the broker's CPU seconds per phase are read the same way.
//!
//! Run it with `scripts/bench.sh processor`, which starts a broker; this binary only needs
//! `--brokers`. `--core-only` runs part 1 alone (no broker); `--core-repeat N` runs the
//! core + decode phase N times (its figure: the median run), e.g. under `perf record`. It is a measurement, not a test: it exits 0 whatever the ratio.

use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use prost::Message as _;
use pulse_contracts::pb::events::v1 as ev;
use pulse_contracts::{headers, schemas, trace_context, wire};
use pulse_platform::kafka::{
    KafkaConfig, KafkaConsumer, KafkaProducer, OutRecord, TopicSpec, ensure_topics,
};
use pulse_processor::engine::Engine;
use pulse_processor::model::{self, InputEvent, TimeConfig};
use pulse_tests::cpu_seconds;
use rdkafka::message::OwnedHeaders;
use tokio_util::sync::CancellationToken;

/// The processor's allocator (`pulse_platform::malloc`): the core phases measure what it
/// runs.
#[global_allocator]
static ALLOC: pulse_platform::malloc::Allocator = pulse_platform::malloc::ALLOCATOR;

#[derive(Debug, Parser)]
#[command(
    name = "bench-processor",
    about = "Processor events/s: the windowing core, and the whole loop beside a raw consumer."
)]
struct Args {
    /// Bootstrap brokers of the broker to measure against.
    #[arg(
        long,
        env = "PULSE_BENCH_KAFKA_BROKERS",
        required_unless_present = "core_only"
    )]
    brokers: Option<String>,

    /// Events fed to the windowing core.
    #[arg(long, default_value_t = 1_000_000)]
    core_events: usize,
    /// The goal of the core with decoding, events per CPU-second (issue #19).
    #[arg(long, default_value_t = 300_000.0)]
    core_goal: f64,
    /// The core emits (early results, and finals the watermark allows) after every this
    /// many events: one emit tick of the loop (1 s) at ~10k events/s.
    #[arg(long, default_value_t = 10_000)]
    core_emit_every: usize,
    /// Runs the core + decode phase this many times (each with a fresh engine; its figure
    /// is the median run's), e.g. to `perf record` it long enough.
    #[arg(long, default_value_t = 1)]
    core_repeat: usize,
    /// Only the core phases (no broker is used; `--brokers` is not read): prints their
    /// rows and the goal's line.
    #[arg(long)]
    core_only: bool,
    /// Events produced to the topic for the loop phases.
    #[arg(long, default_value_t = 200_000)]
    loop_events: usize,
    /// Distinct users.
    #[arg(long, default_value_t = 5_000)]
    users: usize,
    /// Mean event-time step between consecutive events, ms (the stream's event-time rate).
    #[arg(long, default_value_t = 2)]
    step_ms: i64,
    /// Partitions of the benchmark topic.
    #[arg(long, default_value_t = 3)]
    partitions: i32,
    /// Processor loop runs, each followed by a raw consumer run (one more raw run comes
    /// first); each loop run is compared with the raw runs either side of it.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// An extra `pulse-processor` argument for the loop runs (repeatable), e.g.
    /// `--processor-arg=--kafka-compression=lz4`.
    #[arg(long, allow_hyphen_values = true)]
    processor_arg: Vec<String>,
    /// The broker's process id: each phase then also prints the broker's CPU time, to show
    /// whether the broker was the limit (`scripts/bench.sh` passes it).
    #[arg(long)]
    broker_pid: Option<u32>,
    /// Also write every phase's figures and the goals as JSON to this file
    /// (`scripts/bench.sh all` reads it).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
}

/// A small deterministic generator (xorshift), so every run sees the same stream.
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
}

const PAGES: &[&str] = &[
    "/",
    "/home",
    "/search",
    "/product/1",
    "/product/2",
    "/product/3",
    "/cart",
    "/checkout",
    "/about",
    "/blog",
];

/// The benchmark stream: event `n` of user `n * 7919 % users`, event time advancing by
/// `step_ms` on average with up to 2 s of disorder; 1 in 20 is a purchase.
fn stream(count: usize, users: usize, step_ms: i64, partitions: i32) -> Vec<InputEvent> {
    let base = 1_764_000_000_000_i64;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    (0..count)
        .map(|n| {
            let user = (n as u64 * 7_919 % users as u64) as usize;
            let purchase = rng.below(20) == 0;
            let jitter = rng.below(2_000) as i64;
            InputEvent {
                partition: (user % partitions.max(1) as usize) as i32,
                offset: n as i64,
                event_id: format!("b-{n}"),
                user_id: format!("user-{user}"),
                event_type: if purchase { "purchase" } else { "page_view" }.into(),
                page: if purchase {
                    String::new()
                } else {
                    PAGES[rng.below(PAGES.len() as u64) as usize].into()
                },
                currency: if purchase {
                    "EUR".into()
                } else {
                    String::new()
                },
                amount_micros: purchase.then_some(1_990_000),
                event_time_ms: base + n as i64 * step_ms - jitter,
                ingest_ms: base + n as i64 * step_ms,
            }
        })
        .collect()
}

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

struct Figures {
    name: &'static str,
    events: usize,
    secs: f64,
    cpu: f64,
    /// The broker's CPU seconds during the phase (NaN when its pid is not known).
    broker_cpu: f64,
}

impl Figures {
    fn rate(&self) -> f64 {
        self.events as f64 / self.secs
    }
    fn per_cpu(&self) -> f64 {
        self.events as f64 / self.cpu
    }
}

/// The core: process every event; every `emit_every` events (one emit tick) advance
/// processing time to the stream's time and emit (early results; finals as the watermark
/// passes).
fn bench_core(events: &[InputEvent], partitions: i32, emit_every: usize) -> (Figures, u64) {
    let mut engine = Engine::new(time_config());
    let start_ms = events.first().map(|e| e.ingest_ms).unwrap_or_default();
    for p in 0..partitions {
        engine.assign(p, start_ms);
    }
    let mut outputs = 0u64;
    let cpu0 = cpu_seconds(None);
    let t0 = Instant::now();
    for chunk in events.chunks(emit_every.max(1)) {
        let now = chunk.last().map(|e| e.ingest_ms).unwrap_or(start_ms);
        for e in chunk {
            engine.process(e, now);
        }
        let out = engine.emit(now, true);
        outputs += (out.activity.len() + out.sessions.len()) as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(None) - cpu0;
    (
        Figures {
            name: "windowing core",
            events: events.len(),
            secs,
            cpu,
            broker_cpu: f64::NAN,
        },
        outputs,
    )
}

/// A benchmark event as ingest writes it to the events topic: the framed value and the
/// headers (trace context, event id, ingest time).
fn record(e: &InputEvent) -> (Vec<u8>, OwnedHeaders) {
    let h = pulse_tests::ingest_trace_headers(&traceparent(e.offset));
    let h = headers::with_str(h, headers::EVENT_ID, &e.event_id);
    let h = headers::with_str(h, headers::INGEST_TS, &e.ingest_ms.to_string());
    (wire::frame(1, &[0], &to_event(e).encode_to_vec()), h)
}

/// What the processor loop does with a record before the engine: the trace context
/// extracted (the parent of its span) and the value decoded.
fn read(partition: i32, offset: i64, value: &[u8], h: &OwnedHeaders) -> Option<InputEvent> {
    let parent = trace_context::extract(Some(h));
    std::hint::black_box(&parent);
    model::decode(partition, offset, value, Some(h.as_borrowed()))
}

/// The core with each event read from its record ([`read`]): `engine` false measures the
/// reading alone.
fn bench_core_decoded(
    events: &[InputEvent],
    partitions: i32,
    emit_every: usize,
    engine_too: bool,
) -> (Figures, u64) {
    let records: Vec<(Vec<u8>, OwnedHeaders)> = events.iter().map(record).collect();
    let mut engine = Engine::new(time_config());
    let start_ms = events.first().map(|e| e.ingest_ms).unwrap_or_default();
    for p in 0..partitions {
        engine.assign(p, start_ms);
    }
    let mut outputs = 0u64;
    let mut undecoded = 0u64;
    let cpu0 = cpu_seconds(None);
    let t0 = Instant::now();
    let every = emit_every.max(1);
    for (chunk, recs) in events.chunks(every).zip(records.chunks(every)) {
        let now = chunk.last().map(|e| e.ingest_ms).unwrap_or(start_ms);
        for (e, (value, h)) in chunk.iter().zip(recs) {
            match read(e.partition, e.offset, value, h) {
                Some(input) if engine_too => {
                    engine.process(&input, now);
                }
                Some(input) => {
                    std::hint::black_box(input);
                }
                None => undecoded += 1,
            }
        }
        if engine_too {
            let out = engine.emit(now, true);
            outputs += (out.activity.len() + out.sessions.len()) as u64;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(None) - cpu0;
    if undecoded > 0 {
        eprintln!("warning: {undecoded} benchmark records did not decode");
    }
    (
        Figures {
            name: if engine_too {
                "core + decode"
            } else {
                "decode"
            },
            events: events.len(),
            secs,
            cpu,
            broker_cpu: f64::NAN,
        },
        outputs,
    )
}

fn to_event(e: &InputEvent) -> ev::Event {
    ev::Event {
        event_id: e.event_id.clone(),
        schema_version: 1,
        event_type: e.event_type.clone(),
        key: Some(ev::EventKey {
            user_id: e.user_id.clone(),
            session_id: String::new(),
        }),
        payload: Some(ev::Payload {
            page: e.page.clone(),
            currency: e.currency.clone(),
            amount_micros: e.amount_micros,
            ..Default::default()
        }),
        metadata: Some(ev::Metadata {
            event_timestamp_ms: e.event_time_ms,
            ..Default::default()
        }),
        // As ingest writes it.
        ingest: Some(ev::IngestInfo {
            ingest_timestamp_ms: e.ingest_ms,
            ingest_source: "bench".into(),
            protocol: "http".into(),
        }),
    }
}

/// A W3C `traceparent` for benchmark record `n`: every record ingest writes carries one
/// (it continues the request's trace or starts one), and the processor continues it.
fn traceparent(n: i64) -> String {
    format!(
        "00-{:032x}-{:016x}-01",
        0x9e37_79b9_u128 << 64 | n as u128,
        n + 1
    )
}

async fn produce(kafka: &KafkaConfig, topic: &str, events: &[InputEvent]) -> Result<()> {
    let producer = KafkaProducer::new(kafka, "bench-processor-load")?;
    let mut acks = Vec::with_capacity(10_000);
    for e in events {
        // The value and headers ingest puts on every record.
        let (value, h) = record(e);
        let rec =
            OutRecord::new(topic, Some(e.user_id.clone().into_bytes()), value).with_headers(h);
        acks.push(
            producer
                .enqueue_with_wait(rec, Duration::from_secs(60))
                .await
                .context("enqueueing a benchmark record")?,
        );
        if acks.len() >= 10_000 {
            for a in acks.drain(..) {
                a.await.context("a benchmark record was not acknowledged")?;
            }
        }
    }
    for a in acks {
        a.await.context("a benchmark record was not acknowledged")?;
    }
    Ok(())
}

async fn bench_raw(
    kafka: &KafkaConfig,
    topic: &str,
    count: usize,
    broker: Option<u32>,
) -> Result<Figures> {
    let group = format!("bench-raw-{}", uuid::Uuid::new_v4().simple());
    let (consumer, _rebalances) = KafkaConsumer::new(kafka, "bench-raw", &group, &[topic])?;
    let cpu0 = cpu_seconds(None);
    let broker0 = cpu_seconds(broker);
    let t0 = Instant::now();
    let mut seen = 0usize;
    while seen < count {
        let msg = tokio::time::timeout(Duration::from_secs(120), consumer.recv())
            .await
            .with_context(|| format!("the raw consumer stalled for 120 s after {seen} records"))?;
        if msg.is_ok() {
            seen += 1;
        }
    }
    Ok(Figures {
        name: "raw consumer",
        events: count,
        secs: t0.elapsed().as_secs_f64(),
        cpu: cpu_seconds(None) - cpu0,
        broker_cpu: cpu_seconds(broker) - broker0,
    })
}

/// The counter `name` per label set (`{kind="activity",final="true"}` → value).
fn counters(
    handle: &pulse_platform::metrics::Handle,
    name: &str,
) -> std::collections::BTreeMap<String, u64> {
    handle
        .render()
        .lines()
        .filter(|l| l.starts_with(name))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let labels = series.strip_prefix(name)?.to_owned();
            Some((labels, value.parse::<f64>().ok()? as u64))
        })
        .collect()
}

/// The outputs of one loop run: the total, and per kind and finality.
fn describe_outputs(
    before: &std::collections::BTreeMap<String, u64>,
    after: &std::collections::BTreeMap<String, u64>,
) -> String {
    let parts: Vec<String> = after
        .iter()
        .filter_map(|(labels, v)| {
            let d = v - before.get(labels).copied().unwrap_or(0);
            // `{service="…",kind="activity",final="false"}` → `activity final=false`.
            let kind = labels.split("kind=\"").nth(1)?.split('"').next()?;
            let fin = labels.split("final=\"").nth(1)?.split('"').next()?;
            (d > 0).then(|| format!("{kind} final={fin} {d}"))
        })
        .collect();
    let total: u64 = after.values().sum::<u64>() - before.values().sum::<u64>();
    format!("{total} ({})", parts.join(", "))
}

/// Sum of `pulse_processor_events_total` over its labels in the process's registry.
fn processed(handle: &pulse_platform::metrics::Handle) -> u64 {
    counters(handle, pulse_processor::metrics::EVENTS_TOTAL)
        .values()
        .sum()
}

async fn bench_loop(
    args: &Args,
    brokers: &str,
    topic: &str,
    registry: &str,
    run: &str,
    round: usize,
    handle: &pulse_platform::metrics::Handle,
) -> Result<(Figures, String)> {
    // Output topics of this run (their schemas are registered by `main`).
    let out = |name: &str| format!("bench.{name}.{run}");
    let base = [
        "pulse-processor",
        "--kafka-brokers",
        brokers,
        "--kafka-partitions",
        &args.partitions.to_string(),
        "--schema-registry-url",
        registry,
        "--group-id",
        &format!("bench-processor-{run}-{round}"),
        "--events-topic",
        topic,
        "--user-activity-topic",
        &out("activity"),
        "--sessions-topic",
        &out("sessions"),
        "--late-topic",
        &out("late"),
        "--checkpoint-topic",
        &out("checkpoints"),
    ];
    let config = <pulse_processor::Config as Parser>::try_parse_from(
        base.iter()
            .map(|a| a.to_string())
            .chain(args.processor_arg.iter().cloned()),
    )
    .context("processor config")?;
    let processor = pulse_processor::build(&config)
        .await
        .context("building the processor")?;
    let before = processed(handle);
    let outputs_before = counters(handle, pulse_processor::metrics::OUTPUTS_TOTAL);
    let stop = CancellationToken::new();
    let cpu0 = cpu_seconds(None);
    let broker0 = cpu_seconds(args.broker_pid);
    let t0 = Instant::now();
    let task = tokio::spawn(processor.run(stop.clone()));
    let deadline = Instant::now() + Duration::from_secs(600);
    while processed(handle) - before < args.loop_events as u64 {
        if task.is_finished() {
            let result = task.await.context("processor task")?;
            bail!(
                "the processor stopped after {} of {} events: {result:?}",
                processed(handle) - before,
                args.loop_events
            );
        }
        if Instant::now() > deadline {
            bail!(
                "the processor handled {} of {} events",
                processed(handle) - before,
                args.loop_events
            );
        }
        // The loop's time ends within 50 ms of its last event.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds(None) - cpu0;
    let broker_cpu = cpu_seconds(args.broker_pid) - broker0;
    let outputs = describe_outputs(
        &outputs_before,
        &counters(handle, pulse_processor::metrics::OUTPUTS_TOTAL),
    );
    stop.cancel();
    task.await
        .context("processor task")?
        .context("processor loop")?;
    Ok((
        Figures {
            name: "processor loop",
            events: args.loop_events,
            secs,
            cpu,
            broker_cpu,
        },
        outputs,
    ))
}

fn print(f: &Figures, baseline: Option<f64>) {
    let ratio = baseline
        .map(|b| format!("{:>8.2}", f.rate() / b))
        .unwrap_or_else(|| format!("{:>8}", "-"));
    println!(
        "{:<16} {:>10} {:>9.2} {:>12.0} {:>9.2} {:>14.0} {:>11.2} {:>9.0} {ratio}",
        f.name,
        f.events,
        f.secs,
        f.rate(),
        f.cpu,
        f.per_cpu(),
        f.broker_cpu,
        100.0 * f.broker_cpu / f.secs
    );
}

/// The core's goal, beside its floor (reading the records alone) measured in this run.
fn print_goal(args: &Args, core_decoded: &Figures, decode_only: &Figures) {
    println!(
        "core + decode: {:.0} events/cpu-s, goal >= {:.0}: {}; decode alone {:.0} events/cpu-s ({:.0} % of the core + decode CPU); allocator: jemalloc, as the processor's",
        core_decoded.per_cpu(),
        args.core_goal,
        if core_decoded.per_cpu() >= args.core_goal {
            "pass"
        } else {
            "FAIL"
        },
        decode_only.per_cpu(),
        100.0 * decode_only.cpu / core_decoded.cpu
    );
}

#[tokio::main]
async fn main() -> Result<()> {
    // The processor's allocator settings (re-executes once, as the service does).
    if let Some(why) = pulse_platform::malloc::tune() {
        eprintln!("warning: {why}");
    }
    let args = Args::parse();
    if args.core_events == 0 || args.loop_events == 0 || args.users == 0 {
        bail!("--core-events, --loop-events and --users must be >= 1");
    }
    let handle = pulse_platform::metrics::install("bench-processor")
        .context("installing the metrics recorder")?;
    pulse_processor::metrics::describe();

    // 1. The core, before any Kafka client exists (so its CPU time is its own).
    let core_events = stream(args.core_events, args.users, args.step_ms, args.partitions);
    let (core, outputs_core) = bench_core(&core_events, args.partitions, args.core_emit_every);
    let (decode_only, _) =
        bench_core_decoded(&core_events, args.partitions, args.core_emit_every, false);
    let mut runs: Vec<(Figures, u64)> = (0..args.core_repeat.max(1))
        .map(|_| bench_core_decoded(&core_events, args.partitions, args.core_emit_every, true))
        .collect();
    if runs.len() > 1 {
        let all: Vec<String> = runs
            .iter()
            .map(|(f, _)| format!("{:.0}", f.per_cpu()))
            .collect();
        eprintln!("core + decode runs, events/cpu-s: {}", all.join(", "));
    }
    runs.sort_by(|a, b| a.0.per_cpu().total_cmp(&b.0.per_cpu()));
    let (core_decoded, outputs_decoded) = runs.swap_remove(runs.len() / 2);
    if outputs_decoded != outputs_core {
        eprintln!(
            "warning: the core emitted {outputs_core} results from the events and {outputs_decoded} from their records"
        );
    }
    drop(core_events);
    if args.core_only {
        for f in [&core, &decode_only, &core_decoded] {
            println!(
                "{:<16} {:>10} events {:>7.2} s {:>12.0} events/s {:>7.2} cpu s {:>10.0} events/cpu-s",
                f.name,
                f.events,
                f.secs,
                f.rate(),
                f.cpu,
                f.per_cpu()
            );
        }
        print_goal(&args, &core_decoded, &decode_only);
        return Ok(());
    }

    // 2. The loop against the broker.
    let brokers = args.brokers.clone().unwrap_or_default();
    let kafka = KafkaConfig::for_brokers(&brokers);
    let run = uuid::Uuid::new_v4().simple().to_string();
    let topic = format!("bench.events.{run}");
    ensure_topics(&kafka, &[TopicSpec::new(&topic, args.partitions)])
        .await
        .context("creating the benchmark topic")?;
    let registry = pulse_schema_registry::Replica::start(
        &kafka,
        &format!("_schemas_bench_{run}"),
        Duration::from_secs(30),
        Duration::from_secs(60),
        tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the registry")?,
    )
    .await
    .context("starting a schema registry")?;
    let registry_url = format!("http://{}", registry.addr);
    let http = reqwest::Client::new();
    for subject in ["activity", "sessions"] {
        let r = http
            .post(format!(
                "{registry_url}/subjects/bench.{subject}.{run}-value/versions"
            ))
            .json(&serde_json::json!({
                "schemaType": "PROTOBUF",
                "schema": schemas::AGGREGATES.source,
            }))
            .send()
            .await
            .context("registering the aggregates schema")?;
        if !r.status().is_success() {
            bail!("registering the aggregates schema: HTTP {}", r.status());
        }
    }
    eprintln!("producing {} events to {topic}", args.loop_events);
    let loop_events = stream(args.loop_events, args.users, args.step_ms, args.partitions);
    let (load_t0, load_broker0) = (Instant::now(), cpu_seconds(args.broker_pid));
    produce(&kafka, &topic, &loop_events).await?;
    let load_secs = load_t0.elapsed().as_secs_f64();
    let load_broker = cpu_seconds(args.broker_pid) - load_broker0;
    drop(loop_events);

    // An unmeasured read first: the broker's first read of freshly written records is
    // slower than later ones (measured here: ~20 % more broker CPU), which would favour
    // the first loop run's ratio.
    eprintln!("raw consumer (warm-up, not measured)");
    bench_raw(&kafka, &topic, args.loop_events, args.broker_pid).await?;
    let rounds = args.rounds.max(1);
    eprintln!("raw consumer (1/{})", rounds + 1);
    let mut raws = vec![bench_raw(&kafka, &topic, args.loop_events, args.broker_pid).await?];
    let mut loops = Vec::new();
    for round in 0..rounds {
        eprintln!("processor loop ({}/{rounds})", round + 1);
        loops.push(bench_loop(&args, &brokers, &topic, &registry_url, &run, round, &handle).await?);
        eprintln!("raw consumer ({}/{})", round + 2, rounds + 1);
        raws.push(bench_raw(&kafka, &topic, args.loop_events, args.broker_pid).await?);
    }
    registry.stop().await.context("stopping the registry")?;

    let baseline = raws.iter().map(Figures::rate).sum::<f64>() / raws.len() as f64;
    println!(
        "\n{:<16} {:>10} {:>9} {:>12} {:>9} {:>14} {:>11} {:>9} {:>8}",
        "phase",
        "events",
        "seconds",
        "events/s",
        "cpu s",
        "events/cpu-s",
        "broker cpu s",
        "broker %",
        "vs raw"
    );
    print(&core, None);
    print(&decode_only, None);
    print(&core_decoded, None);
    let mut ratios = Vec::new();
    for (i, raw) in raws.iter().enumerate() {
        print(raw, Some(baseline));
        if let Some((lp, _)) = loops.get(i) {
            // Each loop run against the raw runs just before and after it.
            let local = (raw.rate() + raws[i + 1].rate()) / 2.0;
            ratios.push(lp.rate() / local);
            print(lp, Some(local));
        }
    }
    let outputs: Vec<&str> = loops.iter().map(|(_, o)| o.as_str()).collect();
    println!(
        "\ncore: {} users, an emit every {} events, {} results emitted; loop: {} partitions; outputs per loop run: {}",
        args.users,
        args.core_emit_every,
        outputs_core,
        args.partitions,
        outputs.join(" / ")
    );
    // What a produced record costs the broker, beside what a consumed one does: the loop
    // adds its outputs' produce cost to the raw consumer's fetch cost.
    println!(
        "broker CPU per 1,000 records: produced (the load, {} records in {load_secs:.2} s) {:.3} s; consumed (raw runs, mean) {:.3} s",
        args.loop_events,
        1000.0 * load_broker / args.loop_events as f64,
        1000.0 * raws.iter().map(|r| r.broker_cpu).sum::<f64>()
            / (raws.len() * args.loop_events) as f64
    );
    println!(
        "loop vs raw (each loop run against the mean of the raw runs either side): {}",
        pulse_tests::ratio_summary(&ratios)
    );
    print_goal(&args, &core_decoded, &decode_only);
    if let Some(path) = &args.json {
        let fig = |f: &Figures| {
            serde_json::json!({
                "phase": f.name,
                "events": f.events,
                "secs": f.secs,
                "events_per_s": f.rate(),
                "cpu_s": f.cpu,
                "events_per_cpu_s": f.per_cpu(),
                "broker_cpu_s": f.broker_cpu,
            })
        };
        let mut sorted = ratios.clone();
        sorted.sort_by(f64::total_cmp);
        let out = serde_json::json!({
            "bench": "processor",
            "users": args.users,
            "core": fig(&core),
            "decode": fig(&decode_only),
            "core_decode": fig(&core_decoded),
            "core_goal_events_per_cpu_s": args.core_goal,
            "raw": raws.iter().map(fig).collect::<Vec<_>>(),
            "loops": loops.iter().map(|(f, _)| fig(f)).collect::<Vec<_>>(),
            "loop_vs_raw": ratios,
            "loop_vs_raw_median": sorted.get(sorted.len() / 2),
            "goal_vs_raw": 0.8,
        });
        std::fs::write(path, serde_json::to_vec_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
