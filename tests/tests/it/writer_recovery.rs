//! The ClickHouse writer's recovery, with the real `pulse-writer` binary as a child process
//! against the real broker and ClickHouse 18.16:
//!
//! - SIGKILL in the middle of a stream (batches inserted, offsets not yet committed), then a
//!   restart in the same group: every event ends up in ClickHouse exactly once under `FINAL`
//!   (the replayed range is inserted again and collapses on the ReplacingMergeTree key).
//! - A 30 s ClickHouse outage under load: the writer retries with backoff, opens its circuit
//!   breaker and pauses consumption, so its memory stays bounded while the backlog grows in
//!   Kafka; once ClickHouse is back everything lands exactly once.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use prost::Message as _;
use pulse_contracts::pb::events::v1 as ev;
use pulse_contracts::{headers, wire};
use pulse_platform::clickhouse::ClickHouseConfig;
use pulse_platform::clock::now_ms;
use pulse_platform::kafka::{AckFuture, KafkaProducer, OutRecord};
use rdkafka::message::OwnedHeaders;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::support::child_process::free_port;
use crate::support::cleanup::{self, TempDir};
use crate::support::writer_process::{WriterProcess, WriterTopics, committed_offsets, end_offsets};
use crate::support::{Deadline, events, metric_sum, wait_until};
/// Rows per ClickHouse insert: small, so a run has many inserts and commits to land between.
const BATCH_ROWS: &str = "500";

const MIB: u64 = 1024 * 1024;

/// Starts `pulse-writer --sink clickhouse` on `topics` with small batches, `extra` flags,
/// and stdout and stderr in `log`.
fn spawn(
    topics: &WriterTopics,
    ch: &ClickHouseConfig,
    group: &str,
    log: PathBuf,
    extra: &[String],
) -> WriterProcess {
    let mut args: Vec<String> = [
        "--sink",
        "clickhouse",
        "--clickhouse-url",
        &ch.url,
        "--clickhouse-database",
        &ch.database,
        "--group-id",
        group,
        "--batch-max-rows",
        BATCH_ROWS,
        "--batch-max-age-ms",
        "200",
    ]
    .map(String::from)
    .to_vec();
    args.extend(topics.flags());
    args.extend_from_slice(extra);
    WriterProcess::spawn(&args, &[], log)
}

/// Resident set size of process `pid`, bytes (`VmRSS` of /proc/<pid>/status).
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    kib * 1024
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / MIB as f64)
}

/// Event `id` of `user` at `t`, with a property of `pad` bytes (to give the backlog weight).
fn event(id: &str, user: &str, t: i64, pad: usize) -> ev::Event {
    let e = events::event(id, user, t)
        .page("/p")
        .ingested(t + 100, "writer-recovery-test");
    if pad > 0 {
        e.property("pad", "x".repeat(pad)).build()
    } else {
        e.build()
    }
}

/// Queues event number `i` (framed as the processor writes it, keyed by user) and returns
/// its id and the acknowledgement future.
async fn enqueue(
    producer: &KafkaProducer,
    topic: &str,
    i: u64,
    t: i64,
    pad: usize,
) -> (String, AckFuture) {
    let id = format!("e{i}");
    let user = format!("u{}", i % 50);
    let h = headers::with_str(OwnedHeaders::new(), headers::EVENT_ID, &id);
    let h = headers::with_str(h, headers::INGEST_TS, &(t + 100).to_string());
    let rec = OutRecord::new(
        topic,
        Some(user.clone().into_bytes()),
        wire::frame(1, &[0], &event(&id, &user, t, pad).encode_to_vec()),
    )
    .with_headers(h);
    let ack = producer
        .enqueue_with_wait(rec, Duration::from_secs(30))
        .await
        .unwrap();
    (id, ack)
}

/// Waits for every acknowledgement; returns the ids the broker stored.
async fn acked(pending: Vec<(String, AckFuture)>) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for (id, ack) in pending {
        ack.await.unwrap();
        ids.insert(id);
    }
    ids
}

async fn query_u64(
    client: &clickhouse::Client,
    sql: &str,
) -> Result<u64, clickhouse::error::Error> {
    client.query(sql).fetch_one::<u64>().await
}

/// Fails unless `events` holds each of `produced` exactly once under `FINAL`, and nothing
/// else.
async fn assert_exactly_once(client: &clickhouse::Client, produced: &BTreeSet<String>) {
    let repeated: Vec<(String, u64)> = client
        .query(
            "SELECT event_id, count() FROM events FINAL GROUP BY event_id \
             HAVING count() > 1 ORDER BY event_id LIMIT 20",
        )
        .fetch_all()
        .await
        .unwrap();
    assert!(
        repeated.is_empty(),
        "events present more than once under FINAL: {repeated:?}"
    );
    let stored: BTreeSet<String> = client
        .query("SELECT DISTINCT event_id FROM events FINAL")
        .fetch_all::<String>()
        .await
        .unwrap()
        .into_iter()
        .collect();
    let missing: Vec<&String> = produced.difference(&stored).take(20).collect();
    let extra: Vec<&String> = stored.difference(produced).take(20).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} produced, {} stored; missing (first 20): {missing:?}; extra (first 20): {extra:?}",
        produced.len(),
        stored.len()
    );
}

/// Waits until `events FINAL` holds `want` rows; returns the most raw rows (before merges
/// collapsed duplicates) seen meanwhile.
async fn wait_final_count(
    client: &clickhouse::Client,
    want: u64,
    within: Duration,
    log: &Path,
) -> u64 {
    let mut raw_peak = 0;
    let what = format!("{want} events under FINAL; see {}", log.display());
    wait_until(within, what, async || {
        let raw = query_u64(client, "SELECT count() FROM events")
            .await
            .unwrap_or(0);
        raw_peak = raw_peak.max(raw);
        let n = query_u64(client, "SELECT count() FROM events FINAL")
            .await
            .unwrap_or(0);
        if n == want {
            let raw = query_u64(client, "SELECT count() FROM events")
                .await
                .unwrap_or(0);
            return Ok(raw_peak.max(raw));
        }
        assert!(
            n < want,
            "events FINAL holds {n} rows, more than the {want} produced"
        );
        Err(format!("{n} of {want} events"))
    })
    .await
}

/// Distinct records (partition, offset) in `events` at or after `committed` of their
/// partition: inserted, but not committed.
async fn rows_beyond(client: &clickhouse::Client, committed: &[i64]) -> u64 {
    let clauses: Vec<String> = committed
        .iter()
        .enumerate()
        .map(|(p, o)| format!("(kafka_partition = {p} AND kafka_offset >= {o})"))
        .collect();
    let sql = format!(
        "SELECT uniqExact(kafka_partition, kafka_offset) FROM events WHERE {}",
        clauses.join(" OR ")
    );
    query_u64(client, &sql).await.unwrap()
}

/// One SIGKILL of a writer.
#[derive(Debug)]
struct Kill {
    /// Raw rows in `events` right after the kill.
    raw_rows: u64,
    /// Per partition: (raw rows, highest offset) in `events` then.
    inserted: Vec<(i32, u64, i64)>,
    /// The group's committed offsets then (per partition).
    committed: Vec<i64>,
    /// The end offsets of the events topic then (per partition).
    produced: Vec<i64>,
    /// Records inserted but not committed: the restarted writer reads and inserts them again.
    replayed: u64,
}

impl std::fmt::Display for Kill {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} raw rows in ClickHouse (per partition: rows, highest offset {:?}); end offsets \
             {:?}, committed {:?}; {} records inserted but not committed",
            self.raw_rows, self.inserted, self.produced, self.committed, self.replayed
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_killed_mid_batch_loses_nothing_and_duplicates_nothing() {
    const EVENTS: u64 = 20_000;
    /// At most this many kills; the test needs one that lands after an insert whose offsets
    /// were not committed yet (offsets are committed every second, so a kill right after an
    /// insert misses that window only if a commit slipped in between: a few percent).
    const MAX_KILLS: usize = 3;
    let started = Instant::now();
    let logs = TempDir::new("writer-recovery-kill");
    let topics = WriterTopics::create("rec").await;
    let ch = cleanup::Database::unique("pulse_writer_kill");
    let client = ch.client();
    let group = pulse_tests::unique("writer");

    // Tansu 0.6 leaves a group stuck when a killed member's session expires while its
    // successor joins; as a static member the restarted process takes over the killed one's
    // membership at once (as in processor_recovery.rs).
    let static_member = [
        "--kafka-option".to_owned(),
        format!("group.instance.id={group}-member"),
    ];
    let mut log = logs.path().join("writer-1.log");
    let mut writer = spawn(&topics, &ch, &group, log.clone(), &static_member);

    // The events are produced while the writers consume them.
    let producing = {
        let topic = topics.events.clone();
        tokio::spawn(async move {
            let producer = KafkaProducer::new(&pulse_tests::kafka(), "writer-recovery").unwrap();
            let base = now_ms() - 3_600_000;
            let mut pending = Vec::with_capacity(EVENTS as usize);
            for i in 0..EVENTS {
                pending.push(enqueue(&producer, &topic, i, base + i as i64, 0).await);
            }
            acked(pending).await
        })
    };

    // Kill the writer as soon as ClickHouse holds a quarter of the events (right after an
    // insert: its offsets are stored, and committed only by the next periodic commit), and
    // start a new one in the same group; again if that kill missed the window.
    let mut kills: Vec<Kill> = Vec::new();
    let mut kill_at = EVENTS / 4;
    let deadline = Instant::now() + Duration::from_secs(120);
    while kills.len() < MAX_KILLS && kills.iter().all(|k| k.replayed == 0) {
        wait_until(
            Deadline::at(deadline).every(Duration::from_millis(20)),
            format!("{kill_at} rows before a kill; see {}", log.display()),
            async || {
                let n = query_u64(&client, "SELECT count() FROM events")
                    .await
                    .unwrap_or(0);
                writer.assert_running();
                if n >= kill_at {
                    Ok(())
                } else {
                    Err(format!("{n} rows"))
                }
            },
        )
        .await;
        writer.assert_running();
        let status = writer.kill();
        let raw_rows = query_u64(&client, "SELECT count() FROM events")
            .await
            .unwrap();
        let inserted = client
            .query(
                "SELECT kafka_partition, count(), max(kafka_offset) FROM events \
                 GROUP BY kafka_partition ORDER BY kafka_partition",
            )
            .fetch_all::<(i32, u64, i64)>()
            .await
            .unwrap();
        let committed = committed_offsets(&group, &topics.events);
        let replayed = rows_beyond(&client, &committed).await;
        let produced = end_offsets(&topics.events);
        let kill = Kill {
            produced,
            raw_rows,
            inserted,
            committed,
            replayed,
        };
        eprintln!("killed a writer ({status}): {kill}");
        assert!(
            raw_rows < EVENTS,
            "the writer had written everything ({raw_rows} rows) before it was killed"
        );
        kills.push(kill);
        kill_at = raw_rows + 2_000;
        log = logs.path().join(format!("writer-{}.log", kills.len() + 1));
        writer = spawn(&topics, &ch, &group, log.clone(), &static_member);
    }
    assert!(
        kills.iter().any(|k| k.replayed > 0),
        "no kill landed between an insert and the commit of its offsets: {kills:?}"
    );

    // Waiting from the restart on (and not only once everything is produced) catches the
    // raw rows before background merges collapse the duplicates.
    let raw_peak = wait_final_count(&client, EVENTS, Duration::from_secs(120), &log).await;
    let produced = producing.await.unwrap();
    assert_eq!(produced.len() as u64, EVENTS);
    writer.assert_running();
    assert_exactly_once(&client, &produced).await;
    // And the last writer commits everything it wrote: a later restart replays nothing.
    wait_until(
        Deadline::after(Duration::from_secs(30)).every(Duration::from_millis(250)),
        format!("the group's committed offsets to sum up to the {EVENTS} records produced"),
        async || {
            let committed = committed_offsets(&group, &topics.events);
            if committed.iter().sum::<i64>() == EVENTS as i64 {
                Ok(())
            } else {
                Err(committed)
            }
        },
    )
    .await;

    // The last writer resumed exactly at the committed offsets: it inserted every record
    // from there on, the ones already inserted before the kill included.
    let last = kills.last().unwrap();
    let committed: i64 = last.committed.iter().sum();
    let text = writer.metrics().await.unwrap();
    let written = metric_sum(
        &text,
        "pulse_writer_rows_written_total",
        &["table=\"events\""],
    )
    .unwrap_or(0.0) as u64;
    assert_eq!(
        written,
        EVENTS - committed as u64,
        "the restarted writer did not resume at the committed offsets {:?}",
        last.committed
    );
    // Raw rows before merging: the records inserted but not committed before a kill were
    // inserted twice. Those duplicates share the ReplacingMergeTree key (user, event time,
    // event id), so FINAL (and, eventually, background merges) collapse them: that is the
    // design — at-least-once inserts, read exactly once.
    let raw = query_u64(&client, "SELECT count() FROM events")
        .await
        .unwrap();
    let replayed: u64 = kills.iter().map(|k| k.replayed).sum();
    eprintln!(
        "{EVENTS} produced; {} kill(s), at {:?} raw rows; {replayed} records inserted before a \
         kill and again after it; the last writer inserted {written} rows from the committed \
         offsets {:?}; raw rows peaked at {raw_peak} before merges, now {raw} raw rows ({} \
         duplicates not merged yet), {EVENTS} rows under FINAL, each id once",
        kills.len(),
        kills.iter().map(|k| k.raw_rows).collect::<Vec<_>>(),
        last.committed,
        raw - EVENTS,
    );
    eprintln!("kill test done in {:.1} s", started.elapsed().as_secs_f64());

    drop(writer);
    drop(logs);
}

/// Runs `body` after sourcing scripts/stack.sh, from the repository root.
fn stack(body: &str) -> Result<(), String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap();
    let out = Command::new("bash")
        .arg("-c")
        .arg(format!("source scripts/stack.sh && {body}"))
        .current_dir(root)
        .output()
        .map_err(|e| format!("running bash: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "`{body}` failed ({}): {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// A ClickHouse server of its own (scripts/stack.sh `start_clickhouse` on free ports, data
/// under `state`), stopped when dropped.
struct DedicatedClickHouse {
    state: PathBuf,
    http: u16,
    tcp: u16,
}

impl DedicatedClickHouse {
    fn start(state: &Path) -> Self {
        let ch = Self {
            state: state.to_owned(),
            http: free_port(),
            tcp: free_port(),
        };
        ch.start_again();
        ch
    }

    /// Starts the server on its ports and data (again); returns when it answers.
    fn start_again(&self) {
        stack(&format!(
            "start_clickhouse '{}' {} {}",
            self.state.display(),
            self.http,
            self.tcp
        ))
        .unwrap();
    }

    /// The command that stops the server (SIGTERM, SIGKILL after 20 s) and returns once it
    /// is gone.
    fn stop_command(&self) -> String {
        format!("stop_proc '{}' clickhouse", self.state.display())
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }
}

impl Drop for DedicatedClickHouse {
    fn drop(&mut self) {
        if let Err(e) = stack(&self.stop_command()) {
            eprintln!("stopping the dedicated ClickHouse: {e}");
        }
    }
}

/// One sample of the writer during the outage.
struct Sample {
    /// Since the stop began.
    at: Duration,
    /// ClickHouse was gone (else: still stopping).
    down: bool,
    rss: u64,
    circuit_open: Option<f64>,
    consumed: Option<f64>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_30_second_clickhouse_outage_under_load_loses_nothing_and_memory_stays_bounded() {
    /// Events per second, and the size of each event's padding property: 300/s of ~8 KiB
    /// is ~2.4 MB/s, so the 30 s outage leaves a backlog of ~75 MiB in Kafka, more than the
    /// RSS bound below even once (and the writer would hold it at least twice: the row and
    /// the record bytes kept for the DLQ).
    const RATE: u64 = 300;
    const PAD: usize = 8 * 1024;
    const OUTAGE: Duration = Duration::from_secs(30);
    let started = Instant::now();
    let dir = TempDir::new("writer-recovery-outage");
    let server = DedicatedClickHouse::start(&dir.path().join("stack"));
    let topics = WriterTopics::create("rec").await;
    let ch = ClickHouseConfig {
        url: server.url(),
        database: pulse_tests::unique("pulse_writer_outage"),
        ..pulse_tests::clickhouse()
    };
    let client = ch.client();
    let log = dir.path().join("writer.log");
    // The breaker opens after 4 failures in a row (~1.5–3 s of backoff) and then probes
    // every 3 s, so most of the outage runs with the circuit open, and recovery is quick.
    let mut writer = spawn(
        &topics,
        &ch,
        &pulse_tests::unique("writer"),
        log.clone(),
        &["--breaker-failures", "4", "--breaker-probe-ms", "3000"].map(String::from),
    );

    // Load: RATE events per second until `stop_load`; the task returns the acknowledged ids.
    let stop_load = CancellationToken::new();
    let load = {
        let topic = topics.events.clone();
        let stop = stop_load.clone();
        tokio::spawn(async move {
            let producer = KafkaProducer::new(&pulse_tests::kafka(), "writer-recovery").unwrap();
            let mut pending = Vec::new();
            let mut tick = tokio::time::interval(Duration::from_millis(1_000 / 20));
            let mut i = 0;
            while !stop.is_cancelled() {
                tick.tick().await;
                for _ in 0..RATE / 20 {
                    pending.push(enqueue(&producer, &topic, i, now_ms() - 60_000, PAD).await);
                    i += 1;
                }
            }
            acked(pending).await
        })
    };

    // Steady state under load before the outage.
    wait_until(
        Deadline::after(Duration::from_secs(90)).every(Duration::from_millis(200)),
        format!("2000 rows before the outage; see {}", log.display()),
        async || {
            let n = query_u64(&client, "SELECT count() FROM events")
                .await
                .unwrap_or(0);
            if n >= 2_000 {
                return Ok(());
            }
            writer.assert_running();
            Err(format!("{n} rows"))
        },
    )
    .await;
    let mut before = Vec::new();
    for _ in 0..5 {
        before.push(rss_bytes(writer.pid()));
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let baseline = *before.iter().max().unwrap();
    let rows_before = query_u64(&client, "SELECT count() FROM events")
        .await
        .unwrap();

    // Stop ClickHouse (in the background: a graceful stop takes a while) and sample the
    // writer every second from then until ClickHouse has been gone for OUTAGE.
    let stop_began = Instant::now();
    let mut stopping = Some(tokio::task::spawn_blocking({
        let cmd = server.stop_command();
        move || stack(&cmd)
    }));
    let mut down_at: Option<Instant> = None;
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tick.tick().await;
        if let Some(task) = stopping.take_if(|t| t.is_finished()) {
            task.await.unwrap().unwrap();
            down_at = Some(Instant::now());
        }
        if down_at.is_some_and(|d| d.elapsed() >= OUTAGE) {
            break;
        }
        writer.assert_running();
        let text = writer.metrics().await.unwrap_or_default();
        samples.push(Sample {
            at: stop_began.elapsed(),
            down: down_at.is_some(),
            rss: rss_bytes(writer.pid()),
            circuit_open: metric_sum(&text, "pulse_writer_circuit_open", &["sink=\"clickhouse\""]),
            consumed: metric_sum(
                &text,
                "pulse_kafka_consumed_records_total",
                &[&format!("topic=\"{}\"", topics.events)],
            ),
        });
    }
    let down_at = down_at.unwrap();
    server.start_again();
    let back_at = Instant::now();
    stop_load.cancel();
    let produced = load.await.unwrap();

    eprintln!(
        "{rows_before} raw rows written before the stop; writer RSS under load before it: {}",
        before
            .iter()
            .map(|b| mib(*b))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!(
        "ClickHouse stopped {:.1} s after the stop began, down for {:.1} s; the writer \
         meanwhile (t from the stop's start):",
        (down_at - stop_began).as_secs_f64(),
        (back_at - down_at).as_secs_f64()
    );
    for s in &samples {
        eprintln!(
            "  t={:>4.1}s {} rss={} circuit_open={:?} consumed={:?}",
            s.at.as_secs_f64(),
            if s.down { "down    " } else { "stopping" },
            mib(s.rss),
            s.circuit_open,
            s.consumed
        );
    }
    let raw_peak = wait_final_count(
        &client,
        produced.len() as u64,
        Duration::from_secs(120),
        &log,
    )
    .await;
    let recovered_after = back_at.elapsed();
    writer.assert_running();
    assert_exactly_once(&client, &produced).await;
    let raw = query_u64(&client, "SELECT count() FROM events")
        .await
        .unwrap();
    let rss_after = rss_bytes(writer.pid());

    let peak = samples.iter().map(|s| s.rss).max().unwrap();
    let consumed: Vec<f64> = samples
        .iter()
        .filter(|s| s.down)
        .filter_map(|s| s.consumed)
        .collect();
    assert!(
        consumed.len() >= 2,
        "the writer's /metrics did not answer while ClickHouse was down"
    );
    let consumed_in_outage = consumed[consumed.len() - 1] - consumed[0];
    eprintln!(
        "{} events produced ({RATE}/s, ~{} of records during the outage); all present once \
         under FINAL {:.1} s after ClickHouse came back (raw rows peaked at {raw_peak}, now \
         {raw}); RSS before {}, peak in the outage {} (+{}), after recovery {}; records \
         consumed while ClickHouse was down: {consumed_in_outage}",
        produced.len(),
        mib((RATE as f64 * (back_at - stop_began).as_secs_f64() * (PAD as f64 + 200.0)) as u64),
        recovered_after.as_secs_f64(),
        mib(baseline),
        mib(peak),
        mib(peak.saturating_sub(baseline)),
        mib(rss_after),
    );

    let text = writer.metrics().await.unwrap();
    let retries = metric_sum(
        &text,
        "pulse_writer_retries_total",
        &["sink=\"clickhouse\""],
    );
    let errors = metric_sum(
        &text,
        "pulse_writer_errors_total",
        &["sink=\"clickhouse\"", "kind=\"retryable\""],
    );
    let circuit = metric_sum(&text, "pulse_writer_circuit_open", &["sink=\"clickhouse\""]);
    eprintln!(
        "after recovery: retries {retries:?}, retryable errors {errors:?}, circuit open {circuit:?}"
    );
    assert!(
        retries.is_some_and(|r| r >= 1.0),
        "pulse_writer_retries_total did not move: {retries:?}"
    );
    assert!(
        errors.is_some_and(|e| e >= 1.0),
        "pulse_writer_errors_total{{kind=\"retryable\"}} did not move: {errors:?}"
    );
    assert_eq!(
        circuit,
        Some(0.0),
        "the circuit closed again after recovery"
    );
    assert!(
        samples.iter().any(|s| s.circuit_open == Some(1.0)),
        "the circuit breaker never opened during the outage"
    );

    // While ClickHouse is down the writer retries one batch and reads nothing more: it
    // blocks in the retry loop with its partitions paused. At most the batch being filled
    // when the server went away is completed (<= 500 records) after the first sample.
    let batch_rows: f64 = BATCH_ROWS.parse().unwrap();
    assert!(
        consumed_in_outage <= batch_rows,
        "the writer consumed {consumed_in_outage} records while ClickHouse was down"
    );
    // The memory bound: the baseline (under the same load) already holds one batch in
    // flight; during the outage at most one more batch (500 rows of ~8 KiB, held twice — row
    // and record bytes for the DLQ — ~8 MiB) plus what librdkafka fetched before the pause
    // (a fetch is at most max.partition.fetch.bytes = 1 MiB per partition) can be added, so
    // 32 MiB leaves ample room for allocator slack. It is half of librdkafka's default
    // prefetch queue (queued.max.messages.kbytes = 64 MiB): a writer that stopped reading
    // without pausing would let librdkafka fill that queue from the ~75 MiB backlog and
    // exceed the bound, and one that buffered the backlog itself would exceed it twice over.
    // The peak includes ClickHouse's graceful stop, during which an insert can hang
    // unanswered for seconds: inserts have no timeout and partitions are paused only after a
    // failure, so librdkafka keeps prefetching then (up to +17 MiB measured).
    let bound = baseline + 32 * MIB;
    assert!(
        peak < bound,
        "writer RSS peaked at {} during the outage, above the bound {} (RSS before + 32 MiB)",
        mib(peak),
        mib(bound)
    );
    eprintln!(
        "outage test done in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    drop(writer);
    drop(server);
    drop(dir);
}
