//! What one emission tick and one event cost as the open state grows (issue #15: the
//! processor stalled at ~400k open sessions), without a broker: a measurement, not a test.
//!
//! Drives the work `run.rs` does per record (`Engine::process`) and per tick (`Engine::emit`,
//! each partition's checkpoint update prepared by `CheckpointStore::prepare_update`, the
//! resume offset, commit hold and state-size gauges) with the memory benchmark's workload: `--per-tick`
//! new users a tick (one event each, event time advancing 1 s a tick, so windows close
//! and sessions stay open), and prints, at each reported size, the time per tick of each
//! part and the events/s the loop sustains (events per tick / time per tick).
//!
//! `cargo run --release -p pulse-processor --example tick_cost -- --users 1000000`

use std::time::{Duration, Instant};

use pulse_platform::kafka::KafkaConfig;
use pulse_processor::checkpoint::CheckpointStore;
use pulse_processor::engine::Engine;
use pulse_processor::model::{InputEvent, TimeConfig};

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

fn event(u: i64, seq: i64, partitions: i64, t: i64) -> InputEvent {
    InputEvent {
        partition: (u % partitions) as i32,
        offset: seq / partitions,
        event_id: format!("lg-15-{seq}"),
        user_id: format!("lg-15-u{u:07}"),
        event_type: "page_view".to_owned(),
        page: format!("/products/p-{:02}", u % 25 + 1),
        currency: String::new(),
        amount_micros: None,
        event_time_ms: t,
        ingest_ms: t,
    }
}

#[derive(Default)]
struct Phases {
    process: Duration,
    emit: Duration,
    checkpoint: Duration,
    offsets: Duration,
    gauges: Duration,
    ticks: u32,
    events: u64,
}

impl Phases {
    fn report(&self, engine: &Engine) {
        let n = f64::from(self.ticks.max(1));
        let ms = |d: Duration| d.as_secs_f64() * 1000.0 / n;
        let total = self.process + self.emit + self.checkpoint + self.offsets + self.gauges;
        println!(
            "{:>9} open sessions {:>8} open windows | per tick ms: process {:>7.1} emit {:>7.1} checkpoint {:>7.1} offsets {:>7.1} gauges {:>7.1} | {:>9.0} events/s",
            engine.open_sessions(),
            engine.open_windows(),
            ms(self.process),
            ms(self.emit),
            ms(self.checkpoint),
            ms(self.offsets),
            ms(self.gauges),
            self.events as f64 / total.as_secs_f64(),
        );
    }
}

fn main() {
    // The processor's allocator settings (re-executes once, as the service does).
    if let Some(why) = pulse_platform::malloc::tune() {
        eprintln!("warning: {why}");
    }
    let users = arg("--users", 1_000_000).max(1);
    let partitions = arg("--partitions", 3).max(1);
    let per_tick = arg("--per-tick", 4_000).max(1);
    let now = pulse_platform::clock::now_ms();
    let t0 = (now / 60_000 - 2) * 60_000;
    let mut engine = Engine::new(TimeConfig::default());
    for p in 0..partitions {
        engine.assign(p as i32, now);
    }
    let store = CheckpointStore {
        topic: "checkpoints".into(),
        group: "pulse-processor".into(),
        input_topic: "events".into(),
        kafka: KafkaConfig::for_brokers("127.0.0.1:1"),
        generations: Default::default(),
    };
    let mut reports: Vec<i64> = [
        10_000, 100_000, 200_000, 400_000, 600_000, 800_000, 1_000_000,
    ]
    .into_iter()
    .filter(|r| *r <= users)
    .collect();
    reports.reverse();
    let mut seq = 0;
    let mut tick = 0;
    let mut phases = Phases::default();
    let mut measuring = false;
    while seq < users {
        tick += 1;
        // Each report covers the last 5 ticks before its size.
        if !measuring && reports.last().is_some_and(|r| seq + 5 * per_tick >= *r) {
            phases = Phases::default();
            measuring = true;
        }
        let t = t0 + tick * 1_000;
        let started = Instant::now();
        for _ in 0..per_tick.min(users - seq) {
            let _ = engine.process(&event(seq, seq, partitions, t), now);
            seq += 1;
            phases.events += 1;
        }
        let a = Instant::now();
        phases.process += a - started;
        let _ = engine.emit(now, true);
        let b = Instant::now();
        phases.emit += b - a;
        // As `run.rs` does: the changes since the last emission (whole when the store has
        // no checkpoint in force).
        for p in 0..partitions {
            let full = !store.has_checkpoint(p as i32);
            if let Some(update) = engine.checkpoint_update(p as i32, full) {
                let _ = store.prepare_update(p as i32, &update);
            }
        }
        let c = Instant::now();
        phases.checkpoint += c - b;
        for p in 0..partitions {
            let _ = engine.resume_offset(p as i32);
            let _ = engine.commit_hold_ms(p as i32);
        }
        let d = Instant::now();
        phases.offsets += d - c;
        let _ = engine.state_bytes() + store.held_bytes();
        let _ = (engine.open_windows(), engine.open_sessions());
        phases.gauges += d.elapsed();
        phases.ticks += 1;
        if reports.last().is_some_and(|r| seq >= *r) {
            reports.pop();
            phases.report(&engine);
            measuring = false;
        }
    }
}
