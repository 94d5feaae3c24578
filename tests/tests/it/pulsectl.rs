//! `pulsectl` against the real broker and ClickHouse: loadgen's summary matches what is on
//! the topics (accepted records on the events topic, rejected ones on the DLQ, nothing for
//! duplicates) over HTTP and gRPC; `dlq inspect` returns the rejected records with their
//! codes; `dlq redrive` re-submits JSON records and skips protobuf ones; `migrate` applies
//! the schema once. Run as a child process with stderr on a pipe, `loadgen`, `dlq redrive`
//! and `migrate` print plain progress lines (done/total, rate, ETA) on stderr and keep
//! stdout their own output; on a pseudo-terminal (`script`), `loadgen` draws a bar with its
//! rate and ETA instead.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use pulse_contracts::headers;
use pulse_ingest::pipeline::{FixedSchemaId, Framer};
use pulsectl::dlq::{self, Redriven, TopicArgs};
use pulsectl::ingest_client::IngestArgs;
use pulsectl::loadgen::expect::Settings;
use pulsectl::loadgen::{LoadgenArgs, Report, RunOptions, run_load};
use pulsectl::progress::Progress;
use rdkafka::Message;
use rdkafka::message::{Headers, OwnedMessage};
use tokio_util::sync::CancellationToken;

const MALFORMED_CODES: [&str; 4] = [
    "missing_field",
    "invalid_amount",
    "invalid_currency",
    "invalid_event_type",
];

use crate::support::child_process::binary;
use crate::support::ingest_server::{self, read_exactly};
use crate::support::{cleanup, tls};

struct Ingest {
    http: String,
    grpc: String,
    events_topic: String,
    dlq_topic: String,
    _servers: pulse_ingest::Servers,
    _topics: cleanup::Topics,
}

/// An in-process ingest on 127.0.0.1:0 against the real broker, with its own topics (the
/// pattern of the `ingest` tests, framing with a fixed schema id instead of a registry).
async fn start_ingest() -> Ingest {
    start_ingest_with(&[]).await
}

/// [`start_ingest`] with more `pulse-ingest` flags (e.g. its TLS certificate).
async fn start_ingest_with(extra: &[&str]) -> Ingest {
    let kafka = pulse_tests::kafka();
    let events_topic = pulse_tests::unique("events");
    let dlq_topic = pulse_tests::unique("dlq");
    let topics = ingest_server::create_topics(&events_topic, &dlq_topic, 2).await;
    let cfg = ingest_server::config(
        &kafka,
        "test-key=loadgen",
        "test-hmac",
        &events_topic,
        &dlq_topic,
        extra,
    );
    let framer: Arc<dyn Framer> = Arc::new(FixedSchemaId(1));
    let servers = ingest_server::serve(&kafka, &cfg, framer, "pulsectl-test").await;
    Ingest {
        http: format!("http://{}", servers.http_addr),
        grpc: format!("http://{}", servers.grpc_addr),
        events_topic,
        dlq_topic,
        _servers: servers,
        _topics: topics,
    }
}

fn loadgen_args(extra: &[&str]) -> LoadgenArgs {
    let mut argv = vec!["pulsectl", "loadgen"];
    argv.extend_from_slice(extra);
    match pulsectl::Cli::parse_from(argv).command {
        pulsectl::Command::Loadgen(mut args) => {
            // As if from PULSE_API_KEY (a secret is never a flag).
            args.ingest.api_key = "test-key".into();
            *args
        }
        other => panic!("parsed as {other:?}"),
    }
}

fn ingest_args(http: &str) -> IngestArgs {
    IngestArgs {
        target: http.to_owned(),
        api_key: "test-key".into(),
        ca_file: None,
        ..IngestArgs::default()
    }
}

fn topic_args(topic: &str) -> TopicArgs {
    TopicArgs {
        topic: topic.to_owned(),
        read_timeout: Duration::from_secs(30),
        kafka: pulse_tests::kafka(),
    }
}

fn event_id(m: &OwnedMessage) -> String {
    m.headers()
        .and_then(|h| h.iter().find(|x| x.key == headers::EVENT_ID))
        .and_then(|h| h.value)
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap()
}

/// The summary's counts equal what is on the topics; returns the DLQ records as
/// `dlq inspect` reads them.
async fn assert_counts_match_the_topics(ingest: &Ingest, report: &Report) -> Vec<dlq::Record> {
    let s = &report.summary;
    assert_eq!((s.failed, s.unsent), (0, 0), "{s}\n{:?}", report.errors);
    assert_eq!(s.sent, s.generated, "every generated event was answered");
    assert_eq!(s.sent, s.accepted + s.duplicates + s.rejected);
    assert!(
        s.accepted > 0 && s.duplicates > 0 && s.rejected > 0,
        "every kind of answer occurs: {s}"
    );
    let x = report.expected(Settings {
        window_ms: 60_000,
        session_gap_ms: 1_800_000,
    });
    assert!(!x.late_event_ids.is_empty(), "late events were sent: {s}");
    assert_eq!(x.accepted_event_ids.len() as u64, s.accepted);
    assert_eq!(x.duplicates, s.duplicates);

    // Accepted events are on the events topic once each; duplicates produced nothing.
    let records = read_exactly(&ingest.events_topic, s.accepted as usize).await;
    let on_topic: BTreeSet<String> = records.iter().map(event_id).collect();
    assert_eq!(on_topic.len(), records.len(), "no event id twice");
    let accepted: BTreeSet<String> = x.accepted_event_ids.iter().cloned().collect();
    assert_eq!(on_topic, accepted);

    // Rejected events are on the DLQ with the code ingest answered.
    read_exactly(&ingest.dlq_topic, s.rejected as usize).await;
    let dlq = dlq::inspect(
        &topic_args(&ingest.dlq_topic),
        None,
        None,
        &Progress::hidden(),
    )
    .await
    .unwrap();
    let on_dlq: BTreeMap<String, String> = dlq
        .iter()
        .map(|r| (r.event_id.clone().unwrap(), r.code.clone().unwrap()))
        .collect();
    let rejected: BTreeMap<String, String> = x
        .rejected
        .iter()
        .map(|r| (r.event_id.clone(), r.reason_code.clone()))
        .collect();
    assert_eq!(dlq.len() as u64, s.rejected);
    assert_eq!(on_dlq, rejected);
    assert!(
        on_dlq
            .values()
            .all(|c| MALFORMED_CODES.contains(&c.as_str())),
        "{on_dlq:?}"
    );
    dlq
}

#[tokio::test]
async fn loadgen_over_http_matches_the_topics_and_dlq_inspect_and_redrive_see_the_rejects() {
    let ingest = start_ingest().await;
    let args = loadgen_args(&[
        "--target",
        &ingest.http,
        "--rate",
        "40",
        "--duration",
        "4s",
        "--users",
        "20",
        "--batch-size",
        "10",
        "--concurrency",
        "2",
        "--seed",
        "4242",
        "--out-of-order",
        "0.1",
        "--late",
        "0.05",
        "--late-warmup-ms",
        "500",
        "--duplicates",
        "0.1",
        "--malformed",
        "0.1",
    ]);
    let report = run_load(
        &args,
        CancellationToken::new(),
        RunOptions {
            progress: None,
            keep_answers: true,
        },
    )
    .await
    .unwrap();
    let dlq = assert_counts_match_the_topics(&ingest, &report).await;

    // inspect: filtered by code and limited.
    let code = dlq[0].code.clone().unwrap();
    let some = dlq::inspect(
        &topic_args(&ingest.dlq_topic),
        Some(&code),
        Some(1),
        &Progress::hidden(),
    )
    .await
    .unwrap();
    assert_eq!(some.len(), 1);
    assert_eq!(some[0].code.as_deref(), Some(code.as_str()));
    assert!(
        some[0].payload.starts_with(b"{"),
        "the original JSON bytes are kept"
    );

    // redrive: the same bytes are rejected again for the same reason (and land on the DLQ
    // again); a position that does not exist is reported.
    let positions: Vec<(i32, i64)> = dlq
        .iter()
        .filter(|r| r.code.as_deref() == Some(code.as_str()))
        .map(|r| (r.partition, r.offset))
        .collect();
    let mut offsets = positions.clone();
    offsets.push((0, 1_000_000));
    let redriven = dlq::redrive(
        &dlq::RedriveArgs {
            offsets,
            code: None,
            ingest: ingest_args(&ingest.http),
            topic: topic_args(&ingest.dlq_topic),
        },
        None,
    )
    .await
    .unwrap();
    assert_eq!(redriven.len(), positions.len() + 1);
    for (pos, r) in &redriven {
        match r {
            Redriven::Answered(a) => {
                assert!(positions.contains(pos));
                assert_eq!(a.status, "rejected");
                assert_eq!(a.code.as_deref(), Some(code.as_str()));
            }
            Redriven::NotFound => assert_eq!(*pos, (0, 1_000_000)),
            Redriven::Skipped(why) => panic!("{pos:?} skipped: {why}"),
        }
    }
    // The redriven events are still invalid and claim the same ids within the dedup window:
    // ingest answers each `rejected` again without a second DLQ record (a rejected event is
    // dead-lettered once per id; README, Dedup).
    let after = dlq::inspect(
        &topic_args(&ingest.dlq_topic),
        None,
        None,
        &Progress::hidden(),
    )
    .await
    .unwrap();
    assert_eq!(after.len(), dlq.len());
}

#[tokio::test]
async fn loadgen_over_grpc_matches_the_topics_and_redrive_skips_protobuf_records() {
    let ingest = start_ingest().await;
    let args = loadgen_args(&[
        "--grpc",
        &ingest.grpc,
        "--rate",
        "40",
        "--duration",
        "3s",
        "--users",
        "10",
        "--batch-size",
        "8",
        "--seed",
        "77",
        "--late",
        "0.1",
        "--late-warmup-ms",
        "0",
        "--duplicates",
        "0.1",
        "--malformed",
        "0.1",
    ]);
    let report = run_load(
        &args,
        CancellationToken::new(),
        RunOptions {
            progress: None,
            keep_answers: true,
        },
    )
    .await
    .unwrap();
    let dlq = assert_counts_match_the_topics(&ingest, &report).await;
    let redriven = dlq::redrive(
        &dlq::RedriveArgs {
            offsets: Vec::new(),
            code: dlq[0].code.clone(),
            ingest: ingest_args(&ingest.http),
            topic: topic_args(&ingest.dlq_topic),
        },
        None,
    )
    .await
    .unwrap();
    assert!(!redriven.is_empty());
    assert!(
        redriven
            .iter()
            .all(|(_, r)| matches!(r, Redriven::Skipped(_))),
        "gRPC records are protobuf: {redriven:?}"
    );
}

#[tokio::test]
async fn migrate_applies_the_schema_once() {
    let ch = cleanup::Database::unique("pulsectl");
    let first = pulsectl::migrate::apply(&ch).await.unwrap();
    assert!(!first.is_empty());
    assert_eq!(
        first,
        pulse_storage::migrate::MIGRATIONS
            .iter()
            .map(|(v, _, _)| *v)
            .collect::<Vec<_>>()
    );
    assert!(pulsectl::migrate::apply(&ch).await.unwrap().is_empty());
}

/// Runs `pulsectl ARGS` with stdout and stderr on pipes (not a terminal); returns both.
async fn run_pulsectl(args: &[&str]) -> (String, String) {
    let mut cmd = tokio::process::Command::new(binary("pulsectl"));
    cmd.args(args)
        .env("PULSE_API_KEY", "test-key")
        .env_remove("PULSE_PROGRESS")
        .env_remove("PULSE_PROGRESS_INTERVAL")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("pulsectl did not finish in 120 s")
        .expect("running pulsectl");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(
        out.status.success(),
        "pulsectl {args:?}: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    (stdout, stderr)
}

/// The `(done, total)` of each periodic line `label: done/total unit (p%), r unit/s, ETA e, …`.
fn periodic_lines(stderr: &str, label: &str, unit: &str) -> Vec<(u64, u64)> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("{label}: ")))
        // Not the done line, nor the other messages (`loadgen: seed …`).
        .filter(|rest| {
            rest.split_whitespace()
                .next()
                .is_some_and(|t| t.starts_with(|c: char| c.is_ascii_digit()) && t.contains('/'))
        })
        .map(|rest| {
            assert!(
                rest.contains(&format!(" {unit}/s, ETA ")) && rest.contains(", elapsed "),
                "a progress line without rate and ETA: {rest}"
            );
            let counts = rest.split_whitespace().next().unwrap();
            let (done, total) = counts.split_once('/').unwrap();
            (done.parse().unwrap(), total.parse().unwrap())
        })
        .collect()
}

#[tokio::test]
async fn on_a_pipe_loadgen_redrive_and_migrate_print_plain_progress_lines_on_stderr_only() {
    let ingest = start_ingest().await;
    // 30 events/s for 4 s = 120 events, a line every 500 ms.
    let (stdout, stderr) = run_pulsectl(&[
        "loadgen",
        "--target",
        &ingest.http,
        "--rate",
        "30",
        "--duration",
        "4s",
        "--seed",
        "5",
        "--batch-size",
        "5",
        "--malformed",
        "0.2",
        "--duplicates",
        "0",
        "--late",
        "0",
        "--progress-interval",
        "500ms",
    ])
    .await;
    let lines = periodic_lines(&stderr, "loadgen", "events");
    assert!(lines.len() >= 4, "a line every 500 ms of 4 s:\n{stderr}");
    assert!(lines.iter().all(|&(_, total)| total == 120), "{lines:?}");
    assert!(
        lines.windows(2).all(|w| w[0].0 <= w[1].0) && lines.iter().any(|&(done, _)| done > 0),
        "done grows: {lines:?}"
    );
    assert!(
        stderr.contains("loadgen: done, 120 events in "),
        "the done line:\n{stderr}"
    );
    assert!(
        stdout.starts_with("loadgen summary (seed 5)\n")
            && stdout.contains("  sent          120\n"),
        "stdout is the summary:\n{stdout}"
    );
    assert!(!stdout.contains("ETA"), "no progress on stdout:\n{stdout}");

    // Redrive three rejected events: reading the DLQ, then re-submitting, each with its lines.
    let dlq = dlq::inspect(
        &topic_args(&ingest.dlq_topic),
        None,
        None,
        &Progress::hidden(),
    )
    .await
    .unwrap();
    assert!(dlq.len() >= 3, "malformed events were rejected: {stdout}");
    let positions: Vec<String> = dlq[..3]
        .iter()
        .map(|r| format!("{}:{}", r.partition, r.offset))
        .collect();
    let kafka = pulse_tests::kafka();
    let (stdout, stderr) = run_pulsectl(&[
        "--progress",
        "plain",
        "dlq",
        "redrive",
        "--offsets",
        &positions.join(","),
        "--target",
        &ingest.http,
        "--topic",
        &ingest.dlq_topic,
        "--kafka-brokers",
        &kafka.brokers,
    ])
    .await;
    assert!(
        stderr.contains(&format!("dlq read: done, {} records in ", dlq.len())),
        "reading ends with its done line:\n{stderr}"
    );
    assert!(
        stderr.contains("dlq redrive: done, 3 records in ") && stderr.contains("rejected 3"),
        "re-submitting ends with its done line and the answers:\n{stderr}"
    );
    let answered: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        answered.len(),
        3,
        "stdout holds only the answers:\n{stdout}"
    );
    for (line, pos) in answered.iter().zip(&positions) {
        assert!(
            line.starts_with(&format!("{pos}  ")) && line.contains("  rejected  "),
            "{line}"
        );
    }

    let ch = cleanup::Database::unique("pulsectl_progress");
    let (stdout, stderr) = run_pulsectl(&[
        "migrate",
        "--clickhouse-url",
        &ch.url,
        "--clickhouse-database",
        &ch.database,
    ])
    .await;
    let n = pulse_storage::migrate::MIGRATIONS.len();
    assert!(
        stderr.contains(&format!("migrate: done, {n} migrations in ")),
        "{stderr}"
    );
    assert_eq!(
        stdout.lines().count(),
        n,
        "one line per migration:\n{stdout}"
    );
    assert!(stdout.starts_with("applied migration 0001 "), "{stdout}");
}

/// Terminal output as text: ANSI escape sequences (`ESC [ … letter`, `ESC letter`) removed,
/// carriage returns as line ends.
fn terminal_text(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        match c {
            '\u{1b}' => {
                if chars.next_if_eq(&'[').is_some() {
                    // Parameters and intermediates up to the final byte (@ to ~).
                    for c in chars.by_ref() {
                        if ('@'..='~').contains(&c) {
                            break;
                        }
                    }
                } else {
                    chars.next();
                }
            }
            '\r' => out.push('\n'),
            c => out.push(c),
        }
    }
    out
}

#[tokio::test]
async fn on_a_terminal_loadgen_draws_a_bar_with_rate_and_eta_instead_of_plain_lines() {
    let ingest = start_ingest().await;
    // `script` (util-linux) runs the command on a new pseudo-terminal, as a user's shell
    // would, and copies what is drawn there to its own stdout; the terminal gets a size.
    let command = format!(
        "stty cols 160 rows 40; exec {} loadgen --target {} --rate 30 \
         --duration 4s --seed 6 --batch-size 5 --malformed 0 --duplicates 0 --late 0",
        binary("pulsectl").display(),
        ingest.http
    );
    let mut cmd = tokio::process::Command::new("script");
    cmd.args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .env_remove("PULSE_PROGRESS")
        .env_remove("PULSE_PROGRESS_INTERVAL")
        .env("PULSE_API_KEY", "test-key")
        .env("TERM", "xterm-256color")
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("pulsectl on a terminal did not finish in 120 s")
        .expect("running script (util-linux)");
    let text = terminal_text(&String::from_utf8_lossy(&out.stdout));
    assert!(
        out.status.success(),
        "{}\n{text}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    // The bar: `loadgen [====>    ] 60/120 events (50%) 30.0/s ETA 2s`, redrawn in place.
    let bars: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("loadgen [") && l.contains("/120 events ("))
        .collect();
    assert!(!bars.is_empty(), "no progress bar on the terminal:\n{text}");
    assert!(
        bars.iter()
            .any(|l| l.contains("=") && l.contains("/s ETA ") && !l.contains(" 0/120 ")),
        "a bar that moved, with its rate and ETA: {bars:#?}"
    );
    assert!(
        bars.iter()
            .filter(|l| l.contains(" 0/120 events (0%)"))
            .all(|l| l.contains(" ETA unknown")),
        "no time left is claimed before anything moved: {bars:#?}"
    );
    assert!(
        !text.contains(" events/s, ETA "),
        "no plain progress lines on a terminal:\n{text}"
    );
    assert!(
        text.contains("loadgen: done, 120 events in "),
        "the done line after the bar:\n{text}"
    );
    assert!(
        text.contains("loadgen summary (seed 6)"),
        "the summary:\n{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn loadgen_and_dlq_redrive_reach_an_ingest_over_tls_with_the_ca_file() {
    let dir = tls::work_dir("pulsectl-tls");
    let ca = tls::make_ca(&dir, "pulsectl-ca");
    let (cert, key) = tls::make_server_cert(&dir, "pulsectl-ca");
    let ingest = start_ingest_with(&[
        "--tls-cert-file",
        cert.to_str().unwrap(),
        "--tls-key-file",
        key.to_str().unwrap(),
    ])
    .await;
    let https = ingest.http.replace("http://", "https://");
    let grpcs = ingest.grpc.replace("http://", "https://");
    let ca_file = ca.to_str().unwrap();
    // Seeds differ: the same seed would send the same event ids (duplicates the second time).
    for (transport, seed) in [
        (["--target", https.as_str()], "11"),
        (["--grpc", grpcs.as_str()], "12"),
    ] {
        let args = loadgen_args(&[
            transport[0],
            transport[1],
            "--ca-file",
            ca_file,
            "--rate",
            "20",
            "--duration",
            "1s",
            "--seed",
            seed,
            "--malformed",
            "0.3",
            "--duplicates",
            "0",
            "--late",
            "0",
        ]);
        let report = run_load(
            &args,
            CancellationToken::new(),
            RunOptions {
                progress: None,
                keep_answers: false,
            },
        )
        .await
        .unwrap();
        let s = &report.summary;
        assert_eq!((s.sent, s.failed), (20, 0), "{transport:?}: {s}");
        assert!(s.accepted > 0 && s.rejected > 0, "{transport:?}: {s}");
    }

    // `dlq redrive --target https://… --ca-file`: answered over TLS (the HTTP rejects only;
    // the gRPC ones are protobuf and skipped, whatever the transport).
    let records = dlq::inspect(
        &topic_args(&ingest.dlq_topic),
        None,
        None,
        &Progress::hidden(),
    )
    .await
    .unwrap();
    let json: Vec<(i32, i64)> = records
        .iter()
        .filter(|r| r.payload.starts_with(b"{"))
        .map(|r| (r.partition, r.offset))
        .collect();
    assert!(!json.is_empty(), "the HTTP run's rejects are JSON");
    let redriven = dlq::redrive(
        &dlq::RedriveArgs {
            offsets: json.clone(),
            code: None,
            ingest: IngestArgs {
                target: https.clone(),
                api_key: "test-key".into(),
                ca_file: Some(ca.clone()),
                ..IngestArgs::default()
            },
            topic: topic_args(&ingest.dlq_topic),
        },
        None,
    )
    .await
    .unwrap();
    assert_eq!(redriven.len(), json.len());
    for (pos, r) in &redriven {
        match r {
            Redriven::Answered(a) => assert_eq!(a.status, "rejected", "{pos:?}"),
            other => panic!("{pos:?}: {other:?}"),
        }
    }
    // A CA file that holds no certificate is refused before anything is sent.
    let not_pem = dir.join("not-a-ca.pem");
    std::fs::write(&not_pem, "hello").unwrap();
    let err = dlq::redrive(
        &dlq::RedriveArgs {
            offsets: json,
            code: None,
            ingest: IngestArgs {
                target: https,
                api_key: "test-key".into(),
                ca_file: Some(not_pem),
                ..IngestArgs::default()
            },
            topic: topic_args(&ingest.dlq_topic),
        },
        None,
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string().contains("holds no PEM certificate"),
        "{err}"
    );
}
