//! The windowing core alone, for profiling (`perf record`) without a broker: the stream and
//! emit cadence of `bench-processor`'s core phase (tests/src/bin/bench_processor.rs), and,
//! with `--decode`, each event first decoded from a Confluent-framed protobuf record with
//! ingest's headers (`pulse-ingest-ts`, `traceparent`) by `model::decode`, its trace context
//! extracted (`--decode-full`: the full `Event` decoded and copied, as `run::decode` did). Prints events
//! per CPU-second. A measurement, not a test.
//!
//! `cargo run --release -p pulse-processor --example core_cost -- --events 300000 --decode`

use std::time::Instant;

use prost::Message as _;
use pulse_contracts::pb::events::v1 as ev;
use pulse_contracts::{headers, trace_context, wire};
use pulse_processor::engine::Engine;
use pulse_processor::model::{self, InputEvent, TimeConfig};
use rdkafka::message::{Headers as _, OwnedHeaders};

/// The processor's allocator (`pulse_platform::malloc`), so this measures what it runs.
#[global_allocator]
static ALLOC: pulse_platform::malloc::Allocator = pulse_platform::malloc::ALLOCATOR;

fn arg(name: &str, default: i64) -> i64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

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

/// The same stream as `bench-processor`'s.
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

/// A record as ingest writes it: framed value and headers.
fn record(e: &InputEvent) -> (Vec<u8>, OwnedHeaders) {
    let value = ev::Event {
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
        ingest: Some(ev::IngestInfo {
            ingest_timestamp_ms: e.ingest_ms,
            ingest_source: "bench".into(),
            protocol: "http".into(),
        }),
    };
    let tp = format!(
        "00-{:032x}-{:016x}-01",
        0x9e37_79b9_u128 << 64 | e.offset as u128,
        e.offset + 1
    );
    let h = headers::with_str(OwnedHeaders::new(), headers::TRACEPARENT, &tp);
    let h = headers::with_str(h, headers::EVENT_ID, &e.event_id);
    let h = headers::with_str(h, headers::INGEST_TS, &e.ingest_ms.to_string());
    (wire::frame(1, &[0], &value.encode_to_vec()), h)
}

/// What `run::decode` did with a record before `model::decode` (the full `Event` decoded,
/// its strings copied), for comparison with `--decode-full`.
fn decode_full(partition: i32, offset: i64, value: &[u8], h: &OwnedHeaders) -> Option<InputEvent> {
    let framed = wire::unframe(value).ok()?;
    let e = ev::Event::decode(framed.payload).ok()?;
    let key = e.key.as_ref()?;
    let payload = e.payload.clone().unwrap_or_default();
    let ingest_ms = headers::ingest_ts_ms(h.as_borrowed())
        .or_else(|| e.ingest.as_ref().map(|i| i.ingest_timestamp_ms))
        .unwrap_or(0);
    Some(InputEvent {
        partition,
        offset,
        event_id: e.event_id.clone(),
        user_id: key.user_id.clone(),
        event_type: e.event_type.clone(),
        page: payload.page,
        currency: payload.currency,
        amount_micros: payload.amount_micros,
        event_time_ms: e
            .metadata
            .as_ref()
            .map(|m| m.event_timestamp_ms)
            .unwrap_or(0),
        ingest_ms,
    })
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        f.get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(f64::NAN)
    };
    (ticks(11) + ticks(12)) / 100.0
}

fn main() {
    // The processor's allocator settings (re-executes once, as the service does).
    if let Some(why) = pulse_platform::malloc::tune() {
        eprintln!("warning: {why}");
    }
    let events = arg("--events", 300_000) as usize;
    let users = arg("--users", 5_000) as usize;
    let partitions = arg("--partitions", 3) as i32;
    let emit_every = arg("--emit-every", 10_000) as usize;
    let repeat = arg("--repeat", 1).max(1);
    let full = std::env::args().any(|a| a == "--decode-full");
    let with_decode = full || std::env::args().any(|a| a == "--decode");
    let evs = stream(events, users, 2, partitions);
    let records: Vec<(Vec<u8>, OwnedHeaders)> = if with_decode {
        evs.iter().map(record).collect()
    } else {
        Vec::new()
    };
    for _ in 0..repeat {
        let mut engine = Engine::new(TimeConfig::default());
        let start_ms = evs.first().map(|e| e.ingest_ms).unwrap_or_default();
        for p in 0..partitions {
            engine.assign(p, start_ms);
        }
        let mut outputs = 0usize;
        let cpu0 = cpu_seconds();
        let t0 = Instant::now();
        for (c, chunk) in evs.chunks(emit_every.max(1)).enumerate() {
            let now = chunk.last().map(|e| e.ingest_ms).unwrap_or(start_ms);
            for (i, e) in chunk.iter().enumerate() {
                if with_decode {
                    let (value, h) = &records[c * emit_every + i];
                    let _parent = trace_context::extract(Some(h));
                    let _ = h.count();
                    let d = if full {
                        decode_full(e.partition, e.offset, value, h)
                    } else {
                        model::decode(e.partition, e.offset, value, Some(h.as_borrowed()))
                    };
                    if let Some(d) = d {
                        engine.process(&d, now);
                    }
                } else {
                    engine.process(e, now);
                }
            }
            let out = engine.emit(now, true);
            outputs += out.activity.len() + out.sessions.len();
        }
        let secs = t0.elapsed().as_secs_f64();
        let cpu = cpu_seconds() - cpu0;
        println!(
            "{} events{} in {secs:.2} s, {cpu:.2} cpu s: {:.0} events/s, {:.0} events/cpu-s; {outputs} results",
            events,
            if with_decode { " (decoded)" } else { "" },
            events as f64 / secs,
            events as f64 / cpu
        );
    }
}
