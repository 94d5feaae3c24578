//! What the processor's state and checkpoints cost (issue #15, bounded memory), without a
//! broker: a measurement, not a test (it exits 0 whatever the figures).
//!
//! 1. Feeds `--users` users one event each (default windows and sessions, spread over
//!    `--partitions`) into an [`Engine`] and prints the resident memory it grew by
//!    (/proc/self/statm) and its own estimate (`Engine::state_bytes`, the
//!    `pulse_processor_state_bytes` gauge), per user.
//! 2. Then runs `--ticks` emission ticks of the memory benchmark's workload (users taking
//!    turns: `--new-per-tick` new users a tick over all partitions, every session staying
//!    open) and prints the checkpoint bytes written per tick, all partitions: as the
//!    previous format wrote them (every open session every tick: the JSON of the whole
//!    checkpoint) and as this one does (`CheckpointStore::prepare`: deltas, headers and
//!    the occasional new base).
//!
//! 3. Then closes the windows (one event per partition `--close-after-ms` later moves the
//!    watermark past them: finals emitted, the sessions stay open, as at the memory
//!    benchmark's first window close) and feeds `--refill-users` new users (default a
//!    quarter of `--users`), to show whether the freed window memory is reused.
//!
//! At each step it prints the memory side by side (`mem` lines): the process's RSS
//! (VmRSS; RssAnon: its anonymous part, without the mapped binary), jemalloc's statistics
//! (`pulse_platform::malloc::heap_stats`: allocated, active, resident, metadata) and the
//! processor's estimate (`Engine::state_bytes` + `CheckpointStore::held_bytes`, the
//! `pulse_processor_state_bytes` gauge), then where RSS − estimate goes: `omitted`
//! (allocated − estimate: what the heap holds that the estimate does not count), `frag`
//! (active − allocated: size-class rounding and freed slots among live ones), `dirty`
//! (resident − active − metadata: freed pages not given back yet) and `outside` (RSS −
//! jemalloc's resident: the binary, stacks, glibc's malloc).
//!
//! `cargo run --release -p pulse-processor --example state_cost -- --users 100000`

use std::collections::HashMap;

use prost::Message as _;
use pulse_platform::kafka::KafkaConfig;
use pulse_processor::checkpoint::CheckpointStore;
use pulse_processor::engine::Engine;
use pulse_processor::model::{InputEvent, TimeConfig};

/// The processor's allocator (`pulse_platform::malloc`), so this measures what it runs.
#[global_allocator]
static ALLOC: pulse_platform::malloc::Allocator = pulse_platform::malloc::ALLOCATOR;

fn rss() -> i64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<i64>().ok())
        .map_or(0, |pages| pages * 4096)
}

/// Peak resident memory so far (VmHWM), bytes.
fn hwm() -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
            line.split_whitespace().nth(1)?.parse::<i64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

fn mib(bytes: i64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// A `/proc/self/status` field in KiB, as bytes.
fn status_bytes(field: &str) -> i64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with(field))?;
            line.split_whitespace().nth(1)?.parse::<i64>().ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// One line of memory side by side (MiB): RSS, jemalloc's statistics, the estimate, and
/// where RSS − estimate goes (see the module docs).
fn mem(label: &str, estimate: usize) {
    let rss = rss();
    let anon = status_bytes("RssAnon:");
    let h = pulse_platform::malloc::heap_stats().unwrap_or_default();
    let (allocated, active, resident, metadata) = (
        h.allocated as i64,
        h.active as i64,
        h.resident as i64,
        h.metadata as i64,
    );
    let est = estimate as i64;
    println!(
        "mem {label:<34} RSS {:>7.1} (anon {:>7.1})  heap allocated {:>7.1} active {:>7.1} resident {:>7.1} metadata {:>5.1}  estimate {:>7.1}  RSS-estimate {:>6.1} = omitted {:>6.1} + frag {:>5.1} + metadata {:>5.1} + dirty {:>5.1} + outside {:>5.1}",
        mib(rss),
        mib(anon),
        mib(allocated),
        mib(active),
        mib(resident),
        mib(metadata),
        mib(est),
        mib(rss - est),
        mib(allocated - est),
        mib(active - allocated),
        mib(metadata),
        mib(resident - active - metadata),
        mib(rss - resident),
    );
}

/// One emission as the processor loop makes it: in slices of `chunk` users (0: at once),
/// each result encoded (as produced) and dropped before the next slice is built.
fn emit(engine: &mut Engine, now: i64, chunk: usize) {
    let mut plan = engine.begin_emit(now, true);
    let mut buf = Vec::new();
    while !plan.done() {
        let out = engine.emit_chunk(&mut plan, if chunk == 0 { usize::MAX } else { chunk });
        for a in out.activity {
            buf.clear();
            let _ = a.encode(&mut buf);
        }
        for s in out.sessions {
            buf.clear();
            let _ = s.encode(&mut buf);
        }
    }
}

/// Each partition's checkpoint as the processor loop takes it (changes against the one
/// in force), prepared and dropped (as if written).
fn checkpoint(engine: &mut Engine, store: &CheckpointStore, partitions: i64) {
    for p in 0..partitions {
        let p = p as i32;
        let full = !store.has_checkpoint(p);
        if let Some(update) = engine.checkpoint_update(p, full) {
            let _ = store.prepare_update(p, &update);
        }
    }
}

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
        offset: seq,
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

fn main() {
    // The processor's allocator settings (re-executes once, as the service does).
    if let Some(why) = pulse_platform::malloc::tune() {
        eprintln!("warning: {why}");
    }
    let users = arg("--users", 100_000).max(1);
    let partitions = arg("--partitions", 3).max(1);
    let ticks = arg("--ticks", 60).max(1);
    let per_tick = arg("--new-per-tick", 4_000).max(1);
    // Users emitted at a time, as the processor loop does (run.rs EMIT_CHUNK_USERS);
    // 0: the whole emission at once.
    let chunk = arg("--chunk", 1_024).max(0) as usize;
    let close_after_ms = arg("--close-after-ms", 190_000).max(0);
    let refill = arg("--refill-users", users / 4).max(0);
    let now = pulse_platform::clock::now_ms();
    let t0 = (now / 60_000 - 2) * 60_000;
    let mut engine = Engine::new(TimeConfig::default());
    for p in 0..partitions {
        engine.assign(p as i32, now);
    }
    mem("start", engine.state_bytes());
    let before = rss();
    let mut seq = 0;
    for u in 0..users {
        let _ = engine.process(&event(u, seq, partitions, t0 + 1_000), now);
        seq += 1;
    }
    let grown = rss() - before;
    let estimate = engine.state_bytes();
    println!(
        "state: {users} users, 1 event each, {} open windows, {} open sessions",
        engine.open_windows(),
        engine.open_sessions()
    );
    println!(
        "  RSS growth {:>6} B/user   estimate (pulse_processor_state_bytes) {:>6} B/user",
        grown / users,
        estimate as i64 / users
    );
    mem(&format!("{users} users folded in"), estimate);

    let store = CheckpointStore {
        topic: "checkpoints".into(),
        group: "pulse-processor".into(),
        input_topic: "events".into(),
        kafka: KafkaConfig::for_brokers("127.0.0.1:1"),
        generations: Default::default(),
    };
    let mut old_total = 0usize;
    let mut new_total = 0usize;
    let mut kinds: HashMap<&str, usize> = HashMap::new();
    let mut next_user = users;
    for tick in 0..=ticks {
        if tick > 0 {
            for _ in 0..per_tick {
                let t = t0 + 1_000 + tick * 1_000;
                let _ = engine.process(&event(next_user, seq, partitions, t), now);
                next_user += 1;
                seq += 1;
            }
        }
        let high = rss();
        emit(&mut engine, now, chunk);
        if tick == 0 {
            mem("first emission", engine.state_bytes());
            println!(
                "first emission (every user changed, --chunk {chunk}): RSS {:.1} -> {:.1} MiB, peak so far (VmHWM) {:.1} MiB",
                mib(high),
                mib(rss()),
                mib(hwm())
            );
        }
        for p in 0..partitions {
            let Some(cp) = engine.checkpoint(p as i32) else {
                continue;
            };
            let records = store.prepare(p as i32, &cp);
            // Tick 0 writes every partition's first base (both formats): not counted.
            if tick > 0 {
                old_total += serde_json::to_vec(&cp).map_or(0, |v| v.len());
                for (_, value, kind) in &records {
                    new_total += value.len();
                    *kinds.entry(kind).or_default() += value.len();
                }
            }
        }
    }
    mem(
        &format!("after {ticks} ticks"),
        engine.state_bytes() + store.held_bytes(),
    );
    // 3. The windows close (the sessions stay open), then new users come.
    let t_close = t0 + close_after_ms;
    for _ in 0..partitions {
        let _ = engine.process(&event(next_user, seq, partitions, t_close), now);
        next_user += 1;
        seq += 1;
    }
    let windows_before = engine.open_windows();
    emit(&mut engine, now, chunk);
    checkpoint(&mut engine, &store, partitions);
    println!(
        "windows closed: {} -> {} open windows, {} open sessions",
        windows_before,
        engine.open_windows(),
        engine.open_sessions()
    );
    mem("windows closed", engine.state_bytes() + store.held_bytes());
    // jemalloc gives freed pages back within `dirty_decay_ms` (1 s), checked as its
    // arenas allocate (allocations its thread caches serve do not count): what a running
    // processor holds a moment after a close.
    std::thread::sleep(std::time::Duration::from_millis(1_500));
    for _ in 0..2_000 {
        std::hint::black_box(vec![1u8; 64 << 10]);
    }
    mem(
        "windows closed, 1.5 s later",
        engine.state_bytes() + store.held_bytes(),
    );
    for _ in 0..refill {
        let _ = engine.process(&event(next_user, seq, partitions, t_close), now);
        next_user += 1;
        seq += 1;
    }
    emit(&mut engine, now, chunk);
    checkpoint(&mut engine, &store, partitions);
    mem(
        &format!("{refill} users more"),
        engine.state_bytes() + store.held_bytes(),
    );
    println!(
        "  ({} open windows, {} open sessions; peak RSS so far {:.1} MiB)",
        engine.open_windows(),
        engine.open_sessions(),
        mib(hwm())
    );
    println!(
        "checkpoints: {ticks} ticks, {per_tick} new open sessions a tick, {} open sessions at the end",
        engine.open_sessions()
    );
    println!(
        "  previous format (every open session every tick): {:>10} B/tick",
        old_total / ticks as usize
    );
    println!(
        "  incremental (this format):                      {:>10} B/tick  (base {} B, delta {} B, header {} B in all)",
        new_total / ticks as usize,
        kinds.get("base").copied().unwrap_or(0),
        kinds.get("delta").copied().unwrap_or(0),
        kinds.get("header").copied().unwrap_or(0),
    );
}
